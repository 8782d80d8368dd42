/// Drop-upcycled GPT-2 on cross-lingual NLI (`scripts/drop_upcycle_gpt2.fsx`): a dense GPT-2 (a real
/// checkpoint with `--model`, else a small GPT-2 pretrained here on the shared C4 sample, `SmallGpt2`) is
/// turned into an MoE by Drop-Upcycling (Nakamura et al. 2025; `Gpt2Moe.dropUpcycle`: every other MLP
/// becomes E experts with top-1 routing, r of each expert's units re-initialised); the MoE and the dense
/// model get the same continued pretraining on web text (the fair baseline: same steps, batches, learning
/// rate and data), then each is fine-tuned as GPT2ForSequenceClassification on XNLI pairs of the training
/// languages (English, or English + Spanish + French) and evaluated zero-shot on all 15 languages. The MoE's
/// test-time routing is counted per MoE layer by language and by gold label. Every run is a run folder of the
/// toolkit's format (metrics and routing logs, checkpoints), so the report page draws loss curves and router
/// distributions.
/// Axes: B batch, S sequence, L labels (3), E experts, K picks per token.
module Moe.DropUpcycle

open System
open System.Collections.Generic
open System.IO
open TorchSharp
open Plotly.NET
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Models
open Moe.Gpt2
open Moe.Gpt2Moe
open Moe.Train
open Moe.Experiments

// ---------------------------------------------------------------- options

/// What the study reads and how big it runs.
type DropUpcycleOptions =
    { Scale: Scale
      /// A Hugging Face GPT-2 folder (`--model`); None: pretrain a small GPT-2 on `WebText` first.
      Model: string option
      /// JSON Lines web text (`text` field) for the continued pretraining (and the small GPT-2's pretraining).
      WebText: string
      /// XNLI pairs: evaluation in every language, and training too when `XnliTrain` is None (split by pair index).
      Xnli: string
      /// A separate training file (e.g. MultiNLI train) of any `Nli.load` format; None: the split of `Xnli`.
      XnliTrain: string option
      /// GPT-2's byte-level BPE files (vocab.json, merges.txt) for the small GPT-2.
      Bpe: string
      /// Languages fine-tuned on (en, or en es fr).
      TrainLanguages: string list
      Upcycle: DropUpcycleConfig
      RunsDir: string
      ReportsDir: string
      Verbose: bool
      Screenshot: bool }

