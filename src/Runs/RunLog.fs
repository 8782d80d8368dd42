/// Readers for a run folder (`runs/<name>/`): the training logs, routing statistics, test scores,
/// resolved config and aligned text files that training and evaluation write, as described in the
/// run folder contract. Every reader rejects malformed input with a `RunFileException` that names
/// the file, the line (JSON Lines and text files) or the JSON path (JSON files) and what was expected.
/// Also: load balance summaries (coefficient of variation, collapsed experts) of routing statistics.
/// Axes: E experts, L labels.
module Moe.RunLog

open System
open System.IO
open System.Text
open System.Text.Json

/// Malformed or missing run-folder input. `Line` is 1-based; 0 where no line applies (a JSON path
/// in the reason then says where).
type RunFileException(file: string, line: int, reason: string) =
    inherit Exception(if line > 0 then sprintf "%s:%d: %s" file line reason else sprintf "%s: %s" file reason)
    /// The file (or folder) at fault.
    member _.File = file
    /// 1-based line number; 0 when the fault is not tied to one line.
    member _.Line = line
    /// What was expected and what was found.
    member _.Reason = reason

/// File names of the run folder contract.
module FileNames =
    let config = "config.json"
    let metrics = "metrics.jsonl"
    let routing = "routing.jsonl"
    let routingByLabel = "routing_by_label.json"
    let testScores = "test_scores.json"
    let predictions = "predictions.txt"
    let references = "references.txt"
    let documents = "documents.txt"

/// The `split` values of metrics.jsonl.
module Splits =
    let train = "train"
    let valid = "valid"

/// One line of metrics.jsonl: a training (`split` = "train") or validation ("valid") log entry.
type MetricsRecord =
    { Step: int
      Split: string
      /// Total loss (task loss plus weighted aux losses on train lines).
      Loss: float
      TaskLoss: float option
      /// Unweighted auxiliary losses by name (switch_aux, importance, load, z_loss, ...).
      Aux: Map<string, float>
      Lr: float option
      TokensPerS: float option
      ElapsedS: float option }

/// One line of routing.jsonl: the statistics of one MoE layer at one logging step.
type RoutingRecord =
    { Step: int
      Layer: string
      /// Share of kept token assignments per expert. // [E]
      TokensPerExpert: float[]
      /// Fraction of proposed assignments dropped by expert capacity, in [0, 1].
      DroppedFraction: float
      /// Mean entropy (nats) of the router distribution over tokens.
      RouterEntropy: float }

/// Routing counts of one layer broken down by a label of the data (topic, source, ...).
type LabelUsage =
    { Layer: string
      Labels: string[]
      Experts: int
      /// Token assignments of each label to each expert. // [L; E]
      Counts: float[][] }

/// Precision, recall and F1 of one ROUGE variant (fractions in [0, 1]).
type Prf = { Precision: float; Recall: float; F1: float }

/// A bootstrap confidence interval (2.5th, 50th and 97.5th percentiles).
type Interval = { Low: float; Mid: float; High: float }

/// The scores of one system (`model`, `lead1`, ...) from test_scores.json.
type SystemScores =
    { System: string
      /// Number of scored examples, where recorded.
      N: int option
      /// ROUGE variants by name (rouge1, rouge2, rougeL, rougeLsum, ...).
      Rouge: Map<string, Prf>
      /// Every other numeric score by name; nested objects are flattened with dots
      /// (bleu, compression, extractiveness, novel_ngrams.1, ...).
      Scalars: Map<string, float>
      /// Confidence intervals from `<system>_ci`, keyed as written there, nested keys joined by dots
      /// (`rouge1` or `rouge1.f1`, `bleu`).
      Intervals: Map<string, Interval> }

    /// The interval of a ROUGE variant's F1 (`rouge1.f1`, else `rouge1`) or of a scalar score.
    member s.IntervalOf(metric: string) : Interval option =
        match s.Intervals.TryFind(metric + ".f1") with
        | Some ci -> Some ci
        | None -> s.Intervals.TryFind metric

/// One leaf of config.json: a dotted path (`model.moe.experts`, `layers[0].kind`) and its JSON text.
type ConfigEntry = { Path: string; Value: string }

/// The aligned text files of a test set: line i of each belongs to example i.
type Texts =
    { Predictions: string[]
      References: string[]
      Documents: string[] option }

