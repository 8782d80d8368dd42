/// The summarization job end to end: examples (the built-in synthetic corpus or files on disk) ->
/// tokenizer -> length-bucketed batches -> encoder-decoder (dense or MoE) -> `Train.Loop.run` -> decoding of the
/// test split -> predictions, references and documents files, ROUGE/BLEU of the model and of the lead-1
/// baseline in `test_scores.json`, and per-topic expert counts in `routing_by_label.json`.
/// Axes: B batch, S source positions, T target positions, V vocabulary, E experts, K picks per token.
module Moe.Summarizer

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json.Nodes
open System.Text.RegularExpressions
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Layers
open Moe.Models
open Moe.Generate
open Moe.Tokenizers
open Moe.Data
open Moe.Corpus
open Moe.Batching
open Moe.Train

// ---------------------------------------------------------------- configuration

/// One file (or folder) per split. A path may repeat: the XSum release reads its split from the split file,
/// chosen per split automatically when `Loader.Split` is None.
type SplitFiles =
    { Train: string
      Valid: string
      Test: string }

/// Where the examples come from.
type DataSource =
    /// The built-in synthetic extreme-summarization corpus (`Corpus.fs`).
    | Synthetic of CorpusConfig
    /// Files read with `Loader`.
    | Files of SplitFiles

/// Everything a summarization run needs. `SummarizerConfig.resolve` fills the fields that follow from
/// others (the model's vocabulary size, the decoder's special ids, the batch size and seed).
type SummarizerConfig =
    { /// The run folder is `RunsDir/Name`.
      Name: string
      RunsDir: string
      Source: DataSource
      /// How files are read (unused for the synthetic corpus).
      Loader: DataConfig
      /// Keep at most this many examples of each split (None = all): quick runs on a large dataset.
      MaxTrain: int option
      MaxValid: int option
      MaxTest: int option
      /// Folder for on-disk token caches, so a large corpus streams from disk instead of sitting in memory;
      /// None tokenizes in memory (fine for tens of thousands of documents).
      CacheDir: string option
      Tokenizer: TokenizerConfig
      /// Batch shapes. `BatchSize` and `Seed` are taken from `Train`, so they are set in one place.
      Batching: BatchConfig
      /// The model; `VocabSize` is set from the tokenizer.
      Model: ModelConfig
      Train: TrainConfig
      /// Decoding of the test split; `BosId` and `EosId` are set from the tokenizer.
      Generate: GenerateConfig
      /// Porter-stem tokens for ROUGE (rouge-score `use_stemmer`).
      Stem: bool
      /// Bootstrap resamples for the test scores' confidence intervals.
      BootstrapSamples: int
      /// Model-based metrics of the test predictions (BERTScore, SummaC): off until a model folder is given.
      Eval: Metrics.ModelMetricsConfig }

