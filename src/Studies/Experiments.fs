/// The experiments of the MoE literature as library functions the scripts (`scripts/*.fsx`) call: scale
/// presets (smoke, quick, full), running named summarizer configs one after another, reading each run folder
/// back into a table row, tables as text and Markdown, a report page and a headline figure per experiment,
/// then the experiments themselves (FLOPs, probes and information measures are in `Analysis`). Every number
/// in a table or figure is read from the runs just made.
/// Axes: T tokens, D model width, H expert hidden width, E experts, K picks per token, L labels, V vocabulary.
module Moe.Experiments

open System
open System.Collections.Generic
open System.Diagnostics
open System.IO
open System.Text
open TorchSharp
open Plotly.NET
open Moe.Tensors
open Moe.Config
open Moe.Layers
open Moe.Attention
open Moe.Models
open Moe.Data
open Moe.Corpus
open Moe.Batching
open Moe.Train
open Moe.Summarizer
open Moe.RunLog
open Moe.Analysis

// ---------------------------------------------------------------- options

/// How big an experiment runs.
type Scale =
    /// A handful of steps on a few dozen examples: for tests, so the scripts cannot rot.
    | Smoke
    /// Tiny models and a few hundred steps: minutes on 2 CPU cores.
    | Quick
    /// Paper-scale settings (hours; a GPU helps).
    | Full

/// What every experiment script takes.
type ExperimentOptions =
    { Scale: Scale
      /// A dataset folder or file (as `scripts/train_topk.fsx` takes); None = the built-in synthetic corpus.
      DataPath: string option
      /// Runs go to `RunsDir/<experiment>/<variant>`.
      RunsDir: string
      /// The report page and table go to `ReportsDir/<experiment>.html` and `.md`.
      ReportsDir: string
      /// Print each run's training progress (off: one line per run).
      Verbose: bool
      /// Draw the headline figure into `ReportsDir/<experiment>.png` when Chromium is on PATH (off: the figure's
      /// page only; tests that do not check the PNG save the browser's start-up).
      Screenshot: bool }

module ExperimentOptions =
    let defaults = { Scale = Quick; DataPath = None; RunsDir = "runs"; ReportsDir = "reports"; Verbose = false; Screenshot = true }

    /// The usage line every script prints on bad arguments.
    let usage = "arguments: [--smoke | --full] [--verbose] [DATA_PATH]"

    /// Options from script arguments (without the script's own name): `--smoke`, `--full`, `--verbose` and
    /// at most one DATA_PATH. Returns every problem at once.
    let parse (args: string[]) : Result<ExperimentOptions, string list> =
        let flags, paths = args |> Array.partition (fun a -> a.StartsWith "--")
        let unknown = flags |> Array.filter (fun f -> not (List.contains f [ "--smoke"; "--full"; "--verbose" ]))
        let problems =
            [ for f in unknown do yield sprintf "unknown flag %s (%s)" f usage
              if Array.contains "--smoke" flags && Array.contains "--full" flags then yield "--smoke and --full exclude each other"
              if paths.Length > 1 then yield sprintf "expected at most one DATA_PATH, got %d: %s" paths.Length (String.Join(" ", paths))
              for p in paths do
                  if not (File.Exists p || Directory.Exists p) then yield sprintf "DATA_PATH %s does not exist" p ]
        if not problems.IsEmpty then Error problems
        else
            Ok { defaults with
                   Scale = (if Array.contains "--smoke" flags then Smoke elif Array.contains "--full" flags then Full else Quick)
                   DataPath = Array.tryHead paths
                   Verbose = Array.contains "--verbose" flags }

    /// `parse`, raising one ArgumentException that lists every problem.
    let parseOrFail (args: string[]) : ExperimentOptions =
        match parse args with
        | Ok o -> o
        | Error ps -> invalidArg "args" (sprintf "bad script arguments:\n  - %s" (String.concat "\n  - " ps))

// ---------------------------------------------------------------- scale presets

/// Synthetic documents of 4-6 sentences and 40-90 words: short enough that a width-32 model trains in
/// seconds per hundred steps on a CPU, long enough to hold the three facts a summary names.
let private quickCorpus =
    { CorpusConfig.defaults with MinSentences = 4; MaxSentences = 6; MinWords = 40; MaxWords = 90; TrainSize = 1200; ValidSize = 48; TestSize = 48 }

/// Examples per split (train, valid, test) of each scale, also the caps on a real dataset.
let private splitSizes (scale: Scale) =
    match scale with
    | Smoke -> 48, 8, 8
    | Quick -> 1200, 48, 48
    | Full -> CorpusConfig.defaults.TrainSize, CorpusConfig.defaults.ValidSize, CorpusConfig.defaults.TestSize

/// The dense summarizer at a scale; experiments turn its FFNs into MoE layers. Quick and smoke use one
/// encoder and one decoder layer of width 64 with 4 heads (head width 16, so 4, 2 and 1 KV heads all divide)
/// and FFN width 128; full uses 4 + 4 layers of width 256 with 8 heads (Vaswani et al.'s base shape at half
/// width). Quick's 300 steps of batch 32 take a top-2-of-4 MoE to ROUGE-1 ~36 against lead-1's ~20 on the
/// quick corpus in ~15-30 s on 2 CPU cores; at width 32 and 150 steps of batch 16 every model still
/// repeated one word (ROUGE 0), which made the experiments' quality columns meaningless.
let summarizer (opts: ExperimentOptions) (experiment: string) (variant: string) : SummarizerConfig =
    let d = SummarizerConfig.defaults
    let trainN, validN, testN = splitSizes opts.Scale
    let sized =
        match opts.Scale with
        | Smoke | Quick ->
            let steps, logEvery, evalEvery, warmup, bootstrap, genLength =
                if opts.Scale = Smoke then 3, 1, 3, 1, 10, 8 else 300, 10, 100, 30, 200, 24
            { d with
                Source = Synthetic { quickCorpus with TrainSize = trainN; ValidSize = validN; TestSize = testN }
                Batching = { d.Batching with MaxSourceTokens = 128; MaxTargetTokens = 32 }
                Model = { d.Model with ModelDim = 64; Heads = 4; KvHeads = 4; EncoderLayers = 1; DecoderLayers = 1; MaxLength = 128; Ffn = Dense 128 }
                Train =
                  { d.Train with
                      Steps = steps; BatchSize = 32; LearningRate = 2e-3; WarmupSteps = warmup
                      LogEvery = logEvery; EvalEvery = evalEvery; CheckpointEvery = steps }
                Generate = { d.Generate with MaxLength = genLength }
                BootstrapSamples = bootstrap }
        | Full ->
            { d with
                Model = { d.Model with ModelDim = 256; Heads = 8; KvHeads = 8; EncoderLayers = 4; DecoderLayers = 4; Ffn = Dense 1024 }
                Train = { d.Train with Steps = 20000; BatchSize = 64; LearningRate = 5e-4; WarmupSteps = 1000; EvalEvery = 1000; CheckpointEvery = 1000 } }
    let withData =
        match opts.DataPath with
        | None -> sized
        | Some path ->
            let cap n = if opts.Scale = Full then None else Some n
            { sized with Source = Files(splitFilesOf path); MaxTrain = cap trainN; MaxValid = cap validN; MaxTest = cap testN }
    { withData with Name = variant; RunsDir = Path.Combine(opts.RunsDir, experiment) }

