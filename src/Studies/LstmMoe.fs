/// Gating strategies for an MoE layer between two bidirectional LSTMs (`Recurrent.BiLstmMoe`, the setting of
/// Shazeer et al. 2017) on CoNLL-2003 named-entity recognition and SQuAD 1.1 extractive question answering, with
/// GloVe 6B 50d word vectors: a baseline with one MLP expert and five MoE layers of 8 experts, top-2 (naive top-k,
/// top-k mask, noisy top-k, top-k mask + importance loss, noisy top-k + load loss) per data set. Each run is a run
/// folder of the toolkit's format (config, metrics and routing logs, checkpoints, test scores, predictions), so the
/// report page draws its loss curves and router distributions. Every number in the tables is read from the runs.
/// Axes: B batch, S positions, C tag classes.
module Moe.LstmMoe

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json.Nodes
open TorchSharp
open Plotly.NET
open Moe.Config
open Moe.Recurrent
open Moe.Train
open Moe.Metrics
open Moe.Experiments

// ---------------------------------------------------------------- options

/// What the study reads and how big it runs.
type LstmMoeOptions =
    { Scale: Scale
      /// A folder with the CoNLL-2003 English files eng.train, eng.testa, eng.testb.
      Conll: string
      /// A folder with one SQuAD 1.1 training file (`*train*.json`) and one dev file (`*dev*.json`).
      Squad: string
      /// A GloVe text file, or a folder whose `*.txt` files are all read.
      Glove: string
      /// Runs go to `RunsDir/lstm_moe/<data set>-<model>`.
      RunsDir: string
      ReportsDir: string
      /// Train the GloVe vectors too (`--train-embeddings`); frozen by default.
      TrainEmbeddings: bool
      Verbose: bool
      Screenshot: bool }

module LstmMoeOptions =
    let usage = "arguments: [--smoke | --full] [--verbose] [--train-embeddings] [--conll DIR] [--squad DIR] [--glove FILE_OR_DIR]"

    /// Options from script arguments: `--smoke`, `--full`, `--verbose`, `--train-embeddings`, and `--conll`, `--squad`, `--glove`
    /// paths, which default to the samples in `sharedData` (conll2003-sample, squad-v1.1-sample,
    /// glove-6b-50d-subset). Returns every problem at once, missing data included.
    let parse (sharedData: string) (args: string[]) : Result<LstmMoeOptions, string list> =
        let problems = ResizeArray<string>()
        let paths = Dictionary<string, string>()
        let flags = HashSet<string>()
        let mutable i = 0
        while i < args.Length do
            match args[i] with
            | "--conll" | "--squad" | "--glove" as flag ->
                if i + 1 < args.Length && not (args[i + 1].StartsWith "--") then
                    paths[flag] <- args[i + 1]
                    i <- i + 1
                else problems.Add(sprintf "%s needs a path (%s)" flag usage)
            | "--smoke" | "--full" | "--verbose" | "--train-embeddings" as flag -> flags.Add flag |> ignore
            | other -> problems.Add(sprintf "unknown argument %s (%s)" other usage)
            i <- i + 1
        if flags.Contains "--smoke" && flags.Contains "--full" then problems.Add "--smoke and --full exclude each other"
        let path (flag: string) (sample: string) (isFile: bool) =
            let p = match paths.TryGetValue flag with | true, p -> p | _ -> Path.Combine(sharedData, sample)
            if not (Directory.Exists p || (isFile && File.Exists p)) then
                problems.Add(sprintf "%s %s does not exist (give the data with %s)" (flag.TrimStart '-') p flag)
            p
        let conll = path "--conll" "conll2003-sample" false
        let squad = path "--squad" "squad-v1.1-sample" false
        let glove = path "--glove" "glove-6b-50d-subset" true
        if problems.Count > 0 then Error(List.ofSeq problems)
        else
            Ok { Scale = (if flags.Contains "--smoke" then Smoke elif flags.Contains "--full" then Full else Quick)
                 Conll = conll; Squad = squad; Glove = glove
                 RunsDir = "runs"; ReportsDir = "reports"; Verbose = flags.Contains "--verbose"; Screenshot = true
                 TrainEmbeddings = flags.Contains "--train-embeddings" }

    /// `parse`, raising one ArgumentException that lists every problem.
    let parseOrFail (sharedData: string) (args: string[]) : LstmMoeOptions =
        match parse sharedData args with
        | Ok o -> o
        | Error ps -> invalidArg "args" (sprintf "bad script arguments:\n  - %s" (String.concat "\n  - " ps))

// ---------------------------------------------------------------- scale presets

