/// End-to-end tests of the summarization job on a tiny synthetic corpus and a tiny model.
module Moe.Tests.SummarizerTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open Moe
open Moe.Config
open Moe.Models
open Moe.Data
open Moe.Corpus
open Moe.Train
open Moe.Summarizer
open Moe.Tests.Support

/// A run small enough for a test: 48 training documents, a 1 + 1 layer model of width 32, 8 steps.
let private tiny (name: string) (runsDir: string) : SummarizerConfig =
    let d = SummarizerConfig.defaults
    { d with
        Name = name
        RunsDir = runsDir
        Source = Synthetic { CorpusConfig.defaults with TrainSize = 48; ValidSize = 8; TestSize = 8 }
        Model = { d.Model with ModelDim = 32; Heads = 2; KvHeads = 2; EncoderLayers = 1; DecoderLayers = 1; Ffn = Dense 64 }
        Train = { d.Train with Steps = 8; BatchSize = 8; WarmupSteps = 2; LogEvery = 4; EvalEvery = 4; CheckpointEvery = 4; Device = Native.Cpu }
        Generate = { d.Generate with MaxLength = 12 }
        BootstrapSamples = 20 }

let private quiet = { RunOptions.Defaults with Progress = Silent }

let private withRunsDir (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), "moe-summarizer-tests", Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    try body dir
    finally (try Directory.Delete(dir, true) with _ -> ())

let private lines (path: string) = File.ReadAllLines path

