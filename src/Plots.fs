/// Charts of a run's logs (Plotly.NET): expert usage over time, router entropy and dropped
/// fraction, router distributions and load balance across models, expert usage by label, loss
/// curves and a metrics comparison; and self-contained HTML with plotly.js embedded, so pages work
/// offline. Every chart function takes its options first and the records last and returns a
/// `GenericChart`; `Plots.html`/`Plots.save` turn charts into a page.
/// Axes: S logged steps, E experts, L labels.
module Moe.Plots

open System
open System.IO
open System.Text
open Plotly.NET
open Plotly.NET.LayoutObjects
open Moe.RunLog

/// Chart sizes in CSS pixels: wide enough for a step axis, short enough to scroll through a report.
module Size =
    let width = 660
    let height = 400
    /// Heatmap rows: pixels per expert or label, so that 64 experts still fit on a screen.
    let pixelsPerRow = 22
    /// Small heatmaps are as tall as the other charts so that a heatmap and its line plot align.
    let minHeatmapHeight = height
    /// Room for a heatmap's title and axis titles around its rows.
    let heatmapMargins = 160

let private expertName (e: int) = sprintf "expert %d" e

/// Text from the data (run, layer, label and system names) as plotly.js should get it: plotly renders
/// titles, legends and tick labels as a small HTML subset, so `<`, `>` and `&` are written as the
/// entities it decodes back for display, and a name never becomes markup.
let plotText (text: string) : string =
    text.Replace("&", "&amp;").Replace("<", "&lt;").Replace(">", "&gt;")

let private records (what: string) (layer: string) (rs: RoutingRecord[]) =
    let own = rs |> Array.filter (fun r -> r.Layer = layer) |> Array.sortBy (fun r -> r.Step)
    if own.Length = 0 then
        invalidArg what (sprintf "expected routing records of layer \"%s\", got layers [%s]" layer (String.Join(", ", layersOf rs)))
    own

/// The look of every chart: plotly's default colours and grey plot area, written as a small template.
/// Plotly.NET's own default template serialises in about a second per chart (hundreds of nested
/// dynamic objects), which would make a 20-chart report take tens of seconds; this one takes
/// milliseconds.
/// Plotly's default qualitative colours.
let palette = [| "#636efa"; "#EF553B"; "#00cc96"; "#ab63fa"; "#FFA15A"; "#19d3f3"; "#FF6692"; "#B6E880"; "#FF97FF"; "#FECB52" |]

let template : Template =
    let axis = LinearAxis.init(GridColor = Color.fromString "white", ZeroLineColor = Color.fromString "white", AutoMargin = StyleParam.TickAutoMargin.All)
    Layout.init(
        PlotBGColor = Color.fromString "#E5ECF6",
        PaperBGColor = Color.fromString "white",
        Font = Font.init(Color = Color.fromString "#2a3f5f"),
        HoverMode = StyleParam.HoverMode.Closest,
        Colorway = Color.fromColors [ for c in palette -> Color.fromString c ])
    |> Layout.setLinearAxis(StyleParam.SubPlotId.XAxis 1, axis)
    |> Layout.setLinearAxis(StyleParam.SubPlotId.YAxis 1, axis)
    |> fun layout -> Template.init(layout)

/// Heatmap colours: perceptually uniform, readable in greyscale.
let heatmapColors = StyleParam.Colorscale.Viridis

/// Colour of the i-th run, the same in every chart of a report (the template's colorway).
let runColor (i: int) : Color = Color.fromString palette.[i % palette.Length]

/// Heatmaps of shares start their colour scale at 0, so a balanced layer looks flat rather than
/// showing noise around 1/E at full contrast.
/// (plotly.js only leaves its automatic range when both ends are given).
let private fromZero (z: float[][]) (chart: GenericChart) =
    let top = z |> Array.collect id |> Array.filter Double.IsFinite |> fun xs -> if xs.Length = 0 then 0.0 else Array.max xs
    chart |> GenericChart.mapTrace (Trace2DStyle.Heatmap(ZMin = 0.0, ZMax = (if top > 0.0 then top else 1.0)))

