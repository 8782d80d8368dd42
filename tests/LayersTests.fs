/// Expert FFNs, dispatch/combine and the MoE layer: oracles (one expert = dense FFN, k = E = softmax mixing),
/// a naive per-expert masked reference, finite-difference gradients, dtypes, registration, memory, errors,
/// and the C# example.
/// Axes: T tokens, D model width, H expert hidden width, E experts, K picks per token.
module Moe.Tests.LayersTests

open System
open System.IO
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Moe
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Tests.Support

let private f32 = torch.ScalarType.Float32
let private f64 = torch.ScalarType.Float64
let private bf16 = torch.ScalarType.BFloat16

/// float64 paths that differ only in summation order (dispatch vs a masked loop).
let private reorderTol = 1e-10
/// Central finite-difference step in float64 (error O(h^2) plus round-off O(eps / h) ~ 1e-10).
let private fdStep = 1e-6
/// bfloat16 keeps 8 significant bits: relative error ~ 2^-8 per rounding, a few roundings per output.
let private bf16Tol = 5e-2
/// Largest sizes the properties draw: small, so the list stays fast.
let private maxTokens = 12
let private maxExperts = 6
let private maxWidth = 6
/// Steps of the live-tensor test, as the issue asks.
let private leakSteps = 100

/// Normal tensor from a seeded generator (no global random state).
let private randn (seed: int) (shape: int64[]) (dtype: torch.ScalarType) : torch.Tensor =
    torch.randn (shape, dtype = dtype, generator = new torch.Generator(uint64 seed, torch.CPU))

let private maxAbsDiff (a: torch.Tensor) (b: torch.Tensor) : float =
    if a.NumberOfElements = 0L then 0.0 else Tensors.scalar ((a.to_type f64 - b.to_type f64).abs().max ())

/// Largest |a - b| relative to the larger magnitude of the two (1 + max |.| keeps tiny tensors absolute).
let private relDiff (a: torch.Tensor) (b: torch.Tensor) : float =
    let scale = 1.0 + max (Tensors.scalar (a.abs().max ())) (Tensors.scalar (b.abs().max ()))
    maxAbsDiff a b / scale

let private expectClose (tol: float) (what: string) (actual: torch.Tensor) (expected: torch.Tensor) =
    Expect.sequenceEqual actual.shape expected.shape (what + ": shape")
    let d = relDiff actual expected
    Expect.isLessThanOrEqual d tol (sprintf "%s: relative difference %g > %g" what d tol)

/// Expects an ArgumentException whose message contains every fragment.
let private throwsWith (fragments: string list) (f: unit -> unit) =
    let ex = Expect.throwsC f id
    Expect.isTrue (ex :? ArgumentException || ex :? InvalidOperationException)
        (sprintf "expected an ArgumentException or InvalidOperationException, got %s: %s" (ex.GetType().Name) ex.Message)
    for fragment in fragments do
        Expect.stringContains ex.Message fragment "the error names what was expected"

/// Clears gradients of every parameter and of the given leaves.
let private zeroGrads (m: torch.nn.Module) (leaves: torch.Tensor list) =
    for p in Seq.append (m.parameters () |> Seq.map (fun p -> p :> torch.Tensor)) leaves do
        if not (isNull p.grad) then
            p.grad.Dispose()
            p.grad <- null

let private configOf (e: int) (k: int) (d: int) (h: int) (act: Activation) : MoeConfig =
    { MoeConfig.defaults with
        ModelDim = d
        ExpertHidden = h
        Activation = act
        Router = { RouterConfig.defaults with Experts = e; K = k } }

/// The reference the issue calls "the common style": every expert over every token, weighted by a
/// per-expert mask of the slots that chose it. expertIndex/weights/kept [T; K], x [T; D] -> [T; D].
let private naiveMoe (experts: ExpertFfn) (expertIndex: torch.Tensor) (weights: torch.Tensor) (kept: torch.Tensor) (x: torch.Tensor) =
    let mutable out = torch.zeros_like x
    for e in 0 .. experts.Experts - 1 do
        let h = activate experts.Activation (x.matmul (experts.W1.select (0L, int64 e))) // [T; H]
        let h = if isNull experts.W3 then h else h * x.matmul (experts.W3.select (0L, int64 e))
        let y = h.matmul (experts.W2.select (0L, int64 e)) // [T; D]
        let mask = (Tensors.withInt64Scalar (int64 e) (fun v -> expertIndex.eq v)).logical_and(kept).to_type weights.dtype // [T; K]
        let coef = (mask * weights).sum(1L, keepdim = true).to_type x.dtype // [T; 1]
        out <- Tensors.plus out (coef * y)
    out