module SummarizerConfig =
    /// Small enough to train on 2 CPU cores in minutes, large enough to read a whole synthetic document:
    /// 2 + 2 layers of width 64, the synthetic corpus, cl100k_base trimmed, dense FFNs.
    let defaults : SummarizerConfig =
        { Name = "summarizer"
          RunsDir = "runs"
          Source = Synthetic CorpusConfig.defaults
          Loader = DataConfig.defaults
          MaxTrain = None
          MaxValid = None
          MaxTest = None
          CacheDir = None
          Tokenizer = TokenizerConfig.defaults
          Batching = { BatchConfig.defaults with MaxSourceTokens = 320; MaxTargetTokens = 40 }
          Model =
            { ModelConfig.defaults with
                ModelDim = 64
                Heads = 4
                KvHeads = 4
                EncoderLayers = 2
                DecoderLayers = 2
                Dropout = 0.1
                MaxLength = 512
                Ffn = Dense 256 }
          // 800 steps at 2e-3 take the top-k model on the synthetic corpus to ROUGE-1 ~0.82 against lead-1's
          // ~0.15 (runs/topk); at 1e-3 and 400 steps it only reached ~0.20: copying names and numbers from the
          // document is learned late.
          Train =
            { TrainConfig.defaults with
                Steps = 800
                BatchSize = 32
                LearningRate = 2e-3
                WarmupSteps = 80
                LogEvery = 10
                EvalEvery = 200
                CheckpointEvery = 200 }
          Generate = { GenerateConfig.defaults with BeamSize = 1; MaxLength = 40 }
          Stem = true
          BootstrapSamples = 1000
          Eval = Metrics.ModelMetrics.defaults }

    /// The same job with MoE feed-forward sublayers in every layer: token-choice top-k routing (softmax,
    /// then the k largest, renormalised; Switch-style aux loss from `Train.LossWeights`).
    let topK (experts: int) (k: int) (cfg: SummarizerConfig) : SummarizerConfig =
        let hidden = match cfg.Model.Ffn with Dense h -> h | Moe m | LoraMoe (m, _) -> m.ExpertHidden
        let moe =
            { MoeConfig.defaults with
                ModelDim = cfg.Model.ModelDim
                ExpertHidden = hidden
                Activation = cfg.Model.Activation
                Router = { RouterConfig.defaults with Experts = experts; K = k; Selection = TokenChoiceTopK(NormaliseThenTopK, true) } }
        { cfg with Model = { cfg.Model with Ffn = Moe moe; MoeEvery = 1 } }

    /// The same job with hash-routed MoE layers (Roller et al. 2021): token ids binned by training-corpus
    /// frequency (`BalancedHash`), one expert per token, no router parameters and no balancing loss.
    let hash (experts: int) (cfg: SummarizerConfig) : SummarizerConfig =
        let c = topK experts 1 cfg
        match c.Model.Ffn with
        | Moe m -> { c with Model = { c.Model with Ffn = Moe { m with Router = { m.Router with K = 1; Selection = Hash BalancedHash } } } }
        | Dense _ | LoraMoe _ -> c

    /// Experts per MoE layer in the main job (`scripts/train_topk.fsx`, `moe train`).
    let mainJobExperts = 4
    /// Experts per token in the main job: top-2, as GShard and Mixtral.
    let mainJobK = 2

    /// The toolkit's main job: `defaults` with every feed-forward sublayer a token-choice top-2 MoE layer of 4
    /// experts. `moe train` starts from it, and so does `scripts/train_topk.fsx`.
    let mainJob : SummarizerConfig = topK mainJobExperts mainJobK defaults

    /// The same job with its MoE layers' experts as LoRA adapters on one shared base FFN per layer
    /// (`Models.LoraMoe`, Hu et al. 2021); routing is unchanged. Use after `topK` or `hash`.
    let loraExperts (lora: LoraConfig) (cfg: SummarizerConfig) : SummarizerConfig =
        match cfg.Model.Ffn with
        | Moe m | LoraMoe (m, _) -> { cfg with Model = { cfg.Model with Ffn = LoraMoe(m, lora) } }
        | Dense _ -> invalidArg "cfg" "expected a config with MoE layers (apply SummarizerConfig.topK or hash first), got a dense model"

    /// Fills the fields that follow from others: the vocabulary size, BOS/EOS, batch size and seed.
    let resolve (vocabSize: int) (cfg: SummarizerConfig) : SummarizerConfig =
        { cfg with
            Model = { cfg.Model with VocabSize = vocabSize }
            Batching = { cfg.Batching with BatchSize = cfg.Train.BatchSize; Seed = cfg.Train.Seed }
            Generate = { cfg.Generate with BosId = specials.Bos; EosId = specials.Eos } }

    /// Every problem with the config, each prefixed by its section.
    let validate (cfg: SummarizerConfig) : string list =
        let section (name: string) (ps: string list) = ps |> List.map (fun p -> name + ": " + p)
        // The vocabulary size is not known before tokenization; validate with a stand-in.
        let r = resolve (max cfg.Model.VocabSize (SpecialCount + 1)) cfg
        [ if String.IsNullOrWhiteSpace cfg.Name || cfg.Name.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0 then
              sprintf "Name must be a folder name, got \"%s\"" cfg.Name
          if String.IsNullOrWhiteSpace cfg.RunsDir then "RunsDir must not be blank"
          match cfg.Source with
          | Synthetic c -> yield! section "Source.Synthetic" (CorpusConfig.validate c)
          | Files f ->
              for name, p in [ "Train", f.Train; "Valid", f.Valid; "Test", f.Test ] do
                  if String.IsNullOrWhiteSpace p then sprintf "Source.Files.%s must name a file or folder" name
                  elif not (File.Exists p || Directory.Exists p) then sprintf "Source.Files.%s: %s does not exist" name p
              yield! section "Loader" (DataConfig.validate cfg.Loader)
          for name, m in [ "MaxTrain", cfg.MaxTrain; "MaxValid", cfg.MaxValid; "MaxTest", cfg.MaxTest ] do
              match m with
              | Some n when n < 1 -> sprintf "%s must be >= 1 (or null for all), got %d" name n
              | _ -> ()
          yield! section "Tokenizer" (TokenizerConfig.validate cfg.Tokenizer)
          yield! section "Batching" (BatchConfig.validate r.Batching)
          yield! section "Model" (ModelConfig.validate r.Model |> List.filter (fun p -> not (p.StartsWith "VocabSize")))
          if cfg.Model.MaxLength < cfg.Batching.MaxSourceTokens then
              sprintf "Model.MaxLength (%d) must be >= Batching.MaxSourceTokens (%d): every source position needs a position vector"
                  cfg.Model.MaxLength cfg.Batching.MaxSourceTokens
          if cfg.Model.MaxLength < cfg.Batching.MaxTargetTokens then
              sprintf "Model.MaxLength (%d) must be >= Batching.MaxTargetTokens (%d)" cfg.Model.MaxLength cfg.Batching.MaxTargetTokens
          yield! section "Train" (TrainConfig.validate cfg.Train)
          yield! section "Generate" (GenerateConfig.validate r.Model r.Generate |> List.filter (fun p -> not (p.Contains "Id must be in")))
          if cfg.BootstrapSamples < 1 then sprintf "BootstrapSamples must be >= 1, got %d" cfg.BootstrapSamples
          // The metric models are checked here, before any training, so a wrong folder costs no run.
          yield! Metrics.ModelMetrics.problems (fun field -> "Eval." + field) cfg.Eval ]

    /// Reads a config file (JSON; fields left out keep `over`'s values) and applies `KEY=VALUE` overrides.
    let load (over: SummarizerConfig) (file: string option) (assignments: string list) : Result<SummarizerConfig, string list> =
        let root =
            match file with
            | None -> Ok(Json.toNode over)
            | Some f when not (File.Exists f) -> Error [ sprintf "config file not found: %s" f ]
            | Some f ->
                match Json.parse (File.ReadAllText f) with
                | Ok n -> Ok n
                | Error e -> Error [ sprintf "%s: %s" f e ]
        root
        |> Result.bind (fun n -> Json.applyAssignments n assignments)
        |> Result.bind (fun n -> Json.readOver over n)

