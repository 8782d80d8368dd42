/// Benchmark harness for the sparse MoE layer (issue 5): forward+backward time of the shipped layer against
/// its floor (the FLOP-matched dense FFN), the per-expert mask loop most code uses, and the dense all-experts
/// layer; the machine's float32 matmul ceiling; extra peak memory per variant; analytic FLOPs per token.
///
/// The per-expert mask loop (`naiveDispatch`) lives here ONLY as a reference for benchmarks and tests: it is
/// the style of the best-known model libraries (a boolean mask over all tokens per expert, index_select, the
/// expert FFN, index_add), kept so the shipped layer can be checked against it and timed beside it. Models
/// use `Layers.MoeLayer`.
///
/// Axes: T tokens, D model width, H expert hidden width, E experts, K picks per token.
module Moe.Bench

open System
open System.Diagnostics
open System.IO
open System.Runtime.InteropServices
open System.Text
open System.Text.Json
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers

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

// ---------------------------------------------------------------- timing

/// A monotonic clock in milliseconds: `stopwatchClock ()` in real runs, a fake in tests.
type Clock = unit -> float

/// A clock reading a fresh `Stopwatch`.
let stopwatchClock () : Clock =
    let sw = Stopwatch.StartNew()
    fun () -> sw.Elapsed.TotalMilliseconds

/// The median; for an even count, the mean of the two middle values.
let median (xs: float[]) : float =
    if xs.Length = 0 then invalidArg "xs" "expected at least one sample, got none"
    let s = Array.sort xs
    let n = s.Length
    if n % 2 = 1 then s[n / 2] else (s[n / 2 - 1] + s[n / 2]) / 2.0

/// How often one action runs in `interleavedPlan`: untimed warm-up calls, then timed rounds.
type RunPlan = { Warmup: int; Reps: int }

/// Times `actions` interleaved, so that machine noise (other processes, frequency changes) hits every action
/// alike and their ratios hold on a busy machine. Warm-up first: in round w every action with more than w
/// warm-up calls runs once, untimed. Then timed round r runs, once each, the actions planned for more than r
/// rounds, starting at action r mod n so that no action always follows the same one (allocator and cache
/// state left by a neighbour); an action planned for fewer rounds (an expensive one) drops out after its
/// last. Returns the milliseconds of each action in each of its rounds: result[action][round].
let interleavedPlan (clock: Clock) (plans: RunPlan[]) (actions: (unit -> unit)[]) : float[][] =
    if plans.Length <> actions.Length then
        invalidArg "plans" (sprintf "expected one plan per action (%d), got %d" actions.Length plans.Length)
    for p in plans do
        if p.Warmup < 0 then invalidArg "plans" (sprintf "expected warm-up counts >= 0, got %d" p.Warmup)
        if p.Reps < 1 then invalidArg "plans" (sprintf "expected rounds >= 1, got %d" p.Reps)
    let n = actions.Length
    let most f = if n = 0 then 0 else plans |> Array.map f |> Array.max
    for w in 0 .. most (fun p -> p.Warmup) - 1 do
        for i in 0 .. n - 1 do
            if plans[i].Warmup > w then actions[i] ()
    let samples = plans |> Array.map (fun p -> Array.zeroCreate p.Reps)
    for r in 0 .. most (fun p -> p.Reps) - 1 do
        for j in 0 .. n - 1 do
            let i = (r + j) % n
            if plans[i].Reps > r then
                let start = clock ()
                actions[i] ()
                samples[i][r] <- clock () - start
    samples

/// `interleavedPlan` with the same warm-up and round counts for every action.
let interleaved (clock: Clock) (warmup: int) (reps: int) (actions: (unit -> unit)[]) : float[][] =
    interleavedPlan clock (Array.create actions.Length { Warmup = warmup; Reps = reps }) actions

// ---------------------------------------------------------------- memory

