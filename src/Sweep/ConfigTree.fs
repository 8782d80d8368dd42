/// Config trees as the sweep handles them: JSON nodes read by field path (keys joined by dots), set and
/// removed by path, shown in messages, and written in a canonical form whose hash names a run.
module Moe.Sweep.ConfigTree

open System
open System.Globalization
open System.Security.Cryptography
open System.Text
open System.Text.Json
open System.Text.Json.Nodes

let internal inv = CultureInfo.InvariantCulture

/// How a node reads in a message: `an object`, `"text"`, `3.5`, `null`.
let internal describeNode (n: JsonNode) : string =
    if isNull n then "null"
    else
        match n.GetValueKind() with
        | JsonValueKind.Object -> "an object"
        | JsonValueKind.Array -> "an array"
        | _ -> n.ToJsonString()

let internal tryProperty (o: JsonObject) (name: string) : JsonNode option =
    let mutable n: JsonNode = null
    if o.TryGetPropertyValue(name, &n) then Some n else None

let internal compact = JsonSerializerOptions(WriteIndented = false)
let internal indented = JsonSerializerOptions(WriteIndented = true)

/// The node as one line of JSON.
let internal oneLine (n: JsonNode) : string = if isNull n then "null" else n.ToJsonString compact

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
let internal setNode (root: JsonObject) (path: string) (value: JsonNode) : unit =
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
let internal parsedString (s: string) : JsonNode = JsonNode.Parse(JsonSerializer.Serialize s)

/// The object that holds the last key of `path` in `root`, and that key; None where a node on the way is
/// missing or not an object.
let private parentOf (root: JsonObject) (path: string) : (JsonObject * string) option =
    let keys = path.Split '.'
    let rec go (o: JsonObject) (i: int) =
        if i = keys.Length - 1 then Some(o, keys[i])
        else
            match tryProperty o keys[i] with
            | Some(:? JsonObject as child) -> go child (i + 1)
            | _ -> None
    go root 0

/// The node at `path` (keys joined by dots) in `root`: None where the path leads nowhere, Some null for a
/// JSON null.
let internal nodeAt (root: JsonObject) (path: string) : JsonNode option =
    parentOf root path |> Option.bind (fun (o, k) -> tryProperty o k)

/// Removes the node at `path` (keys joined by dots) from `root` if it is there.
let internal removeNode (root: JsonObject) (path: string) : unit =
    match parentOf root path with
    | Some(o, k) -> o.Remove k |> ignore
    | None -> ()