// ---------------------------------------------------------------- data

/// The splits as token sources, with the tokenizer and what loading noticed.
type Prepared =
    { Tokenizer: Tokenizer
      Train: ITokenSource
      Valid: ITokenSource
      Test: ITokenSource
      /// The test examples' texts, in order (documents for lead-1 and documents.txt, references).
      TestExamples: Example[]
      /// What the loaders reported (skipped, truncated, repaired), one line each.
      Notes: string list
      /// Token caches to close when done.
      Resources: IDisposable list }

    interface IDisposable with
        member p.Dispose() = for r in p.Resources do r.Dispose()

let private capped (limit: int option) (xs: seq<Example>) = match limit with Some n -> Seq.truncate n xs | None -> xs

/// The data config for one split: the XSum release takes its split name from the split file.
let loaderFor (cfg: SummarizerConfig) (path: string) (split: string) : DataConfig =
    let format = match cfg.Loader.Format with Some f -> f | None -> detectFormat path
    if format = XsumRaw && cfg.Loader.Split.IsNone then { cfg.Loader with Split = Some split } else cfg.Loader

/// The split files of a dataset path. A folder holding files named train*, validation*/valid*/val*/dev* and
/// test* (e.g. Hugging Face's `train-00000-of-00001.parquet`, or `train.jsonl`) gives those; any other path
/// (an XSum release folder or split file, one file) is used for all three splits.
let splitFilesOf (path: string) : SplitFiles =
    if Directory.Exists path then
        match Data.splitFolder path with
        | Some(tr, va, te) -> { Train = tr; Valid = va; Test = te }
        | None -> { Train = path; Valid = path; Test = path }
    elif File.Exists path then { Train = path; Valid = path; Test = path }
    else invalidArg "path" (sprintf "expected a data file or folder, but %s does not exist" path)

/// Reads the examples of the three splits lazily (files) or generates them (synthetic).
let private splitReaders (cfg: SummarizerConfig) : (string * (unit -> seq<Example>) * (unit -> string list)) list =
    match cfg.Source with
    | Synthetic c ->
        let s = lazy (Corpus.splits c)
        [ "train", (fun () -> s.Value.Train |> Seq.ofArray |> capped cfg.MaxTrain), (fun () -> [])
          "validation", (fun () -> s.Value.Valid |> Seq.ofArray |> capped cfg.MaxValid), (fun () -> [])
          "test", (fun () -> s.Value.Test |> Seq.ofArray |> capped cfg.MaxTest), (fun () -> []) ]
    | Files f ->
        [ for split, path, limit in [ "train", f.Train, cfg.MaxTrain; "validation", f.Valid, cfg.MaxValid; "test", f.Test, cfg.MaxTest ] ->
            let reader = Data.read (loaderFor cfg path split) path
            split, (fun () -> reader.Examples |> capped limit),
            (fun () -> reader.Report.Notes |> List.map (fun n -> sprintf "%s (%s): %s" split path n)) ]

