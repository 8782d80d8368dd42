/// Grids: a grid file (a base run config and a grid of overrides) read, checked against the config's
/// `Schema` and expanded into named runs (`load`), every problem found before anything runs.
///
/// The grid file (JSON; comments and trailing commas allowed; field paths as in `Schema`):
///
///     {
///       "name": "balance",                        // required: letters, digits, '.', '_', '-'
///       "description": "hash vs top-k, +/- aux",   // optional: shown in results.md
///       "base": "configs/tiny.json",               // optional: a config file (relative to the grid file) ...
///       "base": { "Train": { "Steps": 200 } },     //   ... or the config tree inline; default {}
///       "grid": {                                  // optional: field path -> non-empty list of values
///         "Model.Ffn.Moe.Router.K": [ 1, 2 ],      //   (a path into a case the base holds, see `Schema`)
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
/// A value replaces the node at its path, so to change one field of a record, name that field's path. A
/// field may be varied by one axis only. Runs are the cartesian product variants x grid (in file order, the
/// first key slowest) x seeds. Each run's name is `<sweep>_<axis labels>_<hash>`, the hash being the first
/// 8 hex digits of SHA-256 over the resolved config in canonical form (sorted keys, no spaces, numbers in
/// shortest round-trip form), so a name changes exactly when the run's config does (the run folder fields
/// below left out). Where the schema says the config names its own run folder (`RunFolder`, e.g. the
/// summarizer's `RunsDir`/`Name`), the sweep then writes runs_dir and the run's name into those fields
/// (over any value the base had), so the training command writes where the sweep looks; otherwise the
/// command passes `{run_dir}`. Paths in the grid file (runs_dir, output_dir) are relative to the working
/// directory; the base file is relative to the grid file. The command's placeholders are in `Runner`.
module Moe.Sweep.Grid

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Text.RegularExpressions
open Moe
open Moe.Sweep.ConfigTree

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
      /// The command line of one run, with placeholders (see `Runner`).
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
                Schema.checkTree problems schema "$.base" b
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
                        Schema.checkTree problems schema (sprintf "$.base (%s) $" file) b
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
        // ---- a path into a union case: the base must hold that case
        let checkCase (where: string) (path: string) =
            Schema.caseMismatch schema baseTree path |> Option.iter (fun e -> add (sprintf "%s: %s" where e))
        // ---- values of one field: each checked against the field's type, duplicates named
        let values (where: string) (path: string) (node: JsonNode) : JsonNode list =
            match Schema.fieldType schema path with
            | Error e ->
                add (sprintf "%s: %s" where e)
                []
            | Ok t ->
                checkCase where path
                match node with
                | :? JsonArray as a when a.Count = 0 -> add (sprintf "%s: empty; expected at least one value" where); []
                | :? JsonArray as a ->
                    let seen = Dictionary<string, int>()
                    [ for i in 0 .. a.Count - 1 do
                        let at = sprintf "%s[%d]" where i
                        Schema.checkValue problems at t a[i]
                        let c = canonical a[i]
                        match seen.TryGetValue c with
                        | true, j -> add (sprintf "%s: duplicate of %s[%d] (the runs would be the same)" at where j)
                        | _ -> seen[c] <- i
                        yield a[i] ]
                | other ->
                    add (sprintf "%s: expected a list of values for %s (of type %s), got %s" where path (Schema.typeName t) (describeNode other))
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
                                        match Schema.fieldType schema kv.Key with
                                        | Error e -> add (sprintf "%s: %s" where e)
                                        | Ok t ->
                                            checkCase where kv.Key
                                            Schema.checkValue problems where t kv.Value
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
                match Schema.fieldType schema field with
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
