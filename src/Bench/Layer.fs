/// The MoE layer benchmark (`moe bench moe-layer`): forward+backward time of the shipped layer against its floor
/// (the FLOP-matched dense FFN), the per-expert mask loop and the dense all-experts layer, after checking that
/// their outputs and gradients agree; extra peak memory per variant; analytic FLOPs per token; where the
/// layer's time goes; the report as JSON, a text table and Markdown.
///
/// Axes: T tokens, D model width, H expert hidden width, E experts, K picks per token.
module Moe.Bench.Layer

open System
open System.IO
open System.Text
open System.Text.Json
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Bench.Measure
open Moe.Bench.Reference

// ---------------------------------------------------------------- variants and analytic FLOPs

/// The four layers the benchmark compares.
type Variant =
    /// `Layers.MoeLayer` as shipped.
    | Moe
    /// A dense FFN with hidden size K * H: the same active matmul work with no dispatch. The floor.
    | DenseFlopMatched
    /// The per-expert mask loop (`naiveDispatch`): the common style, kept as a reference.
    | NaiveLoop
    /// Every token through every expert, mixed by the router's softmax over all E.
    | AllExperts

module Variant =
    /// The name used in the JSON output and on the command line.
    let name (v: Variant) : string =
        match v with
        | Moe -> "moe"
        | DenseFlopMatched -> "dense_flop_matched"
        | NaiveLoop -> "naive_loop"
        | AllExperts -> "all_experts"

    /// Every variant, the floor first.
    let all : Variant list = [ DenseFlopMatched; Moe; NaiveLoop; AllExperts ]

    /// Parses a name printed by `name`.
    let parse (text: string) : Result<Variant, string> =
        match all |> List.tryFind (fun v -> name v = text) with
        | Some v -> Ok v
        | None -> Error(sprintf "expected a variant in %s, got '%s'" (all |> List.map name |> String.concat "|") text)

/// One benchmark configuration: a token batch through one layer.
type LayerShape =
    { Tokens: int
      ModelDim: int
      ExpertHidden: int
      Experts: int
      /// Picks per token.
      K: int
      Activation: Activation }

/// Analytic FLOPs per token, counting matrix multiplications only (2 FLOPs, a multiply and an add, per
/// weight per token). Activations, softmax, top-k, gathers and scatters are not counted: they are the
/// overhead being measured, not useful work.
module Flops =
    /// Weight matrices per expert FFN: W1 and W2; SwiGLU adds the value projection W3 (Shazeer 2020).
    let projections (act: Activation) : int =
        match act with
        | SwiGLU -> 3
        | ReLU | GELU -> 2

    /// Forward FLOPs per token of one FFN of hidden size `hidden`: 2 * projections * D * hidden.
    let ffnForward (act: Activation) (modelDim: int) (hidden: int) : float =
        2.0 * float (projections act) * float modelDim * float hidden

    /// Forward FLOPs per token of the linear router x W_r, W_r [D; E].
    let routerForward (modelDim: int) (experts: int) : float = 2.0 * float modelDim * float experts

    /// Forward FLOPs per token of a variant's definition. MoE and the naive loop: K experts plus the
    /// router; the dense FLOP-matched FFN: one FFN of hidden K * H (the same expert work, no router);
    /// all-experts: all E experts plus the router.
    let forwardPerToken (shape: LayerShape) (variant: Variant) : float =
        let expert = ffnForward shape.Activation shape.ModelDim shape.ExpertHidden
        let router = routerForward shape.ModelDim shape.Experts
        match variant with
        | Moe | NaiveLoop -> float shape.K * expert + router
        | DenseFlopMatched -> ffnForward shape.Activation shape.ModelDim (shape.K * shape.ExpertHidden)
        | AllExperts -> float shape.Experts * expert + router

    /// Forward+backward FLOPs per token: 3 x forward. The backward of Y = X W costs two matmuls of the
    /// forward's size (dX = dY W^T and dW = X^T dY), so a training step does 6 FLOPs per active weight per
    /// token (Kaplan et al. 2020, sec. 2.1, C = 6 N).
    let trainPerToken (shape: LayerShape) (variant: Variant) : float = 3.0 * forwardPerToken shape variant


// ---------------------------------------------------------------- layers under benchmark

/// A layer under benchmark: its forward [T; D] -> [T; D] and its trainable leaves, whose gradients are
/// reset between steps.
type BenchLayer =
    { Variant: Variant
      /// Picks per token the layer was built for (E for all-experts).
      K: int
      Forward: Func<Tensor, Tensor>
      Parameters: Tensor list }

/// Drops the gradients of x and of a layer's parameters, returning their memory.
let clearGradients (layer: BenchLayer) (x: Tensor) : unit =
    for p in x :: layer.Parameters do
        p.grad <- null

/// Gives every parameter a zero gradient where it has none, as after a training loop's first step: the
/// gradients then live across steps like the weights, and a step's peak memory is what it adds on top.
let prepareGradients (layer: BenchLayer) : unit =
    use _ = torch.no_grad ()
    for p in layer.Parameters do
        if isNull p.grad then p.grad <- torch.zeros_like p