/// The gradients of `loss` w.r.t. each tensor, as fresh tensors (grads cleared before).
let private gradsOf (loss: torch.Tensor) (wrt: torch.Tensor list) : torch.Tensor list =
    for t in wrt do
        if not (isNull t.grad) then
            t.grad.Dispose()
            t.grad <- null
    loss.backward ()
    [ for t in wrt -> if isNull t.grad then torch.zeros_like t else t.grad.clone () ]

let private finiteDifference = Support.finiteDifferenceInPlace fdStep

// ---------------------------------------------------------------- oracles

/// One expert, k = 1: the router's softmax over one expert is 1, so the layer is exactly the dense FFN.
let private oneExpertEqualsDense (act: Activation) =
    testCase (sprintf "one-expert MoE equals the dense FFN, gradients included (%A)" act) <| fun () ->
        use _ = torch.NewDisposeScope()
        let d, h = 6, 10
        torch.manual_seed 3L |> ignore
        use layer = new MoeLayer("moe", configOf 1 1 d h act)
        use dense = new DenseFfn("dense", d, h, act)
        using (torch.no_grad ()) (fun _ ->
            layer.Experts.W1[0L].copy_ (dense.W1.weight.t ()) |> ignore
            layer.Experts.W2[0L].copy_ (dense.W2.weight.t ()) |> ignore
            if act = SwiGLU then layer.Experts.W3[0L].copy_ (dense.W3.weight.t ()) |> ignore)
        let x = randn 11 [| 2L; 7L; int64 d |] f32
        let xa = x.clone().requires_grad_ true
        let xb = x.clone().requires_grad_ true
        let ya = (layer.forward xa).Output
        let yb = (dense.forward xb).Output
        expectClose Tol.f32 "output" ya yb
        let readout = randn 12 ya.shape f32
        let denseWeights : torch.Tensor list = [ dense.W1.weight; dense.W2.weight ] @ (if act = SwiGLU then [ dense.W3.weight ] else [])
        let moeWeights = [ layer.Experts.W1; layer.Experts.W2 ] @ (if act = SwiGLU then [ layer.Experts.W3 ] else [])
        let ga = gradsOf ((ya * readout).sum ()) (xa :: moeWeights)
        let gb = gradsOf ((yb * readout).sum ()) (xb :: denseWeights)
        expectClose Tol.f32 "dx" ga.Head gb.Head
        for name, gm, gd in List.zip3 [ "W1"; "W2"; "W3" ].[.. gb.Length - 2] ga.Tail gb.Tail do
            expectClose Tol.f32 ("d" + name) (gm[0L]) (gd.t ())

let oracles =
    [ for act in [ ReLU; GELU; SwiGLU ] do
          yield oneExpertEqualsDense act

      yield testCase "top-k with k = E equals dense softmax mixing of all experts, gradients included" <| fun () ->
        use _ = torch.NewDisposeScope()
        let e, d, h, t = 4, 5, 7, 9
        torch.manual_seed 5L |> ignore
        use layer = new MoeLayer("moe", configOf e e d h GELU)
        let x = (randn 21 [| int64 t; int64 d |] f32).requires_grad_ true
        let y = (layer.forward x).Output
        let xr = x.detach().clone().requires_grad_ true
        let probs = torch.nn.functional.softmax (xr.matmul layer.Router.Weight, -1L) // [T; E]
        let all = (Tensors.arange 0L (int64 e) torch.ScalarType.Int64 torch.CPU).expand(int64 t, int64 e).contiguous ()
        let yr = naiveMoe layer.Experts all probs (torch.ones_like (all, dtype = torch.ScalarType.Bool)) xr
        expectClose Tol.f32Loose "output" y yr
        let readout = randn 22 y.shape f32
        let wrt x = [ x; layer.Router.Weight; layer.Experts.W1; layer.Experts.W2 ]
        let ga = gradsOf ((y * readout).sum ()) (wrt x)
        let gb = gradsOf ((yr * readout).sum ()) (wrt xr)
        for name, a, b in List.zip3 [ "dx"; "dW_r"; "dW1"; "dW2" ] ga gb do
            expectClose Tol.f32Loose name a b ]