/// Training and data sizes of one data set at one scale.
type Settings =
    { Steps: int
      BatchSize: int
      LearningRate: float
      WarmupSteps: int
      LogEvery: int
      EvalEvery: int
      /// Caps on the examples read per split (None = all).
      MaxTrain: int option
      MaxEval: int option
      /// Context tokens kept in the QA layout (the rest is cut; answers there cannot be trained on).
      MaxContext: int
      MaxQuestion: int
      /// Longest answer the span decoding may return, in tokens.
      MaxAnswer: int }

/// Quick (minutes on 2 CPU cores): 200 steps of batch 32 on CoNLL (3 epochs of the 2000-sentence sample), 120
/// steps of batch 24 on SQuAD (2 epochs of the sample's training articles, contexts cut at 100 tokens); full:
/// 20 epochs of CoNLL-2003 (14041 sentences) and 10 of SQuAD's 87599 questions with 400 context tokens.
let settings (scale: Scale) (task: string) : Settings =
    let baseline =
        { Steps = 200; BatchSize = 32; LearningRate = 2e-3; WarmupSteps = 20; LogEvery = 10; EvalEvery = 50
          MaxTrain = None; MaxEval = None; MaxContext = 100; MaxQuestion = 30; MaxAnswer = 15 }
    match scale, task with
    | Smoke, _ -> { baseline with Steps = 3; BatchSize = 8; WarmupSteps = 1; LogEvery = 1; EvalEvery = 3; MaxTrain = Some 24; MaxEval = Some 8; MaxContext = 60 }
    | Quick, "squad" -> { baseline with Steps = 120; BatchSize = 24; EvalEvery = 40; MaxContext = 100 }
    | Quick, _ -> baseline
    | Full, "squad" -> { baseline with Steps = 27000; LearningRate = 1e-3; WarmupSteps = 500; LogEvery = 50; EvalEvery = 1000; MaxContext = 400 }
    | Full, _ -> { baseline with Steps = 8800; LearningRate = 1e-3; WarmupSteps = 200; LogEvery = 20; EvalEvery = 440 }

// ---------------------------------------------------------------- the six models

/// Experts and picks of the MoE layers (the issue's 8 experts, k = 2), and each expert's hidden width.
let expertCount, picks, expertHidden = 8, 2, 128
/// LSTM width per direction.
let lstmHidden = 128
/// Dropout after the expert layer.
let expertDropout = 0.5
/// Shazeer et al. 2017 use w_importance = w_load = 0.1.
let shazeerWeight = 0.1

/// A model of the study: its name, what sits between the LSTMs and the balancing-loss weights.
type Variant = { Name: string; Middle: Middle; Losses: LossWeights }

/// The six models, mapped onto the toolkit's routers and losses (`Routing.route`, `Routing.auxLosses`):
/// baseline = one MLP expert (`DenseFfn`); naive top-k = TokenChoiceTopK(NormaliseThenTopK, renormalise =
/// false) (softmax over all 8, the two largest kept with their raw probabilities); top-k mask = the same with
/// renormalise = true (the two kept weights rescaled to sum to 1); noisy top-k = NoisyTopK (Shazeer et al. 2017
/// eq. 3-5: trainable softplus noise, top-k of the noisy logits, softmax over the k); + importance = the
/// importance loss (eq. 6-7) at 0.1; + load = the load loss (eq. 8-10) at 0.1. No other balancing or z-loss.
let variants : Variant list =
    let moe (selection: Selection) =
        Experts
            { MoeConfig.defaults with
                ModelDim = 2 * lstmHidden
                ExpertHidden = expertHidden
                Activation = ReLU
                Router = { RouterConfig.defaults with Experts = expertCount; K = picks; Selection = selection; Capacity = Dropless } }
    let naive, mask = TokenChoiceTopK(NormaliseThenTopK, false), TokenChoiceTopK(NormaliseThenTopK, true)
    let none = LossWeights.none
    [ { Name = "baseline"; Middle = SingleExpert; Losses = none }
      { Name = "naive-topk"; Middle = moe naive; Losses = none }
      { Name = "topk-mask"; Middle = moe mask; Losses = none }
      { Name = "noisy-topk"; Middle = moe NoisyTopK; Losses = none }
      { Name = "topk-mask+importance"; Middle = moe mask; Losses = { none with Importance = shazeerWeight } }
      { Name = "noisy-topk+load"; Middle = moe NoisyTopK; Losses = { none with Load = shazeerWeight } } ]

