/// BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019) encoders exactly as transformers 4.45.1's `BertModel`,
/// `RobertaModel`, `BertForSequenceClassification` and `RobertaForSequenceClassification` compute them (eval
/// mode), with Hugging Face's parameter names so a checkpoint folder loads without renaming. The two families
/// differ only where RoBERTa's paper and code do: positions counted from `padding_idx + 1` past the padding
/// (fairseq's `make_positions`), and the classification head (RoBERTa: dense, tanh, out_proj on `<s>`; BERT:
/// the pooler's tanh(dense) on [CLS], then one linear `classifier`).
/// Axes: N rows (batch), T positions, D hidden width (hidden_size), H heads, Dh = D / H, F intermediate width,
/// V vocabulary, C labels.
module Moe.Encoders

open System
open System.IO
open System.Text.Json
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Attention

// ---------------------------------------------------------------- configuration

/// Which family's embeddings and head.
type EncoderFamily =
    | Bert
    | Roberta

/// The hyper-parameters of `BertConfig` / `RobertaConfig` that change what the model computes.
type EncoderConfig =
    { Family: EncoderFamily
      /// V (vocab_size).
      VocabSize: int
      /// D (hidden_size).
      HiddenSize: int
      NumLayers: int
      NumHeads: int
      /// F (intermediate_size).
      IntermediateSize: int
      /// transformers' hidden_act name (`Bart.supportedActivations`).
      Activation: string
      /// Dropout on embeddings and sublayer outputs (training only).
      HiddenDropout: float
      /// Dropout on attention probabilities (training only).
      AttentionDropout: float
      /// Rows of the position table (max_position_embeddings).
      MaxPositions: int
      /// Rows of the token-type table (type_vocab_size: 2 for BERT, 1 for RoBERTa checkpoints).
      TypeVocabSize: int
      LayerNormEps: float
      /// The padding id; RoBERTa's positions start after it.
      PadTokenId: int
      /// The labels in id order (config.json's id2label), for the classification models.
      Labels: string[]
      /// Dropout before the classification head (classifier_dropout, else hidden_dropout_prob; training only).
      ClassifierDropout: float }

/// The longest sequence the position table holds: RoBERTa's first position is padding_idx + 1 (514 rows hold
/// 512 tokens), BERT's is 0.
let maxTokens (cfg: EncoderConfig) : int =
    match cfg.Family with
    | Roberta -> cfg.MaxPositions - cfg.PadTokenId - 1
    | Bert -> cfg.MaxPositions