// ---------------------------------------------------------------- dispatch vs the naive reference

/// A random dispatch problem: sizes, activation, selection, capacity, seed.
type private Problem =
    { T: int; E: int; K: int; D: int; H: int; Act: Activation; Selection: Selection; Capacity: Capacity; Seed: int }

let private genProblem : Gen<Problem> =
    gen {
        let! t = Gen.choose (1, maxTokens)
        let! e = Gen.choose (1, maxExperts)
        let! k = Gen.choose (1, e)
        let! d = Gen.choose (1, maxWidth)
        let! h = Gen.choose (1, maxWidth)
        let! act = Gen.elements [ ReLU; GELU; SwiGLU ]
        let! selection =
            Gen.elements [ TokenChoiceTopK(NormaliseThenTopK, true); TokenChoiceTopK(TopKThenNormalise, false)
                           SwitchTop1; AllExperts; ExpertChoice ]
        let! capacity = Gen.oneof [ Gen.constant Dropless; Gen.elements [ 0.25; 0.5; 1.0; 2.0 ] |> Gen.map Factor ]
        let! seed = Gen.choose (0, 1_000_000)
        return { T = t; E = e; K = k; D = d; H = h; Act = act; Selection = selection; Capacity = capacity; Seed = seed }
    }

let dispatchProperties =
    [ propertyWith "dispatch equals the naive per-expert masked reference, outputs and gradients (float64)" genProblem (fun p ->
        use _ = torch.NewDisposeScope()
        torch.manual_seed (int64 p.Seed) |> ignore
        let routerCfg = { RouterConfig.defaults with Experts = p.E; K = p.K; Selection = p.Selection; Capacity = p.Capacity; MinCapacity = 0 }
        use experts = new ExpertFfn("experts", p.E, p.D, p.H, p.Act)
        experts.``to`` f64 |> ignore
        let x = (randn p.Seed [| int64 p.T; int64 p.D |] f64).requires_grad_ true
        let r = routeLogits routerCfg (randn (p.Seed + 1) [| int64 p.T; int64 p.E |] f64)
        let weights = r.Weights.detach().clone().requires_grad_ true // a leaf, so its gradient can be compared
        let yr = naiveMoe experts r.Experts weights r.Kept x
        let readout = randn (p.Seed + 2) yr.shape f64
        let wrt = [ x; weights; experts.W1; experts.W2 ] @ (if p.Act = SwiGLU then [ experts.W3 ] else [])
        let expected = gradsOf ((yr * readout).sum ()) wrt
        for path in [ Fused; Autograd ] do
            let y = combineExpertsWith path experts r.Experts weights r.Kept x
            expectClose reorderTol (sprintf "%A output" path) y yr
            let actual = gradsOf ((y * readout).sum ()) wrt
            for name, a, b in List.zip3 [ "dx"; "dweights"; "dW1"; "dW2"; "dW3" ].[.. wrt.Length - 1] actual expected do
                expectClose reorderTol (sprintf "%A %s" path name) a b)

      testCase "gradients accumulate across backward passes on both paths (fused: in place into .grad)" <| fun () ->
        use _ = torch.NewDisposeScope()
        torch.manual_seed 7L |> ignore
        use experts = new ExpertFfn("experts", 3, 4, 5, SwiGLU)
        let x = randn 71 [| 6L; 4L |] f32
        let r = routeLogits { RouterConfig.defaults with Experts = 3; K = 2 } (randn 72 [| 6L; 3L |] f32)
        for path in [ Fused; Autograd ] do
            zeroGrads experts []
            (combineExpertsWith path experts r.Experts r.Weights r.Kept x).sum().backward ()
            let once = [ for p in experts.parameters () -> p.grad.clone () ]
            (combineExpertsWith path experts r.Experts r.Weights r.Kept x).sum().backward ()
            for p, g in Seq.zip (experts.parameters ()) once do
                expectClose Tol.f32 (sprintf "%A: two passes = twice one" path) p.grad (Tensors.mulScalar 2.0 g)

      testCase "the fused path repeats bit for bit (expert jobs run in parallel, sums in expert order)" <| fun () ->
        use _ = torch.NewDisposeScope()
        torch.manual_seed 11L |> ignore
        use experts = new ExpertFfn("experts", 6, 8, 12, GELU)
        let x = (randn 81 [| 40L; 8L |] f32).requires_grad_ true
        let r = routeLogits { RouterConfig.defaults with Experts = 6; K = 3 } (randn 82 [| 40L; 6L |] f32)
        let run () =
            zeroGrads experts [ x ]
            let y = combineExpertsWith Fused experts r.Experts r.Weights r.Kept x
            (y * y).sum().backward ()
            Tensors.toFloats y, Tensors.toFloats x.grad, Tensors.toFloats experts.W1.grad
        let a, b = run (), run ()
        let (ya, xa, wa), (yb, xb, wb) = a, b
        Expect.sequenceEqual yb ya "output"
        Expect.sequenceEqual xb xa "dx"
        Expect.sequenceEqual wb wa "dW1"

      testCase "capacity dropping drops: dropped slots contribute nothing, kept ones are computed" <| fun () ->
        use _ = torch.NewDisposeScope()
        let t, e, d, h = 16, 4, 3, 5
        torch.manual_seed 9L |> ignore
        let cfg = { configOf e 1 d h ReLU with Router = { RouterConfig.defaults with Experts = e; K = 1; Capacity = Factor 1.0; MinCapacity = 0 } }
        use layer = new MoeLayer("moe", cfg)
        // every token prefers expert 0: capacity C = ceil(1.0 * 16 * 1 / 4) = 4 of its 16 tokens are kept
        using (torch.no_grad ()) (fun _ ->
            layer.Router.Weight.zero_ () |> ignore
            Tensors.withScalar 1.0 (fun v -> layer.Router.Weight[torch.TensorIndex.Colon, torch.TensorIndex.Single 0L].fill_ v) |> ignore)
        let x = (randn 31 [| int64 t; int64 d |] f32).abs () |> Tensors.addScalar 0.1 // positive, so expert 0 wins everywhere
        let result = layer.forward x
        let report = result.Moe.Value
        Expect.floatClose Accuracy.medium (Tensors.scalar report.Stats.DroppedFraction) (12.0 / 16.0) "12 of 16 dropped"
        let rowNorms = Tensors.toFloats (result.Output.abs().sum (1L))
        let zeroRows = rowNorms |> Array.filter (fun n -> n = 0.0f) |> Array.length
        Expect.equal zeroRows 12 "dropped tokens get a zero output (no shared experts)"
        Expect.equal (Array.sub rowNorms 0 4 |> Array.filter (fun n -> n > 0.0f) |> Array.length) 4 "the first 4 tokens are kept (first come, first served)" ]