/// The router and loss of a variant in words (the tables' columns).
let describeVariant (v: Variant) : string * string =
    let router =
        match v.Middle with
        | SingleExpert -> "one MLP expert"
        | Experts m ->
            match m.Router.Selection with
            | TokenChoiceTopK(_, false) -> sprintf "top-%d of %d, raw weights" m.Router.K m.Router.Experts
            | TokenChoiceTopK(_, true) -> sprintf "top-%d of %d, renormalised" m.Router.K m.Router.Experts
            | NoisyTopK -> sprintf "noisy top-%d of %d" m.Router.K m.Router.Experts
            | other -> sprintf "%A" other
    let loss =
        if v.Losses.Importance > 0.0 then sprintf "importance x %g" v.Losses.Importance
        elif v.Losses.Load > 0.0 then sprintf "load x %g" v.Losses.Load
        else "none"
    router, loss

// ---------------------------------------------------------------- batches and tensors

/// Padded ids [B; S] int64 of rows of ids, and the rows' lengths.
let padIds (device: torch.Device) (rows: int64[][]) : torch.Tensor * int64[] =
    let s = rows |> Array.map (fun r -> r.Length) |> Array.max
    let flat = Array.create (rows.Length * s) (int64 Glove.padId)
    rows |> Array.iteri (fun i r -> Array.blit r 0 flat (i * s) r.Length)
    torch.tensor(flat, device = device).reshape(int64 rows.Length, int64 s), rows |> Array.map (fun r -> int64 r.Length)

/// Batches of example indices: a seeded shuffle per epoch (training) or in order.
let private batchesOf (size: int) (order: int[]) : seq<int[]> = order |> Array.chunkBySize size |> Seq.ofArray

let private shuffled (seed: int) (epoch: int) (n: int) : int[] =
    // HashCode.Combine is salted per process; this seed repeats across runs.
    let rng = Random(seed * 1000003 + epoch)
    let a = Array.init n id
    rng.Shuffle a
    a

let private deviceOf (m: torch.nn.Module) = (m.parameters () |> Seq.head).device

// ---------------------------------------------------------------- NER

/// A CoNLL split as model inputs.
type NerSet =
    { Sentences: Conll.Sentence[]
      Ids: int64[][]
      Tags: int64[][] }

/// Ignore index of the tag loss: never a tag id.
let private ignoreTag = -100L

let private nerSet (vocab: Glove.Vocabulary) (tagIndex: Dictionary<string, int>) (sentences: Conll.Sentence[]) : NerSet =
    { Sentences = sentences
      Ids = sentences |> Array.map (fun s -> s.Words |> Array.map (Glove.idOf vocab >> int64))
      Tags = sentences |> Array.map (fun s -> s.Tags |> Array.map (fun t -> int64 tagIndex[t])) }

/// The tag logits and targets of a batch: logits [B; S; C], targets [B; S] (ignore index at padding).
let private nerForward (model: BiLstmMoe) (set: NerSet) (batch: int[]) =
    let device = deviceOf model
    let ids, lengths = padIds device (batch |> Array.map (fun i -> set.Ids[i]))
    let targets, _ = padIds device (batch |> Array.map (fun i -> set.Tags[i]))
    let valid = (Tensors.arange 0L ids.shape[1] torch.int64 device).unsqueeze(0L).lt (torch.tensor(lengths, device = device).unsqueeze 1L)
    let targets = Tensors.withInt64Scalar ignoreTag (fun v -> targets.masked_fill (valid.logical_not (), v))
    model.forward (ids, lengths), targets

/// Predicted tags of every sentence of a set (evaluation mode, no gradient).
let private nerPredict (model: BiLstmMoe) (tags: string[]) (batchSize: int) (set: NerSet) : string[][] =
    model.eval ()
    use _ = torch.no_grad ()
    [| for batch in batchesOf batchSize (Array.init set.Ids.Length id) do
         use _ = torch.NewDisposeScope()
         let out, _ = nerForward model set batch
         let best = out.Logits.argmax(-1L).cpu () // [B; S]
         for j, i in Array.indexed batch do
             let row = Tensors.toInt64s (best[int64 j])
             yield Array.init set.Ids[i].Length (fun p -> tags[int row[p]]) |]

// ---------------------------------------------------------------- QA

/// A SQuAD question as model input: context tokens (cut to MaxContext), the separator, question tokens.
type QaExample =
    { Question: Squad.Question
      Ids: int64[]
      /// Context tokens kept; positions 0 .. ContextLength - 1 of Ids.
      ContextLength: int
      /// The first gold answer's token span when it aligns and lies within the kept context.
      Target: (int * int) option }

/// A SQuAD split as model inputs, with what could not be trained on.
type QaSet =
    { Examples: QaExample[]
      /// Questions with an aligned answer cut off with the context.
      Truncated: int }

