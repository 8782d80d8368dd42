/// One self-contained HTML page comparing runs, in the order a reader comparing them needs: a
/// one-line summary per run; the metrics table (ROUGE-1/2/L F1 with 95% bootstrap intervals, BLEU,
/// best validation loss, expert-load CV and dropped fraction, the best value of each column in bold);
/// every chart of `Plots` with load balance per layer; the config fields whose values differ between
/// runs, the identical rest collapsed; a few aligned samples (document excerpt, reference, each
/// model's prediction). All text from the runs is HTML-escaped; plotly.js is embedded so the page
/// works offline.
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

let private invariant = Globalization.CultureInfo.InvariantCulture

/// The system name of a run's own model in test_scores.json; every other system is a baseline.
let modelSystem = "model"

// ---------------------------------------------------------------------------------------------
// Run summaries

/// A wall-clock duration as "42 s", "15 min 12 s" or "2 h 05 min".
let formatDuration (seconds: float) : string =
    let s = int (Math.Round seconds)
    if s < 60 then sprintf "%d s" s
    elif s < 3600 then sprintf "%d min %02d s" (s / 60) (s % 60)
    else sprintf "%d h %02d min" (s / 3600) (s % 3600 / 60)

/// What a run holds, in one line of plain text: steps trained and their wall time, test examples,
/// MoE layers logged, and which parts of the run folder contract it lacks (so a "—" in the tables
/// below has its reason in view).
let runSummary (r: Run) : string =
    let train = r.Metrics |> Array.filter (fun m -> m.Split = Splits.train)
    let model = r.Scores |> Option.bind (Array.tryFind (fun s -> s.System = modelSystem))
    let layers = layersOf r.Routing
    let parts =
        [ if train.Length > 0 then
              let last = train |> Array.maxBy (fun m -> m.Step)
              match last.ElapsedS with
              | Some s -> yield sprintf "%d steps in %s" last.Step (formatDuration s)
              | None -> yield sprintf "%d steps" last.Step
          else yield "no training steps logged"
          match r.Scores, model with
          | None, _ -> yield sprintf "no %s" FileNames.testScores
          | Some _, None -> yield sprintf "no \"%s\" scores in %s" modelSystem FileNames.testScores
          | Some _, Some m ->
              match m.N with
              | Some n -> yield sprintf "%d test examples" n
              | None -> yield "test scores"
          if layers.Length > 0 then yield sprintf "%d MoE layer%s logged" layers.Length (if layers.Length = 1 then "" else "s")
          else yield "no routing logged"
          if r.Config.IsNone then yield sprintf "no %s" FileNames.config
          if r.Texts.IsNone then yield sprintf "no %s" FileNames.predictions ]
    String.Join(" · ", parts)

// ---------------------------------------------------------------------------------------------
// Configs

/// Config rows: every leaf path of any run's config.json in first-seen order, each run's value
/// (None where its config lacks the path) and whether the runs disagree.
let configRows (runs: Run[]) : (string * string option[] * bool)[] =
    let withConfig = runs |> Array.map (fun r -> r.Config |> Option.defaultValue [||])
    let paths = withConfig |> Array.collect (Array.map (fun e -> e.Path)) |> Array.distinct
    let lookup =
        withConfig |> Array.map (fun entries ->
            let d = Collections.Generic.Dictionary<string, string>()
            for e in entries do d.TryAdd(e.Path, e.Value) |> ignore
            d)
    paths |> Array.map (fun path ->
        let values = lookup |> Array.map (fun d -> match d.TryGetValue path with | true, v -> Some v | _ -> None)
        path, values, (values |> Array.distinct |> Array.length) > 1)

/// One config field across the compared runs: its dotted path and each run's value as shown
/// (None where that run's config lacks the field).
type ConfigRow = { Path: string; Values: string option[] }

/// The config comparison of the page. Runs without a config.json take no part (every field would
/// differ); the others are compared field by field on the text shown (see `RunLog.flattenConfig`),
/// a field present in one run and absent in another counting as differing.
type ConfigComparison =
    { /// The runs compared, in page order; `ConfigRow.Values` follow it.
      Runs: string[]
      /// Fields whose values differ between the compared runs, in first-seen order.
      Differing: ConfigRow[]
      /// Fields with the same value in every compared run, in first-seen order.
      Identical: ConfigRow[]
      /// Runs that have no config.json.
      WithoutConfig: string[] }

