/// Human evaluation: seeded samples of documents, references and several systems' summaries written as a
/// Markdown sheet to read and a CSV sheet to fill with 1-5 ratings, and the aggregation of filled sheets into
/// mean, standard deviation and count per system and criterion.
///
/// Legend: N examples in the inputs, K sampled examples, S systems.
module Moe.HumanEval

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json

/// The rated criteria, in sheet order (the summary-quality dimensions of Kryscinski et al. 2019 and Fabbri et
/// al. 2021, SummEval, with "consistency" named factual consistency).
let criteria = [| "relevance"; "coherence"; "fluency"; "factual_consistency" |]

/// What each criterion asks, shown at the top of the Markdown sheet.
let criterionQuestions =
    [| "relevance", "Does the summary keep the important content of the document and leave out the rest?"
       "coherence", "Is the summary well structured, each sentence following from the one before?"
       "fluency", "Is every sentence grammatical and easy to read?"
       "factual_consistency", "Is every statement in the summary supported by the document (no invented or contradicted facts)?" |]

/// Ratings are whole numbers on a 5-point Likert scale.
let minRating = 1
let maxRating = 5

/// Slots are lettered A, B, ...; one letter per system keeps item ids short.
let maxSystems = 26

/// The system name the reference gets when it is rated alongside the systems.
let referenceSystemName = "reference"

/// Settings for drawing a sheet.
type SheetConfig =
    { /// K, the number of examples to sample.
      Examples: int
      Seed: int
      /// Hide system names in the sheets (a separate key file maps items to systems); otherwise label them.
      Blind: bool
      /// Rate the reference too, shuffled in as one more system named "reference".
      IncludeReference: bool }

/// 20 examples, seed 0, blind, reference not rated.
let defaults = { Examples = 20; Seed = 0; Blind = true; IncludeReference = false }

/// One system's summaries, one per example [N].
type SystemOutputs = { Name: string; Summaries: string[] }

/// One summary to rate.
type SheetItem =
    { /// "<example>-<slot>", e.g. "57-B": what a rater's row is identified by.
      Item: string
      /// 1-based line of the example in the input files.
      Example: int
      /// Slot letter within the example, A for the first summary shown.
      Slot: char
      System: string
      Document: string
      Reference: string
      Summary: string }

/// Every problem with the config and inputs, all at once.
let validate (cfg: SheetConfig) (documents: string[]) (references: string[]) (systems: SystemOutputs[]) : string list =
    let n = documents.Length
    let names = systems |> Array.map _.Name
    let slots = systems.Length + (if cfg.IncludeReference then 1 else 0)
    [ if n = 0 then "expected at least one document, got none"
      if references.Length <> n then sprintf "expected one reference per document, got %d documents and %d references" n references.Length
      if systems.Length = 0 then "expected at least one system (--system NAME=PATH)"
      if slots > maxSystems then sprintf "expected at most %d summaries per example, got %d" maxSystems slots
      for s in systems do
          if String.IsNullOrWhiteSpace s.Name then "expected a non-empty system name"
          if s.Summaries.Length <> n then sprintf "expected system %s to have one summary per document (%d), got %d" s.Name n s.Summaries.Length
      for name in names |> Array.countBy id |> Array.filter (fun (_, c) -> c > 1) |> Array.map fst do
          sprintf "system name %s is given more than once" name
      if cfg.IncludeReference && Array.contains referenceSystemName names then
          sprintf "a system is named %s, which the rated reference uses; rename it or leave out --include-reference" referenceSystemName
      if cfg.Examples < 1 || cfg.Examples > n then sprintf "expected between 1 and %d examples to sample, got %d" n cfg.Examples ]