module EncoderConfig =
    /// Every problem with a config, empty when it is usable.
    let validate (cfg: EncoderConfig) : string list =
        [ for name, v in [ "vocab_size", cfg.VocabSize; "hidden_size", cfg.HiddenSize; "num_attention_heads", cfg.NumHeads
                           "intermediate_size", cfg.IntermediateSize; "max_position_embeddings", cfg.MaxPositions
                           "type_vocab_size", cfg.TypeVocabSize ] do
              if v < 1 then sprintf "%s must be >= 1, got %d" name v
          if cfg.NumLayers < 0 then sprintf "num_hidden_layers must be >= 0, got %d" cfg.NumLayers
          if cfg.NumHeads >= 1 && cfg.HiddenSize % cfg.NumHeads <> 0 then
              sprintf "num_attention_heads (%d) must divide hidden_size (%d)" cfg.NumHeads cfg.HiddenSize
          if not (List.contains cfg.Activation Bart.supportedActivations) then
              sprintf "hidden_act %s is not supported (supported: %s)" cfg.Activation (String.Join(", ", Bart.supportedActivations))
          for name, p in [ "hidden_dropout_prob", cfg.HiddenDropout; "attention_probs_dropout_prob", cfg.AttentionDropout
                           "classifier_dropout", cfg.ClassifierDropout ] do
              if not (p >= 0.0 && p < 1.0) then sprintf "%s must be in [0, 1), got %g" name p
          if cfg.PadTokenId < 0 || cfg.PadTokenId >= cfg.VocabSize then
              sprintf "pad_token_id must be in [0, %d), got %d" cfg.VocabSize cfg.PadTokenId
          if maxTokens cfg < 1 then
              sprintf "max_position_embeddings (%d) leaves no position after pad_token_id %d" cfg.MaxPositions cfg.PadTokenId
          if cfg.Labels.Length < 1 then "id2label must name at least one label" ]

    /// Fields that cannot change what the encoder or its classifier computes in evaluation: weight init,
    /// the loss's problem type, the head count of older configs, and tokenizer hints.
    let private noEffectFields =
        [ "initializer_range"; "problem_type"; "_num_labels"; "gradient_checkpointing"; "layer_norm_type"
          "output_past"; "directionality"; "pooler_fc_size"; "pooler_num_attention_heads"; "pooler_num_fc_layers"
          "pooler_size_per_head"; "pooler_type"; "do_lower_case" ]

    /// id2label in id order: its keys must be 0 .. C-1. Without id2label, `num_labels` (default 2) labels named
    /// LABEL_i, as transformers' PretrainedConfig names them.
    let private readLabels (r: HfConfig.ConfigReader) : string[] =
        match r.Element "id2label" with
        | Some v when v.ValueKind = JsonValueKind.Object ->
            let pairs =
                [ for p in v.EnumerateObject() ->
                    match Int32.TryParse p.Name, p.Value.ValueKind with
                    | (true, i), JsonValueKind.String -> i, p.Value.GetString()
                    | _ -> failwithf "%s: field \"id2label\": expected {\"0\": \"LABEL\", ...}, got entry \"%s\": %s" r.Path p.Name (p.Value.GetRawText()) ]
                |> List.sortBy fst
            if pairs |> List.mapi (fun i (k, _) -> i = k) |> List.forall id |> not then
                failwithf "%s: field \"id2label\": expected ids 0 .. %d, got %s" r.Path (pairs.Length - 1) (pairs |> List.map (fst >> string) |> String.concat ", ")
            let n = r.IntOr("num_labels", pairs.Length)
            if n <> pairs.Length then failwithf "%s: num_labels %d disagrees with id2label's %d labels" r.Path n pairs.Length
            pairs |> List.map snd |> Array.ofList
        | Some v -> failwithf "%s: field \"id2label\": expected an object, got %s" r.Path (v.GetRawText())
        | None -> Array.init (r.IntOr("num_labels", 2)) (sprintf "LABEL_%d")

    /// Parses a `config.json` whose model_type is "bert" or "roberta": every field is used, ignored by name
    /// (it cannot change the output), or refused naming it. Missing fields take BertConfig's / RobertaConfig's
    /// defaults (transformers 4.45.1).
    let parse (path: string) : EncoderConfig =
        let r = HfConfig.ConfigReader.Open path
        let family =
            match r.String "model_type" with
            | "bert" -> Bert
            | "roberta" -> Roberta
            | _ -> r.Unsupported("model_type", "\"bert\", \"roberta\"")
        match r.StringOr("position_embedding_type", "absolute") with
        | "absolute" -> ()
        | _ -> r.Unsupported("position_embedding_type", "\"absolute\"")
        for flag in [ "is_decoder"; "add_cross_attention" ] do
            if r.BoolOr(flag, false) then r.Unsupported(flag, "false (an encoder)")
        let hiddenDropout = r.FloatOr("hidden_dropout_prob", 0.1)
        let cfg =
            { Family = family
              VocabSize = r.IntOr("vocab_size", (if family = Bert then 30522 else 50265))
              HiddenSize = r.IntOr("hidden_size", 768)
              NumLayers = r.IntOr("num_hidden_layers", 12)
              NumHeads = r.IntOr("num_attention_heads", 12)
              IntermediateSize = r.IntOr("intermediate_size", 3072)
              Activation = r.StringOr("hidden_act", "gelu")
              HiddenDropout = hiddenDropout
              AttentionDropout = r.FloatOr("attention_probs_dropout_prob", 0.1)
              MaxPositions = r.IntOr("max_position_embeddings", 512)
              TypeVocabSize = r.IntOr("type_vocab_size", 2)
              LayerNormEps = r.FloatOr("layer_norm_eps", 1e-12)
              PadTokenId = r.IntOr("pad_token_id", (if family = Bert then 0 else 1))
              Labels = readLabels r
              ClassifierDropout = r.FloatOption "classifier_dropout" |> Option.defaultValue hiddenDropout }
        if not (List.contains cfg.Activation Bart.supportedActivations) then
            r.Unsupported("hidden_act", String.Join(", ", Bart.supportedActivations))
        r.Ignore noEffectFields
        r.Ignore HfConfig.bookkeepingFields
        r.Finish()
        match validate cfg with
        | [] -> cfg
        | problems -> failwithf "%s: %s" path (String.Join("; ", problems))

