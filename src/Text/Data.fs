/// Summarization examples from disk: one loader per published layout (Hugging Face XSum parquet, JSON
/// Lines, CSV such as CNN/DailyMail, SAMSum JSON, the original XSum release, aligned line files), a
/// cleaning stage every loader shares, and a load report of everything skipped, changed or truncated
/// (`DataInspection` turns it into counts, lengths and problems).
///
/// Bad input is never turned into a silently different dataset: a missing file or column, a malformed
/// line or invalid UTF-8 raises `DataException` naming the file and line; empty documents or summaries are
/// skipped and counted, or fail, by `DataConfig.OnEmpty`; long documents are truncated and counted.
module Moe.Data

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json
open System.Text.Unicode
open Moe.TextTools

/// One summarization example. `Label` is a topic or domain where the source has one (the synthetic corpus
/// keeps its topic here, so expert specialisation by topic can be measured).
type Example =
    { Id: string
      Document: string
      Summary: string
      Label: string option }

// ---------------------------------------------------------------- formats and configuration

/// The on-disk layouts the loaders read.
type Format =
    /// Hugging Face XSum parquet: string columns `document`, `summary`, `id`.
    | Parquet
    /// One JSON object per line: `document`, `summary`, `id` (and `label` when present).
    | JsonLines
    /// CSV with a header row; CNN/DailyMail's `id,article,highlights` by default.
    | Csv
    /// SAMSum: one JSON array of `{"id", "summary", "dialogue"}`.
    | SamsumJson
    /// The original XSum release: `bbc-summary-data/<id>.summary` files with `[SN]...[SN]` sections and the
    /// split file `{"train": [...], "validation": [...], "test": [...]}`.
    | XsumRaw
    /// Aligned line files: line i of the documents file, the references file and an optional ids file
    /// form example i (`documents.txt`/`references.txt`/`ids.txt`, or `X.source`/`X.target`).
    | AlignedLines

module Format =
    /// The names `--format` accepts.
    let names = "parquet|jsonl|csv|samsum|xsum-raw|lines"

    let name (f: Format) : string =
        match f with
        | Parquet -> "parquet"
        | JsonLines -> "jsonl"
        | Csv -> "csv"
        | SamsumJson -> "samsum"
        | XsumRaw -> "xsum-raw"
        | AlignedLines -> "lines"

    /// Parses a `--format` value.
    let parse (text: string) : Result<Format, string> =
        match (if isNull text then "" else text.Trim().ToLowerInvariant()) with
        | "parquet" -> Ok Parquet
        | "jsonl" | "jsonlines" | "ndjson" -> Ok JsonLines
        | "csv" -> Ok Csv
        | "samsum" | "json" -> Ok SamsumJson
        | "xsum-raw" | "xsum" | "bbc" -> Ok XsumRaw
        | "lines" | "aligned" | "txt" -> Ok AlignedLines
        | other -> Error(sprintf "expected a format %s, got \"%s\"" names other)

    /// Default (id, document, summary) column names.
    let defaultColumns (f: Format) : string * string * string =
        match f with
        | Csv -> "id", "article", "highlights"
        | SamsumJson -> "id", "dialogue", "summary"
        | Parquet | JsonLines | XsumRaw | AlignedLines -> "id", "document", "summary"

/// What to do with an example whose document or summary is empty (after trimming whitespace).
type EmptyPolicy =
    /// Leave it out and count it in the report.
    | SkipEmpty
    /// Raise a `DataException` naming where it is.
    | FailOnEmpty

/// Loader settings. Column fields left `None` take the format's defaults (`Format.defaultColumns`).
type DataConfig =
    { /// None: chosen from the path (extension, or the files a directory holds).
      Format: Format option
      /// None: the format's id column when present, else ids are row numbers (noted in the report).
      /// Some c: column c must exist.
      IdColumn: string option
      DocumentColumn: string option
      SummaryColumn: string option
      /// None: `label` when present. Some c: column c must exist.
      LabelColumn: string option
      OnEmpty: EmptyPolicy
      /// Documents longer than this (in UTF-16 chars) are cut at a word boundary and counted. It bounds
      /// tokenization cost; 20k chars is ~4k words, beyond any source length the models take.
      MaxDocumentChars: int
      /// Repair UTF-8 text that was decoded as Windows-1252 (`Â£` for `£`, `â€™` for `’`), counted.
      RepairMojibake: bool
      /// Summaries written `<t> s1 </t> <t> s2 </t>` (REALSumm, some CNN/DM dumps) become `s1\ns2`.
      StripSentenceTags: bool
      /// XSum release: which split of the split file (`train`, `validation`, `test`); None reads every
      /// `.summary` file in the folder.
      Split: string option
      /// XSum release: the split JSON; None looks for `XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json` beside the data.
      SplitFile: string option
      /// XSum release: the folder of `.summary` files; None looks for `bbc-summary-data` beside the split file.
      SummaryDir: string option
      /// Aligned lines: the references file when the path is a documents file.
      ReferencesFile: string option
      /// Aligned lines: the ids file; None uses `ids.txt` beside the documents when present.
      IdsFile: string option
      /// XSum release: an id the split lists without a `.summary` file is skipped and counted instead of
      /// failing.
      AllowMissingFiles: bool }

