/// The LoRA-experts comparison (`scripts/lora_experts.fsx`): the same summarizer with full MoE experts and
/// with experts as LoRA adapters (Hu et al. 2021) on a shared base FFN, frozen or trainable, at several
/// ranks. Each variant is a `Summarizer` run; the table reads parameters from the trained model, ROUGE from
/// test_scores.json and speed from metrics.jsonl of the runs just made.
module Moe.LoraExperiment

open System
open System.IO
open System.Text
open Moe.Config
open Moe.Models
open Moe.Train
open Moe.Summarizer

/// What the comparison runs.
type Settings =
    { /// The summarizer job every variant shares (data, model width, training); its FFN kind is replaced.
      Job: SummarizerConfig
      Experts: int
      /// Experts per token.
      K: int
      /// LoRA ranks tried, each with a frozen and a trainable base.
      Ranks: int list
      /// LoRA alpha as a multiple of the rank: alpha = AlphaPerRank * r keeps the adapter scale alpha / r
      /// fixed across ranks (Hu et al. 2021 sec. 4.1 tune alpha once and keep it).
      AlphaPerRank: float }

module Settings =
    let private tinyJob (runsDir: string) (steps: int) (trainSize: int) (testSize: int) =
        let d = SummarizerConfig.defaults
        { d with
            RunsDir = runsDir
            Source = Synthetic { Corpus.CorpusConfig.defaults with TrainSize = trainSize; ValidSize = testSize; TestSize = testSize }
            Model = { d.Model with ModelDim = 32; Heads = 2; KvHeads = 2; EncoderLayers = 1; DecoderLayers = 1; Dropout = 0.0; Ffn = Dense 64 }
            Train =
                { d.Train with
                    Steps = steps
                    BatchSize = 16
                    WarmupSteps = max 1 (steps / 10)
                    LogEvery = max 1 (steps / 10)
                    EvalEvery = max 1 (steps / 2)
                    CheckpointEvery = max 1 (steps / 2)
                    Device = Native.Cpu }
            Generate = { d.Generate with MaxLength = 20 }
            BootstrapSamples = 200 }

    /// Minutes on 2 CPU cores: width 32, 1 + 1 layers, 4 experts top-2, ranks 2 and 8, 500 steps of 16
    /// documents (about 3 minutes for all five variants when the cores are not shared).
    let quick (runsDir: string) : Settings =
        { Job = tinyJob runsDir 500 3000 60; Experts = 4; K = 2; Ranks = [ 2; 8 ]; AlphaPerRank = 2.0 }

    /// A handful of steps on a few documents, for tests: checks the path, not the numbers.
    let smoke (runsDir: string) : Settings =
        let s = quick runsDir
        { s with
            Job = { tinyJob runsDir 4 32 4 with Generate = { s.Job.Generate with MaxLength = 6 }; BootstrapSamples = 10 }
            Ranks = [ 2 ] }

    /// The summarizer's default job (width 64, 2 + 2 layers, the full synthetic corpus), 8 experts top-2,
    /// ranks 4, 16 and 64 (rank 64 reaches about half a full expert's parameters at H = 256).
    let full (runsDir: string) : Settings =
        let d = SummarizerConfig.defaults
        { Job = { d with RunsDir = runsDir; Train = { d.Train with Steps = 3000; EvalEvery = 250; CheckpointEvery = 250 } }
          Experts = 8
          K = 2
          Ranks = [ 4; 16; 64 ]
          AlphaPerRank = 2.0 }

/// One variant: full experts (Lora = None) or LoRA experts.
type Variant =
    { Name: string
      Lora: LoraConfig option }

/// Full experts first, then frozen and trainable bases at each rank.
let variants (settings: Settings) : Variant list =
    [ { Name = "full"; Lora = None }
      for freeze in [ true; false ] do
          for r in settings.Ranks do
              { Name = sprintf "lora-r%d-%s" r (if freeze then "frozen" else "trainable")
                Lora = Some { Rank = r; Alpha = settings.AlphaPerRank * float r; FreezeBase = freeze } } ]

/// The summarizer config of one variant: top-k MoE in every layer, experts full or LoRA.
let configOf (settings: Settings) (v: Variant) : SummarizerConfig =
    let moe = { settings.Job with Name = v.Name } |> SummarizerConfig.topK settings.Experts settings.K
    match v.Lora with
    | None -> moe
    | Some lora -> SummarizerConfig.loraExperts lora moe

/// One row of the comparison table, measured from a finished run.
type Row =
    { Variant: string
      Rank: int option
      FreezeBase: bool option
      TotalParameters: int64
      ActiveParameters: int64
      TrainableParameters: int64
      /// Best validation loss (NaN when there was no validation pass).
      ValidLoss: float
      /// Test ROUGE F1 (x 100) of the model.
      Rouge1: float
      Rouge2: float
      RougeL: float
      /// Mean training tokens per second over the logged steps.
      TokensPerSecond: float
      RunDir: string }

