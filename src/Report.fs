/// One self-contained HTML page comparing runs: their configs side by side (differing fields
/// highlighted), the test metrics with confidence intervals, every chart of `Plots`, load balance
/// per layer and a few aligned samples (document excerpt, reference, each model's prediction).
/// All text from the runs is HTML-escaped; plotly.js is embedded so the page works offline.
module Moe.Report

open System
open System.IO
open System.Text
open Plotly.NET
open Moe.RunLog

/// What the page shows.
type ReportOptions =
    { Title: string
      /// Examples shown per test set, spread evenly over it.
      Samples: int
      /// Characters of each document shown before it is cut with "…".
      ExcerptChars: int
      /// Collapse threshold as a fraction of the uniform share (see `RunLog.collapsedShareOfUniform`).
      CollapseBelow: float }

/// Three samples of 600 characters: enough to judge a summary without scrolling past the charts.
let defaults =
    { Title = "MoE run comparison"
      Samples = 3
      ExcerptChars = 600
      CollapseBelow = collapsedShareOfUniform }

/// Every problem with the options, at once.
let validate (o: ReportOptions) : string list =
    [ if o.Samples < 0 then yield sprintf "Samples: expected >= 0, got %d" o.Samples
      if o.ExcerptChars < 1 then yield sprintf "ExcerptChars: expected >= 1, got %d" o.ExcerptChars
      if not (o.CollapseBelow >= 0.0 && o.CollapseBelow <= 1.0) then yield sprintf "CollapseBelow: expected in [0, 1], got %g" o.CollapseBelow ]

let private esc = Plots.escape

/// Runs renamed "name (2)", "name (3)" where folders share a name, so columns stay distinguishable.
let uniqueNames (runs: Run[]) : Run[] =
    let seen = Collections.Generic.Dictionary<string, int>()
    runs |> Array.map (fun r ->
        match seen.TryGetValue r.Name with
        | true, k ->
            seen.[r.Name] <- k + 1
            { r with Name = sprintf "%s (%d)" r.Name (k + 1) }
        | _ ->
            seen.[r.Name] <- 1
            r)

// ---------------------------------------------------------------------------------------------
// Configs

/// Config rows: every leaf path of any run's config.json in first-seen order, each run's value
/// (None where its config lacks the path) and whether the runs disagree.
let configRows (runs: Run[]) : (string * string option[] * bool)[] =
    let withConfig = runs |> Array.map (fun r -> r.Config |> Option.defaultValue [||])
    let paths = withConfig |> Array.collect (Array.map (fun e -> e.Path)) |> Array.distinct
    let lookup = withConfig |> Array.map (fun entries -> entries |> Array.map (fun e -> e.Path, e.Value) |> dict)
    paths |> Array.map (fun path ->
        let values = lookup |> Array.map (fun d -> match d.TryGetValue path with | true, v -> Some v | _ -> None)
        path, values, (values |> Array.distinct |> Array.length) > 1)

let private configSection (runs: Run[]) (sb: StringBuilder) =
    sb.Append("<h2 id=\"configs\">Configs</h2>\n") |> ignore
    if runs |> Array.forall (fun r -> r.Config.IsNone) then
        sb.Append("<p class=\"note\">No run has a config.json.</p>\n") |> ignore
    else
        let rows = configRows runs
        let differing = rows |> Array.filter (fun (_, _, d) -> d) |> Array.length
        sb.AppendFormat("<p>{0} of {1} fields differ (highlighted).</p>\n", differing, rows.Length) |> ignore
        sb.Append("<div class=\"scroll\"><table class=\"config\"><thead><tr><th>field</th>") |> ignore
        for r in runs do sb.Append("<th>").Append(esc r.Name).Append("</th>") |> ignore
        sb.Append("</tr></thead><tbody>\n") |> ignore
        for path, values, differs in rows do
            sb.Append(if differs then "<tr class=\"differs\">" else "<tr>").Append("<td class=\"path\">").Append(esc path).Append("</td>") |> ignore
            for v in values do
                match v with
                | Some text -> sb.Append("<td>").Append(esc text).Append("</td>") |> ignore
                | None -> sb.Append("<td class=\"absent\">absent</td>") |> ignore
            sb.Append("</tr>\n") |> ignore
        sb.Append("</tbody></table></div>\n") |> ignore

// ---------------------------------------------------------------------------------------------
// Metrics

