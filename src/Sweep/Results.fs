/// Results of a sweep: one row per run read back from its folder (metrics.jsonl, routing.jsonl,
/// test_scores.json, parameters.json), written as results.csv (exact numbers) and results.md (a table),
/// and the combined report page of the runs (`Report`).
module Moe.Sweep.Results

open System
open System.IO
open System.Text
open System.Text.Json
open System.Text.Json.Nodes
open Moe
open Moe.Sweep.ConfigTree
open Moe.Sweep.Grid
open Moe.Sweep.Runner

/// A test metric with its confidence interval when the run folder has one.
type Estimate = { Value: float; Low: float option; High: float option }

/// One row of results.csv / results.md, read from a run folder.
type ResultRow =
    { Run: Run
      Status: RunStatus
      /// Last optimizer step logged in metrics.jsonl.
      Steps: int option
      /// The last validation loss, and the lowest.
      ValidLoss: float option
      BestValidLoss: float option
      /// test_scores.json's "model" record: ROUGE F1s, BLEU, and any other number, with "model_ci" intervals.
      Test: (string * Estimate) list
      /// Coefficient of variation (std / mean) of tokens per expert at the last logged step, averaged over layers.
      LoadCv: float option
      /// Dropped fraction at the last logged step, averaged over layers.
      DroppedFraction: float option
      /// Mean of tokens_per_s over the logged training lines.
      TokensPerSecond: float option
      ParametersTotal: int64 option
      ParametersActive: int64 option
      /// What could not be read (malformed lines, unreadable files).
      Notes: string list }

let private number (n: JsonNode) : float option =
    match n with
    | :? JsonValue as v when v.GetValueKind() = JsonValueKind.Number -> Some(Double.Parse(v.ToJsonString(), inv))
    | _ -> None

let private child (n: JsonNode) (name: string) : JsonNode =
    match n with
    | :? JsonObject as o -> tryProperty o name |> Option.defaultValue null
    | _ -> null

/// The JSON objects of a JSONL file; malformed lines are noted (file and line), never guessed at.
let private jsonLines (path: string) (notes: ResizeArray<string>) : JsonObject list =
    if not (File.Exists path) then []
    else
        [ for i, line in File.ReadAllLines path |> Array.indexed do
            if not (String.IsNullOrWhiteSpace line) then
                match Json.parse line with
                | Ok(:? JsonObject as o) -> yield o
                | _ -> notes.Add(sprintf "%s line %d: not a JSON object" (Path.GetFileName path) (i + 1)) ]

