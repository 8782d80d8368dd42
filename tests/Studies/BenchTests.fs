/// The benchmark harness: FLOPs known values, the median and interleaving on a fake clock, the references
/// against oracles, the JSON's exact fields, and that a layer disagreeing with the naive reference aborts
/// the run. No timed assertions: speed is judged from the benchmark's output, not here.
/// Axes: T tokens, D model width, H expert hidden width, E experts, K picks per token.
module Moe.Tests.BenchTests

open System
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Moe
open Moe.Config
open Moe.Routing
open Moe.Bench
open Moe.Bench.Measure
open Moe.Bench.Reference
open Moe.Bench.Layer
open Moe.Bench.TrainStep
open Moe.Tests.Support

/// float64 references against each other: only summation order differs.
let private f64Tol = 1e-10
/// Expected fraction of a freshly written buffer that the resident high-water mark must show: the kernel
/// counts whole pages, so a buffer of many pages appears almost in full.
let private residentFraction = 0.9
let private f64 = torch.ScalarType.Float64

/// Random stacked weights for E experts in float64 (so references agree to round-off).
let private randomWeights (seed: int) (e: int) (d: int) (h: int) (swiglu: bool) : MoeWeights =
    let g = new torch.Generator(uint64 seed, torch.CPU)
    let rnd (shape: int list) scale = torch.randn (shape |> List.map int64 |> Array.ofList, dtype = f64, generator = g) |> Tensors.mulScalar scale
    { Router = rnd [ d; e ] 1.0
      W1 = rnd [ e; d; h ] 0.3
      W2 = rnd [ e; h; d ] 0.3
      W3 = if swiglu then Some(rnd [ e; d; h ] 0.3) else None }

let private moeConfig (e: int) (k: int) (d: int) (h: int) (act: Activation) (selection: Selection) : MoeConfig =
    { MoeConfig.defaults with
        ModelDim = d
        ExpertHidden = h
        Activation = act
        Router = { RouterConfig.defaults with Experts = e; K = k; Selection = selection } }

/// The naive reference standing in as a candidate (its own copy). With `perturb`, it computes with expert
/// 0's first weight shifted by one while stating the original weights: a layer that computes the wrong thing.
let private naiveCandidate (cfg: MoeConfig) (weights: MoeWeights) (perturb: bool) : Candidate =
    let computed =
        if perturb then
            let bump = torch.zeros_like weights.W1 // [E; D; H]
            Tensors.withScalar 1.0 (fun v -> bump[0L].fill_ v) |> ignore
            { weights with W1 = Tensors.plus weights.W1 bump }
        else weights
    let r = naiveReference cfg computed
    { Layer = { r.Layer with Variant = Variant.Moe }
      Weights = Func<MoeWeights>(fun () -> weights)
      Gradients = Func<MoeWeights>(fun () -> naiveGradients r) }

/// One forward+backward of a reference layer: output, gradient of x, and the layer's parameter gradients.
let private forwardBackward (layer: BenchLayer) (x: torch.Tensor) (gradOut: torch.Tensor) =
    clearGradients layer x
    let y = layer.Forward.Invoke x
    y.backward ([| gradOut |])
    y.detach (), x.grad.detach().clone ()

/// A small problem: sizes, an activation, a seed.
type private Small = { T: int; E: int; D: int; H: int; Act: Activation; Seed: int }

let private genSmall : Gen<Small> =
    gen {
        let! t = Gen.choose (1, 12)
        let! e = Gen.choose (1, 5)
        let! d = Gen.choose (1, 6)
        let! h = Gen.choose (1, 6)
        let! act = Gen.elements [ ReLU; GELU; SwiGLU ]
        let! seed = Gen.choose (0, 1_000_000)
        return { T = t; E = e; D = d; H = h; Act = act; Seed = seed }
    }

/// A hand-built report: one grid point, every variant, the last without a memory figure.
let private sampleReport () : BenchReport =
    let shape = { Tokens = 2048; ModelDim = 512; ExpertHidden = 1024; Experts = 8; K = 2; Activation = GELU }
    let row v ms peak =
        { Shape = shape; Variant = v; MedianMs = ms; RatioToDense = ms / 100.0; TokensPerS = 2048.0 / (ms / 1000.0)
          UsefulGflops = Flops.trainPerToken shape v * 2048.0 / (ms / 1000.0) / 1e9; PeakMb = peak; SamplesMs = [| ms |] }
    { Machine = { MatmulGflops = 123.456; Threads = 2; Allocator = Native.SystemAllocator }
      Rows = [ row DenseFlopMatched 100.0 (Some 10.0); row Moe 110.0 (Some 20.0); row NaiveLoop 150.0 (Some 30.0); row AllExperts 400.0 None ]
      Agreements = []
      Notes = [ "all_experts skipped at T=8192 E=64: a note" ] }

