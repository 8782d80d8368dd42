/// JSON for configuration records: F# records, unions, options, lists and primitives to System.Text.Json
/// nodes and back, so a run's `config.json` is readable by any JSON tool and a config file can override
/// only the fields it names.
///
/// Mapping: a record is an object with its field names; a union case without fields is its name
/// (`"Cosine"`); a case with one field is `{"Case": value}`, with several `{"Case": {"field": ...}}`;
/// `None` is `null`; lists and arrays are arrays; a float that is NaN or infinite is the string
/// `"NaN"`, `"Infinity"` or `"-Infinity"` (JSON has no literal for them).
module Moe.Json

open System
open System.Collections.Generic
open System.Text.Json
open System.Text.Json.Nodes
open Microsoft.FSharp.Reflection

let private writeOptions = JsonSerializerOptions(WriteIndented = true)

let private isOption (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<option<_>>
let private isList (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<list<_>>
let private isMap (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<Map<_, _>>

let private ofFloat (f: float) : JsonNode =
    if Double.IsNaN f then JsonValue.Create "NaN"
    elif Double.IsPositiveInfinity f then JsonValue.Create "Infinity"
    elif Double.IsNegativeInfinity f then JsonValue.Create "-Infinity"
    else JsonValue.Create f

/// Fields of a union case as JSON: the value itself for one field, an object of named fields otherwise.
let rec private caseFields (fields: Reflection.PropertyInfo[]) (values: obj[]) : JsonNode =
    if fields.Length = 1 then ofTyped fields[0].PropertyType values[0]
    else
        let o = JsonObject()
        for f, v in Array.zip fields values do o[f.Name] <- ofTyped f.PropertyType v
        o :> JsonNode

/// A value of static type `t` as a JSON node (null for `None`).
and ofTyped (t: Type) (v: obj) : JsonNode =
    if t = typeof<JsonNode> || t.IsSubclassOf typeof<JsonNode> then
        (if isNull v then null else (v :?> JsonNode).DeepClone())
    elif isOption t then
        if isNull v then null
        else
            let _, fields = FSharpValue.GetUnionFields(v, t)
            ofTyped (t.GetGenericArguments()[0]) fields[0]
    elif isNull v then null
    elif t = typeof<string> then JsonValue.Create(v :?> string)
    elif t = typeof<bool> then JsonValue.Create(v :?> bool)
    elif t = typeof<int> then JsonValue.Create(v :?> int)
    elif t = typeof<int64> then JsonValue.Create(v :?> int64)
    elif t = typeof<float> then ofFloat (v :?> float)
    elif t = typeof<float32> then ofFloat (float (v :?> float32))
    elif t = typeof<obj> then ofTyped (v.GetType()) v
    elif isMap t then
        let o = JsonObject()
        let valueType = t.GetGenericArguments()[1]
        for kv in (v :?> System.Collections.IEnumerable) do
            let key = kv.GetType().GetProperty("Key").GetValue(kv)
            o[string key] <- ofTyped valueType (kv.GetType().GetProperty("Value").GetValue(kv))
        o :> JsonNode
    elif t.IsArray || isList t then
        let element = if t.IsArray then t.GetElementType() else t.GetGenericArguments()[0]
        let a = JsonArray()
        for x in (v :?> System.Collections.IEnumerable) do a.Add(ofTyped element x)
        a :> JsonNode
    elif FSharpType.IsTuple t then
        let a = JsonArray()
        for et, x in Array.zip (FSharpType.GetTupleElements t) (FSharpValue.GetTupleFields v) do a.Add(ofTyped et x)
        a :> JsonNode
    elif FSharpType.IsRecord(t, true) then
        let o = JsonObject()
        for f in FSharpType.GetRecordFields(t, true) do o[f.Name] <- ofTyped f.PropertyType (f.GetValue v)
        o :> JsonNode
    elif FSharpType.IsUnion(t, true) then
        let case, values = FSharpValue.GetUnionFields(v, t, true)
        let fields = case.GetFields()
        if fields.Length = 0 then JsonValue.Create case.Name :> JsonNode
        else
            let o = JsonObject()
            o[case.Name] <- caseFields fields values
            o :> JsonNode
    elif t.IsEnum then JsonValue.Create(string v) :> JsonNode
    else invalidArg "value" (sprintf "expected a record, union, option, list, array or primitive, got %s" t.FullName)

/// A value as a JSON node, by its static type.
let toNode<'T> (value: 'T) : JsonNode = ofTyped typeof<'T> (box value)

/// A value as indented JSON text.
let serialize<'T> (value: 'T) : string =
    match toNode value with
    | null -> "null"
    | n -> n.ToJsonString writeOptions

/// Any JSON node as indented text.
let format (node: JsonNode) : string = if isNull node then "null" else node.ToJsonString writeOptions

let private tryProperty (o: JsonObject) (name: string) : JsonNode option =
    let mutable n: JsonNode = null
    if o.TryGetPropertyValue(name, &n) then Some n else None

let private kind (n: JsonNode) =
    if isNull n then "null"
    else
        match n.GetValueKind() with
        | JsonValueKind.Object -> "an object"
        | JsonValueKind.Array -> "an array"
        | JsonValueKind.String -> sprintf "\"%s\"" (n.GetValue<string>())
        | _ -> n.ToJsonString()

/// Reads `node` as static type `t`. `over` is the value to start from for records (fields the node
/// leaves out keep it; pass null for none), so a config file may name only what it changes.
/// Problems go to `errors`, each prefixed by its path; the result is meaningless when any were added.
let rec private read (errors: ResizeArray<string>) (path: string) (t: Type) (over: obj) (node: JsonNode) : obj =
    let fail (expected: string) =
        errors.Add(sprintf "%s: expected %s, got %s" path expected (kind node))
        over
    let valueOf () : JsonElement option =
        match node with
        | :? JsonValue as v ->
            // Parsed values hold a JsonElement; values built in code hold a .NET value: reparse those.
            match v.TryGetValue<JsonElement>() with
            | true, e -> Some e
            | _ -> Some((JsonDocument.Parse(v.ToJsonString())).RootElement.Clone())
        | _ -> None
    let number (expected: string) (parse: JsonElement -> obj option) =
        match valueOf () with
        | Some e ->
            match parse e with
            | Some x -> x
            | None -> fail expected
        | None -> fail expected
    if t = typeof<JsonNode> then (if isNull node then null else box (node.DeepClone()))
    elif isOption t then
        if isNull node then null
        else
            let inner = t.GetGenericArguments()[0]
            let innerOver =
                if isNull over then null else snd (FSharpValue.GetUnionFields(over, t)) |> Array.head
            let x = read errors path inner innerOver node
            FSharpValue.MakeUnion(FSharpType.GetUnionCases(t) |> Array.find (fun c -> c.Name = "Some"), [| x |])
    elif isNull node then fail (sprintf "a value of type %s" t.Name)
    elif t = typeof<string> then
        number "a string" (fun e -> if e.ValueKind = JsonValueKind.String then Some(box (e.GetString())) else None)
    elif t = typeof<bool> then
        number "true or false" (fun e ->
            match e.ValueKind with
            | JsonValueKind.True -> Some(box true)
            | JsonValueKind.False -> Some(box false)
            | _ -> None)
    elif t = typeof<int> then
        number "an integer" (fun e ->
            match e.ValueKind with
            | JsonValueKind.Number ->
                match e.TryGetInt32() with
                | true, i -> Some(box i)
                | _ -> None
            | _ -> None)
    elif t = typeof<int64> then
        number "an integer" (fun e ->
            match e.ValueKind with
            | JsonValueKind.Number ->
                match e.TryGetInt64() with
                | true, i -> Some(box i)
                | _ -> None
            | _ -> None)
    elif t = typeof<float> || t = typeof<float32> then
        let asFloat (e: JsonElement) =
            match e.ValueKind with
            | JsonValueKind.Number -> Some(e.GetDouble())
            | JsonValueKind.String ->
                match e.GetString() with
                | "NaN" -> Some nan
                | "Infinity" -> Some infinity
                | "-Infinity" -> Some -infinity
                | _ -> None
            | _ -> None
        number "a number" (fun e -> asFloat e |> Option.map (fun f -> if t = typeof<float> then box f else box (float32 f)))
    elif t.IsArray || isList t then
        match node with
        | :? JsonArray as a ->
            let element = if t.IsArray then t.GetElementType() else t.GetGenericArguments()[0]
            let items = a |> Seq.mapi (fun i x -> read errors (sprintf "%s[%d]" path i) element null x) |> Seq.toArray
            if t.IsArray then
                let arr = Array.CreateInstance(element, items.Length)
                items |> Array.iteri (fun i x -> arr.SetValue(x, i))
                box arr
            else
                let cases = FSharpType.GetUnionCases t
                let empty = FSharpValue.MakeUnion(cases |> Array.find (fun c -> c.Name = "Empty"), [||])
                let cons = cases |> Array.find (fun c -> c.Name = "Cons")
                Array.foldBack (fun x acc -> FSharpValue.MakeUnion(cons, [| x; acc |])) items empty
        | _ -> fail "an array"
    elif isMap t then
        match node with
        | :? JsonObject as o ->
            let kt, vt = t.GetGenericArguments()[0], t.GetGenericArguments()[1]
            if kt <> typeof<string> then fail "a map with string keys"
            else
                let tupleType = FSharpType.MakeTupleType [| kt; vt |]
                let pairs =
                    [| for kv in o -> FSharpValue.MakeTuple([| box kv.Key; read errors (path + "." + kv.Key) vt null kv.Value |], tupleType) |]
                let typed = Array.CreateInstance(tupleType, pairs.Length)
                pairs |> Array.iteri (fun i p -> typed.SetValue(p, i))
                Activator.CreateInstance(t, [| box typed |])
        | _ -> fail "an object"
    elif FSharpType.IsTuple t then
        match node with
        | :? JsonArray as a when a.Count = (FSharpType.GetTupleElements t).Length ->
            let items = FSharpType.GetTupleElements t |> Array.mapi (fun i et -> read errors (sprintf "%s[%d]" path i) et null a[i])
            FSharpValue.MakeTuple(items, t)
        | _ -> fail (sprintf "an array of %d items" (FSharpType.GetTupleElements t).Length)
    elif FSharpType.IsRecord(t, true) then
        match node with
        | :? JsonObject as o ->
            let fields = FSharpType.GetRecordFields(t, true)
            let known = HashSet(fields |> Array.map (fun f -> f.Name))
            for kv in o do
                if not (known.Contains kv.Key) then
                    errors.Add(sprintf "%s: unknown field '%s' (expected one of %s)" path kv.Key (String.concat ", " known))
            let before = errors.Count
            let values =
                fields
                |> Array.map (fun f ->
                    let prev = if isNull over then null else f.GetValue over
                    match tryProperty o f.Name with
                    | Some n -> read errors (path + "." + f.Name) f.PropertyType prev n
                    | _ when not (isNull over) -> prev
                    | _ when isOption f.PropertyType -> null
                    | _ ->
                        errors.Add(sprintf "%s: missing field '%s'" path f.Name)
                        null)
            // A field that failed to read may hold null where the record needs a value.
            if errors.Count > before then over else FSharpValue.MakeRecord(t, values, true)
        | _ -> fail "an object"
    elif FSharpType.IsUnion(t, true) then
        let cases = FSharpType.GetUnionCases(t, true)
        let names = cases |> Array.map (fun c -> c.Name) |> String.concat "|"
        let caseNamed (name: string) = cases |> Array.tryFind (fun c -> c.Name = name)
        match node with
        | :? JsonValue as v when v.GetValueKind() = JsonValueKind.String ->
            match caseNamed (v.GetValue<string>()) with
            | Some c when c.GetFields().Length = 0 -> FSharpValue.MakeUnion(c, [||], true)
            | Some c -> fail (sprintf "{\"%s\": ...} (the case has fields)" c.Name)
            | None -> fail (sprintf "one of %s" names)
        | :? JsonObject as o when o.Count = 1 ->
            let kv = Seq.head o
            match caseNamed kv.Key with
            | Some c ->
                let fields = c.GetFields()
                let casePath = path + "." + c.Name
                if fields.Length = 0 then FSharpValue.MakeUnion(c, [||], true)
                elif fields.Length = 1 then
                    FSharpValue.MakeUnion(c, [| read errors casePath fields[0].PropertyType null kv.Value |], true)
                else
                    match kv.Value with
                    | :? JsonObject as fo ->
                        let before = errors.Count
                        let values =
                            fields |> Array.map (fun f ->
                                match tryProperty fo f.Name with
                                | Some n -> read errors (casePath + "." + f.Name) f.PropertyType null n
                                | _ ->
                                    errors.Add(sprintf "%s: missing field '%s'" casePath f.Name)
                                    null)
                        if errors.Count > before then over else FSharpValue.MakeUnion(c, values, true)
                    | other ->
                        errors.Add(sprintf "%s: expected an object with fields %s, got %s" casePath
                                       (fields |> Array.map (fun f -> f.Name) |> String.concat ", ") (kind other))
                        over
            | None -> fail (sprintf "one of %s" names)
        | _ -> fail (sprintf "one of %s (a name, or {\"Case\": fields})" names)
    else fail (sprintf "a supported type (not %s)" t.FullName)

/// Reads `node` as a `'T`, starting from `over` so fields the node leaves out keep their values there.
/// Every problem is reported, each with its path (`config.Schedule: expected one of Cosine|...`).
let readOver<'T> (over: 'T) (node: JsonNode) : Result<'T, string list> =
    let errors = ResizeArray()
    let value = read errors "config" typeof<'T> (box over) node
    if errors.Count = 0 then Ok(unbox<'T> value) else Error(List.ofSeq errors)

/// Reads `node` as a `'T`; every record field must be present (options may be left out).
let ofNode<'T> (node: JsonNode) : Result<'T, string list> =
    let errors = ResizeArray()
    let value = read errors "config" typeof<'T> null node
    if errors.Count = 0 then Ok(unbox<'T> value) else Error(List.ofSeq errors)

/// Parses JSON text, or says where it is malformed.
let parse (text: string) : Result<JsonNode, string> =
    try
        Ok(JsonNode.Parse(text, documentOptions = JsonDocumentOptions(CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true)))
    with :? JsonException as e -> Error(sprintf "malformed JSON: %s" e.Message)

/// Reads `text` as a `'T` over `defaults` (see `readOver`).
let deserializeOver<'T> (defaults: 'T) (text: string) : Result<'T, string list> =
    match parse text with
    | Ok node -> readOver defaults node
    | Error e -> Error [ e ]

/// Reads `text` as a complete `'T` (see `ofNode`).
let deserialize<'T> (text: string) : Result<'T, string list> =
    match parse text with
    | Ok node -> ofNode node
    | Error e -> Error [ e ]

/// A value given on a command line as JSON: numbers, true/false, null, arrays, objects and quoted strings
/// parse as JSON; anything else is taken as a plain string (so `Schedule=Cosine` needs no quotes).
let private commandLineValue (text: string) : JsonNode =
    match parse text with
    | Ok n -> n
    | Error _ -> JsonValue.Create text

/// Sets `path` (dot-separated object keys, e.g. "train.Steps") in `root` to `value` (see `commandLineValue`),
/// creating objects on the way; changes `root` in place and returns it (a new object when `root` is null).
let setPath (root: JsonNode) (path: string) (value: string) : Result<JsonNode, string> =
    let keys = if String.IsNullOrWhiteSpace path then [||] else path.Split('.')
    if keys.Length = 0 || keys |> Array.exists String.IsNullOrWhiteSpace then
        Error(sprintf "expected a path like section.Field, got '%s'" path)
    else
        let root = if isNull root then JsonObject() :> JsonNode else root
        match root with
        | :? JsonObject as o ->
            let rec go (o: JsonObject) (i: int) =
                if i = keys.Length - 1 then
                    o[keys[i]] <- commandLineValue value
                    Ok()
                else
                    match tryProperty o keys[i] with
                    | Some(:? JsonObject as child) -> go child (i + 1)
                    | Some null | None ->
                        let child = JsonObject()
                        o[keys[i]] <- child
                        go child (i + 1)
                    | Some other ->
                        Error(sprintf "cannot set %s: %s is %s, not an object" path (String.concat "." keys[.. i]) (kind other))
            go o 0 |> Result.map (fun () -> root)
        | other -> Error(sprintf "cannot set %s: the config is %s, not an object" path (kind other))

/// Applies `KEY=VALUE` assignments in order (see `setPath`) to a copy of `root`; reports every malformed one.
let applyAssignments (root: JsonNode) (assignments: string list) : Result<JsonNode, string list> =
    let errors = ResizeArray()
    let mutable node = if isNull root then null else root.DeepClone()
    for a in assignments do
        match a.IndexOf '=' with
        | i when i > 0 ->
            match setPath node (a.Substring(0, i).Trim()) (a.Substring(i + 1)) with
            | Ok n -> node <- n
            | Error e -> errors.Add e
        | _ -> errors.Add(sprintf "expected KEY=VALUE (e.g. train.Steps=500), got '%s'" a)
    if errors.Count = 0 then Ok node else Error(List.ofSeq errors)
