/// Pretrained baselines: a Hugging Face encoder-decoder checkpoint folder (BART, Pegasus, T5, ...) summarizing a
/// data set zero-shot into a run folder laid out as the main job's (predictions, references, documents, ids,
/// test_scores.json with the same score record), so `moe report` compares it with the from-scratch runs; and
/// generation over documents or source ids for `moe generate --model`.
/// Axes: B batch (rows decoded together), S source positions.
module Moe.Baseline

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Moe.Config
open Moe.Data
open Moe.Generate
open Moe.Train

// ---------------------------------------------------------------- a checkpoint folder for generation

/// A checkpoint folder opened for generation.
type Pretrained =
    { Seq2Seq: HfSeq2Seq.HfSeq2Seq
      /// The folder's tokenizer; None when it has no tokenizer files (then only ids go in and out).
      Tokenizer: HfTokenizer.HfTokenizer option
      /// The folder's generation config with the task's settings and the overrides applied.
      Generation: GenerationConfig
      /// Put before every document (T5's "summarize: " from task_specific_params); "" for none.
      SourcePrefix: string
      /// Longest source in tokens, special tokens included: the smaller of the model's
      /// max_position_embeddings and the tokenizer's model_max_length (None when neither says).
      MaxSourceTokens: int option }

    interface IDisposable with
        member p.Dispose() =
            (p.Seq2Seq :> IDisposable).Dispose()
            p.Tokenizer |> Option.iter (fun t -> (t :> IDisposable).Dispose())

/// Whether `dir` holds tokenizer files `HfTokenizer.fromFolder` reads.
let hasTokenizer (dir: string) : bool =
    let has (name: string) = File.Exists(Path.Combine(dir, name))
    has "tokenizer.json" || (has "vocab.json" && has "merges.txt") || has "spiece.model"

/// config.json's `max_position_embeddings` (BART, Pegasus); None for relative positions (T5).
let private maxPositions (dir: string) : int option =
    let path = Path.Combine(dir, "config.json")
    use doc = JsonDocument.Parse(File.ReadAllText path)
    match doc.RootElement.TryGetProperty "max_position_embeddings" with
    | true, v when v.ValueKind = JsonValueKind.Number -> Some(v.GetInt32())
    | _ -> None

/// Whether config.json has `task_specific_params[task]`.
let private hasTaskParams (dir: string) (task: string) : bool =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
    match doc.RootElement.TryGetProperty "task_specific_params" with
    | true, ps when ps.ValueKind = JsonValueKind.Object -> fst (ps.TryGetProperty task)
    | _ -> false

/// Opens the checkpoint in `dir` for generation: the model (`HfSeq2Seq.load`), its tokenizer checked against
/// the model's vocabulary, and its generation config (`GenerationConfig.load`), then, when `task` is given and
/// config.json has `task_specific_params[task]`, that task's settings and prefix as transformers' pipelines
/// apply them, then `sourcePrefix` (overrides the task's prefix), then the `Generate.X=...` assignments.
let openFolder (dir: string) (task: string option) (sourcePrefix: string option) (assignments: string list) : Pretrained =
    let model = HfSeq2Seq.load dir
    try
        let tokenizer =
            if hasTokenizer dir then
                let t = HfTokenizer.fromFolder dir
                HfTokenizer.checkAgainst model.Model.VocabSize t
                Some t
            else None
        let gen = GenerationConfig.load dir
        let gen, taskPrefix =
            match task with
            | Some t when hasTaskParams dir t -> GenerationConfig.withTaskParams (Path.Combine(dir, "config.json")) t gen
            | _ -> gen, None
        let gen = GenerationConfig.setAll assignments gen
        orFail "generation config" (GenerationConfig.validate model.Model.VocabSize gen) gen |> ignore
        let limits = [ maxPositions dir; tokenizer |> Option.bind (fun t -> t.ModelMaxLength) ] |> List.choose id
        { Seq2Seq = model
          Tokenizer = tokenizer
          Generation = gen
          SourcePrefix = defaultArg sourcePrefix (defaultArg taskPrefix "")
          MaxSourceTokens = (if limits.IsEmpty then None else Some(List.min limits)) }
    with _ ->
        (model :> IDisposable).Dispose()
        reraise ()

// ---------------------------------------------------------------- generation over many sources