module DropUpcycleOptions =
    let usage =
        "arguments: [--smoke | --full] [--verbose] [--model DIR] [--web-text FILE] [--xnli FILE] [--xnli-train FILE] [--bpe DIR] [--train-languages en,es,fr] [--drop-ratio R] [--experts E] [--every N]"

    /// Options from script arguments; data defaults to the samples in `sharedData` (c4-en-sample, xnli-sample,
    /// gpt2-bpe). Returns every problem at once.
    let parse (sharedData: string) (args: string[]) : Result<DropUpcycleOptions, string list> =
        let problems = ResizeArray<string>()
        let values = Dictionary<string, string>()
        let flags = HashSet<string>()
        let mutable i = 0
        while i < args.Length do
            match args[i] with
            | "--model" | "--web-text" | "--xnli" | "--xnli-train" | "--bpe" | "--train-languages" | "--drop-ratio" | "--experts" | "--every" as flag ->
                if i + 1 < args.Length && not (args[i + 1].StartsWith "--") then
                    values[flag] <- args[i + 1]
                    i <- i + 1
                else problems.Add(sprintf "%s needs a value (%s)" flag usage)
            | "--smoke" | "--full" | "--verbose" as flag -> flags.Add flag |> ignore
            | other -> problems.Add(sprintf "unknown argument %s (%s)" other usage)
            i <- i + 1
        if flags.Contains "--smoke" && flags.Contains "--full" then problems.Add "--smoke and --full exclude each other"
        let value (flag: string) = match values.TryGetValue flag with | true, v -> Some v | _ -> None
        let path (flag: string) (sample: string) =
            let p = defaultArg (value flag) (Path.Combine(sharedData, sample))
            if not (File.Exists p || Directory.Exists p) then problems.Add(sprintf "%s %s does not exist (give it with %s)" (flag.TrimStart '-') p flag)
            p
        let webText = path "--web-text" (Path.Combine("c4-en-sample", "c4-train.00000-of-01024.first1000.jsonl"))
        let xnli = path "--xnli" (Path.Combine("xnli-sample", "dev.jsonl"))
        let bpe = path "--bpe" "gpt2-bpe"
        let model = value "--model"
        model |> Option.iter (fun m -> if not (Directory.Exists m) then problems.Add(sprintf "model folder %s does not exist" m))
        let xnliTrain = value "--xnli-train"
        xnliTrain |> Option.iter (fun f -> if not (File.Exists f) then problems.Add(sprintf "xnli-train %s does not exist" f))
        let number (flag: string) (parse: string -> bool * 'a) (fallback: 'a) =
            match value flag with
            | None -> fallback
            | Some v ->
                match parse v with
                | true, x -> x
                | _ -> problems.Add(sprintf "%s expects a number, got %s" flag v); fallback
        let invariant = Globalization.CultureInfo.InvariantCulture
        let d = DropUpcycleConfig.defaults
        let ratio = number "--drop-ratio" (fun s -> Double.TryParse(s, Globalization.NumberStyles.Float, invariant)) d.DropRatio
        let experts = number "--experts" (fun s -> Int32.TryParse s) d.Router.Experts
        let every = number "--every" (fun s -> Int32.TryParse s) d.Every
        let upcycle = { d with DropRatio = ratio; Every = every; Router = { d.Router with Experts = experts } }
        problems.AddRange(DropUpcycleConfig.validate upcycle)
        let languages =
            match value "--train-languages" with
            | Some v -> v.Split([| ','; ' ' |], StringSplitOptions.RemoveEmptyEntries) |> List.ofArray
            | None -> [ "en" ]
        if problems.Count > 0 then Error(List.ofSeq problems)
        else
            Ok { Scale = (if flags.Contains "--smoke" then Smoke elif flags.Contains "--full" then Full else Quick)
                 Model = model; WebText = webText; Xnli = xnli; XnliTrain = xnliTrain; Bpe = bpe
                 TrainLanguages = languages; Upcycle = upcycle
                 RunsDir = "runs"; ReportsDir = "reports"; Verbose = flags.Contains "--verbose"; Screenshot = true }

    /// `parse`, raising one ArgumentException that lists every problem.
    let parseOrFail (sharedData: string) (args: string[]) : DropUpcycleOptions =
        match parse sharedData args with
        | Ok o -> o
        | Error ps -> invalidArg "args" (sprintf "bad script arguments:\n  - %s" (String.concat "\n  - " ps))

// ---------------------------------------------------------------- scale presets

/// Sizes and schedules of one scale.
type Settings =
    { /// The small GPT-2 pretrained when no `--model` is given.
      Base: SmallGpt2.PretrainSettings
      /// Continued pretraining: documents read (None: all), tokens per row, held-out rows, schedule.
      Documents: int option
      SequenceLength: int
      ValidRows: int
      Continued: TrainConfig
      /// XNLI fine-tuning: tokens per pair (premise cut first), schedule.
      PairTokens: int
      FineTune: TrainConfig
      /// Pair indices below this fraction train (the rest test) when XNLI is split by index.
      TrainFraction: float
      /// Test pairs evaluated per language (None: all).
      TestPerLanguage: int option }

/// Weight of the Switch balancing loss (Fedus et al. 2022 sec. 2.2: alpha = 10^-2); no other balancing loss.
let switchWeight = 0.01

let private schedule (steps: int) (batch: int) (lr: float) =
    { TrainConfig.defaults with
        Steps = steps; BatchSize = batch; LearningRate = lr; WarmupSteps = max 1 (steps / 10); WeightDecay = 0.01
        GradClip = 1.0; LossWeights = { LossWeights.none with SwitchAux = switchWeight }
        LogEvery = max 1 (steps / 20); EvalEvery = max 1 (steps / 4); CheckpointEvery = steps; Device = Native.Cpu }