/// Traces overlaid in one chart; none is an error naming what was missing.
let private combine (what: string) (traces: GenericChart list) : GenericChart =
    if traces.IsEmpty then invalidArg what (sprintf "expected at least one %s to plot, got none" what)
    Chart.combine traces

let private styled (title: string) (xTitle: string) (yTitle: string) (chart: GenericChart) =
    chart
    |> Chart.withTemplate template
    |> Chart.withTitle title
    |> Chart.withXAxisStyle(TitleText = xTitle)
    |> Chart.withYAxisStyle(TitleText = yTitle)
    |> Chart.withSize(Size.width, Size.height)

// ---------------------------------------------------------------------------------------------
// Expert usage over time

/// Heatmap of one layer's share of tokens per expert (rows, y) at each logged step (columns, x).
let expertUsageHeatmap (layer: string) (routing: RoutingRecord[]) : GenericChart =
    let own = records "routing" layer routing
    let balances = own |> Array.map (balanceOf collapsedShareOfUniform)
    let experts = balances.[0].Shares.Length
    let z = Array.init experts (fun e -> balances |> Array.map (fun b -> b.Shares.[e]))   // [E; S]
    Chart.Heatmap(z, X = (own |> Array.map (fun r -> r.Step)), Y = Array.init experts expertName, ColorBar = ColorBar.init(Title = Title.init "share"), ColorScale = heatmapColors)
    |> fromZero z
    |> styled (sprintf "Expert usage over time, %s" (plotText layer)) "step" "expert"
    |> Chart.withSize(Size.width, max Size.minHeatmapHeight (experts * Size.pixelsPerRow + Size.heatmapMargins))

/// One line per expert of one layer's share of tokens over steps, with the uniform share 1/E dashed.
let expertUsageLines (layer: string) (routing: RoutingRecord[]) : GenericChart =
    let own = records "routing" layer routing
    let balances = own |> Array.map (balanceOf collapsedShareOfUniform)
    let steps = own |> Array.map (fun r -> r.Step)
    let experts = balances.[0].Shares.Length
    let lines =
        [ for e in 0 .. experts - 1 ->
            Chart.Line(steps, balances |> Array.map (fun b -> b.Shares.[e]), Name = expertName e) ]
    let uniform =
        Chart.Line([ steps.[0]; steps.[steps.Length - 1] ], [ 1.0 / float experts; 1.0 / float experts ], Name = "uniform 1/E")
        |> Chart.withLineStyle(Dash = StyleParam.DrawingStyle.Dash, Color = Color.fromString "gray")
    Chart.combine (lines @ [ uniform ])
    |> styled (sprintf "Share of tokens per expert, %s" (plotText layer)) "step" "share of tokens"
    |> Chart.withYAxis(LinearAxis.init(Title = Title.init "share of tokens", RangeMode = StyleParam.RangeMode.ToZero))

/// Mean router entropy (nats) over steps, one line per layer.
let routerEntropy (routing: RoutingRecord[]) : GenericChart =
    [ for layer in layersOf routing ->
        let own = records "routing" layer routing
        Chart.Line(own |> Array.map (fun r -> r.Step), own |> Array.map (fun r -> r.RouterEntropy), Name = plotText layer) ]
    |> combine "routing record"
    |> styled "Router entropy" "step" "entropy (nats)"

/// Fraction of token assignments dropped by expert capacity over steps, one line per layer.
let droppedFraction (routing: RoutingRecord[]) : GenericChart =
    [ for layer in layersOf routing ->
        let own = records "routing" layer routing
        Chart.Line(own |> Array.map (fun r -> r.Step), own |> Array.map (fun r -> r.DroppedFraction), Name = plotText layer) ]
    |> combine "routing record"
    |> styled "Dropped token assignments" "step" "dropped fraction"

// ---------------------------------------------------------------------------------------------
// Across models