/// What goes in: documents (text, tokenized with the prefix and truncated) or source ids used as given.
type Sources =
    | Documents of string[]
    | SourceIds of int[][]

/// One source's output: the generated ids without the decoder start token (ending with EOS when finished),
/// and their text with special tokens skipped (None without a tokenizer).
type Generated = { Ids: int[]; Text: string option }

/// Decoding speed so far, for progress lines.
type Progress = { Done: int; Total: int; GeneratedTokens: int; Seconds: float }

module Progress =
    /// "decoded 8/100 documents, 2.1 documents/s, 40.3 generated tokens/s".
    let describe (p: Progress) : string =
        let rate (n: int) = if p.Seconds > 0.0 then float n / p.Seconds else 0.0
        sprintf "decoded %d/%d documents, %.2f documents/s, %.1f generated tokens/s" p.Done p.Total (rate p.Done) (rate p.GeneratedTokens)

/// A document's source ids: the prefix and text tokenized with special tokens, the text's own ids cut so the
/// whole fits `MaxSourceTokens` (special tokens kept), as transformers' `truncation=True` does.
let sourceIds (p: Pretrained) (document: string) : int[] =
    match p.Tokenizer with
    | None -> invalidOp (sprintf "%s has no tokenizer files (%s); give source ids instead of text" p.Seq2Seq.Folder HfTokenizer.lookedFor)
    | Some t ->
        let text = p.SourcePrefix + document
        match p.MaxSourceTokens with
        | None -> t.Encode(text, true)
        | Some m ->
            let prefix, inner, suffix = t.EncodeParts text
            let budget = m - prefix.Length - suffix.Length
            if budget < 0 then invalidArg "document" (sprintf "the %d special tokens do not fit %d source tokens" (prefix.Length + suffix.Length) m)
            Array.concat [ prefix; inner[.. min inner.Length budget - 1]; suffix ]

/// Generates for every source with `cfg`, `batchSize` sources at a time: sources sorted by length (longest
/// first) so a batch pads little, padded with the model's pad id under an attention mask. `progress` is told
/// after each batch. Results in the sources' order.
let generateWith (cfg: GenerationConfig) (batchSize: int) (progress: Progress -> unit) (p: Pretrained) (sources: Sources) : Generated[] =
    if batchSize < 1 then invalidArg "batchSize" (sprintf "expected at least 1, got %d" batchSize)
    let ids =
        match sources with
        | Documents docs -> docs |> Array.map (sourceIds p)
        | SourceIds rows -> rows
    let vocab = p.Seq2Seq.Model.VocabSize
    ids |> Array.iteri (fun i row ->
        if row.Length = 0 then invalidArg "sources" (sprintf "source %d is empty" (i + 1))
        match row |> Array.tryFind (fun id -> id < 0 || id >= vocab) with
        | Some id -> invalidArg "sources" (sprintf "source %d: id %d is outside the vocabulary 0 .. %d" (i + 1) id (vocab - 1))
        | None -> ())
    let order = ids |> Array.mapi (fun i row -> i, row.Length) |> Array.sortBy (fun (i, n) -> -n, i) |> Array.map fst
    let results = Array.zeroCreate<Generated> ids.Length
    let clock = Stopwatch.StartNew()
    let mutable generated = 0
    let mutable finished = 0
    for batch in order |> Array.chunkBySize batchSize do
        let rows = batch |> Array.map (fun i -> ids[i])
        let width = rows |> Array.map Array.length |> Array.max
        let flatIds = Array.create (rows.Length * width) (int64 p.Seq2Seq.PadTokenId)
        let flatMask = Array.zeroCreate<bool> (rows.Length * width)
        rows |> Array.iteri (fun r row -> row |> Array.iteri (fun j id -> flatIds[r * width + j] <- int64 id; flatMask[r * width + j] <- true))
        let shape = [| int64 rows.Length; int64 width |]
        use input = torch.tensor(flatIds, ReadOnlySpan<int64> shape)   // [B; S]
        use mask = torch.tensor(flatMask, ReadOnlySpan<int64> shape)   // [B; S]
        let outs = Generate.run cfg p.Seq2Seq.Model input mask
        for k, i in Array.indexed batch do
            let best = outs[k].Sequences[0]
            generated <- generated + best.Length
            results[i] <- { Ids = best; Text = p.Tokenizer |> Option.map (fun t -> t.Decode(best, true)) }
        finished <- finished + batch.Length
        progress { Done = finished; Total = ids.Length; GeneratedTokens = generated; Seconds = clock.Elapsed.TotalSeconds }
    results