/// Smoke: a few steps on a few rows (seconds). Quick (minutes on 2 CPU cores): 120 continued-pretraining
/// steps of 8 rows of 128 tokens, 300 fine-tuning steps of 16 pairs of at most 96 tokens, 150 test pairs per
/// language. Full: 20,000 continued-pretraining steps of 32 rows of 512 tokens (about 330M tokens, for a real
/// GPT-2 with `--model`) and 3 epochs of MultiNLI-size fine-tuning (about 37k steps of 32 pairs).
let settings (scale: Scale) : Settings =
    match scale with
    | Smoke ->
        let b = SmallGpt2.PretrainSettings.smoke
        // Two blocks, so that every other MLP gives one MoE layer.
        { Base = { b with Model = { b.Model with Layers = 2 } }; Documents = Some 20; SequenceLength = 16; ValidRows = 2
          Continued = schedule 2 4 1e-3; PairTokens = 24; FineTune = schedule 2 8 1e-3; TrainFraction = 0.7; TestPerLanguage = Some 2 }
    | Quick ->
        { Base = SmallGpt2.PretrainSettings.quick; Documents = None; SequenceLength = 128; ValidRows = 16
          Continued = schedule 120 8 3e-4; PairTokens = 96; FineTune = schedule 300 16 3e-4; TrainFraction = 0.7; TestPerLanguage = None }
    | Full ->
        { Base = SmallGpt2.PretrainSettings.quick; Documents = None; SequenceLength = 512; ValidRows = 256
          Continued = schedule 20000 32 1e-4; PairTokens = 128; FineTune = schedule 37000 32 2e-5; TrainFraction = 0.7; TestPerLanguage = None }

// ---------------------------------------------------------------- data

/// XNLI's 15 languages in the release's order.
let xnliLanguages = [ "ar"; "bg"; "de"; "el"; "en"; "es"; "fr"; "hi"; "ru"; "sw"; "th"; "tr"; "ur"; "vi"; "zh" ]

/// The training, validation and test pairs. Without a separate training file, the pairs of `file` are split by
/// their index within their language (`Nli.NliPair.Index`): indices below a multiple of 3 near
/// `fraction` of the largest train (the last tenth of those validate), the rest test, so a test pair's
/// translations and its premise's other hypotheses (XNLI lists three per premise, consecutively) never train.
let splitPairs (fraction: float) (languages: string list) (testPerLanguage: int option) (eval: Nli.NliPair[]) (train: Nli.NliPair[] option) =
    let inTrain (p: Nli.NliPair) = List.contains p.Language languages
    let cap (pairs: Nli.NliPair[]) =
        match testPerLanguage with
        | None -> pairs
        | Some n -> pairs |> Array.groupBy (fun p -> p.Language) |> Array.collect (fun (_, ps) -> Array.truncate n ps)
    match train with
    | Some t ->
        let t = t |> Array.filter inTrain
        let nValid = max 1 (t.Length / 10)
        t[.. t.Length - nValid - 1], t[t.Length - nValid ..], cap eval
    | None ->
        let top = (eval |> Array.map (fun p -> p.Index) |> Array.max) + 1
        let cut = 3 * int (Math.Round(fraction * float top / 3.0))
        let validCut = 3 * int (Math.Round(0.9 * float cut / 3.0))
        let trainable = eval |> Array.filter inTrain
        trainable |> Array.filter (fun p -> p.Index < validCut),
        trainable |> Array.filter (fun p -> p.Index >= validCut && p.Index < cut),
        eval |> Array.filter (fun p -> p.Index >= cut) |> cap

/// Token ids of a pair, "premise\nhypothesis", at most `maxTokens`: the premise is cut first, then the hypothesis.
let encodePair (encode: string -> int[]) (maxTokens: int) (p: Nli.NliPair) : int64[] =
    let h = encode ("\n" + p.Hypothesis)
    let h = if h.Length > maxTokens - 1 then h[.. maxTokens - 2] else h
    let pr = encode p.Premise
    let pr = if pr.Length > maxTokens - h.Length then pr[.. maxTokens - h.Length - 1] else pr
    Array.append pr h |> Array.map int64

