module Moe.Tests.SummaCTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Moe
open Moe.Metrics
open Moe.Metrics.Consistency
open Moe.Tests.Support
open Moe.Train

/// Tolerances named for where the expected numbers come from.
module STol =
    /// Hand-computed sums and differences of probabilities, float64 round-off only.
    let exact = 1e-12
    /// A float32 model against a float64 hand computation of the same formula.
    let float32Model = 1e-5
    /// The same float32 model on the same pairs in other batches (other padding): last-bit differences.
    let batching = 1e-6
    /// Issue 13: classifier logits within 1e-4 of transformers'.
    let logits = 1e-4

/// A hand-checkable NLI stub: a hypothesis equal to a premise is entailed (0.9 / 0.08 / 0.02), one listed as
/// contradicting it is contradicted (0.05 / 0.15 / 0.8), anything else is neutral (0.1 / 0.8 / 0.1).
type private TableNli(contradicts: (string * string) list) =
    let mutable calls = 0
    member _.Calls = calls
    interface IEntailmentScorer with
        member _.Name = "table (test)"
        member _.Score pairs =
            calls <- calls + 1
            pairs |> Array.map (fun p ->
                if p.Premise = p.Hypothesis then { Entailment = 0.9; Neutral = 0.08; Contradiction = 0.02 }
                elif List.contains (p.Premise, p.Hypothesis) contradicts then { Entailment = 0.05; Neutral = 0.15; Contradiction = 0.8 }
                else { Entailment = 0.1; Neutral = 0.8; Contradiction = 0.1 })

let private s1 = "Alice lives in Paris with her cat."
let private s2 = "Bob works at the bakery downtown."
let private c1 = "Alice does not live in Paris at all."
let private c2 = "Bob has never worked at the bakery."
let private document = s1 + " " + s2
let private stub () = TableNli [ s1, c1; s2, c2 ]

/// The stored text of a shared data file's lines.
let private lines (data: string) (path: string) = File.ReadAllText(Path.Combine(data, path)).Split('\n')

let private mnliDir () =
    match sharedData with
    | Some data -> Some(Path.Combine(data, "..", "models", "roberta-tiny-mnli"))
    | None -> None

let private withMnli (name: string) (body: string -> string -> unit) =
    testCase name (fun () ->
        match sharedData, mnliDir () with
        | Some data, Some dir when Directory.Exists dir -> body data dir
        | _ -> skiptest "needs ../shared/models/roberta-tiny-mnli beside the repository; absent in this clone")

/// The message of the ArgumentException `f` raises.
let private errorOf (f: unit -> unit) : string =
    try
        f ()
        failtest "expected an ArgumentException"
    with :? ArgumentException as e -> e.Message

let private sentences =
    testList "Sentences" [
        testCase "abbreviations, initials, decimals, quotes and line breaks" <| fun () ->
            let cases =
                [ "Mr. Smith paid $2.5 million. He left at 3 p.m. Then he slept.", [| "Mr. Smith paid $2.5 million."; "He left at 3 p.m."; "Then he slept." |]
                  "J. K. Rowling met Dr. Who in the U.S. last year. It rained.", [| "J. K. Rowling met Dr. Who in the U.S. last year."; "It rained." |]
                  "He said \"Stop!\" and left. \"Why?\" she asked. Nobody knew.", [| "He said \"Stop!\" and left."; "\"Why?\" she asked."; "Nobody knew." |]
                  "She said \"Go home.\" Then she left.", [| "She said \"Go home.\""; "Then she left." |]
                  "Pi is 3.14159 (roughly). Wow!! Really?! Yes...", [| "Pi is 3.14159 (roughly)."; "Wow!!"; "Really?!"; "Yes..." |]
                  "Apples, pears, etc. are fruit. Acme Inc. The end.", [| "Apples, pears, etc. are fruit."; "Acme Inc."; "The end." |]
                  "Item No. 5 sold. See fig. 2 for details", [| "Item No. 5 sold."; "See fig. 2 for details" |]
                  "First line without a stop\nSecond line.\n\n  Third one.  ", [| "First line without a stop"; "Second line."; "Third one." |]
                  "", [||]
                  "   \n ", [||] ]
            for text, expected in cases do
                Expect.equal (Sentences.split text) expected (sprintf "split %A" text)
        testCase "the sentences cover every non-space character once, in order" <| fun () ->
            let texts =
                [ "Mr. Smith paid $2.5 million. He left at 3 p.m. Then he slept."
                  "A.\nB? C! \"D.\" (E.) F... g. H"
                  String.replicate 3 "The U.N. met on Jan. 5. Talks (led by Gen. Lee) failed! Why? Nobody said. " ]
            for text in texts do
                let spans = Sentences.spans text
                let mutable at = 0
                for s, n in spans do
                    Expect.isGreaterThanOrEqual s at "spans are in order and disjoint"
                    Expect.isTrue (String.IsNullOrWhiteSpace(text.Substring(at, s - at))) "only white space between sentences"
                    at <- s + n
                Expect.isTrue (String.IsNullOrWhiteSpace(text.Substring at)) "only white space after the last"
                let strip (t: string) = String(t.ToCharArray() |> Array.filter (Char.IsWhiteSpace >> not))
                Expect.equal (strip (String.Concat(Sentences.split text))) (strip text) "every character once"
    ]