module DataConfig =
    /// Formats from the path, the formats' column names, empty examples skipped and counted.
    let defaults =
        { Format = None
          IdColumn = None
          DocumentColumn = None
          SummaryColumn = None
          LabelColumn = None
          OnEmpty = SkipEmpty
          MaxDocumentChars = 20_000
          RepairMojibake = true
          StripSentenceTags = true
          Split = None
          SplitFile = None
          SummaryDir = None
          ReferencesFile = None
          IdsFile = None
          AllowMissingFiles = false }

    /// The XSum split names, with the aliases users type.
    let splitName (s: string) : string option =
        match s.Trim().ToLowerInvariant() with
        | "train" -> Some "train"
        | "validation" | "valid" | "val" | "dev" -> Some "validation"
        | "test" -> Some "test"
        | _ -> None

    /// Every problem with `cfg`, not only the first.
    let validate (cfg: DataConfig) : string list =
        let blank (name: string) (v: string option) =
            match v with
            | Some c when String.IsNullOrWhiteSpace c -> [ sprintf "%s must not be blank" name ]
            | _ -> []
        [ if cfg.MaxDocumentChars < 1 then sprintf "MaxDocumentChars must be >= 1, got %d" cfg.MaxDocumentChars
          yield! blank "IdColumn" cfg.IdColumn
          yield! blank "DocumentColumn" cfg.DocumentColumn
          yield! blank "SummaryColumn" cfg.SummaryColumn
          yield! blank "LabelColumn" cfg.LabelColumn
          match cfg.DocumentColumn, cfg.SummaryColumn with
          | Some d, Some s when d = s -> sprintf "DocumentColumn and SummaryColumn must differ, both are \"%s\"" d
          | _ -> ()
          match cfg.Split with
          | Some s when (splitName s).IsNone -> sprintf "Split must be train|validation|test, got \"%s\"" s
          | _ -> ()
          match cfg.SplitFile with
          | Some f when not (File.Exists f) -> sprintf "SplitFile not found: %s" f
          | _ -> ()
          match cfg.SummaryDir with
          | Some d when not (Directory.Exists d) -> sprintf "SummaryDir not found: %s" d
          | _ -> ()
          match cfg.ReferencesFile with
          | Some f when not (File.Exists f) -> sprintf "ReferencesFile not found: %s" f
          | _ -> ()
          match cfg.IdsFile with
          | Some f when not (File.Exists f) -> sprintf "IdsFile not found: %s" f
          | _ -> () ]

// ---------------------------------------------------------------- raw records

/// A record as a loader found it, before cleaning. Document or summary may be null (a null cell).
type private Raw =
    { File: string
      Line: int64 option
      Id: string
      Document: string
      Summary: string
      Label: string option }

/// Columns after defaults are applied.
type private Columns =
    { Id: string
      IdRequired: bool
      Document: string
      Summary: string
      Label: string
      LabelRequired: bool }

let private columnsFor (cfg: DataConfig) (format: Format) =
    let i, d, s = Format.defaultColumns format
    { Id = defaultArg cfg.IdColumn i
      IdRequired = cfg.IdColumn.IsSome
      Document = defaultArg cfg.DocumentColumn d
      Summary = defaultArg cfg.SummaryColumn s
      Label = defaultArg cfg.LabelColumn "label"
      LabelRequired = cfg.LabelColumn.IsSome }

/// Where notes for the report go while a loader runs.
type private Notes = HashSet<string>

let private columnHint (name: string) (flag: string) (have: string seq) =
    sprintf "expected a column \"%s\" (columns: %s); choose another with %s" name (String.Join(", ", have)) flag

/// Resolves column indices against a header, failing on a missing required column.
let private resolveColumns (file: string) (cols: Columns) (header: string[]) (notes: Notes) =
    let find (name: string) = Array.IndexOf(header, name)
    let need (name: string) (flag: string) =
        let i = find name
        if i < 0 then fail file None (columnHint name flag header)
        i
    let doc = need cols.Document "--document-column"
    let sum = need cols.Summary "--summary-column"
    let id =
        let i = find cols.Id
        if i < 0 && cols.IdRequired then fail file None (columnHint cols.Id "--id-column" header)
        if i < 0 then notes.Add(sprintf "no id column \"%s\" in %s; ids are row numbers" cols.Id file) |> ignore
        i
    let label =
        let i = find cols.Label
        if i < 0 && cols.LabelRequired then fail file None (columnHint cols.Label "--label-column" header)
        i
    id, doc, sum, label

