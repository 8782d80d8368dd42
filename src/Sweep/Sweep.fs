/// Sweeps: a base run config and a grid of overrides expanded into named runs that are run one after
/// another (finished runs skipped, interrupted ones resumed) or emitted as a Slurm job array, then one
/// results table per sweep read back from the run folders.
///
/// The grid file (JSON; comments and trailing commas allowed; field paths as for the summarizer's config):
///
///     {
///       "name": "balance",                        // required: letters, digits, '.', '_', '-'
///       "description": "hash vs top-k, +/- aux",   // optional: shown in results.md
///       "base": "configs/tiny.json",               // optional: a config file (relative to the grid file) ...
///       "base": { "Train": { "Steps": 200 } },     //   ... or the config tree inline; default {}
///       "grid": {                                  // optional: field path -> non-empty list of values
///         "Model.Ffn": [ { "Moe": { ... } } ],
///         "Train.LossWeights.SwitchAux": [ 0.0, 0.01 ]
///       },
///       "variants": [                              // optional: named bundles of overrides, one axis
///         { "name": "dense", "set": { "Model.Ffn": { "Dense": 256 } } },
///         { "name": "hash",  "set": { "Model.Ffn": { "Moe": { ... } }, "Train.LossWeights.SwitchAux": 0.0 } }
///       ],
///       "seeds": [ 0, 1 ],                         // optional: values of seed_field, the innermost axis
///       "seed_field": "Train.Seed",                // optional; default: the schema's seed field
///       "runs_dir": "runs",                        // optional: run folders are <runs_dir>/<run name>
///       "output_dir": "sweep/balance",             // optional: results, configs, logs; default sweep/<name>
///       "command": [ "{moe}", "train", "--config", "{config}", "{resume}" ],   // optional; this is the default
///       "slurm": [ "--time=02:00:00", "--gres=gpu:1" ]   // optional: extra #SBATCH options
///     }
///
/// Field paths are the keys of the training command's config file joined by dots (the file is what
/// `Json` writes for F# records: record field names as keys, unions as `"Case"` or `{"Case": fields}`).
/// A `Schema` (the config file's sections and their F# types, found by reflection) says which paths
/// exist and what each value must be; a value replaces the node at its path, so to change one field of a
/// record, name that field's path. A field may be varied by one axis only. Runs are the cartesian product
/// variants x grid (in file order, the first key slowest) x seeds. Each run's name is
/// `<sweep>_<axis labels>_<hash>`, the hash being the first 8 hex digits of SHA-256 over the resolved
/// config in canonical form (sorted keys, no spaces, numbers in shortest round-trip form), so a name
/// changes exactly when the run's config does (the run folder fields below left out). Where the schema says the config names its own run folder
/// (`RunFolder`, e.g. the summarizer's `RunsDir`/`Name`), the sweep then writes runs_dir and the run's
/// name into those fields (over any value the base had), so the training command writes where the sweep
/// looks; otherwise the command passes `{run_dir}`.
///
/// Paths in the grid file (runs_dir, output_dir) are relative to the working directory; the base file
/// is relative to the grid file. Runs are started as child processes with `command` (placeholders:
/// `{moe}` the launcher, `{config}` the run's config file, `{run_dir}`, `{name}`, and `{resume}`, a whole
/// item that becomes `--resume` for an interrupted run and nothing otherwise), the same command line a
/// Slurm task runs, so a sweep behaves alike on a laptop and on a cluster. A run is finished when its
/// folder holds test_scores.json or the completion marker the sweep writes when the command exits with 0,
/// and interrupted when it holds checkpoints/last.ckpt.
module Moe.Sweep

open System
open System.Collections.Generic
open System.Diagnostics
open System.Globalization
open System.IO
open System.Security.Cryptography
open System.Text
open System.Text.Json
open System.Text.Json.Nodes
open System.Text.RegularExpressions
open Microsoft.FSharp.Reflection

let private inv = CultureInfo.InvariantCulture

// ---------------------------------------------------------------- JSON helpers

/// How a node reads in a message: `an object`, `"text"`, `3.5`, `null`.
let private describeNode (n: JsonNode) : string =
    if isNull n then "null"
    else
        match n.GetValueKind() with
        | JsonValueKind.Object -> "an object"
        | JsonValueKind.Array -> "an array"
        | _ -> n.ToJsonString()

let private tryProperty (o: JsonObject) (name: string) : JsonNode option =
    let mutable n: JsonNode = null
    if o.TryGetPropertyValue(name, &n) then Some n else None

let private compact = JsonSerializerOptions(WriteIndented = false)
let private indented = JsonSerializerOptions(WriteIndented = true)

/// The node as one line of JSON.
let private oneLine (n: JsonNode) : string = if isNull n then "null" else n.ToJsonString compact

/// Canonical JSON: object keys sorted (ordinal), no whitespace, numbers in shortest round-trip form,
/// so equal configs give equal text whatever their layout (`0.010` and `1e-2` agree).
let rec canonical (n: JsonNode) : string =
    match n with
    | null -> "null"
    | :? JsonObject as o ->
        let members =
            o |> Seq.sortWith (fun a b -> String.CompareOrdinal(a.Key, b.Key))
              |> Seq.map (fun kv -> JsonValue.Create(kv.Key).ToJsonString() + ":" + canonical kv.Value)
        "{" + String.concat "," members + "}"
    | :? JsonArray as a -> "[" + (a |> Seq.map canonical |> String.concat ",") + "]"
    | v ->
        match v.GetValueKind() with
        | JsonValueKind.Number -> Double.Parse(v.ToJsonString(), inv).ToString("R", inv)
        | _ -> v.ToJsonString compact

/// The first 8 hex digits of SHA-256 over the canonical text of `n`.
let configHash (n: JsonNode) : string =
    let bytes = SHA256.HashData(Encoding.UTF8.GetBytes(canonical n))
    Convert.ToHexString(bytes).Substring(0, 8).ToLowerInvariant()

/// Sets `path` (keys joined by dots) in `root` to a copy of `value`, making objects on the way
/// (a non-object on the way, such as a `null` option, is replaced by an object).
let private setNode (root: JsonObject) (path: string) (value: JsonNode) : unit =
    let keys = path.Split '.'
    let mutable o = root
    for k in keys[.. keys.Length - 2] do
        match tryProperty o k with
        | Some(:? JsonObject as child) -> o <- child
        | _ ->
            let child = JsonObject()
            o[k] <- child
            o <- child
    o[keys[keys.Length - 1]] <- (if isNull value then null else value.DeepClone())

