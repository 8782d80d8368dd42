/// Natural-language-inference pairs: XNLI (Conneau et al. 2018) as its original release's TSV (a header
/// naming at least `language`, `gold_label`, `sentence1`, `sentence2`; other columns ignored) or as JSON
/// Lines (`premise`, `hypothesis`, `label`, `language`), and MultiNLI-style JSON Lines (Williams et al.
/// 2018: `sentence1`, `sentence2`, `gold_label`; English unless a `language` field says otherwise). Labels
/// are entailment, neutral, contradiction, as names or as the indices 0, 1, 2 of Hugging Face's datasets.
/// Pairs without a gold label (MultiNLI's "-": the annotators did not agree) and pairs with an empty premise
/// or hypothesis are skipped and counted; anything else malformed raises `DataException` naming the file
/// and line.
module Moe.Nli

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open Moe.TextTools

/// The three classes in Hugging Face's order (index = label id).
let labels = [| "entailment"; "neutral"; "contradiction" |]

/// One labelled pair.
type NliPair =
    { Premise: string
      Hypothesis: string
      /// 0 entailment, 1 neutral, 2 contradiction.
      Label: int
      /// ISO 639-1 code (XNLI's 15: ar bg de el en es fr hi ru sw th tr ur vi zh).
      Language: string
      /// The pair's position within its language in file order (0-based): in XNLI's files row k of every
      /// language is the same pair translated, so splits by this index keep translations together.
      Index: int
      /// 1-based line in the file.
      Line: int64 }

/// What a file held and what was skipped.
type NliReport =
    { File: string
      /// Data lines read (header and blank lines excluded).
      Read: int
      Kept: int
      /// Pairs whose gold label is "-" (no annotator majority) or empty.
      SkippedNoGold: int
      /// Pairs with an empty premise or hypothesis.
      SkippedEmpty: int }

type NliSet =
    { Pairs: NliPair[]
      Report: NliReport }

/// The label id of a label name or id, or None for "no gold label" ("-", ""); anything else is an error.
let private labelOf (file: string) (line: int64) (raw: string) : int option =
    match raw.Trim().ToLowerInvariant() with
    | "-" | "" -> None
    | "0" | "entailment" -> Some 0
    | "1" | "neutral" -> Some 1
    | "2" | "contradiction" | "contradictory" -> Some 2
    | other -> fail file (Some line) (sprintf "unknown label \"%s\"; expected entailment, neutral, contradiction (or 0, 1, 2), or - for no gold label" other)

/// Collects pairs, counting skips and numbering each language's pairs.
type private Collector(file: string) =
    let pairs = ResizeArray<NliPair>()
    let perLanguage = Dictionary<string, int>()
    let mutable read, noGold, empty = 0, 0, 0
    member _.Add(line: int64, premise: string, hypothesis: string, label: string, language: string) =
        read <- read + 1
        let index = match perLanguage.TryGetValue language with | true, n -> n | _ -> 0
        perLanguage[language] <- index + 1
        match labelOf file line label with
        | None -> noGold <- noGold + 1
        | Some _ when String.IsNullOrWhiteSpace premise || String.IsNullOrWhiteSpace hypothesis -> empty <- empty + 1
        | Some l -> pairs.Add { Premise = premise; Hypothesis = hypothesis; Label = l; Language = language; Index = index; Line = line }
    member _.Finish() : NliSet =
        if pairs.Count = 0 then fail file None (sprintf "expected labelled NLI pairs, found none (%d read, %d without gold label, %d empty)" read noGold empty)
        { Pairs = pairs.ToArray()
          Report = { File = file; Read = read; Kept = pairs.Count; SkippedNoGold = noGold; SkippedEmpty = empty } }

/// XNLI's release TSV: a header line, then tab-separated fields (no quoting). Columns are found by name.
let readTsv (path: string) : NliSet =
    let c = Collector(path)
    let mutable columns : Map<string, int> option = None
    for lineNo, line in readLines path do
        if line.Trim().Length > 0 then
            let fields = line.Split '\t'
            match columns with
            | None ->
                let named = fields |> Array.mapi (fun i f -> f.Trim(), i) |> Map.ofArray
                let missing = [ "language"; "gold_label"; "sentence1"; "sentence2" ] |> List.filter (named.ContainsKey >> not)
                if not missing.IsEmpty then
                    fail path (Some lineNo) (sprintf "expected a header with the columns language, gold_label, sentence1, sentence2 (XNLI's release TSV); missing %s; got %s"
                                                 (String.Join(", ", missing)) (String.Join(", ", fields)))
                columns <- Some named
            | Some named ->
                if fields.Length <> named.Count then
                    fail path (Some lineNo) (sprintf "expected %d tab-separated fields (as the header), got %d" named.Count fields.Length)
                c.Add(lineNo, fields[named["sentence1"]], fields[named["sentence2"]], fields[named["gold_label"]], fields[named["language"]].Trim())
    c.Finish()

/// JSON Lines: XNLI's `premise`/`hypothesis`/`label`/`language`, or MultiNLI's `sentence1`/`sentence2`/
/// `gold_label` (language "en" unless given). `label` may be a name or an integer id.
let readJsonLines (path: string) : NliSet =
    let c = Collector(path)
    for lineNo, line in readLines path do
        if line.Trim().Length > 0 then
            let bad (what: string) : 'a = fail path (Some lineNo) what
            use doc =
                try JsonDocument.Parse line
                with :? JsonException as e -> bad (sprintf "malformed JSON (%s)" e.Message)
            let o = doc.RootElement
            if o.ValueKind <> JsonValueKind.Object then bad (sprintf "expected a JSON object, got a %O" o.ValueKind)
            let text (name: string) =
                match o.TryGetProperty name with
                | true, v when v.ValueKind = JsonValueKind.String -> Some(v.GetString())
                | true, v when v.ValueKind = JsonValueKind.Number && (name = "label" || name = "gold_label") -> Some(v.GetRawText())
                | true, v -> bad (sprintf "field \"%s\": expected a string, got a %O" name v.ValueKind)
                | _ -> None
            let required (xnli: string) (mnli: string) =
                match text xnli, text mnli with
                | Some v, _ | None, Some v -> v
                | None, None -> bad (sprintf "expected a field \"%s\" (XNLI) or \"%s\" (MultiNLI)" xnli mnli)
            let premise = required "premise" "sentence1"
            let hypothesis = required "hypothesis" "sentence2"
            let label = required "label" "gold_label"
            let language =
                match text "language", o.TryGetProperty "sentence1" with
                | Some l, _ -> l.Trim()
                | None, (true, _) -> "en" // MultiNLI is English
                | None, _ -> bad "expected a field \"language\" (XNLI JSON Lines name each pair's language)"
            c.Add(lineNo, premise, hypothesis, label, language)
    c.Finish()

/// A TSV (`.tsv`) or JSON Lines (`.jsonl`, `.json`) NLI file, by its extension.
let load (path: string) : NliSet =
    match Path.GetExtension(path).ToLowerInvariant() with
    | ".tsv" | ".txt" -> readTsv path
    | ".jsonl" | ".json" -> readJsonLines path
    | other -> fail path None (sprintf "expected an NLI file ending in .tsv (XNLI's release) or .jsonl (JSON Lines), got \"%s\"" other)

/// "N pairs kept of M read (K without gold label, J empty)".
let describe (r: NliReport) : string =
    sprintf "%s: %d pairs kept of %d read (%d without a gold label, %d with an empty premise or hypothesis skipped)" r.File r.Kept r.Read r.SkippedNoGold r.SkippedEmpty