/// Splits the runs' config fields into those that differ and those identical in all runs.
let compareConfigs (runs: Run[]) : ConfigComparison =
    let compared = runs |> Array.filter (fun r -> r.Config.IsSome)
    let rows = configRows compared
    let pick differs = rows |> Array.filter (fun (_, _, d) -> d = differs) |> Array.map (fun (p, v, _) -> { Path = p; Values = v })
    { Runs = compared |> Array.map (fun r -> r.Name)
      Differing = pick true
      Identical = pick false
      WithoutConfig = runs |> Array.filter (fun r -> r.Config.IsNone) |> Array.map (fun r -> r.Name) }

let private plural (n: int) (one: string) (many: string) = if n = 1 then sprintf "%d %s" n one else sprintf "%d %s" n many

let private configSection (runs: Run[]) (sb: StringBuilder) =
    sb.Append("<h2 id=\"configs\">Configs</h2>\n") |> ignore
    let c = compareConfigs runs
    let valueCell (v: string option) =
        match v with
        | Some text -> "<td>" + esc text + "</td>"
        | None -> "<td class=\"absent\">—</td>"
    let table (cls: string) (columns: string[]) (rows: ConfigRow[]) (rowClass: string) =
        sb.AppendFormat("<div class=\"scroll\"><table class=\"{0}\"><thead><tr><th>setting</th>", cls) |> ignore
        for name in columns do sb.Append("<th>").Append(esc name).Append("</th>") |> ignore
        sb.Append("</tr></thead><tbody>\n") |> ignore
        for row in rows do
            sb.Append(rowClass).Append("<td class=\"path\">").Append(esc row.Path).Append("</td>") |> ignore
            // Identical rows show their one value once.
            let values = if columns.Length < row.Values.Length then [| row.Values.[0] |] else row.Values
            for v in values do sb.Append(valueCell v) |> ignore
            sb.Append("</tr>\n") |> ignore
        sb.Append("</tbody></table></div>\n") |> ignore
    if c.Runs.Length = 0 then
        sb.Append("<p class=\"note\">No run has a config.json.</p>\n") |> ignore
    else
        if c.WithoutConfig.Length > 0 then
            sb.AppendFormat("<p class=\"note\">Not compared (no {0}): {1}.</p>\n", FileNames.config, esc (String.Join(", ", c.WithoutConfig))) |> ignore
        if c.Runs.Length = 1 then
            sb.AppendFormat("<details><summary>Settings ({0})</summary>\n", plural c.Identical.Length "field" "fields") |> ignore
            table "config" c.Runs c.Identical "<tr>"
            sb.Append("</details>\n") |> ignore
        else
            if c.Differing.Length = 0 then
                sb.Append("<p>Every setting is identical in all runs.</p>\n") |> ignore
            else
                let absent = if c.Differing |> Array.exists (fun r -> r.Values |> Array.contains None) then " (—: absent from that run's config)" else ""
                sb.AppendFormat("<p>{0} differ{1}.</p>\n", plural c.Differing.Length "setting" "settings", absent) |> ignore
                table "config differs" c.Runs c.Differing "<tr class=\"differs\">"
            if c.Identical.Length > 0 then
                sb.AppendFormat("<details><summary>{0} identical in all runs</summary>\n", plural c.Identical.Length "setting" "settings") |> ignore
                table "config identical" [| "value" |] c.Identical "<tr>"
                sb.Append("</details>\n") |> ignore

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
        if s.System = modelSystem then yield run, s
       for run, s in scored do
        if s.System <> modelSystem then
            if not (agreed s.System) then yield sprintf "%s / %s" run s.System, s
            elif shown.Add s.System then yield s.System, s |]

/// Which way a metric improves.
type Better =
    | Higher
    | Lower

/// A column of the metrics table.
type MetricColumn =
    { Header: string
      /// What the number is and where it comes from (the table's legend).
      Explanation: string
      Better: Better
      /// Factor from the stored value to the shown one (ROUGE F1 and dropped fractions are shown × 100).
      Scale: float
      /// Decimals shown. The best value is picked among values rounded to them, so values that
      /// look equal are equally best.
      Decimals: int }