module private Libc =
    /// glibc: returns free heap pages to the kernel. Without it, memory freed by an earlier variant is
    /// reused without raising the resident set, and a later variant's peak would read too low.
    [<DllImport("libc", EntryPoint = "malloc_trim")>]
    extern int mallocTrim(unativeint pad)

    /// glibc: sets one allocator parameter; returns 1 on success.
    [<DllImport("libc", EntryPoint = "mallopt")>]
    extern int mallopt(int param, int value)

    /// mallopt parameter numbers from glibc's malloc.h.
    let M_TRIM_THRESHOLD = -1
    let M_MMAP_MAX = -4

let private bytesPerMib = 1048576.0

/// A `/proc/self/status` field in kB ("VmHWM:   123456 kB"), or None.
let private procStatusKb (field: string) : int64 option =
    File.ReadAllLines "/proc/self/status"
    |> Array.tryFind (fun l -> l.StartsWith(field + ":"))
    |> Option.map (fun l -> l.Substring(field.Length + 1).Trim().Split(' ')[0] |> int64)

/// True where the kernel lets a process reset its resident high-water mark (Linux, /proc/self/clear_refs).
let canMeasurePeakRss () : bool =
    OperatingSystem.IsLinux() && File.Exists "/proc/self/clear_refs" && File.Exists "/proc/self/status"

/// Extra peak resident memory, in MiB, of one call of `action` on the CPU: free heap pages go back to the
/// kernel (glibc malloc_trim), the kernel's high-water mark is reset to the current resident set (writing
/// "5" to /proc/self/clear_refs), then the result is VmHWM after the call minus VmRSS before it. Tensors
/// that live across the call (inputs, weights, existing gradients) are not counted; gradients allocated by a
/// backward are.
/// None where the kernel does not offer this (not Linux); CUDA memory is not host memory and TorchSharp
/// 0.107 exposes no CUDA allocator statistics, so callers pass only CPU work here.
let peakExtraMb (action: unit -> unit) : float option =
    if not (canMeasurePeakRss ()) then None
    else
        try Libc.mallocTrim 0un |> ignore with :? EntryPointNotFoundException | :? DllNotFoundException -> ()
        File.WriteAllText("/proc/self/clear_refs", "5")
        match procStatusKb "VmRSS" with
        | None -> None
        | Some before ->
            action ()
            procStatusKb "VmHWM" |> Option.map (fun peak -> float (max 0L (peak - before)) * 1024.0 / bytesPerMib)

/// How libtorch's CPU tensors get their memory (glibc malloc underneath).
type CpuAllocator =
    /// glibc's defaults: a block above the mmap threshold (at most 32 MiB) is mapped fresh and unmapped when
    /// freed, so every step of a large layer page-faults its big buffers (activations, a stacked weight
    /// gradient) in again, and the kernel zeroes each page first.
    | SystemAllocator
    /// No mmap and no trimming (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = max): freed blocks stay in the
    /// heap and the next step reuses them without page faults, as PyTorch's CUDA caching allocator does. The
    /// resident set stays at its peak. Process-wide and for the rest of the process.
    | RetainFreedMemory

module CpuAllocator =
    let name (a: CpuAllocator) : string =
        match a with
        | SystemAllocator -> "system"
        | RetainFreedMemory -> "retain"

    let parse (text: string) : Result<CpuAllocator, string> =
        match text with
        | "system" -> Ok SystemAllocator
        | "retain" -> Ok RetainFreedMemory
        | other -> Error(sprintf "expected allocator system|retain, got '%s'" other)

/// Applies an allocator setting to this process (glibc on Linux); SystemAllocator changes nothing.
/// Raises where RetainFreedMemory cannot be applied (not glibc), rather than silently measuring without it.
let useCpuAllocator (allocator: CpuAllocator) : unit =
    match allocator with
    | SystemAllocator -> ()
    | RetainFreedMemory ->
        let ok =
            try Libc.mallopt (Libc.M_MMAP_MAX, 0) = 1 && Libc.mallopt (Libc.M_TRIM_THRESHOLD, Int32.MaxValue) = 1
            with :? EntryPointNotFoundException | :? DllNotFoundException -> false
        if not ok then invalidOp "the retain allocator needs glibc's mallopt (Linux with glibc); use the system allocator here"

