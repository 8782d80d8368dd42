/// Pretrained baselines (`Moe.Baseline`): zero-shot summarization of shared XSum documents with bart-tiny into a
/// run folder that `moe report` reads, the refusal of an existing run, the greedy generation `moe generate
/// --model DIR --input-ids F --json --greedy` prints against transformers' recorded ids, and the baseline
/// script's smoke run.
module Moe.Tests.BaselineTests

open System
open System.IO
open System.Text.Json
open Expecto
open Moe
open Moe.Tests.Support

let private tempRuns () =
    let dir = Path.Combine(Path.GetTempPath(), "moe-baseline-tests", Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    dir

let private models (shared: string) = Path.Combine(shared, "..", "models")

/// bart-tiny on the first 4 documents of the shared XSum test sample, 8 generated tokens at most.
let private smallRun (shared: string) (runsDir: string) : Baseline.BaselineConfig =
    { Baseline.BaselineConfig.defaults (Path.Combine(models shared, "bart-tiny")) (Path.Combine(shared, "xsum-test-docs", "test.llm_decoding.jsonl")) with
        Limit = Some 4
        RunsDir = runsDir
        Name = "bart-tiny"
        BootstrapSamples = 50
        Settings = [ "Generate.MaxNewTokens=8" ] }

/// The model's greedy ids for doc0 and transformers' (doc0_greedy, without the decoder start token).
let private greedySample (folder: string) : int[] * int[] =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "sample_outputs.json")))
    let s = doc.RootElement
    let source = [| for e in (s.GetProperty("doc0_alone").GetProperty("input_ids")[0]).EnumerateArray() -> e.GetInt32() |]
    let greedy = s.GetProperty "doc0_greedy"
    let expected = [| for e in greedy.GetProperty("greedy_ids").EnumerateArray() -> e.GetInt32() |]
    let maxNew = greedy.GetProperty("settings").GetProperty("max_new_tokens").GetInt32()
    // what `moe generate --model DIR --input-ids F --json --greedy --set Generate.MaxNewTokens=N` runs
    use p = Baseline.openFolder folder None None [ sprintf "Generate.MaxNewTokens=%d" maxNew ]
    let outs = Baseline.generateWith (Generate.GenerationConfig.greedyOf p.Generation) 8 ignore p (Baseline.SourceIds [| source |])
    outs[0].Ids, expected[1..]