let private tryMax (xs: 'a list) : 'a option = if xs.IsEmpty then None else Some(List.max xs)

let private jsonFile (path: string) (notes: ResizeArray<string>) : JsonNode =
    if not (File.Exists path) then null
    else
        match Json.parse (File.ReadAllText path) with
        | Ok n -> n
        | Error e ->
            notes.Add(sprintf "%s: %s" (Path.GetFileName path) e)
            null

/// Coefficient of variation of one load vector: population standard deviation over the mean.
let loadCv (tokensPerExpert: float[]) : float =
    let mean = Array.average tokensPerExpert
    let variance = tokensPerExpert |> Array.averageBy (fun x -> (x - mean) * (x - mean))
    if mean = 0.0 then nan else sqrt variance / mean

/// Reads a run folder's files into a results row.
let readRow (run: Run) : ResultRow =
    let dir = run.RunDir
    let notes = ResizeArray<string>()
    let metrics = jsonLines (Path.Combine(dir, Train.RunFiles.metricsName)) notes
    let split (s: string) =
        metrics |> List.filter (fun o -> match child o "split" with :? JsonValue as v -> v.GetValueKind() = JsonValueKind.String && v.GetValue<string>() = s | _ -> false)
    let valid = split "valid" |> List.choose (fun o -> number (child o "loss"))
    let speeds = split "train" |> List.choose (fun o -> number (child o "tokens_per_s"))
    let steps = metrics |> List.choose (fun o -> number (child o "step")) |> List.map int
    // Routing: the last logged step, each layer's vector and dropped fraction.
    let routing = jsonLines (Path.Combine(dir, Train.RunFiles.routingName)) notes
    let lastStep = routing |> List.choose (fun o -> number (child o "step")) |> tryMax
    let lastLines =
        match lastStep with
        | Some s -> routing |> List.filter (fun o -> number (child o "step") = Some s)
        | None -> []
    let cvs =
        lastLines
        |> List.choose (fun o ->
            match child o "tokens_per_expert" with
            | :? JsonArray as a when a.Count > 0 ->
                let xs = a |> Seq.map number |> Seq.toArray
                if xs |> Array.forall Option.isSome then Some(loadCv (xs |> Array.map Option.get)) else None
            | _ -> None)
    let dropped = lastLines |> List.choose (fun o -> number (child o "dropped_fraction"))
    let mean (xs: float list) = if xs.IsEmpty then None else Some(List.average xs)
    // Test scores: every number of the model record (an object with "f1" counts as its F1).
    let scores = jsonFile (Path.Combine(dir, testScoresName)) notes
    let model = child scores "model"
    let intervals = child scores "model_ci"
    let test =
        match model with
        | :? JsonObject as m ->
            [ for kv in m do
                let value =
                    match number kv.Value with
                    | Some x -> Some x
                    | None -> number (child kv.Value "f1")
                if kv.Key <> "n" && value.IsSome then
                    let ci =
                        let direct = child intervals kv.Key
                        if isNull (child direct "low") then child direct "f1" else direct
                    yield kv.Key, { Value = value.Value; Low = number (child ci "low"); High = number (child ci "high") } ]
        | _ -> []
    // Parameter counts: parameters.json, written when training starts.
    let parameters =
        match Train.RunFiles.readParameters dir with
        | Some(Ok p) -> Some p
        | Some(Error e) ->
            notes.Add e
            None
        | None -> None
    { Run = run
      Status = status dir
      Steps = tryMax steps
      ValidLoss = List.tryLast valid
      BestValidLoss = if valid.IsEmpty then None else Some(List.min valid)
      Test = test
      LoadCv = mean cvs
      DroppedFraction = mean dropped
      TokensPerSecond = mean speeds
      ParametersTotal = parameters |> Option.map (fun p -> p.Total)
      ParametersActive = parameters |> Option.map (fun p -> p.Active)
      Notes = List.ofSeq notes }

/// The results of every run of the plan, in run order.
let collect (plan: Plan) : ResultRow list = plan.Runs |> List.map readRow

let private metricNames (rows: ResultRow list) : string list =
    rows |> List.collect (fun r -> r.Test |> List.map fst) |> List.distinct

let private csvField (s: string) : string =
    if s.IndexOfAny([| ','; '"'; '\n'; '\r' |]) >= 0 then "\"" + s.Replace("\"", "\"\"") + "\"" else s

let private exact (x: float option) = x |> Option.map (fun v -> v.ToString("R", inv)) |> Option.defaultValue ""
let private exactInt (x: int64 option) = x |> Option.map (fun v -> v.ToString inv) |> Option.defaultValue ""

/// results.csv: one row per run with exact numbers; an empty field where the run folder has no value.
/// Columns: index, run, status, one per axis, steps, valid_loss, best_valid_loss, each test metric with
/// `_low` and `_high`, load_cv, dropped_fraction, tokens_per_s, params_total, params_active, notes.
let formatCsv (plan: Plan) (rows: ResultRow list) : string =
    let axes = plan.Spec.Axes |> List.map (fun a -> a.Column)
    let metrics = metricNames rows
    let header =
        [ yield! [ "index"; "run"; "status" ]
          yield! axes
          yield! [ "steps"; "valid_loss"; "best_valid_loss" ]
          for m in metrics do yield! [ m; m + "_low"; m + "_high" ]
          yield! [ "load_cv"; "dropped_fraction"; "tokens_per_s"; "params_total"; "params_active"; "notes" ] ]
    let line (r: ResultRow) =
        [ yield string r.Run.Index
          yield r.Run.Name
          yield statusText r.Status
          for a in axes do yield (r.Run.Varied |> List.tryFind (fun (c, _) -> c = a) |> Option.map snd |> Option.defaultValue "")
          yield r.Steps |> Option.map string |> Option.defaultValue ""
          yield exact r.ValidLoss
          yield exact r.BestValidLoss
          for m in metrics do
              match r.Test |> List.tryFind (fun (n, _) -> n = m) with
              | Some(_, e) -> yield! [ exact (Some e.Value); exact e.Low; exact e.High ]
              | None -> yield! [ ""; ""; "" ]
          yield exact r.LoadCv
          yield exact r.DroppedFraction
          yield exact r.TokensPerSecond
          yield exactInt r.ParametersTotal
          yield exactInt r.ParametersActive
          yield String.concat "; " r.Notes ]
    let all = header :: (rows |> List.map line)
    (all |> List.map (List.map csvField >> String.concat ",") |> String.concat "\n") + "\n"

/// Significant digits shown in results.md (the CSV keeps every digit).
let private shownDigits = "G4"
let private shown (x: float option) = x |> Option.map (fun v -> v.ToString(shownDigits, inv)) |> Option.defaultValue "-"

/// A parameter count with a unit: 1234567 -> 1.23M.
let private humanCount (n: int64) : string =
    let x = float n
    if x >= 1e9 then sprintf "%.2fG" (x / 1e9)
    elif x >= 1e6 then sprintf "%.2fM" (x / 1e6)
    elif x >= 1e3 then sprintf "%.1fk" (x / 1e3)
    else string n

/// The test metrics results.md shows, in this order, where runs have them (results.csv has every one).
let markdownMetrics = [ "rouge1"; "rouge2"; "rougeL"; "rougeLsum"; "bleu" ]

let private mdCell (s: string) = s.Replace("|", "\\|").Replace("\n", " ")

/// results.md: the sweep, a status count, one table row per run (metrics as `value [low, high]`), notes,
/// and `reportNote` (where the combined report page is, or why there is none).
let formatMarkdown (plan: Plan) (rows: ResultRow list) (reportNote: string) : string =
    let spec = plan.Spec
    let sb = StringBuilder()
    let line (s: string) = sb.AppendLine s |> ignore
    line (sprintf "# Sweep `%s`" spec.Name)
    line ""
    if spec.Description <> "" then
        line spec.Description
        line ""
    line (sprintf "%s%d runs: %s. Run folders in `%s`."
              (if spec.Source <> "" then sprintf "Grid file `%s`. " spec.Source else "") rows.Length
              (rows |> List.countBy (fun r -> r.Status) |> List.map (fun (s, n) -> sprintf "%d %s" n (statusText s)) |> String.concat ", ")
              spec.RunsDir)
    line ""
    let axes = spec.Axes |> List.map (fun a -> a.Column)
    let present = metricNames rows
    let metrics = markdownMetrics |> List.filter (fun m -> List.contains m present)
    let header =
        [ yield "#"; yield "status"; yield! axes; yield "valid loss (best)"
          yield! metrics
          yield! [ "load CV"; "dropped"; "tokens/s"; "params (active)"; "run" ] ]
    line ("| " + (header |> List.map mdCell |> String.concat " | ") + " |")
    line ("|" + (header |> List.map (fun _ -> "---") |> String.concat "|") + "|")
    for r in rows do
        let cells =
            [ yield string r.Run.Index
              yield statusText r.Status
              for a in axes do yield (r.Run.Varied |> List.tryFind (fun (c, _) -> c = a) |> Option.map snd |> Option.defaultValue "")
              yield (match r.ValidLoss, r.BestValidLoss with
                     | Some v, Some b when v <> b -> sprintf "%s (%s)" (shown (Some v)) (shown (Some b))
                     | v, _ -> shown v)
              for m in metrics do
                  match r.Test |> List.tryFind (fun (n, _) -> n = m) with
                  | Some(_, { Value = v; Low = Some lo; High = Some hi }) ->
                      yield sprintf "%s [%s, %s]" (shown (Some v)) (shown (Some lo)) (shown (Some hi))
                  | Some(_, e) -> yield shown (Some e.Value)
                  | None -> yield "-"
              yield shown r.LoadCv
              yield shown r.DroppedFraction
              yield r.TokensPerSecond |> Option.map (sprintf "%.0f") |> Option.defaultValue "-"
              yield (match r.ParametersTotal, r.ParametersActive with
                     | Some t, Some a -> sprintf "%s (%s)" (humanCount t) (humanCount a)
                     | Some t, None -> humanCount t
                     | None, Some a -> sprintf "- (%s)" (humanCount a)
                     | None, None -> "-")
              yield sprintf "`%s`" r.Run.Name ]
        line ("| " + (cells |> List.map mdCell |> String.concat " | ") + " |")
    let noted = rows |> List.filter (fun r -> not r.Notes.IsEmpty)
    if not noted.IsEmpty then
        line ""
        line "Problems reading run folders:"
        for r in noted do
            for n in r.Notes do line (sprintf "- `%s`: %s" r.Run.Name n)
    line ""
    line "Columns: validation loss is the last logged (best in brackets when different); test metrics come from"
    line "test_scores.json (ROUGE as F1 fractions, BLEU in [0, 100]) with their confidence intervals where the run"
    line "stored them (results.csv has every metric of the file, with exact numbers); load CV is std/mean of tokens per expert at the last logged step, averaged over MoE layers;"
    line "dropped is the dropped fraction at that step; tokens/s is the mean over logged training steps."
    line ""
    line reportNote
    sb.ToString()

/// Writes results.csv and results.md into the sweep's output folder; returns their paths.
let writeResults (plan: Plan) (rows: ResultRow list) (reportNote: string) : string * string =
    Directory.CreateDirectory plan.Spec.OutputDir |> ignore
    let csv = Path.Combine(plan.Spec.OutputDir, "results.csv")
    let md = Path.Combine(plan.Spec.OutputDir, "results.md")
    File.WriteAllText(csv, formatCsv plan rows)
    File.WriteAllText(md, formatMarkdown plan rows reportNote)
    csv, md

/// The combined report page of a sweep: `<output>/report.html`.
let reportPath (spec: SweepSpec) : string = Path.Combine(spec.OutputDir, "report.html")

/// Writes the combined report page (`Report.write`: metrics with intervals, charts, the settings that differ,
/// samples) of the runs whose folders hold logs or scores, and returns the line results.md shows: where the
/// page is, or why there is none (no run has files yet, or a run file is malformed: file, line and reason).
let writeReport (plan: Plan) : string =
    let hasFiles (dir: string) =
        [ Train.RunFiles.configName; Train.RunFiles.metricsName; Train.RunFiles.routingName; testScoresName ]
        |> List.exists (fun f -> File.Exists(Path.Combine(dir, f)))
    let dirs = plan.Runs |> List.filter (fun r -> hasFiles r.RunDir) |> List.map (fun r -> r.RunDir)
    if dirs.IsEmpty then "Combined report page: not written; no run folder has logs or scores yet."
    else
        try
            let options = { Report.defaults with Title = sprintf "Sweep %s" plan.Spec.Name }
            Report.write options (reportPath plan.Spec) dirs |> ignore
            sprintf "Combined report page: [report.html](report.html) (%d of %d runs; `./moe report` with the same folders redraws it)."
                dirs.Length plan.Runs.Length
        with :? RunLog.RunFileException as e ->
            sprintf "Combined report page: not written; a run file is malformed: %s" e.Message