/// The config's MoE settings (of full or LoRA experts), or a failure naming the variant.
let moeOf (cfg: SummarizerConfig) : MoeConfig =
    match cfg.Model.Ffn with
    | Moe m | LoraMoe (m, _) -> m
    | Dense _ -> invalidArg "cfg" (sprintf "expected an MoE config for %s, got a dense FFN" cfg.Name)

/// The config with its MoE router changed by `f`; LoRA experts stay LoRA experts.
let withRouter (f: RouterConfig -> RouterConfig) (cfg: SummarizerConfig) : SummarizerConfig =
    let routed (m: MoeConfig) = { m with Router = f m.Router }
    let ffn =
        match cfg.Model.Ffn with
        | Moe m -> Moe(routed m)
        | LoraMoe (m, lora) -> LoraMoe(routed m, lora)
        | Dense _ -> invalidArg "cfg" (sprintf "expected an MoE config for %s, got a dense FFN" cfg.Name)
    { cfg with Model = { cfg.Model with Ffn = ffn } }

/// The config with its balancing-loss weights replaced.
let withLosses (weights: LossWeights) (cfg: SummarizerConfig) : SummarizerConfig =
    { cfg with Train = { cfg.Train with LossWeights = weights } }

// ---------------------------------------------------------------- running

/// Trains, decodes and scores each config in turn (its run folder is `RunsDir/Name`, an earlier run there
/// replaced), saying one line per run.
let runAll (opts: ExperimentOptions) (configs: SummarizerConfig list) : SummaryResult list =
    let n = configs.Length
    configs
    |> List.mapi (fun i cfg ->
        printfn "[%d/%d] %s ..." (i + 1) n cfg.Name
        let runOpts = { RunOptions.Defaults with Progress = (if opts.Verbose then Lines else Silent); Overwrite = true }
        let r = Summarizer.runWith runOpts false cfg
        printfn "[%d/%d] %s: %d steps in %.0f s" (i + 1) n cfg.Name r.Train.Steps r.Train.ElapsedSeconds
        r)

/// What the tables show of one run, read back from its folder.
type RunRow =
    { Name: string
      RunDir: string
      /// Model ROUGE F1 on the test split (fractions), from test_scores.json.
      Rouge1: float
      Rouge2: float
      RougeL: float
      /// Lowest validation loss in metrics.jsonl (NaN without a validation line).
      ValidLoss: float
      /// Mean training tokens per second over the logged steps.
      TokensPerS: float
      /// Per MoE layer at the last logged step; empty for a dense model.
      Balance: LayerBalance[] }

    /// Mean load CV over MoE layers (NaN for a dense model).
    member r.LoadCv = if r.Balance.Length = 0 then nan else r.Balance |> Array.averageBy (fun b -> b.LoadCv)
    /// Collapsed experts summed over MoE layers.
    member r.Collapsed = r.Balance |> Array.sumBy (fun b -> b.CollapsedExperts.Length)

/// Reads a run folder into a row (`collapseBelow` as in `RunLog.finalBalance`).
let readRow (runDir: string) : RunRow =
    let run = RunLog.load runDir
    let model =
        run.Scores |> Option.defaultValue [||] |> Array.tryFind (fun s -> s.System = "model")
        |> Option.defaultWith (fun () -> invalidOp (sprintf "%s has no model scores in %s" runDir FileNames.testScores))
    let f1 (key: string) = match model.Rouge.TryFind key with Some p -> p.F1 | None -> nan
    let valid = run.Metrics |> Array.filter (fun m -> m.Split = Splits.valid) |> Array.map (fun m -> m.Loss)
    let speeds = run.Metrics |> Array.choose (fun m -> if m.Split = Splits.train then m.TokensPerS else None)
    { Name = run.Name
      RunDir = run.Directory
      Rouge1 = f1 "rouge1"
      Rouge2 = f1 "rouge2"
      RougeL = f1 "rougeL"
      ValidLoss = (if valid.Length = 0 then nan else Array.min valid)
      TokensPerS = (if speeds.Length = 0 then nan else Array.average speeds)
      Balance = (if run.Routing.Length = 0 then [||] else finalBalance collapsedShareOfUniform run.Routing) }

// ---------------------------------------------------------------- tables and reports

/// A table of strings with a title; `Table.text` and `Table.markdown` render it.
type Table =
    { Title: string
      Columns: string[]
      Rows: string[][] }

