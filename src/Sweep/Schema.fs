/// What a sweep knows about the training command's config file: a `Schema` (the file's sections and the F#
/// type each is read as, found by reflection), so the field paths and values of a grid are checked before
/// anything runs.
///
/// Field paths are the keys of the config file joined by dots; the file is what `Json` writes for F#
/// records: record field names as keys, unions as `"Case"` or `{"Case": fields}`.
namespace Moe.Sweep

open System
open System.Collections.Generic
open System.Text.Json.Nodes
open Microsoft.FSharp.Reflection
open Moe

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

/// Schemas of config files, and what a field path leads to in them.
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
                    | :? JsonObject as o -> ConfigTree.tryProperty o name |> Option.defaultValue null
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
        ofRecord Summarizer.SummarizerConfig.defaults Summarizer.SummarizerConfig.validate
        |> withSeedField "Train.Seed"
        |> withRunFolder "RunsDir" "Name"

    let private isOption (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<option<_>>
    let private isMap (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<Map<_, _>>
    let private isRecord (t: Type) = FSharpType.IsRecord(t, true)
    /// A JsonNode-typed field holds any JSON; paths below it are not checked.
    let private isFree (t: Type) = typeof<JsonNode>.IsAssignableFrom t

    /// A type's name as a reader knows it: `float`, `int`, `Selection`, `float option`.
    let rec internal typeName (t: Type) : string =
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
    let rec internal checkValue (problems: ResizeArray<string>) (where: string) (t: Type) (node: JsonNode) : unit =
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
            | _ -> problems.Add(sprintf "%s: expected an object with fields of %s, got %s" where t.Name (ConfigTree.describeNode node))
        else
            for p in readProblems t node do
                problems.Add(if p.StartsWith "config" then where + p.Substring "config".Length else sprintf "%s: %s" where p)

    /// Adds every problem of a config tree (top-level sections, then fields by type) at JSON path `where`.
    let internal checkTree (problems: ResizeArray<string>) (schema: Schema) (where: string) (node: JsonNode) : unit =
        match node with
        | :? JsonObject as o ->
            for kv in o do
                match schema.Sections |> List.tryFind (fun (name, _) -> name = kv.Key) with
                | Some(_, t) -> checkValue problems (where + "." + kv.Key) t kv.Value
                | None ->
                    problems.Add(sprintf "%s: unknown section '%s'; the config file has %s" where kv.Key
                                     (schema.Sections |> List.map fst |> String.concat ", "))
        | _ -> problems.Add(sprintf "%s: expected a config object, got %s" where (ConfigTree.describeNode node))