let private qaSet (vocab: Glove.Vocabulary) (s: Settings) (questions: Squad.Question[]) : QaSet =
    let ids (tokens: Squad.Token[]) (n: int) = tokens |> Array.truncate n |> Array.map (fun t -> int64 (Glove.idOf vocab t.Text))
    let examples =
        questions |> Array.map (fun q ->
            let context = ids q.ContextTokens s.MaxContext
            let target = q.Answers |> Array.tryPick (fun a -> a.Tokens |> Option.filter (fun (_, e) -> e < context.Length))
            { Question = q
              Ids = Array.concat [ context; [| int64 Glove.separatorId |]; ids q.QuestionTokens s.MaxQuestion ]
              ContextLength = context.Length
              Target = target })
    let truncated =
        examples |> Array.filter (fun e -> e.Target.IsNone && e.Question.Answers |> Array.exists (fun a -> a.Tokens.IsSome)) |> Array.length
    { Examples = examples; Truncated = truncated }

/// Start and end logits [B; S] with positions outside each row's context masked, and the row contexts [B; S].
let private qaForward (model: BiLstmMoe) (set: QaSet) (batch: int[]) =
    let device = deviceOf model
    let rows = batch |> Array.map (fun i -> set.Examples[i])
    let ids, lengths = padIds device (rows |> Array.map (fun e -> e.Ids))
    let contexts = torch.tensor(rows |> Array.map (fun e -> int64 e.ContextLength), device = device)
    let allowed = (Tensors.arange 0L ids.shape[1] torch.int64 device).unsqueeze(0L).lt (contexts.unsqueeze 1L) // [B; S]
    let out = model.forward (ids, lengths)
    let startLogits = maskSpanLogits allowed (out.Logits.select (2L, 0L)) // [B; S]
    let endLogits = maskSpanLogits allowed (out.Logits.select (2L, 1L)) // [B; S]
    out, startLogits, endLogits, allowed, rows

/// The predicted answer text of every question of a set.
let private qaPredict (model: BiLstmMoe) (s: Settings) (set: QaSet) : string[] =
    model.eval ()
    use _ = torch.no_grad ()
    [| for batch in batchesOf s.BatchSize (Array.init set.Examples.Length id) do
         use _ = torch.NewDisposeScope()
         let _, startLogits, endLogits, allowed, rows = qaForward model set batch
         let spans = bestSpans s.MaxAnswer startLogits endLogits allowed
         for e, (first, last) in Array.zip rows spans do
             yield Squad.spanText e.Question.Context e.Question.ContextTokens first last |]

// ---------------------------------------------------------------- runs

/// What one run produced, for the tables.
type RunOutcome =
    { Variant: Variant
      RunDir: string
      /// Named scores (fractions), as written to test_scores.json.
      Scores: (string * float) list
      ValidScores: (string * float) list
      BestValidLoss: float
      LoadCv: float
      Seconds: float }

let private writeScores (path: string) (n: int) (scores: (string * float) list) =
    let model = JsonObject()
    model["n"] <- JsonValue.Create n
    for k, v in scores do model[k] <- JsonValue.Create v
    let root = JsonObject()
    root["model"] <- model
    File.WriteAllText(path, Json.format root, UTF8Encoding(false))

let private writeLines (path: string) (lines: string seq) = File.WriteAllLines(path, lines, UTF8Encoding(false))

/// Trains one variant with the toolkit's loop (`Train.runWith`), reloads its best-validation checkpoint and
/// evaluates it with `evaluate`, which writes the run's test scores and texts and returns (test, valid) scores.
let private trainRun (opts: LstmMoeOptions) (s: Settings) (runDir: string) (modelCfg: RecurrentConfig) (vectors: float32[][])
                     (variant: Variant) (trainBatches: int -> int -> seq<int[]>) (validBatches: unit -> seq<int[]>)
                     (loss: BiLstmMoe -> Phase -> int[] -> LossParts) (dataCfg: obj)
                     (evaluate: BiLstmMoe -> (string * float) list * (string * float) list) : RunOutcome =
    Native.seedAll 17
    let model = new BiLstmMoe("model", { modelCfg with Middle = variant.Middle })
    model.SetEmbeddings vectors
    let train =
        { TrainConfig.defaults with
            Steps = s.Steps; BatchSize = s.BatchSize; LearningRate = s.LearningRate; WarmupSteps = s.WarmupSteps
            WeightDecay = 0.0; GradClip = 5.0; LossWeights = variant.Losses; LogEvery = s.LogEvery; EvalEvery = s.EvalEvery
            CheckpointEvery = s.Steps }
    let task =
        { Model = model
          TrainBatches = trainBatches
          ValidBatches = validBatches
          Loss = loss model
          Config = [ "model", box { modelCfg with Middle = variant.Middle }; "data", dataCfg ]
          Tokenizer = "" }
    Directory.CreateDirectory runDir |> ignore
    RunFiles.writeParameters runDir { Total = Models.parameterCount model; Active = model.ActiveParameters; Trainable = Models.trainableParameterCount model }
    let progress = if opts.Verbose then Lines else Silent
    let result = Loop.runWith { RunOptions.Defaults with Progress = progress } train task runDir
    result.BestCheckpoint |> Option.iter (fun path -> Checkpoint.loadModel path model)
    let test, valid = evaluate model
    let run = RunLog.load runDir
    let outcome =
        { Variant = variant
          RunDir = runDir
          Scores = test
          ValidScores = valid
          BestValidLoss = defaultArg result.BestValidLoss nan
          LoadCv = defaultArg (Report.meanFinalLoadCv run.Routing) nan
          Seconds = result.ElapsedSeconds }
    model.Dispose()
    outcome