module Table =
    /// A number with `digits` decimals, "n/a" for NaN.
    let num (digits: int) (v: float) : string =
        if Double.IsNaN v then "n/a" else v.ToString("F" + string digits, Globalization.CultureInfo.InvariantCulture)

    /// An F1 fraction as a percentage with one decimal.
    let pct (v: float) : string = num 1 (100.0 * v)

    /// A large count with an SI suffix (k, M, G).
    let si (v: float) : string =
        if Double.IsNaN v then "n/a"
        elif abs v >= 1e9 then num 2 (v / 1e9) + "G"
        elif abs v >= 1e6 then num 2 (v / 1e6) + "M"
        elif abs v >= 1e3 then num 1 (v / 1e3) + "k"
        else num 0 v

    let private check (t: Table) =
        for r in t.Rows do
            if r.Length <> t.Columns.Length then
                invalidArg "table" (sprintf "expected %d cells per row of %s, got %d" t.Columns.Length t.Title r.Length)

    /// Aligned plain text with the title on top.
    let text (t: Table) : string =
        check t
        let widths = t.Columns |> Array.mapi (fun i c -> t.Rows |> Array.fold (fun w r -> max w r[i].Length) c.Length)
        let line (cells: string[]) = String.Join("  ", cells |> Array.mapi (fun i c -> c.PadRight widths[i])).TrimEnd()
        let sb = StringBuilder()
        sb.AppendLine(t.Title).AppendLine(line t.Columns).AppendLine(line (widths |> Array.map (fun w -> String('-', w)))) |> ignore
        for r in t.Rows do sb.AppendLine(line r) |> ignore
        sb.ToString()

    /// A GitHub Markdown table under a `###` heading.
    let markdown (t: Table) : string =
        check t
        let cell (s: string) = s.Replace("|", "\\|")
        let line (cells: string[]) = "| " + String.Join(" | ", cells |> Array.map cell) + " |"
        let sb = StringBuilder()
        sb.AppendLine("### " + t.Title).AppendLine().AppendLine(line t.Columns)
          .AppendLine(line (t.Columns |> Array.map (fun _ -> "---"))) |> ignore
        for r in t.Rows do sb.AppendLine(line r) |> ignore
        sb.ToString()

/// What an experiment produced.
type ExperimentResult =
    { Tables: Table list
      /// reports/<experiment>.html: the report page of the runs, or the tables when there are no runs.
      Report: string
      /// reports/<experiment>.md.
      Markdown: string
      /// The headline chart alone: reports/<experiment>-figure.html and, where Chromium is on PATH,
      /// reports/<experiment>.png.
      Figure: Plots.Figure
      RunDirs: string list }

let private printFigure (f: Plots.Figure) = for line in Plots.figureLines f do printfn "%s" line

/// Prints the tables, writes them to `ReportsDir/<experiment>.md`, the report page of `runDirs` to
/// `ReportsDir/<experiment>.html`, and `figure` (the chart that carries the finding) to
/// `ReportsDir/<experiment>-figure.html` and `.png` (`Plots.writeFigureIn`).
let finish (opts: ExperimentOptions) (experiment: string) (title: string) (notes: string list) (tables: Table list) (runDirs: string list) (figure: GenericChart) : ExperimentResult =
    for t in tables do printfn "\n%s" (Table.text t)
    for n in notes do printfn "%s" n
    Directory.CreateDirectory opts.ReportsDir |> ignore
    let md = Path.GetFullPath(Path.Combine(opts.ReportsDir, experiment + ".md"))
    let sb = StringBuilder()
    sb.AppendLine("## " + title).AppendLine() |> ignore
    sb.AppendLine(sprintf "Scale: %A; data: %s." opts.Scale (defaultArg opts.DataPath "built-in synthetic corpus")).AppendLine() |> ignore
    for t in tables do sb.AppendLine(Table.markdown t) |> ignore
    for n in notes do sb.AppendLine(n).AppendLine() |> ignore
    File.WriteAllText(md, sb.ToString(), UTF8Encoding(false))
    let page = Path.Combine(opts.ReportsDir, experiment + ".html")
    let report =
        if runDirs.IsEmpty then
            // No run folders (a layer benchmark): the page is the tables themselves.
            let esc = Plots.escape
            let html = StringBuilder()
            html.Append("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>").Append(esc title)
                .Append("</title><style>body{font-family:sans-serif;margin:2em} td,th{padding:2px 10px;text-align:right} td:first-child{text-align:left}</style></head><body>\n<h1>")
                .Append(esc title).Append("</h1>\n") |> ignore
            for t in tables do
                html.Append("<h2>").Append(esc t.Title).Append("</h2>\n<table>\n<tr>") |> ignore
                for c in t.Columns do html.Append("<th>").Append(esc c).Append("</th>") |> ignore
                html.Append("</tr>\n") |> ignore
                for r in t.Rows do
                    html.Append("<tr>") |> ignore
                    for c in r do html.Append("<td>").Append(esc c).Append("</td>") |> ignore
                    html.Append("</tr>\n") |> ignore
                html.Append("</table>\n") |> ignore
            for n in notes do html.Append("<p>").Append(esc n).Append("</p>\n") |> ignore
            html.Append("</body></html>\n") |> ignore
            let full = Path.GetFullPath page
            File.WriteAllText(full, html.ToString(), UTF8Encoding(false))
            full
        else Report.write { Report.defaults with Title = title } page runDirs
    printfn "report: %s" report
    printfn "table: %s" md
    let fig = Plots.writeFigureIn opts.Screenshot opts.ReportsDir experiment title figure
    printFigure fig
    { Tables = tables; Report = report; Markdown = md; Figure = fig; RunDirs = runDirs }

/// The headline figure of a main-job run (`scripts/train_topk.fsx`, `scripts/train_hash.fsx`): each expert's
/// share of tokens over training in the run's first MoE layer (`Plots.expertUsageLines`), written to
/// `reportsDir/<stem>-figure.html` and, when `screenshot` and Chromium is on PATH, `<stem>.png`; printed.
let runFigure (screenshot: bool) (reportsDir: string) (stem: string) (runDir: string) : Plots.Figure =
    let path = Path.Combine(runDir, FileNames.routing)
    let routing = if File.Exists path then RunLog.readRouting path else [||]
    match layersOf routing with
    | [||] -> invalidArg "runDir" (sprintf "expected MoE routing records in %s, got none (a dense model has no expert usage to plot)" path)
    | layers ->
        let run = Path.GetFileName runDir
        let chart =
            Plots.expertUsageLines layers[0] routing
            |> Chart.withTitle (sprintf "Share of tokens per expert over training, %s run, layer %s" (Plots.plotText run) (Plots.plotText layers[0]))
        let fig = Plots.writeFigureIn screenshot reportsDir stem (sprintf "Expert usage of %s" run) chart
        printFigure fig
        fig