// ---------------------------------------------------------------- modules

/// Dropout in training only.
let private dropIn (training: bool) (p: float) (x: Tensor) : Tensor =
    if training && p > 0.0 then functional.dropout(x, p, true) else x

/// A module holding named children, for transformers' nesting levels that compute nothing themselves
/// (`attention`, `attention.output`, `intermediate`): the names come out as the checkpoint's.
type private Children(name: string, children: (string * torch.nn.Module) list) as this =
    inherit torch.nn.Module(name)
    do for key, m in children do this.register_module (key, m)
    override _.RegisterComponents() = ()

/// RoBERTa's positions (transformers' `create_position_ids_from_input_ids`, fairseq's `make_positions`): real
/// tokens count up from padding_idx + 1, padding keeps padding_idx. ids [N; T] int64 -> [N; T] int64.
let robertaPositionIds (paddingIdx: int) (ids: Tensor) : Tensor =
    expectIndex "ids" "[N; T]" 2 ids
    use _ = torch.NewDisposeScope()
    let real = (withInt64Scalar (int64 paddingIdx) (fun s -> ids.ne s)).to_type torch.ScalarType.Int64   // [N; T]
    let counted = real.cumsum(1L).mul real                                                                // [N; T]
    (withInt64Scalar (int64 paddingIdx) (fun s -> counted.add s)).MoveToOuterDisposeScope()

/// `embeddings`: word_embeddings, position_embeddings, token_type_embeddings, LayerNorm; their sum normalised.
type EncoderEmbeddings(cfg: EncoderConfig) as this =
    inherit torch.nn.Module("embeddings")
    let d = int64 cfg.HiddenSize
    let words = Embedding(int64 cfg.VocabSize, d, padding_idx = int64 cfg.PadTokenId)
    let positions =
        match cfg.Family with
        | Roberta -> Embedding(int64 cfg.MaxPositions, d, padding_idx = int64 cfg.PadTokenId)
        | Bert -> Embedding(int64 cfg.MaxPositions, d)
    let types = Embedding(int64 cfg.TypeVocabSize, d)
    let norm = LayerNorm(d, eps = cfg.LayerNormEps)
    do
        for key, m in [ "word_embeddings", words :> torch.nn.Module; "position_embeddings", positions
                        "token_type_embeddings", types; "LayerNorm", norm ] do
            this.register_module (key, m)
    override _.RegisterComponents() = ()

    /// ids [N; T] int64, tokenTypes [N; T] int64 (null = all 0) -> [N; T; D].
    member this.Forward(ids: Tensor, tokenTypes: Tensor) : Tensor =
        use _ = torch.NewDisposeScope()
        let positionIds =
            match cfg.Family with
            | Roberta -> robertaPositionIds cfg.PadTokenId ids                                    // [N; T]
            | Bert -> (arange 0L ids.shape[1] torch.ScalarType.Int64 ids.device).unsqueeze 0L     // [1; T]
        let typeIds = if isNull tokenTypes then torch.zeros_like ids else tokenTypes
        let x = plus (plus (words.forward ids) (types.forward typeIds)) (positions.forward positionIds)
        (dropIn this.training cfg.HiddenDropout (norm.forward x)).MoveToOuterDisposeScope()