let private chunking =
    testList "chunks" [
        testCase "granularities as summac's split_text, and every sentence in exactly one chunk" <| fun () ->
            let text = "First sentence is here. Second one follows it.\n\nThird sentence, new paragraph. Fourth."
            let all = { defaults with MinChunkChars = 0 }
            let sents = chunks all Sentence text
            Expect.equal sents [| "First sentence is here."; "Second one follows it."; "Third sentence, new paragraph."; "Fourth." |] "sentences"
            Expect.equal (chunks defaults Sentence text) sents[0..2] "summac drops chunks of 10 characters or fewer"
            let paragraphs = chunks all Paragraph text
            Expect.equal paragraphs [| "First sentence is here. Second one follows it."; "Third sentence, new paragraph. Fourth." |] "paragraphs at blank lines"
            Expect.equal (chunks all Paragraph "one line here\ntwo lines there") [| "one line here"; "two lines there" |] "no blank line: line breaks"
            Expect.equal (chunks all Document text) [| text |] "document"
            let two = chunks all TwoSentences text
            Expect.equal two [| sents[0] + " " + sents[1]; sents[1] + " " + sents[2]; sents[2] + " " + sents[3]; sents[3] |] "2sents"
            Expect.equal (chunks all Mixed text) (Array.append sents paragraphs) "mixed: sentences then paragraphs"
            // Coverage: each sentence is one sentence chunk, starts exactly one 2sents chunk, lies in one paragraph.
            for s in sents do
                Expect.equal (sents |> Array.filter ((=) s)).Length 1 (sprintf "%s: one sentence chunk" s)
                Expect.equal (two |> Array.filter (fun c -> c.StartsWith s)).Length 1 (sprintf "%s: starts one 2sents chunk" s)
                Expect.equal (paragraphs |> Array.filter (fun p -> p.Contains s)).Length 1 (sprintf "%s: in one paragraph" s)
        testCase "granularity names parse as summac's, bad ones say what is expected" <| fun () ->
            Expect.equal (Granularity.parse "sentence") (Ok(Sentence, Sentence)) "one name"
            Expect.equal (Granularity.parse "paragraph-2sents") (Ok(Paragraph, TwoSentences)) "document-summary"
            match Granularity.parse "sentences" with
            | Error e -> Expect.stringContains e "2sents" "lists the names"
            | Ok _ -> failtest "expected an error"
        testCase "document chunks past MaxDocumentChunks are counted, not scored" <| fun () ->
            let img = (images { defaults with MaxDocumentChunks = 1 } (stub ()) [| document |] [| s2 |])[0]
            Expect.equal img.DocumentChunks [| s1 |] "first chunk only"
            Expect.equal img.DroppedDocumentChunks 1 "one dropped"
    ]