/// Loads the splits, trains the tokenizer on the training texts and tokenizes every split, in memory or
/// through on-disk token caches (`CacheDir`).
let prepare (cfg: SummarizerConfig) : Prepared =
    orFail "summarizer config" (SummarizerConfig.validate cfg) cfg |> ignore
    let readers = splitReaders cfg
    let examplesOf (split: string) = readers |> List.find (fun (s, _, _) -> s = split) |> fun (_, r, _) -> r ()
    let notesOf () = readers |> List.collect (fun (_, _, n) -> n ())
    let nonEmpty (split: string) (count: int) =
        if count = 0 then invalidOp (sprintf "the %s split has no examples; check the data path and loader settings" split)
    match cfg.CacheDir with
    | None ->
        let train = examplesOf "train" |> Seq.toArray
        let valid = examplesOf "validation" |> Seq.toArray
        let test = examplesOf "test" |> Seq.toArray
        nonEmpty "train" train.Length
        nonEmpty "validation" valid.Length
        nonEmpty "test" test.Length
        let tokenizer = Tokenizers.train cfg.Tokenizer (Data.texts train)
        let source (xs: Example[]) = TokenizedSet(tokenizer, xs) :> ITokenSource
        { Tokenizer = tokenizer; Train = source train; Valid = source valid; Test = source test
          TestExamples = test; Notes = notesOf (); Resources = [] }
    | Some dir ->
        Directory.CreateDirectory dir |> ignore
        let encoder = openBase cfg.Tokenizer.Base
        let key (split: string) =
            Json.format (Json.toNode {| Source = cfg.Source; Loader = cfg.Loader; Split = split
                                        Max = (match split with "train" -> cfg.MaxTrain | "validation" -> cfg.MaxValid | _ -> cfg.MaxTest) |})
        let cache (split: string) =
            TokenCache.openOrBuild encoder (key split) (examplesOf split) (Path.Combine(dir, sprintf "%s.%s.tokens" cfg.Name split))
        let train, valid, test = cache "train", cache "validation", cache "test"
        nonEmpty "train" train.Count
        nonEmpty "validation" valid.Count
        nonEmpty "test" test.Count
        let tokenizer =
            if cfg.Tokenizer.Trim then TokenCache.tokenizer encoder cfg.Tokenizer.MinCount train
            else Tokenizer(encoder, Vocabulary.full encoder)
        { Tokenizer = tokenizer
          Train = train.WithTokenizer tokenizer
          Valid = valid.WithTokenizer tokenizer
          Test = test.WithTokenizer tokenizer
          TestExamples = examplesOf "test" |> Seq.toArray
          Notes = notesOf ()
          Resources = [ train :> IDisposable; valid; test ] }

/// How often each model id occurs in the training documents and summaries. [V]
let tokenCounts (vocabSize: int) (source: ITokenSource) : int64[] =
    let counts = Array.zeroCreate<int64> vocabSize
    for i in 0 .. source.Count - 1 do
        let d, s = source.Read i
        for id in d do counts[id] <- counts[id] + 1L
        for id in s do counts[id] <- counts[id] + 1L
    counts

/// The tokenizer's vocabulary mapping as the JSON text `Tokenizers.save` writes (stored in checkpoints).
let tokenizerText (tokenizer: Tokenizer) : string =
    let tmp = Path.Combine(Path.GetTempPath(), sprintf "moe-vocabulary-%s.json" (Guid.NewGuid().ToString("N")))
    try
        Tokenizers.save tmp tokenizer
        File.ReadAllText tmp
    finally
        if File.Exists tmp then File.Delete tmp

/// The tokenizer whose mapping `tokenizerText` wrote.
let tokenizerOfText (text: string) : Tokenizer =
    let tmp = Path.Combine(Path.GetTempPath(), sprintf "moe-vocabulary-%s.json" (Guid.NewGuid().ToString("N")))
    try
        File.WriteAllText(tmp, text)
        Tokenizers.load tmp
    finally
        if File.Exists tmp then File.Delete tmp

// ---------------------------------------------------------------- model and task

/// The encoder-decoder of a resolved config. `counts` [V] fills BalancedHash tables (training-corpus token
/// frequencies); without them the tables are zeros of the right size, to be overwritten by a checkpoint.
let buildModel (cfg: SummarizerConfig) (counts: int64[] option) : EncoderDecoder =
    Native.seedAll cfg.Train.Seed
    let model = new EncoderDecoder(cfg.Model)
    for _, router in model.Routers() do
        if not (isNull router.HashTable) then
            match counts with
            | Some c -> router.SetHashTableFromCounts c
            | None -> router.SetHashTable(Array.zeroCreate<int64> cfg.Model.VocabSize)
    model

/// The training task over index batches: the step's tensors are made in `Loss`, inside the trainer's scope.
/// Training batches are `Batching.plan` (length-bucketed, shuffled by (seed, epoch)); validation batches
/// are planned once without shuffling.
let task (cfg: SummarizerConfig) (prepared: Prepared) (model: EncoderDecoder) (device: torch.Device) : TrainTask<int[]> =
    let pad = int64 specials.Pad
    let validPlan = Batching.plan { cfg.Batching with Shuffle = false } prepared.Valid 0
    let lossOf (source: ITokenSource) (phase: Phase) (indices: int[]) : LossParts =
        let b = Batching.collate cfg.Batching source indices
        let on (t: torch.Tensor) = if t.device = device then t else t.``to`` device
        let out = model.Forward(on b.Source, on b.DecoderInput, on b.SourceMask, on b.TargetMask)
        let smoothing = if phase = Training then cfg.Train.LabelSmoothing else 0.0
        let ce = crossEntropy smoothing pad out.Logits (on b.Target)
        { TaskLoss = ce.Loss; Moe = out.Moe; Tokens = ce.Tokens }
    { Model = model
      TrainBatches = fun seed epoch -> Batching.plan { cfg.Batching with Seed = seed } prepared.Train epoch |> Seq.ofArray
      ValidBatches = fun () -> Seq.ofArray validPlan
      Loss = fun phase indices -> lossOf (if phase = Training then prepared.Train else prepared.Valid) phase indices
      Config =
        [ for f in Reflection.FSharpType.GetRecordFields typeof<SummarizerConfig> do
            if f.Name <> "Train" then f.Name, f.GetValue cfg ]
      Tokenizer = tokenizerText prepared.Tokenizer }