/// A `/proc/meminfo` field in kB, or None (not Linux).
let private memInfoKb (field: string) : int64 option =
    if not (File.Exists "/proc/meminfo") then None
    else
        File.ReadAllLines "/proc/meminfo"
        |> Array.tryFind (fun l -> l.StartsWith(field + ":"))
        |> Option.map (fun l -> l.Substring(field.Length + 1).Trim().Split(' ')[0] |> int64)

/// Memory the kernel could give this process now without swapping, in MiB; None where unknown.
let availableMb () : float option = memInfoKb "MemAvailable" |> Option.map (fun kb -> float kb / 1024.0)

// ---------------------------------------------------------------- matmul ceiling

/// Square sizes whose float32 matmul throughput is taken as the machine's ceiling: large enough that BLAS
/// runs at its best, small enough to time in a second on two cores.
let ceilingSizes : int list = [ 1024; 2048 ]

/// Waits for queued GPU work so a clock reading covers it; nothing to wait for on the CPU.
let synchronize (device: torch.Device) : unit =
    if device.``type`` = DeviceType.CUDA then torch.cuda.synchronize ()

/// The measured float32 matmul ceiling in GFLOP/s: for each square size n, the fastest of `reps` timed
/// products of 2 n^3 FLOPs (after one untimed product); the best size wins. The fastest, not the median: a
/// ceiling is what the machine can do, and on a shared machine slower runs measure the neighbours.
let matmulGflops (device: torch.Device) (sizes: int list) (reps: int) : float =
    if List.isEmpty sizes then invalidArg "sizes" "expected at least one matmul size, got none"
    if reps < 1 then invalidArg "reps" (sprintf "expected reps >= 1, got %d" reps)
    let clock = stopwatchClock ()
    sizes
    |> List.map (fun n ->
        use _ = torch.NewDisposeScope()
        let a = torch.randn ([| int64 n; int64 n |], device = device) // [n; n]
        let b = torch.randn ([| int64 n; int64 n |], device = device) // [n; n]
        let product () =
            use _ = torch.NewDisposeScope()
            a.matmul b |> ignore
            synchronize device
        let ms = (interleaved clock 1 reps [| product |])[0] |> Array.min
        2.0 * float n ** 3.0 / (ms / 1000.0) / 1e9)
    |> List.max

// ---------------------------------------------------------------- reference layers (benchmarks and tests only)

/// One expert FFN's weights in the x W layout: y = act(x W1) W2, or (silu(x W1) * x W3) W2 for SwiGLU.
type ExpertWeights =
    { /// [D; H]
      W1: Tensor
      /// [H; D]
      W2: Tensor
      /// [D; H], SwiGLU only.
      W3: Tensor option }

/// One expert FFN on the rows of x: [N; D] -> [N; D]. The same function as `Layers.DenseFfn`.
let expertForward (act: Activation) (w: ExpertWeights) (x: Tensor) : Tensor =
    let h = activate act (x.matmul w.W1) // [N; H]
    let h = match w.W3 with Some w3 -> h * x.matmul w3 | None -> h // [N; H]
    h.matmul w.W2 // [N; D]

/// REFERENCE ONLY. The per-expert mask loop of the best-known model libraries (e.g. the Mixtral sparse
/// block): for each expert, a boolean mask over every (token, slot), the token indices it selects,
/// index_select of those rows, the expert FFN, a multiply by the routing weight and index_add into the
/// output. Every expert scans all T * K slots, and each expert's small matmuls run one after another.
/// Slots with Kept = false are skipped. routing [T; K], x [T; D] -> [T; D].
let naiveDispatch (act: Activation) (experts: ExpertWeights[]) (routing: Routing) (x: Tensor) : Tensor =
    expectFloat "x" "[T; D]" 2 x
    use scope = torch.NewDisposeScope()
    let out = torch.zeros_like x // [T; D]
    for e in 0 .. experts.Length - 1 do
        let mask = routing.Experts.eq(torch.tensor (int64 e, device = x.device)).logical_and routing.Kept // [T; K] bool
        let hits = mask.nonzero () // [N; 2]: token, slot
        if hits.shape[0] > 0L then
            let tokens = hits.select (1L, 0L) // [N]
            let slots = hits.select (1L, 1L) // [N]
            let rows = x.index_select (0L, tokens) // [N; D]
            let weight = routing.Weights.index([| tokens; slots |]).to_type x.dtype // [N]
            let y = expertForward act experts[e] rows * weight.unsqueeze 1L // [N; D]
            out.index_add_ (0L, tokens, y, 1.0) |> ignore
    out.MoveToOuterDisposeScope()