/// Reads a finished run: parameter counts from its checkpoint's model, ROUGE from test_scores.json,
/// speed from metrics.jsonl.
let measure (v: Variant) (result: SummaryResult) : Row =
    use loaded = Summarizer.load result.RunDir None Native.Cpu
    let counts = loaded.Model.ParameterCount()
    let model =
        RunLog.readTestScores (Path.Combine(result.RunDir, RunLog.FileNames.testScores))
        |> Array.find (fun s -> s.System = "model")
    let f1 (name: string) = match model.Rouge.TryFind name with Some p -> 100.0 * p.F1 | None -> nan
    let speeds =
        RunLog.readMetrics (Path.Combine(result.RunDir, RunLog.FileNames.metrics))
        |> Array.choose (fun m -> if m.Split = RunLog.Splits.train then m.TokensPerS else None)
    { Variant = v.Name
      Rank = v.Lora |> Option.map (fun l -> l.Rank)
      FreezeBase = v.Lora |> Option.map (fun l -> l.FreezeBase)
      TotalParameters = counts.Total
      ActiveParameters = counts.Active
      TrainableParameters = loaded.Model.TrainableParameterCount()
      ValidLoss = defaultArg result.Train.BestValidLoss nan
      Rouge1 = f1 "rouge1"
      Rouge2 = f1 "rouge2"
      RougeL = f1 "rougeL"
      TokensPerSecond = if speeds.Length = 0 then nan else Array.average speeds
      RunDir = result.RunDir }

/// Trains, decodes and measures every variant in turn (from scratch; earlier runs of the same names are replaced).
let run (options: RunOptions) (settings: Settings) : Row list =
    [ for v in variants settings do
        let cfg = configOf settings v
        let dir = Path.Combine(cfg.RunsDir, cfg.Name)
        if Directory.Exists dir then Directory.Delete(dir, true)
        measure v (Summarizer.runWith options false cfg) ]

/// The rows as a Markdown table.
let table (rows: Row list) : string =
    let sb = StringBuilder()
    let inv (format: string) (x: float) = if Double.IsNaN x then "n/a" else x.ToString(format, Globalization.CultureInfo.InvariantCulture)
    sb.AppendLine "| variant | rank | base | params total | active | trainable | valid loss | ROUGE-1 | ROUGE-2 | ROUGE-L | tokens/s |" |> ignore
    sb.AppendLine "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|" |> ignore
    for r in rows do
        sb.AppendLine(
            sprintf "| %s | %s | %s | %d | %d | %d | %s | %s | %s | %s | %s |" r.Variant
                (r.Rank |> Option.map string |> Option.defaultValue "-")
                (match r.FreezeBase with Some true -> "frozen" | Some false -> "trainable" | None -> "-")
                r.TotalParameters r.ActiveParameters r.TrainableParameters
                (inv "0.000" r.ValidLoss) (inv "0.0" r.Rouge1) (inv "0.0" r.Rouge2) (inv "0.0" r.RougeL) (inv "0" r.TokensPerSecond))
        |> ignore
    sb.ToString()

/// Trainable parameters (log x) against test ROUGE-1, a line per kind of expert (full; LoRA on a frozen base;
/// LoRA on a trainable base) through its ranks: how much quality each trainable parameter buys.
let figure (rows: Row list) : Plotly.NET.GenericChart =
    let kindOf (r: Row) =
        match r.FreezeBase with
        | None -> "full experts"
        | Some true -> "LoRA experts, frozen base"
        | Some false -> "LoRA experts, trainable base"
    let series =
        [ for kind, members in rows |> List.groupBy kindOf ->
            let ordered = members |> List.sortBy (fun r -> r.TrainableParameters) |> List.toArray
            ({ Name = kind
               X = ordered |> Array.map (fun r -> float r.TrainableParameters)
               Y = ordered |> Array.map (fun r -> r.Rouge1)
               Labels = ordered |> Array.map (fun r -> match r.Rank with Some rank -> sprintf "r=%d" rank | None -> "full") } : Plots.Series) ]
    Plots.linePanels "LoRA experts vs full experts: quality per trainable parameter"
        [ { XTitle = "trainable parameters (log scale)"; YTitle = "test ROUGE-1 F1 × 100"; LogX = true; Series = series } ]

/// What `writeReports` wrote.
type Reports =
    { /// `<stem>.md`: the table.
      Markdown: string
      /// `<stem>.html`: the report page of the runs.
      Report: string
      /// `<stem>-figure.html` and, where Chromium is on PATH, `<stem>.png`: `figure rows`.
      Figure: Plots.Figure }

/// Writes `<stem>.md` (the table), `<stem>.html` (`Report.write` over the runs: scores, loss
/// curves, expert load and the settings that differ) and the headline figure (`figure`, drawn into `<stem>.png` when
/// `screenshot` and Chromium is on PATH).
let writeReports (screenshot: bool) (reportsDir: string) (stem: string) (rows: Row list) : Reports =
    Directory.CreateDirectory reportsDir |> ignore
    let md = Path.GetFullPath(Path.Combine(reportsDir, stem + ".md"))
    let text =
        "# LoRA experts vs full experts\n\n"
        + "Experts as LoRA adapters (Hu et al. 2021) on a shared base FFN, frozen or trainable, against full experts; "
        + "the numbers come from the runs listed.\n\n"
        + table rows
        + "\nRuns: " + String.Join(", ", rows |> List.map (fun r -> r.RunDir)) + "\n"
    File.WriteAllText(md, text)
    let html = Report.write { Report.defaults with Title = "LoRA experts vs full experts" } (Path.Combine(reportsDir, stem + ".html")) (rows |> List.map (fun r -> r.RunDir))
    { Markdown = md; Report = html; Figure = Plots.writeFigureIn screenshot reportsDir stem "LoRA experts vs full experts" (figure rows) }