let private jsonString (file: string) (line: int64) (el: JsonElement) (name: string) : string =
    match el.ValueKind with
    | JsonValueKind.String -> el.GetString()
    | JsonValueKind.Null -> null
    | JsonValueKind.Number -> el.GetRawText()
    | other -> fail file (Some line) (sprintf "expected \"%s\" to be a string, got a JSON %O" name other)

/// Reads the configured fields of one JSON object found at `line` (a line, or an item number for arrays).
let private fromJsonObject (file: string) (line: int64) (cols: Columns) (el: JsonElement) : Raw =
    if el.ValueKind <> JsonValueKind.Object then
        fail file (Some line) (sprintf "expected a JSON object, got a JSON %O" el.ValueKind)
    let fields () = el.EnumerateObject() |> Seq.map (fun p -> p.Name) |> String.concat ", "
    let field (name: string) (required: bool) (flag: string) =
        match el.TryGetProperty name with
        | true, v -> Some(jsonString file line v name)
        | _ when required -> fail file (Some line) (sprintf "expected a field \"%s\" (fields: %s); choose another with %s" name (fields ()) flag)
        | _ -> None
    let doc = field cols.Document true "--document-column"
    let sum = field cols.Summary true "--summary-column"
    let id = field cols.Id cols.IdRequired "--id-column"
    let label = field cols.Label cols.LabelRequired "--label-column"
    { File = file; Line = Some line
      Id = (match id with Some i when not (isNull i) -> i | _ -> string line)
      Document = doc.Value; Summary = sum.Value
      Label = label |> Option.bind Option.ofObj }

let private readJsonLines (path: string) (cols: Columns) (notes: Notes) : seq<Raw> =
    seq {
        let mutable warnedId = false
        for lineNo, line in TextTools.readLines path do
            if not (String.IsNullOrWhiteSpace line) then
                let raw =
                    try
                        use doc = JsonDocument.Parse line
                        if not warnedId && not cols.IdRequired && doc.RootElement.ValueKind = JsonValueKind.Object
                           && not (fst (doc.RootElement.TryGetProperty cols.Id)) then
                            warnedId <- true
                            notes.Add(sprintf "no \"%s\" field in %s line %d; ids are line numbers where it is missing" cols.Id path lineNo) |> ignore
                        fromJsonObject path lineNo cols doc.RootElement
                    with :? JsonException as e ->
                        let at = if e.BytePositionInLine.HasValue then sprintf " at byte %d" (e.BytePositionInLine.Value + 1L) else ""
                        fail path (Some lineNo) (sprintf "malformed JSON line%s (%s)" at (e.Message.Split('.')[0]))
                yield raw
            else notes.Add(sprintf "blank lines in %s are ignored (first at line %d)" path lineNo) |> ignore
    }

let private readSamsum (path: string) (cols: Columns) (notes: Notes) : seq<Raw> =
    seq {
        TextTools.checkUtf8 path
        use doc =
            try JsonDocument.Parse(File.ReadAllBytes path)
            with :? JsonException as e ->
                let line = if e.LineNumber.HasValue then Some(e.LineNumber.Value + 1L) else None
                fail path line (sprintf "malformed JSON (%s)" (e.Message.Split('.')[0]))
        let root = doc.RootElement
        if root.ValueKind <> JsonValueKind.Array then
            fail path None (sprintf "expected a JSON array of {\"%s\", \"%s\", \"%s\"} objects (SAMSum), got a JSON %O" cols.Id cols.Document cols.Summary root.ValueKind)
        let mutable item = 0L
        for el in root.EnumerateArray() do
            item <- item + 1L
            if item = 1L && el.ValueKind = JsonValueKind.Object && not cols.IdRequired && not (fst (el.TryGetProperty cols.Id)) then
                notes.Add(sprintf "no \"%s\" field in %s; ids are item numbers" cols.Id path) |> ignore
            // Items have no line numbers in a parsed document; the item index locates them.
            let raw =
                try fromJsonObject path item cols el
                with :? DataException as e -> fail path None (e.Message.Replace(sprintf "%s:%d: " path item, sprintf "item %d: " item))
            yield raw
    }