/// The dense all-experts mixture y = sum_e p_e(x) FFN_e(x), with p the router's normaliser over all E (soft
/// mixing, no top-k), computed as two wide matmuls over the experts laid side by side: h = act(x W1cat),
/// each expert's block of h scaled by its weight, then h W2cat. Weighting the hidden block before W2 equals
/// weighting the expert's output, since W2 is linear.
/// w1cat [D; E*H], w2cat [E*H; D], w3cat [D; E*H] (SwiGLU), probs [T; E], x [T; D] -> [T; D].
let allExpertsForward (act: Activation) (w1cat: Tensor) (w2cat: Tensor) (w3cat: Tensor option) (probs: Tensor) (x: Tensor) : Tensor =
    expectFloat "x" "[T; D]" 2 x
    expectFloat "probs" "[T; E]" 2 probs
    use scope = torch.NewDisposeScope()
    let t, e = x.shape[0], probs.shape[1]
    let h = activate act (x.matmul w1cat) // [T; E*H]
    let h = match w3cat with Some w3 -> h * x.matmul w3 | None -> h // [T; E*H]
    let mixed = (h.view (t, e, -1L) * probs.to_type(x.dtype).unsqueeze 2L).view (t, -1L) // [T; E*H]
    mixed.matmul(w2cat).MoveToOuterDisposeScope()

/// Leaf copies of one expert's weights (detached, requiring grad), so a reference layer has its own
/// parameters as a module-per-expert library would.
let private leafCopy (t: Tensor) : Tensor = t.detach().clone().requires_grad_ true

/// Per-expert leaf copies of stacked expert weights. w1 [E; D; H], w2 [E; H; D], w3 [E; D; H] (SwiGLU).
let splitExperts (w1: Tensor) (w2: Tensor) (w3: Tensor option) : ExpertWeights[] =
    expectFloat "w1" "[E; D; H]" 3 w1
    expectFloat "w2" "[E; H; D]" 3 w2
    Array.init (int w1.shape[0]) (fun e ->
        { W1 = leafCopy w1[int64 e]
          W2 = leafCopy w2[int64 e]
          W3 = w3 |> Option.map (fun w -> leafCopy w[int64 e]) })

/// The experts laid side by side as leaf tensors for `allExpertsForward`:
/// w1 [E; D; H] -> [D; E*H], w2 [E; H; D] -> [E*H; D], w3 like w1.
let concatExperts (w1: Tensor) (w2: Tensor) (w3: Tensor option) : Tensor * Tensor * Tensor option =
    expectFloat "w1" "[E; D; H]" 3 w1
    expectFloat "w2" "[E; H; D]" 3 w2
    let side (w: Tensor) = leafCopy (w.detach().permute(1L, 0L, 2L).reshape (w.shape[1], -1L)) // [D; E*H]
    side w1, leafCopy (w2.detach().reshape (-1L, w2.shape[2])), w3 |> Option.map side

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
      /// Applied to the whole process when the run starts (`useCpuAllocator`).
      Allocator: CpuAllocator
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
          Allocator = SystemAllocator
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
      Allocator: CpuAllocator }

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
    useCpuAllocator cfg.Allocator
    progress "measuring the float32 matmul ceiling"
    let machine =
        { MatmulGflops = matmulGflops device (List.ofArray cfg.CeilingSizes) cfg.CeilingReps
          Threads = torch.get_num_threads ()
          Allocator = cfg.Allocator }
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
        let key = routing.Experts.reshape(-1L).masked_fill (routing.Kept.reshape(-1L).logical_not (), e.ToScalar()) // [T*K]
        let struct (_, order) = key.sort (0L, false, true) // [T*K]
        let counts = toInt64s (torch.bincount (key, minlength = e + 1L)) // [E + 1]
        let perExpert = counts[0 .. int e - 1]
        let slot = order.narrow (0L, 0L, Array.sum perExpert) // [N]
        slot, slot.div (k.ToScalar(), rounding_mode = torch.RoundingMode.floor), perExpert
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
              ((r.Weights * gradWeights).sum () + aux.SwitchAux + aux.ZLoss + aux.Importance + aux.Load).backward ())
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
              torch.zeros_like(x).index_add(0L, token, outputs * w, 1.0).backward ([| gradOut |])) ]
    for l in [ candidate.Layer; dense ] do prepareGradients l
    for _, a in phases do a () // warm-up, and gradients allocated once as in training
    let samples = interleaved (stopwatchClock ()) cfg.Warmup cfg.Reps [| for _, a in phases -> a |]
    let whole = median samples[0]
    { Shape = shape
      Phases = [ for (name, _), s in List.zip phases (List.ofArray samples) -> { Phase = name; MedianMs = median s; ShareOfLayer = median s / whole } ] }