let private zeroShot =
    testList "SummaC-ZS" [
        testCase "a summary made of document sentences scores above one contradicting them (hand-computed)" <| fun () ->
            let nli = stub ()
            let score cfg summary = summacZs cfg nli document summary
            // Consistent: per sentence max e = 0.9, max c = max(0.02, 0.1) = 0.1 -> 0.8 (the maximum of e - c would be 0.88).
            Expect.floatClose { absolute = STol.exact; relative = 0.0 } (score defaults (s1 + " " + s2)) 0.8 "consistent"
            // Contradicting: max e = max(0.05, 0.1) = 0.1, max c = 0.8 -> -0.7 for both sentences.
            Expect.floatClose { absolute = STol.exact; relative = 0.0 } (score defaults (c1 + " " + c2)) -0.7 "contradicting"
            Expect.floatClose { absolute = STol.exact; relative = 0.0 } (score defaults (s1 + " " + c2)) 0.05 "(0.8 - 0.7) / 2"
            let entOnly = { defaults with UseContradiction = false }
            let conOnly = { defaults with UseEntailment = false }
            Expect.floatClose { absolute = STol.exact; relative = 0.0 } (score entOnly (s1 + " " + s2)) 0.9 "use_ent only: max e"
            Expect.floatClose { absolute = STol.exact; relative = 0.0 } (score conOnly (c1 + " " + c2)) 0.2 "use_con only: 1 - max c"
            Expect.floatClose { absolute = STol.exact; relative = 0.0 } (score { defaults with OverSummary = Min } (s1 + " " + c2)) -0.7 "op2 min"
            Expect.floatClose { absolute = STol.exact; relative = 0.0 } (score { defaults with OverDocument = Mean } s1) 0.44 "op1 mean: (0.9+0.1)/2 - (0.02+0.1)/2"
        testCase "images batch every pair of every example into one call, in order" <| fun () ->
            let nli = stub ()
            let imgs = images defaults nli [| document; document |] [| s1 + " " + s2; c2 |]
            Expect.equal nli.Calls 1 "one call"
            Expect.equal (Array2D.length2 imgs[0].Entailment, Array2D.length2 imgs[1].Entailment) (2, 1) "Q per example"
            Expect.floatClose { absolute = STol.exact; relative = 0.0 } imgs[1].Contradiction[1, 0] 0.8 "example 2: s2 vs c2"
            for x in chunkScores defaults imgs[0] do Expect.floatClose { absolute = STol.exact; relative = 0.0 } x 0.8 "0.9 - 0.1"
        testCase "empty summaries are errors; summaries with no chunk over 10 characters get summac's zero image" <| fun () ->
            let nli = stub ()
            Expect.throwsT<ArgumentException> (fun () -> summacZs defaults nli document "  " |> ignore) "empty summary"
            Expect.throwsT<ArgumentException> (fun () -> images defaults nli [| ""; document |] [| s1; s1 |] |> ignore) "empty document"
            let img = (images defaults nli [| document |] [| "Too short." |])[0]
            Expect.isEmpty img.SummaryChunks "no chunk"
            Expect.equal (zsScore defaults img) 0.0 "zero image scores 0, as summac"
        testCase "NLI labels are read from the label names; a model without entailment/contradiction is refused" <| fun () ->
            Expect.equal (labelIds "m" [| "CONTRADICTION"; "NEUTRAL"; "ENTAILMENT" |]) (2, 0, Some 1) "roberta-large-mnli"
            Expect.equal (labelIds "m" [| "SUPPORTS"; "REFUTES"; "NOT ENOUGH INFO" |]) (0, 1, Some 2) "vitaminc"
            Expect.equal (labelIds "m" [| "entailment"; "contradiction" |]) (0, 1, None) "two classes"
            let msg = errorOf (fun () -> labelIds "cfg.json" [| "LABEL_0"; "LABEL_1"; "LABEL_2" |] |> ignore)
            Expect.stringContains msg "entailment" "says what is missing"
            Expect.stringContains msg "LABEL_0, LABEL_1, LABEL_2" "names the labels it found"
    ]

let private publishedWeights () = Path.Combine(repoRoot, "tests", "data", "summac", "summac_conv_vitc_sent_perc_e.bin")

/// An image with only the entailment channel set [P; Q].
let private entailmentImage (e: float[,]) : Image =
    { Entailment = e; Contradiction = Array2D.zeroCreate (Array2D.length1 e) (Array2D.length2 e); Neutral = Array2D.zeroCreate (Array2D.length1 e) (Array2D.length2 e)
      DocumentChunks = Array.create (Array2D.length1 e) "d"; SummaryChunks = Array.create (Array2D.length2 e) "s"; DroppedDocumentChunks = 0 }