// ---------------------------------------------------------------- gradients against finite differences

let gradients =
    [ for act in [ GELU; SwiGLU ] ->
        testCase (sprintf "MoE layer gradients match central finite differences in float64 (%A, shared expert, aux losses)" act) <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 13L |> ignore
            let cfg = { configOf 3 2 4 5 act with SharedExperts = 1 }
            use layer = new MoeLayer("moe", cfg)
            layer.``to`` f64 |> ignore
            layer.eval ()
            let x = (randn 41 [| 3L; 4L |] f64).requires_grad_ true
            let readout = randn 42 [| 3L; 4L |] f64
            let loss () =
                let r = layer.forward x
                let aux = r.Moe.Value.Aux
                Tensors.plus (Tensors.plus ((r.Output * readout).sum ()) (Tensors.mulScalar 0.5 aux.SwitchAux)) (Tensors.mulScalar 0.1 aux.ZLoss)
            let wrt = x :: [ for p in layer.parameters () -> (p :> torch.Tensor) ]
            let analytic = gradsOf (loss ()) wrt
            for t, g in List.zip wrt analytic do
                let numeric = finiteDifference (fun () -> using (torch.no_grad ()) (fun _ -> Tensors.scalar (loss ()))) t
                let a = g.contiguous().view(-1L).data<float>().ToArray()
                Array.iteri2 (fun i (a: float) n ->
                    Expect.floatClose { absolute = Tol.finiteDiff; relative = Tol.finiteDiff } a n (sprintf "entry %d of a %A tensor" i t.shape)) a numeric ]

// ---------------------------------------------------------------- dtypes, registration, memory