/// Resets gradients the way a training step does: parameter gradients are zeroed in place (TorchSharp's
/// `optimizer.zero_grad()` keeps the buffers, so backward accumulates into them), and the input's is
/// dropped (inside a model it would be a fresh intermediate each step).
let zeroGradients (layer: BenchLayer) (x: Tensor) : unit =
    x.grad <- null
    use _ = torch.no_grad ()
    for p in layer.Parameters do
        if not (isNull p.grad) then p.grad.zero_ () |> ignore

/// One training-like step of `layer`: gradients reset as a training loop does (`zeroGradients`), forward on
/// x [T; D], backward of upstream gradient `gradOut` [T; D]. Waits for the GPU before returning.
let step (layer: BenchLayer) (x: Tensor) (gradOut: Tensor) () : unit =
    zeroGradients layer x
    do
        use _ = torch.NewDisposeScope()
        let y = layer.Forward.Invoke x // [T; D]
        y.backward ([| gradOut |])
    synchronize x.device

/// The dense FFN with hidden K * H: `Layers.DenseFfn`, the layer a dense model would use.
let denseFlopMatched (shape: LayerShape) (device: torch.Device) : BenchLayer =
    let ffn = new DenseFfn("dense", shape.ModelDim, shape.K * shape.ExpertHidden, shape.Activation)
    ffn.``to`` device |> ignore
    { Variant = DenseFlopMatched
      K = shape.K
      Forward = Func<Tensor, Tensor>(fun x -> (ffn.forward x).Output)
      Parameters = ffn.parameters () |> Seq.map (fun p -> p :> Tensor) |> List.ofSeq }

/// Router logits x W_r, computed as the shipped linear router does (one mm, so the top-k picks match bit for
/// bit). routerWeight [D; E], x [T; D] -> [T; E].
let routerLogits (routerWeight: Tensor) (x: Tensor) : Tensor = x.mm routerWeight

/// Router and expert weights in the layouts the references use.
type MoeWeights =
    { /// W_r [D; E]: logits = x W_r.
      Router: Tensor
      /// [E; D; H]
      W1: Tensor
      /// [E; H; D]
      W2: Tensor
      /// [E; D; H], SwiGLU only.
      W3: Tensor option }

/// A sparse MoE implementation under benchmark: the layer, its weights in the references' layouts (so the
/// references copy exactly what it computes with), and its gradients after a backward in the same layouts.
type Candidate =
    { Layer: BenchLayer
      Weights: Func<MoeWeights>
      Gradients: Func<MoeWeights> }

/// The naive reference as a layer, with its own leaf copies of a candidate's weights: the same router
/// (logits from the router weight, routed by `Routing.route`), then `naiveDispatch` over per-expert copies.
type NaiveReference =
    { Layer: BenchLayer
      Router: Tensor
      Experts: ExpertWeights[] }

/// Builds the naive reference over copies of `weights`.
let naiveReference (cfg: MoeConfig) (weights: MoeWeights) : NaiveReference =
    let router = leafCopy weights.Router
    let experts = splitExperts weights.W1 weights.W2 weights.W3
    { Layer =
        { Variant = NaiveLoop
          K = RouterConfig.picksPerToken cfg.Router
          Forward = Func<Tensor, Tensor>(fun x ->
              use scope = torch.NewDisposeScope()
              let routing = routerLogits router x |> routeLogits cfg.Router
              (naiveDispatch cfg.Activation experts routing x).MoveToOuterDisposeScope())
          Parameters = router :: [ for w in experts do yield w.W1; yield w.W2; yield! Option.toList w.W3 ] }
      Router = router
      Experts = experts }

/// The naive reference's gradients stacked into the candidate layouts; an expert no token reached has
/// no gradient, which reads as zeros.
let naiveGradients (reference: NaiveReference) : MoeWeights =
    let gradOrZeros (w: Tensor) = match w.grad with null -> torch.zeros_like w | g -> g
    let stack (pick: ExpertWeights -> Tensor) = torch.stack (reference.Experts |> Array.map (pick >> gradOrZeros), 0L)
    { Router = gradOrZeros reference.Router
      W1 = stack (fun w -> w.W1)
      W2 = stack (fun w -> w.W2)
      W3 = if reference.Experts.Length > 0 && reference.Experts[0].W3.IsSome then Some(stack (fun w -> w.W3.Value)) else None }

/// The dense all-experts layer over copies of the same router and expert weights: the router config's
/// normaliser over all E (soft mixing), every token through every expert (`allExpertsForward`).
let allExpertsLayer (cfg: MoeConfig) (weights: MoeWeights) : BenchLayer =
    let router = leafCopy weights.Router
    let w1cat, w2cat, w3cat = concatExperts weights.W1 weights.W2 weights.W3
    let forward (x: Tensor) =
        use scope = torch.NewDisposeScope()
        let probs = routerLogits router x |> normalise cfg.Router.Normaliser // [T; E]
        (allExpertsForward cfg.Activation w1cat w2cat w3cat probs x).MoveToOuterDisposeScope()
    { Variant = AllExperts
      K = cfg.Router.Experts
      Forward = Func<Tensor, Tensor> forward
      Parameters = [ yield router; yield w1cat; yield w2cat; yield! Option.toList w3cat ] }

