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

/// Validation loss over cumulative steps, one line with markers per run in the run's colour: each run's steps
/// are shifted by its offset (the steps its initial model had already trained, e.g. a continued run).
let validLossOverSteps (runs: (string * int * MetricsRecord[])[]) : GenericChart =
    [ for i, (name, offset, metrics) in Array.indexed runs do
        let valid = metrics |> Array.filter (fun m -> m.Split = Splits.valid) |> Array.sortBy (fun m -> m.Step)
        if valid.Length > 0 then
            yield Chart.Line(valid |> Array.map (fun m -> m.Step + offset), valid |> Array.map (fun m -> defaultArg m.TaskLoss m.Loss),
                             Name = plotText name, ShowMarkers = true, LineColor = runColor i, MarkerColor = runColor i) ]
    |> combine "run with valid metrics"
    |> styled "Validation loss" "cumulative training steps" "validation loss (nats per token)"

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
// Headline figures: one chart that carries an experiment's finding

/// Mean load CV over MoE layers at each logged step, one line per run in the run's colour; when every run
/// has the same number of experts E, the CV of all tokens on one expert, sqrt(E - 1), is drawn dashed.
/// Steps where a layer routed no tokens (CV undefined) are left out.
let loadCvOverTime (runs: (string * RoutingRecord[])[]) : GenericChart =
    let lines =
        [ for i, (name, routing) in Array.indexed runs do
            let points =
                routing
                |> Array.groupBy (fun r -> r.Step)
                |> Array.sortBy fst
                |> Array.map (fun (step, rs) -> step, rs |> Array.averageBy (fun r -> loadCv r.TokensPerExpert))
                |> Array.filter (snd >> Double.IsFinite)
            if points.Length > 0 then
                yield Chart.Line(points |> Array.map fst, points |> Array.map snd, Name = plotText name, ShowMarkers = true, LineColor = runColor i, MarkerColor = runColor i) ]
    let all = runs |> Array.collect snd
    let experts = all |> Array.map (fun r -> r.TokensPerExpert.Length) |> Array.distinct
    let collapsed =
        if experts.Length <> 1 || lines.IsEmpty then []
        else
            let steps = all |> Array.map (fun r -> r.Step)
            let worst = sqrt (float (experts[0] - 1))
            [ Chart.Line([ Array.min steps; Array.max steps ], [ worst; worst ], Name = sprintf "all on one expert (√(E−1), E = %d)" experts[0])
              |> Chart.withLineStyle(Dash = StyleParam.DrawingStyle.Dash, Color = Color.fromString "gray") ]
    combine "run with routing records" (lines @ collapsed)
    |> styled "Expert load over training: load CV, mean over MoE layers" "step" "load CV (0 = balanced)"
    |> Chart.withYAxis(LinearAxis.init(Title = Title.init "load CV (0 = balanced)", RangeMode = StyleParam.RangeMode.ToZero))

/// One panel of `barPanels`: the measure's axis title, one value per category (NaN = not applicable: no
/// bar) and the text written on each bar.
type BarPanel =
    { Title: string
      Values: float[]
      Text: string[] }

/// Widths of multi-panel figures: each panel wide enough for its bar texts or point labels.
module PanelSize =
    let width = 330
    /// Room for category labels left of the first bar panel.
    let categoryLabels = 160
    /// A bar panel's value axis reaches this multiple of its longest bar, leaving room for the text after it.
    let textHeadroom = 1.3
    /// A line panel: as wide as a bar panel plus room for its y axis title.
    let lineWidth = 420
    /// Room for the legend right of the last line panel.
    let legend = 200