/// `profileLayer` at every (T, E, K) of the grid with K <= E, after applying the config's allocator;
/// `report` receives each profile as it is measured.
let profileGrid (cfg: BenchConfig) (device: torch.Device) (report: LayerProfile -> unit) : unit =
    let cfg = orFail "benchmark config" (BenchConfig.validate cfg) cfg
    useCpuAllocator cfg.Allocator
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

// ---------------------------------------------------------------- a training step of the summarizer

/// Forward FLOPs per token of the feed-forward sublayer of layer `layer` (0-based) in a stack: a dense FFN
/// (also between interleaved MoE layers), an MoE layer's router, configured active experts and shared experts
/// (`Experiments.moeFlops`), or a LoRA-MoE layer's router, shared base and active adapters
/// (`Experiments.loraMoeFlops`).
let ffnForwardPerToken (cfg: Models.ModelConfig) (layer: int) : float =
    match cfg.Ffn with
    | Models.Dense hidden -> Flops.ffnForward cfg.Activation cfg.ModelDim hidden
    | Models.Moe m | Models.LoraMoe (m, _) when not (Models.ModelConfig.isMoeLayer cfg layer) ->
        Flops.ffnForward m.Activation m.ModelDim m.ExpertHidden
    | Models.Moe m -> Experiments.moeFlops m (Experiments.configuredActiveExperts m.Router)
    | Models.LoraMoe (m, lora) -> Experiments.loraMoeFlops m lora (Experiments.configuredActiveExperts m.Router)

/// Token counts of one encoder-decoder batch that the FLOP count reads.
type BatchTokens =
    { /// Real (unpadded) source tokens.
      SourceTokens: int64
      /// Real decoder positions (summary tokens and eos).
      TargetTokens: int64
      /// Padded source length S (each source position attends over S keys).
      SourceLength: int64
      /// Padded decoder length L.
      TargetLength: int64 }

/// Model forward FLOPs of one encoder-decoder batch, matrix multiplications only, counted on real tokens
/// (padding is waste, not model work; Chowdhery et al. 2022, app. B, count model FLOPs the same way):
/// per encoder layer and source token, the Q, K, V, O projections (2 d (2 d + 2 d_kv), d_kv = d KvHeads / Heads),
/// scores and weighted values over S keys (2 * 2 S d) and the FFN; per decoder layer and target token, self
/// attention likewise over L keys, cross-attention Q and O projections (2 * 2 d^2) and scores over S keys,
/// and the FFN; cross-attention K and V projections of every source token in every decoder layer
/// (2 * 2 d d_kv); the output projection (2 d V) per target token. Embedding lookups and norms are free.
let modelForwardFlops (cfg: Models.ModelConfig) (b: BatchTokens) : float =
    let d = float cfg.ModelDim
    let dkv = d * float cfg.KvHeads / float cfg.Heads
    let projections = 2.0 * d * (2.0 * d + 2.0 * dkv)
    let attend keys = 2.0 * 2.0 * float keys * d
    let encoder =
        [ for l in 0 .. cfg.EncoderLayers - 1 -> float b.SourceTokens * (projections + attend b.SourceLength + ffnForwardPerToken cfg l) ]
        |> List.sum
    let decoder =
        [ for l in 0 .. cfg.DecoderLayers - 1 ->
            let self = projections + attend b.TargetLength
            let cross = 2.0 * 2.0 * d * d + attend b.SourceLength
            float b.TargetTokens * (self + cross + ffnForwardPerToken cfg l)
            + (if cfg.EncoderLayers > 0 then float b.SourceTokens * 2.0 * 2.0 * d * dkv else 0.0) ]
        |> List.sum
    encoder + decoder + float b.TargetTokens * 2.0 * d * float cfg.VocabSize