let private runVariants (opts: LstmMoeOptions) (dataset: string) (trainOne: int -> Variant -> string -> RunOutcome) : RunOutcome list =
    let n = variants.Length
    variants |> List.mapi (fun i v ->
        let name = sprintf "%s-%s" dataset v.Name
        printfn "[%d/%d] %s ..." (i + 1) n name
        let r = trainOne i v (Path.Combine(opts.RunsDir, "lstm_moe", name))
        printfn "[%d/%d] %s: %s in %.0f s" (i + 1) n name
            (String.Join(", ", r.Scores |> List.map (fun (k, v) -> sprintf "%s %.1f" k (100.0 * v)))) r.Seconds
        r)

/// Where the data of each run came from (config.json's "data" section).
type DataSection = { Train: string; Valid: string; Test: string; Glove: string; VocabSize: int; MaxContext: int }

/// A data path as the tables show it: its last two parts (`conll2003-sample/eng.train`), so that tables written
/// on one machine read the same on another.
let private shown (path: string) : string =
    let full = Path.TrimEndingDirectorySeparator(Path.GetFullPath path)
    let parent = Path.GetFileName(Path.GetDirectoryName full)
    if String.IsNullOrEmpty parent then Path.GetFileName full else parent + "/" + Path.GetFileName full

/// The NER half: reads CoNLL (eng.train / eng.testa / eng.testb), builds the GloVe vocabulary over all three
/// splits, trains the six models and returns their outcomes and notes on the data.
let private conllRuns (opts: LstmMoeOptions) : RunOutcome list * string list =
    let s = settings opts.Scale "conll"
    let trainPath, validPath, testPath = Conll.splitFiles opts.Conll
    let read path cap =
        let f = Conll.read Conll.ConllConfig.defaults path
        f, (match cap with Some n -> Array.truncate n f.Sentences | None -> f.Sentences)
    let trainFile, train = read trainPath s.MaxTrain
    let validFile, valid = read validPath s.MaxEval
    let testFile, test = read testPath s.MaxEval
    let all = Array.concat [ train; valid; test ]
    let vocab = Glove.vocabulary true (Glove.files opts.Glove) (all |> Seq.collect (fun x -> x.Words))
    let tags = Array.append [| Conll.outside |] (all |> Array.collect (fun x -> x.Tags) |> Array.distinct |> Array.filter ((<>) Conll.outside) |> Array.sort)
    let tagIndex = Dictionary<string, int>()
    tags |> Array.iteri (fun i t -> tagIndex[t] <- i)
    let trainSet, validSet, testSet = nerSet vocab tagIndex train, nerSet vocab tagIndex valid, nerSet vocab tagIndex test
    let modelCfg =
        { RecurrentConfig.defaults with
            VocabSize = vocab.Words.Length; EmbeddingDim = vocab.Vectors[0].Length; SpecialTokens = Glove.specialTokens.Length
            Hidden = lstmHidden; ExpertHidden = expertHidden; ExpertDropout = expertDropout; Head = TokenClassification tags.Length
            FreezeEmbeddings = not opts.TrainEmbeddings }
    let data = { Train = trainPath; Valid = validPath; Test = testPath; Glove = opts.Glove; VocabSize = vocab.Words.Length; MaxContext = 0 }
    let loss (model: BiLstmMoe) (phase: Phase) (batch: int[]) =
        let set = if phase = Training then trainSet else validSet
        let out, targets = nerForward model set batch
        let l = crossEntropy 0.0 ignoreTag out.Logits targets
        { TaskLoss = l.Loss; Moe = out.Moe; Tokens = l.Tokens }
    let scores (predicted: string[][]) (set: NerSet) =
        let r = Tagging.nerScores (Array.zip (set.Sentences |> Array.map (fun x -> x.Tags)) predicted)
        [ "token_accuracy", r.TokenAccuracy; "entity_precision", r.Overall.Precision; "entity_recall", r.Overall.Recall; "entity_f1", r.Overall.F1 ]
    let trainOne (_: int) (v: Variant) (runDir: string) =
        let evaluate (model: BiLstmMoe) =
            let testPred = nerPredict model tags s.BatchSize testSet
            let validPred = nerPredict model tags s.BatchSize validSet
            let testScores = scores testPred testSet
            writeScores (Path.Combine(runDir, RunLog.FileNames.testScores)) test.Length testScores
            writeLines (Path.Combine(runDir, RunLog.FileNames.documents)) (test |> Array.map (fun x -> String.Join(" ", x.Words)))
            writeLines (Path.Combine(runDir, RunLog.FileNames.references)) (test |> Array.map (fun x -> String.Join(" ", x.Tags)))
            writeLines (Path.Combine(runDir, RunLog.FileNames.predictions)) (testPred |> Array.map (fun p -> String.Join(" ", p)))
            testScores, scores validPred validSet
        trainRun opts s runDir modelCfg vocab.Vectors v
            (fun seed epoch -> batchesOf s.BatchSize (shuffled seed epoch train.Length))
            (fun () -> batchesOf s.BatchSize (Array.init valid.Length id))
            loss (box data) evaluate
    let notes =
        [ sprintf "CoNLL-2003: train %d sentences (%s), valid %d (%s), test %d (%s); %d tags (IOB1 read and converted to IOB2: %d tags changed); entities scored with conlleval's chunk rules."
              train.Length (shown trainPath) valid.Length (shown validPath) test.Length (shown testPath) tags.Length (trainFile.ConvertedTags + validFile.ConvertedTags + testFile.ConvertedTags)
          sprintf "GloVe (%s, %s): %d of %d lower-cased word types have a vector (%.1f%% of tokens); the rest share the learned unknown vector."
              (shown opts.Glove) (if opts.TrainEmbeddings then "trained" else "frozen") vocab.CoveredTypes vocab.Types (100.0 * float vocab.CoveredTokens / float (max 1L vocab.Tokens)) ]
    runVariants opts "conll" trainOne, notes

