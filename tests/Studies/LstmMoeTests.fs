/// The BiLSTM + MoE study (`scripts/lstm_moe.fsx`): its options, and a smoke run on small CoNLL, SQuAD and GloVe
/// files written here (so it runs without ../shared) that must write its tables, run folders, report and figure.
module Moe.Tests.LstmMoeTests

open System
open System.IO
open Expecto
open Moe
open Moe.Config
open Moe.Experiments
open Moe.LstmMoe

let private conllSentences =
    [ "EU I-ORG rejects O German I-MISC call O"; "Peter I-PER Blackburn I-PER"; "In O Europe I-LOC and O Asia I-LOC"
      "Germany I-LOC beat O France I-LOC"; "The O European I-ORG Commission I-ORG said O" ]

/// A CoNLL file of `n` sentences cycling through `conllSentences`, with -DOCSTART- lines.
let private conllFile (path: string) (n: int) =
    let lines =
        [ yield "-DOCSTART- -X- O O"; yield ""
          for i in 0 .. n - 1 do
              let fields = conllSentences[i % conllSentences.Length].Split ' '
              for j in 0 .. 2 .. fields.Length - 1 do yield sprintf "%s NNP I-NP %s" fields[j] fields[j + 1]
              yield "" ]
    File.WriteAllLines(path, lines)

/// A SQuAD file of `articles` articles, each a paragraph with three questions.
let private squadFile (path: string) (articles: int) =
    let article (i: int) =
        sprintf """{"title": "A%d", "paragraphs": [{"context": "Denver Broncos won Super Bowl 50 in Santa Clara in February 2016.", "qas": [
            {"id": "a%d-1", "question": "Who won Super Bowl 50?", "answers": [{"answer_start": 0, "text": "Denver Broncos"}]},
            {"id": "a%d-2", "question": "Where was the game?", "answers": [{"answer_start": 36, "text": "Santa Clara"}]},
            {"id": "a%d-3", "question": "When was the game?", "answers": [{"answer_start": 51, "text": "February 2016"}, {"answer_start": 60, "text": "2016"}]}]}]}""" i i i i
    File.WriteAllText(path, sprintf """{"data": [%s], "version": "1.1"}""" (String.Join(", ", List.init articles article)))

let private gloveFile (path: string) =
    let words = [ "eu"; "rejects"; "german"; "call"; "peter"; "in"; "europe"; "and"; "asia"; "the"; "said"; "denver"; "won"; "super"; "bowl"; "who"; "where"; "was"; "game"; "when"; "?"; "." ]
    let rng = Random 7
    File.WriteAllLines(path, words |> List.map (fun w -> w + " " + String.Join(" ", Array.init 4 (fun _ -> (rng.NextDouble() - 0.5).ToString("F4", Globalization.CultureInfo.InvariantCulture)))))