// ---------------------------------------------------------------- generation and scores

/// Decodes every example of `source` with `cfg.Generate`, batched by length; returns texts in source order.
let summarize (cfg: SummarizerConfig) (model: EncoderDecoder) (tokenizer: Tokenizer) (source: ITokenSource) (device: torch.Device) : string[] =
    let out = Array.create source.Count ""
    for indices in Batching.plan { cfg.Batching with Shuffle = false } source 0 do
        use _ = torch.NewDisposeScope()
        let b = Batching.collate cfg.Batching source indices
        let src = b.Source.``to`` device
        let mask = b.SourceMask.``to`` device
        let hyps = Generate.generate cfg.Generate model src mask
        hyps |> Array.iteri (fun i h -> out[indices[i]] <- tokenizer.Decode h.Tokens)
    out

let private sentenceBreak = Regex(@"(?<=[.!?][""'\u201D\u2019)\]]*)\s+(?=[""'\u201C\u2018(\[]?[\p{Lu}\p{N}])", RegexOptions.Compiled)

/// The lead-1 baseline: the document's first sentence (up to the first line break, then up to the first
/// ., ! or ? followed by space and a capital or digit). XSum's paper reports it as the extractive floor.
let lead1 (document: string) : string =
    let first =
        document.Split('\n')
        |> Array.map (fun l -> l.Trim())
        |> Array.tryFind (fun l -> l <> "")
        |> Option.defaultValue ""
    let m = sentenceBreak.Match first
    if m.Success then first.Substring(0, m.Index) else first

/// A text on one line, as the run folder's aligned files hold it.
let oneLine (text: string) : string =
    text.Replace("\r\n", " ").Replace('\n', ' ').Replace('\r', ' ')

/// The model's and lead-1's scores on the test split.
type TestScores =
    { Model: Metrics.ScoreReport
      Lead1: Metrics.ScoreReport }

/// `{"model": {...}, "lead1": {...}, "model_ci": {...}, "lead1_ci": {...}}`: each score record is the JSON of
/// `moe score --json`; the `_ci` objects hold the bootstrap intervals of ROUGE F1 and, where computed, BERTScore F1
/// ("bertscore"), SummaC-ZS and SummaC-Conv.
let testScoresJson (scores: TestScores) : string =
    let ci (r: Metrics.ScoreReport) =
        let o = JsonObject()
        let modelBased =
            [ match r.BertScore with Some b -> "bertscore", b.Estimate.F1 | None -> ()
              match r.SummaC with
              | Some s ->
                  "summac_zs", s.Zs
                  match s.Conv with Some c -> "summac_conv", c | None -> ()
              | None -> () ]
        for name, e in [ "rouge1", r.Rouge1.F1; "rouge2", r.Rouge2.F1; "rougeL", r.RougeL.F1; "rougeLsum", r.RougeLsum.F1 ] @ modelBased do
            let x = JsonObject()
            x["low"] <- JsonValue.Create e.Low
            x["mid"] <- JsonValue.Create e.Mid
            x["high"] <- JsonValue.Create e.High
            o[name] <- x
        o
    let root = JsonObject()
    root["model"] <- JsonNode.Parse(Metrics.Scoring.toJson scores.Model)
    root["lead1"] <- JsonNode.Parse(Metrics.Scoring.toJson scores.Lead1)
    root["model_ci"] <- ci scores.Model
    root["lead1_ci"] <- ci scores.Lead1
    Json.format root

/// A table of the model against lead-1: ROUGE-1/2/L F1 (x100, with the bootstrap interval) and BLEU.
let comparisonTable (scores: TestScores) : string =
    let sb = StringBuilder()
    let f (e: Metrics.Estimate) = sprintf "%5.1f [%4.1f, %4.1f]" (100.0 * e.Mean) (100.0 * e.Low) (100.0 * e.High)
    sb.AppendLine(sprintf "%-8s %-19s %-19s %-19s %6s" "" "ROUGE-1 F1" "ROUGE-2 F1" "ROUGE-L F1" "BLEU") |> ignore
    for name, r in [ "model", scores.Model; "lead-1", scores.Lead1 ] do
        sb.AppendLine(sprintf "%-8s %-19s %-19s %-19s %6.1f" name (f r.Rouge1.F1) (f r.Rouge2.F1) (f r.RougeL.F1) r.Bleu.Score) |> ignore
    sb.AppendLine(sprintf "(n = %d test examples, %.0f%% bootstrap intervals)" scores.Model.N (100.0 * scores.Model.Options.Bootstrap.Confidence)) |> ignore
    // The model's BERTScore and SummaC, or that they were not computed (never a blank that reads as a score).
    for l in Metrics.ModelMetrics.describe scores.Model do sb.AppendLine("model: " + l) |> ignore
    if scores.Model.BertScore.IsNone then sb.AppendLine "BERTScore: not computed (no model configured: Eval.BertScoreModel or --bertscore DIR; or refused on these predictions, as noted above)" |> ignore
    if scores.Model.SummaC.IsNone then sb.AppendLine "SummaC: not computed (no NLI model configured: Eval.SummaCModel or --summac DIR; or refused on these predictions, as noted above)" |> ignore
    sb.ToString()