/// Horizontal bars of several measures side by side, one panel per measure, the categories (runs) on a
/// shared y axis in the order given, top to bottom.
let barPanels (title: string) (categories: string[]) (panels: BarPanel list) : GenericChart =
    if categories.Length = 0 then invalidArg "categories" "expected at least one category to plot, got none"
    for p in panels do
        if p.Values.Length <> categories.Length || p.Text.Length <> categories.Length then
            invalidArg "panels" (sprintf "expected %d values and texts in panel \"%s\", got %d and %d" categories.Length p.Title p.Values.Length p.Text.Length)
    let names = categories |> Array.map plotText
    let charts =
        [ for i, p in List.indexed panels ->
            let shown = Array.indexed p.Values |> Array.filter (snd >> Double.IsFinite) |> Array.map fst
            let values = shown |> Array.map (fun j -> p.Values[j])
            // Texts outside the bars, so that a zero (a perfectly balanced load) still shows its value; the axis
            // leaves room for the longest bar's text (plotly's automatic range would clip it).
            let top = if values.Length = 0 then 0.0 else Array.max values
            let low = if values.Length = 0 then 0.0 else min 0.0 (Array.min values)
            let range = if top > 0.0 then StyleParam.Range.MinMax(low, top * PanelSize.textHeadroom) else StyleParam.Range.MinMax(low, 1.0)
            Chart.Bar(values, Keys = (shown |> Array.map (fun j -> names[j])), Name = plotText p.Title,
                      MultiText = (shown |> Array.map (fun j -> p.Text[j])), TextPosition = StyleParam.TextPosition.Outside, ShowLegend = false, MarkerColor = runColor i)
            |> Chart.withXAxis(LinearAxis.init(Title = Title.init (plotText p.Title), Range = range)) ]
    if charts.IsEmpty then invalidArg "panels" "expected at least one panel to plot, got none"
    charts
    |> Chart.Grid(1, charts.Length, Pattern = StyleParam.LayoutGridPattern.Coupled)
    |> Chart.withTemplate template
    |> Chart.withTitle title
    // Categories top to bottom in the given order, including those no panel has a value for.
    |> Chart.withYAxis(LinearAxis.init(CategoryOrder = StyleParam.CategoryOrder.Array, CategoryArray = names, AutoRange = StyleParam.AutoRange.Reversed))
    |> Chart.withSize(PanelSize.categoryLabels + charts.Length * PanelSize.width, max Size.height (categories.Length * Size.pixelsPerRow + Size.heatmapMargins))

/// One line of `linePanels`: its name (the legend; the same name has the same colour in every panel),
/// its points and a label written next to each point.
type Series =
    { Name: string
      X: float[]
      Y: float[]
      Labels: string[] }

/// One panel of `linePanels`.
type LinePanel =
    { XTitle: string
      YTitle: string
      /// A logarithmic x axis (parameter counts spanning decades).
      LogX: bool
      Series: Series list }

/// Labelled lines in one or more panels side by side, a series' colour and legend entry shared across panels.
let linePanels (title: string) (panels: LinePanel list) : GenericChart =
    if panels.IsEmpty then invalidArg "panels" "expected at least one panel to plot, got none"
    let names = panels |> List.collect (fun p -> p.Series |> List.map (fun s -> s.Name)) |> List.distinct
    let shown = Collections.Generic.HashSet<string>()
    let charts =
        [ for p in panels ->
            [ for s in p.Series do
                if s.X.Length <> s.Y.Length || s.Labels.Length <> s.X.Length then
                    invalidArg "panels" (sprintf "expected as many x, y and labels in series \"%s\", got %d, %d and %d" s.Name s.X.Length s.Y.Length s.Labels.Length)
                let color = runColor (List.findIndex ((=) s.Name) names)
                yield Chart.Line(s.X, s.Y, Name = plotText s.Name, ShowLegend = shown.Add s.Name, ShowMarkers = true,
                                 MultiText = (s.Labels |> Array.map plotText), TextPosition = StyleParam.TextPosition.TopCenter,
                                 LineColor = color, MarkerColor = color)
                      |> Chart.withTraceInfo(LegendGroup = plotText s.Name)
                      |> GenericChart.mapTrace (fun t -> t.SetProperty("cliponaxis", false); t) ] // labels above the top point stay whole
            |> combine (sprintf "series in panel \"%s\"" p.YTitle)
            |> Chart.withXAxisStyle(TitleText = plotText p.XTitle, AxisType = (if p.LogX then StyleParam.AxisType.Log else StyleParam.AxisType.Linear))
            |> Chart.withYAxisStyle(TitleText = plotText p.YTitle) ]
    let grid = if charts.Length = 1 then charts.Head else charts |> Chart.Grid(1, charts.Length, XGap = 0.25)
    grid
    |> Chart.withTemplate template
    |> Chart.withTitle title
    |> Chart.withSize((if charts.Length = 1 then Size.width else charts.Length * PanelSize.lineWidth + PanelSize.legend), Size.height)

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