// ---------------------------------------------------------------- agreement

/// Largest |a - b| relative to the largest |b| when that is at least 1, absolute below: how far a result is
/// from the reference at the reference's scale, without dividing round-off by round-off where the reference
/// is zero up to round-off (the router gradient of a renormalised top-1 router is exactly zero in exact
/// arithmetic). Both tensors must have the same shape.
let relativeError (a: Tensor) (reference: Tensor) : float =
    if a.shape <> reference.shape then
        invalidArg "a" (sprintf "expected the shape of the reference %s, got %s" (describe reference) (describe a))
    use _ = torch.NewDisposeScope()
    let a64 = a.detach().cpu().to_type torch.ScalarType.Float64
    let r64 = reference.detach().cpu().to_type torch.ScalarType.Float64
    let diff = scalar ((a64 - r64).abs().max ())
    let scale = scalar (r64.abs().max ())
    diff / max scale 1.0

/// float32 results of the same sums taken in another order (sorted dispatch versus index_add, one wide
/// matmul versus many small ones) differ by a few ulps times the square root of the terms summed; on the
/// benchmark grid the largest seen is 2e-5 (8192 tokens summed into a top-1 router gradient that is zero up
/// to round-off), while a wrong token, weight or expert shows as an error of order 1.
let agreementTolerance = 1e-4

/// Relative errors (see `relativeError`) of a candidate against the naive reference on one input.
type Agreement =
    { Output: float
      GradInput: float
      GradRouter: float
      GradW1: float
      GradW2: float
      /// SwiGLU only.
      GradW3: float option }

    /// The largest of the errors.
    member a.Worst = List.max ([ a.Output; a.GradInput; a.GradRouter; a.GradW1; a.GradW2 ] @ Option.toList a.GradW3)

/// Runs the candidate and the naive reference forward and backward on the same x [T; D] and upstream
/// gradient [T; D], and compares outputs and gradients (of x, the router and every expert weight).
/// The reference must hold copies of the candidate's weights (`naiveReference cfg (candidate.Weights.Invoke())`).
let agreement (candidate: Candidate) (reference: NaiveReference) (x: Tensor) (gradOut: Tensor) : Agreement =
    use _ = torch.NewDisposeScope()
    let run (layer: BenchLayer) =
        clearGradients layer x
        let y = layer.Forward.Invoke x // [T; D]
        y.backward ([| gradOut |])
        y.detach (), x.grad.detach().clone ()
    let yCandidate, gxCandidate = run candidate.Layer
    let g = candidate.Gradients.Invoke()
    let yReference, gxReference = run reference.Layer
    let r = naiveGradients reference
    let result =
        { Output = relativeError yCandidate yReference
          GradInput = relativeError gxCandidate gxReference
          GradRouter = relativeError g.Router r.Router
          GradW1 = relativeError g.W1 r.W1
          GradW2 = relativeError g.W2 r.W2
          GradW3 =
            match g.W3, r.W3 with
            | Some a, Some b -> Some(relativeError a b)
            | None, None -> None
            | _ -> invalidOp "the candidate and the reference disagree on whether the experts have a W3 (SwiGLU)" }
    clearGradients candidate.Layer x
    clearGradients reference.Layer x
    result

// ---------------------------------------------------------------- the benchmark

/// Benchmark settings. `defaults` is the issue's grid; `quick` a subset that runs in under two minutes on
/// two cores.
type BenchConfig =
    { /// T values.
      Tokens: int[]
      /// E values.
      Experts: int[]
      /// K values; a K above an E is skipped for that E (and said so).
      Ks: int[]
      ModelDim: int
      ExpertHidden: int
      Activation: Activation
      /// Untimed rounds before the timed ones (the memory measurement already ran each layer once).
      Warmup: int
      /// Timed rounds; the median is reported.
      Reps: int
      /// Timed rounds of the all-experts layer, which does E / K times the others' work: its time is a few
      /// large matmuls whose spread is small, and running it for every round would dominate the grid's time.
      /// It skips the warm-up (its memory step warms it).
      AllExpertsReps: int
      /// Variants to time; the dense FLOP-matched FFN is always timed (it is what ratios divide by).
      Variants: Variant[]
      Seed: int
      /// Square matmul sizes for the ceiling (`matmulGflops`).
      CeilingSizes: int[]
      /// Timed products per size for the matmul ceiling.
      CeilingReps: int }