/// Right-padded ids [B; S] with `pad`, and each row's length.
let padRows (pad: int64) (rows: int64[][]) : torch.Tensor * int[] =
    let s = rows |> Array.map Array.length |> Array.max
    let flat = [| for r in rows do yield! r; yield! Array.create (s - r.Length) pad |]
    torch.tensor(flat).view (int64 rows.Length, int64 s), rows |> Array.map Array.length

// ---------------------------------------------------------------- runs

/// What one model (dense or MoE) went through.
type ModelOutcome =
    { Name: string
      ContinuedRun: string
      FineTuneRun: string
      ContinuedValidLoss: float
      FineTuneValidLoss: float
      ContinuedSeconds: float
      FineTuneSeconds: float
      /// H, the MLP's hidden width.
      Hidden: int
      TotalParameters: int64
      /// Parameters one token runs through (one expert per MoE layer).
      ActiveParameters: int64
      /// Accuracy per language, in `xnliLanguages` order where present.
      Accuracy: (string * float * int) list
      /// Per MoE layer: counts [language; expert] and [label; expert] of test-time token assignments.
      ByLanguage: RunLog.LabelUsage list
      ByLabel: RunLog.LabelUsage list }

let private layerReports (routings: (int * Routing) list) : LayerReport list =
    [ for i, r in routings -> { Layer = sprintf "h.%d.mlp" i; Report = { Aux = auxLosses r; Stats = r.Stats } } ]

let private shuffled (seed: int) (epoch: int) (n: int) : int[] =
    let a = Array.init n id
    Random(seed * 1000003 + epoch).Shuffle a
    a

let private progressOf (opts: DropUpcycleOptions) = if opts.Verbose then Lines else Silent

/// Trains `model` with the toolkit's loop and reloads its best-validation checkpoint.
let private train (opts: DropUpcycleOptions) (cfg: TrainConfig) (model: torch.nn.Module) (runDir: string)
                  (trainCount: int) (validCount: int) (loss: Phase -> int[] -> LossParts) (config: (string * obj) list) : TrainResult =
    Native.seedAll cfg.Seed
    let task =
        { Model = model
          TrainBatches = fun seed epoch -> shuffled seed epoch trainCount |> Array.chunkBySize cfg.BatchSize |> Seq.ofArray
          ValidBatches = fun () -> Array.init validCount id |> Array.chunkBySize cfg.BatchSize |> Seq.ofArray
          Loss = loss
          Config = config
          Tokenizer = "" }
    Directory.CreateDirectory runDir |> ignore
    let result = Loop.runWith { RunOptions.Defaults with Progress = progressOf opts; Overwrite = true } cfg task runDir
    result.BestCheckpoint |> Option.iter (fun path -> Checkpoint.loadModel path model)
    result

/// Active parameters per token: everything but the experts, plus one expert per MoE layer (top-1).
let private activeParameters (model: Gpt2MoeModel) : int64 =
    let counts = parameterCounts model
    let e = int64 model.Router.Experts
    counts.Total - counts.Experts + (if model.MoeBlocks.IsEmpty then 0L else counts.Experts / e)

