/// BERTScore on a pretrained encoder (`Moe.Metrics.BertScorer`) against bert_score 0.3.13's own P/R/F recorded
/// for roberta-tiny (sample_outputs.json), the reference aggregation of `ModelBased.fs` run on the same encoder
/// (idf off and on), and the metric's properties: a text against itself scores 1, swapping candidate and
/// reference swaps P and R, idf is positive and zero for the special tokens; bad input is refused or counted.
module Moe.Tests.BertScoreTests

open System
open System.IO
open Expecto
open TorchSharp
open Moe
open Moe.Metrics
open Moe.Tests.Support
open Moe.Tests.T5Tests

/// bert_score's float32 P/R/F against ours.
let private scoreTol = 1e-5

let private roberta (shared: string) = modelDir shared "roberta-tiny"

/// The first `n` pyrxsum pairs (BertSumAbs summaries against the references), as the sample's settings say.
let private pairs (shared: string) (n: int) =
    let dir = Path.Combine(shared, "pyrxsum")
    (File.ReadAllLines(Path.Combine(dir, "summaries", "BertSumAbs.summary"))[.. n - 1]),
    (File.ReadAllLines(Path.Combine(dir, "references.txt"))[.. n - 1])

let private close (what: string) (want: Prf) (got: Prf) =
    for name, a, b in [ "P", want.Precision, got.Precision; "R", want.Recall, got.Recall; "F", want.F1, got.F1 ] do
        Expect.floatClose { absolute = scoreTol; relative = 0.0 } b a (sprintf "%s %s (want %.7f, got %.7f)" what name a b)

let private settings4 = { BertScorer.defaults with Layer = Some 4 }

/// roberta-tiny at layer 4 (the sample's num_layers), loaded once for the list (loading the tokenizer takes seconds).
let private shared4 =
    lazy (sharedData |> Option.map (fun shared -> new BertScorer.BertScoreModel(roberta shared, Some 4)))
let private tiny4 () = shared4.Force().Value

