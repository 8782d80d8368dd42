/// Web text for (continued) language-model pretraining: JSON Lines with one document per line in a string
/// field (`text` in C4's release, Raffel et al. 2020; `url` and `timestamp` beside it are ignored). A file or a
/// folder of `.jsonl` files. Documents empty after trimming, or whose field is null, are skipped and counted;
/// a line that is not a JSON object, lacks the field, or holds a non-string there raises `DataException`
/// naming the file and line.
module Moe.WebText

open System
open System.IO
open System.Text.Json
open Moe.TextTools

/// Which field holds the text and how much to read.
type WebTextConfig =
    { /// The JSON field of each line that holds the document (`text` in C4).
      TextField: string
      /// Stop after this many documents kept (None: all).
      MaxDocuments: int option }

module WebTextConfig =
    /// C4's layout, every document.
    let defaults = { TextField = "text"; MaxDocuments = None }

/// What `load` read, kept and skipped.
type WebTextReport =
    { Files: string list
      /// Non-blank lines read (documents offered).
      Read: int
      /// Documents returned.
      Kept: int
      /// Lines whose text was empty or only white space.
      SkippedEmpty: int
      /// Lines whose text field was JSON null.
      SkippedNull: int
      /// Blank lines (ignored, not documents).
      BlankLines: int }

/// The documents and the report.
type WebTextSet =
    { Documents: string[]
      Report: WebTextReport }

/// The `.jsonl` files of a folder (sorted by name), or the file itself.
let private filesOf (path: string) : string list =
    if File.Exists path then [ path ]
    elif Directory.Exists path then
        let files =
            Directory.GetFiles path
            |> Array.filter (fun f -> f.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase) || f.EndsWith(".json", StringComparison.OrdinalIgnoreCase))
            |> Array.sort
            |> List.ofArray
        if files.IsEmpty then fail path None "expected a JSON Lines web-text file or a folder holding .jsonl files; the folder has none"
        files
    else fail path None "web-text file or folder not found"

/// Reads the documents of `path` (a JSON Lines file or a folder of them). Fails on a malformed line, a line
/// that is not an object, a missing field or a non-string field, naming the file and line; fails when no
/// document is left.
let load (cfg: WebTextConfig) (path: string) : WebTextSet =
    if String.IsNullOrEmpty cfg.TextField then invalidArg "cfg" "expected a text field name (C4: text), got an empty one"
    match cfg.MaxDocuments with
    | Some n when n < 1 -> invalidArg "cfg" (sprintf "expected MaxDocuments >= 1, got %d" n)
    | _ -> ()
    let files = filesOf path
    let docs = Collections.Generic.List<string>()
    let mutable read, empty, nulls, blank = 0, 0, 0, 0
    let full () = match cfg.MaxDocuments with Some n -> docs.Count >= n | None -> false
    for file in files do
        if not (full ()) then
            use lines = (readLines file).GetEnumerator()
            while not (full ()) && lines.MoveNext() do
                let lineNo, line = lines.Current
                if String.IsNullOrWhiteSpace line then blank <- blank + 1
                else
                    read <- read + 1
                    let text =
                        try
                            use doc = JsonDocument.Parse line
                            let root = doc.RootElement
                            if root.ValueKind <> JsonValueKind.Object then
                                fail file (Some lineNo) (sprintf "expected a JSON object with a \"%s\" field, got a JSON %O" cfg.TextField root.ValueKind)
                            match root.TryGetProperty cfg.TextField with
                            | true, v when v.ValueKind = JsonValueKind.String -> v.GetString()
                            | true, v when v.ValueKind = JsonValueKind.Null -> null
                            | true, v -> fail file (Some lineNo) (sprintf "expected \"%s\" to be a string, got a JSON %O" cfg.TextField v.ValueKind)
                            | _ ->
                                let fields = root.EnumerateObject() |> Seq.map (fun p -> p.Name) |> String.concat ", "
                                fail file (Some lineNo) (sprintf "expected a field \"%s\" (fields: %s)" cfg.TextField fields)
                        with :? JsonException as e ->
                            fail file (Some lineNo) (sprintf "malformed JSON line (%s)" (e.Message.Split('.')[0]))
                    if isNull text then nulls <- nulls + 1
                    elif String.IsNullOrWhiteSpace text then empty <- empty + 1
                    else docs.Add(text.Trim())
    if docs.Count = 0 then
        fail path None (sprintf "no web-text documents: %d lines read, %d empty, %d null" read empty nulls)
    { Documents = docs.ToArray()
      Report = { Files = files; Read = read; Kept = docs.Count; SkippedEmpty = empty; SkippedNull = nulls; BlankLines = blank } }

/// One line for a run log: what was read, kept and skipped.
let describe (r: WebTextReport) : string =
    sprintf "%s: %d documents read, %d kept, %d skipped as empty, %d skipped as null%s"
        (String.Join(", ", r.Files)) r.Read r.Kept r.SkippedEmpty r.SkippedNull
        (if r.BlankLines > 0 then sprintf ", %d blank lines ignored" r.BlankLines else "")