/// `attention.self`: query, key, value; softmax(q k^T / sqrt Dh) v through the toolkit's `Attention.attend`.
type private SelfAttention(cfg: EncoderConfig) as this =
    inherit torch.nn.Module("self")
    let d = int64 cfg.HiddenSize
    let h = int64 cfg.NumHeads
    let dh = d / h
    let query = Linear(d, d)
    let key = Linear(d, d)
    let value = Linear(d, d)
    do for k, m in [ "query", query; "key", key; "value", value ] do this.register_module (k, m)
    override _.RegisterComponents() = ()

    /// x [N; T; D], mask [N; 1; 1; T] bool (true = real key) -> the heads' merged outputs [N; T; D].
    member this.Forward(x: Tensor, mask: Tensor) : Tensor =
        use _ = torch.NewDisposeScope()
        let n, t = x.shape[0], x.shape[1]
        let split (y: Tensor) = y.view(n, t, h, dh).transpose(1L, 2L)                  // [N; H; T; Dh]
        let o = attend Handwritten (if this.training then cfg.AttentionDropout else 0.0) (Some mask) (split (query.call x)) (split (key.call x)) (split (value.call x))
        o.transpose(1L, 2L).reshape(n, t, d).MoveToOuterDisposeScope()                   // [N; T; D]

/// One post-LayerNorm layer named as transformers' BertLayer: attention.self, attention.output (dense,
/// LayerNorm), intermediate.dense, output (dense, LayerNorm). x1 = LN(x + drop(dense(attn x))),
/// out = LN(x1 + drop(dense(act(dense x1)))) (Vaswani et al. 2017 sec. 3.1, as BERT keeps it).
type EncoderLayer(name: string, cfg: EncoderConfig) as this =
    inherit torch.nn.Module(name)
    let d = int64 cfg.HiddenSize
    let f = int64 cfg.IntermediateSize
    let selfAttention = new SelfAttention(cfg)
    let attentionDense = Linear(d, d)
    let attentionNorm = LayerNorm(d, eps = cfg.LayerNormEps)
    let intermediateDense = Linear(d, f)
    let outputDense = Linear(f, d)
    let outputNorm = LayerNorm(d, eps = cfg.LayerNormEps)
    let act = Bart.activation cfg.Activation
    do
        let attentionOutput = new Children("output", [ "dense", attentionDense :> torch.nn.Module; "LayerNorm", attentionNorm ])
        this.register_module ("attention", new Children("attention", [ "self", selfAttention :> torch.nn.Module; "output", attentionOutput ]))
        this.register_module ("intermediate", new Children("intermediate", [ "dense", intermediateDense :> torch.nn.Module ]))
        this.register_module ("output", new Children("output", [ "dense", outputDense :> torch.nn.Module; "LayerNorm", outputNorm ]))
    override _.RegisterComponents() = ()

    /// x [N; T; D], mask [N; 1; 1; T] bool -> [N; T; D].
    member this.Forward(x: Tensor, mask: Tensor) : Tensor =
        use _ = torch.NewDisposeScope()
        let drop = dropIn this.training cfg.HiddenDropout
        let x1 = attentionNorm.forward (plus x (drop (attentionDense.call (selfAttention.Forward(x, mask)))))
        let out = outputNorm.forward (plus x1 (drop (outputDense.call (act (intermediateDense.call x1)))))
        out.MoveToOuterDisposeScope()

/// What the encoder returns.
type EncoderOutput =
    { /// The embeddings' output then each layer's output, NumLayers + 1 tensors [N; T; D] (transformers'
      /// `hidden_states` with output_hidden_states=True).
      HiddenStates: Tensor list
      /// Which positions hold real tokens [N; T] bool (the attention mask the keys were masked with).
      Mask: Tensor
      /// The pooler's tanh(dense(first token)) [N; D]; None without a pooler.
      Pooled: Tensor option }
    /// The last layer's output [N; T; D].
    member o.LastHiddenState = List.last o.HiddenStates

