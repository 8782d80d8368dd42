/// Parameter-efficient fine-tuning of GPT-2 for summarization (`scripts/peft_gpt2.fsx`): GPT-2 as a causal LM on
/// "article + separator + summary" with the loss on the summary tokens only, adapted by
///   prompt tuning (Lester et al. 2021: a soft prompt of N virtual tokens in front of the input, only it trained;
///     PEFT's `num_virtual_tokens`, initialised from the embeddings of a text such as "[SUMMARIZE]" as PEFT's
///     `prompt_tuning_init_text`, or at random),
///   LoRA (Hu et al. 2021) on chosen Conv1D projections (PEFT's `target_modules`: c_attn, c_proj, c_fc),
///   last-layer fine-tuning (the output layer: GPT-2 ties it to the token embeddings wte, so it is untied into
///     its own trainable copy and only that copy trains),
///   last-N-blocks fine-tuning (the last N transformer blocks and the final LayerNorm), and
///   full fine-tuning as the reference;
/// each trained up to E epochs with early stopping on the validation loss and gradient clipping at 1.0, then
/// compared on test loss, ROUGE-1/2/L, BLEU (greedy decoding with the key/value cache), training time,
/// trainable and added parameters and peak memory. CNN/DailyMail (See et al. 2017) from JSON Lines or CSV
/// (`article`, `highlights`).
/// Axes: B batch, S sequence, N virtual tokens, T new positions, P cached positions, L = P + T, D width,
/// H heads, Dh = D / H, V vocabulary, M counted target tokens.
module Moe.PeftGpt2

open System
open System.IO
open System.Text
open TorchSharp
open TorchSharp.Modules
open Moe.Tensors
open Moe.Config
open Moe.Models
open Moe.Gpt2
open Moe.Train
open Moe.Experiments

type private Tensor = torch.Tensor
type private Parameter = Modules.Parameter

/// Labels that the loss ignores (the article, the separator, padding), as PyTorch's ignore_index.
let IgnoreIndex = -100L

// ---------------------------------------------------------------- the model