let modules =
    [ testCase "bfloat16 forward and backward work, close to float32; routing stays float32" <| fun () ->
        use _ = torch.NewDisposeScope()
        torch.manual_seed 17L |> ignore
        use layer = new MoeLayer("moe", { configOf 4 2 8 16 SwiGLU with SharedExperts = 1 })
        let x = randn 51 [| 2L; 5L; 8L |] f32
        let reference = (layer.forward x).Output
        // float32 master weights, bfloat16 activations
        let mixed = layer.forward (x.to_type bf16)
        Expect.equal mixed.Output.dtype bf16 "output in the input's dtype"
        expectClose bf16Tol "bf16 input, f32 weights" mixed.Output reference
        Expect.equal mixed.Moe.Value.Stats.TokensPerExpert.dtype f32 "stats in float32"
        // everything bfloat16
        layer.``to`` bf16 |> ignore
        let xb = (x.to_type bf16).requires_grad_ true
        let result = layer.forward xb
        Expect.equal result.Output.dtype bf16 "output bf16"
        expectClose bf16Tol "bf16 weights" result.Output reference
        Expect.equal result.Moe.Value.Aux.SwitchAux.dtype f32 "aux losses in float32"
        (Tensors.plus ((Tensors.square (result.Output.float ())).mean ()) result.Moe.Value.Aux.SwitchAux).backward ()
        Expect.isTrue (Tensors.scalar (torch.isfinite(xb.grad).all ()) = 1.0) "finite input gradient"
        Expect.equal layer.Experts.W1.grad.dtype bf16 "weight gradient in bf16"

      testCase "named_parameters and named_buffers keys: every parameter registered" <| fun () ->
        use _ = torch.NewDisposeScope()
        let keysOf (m: torch.nn.Module) = [ for struct (k, _) in m.named_parameters () -> k ] |> List.sort
        let buffersOf (m: torch.nn.Module) = [ for struct (k, _) in m.named_buffers () -> k ] |> List.sort
        use plain = new MoeLayer("moe", configOf 4 2 8 16 GELU)
        Expect.equal (keysOf plain) [ "experts.w1"; "experts.w2"; "router.weight" ] "linear router, GELU"
        Expect.equal (buffersOf plain) [] "no buffers"
        let full =
            { configOf 4 2 8 16 SwiGLU with
                SharedExperts = 2
                Router = { RouterConfig.defaults with Experts = 4; K = 2; Scorer = AttentionRouter 3; Selection = NoisyTopK; BiasUpdateRate = Some 1e-3 } }
        use rich = new MoeLayer("moe", full)
        Expect.equal (keysOf rich)
            [ "experts.w1"; "experts.w2"; "experts.w3"; "router.expert_embeddings"; "router.noise_weight"; "router.query"
              "shared.w1.weight"; "shared.w2.weight"; "shared.w3.weight" ] "attention router, noisy top-k, SwiGLU, shared experts"
        Expect.equal (buffersOf rich) [ "router.selection_bias" ] "loss-free bias buffer"
        let shapes = dict [ for struct (k, p) in rich.named_parameters () -> k, p.shape ]
        Expect.sequenceEqual shapes["experts.w1"] [| 4L; 8L; 16L |] "W1 [E; D; H]"
        Expect.sequenceEqual shapes["experts.w2"] [| 4L; 16L; 8L |] "W2 [E; H; D]"
        Expect.sequenceEqual shapes["router.query"] [| 8L; 3L |] "W_q [D; R]"
        Expect.sequenceEqual shapes["router.expert_embeddings"] [| 4L; 3L |] "embeddings [E; R]"
        Expect.sequenceEqual shapes["shared.w1.weight"] [| 32L; 8L |] "2 shared experts = one FFN of hidden 2 H"
        use hashed = new MoeLayer("moe", { configOf 4 1 8 16 ReLU with Router = { RouterConfig.defaults with Experts = 4; Selection = Hash BalancedHash } })
        Expect.equal (keysOf hashed) [ "experts.w1"; "experts.w2" ] "hash routing learns nothing"
        Expect.equal (buffersOf hashed) [ "router.hash_table" ] "hash table buffer"
        // Module.to replaces parameter objects: the layer must keep using the converted ones
        plain.``to`` f64 |> ignore
        Expect.equal plain.Experts.W1.dtype f64 "fields follow Module.to"
        Expect.equal plain.Router.Weight.dtype f64 "router fields follow Module.to"

      // sequenced: the live-tensor count is process-wide, and parallel tests would move it
      testSequenced <| testCase "100 forward/backward steps keep the live tensor count flat" (fun () ->
        torch.manual_seed 19L |> ignore
        use layer = new MoeLayer("moe", { configOf 4 2 8 16 SwiGLU with SharedExperts = 1; Router = { RouterConfig.defaults with Experts = 4; K = 2; Capacity = Factor 1.0; BiasUpdateRate = Some 1e-3 } })
        layer.train ()
        let step (i: int) =
            use _ = torch.NewDisposeScope()
            zeroGrads layer []
            let x = randn i [| 3L; 6L; 8L |] f32
            let r = layer.forward x
            let loss = Tensors.plus ((Tensors.square r.Output).mean ()) (weightedAux LossWeights.defaults r.Moe.Value.Aux)
            loss.backward ()
        step 0
        let before = Tensors.liveTensors ()
        for i in 1 .. leakSteps do step i
        let after = Tensors.liveTensors ()
        Expect.isLessThanOrEqual (after - before) 0L (sprintf "live tensors %d -> %d over %d steps" before after leakSteps))

      testCase "loss-free bias moves after training forwards only, toward the under-loaded experts" <| fun () ->
        use _ = torch.NewDisposeScope()
        torch.manual_seed 23L |> ignore
        let rate = 0.01
        use layer = new MoeLayer("moe", { configOf 4 1 8 16 GELU with Router = { RouterConfig.defaults with Experts = 4; K = 1; BiasUpdateRate = Some rate } })
        let x = randn 61 [| 32L; 8L |] f32
        layer.eval ()
        layer.forward x |> ignore
        Expect.sequenceEqual (Tensors.toFloats layer.Router.SelectionBias) (Array.zeroCreate 4) "evaluation leaves the bias"
        layer.train ()
        let load = Tensors.toFloats ((layer.forward x).Moe.Value.Stats.TokensPerExpert)
        let bias = Tensors.toFloats layer.Router.SelectionBias
        let mean = Array.average load
        for e in 0 .. 3 do
            let expected = float32 (rate * float (sign (mean - load[e])))
            Expect.floatClose Accuracy.high (float bias[e]) (float expected) (sprintf "b_%d = u sign(mean - load)" e)

      testCase "hash routing reads token ids: deterministic, independent of x; balanced table from counts" <| fun () ->
        use _ = torch.NewDisposeScope()
        torch.manual_seed 29L |> ignore
        let ids = (torch.tensor [| 0L; 5L; 3L; 5L; 9L; 1L |]).reshape (2L, 3L)
        for scheme in [ RandomHash 4; BalancedHash ] do
            use layer = new MoeLayer("moe", { configOf 3 1 4 6 GELU with Router = { RouterConfig.defaults with Experts = 3; Selection = Hash scheme } })
            if scheme = BalancedHash then
                throwsWith [ "SetHashTableFromCounts" ] (fun () -> layer.forward (randn 1 [| 2L; 3L; 4L |] f32, ids) |> ignore)
                layer.Router.SetHashTableFromCounts (Array.init 10 (fun i -> int64 (10 - i)))
                Expect.equal layer.Router.HashTable.shape [| 10L |] "table [V]"
                let fromCounts = Tensors.toInt64s layer.Router.HashTable
                let corpus = torch.tensor [| for i in 0L .. 9L do for _ in 1L .. 10L - i -> i |] // id i occurs 10 - i times
                layer.Router.SetHashTableFromCorpus (corpus, 10)
                Expect.sequenceEqual (Tensors.toInt64s layer.Router.HashTable) fromCounts "the corpus gives the same table as its counts"
            let tokensPerExpert seed = Tensors.toFloats (layer.forward (randn seed [| 2L; 3L; 4L |] f32, ids)).Moe.Value.Stats.TokensPerExpert
            Expect.sequenceEqual (tokensPerExpert 1) (tokensPerExpert 2) "same ids, other hidden states, same routing"
            throwsWith [ "tokenIds"; "hash" ] (fun () -> layer.forward (randn 1 [| 2L; 3L; 4L |] f32) |> ignore) ]