let private conv =
    testList "SummaC-Conv" [
        testCase "histograms count as numpy's histogram; bins as summac's" <| fun () ->
            Expect.equal (SummaCConv.histogram [| 0.0; 0.5; 1.0 |] [ 0.0; 0.5; 1.0; 0.25; -0.1; 1.1 ]) [| 2; 2 |] "half-open bins, last one closed, outside dropped"
            Expect.equal (SummaCConv.binEdges (SummaCConv.Even 4)) [| 0.0; 0.25; 0.5; 0.75; 1.0 |] "even4"
            Expect.equal (SummaCConv.binEdges (SummaCConv.Even 49)).Length 51 "numpy's arange(0, 1, 1/49) has 50 values"
            Expect.equal (SummaCConv.binEdges SummaCConv.Percentile).Length 24 "23 percentile bins"
            let img = entailmentImage (array2D [ [ 0.995; 0.05 ]; [ 0.2; 0.5 ]; [ 0.92; 0.005 ] ])
            let hist, rows = SummaCConv.histograms SummaCConv.defaults img
            Expect.equal rows 2 "two summary chunks"
            Expect.equal hist.Length 10 "padded to 10 rows"
            let nonzero (row: float32[]) = [ for k in 0 .. row.Length - 1 do if row[k] <> 0.0f then k, row[k] ]
            Expect.equal (nonzero hist[0]) [ 6, 1.0f; 10, 1.0f; 22, 1.0f ] "0.2 in [0.13, 0.37), 0.92 in [0.92, 0.93), 0.995 in the last bin"
            Expect.equal (nonzero hist[1]) [ 0, 1.0f; 4, 1.0f; 7, 1.0f ] "0.005, 0.05, 0.5"
            Expect.isEmpty (nonzero hist[2]) "padding"
            let ecn, _ = SummaCConv.histograms { SummaCConv.defaults with Labels = "ecn" } img
            Expect.equal ecn[0].Length 69 "three channels of 23 bins"
            Expect.equal (ecn[0][23..] |> Array.sum) 6.0f "contradiction and neutral channels count every document chunk"
        testSequenced (testCase "summac's published weights load and score a hand-computed image" (fun () ->
            use model = SummaCConv.load SummaCConv.defaults (publishedWeights ())
            let img = entailmentImage (array2D [ [ 0.995; 0.05 ]; [ 0.2; 0.5 ]; [ 0.92; 0.005 ] ])
            // Reference: the four tensors unpacked from the file with Python's struct and the formula of summac's
            // SummaCConv.forward evaluated in float64 (mlp rows -2.1758844, 0.5320541; mean -0.8219152).
            Expect.floatClose { absolute = STol.float32Model; relative = 0.0 } (SummaCConv.score model [| img |]).[0] 0.7227409770605527 "score"
            let msg = errorOf (fun () -> (SummaCConv.load { SummaCConv.defaults with Bins = SummaCConv.Even 50 } (publishedWeights ())).Dispose())
            Expect.stringContains msg "mlp.weight" "names the tensor"
            Expect.stringContains msg "even50" "and the settings that do not fit"))
        testSequenced (testCase "weights round-trip through safetensors with their settings" (fun () ->
            let dir = Path.Combine(Path.GetTempPath(), sprintf "summac-conv-%d" (Random().Next()))
            Directory.CreateDirectory dir |> ignore
            try
                torch.manual_seed 3L |> ignore
                let cfg = { SummaCConv.defaults with Bins = SummaCConv.Even 5; Labels = "ec"; Rows = 4 }
                use model = new SummaCConv.ConvModel(cfg)
                let path = Path.Combine(dir, "conv.safetensors")
                SummaCConv.save path model
                use back = SummaCConv.load SummaCConv.defaults path
                Expect.equal back.Config cfg "settings from the metadata"
                let img = entailmentImage (array2D [ [ 0.7; 0.1; 0.3 ]; [ 0.2; 0.9; 0.35 ] ])
                Expect.equal (SummaCConv.score back [| img |]) (SummaCConv.score model [| img |]) "same scores"
            finally Directory.Delete(dir, true)))
    ]