let tests =
    testList "Metrics.BertScorer" [
        testWithShared "roberta-tiny: P/R/F equal bert_score's recorded values (idf off), alone and among 20 pairs" (fun shared ->
            let model = tiny4 ()
            let s = (sample (roberta shared)).GetProperty "bertscore_2_pairs"
            let recorded =
                [| for p in (s.GetProperty "pairs").EnumerateArray() ->
                     let v = p.GetProperty "no_idf"
                     p.GetProperty("cand").GetString(), p.GetProperty("ref").GetString(),
                     { Precision = v.GetProperty("P").GetDouble(); Recall = v.GetProperty("R").GetDouble(); F1 = v.GetProperty("F").GetDouble() } |]
            let cands = recorded |> Array.map (fun (c, _, _) -> c)
            let refs = recorded |> Array.map (fun (_, r, _) -> r)
            let run = BertScorer.score settings4 model cands refs
            Array.iteri2 (fun i (_, _, want) got -> close (sprintf "pair %d" i) want got) recorded run.Scores
            let cands20, refs20 = pairs shared 20
            Expect.equal cands20[.. 1] cands "the sample's pairs are pyrxsum's first two"
            let run20 = BertScorer.score settings4 model cands20 refs20
            Array.iteri2 (fun i (_, _, want) got -> close (sprintf "pair %d of 20" i) want got) recorded run20.Scores[.. 1]
            // the reference aggregation (ModelBased.fs) on the same encoder agrees
            let viaInterface = BertScore.score { BertScore.defaults with IgnoredTokens = [| "<s>"; "</s>" |] } model cands refs
            Array.iteri2 (fun i (_, _, want) got -> close (sprintf "pair %d via IContextualEmbedder" i) want got) recorded viaInterface
            Expect.equal (run.Layer, run.TruncatedCandidates, run.TruncatedReferences) (4, 0, 0) "layer 4, nothing cut")

        testWithShared "idf on: weights from the references as bert_score, equal to the reference aggregation" (fun shared ->
            let model = tiny4 ()
            let cands, refs = pairs shared 6
            let run = BertScorer.score { settings4 with UseIdf = true } model cands refs
            let reference = BertScore.score { BertScore.defaults with UseIdf = true } model cands refs
            Array.iteri2 (fun i want got -> close (sprintf "pair %d with idf" i) want got) reference run.Scores
            let plain = BertScorer.score settings4 model cands refs
            Expect.isTrue (Array.exists2 (fun (a: Prf) (b: Prf) -> abs (a.F1 - b.F1) > 1e-4) plain.Scores run.Scores) "idf changes the scores"
            // idf: positive for tokens not in every reference, 0 for <s> and </s> (in every reference)
            let tokenSets = refs |> Array.map (fun r -> (model.Encode r).Ids |> Array.map string)
            let idf = BertScore.idf tokenSets
            Expect.equal (idf (string model.ClsId), idf (string model.SepId)) (0.0, 0.0) "special tokens get idf 0"
            for ids in tokenSets do
                for t in ids do
                    if tokenSets |> Array.exists (fun s -> not (Array.contains t s)) then
                        Expect.isGreaterThan (idf t) 0.0 (sprintf "idf of token %s is positive" t))

        testWithShared "properties: a text against itself scores 1; swapping the texts swaps P and R" (fun shared ->
            let model = tiny4 ()
            let cands, refs = pairs shared 4
            for s in (BertScorer.score settings4 model refs refs).Scores do
                close "self" { Precision = 1.0; Recall = 1.0; F1 = 1.0 } s
            let forward = (BertScorer.score { settings4 with BatchSize = 1 } model cands refs).Scores
            let backward = (BertScorer.score { settings4 with BatchSize = 1 } model refs cands).Scores
            Array.iter2 (fun (a: Prf) (b: Prf) -> close "swap" { Precision = a.Recall; Recall = a.Precision; F1 = a.F1 } b) forward backward
            let batched = (BertScorer.score settings4 model cands refs).Scores
            Array.iter2 (close "batch of 4 vs one pair at a time") forward batched)

        testWithShared "truncation at the model's length is counted; a baseline file rescales (x - b) / (1 - b)" (fun shared ->
            let model = tiny4 ()
            let docs = File.ReadAllLines(Path.Combine(shared, "pyrxsum", "documents.txt"))
            let long = String.Join(" ", docs[.. 4])
            Expect.isGreaterThan (model.Tokenizer.Encode(long, true).Length) model.MaxLength "the text is longer than the model takes"
            let cands, refs = pairs shared 2
            let run = BertScorer.score settings4 model [| long; cands[1] |] refs
            Expect.equal (run.TruncatedCandidates, run.TruncatedReferences, run.MaxLength) (1, 0, 512) "one candidate cut at 512 tokens"
            let file = Path.GetTempFileName()
            try
                File.WriteAllLines(file, [ "LAYER,P,R,F"; "0,0.1,0.1,0.1"; "1,0.2,0.2,0.2"; "2,0.3,0.3,0.3"; "3,0.4,0.4,0.4"; "4,0.5,0.6,0.7" ])
                let plain = (BertScorer.score settings4 model cands refs).Scores
                let rescaled = BertScorer.score { settings4 with BaselineFile = Some file } model cands refs
                Array.iter2 (fun (a: Prf) (b: Prf) ->
                    close "rescaled" { Precision = (a.Precision - 0.5) / 0.5; Recall = (a.Recall - 0.6) / 0.4; F1 = (a.F1 - 0.7) / 0.3 } b) plain rescaled.Scores
                File.WriteAllLines(file, [ "LAYER;P;R;F"; "0;0.1;0.1;0.1" ])
                let err = errorOf (fun () -> BertScorer.score { settings4 with BaselineFile = Some file } model cands refs |> ignore)
                Expect.stringContains err (file + ":1") "a bad header names the file and line"
            finally File.Delete file)

        testWithShared "bad input: empty text, unknown model name without a layer, layer out of range, wrong architecture" (fun shared ->
            let model = tiny4 ()
            let err = errorOf (fun () -> BertScorer.score settings4 model [| "a text"; "  " |] [| "one"; "two" |] |> ignore)
            Expect.stringContains err "candidate 2" "names the empty candidate"
            let err = errorOf (fun () -> (new BertScorer.BertScoreModel(roberta shared, None) :> IDisposable).Dispose())
            Expect.stringContains err "--bertscore-layer" "asks for the layer of a model bert_score does not list"
            let err = errorOf (fun () -> (new BertScorer.BertScoreModel(roberta shared, Some 5) :> IDisposable).Dispose())
            Expect.stringContains err "0 .. 4" "names the valid layers"
            let err = errorOf (fun () -> (new BertScorer.BertScoreModel(modelDir shared "gpt2-tiny-hf", Some 1) :> IDisposable).Dispose())
            Expect.stringContains err "gpt2" "names the folder's model_type")

        testWithShared "the score record: BERTScore means with intervals, per-example P/R/F in the JSON" (fun shared ->
            let model = tiny4 ()
            let cands, refs = pairs shared 5
            let run = BertScorer.score settings4 model cands refs
            let report =
                scoreCorpus { defaultOptions with Bootstrap = { defaultOptions.Bootstrap with Samples = 50 } } cands refs None
                |> withBertScore run
            let b = report.BertScore.Value
            Expect.floatClose Accuracy.veryHigh b.Estimate.F1.Mean (run.Scores |> Array.averageBy _.F1) "F1 mean"
            Expect.isTrue (b.Estimate.F1.Low <= b.Estimate.F1.Mean && b.Estimate.F1.Mean <= b.Estimate.F1.High) "the interval holds the mean"
            use doc = Text.Json.JsonDocument.Parse(toJsonWith true report)
            let bs = doc.RootElement.GetProperty "bertscore"
            Expect.equal (bs.GetProperty("layer").GetInt32(), bs.GetProperty("idf").GetBoolean()) (4, false) "settings recorded"
            let examples = [| for e in doc.RootElement.GetProperty("examples").EnumerateArray() -> e.GetProperty("bertscore").GetProperty("recall").GetDouble() |]
            Expect.equal examples (run.Scores |> Array.map _.Recall) "each pair's recall"
            Expect.stringContains (formatTable report) "bertscore" "the table shows BERTScore")

        testCase "the default layer comes from bert_score's model2layers, bounded by the layer count" (fun () ->
            Expect.equal (fst (BertScorer.chooseLayer "/models/roberta-large" None 24 None)) 17 "roberta-large 17"
            Expect.equal (fst (BertScorer.chooseLayer "/x/princeton-nlp/sup-simcse-roberta-base" None 12 None)) 10 "org/name"
            Expect.equal (fst (BertScorer.chooseLayer "/x/mine" (Some "bert-base-uncased") 12 None)) 9 "_name_or_path"
            Expect.equal (BertScorer.chooseLayer "/models/roberta-large" None 4 None |> fst) 4 "a reduced copy uses its last layer"
            Expect.equal (fst (BertScorer.chooseLayer "/models/roberta-large" None 24 (Some 3))) 3 "a requested layer wins")
    ]