/// A JSON string node as the parser makes it: `Json.readOver` reads values through their JsonElement, which
/// a node made by `JsonValue.Create` does not have.
let private parsedString (s: string) : JsonNode = JsonNode.Parse(JsonSerializer.Serialize s)

/// Removes the node at `path` (keys joined by dots) from `root` if it is there.
let private removeNode (root: JsonObject) (path: string) : unit =
    let keys = path.Split '.'
    let rec go (o: JsonObject) (i: int) =
        if i = keys.Length - 1 then o.Remove keys[i] |> ignore
        else
            match tryProperty o keys[i] with
            | Some(:? JsonObject as child) -> go child (i + 1)
            | _ -> ()
    go root 0

// ---------------------------------------------------------------- schema

/// Where a config names its run folder: `<RunsDir field>/<Name field>`, as the summarizer's config does.
type RunFolderFields =
    { /// Field path of the folder that holds run folders (e.g. "RunsDir").
      RunsDir: string
      /// Field path of the run's name, its folder under RunsDir (e.g. "Name").
      Name: string }

/// What a sweep knows about the training command's config file: its top-level sections with the F# type
/// each is read as (field paths are checked against these by reflection), a check of a whole resolved
/// config (read it over the defaults and validate) that returns every problem, the field `seeds` sets,
/// and where the config names its run folder.
type Schema =
    { Sections: (string * Type) list
      Check: JsonNode -> string list
      /// The field path `seeds` sets unless the grid file says `seed_field`; "" when there is none.
      SeedField: string
      /// When set, the sweep writes each run's name and the sweep's runs_dir into these fields, so the
      /// training command writes the folder the sweep looks in; the command then needs no {run_dir}.
      RunFolder: RunFolderFields option }

    /// A schema from .NET values (for C#): section name -> type, a whole-config check (null for none), the seed
    /// field path (null for none) and the run folder's field paths (both null for none).
    static member Create(sections: IDictionary<string, Type>, check: Func<JsonNode, IEnumerable<string>>,
                         seedField: string, runsDirField: string, nameField: string) : Schema =
        { Sections = [ for kv in sections -> kv.Key, kv.Value ]
          Check = if isNull check then (fun _ -> []) else (fun n -> List.ofSeq (check.Invoke n))
          SeedField = (if isNull seedField then "" else seedField)
          RunFolder =
            match runsDirField, nameField with
            | null, null -> None
            | null, _ | _, null -> invalidArg "runsDirField" "expected both run folder fields (RunsDir and Name paths) or neither"
            | d, n -> Some { RunsDir = d; Name = n } }