let private readCsv (path: string) (cols: Columns) (notes: Notes) : seq<Raw> =
    seq {
        if not (File.Exists path) then fail path None "file not found"
        let options =
            CsvHelper.CsvReaderOptions(
                HasHeader = true,
                TrackLineNumbers = true,
                MalformedData = CsvHelper.CsvMalformedDataHandling.Throw,
                FieldCountMismatch = CsvHelper.CsvFieldCountHandling.Throw)
        use csv = CsvHelper.CsvReader.FromFile(path, options, FileOptions.SequentialScan)
        let guard (f: unit -> 'a) =
            try f ()
            with :? CsvHelper.CsvFormatException as e -> fail path (Some csv.LineNumber) (sprintf "malformed CSV (%s)" e.Message)
        guard (fun () -> csv.ReadHeader())
        let header = csv.Headers |> Seq.toArray
        if header.Length = 0 then fail path None "expected a header row, got an empty file"
        let idI, docI, sumI, labelI = resolveColumns path cols header notes
        let field (line: int64) (i: int) =
            let span = csv.GetSpan i
            if not (Utf8.IsValid span) then
                let mutable read = 0
                let mutable written = 0
                let chars = Array.zeroCreate<char> span.Length
                Utf8.ToUtf16(span, Span<char>(chars), &read, &written, false, true) |> ignore
                fail path (Some line) (sprintf "invalid UTF-8 in column \"%s\" at byte %d of the field; expected UTF-8 text" header[i] (read + 1))
            csv.GetString i
        let mutable row = 0L
        while guard (fun () -> csv.Read()) do
            row <- row + 1L
            let line = csv.LineNumber
            yield
                { File = path; Line = Some line
                  Id = (if idI >= 0 then field line idI else string row)
                  Document = field line docI
                  Summary = field line sumI
                  Label = (if labelI >= 0 then Some(field line labelI) else None) }
    }

let private runTask (t: Threading.Tasks.Task<'a>) = t.GetAwaiter().GetResult()

let private readParquet (path: string) (cols: Columns) (notes: Notes) : seq<Raw> =
    seq {
        if not (File.Exists path) then fail path None "file not found"
        let reader =
            try Parquet.ParquetReader.CreateAsync(path, null, Threading.CancellationToken.None) |> runTask
            with e -> fail path None (sprintf "expected a parquet file, could not read it (%s)" e.Message)
        try
            let fields = reader.Schema.GetDataFields()
            let names = fields |> Array.map (fun f -> f.Name)
            let idI, docI, sumI, labelI = resolveColumns path cols names notes
            for i in [ idI; docI; sumI; labelI ] do
                if i >= 0 && fields[i].ClrType <> typeof<string> && fields[i].ClrType <> typeof<ReadOnlyMemory<char>> then
                    fail path None (sprintf "expected column \"%s\" to hold strings, got %s" names[i] fields[i].ClrType.Name)
            let mutable rowBase = 0L
            for g in 0 .. reader.RowGroupCount - 1 do
                use group = reader.OpenRowGroupReader g
                let n = int group.RowCount
                let column (i: int) =
                    if i < 0 then Array.zeroCreate<string> n
                    else
                        let values = Array.zeroCreate<string> n
                        group.ReadAsync(fields[i], Memory<string>(values), Nullable(), Threading.CancellationToken.None).AsTask()
                        |> fun t -> t.GetAwaiter().GetResult()
                        values
                let ids, docs, sums, labels = column idI, column docI, column sumI, column labelI
                for r in 0 .. n - 1 do
                    let row = rowBase + int64 r + 1L
                    yield
                        { File = path; Line = Some row
                          Id = (if idI >= 0 && not (isNull ids[r]) then ids[r] else string row)
                          Document = docs[r]; Summary = sums[r]
                          Label = (if labelI >= 0 then Option.ofObj labels[r] else None) }
                rowBase <- rowBase + int64 n
        finally
            reader.DisposeAsync().AsTask().GetAwaiter().GetResult()
    }

/// The split file name of the XSum release.
[<Literal>]
let XsumSplitFileName = "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json"

/// The folder of `.summary` files in the XSum release.
[<Literal>]
let XsumSummaryDirName = "bbc-summary-data"

/// Reads the ids of one split from the XSum split file.
let readXsumSplit (path: string) (split: string) : string[] =
    TextTools.checkUtf8 path
    use doc =
        try JsonDocument.Parse(File.ReadAllBytes path)
        with :? JsonException as e -> fail path None (sprintf "malformed JSON (%s)" (e.Message.Split('.')[0]))
    let root = doc.RootElement
    if root.ValueKind <> JsonValueKind.Object then
        fail path None "expected the XSum split file {\"train\": [...], \"validation\": [...], \"test\": [...]}"
    match root.TryGetProperty split with
    | true, ids when ids.ValueKind = JsonValueKind.Array ->
        [| for e in ids.EnumerateArray() ->
            if e.ValueKind = JsonValueKind.String then e.GetString() else e.GetRawText() |]
    | _ ->
        let have = root.EnumerateObject() |> Seq.map (fun p -> p.Name) |> String.concat ", "
        fail path None (sprintf "expected a \"%s\" array of ids (keys: %s)" split have)

/// Parses one `bbc-summary-data/<id>.summary` file: FIRST-SENTENCE is the summary, RESTBODY the document.
let private readXsumFile (path: string) : Raw =
    let sections = Dictionary<string, ResizeArray<string>>()
    let mutable current : ResizeArray<string> = null
    for lineNo, line in TextTools.readLines path do
        let t = line.Trim()
        if t.Length > 8 && t.StartsWith "[SN]" && t.EndsWith "[SN]" then
            let name = t.Substring(4, t.Length - 8)
            if sections.ContainsKey name then fail path (Some lineNo) (sprintf "section [SN]%s[SN] appears twice" name)
            current <- ResizeArray()
            sections[name] <- current
        elif isNull current then
            if t <> "" then fail path (Some lineNo) "expected a [SN]URL[SN] or other [SN]...[SN] section marker first"
        else current.Add line
    let section (name: string) =
        match sections.TryGetValue name with
        | true, lines -> String.Join("\n", lines).Trim()
        | _ ->
            fail path None (sprintf "expected a [SN]%s[SN] section (found: %s)" name
                                (if sections.Count = 0 then "none" else sections.Keys |> Seq.map (sprintf "[SN]%s[SN]") |> String.concat ", "))
    let summary = section "FIRST-SENTENCE"
    let document = section "RESTBODY"
    { File = path; Line = None; Id = Path.GetFileNameWithoutExtension path
      Document = document; Summary = summary; Label = None }

let private readXsumRaw (path: string) (cfg: DataConfig) (notes: Notes) (missing: int ref) : seq<Raw> =
    seq {
        let isDir = Directory.Exists path
        if not isDir && not (File.Exists path) then fail path None "file or folder not found"
        let summaryDir =
            match cfg.SummaryDir with
            | Some d -> d
            | None ->
                if isDir && Path.GetFileName(Path.TrimEndingDirectorySeparator path) = XsumSummaryDirName then path
                elif isDir then Path.Combine(path, XsumSummaryDirName)
                else Path.Combine(Path.GetDirectoryName(Path.GetFullPath path), XsumSummaryDirName)
        if not isDir && path.EndsWith(".summary", StringComparison.OrdinalIgnoreCase) then
            yield readXsumFile path
        else
            if not (Directory.Exists summaryDir) then
                fail path None (sprintf "expected the folder of .summary files at %s (set SummaryDir / --summary-dir)" summaryDir)
            let splitFile =
                match cfg.SplitFile with
                | Some f -> Some f
                | None when not isDir -> Some path
                | None ->
                    let beside = [ Path.Combine(path, XsumSplitFileName); Path.Combine(Path.GetDirectoryName(Path.GetFullPath summaryDir), XsumSplitFileName) ]
                    beside |> List.tryFind File.Exists
            match cfg.Split with
            | None ->
                if not isDir then fail path None "expected a split (train|validation|test) with a split file; use --split"
                let files = Directory.GetFiles(summaryDir, "*.summary") |> Array.sort
                if files.Length = 0 then fail summaryDir None "expected .summary files, found none"
                notes.Add(sprintf "no split chosen: read all %d .summary files in %s" files.Length summaryDir) |> ignore
                for f in files do yield readXsumFile f
            | Some s ->
                let split = (DataConfig.splitName s) |> Option.defaultWith (fun () -> fail path None (sprintf "expected a split train|validation|test, got \"%s\"" s))
                let file =
                    splitFile |> Option.defaultWith (fun () ->
                        fail path None (sprintf "expected the split file %s beside the data (or --split-file)" XsumSplitFileName))
                let ids = readXsumSplit file split
                let absent = ids |> Array.filter (fun id -> not (File.Exists(Path.Combine(summaryDir, id + ".summary"))))
                if absent.Length > 0 then
                    let first = absent |> Array.truncate 5 |> String.concat ", "
                    let msg = sprintf "%d of %d ids in split \"%s\" have no .summary file in %s (first: %s)" absent.Length ids.Length split summaryDir first
                    if cfg.AllowMissingFiles then
                        missing.Value <- absent.Length
                        notes.Add(msg + "; skipped") |> ignore
                    else fail file None (msg + "; pass --allow-missing to skip them")
                let absentSet = HashSet<string>(absent)
                for id in ids do
                    if not (absentSet.Contains id) then
                        let r = readXsumFile (Path.Combine(summaryDir, id + ".summary"))
                        yield { r with Label = None }
    }

/// The documents, references and ids files an aligned-lines path names.
let private alignedFiles (path: string) (cfg: DataConfig) =
    if Directory.Exists path then
        let docs = Path.Combine(path, "documents.txt")
        let refs = cfg.ReferencesFile |> Option.defaultValue (Path.Combine(path, "references.txt"))
        let ids = cfg.IdsFile |> Option.orElse (let p = Path.Combine(path, "ids.txt") in if File.Exists p then Some p else None)
        docs, refs, ids
    else
        let refs =
            match cfg.ReferencesFile with
            | Some r -> r
            | None when path.EndsWith(".source", StringComparison.OrdinalIgnoreCase) -> Path.ChangeExtension(path, ".target")
            | None -> fail path None "expected a references file for these documents (--references FILE), or a folder with documents.txt and references.txt, or X.source beside X.target"
        path, refs, cfg.IdsFile

let private readAligned (path: string) (cfg: DataConfig) (notes: Notes) : seq<Raw> =
    seq {
        let docs, refs, ids = alignedFiles path cfg
        for f in [ Some docs; Some refs; ids ] |> List.choose id do
            if not (File.Exists f) then fail f None "file not found"
        if ids.IsNone then notes.Add(sprintf "no ids file beside %s; ids are line numbers" docs) |> ignore
        use d = (TextTools.readLines docs).GetEnumerator()
        use r = (TextTools.readLines refs).GetEnumerator()
        use i = (match ids with Some f -> TextTools.readLines f | None -> Seq.empty).GetEnumerator()
        let mutable go = true
        while go do
            let hasD, hasR = d.MoveNext(), r.MoveNext()
            let hasI = ids.IsSome && i.MoveNext()
            match hasD, hasR with
            | false, false ->
                if hasI then fail ids.Value (Some(fst i.Current)) (sprintf "more ids than documents (%s ends at line %d)" docs (fst i.Current - 1L))
                go <- false
            | true, false -> fail refs None (sprintf "expected as many lines as %s; references end before document line %d" docs (fst d.Current))
            | false, true -> fail docs None (sprintf "expected as many lines as %s; documents end before reference line %d" refs (fst r.Current))
            | true, true ->
                let lineNo, doc = d.Current
                if ids.IsSome && not hasI then fail ids.Value None (sprintf "expected an id for every line of %s; ids end before line %d" docs lineNo)
                yield
                    { File = docs; Line = Some lineNo
                      Id = (if hasI then (snd i.Current).Trim() else string lineNo)
                      Document = doc; Summary = snd r.Current; Label = None }
    }

/// The train, validation and test files of a split folder: files named train*, validation*/valid*/val*/dev*
/// and test* (the word, then `.`, `-` or `_`: Hugging Face's `train-00000-of-00001.parquet`, `train.jsonl`);
/// None when `path` is not a folder holding all three.
let splitFolder (path: string) : (string * string * string) option =
    if not (Directory.Exists path) then None
    else
        let files = Directory.GetFiles path |> Array.sort
        let named (prefixes: string list) =
            files |> Array.tryFind (fun f ->
                let n = (Path.GetFileName f).ToLowerInvariant()
                prefixes |> List.exists (fun p -> n.StartsWith(p + ".") || n.StartsWith(p + "-") || n.StartsWith(p + "_")))
        match named [ "train" ], named [ "validation"; "valid"; "val"; "dev" ], named [ "test" ] with
        | Some tr, Some va, Some te -> Some(tr, va, te)
        | _ -> None

/// The folder layouts the loaders read, for messages about a folder they cannot.
let folderLayouts =
    sprintf "train*/validation*/test* files (a split folder, read split by split), %s/ (an XSum release) or documents.txt + references.txt (aligned lines)"
        XsumSummaryDirName

/// The format a path implies: by extension for files, by the files a folder holds.
let detectFormat (path: string) : Format =
    if Directory.Exists path then
        if Path.GetFileName(Path.TrimEndingDirectorySeparator path) = XsumSummaryDirName
           || Directory.Exists(Path.Combine(path, XsumSummaryDirName)) then XsumRaw
        elif File.Exists(Path.Combine(path, "documents.txt")) && File.Exists(Path.Combine(path, "references.txt")) then AlignedLines
        else
            fail path None (sprintf "cannot tell the format of this folder: expected %s; or pass --format %s"
                                folderLayouts Format.names)
    elif not (File.Exists path) then fail path None "file or folder not found"
    else
        match Path.GetExtension(path).ToLowerInvariant() with
        | ".parquet" -> Parquet
        | ".jsonl" | ".jsonlines" | ".ndjson" -> JsonLines
        | ".csv" -> Csv
        | ".source" -> AlignedLines
        | ".summary" -> XsumRaw
        | ".json" ->
            // A JSON array is SAMSum's layout; an object with split keys is the XSum split file.
            use stream = File.OpenRead path
            let mutable b = stream.ReadByte()
            while b = int ' ' || b = int '\n' || b = int '\r' || b = int '\t' || b = 0xEF || b = 0xBB || b = 0xBF do
                b <- stream.ReadByte()
            if b = int '[' then SamsumJson
            elif b = int '{' then
                stream.Close()
                let head = File.ReadAllText path
                if head.Contains "\"train\"" && head.Contains "\"test\"" then XsumRaw
                else fail path None (sprintf "cannot tell the format: a JSON object that is not the XSum split file; for one object per line use .jsonl or --format jsonl")
            else fail path None "expected a JSON array (SAMSum) or the XSum split object"
        | ext ->
            fail path None (sprintf "cannot tell the format from the extension \"%s\"; pass --format %s" ext Format.names)

// ---------------------------------------------------------------- cleaning and reports

/// What loading did: counts and notes. Counts are of examples.
type LoadReport =
    { Source: string
      /// None for examples generated in memory (the synthetic corpus).
      Format: Format option
      /// Records the loader found.
      Read: int
      /// Examples returned.
      Kept: int
      SkippedEmptyDocument: int
      SkippedEmptySummary: int
      /// XSum release ids without a `.summary` file (with `AllowMissingFiles`).
      SkippedMissingFile: int
      TruncatedDocuments: int
      MojibakeRepaired: int
      /// Examples holding U+FFFD: text lost before it reached this file (e.g. a lossy conversion).
      ReplacementCharacters: int
      SentenceTagsStripped: int
      DuplicateIds: int
      /// Everything worth telling a user, one line each.
      Notes: string list }

type private Counts() =
    member val Read = 0 with get, set
    member val Kept = 0 with get, set
    member val EmptyDoc = 0 with get, set
    member val EmptySum = 0 with get, set
    member val Truncated = 0 with get, set
    member val Mojibake = 0 with get, set
    member val Replacement = 0 with get, set
    member val Tags = 0 with get, set
    member val Duplicates = 0 with get, set
    member val FirstDuplicate : string = null with get, set

/// Reads examples lazily from `path`. `Report` describes what has been read so far, so it is complete once
/// `Examples` has been enumerated; each enumeration starts the counts afresh.
type ExampleReader(cfg: DataConfig, path: string) =
    do
        match DataConfig.validate cfg with
        | [] -> ()
        | problems -> invalidArg "cfg" ("invalid data config: " + String.Join("; ", problems))
    let format = match cfg.Format with Some f -> f | None -> detectFormat path
    do
        if Directory.Exists path && format <> XsumRaw && format <> AlignedLines then
            fail path None (sprintf "expected a %s file, but this is a folder; a folder holds %s" (Format.name format) folderLayouts)
    let mutable counts = Counts()
    let mutable notes = Notes()
    let missing = ref 0

    let clean (c: Counts) (seen: HashSet<string>) (r: Raw) : Example option =
        c.Read <- c.Read + 1
        let prep (s: string) = if isNull s then "" else (TextTools.normaliseNewlines s).Trim()
        let mutable doc = prep r.Document
        let mutable sum = prep r.Summary
        if doc.Contains '\uFFFD' || sum.Contains '\uFFFD' then c.Replacement <- c.Replacement + 1
        if cfg.RepairMojibake then
            let d, dc = TextTools.repairMojibake doc
            let s, sc = TextTools.repairMojibake sum
            if dc || sc then c.Mojibake <- c.Mojibake + 1
            doc <- d
            sum <- s
        if cfg.StripSentenceTags then
            match TextTools.stripSentenceTags sum with
            | Some s ->
                sum <- s
                c.Tags <- c.Tags + 1
            | None -> ()
        let where () =
            match r.Line with
            | Some l -> sprintf "%s:%d" r.File l
            | None -> r.File
        if doc = "" || sum = "" then
            match cfg.OnEmpty with
            | FailOnEmpty ->
                fail r.File r.Line (sprintf "empty %s in example \"%s\" (skip such examples with OnEmpty = SkipEmpty / --on-empty skip)"
                                        (if doc = "" then "document" else "summary") r.Id)
            | SkipEmpty ->
                if doc = "" then
                    if c.EmptyDoc = 0 then notes.Add(sprintf "first empty document at %s" (where ())) |> ignore
                    c.EmptyDoc <- c.EmptyDoc + 1
                else
                    if c.EmptySum = 0 then notes.Add(sprintf "first empty summary at %s" (where ())) |> ignore
                    c.EmptySum <- c.EmptySum + 1
                None
        else
            if doc.Length > cfg.MaxDocumentChars then
                doc <- TextTools.truncate cfg.MaxDocumentChars doc
                c.Truncated <- c.Truncated + 1
            let id = r.Id.Trim()
            if not (seen.Add id) then
                if isNull c.FirstDuplicate then c.FirstDuplicate <- sprintf "%s (at %s)" id (where ())
                c.Duplicates <- c.Duplicates + 1
            c.Kept <- c.Kept + 1
            Some { Id = id; Document = doc; Summary = sum; Label = r.Label |> Option.map (fun l -> l.Trim()) }

    member _.Format = format
    member _.Path = path

    /// The examples, read lazily; raises `DataException` on bad input.
    member _.Examples : seq<Example> =
        seq {
            counts <- Counts()
            notes <- Notes()
            missing.Value <- 0
            let c = counts
            let seen = HashSet<string>()
            let cols = columnsFor cfg format
            let raws =
                match format with
                | Parquet -> readParquet path cols notes
                | JsonLines -> readJsonLines path cols notes
                | Csv -> readCsv path cols notes
                | SamsumJson -> readSamsum path cols notes
                | XsumRaw -> readXsumRaw path cfg notes missing
                | AlignedLines -> readAligned path cfg notes
            for r in raws do
                match clean c seen r with
                | Some e -> yield e
                | None -> ()
        }

    /// Counts and notes for what has been read so far.
    member _.Report : LoadReport =
        let c = counts
        let extra =
            [ if c.EmptyDoc > 0 then sprintf "skipped %d examples with an empty document" c.EmptyDoc
              if c.EmptySum > 0 then sprintf "skipped %d examples with an empty summary" c.EmptySum
              if c.Truncated > 0 then sprintf "truncated %d documents to %d chars" c.Truncated cfg.MaxDocumentChars
              if c.Mojibake > 0 then sprintf "repaired mojibake (UTF-8 read as Windows-1252) in %d examples" c.Mojibake
              if c.Replacement > 0 then sprintf "%d examples contain U+FFFD replacement characters (text lost before this file)" c.Replacement
              if c.Tags > 0 then sprintf "stripped <t> sentence tags from %d summaries" c.Tags
              if c.Duplicates > 0 then sprintf "%d duplicate ids (first: %s)" c.Duplicates c.FirstDuplicate ]
        { Source = path; Format = Some format; Read = c.Read; Kept = c.Kept
          SkippedEmptyDocument = c.EmptyDoc; SkippedEmptySummary = c.EmptySum
          SkippedMissingFile = missing.Value
          TruncatedDocuments = c.Truncated; MojibakeRepaired = c.Mojibake
          ReplacementCharacters = c.Replacement; SentenceTagsStripped = c.Tags; DuplicateIds = c.Duplicates
          Notes = (notes |> Seq.sort |> List.ofSeq) @ extra }

/// A loaded dataset and how it was loaded.
type Dataset =
    { Examples: Example[]
      Report: LoadReport }

/// A lazy reader over `path` (see `ExampleReader`); for corpora too large to hold as one array.
let read (cfg: DataConfig) (path: string) : ExampleReader = ExampleReader(cfg, path)

/// Loads every example of `path` into memory.
let load (cfg: DataConfig) (path: string) : Dataset =
    let r = ExampleReader(cfg, path)
    let examples = r.Examples |> Seq.toArray
    { Examples = examples; Report = r.Report }

/// Documents and summaries, in order: the texts a tokenizer vocabulary is trimmed on.
let texts (examples: seq<Example>) : seq<string> =
    examples |> Seq.collect (fun e -> [ e.Document; e.Summary ])

/// Writes examples as JSON Lines (`id`, `document`, `summary`, and `label` when present), the layout
/// `JsonLines` reads back; atomically (a temporary file, then a rename).
let writeJsonLines (path: string) (examples: seq<Example>) : unit =
    let tmp = path + ".tmp"
    do
        use stream = File.Create tmp
        let newline = [| 10uy |]
        for e in examples do
            do
                use w = new Utf8JsonWriter(stream, JsonWriterOptions(Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping))
                w.WriteStartObject()
                w.WriteString("id", e.Id)
                w.WriteString("document", e.Document)
                w.WriteString("summary", e.Summary)
                match e.Label with
                | Some l -> w.WriteString("label", l)
                | None -> ()
                w.WriteEndObject()
            stream.Write(newline, 0, 1)
    File.Move(tmp, path, true)