/// Box plots (in each run's colour) of the final share of tokens per expert, per layer (x) and model (one trace per run,
/// named with its mean load CV); a flat router gives a box squeezed around 1/E.
let routerDistribution (runs: (string * RoutingRecord[])[]) : GenericChart =
    [ for i, (name, routing) in Array.indexed runs do
        let final = finalBalance collapsedShareOfUniform routing
        if final.Length > 0 then
            let xs = [| for b in final do for _ in b.Shares -> plotText b.Layer |]
            let ys = [| for b in final do yield! b.Shares |]
            let meanCv = final |> Array.averageBy (fun b -> b.LoadCv)
            yield Chart.BoxPlot(X = xs, Y = ys, Name = sprintf "%s (load CV %.3f)" (plotText name) meanCv, BoxPoints = StyleParam.BoxPoints.All, MarkerColor = runColor i) ]
    |> combine "run with routing records"
    |> Chart.withLayout(Layout.init(BoxMode = StyleParam.BoxMode.Group))
    |> styled "Router distribution at the last step" "layer" "share of tokens per expert"

/// Load CV at the last step per layer (x), one bar trace per model; the bar text counts collapsed
/// experts (share under `collapseBelow` of uniform).
let loadBalance (collapseBelow: float) (runs: (string * RoutingRecord[])[]) : GenericChart =
    [ for i, (name, routing) in Array.indexed runs do
        let final = finalBalance collapseBelow routing
        if final.Length > 0 then
            yield Chart.Column(final |> Array.map (fun b -> b.LoadCv), Keys = (final |> Array.map (fun b -> plotText b.Layer)), Name = plotText name,
                               MultiText = (final |> Array.map (fun b -> sprintf "%d collapsed" b.CollapsedExperts.Length)), MarkerColor = runColor i) ]
    |> combine "run with routing records"
    |> Chart.withLayout(Layout.init(BarMode = StyleParam.BarMode.Group))
    |> styled (sprintf "Load CV at the last step (collapsed: share < %g of uniform)" collapseBelow) "layer" "coefficient of variation"

/// Heatmap of one layer's expert usage by label: each row (label) is that label's token assignments
/// normalised to shares over experts, so rows compare even when labels differ in size.
let labelUsageHeatmap (usage: LabelUsage) : GenericChart =
    let z =
        usage.Counts |> Array.map (fun row ->
            let total = Array.sum row
            if total = 0.0 then Array.zeroCreate row.Length else row |> Array.map (fun c -> c / total))   // [L; E]
    Chart.Heatmap(z, X = Array.init usage.Experts expertName, Y = (usage.Labels |> Array.map plotText), ColorBar = ColorBar.init(Title = Title.init "share"), ColorScale = heatmapColors)
    |> fromZero z
    |> styled (sprintf "Expert usage by label, %s" (plotText usage.Layer)) "expert" "label"
    |> Chart.withSize(Size.width, max Size.minHeatmapHeight (usage.Labels.Length * Size.pixelsPerRow + Size.heatmapMargins))

// ---------------------------------------------------------------------------------------------
// Losses and scores

/// Train task loss (the total loss where a line has no task_loss) and validation loss over steps,
/// two lines per run in the run's colour (validation dashed with markers).
let lossCurves (runs: (string * MetricsRecord[])[]) : GenericChart =
    [ for i, (name, metrics) in Array.indexed runs do
        let train = metrics |> Array.filter (fun m -> m.Split = Splits.train) |> Array.sortBy (fun m -> m.Step)
        let valid = metrics |> Array.filter (fun m -> m.Split = Splits.valid) |> Array.sortBy (fun m -> m.Step)
        if train.Length > 0 then
            let label = if train |> Array.forall (fun m -> m.TaskLoss.IsSome) then "train task loss" else "train loss"
            yield Chart.Line(train |> Array.map (fun m -> m.Step), train |> Array.map (fun m -> defaultArg m.TaskLoss m.Loss), Name = sprintf "%s %s" (plotText name) label, LineColor = runColor i)
        if valid.Length > 0 then
            yield Chart.Line(valid |> Array.map (fun m -> m.Step), valid |> Array.map (fun m -> defaultArg m.TaskLoss m.Loss), Name = sprintf "%s valid loss" (plotText name), ShowMarkers = true, LineColor = runColor i, MarkerColor = runColor i)
                  |> Chart.withLineStyle(Dash = StyleParam.DrawingStyle.Dash) ]
    |> combine "run with train or valid metrics"
    |> styled "Loss" "step" "loss (nats per token)"