/// Everything a run folder holds; absent optional files are empty arrays or None.
type Run =
    { /// The folder's name.
      Name: string
      Directory: string
      Config: ConfigEntry[] option
      Metrics: MetricsRecord[]
      Routing: RoutingRecord[]
      ByLabel: LabelUsage[] option
      Scores: SystemScores[] option
      Texts: Texts option }

// ---------------------------------------------------------------------------------------------
// JSON access with located errors

/// Where a value came from: the file, its line (0 for whole-file JSON) and the JSON path within.
type private Where = { File: string; Line: int }

let private fail (w: Where) (reason: string) : 'a = raise (RunFileException(w.File, w.Line, reason))

let private kindName (e: JsonElement) =
    match e.ValueKind with
    | JsonValueKind.Object -> "an object"
    | JsonValueKind.Array -> "an array"
    | JsonValueKind.String -> sprintf "the string %s" (e.GetRawText())
    | JsonValueKind.Number -> sprintf "the number %s" (e.GetRawText())
    | JsonValueKind.True | JsonValueKind.False -> sprintf "the boolean %s" (e.GetRawText())
    | JsonValueKind.Null -> "null"
    | _ -> "nothing"

let private parseDocument (w: Where) (text: string) : JsonDocument =
    try JsonDocument.Parse(text)
    with :? JsonException as e ->
        let line = if e.LineNumber.HasValue then w.Line + int e.LineNumber.Value + (if w.Line > 0 then 0 else 1) else w.Line
        raise (RunFileException(w.File, line, sprintf "not valid JSON (%s)" (e.Message.Split('|').[0].Trim())))

let private expectObject (w: Where) (path: string) (e: JsonElement) =
    if e.ValueKind <> JsonValueKind.Object then fail w (sprintf "expected %s to be an object, got %s" path (kindName e))

let private tryField (o: JsonElement) (name: string) : JsonElement option =
    match o.TryGetProperty name with
    | true, v when v.ValueKind <> JsonValueKind.Null -> Some v
    | _ -> None

let private field (w: Where) (path: string) (o: JsonElement) (name: string) : JsonElement =
    match tryField o name with
    | Some v -> v
    | None -> fail w (sprintf "expected a field \"%s\" in %s" name path)

/// A JSON number; the strings "NaN", "Infinity" and "-Infinity" are accepted too, as written by
/// System.Text.Json's named floating-point literals (a diverged loss is data, not a format error).
let private asFloat (w: Where) (path: string) (e: JsonElement) : float =
    match e.ValueKind with
    | JsonValueKind.Number -> e.GetDouble()
    | JsonValueKind.String when e.GetString() = "NaN" -> nan
    | JsonValueKind.String when e.GetString() = "Infinity" -> infinity
    | JsonValueKind.String when e.GetString() = "-Infinity" -> -infinity
    | _ -> fail w (sprintf "expected %s to be a number, got %s" path (kindName e))

let private asInt (w: Where) (path: string) (e: JsonElement) : int =
    match e.ValueKind with
    | JsonValueKind.Number ->
        match e.TryGetInt32() with
        | true, v -> v
        | _ -> fail w (sprintf "expected %s to be an integer, got %s" path (kindName e))
    | _ -> fail w (sprintf "expected %s to be an integer, got %s" path (kindName e))

let private asString (w: Where) (path: string) (e: JsonElement) : string =
    if e.ValueKind = JsonValueKind.String then e.GetString()
    else fail w (sprintf "expected %s to be a string, got %s" path (kindName e))

let private asArray (w: Where) (path: string) (e: JsonElement) : JsonElement[] =
    if e.ValueKind = JsonValueKind.Array then [| for x in e.EnumerateArray() -> x |]
    else fail w (sprintf "expected %s to be an array, got %s" path (kindName e))

let private optFloat w (o: JsonElement) name = tryField o name |> Option.map (asFloat w name)

// ---------------------------------------------------------------------------------------------
// Text files

let private strictUtf8 = UTF8Encoding(false, true)