/// Draws K distinct examples (reported in ascending line order) and, per example, a random order of the systems.
/// The same seed and inputs give the same sheet.
let sample (cfg: SheetConfig) (documents: string[]) (references: string[]) (systems: SystemOutputs[]) : SheetItem[] =
    match validate cfg documents references systems with
    | [] -> ()
    | problems -> invalidArg "cfg" (String.concat "; " problems)
    let rng = Random cfg.Seed
    let shuffle (xs: 'T[]) =
        for i in xs.Length - 1 .. -1 .. 1 do
            let j = rng.Next(i + 1)
            let t = xs[i]
            xs[i] <- xs[j]
            xs[j] <- t
    let lines = Array.init documents.Length id
    shuffle lines
    let picked = lines[.. cfg.Examples - 1] |> Array.sort
    let rated =
        [| yield! systems
           if cfg.IncludeReference then yield { Name = referenceSystemName; Summaries = references } |]
    [| for e in picked do
           let order = Array.copy rated
           shuffle order
           for slot in 0 .. order.Length - 1 do
               let letter = char (int 'A' + slot)
               { Item = sprintf "%d-%c" (e + 1) letter
                 Example = e + 1
                 Slot = letter
                 System = order[slot].Name
                 Document = documents[e]
                 Reference = references[e]
                 Summary = order[slot].Summaries[e] } |]

/// RFC 4180 CSV, written and read here so that read errors can name file and line.
module Csv =
    /// A field quoted when it holds a comma, a quote, a line break or edge white space.
    let quote (field: string) : string =
        let needs =
            field.IndexOfAny([| ','; '"'; '\n'; '\r' |]) >= 0
            || (field.Length > 0 && (Char.IsWhiteSpace field[0] || Char.IsWhiteSpace field[field.Length - 1]))
        if needs then "\"" + field.Replace("\"", "\"\"") + "\"" else field

    /// One row, terminated by "\n".
    let row (fields: string seq) : string = String.Join(",", fields |> Seq.map quote) + "\n"

    /// Rows with the 1-based line each starts on. Blank lines are skipped; an unterminated quote is an error
    /// naming its line.
    let parse (path: string) (text: string) : (int * string[])[] =
        let rows = ResizeArray<int * string[]>()
        let fields = ResizeArray<string>()
        let field = StringBuilder()
        let mutable line = 1
        let mutable rowStart = 1
        let mutable quoted = false
        let mutable quoteLine = 0
        let mutable i = 0
        let endRow () =
            fields.Add(field.ToString())
            field.Clear() |> ignore
            if not (fields.Count = 1 && fields[0] = "") then rows.Add((rowStart, fields.ToArray()))
            fields.Clear()
        while i < text.Length do
            let c = text[i]
            if quoted then
                if c = '"' then
                    if i + 1 < text.Length && text[i + 1] = '"' then
                        field.Append '"' |> ignore
                        i <- i + 1
                    else quoted <- false
                else
                    if c = '\n' then line <- line + 1
                    field.Append c |> ignore
            else
                match c with
                | '"' when field.Length = 0 ->
                    quoted <- true
                    quoteLine <- line
                | ',' ->
                    fields.Add(field.ToString())
                    field.Clear() |> ignore
                | '\r' when i + 1 < text.Length && text[i + 1] = '\n' -> ()
                | '\n' ->
                    endRow ()
                    line <- line + 1
                    rowStart <- line
                | _ -> field.Append c |> ignore
            i <- i + 1
        if quoted then raise (InvalidDataException(sprintf "%s:%d: a quoted field is never closed" path quoteLine))
        if field.Length > 0 || fields.Count > 0 then endRow ()
        rows.ToArray()

/// The CSV sheet raters fill: one row per summary with empty rating columns. Labeled sheets name the system.
let sheetCsv (blind: bool) (items: SheetItem[]) : string =
    let sb = StringBuilder()
    let header =
        [ "item"
          "example"
          if not blind then "system"
          "document"
          "reference"
          "summary"
          yield! criteria ]
    sb.Append(Csv.row header) |> ignore
    for it in items do
        let fields =
            [ it.Item
              string it.Example
              if not blind then it.System
              it.Document
              it.Reference
              it.Summary
              yield! criteria |> Array.map (fun _ -> "") ]
        sb.Append(Csv.row fields) |> ignore
    sb.ToString()

/// The key of a blind sheet: item -> example and system.
let keyCsv (items: SheetItem[]) : string =
    let sb = StringBuilder()
    sb.Append(Csv.row [ "item"; "example"; "system" ]) |> ignore
    for it in items do sb.Append(Csv.row [ it.Item; string it.Example; it.System ]) |> ignore
    sb.ToString()

/// The Markdown sheet raters read: instructions, then per example the document, the reference and each
/// summary under its item id (and system name when labeled), with an empty rating table.
let sheetMarkdown (cfg: SheetConfig) (csvName: string) (items: SheetItem[]) : string =
    let sb = StringBuilder()
    let line (s: string) = sb.AppendLine s |> ignore
    // Quoted blocks keep article text from being read as Markdown headings or lists.
    let block (text: string) = line ("> " + text.Replace("\n", "\n> "))
    line "# Human evaluation"
    line ""
    line (sprintf "%d examples, sampled with seed %d. Rate every summary on each criterion from %d (worst) to %d (best) and write the ratings into `%s`, in the row with the summary's item id." (items |> Array.distinctBy _.Example |> Array.length) cfg.Seed minRating maxRating csvName)
    if cfg.Blind then line "Summaries are shown in a random order per example, without system names."
    line ""
    for name, question in criterionQuestions do line (sprintf "- **%s**: %s" name question)
    for group in items |> Array.groupBy _.Example do
        let e, its = group
        line ""
        line (sprintf "## Example %d" e)
        line ""
        line "### Document"
        line ""
        block its[0].Document
        if not (cfg.IncludeReference) then
            line ""
            line "### Reference"
            line ""
            block its[0].Reference
        for it in its do
            line ""
            line (if cfg.Blind then sprintf "### Summary %s" it.Item else sprintf "### Summary %s (%s)" it.Item it.System)
            line ""
            block it.Summary
            line ""
            line ("| " + String.Join(" | ", criteria) + " |")
            line ("|" + String.Join("|", criteria |> Array.map (fun _ -> "---")) + "|")
            line ("|" + String.Join("|", criteria |> Array.map (fun _ -> "   ")) + "|")
    sb.ToString()

/// The files one sheet is written to.
type SheetFiles = { Markdown: string; Csv: string; Key: string option }

/// Writes human-eval.md, human-eval.csv and (blind sheets) human-eval-key.csv into `dir`.
let writeSheets (cfg: SheetConfig) (dir: string) (items: SheetItem[]) : SheetFiles =
    Directory.CreateDirectory dir |> ignore
    let csvName = "human-eval.csv"
    let files =
        { Markdown = Path.Combine(dir, "human-eval.md")
          Csv = Path.Combine(dir, csvName)
          Key = if cfg.Blind then Some(Path.Combine(dir, "human-eval-key.csv")) else None }
    let utf8 = UTF8Encoding false
    File.WriteAllText(files.Markdown, sheetMarkdown cfg csvName items, utf8)
    File.WriteAllText(files.Csv, sheetCsv cfg.Blind items, utf8)
    files.Key |> Option.iter (fun k -> File.WriteAllText(k, keyCsv items, utf8))
    files

/// One rating read from a filled sheet.
type Rating = { System: string; Criterion: string; Value: int }

/// Mean, sample standard deviation (n - 1 in the denominator; 0 for fewer than two ratings) and count.
type RatingSummary = { System: string; Criterion: string; Mean: float; Std: float; Count: int }

let private readCsv (path: string) =
    if not (File.Exists path) then raise (FileNotFoundException(sprintf "expected a CSV file at %s, but there is none" path, path))
    let text =
        try File.ReadAllText(path, UTF8Encoding(false, true))
        with :? DecoderFallbackException -> raise (InvalidDataException(sprintf "%s: not valid UTF-8; expected a UTF-8 CSV file" path))
    match Csv.parse path text with
    | [||] -> raise (InvalidDataException(sprintf "%s is empty; expected a header row and one row per rated summary" path))
    | rows -> rows

/// Reads a key file (item, example, system) into item -> system.
let readKey (path: string) : IReadOnlyDictionary<string, string> =
    let rows = readCsv path
    let _, header = rows[0]
    let col name = Array.IndexOf(header, name)
    let item, system = col "item", col "system"
    if item < 0 || system < 0 then
        raise (InvalidDataException(sprintf "%s:%d: expected a key header with columns item and system, got %s" path (fst rows[0]) (String.Join(",", header))))
    let key = Dictionary<string, string>()
    let problems = ResizeArray<string>()
    for line, fields in rows[1..] do
        if fields.Length <= max item system then problems.Add(sprintf "%s:%d: expected %d fields, got %d" path line header.Length fields.Length)
        elif key.ContainsKey fields[item] then problems.Add(sprintf "%s:%d: item %s is listed twice" path line fields[item])
        else key[fields[item]] <- fields[system]
    if problems.Count > 0 then raise (InvalidDataException(String.Join("\n", problems)))
    key

/// Every rating in filled sheets. A sheet names its systems in a `system` column or, when blind, through `key`.
/// Empty rating cells are not yet rated and are skipped; anything other than a whole number from 1 to 5 is an
/// error. All problems of all files are raised together, each as "file:line: ...".
let readRatings (key: IReadOnlyDictionary<string, string> option) (sheets: string list) : Rating[] =
    let ratings = ResizeArray<Rating>()
    let problems = ResizeArray<string>()
    for path in sheets do
        let rows = readCsv path
        let headerLine, header = rows[0]
        let col name = Array.IndexOf(header, name)
        let missing = criteria |> Array.filter (fun c -> col c < 0)
        let itemCol, systemCol = col "item", col "system"
        if missing.Length > 0 || itemCol < 0 then
            problems.Add(sprintf "%s:%d: expected columns item and %s, missing %s" path headerLine (String.Join(", ", criteria)) (String.Join(", ", Array.append (if itemCol < 0 then [| "item" |] else [||]) missing)))
        elif systemCol < 0 && key.IsNone then
            problems.Add(sprintf "%s:%d: the sheet has no system column (a blind sheet); give its key file (--key human-eval-key.csv)" path headerLine)
        else
            let seen = Dictionary<string, int>()
            for line, fields in rows[1..] do
                let cell i = if i < fields.Length then fields[i].Trim() else ""
                let item = cell itemCol
                let system =
                    if systemCol >= 0 then Ok(cell systemCol)
                    else
                        match key.Value.TryGetValue item with
                        | true, s -> Ok s
                        | _ -> Error(sprintf "%s:%d: item '%s' is not in the key file" path line item)
                match seen.TryGetValue item with
                | true, first -> problems.Add(sprintf "%s:%d: item '%s' appears again (first at line %d)" path line item first)
                | _ ->
                    seen[item] <- line
                    match system with
                    | Error e -> problems.Add e
                    | Ok system when system = "" -> problems.Add(sprintf "%s:%d: empty system name" path line)
                    | Ok system ->
                        for c in criteria do
                            let text = cell (col c)
                            if text <> "" then
                                match Int32.TryParse(text, Globalization.NumberStyles.None, Globalization.CultureInfo.InvariantCulture) with
                                | true, v when v >= minRating && v <= maxRating -> ratings.Add { System = system; Criterion = c; Value = v }
                                | _ -> problems.Add(sprintf "%s:%d: %s must be a whole number from %d to %d, got '%s'" path line c minRating maxRating text)
    if problems.Count > 0 then raise (InvalidDataException(String.Join("\n", problems)))
    ratings.ToArray()

/// Mean, standard deviation and count per system (sorted by name) and criterion (sheet order).
let summarize (ratings: Rating[]) : RatingSummary[] =
    [| for system in ratings |> Array.map _.System |> Array.distinct |> Array.sort do
           for c in criteria do
               let values = ratings |> Array.filter (fun r -> r.System = system && r.Criterion = c) |> Array.map (fun r -> float r.Value)
               if values.Length > 0 then
                   let mean = Array.average values
                   let std =
                       if values.Length < 2 then 0.0
                       else sqrt ((values |> Array.sumBy (fun v -> (v - mean) * (v - mean))) / float (values.Length - 1))
                   { System = system; Criterion = c; Mean = mean; Std = std; Count = values.Length } |]

/// A text table: one row per system, "mean ± std (count)" per criterion.
let formatSummary (summary: RatingSummary[]) : string =
    let sb = StringBuilder()
    let width = max 8 (summary |> Array.fold (fun w s -> max w s.System.Length) 0)
    sb.Append((sprintf "%-*s" width "system") + String.Join("", criteria |> Array.map (sprintf "  %-22s"))).AppendLine() |> ignore
    for system in summary |> Array.map _.System |> Array.distinct do
        sb.Append(sprintf "%-*s" width system) |> ignore
        for c in criteria do
            match summary |> Array.tryFind (fun s -> s.System = system && s.Criterion = c) with
            | Some s -> sb.Append(sprintf "  %-22s" (sprintf "%.2f ± %.2f (%d)" s.Mean s.Std s.Count)) |> ignore
            | None -> sb.Append(sprintf "  %-22s" "-") |> ignore
        sb.AppendLine() |> ignore
    sb.ToString()

/// {"system": {"criterion": {"mean", "std", "count"}}}.
let summaryToJson (summary: RatingSummary[]) : string =
    use stream = new MemoryStream()
    let w = new Utf8JsonWriter(stream)
    w.WriteStartObject()
    for system, rows in summary |> Array.groupBy _.System do
        w.WriteStartObject(system)
        for s in rows do
            w.WriteStartObject(s.Criterion)
            w.WriteNumber("mean", s.Mean)
            w.WriteNumber("std", s.Std)
            w.WriteNumber("count", s.Count)
            w.WriteEndObject()
        w.WriteEndObject()
    w.WriteEndObject()
    w.Flush()
    w.Dispose()
    Encoding.UTF8.GetString(stream.ToArray())