module BenchConfig =
    /// Fewest timed rounds whose median the issue accepts.
    let minReps = 7

    /// d = 512, expert hidden 1024, T in {2048, 8192}, E in {8, 32, 64}, K in {1, 2}, every variant.
    let defaults =
        { Tokens = [| 2048; 8192 |]
          Experts = [| 8; 32; 64 |]
          Ks = [| 1; 2 |]
          ModelDim = 512
          ExpertHidden = 1024
          Activation = MoeConfig.defaults.Activation
          Warmup = 1
          Reps = minReps
          AllExpertsReps = 3
          Variants = Array.ofList Variant.all
          Seed = 0
          CeilingSizes = Array.ofList ceilingSizes
          CeilingReps = minReps }

    /// T = 2048, E in {8, 64}, K in {1, 2}: the small-batch end of the grid, including the
    /// 32-tokens-per-expert case (E = 64, K = 1); without the all-experts layer (E / K times the work).
    let quick =
        { defaults with
            Tokens = [| 2048 |]
            Experts = [| 8; 64 |]
            Variants = [| DenseFlopMatched; Moe; NaiveLoop |] }

    /// Every problem with the settings, empty when they are usable.
    let validate (cfg: BenchConfig) : string list =
        let positive what (xs: int[]) =
            [ if xs.Length = 0 then sprintf "%s: expected at least one value, got none" what
              for v in xs do
                  if v < 1 then sprintf "%s: expected values >= 1, got %d" what v ]
        [ yield! positive "Tokens" cfg.Tokens
          yield! positive "Experts" cfg.Experts
          yield! positive "Ks" cfg.Ks
          if cfg.ModelDim < 1 then sprintf "ModelDim must be >= 1, got %d" cfg.ModelDim
          if cfg.ExpertHidden < 1 then sprintf "ExpertHidden must be >= 1, got %d" cfg.ExpertHidden
          if cfg.Warmup < 0 then sprintf "Warmup must be >= 0, got %d" cfg.Warmup
          if cfg.Reps < 1 then sprintf "Reps must be >= 1, got %d" cfg.Reps
          if cfg.AllExpertsReps < 1 then sprintf "AllExpertsReps must be >= 1, got %d" cfg.AllExpertsReps
          yield! positive "CeilingSizes" cfg.CeilingSizes
          if cfg.CeilingReps < 1 then sprintf "CeilingReps must be >= 1, got %d" cfg.CeilingReps
          if cfg.Ks.Length > 0 && cfg.Experts.Length > 0 && cfg.Ks |> Array.forall (fun k -> cfg.Experts |> Array.forall (fun e -> k > e)) then
              sprintf "every K (%A) exceeds every E (%A): nothing to run" cfg.Ks cfg.Experts ]

    /// The MoE config of one grid point: the default token-choice top-k router, dropless.
    let moeConfig (cfg: BenchConfig) (experts: int) (k: int) : MoeConfig =
        { MoeConfig.defaults with
            ModelDim = cfg.ModelDim
            ExpertHidden = cfg.ExpertHidden
            Activation = cfg.Activation
            Router = { RouterConfig.defaults with Experts = experts; K = k; Capacity = Dropless } }

/// The machine the numbers come from.
type Machine =
    { /// Measured float32 matmul ceiling (`matmulGflops`).
      MatmulGflops: float
      /// libtorch intra-op threads.
      Threads: int
      /// The process's CPU allocator policy (`Native.cpuAllocatorInForce`).
      Allocator: Native.CpuAllocator }

/// One variant at one grid point.
type BenchRow =
    { Shape: LayerShape
      Variant: Variant
      /// Median forward+backward milliseconds over the timed rounds.
      MedianMs: float
      /// MedianMs over the FLOP-matched dense FFN's MedianMs at the same T and K, from the same rounds.
      RatioToDense: float
      TokensPerS: float
      /// `Flops.trainPerToken` * T / time: the variant's own model FLOPs per second (all E experts for
      /// all-experts), excluding dispatch work.
      UsefulGflops: float
      /// Extra peak memory of one step (`peakExtraMb`) on top of the weights and their gradients (which live
      /// across steps): activations and temporaries. None on CUDA or where it cannot be measured.
      PeakMb: float option
      /// Every timed round, milliseconds.
      SamplesMs: float[] }

/// A whole benchmark run.
type BenchReport =
    { Machine: Machine
      Rows: BenchRow list
      /// The candidate-versus-reference check of each (T, E, K), run before timing it.
      Agreements: ((int * int * int) * Agreement) list
      /// What the rows do not show: layers skipped and why.
      Notes: string list }

/// Copies of the all-experts layer's hidden activations [T; E*H] one step holds at its peak: the
/// pre-activation, the activation and the weighted hidden kept for backward, and gradients of two of them
/// while backward runs (measured: 5.3 at T = 2048, E = 64, rounded up).
let allExpertsActivationCopies = 6.0

/// Share of the machine's available memory one benchmarked layer may take: the machine is shared, and the
/// others' work should keep running.
let memoryShare = 0.5

/// Estimated extra peak memory, MiB, of one all-experts step: its activations (`allExpertsActivationCopies`)
/// and its weight gradients.
let allExpertsPeakMb (shape: LayerShape) : float =
    let floats = float shape.Tokens * float shape.Experts * float shape.ExpertHidden
    let weights = float (Flops.projections shape.Activation) * float shape.Experts * float shape.ModelDim * float shape.ExpertHidden
    (allExpertsActivationCopies * floats + weights) * 4.0 / bytesPerMib