/// transformers' BertModel / RobertaModel: embeddings, encoder.layer.{i}, and (add_pooling_layer) pooler.dense.
type EncoderModel(name: string, cfg: EncoderConfig, withPooler: bool) as this =
    inherit torch.nn.Module(name)
    let embeddings = new EncoderEmbeddings(cfg)
    let layers = new ModuleList<EncoderLayer>([| for i in 0 .. cfg.NumLayers - 1 -> new EncoderLayer(string i, cfg) |])
    let poolerDense = if withPooler then Linear(int64 cfg.HiddenSize, int64 cfg.HiddenSize) else null
    do
        this.register_module ("embeddings", embeddings)
        this.register_module ("encoder", new Children("encoder", [ "layer", layers :> torch.nn.Module ]))
        if withPooler then this.register_module ("pooler", new Children("pooler", [ "dense", poolerDense :> torch.nn.Module ]))
    override _.RegisterComponents() = ()

    member _.Config = cfg
    member _.HasPooler = withPooler
    member _.Layers : EncoderLayer list = [ for l in layers -> l ]

    /// ids [N; T] int64; mask [N; T] bool (true = real token; null = all real); tokenTypes [N; T] int64 (null =
    /// all 0). All hidden states, the mask, and the pooled first token. Fails on more than `maxTokens` positions.
    member _.Forward(ids: Tensor, mask: Tensor, tokenTypes: Tensor) : EncoderOutput =
        expectIndex "ids" "[N; T]" 2 ids
        let n, t = ids.shape[0], ids.shape[1]
        if t > int64 (maxTokens cfg) then
            invalidArg "ids" (sprintf "expected at most %d positions (max_position_embeddings %d), got %d; truncate the text first" (maxTokens cfg) cfg.MaxPositions t)
        if not (isNull mask) then
            expect "mask" (sprintf "[%d; %d] bool" n t) (fun m -> m.dtype = torch.ScalarType.Bool && m.shape = ids.shape) mask
        if not (isNull tokenTypes) then
            expect "tokenTypes" (sprintf "[%d; %d] int64" n t) (fun m -> m.dtype = torch.ScalarType.Int64 && m.shape = ids.shape) tokenTypes
        use _ = torch.NewDisposeScope()
        let valid = if isNull mask then torch.ones([| n; t |], dtype = torch.ScalarType.Bool, device = ids.device) else mask.alias ()
        let keyMask = keyPaddingMask valid                                                 // [N; 1; 1; T]
        let states = ResizeArray<Tensor>()
        states.Add(embeddings.Forward(ids, tokenTypes))
        for layer in layers do states.Add(layer.Forward(states[states.Count - 1], keyMask))
        let pooled =
            if withPooler then Some((poolerDense.call (states[states.Count - 1].select(1L, 0L))).tanh().MoveToOuterDisposeScope())
            else None
        { HiddenStates = [ for s in states -> s.MoveToOuterDisposeScope() ]
          Mask = valid.MoveToOuterDisposeScope()
          Pooled = pooled }

/// transformers' RobertaForSequenceClassification (`roberta` without pooler; `classifier`: dense, tanh,
/// out_proj on the `<s>` state) or BertForSequenceClassification (`bert` with pooler; `classifier` one linear
/// layer on the pooled [CLS]). Logits [N; C] over `Labels` (config.json's id2label order).
type SequenceClassifier(cfg: EncoderConfig) as this =
    inherit torch.nn.Module(match cfg.Family with Roberta -> "RobertaForSequenceClassification" | Bert -> "BertForSequenceClassification")
    let d = int64 cfg.HiddenSize
    let c = int64 cfg.Labels.Length
    let encoder = new EncoderModel((match cfg.Family with Roberta -> "roberta" | Bert -> "bert"), cfg, (cfg.Family = Bert))
    let dense = if cfg.Family = Roberta then Linear(d, d) else null
    let outProj = Linear(d, c)
    do
        this.register_module ((match cfg.Family with Roberta -> "roberta" | Bert -> "bert"), encoder)
        match cfg.Family with
        | Roberta -> this.register_module ("classifier", new Children("classifier", [ "dense", dense :> torch.nn.Module; "out_proj", outProj ]))
        | Bert -> this.register_module ("classifier", outProj)
    override _.RegisterComponents() = ()

    member _.Config = cfg
    member _.Encoder = encoder
    /// The labels in id order (logit column i is Labels[i]).
    member _.Labels = cfg.Labels

    /// Logits [N; C] of ids [N; T] with mask [N; T] bool (null = all real) and tokenTypes (null = all 0).
    member this.Logits(ids: Tensor, mask: Tensor, tokenTypes: Tensor) : Tensor =
        use _ = torch.NewDisposeScope()
        let out = encoder.Forward(ids, mask, tokenTypes)
        let drop = dropIn this.training cfg.ClassifierDropout
        let logits =
            match cfg.Family with
            | Roberta ->
                let first = out.LastHiddenState.select(1L, 0L)                             // [N; D]
                outProj.call (drop ((dense.call (drop first)).tanh ()))
            | Bert -> outProj.call (drop out.Pooled.Value)
        logits.MoveToOuterDisposeScope()                                                     // [N; C]

