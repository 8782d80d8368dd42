/// NLI loaders (`Moe.Nli`): XNLI's release TSV, XNLI and MultiNLI JSON Lines, skipped-row counts and errors
/// naming the file and line; the shared XNLI sample.
module Moe.Tests.NliTests

open System
open System.IO
open Expecto
open Moe
open Moe.TextTools
open Moe.Tests.Support

let private withFile (ext: string) (lines: string list) (body: string -> unit) =
    let path = Path.Combine(Path.GetTempPath(), sprintf "moe-nli-%s%s" (Guid.NewGuid().ToString "N") ext)
    File.WriteAllLines(path, lines)
    try body path finally File.Delete path

let private expectDataError (fragments: string list) (f: unit -> unit) =
    let e = Expect.throwsC f id
    Expect.isTrue (e :? DataException) (sprintf "expected a DataException, got %s" (e.GetType().Name))
    for frag in fragments do Expect.stringContains e.Message frag (sprintf "message names %s" frag)

let tests =
    testList "Nli" [
        test "XNLI release TSV: columns by name, no-gold and empty pairs skipped and counted" {
            withFile ".tsv"
                [ "language\tgold_label\tsentence1_binary_parse\tsentence1\tsentence2\tpairID"
                  "en\tentailment\t( x )\tA man sleeps.\tSomeone sleeps.\t1"
                  "en\t-\t( x )\tA man eats.\tNobody eats.\t2"
                  "de\tcontradiction\t( x )\tEin Mann schläft.\tNiemand schläft.\t1"
                  "de\tneutral\t( x )\t \tEr träumt.\t2"
                  ""
                  "en\tneutral\t( x )\tA man eats.\tHe is hungry.\t3" ]
                (fun path ->
                    let set = Nli.load path
                    Expect.equal set.Report.Read 5 "five data lines"
                    Expect.equal (set.Report.Kept, set.Report.SkippedNoGold, set.Report.SkippedEmpty) (3, 1, 1) "kept, no gold, empty"
                    Expect.equal [ for p in set.Pairs -> p.Language, p.Label, p.Index, p.Line ] [ "en", 0, 0, 2L; "de", 2, 0, 4L; "en", 1, 2, 7L ] "languages, labels, per-language index, line"
                    Expect.equal set.Pairs[1].Premise "Ein Mann schläft." "premise = sentence1")
        }
        test "TSV errors name the file and line" {
            withFile ".tsv" [ "language\tgold_label\tsentence1\tsentence2"; "en\tentailment\tA." ] (fun path ->
                expectDataError [ path + ":2"; "expected 4 tab-separated fields" ] (fun () -> Nli.load path |> ignore))
            withFile ".tsv" [ "lang\tlabel\tpremise\thypothesis" ] (fun path ->
                expectDataError [ path + ":1"; "missing language, gold_label, sentence1, sentence2" ] (fun () -> Nli.load path |> ignore))
            withFile ".tsv" [ "language\tgold_label\tsentence1\tsentence2"; "en\tmaybe\tA.\tB." ] (fun path ->
                expectDataError [ path + ":2"; "unknown label \"maybe\"" ] (fun () -> Nli.load path |> ignore))
        }
        test "JSON Lines: XNLI fields with names or ids, MultiNLI fields in English" {
            withFile ".jsonl"
                [ """{"premise": "P1", "hypothesis": "H1", "label": "neutral", "language": "fr"}"""
                  """{"premise": "P2", "hypothesis": "H2", "label": 2, "language": "fr"}"""
                  """{"sentence1": "P3", "sentence2": "H3", "gold_label": "entailment", "genre": "fiction"}"""
                  """{"sentence1": "P4", "sentence2": "H4", "gold_label": "-"}""" ]
                (fun path ->
                    let set = Nli.load path
                    Expect.equal [ for p in set.Pairs -> p.Language, p.Label ] [ "fr", 1; "fr", 2; "en", 0 ] "languages and labels"
                    Expect.equal set.Report.SkippedNoGold 1 "MultiNLI's no-consensus pair counted")
            withFile ".jsonl" [ """{"premise": "P", "hypothesis": "H", "label": "neutral"}""" ] (fun path ->
                expectDataError [ path + ":1"; "\"language\"" ] (fun () -> Nli.load path |> ignore))
            withFile ".jsonl" [ """{"premise": "P", "label": "neutral", "language": "en"}""" ] (fun path ->
                expectDataError [ path + ":1"; "\"hypothesis\" (XNLI) or \"sentence2\"" ] (fun () -> Nli.load path |> ignore))
            withFile ".jsonl" [ "{not json" ] (fun path -> expectDataError [ path + ":1"; "malformed JSON" ] (fun () -> Nli.load path |> ignore))
        }
        testWithShared "the shared XNLI sample: 15 languages x 500 pairs, row k the same label in every language" (fun data ->
            let set = Nli.load (Path.Combine(data, "xnli-sample", "dev.jsonl"))
            Expect.equal set.Report.Kept 7500 "7500 pairs"
            let byLanguage = set.Pairs |> Array.groupBy (fun p -> p.Language)
            Expect.equal byLanguage.Length 15 "15 languages"
            let english = set.Pairs |> Array.filter (fun p -> p.Language = "en") |> Array.map (fun p -> p.Index, p.Label) |> Map.ofArray
            for _, pairs in byLanguage do
                Expect.equal pairs.Length 500 "500 per language"
                for p in pairs do Expect.equal p.Label english[p.Index] "same label as the English pair of that index")
    ]
