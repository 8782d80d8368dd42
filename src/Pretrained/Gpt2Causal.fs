/// GPT-2 on the decoder-only path: Hugging Face's `GPT2LMHeadModel` (transformers 4.45.1) over `Moe.Gpt2`'s
/// modules, with the key/value cache, attention mask and position ids that generation needs, so that
/// `HfCausalLM.load`, `Generate.runCausal` and the CLI treat a GPT-2 checkpoint like a Llama one.
/// Parameter names are GPT2LMHeadModel's (`transformer.h.0.attn.c_attn.weight`, ...); a checkpoint saved
/// from the bare GPT2Model (the original release, no `transformer.` prefix) loads too.
/// Deviations: none in float32 for the real positions (padding positions' own outputs are never read).
/// Axes: N rows, T positions given, P cached positions, L = P + T key positions, D n_embd, H n_head,
/// Dh = D / H, V vocabulary.
module Moe.Gpt2Causal

open System
open System.IO
open TorchSharp
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Models
open Moe.CausalLM

type Tensor = torch.Tensor

/// The MLP activations GPT-2 configs name (`activation_function`) that this module computes.
type Gpt2Activation =
    /// "gelu_new", "gelu_pytorch_tanh", "gelu_fast": GELU's tanh approximation.
    | GeluTanh
    /// "gelu": the exact (erf) GELU.
    | GeluExact
    | Relu
    /// "silu", "swish".
    | Silu

/// What `GPT2Config` sets beyond `Gpt2.Gpt2Config`'s sizes.
type Gpt2CausalConfig =
    { /// Sizes: vocab_size, n_positions, n_embd, n_layer, n_head, layer_norm_epsilon.
      Sizes: Gpt2.Gpt2Config
      Activation: Gpt2Activation
      /// Scores divided by sqrt(Dh) (scale_attn_weights, true).
      ScaleAttnWeights: bool
      /// Layer i's scores also divided by i + 1 (scale_attn_by_inverse_layer_idx, false).
      ScaleByInverseLayerIdx: bool
      /// Dropout in training on the embeddings' sum, the attention probabilities and both residual branches
      /// (embd_pdrop, attn_pdrop, resid_pdrop).
      EmbdDropout: float
      AttnDropout: float
      ResidDropout: float
      /// lm_head is wte (tie_word_embeddings, true).
      TieWordEmbeddings: bool
      PadTokenId: int option
      BosTokenId: int option
      EosTokenIds: int list }

/// GPT2Config fields that never change what the model computes at inference or in training: fresh-weight
/// initialisation, the heads of GPT2DoubleHeadsModel/ForSequenceClassification (`summary_*`), and
/// `reorder_and_upcast_attn`, which computes the same scores with the scale folded in before the matmul and in
/// float32 (the toolkit's attention already takes the softmax in float32).
let private ignoredFields =
    [ "initializer_range"; "summary_type"; "summary_use_proj"; "summary_activation"; "summary_proj_to_labels"
      "summary_first_dropout"; "reorder_and_upcast_attn"; "n_ctx" ]

module Gpt2CausalConfig =
    /// Parses a GPT2LMHeadModel config.json (model_type "gpt2"): every field is used, ignored on purpose
    /// (`ignoredFields`, bookkeeping) or refused naming the file.
    let parse (path: string) : Gpt2CausalConfig =
        let r = HfConfig.ConfigReader.Open path
        if r.StringOr("model_type", "") <> "gpt2" then r.Unsupported("model_type", "\"gpt2\"")
        let embd = r.IntOr("n_embd", 768)
        let activation =
            match r.StringOr("activation_function", "gelu_new") with
            | "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" -> GeluTanh
            | "gelu" -> GeluExact
            | "relu" -> Relu
            | "silu" | "swish" -> Silu
            | _ -> r.Unsupported("activation_function", "gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu, silu or swish")
        match r.IntOption "n_inner" with
        | Some inner when inner <> 4 * embd -> r.Unsupported("n_inner", sprintf "null or 4 * n_embd = %d (Gpt2.Mlp's width)" (4 * embd))
        | _ -> ()
        let sizes : Gpt2.Gpt2Config =
            { VocabSize = r.IntOr("vocab_size", 50257)
              Positions = r.IntOr("n_positions", 1024)
              Embd = embd
              Layers = r.IntOr("n_layer", 12)
              Heads = r.IntOr("n_head", 12)
              LayerNormEpsilon = r.FloatOr("layer_norm_epsilon", 1e-5) }
        let cfg =
            { Sizes = sizes
              Activation = activation
              ScaleAttnWeights = r.BoolOr("scale_attn_weights", true)
              ScaleByInverseLayerIdx = r.BoolOr("scale_attn_by_inverse_layer_idx", false)
              EmbdDropout = r.FloatOr("embd_pdrop", 0.1)
              AttnDropout = r.FloatOr("attn_pdrop", 0.1)
              ResidDropout = r.FloatOr("resid_pdrop", 0.1)
              TieWordEmbeddings = r.BoolOr("tie_word_embeddings", true)
              PadTokenId = r.IntOption "pad_token_id"
              BosTokenId = r.IntOption "bos_token_id"
              EosTokenIds = r.IntList "eos_token_id" }
        r.Ignore HfConfig.bookkeepingFields
        r.Ignore ignoredFields
        r.Finish()
        let problems =
            Gpt2.Gpt2Config.validate sizes
            @ [ for name, p in [ "embd_pdrop", cfg.EmbdDropout; "attn_pdrop", cfg.AttnDropout; "resid_pdrop", cfg.ResidDropout ] do
                    if not (p >= 0.0 && p < 1.0) then sprintf "%s must be in [0, 1), got %g" name p ]
        if not problems.IsEmpty then failwithf "%s: %s" path (String.Join("; ", problems))
        cfg