/// Sequenced: training seeds libtorch's global generator.
let tests =
  testSequenced <|
    testList "Summarizer" [
        testCase "lead-1 takes the first sentence" <| fun () ->
            Expect.equal (lead1 "The cat sat. Then it left! More.") "The cat sat." "first sentence"
            Expect.equal (lead1 "\n  First line without stop\nsecond line") "First line without stop" "first line"
            Expect.equal (lead1 "U.S. officials met on 3 May. 2 left.") "U.S. officials met on 3 May." "abbreviation followed by capital is a known limit, digits split"
            Expect.equal (lead1 "") "" "empty"

        testCase "validate reports every section's problems" <| fun () ->
            let d = SummarizerConfig.defaults
            let bad =
                { d with
                    Name = ""
                    Source = Files { Train = "/nowhere/train.jsonl"; Valid = ""; Test = "/nowhere/test.jsonl" }
                    Train = { d.Train with Steps = 0 }
                    Model = { d.Model with MaxLength = 16 } }
            let problems = SummarizerConfig.validate bad
            for part in [ "Name"; "Source.Files.Train"; "Source.Files.Valid"; "Train: Steps"; "Model.MaxLength (16)" ] do
                Expect.exists problems (fun p -> p.Contains part) (sprintf "mentions %s in %A" part problems)

        testWithShared "Eval: the job scores BERTScore and SummaC into test_scores.json, the table and the report; refusals are printed" <| fun shared ->
            withRunsDir (fun dir ->
                let models = Path.Combine(shared, "..", "models")
                // `--set` spelling, as `moe train --set Eval.X=...` takes it
                let cfg =
                    match SummarizerConfig.load (tiny "eval" dir) None
                            [ "Eval.BertScoreModel=" + Path.Combine(models, "roberta-tiny"); "Eval.BertScoreLayer=2"
                              "Eval.SummaCModel=" + Path.Combine(models, "roberta-tiny-mnli") ] with
                    | Ok c -> c
                    | Error ps -> failtestf "config: %A" ps
                let out = new StringWriter()
                let r = runWith { quiet with Progress = Lines; Output = out } false cfg
                // A model trained 8 steps decodes empty summaries, which BERTScore and SummaC refuse: the run still
                // writes its scores and says why these two are missing (never a silent 0).
                let said = out.ToString()
                let predictions = lines (Path.Combine(r.RunDir, "predictions.txt"))
                if predictions |> Array.exists (fun p -> p.Trim() = "") then
                    Expect.stringContains said "BERTScore: not computed: candidate" "the refusal is printed"
                    Expect.stringContains said "SummaC: not computed: expected a non-empty summary" "the refusal is printed"
                Expect.isTrue (File.Exists(Path.Combine(r.RunDir, "test_scores.json"))) "the other scores are written"
                // The job's scoring (`scoreWithNotes`, what the run above called) on non-empty predictions of the same test set.
                let examples =
                    Array.map3 (fun i d s -> { Id = string i; Document = d; Summary = s; Label = None })
                        [| 0 .. predictions.Length - 1 |] (lines (Path.Combine(r.RunDir, "documents.txt"))) (lines (Path.Combine(r.RunDir, "references.txt")))
                let guesses = examples |> Array.map (fun e -> lead1 e.Document)
                let scored, notes = scoreWithNotes cfg guesses examples
                Expect.isEmpty notes "both computed"
                let scores = JsonNode.Parse(testScoresJson scored)
                let bert = scores["model"]["bertscore"]
                Expect.isNotNull bert "the model's BERTScore is in test_scores.json"
                Expect.equal (bert["layer"].GetValue<int>()) 2 "the configured layer"
                Expect.floatClose Accuracy.high (bert["f1"].GetValue<float>()) scored.Model.BertScore.Value.Estimate.F1.Mean "the F1 mean"
                Expect.isNotNull (scores["model"]["summac_zs"]) "the model's SummaC-ZS is in test_scores.json"
                for key in [ "bertscore"; "summac_zs" ] do
                    let ci = scores["model_ci"][key]
                    Expect.isNotNull ci (sprintf "%s interval" key)
                    Expect.isTrue (ci["low"].GetValue<float>() <= ci["high"].GetValue<float>()) (sprintf "%s interval ordered" key)
                let table = comparisonTable scored
                Expect.stringContains table "BERTScore F1" "the printed table shows BERTScore"
                Expect.stringContains table "SummaC-ZS" "the printed table shows SummaC"
                File.WriteAllText(Path.Combine(r.RunDir, "test_scores.json"), testScoresJson scored)
                let html = File.ReadAllText(Report.write Report.defaults (Path.Combine(dir, "report.html")) [ r.RunDir ])
                Expect.stringContains html "BERTScore F1" "the report page has the BERTScore column"
                Expect.stringContains html "SummaC-ZS" "the report page has the SummaC column")

        testWithShared "Eval: a folder without the expected architecture is refused before training, naming it" <| fun shared ->
            withRunsDir (fun dir ->
                let models = Path.Combine(shared, "..", "models")
                let cfg =
                    { tiny "bad-eval" dir with
                        Eval = { Metrics.ModelMetrics.defaults with BertScoreModel = Some(Path.Combine(models, "bart-tiny")); SummaCModel = Some(Path.Combine(models, "roberta-tiny")) } }
                let problems = SummarizerConfig.validate cfg
                Expect.exists problems (fun p -> p.StartsWith "Eval.BertScoreModel" && p.Contains "bart") (sprintf "names the field and what the folder holds: %A" problems)
                Expect.exists problems (fun p -> p.StartsWith "Eval.SummaCModel" && p.Contains "sequence classifier") (sprintf "an encoder is no NLI classifier: %A" problems)
                Expect.exists (SummarizerConfig.validate { cfg with Eval = { Metrics.ModelMetrics.defaults with BertScoreModel = Some(Path.Combine(models, "roberta-tiny")) } })
                    (fun p -> p.StartsWith "Eval.BertScoreLayer") "roberta-tiny is not in bert_score's table: the layer is asked for"
                Expect.exists (SummarizerConfig.validate { cfg with Eval = { Metrics.ModelMetrics.defaults with SummaCConv = Some "x.bin" } })
                    (fun p -> p.Contains "SummaCConv is set but Eval.SummaCModel is not") "a setting without its model is named"
                Expect.throwsT<ArgumentException> (fun () -> runWith quiet false cfg |> ignore) "refused"
                let runDir = Path.Combine(dir, "bad-eval")
                Expect.isFalse (File.Exists(Path.Combine(runDir, "metrics.jsonl"))) "no training step ran"
                Expect.isFalse (Directory.Exists(Path.Combine(runDir, "checkpoints"))) "no checkpoint written")

        testCase "a config file and overrides change only what they name" <| fun () ->
            withRunsDir (fun dir ->
                let file = Path.Combine(dir, "cfg.json")
                File.WriteAllText(file, """{"Name": "from-file", "Train": {"Steps": 7}, "Model": {"Ffn": {"Dense": 32}}}""")
                match SummarizerConfig.load SummarizerConfig.defaults (Some file) [ "Train.LearningRate=0.002"; "Generate.BeamSize=3" ] with
                | Ok c ->
                    Expect.equal c.Name "from-file" "file"
                    Expect.equal c.Train.Steps 7 "nested file field"
                    Expect.equal c.Train.LearningRate 0.002 "override"
                    Expect.equal c.Generate.BeamSize 3 "override"
                    Expect.equal c.Model.Ffn (Dense 32) "union"
                    Expect.equal c.Train.WarmupSteps SummarizerConfig.defaults.Train.WarmupSteps "the rest keeps the defaults"
                | Error e -> failtestf "unexpected %A" e
                match SummarizerConfig.load SummarizerConfig.defaults (Some file) [ "Train.Stepz=1" ] with
                | Error e -> Expect.exists e (fun p -> p.Contains "unknown field 'Stepz'") "typo caught"
                | Ok _ -> failtest "expected an error")

        testCase "a top-k MoE run writes the run folder and beats nothing it should not" <| fun () ->
            withRunsDir (fun dir ->
                let cfg = tiny "topk" dir |> SummarizerConfig.topK 4 2
                let r = runWith quiet false cfg
                let run = r.RunDir
                for f in [ "config.json"; "metrics.jsonl"; "routing.jsonl"; "predictions.txt"; "references.txt"; "documents.txt"
                           "test_scores.json"; "routing_by_label.json"; "checkpoints/last.ckpt" ] do
                    Expect.isTrue (File.Exists(Path.Combine(run, f))) (sprintf "%s written" f)
                let n = 8
                for f in [ "predictions.txt"; "references.txt"; "documents.txt"; "ids.txt" ] do
                    Expect.equal (lines (Path.Combine(run, f))).Length n (sprintf "%s has one line per test example" f)
                let scores = JsonNode.Parse(File.ReadAllText(Path.Combine(run, "test_scores.json")))
                for key in [ "model"; "lead1"; "model_ci"; "lead1_ci" ] do Expect.isNotNull scores[key] key
                let rouge1 = scores["lead1"]["rouge1"]
                Expect.isGreaterThan (rouge1["f1"].GetValue<float>()) 0.0 "lead-1 overlaps a little"
                let byLabel = JsonNode.Parse(File.ReadAllText(Path.Combine(run, "routing_by_label.json")))
                let layers = byLabel["layers"].AsArray()
                Expect.equal layers.Count 2 "one entry per MoE layer (enc.0, dec.0)"
                let first = layers[0]
                Expect.equal (first["experts"].GetValue<int>()) 4 "E"
                let counts = first["counts"].AsArray()
                Expect.equal counts.Count (first["labels"].AsArray().Count) "a row per label"
                let routing = File.ReadAllLines(Path.Combine(run, "routing.jsonl"))
                Expect.isNonEmpty routing "routing lines"
                Expect.stringContains routing[0] "\"layer\":\"enc.0\"" "named layers"
                let config = JsonNode.Parse(File.ReadAllText(Path.Combine(run, "config.json")))
                Expect.isNotNull config["Model"] "model section"
                Expect.isNotNull config["Train"] "train section"
                // The checkpoint alone rebuilds the model: the same greedy outputs on the test documents.
                use loaded = load run None Native.Cpu
                // parameters.json holds the model's counts, and a sweep's results row reads them.
                let counts = loaded.Model.ParameterCount()
                let expected = { Total = counts.Total; Active = counts.Active; Trainable = loaded.Model.TrainableParameterCount() }
                Expect.equal (RunFiles.readParameters run) (Some(Ok expected)) "parameters.json"
                Expect.isLessThan expected.Active expected.Total "top-2 of 4 experts: fewer active than total"
                let row = Sweep.Results.readRow { Index = 0; Name = "topk"; Varied = []; Overrides = []; Config = JsonObject(); Hash = ""; RunDir = run }
                Expect.equal (row.ParametersTotal, row.ParametersActive) (Some expected.Total, Some expected.Active) "sweep results row"
                Expect.isEmpty row.Notes "nothing unreadable"
                let docs = lines (Path.Combine(run, "documents.txt"))
                let again = summarizeTexts loaded None docs
                Expect.sequenceEqual again (lines (Path.Combine(run, "predictions.txt"))) "reloaded model decodes the same")

        testCase "a hash-routed run trains and resumes to the same end" <| fun () ->
            withRunsDir (fun dir ->
                let cfg = tiny "hash" dir |> SummarizerConfig.hash 4
                let whole = runWith quiet false cfg
                let cfgB = { cfg with Name = "hash-b" }
                // Stop after 3 steps, then resume the same schedule from that checkpoint.
                use stop = new Threading.CancellationTokenSource()
                let opts = { quiet with OnStep = (fun r -> if r.Step = 3 then stop.Cancel()); Cancel = stop.Token }
                let first = runWith opts false cfgB
                Expect.equal first.Train.Stop Cancelled "stopped at step 3"
                Expect.equal first.Train.Steps 3 "three steps"
                Expect.isNone first.Scores "a cancelled run is not decoded"
                let resumed = runWith quiet true cfgB
                Expect.equal resumed.Train.Steps 8 "finished"
                Expect.floatClose { absolute = Tol.f32; relative = Tol.f32 } (defaultArg resumed.Train.LastLoss nan) (defaultArg whole.Train.LastLoss nan) "same final loss"
                Expect.sequenceEqual (lines (Path.Combine(resumed.RunDir, "predictions.txt"))) (lines (Path.Combine(whole.RunDir, "predictions.txt"))) "same predictions")
    ]
