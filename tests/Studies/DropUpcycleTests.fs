/// The drop-upcycling study (`scripts/drop_upcycle_gpt2.fsx`): its options, the XNLI split that keeps a test
/// pair's translations out of training, and a smoke run on the shared samples that must write its tables, run
/// folders, report and figure.
module Moe.Tests.DropUpcycleTests

open System
open System.IO
open Expecto
open Moe
open Moe.Experiments
open Moe.DropUpcycle
open Moe.Tests.Support

let private pair (language: string) (index: int) : Nli.NliPair =
    { Premise = sprintf "p%d" (index / 3); Hypothesis = sprintf "h%d" index; Label = index % 3; Language = language; Index = index; Line = 1L }

let tests =
    testList "DropUpcycle" [
        test "options: flags, values and every problem at once" {
            let dir = Path.Combine(Path.GetTempPath(), "moe-drop-options", Guid.NewGuid().ToString("N"))
            for sub in [ "c4-en-sample"; "xnli-sample"; "gpt2-bpe" ] do Directory.CreateDirectory(Path.Combine(dir, sub)) |> ignore
            File.WriteAllText(Path.Combine(dir, "c4-en-sample", "c4-train.00000-of-01024.first1000.jsonl"), "")
            File.WriteAllText(Path.Combine(dir, "xnli-sample", "dev.jsonl"), "")
            try
                let o = DropUpcycleOptions.parseOrFail dir [| "--smoke"; "--train-languages"; "en,es,fr"; "--drop-ratio"; "0.5"; "--experts"; "4" |]
                Expect.equal (o.Scale, o.TrainLanguages, o.Upcycle.DropRatio, o.Upcycle.Router.Experts) (Smoke, [ "en"; "es"; "fr" ], 0.5, 4) "values"
                Expect.equal (DropUpcycleOptions.parseOrFail dir [||]).Upcycle.Every 2 "every other MLP by default"
                match DropUpcycleOptions.parse "/no/shared" [| "--smoke"; "--full"; "--drop-ratio"; "x"; "--model" |] with
                | Ok o -> failtestf "expected errors, got %A" o
                | Error ps ->
                    Expect.equal ps.Length 6 (sprintf "--model without a value, exclusive flags, a bad number, three missing data paths: %A" ps)
                    Expect.exists ps (fun p -> p.Contains "/no/shared/xnli-sample") "names the missing file"
            finally Directory.Delete(dir, true)
        }
        test "the XNLI split keeps every test pair's translations and premise out of training" {
            let pairs = [| for l in [ "en"; "de"; "fr" ] do for i in 0 .. 29 -> pair l i |]
            let train, valid, test = splitPairs 0.7 [ "en" ] None pairs None
            Expect.isTrue (train |> Array.forall (fun p -> p.Language = "en")) "training on English only"
            Expect.equal (test |> Array.map (fun p -> p.Language) |> Array.distinct) [| "en"; "de"; "fr" |] "tests every language"
            let testIndices = test |> Array.map (fun p -> p.Index) |> set
            let trainedPremises = Array.append train valid |> Array.map (fun p -> p.Premise) |> set
            Expect.isTrue (Array.append train valid |> Array.forall (fun p -> not (testIndices.Contains p.Index))) "no test index trains"
            Expect.isTrue (test |> Array.forall (fun p -> not (trainedPremises.Contains p.Premise))) "no test premise trains"
            Expect.equal (train.Length, valid.Length, test.Length) (18, 3, 27) "indices 0-17 train, 18-20 validate, 21-29 test"
        }
        test "pairs are cut to the token budget, premise first, and right-padded" {
            let encode (s: string) = s.ToCharArray() |> Array.map int
            let ids = encodePair encode 6 { pair "en" 0 with Premise = "abcdef"; Hypothesis = "xy" }
            Expect.equal ids [| 97L; 98L; 99L; 10L; 120L; 121L |] "premise cut to 3, newline, hypothesis"
            let t, lengths = padRows 0L [| [| 5L; 6L |]; [| 7L |] |]
            Expect.equal (Tensors.toInt64s t) [| 5L; 6L; 7L; 0L |] "right padding"
            Expect.equal lengths [| 2; 1 |] "lengths"
        }
        testWithShared "smoke: dense and MoE from the shared tiny GPT-2 write tables, runs, report and figure" (fun data ->
            let dir = Path.Combine(Path.GetTempPath(), "moe-drop-smoke", Guid.NewGuid().ToString("N"))
            // The shared tiny GPT-2 (2 blocks) stands for a real checkpoint; the small GPT-2's pretraining has its own tests (SmallGpt2).
            let model = Path.Combine(Path.GetDirectoryName data, "models", "gpt2-tiny-hf")
            try
                let opts = { DropUpcycleOptions.parseOrFail data [| "--smoke"; "--model"; model |] with RunsDir = Path.Combine(dir, "runs"); ReportsDir = Path.Combine(dir, "reports"); Screenshot = false }
                let result = run opts
                Expect.equal result.Tables.Length 2 "accuracy and training tables"
                let accuracy = result.Tables[0]
                Expect.equal accuracy.Rows.Length 16 "15 languages and the mean"
                Expect.stringContains accuracy.Title ("GPT-2 from " + model) "names the base model"
                for r in result.RunDirs do
                    Expect.isTrue (File.Exists(Path.Combine(r, "metrics.jsonl"))) (r + ": metrics")
                Expect.isTrue (File.Exists(Path.Combine(result.RunDirs[1], "routing.jsonl"))) "the MoE's routing is logged"
                Expect.isTrue (File.Exists result.Report && File.Exists result.Markdown && File.Exists result.Figure.Html) "report, table, figure"
                let figure = File.ReadAllText result.Figure.Html
                Expect.stringContains figure "h.1.mlp: language" "expert share by language of the MoE layer"
                Expect.stringContains figure "h.1.mlp: label" "expert share by label of the MoE layer"
            finally if Directory.Exists dir then Directory.Delete(dir, true))
    ]