/// Systems to compare, models first (in run order, so colours match the other charts), labelled:
/// each run's `model` by the run's name; another system (a baseline
/// such as lead1) by its own name when every run that scored it agrees on its scores (it is shown
/// once), else as "run / system".
let comparedSystems (runs: Run[]) : (string * SystemScores)[] =
    let scored = runs |> Array.collect (fun r -> r.Scores |> Option.defaultValue [||] |> Array.map (fun s -> r.Name, s))
    let sameScores (a: SystemScores) (b: SystemScores) = a.Rouge = b.Rouge && a.Scalars = b.Scalars && a.Intervals = b.Intervals
    let agreed (system: string) =
        let all = scored |> Array.filter (fun (_, s) -> s.System = system) |> Array.map snd
        all |> Array.forall (sameScores all.[0])
    let shown = Collections.Generic.HashSet<string>()
    [| for run, s in scored do
        if s.System = "model" then yield run, s
       for run, s in scored do
        if s.System <> "model" then
            if not (agreed s.System) then yield sprintf "%s / %s" run s.System, s
            elif shown.Add s.System then yield s.System, s |]

/// Number format of the metrics table: ROUGE as F1 × 100 and other scores as written, 2 decimals
/// (the precision papers report).
let private formatScore (v: float) = if Double.IsNaN v then "n/a" else v.ToString("0.00", Globalization.CultureInfo.InvariantCulture)

let private metricsSection (runs: Run[]) (sb: StringBuilder) =
    sb.Append("<h2 id=\"metrics\">Test metrics</h2>\n") |> ignore
    let systems = comparedSystems runs
    if systems.Length = 0 then
        sb.Append("<p class=\"note\">No run has a test_scores.json.</p>\n") |> ignore
    else
        let rougeKeys = systems |> Array.collect (fun (_, s) -> s.Rouge |> Map.keys |> Seq.toArray) |> Array.distinct |> Array.sort
        let scalarKeys =
            let keys = systems |> Array.collect (fun (_, s) -> s.Scalars |> Map.keys |> Seq.toArray) |> Array.distinct |> Array.sort
            Array.append (keys |> Array.filter ((=) "bleu")) (keys |> Array.filter ((<>) "bleu"))
        sb.Append("<p>ROUGE: F1 × 100; other scores as written by <code>moe score</code> (BLEU 0-100). Brackets: 95% bootstrap interval where computed.</p>\n") |> ignore
        sb.Append("<div class=\"scroll\"><table class=\"metrics\"><thead><tr><th>system</th><th>n</th>") |> ignore
        for k in rougeKeys do sb.Append("<th>").Append(esc k).Append("</th>") |> ignore
        for k in scalarKeys do sb.Append("<th>").Append(esc k).Append("</th>") |> ignore
        sb.Append("</tr></thead><tbody>\n") |> ignore
        let cell (value: float option) (ci: Interval option) (scale: float) =
            match value with
            | None -> "<td class=\"absent\">–</td>"
            | Some v ->
                let ciText =
                    match ci with
                    | Some c -> sprintf " <span class=\"ci\">[%s, %s]</span>" (formatScore (c.Low * scale)) (formatScore (c.High * scale))
                    | None -> ""
                sprintf "<td>%s%s</td>" (formatScore (v * scale)) ciText
        for label, s in systems do
            sb.Append("<tr><td>").Append(esc label).Append("</td><td>").Append(match s.N with Some n -> string n | None -> "–").Append("</td>") |> ignore
            for k in rougeKeys do sb.Append(cell (s.Rouge.TryFind k |> Option.map (fun p -> p.F1)) (s.IntervalOf k) 100.0) |> ignore
            for k in scalarKeys do sb.Append(cell (s.Scalars.TryFind k) (s.IntervalOf k) 1.0) |> ignore
            sb.Append("</tr>\n") |> ignore
        sb.Append("</tbody></table></div>\n") |> ignore

// ---------------------------------------------------------------------------------------------
// Load balance

let private balanceSection (options: ReportOptions) (runs: Run[]) (sb: StringBuilder) =
    let withRouting = runs |> Array.filter (fun r -> r.Routing.Length > 0)
    if withRouting.Length > 0 then
        sb.AppendFormat("<h3>Load balance at the last logged step</h3>\n<p>Collapsed: share below {0} of the uniform 1/E.</p>\n",
                        options.CollapseBelow.ToString(Globalization.CultureInfo.InvariantCulture)) |> ignore
        sb.Append("<table class=\"balance\"><thead><tr><th>run</th><th>layer</th><th>step</th><th>experts</th><th>load CV</th><th>collapsed experts</th></tr></thead><tbody>\n") |> ignore
        for r in withRouting do
            for b in finalBalance options.CollapseBelow r.Routing do
                let collapsed = if b.CollapsedExperts.Length = 0 then "none" else String.Join(", ", b.CollapsedExperts)
                sb.AppendFormat("<tr><td>{0}</td><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td><td>{5}</td></tr>\n",
                                esc r.Name, esc b.Layer, b.Step, b.Shares.Length,
                                (if Double.IsNaN b.LoadCv then "n/a" else b.LoadCv.ToString("0.000", Globalization.CultureInfo.InvariantCulture)),
                                collapsed) |> ignore
        sb.Append("</tbody></table>\n") |> ignore