/// Each unweighted auxiliary loss of one run's training lines over steps, one line per loss name.
let auxLossCurves (runName: string) (metrics: MetricsRecord[]) : GenericChart =
    let train = metrics |> Array.filter (fun m -> m.Split = Splits.train) |> Array.sortBy (fun m -> m.Step)
    let names = train |> Array.collect (fun m -> m.Aux |> Map.keys |> Seq.toArray) |> Array.distinct
    [ for aux in names ->
        let points = train |> Array.choose (fun m -> m.Aux.TryFind aux |> Option.map (fun v -> m.Step, v))
        Chart.Line(points |> Array.map fst, points |> Array.map snd, Name = plotText aux) ]
    |> combine "auxiliary loss on a train line"
    |> styled (sprintf "Auxiliary losses (unweighted), %s" (plotText runName)) "step" "loss"

/// The scores a metrics comparison shows, in order: (label, score key, scale to the axis).
/// ROUGE F1 is a fraction (as rouge-score) and is shown ×100 to share the axis with BLEU (0-100,
/// as sacreBLEU), the way papers report both.
let comparedMetrics : (string * string * float)[] =
    [| "ROUGE-1 F1", "rouge1", 100.0
       "ROUGE-2 F1", "rouge2", 100.0
       "ROUGE-L F1", "rougeL", 100.0
       "BLEU", "bleu", 1.0 |]

/// The value of a compared metric: a ROUGE variant's F1, else a scalar score.
let metricValue (scores: SystemScores) (key: string) : float option =
    match scores.Rouge.TryFind key with
    | Some prf -> Some prf.F1
    | None -> scores.Scalars.TryFind key

/// Grouped bars of ROUGE-1/2/L F1 (×100) and BLEU, one trace per system (label, scores), with
/// asymmetric error bars from the bootstrap confidence intervals where the scores carry them.
let metricsComparison (systems: (string * SystemScores)[]) : GenericChart =
    [ for label, scores in systems do
        let shown =
            comparedMetrics |> Array.choose (fun (name, key, scale) ->
                metricValue scores key |> Option.map (fun v -> name, v * scale, scores.IntervalOf key |> Option.map (fun ci -> ci.Low * scale, ci.High * scale)))
        if shown.Length > 0 then
            let bars = Chart.Column(shown |> Array.map (fun (_, v, _) -> v), Keys = (shown |> Array.map (fun (n, _, _) -> n)), Name = plotText label)
            if shown |> Array.exists (fun (_, _, ci) -> ci.IsSome) then
                let plus = shown |> Array.map (fun (_, v, ci) -> match ci with Some (_, high) -> high - v | None -> 0.0)
                let minus = shown |> Array.map (fun (_, v, ci) -> match ci with Some (low, _) -> v - low | None -> 0.0)
                yield bars |> Chart.withYErrorStyle(Array = plus, Arrayminus = minus, Symmetric = false)
            else yield bars ]
    |> combine "system with ROUGE or BLEU scores"
    |> Chart.withLayout(Layout.init(BarMode = StyleParam.BarMode.Group))
    |> styled "Test scores (95% bootstrap intervals where computed)" "metric" "ROUGE F1 × 100, BLEU"

// ---------------------------------------------------------------------------------------------
// HTML

/// The plotly.js bundled in Plotly.NET (an embedded resource), so that pages need no network.
let plotlyJs : Lazy<string> =
    lazy (
        let assembly = typeof<GenericChart>.Assembly
        let name = sprintf "Plotly.NET.plotly-%s.min.js" Globals.PLOTLYJS_VERSION
        use stream = assembly.GetManifestResourceStream name
        if isNull stream then
            failwithf "expected the resource %s in %s; found [%s]" name assembly.FullName (String.Join(", ", assembly.GetManifestResourceNames()))
        use reader = new StreamReader(stream, Encoding.UTF8)
        reader.ReadToEnd())

/// Text escaped for HTML element content and attribute values.
let escape (text: string) : string = Net.WebUtility.HtmlEncode text