let tests =
    testList "LstmMoe" [
        test "options: defaults from the shared folder, flags, and every problem listed" {
            let dir = Path.Combine(Path.GetTempPath(), "moe-lstm-options", Guid.NewGuid().ToString("N"))
            for sub in [ "conll2003-sample"; "squad-v1.1-sample"; "glove-6b-50d-subset" ] do Directory.CreateDirectory(Path.Combine(dir, sub)) |> ignore
            try
                let o = LstmMoeOptions.parseOrFail dir [| "--smoke" |]
                Expect.equal (o.Scale, o.Conll) (Smoke, Path.Combine(dir, "conll2003-sample")) "smoke on the shared sample"
                Expect.equal (LstmMoeOptions.parseOrFail dir [||]).Scale Quick "quick by default"
                let full = LstmMoeOptions.parseOrFail dir [| "--full"; "--glove"; dir; "--train-embeddings" |]
                Expect.equal (full.Scale, full.Glove, full.TrainEmbeddings) (Full, dir, true) "full with a GloVe path, vectors trained"
                match LstmMoeOptions.parse "/no/shared" [| "--smoke"; "--full"; "--fast"; "--conll" |] with
                | Ok o -> failtestf "expected errors, got %A" o
                | Error ps ->
                    Expect.equal ps.Length 6 (sprintf "unknown flag, --conll without a path, exclusive flags, three missing data paths: %A" ps)
                    Expect.exists ps (fun p -> p.Contains "--fast") "names the unknown flag"
                    Expect.exists ps (fun p -> p.Contains "/no/shared/squad-v1.1-sample") "names the missing folder"
            finally Directory.Delete(dir, true)
        }
        test "the six models' variants map onto the toolkit's routers and losses" {
            Expect.equal (variants |> List.map (fun v -> v.Name)) [ "baseline"; "naive-topk"; "topk-mask"; "noisy-topk"; "topk-mask+importance"; "noisy-topk+load" ] "names"
            let byName = variants |> List.map (fun v -> v.Name, v) |> Map.ofList
            let selection (name: string) = match byName[name].Middle with Recurrent.Experts m -> Some m.Router.Selection | Recurrent.SingleExpert -> None
            Expect.equal (selection "naive-topk") (Some(TokenChoiceTopK(NormaliseThenTopK, false))) "raw probabilities"
            Expect.equal (selection "topk-mask") (Some(TokenChoiceTopK(NormaliseThenTopK, true))) "renormalised"
            Expect.equal (selection "noisy-topk+load") (Some NoisyTopK) "noisy"
            Expect.equal byName["topk-mask+importance"].Losses.Importance shazeerWeight "importance loss"
            Expect.equal byName["noisy-topk+load"].Losses.Load shazeerWeight "load loss"
            for v in variants do
                Expect.equal v.Losses.SwitchAux 0.0 (v.Name + ": no Switch loss")
                Expect.equal v.Losses.ZLoss 0.0 (v.Name + ": no z-loss")
        }
        testSequenced <| test "smoke: twelve runs write their tables, run folders, report and figure" {
            let dir = Path.Combine(Path.GetTempPath(), "moe-lstm-smoke", Guid.NewGuid().ToString("N"))
            let conll, squad = Path.Combine(dir, "conll"), Path.Combine(dir, "squad")
            for d in [ conll; squad ] do Directory.CreateDirectory d |> ignore
            try
                conllFile (Path.Combine(conll, "eng.train")) 30
                conllFile (Path.Combine(conll, "eng.testa")) 6
                conllFile (Path.Combine(conll, "eng.testb")) 6
                squadFile (Path.Combine(squad, "train-v1.1.json")) 4
                squadFile (Path.Combine(squad, "dev-v1.1.json")) 2
                gloveFile (Path.Combine(dir, "glove.txt"))
                let opts =
                    { LstmMoeOptions.parseOrFail dir [| "--smoke"; "--conll"; conll; "--squad"; squad; "--glove"; Path.Combine(dir, "glove.txt") |] with
                        RunsDir = Path.Combine(dir, "runs"); ReportsDir = Path.Combine(dir, "reports"); Screenshot = false }
                let r = run opts
                Expect.equal (r.Tables |> List.map (fun t -> t.Rows.Length)) [ 6; 6 ] "six models per data set"
                for t in r.Tables do
                    for row in t.Rows do
                        Expect.equal row.Length t.Columns.Length "cells"
                        Expect.all row (fun c -> c <> "") "no empty cell"
                Expect.equal r.RunDirs.Length 12 "twelve runs"
                for d in r.RunDirs do
                    let run = RunLog.load d
                    Expect.isSome run.Scores (d + ": test scores")
                    Expect.isNonEmpty run.Metrics (d + ": loss curves")
                    Expect.equal (run.Routing.Length > 0) (not (d.EndsWith "baseline")) (d + ": routing logged by the MoE runs only")
                    Expect.isTrue (File.Exists(Path.Combine(d, "parameters.json"))) (d + ": parameter counts")
                let page = File.ReadAllText r.Report
                for text in [ "conll-noisy-topk+load"; "squad-topk-mask"; "token_accuracy"; "exact_match" ] do
                    Expect.stringContains page text (sprintf "the report shows %s" text)
                Expect.stringContains (File.ReadAllText r.Markdown) "CoNLL-2003 NER" "the table"
                Expect.equal (Path.GetFileName r.Figure.Html) "lstm_moe-figure.html" "figure"
                Expect.stringContains (File.ReadAllText r.Figure.Html) "SQuAD dev F1" "the figure's panels"
            finally (try Directory.Delete(dir, true) with _ -> ())
        }
    ]