// ---------------------------------------------------------------------------------------------
// Charts

/// A titled group of charts on the page.
type ChartSection = { Heading: string; Charts: GenericChart[] }

/// The charts of the page in sections: a comparison across runs first, then each run's own
/// (expert usage per layer, auxiliary losses, router entropy, dropped fraction, usage by label),
/// titled with the run's name.
let charts (options: ReportOptions) (runs: Run[]) : ChartSection[] =
    let titled (title: string) (chart: GenericChart) = chart |> Chart.withTitle (Plots.plotText title)
    let systems = comparedSystems runs
    let comparison =
        [| let plotted (s: SystemScores) = Plots.comparedMetrics |> Array.exists (fun (_, key, _) -> (Plots.metricValue s key).IsSome)
           if systems |> Array.exists (snd >> plotted) then yield Plots.metricsComparison systems
           let withMetrics = runs |> Array.filter (fun r -> r.Metrics |> Array.exists (fun m -> m.Split = Splits.train || m.Split = Splits.valid))
           if withMetrics.Length > 0 then yield Plots.lossCurves (withMetrics |> Array.map (fun r -> r.Name, r.Metrics))
           if runs |> Array.exists (fun r -> r.Routing.Length > 0) then
               let routing = runs |> Array.map (fun r -> r.Name, r.Routing)
               yield Plots.routerDistribution routing
               yield Plots.loadBalance options.CollapseBelow routing |]
    // Heatmap and lines of a layer come first, in pairs, so that they sit side by side.
    let perRun (r: Run) =
        [| for layer in layersOf r.Routing do
               yield Plots.expertUsageHeatmap layer r.Routing |> titled (sprintf "%s: expert usage over time, %s" r.Name layer)
               yield Plots.expertUsageLines layer r.Routing |> titled (sprintf "%s: share of tokens per expert, %s" r.Name layer)
           if r.Metrics |> Array.exists (fun m -> m.Split = Splits.train && not m.Aux.IsEmpty) then
               yield Plots.auxLossCurves r.Name r.Metrics |> titled (sprintf "%s: auxiliary losses (unweighted)" r.Name)
           if r.Routing.Length > 0 then
               yield Plots.routerEntropy r.Routing |> titled (sprintf "%s: router entropy (nats)" r.Name)
               yield Plots.droppedFraction r.Routing |> titled (sprintf "%s: dropped token assignments" r.Name)
           for usage in r.ByLabel |> Option.defaultValue [||] do
               yield Plots.labelUsageHeatmap usage |> titled (sprintf "%s: expert usage by label, %s" r.Name usage.Layer) |]
    [| yield { Heading = "Comparison"; Charts = comparison }
       for r in runs -> { Heading = sprintf "Run %s" r.Name; Charts = perRun r } |]
    |> Array.filter (fun section -> section.Charts.Length > 0)

// ---------------------------------------------------------------------------------------------
// Samples

/// `count` indices spread evenly over `n` examples (the first always included).
let sampleIndices (count: int) (n: int) : int[] =
    let k = min count n
    Array.init k (fun i -> i * n / k)

let private excerpt (chars: int) (text: string) =
    if text.Length <= chars then text else text.Substring(0, chars).TrimEnd() + " …"