/// A chart's figure JSON made safe inside a `<script>` element: `<`, `>` and `&` only occur inside
/// JSON strings, where the `\u003c` forms mean the same, so no label can close the script.
let scriptSafeJson (chart: GenericChart) : string =
    GenericChart.toFigureJson(chart)
        .Replace("<", "\\u003c").Replace(">", "\\u003e").Replace("&", "\\u0026")
        .Replace("\u2028", "\\u2028").Replace("\u2029", "\\u2029")

/// A `<div>` with the chart and the script that draws it; plotly.js must be loaded earlier on the
/// page. `id` must be unique on the page (letters, digits, '-' and '_').
let chartDiv (id: string) (chart: GenericChart) : string =
    if String.IsNullOrEmpty id || not (id |> Seq.forall (fun c -> Char.IsAsciiLetterOrDigit c || c = '-' || c = '_')) then
        invalidArg "id" (sprintf "expected an element id of ASCII letters, digits, '-' or '_', got \"%s\"" id)
    sprintf "<div class=\"chart\" id=\"%s\"></div>\n<script>(function(){var f=%s;Plotly.newPlot('%s',f.data,f.layout,{responsive:true});})();</script>\n"
        id (scriptSafeJson chart) id

/// The `<script>` element that embeds plotly.js.
let plotlyScript () : string =
    // A literal "</script" inside the bundle would end the element early; split it as JS allows.
    "<script>" + plotlyJs.Value.Replace("</script", "<\\/script") + "</script>\n"

/// A complete HTML page of charts, one under the other, with plotly.js embedded.
let html (title: string) (charts: GenericChart seq) : string =
    let sb = StringBuilder()
    sb.Append("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>")
      .Append(escape title).Append("</title>\n").Append(plotlyScript ()).Append("</head><body>\n<h1>")
      .Append(escape title).Append("</h1>\n") |> ignore
    charts |> Seq.iteri (fun i c -> sb.Append(chartDiv (sprintf "chart-%d" i) c) |> ignore)
    sb.Append("</body></html>\n").ToString()

/// Writes `html title charts` to `path`, creating its folder.
let save (path: string) (title: string) (charts: GenericChart seq) : unit =
    let full = Path.GetFullPath path
    Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
    File.WriteAllText(full, html title charts, UTF8Encoding(false))

/// C#-friendly entry points to the charts (runs given as `Run` records).
type MoeCharts =
    static member ExpertUsageHeatmap(layer: string, routing: RoutingRecord seq) : GenericChart = expertUsageHeatmap layer (Seq.toArray routing)
    static member ExpertUsageLines(layer: string, routing: RoutingRecord seq) : GenericChart = expertUsageLines layer (Seq.toArray routing)
    static member RouterEntropy(routing: RoutingRecord seq) : GenericChart = routerEntropy (Seq.toArray routing)
    static member DroppedFraction(routing: RoutingRecord seq) : GenericChart = droppedFraction (Seq.toArray routing)
    static member RouterDistribution(runs: Run seq) : GenericChart = runs |> Seq.map (fun r -> r.Name, r.Routing) |> Seq.toArray |> routerDistribution
    static member LoadBalance(runs: Run seq, collapseBelow: float) : GenericChart = runs |> Seq.map (fun r -> r.Name, r.Routing) |> Seq.toArray |> loadBalance collapseBelow
    static member LabelUsageHeatmap(usage: LabelUsage) : GenericChart = labelUsageHeatmap usage
    static member LossCurves(runs: Run seq) : GenericChart = runs |> Seq.map (fun r -> r.Name, r.Metrics) |> Seq.toArray |> lossCurves
    static member AuxLossCurves(run: Run) : GenericChart = auxLossCurves run.Name run.Metrics
    static member MetricsComparison(runs: Run seq) : GenericChart =
        runs |> Seq.collect (fun r -> r.Scores |> Option.defaultValue [||] |> Array.map (fun s -> sprintf "%s / %s" r.Name s.System, s)) |> Seq.toArray |> metricsComparison
    /// A complete page of charts with plotly.js embedded.
    static member Html(title: string, charts: GenericChart seq) : string = html title charts
    /// Writes `Html(title, charts)` to `path`.
    static member Save(path: string, title: string, charts: GenericChart seq) : unit = save path title charts