/// Scores predictions and lead-1 against the references, with the documents for the abstractiveness statistics,
/// and the model's BERTScore and SummaC where `cfg.Eval` names their models; the notes say which model-based
/// metric was not computed and why (not configured, or refused on this input, e.g. an empty prediction).
let scoreWithNotes (cfg: SummarizerConfig) (predictions: string[]) (examples: Example[]) : TestScores * string list =
    let opts =
        { Metrics.Scoring.defaultOptions with
            Stem = cfg.Stem
            Bootstrap = { Metrics.Scoring.defaultOptions.Bootstrap with Samples = cfg.BootstrapSamples } }
    let refs = examples |> Array.map (fun e -> e.Summary)
    let docs = examples |> Array.map (fun e -> e.Document)
    let model, notes =
        Metrics.Scoring.scoreCorpus opts predictions refs (Some docs)
        |> Metrics.ModelMetrics.applyToRun cfg.Eval predictions refs docs
    { Model = model
      Lead1 = Metrics.Scoring.scoreCorpus opts (docs |> Array.map lead1) refs (Some docs) }, notes

/// `scoreWithNotes` without the notes (the printed table still says which model-based metric is missing).
let score (cfg: SummarizerConfig) (predictions: string[]) (examples: Example[]) : TestScores =
    fst (scoreWithNotes cfg predictions examples)

// ---------------------------------------------------------------- expert use by label

/// Per MoE layer, how many token assignments of each label's examples went to each expert.
type LabelCounts =
    { Layer: string
      Labels: string[]
      Experts: int
      /// One row per label, E numbers each.
      Counts: float[][] }

/// Routes the test split (teacher forcing, evaluation mode) in batches of one label at a time and counts
/// each layer's kept assignments per expert: fraction x (1 - dropped) x real tokens x K. Empty when the
/// examples carry no labels or the model has no MoE layers.
let routingByLabel (cfg: SummarizerConfig) (model: EncoderDecoder) (source: ITokenSource) (device: torch.Device) : LabelCounts list =
    let labelled = [| for i in 0 .. source.Count - 1 do match source.Label i with Some l -> (l, i) | None -> () |]
    match cfg.Model.Ffn with
    | Moe moeCfg | LoraMoe (moeCfg, _) when labelled.Length > 0 ->
        let picks = float (RouterConfig.picksPerToken moeCfg.Router)
        let experts = moeCfg.Router.Experts
        let labels = labelled |> Array.map fst |> Array.distinct |> Array.sort
        let table = Dictionary<string, float[][]>()
        let wasTraining = model.training
        model.eval ()
        try
            use _ = torch.no_grad ()
            labels |> Array.iteri (fun li label ->
                let indices = labelled |> Array.filter (fun (l, _) -> l = label) |> Array.map snd
                for chunk in Array.chunkBySize cfg.Batching.BatchSize indices do
                    use _ = torch.NewDisposeScope()
                    let b = Batching.collate cfg.Batching source chunk
                    let on (t: torch.Tensor) = t.``to`` device
                    let out = model.Forward(on b.Source, on b.DecoderInput, on b.SourceMask, on b.TargetMask)
                    let tokens = [| float (Array.sum b.SourceLengths); float (Array.sum b.TargetLengths) |]
                    for r in out.Moe do
                        let rows =
                            match table.TryGetValue r.Layer with
                            | true, rows -> rows
                            | _ ->
                                let rows = Array.init labels.Length (fun _ -> Array.zeroCreate<float> experts)
                                table[r.Layer] <- rows
                                rows
                        let real = if r.Layer.StartsWith "enc" then tokens[0] else tokens[1]
                        let kept = (1.0 - scalar r.Report.Stats.DroppedFraction) * real * picks
                        toFloats r.Report.Stats.TokensPerExpert |> Array.iteri (fun e f -> rows[li][e] <- rows[li][e] + float f * kept))
        finally
            if wasTraining then model.train ()
        [ for name, _ in model.Routers() do
            match table.TryGetValue name with
            | true, rows -> { Layer = name; Labels = labels; Experts = experts; Counts = rows }
            | _ -> () ]
    | _ -> []

/// `{"layers": [{"layer", "labels", "experts", "counts"}]}` as the run folder format defines it.
let routingByLabelJson (counts: LabelCounts list) : string =
    let layers = JsonArray()
    for c in counts do
        let o = JsonObject()
        o["layer"] <- JsonValue.Create c.Layer
        o["labels"] <- Json.toNode c.Labels
        o["experts"] <- JsonValue.Create c.Experts
        o["counts"] <- Json.toNode c.Counts
        layers.Add o
    let root = JsonObject()
    root["layers"] <- layers
    Json.format root