/// Runs one (T, E) group: every K's dense floor, candidate and naive reference, plus the all-experts layer
/// (which does not depend on K: timed once and reported on every K's row), all interleaved in one set of
/// rounds. Checks each candidate against the naive reference first and raises if they disagree.
let private runGroup (cfg: BenchConfig) (device: torch.Device) (candidateFor: MoeConfig -> Candidate) (progress: string -> unit) (t: int) (e: int) =
    use _ = torch.NewDisposeScope()
    Native.seedAll cfg.Seed
    let ks = cfg.Ks |> Array.filter (fun k -> k <= e) |> Array.distinct
    for k in cfg.Ks |> Array.filter (fun k -> k > e) |> Array.distinct do
        progress (sprintf "T=%d E=%d: skipping K=%d (more picks than experts)" t e k)
    let wants v = v = DenseFlopMatched || Array.contains v cfg.Variants
    let x = torch.randn([| int64 t; int64 cfg.ModelDim |], device = device).requires_grad_ true // [T; D]
    let gradOut = torch.randn ([| int64 t; int64 cfg.ModelDim |], device = device) // [T; D]
    let shapeOf k = { Tokens = t; ModelDim = cfg.ModelDim; ExpertHidden = cfg.ExpertHidden; Experts = e; K = k; Activation = cfg.Activation }
    let perK =
        [ for k in ks do
            let moeCfg = BenchConfig.moeConfig cfg e k
            let candidate = candidateFor moeCfg
            let reference = naiveReference moeCfg (candidate.Weights.Invoke())
            let a = agreement candidate reference x gradOut
            progress (sprintf "T=%d E=%d K=%d: candidate vs naive reference, largest relative error %.2g (output %.2g)" t e k a.Worst a.Output)
            if not (a.Worst <= agreementTolerance) then
                invalidOp (sprintf "the MoE layer disagrees with the naive reference at T=%d E=%d K=%d (tolerance %g): %A" t e k agreementTolerance a)
            let layers =
                [ denseFlopMatched (shapeOf k) device
                  if wants Moe then candidate.Layer
                  if wants NaiveLoop then reference.Layer ]
            k, candidate, layers, a ]
    let allExperts, notes =
        match perK with
        | (_, candidate, _, _) :: _ when wants AllExperts ->
            let need = allExpertsPeakMb (shapeOf (Array.head ks))
            match availableMb () with
            | Some free when device.``type`` = DeviceType.CPU && need > memoryShare * free ->
                let note = sprintf "all_experts skipped at T=%d E=%d: it needs about %.0f MB, more than %.0f%% of the %.0f MB available" t e need (100.0 * memoryShare) free
                progress note
                None, [ note ]
            | _ -> Some(allExpertsLayer (BenchConfig.moeConfig cfg e (Array.head ks)) (candidate.Weights.Invoke())), []
        | _ -> None, []
    let layers = [ for (k, _, ls, _) in perK do for l in ls -> k, l ] @ (allExperts |> Option.map (fun l -> 0, l) |> Option.toList)
    let measurePeak = device.``type`` = DeviceType.CPU
    let peaks =
        layers
        |> List.map (fun (k, l) ->
            progress (sprintf "T=%d E=%d K=%s: %s, first step (memory)" t e (if k = 0 then "any" else string k) (Variant.name l.Variant))
            prepareGradients l
            if measurePeak then peakExtraMb (step l x gradOut) else step l x gradOut (); None)
    progress (sprintf "T=%d E=%d: %d warm-up and %d timed rounds over %d layers" t e cfg.Warmup cfg.Reps layers.Length)
    let plans =
        [| for (_, l) in layers ->
            if l.Variant = AllExperts then { Warmup = 0; Reps = cfg.AllExpertsReps } else { Warmup = cfg.Warmup; Reps = cfg.Reps } |]
    let samples = interleavedPlan (stopwatchClock ()) plans [| for (_, l) in layers -> step l x gradOut |]
    for _, l in layers do clearGradients l x
    let timed = List.zip3 layers peaks (List.ofArray samples)
    let rows =
        [ for k in ks do
            let mine = timed |> List.filter (fun ((k', _), _, _) -> k' = k || k' = 0)
            let denseMs = mine |> List.pick (fun ((_, l), _, s) -> if l.Variant = DenseFlopMatched then Some(median s) else None)
            for (_, l), peak, s in mine do
                let shape = shapeOf k
                let ms = median s
                { Shape = shape
                  Variant = l.Variant
                  MedianMs = ms
                  RatioToDense = ms / denseMs
                  TokensPerS = float t / (ms / 1000.0)
                  UsefulGflops = Flops.trainPerToken shape l.Variant * float t / (ms / 1000.0) / 1e9
                  PeakMb = peak
                  SamplesMs = s } ]
    let agreements = [ for (k, _, _, a) in perK -> (t, e, k), a ]
    rows, agreements, notes

/// Runs the benchmark grid on `device` with `candidateFor` building the MoE layer under test for each grid
/// point; `progress` receives one line per phase. Measures the matmul ceiling first.
let runWith (cfg: BenchConfig) (device: torch.Device) (candidateFor: MoeConfig -> Candidate) (progress: string -> unit) : BenchReport =
    let cfg = orFail "benchmark config" (BenchConfig.validate cfg) cfg
    progress "measuring the float32 matmul ceiling"
    let machine =
        { MatmulGflops = matmulGflops device (List.ofArray cfg.CeilingSizes) cfg.CeilingReps
          Threads = torch.get_num_threads ()
          Allocator = Native.cpuAllocatorInForce () }
    progress (sprintf "matmul ceiling %.1f GFLOP/s on %d threads" machine.MatmulGflops machine.Threads)
    let groups = [ for t in cfg.Tokens do for e in cfg.Experts -> runGroup cfg device candidateFor progress t e ]
    { Machine = machine
      Rows = groups |> List.collect (fun (rows, _, _) -> rows)
      Agreements = groups |> List.collect (fun (_, a, _) -> a)
      Notes = groups |> List.collect (fun (_, _, n) -> n) }

/// The shipped layer (`Layers.MoeLayer`) on `device`, checked to be benchmarkable: a linear router and no
/// shared experts, so that the references can copy every weight it computes with.
let shippedLayer (device: torch.Device) (cfg: MoeConfig) : MoeLayer =
    if cfg.Router.Scorer <> LinearRouter then invalidArg "cfg" (sprintf "expected a LinearRouter for the benchmark, got %A" cfg.Router.Scorer)
    if cfg.SharedExperts <> 0 then invalidArg "cfg" (sprintf "expected SharedExperts = 0 for the benchmark, got %d" cfg.SharedExperts)
    let layer = new MoeLayer("moe", cfg)
    layer.``to`` device |> ignore
    layer

/// A built MoE layer as a benchmark candidate.
let candidateOf (layer: MoeLayer) : Candidate =
    let weights () =
        { Router = layer.Router.Weight
          W1 = layer.Experts.W1
          W2 = layer.Experts.W2
          W3 = Option.ofObj layer.Experts.W3 }
    let gradOf (w: Tensor) = match w.grad with null -> torch.zeros_like w | g -> g
    { Layer =
        { Variant = Moe
          K = RouterConfig.picksPerToken layer.Config.Router
          Forward = Func<Tensor, Tensor>(fun x -> (layer.forward x).Output)
          Parameters = layer.parameters () |> Seq.map (fun p -> p :> Tensor) |> List.ofSeq }
      Weights = Func<MoeWeights> weights
      Gradients = Func<MoeWeights>(fun () ->
          let w = weights ()
          { Router = gradOf w.Router; W1 = gradOf w.W1; W2 = gradOf w.W2; W3 = w.W3 |> Option.map gradOf }) }

/// The shipped layer as a benchmark candidate (see `shippedLayer`).
let shippedCandidate (device: torch.Device) (cfg: MoeConfig) : Candidate = candidateOf (shippedLayer device cfg)

/// Runs the benchmark grid on `device` for the shipped `Layers.MoeLayer` (see `runWith`).
let run (cfg: BenchConfig) (device: torch.Device) (progress: string -> unit) : BenchReport =
    runWith cfg device (shippedCandidate device) progress

// ---------------------------------------------------------------- where the MoE layer's time goes

/// One phase of the MoE layer's step, timed alone (forward and, where it has one, backward).
type PhaseTime =
    { Phase: string
      MedianMs: float
      /// MedianMs over the whole layer's step in the same rounds.
      ShareOfLayer: float }

/// Per-phase profile of one grid point.
type LayerProfile =
    { Shape: LayerShape
      Phases: PhaseTime list }

/// Times the shipped layer's step phase by phase, each phase alone (forward and, where it has one,
/// backward) on inputs the layer itself produced, interleaved with the whole layer and the dense floor:
/// - router: logits, top-k, statistics and balancing losses;
/// - sort: grouping the slots by expert and the counts copied to the host (no gradient);
/// - dispatch (as shipped): `Layers.combineExperts` on the router's output, i.e. sort, gather, expert FFNs
///   and weighted combine on the layer's default path;
/// - dispatch (autograd path): the same through `combineExpertsWith Autograd`, for comparison;
/// - expert matmuls alone: each expert's FFN on its pre-grouped rows, separate weight tensors, no gather or
///   scatter: the grouped-GEMM floor that any dispatch pays;
/// - gather and combine alone: index_select of the token rows, and weights times outputs index-added back.
/// Gradients are reset as `step` does. Whole layer minus (router + dispatch as shipped) is what is left
/// between the phases (the layer's own bookkeeping, gradient accumulation into x).
let profileLayer (cfg: BenchConfig) (device: torch.Device) (shape: LayerShape) : LayerProfile =
    use _ = torch.NewDisposeScope()
    Native.seedAll cfg.Seed
    let t, d, e, k = int64 shape.Tokens, int64 shape.ModelDim, int64 shape.Experts, int64 shape.K
    let moeCfg = BenchConfig.moeConfig { cfg with ModelDim = shape.ModelDim; ExpertHidden = shape.ExpertHidden; Activation = shape.Activation } shape.Experts shape.K
    let layer = shippedLayer device moeCfg
    let candidate = candidateOf layer
    let dense = denseFlopMatched shape device
    let x = torch.randn([| t; d |], device = device).requires_grad_ true // [T; D]
    let gradOut = torch.randn ([| t; d |], device = device) // [T; D]
    let routing = layer.Router.Route(x.detach (), None)
    let sortSlots () =
        let key = Tensors.withInt64Scalar e (fun v -> routing.Experts.reshape(-1L).masked_fill (routing.Kept.reshape(-1L).logical_not (), v)) // [T*K]
        let struct (_, order) = key.sort (0L, false, true) // [T*K]
        let counts = toInt64s (torch.bincount (key, minlength = e + 1L)) // [E + 1]
        let perExpert = counts[0 .. int e - 1]
        let slot = order.narrow (0L, 0L, Array.sum perExpert) // [N]
        slot, Tensors.withInt64Scalar k (fun v -> slot.div (v, rounding_mode = torch.RoundingMode.floor)), perExpert
    let slot, token, counts = sortSlots ()
    let n = slot.shape[0]
    let rows = x.detach().index_select(0L, token).requires_grad_ true // [N; D]
    let gradRows = torch.randn_like rows // [N; D]
    let outputs = torch.randn([| n; d |], device = device).requires_grad_ true // [N; D]
    let weights = routing.Weights.detach().clone().requires_grad_ true // [T; K]
    let gradWeights = torch.randn_like routing.Weights // [T; K]
    let separate = splitExperts layer.Experts.W1 layer.Experts.W2 (Option.ofObj layer.Experts.W3)
    let expertParams = layer.Experts.parameters () |> Seq.map (fun p -> p :> Tensor) |> List.ofSeq
    let separateParams = [ for w in separate do yield w.W1; yield w.W2; yield! Option.toList w.W3 ]
    /// Inputs lose their gradient, parameters keep theirs zeroed in place (as `step`).
    let reset (inputs: Tensor list) (parameters: Tensor list) =
        for i in inputs do i.grad <- null
        use _ = torch.no_grad ()
        for p in parameters do
            if not (isNull p.grad) then p.grad.zero_ () |> ignore
    let phase (inputs: Tensor list) (parameters: Tensor list) (body: unit -> unit) () =
        reset inputs parameters
        do
            use _ = torch.NewDisposeScope()
            body ()
        synchronize device
    let dispatchWith (path: DispatchPath option) () =
        let r = weights.reshape (t, k) // [T; K], differentiable
        let y =
            match path with
            | Some p -> combineExpertsWith p layer.Experts routing.Experts r routing.Kept x
            | None -> combineExperts layer.Experts routing.Experts r routing.Kept x
        y.backward ([| gradOut |])
    let phases =
        [ "whole layer", step candidate.Layer x gradOut
          "dense floor", step dense x gradOut
          "router", phase [ x ] [ layer.Router.Weight ] (fun () ->
              let r = layer.Router.Route(x, None)
              let aux = auxLosses r
              (List.reduce plus [ (r.Weights * gradWeights).sum (); aux.SwitchAux; aux.ZLoss; aux.Importance; aux.Load ]).backward ())
          "sort", phase [] [] (fun () -> sortSlots () |> ignore)
          "dispatch (as shipped)", phase [ x; weights ] expertParams (dispatchWith None)
          "dispatch (autograd path)", phase [ x; weights ] expertParams (dispatchWith (Some Autograd))
          "expert matmuls alone", phase [ rows ] separateParams (fun () ->
              let chunks = rows.split (counts, 0L)
              let ys = [| for i in 0 .. int e - 1 do if counts[i] > 0L then expertForward shape.Activation separate[i] chunks[i] |]
              torch.cat(ys, 0L).backward ([| gradRows |]))
          "gather alone", phase [ x ] [] (fun () -> x.index_select(0L, token).backward ([| gradRows |]))
          "combine alone", phase [ outputs; weights ] [] (fun () ->
              let w = weights.reshape(-1L).index_select(0L, slot).unsqueeze 1L // [N; 1]
              (withScalar 1.0 (fun one -> torch.zeros_like(x).index_add(0L, token, outputs * w, one))).backward ([| gradOut |])) ]
    for l in [ candidate.Layer; dense ] do prepareGradients l
    for _, a in phases do a () // warm-up, and gradients allocated once as in training
    let samples = interleaved (stopwatchClock ()) cfg.Warmup cfg.Reps [| for _, a in phases -> a |]
    let whole = median samples[0]
    { Shape = shape
      Phases = [ for (name, _), s in List.zip phases (List.ofArray samples) -> { Phase = name; MedianMs = median s; ShareOfLayer = median s / whole } ] }

/// `profileLayer` at every (T, E, K) of the grid with K <= E;
/// `report` receives each profile as it is measured.
let profileGrid (cfg: BenchConfig) (device: torch.Device) (report: LayerProfile -> unit) : unit =
    let cfg = orFail "benchmark config" (BenchConfig.validate cfg) cfg
    for t in cfg.Tokens do
        for e in cfg.Experts do
            for k in cfg.Ks do
                if k <= e then
                    let shape = { Tokens = t; ModelDim = cfg.ModelDim; ExpertHidden = cfg.ExpertHidden; Experts = e; K = k; Activation = cfg.Activation }
                    report (profileLayer cfg device shape)

/// The profile as a table; "router + dispatch" is what the shipped layer's phases add up to.
let profileTable (p: LayerProfile) : string =
    let shipped = [ "router"; "dispatch (as shipped)" ]
    let sum = p.Phases |> List.filter (fun x -> List.contains x.Phase shipped) |> List.sumBy (fun x -> x.MedianMs)
    let whole = (p.Phases |> List.find (fun x -> x.Phase = "whole layer")).MedianMs
    let line (name: string) (ms: float) = sprintf "  %-32s %9.1f ms  %5.0f%%" name ms (100.0 * ms / whole)
    String.concat "\n"
        [ sprintf "T=%d E=%d k=%d (d = %d, expert hidden = %d)" p.Shape.Tokens p.Shape.Experts p.Shape.K p.Shape.ModelDim p.Shape.ExpertHidden
          yield! p.Phases |> List.map (fun x -> line x.Phase x.MedianMs)
          line "router + dispatch" sum ] + "\n"


// ---------------------------------------------------------------- output

/// Decimal places kept in the JSON per field: sub-percent precision, no false digits.
let private round (places: int) (v: float) = Math.Round(v, places)

/// The report as JSON: {"machine": {"matmul_gflops", "threads"}, "results": [{"T", "E", "k", "d",
/// "expert_hidden", "variant", "median_ms", "ratio_to_dense", "tokens_per_s", "useful_gflops", "peak_mb"}]},
/// peak_mb null where it was not measured.
let toJson (report: BenchReport) : string =
    use stream = new MemoryStream()
    do
        use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
        w.WriteStartObject()
        w.WriteStartObject "machine"
        w.WriteNumber("matmul_gflops", round 2 report.Machine.MatmulGflops)
        w.WriteNumber("threads", report.Machine.Threads)
        w.WriteEndObject()
        w.WriteStartArray "results"
        for r in report.Rows do
            w.WriteStartObject()
            w.WriteNumber("T", r.Shape.Tokens)
            w.WriteNumber("E", r.Shape.Experts)
            w.WriteNumber("k", r.Shape.K)
            w.WriteNumber("d", r.Shape.ModelDim)
            w.WriteNumber("expert_hidden", r.Shape.ExpertHidden)
            w.WriteString("variant", Variant.name r.Variant)
            w.WriteNumber("median_ms", round 3 r.MedianMs)
            w.WriteNumber("ratio_to_dense", round 4 r.RatioToDense)
            w.WriteNumber("tokens_per_s", round 1 r.TokensPerS)
            w.WriteNumber("useful_gflops", round 3 r.UsefulGflops)
            match r.PeakMb with
            | Some mb -> w.WriteNumber("peak_mb", round 1 mb)
            | None -> w.WriteNull "peak_mb"
            w.WriteEndObject()
        w.WriteEndArray()
        w.WriteEndObject()
    Encoding.UTF8.GetString(stream.ToArray())

/// Column headers and cells of the report's table, one row per result.
let private tableCells (report: BenchReport) : string[] * string[] list =
    let header = [| "T"; "E"; "k"; "variant"; "median ms"; "x dense"; "tokens/s"; "useful GFLOP/s"; "% ceiling"; "peak MB" |]
    let rows =
        [ for r in report.Rows ->
            [| string r.Shape.Tokens
               string r.Shape.Experts
               string r.Shape.K
               Variant.name r.Variant
               sprintf "%.1f" r.MedianMs
               sprintf "%.2f" r.RatioToDense
               sprintf "%.0f" r.TokensPerS
               sprintf "%.1f" r.UsefulGflops
               sprintf "%.0f%%" (100.0 * r.UsefulGflops / report.Machine.MatmulGflops)
               (match r.PeakMb with Some mb -> sprintf "%.0f" mb | None -> "n/a") |] ]
    header, rows

/// One line on the machine and the grid constants above the table.
let private caption (report: BenchReport) : string =
    let dims =
        match report.Rows with
        | r :: _ -> sprintf "d = %d, expert hidden = %d, %A; " r.Shape.ModelDim r.Shape.ExpertHidden r.Shape.Activation
        | [] -> ""
    let notes = report.Notes |> List.map (fun n -> "; " + n) |> String.concat ""
    sprintf "%sforward+backward; matmul ceiling %.1f GFLOP/s (float32), %d threads, %s allocator; all_experts does not depend on k (timed once per T, E)%s"
        dims report.Machine.MatmulGflops report.Machine.Threads (Native.CpuAllocator.name report.Machine.Allocator) notes

/// The report as an aligned plain-text table.
let toTable (report: BenchReport) : string =
    let header, rows = tableCells report
    let widths = header |> Array.mapi (fun i h -> rows |> List.fold (fun m r -> max m (String.length r[i])) h.Length)
    let line (cells: string[]) =
        cells |> Array.mapi (fun i c -> if i = 3 then c.PadRight widths[i] else c.PadLeft widths[i]) |> String.concat "  "
    String.concat "\n" [ caption report; line header; yield! rows |> List.map line ] + "\n"

/// The report as a Markdown table.
let toMarkdown (report: BenchReport) : string =
    let header, rows = tableCells report
    let line (cells: string[]) = "| " + String.concat " | " cells + " |"
    let align = header |> Array.mapi (fun i _ -> if i = 3 then ":--" else "--:")
    String.concat "\n" [ caption report; ""; line header; line align; yield! rows |> List.map line ] + "\n"