let tests =
    testSequenced <| testList "Baseline" [
        testWithShared "summarize: bart-tiny on 4 shared XSum documents writes the run folder and a score record that moe report reads" <| fun shared ->
            let runs = tempRuns ()
            try
                let lines = ResizeArray<string>()
                let r = Baseline.summarize lines.Add (smallRun shared runs)
                for name in [ "predictions.txt"; "references.txt"; "documents.txt"; "ids.txt"; "test_scores.json"; Baseline.recordName ] do
                    Expect.isTrue (File.Exists(Path.Combine(r.RunDir, name))) (sprintf "%s written" name)
                Expect.equal (Metrics.Basics.readLines (Path.Combine(r.RunDir, "predictions.txt"))).Length 4 "4 predictions"
                Expect.equal r.Documents 4 "4 documents"
                Expect.isTrue (r.GeneratedTokens > 0 && r.GeneratedTokens <= 4 * 8) (sprintf "1 .. 32 generated tokens, got %d" r.GeneratedTokens)
                Expect.equal r.Scores.Model.N 4 "scored on 4 documents"
                Expect.isTrue (lines |> Seq.exists (fun l -> l.Contains "documents/s" && l.Contains "generated tokens/s")) "a progress line with the rates"
                let run = RunLog.load r.RunDir
                let systems = run.Scores.Value |> Array.map (fun s -> s.System) |> Set.ofArray
                Expect.equal systems (set [ "model"; "lead1" ]) "test_scores.json holds the model and lead-1, as the main job's"
                Expect.isEmpty run.Metrics "no training log"
                use record = JsonDocument.Parse(File.ReadAllText(Path.Combine(r.RunDir, Baseline.recordName)))
                Expect.equal (record.RootElement.GetProperty("model_type").GetString()) "bart" "the record names the model_type"
                Expect.equal (record.RootElement.GetProperty("generation").GetProperty("MaxNewTokens").GetInt32()) 8 "the record holds the settings used"
                let html = Report.write Report.defaults (Path.Combine(runs, "report.html")) [ r.RunDir ]
                Expect.isTrue (File.ReadAllText(html).Contains "bart-tiny") "the report page shows the run"
            finally Directory.Delete(runs, true)

        testWithShared "summarize --bertscore --summac: the summaries' BERTScore and SummaC in test_scores.json, the table and the report" <| fun shared ->
            let runs = tempRuns ()
            try
                let lines = ResizeArray<string>()
                let plain = Baseline.summarize lines.Add { smallRun shared runs with Name = "plain"; Limit = Some 2 }
                Expect.isNone plain.Scores.Model.BertScore "off by default"
                Expect.exists lines (fun l -> l.Contains "BERTScore: not computed") "the output says BERTScore was not computed"
                Expect.exists lines (fun l -> l.Contains "SummaC: not computed") "the output says SummaC was not computed"
                let eval =
                    { Metrics.ModelMetrics.defaults with
                        BertScoreModel = Some(Path.Combine(models shared, "roberta-tiny")); BertScoreLayer = Some 4
                        SummaCModel = Some(Path.Combine(models shared, "roberta-tiny-mnli")) }
                lines.Clear()
                let r = Baseline.summarize lines.Add { smallRun shared runs with Eval = eval; Settings = [ "Generate.MaxNewTokens=8"; "Generate.MinNewTokens=2" ] }
                use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(r.RunDir, "test_scores.json")))
                let model = doc.RootElement.GetProperty "model"
                Expect.equal (model.GetProperty("bertscore").GetProperty("layer").GetInt32()) 4 "BERTScore with the given layer"
                Expect.floatClose Accuracy.high (model.GetProperty("summac_zs").GetDouble()) r.Scores.Model.SummaC.Value.Zs.Mean "SummaC-ZS mean"
                Expect.exists lines (fun l -> l.Contains "BERTScore F1") (sprintf "the printed table shows BERTScore: %A" lines)
                let html = File.ReadAllText(Report.write Report.defaults (Path.Combine(runs, "report.html")) [ r.RunDir ])
                Expect.stringContains html "BERTScore F1" "the report page shows the column"
                let bad = { smallRun shared runs with Name = "bad"; Eval = { eval with BertScoreModel = Some(Path.Combine(models shared, "bart-tiny")) } }
                let err = try Baseline.summarize ignore bad |> ignore; "" with :? ArgumentException as e -> e.Message
                Expect.stringContains err "Eval.BertScoreModel" "a folder of another architecture is refused, named"
                Expect.isFalse (Directory.Exists(Path.Combine(runs, "bad"))) "before the run folder is made"
            finally Directory.Delete(runs, true)

        testWithShared "scripts/score_model_based.fsx --smoke: BERTScore and SummaC of lead-1 on 3 shared XSum pairs; no model is an error" <| fun shared ->
            let script = File.ReadAllText(Path.Combine(repoRoot, "scripts", "score_model_based.fsx"))
            Expect.stringContains script "Baseline.modelMetricsScript" "the script is the library call"
            let lines = ResizeArray<string>()
            let report = Baseline.modelMetricsScript lines.Add (Path.Combine(shared, "..")) [| "--smoke" |]
            Expect.equal report.N 3 "3 pairs"
            Expect.equal report.BertScore.Value.Run.Layer 2 "roberta-tiny at layer 2"
            Expect.equal report.SummaC.Value.Run.Examples.Length 3 "SummaC of each pair"
            Expect.exists lines (fun l -> l.Contains "bertscore" && l.Contains "summac-zs") "the table shows both"
            let err = try Baseline.modelMetricsScript ignore (Path.Combine(shared, "..")) [| "-p"; "x"; "-r"; "y" |] |> ignore; "" with :? ArgumentException as e -> e.Message
            Expect.stringContains err "expected --bertscore DIR and/or --summac DIR" "nothing to compute is an error"

        testWithShared "summarize refuses a run folder that holds a run unless Overwrite" <| fun shared ->
            let runs = tempRuns ()
            try
                let cfg = { smallRun shared runs with Limit = Some 1 }
                Baseline.summarize ignore cfg |> ignore
                let refusal =
                    try Baseline.summarize ignore cfg |> ignore; None
                    with :? ArgumentException as e -> Some e.Message
                Expect.isSome refusal "a second run into the same folder is refused"
                Expect.stringContains refusal.Value "already holds a run" "the refusal says why"
                let again = Baseline.summarize ignore { cfg with Overwrite = true }
                Expect.equal again.Documents 1 "Overwrite replaces it"
            finally Directory.Delete(runs, true)

        testWithShared "generate --input-ids --json --greedy: bart-tiny's, pegasus-tiny's, t5-tiny's and flan-t5-tiny's doc0 greedy ids as transformers made them" <| fun shared ->
            for name in [ "bart-tiny"; "pegasus-tiny"; "t5-tiny"; "flan-t5-tiny" ] do
                let got, expected = greedySample (Path.Combine(models shared, name))
                Expect.sequenceEqual got expected (sprintf "%s doc0_greedy" name)

        testWithShared "summarization task: t5-tiny's task_specific_params give the settings and the \"summarize: \" prefix; --source-prefix overrides" <| fun shared ->
            let dir = Path.Combine(models shared, "t5-tiny")
            use p = Baseline.openFolder dir (Some "summarization") None []
            Expect.equal p.SourcePrefix "summarize: " "the task's prefix"
            Expect.equal p.Generation.NumBeams 4 "the task's num_beams"
            Expect.equal p.Generation.MinLength 30 "the task's min_length"
            Expect.equal p.MaxSourceTokens (Some 512) "T5 has no position table: the tokenizer's model_max_length"
            use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
            let recorded = [| for e in doc.RootElement.GetProperty("doc0_first20_ids").EnumerateArray() -> e.GetInt32() |]
            let prefixIds = p.Tokenizer.Value.Encode("summarize:", false)
            Expect.sequenceEqual recorded[.. prefixIds.Length - 1] prefixIds "transformers' doc0 ids start with the prefix"
            let ids = Baseline.sourceIds p "A short document."
            Expect.sequenceEqual ids[.. prefixIds.Length - 1] prefixIds "so do ours"
            let long = Baseline.sourceIds p (String.replicate 2000 "word ")
            Expect.equal long.Length 512 "cut to 512 tokens"
            Expect.equal (Array.last long) p.Tokenizer.Value.EosId.Value "EOS kept after truncation"
            use q = Baseline.openFolder dir (Some "summarization") (Some "") [ "Generate.NumBeams=2" ]
            Expect.equal q.SourcePrefix "" "--source-prefix overrides the task's"
            Expect.equal q.Generation.NumBeams 2 "--set overrides the task's settings"

        testWithShared "generate: documents in a batch (sorted, padded) give the ids each gives alone" <| fun shared ->
            use p = Baseline.openFolder (Path.Combine(models shared, "bart-tiny")) None None [ "Generate.MaxNewTokens=6" ]
            let docs = [| "A short one."; "The council said the new park would open next year, with seven slides and a hotel."; "Rain." |]
            let together = Baseline.generateWith p.Generation 3 ignore p (Baseline.Documents docs)
            for i, d in Array.indexed docs do
                let alone = Baseline.generateWith p.Generation 1 ignore p (Baseline.Documents [| d |])
                Expect.sequenceEqual together[i].Ids alone[0].Ids (sprintf "document %d" i)
                Expect.equal together[i].Text alone[0].Text (sprintf "document %d's text" i)

        testWithShared "scripts/baseline_bart_xsum.fsx --smoke: bart-tiny on shared XSum documents, its table with lead-1 and the runs found" <| fun shared ->
            let runs = tempRuns ()
            try
                let scratch = Path.Combine(runs, "topk")
                Directory.CreateDirectory scratch |> ignore
                let r0 = Baseline.summarize ignore { smallRun shared runs with Limit = Some 1; Name = "other" }
                // a from-scratch run's scores: the same record, without baseline.json
                File.Copy(Path.Combine(r0.RunDir, "test_scores.json"), Path.Combine(scratch, "test_scores.json"))
                let r, table = Baseline.runScript ignore (Path.Combine(shared, "..")) [| "--smoke"; "--runs-dir"; runs |]
                Expect.equal r.Documents 4 "4 documents"
                Expect.stringContains table "bart-tiny (zero-shot)" "the pretrained row"
                Expect.stringContains table "lead-1" "the lead-1 row"
                Expect.stringContains table "from scratch: topk" "the from-scratch run found in the runs folder"
                Expect.isFalse (table.Contains "from scratch: other") "another baseline is not a from-scratch run"
            finally Directory.Delete(runs, true)
    ]
