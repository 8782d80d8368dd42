/// What a sweep knows about the training command's config file: a `Schema` (the file's sections and the F#
/// type each is read as, found by reflection), so the field paths and values of a grid are checked before
/// anything runs.
///
/// Field paths are the keys of the config file joined by dots; the file is what `Json` writes for F#
/// records: record field names as keys, a union case as `"Case"` or `{"Case": fields}` (one field: its
/// value; several: an object of the fields by name). A path may step through a case name into the case's
/// fields: `Model.Ffn.Moe.Router.K` is K inside `"Ffn": {"Moe": {...}}`, and
/// `moe.Router.Selection.TokenChoiceTopK.renormalise` one field of a case with several. Such a path changes
/// the case the base config holds, so the base must hold that case there; choosing the case is giving the
/// union's own path a whole value.
namespace Moe.Sweep

open System
open System.Collections.Generic
open System.Text.Json
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
    let private isList (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<list<_>>
    let private isMap (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<Map<_, _>>
    let private isRecord (t: Type) = FSharpType.IsRecord(t, true)
    /// A union a path can step into by case name (options and lists are unions to reflection, not here).
    let private isUnion (t: Type) = FSharpType.IsUnion(t, true) && not (isOption t) && not (isList t)
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

    /// The message for a key that names no `what` ("field", "case") of `owner`, with the likely intended name.
    let private unknownName (what: string) (where: string) (key: string) (owner: string) (names: string[]) : string =
        let hint =
            match names |> Array.tryFind (fun n -> String.Equals(n, key, StringComparison.OrdinalIgnoreCase)) with
            | Some n -> sprintf " (did you mean '%s'? names are case-sensitive)" n
            | None -> ""
        sprintf "%s: unknown %s '%s' in %s%s; expected one of %s" where what key owner hint (String.concat ", " names)

    let private fieldNames (fields: Reflection.PropertyInfo[]) = fields |> Array.map (fun f -> f.Name)

    /// A step of a field path into a union case: the path of the union's node and the case the path names.
    type private CaseStep = { Union: string; Case: string }

    /// Walks `path` (keys joined by dots) through the config file's types: the type it leads to and the
    /// union cases it steps into on the way, outermost first; or why it leads nowhere.
    let private resolve (schema: Schema) (path: string) : Result<Type * CaseStep list, string> =
        let keys = if isNull path then [||] else path.Split '.'
        if keys.Length = 0 || keys |> Array.exists String.IsNullOrWhiteSpace then
            Error(sprintf "expected a field path like train.Steps (keys joined by dots), got '%s'" path)
        else
            let rec walk (i: int) (where: string) (t: Type) (steps: CaseStep list) : Result<Type * CaseStep list, string> =
                if i = keys.Length then Ok(t, List.rev steps)
                elif isFree t then Ok(typeof<JsonNode>, List.rev steps)
                elif isOption t then walk i where (t.GetGenericArguments()[0]) steps
                elif isMap t then walk (i + 1) (where + "." + keys[i]) (t.GetGenericArguments()[1]) steps
                elif isRecord t then
                    let fields = FSharpType.GetRecordFields(t, true)
                    match fields |> Array.tryFind (fun f -> f.Name = keys[i]) with
                    | Some f -> walk (i + 1) (where + "." + keys[i]) f.PropertyType steps
                    | None -> Error(unknownName "field" where keys[i] t.Name (fieldNames fields))
                elif isUnion t then
                    let cases = FSharpType.GetUnionCases(t, true)
                    match cases |> Array.tryFind (fun c -> c.Name = keys[i]) with
                    | None -> Error(unknownName "case" where keys[i] t.Name (cases |> Array.map (fun c -> c.Name)))
                    | Some c ->
                        let inCase = where + "." + c.Name
                        let steps = { Union = where; Case = c.Name } :: steps
                        // The case's JSON (Json.caseFields): one field is the value itself, several an object by name.
                        match c.GetFields() with
                        | [||] ->
                            Error(sprintf "%s: case %s of %s has no fields; give %s the value \"%s\"" inCase c.Name t.Name where c.Name)
                        | [| f |] -> walk (i + 1) inCase f.PropertyType steps
                        | fields when i + 1 = keys.Length ->
                            Error(sprintf "%s: case %s of %s has the fields %s; name one of them, or give %s a whole value"
                                      inCase c.Name t.Name (String.concat ", " (fieldNames fields)) where)
                        | fields ->
                            match fields |> Array.tryFind (fun f -> f.Name = keys[i + 1]) with
                            | Some f -> walk (i + 2) (inCase + "." + f.Name) f.PropertyType steps
                            | None -> Error(unknownName "field" inCase keys[i + 1] ("case " + c.Name) (fieldNames fields))
                else
                    Error(sprintf "%s is of type %s, not a record; it has no field '%s' (give %s a whole value)" where (typeName t) keys[i] where)
            match schema.Sections |> List.tryFind (fun (name, _) -> name = keys[0]) with
            | Some(_, t) -> walk 1 keys[0] t []
            | None ->
                Error(sprintf "unknown section '%s'; the config file has %s" keys[0]
                          (schema.Sections |> List.map fst |> String.concat ", "))

    /// The type that `path` (keys joined by dots) leads to in the config file, or why it leads nowhere.
    let fieldType (schema: Schema) (path: string) : Result<Type, string> = resolve schema path |> Result.map fst

    /// Why `path` cannot be set in `baseConfig`: a union the path steps through holds another case there than
    /// the one the path names, or is not set (setting a field inside it would leave the case's other fields
    /// out, and `Json` reads a case whole). None when it can be set, or when the path leads nowhere
    /// (`fieldType` says why).
    let internal caseMismatch (schema: Schema) (baseConfig: JsonObject) (path: string) : string option =
        match resolve schema path with
        | Error _ -> None
        | Ok(_, steps) ->
            steps
            |> List.tryPick (fun s ->
                let held =
                    match ConfigTree.nodeAt baseConfig s.Union with
                    | Some(:? JsonValue as v) when v.GetValueKind() = JsonValueKind.String -> Ok(v.GetValue<string>())
                    | Some(:? JsonObject as o) when o.Count = 1 -> Ok (Seq.head o).Key
                    | Some n -> Error(sprintf "holds %s there" (ConfigTree.describeNode n))
                    | None -> Error(sprintf "does not set %s" s.Union)
                let mismatch =
                    match held with
                    | Ok c when c = s.Case -> None
                    | Ok c -> Some(sprintf "holds %s there" c)
                    | Error what -> Some what
                mismatch
                |> Option.map (fun what ->
                    sprintf "%s steps into case %s of %s, but the base config %s; " path s.Case s.Union what
                    + sprintf "a path into a case changes the case the base holds (to choose the case, give %s a whole value)" s.Union))

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
                    | None -> problems.Add(unknownName "field" where kv.Key t.Name (fieldNames fields))
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