// ---------------------------------------------------------------- the job

/// What a summarization run produced.
type SummaryResult =
    { RunDir: string
      Train: TrainResult
      /// None when training was cancelled (then nothing is decoded).
      Scores: TestScores option
      /// The checkpoint the test predictions were decoded with (best validation, else last).
      Checkpoint: string
      Notes: string list }

/// Writes one line per text (each made one line) atomically.
let writeLines (path: string) (lines: seq<string>) =
    Checkpoint.writeAtomic path (fun fs ->
        use w = new StreamWriter(fs, UTF8Encoding(false), leaveOpen = true)
        for l in lines do w.WriteLine(oneLine l))

/// Writes the text atomically, UTF-8 without a byte-order mark.
let writeText (path: string) (text: string) =
    Checkpoint.writeAtomic path (fun fs ->
        let bytes = UTF8Encoding(false).GetBytes(text)
        fs.Write(bytes, 0, bytes.Length))

/// `runWith` whose freshly built model is first handed to `init` (when given, and not resuming) to set its
/// weights: continuing a trained model (`Checkpoint.loadModel`) or upcycling one (`Upcycle.copyInto`).
let runWithInit (opts: RunOptions) (resume: bool) (init: (EncoderDecoder -> unit) option) (cfg: SummarizerConfig) : SummaryResult =
    orFail "summarizer config" (SummarizerConfig.validate cfg) cfg |> ignore
    let say (text: string) = if opts.Progress <> Silent then (if isNull opts.Output then Console.Out else opts.Output).WriteLine text
    let resume = resume || opts.ResumeFrom.IsSome
    let runDir = Path.Combine(cfg.RunsDir, cfg.Name)
    use _lock = RunFolder.acquire (sprintf "summarizer run %s" cfg.Name) runDir
    // Refused or cleared before the data is read, so a mistaken rerun fails at once.
    if not resume then RunFolder.startFresh opts.Overwrite runDir
    let opts = { opts with Overwrite = false }
    use prepared = prepare cfg
    let cfg = SummarizerConfig.resolve (prepared.Tokenizer :> ITokenizer).VocabSize cfg
    say (sprintf "data: %d train, %d validation, %d test examples; tokenizer %s"
             prepared.Train.Count prepared.Valid.Count prepared.Test.Count (prepared.Tokenizer :> ITokenizer).Name)
    for n in prepared.Notes do say ("  " + n)
    let device = Native.resolveDevice cfg.Train.Device
    let counts =
        match cfg.Model.Ffn with
        | Moe m | LoraMoe (m, _) when m.Router.Selection = Hash BalancedHash -> Some(tokenCounts cfg.Model.VocabSize prepared.Train)
        | _ -> None
    use model = buildModel cfg counts
    match init with
    | Some f when not resume -> f model
    | _ -> ()
    let p = model.ParameterCount()
    say (sprintf "model: %d parameters, %d active per token" p.Total p.Active)
    RunFiles.writeParameters runDir { Total = p.Total; Active = p.Active; Trainable = model.TrainableParameterCount() }
    let t = task cfg prepared model device
    if resume then
        let newest =
            match opts.ResumeFrom, Checkpoint.resumeCandidates runDir with
            | Some path, _ -> path
            | None, (path :: _, _) -> path
            | None, ([], _) -> Checkpoint.last runDir
        let saved = if File.Exists newest then (Checkpoint.readMeta newest).Tokenizer else t.Tokenizer
        if saved <> t.Tokenizer then
            invalidOp (sprintf "cannot resume %s: the tokenizer built from the data now differs from the checkpoint's (the data or tokenizer config changed)" runDir)
    let trained = if resume then Train.Loop.resumeWith opts cfg.Train t runDir else Train.Loop.runWith opts cfg.Train t runDir
    let ckpt = defaultArg trained.BestCheckpoint trained.LastCheckpoint
    if trained.Stop = Cancelled then
        say (sprintf "cancelled: resume with the same config to continue from %s" trained.LastCheckpoint)
        { RunDir = runDir; Train = trained; Scores = None; Checkpoint = trained.LastCheckpoint; Notes = prepared.Notes }
    else
        Checkpoint.loadModel ckpt model
        say (sprintf "decoding %d test documents with %s (%s)" prepared.Test.Count (Path.GetFileName ckpt)
                 (if cfg.Generate.BeamSize = 1 then "greedy" else sprintf "beam %d" cfg.Generate.BeamSize))
        let predictions = summarize cfg model prepared.Tokenizer prepared.Test device
        let examples = prepared.TestExamples
        writeLines (Path.Combine(runDir, "predictions.txt")) predictions
        writeLines (Path.Combine(runDir, "references.txt")) (examples |> Array.map (fun e -> e.Summary))
        writeLines (Path.Combine(runDir, "documents.txt")) (examples |> Array.map (fun e -> e.Document))
        writeLines (Path.Combine(runDir, "ids.txt")) (examples |> Array.map (fun e -> e.Id))
        let scores, notes = scoreWithNotes cfg predictions examples
        for n in notes do say n
        writeText (Path.Combine(runDir, "test_scores.json")) (testScoresJson scores)
        match routingByLabel cfg model prepared.Test device with
        | [] -> ()
        | counts -> writeText (Path.Combine(runDir, "routing_by_label.json")) (routingByLabelJson counts)
        say (comparisonTable scores)
        { RunDir = runDir; Train = trained; Scores = Some scores; Checkpoint = ckpt; Notes = prepared.Notes }