let private checkpoint =
    testList "NLI checkpoint" [
        withMnli "roberta-tiny-mnli: pair logits equal transformers', label order from id2label, truncation counted" (fun data dir ->
            let sample = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json"))).RootElement.GetProperty "pair0_alone"
            let recordedIds = [| for v in (sample.GetProperty "input_ids").EnumerateArray() -> v.GetInt32() |]
            let doc0 = (lines data "pyrxsum/documents.txt")[0]
            let ref0 = (lines data "pyrxsum/references.txt")[0]
            use nli = Nli.load { Nli.defaults with MaxTokens = recordedIds.Length } dir
            Expect.equal (fst (nli.Encode(doc0, ref0))) recordedIds "input ids (longest-first truncation)"
            let pair = { Premise = doc0; Hypothesis = ref0 }
            let logits = (nli.Logits [| pair; { Premise = "A short premise."; Hypothesis = ref0 } |])[0]
            let expected = [| for v in (sample.GetProperty "logits").EnumerateArray() -> v.GetDouble() |]
            for k in 0 .. 2 do
                Expect.floatClose { absolute = STol.logits; relative = 0.0 } (float logits[k]) expected[k] (sprintf "logit %d (batched with a shorter pair)" k)
            Expect.equal nli.TruncatedPairs 1 "docs[0] + refs[0] is cut to the limit"
            let probs = (entailmentScorer nli).Score [| pair |]
            let softmax = [| for v in (sample.GetProperty "softmax").EnumerateArray() -> v.GetDouble() |]
            Expect.floatClose { absolute = STol.logits; relative = 0.0 } probs[0].Contradiction softmax[0] "CONTRADICTION is id 0"
            Expect.floatClose { absolute = STol.logits; relative = 0.0 } probs[0].Entailment softmax[2] "ENTAILMENT is id 2")
        withMnli "roberta-tiny-mnli: corpus SummaC-ZS and Conv in the score report, each example computed exactly" (fun data dir ->
            let docs = (lines data "pyrxsum/documents.txt")[0..1]
            let refs = (lines data "pyrxsum/references.txt")[0..1]
            let preds = [| refs[0] + " " + refs[1]; refs[1] |]
            use nli = Nli.load Nli.defaults dir
            use convModel = SummaCConv.load SummaCConv.defaults (publishedWeights ())
            let run = SummaC.run defaults (Some(convModel, "published")) nli docs preds
            // By hand: each summary sentence's max entailment minus max contradiction over the document's sentences.
            let model = nli :> INliModel
            for k in 0 .. 1 do
                let premises = chunks defaults Sentence docs[k]
                let hyps = chunks defaults Sentence preds[k]
                let perSentence =
                    hyps |> Array.map (fun h ->
                        let probs = model.Probabilities [| for p in premises -> { Premise = p; Hypothesis = h } |]
                        (probs |> Array.map (fun p -> p[2]) |> Array.max) - (probs |> Array.map (fun p -> p[0]) |> Array.max))
                Expect.floatClose { absolute = STol.batching; relative = 0.0 } run.Examples[k].Zs (Array.average perSentence) (sprintf "example %d" k)
                Expect.isSome run.Examples[k].Conv "conv computed"
            let report = scoreCorpus defaultOptions preds refs (Some docs) |> withSummaC run
            let json = JsonDocument.Parse(toJsonWith true report).RootElement
            Expect.floatClose { absolute = STol.exact; relative = 0.0 } (json.GetProperty("summac_zs").GetDouble()) ((run.Examples[0].Zs + run.Examples[1].Zs) / 2.0) "corpus mean"
            Expect.equal ((json.GetProperty "examples").[1].GetProperty("summac_zs").GetDouble()) run.Examples[1].Zs "per example"
            Expect.equal ((json.GetProperty "summac_counts").GetProperty("pairs").GetInt32()) run.Pairs "counts"
            Expect.isTrue (report.SummaC.Value.Zs.Low <= report.SummaC.Value.Zs.Mean && report.SummaC.Value.Zs.Mean <= report.SummaC.Value.Zs.High) "interval around the mean"
            Expect.stringContains (formatTable report) "summac-conv" "in the table")
        withMnli "a classifier whose id2label has no entailment/contradiction is refused" (fun _ dir ->
            let copy = Path.Combine(Path.GetTempPath(), sprintf "nli-labels-%d" (Random().Next()))
            Directory.CreateDirectory copy |> ignore
            try
                for f in Directory.GetFiles dir do
                    if Path.GetFileName f <> "config.json" then File.CreateSymbolicLink(Path.Combine(copy, Path.GetFileName f), Path.GetFullPath f) |> ignore
                let config = File.ReadAllText(Path.Combine(dir, "config.json")).Replace("\"CONTRADICTION\"", "\"LABEL_0\"").Replace("\"ENTAILMENT\"", "\"LABEL_2\"")
                File.WriteAllText(Path.Combine(copy, "config.json"), config)
                let msg = errorOf (fun () -> (Nli.load Nli.defaults copy :> IDisposable).Dispose())
                Expect.stringContains msg "config.json" "names the file"
                Expect.stringContains msg "LABEL_0" "and the labels"
            finally Directory.Delete(copy, true))
    ]