/// Continued pretraining, XNLI fine-tuning and zero-shot evaluation of one model (which this takes over).
let private runModel (opts: DropUpcycleOptions) (s: Settings) (name: string) (model: Gpt2MoeModel) (rows: int64[][] * int64[][])
                     (pairs: Nli.NliPair[] * Nli.NliPair[] * Nli.NliPair[]) (encode: string -> int[]) (eos: int) : ModelOutcome =
    let root = Path.Combine(opts.RunsDir, "drop_upcycle_gpt2")
    let lmTrain, lmValid = rows
    let trainPairs, validPairs, testPairs = pairs
    let moeSection = if model.MoeBlocks.IsEmpty then None else Some opts.Upcycle
    let total, active = parameterCounts(model).Total, activeParameters model
    // Continued pretraining: next-token loss plus the Switch loss of every MoE layer.
    let continuedDir = Path.Combine(root, "cpt-" + name)
    let lmBatch (source: int64[][]) (indices: int[]) =
        torch.tensor(indices |> Array.collect (fun i -> source[i])).view (int64 indices.Length, -1L)
    let lmLoss (phase: Phase) (indices: int[]) =
        use ids = lmBatch (if phase = Training then lmTrain else lmValid) indices
        let s1 = ids.shape[1] - 1L
        let out = model.Run(ids.narrow (1L, 0L, s1), None)
        let logits = out.Hidden.matmul (model.Wte.t ()) // [B; S-1; V]
        let tl = crossEntropy 0.0 -100L logits (ids.narrow (1L, 1L, s1))
        { TaskLoss = tl.Loss; Moe = layerReports out.Routings; Tokens = tl.Tokens }
    let continued =
        train opts s.Continued model continuedDir lmTrain.Length lmValid.Length lmLoss
            [ "model", box model.Config; "upcycle", box moeSection; "data", box {| WebText = opts.WebText; Rows = lmTrain.Length; SequenceLength = s.SequenceLength |} ]
    RunFiles.writeParameters continuedDir { Total = total; Active = active; Trainable = total }
    // XNLI fine-tuning as GPT2ForSequenceClassification, padding with <|endoftext|> (GPT-2 has no pad token).
    let classifier = new Gpt2ForSequenceClassification(model, Nli.labels.Length, Some eos)
    let encoded (ps: Nli.NliPair[]) = ps |> Array.map (encodePair encode s.PairTokens)
    let trainIds, validIds, testIds = encoded trainPairs, encoded validPairs, encoded testPairs
    let batchOf (ids: int64[][]) (ps: Nli.NliPair[]) (indices: int[]) =
        let t, lengths = padRows (int64 eos) (indices |> Array.map (fun i -> ids[i]))
        t, lengths, torch.tensor(indices |> Array.map (fun i -> int64 ps[i].Label))
    let clsLoss (phase: Phase) (indices: int[]) =
        let ids, ps = if phase = Training then trainIds, trainPairs else validIds, validPairs
        let t, _, labels = batchOf ids ps indices
        let logits, routings = classifier.Run(t, None)
        let tl = crossEntropy 0.0 -100L logits labels
        { TaskLoss = tl.Loss; Moe = layerReports routings; Tokens = tl.Tokens }
    let fineTuneDir = Path.Combine(root, "xnli-" + name)
    let fineTune =
        train opts s.FineTune classifier fineTuneDir trainIds.Length validIds.Length clsLoss
            [ "model", box model.Config; "upcycle", box moeSection
              "data", box {| Xnli = opts.Xnli; TrainLanguages = opts.TrainLanguages; Train = trainIds.Length; Valid = validIds.Length; PairTokens = s.PairTokens |} ]
    let head = int64 (Nli.labels.Length * model.Config.Embd)
    RunFiles.writeParameters fineTuneDir { Total = total + head; Active = active + head; Trainable = total + head }
    // Zero-shot evaluation on every language, counting each MoE layer's expert picks of real (non-pad) tokens.
    classifier.eval ()
    let languages = testPairs |> Array.map (fun p -> p.Language) |> Array.distinct |> Array.sortBy (fun l -> match List.tryFindIndex ((=) l) xnliLanguages with Some i -> i | None -> 100)
    let langIndex = languages |> Array.mapi (fun i l -> l, i) |> dict
    let e = model.Router.Experts
    let byLang = Dictionary<int, float[][]>()
    let byLabel = Dictionary<int, float[][]>()
    for i in model.MoeBlocks do
        byLang[i] <- Array.init languages.Length (fun _ -> Array.zeroCreate e)
        byLabel[i] <- Array.init Nli.labels.Length (fun _ -> Array.zeroCreate e)
    let correct = Array.zeroCreate languages.Length
    let seen = Array.zeroCreate languages.Length
    use _ = torch.no_grad ()
    for chunk in Array.init testIds.Length id |> Array.chunkBySize s.FineTune.BatchSize do
        use scope = torch.NewDisposeScope()
        let t, lengths, _ = batchOf testIds testPairs chunk
        let logits, routings = classifier.Run(t, None)
        let predicted = Tensors.toInt64s (logits.argmax (-1L))
        let width = int t.shape[1]
        for j, idx in Array.indexed chunk do
            let p = testPairs[idx]
            let li = langIndex[p.Language]
            seen[li] <- seen[li] + 1
            if predicted[j] = int64 p.Label then correct[li] <- correct[li] + 1
        for layer, r in routings do
            let experts = Tensors.toInt64s r.Experts // [T * K]
            let kept = r.Kept.reshape(-1L).to_type(torch.ScalarType.Int64) |> Tensors.toInt64s
            let k = int r.Experts.shape[1]
            for j, idx in Array.indexed chunk do
                let p = testPairs[idx]
                for pos in 0 .. lengths[j] - 1 do
                    for slot in 0 .. k - 1 do
                        let at = (j * width + pos) * k + slot
                        if kept[at] = 1L then
                            let ex = int experts[at]
                            let languageRow = byLang[layer].[langIndex[p.Language]]
                            let labelRow = byLabel[layer].[p.Label]
                            languageRow[ex] <- languageRow[ex] + 1.0
                            labelRow[ex] <- labelRow[ex] + 1.0
    let outcome =
        { Name = name
          ContinuedRun = Path.GetFullPath continuedDir
          FineTuneRun = Path.GetFullPath fineTuneDir
          ContinuedValidLoss = defaultArg continued.BestValidLoss nan
          FineTuneValidLoss = defaultArg fineTune.BestValidLoss nan
          ContinuedSeconds = continued.ElapsedSeconds
          FineTuneSeconds = fineTune.ElapsedSeconds
          Hidden = 4 * model.Config.Embd
          TotalParameters = total
          ActiveParameters = active
          Accuracy = [ for i, l in Array.indexed languages -> l, float correct[i] / float (max 1 seen[i]), seen[i] ]
          ByLanguage = [ for i in model.MoeBlocks -> { Layer = sprintf "h.%d.mlp" i; Labels = languages; Experts = e; Counts = byLang[i] } ]
          ByLabel = [ for i in model.MoeBlocks -> { Layer = sprintf "h.%d.mlp" i; Labels = Nli.labels; Experts = e; Counts = byLabel[i] } ] }
    classifier.Dispose() // and the model inside it
    outcome