/// A GPT-2 with what the methods add: `prompt` [N; D] (the soft prompt, N may be 0) prepended to the token
/// embeddings on the first forward, and `lm_head` [V; D] (the untied output layer) when `untieHead`.
/// Parameter names: `base.*` (GPT-2's own), `prompt`, `lm_head`. Computes exactly `Gpt2Model.forward` when
/// N = 0 and the head is tied, plus attention masks (left or right padding) and a key/value cache.
type PeftGpt2Model(baseModel: Gpt2Model, virtualTokens: int, untieHead: bool) as this =
    inherit torch.nn.Module("peft_gpt2")
    let cfg = baseModel.Config
    let byName = dict [ for struct (n, m) in baseModel.named_modules () -> n, m ]
    let moduleAt (name: string) : 'm =
        match byName.TryGetValue name with
        | true, (:? 'm as m) -> m
        | _ -> invalidOp (sprintf "expected GPT-2 submodule %s" name)
    let wte : Embedding = moduleAt "wte"
    let wpe : Embedding = moduleAt "wpe"
    let lnF : LayerNorm = moduleAt "ln_f"
    let blocks = baseModel.Blocks |> List.toArray
    let ln1 : LayerNorm[] = Array.init blocks.Length (fun i -> moduleAt (sprintf "h.%d.ln_1" i))
    let ln2 : LayerNorm[] = Array.init blocks.Length (fun i -> moduleAt (sprintf "h.%d.ln_2" i))
    let dh = int64 (cfg.Embd / cfg.Heads)
    // Parameters named like their keys so that Module.to replaces them.
    let mutable prompt : Parameter =
        if virtualTokens < 0 then invalidArg "virtualTokens" (sprintf "expected N >= 0 virtual tokens, got %d" virtualTokens)
        if virtualTokens = 0 then null
        else new Parameter(torch.zeros([| int64 virtualTokens; int64 cfg.Embd |]))
    let mutable lm_head : Parameter =
        if untieHead then
            use _ = torch.no_grad ()
            new Parameter(wte.weight.detach().clone ())
        else null
    do
        this.register_module ("base", baseModel)
        if not (isNull prompt) then this.register_parameter ("prompt", prompt)
        if not (isNull lm_head) then this.register_parameter ("lm_head", lm_head)

    member _.Base = baseModel
    member _.Config = cfg
    /// N.
    member _.VirtualTokens = virtualTokens
    /// The soft prompt [N; D]; null when N = 0.
    member _.Prompt : Tensor = prompt
    /// The untied output layer [V; D]; null when the head is tied to wte.
    member _.Head : Tensor = lm_head
    /// The output layer in use [V; D]: the untied copy, or wte.
    member _.OutputWeight : Tensor = if isNull lm_head then wte.weight else lm_head
    member _.TokenEmbeddings : Tensor = wte.weight

    /// Final hidden states [B; T; D] (after ln_f) of the T new text positions ids [B; T] that continue the
    /// P positions in `cache` (null: none). keyValid [B; P + T] bool covers the text positions cached and new
    /// (null: all real); the N virtual tokens come first on the first forward (an empty or absent cache),
    /// always real, and are cached with the rest. Positions are the running count of real tokens, virtual
    /// tokens included (transformers' GPT-2 under PEFT), so left padding shifts nothing.
    member _.Hidden(ids: Tensor, keyValid: Tensor, cache: DecoderCache) : Tensor =
        expectIndex "ids" "[B; T]" 2 ids
        use scope = torch.NewDisposeScope()
        let b, t = ids.shape[0], ids.shape[1]
        let cached = if isNull (box cache) then 0L else cache.Length
        let withPrompt = virtualTokens > 0 && cached = 0L
        let n = if withPrompt then int64 virtualTokens else 0L
        let textValid = // [B; Ptext + T]
            if isNull keyValid then torch.ones([| b; cached - int64 (if cached > 0L then virtualTokens else 0) + t |], dtype = torch.ScalarType.Bool, device = ids.device)
            else keyValid
        let valid = // [B; L]: virtual tokens first
            if virtualTokens = 0 then textValid
            else torch.cat([| torch.ones([| b; int64 virtualTokens |], dtype = torch.ScalarType.Bool, device = ids.device); textValid |], 1L)
        let l = valid.shape[1]
        if l <> cached + n + t then
            invalidArg "keyValid" (sprintf "expected keyValid [%d; %d] (cached text positions + new ones), got %s" b (l - int64 virtualTokens) (describe keyValid))
        if l > int64 cfg.Positions then
            invalidArg "ids" (sprintf "expected at most n_positions = %d positions (virtual tokens included), got %d" cfg.Positions l)
        let positions = (CausalLM.positionIds valid).narrow(1L, l - n - t, n + t) // [B; N + T]
        let tokens = wte.forward ids // [B; T; D]
        let embedded = if withPrompt then torch.cat([| prompt.unsqueeze(0L).expand(b, -1L, -1L); tokens |], 1L) else tokens // [B; N + T; D]
        let mutable x = plus embedded (wpe.forward positions)
        let queries = n + t
        let past = l - queries
        // key j is visible to query i when it is real and j <= past + i (causal)
        let keyIdx = arange 0L l torch.ScalarType.Int64 ids.device // [L]
        let queryIdx = arange past l torch.ScalarType.Int64 ids.device // [N + T]: past .. past + queries - 1
        let causal = keyIdx.unsqueeze(0L).le(queryIdx.unsqueeze 1L) // [N + T; L]
        let blocked = causal.unsqueeze(0L).logical_and(valid.unsqueeze 1L).logical_not().unsqueeze 1L // [B; 1; N + T; L]
        for i in 0 .. blocks.Length - 1 do
            let attn = blocks[i].Attn
            let qkv = attn.CAttn.forward (ln1[i].forward x) // [B; N + T; 3D]
            let split (u: Tensor) = u.reshape(b, queries, int64 cfg.Heads, dh).transpose (1L, 2L) // [B; H; N + T; Dh]
            let parts = qkv.chunk (3L, 2L)
            let q, k, v = split parts[0], split parts[1], split parts[2]
            let k, v =
                if isNull (box cache) then k, v
                else
                    let c = cache.Layers[i].Self
                    c.Append(k, v)
                    c.Keys, c.Values // [B; H; L; Dh]
            let scores = q.matmul (k.transpose (-2L, -1L)) |> divScalar (Math.Sqrt(float dh)) // [B; H; N + T; L]
            // transformers fills with the dtype's minimum, not -inf: a padding query with no visible key gets a
            // uniform row instead of NaN
            let scores = withScalar (float Single.MinValue) (fun lowest -> scores.masked_fill (blocked, lowest))
            let y = scores.softmax(-1L).matmul(v).transpose(1L, 2L).reshape (b, queries, int64 cfg.Embd) // [B; N + T; D]
            x <- plus x (attn.CProj.forward y)
            x <- plus x (blocks[i].Mlp.forward (ln2[i].forward x))
        let h = lnF.forward x
        (h.narrow(1L, n, t)).MoveToOuterDisposeScope() // [B; T; D]

    /// Logits [..; V] of hidden states [..; D] through the output layer in use.
    member this.Logits(hidden: Tensor) : Tensor = hidden.matmul (this.OutputWeight.t ())

    /// Logits [B; T; V] of ids [B; T] without padding or cache.
    member this.Forward(ids: Tensor) : Tensor =
        use h = this.Hidden(ids, null, Unchecked.defaultof<DecoderCache>)
        this.Logits h

    interface CausalLM.ICausalLM with
        member _.VocabSize = cfg.VocabSize
        member _.NewCache() = new DecoderCache(cfg.Layers)
        /// positionIds are recomputed from the mask with the virtual tokens counted.
        member this.Forward(inputIds, attentionMask, _positionIds, cache) =
            use h = this.Hidden(inputIds, attentionMask, cache)
            { Logits = this.Logits h; Moe = [] }

// ---------------------------------------------------------------- methods

/// How GPT-2 is adapted.
type Method =
    /// Lester et al. 2021: N virtual tokens (PEFT's `num_virtual_tokens`), initialised from the embeddings of
    /// a text (`prompt_tuning_init_text`, its tokens repeated or cut to N, as PEFT's TEXT init) or, with None, at
    /// random as PEFT's RANDOM init (torch.nn.Embedding's N(0, 1)).
    | PromptTuning of virtualTokens: int * initText: string option
    /// Hu et al. 2021 on the projections named by `Targets` (PEFT's `target_modules`), rank `r`, `lora_alpha`.
    | Lora of Gpt2LoraConfig
    /// The output layer only, untied from wte into its own trainable copy.
    | LastLayer
    /// The last N transformer blocks and ln_f; the tied output layer (= wte) stays frozen.
    | LastBlocks of int
    /// Every parameter (the tied output layer with wte).
    | FullFineTuning

module Method =
    let name (m: Method) : string =
        match m with
        | PromptTuning(n, _) -> sprintf "prompt tuning (N=%d)" n
        | Lora l -> sprintf "LoRA r=%d on %s" l.Lora.Rank (String.Join("+", l.Targets))
        | LastLayer -> "last layer (untied head)"
        | LastBlocks n -> sprintf "last %d block%s" n (if n = 1 then "" else "s")
        | FullFineTuning -> "full fine-tuning"

    /// A folder name for the run.
    let slug (m: Method) : string =
        match m with
        | PromptTuning(n, _) -> sprintf "prompt-%d" n
        | Lora l -> sprintf "lora-r%d-%s" l.Lora.Rank (String.Join("-", l.Targets |> List.map (fun t -> t.Replace('.', '_'))))
        | LastLayer -> "last-layer"
        | LastBlocks n -> sprintf "last-%d-blocks" n
        | FullFineTuning -> "full"

    let validate (layers: int) (m: Method) : string list =
        match m with
        | PromptTuning(n, text) ->
            [ if n < 1 then sprintf "prompt tuning needs num_virtual_tokens >= 1, got %d" n
              match text with
              | Some t when String.IsNullOrWhiteSpace t -> "prompt tuning's init text is empty (use None for random init)"
              | _ -> () ]
        | Lora l -> [ yield! LoraConfig.validate l.Lora; if l.Targets.IsEmpty then "LoRA needs at least one target module" ]
        | LastBlocks n when n < 1 || n > layers -> [ sprintf "last-N-blocks needs 1 <= N <= %d (n_layer), got %d" layers n ]
        | _ -> []

/// The ids a text initialises N virtual tokens from, as PEFT's PromptTuningInit.TEXT: the text's tokens cut to
/// N, or repeated until N and cut.
let initTokenIds (n: int) (textIds: int[]) : int[] =
    if textIds.Length = 0 then invalidArg "textIds" "expected the init text to have at least one token"
    Array.init n (fun i -> textIds[i % textIds.Length])

/// Wraps `baseModel` for `m`: adds the soft prompt, adapters or untied head and sets requires_grad so that
/// exactly the method's parameters train. `encode` tokenizes prompt tuning's init text.
let prepare (encode: string -> int[]) (m: Method) (baseModel: Gpt2Model) : PeftGpt2Model =
    orFail "PEFT method" (Method.validate baseModel.Config.Layers m) m |> ignore
    let freezeBase () = for p in baseModel.parameters () do p.requires_grad <- false
    match m with
    | PromptTuning(n, init) ->
        freezeBase ()
        let model = new PeftGpt2Model(baseModel, n, false)
        use _ = torch.no_grad ()
        match init with
        | Some text ->
            use ids = torch.tensor(initTokenIds n (encode text) |> Array.map int64, device = model.TokenEmbeddings.device)
            use rows = model.TokenEmbeddings.index_select(0L, ids)
            model.Prompt.copy_ rows |> ignore
        | None -> torch.nn.init.normal_ (model.Prompt, 0.0, 1.0) |> ignore
        model
    | Lora l ->
        applyLora l baseModel |> ignore
        new PeftGpt2Model(baseModel, 0, false)
    | LastLayer ->
        freezeBase ()
        new PeftGpt2Model(baseModel, 0, true)
    | LastBlocks n ->
        freezeBase ()
        let blocks = baseModel.Blocks
        for b in blocks |> List.skip (blocks.Length - n) do
            for p in b.parameters () do p.requires_grad <- true
        for struct (name, p) in baseModel.named_parameters () do
            if name.StartsWith "ln_f." then p.requires_grad <- true
        new PeftGpt2Model(baseModel, 0, false)
    | FullFineTuning ->
        for p in baseModel.parameters () do p.requires_grad <- true
        new PeftGpt2Model(baseModel, 0, false)

/// Parameters with requires_grad.
let trainableParameters (model: PeftGpt2Model) : int64 =
    model.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.sumBy (fun p -> p.NumberOfElements)

/// Parameters the method added to GPT-2: the soft prompt, LoRA's A and B, the untied head.
let addedParameters (model: PeftGpt2Model) : int64 =
    model.named_parameters ()
    |> Seq.filter (fun struct (n, _) -> n = "prompt" || n = "lm_head" || n.EndsWith ".lora_A" || n.EndsWith ".lora_B")
    |> Seq.sumBy (fun struct (_, p) -> p.NumberOfElements)

// ---------------------------------------------------------------- data

/// One example as token ids: the prompt (article, separator) and the target (summary, EOS).
type Encoded =
    { Prompt: int[]
      Target: int[] }

/// CNN/DailyMail's columns: `article`, `highlights`, `id` (JSON Lines or CSV, as the Hugging Face and Kaggle
/// releases store it), through the toolkit's loaders: clear errors naming file and line, empty rows skipped
/// and counted in the load report.
let cnnDmData : Data.DataConfig =
    { Data.DataConfig.defaults with IdColumn = None; DocumentColumn = Some "article"; SummaryColumn = Some "highlights" }

/// Train, validation and test examples with their load reports.
type Splits =
    { Train: Data.Example[]
      Valid: Data.Example[]
      Test: Data.Example[]
      Reports: Data.LoadReport list }

/// A split folder (train*/validation*/test* files) gives each split its first rows; one file is cut in order
/// into train, validation and test. Fails when there are fewer rows than asked for.
let loadSplits (path: string) (trainSize: int) (validSize: int) (testSize: int) : Splits =
    let need (what: string) (have: int) (want: int) (source: string) =
        if have < want then invalidArg "path" (sprintf "%s: expected at least %d %s examples, got %d (after skipping empty rows)" source want what have)
    match Data.splitFolder path with
    | Some(tr, va, te) ->
        let load (f: string) = Data.load cnnDmData f
        let a, b, c = load tr, load va, load te
        need "train" a.Examples.Length trainSize tr
        need "validation" b.Examples.Length validSize va
        need "test" c.Examples.Length testSize te
        { Train = a.Examples[.. trainSize - 1]; Valid = b.Examples[.. validSize - 1]; Test = c.Examples[.. testSize - 1]
          Reports = [ a.Report; b.Report; c.Report ] }
    | None ->
        let d = Data.load cnnDmData path
        need "train + validation + test" d.Examples.Length (trainSize + validSize + testSize) path
        let e = d.Examples
        { Train = e[.. trainSize - 1]; Valid = e[trainSize .. trainSize + validSize - 1]
          Test = e[trainSize + validSize .. trainSize + validSize + testSize - 1]; Reports = [ d.Report ] }

/// "article + separator + summary": the article's first `maxArticle` tokens, the separator's tokens, then
/// (the target) " " + summary cut to `maxSummary` tokens, and EOS.
let encode (tokenize: string -> int[]) (eos: int) (separator: string) (maxArticle: int) (maxSummary: int) (e: Data.Example) : Encoded =
    let article = tokenize e.Document
    let summary = tokenize (" " + Summarizer.oneLine e.Summary)
    { Prompt = Array.append article[.. min article.Length maxArticle - 1] (tokenize separator)
      Target = Array.append summary[.. min summary.Length maxSummary - 1] [| eos |] }

/// ids [B; S] right-padded with `pad` and labels [B; S] (IgnoreIndex outside the targets).
let collate (pad: int) (device: torch.Device) (batch: Encoded[]) : Tensor * Tensor =
    let s = batch |> Array.map (fun e -> e.Prompt.Length + e.Target.Length) |> Array.max
    let ids = Array.create (batch.Length * s) (int64 pad)
    let labels = Array.create (batch.Length * s) IgnoreIndex
    batch |> Array.iteri (fun r e ->
        let row = Array.append e.Prompt e.Target
        for j in 0 .. row.Length - 1 do ids[r * s + j] <- int64 row[j]
        for j in 0 .. e.Target.Length - 1 do labels[r * s + e.Prompt.Length + j] <- int64 e.Target[j])
    let shape = [| int64 batch.Length; int64 s |]
    torch.tensor(ids, device = device).view shape, torch.tensor(labels, device = device).view shape

/// Mean cross-entropy of the summary tokens: position t predicts token t + 1 where label t + 1 is counted;
/// only those positions go through the output layer.
let summaryLoss (model: PeftGpt2Model) (ids: Tensor) (labels: Tensor) : TokenLoss =
    use scope = torch.NewDisposeScope()
    let s = ids.shape[1]
    let hidden = model.Hidden(ids, null, Unchecked.defaultof<DecoderCache>) // [B; S; D]
    let targets = labels.narrow(1L, 1L, s - 1L).reshape(-1L) // [B (S-1)]
    let counted = (withInt64Scalar IgnoreIndex (fun ignored -> targets.ne ignored)).nonzero().squeeze(1L) // [M]
    let h = hidden.narrow(1L, 0L, s - 1L).reshape(-1L, hidden.shape[2]).index_select(0L, counted) // [M; D]
    let r = crossEntropy 0.0 IgnoreIndex (model.Logits h) (targets.index_select(0L, counted))
    { Loss = r.Loss.MoveToOuterDisposeScope(); Tokens = r.Tokens }

/// Summaries of `prompts` by greedy search with the key/value cache (left-padded batches of `batchSize`):
/// `Generate.runCausal` on the model, stopping at EOS or after `maxNewTokens`, no n-gram of
/// `noRepeatNgram` repeated (0 = off).
let summarize (model: PeftGpt2Model) (eos: int) (maxNewTokens: int) (noRepeatNgram: int) (batchSize: int) (decode: int[] -> string) (prompts: int[][]) : string[] =
    let device = model.TokenEmbeddings.device
    let gen =
        { Generate.GenerationConfig.defaults with
            MaxNewTokens = Some maxNewTokens; EosTokenId = [ eos ]; PadTokenId = Some eos; BosTokenId = Some eos
            NoRepeatNgramSize = noRepeatNgram; UseCache = true }
    model.eval ()
    [| for chunk in prompts |> Array.chunkBySize batchSize do
        let s = chunk |> Array.map Array.length |> Array.max
        let ids = Array.init (chunk.Length * s) (fun k -> let r, j = k / s, k % s in let off = s - chunk[r].Length in if j < off then int64 eos else int64 (chunk[r][j - off]))
        let mask = Array.init (chunk.Length * s) (fun k -> let r, j = k / s, k % s in j >= s - chunk[r].Length)
        use idsT = torch.tensor(ids, device = device).view(int64 chunk.Length, int64 s)
        use maskT = torch.tensor(mask, device = device).view(int64 chunk.Length, int64 s)
        for r in Generate.runCausal gen model idsT maskT do
            let tokens = r.Sequences[0] |> Array.filter (fun t -> t <> eos)
            yield (decode tokens).Trim() |]

// ---------------------------------------------------------------- the study

/// One method of the comparison and the learning rate it trains with (prompt tuning needs a far larger
/// one than full fine-tuning: Lester et al. 2021 sec. 3 use 0.3).
type MethodRun =
    { Method: Method
      LearningRate: float }

/// What the study runs.
type Settings =
    { Methods: MethodRun list
      TrainSize: int
      ValidSize: int
      TestSize: int
      /// Article tokens kept (the rest cut).
      MaxArticleTokens: int
      /// Summary tokens trained on and generated (EOS not counted).
      MaxSummaryTokens: int
      /// Between article and summary: GPT-2's own zero-shot summarization cue (Radford et al. 2019 sec. 3.6).
      Separator: string
      /// Epochs at most (Steps = Epochs x batches per epoch); validation after every epoch.
      Epochs: int
      /// Validation passes without a new best loss before stopping (0: never early).
      Patience: int
      BatchSize: int
      /// Maximum global gradient norm (the study's 1.0).
      GradClip: float
      /// Decoding: no repeated n-gram of this size (0 = off); 3 as in common CNN/DailyMail decoding.
      NoRepeatNgram: int
      DecodeBatch: int
      BootstrapSamples: int
      /// The small GPT-2 pretrained when no --model is given.
      Pretrain: SmallGpt2.PretrainSettings }

module Settings =
    let private lora (targets: string list) = Lora { Lora = { Rank = 8; Alpha = 16.0; FreezeBase = true }; Targets = targets }

    /// The five methods at the learning rates used for each.
    let methods (virtualTokens: int) : MethodRun list =
        [ { Method = PromptTuning(virtualTokens, Some "[SUMMARIZE]"); LearningRate = 3e-2 }
          { Method = lora [ "c_attn" ]; LearningRate = 1e-3 }
          { Method = LastLayer; LearningRate = 1e-3 }
          { Method = LastBlocks 2; LearningRate = 3e-4 }
          { Method = FullFineTuning; LearningRate = 1e-4 } ]

    /// Minutes on 2 CPU cores on the small GPT-2: 200 / 24 / 24 examples, articles cut to 128 tokens, summaries
    /// to 40, up to 3 epochs.
    let quick =
        { Methods = methods 20
          TrainSize = 200; ValidSize = 24; TestSize = 24
          MaxArticleTokens = 128; MaxSummaryTokens = 40
          Separator = "\nTL;DR:"
          Epochs = 3; Patience = 1; BatchSize = 8; GradClip = 1.0
          NoRepeatNgram = 3; DecodeBatch = 8; BootstrapSamples = 200
          Pretrain = SmallGpt2.PretrainSettings.quick }

    /// Seconds: 8 / 4 / 4 examples, short articles, one epoch.
    let smoke =
        { quick with
            Methods = methods 4
            TrainSize = 8; ValidSize = 4; TestSize = 4
            MaxArticleTokens = 40; MaxSummaryTokens = 8
            Epochs = 1; Patience = 0; BatchSize = 4; DecodeBatch = 4; BootstrapSamples = 10
            Pretrain = SmallGpt2.PretrainSettings.smoke }

    /// The study's scale: 10% of CNN/DailyMail (21,000 / 6,000 / 3,000), up to 10 epochs, early stopping.
    let full =
        { quick with
            Methods = methods 20
            TrainSize = 21_000; ValidSize = 6_000; TestSize = 3_000
            MaxArticleTokens = 768; MaxSummaryTokens = 128
            Epochs = 10; Patience = 2; BatchSize = 8 }

    let ofScale (scale: Scale) = match scale with Smoke -> smoke | Quick -> quick | Full -> full

/// What the script takes.
type PeftOptions =
    { Scale: Scale
      /// A GPT-2 folder in Hugging Face's layout (`--model gpt2/`); None pretrains the small GPT-2.
      Model: string option
      /// CNN/DailyMail: a JSON Lines or CSV file cut into the splits, or a split folder.
      Data: string
      /// Web text for the small GPT-2 (C4 JSON Lines).
      WebText: string
      /// GPT-2's BPE files (encoder.json, vocab.bpe) for the small GPT-2.
      Bpe: string
      RunsDir: string
      ReportsDir: string
      Verbose: bool
      Screenshot: bool }

module PeftOptions =
    let usage = "arguments: [--smoke | --full] [--verbose] [--model GPT2_DIR] [--data CNNDM_FILE_OR_DIR] [--web-text C4_JSONL] [--bpe GPT2_BPE_DIR]"

    /// Options from script arguments; the data paths default to the samples in `sharedData` (cnndm-test-1000,
    /// c4-en-sample, gpt2-bpe). Returns every problem at once, missing paths included.
    let parse (sharedData: string) (args: string[]) : Result<PeftOptions, string list> =
        let problems = ResizeArray<string>()
        let paths = Collections.Generic.Dictionary<string, string>()
        let flags = Collections.Generic.HashSet<string>()
        let mutable i = 0
        while i < args.Length do
            match args[i] with
            | "--model" | "--data" | "--web-text" | "--bpe" as flag ->
                if i + 1 < args.Length && not (args[i + 1].StartsWith "--") then
                    paths[flag] <- args[i + 1]
                    i <- i + 1
                else problems.Add(sprintf "%s needs a path (%s)" flag usage)
            | "--smoke" | "--full" | "--verbose" as flag -> flags.Add flag |> ignore
            | other -> problems.Add(sprintf "unknown argument %s (%s)" other usage)
            i <- i + 1
        if flags.Contains "--smoke" && flags.Contains "--full" then problems.Add "--smoke and --full exclude each other"
        let path (flag: string) (sample: string) =
            let p = match paths.TryGetValue flag with | true, p -> p | _ -> Path.Combine(sharedData, sample)
            if not (Directory.Exists p || File.Exists p) then problems.Add(sprintf "%s %s does not exist (give it with %s)" (flag.TrimStart '-') p flag)
            p
        let data = path "--data" (Path.Combine("cnndm-test-1000", "test.jsonl"))
        let model =
            match paths.TryGetValue "--model" with
            | true, m ->
                if not (File.Exists(Path.Combine(m, "config.json"))) then problems.Add(sprintf "--model %s: expected a GPT-2 folder with config.json" m)
                Some m
            | _ -> None
        let webText, bpe =
            if model.IsSome then "", ""
            else path "--web-text" (Path.Combine("c4-en-sample", "c4-train.00000-of-01024.first1000.jsonl")), path "--bpe" "gpt2-bpe"
        if problems.Count > 0 then Error(List.ofSeq problems)
        else
            Ok { Scale = (if flags.Contains "--smoke" then Smoke elif flags.Contains "--full" then Full else Quick)
                 Model = model; Data = data; WebText = webText; Bpe = bpe
                 RunsDir = "runs"; ReportsDir = "reports"; Verbose = flags.Contains "--verbose"; Screenshot = true }

    let parseOrFail (sharedData: string) (args: string[]) : PeftOptions =
        match parse sharedData args with
        | Ok o -> o
        | Error ps -> invalidArg "args" (sprintf "bad script arguments:\n  - %s" (String.concat "\n  - " ps))

/// One row of the table, measured from a finished run.
type Row =
    { Method: string
      LearningRate: float
      TrainableParameters: int64
      AddedParameters: int64
      TotalParameters: int64
      Epochs: float
      BestValidLoss: float
      /// Mean summary-token cross-entropy on the test split (best-validation weights).
      TestLoss: float
      Scores: Metrics.ScoreReport
      TrainSeconds: float
      /// Extra peak resident memory of training over the process's before it, MiB (None: not measurable here).
      PeakMemoryMb: float option
      RunDir: string }

/// Extra peak resident memory of `action`, MiB: the kernel's high-water mark is reset to the current resident
/// set (writing 5 to /proc/self/clear_refs), then VmHWM after the call minus VmRSS before it. None off Linux.
let private peakExtraMb (action: unit -> 'a) : 'a * float option =
    let status (key: string) =
        File.ReadAllLines "/proc/self/status" |> Array.tryPick (fun l ->
            if l.StartsWith(key + ":") then Some(float (l.Substring(key.Length + 1).Trim().Split(' ')[0]) / 1024.0) else None)
    let measurable = OperatingSystem.IsLinux() && File.Exists "/proc/self/clear_refs" && File.Exists "/proc/self/status"
    let reset () = try File.WriteAllText("/proc/self/clear_refs", "5"); true with _ -> false
    if measurable && reset () then
        let before = status "VmRSS"
        let result = action ()
        result, (match before, status "VmHWM" with Some b, Some h -> Some(h - b) | _ -> None)
    else action (), None

/// The base model for a run: `--model DIR`, or the small GPT-2 (pretrained once into RunsDir/gpt2-small-c4).
let baseFolder (opts: PeftOptions) (settings: Settings) : string * string =
    match opts.Model with
    | Some dir -> Path.GetFullPath dir, sprintf "GPT-2 from %s" dir
    | None ->
        let folder = Path.Combine(opts.RunsDir, sprintf "gpt2-small-c4-%s" (match opts.Scale with Smoke -> "smoke" | _ -> "quick"))
        let progress = if opts.Verbose then Lines else Silent
        let dir = SmallGpt2.ensure { RunOptions.Defaults with Progress = progress } settings.Pretrain opts.WebText opts.Bpe (folder + "-run") folder
        let c = settings.Pretrain.Model
        dir, sprintf "small GPT-2 pretrained here on C4 (%d layers, width %d, %d heads; %s)" c.Layers c.Embd c.Heads dir

/// Trains and evaluates one method from the base folder; writes the run folder (metrics.jsonl, checkpoints,
/// parameters.json, predictions/references/documents, test_scores.json).
let runMethod (opts: PeftOptions) (settings: Settings) (folder: string) (splits: Splits) (m: MethodRun) (runDir: string) : Row =
    let tokenizer = SmallGpt2.loadTokenizer folder
    let eos = tokenizer.EosId |> Option.defaultWith (fun () -> invalidArg "folder" (sprintf "%s: the tokenizer has no EOS token" folder))
    let tokenize (text: string) = tokenizer.Encode(text, false)
    let enc = encode tokenize eos settings.Separator settings.MaxArticleTokens settings.MaxSummaryTokens
    let train, valid, test = Array.map enc splits.Train, Array.map enc splits.Valid, Array.map enc splits.Test
    Native.seedAll 17
    use model = prepare tokenize m.Method (SmallGpt2.loadFolder folder)
    let longest = Array.concat [ train; valid; test ] |> Array.map (fun e -> e.Prompt.Length + max e.Target.Length (settings.MaxSummaryTokens + 1)) |> Array.max
    if longest + model.VirtualTokens > model.Config.Positions then
        invalidArg "settings" (sprintf "%d virtual + %d tokens exceed the model's %d positions: lower MaxArticleTokens or MaxSummaryTokens" model.VirtualTokens longest model.Config.Positions)
    let perEpoch = (train.Length + settings.BatchSize - 1) / settings.BatchSize
    let cfg =
        { TrainConfig.defaults with
            Steps = settings.Epochs * perEpoch; BatchSize = settings.BatchSize; LearningRate = m.LearningRate
            WarmupSteps = max 1 (perEpoch / 10); WeightDecay = 0.0; GradClip = settings.GradClip
            LogEvery = max 1 (perEpoch / 5); EvalEvery = perEpoch; CheckpointEvery = perEpoch; Patience = settings.Patience }
    let device () = model.TokenEmbeddings.device
    let loss (source: Encoded[]) (indices: int[]) : LossParts =
        let ids, labels = collate eos (device ()) (indices |> Array.map (fun i -> source[i]))
        use ids = ids
        use labels = labels
        let r = summaryLoss model ids labels
        { TaskLoss = r.Loss; Moe = []; Tokens = r.Tokens }
    let shuffled (seed: int) (epoch: int) =
        let rng = Random(seed * 1000003 + epoch)
        let a = Array.init train.Length id
        rng.Shuffle a
        a
    let inOrder (n: int) = Array.init n id |> Array.chunkBySize settings.BatchSize |> Seq.ofArray
    let task =
        { Model = model
          TrainBatches = fun seed epoch -> shuffled seed epoch |> Array.chunkBySize settings.BatchSize |> Seq.ofArray
          ValidBatches = fun () -> inOrder valid.Length
          Loss = fun phase indices -> loss (if phase = Training then train else valid) indices
          Config = [ "peft", box {| Method = Method.name m.Method; Base = folder; Separator = settings.Separator
                                    MaxArticleTokens = settings.MaxArticleTokens; MaxSummaryTokens = settings.MaxSummaryTokens |} ]
          Tokenizer = "" }
    Directory.CreateDirectory runDir |> ignore
    let trainable, added = trainableParameters model, addedParameters model
    let total = model.parameters () |> Seq.sumBy (fun p -> p.NumberOfElements)
    RunFiles.writeParameters runDir { Total = total; Active = total; Trainable = trainable }
    let progress = if opts.Verbose then Lines else Silent
    let result, peak = peakExtraMb (fun () -> Loop.runWith { RunOptions.Defaults with Progress = progress; Overwrite = true } cfg task runDir)
    result.BestCheckpoint |> Option.iter (fun path -> Checkpoint.loadModel path model)
    model.eval ()
    let testLoss =
        use _ = torch.no_grad ()
        let parts = [ for b in inOrder test.Length -> let p = loss test b in (let v = scalar p.TaskLoss in p.TaskLoss.Dispose(); v), p.Tokens ]
        (parts |> List.sumBy (fun (v, n) -> v * float n)) / float (parts |> List.sumBy snd)
    let predictions =
        summarize model eos settings.MaxSummaryTokens settings.NoRepeatNgram settings.DecodeBatch
            (fun ids -> tokenizer.Decode(ids, true)) (test |> Array.map (fun e -> e.Prompt))
    let scores = Summarizer.score { Summarizer.SummarizerConfig.defaults with BootstrapSamples = settings.BootstrapSamples } predictions splits.Test
    let lines (name: string) (xs: string seq) = File.WriteAllLines(Path.Combine(runDir, name), xs |> Seq.map Summarizer.oneLine, UTF8Encoding(false))
    lines RunLog.FileNames.predictions predictions
    lines RunLog.FileNames.references (splits.Test |> Array.map (fun e -> e.Summary))
    lines RunLog.FileNames.documents (splits.Test |> Array.map (fun e -> e.Document))
    File.WriteAllText(Path.Combine(runDir, RunLog.FileNames.testScores), Summarizer.testScoresJson scores, UTF8Encoding(false))
    { Method = Method.name m.Method
      LearningRate = m.LearningRate
      TrainableParameters = trainable
      AddedParameters = added
      TotalParameters = total
      Epochs = float result.Steps / float perEpoch
      BestValidLoss = defaultArg result.BestValidLoss nan
      TestLoss = testLoss
      Scores = scores.Model
      TrainSeconds = result.ElapsedSeconds
      PeakMemoryMb = peak
      RunDir = Path.GetFullPath runDir }

/// The table of the rows.
let table (baseModel: string) (scale: Scale) (rows: Row list) : Table =
    { Title = sprintf "PEFT of GPT-2 on CNN/DailyMail (%A); base model: %s" scale baseModel
      Columns = [| "method"; "lr"; "trainable"; "added"; "epochs"; "best valid loss"; "test loss"; "ROUGE-1"; "ROUGE-2"; "ROUGE-L"; "BLEU"; "train s"; "peak MiB" |]
      Rows =
        [| for r in rows ->
            [| r.Method; r.LearningRate.ToString("g3", Globalization.CultureInfo.InvariantCulture)
               Table.si (float r.TrainableParameters); Table.si (float r.AddedParameters); Table.num 1 r.Epochs
               Table.num 3 r.BestValidLoss; Table.num 3 r.TestLoss
               Table.pct r.Scores.Rouge1.F1.Mean; Table.pct r.Scores.Rouge2.F1.Mean; Table.pct r.Scores.RougeL.F1.Mean
               Table.num 1 r.Scores.Bleu.Score; Table.num 0 r.TrainSeconds
               (match r.PeakMemoryMb with Some m -> Table.num 0 m | None -> "n/a") |] |] }

/// Test loss, ROUGE-L, trainable parameters and training time per method.
let figure (rows: Row list) : Plotly.NET.GenericChart =
    let names = rows |> List.map (fun r -> r.Method) |> List.toArray
    let panel (title: string) (f: Row -> float) (show: float -> string) =
        let v = rows |> List.map f |> List.toArray
        { Plots.Title = title; Plots.Values = v; Plots.Text = v |> Array.map show }
    Plots.barPanels "GPT-2 on CNN/DailyMail: prompt tuning, LoRA, last layer, last blocks, full fine-tuning"
        names
        [ panel "test loss (summary tokens)" (fun r -> r.TestLoss) (Table.num 3)
          panel "test ROUGE-L F1 × 100" (fun r -> 100.0 * r.Scores.RougeL.F1.Mean) (Table.num 1)
          panel "trainable parameters" (fun r -> float r.TrainableParameters) (fun v -> Table.si v)
          panel "training time, s" (fun r -> r.TrainSeconds) (Table.num 0) ]

/// The study: the base model (`--model` or the small GPT-2), the CNN/DailyMail splits, every method trained
/// and evaluated, the table, the report page of the runs and the figure.
let run (opts: PeftOptions) : ExperimentResult =
    let experiment = "peft_gpt2"
    let settings = Settings.ofScale opts.Scale
    let folder, baseText = baseFolder opts settings
    let splits = loadSplits opts.Data settings.TrainSize settings.ValidSize settings.TestSize
    let rows =
        [ for m in settings.Methods ->
            let dir = Path.Combine(opts.RunsDir, experiment, Method.slug m.Method)
            if Directory.Exists dir then Directory.Delete(dir, true)
            let row = runMethod opts settings folder splits m dir
            if opts.Verbose then printfn "%s: test loss %.3f, ROUGE-L %.1f, %.0f s" row.Method row.TestLoss (100.0 * row.Scores.RougeL.F1.Mean) row.TrainSeconds
            row ]
    let notes =
        [ for r in splits.Reports do
            sprintf "Data %s: %d rows read, %d kept, %d skipped with an empty article, %d with empty highlights." r.Source r.Read r.Kept r.SkippedEmptyDocument r.SkippedEmptySummary
          sprintf "Splits: %d train / %d validation / %d test; articles cut to %d tokens, summaries to %d; input = article + %A + \" \" + summary + <|endoftext|>, the loss on the summary and EOS only."
              splits.Train.Length splits.Valid.Length splits.Test.Length settings.MaxArticleTokens settings.MaxSummaryTokens settings.Separator
          sprintf "Training: AdamW, warmup then cosine decay, up to %d epochs with validation after each and early stopping after %d without improvement (0 = off), gradient norm clipped at %g; the best-validation weights are evaluated. Decoding: greedy with the key/value cache, at most %d new tokens, no repeated %d-gram."
              settings.Epochs settings.Patience settings.GradClip settings.MaxSummaryTokens settings.NoRepeatNgram
          "Last layer = GPT-2's output layer, which GPT-2 ties to the token embeddings wte: it is untied into its own trainable copy (added parameters V x D), everything else frozen. Last N blocks = those blocks and ln_f, the tied output layer frozen. Added = parameters not in GPT-2 (soft prompt, LoRA A and B, untied head)."
          "Peak MiB: the process's extra peak resident memory while training (VmHWM reset before), CPU only; n/a where it cannot be measured."
          "ROUGE F1 x 100 (rouge-score semantics, stemmed), BLEU = sacreBLEU corpus BLEU, on the test split." ]
    let experimentOpts =
        { ExperimentOptions.defaults with
            Scale = opts.Scale; DataPath = Some(sprintf "%s; base model: %s" opts.Data baseText)
            RunsDir = opts.RunsDir; ReportsDir = opts.ReportsDir; Verbose = opts.Verbose; Screenshot = opts.Screenshot }
    finish experimentOpts experiment "Parameter-efficient fine-tuning of GPT-2 for summarization" notes
        [ table baseText opts.Scale rows ] (rows |> List.map (fun r -> r.RunDir)) (figure rows)
