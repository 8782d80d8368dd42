/// Run folder readers, charts, the report page, and the page drawn by headless Chromium.
module Moe.Tests.PlotsTests

open System
open System.Diagnostics
open System.IO
open System.IO.Compression
open System.Text
open System.Text.Json
open System.Text.RegularExpressions
open Expecto
open FsCheck
open FsCheck.FSharp
open Plotly.NET
open Moe
open Moe.RunLog
open Moe.Tests.Support

// ---------------------------------------------------------------------------------------------
// Synthetic run folders (written by the tests; the report does not care that the numbers are made up)

let private invariant = Globalization.CultureInfo.InvariantCulture
let private num (x: float) = x.ToString("R", invariant)

let private tempDir (tag: string) =
    let dir = Path.Combine(Path.GetTempPath(), sprintf "moe-%s-%s" tag (Guid.NewGuid().ToString("N").Substring(0, 8)))
    Directory.CreateDirectory dir |> ignore
    dir

/// Shape of the synthetic logs.
module Synthetic =
    let experts = 4
    let layers = [ "enc.0"; "dec.0" ]
    let steps = [ for s in 1 .. 10 -> s * 100 ]
    let labels = [ "sport"; "politics"; "science" ]
    let examples = 6

/// Writes a run folder. `skew` in [0, 1) moves routing from uniform toward expert 0 over training,
/// so two runs differ visibly; `configExtra` lands in config.json as is.
let writeRun (root: string) (name: string) (skew: float) (withCi: bool) (configExtra: string) (prediction: int -> string) : string =
    let dir = Path.Combine(root, name)
    Directory.CreateDirectory dir |> ignore
    let write (file: string) (lines: string seq) = File.WriteAllLines(Path.Combine(dir, file), lines)
    write "config.json"
        [ sprintf """{"model": {"d_model": 64, "layers": 2, "moe": {"experts": %d, "top_k": %d, "router": "%s"}}, "train": {"lr": 0.0003, "aux_weight": %s}, "extra": %s}"""
              Synthetic.experts (if skew > 0.5 then 1 else 2) (if skew > 0.5 then "switch" else "topk") (num (0.01 * (1.0 - skew))) configExtra ]
    write "metrics.jsonl"
        [ for i, s in List.indexed Synthetic.steps do
            let task = 6.0 / (1.0 + 0.3 * float i) + skew * 0.2
            yield sprintf """{"step": %d, "split": "train", "loss": %s, "task_loss": %s, "aux": {"switch_aux": %s, "z_loss": %s}, "lr": 0.0003, "tokens_per_s": 12000.0, "elapsed_s": %s}"""
                      s (num (task + 0.02)) (num task) (num (1.0 + skew * float i / 10.0)) (num (0.5 / float (i + 1))) (num (float i * 1.5))
            if i % 3 = 2 then yield sprintf """{"step": %d, "split": "valid", "loss": %s}""" s (num (task + 0.15)) ]
    write "routing.jsonl"
        [ for i, s in List.indexed Synthetic.steps do
            for l, layer in List.indexed Synthetic.layers do
                let drift = skew * float i / float Synthetic.steps.Length
                let raw = Array.init Synthetic.experts (fun e -> if e = 0 then 1.0 + 6.0 * drift else 1.0 - drift * float e / float Synthetic.experts + 0.05 * float l)
                let total = Array.sum raw
                let shares = raw |> Array.map (fun x -> num (x / total))
                yield sprintf """{"step": %d, "layer": "%s", "tokens_per_expert": [%s], "dropped_fraction": %s, "router_entropy": %s}"""
                          s layer (String.Join(", ", shares)) (num (0.02 * drift)) (num (log (float Synthetic.experts) - drift)) ]
    let counts l = [ for j in 0 .. Synthetic.labels.Length - 1 -> String.Join(", ", [ for e in 0 .. Synthetic.experts - 1 -> string (10 + 40 * ((j + e + l) % Synthetic.experts)) ]) ]
    write "routing_by_label.json"
        [ sprintf """{"layers": [%s]}"""
              (String.Join(", ",
                  [ for l, layer in List.indexed Synthetic.layers ->
                      sprintf """{"layer": "%s", "labels": [%s], "experts": %d, "counts": [%s]}""" layer
                          (String.Join(", ", Synthetic.labels |> List.map (sprintf "\"%s\""))) Synthetic.experts
                          (String.Join(", ", counts l |> List.map (sprintf "[%s]"))) ])) ]
    let rouge p = sprintf """{"precision": %s, "recall": %s, "f1": %s}""" (num p) (num (p + 0.02)) (num (p + 0.01))
    let model = 0.30 - 0.05 * skew
    let ci (v: float) = sprintf """{"low": %s, "mid": %s, "high": %s}""" (num (v - 0.01)) (num v) (num (v + 0.012))
    write "test_scores.json"
        [ sprintf """{"model": {"n": %d, "rouge1": %s, "rouge2": %s, "rougeL": %s, "rougeLsum": %s, "bleu": %s, "compression": 0.12, "novel_ngrams": {"1": 0.2, "2": 0.5}},"""
              Synthetic.examples (rouge model) (rouge (model / 3.0)) (rouge (model * 0.8)) (rouge (model * 0.85)) (num (100.0 * model / 4.0))
          (if withCi then
               sprintf """ "model_ci": {"rouge1": %s, "rouge2": %s, "rougeL": %s, "bleu": %s},"""
                   (ci (model + 0.01)) (ci (model / 3.0 + 0.01)) (ci (model * 0.8 + 0.01)) (ci (100.0 * model / 4.0))
           else "")
          """ "lead1": {"n": 6, "rouge1": {"precision": 0.2, "recall": 0.3, "f1": 0.22}, "rouge2": {"precision": 0.05, "recall": 0.06, "f1": 0.055}, "rougeL": {"precision": 0.15, "recall": 0.2, "f1": 0.17}, "bleu": 3.1}}""" ]
    write "documents.txt" [ for i in 0 .. Synthetic.examples - 1 -> sprintf "Document %d: the council met on Tuesday to discuss the new stadium, which will cost more than planned, officials said." i ]
    write "references.txt" [ for i in 0 .. Synthetic.examples - 1 -> sprintf "Reference %d: stadium costs rise." i ]
    write "predictions.txt" [ for i in 0 .. Synthetic.examples - 1 -> prediction i ]
    dir

let private twoRuns (root: string) =
    [ writeRun root "moe-switch" 0.9 true "\"plain\"" (sprintf "Switch model summary %d: the stadium will cost more.")
      writeRun root "moe-topk" 0.1 false "\"plain\"" (sprintf "Top-k model summary %d: council discusses stadium.") ]

// ---------------------------------------------------------------------------------------------
// Helpers