// ---------------------------------------------------------------- the study

/// The base model's folder: `--model`, or a small GPT-2 pretrained on the web text once into
/// RunsDir/gpt2-small-c4-quick (the folder `scripts/peft_gpt2.fsx` uses too, so the studies share it).
/// Returns the folder, its description for the tables, and a short one for the figure's title.
let baseFolder (opts: DropUpcycleOptions) (s: Settings) : string * string * string =
    match opts.Model with
    | Some dir -> Path.GetFullPath dir, sprintf "GPT-2 from %s" dir, sprintf "GPT-2 from %s" (Path.GetFileName(Path.TrimEndingDirectorySeparator dir))
    | None ->
        let folder = Path.Combine(opts.RunsDir, match opts.Scale with Smoke -> "gpt2-small-c4-smoke-2-blocks" | _ -> "gpt2-small-c4-quick")
        let dir = SmallGpt2.ensure { RunOptions.Defaults with Progress = progressOf opts } s.Base opts.WebText opts.Bpe (folder + "-run") folder
        let m = s.Base.Model
        dir, sprintf "small GPT-2 pretrained here on %s (D = %d, %d blocks, %d heads; %d steps; %s)" (Path.GetFileName opts.WebText) m.Embd m.Layers m.Heads s.Base.Train.Steps dir,
        sprintf "small GPT-2 pretrained here, D = %d, %d blocks" m.Embd m.Layers