/// One cell: the value as shown (scaled), its scaled 95% interval where recorded, whether it is the
/// best of its column, and a note on where it comes from (the step of a validation loss).
type MetricCell =
    { Value: float option
      Interval: Interval option
      Best: bool
      Note: string option }

/// A row of the metrics table: a run's model (named after the run) or a baseline system.
type MetricsRow =
    { Label: string
      /// A system scored beside the models (lead1, ...): it was not trained, so it has no logs.
      Baseline: bool
      Cells: MetricCell[] }

/// The metrics table: only columns some row has a value for; footnotes say why cells are empty.
type MetricsTable =
    { Columns: MetricColumn[]
      Rows: MetricsRow[]
      /// One sentence per reason a cell shows "—", in row order; empty when no cell is missing.
      Footnotes: string[] }

/// What a row's numbers come from: a system's test scores and, for a run's model, the run's logs.
type private RowSource = { Label: string; Scores: SystemScores option; Run: Run option }

/// How a column reads its value (unscaled, with interval and note) and explains a missing one.
type private ColumnDef =
    { Column: MetricColumn
      Read: RowSource -> (float * Interval option * string option) option
      WhyMissing: RowSource -> string }

/// Each MoE layer's record at its last logged step.
let private finalRecords (routing: RoutingRecord[]) : RoutingRecord[] =
    layersOf routing |> Array.map (fun layer -> routing |> Array.filter (fun r -> r.Layer = layer) |> Array.maxBy (fun r -> r.Step))

/// The lowest validation loss of a run and its step: the checkpoint its test predictions were
/// decoded with (`Summarizer` decodes the best-validation checkpoint). NaN losses (diverged) are
/// passed over; a run whose every validation loss is NaN gives its last one.
let bestValidLoss (metrics: MetricsRecord[]) : (int * float) option =
    let valid = metrics |> Array.filter (fun m -> m.Split = Splits.valid)
    if valid.Length = 0 then None
    else
        let finite = valid |> Array.filter (fun m -> not (Double.IsNaN m.Loss))
        let best = if finite.Length > 0 then finite |> Array.minBy (fun m -> m.Loss) else Array.last valid
        Some(best.Step, best.Loss)

/// Mean over MoE layers, at each layer's last logged step, of its expert-load coefficient of
/// variation (see `RunLog.loadCv`); layers that routed no tokens are left out. None without routing.
let meanFinalLoadCv (routing: RoutingRecord[]) : float option =
    let cvs = finalRecords routing |> Array.map (fun r -> loadCv r.TokensPerExpert) |> Array.filter (Double.IsNaN >> not)
    if cvs.Length = 0 then None else Some(Array.average cvs)

/// Mean over MoE layers, at each layer's last logged step, of the fraction of token assignments
/// dropped by expert capacity. None without routing.
let meanFinalDropped (routing: RoutingRecord[]) : float option =
    let final = finalRecords routing
    if final.Length = 0 then None else Some(final |> Array.averageBy (fun r -> r.DroppedFraction))

let private scoreColumn (header: string) (explanation: string) (key: string) (scale: float) : ColumnDef =
    { Column = { Header = header; Explanation = explanation; Better = Higher; Scale = scale; Decimals = 2 }
      Read = fun src -> src.Scores |> Option.bind (fun s -> Plots.metricValue s key |> Option.map (fun v -> v, s.IntervalOf key, None))
      WhyMissing = fun src ->
        match src.Run, src.Scores with
        | Some r, None when r.Scores.IsNone -> sprintf "%s has no %s" src.Label FileNames.testScores
        | Some _, None -> sprintf "%s's %s has no \"%s\" scores" src.Label FileNames.testScores modelSystem
        | _ -> sprintf "%s has no %s score" src.Label key }

let private trainingColumn (column: MetricColumn) (read: Run -> (float * string option) option) (log: string) : ColumnDef =
    { Column = column
      Read = fun src -> src.Run |> Option.bind read |> Option.map (fun (v, note) -> v, None, note)
      WhyMissing = fun src ->
        match src.Run with
        | None -> sprintf "%s is a baseline scored on the test set, not a trained model, so it has no training logs" src.Label
        | Some _ -> sprintf "%s logged no %s" src.Label log }