/// Settings of the training-step benchmark.
type TrainStepConfig =
    { /// The job whose training step is timed (`Summarizer.SummarizerConfig.defaults`: the default summarizer).
      Summarizer: Summarizer.SummarizerConfig
      /// Untimed steps first (allocations, AdamW state).
      Warmup: int
      /// Timed steps; medians are reported.
      Steps: int
      /// Square matmul sizes for the ceiling (`matmulGflops`).
      CeilingSizes: int[]
      /// Time the step's phases (batch, encoder, decoder, loss, backward, clipping, optimizer; the forward
      /// then runs as `Summarizer.task` does, in parts) and, for MoE models, profile one MoE layer at the
      /// step's token count (`profileLayer`).
      Profile: bool }

module TrainStepConfig =
    let defaults =
        { Summarizer = Summarizer.SummarizerConfig.defaults
          Warmup = 3
          Steps = 10
          CeilingSizes = Array.ofList ceilingSizes
          Profile = false }

    let validate (cfg: TrainStepConfig) : string list =
        [ if cfg.Warmup < 0 then sprintf "Warmup must be >= 0, got %d" cfg.Warmup
          if cfg.Steps < 1 then sprintf "Steps must be >= 1, got %d" cfg.Steps
          if cfg.CeilingSizes.Length = 0 || Array.exists (fun n -> n < 1) cfg.CeilingSizes then
              sprintf "CeilingSizes: expected sizes >= 1, got %A" cfg.CeilingSizes
          yield! Summarizer.SummarizerConfig.validate cfg.Summarizer |> List.map (fun p -> "Summarizer: " + p) ]

/// What one training step costs.
type TrainStepReport =
    { Machine: Machine
      /// Total and active parameters of the model.
      Parameters: Models.ParameterCount
      /// Median step time, ms.
      StepMs: float
      /// Real source + target tokens per second (median over steps of tokens / time).
      TokensPerS: float
      /// Model FLOPs (3 x `modelForwardFlops`) per second, median over steps, GFLOP/s.
      ModelGflops: float
      /// ModelGflops over the matmul ceiling.
      Mfu: float
      /// Median milliseconds per phase, with --profile: zero_grad + batch, encoder forward, decoder forward
      /// (with the output projection), loss, backward, clip, optimizer.
      Phases: (string * float) list
      /// With --profile and MoE layers: the first MoE layer alone at the step's mean token count.
      MoeProfile: LayerProfile option }