/// The whole study: tables, report page of the four runs, and a figure of accuracy per language and the
/// MoE's expert shares by language and by label per MoE layer.
let run (opts: DropUpcycleOptions) : ExperimentResult =
    let experiment = "drop_upcycle_gpt2"
    let s = settings opts.Scale
    let folder, baseName, baseShort = baseFolder opts s
    let tokenizer = HfTokenizer.fromFolder folder
    let eos =
        match tokenizer.TokenToId "<|endoftext|>" with
        | Some id -> id
        | None -> invalidArg "opts" (sprintf "expected GPT-2's <|endoftext|> token in the tokenizer of %s" folder)
    let encode (text: string) = tokenizer.Encode(text, false)
    let web = WebText.load { WebText.WebTextConfig.defaults with MaxDocuments = s.Documents } opts.WebText
    let rows = SmallGpt2.packRows encode eos s.SequenceLength web.Documents |> Array.map (Array.map int64)
    if rows.Length <= s.ValidRows then
        invalidArg "opts" (sprintf "%s gives %d rows of %d tokens; expected more than the %d validation rows" opts.WebText rows.Length s.SequenceLength s.ValidRows)
    let lmRows = rows[.. rows.Length - s.ValidRows - 1], rows[rows.Length - s.ValidRows ..]
    let eval = Nli.load opts.Xnli
    let trainSet = opts.XnliTrain |> Option.map Nli.load
    let trainPairs, validPairs, testPairs = splitPairs s.TrainFraction opts.TrainLanguages s.TestPerLanguage eval.Pairs (trainSet |> Option.map (fun t -> t.Pairs))
    if trainPairs.Length = 0 || validPairs.Length = 0 || testPairs.Length = 0 then
        invalidArg "opts" (sprintf "expected training, validation and test pairs; got %d, %d and %d (training languages %s)" trainPairs.Length validPairs.Length testPairs.Length (String.Join(",", opts.TrainLanguages)))
    let pairs = trainPairs, validPairs, testPairs
    let denseOutcome =
        use dense = loadDenseFolder folder
        runModel opts s "dense" (ofDense dense) lmRows pairs encode eos
    let moeOutcome =
        use dense = loadDenseFolder folder
        if (DropUpcycleConfig.moeBlocks opts.Upcycle dense.Config.Layers).IsEmpty then
            invalidArg "opts" (sprintf "the base model has %d blocks: no block i with i %% %d = %d becomes an MoE layer (choose --every <= %d)" dense.Config.Layers opts.Upcycle.Every (opts.Upcycle.Every - 1) dense.Config.Layers)
        Native.seedAll opts.Upcycle.Seed
        let moe, _ = dropUpcycle opts.Upcycle dense
        runModel opts s "moe" moe lmRows pairs encode eos
    let u = opts.Upcycle
    let moeName = sprintf "MoE (%d experts, top-1, r = %g, every %s MLP)" u.Router.Experts u.DropRatio (if u.Every = 2 then "other" else sprintf "%d-th" u.Every)
    let accuracy (o: ModelOutcome) = o.Accuracy |> List.map (fun (l, a, _) -> l, a) |> Map.ofList
    let da, ma = accuracy denseOutcome, accuracy moeOutcome
    let languages = denseOutcome.Accuracy |> List.map (fun (l, _, n) -> l, n)
    let mean (m: Map<string, float>) = languages |> List.averageBy (fun (l, _) -> m[l])
    let trained = String.Join("+", opts.TrainLanguages)
    let accuracyTable =
        { Title = sprintf "XNLI accuracy (%%), fine-tuned on %s, zero-shot elsewhere; base: %s (%A)" trained baseName opts.Scale
          Columns = [| "language"; "test pairs"; "dense"; "MoE"; "MoE - dense" |]
          Rows =
            [| for l, n in languages ->
                 [| (if List.contains l opts.TrainLanguages then l + " (trained)" else l); string n
                    Table.pct da[l]; Table.pct ma[l]; Table.num 1 (100.0 * (ma[l] - da[l])) |]
               yield [| "mean"; string (languages |> List.sumBy snd); Table.pct (mean da); Table.pct (mean ma); Table.num 1 (100.0 * (mean ma - mean da)) |] |] }
    let trainingTable =
        { Title = sprintf "Continued pretraining and fine-tuning (same schedule for both); base: %s" baseName
          Columns = [| "model"; "parameters"; "active / token"; "CPT best valid loss"; "CPT s"; "XNLI best valid loss"; "XNLI s" |]
          Rows =
            [| for label, o in [ "dense", denseOutcome; moeName, moeOutcome ] ->
                 [| label; Table.si (float o.TotalParameters); Table.si (float o.ActiveParameters)
                    Table.num 3 o.ContinuedValidLoss; Table.num 0 o.ContinuedSeconds
                    Table.num 3 o.FineTuneValidLoss; Table.num 0 o.FineTuneSeconds |] |] }
    let notes =
        [ sprintf "Web text: %s." (WebText.describe web.Report)
          sprintf "XNLI: %s%s. Train %d, validation %d, test %d pairs%s." (Nli.describe eval.Report)
              (match trainSet with Some t -> "; training file " + Nli.describe t.Report | None -> "")
              trainPairs.Length validPairs.Length testPairs.Length
              (if trainSet.IsNone then sprintf " (split by pair index: the first %.0f%% of each language's indices train, the rest test, so no test pair's translation is trained on)" (100.0 * s.TrainFraction) else "")
          sprintf "Drop-Upcycling (Nakamura et al. 2025): each expert a copy of the dense MLP with round(r x %d) = %d units re-initialised (c_fc columns, c_fc bias entries and c_proj rows of the same units, from each original tensor's mean and std); router %A, jitter %g, Switch loss weight %g; MoE blocks %s."
              moeOutcome.Hidden (droppedUnits u.DropRatio moeOutcome.Hidden)
              u.Router.Selection u.Router.Jitter switchWeight (String.Join(", ", moeOutcome.ByLanguage |> List.map (fun l -> l.Layer)))
          "Pairs are \"premise\\nhypothesis\", right-padded with <|endoftext|>; the class logit is read at the last non-pad token (GPT2ForSequenceClassification). Expert shares count the test tokens (padding excluded) each MoE layer sent to each expert." ]
    let accuracyChart =
        [ Chart.Column(languages |> List.map (fun (l, _) -> l, 100.0 * da[l]), Name = "dense")
          Chart.Column(languages |> List.map (fun (l, _) -> l, 100.0 * ma[l]), Name = "MoE") ]
        |> Chart.combine
        |> Chart.withYAxisStyle (TitleText = "accuracy (%)")
    // In the grid each heatmap keeps its axis titles, which name its layer (the chart titles give way to the
    // figure's). Every heatmap is a row share in [0, 1] on one scale, so one colour bar (the first's, beside
    // the heatmaps, below the legend) serves them all.
    let heatmap (first: bool) (by: string) (usage: RunLog.LabelUsage) =
        Plots.labelUsageHeatmap usage
        |> GenericChart.mapTrace (Trace2DStyle.Heatmap(ZMin = 0.0, ZMax = 1.0, ShowScale = first, ColorBar = ColorBar.init (Title = Title.init "share", Len = 0.6, Y = 0.3)))
        |> Chart.withYAxisStyle (TitleText = sprintf "%s: %s" usage.Layer by)
    let heatmaps =
        [ for l in moeOutcome.ByLanguage -> "language", l ] @ [ for l in moeOutcome.ByLabel -> "label", l ]
        |> List.mapi (fun i (by, l) -> heatmap (i = 0) by l)
    let rowsInFigure = 1 + heatmaps.Length
    let figure =
        accuracyChart :: heatmaps
        |> Chart.Grid(rowsInFigure, 1)
        |> Chart.withTemplate Plots.template
        |> Chart.withTitle (sprintf "Drop-upcycled vs dense GPT-2 on XNLI (base: %s)" baseShort)
        // 400 px a row, so that the language heatmaps label all 15 languages.
        |> Chart.withSize (900, 400 * rowsInFigure)
    let experimentOpts =
        { ExperimentOptions.defaults with
            Scale = opts.Scale
            DataPath = Some(sprintf "web text %s, XNLI %s, base %s" opts.WebText opts.Xnli folder)
            RunsDir = opts.RunsDir; ReportsDir = opts.ReportsDir; Verbose = opts.Verbose; Screenshot = opts.Screenshot }
    let runs = [ denseOutcome.ContinuedRun; moeOutcome.ContinuedRun; denseOutcome.FineTuneRun; moeOutcome.FineTuneRun ]
    finish experimentOpts experiment "Drop-upcycled GPT-2 (top-1 of E) vs dense GPT-2: continued pretraining, XNLI fine-tuning, zero-shot cross-lingual accuracy"
        notes [ accuracyTable; trainingTable ] runs figure