// ---------------------------------------------------------------- loading

/// The architectures an encoder folder may hold (config.json's `architectures`) for each use.
let encoderArchitectures =
    [ "BertModel"; "BertForMaskedLM"; "BertForPreTraining"; "BertForSequenceClassification"
      "RobertaModel"; "RobertaForMaskedLM"; "RobertaForSequenceClassification" ]
let classifierArchitectures = [ "BertForSequenceClassification"; "RobertaForSequenceClassification" ]

/// config.json's model_type and architectures, refusing a folder that holds none of `accepted`.
let private checkArchitecture (dir: string) (accepted: string list) (what: string) : unit =
    let path = Path.Combine(dir, "config.json")
    if not (Directory.Exists dir) then failwithf "no such model folder: %s" dir
    if not (File.Exists path) then failwithf "%s: no config.json, so it is not a Hugging Face model folder (expected %s)" dir what
    let r = HfConfig.ConfigReader.Open path
    let archs =
        match r.Element "architectures" with
        | Some v when v.ValueKind = JsonValueKind.Array -> [ for a in v.EnumerateArray() -> a.GetString() ]
        | _ -> []
    let modelType = r.StringOr("model_type", "(none)")
    if modelType <> "bert" && modelType <> "roberta" then
        failwithf "%s: model_type is \"%s\" with architectures [%s]; expected %s (model_type \"bert\" or \"roberta\", architectures %s)"
            path modelType (String.Join(", ", archs)) what (String.Join(", ", accepted))
    if not archs.IsEmpty && not (archs |> List.exists (fun a -> List.contains a accepted)) then
        failwithf "%s: architectures [%s] hold no %s (expected one of %s)" path (String.Join(", ", archs)) what (String.Join(", ", accepted))

/// Which names of a checkpoint a bare encoder may read: its own, or under the base model's prefix (a
/// *ForMaskedLM / *ForPreTraining / *ForSequenceClassification checkpoint), leaving their heads unused.
let private encoderLoadOptions (cfg: EncoderConfig) (model: torch.nn.Module) : HfCheckpoint.LoadOptions =
    let prefix = match cfg.Family with Roberta -> "roberta." | Bert -> "bert."
    { Aliases = Map [ for struct (n, _) in model.named_parameters () -> n, [ prefix + n ] ]
      MayBeAbsent = []
      MayBeUnexpected = [ @"^(roberta\.|bert\.)?embeddings\.(position_ids|token_type_ids)$"; @"^lm_head\."; @"^cls\."; @"^classifier\." ] }

/// A bare encoder (`BertModel` / `RobertaModel`) from a Hugging Face folder whose config.json has model_type bert
/// or roberta and an encoder architecture; it has a pooler when the checkpoint stores one. Eval mode.
let loadEncoder (dir: string) : EncoderModel =
    checkArchitecture dir encoderArchitectures "a BERT or RoBERTa encoder"
    let cfg = EncoderConfig.parse (Path.Combine(dir, "config.json"))
    use weights = HfCheckpoint.openWeights dir
    let withPooler = weights.Contains "pooler.dense.weight" || weights.Contains "roberta.pooler.dense.weight" || weights.Contains "bert.pooler.dense.weight"
    let model = new EncoderModel((match cfg.Family with Roberta -> "RobertaModel" | Bert -> "BertModel"), cfg, withPooler)
    HfCheckpoint.loadInto weights model (encoderLoadOptions cfg model) |> ignore
    model.eval () |> ignore
    model