/// `generateWith` the folder's own generation settings, 8 sources at a time, without progress lines: what
/// `moe generate --model` prints for a file of documents (`Documents`) or source id arrays (`SourceIds`).
let generateLines (p: Pretrained) (sources: Sources) : Generated[] = generateWith p.Generation 8 ignore p sources

// ---------------------------------------------------------------- zero-shot summarization into a run folder

/// What `summarize` reads and writes.
type BaselineConfig =
    { /// The checkpoint folder (Hugging Face layout).
      Model: string
      /// A data set as `moe train --data` takes it: a folder of train*/validation*/test* files, an XSum release
      /// folder or split file, or one JSONL/CSV/parquet/lines file.
      Data: string
      Loader: DataConfig
      /// train, validation or test.
      Split: string
      /// Keep the first N examples of the split.
      Limit: int option
      BatchSize: int
      /// The run folder is RunsDir/Name.
      Name: string
      RunsDir: string
      /// Replace a run already in the folder (otherwise refused).
      Overwrite: bool
      /// `Generate.X=value` assignments over the checkpoint's generation config.
      Settings: string list
      /// Overrides the task's source prefix (T5's "summarize: "); None keeps it.
      SourcePrefix: string option
      /// The pipeline task whose task_specific_params apply, when config.json has them.
      Task: string
      /// Porter-stem tokens for ROUGE, as the main job.
      Stem: bool
      BootstrapSamples: int
      /// BERTScore and SummaC of the predictions (`--bertscore`, `--summac`): off until a model folder is given.
      Eval: Metrics.ModelMetricsConfig }

module BaselineConfig =
    /// The default run name for a checkpoint folder: baseline-<folder name>.
    let nameFor (model: string) : string =
        if String.IsNullOrWhiteSpace model then "baseline" else "baseline-" + DirectoryInfo(Path.GetFullPath model).Name

    /// The test split, batches of 8, the "summarization" task's settings, scored as the main job scores.
    let defaults (model: string) (data: string) : BaselineConfig =
        { Model = model
          Data = data
          Loader = DataConfig.defaults
          Split = "test"
          Limit = None
          BatchSize = 8
          Name = nameFor model
          RunsDir = "runs"
          Overwrite = false
          Settings = []
          SourcePrefix = None
          Task = "summarization"
          Stem = Summarizer.SummarizerConfig.defaults.Stem
          BootstrapSamples = Summarizer.SummarizerConfig.defaults.BootstrapSamples
          Eval = Metrics.ModelMetrics.defaults }

    /// Every problem with the config, empty when usable.
    let validate (cfg: BaselineConfig) : string list =
        [ if not (Directory.Exists cfg.Model) then sprintf "checkpoint folder %s does not exist" cfg.Model
          if not (Directory.Exists cfg.Data || File.Exists cfg.Data) then sprintf "data path %s does not exist" cfg.Data
          if not (List.contains cfg.Split [ "train"; "validation"; "test" ]) then sprintf "split must be train, validation or test, got '%s'" cfg.Split
          match cfg.Limit with Some n when n < 1 -> sprintf "limit must be >= 1, got %d" n | _ -> ()
          if cfg.BatchSize < 1 then sprintf "batch size must be >= 1, got %d" cfg.BatchSize
          if String.IsNullOrWhiteSpace cfg.Name then "the run's name is empty"
          if cfg.BootstrapSamples < 1 then sprintf "bootstrap samples must be >= 1, got %d" cfg.BootstrapSamples
          // checked before the checkpoint is loaded or any document decoded
          yield! Metrics.ModelMetrics.problems (fun field -> "Eval." + field) cfg.Eval ]

/// The file in the run folder that says what produced it (model folder, model_type, generation settings, timing).
let recordName = "baseline.json"

/// What `summarize` produced.
type BaselineResult =
    { RunDir: string
      Scores: Summarizer.TestScores
      Documents: int
      GeneratedTokens: int
      Seconds: float
      Notes: string list }