/// The issue's JSON fields, in order.
let private resultFields =
    [ "T"; "E"; "k"; "d"; "expert_hidden"; "variant"; "median_ms"; "ratio_to_dense"; "tokens_per_s"; "useful_gflops"; "peak_mb" ]

let private keysOf (e: JsonElement) = [ for p in e.EnumerateObject() -> p.Name ]

/// A grid small enough for a test: tiny layers, one timed round, a tiny matmul ceiling.
let private tinyGrid =
    { BenchConfig.defaults with
        Tokens = [| 24 |]
        Experts = [| 1; 4 |]
        Ks = [| 1; 2 |]
        ModelDim = 8
        ExpertHidden = 16
        Warmup = 0
        Reps = 1
        CeilingSizes = [| 32 |]
        CeilingReps = 1 }

let tests =
    testList "Bench" [
        testList "FLOPs" [
            testCase "known values at the benchmark's d = 512, expert hidden 1024, E = 8, K = 2" <| fun () ->
                let s = { Tokens = 2048; ModelDim = 512; ExpertHidden = 1024; Experts = 8; K = 2; Activation = GELU }
                let expert = 2.0 * 2.0 * 512.0 * 1024.0 // W1 and W2, 2 FLOPs per weight
                let router = 2.0 * 512.0 * 8.0
                Expect.equal (Flops.forwardPerToken s Moe) (2.0 * expert + router) "K experts plus the router"
                Expect.equal (Flops.forwardPerToken s NaiveLoop) (2.0 * expert + router) "same work as the MoE layer"
                Expect.equal (Flops.forwardPerToken s DenseFlopMatched) (2.0 * expert) "hidden K*H, no router"
                Expect.equal (Flops.forwardPerToken s AllExperts) (8.0 * expert + router) "every expert"
                Expect.equal (Flops.forwardPerToken s Moe) 4202496.0 "4 D H K + 2 D E"
                Expect.equal (Flops.trainPerToken s Moe) (3.0 * 4202496.0) "forward+backward = 3 x forward"

            testCase "SwiGLU has a third projection" <| fun () ->
                let s = { Tokens = 1; ModelDim = 4; ExpertHidden = 8; Experts = 2; K = 1; Activation = SwiGLU }
                Expect.equal (Flops.forwardPerToken s DenseFlopMatched) (2.0 * 3.0 * 4.0 * 8.0) "W1, W2, W3"
        ]

        testList "timing" [
            testCase "median of odd and even counts; none is an error" <| fun () ->
                Expect.equal (median [| 5.0; 1.0; 3.0 |]) 3.0 "middle value"
                Expect.equal (median [| 4.0; 1.0; 3.0; 2.0 |]) 2.5 "mean of the two middle values"
                Expect.throwsT<ArgumentException> (fun () -> median [||] |> ignore) "no samples"

            testCase "interleaved rounds on a fake clock: warm-up untimed, every action once per rotated round" <| fun () ->
                let mutable now = 0.0
                let clock () = now
                let calls = Collections.Generic.List<int>()
                // Action i takes (i + 1) * 10 ms plus its round number, so every sample names its round.
                let runs = Array.zeroCreate 3
                let action i () =
                    calls.Add i
                    let timedRound = runs[i] - 2 // two warm-up calls come first
                    runs[i] <- runs[i] + 1
                    now <- now + float ((i + 1) * 10) + float (max 0 timedRound)
                let samples = interleaved clock 2 5 [| action 0; action 1; action 2 |]
                Expect.equal (List.ofSeq calls |> List.take 6) [ 0; 1; 2; 0; 1; 2 ] "warm-up runs each action in turn"
                let rounds = List.ofSeq calls |> List.skip 6 |> List.chunkBySize 3
                Expect.equal rounds [ [ 0; 1; 2 ]; [ 1; 2; 0 ]; [ 2; 0; 1 ]; [ 0; 1; 2 ]; [ 1; 2; 0 ] ] "round r starts at action r mod n"
                for i in 0..2 do
                    Expect.equal samples[i] [| for r in 0..4 -> float ((i + 1) * 10 + r) |] (sprintf "action %d's samples, warm-up excluded" i)
                    Expect.equal (median samples[i]) (float ((i + 1) * 10 + 2)) "median of the rounds"

            testCase "an action planned for fewer rounds drops out after its last; no warm-up where planned none" <| fun () ->
                let mutable now = 0.0
                let calls = Collections.Generic.List<int>()
                let action i () =
                    calls.Add i
                    now <- now + float (i + 1)
                let plans = [| { Warmup = 1; Reps = 4 }; { Warmup = 0; Reps = 2 } |]
                let samples = interleavedPlan (fun () -> now) plans [| action 0; action 1 |]
                Expect.equal (List.ofSeq calls) [ 0; 0; 1; 1; 0; 0; 0 ] "warm-up of 0 only; 1 runs in rounds 0 and 1 only"
                Expect.equal samples[0] [| 1.0; 1.0; 1.0; 1.0 |] "four rounds"
                Expect.equal samples[1] [| 2.0; 2.0 |] "two rounds"
                Expect.throwsT<ArgumentException> (fun () -> interleavedPlan (fun () -> 0.0) [| plans[0] |] [| ignore; ignore |] |> ignore) "one plan per action"

            testCase "bad repetition counts are errors" <| fun () ->
                Expect.throwsT<ArgumentException> (fun () -> interleaved (fun () -> 0.0) 0 0 [| ignore |] |> ignore) "reps 0"
                Expect.throwsT<ArgumentException> (fun () -> interleaved (fun () -> 0.0) -1 1 [| ignore |] |> ignore) "warmup -1"
        ]

        // Sequenced: the resident high-water mark is the process's, and tests running beside it move it (a
        // --gc-stress run measured 53 MiB for the 64 MiB buffer while other tests freed memory).
        testList "memory" [
            testSequenced <| testCase "peak RSS delta sees a freshly written buffer" (fun () ->
                if not (canMeasurePeakRss ()) then skiptest "needs Linux /proc/self/clear_refs"
                let mib = 64L
                // Finalizers freeing earlier tests' tensors during the measurement lower it (a --gc-stress run measured
                // 56.8 MiB with the test sequenced): run the pending ones first and hold the stress collector off.
                let peak =
                    GcStress.withoutCollections (fun () ->
                        GC.Collect()
                        GC.WaitForPendingFinalizers()
                        peakExtraMb (fun () ->
                            use t = torch.ones ([| mib * 1024L * 1024L / 4L |], dtype = torch.ScalarType.Float32)
                            ()))
                match peak with
                | Some mb -> Expect.isGreaterThanOrEqual mb (residentFraction * float mib) "a 64 MiB tensor raises the high-water mark"
                | None -> failtest "expected a measurement on Linux")
        ]

        testList "references" [
            testCase "one expert, K = 1: the naive loop is the dense FFN (oracle)" <| fun () ->
                use _ = torch.NewDisposeScope()
                for act in [ ReLU; GELU; SwiGLU ] do
                    let w = randomWeights 3 1 5 7 (act = SwiGLU)
                    let cfg = moeConfig 1 1 5 7 act (TokenChoiceTopK(NormaliseThenTopK, true))
                    let x = torch.randn ([| 9L; 5L |], dtype = f64)
                    let r = naiveReference cfg w
                    let y = r.Layer.Forward.Invoke x
                    let expert = { ExpertWeights.W1 = w.W1[0L]; W2 = w.W2[0L]; W3 = w.W3 |> Option.map (fun t -> t[0L]) }
                    let dense = expertForward act expert x
                    Expect.isLessThanOrEqual (relativeError y dense) f64Tol (sprintf "%A: renormalised weight 1 on the only expert" act)

            propertyWith "all-experts equals the naive loop with every expert picked (K = E, softmax weights)" genSmall <| fun s ->
                use _ = torch.NewDisposeScope()
                let w = randomWeights s.Seed s.E s.D s.H (s.Act = SwiGLU)
                let cfg = moeConfig s.E s.E s.D s.H s.Act Selection.AllExperts
                let x = torch.randn([| int64 s.T; int64 s.D |], dtype = f64).requires_grad_ true
                let gradOut = torch.randn ([| int64 s.T; int64 s.D |], dtype = f64)
                let naive = naiveReference cfg w
                let dense = allExpertsLayer cfg w
                let yN, gxN = forwardBackward naive.Layer x gradOut
                let yA, gxA = forwardBackward dense x gradOut
                Expect.isLessThanOrEqual (relativeError yA yN) f64Tol "outputs"
                Expect.isLessThanOrEqual (relativeError gxA gxN) f64Tol "input gradients"
                let gN = naiveGradients naive
                let routerGrad = dense.Parameters[0].grad
                Expect.isLessThanOrEqual (relativeError routerGrad gN.Router) f64Tol "router gradients"
                let w1cat = dense.Parameters[1].grad.view(int64 s.D, int64 s.E, int64 s.H).permute (1L, 0L, 2L) // [E; D; H]
                Expect.isLessThanOrEqual (relativeError w1cat gN.W1) f64Tol "W1 gradients"
                let w2cat = dense.Parameters[2].grad.view (int64 s.E, int64 s.H, int64 s.D) // [E; H; D]
                Expect.isLessThanOrEqual (relativeError w2cat gN.W2) f64Tol "W2 gradients"

            testCase "an expert no token reaches has zero gradient in the stacked naive gradients" <| fun () ->
                use _ = torch.NewDisposeScope()
                let w = { randomWeights 5 3 4 4 false with Router = torch.zeros ([| 4L; 3L |], dtype = f64) }
                // Zero router: every token's top-1 is expert 0 (ties go to the lowest index).
                let cfg = moeConfig 3 1 4 4 ReLU (TokenChoiceTopK(NormaliseThenTopK, true))
                let x = torch.randn([| 6L; 4L |], dtype = f64).requires_grad_ true
                let r = naiveReference cfg w
                forwardBackward r.Layer x (torch.ones ([| 6L; 4L |], dtype = f64)) |> ignore
                let g = naiveGradients r
                Expect.equal (Tensors.scalar (Tensors.plus (g.W1[1L].abs().sum ()) (g.W1[2L].abs().sum ()))) 0.0 "experts 1 and 2 unused"
                Expect.isGreaterThan (Tensors.scalar (g.W1[0L].abs().sum ())) 0.0 "expert 0 used"
        ]

        testList "agreement" [
            // Small versions of every benchmark shape pattern (E in {1, 4, 8} x K in {1, 2}, T a few per expert
            // to many per expert), plus SwiGLU and ReLU experts.
            let patterns =
                [ for e in [ 1; 4; 8 ] do
                    for k in [ 1; 2 ] do
                        if k <= e then
                            for t in [ 3; 64 ] do
                                yield e, k, t, GELU
                  yield 8, 2, 32, SwiGLU
                  yield 4, 1, 32, ReLU ]
            for e, k, t, act in patterns do
                testCase (sprintf "the shipped layer equals the naive reference: E=%d K=%d T=%d %A" e k t act) <| fun () ->
                    use _ = torch.NewDisposeScope()
                    Native.seedAll (e * 100 + k * 10 + t)
                    let cfg = moeConfig e k 16 24 act (TokenChoiceTopK(NormaliseThenTopK, true))
                    let candidate = shippedCandidate torch.CPU cfg
                    let reference = naiveReference cfg (candidate.Weights.Invoke())
                    let x = torch.randn([| int64 t; 16L |]).requires_grad_ true
                    let gradOut = torch.randn ([| int64 t; 16L |])
                    let a = agreement candidate reference x gradOut
                    Expect.isLessThanOrEqual a.Worst agreementTolerance (sprintf "outputs and gradients agree: %A" a)
                    Expect.equal a.GradW3.IsSome (act = SwiGLU) "W3 compared for SwiGLU only"

            testCase "a candidate that computes the wrong thing aborts the run, naming the grid point" <| fun () ->
                use _ = torch.NewDisposeScope()
                let broken (cfg: MoeConfig) =
                    let d, h, e = cfg.ModelDim, cfg.ExpertHidden, cfg.Router.Experts
                    let w = randomWeights 11 e d h false
                    let f32 (t: torch.Tensor) = t.to_type torch.ScalarType.Float32
                    naiveCandidate cfg { Router = f32 w.Router; W1 = f32 w.W1; W2 = f32 w.W2; W3 = None } true
                let e = Expect.throwsC (fun () -> runWith tinyGrid torch.CPU broken ignore |> ignore) id
                Expect.stringContains e.Message "disagrees with the naive reference" "says what failed"
                Expect.stringContains e.Message "T=24 E=1 K=1" "names the grid point"

            testCase "the shipped layer is a candidate only with a linear router and no shared experts" <| fun () ->
                let cfg = moeConfig 4 1 8 8 GELU (TokenChoiceTopK(NormaliseThenTopK, true))
                Expect.throwsT<ArgumentException> (fun () -> shippedCandidate torch.CPU { cfg with SharedExperts = 1 } |> ignore) "shared experts"
                Expect.throwsT<ArgumentException>
                    (fun () -> shippedCandidate torch.CPU { cfg with Router = { cfg.Router with Scorer = AttentionRouter 4 } } |> ignore)
                    "attention router"
        ]

        testList "output" [
            testCase "JSON has exactly the issue's fields, null peak_mb where unmeasured" <| fun () ->
                use doc = JsonDocument.Parse(toJson (sampleReport ()))
                let root = doc.RootElement
                Expect.equal (keysOf root) [ "machine"; "results" ] "top level"
                let machine = root.GetProperty "machine"
                Expect.equal (keysOf machine) [ "matmul_gflops"; "threads" ] "machine"
                Expect.floatClose Accuracy.high (machine.GetProperty("matmul_gflops").GetDouble()) 123.46 "ceiling, rounded"
                let results = [ for r in root.GetProperty("results").EnumerateArray() -> r ]
                Expect.equal results.Length 4 "one per variant"
                for r in results do
                    Expect.equal (keysOf r) resultFields "result fields"
                Expect.equal [ for r in results -> r.GetProperty("variant").GetString() ] [ "dense_flop_matched"; "moe"; "naive_loop"; "all_experts" ] "variant names"
                Expect.equal (results[3].GetProperty("peak_mb").ValueKind) JsonValueKind.Null "unmeasured memory is null"
                Expect.floatClose Accuracy.high (results[1].GetProperty("ratio_to_dense").GetDouble()) 1.1 "ratio"

            testCase "table and Markdown carry every row and the machine line" <| fun () ->
                let report = sampleReport ()
                let table = toTable report
                let md = toMarkdown report
                for v in Variant.all do
                    Expect.stringContains table (Variant.name v) "table row"
                    Expect.stringContains md (Variant.name v) "markdown row"
                Expect.stringContains table "123.5 GFLOP/s" "ceiling in the caption"
                Expect.stringContains md "| T | E | k |" "markdown header"
                Expect.stringContains table "n/a" "unmeasured memory"
                Expect.stringContains md "skipped at T=8192 E=64" "notes in the caption"
                Expect.stringContains table "system allocator" "allocator in the caption"

            testCase "a tiny grid runs end to end: every K, every variant, dense ratio 1, E = 1 skips K = 2" <| fun () ->
                use _ = torch.NewDisposeScope()
                let lines = Collections.Generic.List<string>()
                let report = run tinyGrid torch.CPU lines.Add
                Expect.equal report.Rows.Length (4 + 2 * 4) "E = 1: K = 1 only; E = 4: K = 1 and 2; four variants each"
                Expect.exists lines (fun l -> l.Contains "skipping K=2") "the skipped K is said, not silent"
                for r in report.Rows do
                    Expect.isGreaterThan r.MedianMs 0.0 "timed"
                    if r.Variant = DenseFlopMatched then Expect.equal r.RatioToDense 1.0 "the floor divides by itself"
                Expect.equal report.Agreements.Length 3 "checked before timing each (T, E, K)"
                use doc = JsonDocument.Parse(toJson report)
                Expect.equal (doc.RootElement.GetProperty("results").GetArrayLength()) report.Rows.Length "JSON rows"

            testCase "the phase profile times every phase of a small layer" <| fun () ->
                use _ = torch.NewDisposeScope()
                let shape = { Tokens = 24; ModelDim = 8; ExpertHidden = 16; Experts = 4; K = 2; Activation = GELU }
                let p = profileLayer tinyGrid torch.CPU shape
                Expect.equal [ for x in p.Phases -> x.Phase ]
                    [ "whole layer"; "dense floor"; "router"; "sort"; "dispatch (as shipped)"; "dispatch (autograd path)"
                      "expert matmuls alone"; "gather alone"; "combine alone" ]
                    "phases in order"
                for x in p.Phases do
                    Expect.isGreaterThan x.MedianMs 0.0 (sprintf "%s timed" x.Phase)
                Expect.equal p.Phases[0].ShareOfLayer 1.0 "the whole layer is 100%"
                Expect.stringContains (profileTable p) "router + dispatch" "table"

            testCase "model FLOPs of an encoder-decoder batch: known values" <| fun () ->
                let cfg =
                    { Models.ModelConfig.defaults with
                        VocabSize = 100; ModelDim = 8; Heads = 2; KvHeads = 1; EncoderLayers = 1; DecoderLayers = 1; Ffn = Models.Dense 16 }
                let b = { SourceTokens = 10L; TargetTokens = 4L; SourceLength = 6L; TargetLength = 3L }
                let d, dkv = 8.0, 4.0
                let proj = 2.0 * d * (2.0 * d + 2.0 * dkv) // Q, O and K, V
                let ffn = 2.0 * 2.0 * d * 16.0
                let encoder = 10.0 * (proj + 2.0 * 2.0 * 6.0 * d + ffn)
                let decoder = 4.0 * (proj + 2.0 * 2.0 * 3.0 * d + 2.0 * 2.0 * d * d + 2.0 * 2.0 * 6.0 * d + ffn) + 10.0 * 2.0 * 2.0 * d * dkv
                let output = 4.0 * 2.0 * d * 100.0
                Expect.floatClose Accuracy.high (modelForwardFlops cfg b) (encoder + decoder + output) "hand count"
                let moe = { cfg with Ffn = Models.Moe { MoeConfig.defaults with ModelDim = 8; ExpertHidden = 16; Router = { RouterConfig.defaults with Experts = 4; K = 2 } } }
                Expect.floatClose Accuracy.high (ffnForwardPerToken moe 0) (2.0 * ffn + 2.0 * d * 4.0) "K experts and the router"
                let rank = 2.0
                let loraMoe =
                    match moe.Ffn with
                    | Models.Moe m -> { moe with Ffn = Models.LoraMoe(m, { Rank = int rank; Alpha = 2.0 * rank; FreezeBase = true }) }
                    | other -> failtestf "expected the MoE config above, got %A" other
                // Base W1 once per token; per expert, base W2 on its hidden state and r (D + H) adapters on both projections.
                let perExpert = ffn / 2.0 + 2.0 * 2.0 * rank * (d + 16.0)
                Expect.floatClose Accuracy.high (ffnForwardPerToken loraMoe 0) (ffn / 2.0 + 2.0 * perExpert + 2.0 * d * 4.0) "LoRA experts"
                Expect.floatClose Accuracy.high (ffnForwardPerToken { loraMoe with MoeEvery = 2 } 0) ffn "a dense layer between LoRA-MoE layers"

            testCase "a training step of a tiny summarizer is timed with its phases" <| fun () ->
                let tiny =
                    { Summarizer.SummarizerConfig.defaults with
                        Source = Summarizer.Synthetic { Corpus.CorpusConfig.defaults with TrainSize = 16; ValidSize = 4; TestSize = 4 }
                        Train = { Summarizer.SummarizerConfig.defaults.Train with BatchSize = 4 } }
                let cfg = { TrainStepConfig.defaults with Summarizer = Summarizer.SummarizerConfig.topK 2 1 tiny; Warmup = 0; Steps = 1; CeilingSizes = [| 32 |]; Profile = true }
                let r = trainStep cfg ignore
                Expect.isGreaterThan r.StepMs 0.0 "timed"
                Expect.isGreaterThan r.ModelGflops 0.0 "model FLOPs counted"
                Expect.equal (r.Phases |> List.map fst) [ "zero_grad + batch"; "encoder forward"; "decoder forward"; "loss"; "backward"; "clip"; "optimizer" ] "phases"
                Expect.isSome r.MoeProfile "an MoE model's layer is profiled"
                Expect.isLessThan r.Parameters.Active r.Parameters.Total "top-1 of 2 experts: fewer active than total"
                Expect.stringContains (trainStepTable r) "MFU" "table"

            testCase "generated real-length tokens: repeatable, XSum-like lengths, regular ids only" <| fun () ->
                let n, vocab = 2000, 500
                let a = GeneratedTokens(n, vocab, LengthModel.xsum, 7) :> Batching.ITokenSource
                let b = GeneratedTokens(n, vocab, LengthModel.xsum, 7) :> Batching.ITokenSource
                for i in [ 0; 1; 999; 1999 ] do
                    Expect.equal (a.Read i) (b.Read i) (sprintf "example %d is a function of (seed, index)" i)
                    let doc, sum = a.Read i
                    Expect.equal doc.Length (a.SourceLength i) "document length"
                    Expect.equal sum.Length (a.TargetLength i) "summary length"
                    Expect.all (Array.append doc sum) (fun id -> id >= Tokenizers.SpecialCount && id < vocab) "regular ids"
                let medianOf (f: int -> int) = Measure.median (Array.init n (f >> float))
                // The sample median of 2,000 log-normal draws is within 5% of the model's with overwhelming probability
                // (its standard error is about 1.25 sd / sqrt n = 2% in log space at sd 0.77).
                Expect.floatClose { absolute = 0.0; relative = 0.05 } (medianOf a.SourceLength) LengthModel.xsum.Source.Median "document median"
                Expect.floatClose { absolute = 0.0; relative = 0.05 } (medianOf a.TargetLength) LengthModel.xsum.Target.Median "summary median"
                let longer = Seq.init n a.SourceLength |> Seq.filter (fun l -> l > 512) |> Seq.length
                Expect.isTrue (longer > n / 4 && longer < n / 2) (sprintf "about 35%% of documents exceed 512 tokens, got %d of %d" longer n)
                let other = GeneratedTokens(n, vocab, LengthModel.xsum, 8) :> Batching.ITokenSource
                Expect.notEqual (other.Read 0) (a.Read 0) "another seed, other tokens"

            testCase "a real-length training step reports CPU time, padding, peak memory and its losses" <| fun () ->
                let tiny = { Summarizer.SummarizerConfig.defaults with Train = { Summarizer.SummarizerConfig.defaults.Train with BatchSize = 2 } }
                let cfg = TrainStepConfig.realLength { TrainStepConfig.defaults with Summarizer = tiny; Warmup = 0; Steps = 2; CeilingSizes = [| 32 |] }
                let r = trainStep { cfg with Data = RealLengths(40, 300, LengthModel.xsum) } ignore
                Expect.equal r.Losses.Length 2 "one loss per timed step"
                Expect.all r.Losses (fun l -> Double.IsFinite l && l > 0.0) "finite losses"
                Expect.isGreaterThan r.Cpu.UserS 0.0 "user time counted"
                Expect.isGreaterThanOrEqual r.Cpu.SystemS 0.0 "system time counted"
                Expect.isTrue (r.PaddingFraction >= 0.0 && r.PaddingFraction < 1.0) (sprintf "padding fraction in [0, 1), got %g" r.PaddingFraction)
                Expect.isGreaterThan r.TokensPerBatch 2.0 "two documents' tokens per batch"
                if OperatingSystem.IsLinux() then Expect.isSome r.PeakRssMb "peak RSS on Linux"
                Expect.stringContains (trainStepTable r) "system" "the table shows the kernel's share"

            testCase "allocator comparison: ratios to the first run, and whether the losses are the same bits" <| fun () ->
                let run name ms tps user sys rss losses : StepSummary =
                    { Allocator = name; Threads = 2; MatmulGflops = 50.0; Parameters = 10L; ActiveParameters = 8L; StepMs = ms; TokensPerS = tps
                      Mfu = 0.1; UserS = user; SystemS = sys; PeakRssMb = Some rss; PaddingFraction = 0.05; TokensPerBatch = 1000.0; Losses = losses }
                let system = run "system" 200.0 1000.0 10.0 8.0 1000.0 [| 2.5; 2.25 |]
                let table = allocatorComparison [ system; run "retain (keeps ...)" 100.0 1500.0 9.0 0.5 1200.0 [| 2.5; 2.25 |] ]
                Expect.stringContains table "retain vs system: tokens/s 1.50x, system time 0.06x, peak RSS 1.20x; losses identical bit for bit" "ratios"
                Expect.stringContains table "80.0%" "system time as a share of user time"
                let differ = allocatorComparison [ system; run "retain" 100.0 1500.0 9.0 0.5 1200.0 [| 2.5; 2.2500000000000004 |] ]
                Expect.stringContains differ "losses DIFFER" "one ulp apart is a difference"
                Expect.throwsT<ArgumentException> (fun () -> allocatorComparison [] |> ignore) "nothing to compare"

            // Sequenced: it checks that resetting the process's high-water mark works, which other tests' memory moves.
            testSequenced <| testCase "checkpoint load: the tiny BART shape is written, loaded, verified and measured" (fun () ->
                let folder = Path.Combine(Path.GetTempPath(), "moe-bench-load-tests", Guid.NewGuid().ToString("N"))
                let names = CheckpointLoad.bartTensors CheckpointLoad.BartShape.tiny |> List.map fst
                Expect.contains names "model.decoder.layers.0.encoder_attn.out_proj.bias" "cross-attention in the decoder"
                Expect.isFalse (List.contains "lm_head.weight" names) "tied embeddings stored once"
                let large = CheckpointLoad.bartTensors CheckpointLoad.BartShape.bartLarge
                // bart-large: 406,291,456 parameters (BartForConditionalGeneration.num_parameters()) plus the
                // final_logits_bias buffer's 50,265 values.
                Expect.equal (large |> List.sumBy (snd >> Array.fold (*) 1L)) (406291456L + 50265L) "bart-large stored values"
                let r = CheckpointLoad.run CheckpointLoad.BartShape.tiny folder 3 ignore
                Expect.isTrue r.Verified "loaded values equal the written ones"
                Expect.equal r.Tensors names.Length "every tensor loaded"
                Expect.isFalse (Directory.Exists folder) "checkpoint deleted"
                if canMeasurePeakRss () then
                    Expect.equal r.PeakResetWorks (Some true) "clear_refs resets the high-water mark here"
                    Expect.isSome r.PeakRssMb "peak measured"
                Expect.stringContains (CheckpointLoad.table r) "peak / file size" "table")

            testCase "data pipeline: generated documents at their drawn word counts go through loader, tokenizer and cache" <| fun () ->
                let folder = Path.Combine(Path.GetTempPath(), "moe-bench-data-tests", Guid.NewGuid().ToString("N"))
                let cfg = { DataPipeline.DataBenchConfig.defaults with Documents = 300; Folder = folder }
                let e = DataPipeline.generatedExample cfg 5
                let documentWords, summaryWords = LengthModel.draw cfg.Words cfg.Seed 5
                let words (s: string) = s.Split(' ', StringSplitOptions.RemoveEmptyEntries).Length
                Expect.equal (words e.Document) documentWords "document words as drawn"
                Expect.equal (words e.Summary) summaryWords "summary words as drawn"
                Expect.equal (DataPipeline.generatedExample cfg 5) e "a function of (seed, index)"
                try
                    let r = DataPipeline.run cfg ignore
                    Expect.equal r.Documents 300 "every document cached"
                    Expect.isGreaterThan r.SourceTokens (300L * 50L) "document tokens counted"
                    Expect.isGreaterThan r.TargetTokens 300L "summary tokens counted"
                    Expect.isGreaterThan r.CorpusMb 0.0 "corpus size"
                    Expect.isEmpty (Directory.GetFiles folder) "corpus and cache deleted"
                    Expect.stringContains (DataPipeline.table r) "documents/s" "table"
                finally (try Directory.Delete(folder, true) with _ -> ())
                Expect.isNonEmpty (DataPipeline.DataBenchConfig.validate { cfg with Documents = 0 }) "no documents is an error"

            testCase "config validation lists every problem" <| fun () ->
                let bad = { BenchConfig.defaults with Tokens = [||]; Reps = 0; ModelDim = 0 }
                let problems = BenchConfig.validate bad
                Expect.equal problems.Length 3 (sprintf "three problems, got %A" problems)
                Expect.isEmpty (BenchConfig.validate BenchConfig.defaults) "defaults are valid"
                Expect.isEmpty (BenchConfig.validate BenchConfig.quick) "quick is valid"

            testCase "all-experts memory estimate at the largest grid point" <| fun () ->
                let s = { Tokens = 8192; ModelDim = 512; ExpertHidden = 1024; Experts = 64; K = 2; Activation = GELU }
                // 6 copies of [8192; 64 * 1024] float32 = 12 GiB, plus W1 and W2 gradients (256 MiB).
                Expect.floatClose Accuracy.high (allExpertsPeakMb s) (6.0 * 2048.0 + 256.0) "MiB"

            testCase "generate: a tiny BART's grid, the cache ratio and the bandwidth floor are reported" <| fun () ->
                let cfg =
                    { GenerateBench.GenerateBenchConfig.defaults with
                        SourceLength = 8; NewTokens = 3; Batches = [ 1; 2 ]; Beams = [ 1; 2 ]; Reps = 1; PrefixTokens = 6
                        CopyBytes = 8L * 1024L * 1024L }
                let shape = match GenerateBench.shapeOf "tiny" with Ok c -> c | Error e -> failtest e
                let subject = GenerateBench.randomBart "tiny" shape
                use _ = subject.Module
                // decoder: 2 layers of self- and cross-attention (4 [32; 32] + 4 [32] each), fc1/fc2 (64 x 32 + 64,
                // 32 x 64 + 32) and 3 LayerNorms, the decoder's layernorm_embedding, plus the tied output [1000; 32]
                // and final_logits_bias [1; 1000]
                let layer = 2 * (4 * (32 * 32 + 32)) + (64 * 32 + 64) + (32 * 64 + 32) + 3 * 2 * 32
                let expected = 4L * int64 (2 * layer + 2 * 32 + 1000 * 32 + 1000)
                Expect.equal subject.DecoderBytes expected "decoder bytes per token"
                let r = GenerateBench.run cfg subject ignore
                Expect.equal r.Rows.Length 8 "batch x search x cache"
                Expect.isTrue (r.Rows |> List.forall (fun x -> x.TokensPerS > 0.0 && x.Seconds > 0.0)) "every run timed"
                Expect.isTrue (r.CachedStepMs > 0.0 && r.RecomputeStepMs > 0.0 && r.CopyGbPerS > 0.0) "ratios' parts measured"
                let t = GenerateBench.table r
                for part in [ "target >= 3x"; "target <= 2x"; "| 2 | beam 2 | no |" ] do Expect.stringContains t part "table"
                Expect.isNonEmpty (GenerateBench.GenerateBenchConfig.validate { cfg with Batches = [] }) "no batch is an error"
        ]
    ]