/// The columns of the metrics table, in order. ROUGE F1 is a fraction (as rouge-score) shown × 100,
/// BLEU is 0-100 (as sacreBLEU), the way papers report both.
let private columnDefs : ColumnDef[] =
    let rouge = "F1 × 100 on the test set, as rouge-score; brackets: 95% bootstrap interval"
    [| scoreColumn "ROUGE-1 F1" rouge "rouge1" 100.0
       scoreColumn "ROUGE-2 F1" rouge "rouge2" 100.0
       scoreColumn "ROUGE-L F1" rouge "rougeL" 100.0
       scoreColumn "BLEU" "corpus BLEU (0-100) on the test set, as sacreBLEU" "bleu" 1.0
       scoreColumn "BERTScore F1" "BERTScore F1 × 100 on the test set, as bert_score (model and layer in the run's test_scores.json)" "bertscore" 100.0
       scoreColumn "SummaC-ZS" "SummaC-ZS factual consistency with the document (entailment minus contradiction, -1 to 1; Laban et al. 2022); brackets: 95% bootstrap interval" "summac_zs" 1.0
       scoreColumn "SummaC-Conv" "SummaC-Conv probability that the summary is consistent with its document (0 to 1); brackets: 95% bootstrap interval" "summac_conv" 1.0
       trainingColumn
           { Header = "valid loss"; Better = Lower; Scale = 1.0; Decimals = 3
             Explanation = "lowest validation loss (the checkpoint decoded for the test); hover for its step" }
           (fun r -> bestValidLoss r.Metrics |> Option.map (fun (step, loss) -> loss, Some(sprintf "step %d" step)))
           (sprintf "validation loss (%s)" FileNames.metrics)
       trainingColumn
           { Header = "load CV"; Better = Lower; Scale = 1.0; Decimals = 3
             Explanation = "coefficient of variation of tokens per expert (0 = balanced), mean over MoE layers at the last logged step" }
           (fun r -> meanFinalLoadCv r.Routing |> Option.map (fun v -> v, None))
           (sprintf "routing statistics (%s)" FileNames.routing)
       trainingColumn
           { Header = "dropped %"; Better = Lower; Scale = 100.0; Decimals = 2
             Explanation = "share of token assignments dropped by expert capacity, mean over MoE layers at the last logged step" }
           (fun r -> meanFinalDropped r.Routing |> Option.map (fun v -> v, None))
           (sprintf "routing statistics (%s)" FileNames.routing) |]

/// Marks the best cells of a column: among present, non-NaN values rounded to the shown decimals,
/// the highest or lowest. Nothing is marked unless at least two values differ (a lone value or a
/// column of equal values has no best).
let markBest (column: MetricColumn) (cells: MetricCell[]) : MetricCell[] =
    let rounded (c: MetricCell) =
        c.Value |> Option.filter (Double.IsNaN >> not) |> Option.map (fun v -> Math.Round(v, column.Decimals))
    let present = cells |> Array.choose rounded
    if (Array.distinct present).Length < 2 then cells |> Array.map (fun c -> { c with Best = false })
    else
        let best = match column.Better with Higher -> Array.max present | Lower -> Array.min present
        cells |> Array.map (fun c -> { c with Best = (rounded c = Some best) })

/// The metrics table of the runs: one row per run's model (named after the run, with its training
/// logs), then the baselines of `comparedSystems`.
let metricsTable (runs: Run[]) : MetricsTable =
    let models =
        runs |> Array.map (fun r ->
            { Label = r.Name; Scores = r.Scores |> Option.bind (Array.tryFind (fun s -> s.System = modelSystem)); Run = Some r })
    let baselines =
        comparedSystems runs
        |> Array.filter (fun (_, s) -> s.System <> modelSystem)
        |> Array.map (fun (label, s) -> { Label = label; Scores = Some s; Run = None })
    let sources = Array.append models baselines
    let shown = columnDefs |> Array.filter (fun d -> sources |> Array.exists (fun src -> (d.Read src).IsSome))
    let scaled (d: ColumnDef) (src: RowSource) : MetricCell =
        match d.Read src with
        | Some (v, ci, note) ->
            let s = d.Column.Scale
            { Value = Some(v * s); Interval = ci |> Option.map (fun c -> { Low = c.Low * s; Mid = c.Mid * s; High = c.High * s }); Best = false; Note = note }
        | None -> { Value = None; Interval = None; Best = false; Note = None }
    // [rows; columns] built column by column, so each column can mark its best.
    let columns = shown |> Array.map (fun d -> sources |> Array.map (scaled d) |> markBest d.Column)
    let footnotes =
        [| for i, src in Array.indexed sources do
               for j, d in Array.indexed shown do
                   if columns.[j].[i].Value.IsNone then yield d.WhyMissing src |]
        |> Array.distinct
    { Columns = shown |> Array.map (fun d -> d.Column)
      Rows = sources |> Array.mapi (fun i src -> { Label = src.Label; Baseline = src.Run.IsNone; Cells = columns |> Array.map (fun col -> col.[i]) })
      Footnotes = footnotes }