module Schema =
    /// Replaces the `config` that `Json` puts in front of its messages with `prefix`.
    let private reprefix (prefix: string) (message: string) =
        if message.StartsWith "config" then prefix + message.Substring "config".Length else sprintf "%s: %s" prefix message

    /// A config file that is one record `'T` (its fields are the sections), read over `defaults` and validated.
    let ofRecord<'T> (defaults: 'T) (validate: 'T -> string list) : Schema =
        if not (FSharpType.IsRecord(typeof<'T>, true)) then
            invalidArg "defaults" (sprintf "expected an F# record type for the config file, got %s" typeof<'T>.FullName)
        { Sections = [ for f in FSharpType.GetRecordFields(typeof<'T>, true) -> f.Name, f.PropertyType ]
          SeedField = ""
          RunFolder = None
          Check =
            fun node ->
                match Json.readOver defaults node with
                | Ok v -> validate v
                | Error es -> es }

    /// A config file with one section `name` holding a `'T` (as `Train` writes `"train"` in config.json),
    /// read over `defaults` (a missing section means the defaults) and validated.
    let ofSection<'T> (name: string) (defaults: 'T) (validate: 'T -> string list) : Schema =
        { Sections = [ name, typeof<'T> ]
          SeedField = ""
          RunFolder = None
          Check =
            fun node ->
                let section =
                    match node with
                    | :? JsonObject as o -> tryProperty o name |> Option.defaultValue null
                    | _ -> null
                if isNull section then validate defaults |> List.map (sprintf "config.%s: %s" name)
                else
                    match Json.readOver defaults section with
                    | Ok v -> validate v |> List.map (sprintf "config.%s: %s" name)
                    | Error es -> es |> List.map (reprefix ("config." + name)) }

    /// Both schemas' sections; both checks.
    let combine (a: Schema) (b: Schema) : Schema =
        { Sections = a.Sections @ b.Sections
          Check = (fun n -> a.Check n @ b.Check n)
          SeedField = (if a.SeedField <> "" then a.SeedField else b.SeedField)
          RunFolder = Option.orElse b.RunFolder a.RunFolder }

    /// The schema with `path` as the field that `seeds` sets by default.
    let withSeedField (path: string) (schema: Schema) : Schema = { schema with SeedField = path }

    /// The schema with the config naming its run folder `<runsDir>/<name>` (field paths).
    let withRunFolder (runsDir: string) (name: string) (schema: Schema) : Schema =
        { schema with RunFolder = Some { RunsDir = runsDir; Name = name } }

/// The summarizer's config file (`moe train --config`): a SummarizerConfig read over its defaults and
/// validated; `seeds` set Train.Seed, and each run's RunsDir/Name are set to the sweep's run folder.
let summarizerSchema : Schema =
    Schema.ofRecord Summarizer.SummarizerConfig.defaults Summarizer.SummarizerConfig.validate
    |> Schema.withSeedField "Train.Seed"
    |> Schema.withRunFolder "RunsDir" "Name"

let private isOption (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<option<_>>
let private isMap (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<Map<_, _>>
let private isRecord (t: Type) = FSharpType.IsRecord(t, true)
/// A JsonNode-typed field holds any JSON; paths below it are not checked.
let private isFree (t: Type) = typeof<JsonNode>.IsAssignableFrom t

/// A type's name as a reader knows it: `float`, `int`, `Selection`, `float option`.
let rec private typeName (t: Type) : string =
    if t = typeof<float> then "float"
    elif t = typeof<float32> then "float32"
    elif t = typeof<int> then "int"
    elif t = typeof<int64> then "int64"
    elif t = typeof<string> then "string"
    elif t = typeof<bool> then "bool"
    elif isOption t then typeName (t.GetGenericArguments()[0]) + " option"
    else t.Name

/// The message for a key that is not a field of record `t`, with the likely intended name.
let private unknownField (where: string) (key: string) (t: Type) : string =
    let names = FSharpType.GetRecordFields(t, true) |> Array.map (fun f -> f.Name)
    let hint =
        match names |> Array.tryFind (fun n -> String.Equals(n, key, StringComparison.OrdinalIgnoreCase)) with
        | Some n -> sprintf " (did you mean '%s'? names are case-sensitive)" n
        | None -> ""
    sprintf "%s: unknown field '%s' in %s%s; expected one of %s" where key t.Name hint (String.concat ", " names)

/// The type that `path` (keys joined by dots) leads to in the config file, or why it leads nowhere.
let fieldType (schema: Schema) (path: string) : Result<Type, string> =
    let keys = if isNull path then [||] else path.Split '.'
    if keys.Length = 0 || keys |> Array.exists String.IsNullOrWhiteSpace then
        Error(sprintf "expected a field path like train.Steps (keys joined by dots), got '%s'" path)
    else
        let rec walk (i: int) (where: string) (t: Type) : Result<Type, string> =
            if i = keys.Length then Ok t
            elif isFree t then Ok typeof<JsonNode>
            elif isOption t then walk i where (t.GetGenericArguments()[0])
            elif isMap t then walk (i + 1) (where + "." + keys[i]) (t.GetGenericArguments()[1])
            elif isRecord t then
                match FSharpType.GetRecordFields(t, true) |> Array.tryFind (fun f -> f.Name = keys[i]) with
                | Some f -> walk (i + 1) (where + "." + keys[i]) f.PropertyType
                | None -> Error(unknownField where keys[i] t)
            else
                Error(sprintf "%s is of type %s, not a record; it has no field '%s' (give %s a whole value)" where (typeName t) keys[i] where)
        match schema.Sections |> List.tryFind (fun (name, _) -> name = keys[0]) with
        | Some(_, t) -> walk 1 keys[0] t
        | None ->
            Error(sprintf "unknown section '%s'; the config file has %s" keys[0]
                      (schema.Sections |> List.map fst |> String.concat ", "))

/// Reads a node as a type known only at run time, through `Json.ofNode`.
type private Reader =
    static member Problems<'T>(node: JsonNode) : string list =
        match Json.ofNode<'T> node with
        | Ok _ -> []
        | Error es -> es

let private readProblems (t: Type) (node: JsonNode) : string list =
    typeof<Reader>.GetMethod("Problems", Reflection.BindingFlags.Static ||| Reflection.BindingFlags.Public ||| Reflection.BindingFlags.NonPublic).MakeGenericMethod(t).Invoke(null, [| box node |]) :?> string list

/// Adds to `problems` every way `node` fails to be a `t` at JSON path `where`. A record value may name only
/// some of its fields (the training command reads config files over its defaults).
let rec private checkValue (problems: ResizeArray<string>) (where: string) (t: Type) (node: JsonNode) : unit =
    if isFree t then ()
    elif isOption t then
        if not (isNull node) then checkValue problems where (t.GetGenericArguments()[0]) node
    elif isRecord t then
        match node with
        | :? JsonObject as o ->
            let fields = FSharpType.GetRecordFields(t, true)
            for kv in o do
                match fields |> Array.tryFind (fun f -> f.Name = kv.Key) with
                | Some f -> checkValue problems (where + "." + kv.Key) f.PropertyType kv.Value
                | None -> problems.Add(unknownField where kv.Key t)
        | _ -> problems.Add(sprintf "%s: expected an object with fields of %s, got %s" where t.Name (describeNode node))
    else
        for p in readProblems t node do
            problems.Add(if p.StartsWith "config" then where + p.Substring "config".Length else sprintf "%s: %s" where p)

/// Adds every problem of a config tree (top-level sections, then fields by type) at JSON path `where`.
let private checkTree (problems: ResizeArray<string>) (schema: Schema) (where: string) (node: JsonNode) : unit =
    match node with
    | :? JsonObject as o ->
        for kv in o do
            match schema.Sections |> List.tryFind (fun (name, _) -> name = kv.Key) with
            | Some(_, t) -> checkValue problems (where + "." + kv.Key) t kv.Value
            | None ->
                problems.Add(sprintf "%s: unknown section '%s'; the config file has %s" where kv.Key
                                 (schema.Sections |> List.map fst |> String.concat ", "))
    | _ -> problems.Add(sprintf "%s: expected a config object, got %s" where (describeNode node))

// ---------------------------------------------------------------- the sweep

/// One value of an axis: its label (in run names and tables) and the overrides it applies.
type Choice =
    { Label: string
      /// (field path, value) pairs applied to the base config in order.
      Overrides: (string * JsonNode) list }

/// One dimension of the sweep: a grid field, the variants, or the seeds.
type Axis =
    { /// Column title in the results: the field path, or "variant".
      Column: string
      /// What goes in run names: the path's last key, or "" for variants (their names are enough).
      Short: string
      Choices: Choice list }

/// A parsed, checked grid file.
type SweepSpec =
    { Name: string
      Description: string
      /// The grid file it was read from ("" when built in code).
      Source: string
      /// The base config tree the overrides apply to.
      Base: JsonObject
      /// Slowest first: variants, grid fields in file order, seeds.
      Axes: Axis list
      /// Run folders are `RunsDir/<run name>`.
      RunsDir: string
      /// results.csv, results.md, configs/ and logs/ go here.
      OutputDir: string
      /// The command line of one run, with placeholders (see the module doc).
      Command: string list
      /// Config fields the sweep sets to each run's folder (from the schema).
      RunFolder: RunFolderFields option
      /// Extra `#SBATCH` options.
      SlurmOptions: string list }

/// One run of a sweep.
type Run =
    { /// 0-based position in the expansion (the Slurm array task id).
      Index: int
      Name: string
      /// (axis column, choice label), one per axis.
      Varied: (string * string) list
      /// Every override applied to the base, in order.
      Overrides: (string * JsonNode) list
      /// The base with the overrides applied: the run's config file.
      Config: JsonObject
      Hash: string
      RunDir: string }

/// A sweep and its runs.
type Plan = { Spec: SweepSpec; Runs: Run list }

/// The default run command: `moe train --config FILE [--resume]`, with `--run-dir` only when the config
/// cannot name its run folder itself (a schema without `RunFolder`).
let defaultCommand (schema: Schema) : string list =
    match schema.RunFolder with
    | Some _ -> [ "{moe}"; "train"; "--config"; "{config}"; "{resume}" ]
    | None -> [ "{moe}"; "train"; "--config"; "{config}"; "--run-dir"; "{run_dir}"; "{resume}" ]
/// Run folders go here unless `runs_dir` says otherwise.
let defaultRunsDir = "runs"
/// Results go under this folder, in `<name>/`, unless `output_dir` says otherwise.
let defaultSweepRoot = "sweep"
let private placeholders = [ "{moe}"; "{config}"; "{run_dir}"; "{name}"; "{resume}" ]
let private knownKeys =
    [ "name"; "description"; "base"; "grid"; "variants"; "seeds"; "seed_field"; "runs_dir"; "output_dir"; "command"; "slurm" ]
let private namePattern = Regex(@"^[A-Za-z0-9][A-Za-z0-9._-]*$")
/// Run-name parts keep these characters; runs of others become '-'.
let private slugPattern = Regex(@"[^A-Za-z0-9.+]+")
/// Longest label of one axis in a run name; the hash keeps names distinct when labels are cut.
let private maxLabelChars = 24
/// Longest run of axis labels in a run name, so folder names stay well under file system limits.
let private maxLabelsChars = 120

/// A label as it can appear in a file name.
let private slug (maxChars: int) (text: string) : string =
    let s = slugPattern.Replace(text, "-").Trim('-')
    let s = if s.Length > maxChars then s.Substring(0, maxChars).TrimEnd('-') else s
    if s = "" then "x" else s

/// A value as names and tables show it: strings bare, anything else as canonical JSON (so `0.010` and `1e-2`
/// both read `0.01`, and a run's name does not depend on how the grid file spells its values).
let valueLabel (n: JsonNode) : string =
    match n with
    | :? JsonValue as v when v.GetValueKind() = JsonValueKind.String -> v.GetValue<string>()
    | _ -> canonical n

/// A member of a JSON object as messages name it: `$.grid["train.Steps"]`.
let private key (parent: string) (k: string) = sprintf "%s[%s]" parent (JsonValue.Create(k).ToJsonString())

/// Parses a grid file's JSON tree against `schema`. `source` names the file in messages; `baseDir` is where
/// a base file path is resolved. Every problem is returned, each with its JSON path.
let parseSpec (schema: Schema) (source: string) (baseDir: string) (root: JsonNode) : Result<SweepSpec, string list> =
    let problems = ResizeArray<string>()
    let add (p: string) = problems.Add p
    match root with
    | :? JsonObject as o ->
        for kv in o do
            if not (List.contains kv.Key knownKeys) then
                add (sprintf "$: unknown key '%s'; a grid file has %s" kv.Key (String.concat ", " knownKeys))
        let stringAt (k: string) (fallback: string option) : string =
            match tryProperty o k, fallback with
            | Some(:? JsonValue as v), _ when v.GetValueKind() = JsonValueKind.String -> v.GetValue<string>()
            | (None | Some null), Some f -> f
            | (None | Some null), None ->
                add (sprintf "$.%s: missing; expected the sweep's name (letters, digits, '.', '_', '-')" k)
                ""
            | Some n, _ ->
                add (sprintf "$.%s: expected a string, got %s" k (describeNode n))
                ""
        let name = stringAt "name" None
        if name <> "" && not (namePattern.IsMatch name) then
            add (sprintf "$.name: expected letters, digits, '.', '_' or '-' (a folder name), got \"%s\"" name)
        let description = stringAt "description" (Some "")
        // ---- base
        let baseTree =
            match tryProperty o "base" with
            | None | Some null -> JsonObject()
            | Some(:? JsonObject as b) ->
                checkTree problems schema "$.base" b
                b.DeepClone() :?> JsonObject
            | Some(:? JsonValue as v) when v.GetValueKind() = JsonValueKind.String ->
                let file = v.GetValue<string>()
                let path = Path.Combine(baseDir, file)
                if not (File.Exists path) then
                    add (sprintf "$.base: expected a config file, but %s does not exist (paths are relative to the grid file)" path)
                    JsonObject()
                else
                    match Json.parse (File.ReadAllText path) with
                    | Ok(:? JsonObject as b) ->
                        checkTree problems schema (sprintf "$.base (%s) $" file) b
                        b
                    | Ok other ->
                        add (sprintf "$.base: %s holds %s, expected a config object" file (describeNode other))
                        JsonObject()
                    | Error e ->
                        add (sprintf "$.base: %s: %s" file e)
                        JsonObject()
            | Some other ->
                add (sprintf "$.base: expected a config object or the path of a config file, got %s" (describeNode other))
                JsonObject()
        // ---- values of one field: each checked against the field's type, duplicates named
        let values (where: string) (path: string) (node: JsonNode) : JsonNode list =
            match fieldType schema path with
            | Error e ->
                add (sprintf "%s: %s" where e)
                []
            | Ok t ->
                match node with
                | :? JsonArray as a when a.Count = 0 -> add (sprintf "%s: empty; expected at least one value" where); []
                | :? JsonArray as a ->
                    let seen = Dictionary<string, int>()
                    [ for i in 0 .. a.Count - 1 do
                        let at = sprintf "%s[%d]" where i
                        checkValue problems at t a[i]
                        let c = canonical a[i]
                        match seen.TryGetValue c with
                        | true, j -> add (sprintf "%s: duplicate of %s[%d] (the runs would be the same)" at where j)
                        | _ -> seen[c] <- i
                        yield a[i] ]
                | other ->
                    add (sprintf "%s: expected a list of values for %s (of type %s), got %s" where path (typeName t) (describeNode other))
                    []
        let fieldAxis (path: string) (vs: JsonNode list) =
            let short = path.Split('.') |> Array.last
            { Column = path; Short = short; Choices = [ for v in vs -> { Label = valueLabel v; Overrides = [ path, v ] } ] }
        // ---- grid
        let gridAxes =
            match tryProperty o "grid" with
            | None | Some null -> []
            | Some(:? JsonObject as g) when g.Count = 0 ->
                add "$.grid: empty; expected at least one field path with a list of values (or leave grid out and give variants or seeds)"
                []
            | Some(:? JsonObject as g) -> [ for kv in g -> fieldAxis kv.Key (values (key "$.grid" kv.Key) kv.Key kv.Value) ]
            | Some other ->
                add (sprintf "$.grid: expected an object of field path -> list of values, got %s" (describeNode other))
                []
        // ---- variants
        let variantAxis =
            match tryProperty o "variants" with
            | None | Some null -> []
            | Some(:? JsonArray as a) when a.Count = 0 ->
                add "$.variants: empty; expected at least one {\"name\": ..., \"set\": {...}} (or leave variants out)"
                []
            | Some(:? JsonArray as a) ->
                let names = Dictionary<string, int>()
                let choices =
                    [ for i in 0 .. a.Count - 1 do
                        let at = sprintf "$.variants[%d]" i
                        match a[i] with
                        | :? JsonObject as v ->
                            for kv in v do
                                if kv.Key <> "name" && kv.Key <> "set" then
                                    add (sprintf "%s: unknown key '%s'; a variant has name and set" at kv.Key)
                            let vname =
                                match tryProperty v "name" with
                                | Some(:? JsonValue as s) when s.GetValueKind() = JsonValueKind.String && namePattern.IsMatch(s.GetValue<string>()) ->
                                    s.GetValue<string>()
                                | Some n ->
                                    add (sprintf "%s.name: expected letters, digits, '.', '_' or '-', got %s" at (describeNode n))
                                    ""
                                | None ->
                                    add (sprintf "%s.name: missing; expected the variant's name" at)
                                    ""
                            if vname <> "" then
                                match names.TryGetValue vname with
                                | true, j -> add (sprintf "%s.name: \"%s\" is also the name of $.variants[%d]" at vname j)
                                | _ -> names[vname] <- i
                            let overrides =
                                match tryProperty v "set" with
                                | None | Some null -> []
                                | Some(:? JsonObject as s) ->
                                    [ for kv in s do
                                        let where = key (at + ".set") kv.Key
                                        match fieldType schema kv.Key with
                                        | Error e -> add (sprintf "%s: %s" where e)
                                        | Ok t ->
                                            checkValue problems where t kv.Value
                                            yield kv.Key, kv.Value ]
                                | Some other ->
                                    add (sprintf "%s.set: expected an object of field path -> value, got %s" at (describeNode other))
                                    []
                            yield { Label = vname; Overrides = overrides }
                        | other -> add (sprintf "%s: expected {\"name\": ..., \"set\": {...}}, got %s" at (describeNode other)) ]
                [ { Column = "variant"; Short = ""; Choices = choices } ]
            | Some other ->
                add (sprintf "$.variants: expected a list of {\"name\": ..., \"set\": {...}}, got %s" (describeNode other))
                []
        // ---- seeds
        let seedField = stringAt "seed_field" (Some schema.SeedField)
        let seedAxis =
            match tryProperty o "seeds" with
            | None | Some null -> []
            | Some _ when seedField = "" ->
                add "$.seeds: this config has no default seed field; name it with \"seed_field\" (e.g. \"Train.Seed\")"
                []
            | Some node -> [ fieldAxis seedField (values "$.seeds" seedField node) ]
        // ---- one axis per field: a later axis would silently undo an earlier one
        let varied =
            [ for a in gridAxes do yield a.Column, key "$.grid" a.Column
              for a in seedAxis do yield a.Column, "$.seeds"
              for a in variantAxis do
                  for ci, c in List.indexed a.Choices do
                      for path, _ in c.Overrides do yield path, key (sprintf "$.variants[%d].set" ci) path ]
        let overlaps (p: string) (q: string) = p = q || p.StartsWith(q + ".") || q.StartsWith(p + ".")
        match schema.RunFolder with
        | Some rf ->
            for field in [ rf.RunsDir; rf.Name ] do
                match fieldType schema field with
                | Error e -> invalidArg "schema" (sprintf "the schema's run folder field %s is not in the config: %s" field e)
                | Ok _ -> ()
            for path, where in varied do
                for field in [ rf.RunsDir; rf.Name ] do
                    if overlaps path field then
                        add (sprintf "%s: %s is set by the sweep (each run's folder is %s/%s); use runs_dir to move the runs" where path rf.RunsDir rf.Name)
        | None -> ()
        let reported = HashSet<string * string>()
        for i in 0 .. varied.Length - 1 do
            for j in i + 1 .. varied.Length - 1 do
                let (p, wp), (q, wq) = varied[i], varied[j]
                let bothVariants = wp.StartsWith "$.variants" && wq.StartsWith "$.variants"
                if overlaps p q && not bothVariants && reported.Add((wp, wq)) then
                    add (sprintf "%s: %s is also varied by %s; a field may be varied by one axis only" wq q wp)
        if not (o.ContainsKey "grid" || o.ContainsKey "variants" || o.ContainsKey "seeds") then
            add "$: nothing to sweep; give grid (field path -> values), variants or seeds"
        // ---- paths and the command
        let runsDir = stringAt "runs_dir" (Some defaultRunsDir)
        let outputDir = stringAt "output_dir" (Some(Path.Combine(defaultSweepRoot, if name = "" then "sweep" else name)))
        for k, v in [ "runs_dir", runsDir; "output_dir", outputDir ] do
            if String.IsNullOrWhiteSpace v then add (sprintf "$.%s: expected a folder path, got an empty string" k)
        let stringList (k: string) : string list option =
            match tryProperty o k with
            | None | Some null -> None
            | Some(:? JsonArray as a) ->
                Some
                    [ for i in 0 .. a.Count - 1 do
                        match a[i] with
                        | :? JsonValue as v when v.GetValueKind() = JsonValueKind.String -> yield v.GetValue<string>()
                        | other -> add (sprintf "$.%s[%d]: expected a string, got %s" k i (describeNode other)) ]
            | Some other ->
                add (sprintf "$.%s: expected a list of strings, got %s" k (describeNode other))
                Some []
        let command = stringList "command" |> Option.defaultValue (defaultCommand schema)
        if command.IsEmpty then add "$.command: empty; expected the run's command line, e.g. [\"{moe}\", \"train\", \"--config\", \"{config}\"]"
        elif not (command |> List.exists (fun t -> t.Contains "{config}")) then
            add "$.command: never passes {config}; the run would not see its config file"
        command
        |> List.iteri (fun i t ->
            for m in Regex.Matches(t, @"\{[^{}]*\}") do
                if not (List.contains m.Value placeholders) then
                    add (sprintf "$.command[%d]: unknown placeholder %s; expected %s" i m.Value (String.concat ", " placeholders))
            if t.Contains "{resume}" && t <> "{resume}" then
                add (sprintf "$.command[%d]: {resume} must be a whole item (it becomes --resume or nothing), got \"%s\"" i t))
        let slurm = stringList "slurm" |> Option.defaultValue []
        slurm
        |> List.iteri (fun i s ->
            if not (s.StartsWith "--") || s.Contains '\n' || s.Contains '\r' then
                add (sprintf "$.slurm[%d]: expected one sbatch option on one line starting with --, got \"%s\"" i s))
        if problems.Count > 0 then Error(List.ofSeq problems)
        else
            Ok { Name = name
                 Description = description
                 Source = source
                 Base = baseTree
                 Axes = variantAxis @ gridAxes @ seedAxis
                 RunsDir = runsDir
                 OutputDir = outputDir
                 Command = command
                 RunFolder = schema.RunFolder
                 SlurmOptions = slurm }
    | other -> Error [ sprintf "$: expected a grid object {\"name\": ..., \"grid\": {...}}, got %s" (describeNode other) ]

/// The runs of a sweep: the cartesian product of its axes, the first axis slowest, with stable names.
let expand (spec: SweepSpec) : Run list =
    let rec product (axes: Axis list) : (Axis * Choice) list list =
        match axes with
        | [] -> [ [] ]
        | a :: rest -> [ for c in a.Choices do for tail in product rest -> (a, c) :: tail ]
    product spec.Axes
    |> List.mapi (fun i picks ->
        let overrides = picks |> List.collect (fun (_, c) -> c.Overrides)
        let config = spec.Base.DeepClone() :?> JsonObject
        for path, value in overrides do setNode config path value
        // The run folder fields are the sweep's to set (below); where the base had them, they do not count.
        match spec.RunFolder with
        | Some rf -> for field in [ rf.RunsDir; rf.Name ] do removeNode config field
        | None -> ()
        let hash = configHash config
        let labels =
            picks
            |> List.map (fun (a, c) ->
                // A number keeps its sign and exponent (`-1.0`, `1e-05`); other labels keep file-name characters.
                let value =
                    match c.Overrides with
                    | [ _, (:? JsonValue as v) ] when v.GetValueKind() = JsonValueKind.Number && c.Label.Length <= maxLabelChars -> c.Label
                    | _ -> slug maxLabelChars c.Label
                if a.Short = "" then value else slug maxLabelChars a.Short + "-" + value)
            |> String.concat "_"
        let labels = if labels.Length > maxLabelsChars then labels.Substring(0, maxLabelsChars).TrimEnd('-', '_') else labels
        let name = String.concat "_" [ yield spec.Name; if labels <> "" then yield labels; yield hash ]
        // Set after hashing: the name is made from the hash.
        match spec.RunFolder with
        | Some rf ->
            setNode config rf.RunsDir (parsedString spec.RunsDir)
            setNode config rf.Name (parsedString name)
        | None -> ()
        { Index = i
          Name = name
          Varied = picks |> List.map (fun (a, c) -> a.Column, c.Label)
          Overrides = overrides
          Config = config
          Hash = hash
          RunDir = Path.Combine(spec.RunsDir, name) })

/// Problems of the expanded runs: runs with the same config (hence the same name but for labels), and every problem the schema's check
/// finds in a run's config (a problem shared by several runs is listed once, with the runs it concerns).
let checkRuns (schema: Schema) (runs: Run list) : string list =
    let describe (r: Run) =
        sprintf "#%d %s (%s)" r.Index r.Name (r.Overrides |> List.map (fun (p, v) -> sprintf "%s=%s" p (oneLine v)) |> String.concat ", ")
    // Equal configs are one run under two labels (e.g. two variants that set nothing); equal names follow from them.
    let duplicates =
        runs
        |> List.groupBy (fun r -> r.Hash)
        |> List.filter (fun (_, rs) -> rs.Length > 1)
        |> List.map (fun (hash, rs) ->
            sprintf "duplicate runs: %s resolve to the same config (hash %s); each run needs a config of its own"
                (rs |> List.map describe |> String.concat " and ") hash)
    let checks =
        runs
        |> List.collect (fun r -> schema.Check r.Config |> List.distinct |> List.map (fun p -> p, r))
        |> List.groupBy fst
        |> List.map (fun (problem, rs) ->
            let rs = rs |> List.map snd
            let which =
                if rs.Length = runs.Length && runs.Length > 1 then sprintf "all %d runs" runs.Length
                else rs |> List.map (fun r -> sprintf "#%d %s" r.Index r.Name) |> String.concat ", "
            sprintf "%s (%s)" problem which)
    duplicates @ checks

/// Reads, checks and expands a grid file: every problem of the file, its values and the resolved configs,
/// before anything runs.
let load (schema: Schema) (gridPath: string) : Result<Plan, string list> =
    if not (File.Exists gridPath) then Error [ sprintf "expected a grid file, but %s does not exist" gridPath ]
    else
        match Json.parse (File.ReadAllText gridPath) with
        | Error e -> Error [ sprintf "%s: %s" gridPath e ]
        | Ok root ->
            let dir = Path.GetDirectoryName(Path.GetFullPath gridPath)
            match parseSpec schema gridPath dir root with
            | Error es -> Error es
            | Ok spec ->
                let runs = expand spec
                match checkRuns schema runs with
                | [] -> Ok { Spec = spec; Runs = runs }
                | es -> Error es

/// `load`, raising one ArgumentException that lists every problem.
let loadOrFail (schema: Schema) (gridPath: string) : Plan =
    match load schema gridPath with
    | Ok plan -> plan
    | Error es -> invalidArg "gridPath" (sprintf "invalid grid %s:\n  - %s" gridPath (String.concat "\n  - " es))

// ---------------------------------------------------------------- run folders

/// Where a run stands, judged from its folder.
type RunStatus =
    /// No folder yet.
    | NotStarted
    /// A folder without a checkpoint: the run starts from the beginning.
    | Started
    /// A checkpoint but no completion: the run resumes from it.
    | Interrupted
    /// test_scores.json or the sweep's completion marker is there: the run is skipped.
    | Finished

/// Written in a run folder when its command exits with 0, by the sweep or by the Slurm task.
let completionMarker = "sweep-complete.json"
/// The evaluation's output; a run that has it is finished.
let testScoresName = "test_scores.json"

/// The status of the run folder `runDir`.
let status (runDir: string) : RunStatus =
    if File.Exists(Path.Combine(runDir, testScoresName)) || File.Exists(Path.Combine(runDir, completionMarker)) then Finished
    elif File.Exists(Train.Checkpoint.last runDir) then Interrupted
    elif Directory.Exists runDir then Started
    else NotStarted

/// `finished`, `interrupted`, `started`, `not started`.
let statusText (s: RunStatus) : string =
    match s with
    | NotStarted -> "not started"
    | Started -> "started"
    | Interrupted -> "interrupted"
    | Finished -> "finished"

/// The config file of a run, under the sweep's output folder.
let configPath (spec: SweepSpec) (run: Run) : string = Path.Combine(spec.OutputDir, "configs", run.Name + ".json")

/// Writes each run's config file; returns their paths in run order.
let writeConfigs (plan: Plan) (dir: string) : string list =
    Directory.CreateDirectory dir |> ignore
    [ for r in plan.Runs do
        let path = Path.Combine(dir, r.Name + ".json")
        File.WriteAllText(path, r.Config.ToJsonString indented + "\n")
        yield path ]

/// The command line of `run` with its placeholders filled: `launcher` for {moe}, `config` for {config},
/// and `--resume` for {resume} when `resume` is true.
let commandLine (spec: SweepSpec) (launcher: string) (config: string) (run: Run) (resume: bool) : string list =
    spec.Command
    |> List.collect (fun token ->
        if token = "{resume}" then (if resume then [ "--resume" ] else [])
        else
            [ token.Replace("{moe}", launcher).Replace("{config}", config).Replace("{run_dir}", run.RunDir).Replace("{name}", run.Name) ])

/// A table of the runs: index, status, name and overrides (what `--dry-run` prints).
let describePlan (plan: Plan) : string =
    let sb = StringBuilder()
    let spec = plan.Spec
    let counts = plan.Runs |> List.countBy (fun r -> status r.RunDir)
    sb.AppendLine(sprintf "sweep %s: %d runs (%s); run folders in %s, results in %s" spec.Name plan.Runs.Length
                      (counts |> List.map (fun (s, n) -> sprintf "%d %s" n (statusText s)) |> String.concat ", ")
                      spec.RunsDir spec.OutputDir) |> ignore
    for r in plan.Runs do
        sb.AppendLine(sprintf "%3d  %-11s  %s" r.Index (statusText (status r.RunDir)) r.Name) |> ignore
        for path, v in r.Overrides do
            sb.AppendLine(sprintf "       %s = %s" path (oneLine v)) |> ignore
    sb.ToString()

// ---------------------------------------------------------------- running

/// How `runAll` starts and reports runs.
type SweepOptions =
    { /// What {moe} becomes: the launcher of this repository (`./moe`).
      Launcher: string
      /// Progress and each run's output go here.
      Output: TextWriter
      /// Stop at the first failed run instead of going on with the others.
      StopOnFailure: bool }

    /// Options for C#: a null writer means Console.Out.
    static member Create(launcher: string, output: TextWriter, stopOnFailure: bool) =
        { Launcher = launcher; Output = (if isNull output then Console.Out else output); StopOnFailure = stopOnFailure }

/// What happened to one run.
type Outcome =
    { Run: Run
      /// The status found before the sweep touched it.
      Before: RunStatus
      /// None when the run was skipped; the exit code otherwise (-1 when it could not be started).
      ExitCode: int option
      Seconds: float
      Message: string }

/// Writes the completion marker of a run.
let private markComplete (run: Run) (exitCode: int) =
    let o = JsonObject()
    o["run"] <- JsonValue.Create run.Name
    o["config_hash"] <- JsonValue.Create run.Hash
    o["exit_code"] <- JsonValue.Create exitCode
    o["finished_utc"] <- JsonValue.Create(DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", inv))
    Directory.CreateDirectory run.RunDir |> ignore
    File.WriteAllText(Path.Combine(run.RunDir, completionMarker), o.ToJsonString compact + "\n")

/// Runs `argv` as a child process, copying its output lines to `out` and to `logPath`; returns its exit code.
let private runProcess (argv: string list) (out: TextWriter) (logPath: string) : int =
    let psi = ProcessStartInfo(List.head argv, UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true)
    for a in List.tail argv do psi.ArgumentList.Add a
    Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath logPath)) |> ignore
    use log = new StreamWriter(logPath, true, UTF8Encoding(false))
    let gate = obj ()
    let copy (e: DataReceivedEventArgs) =
        if not (isNull e.Data) then
            lock gate (fun () ->
                out.WriteLine e.Data
                log.WriteLine e.Data
                log.Flush())
    use p = new Process(StartInfo = psi)
    p.OutputDataReceived.Add copy
    p.ErrorDataReceived.Add copy
    p.Start() |> ignore
    p.BeginOutputReadLine()
    p.BeginErrorReadLine()
    p.WaitForExit()
    out.Flush()
    p.ExitCode

/// Runs the sweep's runs one after another: a finished run is skipped, an interrupted one resumed, any
/// other started from the beginning. Each run's config goes to `<output>/configs/<run>.json`, its output
/// to the console and `<output>/logs/<run>.log`; a run whose command exits with 0 gets the completion
/// marker. A failed run is reported and the sweep goes on (unless `StopOnFailure`).
let runAll (opts: SweepOptions) (plan: Plan) : Outcome list =
    let spec = plan.Spec
    let configs = writeConfigs plan (Path.Combine(spec.OutputDir, "configs"))
    let total = plan.Runs.Length
    let mutable stop = false
    [ for run, config in List.zip plan.Runs configs do
        if not stop then
            let before = status run.RunDir
            let say (text: string) =
                opts.Output.WriteLine(sprintf "[%d/%d] %s: %s" (run.Index + 1) total run.Name text)
                opts.Output.Flush()
            match before with
            | Finished ->
                say "finished, skipped"
                yield { Run = run; Before = before; ExitCode = None; Seconds = 0.0; Message = "finished, skipped" }
            | _ ->
                let resume = (before = Interrupted)
                let argv = commandLine spec opts.Launcher (Path.GetFullPath config) run resume
                say (sprintf "%s: %s" (if resume then "resuming" else "starting") (String.concat " " argv))
                let clock = Stopwatch.StartNew()
                let code, message =
                    try
                        let code = runProcess argv opts.Output (Path.Combine(spec.OutputDir, "logs", run.Name + ".log"))
                        code, (if code = 0 then "done" else sprintf "failed with exit code %d" code)
                    with :? ComponentModel.Win32Exception as e ->
                        -1, sprintf "could not start %s: %s" (List.head argv) e.Message
                if code = 0 then markComplete run code
                say (sprintf "%s in %.1f s" message clock.Elapsed.TotalSeconds)
                if code <> 0 && opts.StopOnFailure then stop <- true
                yield { Run = run; Before = before; ExitCode = Some code; Seconds = clock.Elapsed.TotalSeconds; Message = message } ]

// ---------------------------------------------------------------- results

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

// ---------------------------------------------------------------- Slurm

/// A string as one bash word in single quotes.
let private bashQuote (s: string) = "'" + s.Replace("'", "'\\''") + "'"

/// A command token as a bash word, its placeholders becoming the script's variables.
let private bashWord (token: string) : string =
    if token = "{resume}" then "${resume[@]+\"${resume[@]}\"}"
    else
        let parts = Regex.Split(token, @"(\{moe\}|\{config\}|\{run_dir\}|\{name\})")
        parts
        |> Array.filter (fun p -> p <> "")
        |> Array.map (fun p ->
            match p with
            | "{moe}" -> "\"$moe\""
            | "{config}" -> "\"$config\""
            | "{run_dir}" -> "\"$run_dir\""
            | "{name}" -> "\"$name\""
            | literal -> bashQuote literal)
        |> String.concat ""

/// `path` relative to `root` when it lies under it (the script `cd`s to root, so the tree can move), else absolute.
let private underRoot (root: string) (path: string) : string =
    let full = Path.GetFullPath path
    let rel = Path.GetRelativePath(root, full)
    if rel.StartsWith ".." || Path.IsPathRooted rel then full else rel

/// The files `emitSlurm` wrote.
type SlurmFiles =
    { /// The job-array script: `sbatch` it; task i runs run i.
      Script: string
      /// One config file per run, in run order.
      Configs: string list
      /// index, name, config, run folder: one line per run, tab-separated.
      RunList: string }

/// Writes into `dir` one config file per run (`configs/<run>.json`), `runs.tsv`, a `logs/` folder and
/// `<name>.sbatch`: a Slurm job array (`--array=0-(n-1)`) whose task i `cd`s to `workDir` (or $MOE_ROOT),
/// the folder relative paths of the sweep mean the same from, skips run i when it is finished, adds
/// `--resume` when it has a checkpoint, runs the sweep's command with `{moe}` = `$MOE` or `launcher`, and
/// writes the completion marker when the command succeeds. `./moe sweep GRID --collect` reads the results.
let emitSlurm (plan: Plan) (dir: string) (workDir: string) (launcher: string) : SlurmFiles =
    let spec = plan.Spec
    let root = Path.GetFullPath workDir
    let dir = Path.GetFullPath dir
    let configs = writeConfigs plan (Path.Combine(dir, "configs"))
    let logs = Path.Combine(dir, "logs")
    Directory.CreateDirectory logs |> ignore
    let runList = Path.Combine(dir, "runs.tsv")
    File.WriteAllLines(runList,
        [ yield "index\tname\tconfig\trun_dir"
          for r, c in List.zip plan.Runs configs do
              yield sprintf "%d\t%s\t%s\t%s" r.Index r.Name (underRoot root c) (underRoot root r.RunDir) ])
    let array (name: string) (items: string list) =
        sprintf "%s=(\n%s\n)" name (items |> List.map (fun s -> "  " + bashQuote s) |> String.concat "\n")
    let n = plan.Runs.Length
    let script =
        [ "#!/usr/bin/env bash"
          sprintf "# Slurm job array for sweep %s (%d runs), written by `moe sweep --emit-slurm`." spec.Name n
          sprintf "# Submit: sbatch %s" (bashQuote (Path.Combine(dir, spec.Name + ".sbatch")))
          "# One task by hand: SLURM_ARRAY_TASK_ID=0 bash <this file>. Results afterwards: ./moe sweep GRID.json --collect"
          "# MOE_ROOT overrides the working folder and MOE the launcher (when the tree moved)."
          sprintf "#SBATCH --job-name=moe-%s" spec.Name
          sprintf "#SBATCH --array=0-%d" (n - 1)
          sprintf "#SBATCH --output=%s/%%x-%%A_%%a.out" logs
          for o in spec.SlurmOptions do sprintf "#SBATCH %s" o
          "set -euo pipefail"
          // Unquoted ${..:-'word'} in an assignment: no splitting, and the single-quoted default stays literal.
          sprintf "root=${MOE_ROOT:-%s}" (bashQuote root)
          sprintf "moe=${MOE:-%s}" (bashQuote (Path.GetFullPath launcher))
          "cd \"$root\""
          array "names" (plan.Runs |> List.map (fun r -> r.Name))
          array "configs" (configs |> List.map (underRoot root))
          array "run_dirs" (plan.Runs |> List.map (fun r -> underRoot root r.RunDir))
          "task=\"${SLURM_ARRAY_TASK_ID:?expected SLURM_ARRAY_TASK_ID (set by sbatch --array, or by hand to run one task)}\""
          "if ! [[ \"$task\" =~ ^[0-9]+$ ]] || (( task >= ${#names[@]} )); then"
          "  echo \"moe sweep: task $task is not a run of this sweep (0..$(( ${#names[@]} - 1 )))\" >&2"
          "  exit 2"
          "fi"
          "name=\"${names[$task]}\""
          "config=\"${configs[$task]}\""
          "run_dir=\"${run_dirs[$task]}\""
          sprintf "if [ -f \"$run_dir/%s\" ] || [ -f \"$run_dir/%s\" ]; then" testScoresName completionMarker
          "  echo \"moe sweep: $name is finished; nothing to do\""
          "  exit 0"
          "fi"
          "resume=()"
          sprintf "if [ -f \"$run_dir/checkpoints/%s\" ]; then resume=(--resume); fi" Train.Checkpoint.lastName
          "echo \"moe sweep: task $task runs $name\""
          spec.Command |> List.map bashWord |> String.concat " "
          "mkdir -p \"$run_dir\""
          sprintf "printf '{\"run\":\"%%s\",\"exit_code\":0,\"finished_utc\":\"%%s\"}\\n' \"$name\" \"$(date -u +%%Y-%%m-%%dT%%H:%%M:%%SZ)\" > \"$run_dir/%s\"" completionMarker ]
        |> String.concat "\n"
    let scriptPath = Path.Combine(dir, spec.Name + ".sbatch")
    File.WriteAllText(scriptPath, script + "\n")
    if not (OperatingSystem.IsWindows()) then
        File.SetUnixFileMode(scriptPath, File.GetUnixFileMode scriptPath ||| UnixFileMode.UserExecute ||| UnixFileMode.GroupExecute)
    { Script = scriptPath; Configs = configs; RunList = runList }

// ---------------------------------------------------------------- C# facade

/// The sweep runner for C#: load a grid, list, run, collect, emit Slurm files.
type SweepRunner =
    /// Reads, checks and expands a grid file; raises ArgumentException listing every problem.
    static member Load(gridPath: string, schema: Schema) : Plan = loadOrFail schema gridPath
    /// The dry-run listing.
    static member Describe(plan: Plan) : string = describePlan plan
    /// Runs every unfinished run (see `runAll`).
    static member Run(plan: Plan, options: SweepOptions) : Outcome[] = runAll options plan |> List.toArray
    /// Reads each run folder into a results row.
    static member Collect(plan: Plan) : ResultRow[] = collect plan |> List.toArray
    /// Writes the combined report page; returns the line results.md shows about it.
    static member WriteReport(plan: Plan) : string = writeReport plan
    /// Writes results.csv and results.md; returns their paths.
    static member WriteResults(plan: Plan, rows: ResultRow seq, reportNote: string) : string * string =
        writeResults plan (List.ofSeq rows) reportNote
    /// Writes the Slurm job array and per-run configs into `dir`.
    static member EmitSlurm(plan: Plan, dir: string, workDir: string, launcher: string) : SlurmFiles = emitSlurm plan dir workDir launcher