/// The examples of `cfg.Split`, read as `moe train --data` reads them, capped at `cfg.Limit`.
let examples (cfg: BaselineConfig) : Example[] * string list =
    let files = Summarizer.splitFilesOf cfg.Data
    let path = match cfg.Split with "train" -> files.Train | "validation" -> files.Valid | _ -> files.Test
    let reader = Data.read (Summarizer.loaderFor { Summarizer.SummarizerConfig.defaults with Loader = cfg.Loader } path cfg.Split) path
    let xs = reader.Examples |> (match cfg.Limit with Some n -> Seq.truncate n | None -> id) |> Array.ofSeq
    if xs.Length = 0 then invalidOp (sprintf "the %s split of %s has no examples; check the data path and loader settings" cfg.Split cfg.Data)
    xs, reader.Report.Notes |> List.map (fun n -> sprintf "%s (%s): %s" cfg.Split path n)

let private recordJson (cfg: BaselineConfig) (p: Pretrained) (result: BaselineResult) : string =
    let o = JsonObject()
    o["what"] <- JsonValue.Create "zero-shot summarization with a pretrained checkpoint (moe summarize)"
    o["model"] <- JsonValue.Create(Path.GetFullPath cfg.Model)
    o["model_type"] <- JsonValue.Create p.Seq2Seq.ModelType
    o["tokenizer"] <- JsonValue.Create(p.Tokenizer |> Option.map (fun t -> t.Source) |> Option.defaultValue "")
    o["data"] <- JsonValue.Create(Path.GetFullPath cfg.Data)
    o["split"] <- JsonValue.Create cfg.Split
    o["limit"] <- (match cfg.Limit with Some n -> JsonValue.Create n :> JsonNode | None -> null)
    o["batch_size"] <- JsonValue.Create cfg.BatchSize
    o["source_prefix"] <- JsonValue.Create p.SourcePrefix
    o["max_source_tokens"] <- (match p.MaxSourceTokens with Some n -> JsonValue.Create n :> JsonNode | None -> null)
    o["settings"] <- JsonArray([| for s in cfg.Settings -> JsonValue.Create s :> JsonNode |])
    o["generation"] <- Json.toNode p.Generation
    o["documents"] <- JsonValue.Create result.Documents
    o["generated_tokens"] <- JsonValue.Create result.GeneratedTokens
    o["seconds"] <- JsonValue.Create result.Seconds
    o["finished_utc"] <- JsonValue.Create(DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", Globalization.CultureInfo.InvariantCulture))
    Json.format o

/// Writes a zero-shot run's files into `runDir` and scores them as the main job does: predictions.txt (the
/// generated texts, trimmed), references.txt, documents.txt, ids.txt and test_scores.json (model and lead-1, with
/// the model's BERTScore and SummaC where `cfg.Eval` names their models; `say` gets what was not computed and why).
let writeScored (say: string -> unit) (cfg: BaselineConfig) (runDir: string) (xs: Example[]) (outs: Generated[]) : Summarizer.TestScores =
    let predictions = outs |> Array.map (fun g -> (defaultArg g.Text "").Trim())
    Summarizer.writeLines (Path.Combine(runDir, "predictions.txt")) predictions
    Summarizer.writeLines (Path.Combine(runDir, "references.txt")) (xs |> Array.map (fun e -> e.Summary))
    Summarizer.writeLines (Path.Combine(runDir, "documents.txt")) (xs |> Array.map (fun e -> e.Document))
    Summarizer.writeLines (Path.Combine(runDir, "ids.txt")) (xs |> Array.map (fun e -> e.Id))
    let scores, notes =
        Summarizer.scoreWithNotes { Summarizer.SummarizerConfig.defaults with Stem = cfg.Stem; BootstrapSamples = cfg.BootstrapSamples; Eval = cfg.Eval } predictions xs
    for n in notes do say n
    Summarizer.writeText (Path.Combine(runDir, "test_scores.json")) (Summarizer.testScoresJson scores)
    scores

/// Summarizes `cfg.Split` of `cfg.Data` with the checkpoint `cfg.Model` (its generation config, the task's
/// settings, the overrides) into the run folder RunsDir/Name, holding the folder's lock and refusing a run
/// already there unless `Overwrite`: predictions.txt, references.txt, documents.txt, ids.txt, test_scores.json
/// (model and lead-1, the main job's score record) and baseline.json (what produced it). `say` gets the
/// progress lines (documents/s, generated tokens/s) and the comparison table.
let summarize (say: string -> unit) (cfg: BaselineConfig) : BaselineResult =
    orFail "baseline config" (BaselineConfig.validate cfg) cfg |> ignore
    let runDir = Path.Combine(cfg.RunsDir, cfg.Name)
    use _lock = RunFolder.acquire (sprintf "moe summarize --model %s --name %s" cfg.Model cfg.Name) runDir
    RunFolder.startFresh cfg.Overwrite runDir
    let xs, notes = examples cfg
    use p = openFolder cfg.Model (Some cfg.Task) cfg.SourcePrefix cfg.Settings
    say (sprintf "model: %s (%s); %d %s documents from %s; %s, batches of %d"
             cfg.Model p.Seq2Seq.ModelType xs.Length cfg.Split cfg.Data
             (if p.Generation.NumBeams = 1 then "greedy" else sprintf "beam %d" p.Generation.NumBeams) cfg.BatchSize)
    for n in notes do say ("  " + n)
    let clock = Stopwatch.StartNew()
    let mutable last = { Done = 0; Total = xs.Length; GeneratedTokens = 0; Seconds = 0.0 }
    let outs =
        generateWith p.Generation cfg.BatchSize (fun pr -> last <- pr; say (Progress.describe pr)) p
            (Documents(xs |> Array.map (fun e -> e.Document)))
    let seconds = clock.Elapsed.TotalSeconds
    let scores = writeScored say cfg runDir xs outs
    let result =
        { RunDir = runDir; Scores = scores; Documents = xs.Length; GeneratedTokens = last.GeneratedTokens
          Seconds = seconds; Notes = notes }
    Summarizer.writeText (Path.Combine(runDir, recordName)) (recordJson cfg p result)
    say (Summarizer.comparisonTable scores)
    result

// ---------------------------------------------------------------- the script's table

/// One row of the baseline script's table: a system's ROUGE-1/2/L F1 and BLEU on its test set.
type ScoreRow = { System: string; N: int option; Rouge1: float; Rouge2: float; RougeL: float; Bleu: float option }

/// The model rows of the from-scratch runs under `runsDir` (folders with test_scores.json and no baseline.json),
/// read with `RunLog.readTestScores`; each row is on that run's own test set (N says how many examples).
let fromScratchRows (runsDir: string) : ScoreRow list =
    if not (Directory.Exists runsDir) then []
    else
        [ for dir in Directory.GetDirectories runsDir |> Array.sort do
              let scores = Path.Combine(dir, RunLog.FileNames.testScores)
              if File.Exists scores && not (File.Exists(Path.Combine(dir, recordName))) then
                  match RunLog.readTestScores scores |> Array.tryFind (fun s -> s.System = "model") with
                  | Some s ->
                      let f1 (name: string) = s.Rouge.TryFind name |> Option.map (fun r -> r.F1) |> Option.defaultValue nan
                      yield { System = "from scratch: " + DirectoryInfo(dir).Name; N = s.N; Rouge1 = f1 "rouge1"
                              Rouge2 = f1 "rouge2"; RougeL = f1 "rougeL"; Bleu = s.Scalars.TryFind "bleu" }
                  | None -> () ]

/// The rows of a baseline's scores: the pretrained model and lead-1 on the same documents.
let baselineRows (name: string) (scores: Summarizer.TestScores) : ScoreRow list =
    [ for system, r in [ name, scores.Model; "lead-1", scores.Lead1 ] ->
          { System = system; N = Some r.N; Rouge1 = r.Rouge1.F1.Mean; Rouge2 = r.Rouge2.F1.Mean; RougeL = r.RougeL.F1.Mean
            Bleu = Some r.Bleu.Score } ]

/// A plain-text table of rows: ROUGE F1 x100, BLEU, and the number of test examples.
let scoreTable (rows: ScoreRow list) : string =
    let width = rows |> List.map (fun r -> r.System.Length) |> List.fold max 6
    let header = sprintf "%-*s %8s %8s %8s %6s %6s" width "system" "ROUGE-1" "ROUGE-2" "ROUGE-L" "BLEU" "n"
    let line (r: ScoreRow) =
        let n = match r.N with Some n -> string n | None -> "?"
        let bleu = match r.Bleu with Some b -> sprintf "%.1f" b | None -> "-"
        sprintf "%-*s %8.1f %8.1f %8.1f %6s %6s" width r.System (100.0 * r.Rouge1) (100.0 * r.Rouge2) (100.0 * r.RougeL) bleu n
    String.Join("\n", header :: (rows |> List.map line))

/// What `scripts/baseline_bart_xsum.fsx` runs: `--smoke` (bart-tiny on 4 XSum test documents from the shared
/// data, into RUNS_DIR/baseline-smoke, replaced each time), or `--model DIR --data PATH` with `--split`,
/// `--limit N`, `--batch-size B`, `--name NAME`, `--set Generate.X=...` (repeatable), `--source-prefix P`,
/// `--overwrite`; `--runs-dir D` (default runs) for both.
let scriptConfig (sharedRoot: string) (args: string[]) : BaselineConfig =
    let rec go (cfg: BaselineConfig) (smoke: bool) (rest: string list) =
        let int (flag: string) (v: string) =
            match Int32.TryParse v with
            | true, n -> n
            | _ -> invalidArg flag (sprintf "%s: expected an integer, got '%s'" flag v)
        match rest with
        | [] -> cfg, smoke
        | "--smoke" :: tl ->
            let smokeCfg =
                { cfg with
                    Model = Path.Combine(sharedRoot, "models", "bart-tiny")
                    Data = Path.Combine(sharedRoot, "data", "xsum-test-docs", "test.llm_decoding.jsonl")
                    Limit = Some 4
                    Overwrite = true
                    BootstrapSamples = 100
                    Settings = cfg.Settings @ [ "Generate.MaxNewTokens=16" ] }
            go smokeCfg true tl
        | "--model" :: v :: tl -> go { cfg with Model = v } smoke tl
        | "--data" :: v :: tl -> go { cfg with Data = v } smoke tl
        | "--split" :: v :: tl -> go { cfg with Split = v } smoke tl
        | "--limit" :: v :: tl -> go { cfg with Limit = Some(int "--limit" v) } smoke tl
        | "--batch-size" :: v :: tl -> go { cfg with BatchSize = int "--batch-size" v } smoke tl
        | "--name" :: v :: tl -> go { cfg with Name = v } smoke tl
        | "--runs-dir" :: v :: tl -> go { cfg with RunsDir = v } smoke tl
        | "--set" :: v :: tl -> go { cfg with Settings = cfg.Settings @ [ v ] } smoke tl
        | "--source-prefix" :: v :: tl -> go { cfg with SourcePrefix = Some v } smoke tl
        | "--overwrite" :: tl -> go { cfg with Overwrite = true } smoke tl
        | "--bertscore" :: v :: tl -> go { cfg with Eval = { cfg.Eval with BertScoreModel = Some v } } smoke tl
        | "--bertscore-layer" :: v :: tl -> go { cfg with Eval = { cfg.Eval with BertScoreLayer = Some(int "--bertscore-layer" v) } } smoke tl
        | "--summac" :: v :: tl -> go { cfg with Eval = { cfg.Eval with SummaCModel = Some v } } smoke tl
        | other :: _ ->
            invalidArg "args" (sprintf "unknown or incomplete argument '%s' (expected --smoke, or --model DIR --data PATH [--split S] [--limit N] [--batch-size B] [--name NAME] [--runs-dir D] [--set Generate.X=V] [--source-prefix P] [--overwrite] [--bertscore DIR [--bertscore-layer N]] [--summac DIR])" other)
    let cfg, smoke = go { BaselineConfig.defaults "" "" with Name = "" } false (List.ofArray args)
    if not smoke && (cfg.Model = "" || cfg.Data = "") then invalidArg "args" "expected --smoke, or both --model DIR and --data PATH"
    if cfg.Name <> "" then cfg
    elif smoke then { cfg with Name = "baseline-smoke" }
    else { cfg with Name = BaselineConfig.nameFor cfg.Model }

/// Runs the baseline script: summarizes (see `scriptConfig`), then prints the table of the pretrained model,
/// lead-1 and the from-scratch runs found in the runs folder (each on its own test set, n given).
let runScript (say: string -> unit) (sharedRoot: string) (args: string[]) : BaselineResult * string =
    let cfg = scriptConfig sharedRoot args
    let result = summarize say cfg
    let name = sprintf "%s (zero-shot)" (DirectoryInfo(Path.GetFullPath cfg.Model).Name)
    let table = scoreTable (baselineRows name result.Scores @ fromScratchRows cfg.RunsDir)
    say table
    result, table

// ---------------------------------------------------------------- the model-based metrics script

/// BERTScore and SummaC (`Metrics.ModelMetrics`) of a run folder's predictions (`--run DIR`: predictions.txt,
/// references.txt, documents.txt) or of aligned files (`-p P -r R [-d D]`), with `--bertscore DIR
/// [--bertscore-layer N] [--bertscore-idf]` and `--summac DIR [--summac-granularity G] [--summac-conv FILE]`;
/// `--smoke`: lead-1 of the first 3 shared XSum test documents against their summaries with roberta-tiny (layer 2)
/// and roberta-tiny-mnli. Prints and returns the score table (`scripts/score_model_based.fsx`).
let modelMetricsScript (say: string -> unit) (sharedRoot: string) (args: string[]) : Metrics.ScoreReport =
    let int (flag: string) (v: string) =
        match Int32.TryParse v with
        | true, n -> n
        | _ -> invalidArg flag (sprintf "%s: expected an integer, got '%s'" flag v)
    let rec go (files: Map<string, string>) (m: Metrics.ModelMetricsConfig) (rest: string list) =
        match rest with
        | [] -> files, m
        | "--smoke" :: tl ->
            let models = Path.Combine(sharedRoot, "models")
            go (files.Add("smoke", "")) { m with BertScoreModel = Some(Path.Combine(models, "roberta-tiny")); BertScoreLayer = Some 2
                                                 SummaCModel = Some(Path.Combine(models, "roberta-tiny-mnli")) } tl
        | "--run" :: v :: tl -> go (files.Add("run", v)) m tl
        | ("-p" | "--predictions") :: v :: tl -> go (files.Add("p", v)) m tl
        | ("-r" | "--references") :: v :: tl -> go (files.Add("r", v)) m tl
        | ("-d" | "--documents") :: v :: tl -> go (files.Add("d", v)) m tl
        | "--bertscore" :: v :: tl -> go files { m with BertScoreModel = Some v } tl
        | "--bertscore-layer" :: v :: tl -> go files { m with BertScoreLayer = Some(int "--bertscore-layer" v) } tl
        | "--bertscore-idf" :: tl -> go files { m with BertScoreIdf = true } tl
        | "--summac" :: v :: tl -> go files { m with SummaCModel = Some v } tl
        | "--summac-granularity" :: v :: tl -> go files { m with SummaCGranularity = v } tl
        | "--summac-conv" :: v :: tl -> go files { m with SummaCConv = Some v } tl
        | other :: _ ->
            invalidArg "args" (sprintf "unknown or incomplete argument '%s' (expected --smoke, or --run DIR | -p P -r R [-d D], with --bertscore DIR [--bertscore-layer N] [--bertscore-idf] and/or --summac DIR [--summac-granularity G] [--summac-conv FILE])" other)
    let files, metrics = go Map.empty Metrics.ModelMetrics.defaults (List.ofArray args)
    if metrics.BertScoreModel.IsNone && metrics.SummaCModel.IsNone then
        invalidArg "args" "expected --bertscore DIR and/or --summac DIR: without a model there is nothing to compute"
    Metrics.ModelMetrics.check (fun field -> field) metrics
    let predictions, references, documents =
        match files.TryFind "smoke", files.TryFind "run", files.TryFind "p", files.TryFind "r" with
        | Some _, _, _, _ ->
            let data = Path.Combine(sharedRoot, "data", "xsum-test-docs", "test.llm_decoding.jsonl")
            let xs, _ = examples { BaselineConfig.defaults "" data with Limit = Some 3 }
            xs |> Array.map (fun e -> Summarizer.lead1 e.Document), xs |> Array.map (fun e -> e.Summary), Some(xs |> Array.map (fun e -> e.Document))
        | None, Some dir, _, _ ->
            let read name = Metrics.Basics.readLines (Path.Combine(dir, name))
            read "predictions.txt", read "references.txt", Some(read "documents.txt")
        | None, None, Some p, Some r -> Metrics.Basics.readLines p, Metrics.Basics.readLines r, files.TryFind "d" |> Option.map Metrics.Basics.readLines
        | _ -> invalidArg "args" "expected --smoke, --run DIR, or -p PREDICTIONS -r REFERENCES [-d DOCUMENTS]"
    let report =
        Metrics.Scoring.scoreCorpus { Metrics.Scoring.defaultOptions with Stem = true } predictions references documents
        |> Metrics.ModelMetrics.apply metrics predictions references documents
    say (Metrics.Scoring.formatTable report)
    report