/// Lines of a UTF-8 text file (`\n` or `\r\n` endings; a final newline does not start a line).
/// Invalid UTF-8 is an error naming the line.
let readLines (path: string) : string[] =
    if not (File.Exists path) then raise (RunFileException(path, 0, "no such file"))
    let bytes = File.ReadAllBytes path
    let start = if bytes.Length >= 3 && bytes.[0] = 0xEFuy && bytes.[1] = 0xBBuy && bytes.[2] = 0xBFuy then 3 else 0
    let lines = ResizeArray<string>()
    let mutable lineStart = start
    let decode (fromByte: int) (toByte: int) =
        let stop = if toByte > fromByte && bytes.[toByte - 1] = byte '\r' then toByte - 1 else toByte
        try lines.Add(strictUtf8.GetString(bytes, fromByte, stop - fromByte))
        with :? DecoderFallbackException ->
            raise (RunFileException(path, lines.Count + 1, "expected UTF-8 text, found an invalid byte sequence"))
    for i in start .. bytes.Length - 1 do
        if bytes.[i] = byte '\n' then
            decode lineStart i
            lineStart <- i + 1
    if lineStart < bytes.Length then decode lineStart bytes.Length
    lines.ToArray()

/// Each non-blank line of a JSON Lines file as (1-based line number, parsed object).
let private jsonLines (path: string) : (Where * JsonElement)[] =
    readLines path
    |> Array.mapi (fun i text -> i + 1, text)
    |> Array.filter (fun (_, text) -> not (String.IsNullOrWhiteSpace text))
    |> Array.map (fun (n, text) ->
        let w = { File = path; Line = n }
        let doc = parseDocument w text
        let root = doc.RootElement.Clone()
        doc.Dispose()
        expectObject w "the line" root
        w, root)

let private jsonFile (path: string) : JsonElement =
    if not (File.Exists path) then raise (RunFileException(path, 0, "no such file"))
    let text =
        try strictUtf8.GetString(File.ReadAllBytes path)
        with :? DecoderFallbackException -> raise (RunFileException(path, 0, "expected UTF-8 text, found an invalid byte sequence"))
    use doc = parseDocument { File = path; Line = 0 } text
    doc.RootElement.Clone()

// ---------------------------------------------------------------------------------------------
// metrics.jsonl

/// Reads metrics.jsonl: `step`, `split` and `loss` are required; `task_loss`, `aux` (an object of
/// numbers), `lr`, `tokens_per_s` and `elapsed_s` are optional; other fields are ignored.
let readMetrics (path: string) : MetricsRecord[] =
    jsonLines path
    |> Array.map (fun (w, o) ->
        let step = asInt w "\"step\"" (field w "the line" o "step")
        if step < 0 then fail w (sprintf "expected \"step\" >= 0, got %d" step)
        let aux =
            match tryField o "aux" with
            | None -> Map.empty
            | Some a ->
                expectObject w "\"aux\"" a
                a.EnumerateObject()
                |> Seq.map (fun p -> p.Name, asFloat w (sprintf "aux.%s" p.Name) p.Value)
                |> Map.ofSeq
        { Step = step
          Split = asString w "\"split\"" (field w "the line" o "split")
          Loss = asFloat w "\"loss\"" (field w "the line" o "loss")
          TaskLoss = optFloat w o "task_loss"
          Aux = aux
          Lr = optFloat w o "lr"
          TokensPerS = optFloat w o "tokens_per_s"
          ElapsedS = optFloat w o "elapsed_s" })

// ---------------------------------------------------------------------------------------------
// routing.jsonl

/// Reads routing.jsonl: `step`, `layer`, `tokens_per_expert` (non-negative numbers), `dropped_fraction`
/// (in [0, 1]) and `router_entropy` (>= 0) are required, and a layer keeps its number of experts
/// from line to line.
let readRouting (path: string) : RoutingRecord[] =
    let experts = Collections.Generic.Dictionary<string, int * int>()
    jsonLines path
    |> Array.map (fun (w, o) ->
        let layer = asString w "\"layer\"" (field w "the line" o "layer")
        let shares =
            asArray w "\"tokens_per_expert\"" (field w "the line" o "tokens_per_expert")
            |> Array.mapi (fun e x -> asFloat w (sprintf "tokens_per_expert[%d]" e) x)
        if shares.Length = 0 then fail w "expected \"tokens_per_expert\" to hold one number per expert, got an empty array"
        shares |> Array.iteri (fun e x ->
            if not (Double.IsFinite x) || x < 0.0 then fail w (sprintf "expected tokens_per_expert[%d] to be a finite number >= 0, got %g" e x))
        match experts.TryGetValue layer with
        | true, (count, firstLine) when count <> shares.Length ->
            fail w (sprintf "expected %d experts for layer \"%s\" (as on line %d), got %d" count layer firstLine shares.Length)
        | true, _ -> ()
        | false, _ -> experts.[layer] <- (shares.Length, w.Line)
        let dropped = asFloat w "\"dropped_fraction\"" (field w "the line" o "dropped_fraction")
        if not (dropped >= 0.0 && dropped <= 1.0) then fail w (sprintf "expected \"dropped_fraction\" in [0, 1], got %g" dropped)
        let entropy = asFloat w "\"router_entropy\"" (field w "the line" o "router_entropy")
        if not (entropy >= 0.0) then fail w (sprintf "expected \"router_entropy\" >= 0, got %g" entropy)
        let step = asInt w "\"step\"" (field w "the line" o "step")
        if step < 0 then fail w (sprintf "expected \"step\" >= 0, got %d" step)
        { Step = step
          Layer = layer
          TokensPerExpert = shares
          DroppedFraction = dropped
          RouterEntropy = entropy })