let private activate (a: Gpt2Activation) (x: Tensor) : Tensor =
    match a with
    | GeluTanh -> Gpt2.geluNew x
    | GeluExact -> functional.gelu x
    | Relu -> functional.relu x
    | Silu -> functional.silu x

/// `GPT2LMHeadModel`: `transformer` (Gpt2.Gpt2Model's modules) and, when untied, `lm_head` [V; D] without bias.
type Gpt2LMHeadModel(cfg: Gpt2CausalConfig) as this =
    inherit torch.nn.Module("GPT2LMHeadModel")
    let transformer = new Gpt2.Gpt2Model(cfg.Sizes)
    let lm_head = if cfg.TieWordEmbeddings then null else Linear(int64 cfg.Sizes.Embd, int64 cfg.Sizes.VocabSize, hasBias = false)
    let sizes = cfg.Sizes
    let heads, dh = int64 sizes.Heads, int64 (sizes.Embd / sizes.Heads)
    let dropout (p: float) (x: Tensor) = if this.training && p > 0.0 then functional.dropout (x, p, true) else x
    do
        this.register_module ("transformer", transformer)
        if not (isNull lm_head) then this.register_module ("lm_head", lm_head)
        this.eval () |> ignore
    override _.RegisterComponents() = ()

    member _.Config = cfg
    /// The GPT2Model inside (its LoRA helpers, `Projections`, work on it).
    member _.Transformer = transformer

    /// Block i's self-attention: x [N; T; D] (after ln_1), mask [N; 1; T; L] bool -> [N; T; D].
    member private this.Attend(i: int, block: Gpt2.Block, x: Tensor, mask: Tensor, cache: Attention.KvCache) : Tensor =
        use scope = torch.NewDisposeScope()
        let n, t = x.shape[0], x.shape[1]
        let parts = (block.Attn.CAttn.forward x).chunk (3L, 2L) // q, k, v: 3 x [N; T; D]
        let split (y: Tensor) = y.reshape(n, t, heads, dh).transpose (1L, 2L) // [N; H; T; Dh]
        let q, kNew, vNew = split parts[0], split parts[1], split parts[2]
        let k, v =
            if isNull cache then kNew, vNew
            else
                cache.Append(kNew, vNew)
                cache.Keys, cache.Values // [N; H; L; Dh]
        // groupedQueryAttention divides by sqrt(Dh); the query is rescaled for GPT-2's other scalings
        let factor =
            (if cfg.ScaleAttnWeights then 1.0 else Math.Sqrt(float dh))
            / (if cfg.ScaleByInverseLayerIdx then float (i + 1) else 1.0)
        let q = if factor = 1.0 then q else mulScalar factor q
        let p = if this.training then cfg.AttnDropout else 0.0
        let o = Attention.groupedQueryAttention p (Some mask) q k v // [N; H; T; Dh]
        let merged = o.transpose(1L, 2L).reshape (n, t, int64 sizes.Embd) // [N; T; D]
        (block.Attn.CProj.forward merged |> dropout cfg.ResidDropout).MoveToOuterDisposeScope()

    /// The forward pass, as `Llama.DecoderOnlyLM.Forward`: inputIds [N; T] int64 continue the cache's P
    /// positions; attentionMask [N; P + T] bool (null: all real); positionIds [N; T] int64 (null: from the mask,
    /// `CausalLM.positionIds`); labels [N; T] int64 (null: no loss; -100 ignored; shifted inside).
    member this.Forward(inputIds: Tensor, attentionMask: Tensor, positionIds: Tensor, cache: DecoderCache, labels: Tensor) : Llama.CausalLMOutput =
        use scope = torch.NewDisposeScope()
        let mask, positions, _ =
            CausalLM.prepareInputs sizes.VocabSize sizes.Positions "n_positions" sizes.Layers inputIds attentionMask positionIds cache
        let t = inputIds.shape[1]
        let attnMask = Llama.decoderMask t mask // [N; 1; T; L]
        let mutable x = plus (transformer.Wte.forward inputIds) (transformer.Wpe.forward positions) |> dropout cfg.EmbdDropout // [N; T; D]
        for i, block in List.indexed transformer.Blocks do
            let layerCache = if not (isNull (box cache)) then cache.Layers[i].Self else null
            x <- plus x (this.Attend(i, block, block.Ln1.forward x, attnMask, layerCache))
            let h = block.Mlp.CFc.forward (block.Ln2.forward x) |> activate cfg.Activation
            x <- plus x (block.Mlp.CProj.forward h |> dropout cfg.ResidDropout)
        let hidden = transformer.LnF.forward x // [N; T; D]
        let logits =
            (if isNull lm_head then linearCast (transformer.Wte.weight :> Tensor) hidden else linearLayerCast lm_head hidden)
                .to_type torch.ScalarType.Float32 // [N; T; V]
        let loss =
            if isNull labels then None
            else
                Some(CausalLM.shiftedLoss logits labels)
        { Logits = logits.MoveToOuterDisposeScope()
          Loss = loss |> Option.map (fun l -> l.MoveToOuterDisposeScope())
          AuxLoss = None
          Moe = []
          Routers = [] }

    /// transformers' forward with labels: the mean cross-entropy of the shifted labels. inputIds, labels [N; T]
    /// int64; attentionMask [N; T] bool or null.
    member this.Loss(inputIds: Tensor, attentionMask: Tensor, labels: Tensor) : Tensor * LayerReport list =
        let out = this.Forward(inputIds, attentionMask, null, Unchecked.defaultof<DecoderCache>, labels)
        out.Logits.Dispose()
        Option.get out.Loss, []

    /// An empty cache of one self-attention entry per block.
    member _.NewCache() : DecoderCache = new DecoderCache(sizes.Layers)

    /// The parameters under GPT2LMHeadModel's names (lm_head left out when tied, as transformers saves it).
    member this.StateDict() : (string * Tensor) list =
        [ for struct (name, p) in this.named_parameters () -> name, p.detach () ]

    interface ICausalLM with
        member _.VocabSize = sizes.VocabSize
        member this.NewCache() = this.NewCache()
        member this.Forward(inputIds, attentionMask, positionIds, cache) =
            let out = this.Forward(inputIds, attentionMask, positionIds, cache, null)
            { Logits = out.Logits; Moe = out.Moe }

/// The prefix of GPT2LMHeadModel's names in front of GPT2Model's.
let private prefix = "transformer."

/// Loads a GPT2LMHeadModel checkpoint folder (config.json and its weights; names with or without the
/// `transformer.` prefix), in evaluation mode. Missing, mis-shaped and unexpected tensors are refused naming
/// the files (`HfCheckpoint.loadInto`).
let fromFolder (dir: string) : Gpt2LMHeadModel =
    let cfg = Gpt2CausalConfig.parse (Path.Combine(dir, "config.json"))
    use weights = HfCheckpoint.openWeights dir
    let model = new Gpt2LMHeadModel(cfg)
    let aliases =
        Map [ for struct (name, _) in model.named_parameters () do
                if name.StartsWith prefix then yield name, [ name.Substring prefix.Length ] ]
    let options =
        { HfCheckpoint.LoadOptions.Strict with
            Aliases = aliases
            MayBeUnexpected = [ @"\.attn\.(masked_)?bias$" ] @ (if cfg.TieWordEmbeddings then [ "^lm_head\.weight$" ] else []) }
    try HfCheckpoint.loadInto weights model options |> ignore
    with _ -> model.Dispose(); reraise ()
    model