let private training =
    testList "SummaC-Conv training" [
        testSequenced (testCase "the training loop fits a convolution that separates a constructed set" (fun () ->
            let dir = Path.Combine(Path.GetTempPath(), sprintf "summac-train-%d" (Random().Next()))
            try
                torch.manual_seed 5L |> ignore
                let rng = Random 11
                // Consistent summaries: each sentence has one document chunk entailing it (0.9-1.0); inconsistent
                // ones: no chunk above 0.3. Three document chunks, one to three summary sentences.
                let make consistent =
                    let q = rng.Next(1, 4)
                    entailmentImage (Array2D.init 3 q (fun i _ -> if consistent && i = 0 then 0.9 + 0.1 * rng.NextDouble() else 0.3 * rng.NextDouble()))
                let labels = Array.init 40 (fun i -> i % 2)
                let images = labels |> Array.map (fun l -> make (l = 1))
                let settings = { ConsistencyTraining.defaults with Conv = { SummaCConv.defaults with Bins = SummaCConv.Even 10 }; Epochs = 10 }
                let quiet = { RunOptions.Defaults with Progress = Silent; Output = TextWriter.Null }
                let model, result = ConsistencyTraining.trainOnImages settings quiet images labels dir
                use model = model
                let scores = SummaCConv.score model images
                let pos = [| for i in 0 .. 39 do if labels[i] = 1 then scores[i] |]
                let neg = [| for i in 0 .. 39 do if labels[i] = 0 then scores[i] |]
                Expect.isGreaterThan (Array.min pos) (Array.max neg) "every consistent example above every inconsistent one"
                Expect.isGreaterThan (Array.min pos) 0.5 "classified consistent"
                Expect.isLessThan (Array.max neg) 0.5 "classified inconsistent"
                Expect.equal result.Steps 20 "10 epochs of 2 batches"
                use back = SummaCConv.load SummaCConv.defaults (Path.Combine(dir, ConsistencyTraining.weightsName))
                Expect.equal (SummaCConv.score back images) scores "the saved weights give the same scores"
            finally if Directory.Exists dir then Directory.Delete(dir, true)))
        testCase "consistency sets are read from JSON Lines; a bad line is named" <| fun () ->
            let path = Path.GetTempFileName()
            try
                File.WriteAllLines(path, [| """{"document": "D one.", "summary": "S.", "label": 1}"""; ""; """{"document": "D two.", "summary": "T.", "label": 0}""" |])
                let set = ConsistencyTraining.readJsonl path
                Expect.equal set [| { Document = "D one."; Summary = "S."; Label = 1 }; { Document = "D two."; Summary = "T."; Label = 0 } |] "two examples"
                File.AppendAllLines(path, [| """{"document": "D", "summary": "S", "label": 2}""" |])
                let msg = try (ConsistencyTraining.readJsonl path |> ignore; "") with :? TextTools.DataException as e -> e.Message
                Expect.stringContains msg (sprintf "%s:4" path) "file and line"
                Expect.stringContains msg "label" "what is wrong"
            finally File.Delete path
    ]

let tests = testList "SummaC" [ sentences; chunking; zeroShot; conv; checkpoint; training ]