// ---------------------------------------------------------------------------------------------
// routing_by_label.json

/// Reads routing_by_label.json: `{"layers": [{"layer", "labels", "experts", "counts": [L][E]}]}`.
let readRoutingByLabel (path: string) : LabelUsage[] =
    let w = { File = path; Line = 0 }
    let root = jsonFile path
    expectObject w "the document" root
    asArray w "\"layers\"" (field w "the document" root "layers")
    |> Array.mapi (fun i l ->
        let at = sprintf "layers[%d]" i
        expectObject w at l
        let experts = asInt w (at + ".experts") (field w at l "experts")
        if experts < 1 then fail w (sprintf "expected %s.experts >= 1, got %d" at experts)
        let labels = asArray w (at + ".labels") (field w at l "labels") |> Array.mapi (fun j x -> asString w (sprintf "%s.labels[%d]" at j) x)
        let rows = asArray w (at + ".counts") (field w at l "counts")
        if rows.Length <> labels.Length then
            fail w (sprintf "expected %s.counts to hold one row per label (%d), got %d rows" at labels.Length rows.Length)
        let counts =
            rows |> Array.mapi (fun j row ->
                let cells = asArray w (sprintf "%s.counts[%d]" at j) row
                if cells.Length <> experts then
                    fail w (sprintf "expected %s.counts[%d] to hold %d numbers (one per expert), got %d" at j experts cells.Length)
                cells |> Array.mapi (fun e c ->
                    let v = asFloat w (sprintf "%s.counts[%d][%d]" at j e) c
                    if not (Double.IsFinite v) || v < 0.0 then fail w (sprintf "expected %s.counts[%d][%d] >= 0, got %g" at j e v)
                    v))
        { Layer = asString w (at + ".layer") (field w at l "layer"); Labels = labels; Experts = experts; Counts = counts })

// ---------------------------------------------------------------------------------------------
// test_scores.json

let private ciSuffix = "_ci"

let private isPrf (o: JsonElement) =
    o.ValueKind = JsonValueKind.Object && (tryField o "f1").IsSome

let private isInterval (o: JsonElement) =
    o.ValueKind = JsonValueKind.Object && (tryField o "low").IsSome && (tryField o "high").IsSome

/// Flattens the numeric leaves of a score object (`novel_ngrams.1`); strings, booleans and nulls are
/// not scores and are skipped.
let rec private numericLeaves (w: Where) (path: string) (e: JsonElement) : (string * float) list =
    match e.ValueKind with
    | JsonValueKind.Number -> [ path, e.GetDouble() ]
    | JsonValueKind.Object ->
        [ for p in e.EnumerateObject() do yield! numericLeaves w (path + "." + p.Name) p.Value ]
    | JsonValueKind.Array -> fail w (sprintf "expected %s to be a number or an object of numbers, got an array" path)
    | _ -> []

let private readSystem (w: Where) (name: string) (o: JsonElement) (intervals: Map<string, Interval>) : SystemScores =
    expectObject w name o
    let mutable rouge = Map.empty
    let mutable scalars = Map.empty
    for p in o.EnumerateObject() do
        let at = sprintf "%s.%s" name p.Name
        if p.Name = "n" then ()
        elif isPrf p.Value then
            let get f = asFloat w (sprintf "%s.%s" at f) (field w at p.Value f)
            rouge <- rouge.Add(p.Name, { Precision = get "precision"; Recall = get "recall"; F1 = get "f1" })
        else
            for key, v in numericLeaves w at p.Value do
                scalars <- scalars.Add(key.Substring(name.Length + 1), v)
    { System = name
      N = tryField o "n" |> Option.map (asInt w (name + ".n"))
      Rouge = rouge
      Scalars = scalars
      Intervals = intervals }