let private samplesSection (options: ReportOptions) (runs: Run[]) (sb: StringBuilder) =
    sb.Append("<h2 id=\"samples\">Samples</h2>\n") |> ignore
    let withTexts = runs |> Array.choose (fun r -> r.Texts |> Option.map (fun t -> r, t))
    if withTexts.Length = 0 || options.Samples = 0 then
        sb.Append("<p class=\"note\">No run has predictions.txt and references.txt.</p>\n") |> ignore
    else
        let example (index: int) (document: string option) (reference: string) (predictions: (string * string)[]) =
            sb.AppendFormat("<div class=\"sample\"><h3>Example {0}</h3>\n", index + 1) |> ignore
            match document with
            | Some d -> sb.Append("<p class=\"doc\"><b>Document:</b> ").Append(esc (excerpt options.ExcerptChars d)).Append("</p>\n") |> ignore
            | None -> ()
            sb.Append("<p class=\"ref\"><b>Reference:</b> ").Append(esc reference).Append("</p>\n<table class=\"preds\">") |> ignore
            for name, p in predictions do
                sb.Append("<tr><th>").Append(esc name).Append("</th><td>").Append(esc p).Append("</td></tr>") |> ignore
            sb.Append("</table></div>\n") |> ignore
        let first = snd withTexts.[0]
        let shared = withTexts |> Array.forall (fun (_, t) -> t.References = first.References)
        if shared then
            let document i = withTexts |> Array.tryPick (fun (_, t) -> t.Documents |> Option.map (fun d -> d.[i]))
            for i in sampleIndices options.Samples first.References.Length do
                example i (document i) first.References.[i] (withTexts |> Array.map (fun (r, t) -> r.Name, t.Predictions.[i]))
        else
            sb.Append("<p class=\"note\">The runs were tested on different references; samples are shown per run.</p>\n") |> ignore
            for r, t in withTexts do
                for i in sampleIndices options.Samples t.References.Length do
                    example i (t.Documents |> Option.map (fun d -> d.[i])) t.References.[i] [| r.Name, t.Predictions.[i] |]

// ---------------------------------------------------------------------------------------------
// Page

let private style = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: #f2f4f7; }
tr.differs td { background: #fff3bf; }
td.absent { color: #999; font-style: italic; }
td.path { font-family: monospace; }
span.ci { color: #666; font-size: 0.85em; }
.scroll { overflow-x: auto; }
.note { color: #666; }
.charts { display: flex; flex-wrap: wrap; gap: 8px 16px; }
.chart { margin: 4px 0 16px 0; }
.sample { border-left: 3px solid #8fa8d8; padding-left: 12px; margin: 12px 0; }
.sample p.doc { color: #444; }
"""

/// The report page of `runs` (names made unique first).
let render (options: ReportOptions) (runs: Run[]) : string =
    match validate options with
    | [] -> ()
    | problems -> invalidArg "options" (String.Join("; ", problems))
    if runs.Length = 0 then invalidArg "runs" "expected at least one run"
    let runs = uniqueNames runs
    let sb = StringBuilder()
    sb.Append("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>").Append(esc options.Title)
      .Append("</title>\n<style>").Append(style).Append("</style>\n").Append(Plots.plotlyScript ())
      .Append("</head><body>\n<h1>").Append(esc options.Title).Append("</h1>\n<ul class=\"runs\">\n") |> ignore
    for r in runs do
        sb.Append("<li><b>").Append(esc r.Name).Append("</b> <code>").Append(esc r.Directory).Append("</code></li>\n") |> ignore
    sb.Append("</ul>\n") |> ignore
    configSection runs sb
    metricsSection runs sb
    sb.Append("<h2 id=\"charts\">Charts</h2>\n") |> ignore
    balanceSection options runs sb
    let sections = charts options runs
    if sections.Length = 0 then sb.Append("<p class=\"note\">No run has metrics, routing or test scores to plot.</p>\n") |> ignore
    let mutable next = 0
    for section in sections do
        sb.Append("<h3>").Append(esc section.Heading).Append("</h3>\n<div class=\"charts\">\n") |> ignore
        for chart in section.Charts do
            sb.Append(Plots.chartDiv (sprintf "chart-%d" next) chart) |> ignore
            next <- next + 1
        sb.Append("</div>\n") |> ignore
    samplesSection options runs sb
    sb.Append("</body></html>\n").ToString()

/// Reads the run folders, renders the page and writes it to `outPath` (creating its folder);
/// returns the full path written.
let write (options: ReportOptions) (outPath: string) (runDirs: string seq) : string =
    let runs = runDirs |> Seq.map load |> Seq.toArray
    let page = render options runs
    let full = Path.GetFullPath outPath
    Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
    File.WriteAllText(full, page, UTF8Encoding(false))
    full

/// The default output path of `moe report`, relative to the working directory.
let defaultOut = Path.Combine("reports", "report.html")

/// C#-friendly entry points.
type MoeReport =
    /// Writes the report of `runDirs` to `outPath` with the default options; returns the full path.
    static member Write(runDirs: string seq, outPath: string) : string = write defaults outPath runDirs
    /// Writes the report with the given options; returns the full path.
    static member Write(runDirs: string seq, outPath: string, options: ReportOptions) : string = write options outPath runDirs
    /// The page's HTML for runs already read.
    static member Render(runs: Run seq, options: ReportOptions) : string = render options (Seq.toArray runs)