// ---------------------------------------------------------------- bad input

let badInputs =
    [ testCase "bad input gives clear errors naming the expected layout" <| fun () ->
        use _ = torch.NewDisposeScope()
        use layer = new MoeLayer("moe", configOf 4 2 8 16 GELU)
        throwsWith [ "expected x [..; 8] floating point"; "[3; 5]" ] (fun () -> layer.forward (torch.randn (3L, 5L)) |> ignore)
        throwsWith [ "floating point"; "int64" ] (fun () -> layer.forward (torch.zeros ([| 3L; 8L |], dtype = torch.ScalarType.Int64)) |> ignore)
        throwsWith [ "expected x [..; 8]"; "[]" ] (fun () -> layer.forward (torch.tensor 1.0f) |> ignore)
        throwsWith [ "tokenIds"; "not token ids" ] (fun () -> layer.forward (torch.randn (3L, 8L), torch.zeros ([| 3L |], dtype = torch.ScalarType.Int64)) |> ignore)
        throwsWith [ "invalid MoE config"; "K must be in 1..Experts (4), got 5" ] (fun () ->
            new MoeLayer("bad", configOf 4 5 8 16 GELU) |> ignore)
        throwsWith [ "Experts must be >= 1"; "ModelDim must be >= 1" ] (fun () ->
            new MoeLayer("bad", { configOf 0 1 0 16 GELU with Router = { RouterConfig.defaults with Experts = 0; K = 1 } }) |> ignore)
        throwsWith [ "capacity factor must be > 0" ] (fun () ->
            new MoeLayer("bad", { configOf 4 1 8 16 GELU with Router = { RouterConfig.defaults with Capacity = Factor 0.0 } }) |> ignore)
        throwsWith [ "expected activation relu|gelu|swiglu" ] (fun () -> MoeApi.CreateLayer(8, 16, 4, 2, activation = "tanh") |> ignore)
        use experts = new ExpertFfn("experts", 4, 8, 16, ReLU)
        let x = torch.randn (3L, 8L)
        let idx = (torch.tensor [| 0L; 1L; 2L; 4L; 3L; 0L |]).reshape (3L, 2L)
        let ok = torch.ones ([| 3L; 2L |], dtype = torch.ScalarType.Bool)
        let capped = Tensors.withInt64Scalar 3L (fun v -> idx.clamp_max v)
        throwsWith [ "expertIndex values in 0..3"; "to 4" ] (fun () -> combineExperts experts idx (torch.ones (3L, 2L)) ok x |> ignore)
        throwsWith [ "expected weights [T; K] = [3; 2] floating point" ] (fun () -> combineExperts experts capped (torch.ones (3L, 1L)) ok x |> ignore)
        throwsWith [ "expected kept [T; K] = [3; 2] bool" ] (fun () -> combineExperts experts capped (torch.ones (3L, 2L)) (torch.ones (3L, 2L)) x |> ignore)
        throwsWith [ "counts >= 0 summing to N = 3" ] (fun () -> experts.forward (x, [| 1L; 1L; 0L; 0L |]) |> ignore) ]