/// The message of the RunFileException that `f` raises (fails the test if it raises none).
let private runFileError (f: unit -> 'a) : RunFileException =
    try
        f () |> ignore
        failtest "expected a RunFileException, none was raised"
    with :? RunFileException as e -> e

let private writeFile (dir: string) (name: string) (text: string) =
    let path = Path.Combine(dir, name)
    File.WriteAllText(path, text)
    path

let private figure (chart: GenericChart) : JsonElement =
    use doc = JsonDocument.Parse(GenericChart.toFigureJson chart)
    doc.RootElement.Clone()

let private traces (chart: GenericChart) = [ for t in (figure chart).GetProperty("data").EnumerateArray() -> t ]

let private str (e: JsonElement) (name: string) = e.GetProperty(name).GetString()

let private floats (e: JsonElement) = [| for x in e.EnumerateArray() -> x.GetDouble() |]

let private routingRecord (step: int) (layer: string) (shares: float[]) =
    { Step = step; Layer = layer; TokensPerExpert = shares; DroppedFraction = 0.0; RouterEntropy = 1.0 }

// ---------------------------------------------------------------------------------------------
// Readers

let readerTests =
    testList "readers" [
        testCase "reads a synthetic run folder" <| fun () ->
            let root = tempDir "read"
            try
                let run = load (List.head (twoRuns root))
                Expect.equal run.Name "moe-switch" "the folder name"
                Expect.equal run.Metrics.Length (Synthetic.steps.Length + 3) "10 train and 3 valid lines"
                let first = run.Metrics.[0]
                Expect.equal first.Split "train" "split"
                Expect.isSome first.TaskLoss "task_loss"
                Expect.equal (first.Aux |> Map.keys |> Seq.toList) [ "switch_aux"; "z_loss" ] "aux names"
                Expect.equal run.Routing.Length (Synthetic.steps.Length * Synthetic.layers.Length) "one routing line per layer per step"
                Expect.equal (layersOf run.Routing) (List.toArray Synthetic.layers) "layers in order"
                let byLabel = Expect.wantSome run.ByLabel "routing_by_label.json"
                Expect.equal byLabel.[0].Labels (List.toArray Synthetic.labels) "labels"
                let scores = Expect.wantSome run.Scores "test_scores.json"
                Expect.equal (scores |> Array.map (fun s -> s.System)) [| "model"; "lead1" |] "systems, _ci folded in"
                let model = scores.[0]
                Expect.equal (model.Rouge |> Map.keys |> Seq.toList) [ "rouge1"; "rouge2"; "rougeL"; "rougeLsum" ] "ROUGE variants"
                Expect.floatClose Accuracy.veryHigh model.Scalars.["novel_ngrams.2"] 0.5 "nested scores flattened"
                let ci = Expect.wantSome (model.IntervalOf "rouge1") "rouge1 interval"
                Expect.isLessThan ci.Low ci.High "low < high"
                Expect.isNone (scores.[1].IntervalOf "rouge1") "lead1 has no intervals"
                let config = Expect.wantSome run.Config "config.json"
                let experts = config |> Array.find (fun e -> e.Path = "model.moe.experts")
                Expect.equal experts.Value "4" "config leaves by dotted path"
                let texts = Expect.wantSome run.Texts "texts"
                Expect.equal texts.Predictions.Length Synthetic.examples "aligned predictions"
                Expect.isSome texts.Documents "documents"
            finally Directory.Delete(root, true)

        testCase "test_scores.json written from Metrics score reports reads back with its intervals" <| fun () ->
            let dir = tempDir "scores"
            try
                let refs = [| "the cat sat on the mat"; "a dog barked at night"; "rain fell all day long"; "markets rose on friday" |]
                let preds = [| "the cat sat"; "a dog barked loudly at night"; "it rained"; "markets rose" |]
                let docs = [| "the cat sat on the mat all day"; "a dog barked at night and woke us"; "rain fell all day long in the city"; "markets rose on friday after news" |]
                let opts = { Metrics.Scoring.defaultOptions with Bootstrap = { Metrics.Scoring.defaultOptions.Bootstrap with Samples = 50 } }
                let model = Metrics.Scoring.scoreCorpus opts preds refs (Some docs)
                let lead = Metrics.Scoring.scoreCorpus opts docs refs None
                let path = Path.Combine(dir, "test_scores.json")
                writeTestScores path [| "model", model; "lead1", lead |]
                let read = readTestScores path
                Expect.equal (read |> Array.map (fun s -> s.System)) [| "model"; "lead1" |] "systems"
                Expect.floatClose Accuracy.veryHigh read.[0].Rouge.["rouge1"].F1 model.Rouge1.F1.Mean "F1"
                Expect.floatClose Accuracy.veryHigh read.[0].Scalars.["bleu"] model.Bleu.Score "corpus BLEU"
                Expect.floatClose Accuracy.veryHigh read.[0].Scalars.["novel_ngrams.2"] (Option.get model.Document).NovelNgrams.[1].Mean "novel bigrams"
                let ci = Expect.wantSome (read.[0].IntervalOf "rouge2") "rouge2 interval"
                Expect.floatClose Accuracy.veryHigh ci.Low model.Rouge2.F1.Low "low"
                Expect.floatClose Accuracy.veryHigh ci.High model.Rouge2.F1.High "high"
                Expect.isNone (read.[0].IntervalOf "bleu") "no interval for corpus BLEU"
                Expect.isNone (read.[1].IntervalOf "compression") "lead1 scored without documents"
                Expect.throwsT<ArgumentException> (fun () -> testScoresJson [| "model_ci", model |] |> ignore) "reserved suffix"
            finally Directory.Delete(dir, true)

        testCase "metrics.jsonl: invalid JSON names the file and line" <| fun () ->
            let dir = tempDir "bad"
            try
                let path = writeFile dir "metrics.jsonl" "{\"step\": 1, \"split\": \"train\", \"loss\": 3.0}\n\n{\"step\": 2, \"split\": \"train\", \"loss\": 2.9\n"
                let e = runFileError (fun () -> readMetrics path)
                Expect.equal e.Line 3 "the third line (a blank line still counts)"
                Expect.stringStarts e.Message (path + ":3: not valid JSON") "file:line first"
            finally Directory.Delete(dir, true)

        testCase "metrics.jsonl: a missing or mistyped field says what was expected" <| fun () ->
            let dir = tempDir "bad"
            try
                let path = writeFile dir "metrics.jsonl" "{\"step\": 1, \"split\": \"train\", \"loss\": 3.0}\n{\"step\": 2, \"split\": \"train\"}\n"
                let e = runFileError (fun () -> readMetrics path)
                Expect.stringStarts e.Message (path + ":2:") "line 2"
                Expect.stringContains e.Message "\"loss\"" "names the field"
                let path = writeFile dir "metrics.jsonl" "{\"step\": \"one\", \"split\": \"train\", \"loss\": 3.0}\n"
                let e = runFileError (fun () -> readMetrics path)
                Expect.stringContains e.Message "expected \"step\" to be an integer, got the string \"one\"" "kind of value found"
                let path = writeFile dir "metrics.jsonl" "[1, 2]\n"
                Expect.stringContains (runFileError (fun () -> readMetrics path)).Message "expected the line to be an object, got an array" "not an object"
            finally Directory.Delete(dir, true)

        testCase "metrics.jsonl: named float literals are data" <| fun () ->
            let dir = tempDir "nan"
            try
                let path = writeFile dir "metrics.jsonl" "{\"step\": 1, \"split\": \"train\", \"loss\": \"NaN\"}\n"
                Expect.isTrue (Double.IsNaN (readMetrics path).[0].Loss) "a diverged loss reads as NaN"
            finally Directory.Delete(dir, true)

        testCase "routing.jsonl: rejects bad shares, fractions and changing expert counts" <| fun () ->
            let dir = tempDir "bad"
            try
                let line step layer (shares: string) dropped =
                    sprintf """{"step": %d, "layer": "%s", "tokens_per_expert": [%s], "dropped_fraction": %s, "router_entropy": 1.0}""" step layer shares dropped
                let check (lines: string list) (lineNo: int) (fragment: string) =
                    let path = writeFile dir "routing.jsonl" (String.Join("\n", lines))
                    let e = runFileError (fun () -> readRouting path)
                    Expect.equal e.Line lineNo (sprintf "line of: %s" fragment)
                    Expect.stringContains e.Message fragment "reason"
                check [ line 1 "enc.0" "0.5, 0.5" "0"; line 1 "enc.0" "0.5, -0.1" "0" ] 2 "tokens_per_expert[1] to be a finite number >= 0"
                check [ line 1 "enc.0" "0.5, 0.5" "1.5" ] 1 "\"dropped_fraction\" in [0, 1]"
                check [ line 1 "enc.0" "0.5, 0.5" "0"; line 1 "dec.0" "1.0" "0"; line 2 "enc.0" "0.3, 0.3, 0.4" "0" ] 3 "expected 2 experts for layer \"enc.0\" (as on line 1), got 3"
                check [ line 1 "enc.0" "" "0" ] 1 "empty array"
            finally Directory.Delete(dir, true)

        testCase "routing_by_label.json: a short row names its JSON path" <| fun () ->
            let dir = tempDir "bad"
            try
                let path = writeFile dir "routing_by_label.json" """{"layers": [{"layer": "enc.0", "labels": ["a", "b"], "experts": 3, "counts": [[1, 2, 3], [4, 5]]}]}"""
                let e = runFileError (fun () -> readRoutingByLabel path)
                Expect.stringContains e.Message "layers[0].counts[1] to hold 3 numbers (one per expert), got 2" "path and counts"
                let path = writeFile dir "routing_by_label.json" "{\"layers\": [\n  {\"layer\": \"enc.0\",,}\n]}"
                let e = runFileError (fun () -> readRoutingByLabel path)
                Expect.equal e.Line 2 "syntax errors carry the line"
            finally Directory.Delete(dir, true)

        testCase "test_scores.json: intervals need their system, scores need numbers" <| fun () ->
            let dir = tempDir "bad"
            try
                let path = writeFile dir "test_scores.json" """{"model_ci": {"rouge1": {"low": 0.1, "mid": 0.2, "high": 0.3}}}"""
                Expect.stringContains (runFileError (fun () -> readTestScores path)).Message "found \"model_ci\" but no score record \"model\"" "orphan interval"
                let path = writeFile dir "test_scores.json" """{"model": {"rouge1": {"precision": 0.1, "recall": 0.2, "f1": "high"}}}"""
                Expect.stringContains (runFileError (fun () -> readTestScores path)).Message "model.rouge1.f1 to be a number" "mistyped F1"
                let path = writeFile dir "test_scores.json" """{"model": {"bleu": 3.0}, "model_ci": {"bleu": {"low": 0.4, "mid": 0.2, "high": 0.3}}}"""
                Expect.stringContains (runFileError (fun () -> readTestScores path)).Message "low <= mid <= high" "unordered interval"
            finally Directory.Delete(dir, true)

        testCase "text files: invalid UTF-8 names the line; counts must align" <| fun () ->
            let dir = tempDir "bad"
            try
                let bad = Path.Combine(dir, "predictions.txt")
                File.WriteAllBytes(bad, Array.concat [ Encoding.UTF8.GetBytes "fine\r\n"; [| 0x61uy; 0xC3uy; 0x28uy; 0x0Auy |]; Encoding.UTF8.GetBytes "ok\n" ])
                let e = runFileError (fun () -> readLines bad)
                Expect.equal e.Line 2 "the line holding the bad byte"
                Expect.stringContains e.Message "expected UTF-8 text" "reason"
                let p = writeFile dir "p.txt" "a\nb\n"
                let r = writeFile dir "r.txt" "a\nb\nc\n"
                Expect.stringContains (runFileError (fun () -> readTexts p r None)).Message "expected as many lines as" "misaligned"
                Expect.equal (readLines r) [| "a"; "b"; "c" |] "a final newline does not start a line"
                Expect.equal (readLines (writeFile dir "e.txt" "a\n\nc")) [| "a"; ""; "c" |] "an empty line is an example"
            finally Directory.Delete(dir, true)

        testCase "load: a missing or empty folder, or half a text pair, is an error" <| fun () ->
            let dir = tempDir "bad"
            try
                Expect.stringContains (runFileError (fun () -> load (Path.Combine(dir, "nope")))).Message "no such directory" "missing"
                Expect.stringContains (runFileError (fun () -> load dir)).Message "at least one of config.json" "empty"
                writeFile dir "metrics.jsonl" "{\"step\": 1, \"split\": \"train\", \"loss\": 3.0}\n" |> ignore
                writeFile dir "predictions.txt" "a\n" |> ignore
                Expect.stringContains (runFileError (fun () -> load dir)).Message "references.txt" "pair"
            finally Directory.Delete(dir, true)
    ]

// ---------------------------------------------------------------------------------------------
// Balance

let balanceTests =
    testList "balance" [
        testCase "load CV: 0 when uniform, sqrt(E - 1) when one expert takes all" <| fun () ->
            Expect.floatClose Accuracy.veryHigh (loadCv [| 0.25; 0.25; 0.25; 0.25 |]) 0.0 "uniform"
            Expect.floatClose Accuracy.veryHigh (loadCv [| 1.0; 0.0; 0.0; 0.0 |]) (sqrt 3.0) "one expert"
            Expect.isTrue (Double.IsNaN (loadCv [| 0.0; 0.0 |])) "no tokens routed: undefined"

        testCase "collapsed experts fall under the named fraction of the uniform share" <| fun () ->
            // uniform share 1/4 = 0.25; threshold 0.1 of it = 0.025
            let b = balanceOf collapsedShareOfUniform (routingRecord 5 "enc.0" [| 0.5; 0.02; 0.455; 0.025 |])
            Expect.equal b.CollapsedExperts [| 1 |] "0.02 < 0.025 <= 0.025"
            let counts = balanceOf collapsedShareOfUniform (routingRecord 5 "enc.0" [| 500.0; 20.0; 455.0; 25.0 |])
            Expect.equal counts.CollapsedExperts [| 1 |] "counts are normalised to shares"

        testCase "final balance takes each layer's last step" <| fun () ->
            let rs = [| routingRecord 2 "b" [| 1.0; 0.0 |]; routingRecord 1 "a" [| 1.0; 0.0 |]; routingRecord 9 "a" [| 0.5; 0.5 |]; routingRecord 3 "a" [| 0.9; 0.1 |] |]
            let final = finalBalance collapsedShareOfUniform rs
            Expect.equal (final |> Array.map (fun b -> b.Layer, b.Step)) [| "b", 2; "a", 9 |] "first-seen layer order, last step"
            Expect.floatClose Accuracy.veryHigh final.[1].LoadCv 0.0 "balanced at step 9"

        propertyWith "load CV is invariant to scaling and permuting the loads"
            (gen {
                let! experts = Gen.choose (2, 16)
                let! loads = Gen.arrayOfLength experts (Gen.choose (1, 1000))
                let! scale = Gen.choose (1, 50)
                let! shift = Gen.choose (0, experts - 1)
                return loads |> Array.map float, float scale, shift })
            (fun (loads, scale, shift) ->
                let rotated = Array.append loads.[shift..] loads.[..shift - 1]
                let cv = loadCv loads
                Expect.floatClose Accuracy.high (loadCv (loads |> Array.map ((*) scale))) cv "scaled"
                Expect.floatClose Accuracy.high (loadCv rotated) cv "permuted"
                Expect.isLessThanOrEqual cv (sqrt (float loads.Length - 1.0) + 1e-9) "bounded by sqrt(E - 1)")
    ]

// ---------------------------------------------------------------------------------------------
// Charts

/// Runs `body` on the two synthetic runs, read back, in a temporary folder removed afterwards.
let private withRuns (body: Run list -> unit) =
    let root = tempDir "charts"
    try body (twoRuns root |> List.map load)
    finally Directory.Delete(root, true)

let chartTests =
    testList "charts" [
        testCase "expert usage heatmap is step x expert shares" <| fun () ->
          withRuns <| fun runs ->
            let t = traces (Plots.expertUsageHeatmap "enc.0" runs.[0].Routing)
            Expect.equal t.Length 1 "one trace"
            Expect.equal (str t.[0] "type") "heatmap" "heatmap"
            let z = [| for row in t.[0].GetProperty("z").EnumerateArray() -> floats row |]
            Expect.equal z.Length Synthetic.experts "one row per expert"
            Expect.equal z.[0].Length Synthetic.steps.Length "one column per step"
            Expect.equal (floats (t.[0].GetProperty "x")) (Synthetic.steps |> List.map float |> List.toArray) "x = steps"
            for s in 0 .. Synthetic.steps.Length - 1 do
                Expect.floatClose Accuracy.high (z |> Array.sumBy (fun row -> row.[s])) 1.0 "each step's shares sum to 1"

        testCase "expert usage lines: one per expert plus the uniform share" <| fun () ->
          withRuns <| fun runs ->
            let t = traces (Plots.expertUsageLines "dec.0" runs.[0].Routing)
            Expect.equal (t |> List.map (fun x -> str x "name")) ([ for e in 0 .. Synthetic.experts - 1 -> sprintf "expert %d" e ] @ [ "uniform 1/E" ]) "names"
            Expect.floatClose Accuracy.veryHigh (floats (t.[Synthetic.experts].GetProperty "y")).[0] (1.0 / float Synthetic.experts) "uniform level"
            Expect.throwsT<ArgumentException> (fun () -> Plots.expertUsageLines "nope" runs.[0].Routing |> ignore) "unknown layer"

        testCase "entropy and dropped fraction: one line per layer" <| fun () ->
          withRuns <| fun runs ->
            for chart in [ Plots.routerEntropy runs.[0].Routing; Plots.droppedFraction runs.[0].Routing ] do
                let t = traces chart
                Expect.equal (t |> List.map (fun x -> str x "name")) Synthetic.layers "layers"
                Expect.equal (floats (t.[0].GetProperty "y")).Length Synthetic.steps.Length "a point per step"

        testCase "router distribution and load balance: a trace per run" <| fun () ->
          withRuns <| fun runs ->
            let routing = runs |> List.map (fun r -> r.Name, r.Routing) |> List.toArray
            let boxes = traces (Plots.routerDistribution routing)
            Expect.equal (boxes |> List.map (fun t -> str t "type")) [ "box"; "box" ] "box per run"
            Expect.stringStarts (str boxes.[0] "name") "moe-switch (load CV " "name carries the CV"
            Expect.equal (floats (boxes.[0].GetProperty "y")).Length (Synthetic.layers.Length * Synthetic.experts) "every final share"
            let bars = traces (Plots.loadBalance collapsedShareOfUniform routing)
            let cvSkewed = (floats (bars.[0].GetProperty "y")).[0]
            let cvFlat = (floats (bars.[1].GetProperty "y")).[0]
            Expect.isGreaterThan cvSkewed cvFlat "the skewed run is less balanced"

        testCase "label usage heatmap rows are shares per label" <| fun () ->
          withRuns <| fun runs ->
            let usage = (Option.get runs.[0].ByLabel).[0]
            let t = traces (Plots.labelUsageHeatmap usage)
            let z = [| for row in t.[0].GetProperty("z").EnumerateArray() -> floats row |]
            Expect.equal z.Length Synthetic.labels.Length "label rows"
            for row in z do Expect.floatClose Accuracy.high (Array.sum row) 1.0 "row sums to 1"
            Expect.equal [ for y in t.[0].GetProperty("y").EnumerateArray() -> y.GetString() ] Synthetic.labels "labels on y"

        testCase "loss curves: train and valid per run; aux: one line per loss" <| fun () ->
          withRuns <| fun runs ->
            let t = traces (Plots.lossCurves (runs |> List.map (fun r -> r.Name, r.Metrics) |> List.toArray))
            Expect.equal (t |> List.map (fun x -> str x "name"))
                [ "moe-switch train task loss"; "moe-switch valid loss"; "moe-topk train task loss"; "moe-topk valid loss" ] "names"
            let aux = traces (Plots.auxLossCurves "moe-switch" runs.[0].Metrics)
            Expect.equal (aux |> List.map (fun x -> str x "name")) [ "switch_aux"; "z_loss" ] "aux names"

        testCase "metrics comparison: grouped bars, ROUGE x100, error bars from intervals" <| fun () ->
          withRuns <| fun runs ->
            let systems = Report.comparedSystems (List.toArray runs)
            Expect.equal (systems |> Array.map fst) [| "moe-switch"; "moe-topk"; "lead1" |] "models first, baseline shown once"
            let t = traces (Plots.metricsComparison systems)
            Expect.equal (t |> List.map (fun x -> str x "type")) [ "bar"; "bar"; "bar" ] "bars"
            Expect.equal [ for x in t.[0].GetProperty("x").EnumerateArray() -> x.GetString() ] [ "ROUGE-1 F1"; "ROUGE-2 F1"; "ROUGE-L F1"; "BLEU" ] "categories"
            let model = (Option.get runs.[0].Scores).[0]
            Expect.floatClose Accuracy.high (floats (t.[0].GetProperty "y")).[0] (100.0 * model.Rouge.["rouge1"].F1) "ROUGE x100"
            let err = t.[0].GetProperty "error_y"
            let ci = Option.get (model.IntervalOf "rouge1")
            Expect.floatClose Accuracy.high (floats (err.GetProperty "array")).[0] (100.0 * (ci.High - model.Rouge.["rouge1"].F1)) "upper arm"
            Expect.floatClose Accuracy.high (floats (err.GetProperty "arrayminus")).[0] (100.0 * (model.Rouge.["rouge1"].F1 - ci.Low)) "lower arm"
            let mutable noError = Unchecked.defaultof<JsonElement>
            Expect.isFalse (t.[1].TryGetProperty("error_y", &noError)) "no intervals, no error bars"

        testCase "names from the data cannot become markup" <| fun () ->
            let hostile = "</script><script>alert(1)</script><b>x</b>"
            let usage = { Layer = hostile; Labels = [| hostile; "plain" |]; Experts = 2; Counts = [| [| 1.0; 2.0 |]; [| 3.0; 4.0 |] |] }
            let chart = Plots.labelUsageHeatmap usage
            let y = [ for v in (traces chart).[0].GetProperty("y").EnumerateArray() -> v.GetString() ]
            Expect.equal y.[0] "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" "plotly gets entities it decodes for display"
            let div = Plots.chartDiv "c1" chart
            Expect.isFalse (div.Contains "</script><script>alert") "no script break-out"
            Expect.equal (Regex.Matches(div, "</script>").Count) 1 "only the chart's own script closes"
            Expect.throwsT<ArgumentException> (fun () -> Plots.chartDiv "a\"b" chart |> ignore) "ids are checked"

        testCase "a chart page embeds plotly.js and loads nothing" <| fun () ->
          withRuns <| fun runs ->
            let page = Plots.html "Usage <1>" [ Plots.routerEntropy runs.[0].Routing ]
            Expect.isTrue (page.Contains(sprintf "plotly.js v%s" Globals.PLOTLYJS_VERSION)) "plotly.js inline"
            Expect.isFalse (Regex.IsMatch(page, "<script[^>]+src=")) "no external scripts"
            Expect.isTrue (page.Contains "<title>Usage &lt;1&gt;</title>") "title escaped"

    ]

// ---------------------------------------------------------------------------------------------
// Headline figures

/// The charts that carry each experiment's finding, and the page that holds one alone.
let figureTests =
    testList "figures" [
        testCase "load CV over time: a line per run of the mean CV over layers, and the all-on-one-expert level" <| fun () ->
          withRuns <| fun runs ->
            let routing = runs |> List.map (fun r -> r.Name, r.Routing) |> List.toArray
            let t = traces (Plots.loadCvOverTime routing)
            Expect.equal (t |> List.map (fun x -> str x "name")) [ "moe-switch"; "moe-topk"; sprintf "all on one expert (√(E−1), E = %d)" Synthetic.experts ] "names"
            let first = runs.[0].Routing |> Array.filter (fun r -> r.Step = Synthetic.steps.Head)
            let expected = first |> Array.averageBy (fun r -> loadCv r.TokensPerExpert)
            Expect.floatClose Accuracy.high (floats (t.[0].GetProperty "y")).[0] expected "mean over layers at the first step"
            Expect.equal (floats (t.[0].GetProperty "x")).Length Synthetic.steps.Length "a point per step"
            Expect.floatClose Accuracy.veryHigh (floats (t.[2].GetProperty "y")).[0] (sqrt (float (Synthetic.experts - 1))) "sqrt(E - 1)"
            Expect.throwsT<ArgumentException> (fun () -> Plots.loadCvOverTime [| "empty", [||] |] |> ignore) "no records"

        testCase "bar panels: categories in the given order on one axis, NaN without a bar, sizes checked" <| fun () ->
            let panel title values : Plots.BarPanel = { Title = title; Values = values; Text = values |> Array.map string }
            let chart = Plots.barPanels "T" [| "b"; "a"; "c" |] [ panel "first" [| 1.0; 2.0; 3.0 |]; panel "second" [| 4.0; nan; 6.0 |] ]
            let f = figure chart
            let t = [ for x in f.GetProperty("data").EnumerateArray() -> x ]
            Expect.equal (t |> List.map (fun x -> str x "orientation")) [ "h"; "h" ] "horizontal bars"
            Expect.equal [ for y in t.[1].GetProperty("y").EnumerateArray() -> y.GetString() ] [ "b"; "c" ] "the NaN category has no bar"
            Expect.equal (floats (t.[1].GetProperty "x")) [| 4.0; 6.0 |] "values"
            Expect.equal (t |> List.map (fun x -> str x "yaxis")) [ "y"; "y" ] "one shared category axis"
            let yaxis = f.GetProperty("layout").GetProperty("yaxis")
            Expect.equal [ for c in yaxis.GetProperty("categoryarray").EnumerateArray() -> c.GetString() ] [ "b"; "a"; "c" ] "order kept"
            Expect.equal (str (f.GetProperty("layout").GetProperty("xaxis2").GetProperty("title")) "text") "second" "panel title on its axis"
            Expect.throwsT<ArgumentException> (fun () -> Plots.barPanels "T" [| "a" |] [ panel "p" [| 1.0; 2.0 |] ] |> ignore) "one value per category"

        testCase "line panels: a series keeps its colour and one legend entry across panels" <| fun () ->
            let series name : Plots.Series = { Name = name; X = [| 1.0; 2.0 |]; Y = [| 3.0; 4.0 |]; Labels = [| "k=1"; "k=2" |] }
            let panel y : Plots.LinePanel = { XTitle = "x"; YTitle = y; LogX = (y = "log"); Series = [ series "a"; series "b" ] }
            let f = figure (Plots.linePanels "T" [ panel "lin"; panel "log" ])
            let t = [ for x in f.GetProperty("data").EnumerateArray() -> x ]
            Expect.equal (t |> List.map (fun x -> str x "name")) [ "a"; "b"; "a"; "b" ] "a trace per series and panel"
            Expect.equal (t |> List.map (fun x -> x.GetProperty("showlegend").GetBoolean())) [ true; true; false; false ] "legend once"
            Expect.equal (str (t.[0].GetProperty "line") "color") (str (t.[2].GetProperty "line") "color") "same colour"
            Expect.equal [ for x in t.[0].GetProperty("text").EnumerateArray() -> x.GetString() ] [ "k=1"; "k=2" ] "point labels"
            Expect.equal (str (f.GetProperty("layout").GetProperty("xaxis2")) "type") "log" "log axis where asked"
            Expect.throwsT<ArgumentException> (fun () -> Plots.linePanels "T" [] |> ignore) "no panel"

        testCase "a figure page holds the one chart and its size; without a screenshot no PNG" <| fun () ->
          withRuns <| fun runs ->
            let chart = Plots.expertUsageLines "enc.0" runs.[0].Routing
            Expect.equal (Plots.chartSize chart) (Plots.Size.width, Plots.Size.height) "layout size"
            let dir = tempDir "figure"
            try
                let f = Plots.writeFigureIn false dir "exp" "Usage <1>" chart
                Expect.equal f.Html (Path.GetFullPath(Path.Combine(dir, "exp-figure.html"))) "page name"
                Expect.equal f.Png (Error "not asked for") "no PNG asked"
                let page = File.ReadAllText f.Html
                Expect.equal (Regex.Matches(page, "<div class=\"chart\"").Count) 1 "one chart"
                Expect.isTrue (page.Contains(sprintf "plotly.js v%s" Globals.PLOTLYJS_VERSION)) "plotly.js inline"
                Expect.isTrue (page.Contains "<title>Usage &lt;1&gt;</title>") "title escaped"
                Expect.isFalse (File.Exists(Path.Combine(dir, "exp.png"))) "no PNG written"
                Expect.equal (Plots.figureLines f) [ sprintf "figure: %s" f.Html; "png: skipped: not asked for" ] "printed lines"
            finally Directory.Delete(dir, true)
    ]

// ---------------------------------------------------------------------------------------------
// Browser helpers (no browser needed)

/// The first 24 bytes of a PNG: signature, IHDR length and type, width and height.
let private pngHeader (width: int) (height: int) =
    let be (v: int) = [| byte (v >>> 24); byte (v >>> 16); byte (v >>> 8); byte v |]
    Array.concat [ Browser.pngSignature; be 13; "IHDR"B; be width; be height ]

let browserHelperTests =
    testList "browser helpers" [
        testCase "findIn: the first name found in PATH order, nothing in an empty PATH" <| fun () ->
            let dir = tempDir "path"
            try
                Expect.isNone (Browser.findIn "") "empty PATH"
                Expect.isNone (Browser.findIn dir) "no browser in the folder"
                let exe = Path.Combine(dir, "chromium-browser")
                File.WriteAllText(exe, "")
                Expect.equal (Browser.findIn ("/nonexistent:" + dir)) (Some exe) "found by its second name"
            finally Directory.Delete(dir, true)

        testCase "pngSize reads IHDR and names what is wrong" <| fun () ->
            let dir = tempDir "png"
            try
                let good = Path.Combine(dir, "good.png")
                File.WriteAllBytes(good, pngHeader 660 400)
                Expect.equal (Browser.pngSize good) (Ok(660, 400)) "width and height"
                let bad = Path.Combine(dir, "bad.png")
                File.WriteAllBytes(bad, Array.append "GIF89a"B (Array.zeroCreate 30))
                Expect.isError (Browser.pngSize bad) "not a PNG"
                File.WriteAllBytes(bad, Browser.pngSignature)
                Expect.isError (Browser.pngSize bad) "too short"
                Expect.isError (Browser.pngSize (Path.Combine(dir, "missing.png"))) "no file"
            finally Directory.Delete(dir, true)
    ]

// ---------------------------------------------------------------------------------------------
// Report

/// A JSON-like config tree for the comparison property: scalars carry their JSON text and the text
/// `RunLog.flattenConfig` shows for them.
type private ConfigNode =
    | Scalar of json: string * shown: string
    | Node of (string * ConfigNode) list

/// Small value and key pools, so that generated pairs often agree, often differ, and sometimes
/// change a field's kind (a scalar in one, an object in the other).
module private ConfigGen =
    let keys = [ "model"; "train"; "router"; "experts"; "lr"; "k" ]
    let maxDepth = 3

    let scalar : Gen<ConfigNode> =
        Gen.oneof [
            Gen.choose (0, 3) |> Gen.map (fun i -> Scalar(string i, string i))
            Gen.elements [ "topk"; "hash"; "switch" ] |> Gen.map (fun w -> Scalar(sprintf "\"%s\"" w, w))
            Gen.elements [ "true"; "false"; "null" ] |> Gen.map (fun b -> Scalar(b, b))
            Gen.listOf (Gen.choose (0, 2)) |> Gen.map (fun xs -> let t = "[" + String.Join(", ", xs) + "]" in Scalar(t, t)) ]

    let rec node (depth: int) : Gen<ConfigNode> =
        if depth = 0 then scalar else Gen.frequency [ 3, scalar; 2, objectOf (depth - 1) ]

    and objectOf (depth: int) : Gen<ConfigNode> =
        gen {
            let! names = Gen.subListOf keys
            let! children = names |> Seq.map (fun k -> node depth |> Gen.map (fun c -> k, c)) |> Gen.sequenceToList
            return Node children }

    /// A second config made from the first: fields kept, changed, dropped or added.
    let rec mutate (depth: int) (n: ConfigNode) : Gen<ConfigNode option> =
        match n with
        | Scalar _ -> Gen.frequency [ 6, Gen.constant (Some n); 2, Gen.map Some scalar; 1, Gen.constant None; 1, Gen.map Some (objectOf (max 0 (depth - 1))) ]
        | Node children ->
            gen {
                let! kept = children |> Seq.map (fun (k, c) -> mutate (depth - 1) c |> Gen.map (Option.map (fun c' -> k, c'))) |> Gen.sequenceToList
                let kept = List.choose id kept
                let free = keys |> List.filter (fun k -> not (kept |> List.exists (fun (name, _) -> name = k)))
                let! added = if free.IsEmpty then Gen.constant [] else Gen.subListOf free |> Gen.map (List.truncate 1)
                let! extra = added |> Seq.map (fun k -> node (max 0 (depth - 1)) |> Gen.map (fun c -> k, c)) |> Gen.sequenceToList
                return Some(Node(kept @ extra)) }

    let pair : Gen<ConfigNode * ConfigNode> =
        gen {
            let! a = objectOf maxDepth
            let! b = Gen.frequency [ 3, mutate maxDepth a |> Gen.map (Option.defaultValue (Node [])); 1, objectOf maxDepth ]
            return a, b }

let rec private configJson (n: ConfigNode) : string =
    match n with
    | Scalar (json, _) -> json
    | Node children -> "{" + String.Join(", ", children |> List.map (fun (k, c) -> sprintf "\"%s\": %s" k (configJson c))) + "}"

/// The leaves the page should compare, flattened independently of `RunLog.flattenConfig`.
let rec private configLeaves (prefix: string) (n: ConfigNode) : (string * string) list =
    match n with
    | Scalar (_, shown) -> [ prefix, shown ]
    | Node [] -> [ prefix, "{}" ]
    | Node children -> children |> List.collect (fun (k, c) -> configLeaves (if prefix = "" then k else prefix + "." + k) c)

/// A run that holds only the given parts (no files behind it).
let private inMemoryRun (name: string) : Run =
    { Name = name; Directory = "/runs/" + name; Config = None; Metrics = [||]; Routing = [||]; ByLabel = None; Scores = None; Texts = None }

let private modelScores (rouge1: float) (bleu: float) : SystemScores =
    let prf f = { Precision = f; Recall = f; F1 = f }
    { System = "model"; N = Some 10
      Rouge = Map.ofList [ "rouge1", prf rouge1; "rouge2", prf (rouge1 / 2.0); "rougeL", prf rouge1 ]
      Scalars = Map.ofList [ "bleu", bleu ]
      Intervals = Map.empty }

let private validLine (step: int) (loss: float) =
    { Step = step; Split = "valid"; Loss = loss; TaskLoss = None; Aux = Map.empty; Lr = None; TokensPerS = None; ElapsedS = None }

/// The text between `start` and the next `stop` after it.
let private between (start: string) (stop: string) (page: string) =
    let i = page.IndexOf start
    Expect.isGreaterThanOrEqual i 0 (sprintf "the page has %s" start)
    page.Substring(i, page.IndexOf(stop, i) - i)

let private pathCells (html: string) =
    [ for m in Regex.Matches(html, "<td class=\"path\">([^<]*)</td>") -> Net.WebUtility.HtmlDecode m.Groups.[1].Value ]

let reportTests =
    testList "report" [
        testCase "configs side by side: differing fields flagged, absent ones shown" <| fun () ->
            let root = tempDir "report"
            try
                let runs = twoRuns root |> List.map load |> List.toArray
                let rows = Report.configRows runs
                let differs path = rows |> Array.find (fun (p, _, _) -> p = path) |> fun (_, _, d) -> d
                Expect.isTrue (differs "model.moe.router") "router differs"
                Expect.isTrue (differs "train.aux_weight") "aux weight differs"
                Expect.isFalse (differs "model.d_model") "width agrees"
                let page = Report.render Report.defaults runs
                Expect.equal (Regex.Matches(page, "<tr class=\"differs\">").Count) (rows |> Array.filter (fun (_, _, d) -> d) |> Array.length) "highlighted rows"
                Expect.isTrue (page.Contains "<td>26.50 <span class=\"ci\">[25.50, 27.70]</span></td>") "ROUGE-1 F1 and interval of the switch run (x100)"
                Expect.equal (Regex.Matches(page, "<div class=\"sample\">").Count) Report.defaults.Samples "samples"
                Expect.isTrue (page.Contains "<th>moe-topk</th><td>Top-k model summary 0: council discusses stadium.</td>") "each model's prediction"
                Expect.equal (Regex.Matches(page, "<div class=\"chart\" id=\"chart-").Count) (Report.charts Report.defaults runs |> Array.sumBy (fun s -> s.Charts.Length)) "every chart placed"
            finally Directory.Delete(root, true)

        testCase "config comparison: the differing table lists exactly the fields that differ" <| fun () ->
            let root = tempDir "report"
            try
                let runs = twoRuns root |> List.map load |> List.toArray
                let c = Report.compareConfigs runs
                let differing = [ "model.moe.top_k"; "model.moe.router"; "train.aux_weight" ]
                Expect.equal (c.Differing |> Array.map (fun r -> r.Path) |> Array.toList) differing "top_k, router and aux weight differ"
                let page = Report.render Report.defaults runs
                Expect.equal (pathCells (between "<table class=\"config differs\">" "</table>" page)) differing "the page's differs table"
                let identical = between "<table class=\"config identical\">" "</table>" page |> pathCells
                Expect.equal identical (c.Identical |> Array.map (fun r -> r.Path) |> Array.toList) "the rest, collapsed"
                Expect.contains identical "model.d_model" "width agrees"
                Expect.isTrue (page.Contains(sprintf "<details><summary>%d settings identical in all runs</summary>" identical.Length)) "collapsed with its count"
            finally Directory.Delete(root, true)

        propertyWith "config comparison: every field in exactly one table, in 'differs' iff the values differ" ConfigGen.pair (fun (a, b) ->
            let flatten (n: ConfigNode) =
                use doc = JsonDocument.Parse(configJson n)
                flattenConfig doc.RootElement
            let runs = [| { inMemoryRun "a" with Config = Some(flatten a) }; { inMemoryRun "b" with Config = Some(flatten b) } |]
            let c = Report.compareConfigs runs
            let leavesA, leavesB = Map.ofList (configLeaves "" a), Map.ofList (configLeaves "" b)
            let allPaths = Set.union (leavesA |> Map.keys |> Set.ofSeq) (leavesB |> Map.keys |> Set.ofSeq)
            let differing = c.Differing |> Array.map (fun r -> r.Path)
            let identical = c.Identical |> Array.map (fun r -> r.Path)
            Expect.equal (Array.append differing identical |> Array.sort) (Set.toArray allPaths) "every path once, in one of the two tables"
            for path in allPaths do
                let va, vb = leavesA.TryFind path, leavesB.TryFind path
                Expect.equal (Array.contains path differing) (va <> vb) (sprintf "%s: %A vs %A" path va vb)
            for row in Array.append c.Differing c.Identical do
                Expect.equal row.Values [| leavesA.TryFind row.Path; leavesB.TryFind row.Path |] (sprintf "values of %s" row.Path))

        testCase "one run: a summary line, metrics first, every setting collapsed under Settings" <| fun () ->
            let root = tempDir "report"
            try
                let run = load (writeRun root "solo" 0.5 true "1" (sprintf "p%d"))
                let page = Report.render Report.defaults [| run |]
                let summary = "1000 steps in 14 s · 6 test examples · 2 MoE layers logged"
                Expect.equal (Report.runSummary run) summary "steps, wall time, test examples, MoE layers"
                Expect.isTrue (page.Contains("<li><b>solo</b> — " + Plots.escape summary + " <code>")) "summary line under the title"
                let fields = (Option.get run.Config).Length
                Expect.isTrue (page.Contains(sprintf "<details><summary>Settings (%d fields)</summary>" fields)) "all fields, collapsed"
                Expect.equal (pathCells (between "<details><summary>Settings" "</details>" page)).Length fields "each field once"
                Expect.isFalse (page.Contains "config differs") "nothing to differ from"
                let at (id: string) = page.IndexOf(sprintf "<h2 id=\"%s\">" id)
                let order = [ "metrics"; "charts"; "configs"; "samples" ] |> List.map at
                Expect.isGreaterThan order.Head (page.IndexOf "<ul class=\"runs\">") "metrics after the run summaries"
                Expect.equal order (List.sort order) "metrics, charts, configs, samples"
                let table = Report.metricsTable [| run |]
                Expect.equal (table.Rows |> Array.map (fun r -> r.Label, r.Baseline)) [| "solo", false; "lead1", true |] "the model, then its baseline"
                let column (header: string) = table.Columns |> Array.findIndex (fun c -> c.Header = header)
                let loss = table.Rows.[0].Cells.[column "valid loss"]
                Expect.isFalse loss.Best "a lone value is not bold"
                Expect.equal loss.Note (Some "step 900") "the step of the lowest validation loss"
            finally Directory.Delete(root, true)

        testCase "metrics table: the best value of each column is bold, by its direction" <| fun () ->
            let uniform = { Step = 5; Layer = "enc.0"; TokensPerExpert = [| 0.25; 0.25; 0.25; 0.25 |]; DroppedFraction = 0.0; RouterEntropy = 1.0 }
            let skewed = { uniform with TokensPerExpert = [| 0.7; 0.1; 0.1; 0.1 |] }
            let runs =
                [| { inMemoryRun "a" with
                       Scores = Some [| modelScores 0.30 10.004 |]
                       Metrics = [| validLine 1 2.5; validLine 2 2.0 |]
                       Routing = [| { skewed with Step = 1 }; uniform |] }
                   { inMemoryRun "b" with
                       Scores = Some [| modelScores 0.25 10.001 |]
                       Metrics = [| validLine 1 1.5; validLine 2 1.7 |]
                       Routing = [| skewed |] }
                   { inMemoryRun "c" with
                       Scores = Some [| modelScores 0.20 9.0 |]
                       Metrics = [| validLine 1 nan |] } |]
            let table = Report.metricsTable runs
            Expect.equal (table.Columns |> Array.map (fun c -> c.Header)) [| "ROUGE-1 F1"; "ROUGE-2 F1"; "ROUGE-L F1"; "BLEU"; "valid loss"; "load CV"; "dropped %" |] "columns"
            let best (header: string) =
                let j = table.Columns |> Array.findIndex (fun c -> c.Header = header)
                [ for r in table.Rows do if r.Cells.[j].Best then yield r.Label ]
            Expect.equal (best "ROUGE-1 F1") [ "a" ] "higher ROUGE wins"
            Expect.equal (best "BLEU") [ "a"; "b" ] "values equal as shown (10.00) tie"
            Expect.equal (best "valid loss") [ "b" ] "lower loss wins; NaN never does"
            Expect.equal (best "load CV") [ "a" ] "a balanced last step wins"
            Expect.equal (best "dropped %") [] "no best among equal values"
            Expect.floatClose Accuracy.veryHigh (Option.get table.Rows.[0].Cells.[0].Value) 30.0 "ROUGE shown x100"
            Expect.equal table.Rows.[1].Cells.[4].Note (Some "step 1") "b's lowest loss was at step 1"
            Expect.equal table.Footnotes [| "c logged no routing statistics (routing.jsonl)" |] "one footnote per reason"
            let page = Report.render Report.defaults runs
            Expect.isTrue (page.Contains "<td class=\"best\"><b>30.00</b></td>") "bold in the page"
            Expect.isTrue (page.Contains "<td class=\"best\" title=\"step 1\"><b>1.500</b></td>") "lowest loss, with its step"
            Expect.isTrue (page.Contains "<td title=\"step 1\">n/a</td>") "a diverged loss shows n/a"
            Expect.equal (Regex.Matches(between "<table class=\"metrics\">" "</table>" page, "<td class=\"best\"").Count) 7 "ROUGE-1/2/L, two BLEU, loss, CV"

        testCase "every text from the runs is escaped" <| fun () ->
            let root = tempDir "report"
            try
                let hostile = "<img src=x onerror=alert(1)>"
                let a = writeRun root "<em>bold-run&co" 0.5 true (JsonSerializer.Serialize hostile) (fun i -> sprintf "<script>alert(%d)</script> & more" i)
                let b = writeRun root "plain" 0.2 false "\"ok\"" (sprintf "summary %d")
                File.WriteAllText(Path.Combine(a, "references.txt"), String.replicate Synthetic.examples (hostile + "\n"))
                File.WriteAllText(Path.Combine(b, "references.txt"), String.replicate Synthetic.examples (hostile + "\n"))
                let page = Report.render Report.defaults [| load a; load b |]
                for raw in [ hostile; "<script>alert("; "<em>bold-run" ] do
                    Expect.isFalse (page.Contains raw) (sprintf "raw %s absent" raw)
                Expect.isTrue (page.Contains "<td>&lt;img src=x onerror=alert(1)&gt;</td>") "config value escaped"
                Expect.isTrue (page.Contains "<b>Reference:</b> &lt;img src=x onerror=alert(1)&gt;</p>") "reference escaped"
                Expect.isTrue (page.Contains "<td>&lt;script&gt;alert(0)&lt;/script&gt; &amp; more</td>") "prediction escaped"
                Expect.isTrue (page.Contains "<li><b>&lt;em&gt;bold-run&amp;co</b>") "run name escaped"
            finally Directory.Delete(root, true)

        testCase "runs with only some files still make a page; empty charts are refused by name" <| fun () ->
            let root = tempDir "report"
            try
                let dir = Path.Combine(root, "metrics-only")
                Directory.CreateDirectory dir |> ignore
                writeFile dir "metrics.jsonl" "{\"step\": 1, \"split\": \"train\", \"loss\": 3.0}\n{\"step\": 2, \"split\": \"train\", \"loss\": 2.5}\n" |> ignore
                let alone = Report.render Report.defaults [| load dir |]
                for note in [ "No run has a config.json."; "No run has a test_scores.json."; "No run has predictions.txt and references.txt." ] do
                    Expect.isTrue (alone.Contains note) note
                let sections = Report.charts Report.defaults [| load dir |]
                Expect.equal (sections |> Array.map (fun s -> s.Heading, s.Charts.Length)) [| "Comparison", 1 |] "only the loss curve"
                let full = writeRun root "full" 0.5 true "1" (sprintf "p%d")
                let page = Report.render Report.defaults [| load dir; load full |]
                Expect.isTrue (page.Contains "<p class=\"note\">Not compared (no config.json): metrics-only.</p>") "a run without config.json is named, not compared"
                let table = Report.metricsTable [| load dir; load full |]
                Expect.contains table.Footnotes "metrics-only has no test_scores.json" "why its scores are missing"
                Expect.contains table.Footnotes "metrics-only logged no routing statistics (routing.jsonl)" "why its balance is missing"
                Expect.isTrue (page.Contains "<td class=\"absent\">—</td>") "missing values show a dash"
                let noRouge = { System = "model"; N = None; Rouge = Map.empty; Scalars = Map.ofList [ "compression", 0.1 ]; Intervals = Map.empty }
                let e = Expect.throwsC (fun () -> Plots.metricsComparison [| "x", noRouge |] |> ignore) id
                Expect.stringContains e.Message "expected at least one system with ROUGE or BLEU scores to plot" "names what is missing"
            finally Directory.Delete(root, true)

        testCase "same folder name twice gets distinct columns; options are validated" <| fun () ->
            let root = tempDir "report"
            try
                let a = writeRun (Path.Combine(root, "x")) "run" 0.5 false "1" (sprintf "p%d")
                let b = writeRun (Path.Combine(root, "y")) "run" 0.1 false "1" (sprintf "q%d")
                let names = Report.uniqueNames [| load a; load b |] |> Array.map (fun r -> r.Name)
                Expect.equal names [| "run"; "run (2)" |] "renamed"
                let problems = Report.validate { Report.defaults with Samples = -1; ExcerptChars = 0 }
                Expect.equal problems.Length 2 "every problem at once"
                Expect.equal (Report.sampleIndices 3 10) [| 0; 3; 6 |] "spread"
                Expect.equal (Report.sampleIndices 3 2) [| 0; 1 |] "fewer examples than asked"
            finally Directory.Delete(root, true)
    ]

// ---------------------------------------------------------------------------------------------
// Headless Chromium

/// A drawn page has many colours; a blank one has a handful of byte values after inflating.
let private minDistinctBytes = 64

let private skipWithoutChromium () : string =
    match Browser.find () with
    | Some exe -> exe
    | None -> skiptestf "needs Chromium on PATH: %s" Browser.notFound

let private runChromium (exe: string) (args: string list) : string =
    match Browser.run exe args with
    | Ok out -> out
    | Error why -> failtest why

/// Pixel bytes of a PNG (IDAT chunks inflated; filter bytes included), to tell drawn from blank.
let private pngPixelBytes (path: string) : byte[] =
    let bytes = File.ReadAllBytes path
    Expect.isOk (Browser.pngSize path) "a PNG file"
    let idat = new MemoryStream()
    let mutable at = 8
    while at + 8 <= bytes.Length do
        let length = (int bytes.[at] <<< 24) ||| (int bytes.[at + 1] <<< 16) ||| (int bytes.[at + 2] <<< 8) ||| int bytes.[at + 3]
        let kind = Encoding.ASCII.GetString(bytes, at + 4, 4)
        if kind = "IDAT" then idat.Write(bytes, at + 8, length)
        at <- at + 12 + length
    idat.Position <- 0L
    use z = new ZLibStream(idat, CompressionMode.Decompress)
    use pixels = new MemoryStream()
    z.CopyTo pixels
    pixels.ToArray()

let browserTests =
    testList "browser" [
        testCase "headless Chromium draws every chart of a two-run report" <| fun () ->
            let exe = skipWithoutChromium ()
            let root = tempDir "browser"
            try
                let runs = twoRuns root
                let page = Report.write Report.defaults (Path.Combine(root, "report.html")) runs
                let expected = Report.charts Report.defaults (runs |> List.map load |> List.toArray) |> Array.sumBy (fun s -> s.Charts.Length)
                let dom = runChromium exe [ "--dump-dom"; Uri(page).AbsoluteUri ]
                let starts = Regex.Matches(dom, "<div class=\"chart[^\"]*\" id=\"chart-(\\d+)\"") |> Seq.toList
                Expect.equal starts.Length expected "every chart div is in the DOM"
                let drawn =
                    starts |> List.mapi (fun i m ->
                        let stop = if i + 1 < starts.Length then starts.[i + 1].Index else dom.Length
                        let body = dom.Substring(m.Index, stop - m.Index)
                        m.Groups.[1].Value, body.Contains "js-plotly-plot" && body.Contains "<svg class=\"main-svg\"")
                let undrawn = drawn |> List.filter (snd >> not) |> List.map fst
                Expect.isEmpty undrawn "plotly drew an SVG in every chart div (these ids were not drawn)"
                let shot = Path.Combine(root, "report.png")
                runChromium exe [ sprintf "--screenshot=%s" shot; "--window-size=1400,2400"; Uri(page).AbsoluteUri ] |> ignore
                let distinct = pngPixelBytes shot |> Array.distinct |> Array.length
                Expect.isGreaterThanOrEqual distinct minDistinctBytes "the screenshot is not blank"
            finally Directory.Delete(root, true)

        testCase "a figure's PNG is the chart's size and drawn" <| fun () ->
            let _ = skipWithoutChromium ()
            let root = tempDir "figure-png"
            try
                let runs = twoRuns root |> List.map load |> List.toArray
                let chart = Plots.loadCvOverTime (runs |> Array.map (fun r -> r.Name, r.Routing))
                let f = Plots.writeFigureIn true root "balance" "Load" chart
                match f.Png with
                | Error why -> failtestf "expected a PNG, got: %s" why
                | Ok png ->
                    Expect.equal png (Path.GetFullPath(Path.Combine(root, "balance.png"))) "PNG name"
                    Expect.equal (Browser.pngSize png) (Ok(Plots.chartSize chart)) "the chart's size"
                    let distinct = pngPixelBytes png |> Array.distinct |> Array.length
                    Expect.isGreaterThanOrEqual distinct minDistinctBytes "the figure is drawn, not blank"
            finally Directory.Delete(root, true)
    ]

let tests = testList "Plots" [ readerTests; balanceTests; chartTests; figureTests; browserHelperTests; reportTests; browserTests ]