/// A number with `decimals` decimals (invariant culture); "n/a" for NaN.
let private formatFixed (decimals: int) (v: float) =
    if Double.IsNaN v then "n/a" else v.ToString("F" + string decimals, invariant)

/// Number format of the other scores: 2 decimals (the precision papers report).
let private formatScore = formatFixed 2

/// Every other score of the compared systems (n, ROUGE-Lsum, compression, extractiveness, novel
/// n-grams, ...), collapsed under the metrics table: ROUGE as F1 × 100, the rest as written.
let private otherScores (runs: Run[]) (sb: StringBuilder) =
    let systems = comparedSystems runs
    let inMain = Plots.comparedMetrics |> Array.map (fun (_, key, _) -> key) |> Set.ofArray
    let keysOf (pick: SystemScores -> string seq) =
        systems |> Array.collect (fun (_, s) -> pick s |> Seq.toArray) |> Array.distinct |> Array.sort |> Array.filter (inMain.Contains >> not)
    let rougeKeys = keysOf (fun s -> s.Rouge.Keys)
    let scalarKeys = keysOf (fun s -> s.Scalars.Keys)
    if rougeKeys.Length + scalarKeys.Length > 0 then
        sb.AppendFormat("<details><summary>Other test scores: n, {0}</summary>\n", esc (String.Join(", ", Array.append rougeKeys scalarKeys))) |> ignore
        sb.Append("<div class=\"scroll\"><table class=\"scores\"><thead><tr><th>system</th><th>n</th>") |> ignore
        for k in Array.append rougeKeys scalarKeys do sb.Append("<th>").Append(esc k).Append("</th>") |> ignore
        sb.Append("</tr></thead><tbody>\n") |> ignore
        let cell (value: float option) (ci: Interval option) (scale: float) =
            match value with
            | None -> "<td class=\"absent\">—</td>"
            | Some v ->
                let ciText =
                    match ci with
                    | Some c -> sprintf " <span class=\"ci\">[%s, %s]</span>" (formatScore (c.Low * scale)) (formatScore (c.High * scale))
                    | None -> ""
                sprintf "<td>%s%s</td>" (formatScore (v * scale)) ciText
        for label, s in systems do
            sb.Append("<tr><td>").Append(esc label).Append("</td><td>").Append(match s.N with Some n -> string n | None -> "—").Append("</td>") |> ignore
            for k in rougeKeys do sb.Append(cell (s.Rouge.TryFind k |> Option.map (fun p -> p.F1)) (s.IntervalOf k) 100.0) |> ignore
            for k in scalarKeys do sb.Append(cell (s.Scalars.TryFind k) (s.IntervalOf k) 1.0) |> ignore
            sb.Append("</tr>\n") |> ignore
        sb.Append("</tbody></table></div>\n</details>\n") |> ignore