let private readIntervals (w: Where) (name: string) (o: JsonElement) : Map<string, Interval> =
    expectObject w name o
    let rec walk (path: string) (key: string) (e: JsonElement) : (string * Interval) list =
        if isInterval e then
            let get f = asFloat w (sprintf "%s.%s" path f) (field w path e f)
            let low, high = get "low", get "high"
            let mid = match tryField e "mid" with Some m -> asFloat w (path + ".mid") m | None -> fail w (sprintf "expected a field \"mid\" in %s" path)
            if not (low <= mid && mid <= high) then fail w (sprintf "expected %s to have low <= mid <= high, got %g, %g, %g" path low mid high)
            [ key, { Low = low; Mid = mid; High = high } ]
        elif e.ValueKind = JsonValueKind.Object then
            [ for p in e.EnumerateObject() do
                yield! walk (path + "." + p.Name) (if key = "" then p.Name else key + "." + p.Name) p.Value ]
        else fail w (sprintf "expected %s to be an interval {\"low\", \"mid\", \"high\"} or an object of them, got %s" path (kindName e))
    walk name "" o |> Map.ofList

/// Reads test_scores.json: one score record per system, and optional `<system>_ci` objects of
/// confidence intervals (`{"rouge1": {"low", "mid", "high"}}`, or nested per precision/recall/f1).
let readTestScores (path: string) : SystemScores[] =
    let w = { File = path; Line = 0 }
    let root = jsonFile path
    expectObject w "the document" root
    let props = [| for p in root.EnumerateObject() -> p.Name, p.Value |]
    let systems = props |> Array.filter (fun (n, _) -> not (n.EndsWith ciSuffix))
    let cis = props |> Array.filter (fun (n, _) -> n.EndsWith ciSuffix)
    for n, _ in cis do
        let system = n.Substring(0, n.Length - ciSuffix.Length)
        if not (systems |> Array.exists (fun (s, _) -> s = system)) then
            fail w (sprintf "found \"%s\" but no score record \"%s\" it belongs to" n system)
    if systems.Length = 0 then fail w "expected at least one system's score record (e.g. \"model\")"
    systems |> Array.map (fun (name, o) ->
        let intervals =
            match cis |> Array.tryFind (fun (n, _) -> n = name + ciSuffix) with
            | Some (n, ci) -> readIntervals w n ci
            | None -> Map.empty
        readSystem w name o intervals)

/// The JSON of test_scores.json for named systems (`model`, `lead1`, ...): each system's
/// `moe score --json` object, and `<system>_ci` with the bootstrap intervals of each ROUGE variant's
/// F1 (`{"rouge1": {"low", "mid", "high"}, ...}`) and, where documents were scored, of compression
/// and extractiveness. Corpus BLEU has no interval (the report's interval is of mean sentence BLEU,
/// a different number), so none is written for it.
let testScoresJson (systems: (string * Metrics.ScoreReport)[]) : string =
    let names = systems |> Array.map fst
    match names |> Array.tryFind (fun n -> String.IsNullOrEmpty n || n.EndsWith ciSuffix) with
    | Some bad -> invalidArg "systems" (sprintf "expected system names that are not empty and do not end in %s, got \"%s\"" ciSuffix bad)
    | None -> ()
    if (Array.distinct names).Length <> names.Length then
        invalidArg "systems" (sprintf "expected distinct system names, got [%s]" (String.Join(", ", names)))
    use stream = new MemoryStream()
    let w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
    let interval (name: string) (e: Metrics.Estimate) =
        w.WriteStartObject(name)
        w.WriteNumber("low", e.Low)
        w.WriteNumber("mid", e.Mid)
        w.WriteNumber("high", e.High)
        w.WriteEndObject()
    w.WriteStartObject()
    for name, report in systems do
        w.WritePropertyName(name)
        w.WriteRawValue(Metrics.Scoring.toJson report)
        w.WriteStartObject(name + ciSuffix)
        interval "rouge1" report.Rouge1.F1
        interval "rouge2" report.Rouge2.F1
        interval "rougeL" report.RougeL.F1
        interval "rougeLsum" report.RougeLsum.F1
        match report.Document with
        | Some d ->
            interval "compression" d.Compression
            interval "extractiveness" d.Extractiveness
        | None -> ()
        match report.SummaC with
        | Some s ->
            interval "summac_zs" s.Zs
            s.Conv |> Option.iter (interval "summac_conv")
        | None -> ()
        w.WriteEndObject()
    w.WriteEndObject()
    w.Flush()
    w.Dispose()
    Encoding.UTF8.GetString(stream.ToArray())