// ---------------------------------------------------------------------------------------------
// One figure per page, and its PNG

/// A headline figure written by `writeFigure`.
type Figure =
    { /// The self-contained page holding the chart alone.
      Html: string
      /// The PNG screenshot's path, or why there is none (not asked for, no Chromium on PATH, Chromium failed).
      Png: Result<string, string> }

/// The chart's size in CSS pixels as its layout sets it (`Chart.withSize`), else the default chart size.
let chartSize (chart: GenericChart) : int * int =
    use doc = Text.Json.JsonDocument.Parse(GenericChart.toFigureJson chart)
    let layout = doc.RootElement.GetProperty "layout"
    let read (name: string) (fallback: int) =
        match layout.TryGetProperty name with
        | true, v when v.ValueKind = Text.Json.JsonValueKind.Number -> int (v.GetDouble())
        | _ -> fallback
    read "width" Size.width, read "height" Size.height

/// A page with one chart and nothing around it (no heading, no margins, no plotly tool bar), so that a
/// window of the chart's size shows exactly the chart; plotly.js embedded.
let figureHtml (title: string) (chart: GenericChart) : string =
    let sb = StringBuilder()
    sb.Append("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>")
      .Append(escape title).Append("</title>\n<style>body{margin:0;background:white} .modebar-container{display:none}</style>\n").Append(plotlyScript ())
      .Append("</head><body>\n").Append(chartDiv "figure" chart).Append("</body></html>\n").ToString()

/// Writes `figureHtml title chart` to `htmlPath` and, when `screenshot` is set and Chromium is on PATH,
/// draws it headless at the chart's size into `pngPath` (see `Browser.screenshot`).
let writeFigure (screenshot: bool) (htmlPath: string) (pngPath: string) (title: string) (chart: GenericChart) : Figure =
    let html = Path.GetFullPath htmlPath
    Directory.CreateDirectory(Path.GetDirectoryName html) |> ignore
    File.WriteAllText(html, figureHtml title chart, UTF8Encoding(false))
    let png =
        if not screenshot then Error "not asked for"
        else
            match Browser.find () with
            | None -> Error Browser.notFound
            | Some exe ->
                let width, height = chartSize chart
                Browser.screenshot exe html pngPath width height
    { Html = html; Png = png }

/// The names an experiment's figure gets in `reportsDir`: `<stem>-figure.html` and `<stem>.png`.
let figurePaths (reportsDir: string) (stem: string) : string * string =
    Path.Combine(reportsDir, stem + "-figure.html"), Path.Combine(reportsDir, stem + ".png")

/// `writeFigure` under the names of `figurePaths`.
let writeFigureIn (screenshot: bool) (reportsDir: string) (stem: string) (title: string) (chart: GenericChart) : Figure =
    let html, png = figurePaths reportsDir stem
    writeFigure screenshot html png title chart

/// What a script prints about a figure: the page, then the PNG or why it was skipped.
let figureLines (f: Figure) : string list =
    [ sprintf "figure: %s" f.Html
      (match f.Png with
       | Ok png -> sprintf "png: %s" png
       | Error why -> sprintf "png: skipped: %s" why) ]

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
    /// Mean load CV over MoE layers at each step, one line per run.
    static member LoadCvOverTime(runs: Run seq) : GenericChart = runs |> Seq.map (fun r -> r.Name, r.Routing) |> Seq.toArray |> loadCvOverTime
    /// Writes the chart alone on a page and, when `screenshot` and Chromium is on PATH, its PNG.
    static member WriteFigure(htmlPath: string, pngPath: string, title: string, chart: GenericChart, screenshot: bool) : Figure =
        writeFigure screenshot htmlPath pngPath title chart