let private metricsSection (runs: Run[]) (sb: StringBuilder) =
    sb.Append("<h2 id=\"metrics\">Metrics</h2>\n") |> ignore
    if runs |> Array.forall (fun r -> r.Scores.IsNone) then
        sb.AppendFormat("<p class=\"note\">No run has a {0}.</p>\n", FileNames.testScores) |> ignore
    let table = metricsTable runs
    if table.Columns.Length > 0 then
        sb.Append("<div class=\"scroll\"><table class=\"metrics\"><thead><tr><th>system</th>") |> ignore
        for c in table.Columns do
            sb.AppendFormat("<th title=\"{0}\">{1}</th>", esc c.Explanation, esc c.Header) |> ignore
        sb.Append("</tr></thead><tbody>\n") |> ignore
        for row in table.Rows do
            sb.Append("<tr><td>").Append(esc row.Label) |> ignore
            if row.Baseline then sb.Append(" <span class=\"tag\">baseline</span>") |> ignore
            sb.Append("</td>") |> ignore
            for c, cell in Array.zip table.Columns row.Cells do
                match cell.Value with
                | None -> sb.Append("<td class=\"absent\">—</td>") |> ignore
                | Some v ->
                    let number = formatFixed c.Decimals v
                    let ci =
                        match cell.Interval with
                        | Some i -> sprintf " <span class=\"ci\">[%s, %s]</span>" (formatFixed c.Decimals i.Low) (formatFixed c.Decimals i.High)
                        | None -> ""
                    let title = match cell.Note with Some n -> sprintf " title=\"%s\"" (esc n) | None -> ""
                    if cell.Best then sb.AppendFormat("<td class=\"best\"{0}><b>{1}</b>{2}</td>", title, number, ci) |> ignore
                    else sb.AppendFormat("<td{0}>{1}{2}</td>", title, number, ci) |> ignore
            sb.Append("</tr>\n") |> ignore
        sb.Append("</tbody></table></div>\n<ul class=\"legend\">\n") |> ignore
        for c in table.Columns |> Array.distinctBy (fun c -> c.Explanation) do
            let headers = table.Columns |> Array.filter (fun o -> o.Explanation = c.Explanation) |> Array.map (fun o -> o.Header)
            sb.AppendFormat("<li><b>{0}</b>: {1}.</li>\n", esc (String.Join(", ", headers)), esc c.Explanation) |> ignore
        sb.Append("<li><b>Bold</b>: best of its column (higher scores, lower loss, CV and drops), where values differ.</li>\n</ul>\n") |> ignore
        if table.Footnotes.Length > 0 then
            sb.Append("<p class=\"note\">—: ").Append(esc (String.Join("; ", table.Footnotes))).Append(".</p>\n") |> ignore
    otherScores runs sb

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
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 1.6em; }
nav { margin-bottom: 12px; } nav a { margin-right: 12px; }
ul.runs { padding-left: 20px; } ul.runs code { color: #888; font-size: 0.85em; margin-left: 6px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: #f2f4f7; }
table.metrics td:not(:first-child) { text-align: right; white-space: nowrap; }
td.best { background: #e6f4ea; }
td.absent { color: #999; }
td.path { font-family: monospace; }
span.ci { color: #666; font-size: 0.85em; }
span.tag { color: #666; font-size: 0.8em; border: 1px solid #ccc; border-radius: 3px; padding: 0 4px; }
ul.legend { color: #555; font-size: 0.85em; margin: 4px 0; padding-left: 20px; }
details { margin: 8px 0; } summary { cursor: pointer; color: #335; }
.scroll { overflow-x: auto; }
.note { color: #666; } p.note { font-size: 0.9em; }
.charts { display: flex; flex-wrap: wrap; gap: 8px 16px; }
.chart { margin: 4px 0 16px 0; }
.sample { border-left: 3px solid #8fa8d8; padding-left: 12px; margin: 12px 0; }
.sample p.doc { color: #444; }
"""

/// The report page of `runs` (names made unique first): title and a one-line summary per run, the
/// metrics table, the charts, the config comparison, the samples.
let render (options: ReportOptions) (runs: Run[]) : string =
    match validate options with
    | [] -> ()
    | problems -> invalidArg "options" (String.Join("; ", problems))
    if runs.Length = 0 then invalidArg "runs" "expected at least one run"
    let runs = uniqueNames runs
    let sb = StringBuilder()
    sb.Append("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>").Append(esc options.Title)
      .Append("</title>\n<style>").Append(style).Append("</style>\n").Append(Plots.plotlyScript ())
      .Append("</head><body>\n<h1>").Append(esc options.Title).Append("</h1>\n<nav><a href=\"#metrics\">Metrics</a><a href=\"#charts\">Charts</a><a href=\"#configs\">Configs</a><a href=\"#samples\">Samples</a></nav>\n<ul class=\"runs\">\n") |> ignore
    for r in runs do
        sb.Append("<li><b>").Append(esc r.Name).Append("</b> — ").Append(esc (runSummary r))
          .Append(" <code>").Append(esc r.Directory).Append("</code></li>\n") |> ignore
    sb.Append("</ul>\n") |> ignore
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
    configSection runs sb
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