/// Times training steps of the summarizer exactly as `Train` takes them (its task's loss, `Train.totalLoss`,
/// backward, `clip_grad_norm_`, AdamW from `Train.makeOptimizer`, gradients zeroed in place), on batches from
/// the training plan in order. Model FLOPs come from `modelForwardFlops` of each batch; the ceiling from
/// `matmulGflops`. Nothing is written to disk.
let trainStep (cfg: TrainStepConfig) (progress: string -> unit) : TrainStepReport =
    let cfg = orFail "train-step config" (TrainStepConfig.validate cfg) cfg
    let device = cfg.Summarizer.Train.Device |> Native.resolveDevice
    progress "measuring the float32 matmul ceiling"
    let machine = { MatmulGflops = matmulGflops device (List.ofArray cfg.CeilingSizes) BenchConfig.minReps; Threads = torch.get_num_threads (); Allocator = SystemAllocator }
    progress "preparing the data and the model"
    use prepared = Summarizer.prepare cfg.Summarizer
    let sc = Summarizer.SummarizerConfig.resolve (prepared.Tokenizer :> Tokenizers.ITokenizer).VocabSize cfg.Summarizer
    let counts = // as `Summarizer.runWith`: balanced hash tables need the training corpus's token counts
        match sc.Model.Ffn with
        | Models.Moe m when m.Router.Selection = Hash BalancedHash -> Some(Summarizer.tokenCounts sc.Model.VocabSize prepared.Train)
        | _ -> None
    use model = Summarizer.buildModel sc counts
    model.``to`` device |> ignore
    let task = Summarizer.task sc prepared model device
    let optimizer = Train.makeOptimizer sc.Train model
    let trainable = model.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.toArray
    model.train ()
    let batches = task.TrainBatches sc.Train.Seed 0 |> Seq.toArray
    if batches.Length = 0 then invalidOp "the training plan has no batches"
    let tokensOf (indices: int[]) =
        use _ = torch.NewDisposeScope()
        let b = Batching.collate sc.Batching prepared.Train indices
        { SourceTokens = b.SourceMask.sum().item<int64> ()
          TargetTokens = b.TargetMask.sum().item<int64> ()
          SourceLength = b.Source.shape[1]
          TargetLength = b.Target.shape[1] }
    let clock = stopwatchClock ()
    let pad = int64 Tokenizers.specials.Pad
    /// The forward and loss as `Summarizer.task` computes them, with a clock reading after each part:
    /// collate, encoder, decoder (with the output projection), loss.
    let profiledLoss (indices: int[]) (marks: Collections.Generic.List<float>) : Tensor =
        let on (t: Tensor) = if t.device = device then t else t.``to`` device
        let b = Batching.collate sc.Batching prepared.Train indices
        let src, srcValid = on b.Source, on b.SourceMask
        marks.Add(clock ())
        let encoded = model.Encode(src, srcValid)
        synchronize device
        marks.Add(clock ())
        let out = model.Decode(encoded.Memory, srcValid, on b.DecoderInput, on b.TargetMask, Unchecked.defaultof<Models.DecoderCache>)
        synchronize device
        marks.Add(clock ())
        let ce = Train.crossEntropy sc.Train.LabelSmoothing pad out.Logits (on b.Target)
        let total = Train.totalLoss sc.Train.LossWeights { TaskLoss = ce.Loss; Moe = encoded.Moe @ out.Moe; Tokens = ce.Tokens }
        synchronize device
        marks.Add(clock ())
        total
    /// One step as `Train` takes it; returns the clock readings' differences, the last one the whole step.
    let runStep (indices: int[]) : float[] =
        use _ = torch.NewDisposeScope()
        let marks = Collections.Generic.List<float>()
        marks.Add(clock ())
        optimizer.zero_grad ()
        let total =
            if cfg.Profile then profiledLoss indices marks
            else
                let t = Train.totalLoss sc.Train.LossWeights (task.Loss Train.Training indices)
                synchronize device
                marks.Add(clock ())
                t
        total.backward ()
        synchronize device
        marks.Add(clock ())
        let clip = if sc.Train.GradClip > 0.0 then sc.Train.GradClip else Double.PositiveInfinity
        torch.nn.utils.clip_grad_norm_ (trainable, clip, 2.0) |> ignore
        marks.Add(clock ())
        optimizer.step () |> ignore
        synchronize device
        marks.Add(clock ())
        [| for i in 1 .. marks.Count - 1 -> marks[i] - marks[i - 1]
           yield marks[marks.Count - 1] - marks[0] |]
    progress (sprintf "%d warm-up and %d timed steps" cfg.Warmup cfg.Steps)
    let pick i = batches[i % batches.Length]
    for i in 0 .. cfg.Warmup - 1 do runStep (pick i) |> ignore
    let timed = [| for i in cfg.Warmup .. cfg.Warmup + cfg.Steps - 1 -> tokensOf (pick i), runStep (pick i) |]
    let whole (t: float[]) = t[t.Length - 1]
    let stepMs = timed |> Array.map (snd >> whole)
    let tokensPerS = timed |> Array.map (fun (b, t) -> float (b.SourceTokens + b.TargetTokens) / (whole t / 1000.0))
    let gflops = timed |> Array.map (fun (b, t) -> 3.0 * modelForwardFlops sc.Model b / (whole t / 1000.0) / 1e9)
    let phaseNames = [ "zero_grad + batch"; "encoder forward"; "decoder forward"; "loss"; "backward"; "clip"; "optimizer" ]
    let moeProfile =
        match cfg.Profile, sc.Model.Ffn with
        | true, Models.Moe m ->
            let meanTokens = timed |> Array.averageBy (fun (b, _) -> float b.SourceTokens) |> int
            let shape = { Tokens = meanTokens; ModelDim = m.ModelDim; ExpertHidden = m.ExpertHidden; Experts = m.Router.Experts; K = RouterConfig.picksPerToken m.Router; Activation = m.Activation }
            progress (sprintf "profiling one MoE layer at %d tokens (an encoder layer's batch)" meanTokens)
            Some(profileLayer { BenchConfig.defaults with Reps = BenchConfig.minReps } device shape)
        | _ -> None
    let modelGflops = median gflops
    { Machine = machine
      Parameters = model.ParameterCount()
      StepMs = median stepMs
      TokensPerS = median tokensPerS
      ModelGflops = modelGflops
      Mfu = modelGflops / machine.MatmulGflops
      Phases = if cfg.Profile then [ for i, name in List.indexed phaseNames -> name, median (timed |> Array.map (fun (_, t) -> t[i])) ] else []
      MoeProfile = moeProfile }