/// The SQuAD file of a folder whose name contains `part` (train or dev).
let private squadFile (dir: string) (part: string) : string =
    match Directory.GetFiles(dir, sprintf "*%s*.json" part) |> Array.sort with
    | [| f |] -> f
    | [||] -> invalidArg "dir" (sprintf "expected one SQuAD 1.1 %s file (*%s*.json) in %s, found none" part part dir)
    | fs -> invalidArg "dir" (sprintf "expected one SQuAD 1.1 %s file (*%s*.json) in %s, found %d: %s" part part dir fs.Length (String.Join(", ", fs)))

/// The QA half: training articles minus the last tenth (validation, for the loss and checkpoint choice), the dev
/// file as the test set (SQuAD's test set is hidden); vocabulary over all three; the six models.
let private squadRuns (opts: LstmMoeOptions) : RunOutcome list * string list =
    let s = settings opts.Scale "squad"
    let trainPath, devPath = squadFile opts.Squad "train", squadFile opts.Squad "dev"
    let trainFile, devFile = Squad.read trainPath, Squad.read devPath
    let titles = trainFile.Questions |> Array.map (fun q -> q.Title) |> Array.distinct
    let validTitles = set titles[titles.Length - max 1 (titles.Length / 10) ..]
    if validTitles.Count = titles.Length then
        invalidArg "opts" (sprintf "expected at least two articles in %s (one or more for training, the last tenth for validation), got %d" trainPath titles.Length)
    let cap (n: int option) (xs: Squad.Question[]) = match n with Some n -> Array.truncate n xs | None -> xs
    let train = trainFile.Questions |> Array.filter (fun q -> not (validTitles.Contains q.Title)) |> cap s.MaxTrain
    let valid = trainFile.Questions |> Array.filter (fun q -> validTitles.Contains q.Title) |> cap s.MaxEval
    let test = devFile.Questions |> cap s.MaxEval
    let words (q: Squad.Question) = Seq.append q.ContextTokens q.QuestionTokens |> Seq.map (fun t -> t.Text)
    let vocab = Glove.vocabulary true (Glove.files opts.Glove) (Seq.concat [ train; valid; test ] |> Seq.collect words)
    let trainSet, validSet, testSet = qaSet vocab s train, qaSet vocab s valid, qaSet vocab s test
    let trainable = trainSet.Examples |> Array.indexed |> Array.filter (fun (_, e) -> e.Target.IsSome) |> Array.map fst
    let validable = validSet.Examples |> Array.indexed |> Array.filter (fun (_, e) -> e.Target.IsSome) |> Array.map fst
    if trainable.Length = 0 then invalidArg "opts" (sprintf "no training question of %s has an answer that aligns within the first %d context tokens" trainPath s.MaxContext)
    let modelCfg =
        { RecurrentConfig.defaults with
            VocabSize = vocab.Words.Length; EmbeddingDim = vocab.Vectors[0].Length; SpecialTokens = Glove.specialTokens.Length
            Hidden = lstmHidden; ExpertHidden = expertHidden; ExpertDropout = expertDropout; Head = SpanExtraction
            FreezeEmbeddings = not opts.TrainEmbeddings }
    let data = { Train = trainPath; Valid = trainPath + " (last articles)"; Test = devPath; Glove = opts.Glove; VocabSize = vocab.Words.Length; MaxContext = s.MaxContext }
    let loss (model: BiLstmMoe) (phase: Phase) (batch: int[]) =
        let set = if phase = Training then trainSet else validSet
        let out, startLogits, endLogits, _, rows = qaForward model set batch
        let device = startLogits.device
        let target (pick: int * int -> int) = torch.tensor(rows |> Array.map (fun e -> int64 (pick e.Target.Value)), device = device)
        let startLoss = crossEntropy 0.0 ignoreTag startLogits (target fst)
        let endLoss = crossEntropy 0.0 ignoreTag endLogits (target snd)
        { TaskLoss = Tensors.mulScalar 0.5 (Tensors.plus startLoss.Loss endLoss.Loss); Moe = out.Moe; Tokens = startLoss.Tokens }
    let trainOne (_: int) (v: Variant) (runDir: string) =
        let evaluate (model: BiLstmMoe) =
            let golds (set: QaSet) = set.Examples |> Array.map (fun e -> e.Question.Answers |> Array.map (fun a -> a.Text))
            let score (set: QaSet) (predicted: string[]) =
                let r = Tagging.squadScores (Array.zip predicted (golds set))
                [ "exact_match", r.ExactMatch; "f1", r.F1 ]
            let testPred = qaPredict model s testSet
            let testScores = score testSet testPred
            writeScores (Path.Combine(runDir, RunLog.FileNames.testScores)) test.Length testScores
            writeLines (Path.Combine(runDir, RunLog.FileNames.documents)) (test |> Array.map (fun q -> q.Question + " | " + q.Context))
            writeLines (Path.Combine(runDir, RunLog.FileNames.references)) (golds testSet |> Array.map (fun g -> String.Join(" || ", g)))
            writeLines (Path.Combine(runDir, RunLog.FileNames.predictions)) testPred
            testScores, score validSet (qaPredict model s validSet)
        trainRun opts s runDir modelCfg vocab.Vectors v
            (fun seed epoch -> shuffled seed epoch trainable.Length |> Array.map (fun i -> trainable[i]) |> batchesOf s.BatchSize)
            (fun () -> batchesOf s.BatchSize validable)
            loss (box data) evaluate
    let notes =
        [ sprintf "SQuAD 1.1: train %d questions (%s without its last %d article(s)), valid %d (those articles), test %d (%s, %d gold answers)."
              train.Length (shown trainPath) validTitles.Count valid.Length test.Length (shown devPath) (test |> Array.sumBy (fun q -> q.Answers.Length))
          sprintf "Layout: context (first %d tokens) <sep> question (first %d tokens); start/end logits over the context, best span with end >= start within %d tokens."
              s.MaxContext s.MaxQuestion s.MaxAnswer
          sprintf "Answers that do not align with the tokens (an end inside a token): %d of %d in %s, %d of %d in %s; questions trained on: %d of %d (the rest have no aligned answer, or it lies past the first %d context tokens: %d)."
              trainFile.Misaligned trainFile.AnswerCount (shown trainPath) devFile.Misaligned devFile.AnswerCount (shown devPath)
              trainable.Length train.Length s.MaxContext trainSet.Truncated
          sprintf "Every test question is scored (SQuAD's official normalisation, max over gold answers), aligned or not; %d have their first aligned answer cut off with the context."
              testSet.Truncated
          sprintf "GloVe (%s): %d of %d lower-cased word types have a vector (%.1f%% of tokens)."
              (shown opts.Glove) vocab.CoveredTypes vocab.Types (100.0 * float vocab.CoveredTokens / float (max 1L vocab.Tokens)) ]
    runVariants opts "squad" trainOne, notes