// ---------------------------------------------------------------- C#

let csharp =
    [ testCase "the C# example builds an MoE layer, runs forward and backward and prints routing statistics" <| fun () ->
        use output = new StringWriter()
        MoeExample.Program.Run output
        let lines = output.ToString().Split('\n') |> Array.map (fun l -> l.Trim())
        let line (prefix: string) =
            match lines |> Array.tryFind (fun l -> l.StartsWith prefix) with
            | Some l -> l.Substring(prefix.Length).Trim()
            | None -> failtestf "expected a line starting '%s' in the example's output:\n%s" prefix (output.ToString())
        let fractions = (line "tokens per expert:").Split(' ', StringSplitOptions.RemoveEmptyEntries) |> Array.map float
        Expect.equal fractions.Length 4 "one fraction per expert"
        Expect.floatClose { absolute = 4e-3; relative = 0.0 } (Array.sum fractions) 1.0 "fractions sum to 1 (3 decimals each)"
        let dropped = float (line "dropped fraction:")
        Expect.isTrue (dropped >= 0.0 && dropped <= 1.0) "dropped fraction in [0, 1]"
        Expect.stringContains (line "router entropy:") "nats" "entropy in nats"
        Expect.stringContains (line "aux losses:") "switch" "aux losses printed"
        for p in [ "router.weight"; "experts.w1"; "experts.w2"; "experts.w3" ] do
            Expect.isGreaterThan (float (line (sprintf "grad norm %s:" p))) 0.0 (sprintf "backward reached %s" p) ]

let tests =
    testList "Layers" [
        testList "oracles" oracles
        testList "dispatch" dispatchProperties
        testList "gradients" gradients
        testList "modules" modules
        testList "bad input" badInputs
        testList "C# example" csharp
    ]