/// Writes `testScoresJson systems` to `path` (test_scores.json of a run folder).
let writeTestScores (path: string) (systems: (string * Metrics.ScoreReport)[]) : unit =
    File.WriteAllText(path, testScoresJson systems, UTF8Encoding(false))

// ---------------------------------------------------------------------------------------------
// config.json

/// Flattens a config's JSON tree to (dotted path, text) leaves in document order: strings show
/// their text, other scalars their JSON; arrays of scalars stay one leaf (`[1, 2]`), arrays of
/// objects are indexed (`layers[0].kind`), an empty object is the leaf `{}`.
let flattenConfig (root: JsonElement) : ConfigEntry[] =
    let rec walk (prefix: string) (e: JsonElement) : ConfigEntry list =
        match e.ValueKind with
        | JsonValueKind.Object ->
            let props = [ for p in e.EnumerateObject() -> p ]
            if props.IsEmpty then [ { Path = prefix; Value = "{}" } ]
            else [ for p in props do yield! walk (if prefix = "" then p.Name else prefix + "." + p.Name) p.Value ]
        | JsonValueKind.Array ->
            let items = [ for x in e.EnumerateArray() -> x ]
            if items |> List.forall (fun x -> x.ValueKind <> JsonValueKind.Object && x.ValueKind <> JsonValueKind.Array) then
                [ { Path = prefix; Value = "[" + String.Join(", ", items |> List.map (fun x -> x.GetRawText())) + "]" } ]
            else [ for i, x in List.indexed items do yield! walk (sprintf "%s[%d]" prefix i) x ]
        | JsonValueKind.String -> [ { Path = prefix; Value = e.GetString() } ]
        | _ -> [ { Path = prefix; Value = e.GetRawText() } ]
    walk "" root |> List.toArray

/// Reads config.json as a generic tree and flattens it (see `flattenConfig`).
let readConfig (path: string) : ConfigEntry[] = flattenConfig (jsonFile path)

// ---------------------------------------------------------------------------------------------
// Aligned text files and whole runs

/// Reads predictions.txt and references.txt (and documents.txt where given) and checks they hold
/// the same number of lines.
let readTexts (predictions: string) (references: string) (documents: string option) : Texts =
    let p = readLines predictions
    let r = readLines references
    if p.Length <> r.Length then
        raise (RunFileException(predictions, 0, sprintf "expected as many lines as %s (%d), got %d" references r.Length p.Length))
    let d = documents |> Option.map (fun path ->
        let d = readLines path
        if d.Length <> r.Length then
            raise (RunFileException(path, 0, sprintf "expected as many lines as %s (%d), got %d" references r.Length d.Length))
        d)
    { Predictions = p; References = r; Documents = d }

/// Reads every file of the contract that a run folder holds. The folder must exist and hold at
/// least one of config.json, metrics.jsonl, routing.jsonl or test_scores.json; predictions.txt and
/// references.txt come as a pair.
let load (dir: string) : Run =
    let dir = Path.GetFullPath dir
    if not (Directory.Exists dir) then raise (RunFileException(dir, 0, "expected a run folder, found no such directory"))
    let file name = Path.Combine(dir, name)
    let present name = File.Exists(file name)
    let core = [ FileNames.config; FileNames.metrics; FileNames.routing; FileNames.testScores ]
    if not (core |> List.exists present) then
        raise (RunFileException(dir, 0, sprintf "expected a run folder holding at least one of %s; found none" (String.Join(", ", core))))
    let optional name reader = if present name then Some(reader (file name)) else None
    let texts =
        match present FileNames.predictions, present FileNames.references with
        | true, true ->
            let docs = if present FileNames.documents then Some(file FileNames.documents) else None
            Some(readTexts (file FileNames.predictions) (file FileNames.references) docs)
        | true, false -> raise (RunFileException(file FileNames.references, 0, sprintf "expected beside %s, found no such file" FileNames.predictions))
        | false, true -> raise (RunFileException(file FileNames.predictions, 0, sprintf "expected beside %s, found no such file" FileNames.references))
        | false, false -> None
    { Name = DirectoryInfo(dir).Name
      Directory = dir
      Config = optional FileNames.config readConfig
      Metrics = optional FileNames.metrics readMetrics |> Option.defaultValue [||]
      Routing = optional FileNames.routing readRouting |> Option.defaultValue [||]
      ByLabel = optional FileNames.routingByLabel readRoutingByLabel
      Scores = optional FileNames.testScores readTestScores
      Texts = texts }