/// A `RobertaForSequenceClassification` / `BertForSequenceClassification` from a Hugging Face folder; a folder
/// without one of those architectures (e.g. a bare `roberta-large`) is refused naming what it holds. Eval mode.
let loadClassifier (dir: string) : SequenceClassifier =
    checkArchitecture dir classifierArchitectures "a sequence classifier (e.g. roberta-large-mnli)"
    let cfg = EncoderConfig.parse (Path.Combine(dir, "config.json"))
    let model = new SequenceClassifier(cfg)
    use weights = HfCheckpoint.openWeights dir
    let options =
        { HfCheckpoint.LoadOptions.Strict with
            MayBeUnexpected = [ @"^(roberta|bert)\.embeddings\.(position_ids|token_type_ids)$"; @"^(roberta|bert)\.pooler\." ] }
    HfCheckpoint.loadInto weights model options |> ignore
    model.eval () |> ignore
    model

// ---------------------------------------------------------------- writing

/// The config.json transformers writes for `cfg` with `architecture` (e.g. "RobertaModel").
let configJson (cfg: EncoderConfig) (architecture: string) : Nodes.JsonObject =
    let o = Nodes.JsonObject()
    let set (key: string) (v: Nodes.JsonNode) = o[key] <- v
    set "architectures" (Nodes.JsonArray(Nodes.JsonValue.Create architecture))
    set "model_type" (Nodes.JsonValue.Create(match cfg.Family with Roberta -> "roberta" | Bert -> "bert"))
    for key, v in [ "vocab_size", cfg.VocabSize; "hidden_size", cfg.HiddenSize; "num_hidden_layers", cfg.NumLayers
                    "num_attention_heads", cfg.NumHeads; "intermediate_size", cfg.IntermediateSize
                    "max_position_embeddings", cfg.MaxPositions; "type_vocab_size", cfg.TypeVocabSize; "pad_token_id", cfg.PadTokenId ] do
        set key (Nodes.JsonValue.Create v)
    for key, v in [ "hidden_dropout_prob", cfg.HiddenDropout; "attention_probs_dropout_prob", cfg.AttentionDropout
                    "layer_norm_eps", cfg.LayerNormEps; "classifier_dropout", cfg.ClassifierDropout ] do
        set key (Nodes.JsonValue.Create v)
    set "hidden_act" (Nodes.JsonValue.Create cfg.Activation)
    set "position_embedding_type" (Nodes.JsonValue.Create "absolute")
    let labels = Nodes.JsonObject()
    cfg.Labels |> Array.iteri (fun i l -> labels[string i] <- Nodes.JsonValue.Create l)
    set "id2label" labels
    o

/// roberta-large's shape (Liu et al. 2019, table: 24 layers, D 1024, 16 heads, F 4096), BERTScore's English
/// default model.
let robertaLargeShape =
    { Family = Roberta; VocabSize = 50265; HiddenSize = 1024; NumLayers = 24; NumHeads = 16; IntermediateSize = 4096
      Activation = "gelu"; HiddenDropout = 0.1; AttentionDropout = 0.1; MaxPositions = 514; TypeVocabSize = 1
      LayerNormEps = 1e-5; PadTokenId = 1; Labels = [| "LABEL_0"; "LABEL_1" |]; ClassifierDropout = 0.1 }

/// Writes a checkpoint folder of `cfg` with TorchSharp's default random initialisation (seeded by the caller
/// through libtorch's generator): `architecture` "BertModel"/"RobertaModel" (with pooler) or
/// "*ForSequenceClassification". For tests and benchmarks; the weights mean nothing.
let writeRandomFolder (dir: string) (cfg: EncoderConfig) (architecture: string) : unit =
    let model : torch.nn.Module =
        if architecture.EndsWith "ForSequenceClassification" then new SequenceClassifier(cfg)
        elif architecture = "BertModel" || architecture = "RobertaModel" then new EncoderModel(architecture, cfg, true)
        else invalidArg "architecture" (sprintf "expected BertModel, RobertaModel or *ForSequenceClassification, got %s" architecture)
    use _ = model
    let state = [ for struct (n, p) in model.named_parameters () -> n, (p :> Tensor) ]
    HfCheckpoint.saveFolder dir (configJson cfg architecture) state None