// ---------------------------------------------------------------- the experiments

/// Experts per MoE layer in the quick and smoke experiments, and picks per token of top-k.
let private expertsOf (opts: ExperimentOptions) = if opts.Scale = Full then 8 else 4
let private topKPicks = 2

/// Common columns of a run: ROUGE-1/2/L F1 (x100), best validation loss.
let private qualityCells (r: RunRow) = [| Table.pct r.Rouge1; Table.pct r.Rouge2; Table.pct r.RougeL; Table.num 3 r.ValidLoss |]
let private qualityColumns = [| "R-1"; "R-2"; "R-L"; "valid loss" |]

/// Hash and top-k routing, each with and without a load-balancing loss (Switch Transformer eq. 4 with its
/// alpha, plus the ST-MoE z-loss): quality, load CV and collapsed experts at the end of training (per-layer
/// load over time is on the report page; the figure is each run's load CV over training steps). Hash routing
/// has no router, so neither loss has a gradient to give: with the same seed its two rows come out identical,
/// which is the point of the comparison (Roller et al. 2021: hash layers need no balancing).
let balanceAblation (opts: ExperimentOptions) : ExperimentResult =
    let experiment = "balance_ablation"
    let e = expertsOf opts
    let base' (variant: string) = summarizer opts experiment variant
    let configs =
        [ base' "hash" |> SummarizerConfig.hash e |> withLosses LossWeights.none
          base' "hash+balance" |> SummarizerConfig.hash e |> withLosses LossWeights.defaults
          base' "topk" |> SummarizerConfig.topK e topKPicks |> withLosses LossWeights.none
          base' "topk+balance" |> SummarizerConfig.topK e topKPicks |> withLosses LossWeights.defaults ]
    let results = runAll opts configs
    let rows = results |> List.map (fun r -> readRow r.RunDir)
    let table =
        { Title = sprintf "Load balancing ablation (%d experts; top-k picks %d)" e topKPicks
          Columns = Array.append [| "run" |] (Array.append qualityColumns [| "load CV"; "collapsed experts"; "max expert share" |])
          Rows =
            [| for r in rows ->
                let maxShare = if r.Balance.Length = 0 then nan else r.Balance |> Array.map (fun b -> Array.max b.Shares) |> Array.max
                Array.concat [ [| r.Name |]; qualityCells r; [| Table.num 3 r.LoadCv; string r.Collapsed; Table.num 3 maxShare |] ] |] }
    let notes =
        [ sprintf "Load CV: mean over MoE layers of std/mean of the expert loads at the last logged step (0 = balanced, %s = one expert takes all)."
              (Table.num 2 (sqrt (float (e - 1))))
          sprintf "Collapsed: experts below %g of the uniform share (RunLog.collapsedShareOfUniform), summed over layers." collapsedShareOfUniform
          "Hash routing has no router for the balancing losses to act on, so hash and hash+balance train identically (same seed)." ]
    let title = "Hash vs top-k routing, with and without a balancing loss"
    let figure =
        [| for r in rows -> r.Name, (RunLog.load r.RunDir).Routing |]
        |> Plots.loadCvOverTime
        |> Chart.withTitle (sprintf "Expert load over training (%d experts): load CV, mean over MoE layers" e)
    finish opts experiment title notes [ table ] (rows |> List.map (fun r -> r.RunDir)) figure

/// Router scorer x normaliser x selection, the classic gating variants, and a dense FFN of the same active
/// compute (hidden width k x the expert width). FLOPs per token are those of one FFN sublayer, forward,
/// from the config with the measured mean active experts per token (sparsemax's nonzeros). The figure puts
/// ROUGE-1, FLOPs per token and load CV of every variant side by side, best ROUGE-1 first.
let gatingStrategies (opts: ExperimentOptions) : ExperimentResult =
    let experiment = "gating_strategies"
    let e = expertsOf opts
    let moe (variant: string) = summarizer opts experiment variant |> SummarizerConfig.topK e topKPicks
    /// Shazeer et al. 2017 use w_importance = w_load = 0.1.
    let shazeerWeight = 0.1
    /// Expert choice with capacity factor k: on average k experts per token, as top-k (Zhou et al. 2022).
    let expertChoiceCapacity = float topKPicks
    /// DeepSeek-V3's bias update speed gamma = 0.001.
    let biasUpdateRate = 1e-3
    /// Attention router query width: a quarter of the model width.
    let routerDim (cfg: SummarizerConfig) = max 1 (cfg.Model.ModelDim / 4)
    let noAux = { LossWeights.defaults with SwitchAux = 0.0 }
    let grid =
        [ for scorerName, scorer in [ "linear", (fun (c: SummarizerConfig) -> LinearRouter); "attention", (fun c -> AttentionRouter(routerDim c)) ] do
            for normName, norm in [ "softmax", Softmax; "sparsemax", Sparsemax ] do
                for selName, sel, k in [ sprintf "top%d" topKPicks, TokenChoiceTopK(NormaliseThenTopK, true), topKPicks; "all", AllExperts, e ] do
                    let c = moe (sprintf "%s-%s-%s" scorerName normName selName)
                    yield c |> withRouter (fun r -> { r with Scorer = scorer c; Normaliser = norm; Selection = sel; K = k }) ]
    let dense =
        let c = summarizer opts experiment "dense-equal-compute"
        let hidden = match c.Model.Ffn with Dense h -> h | Moe m | LoraMoe (m, _) -> m.ExpertHidden
        { c with Model = { c.Model with Ffn = Dense(topKPicks * hidden) } }
    let variants =
        [ moe "naive-topk" |> withRouter (fun r -> { r with Selection = TokenChoiceTopK(NormaliseThenTopK, false) }) |> withLosses noAux
          moe "topk-mask" |> withLosses noAux
          moe "noisy-topk" |> withRouter (fun r -> { r with Selection = NoisyTopK }) |> withLosses noAux
          moe "noisy-topk+load" |> withRouter (fun r -> { r with Selection = NoisyTopK }) |> withLosses { noAux with Load = shazeerWeight }
          moe "topk-mask+importance" |> withLosses { noAux with Importance = shazeerWeight }
          moe "switch-top1-jitter" |> withRouter (fun r -> { r with Selection = SwitchTop1; K = 1 })
          moe "expert-choice" |> withRouter (fun r -> { r with Selection = ExpertChoice; Capacity = Factor expertChoiceCapacity })
          moe "loss-free-bias" |> withRouter (fun r -> { r with BiasUpdateRate = Some biasUpdateRate }) |> withLosses noAux
          dense ]
    let configs = grid @ variants
    let results = runAll opts configs
    /// Per run: its config, row, measured active experts per token, configured ones, and FFN FLOPs per token
    /// (at the measured active experts; the configured ones for the dense FFN).
    let rows =
        [ for cfg, r in List.zip configs results ->
            let row = readRow r.RunDir
            let probes = probe r.RunDir
            let active = if probes.IsEmpty then nan else probes |> List.averageBy (fun p -> p.MeanActive)
            let configured = match cfg.Model.Ffn with Moe m | LoraMoe (m, _) -> configuredActiveExperts m.Router | Dense _ -> nan
            row, active, configured, ffnFlops cfg (if Double.IsNaN active then configured else active) ]
    let table =
        { Title = sprintf "Gating strategies (%d experts, %s)" e (match opts.Scale with Full -> "full" | Quick -> "quick" | Smoke -> "smoke")
          Columns = Array.concat [ [| "run" |]; qualityColumns; [| "load CV"; "active experts/token"; "configured"; "FFN FLOPs/token" |] ]
          Rows =
            [| for r, active, configured, flops in rows ->
                Array.concat [ [| r.Name |]; qualityCells r; [| Table.num 3 r.LoadCv; Table.num 2 active; Table.num 0 configured; Table.si flops |] ] |] }
    let notes =
        [ "Active experts/token: measured on the test split with the trained router (kept slots with a nonzero weight), mean over layers; n/a for the dense FFN."
          "FFN FLOPs/token: one FFN sublayer, forward, multiply-add = 2: router + active experts x 2 D H x matrices (Analysis.moeFlops)." ]
    let byQuality = rows |> List.map (fun (r, _, _, flops) -> r, flops) |> List.sortByDescending (fun (r, _) -> r.Rouge1) |> List.toArray
    let figure =
        Plots.barPanels "Gating strategies, best ROUGE-1 first: quality, compute and load balance"
            (byQuality |> Array.map (fun (r, _) -> r.Name))
            [ { Title = "test ROUGE-1 F1 × 100"; Values = byQuality |> Array.map (fun (r, _) -> 100.0 * r.Rouge1); Text = byQuality |> Array.map (fun (r, _) -> Table.pct r.Rouge1) }
              { Title = "FFN FLOPs per token (forward)"; Values = byQuality |> Array.map snd; Text = byQuality |> Array.map (snd >> Table.si) }
              { Title = "load CV at the last step (0 = balanced)"; Values = byQuality |> Array.map (fun (r, _) -> r.LoadCv); Text = byQuality |> Array.map (fun (r, _) -> Table.num 3 r.LoadCv) } ]
    finish opts experiment "Gating strategies" notes [ table ] (rows |> List.map (fun (r, _, _, _) -> r.RunDir)) figure

/// Decodes `steps` positions of the run's first test references with teacher forcing and a KV cache, from its
/// best checkpoint: returns the decoder cache's self-attention bytes per target token (all layers) and the
/// milliseconds per decoding step of a batch.
let private decodeCost (runDir: string) (steps: int) : float * float =
    use loaded = Summarizer.load runDir None Native.Cpu
    let cfg = loaded.Config
    let docs = readLinesOf (Path.Combine(runDir, FileNames.documents))
    let refs = readLinesOf (Path.Combine(runDir, FileNames.references))
    let examples = Array.map2 (fun d r -> { Id = ""; Document = d; Summary = r; Label = None }) docs refs
    if examples.Length = 0 then nan, nan
    else
        let source = TokenizedSet(loaded.Tokenizer, examples) :> ITokenSource
        let indices = Array.init (min cfg.Batching.BatchSize examples.Length) id
        use _ = torch.no_grad ()
        use _ = torch.NewDisposeScope()
        let b = Batching.collate cfg.Batching source indices
        let enc = loaded.Model.Encode(b.Source, b.SourceMask)
        use cache = loaded.Model.NewCache()
        let length = min (int b.DecoderInput.shape[1]) steps
        let watch = Stopwatch.StartNew()
        for t in 0 .. length - 1 do
            use _ = torch.NewDisposeScope()
            let tok = b.DecoderInput.narrow(1L, int64 t, 1L)                                 // [B; 1]
            loaded.Model.Decode(enc.Memory, b.SourceMask, tok, null, cache) |> ignore
        let ms = watch.Elapsed.TotalMilliseconds / float length
        float cache.SelfAttentionBytes / float (int64 indices.Length * int64 length), ms

/// Top-k MoE with the grouped-query attention written here against the library's scaled-dot-product
/// attention (key/value heads expanded first), for several key/value head counts (Ainslie et al. 2023):
/// quality, training tokens/s (metrics.jsonl), KV cache bytes per token (analytic and measured while decoding).
/// The figure: measured KV cache bytes per token, ROUGE-1 and decode ms per step of each variant.
let attentionGqa (opts: ExperimentOptions) : ExperimentResult =
    let experiment = "attention_gqa"
    let e = expertsOf opts
    let probeCfg = summarizer opts experiment "probe"
    let heads = probeCfg.Model.Heads
    let kvCounts = [ heads; heads / 2; 1 ] |> List.filter (fun g -> g >= 1 && heads % g = 0) |> List.distinct
    /// Decoding steps timed per run: enough to average over, within the references' length.
    let decodeSteps = if opts.Scale = Smoke then 4 else 16
    /// float32 caches.
    let elementBytes = 4
    let configs =
        [ for impl, implName in [ Handwritten, "gqa-here"; Library, "library" ] do
            for g in kvCounts ->
                let c = summarizer opts experiment (sprintf "%s-kv%d" implName g) |> SummarizerConfig.topK e topKPicks
                { c with Model = { c.Model with KvHeads = g; Attention = impl } } ]
    let results = runAll opts configs
    let rows =
        [ for cfg, r in List.zip configs results ->
            let row = readRow r.RunDir
            let attn = { ModelDim = cfg.Model.ModelDim; Heads = cfg.Model.Heads; KvHeads = cfg.Model.KvHeads; Dropout = 0.0; Impl = cfg.Model.Attention }
            let analytic = float (AttentionConfig.kvBytesPerToken attn elementBytes) * float cfg.Model.DecoderLayers
            let measured, ms = decodeCost r.RunDir decodeSteps
            cfg, row, analytic, measured, ms ]
    let table =
        { Title = sprintf "Grouped-query attention, %d query heads, top-%d of %d experts" heads topKPicks e
          Columns = Array.concat [ [| "run"; "impl"; "KV heads" |]; qualityColumns; [| "train tok/s"; "KV B/token (analytic)"; "KV B/token (measured)"; "decode ms/step" |] ]
          Rows =
            [| for cfg, r, analytic, measured, ms in rows ->
                Array.concat
                    [ [| r.Name; sprintf "%A" cfg.Model.Attention; string cfg.Model.KvHeads |]; qualityCells r
                      [| Table.num 0 r.TokensPerS; Table.num 0 analytic; Table.num 0 measured; Table.num 2 ms |] ] |] }
    let notes =
        [ "KV B/token: self-attention cache bytes one target token adds over all decoder layers (float32); analytic = 2 G Dh x 4 B x layers, measured = DecoderCache.SelfAttentionBytes after teacher-forced decoding of the first test batch."
          "Speed: mean training tokens/s from metrics.jsonl; decode ms/step on that batch with the cache." ]
    let figure =
        let runs = rows |> List.map (fun (_, r, _, measured, ms) -> r, measured, ms) |> List.toArray
        Plots.barPanels (sprintf "Grouped-query attention (%d query heads): KV cache, quality and decoding speed" heads)
            (runs |> Array.map (fun (r, _, _) -> r.Name))
            [ { Title = "KV cache bytes per target token (measured)"; Values = runs |> Array.map (fun (_, m, _) -> m); Text = runs |> Array.map (fun (_, m, _) -> Table.num 0 m) }
              { Title = "test ROUGE-1 F1 × 100"; Values = runs |> Array.map (fun (r, _, _) -> 100.0 * r.Rouge1); Text = runs |> Array.map (fun (r, _, _) -> Table.pct r.Rouge1) }
              { Title = "decode ms per step (with KV cache)"; Values = runs |> Array.map (fun (_, _, ms) -> ms); Text = runs |> Array.map (fun (_, _, ms) -> Table.num 2 ms) } ]
    finish opts experiment "Grouped-query attention: written here vs library" notes [ table ] (rows |> List.map (fun (_, r, _, _, _) -> r.RunDir)) figure

/// One timed MoE layer configuration of `flopsTopkVsSparsemax`.
type LayerTiming =
    { Label: string
      Config: MoeConfig
      /// Experts per token the config implies.
      Configured: float
      /// Mean experts per token with a kept slot and nonzero weight on the timed input.
      MeasuredActive: float
      /// Forward plus backward, microseconds per token (median over repeats).
      MicrosPerToken: float }

/// Times one MoE layer's forward and backward on `tokens` random tokens (normal, unit variance), `repeats`
/// times after one warm-up, and measures its mean active experts per token on that input.
let timeMoeLayer (label: string) (cfg: MoeConfig) (tokens: int) (repeats: int) : LayerTiming =
    use layer = new MoeLayer("moe", cfg)
    layer.train ()
    use x = torch.randn([| int64 tokens; int64 cfg.ModelDim |])                             // [T; D]
    let active =
        use _ = torch.no_grad ()
        use _ = torch.NewDisposeScope()
        let r = layer.Router.Route(x, None)                                                   // [T; K]
        float (r.Kept.logical_and(r.Weights.gt(torch.tensor 0.0f)).sum().item<int64> ()) / float tokens
    let once () =
        use _ = torch.NewDisposeScope()
        layer.zero_grad ()
        let watch = Stopwatch.StartNew()
        let y = layer.forward x
        y.Output.sum().backward ()
        watch.Elapsed.TotalMilliseconds * 1000.0 / float tokens
    once () |> ignore
    let times = Array.init repeats (fun _ -> once ()) |> Array.sort
    { Label = label; Config = cfg; Configured = configuredActiveExperts cfg.Router; MeasuredActive = active
      MicrosPerToken = times[times.Length / 2] }

/// FLOPs and time per token against the number of active experts: token-choice top-k for k = 1 .. E, and
/// sparsemax over all experts (Martins & Astudillo 2016) for several E, whose active experts are its mean
/// nonzeros per token. Analytic FLOPs use the configured experts per token; "routed" FLOPs use the measured
/// ones; time is the layer's forward + backward measured here (dispatch computes only kept slots' experts).
/// The figure: FLOPs (analytic, at the measured active experts) and measured time per token against active
/// experts, a line for top-k and one for sparsemax.
let flopsTopkVsSparsemax (opts: ExperimentOptions) : ExperimentResult =
    let experiment = "flops_topk_vs_sparsemax"
    let modelDim, hidden, tokens, repeats, experts =
        match opts.Scale with
        | Smoke -> 16, 32, 32, 1, 4
        | Quick -> 64, 128, 512, 5, 8
        | Full -> 512, 2048, 4096, 10, 16
    let layerCfg (e: int) (k: int) (selection: Selection) (normaliser: Normaliser) =
        { MoeConfig.defaults with
            ModelDim = modelDim
            ExpertHidden = hidden
            Router = { RouterConfig.defaults with Experts = e; K = k; Selection = selection; Normaliser = normaliser } }
    let topK = [ for k in 1 .. experts do if k = 1 || k = experts || (k &&& (k - 1)) = 0 then yield k ]
    Native.seedAll 0
    let timings =
        [ for k in topK -> timeMoeLayer (sprintf "top-%d of %d" k experts) (layerCfg experts k (TokenChoiceTopK(NormaliseThenTopK, true)) Softmax) tokens repeats
          for e in [ experts / 2; experts; experts * 2 ] -> timeMoeLayer (sprintf "sparsemax of %d" e) (layerCfg e e AllExperts Sparsemax) tokens repeats ]
    let table =
        { Title = sprintf "FLOPs and time per token: top-k vs sparsemax (D = %d, expert hidden %d, %d tokens)" modelDim hidden tokens
          Columns = [| "layer"; "experts"; "configured experts/token"; "measured active/token"; "FLOPs/token (analytic)"; "FLOPs/token (routed)"; "fwd+bwd us/token" |]
          Rows =
            [| for t in timings ->
                [| t.Label; string t.Config.Router.Experts; Table.num 0 t.Configured; Table.num 2 t.MeasuredActive
                   Table.si (moeFlops t.Config t.Configured); Table.si (moeFlops t.Config t.MeasuredActive); Table.num 2 t.MicrosPerToken |] |] }
    let notes =
        [ "FLOPs/token: forward, multiply-add = 2 (Analysis.moeFlops); backward costs about twice the forward."
          sprintf "Time: median of %d forward+backward passes of one MoE layer on random inputs (after a warm-up), this machine's CPU." repeats ]
    let series (name: string) (isTopK: bool) (y: LayerTiming -> float) : Plots.Series =
        let ts = timings |> List.filter (fun t -> (t.Config.Router.Normaliser = Sparsemax) <> isTopK) |> List.sortBy (fun t -> t.MeasuredActive) |> List.toArray
        { Name = name
          X = ts |> Array.map (fun t -> t.MeasuredActive)
          Y = ts |> Array.map y
          Labels = ts |> Array.map (fun t -> if isTopK then sprintf "k=%d" t.Config.Router.K else sprintf "E=%d" t.Config.Router.Experts) }
    let panel (yTitle: string) (y: LayerTiming -> float) : Plots.LinePanel =
        { XTitle = "active experts per token (measured)"; YTitle = yTitle; LogX = false
          Series = [ series (sprintf "top-k of %d" experts) true y; series "sparsemax of E" false y ] }
    let figure =
        Plots.linePanels (sprintf "Cost per token against active experts: top-k vs sparsemax (D = %d, H = %d)" modelDim hidden)
            [ panel "FLOPs per token, forward (analytic)" (fun t -> moeFlops t.Config t.MeasuredActive)
              panel "µs per token, forward + backward (measured)" (fun t -> t.MicrosPerToken) ]
    finish opts experiment "FLOPs per token: top-k vs sparsemax" notes [ table ] [] figure

/// Which experts serve which topics and token kinds: per MoE layer, the mutual information between the
/// example's topic and the expert (routing_by_label.json, teacher forcing on the test split) and between the
/// token's kind and the expert (the probe), with their upper bounds H(topic) and H(kind). Heatmaps of
/// expert use by topic are on the report page; the figure is the top-k run's most topic-specialised layer
/// (by I / H; token kinds when the data has no topics). Top-k routing learns the assignment; hash routing fixes it
/// by token id, a baseline for how much of the information comes from token identity alone.
let expertSpecialisation (opts: ExperimentOptions) : ExperimentResult =
    let experiment = "expert_specialisation"
    let e = expertsOf opts
    let configs =
        [ summarizer opts experiment "topk" |> SummarizerConfig.topK e topKPicks
          summarizer opts experiment "hash" |> SummarizerConfig.hash e |> withLosses LossWeights.none ]
    let results = runAll opts configs
    /// Per run and MoE layer: the [topic; expert] counts of routing_by_label.json (absent for unlabelled data).
    let topicUsage =
        [ for r in results do
            let path = Path.Combine(r.RunDir, FileNames.routingByLabel)
            if File.Exists path then
                for u in readRoutingByLabel path -> Path.GetFileName r.RunDir, u ]
    /// Per run and MoE layer: the [kind; expert] counts the probe saw, as a `LabelUsage` over token kinds.
    let kindUsage =
        [ for r in results do
            use loaded = Summarizer.load r.RunDir None Native.Cpu
            let tok = loaded.Tokenizer :> Tokenizers.ITokenizer
            for p in probe r.RunDir do
                let kinds = Dictionary<string, float[]>()
                p.ByTokenId |> Array.iteri (fun id row ->
                    if Array.sum row > 0.0 then
                        let kind = if id < Tokenizers.SpecialCount then "special" else tokenKind (tok.Decode [| id |])
                        let acc = match kinds.TryGetValue kind with | true, a -> a | _ -> (let a = Array.zeroCreate p.Experts in kinds[kind] <- a; a)
                        row |> Array.iteri (fun j c -> acc[j] <- acc[j] + c))
                let names = kinds.Keys |> Seq.sort |> Seq.toArray
                if names.Length > 0 then
                    yield Path.GetFileName r.RunDir, { Layer = p.Layer; Labels = names; Experts = p.Experts; Counts = names |> Array.map (fun k -> kinds[k]) } ]
    /// I(label; expert), H(label) and I / H (n/a when H = 0) of a usage table.
    let information (u: LabelUsage) =
        let mi = mutualInformation u.Counts
        let h = entropy (u.Counts |> Array.map Array.sum)
        mi, h, (if h > 0.0 then mi / h else nan)
    let topicRows =
        [| for run, u in topicUsage ->
             let mi, h, ratio = information u
             [| run; u.Layer; string u.Labels.Length; Table.num 3 mi; Table.num 3 h; Table.num 3 ratio |] |]
    let kindRows =
        [| for run, u in kindUsage ->
             let mi, h, ratio = information u
             let favourite (k: int) =
                 let row = u.Counts[k]
                 let j = Array.findIndex ((=) (Array.max row)) row
                 sprintf "%s: e%d %.0f%%" u.Labels[k] j (100.0 * row[j] / Array.sum row)
             [| run; u.Layer; string u.Labels.Length; Table.num 3 mi; Table.num 3 h
                (if h > 0.0 then Table.num 3 ratio else "n/a"); String.Join("; ", Array.init u.Labels.Length favourite) |] |]
    let topics =
        { Title = "Topic vs expert: mutual information per layer (nats)"
          Columns = [| "run"; "layer"; "topics"; "I(topic; expert)"; "H(topic)"; "I / H" |]
          Rows = topicRows }
    let kinds =
        { Title = "Token kind vs expert: mutual information per layer (nats), and each kind's most used expert"
          Columns = [| "run"; "layer"; "kinds"; "I(kind; expert)"; "H(kind)"; "I / H"; "most used expert per kind" |]
          Rows = kindRows }
    let notes =
        [ "I(topic; expert): Analysis.mutualInformation of the [topic; expert] assignment counts in routing_by_label.json; 0 = experts ignore the topic, H(topic) = each expert serves one topic."
          "Token kinds from each token's text (Analysis.tokenKind), counted by the probe over test documents and references." ]
    // The figure: the learned (top-k) run's most topic-specialised layer; token kinds where the data has no topics.
    let learned = Path.GetFileName results.Head.RunDir
    let figure =
        let usage, what = if topicUsage.IsEmpty then kindUsage, "token kind" else topicUsage, "topic"
        match usage |> List.filter (fst >> (=) learned) with
        | [] -> invalidOp (sprintf "expected routing counts of the %s run's MoE layers, got none" learned)
        | own ->
            let _, best = own |> List.maxBy (fun (_, u) -> let _, _, ratio = information u in if Double.IsNaN ratio then -1.0 else ratio)
            let mi, h, _ = information best
            Plots.labelUsageHeatmap best
            |> Chart.withTitle (sprintf "Expert use by %s, %s %s: I(%s; expert) = %s nats of H(%s) = %s" what (Plots.plotText learned) (Plots.plotText best.Layer) what (Table.num 3 mi) what (Table.num 3 h))
            |> Chart.withYAxisStyle(TitleText = what)
    finish opts experiment "Expert specialisation by topic and token kind" notes [ topics; kinds ] (results |> List.map (fun r -> r.RunDir)) figure

/// Sparse upcycling (Komatsuzaki et al. 2023): (a) a dense model trained N steps; (b) that model trained M
/// more steps; (c) that model upcycled to a top-2-of-E MoE (`Upcycle.copyInto`: every expert a copy of its
/// layer's FFN, routers fresh) and trained M more steps; (d) the same MoE from scratch for N + M steps. N and
/// M are the scale's step count. Runs (b) and (c) start from (a)'s last checkpoint with a fresh optimizer and
/// learning-rate schedule (warm-up included), as the paper restarts from a dense checkpoint. The figure:
/// validation loss over cumulative steps, (b) and (c) shifted by N.
let upcycling (opts: ExperimentOptions) : ExperimentResult =
    let experiment = "upcycling"
    let e = expertsOf opts
    let base' (variant: string) = summarizer opts experiment variant
    let stepsOf (cfg: SummarizerConfig) = cfg.Train.Steps
    let withSteps (steps: int) (cfg: SummarizerConfig) = { cfg with Train = { cfg.Train with Steps = steps } }
    let n = stepsOf (base' "dense")
    let m = n
    let runOpts = { RunOptions.Defaults with Progress = (if opts.Verbose then Lines else Silent); Overwrite = true }
    let runOne (i: int) (init: (EncoderDecoder -> unit) option) (cfg: SummarizerConfig) =
        printfn "[%d/4] %s ..." i cfg.Name
        let r = Summarizer.runWithInit runOpts false init cfg
        printfn "[%d/4] %s: %d steps in %.0f s" i cfg.Name r.Train.Steps r.Train.ElapsedSeconds
        r
    let dense = runOne 1 None (base' "dense" |> withSteps n)
    let denseCheckpoint = dense.Train.LastCheckpoint
    let continued = runOne 2 (Some(Checkpoint.loadModel denseCheckpoint)) (base' "dense-continued" |> withSteps m)
    let upcycled =
        use trained = Summarizer.load dense.RunDir (Some denseCheckpoint) Native.Auto
        runOne 3 (Some(Upcycle.copyInto trained.Model)) (base' "upcycled" |> SummarizerConfig.topK e topKPicks |> withSteps m)
    let scratch = runOne 4 None (base' "moe-scratch" |> SummarizerConfig.topK e topKPicks |> withSteps (n + m))
    let runs = [ dense, 0, n; continued, n, n + m; upcycled, n, n + m; scratch, 0, n + m ]
    let rows = runs |> List.map (fun (r, offset, total) -> readRow r.RunDir, offset, total)
    let counts (runDir: string) =
        match RunFiles.readParameters runDir with
        | Some(Ok p) -> Table.si (float p.Total), Table.si (float p.Active)
        | Some(Error why) -> invalidOp why
        | None -> invalidOp (sprintf "expected %s in %s" RunFiles.parametersName runDir)
    let table =
        { Title = sprintf "Sparse upcycling: dense %d steps, then %d more dense, upcycled (top-%d of %d) or MoE from scratch" n m topKPicks e
          Columns = Array.concat [ [| "run"; "steps (cumulative)" |]; qualityColumns; [| "parameters"; "active parameters" |] ]
          Rows =
            [| for r, offset, total in rows ->
                let total', active = counts r.RunDir
                Array.concat [ [| r.Name; (if offset = 0 then string total else sprintf "%d + %d" offset (total - offset)) |]; qualityCells r; [| total'; active |] ] |] }
    let notes =
        [ sprintf "dense-continued and upcycled start from dense's last checkpoint (step %d) with a fresh optimizer and schedule; upcycled experts are copies of the dense FFNs, routers fresh (Komatsuzaki et al. 2023)." n
          "Valid loss: the lowest validation loss of the run; quality: ROUGE F1 x100 on the test split, decoded with the run's best checkpoint." ]
    let title = "Sparse upcycling: continuing a dense model vs upcycling it to an MoE"
    let figure =
        [| for r, offset, _ in rows -> r.Name, offset, (RunLog.load r.RunDir).Metrics |]
        |> Plots.validLossOverSteps
        |> Chart.withTitle (sprintf "Validation loss over cumulative steps (MoE: top-%d of %d)" topKPicks e)
    finish opts experiment title notes [ table ] (rows |> List.map (fun (r, _, _) -> r.RunDir)) figure