// ---------------------------------------------------------------------------------------------
// Load balance

/// An expert counts as collapsed when it receives less than this fraction of its uniform share 1/E:
/// with 8 experts, under 1.25 % of the assignments. A router that has stopped sending an expert
/// tokens gives it ~0; 0.1 of uniform leaves room for ordinary imbalance (Switch Transformer runs
/// keep every expert well above it).
let collapsedShareOfUniform = 0.1

/// Balance of one layer at one step.
type LayerBalance =
    { Layer: string
      Step: int
      /// Shares normalised to sum to 1. // [E]
      Shares: float[]
      /// Coefficient of variation (population std / mean) of the expert loads; 0 is perfectly
      /// balanced, sqrt(E - 1) is everything on one expert (Shazeer et al. 2017 penalise CV²).
      /// NaN when the layer routed no tokens at all.
      LoadCv: float
      /// Experts whose share is below `collapseBelow / E`.
      CollapsedExperts: int[] }

/// Coefficient of variation of expert loads (population standard deviation over mean); scale
/// invariant, so counts and shares give the same value. NaN when all loads are 0.
let loadCv (loads: float[]) : float =
    if loads.Length = 0 then invalidArg "loads" "expected one load per expert [E], got an empty array"
    let mean = Array.average loads
    if mean = 0.0 then nan
    else sqrt (loads |> Array.averageBy (fun x -> (x - mean) * (x - mean))) / mean

/// Balance of one routing record; `collapseBelow` is a fraction of the uniform share
/// (`collapsedShareOfUniform` is the usual value).
let balanceOf (collapseBelow: float) (r: RoutingRecord) : LayerBalance =
    let total = Array.sum r.TokensPerExpert
    let experts = r.TokensPerExpert.Length
    let shares = if total = 0.0 then Array.zeroCreate experts else r.TokensPerExpert |> Array.map (fun x -> x / total)
    let threshold = collapseBelow / float experts
    { Layer = r.Layer
      Step = r.Step
      Shares = shares
      LoadCv = loadCv r.TokensPerExpert
      CollapsedExperts = shares |> Array.indexed |> Array.filter (fun (_, s) -> s < threshold) |> Array.map fst }

/// Layers in order of first appearance in the log.
let layersOf (records: RoutingRecord[]) : string[] =
    records |> Array.map (fun r -> r.Layer) |> Array.distinct

/// Balance of each layer at its last logged step, layers in order of first appearance.
let finalBalance (collapseBelow: float) (records: RoutingRecord[]) : LayerBalance[] =
    layersOf records
    |> Array.map (fun layer ->
        records |> Array.filter (fun r -> r.Layer = layer) |> Array.maxBy (fun r -> r.Step) |> balanceOf collapseBelow)

/// C#-friendly entry points to the run folder readers.
type RunFolder =
    /// Reads a run folder (see `RunLog.load`).
    static member Load(dir: string) : Run = load dir
    /// Writes test_scores.json from named score reports (see `RunLog.writeTestScores`).
    static member WriteTestScores(path: string, systems: Collections.Generic.IDictionary<string, Metrics.ScoreReport>) : unit =
        writeTestScores path [| for kv in systems -> kv.Key, kv.Value |]
    /// Per-layer balance at the last logged step of routing.jsonl, with the default collapse threshold.
    static member FinalBalance(routingJsonl: string) : LayerBalance[] =
        readRouting routingJsonl |> finalBalance collapsedShareOfUniform
    /// Per-layer balance at the last logged step, with `collapseBelow` as a fraction of the uniform share.
    static member FinalBalance(routingJsonl: string, collapseBelow: float) : LayerBalance[] =
        readRouting routingJsonl |> finalBalance collapseBelow