/// Trains (or, with `resume`, continues) the run `cfg.RunsDir/cfg.Name` holding the folder's lock (a folder
/// that already holds a run is refused unless `opts.Overwrite`; see `RunFolder`), decodes the test split with the
/// best-validation checkpoint, and writes predictions.txt, references.txt, documents.txt, ids.txt,
/// test_scores.json (model and lead-1) and routing_by_label.json beside the trainer's files.
let runWith (opts: RunOptions) (resume: bool) (cfg: SummarizerConfig) : SummaryResult = runWithInit opts resume None cfg

/// `runWith` with default options, from scratch.
let run (cfg: SummarizerConfig) : SummaryResult = runWith RunOptions.Defaults false cfg

/// `runWith` with default options, continuing the run's last checkpoint.
let resume (cfg: SummarizerConfig) : SummaryResult = runWith RunOptions.Defaults true cfg

// ---------------------------------------------------------------- a trained run, reopened

/// A trained model with its tokenizer and config, read back from a run folder's checkpoint.
type Loaded =
    { Config: SummarizerConfig
      Model: EncoderDecoder
      Tokenizer: Tokenizer
      Checkpoint: string
      Device: torch.Device }

    interface IDisposable with
        member l.Dispose() = l.Model.Dispose()

/// Rebuilds the model of `runDir` from its checkpoint alone (best validation by default, else last):
/// config and tokenizer come from the checkpoint's meta section; the model computes in the precision it
/// trained in (`Train.Bf16`).
let load (runDir: string) (checkpoint: string option) (device: Native.DeviceChoice) : Loaded =
    let path =
        match checkpoint with
        | Some p -> p
        | None -> if File.Exists(Checkpoint.best runDir) then Checkpoint.best runDir else Checkpoint.last runDir
    let meta = Checkpoint.readMeta path
    let node = meta.Config.DeepClone()
    node["Train"] <- Json.toNode meta.Train
    // Checkpoints written before the `Eval` section existed: their runs computed no model-based metric.
    if isNull node["Eval"] then node["Eval"] <- Json.toNode Metrics.ModelMetrics.defaults
    let cfg =
        match Json.ofNode<SummarizerConfig> node with
        | Ok c -> c
        | Error ps -> invalidOp (sprintf "checkpoint %s does not hold a summarizer config:\n  - %s" path (String.concat "\n  - " ps))
    let tokenizer = tokenizerOfText meta.Tokenizer
    let model = buildModel cfg None
    Checkpoint.loadModel path model
    let dev = Native.resolveDevice device
    model.``to``(dev) |> ignore
    // decode in the precision it was trained in, as the run's own predictions were
    Train.Loop.setPrecision meta.Train model
    model.eval ()
    { Config = cfg; Model = model; Tokenizer = tokenizer; Checkpoint = path; Device = dev }

/// Summarizes documents with a loaded model (`gen` overrides its decoding settings; BOS/EOS stay the tokenizer's).
let summarizeTexts (loaded: Loaded) (gen: GenerateConfig option) (documents: string[]) : string[] =
    let g = match gen with Some g -> { g with BosId = specials.Bos; EosId = specials.Eos } | None -> loaded.Config.Generate
    let cfg = { loaded.Config with Generate = g }
    let examples = documents |> Array.mapi (fun i d -> { Id = string i; Document = d; Summary = ""; Label = None })
    let source = TokenizedSet(loaded.Tokenizer, examples) :> ITokenSource
    summarize cfg loaded.Model loaded.Tokenizer source loaded.Device

/// The summarizer for C#.
type SummarizerApi =
    static member Defaults = SummarizerConfig.defaults
    static member TopK(cfg: SummarizerConfig, experts: int, k: int) = SummarizerConfig.topK experts k cfg
    static member Hash(cfg: SummarizerConfig, experts: int) = SummarizerConfig.hash experts cfg
    static member LoraExperts(cfg: SummarizerConfig, lora: LoraConfig) = SummarizerConfig.loraExperts lora cfg
    static member Run(cfg: SummarizerConfig) = run cfg
    static member Run(cfg: SummarizerConfig, options: RunOptions, resume: bool) = runWith options resume cfg
    /// A fresh run whose built model `init` sets first (loads a checkpoint, upcycles a dense model).
    static member Run(cfg: SummarizerConfig, options: RunOptions, init: Action<EncoderDecoder>) =
        runWithInit options false (if isNull init then None else Some init.Invoke) cfg
    static member Load(runDir: string) = load runDir None Native.Auto
    static member Summarize(loaded: Loaded, documents: string[]) = summarizeTexts loaded None documents