/// The training-step report as text.
let trainStepTable (r: TrainStepReport) : string =
    String.concat "\n"
        [ sprintf "parameters %d (active per token %d); matmul ceiling %.1f GFLOP/s (float32), %d threads" r.Parameters.Total r.Parameters.Active r.Machine.MatmulGflops r.Machine.Threads
          sprintf "step %.1f ms (median), %.0f tokens/s, model %.2f GFLOP/s = %.1f%% of the ceiling (MFU)" r.StepMs r.TokensPerS r.ModelGflops (100.0 * r.Mfu)
          if not r.Phases.IsEmpty then
              "phases (median ms, share of the step):"
              for name, ms in r.Phases do
                  sprintf "  %-18s %9.1f ms  %5.0f%%" name ms (100.0 * ms / r.StepMs)
          match r.MoeProfile with
          | Some p -> "one MoE layer alone at the step's token count:\n" + profileTable p
          | None -> () ] + "\n"

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
        dims report.Machine.MatmulGflops report.Machine.Threads (CpuAllocator.name report.Machine.Allocator) notes

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

// ---------------------------------------------------------------- C# facade

/// C# entry points: `MoeBenchmark.Run(MoeBenchmark.Defaults, torch.CPU, Console.Error.WriteLine)`.
type MoeBenchmark =
    /// The issue's grid (`BenchConfig.defaults`); change fields with `with` in F# or a copy in C#.
    static member Defaults : BenchConfig = BenchConfig.defaults
    /// The two-minute subset (`BenchConfig.quick`).
    static member Quick : BenchConfig = BenchConfig.quick
    /// Runs the grid for the shipped layer; `progress` receives one line per phase.
    static member Run(cfg: BenchConfig, device: torch.Device, progress: Action<string>) : BenchReport =
        run cfg device progress.Invoke
    /// The per-phase profile of the shipped layer at one shape.
    static member Profile(cfg: BenchConfig, device: torch.Device, shape: LayerShape) : LayerProfile = profileLayer cfg device shape
    /// The training-step benchmark's defaults (the default summarizer).
    static member TrainStepDefaults : TrainStepConfig = TrainStepConfig.defaults
    /// Times training steps of the summarizer (`trainStep`).
    static member TrainStep(cfg: TrainStepConfig, progress: Action<string>) : TrainStepReport = trainStep cfg progress.Invoke
    /// The JSON report (`toJson`).
    static member ToJson(report: BenchReport) : string = toJson report
    /// The plain-text table (`toTable`).
    static member ToTable(report: BenchReport) : string = toTable report
    /// The Markdown table (`toMarkdown`).
    static member ToMarkdown(report: BenchReport) : string = toMarkdown report
