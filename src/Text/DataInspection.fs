/// `moe data inspect`: counts, length percentiles and the problems a load reported, for a data set on disk
/// or examples made in memory.
module Moe.DataInspection

open System
open System.Collections.Generic
open System.Text
open Moe.Data

/// Nearest-rank percentiles of a length distribution.
type Percentiles =
    { P50: int
      P90: int
      P99: int
      Max: int }

/// `inspect`'s findings.
type Inspection =
    { Report: LoadReport
      Count: int
      DocumentWords: Percentiles
      SummaryWords: Percentiles
      /// Examples per label, most frequent first; empty when the source has none.
      Labels: (string * int) list
      /// Summaries that occur verbatim in their document (extractive leakage).
      SummaryInDocument: int
      /// Summaries with more words than their document.
      SummaryLongerThanDocument: int
      /// Everything that looks wrong, one line each (the report's notes included).
      Problems: string list }

/// Nearest-rank percentiles (p50, p90, p99, max) of `values`; zeros for none.
let percentiles (values: int[]) : Percentiles =
    if values.Length = 0 then { P50 = 0; P90 = 0; P99 = 0; Max = 0 }
    else
        let sorted = Array.sort values
        let rank (p: float) = sorted[max 0 (int (ceil (p / 100.0 * float sorted.Length)) - 1)]
        { P50 = rank 50.0; P90 = rank 90.0; P99 = rank 99.0; Max = sorted[sorted.Length - 1] }

type private Tally =
    { DocWords: int[]
      SumWords: int[]
      Labels: (string * int) list
      InDocument: int
      Longer: int }

let private tally (examples: seq<Example>) : Tally =
    let docW = ResizeArray<int>()
    let sumW = ResizeArray<int>()
    let labels = Dictionary<string, int>()
    let mutable inDoc = 0
    let mutable longer = 0
    for e in examples do
        let d, s = TextTools.words e.Document, TextTools.words e.Summary
        docW.Add d
        sumW.Add s
        if e.Document.Contains e.Summary then inDoc <- inDoc + 1
        if s > d then longer <- longer + 1
        match e.Label with
        | Some l -> labels[l] <- (match labels.TryGetValue l with | true, n -> n + 1 | _ -> 1)
        | None -> ()
    { DocWords = docW.ToArray(); SumWords = sumW.ToArray()
      Labels = labels |> Seq.map (fun kv -> kv.Key, kv.Value) |> Seq.sortBy (fun (k, n) -> -n, k) |> List.ofSeq
      InDocument = inDoc; Longer = longer }

let private inspection (report: LoadReport) (t: Tally) : Inspection =
    { Report = report
      Count = t.DocWords.Length
      DocumentWords = percentiles t.DocWords
      SummaryWords = percentiles t.SumWords
      Labels = t.Labels
      SummaryInDocument = t.InDocument
      SummaryLongerThanDocument = t.Longer
      Problems =
        [ yield! report.Notes
          if t.DocWords.Length = 0 then "no examples"
          if t.InDocument > 0 then sprintf "%d summaries occur verbatim in their document" t.InDocument
          if t.Longer > 0 then sprintf "%d summaries are longer than their document" t.Longer ] }

/// The report for examples made in memory rather than read (nothing skipped or changed).
let generatedReport (source: string) (count: int) : LoadReport =
    { Source = source; Format = None; Read = count; Kept = count; SkippedEmptyDocument = 0; SkippedEmptySummary = 0
      SkippedMissingFile = 0; TruncatedDocuments = 0; MojibakeRepaired = 0; ReplacementCharacters = 0
      SentenceTagsStripped = 0; DuplicateIds = 0; Notes = [] }

/// Inspects examples already in memory; `report` says where they came from.
let inspectExamples (report: LoadReport) (examples: seq<Example>) : Inspection =
    inspection report (tally examples)

/// Reads `path` once, streaming (only lengths are kept), and reports counts, length percentiles in
/// words, labels and problems.
let inspect (cfg: DataConfig) (path: string) : Inspection =
    let r = ExampleReader(cfg, path)
    let t = tally r.Examples
    inspection r.Report t

/// Inspects a data path as `moe train --data` reads it: a split folder (`Data.splitFolder`) gives one
/// inspection per split, named train, validation and test; any other path one, named "".
let inspectPath (cfg: DataConfig) (path: string) : (string * Inspection) list =
    match splitFolder path with
    | Some(train, valid, test) -> [ "train", inspect cfg train; "validation", inspect cfg valid; "test", inspect cfg test ]
    | None -> [ "", inspect cfg path ]

/// A plain-text rendering of an inspection, as `moe data inspect` prints it.
let formatInspection (i: Inspection) : string =
    let r = i.Report
    let sb = StringBuilder()
    let line (s: string) = sb.AppendLine s |> ignore
    line (sprintf "source:   %s" r.Source)
    line (sprintf "format:   %s" (match r.Format with Some f -> Format.name f | None -> "generated"))
    line (sprintf "examples: %d kept of %d read" r.Kept r.Read)
    line (sprintf "skipped:  %d empty document, %d empty summary, %d missing file" r.SkippedEmptyDocument r.SkippedEmptySummary r.SkippedMissingFile)
    line (sprintf "changed:  %d truncated, %d mojibake repaired, %d sentence tags stripped" r.TruncatedDocuments r.MojibakeRepaired r.SentenceTagsStripped)
    line "length (words)   p50     p90     p99     max"
    let row (name: string) (p: Percentiles) = line (sprintf "  %-12s %7d %7d %7d %7d" name p.P50 p.P90 p.P99 p.Max)
    row "document" i.DocumentWords
    row "summary" i.SummaryWords
    if not i.Labels.IsEmpty then
        line "labels:"
        for l, n in i.Labels do line (sprintf "  %-20s %d" l n)
    if i.Problems.IsEmpty then line "problems: none"
    else
        line "problems:"
        for p in i.Problems do line ("  - " + p)
    sb.ToString()