// ---------------------------------------------------------------- the study

let private score (key: string) (scores: (string * float) list) =
    match List.tryFind (fst >> (=) key) scores with
    | Some (_, v) -> v
    | None -> invalidOp (sprintf "expected a %s score, got %A" key (List.map fst scores))

/// The six models on CoNLL-2003 NER and on SQuAD 1.1: tables (token accuracy and conlleval entity P/R/F1;
/// exact match and F1), the report page of the twelve runs (loss curves, router distributions, expert usage),
/// and a figure of quality and load balance per model.
let run (opts: LstmMoeOptions) : ExperimentResult =
    let experiment = "lstm_moe"
    let ner, nerNotes = conllRuns opts
    let qa, qaNotes = squadRuns opts
    let columns (r: RunOutcome) = let router, loss = describeVariant r.Variant in [| r.Variant.Name; router; loss |]
    let pct = Table.pct
    let nerTable =
        { Title = sprintf "CoNLL-2003 NER: BiLSTM + expert layer (%d experts, k = %d) (%A)" expertCount picks opts.Scale
          Columns = [| "model"; "router"; "aux loss"; "valid token acc"; "valid entity F1"; "test token acc"; "test entity P"; "test entity R"; "test entity F1"; "best valid loss"; "load CV"; "train s" |]
          Rows =
            [| for r in ner ->
                Array.append (columns r)
                    [| pct (score "token_accuracy" r.ValidScores); pct (score "entity_f1" r.ValidScores)
                       pct (score "token_accuracy" r.Scores); pct (score "entity_precision" r.Scores)
                       pct (score "entity_recall" r.Scores); pct (score "entity_f1" r.Scores)
                       Table.num 3 r.BestValidLoss; Table.num 3 r.LoadCv; Table.num 0 r.Seconds |] |] }
    let qaTable =
        { Title = sprintf "SQuAD 1.1 extractive QA: BiLSTM + expert layer (%d experts, k = %d) (%A)" expertCount picks opts.Scale
          Columns = [| "model"; "router"; "aux loss"; "valid EM"; "valid F1"; "dev EM"; "dev F1"; "best valid loss"; "load CV"; "train s" |]
          Rows =
            [| for r in qa ->
                Array.append (columns r)
                    [| pct (score "exact_match" r.ValidScores); pct (score "f1" r.ValidScores)
                       pct (score "exact_match" r.Scores); pct (score "f1" r.Scores)
                       Table.num 3 r.BestValidLoss; Table.num 3 r.LoadCv; Table.num 0 r.Seconds |] |] }
    let notes =
        nerNotes @ qaNotes
        @ [ "Scores x 100 from the best-validation checkpoint. Load CV: std/mean of the share of tokens per expert at the last logged step (0 = balanced); n/a for the single expert."
            "Models: baseline = one MLP expert; naive top-k = softmax over the 8 experts, the top 2 kept with their raw probabilities (TokenChoiceTopK(NormaliseThenTopK, false)); top-k mask = the same renormalised over the 2 (TokenChoiceTopK(NormaliseThenTopK, true)); noisy top-k = Shazeer et al. 2017 eq. 3-5 (NoisyTopK); importance and load losses = Shazeer et al. eq. 6-7 and 8-10, weight 0.1. Padding never reaches the router." ]
    let names = variants |> List.map (fun v -> v.Name) |> List.toArray
    let values (runs: RunOutcome list) (f: RunOutcome -> float) = runs |> List.map f |> List.toArray
    let panel (title: string) (runs: RunOutcome list) (f: RunOutcome -> float) (show: float -> string) =
        let v = values runs f
        { Plots.Title = title; Plots.Values = v; Plots.Text = v |> Array.map show }
    let figure =
        Plots.barPanels "BiLSTM + MoE: quality and load balance per gating strategy"
            names
            [ panel "CoNLL-2003 test entity F1 × 100" ner (fun r -> 100.0 * score "entity_f1" r.Scores) (Table.num 1)
              panel "SQuAD dev F1 × 100" qa (fun r -> 100.0 * score "f1" r.Scores) (Table.num 1)
              panel "CoNLL load CV (0 = balanced)" ner (fun r -> r.LoadCv) (Table.num 3)
              panel "SQuAD load CV (0 = balanced)" qa (fun r -> r.LoadCv) (Table.num 3) ]
    let experimentOpts =
        { ExperimentOptions.defaults with
            Scale = opts.Scale
            DataPath = Some(sprintf "CoNLL %s, SQuAD %s, GloVe %s" (shown opts.Conll) (shown opts.Squad) (shown opts.Glove))
            RunsDir = opts.RunsDir; ReportsDir = opts.ReportsDir; Verbose = opts.Verbose; Screenshot = opts.Screenshot }
    finish experimentOpts experiment "BiLSTM + MoE on named-entity recognition and extractive question answering" notes
        [ nerTable; qaTable ] ((ner @ qa) |> List.map (fun r -> r.RunDir)) figure
