/// Routers and balancing losses: properties over random shapes, oracles, finite-difference gradients and
/// bad-input errors.
/// Axes: T tokens, E experts, K picks per token, C capacity per expert, V vocabulary.
module Moe.Tests.RoutingTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Moe
open Moe.Config
open Moe.Routing
open Moe.Tests.Support

/// float32 sums of probabilities and losses after a softmax over at most a few hundred terms.
let private sumTol = Tol.f32Loose
/// Central finite-difference step in float64 (error O(h^2) plus round-off O(eps / h) ~ 1e-10).
let private fdStep = 1e-6
/// Largest token and expert counts the properties draw: small, so the list stays fast.
let private maxTokens = 24
let private maxExperts = 8

let private f32 = torch.ScalarType.Float32
let private f64 = torch.ScalarType.Float64

/// Normal logits [T; E] * scale from a seeded generator (no global random state).
let private randomLogits (seed: int) (t: int) (e: int) (scale: float) (dtype: torch.ScalarType) : torch.Tensor =
    let g = new torch.Generator(uint64 seed, torch.CPU)
    torch.randn ([| int64 t; int64 e |], dtype = dtype, generator = g) |> Tensors.mulScalar scale

/// Rows of an int64 [T; K] tensor.
let private rowsOf (t: torch.Tensor) : int64[][] =
    let k = int t.shape[1]
    Tensors.toInt64s t |> Array.chunkBySize k

/// Dense [T; E] mixing weights from a sparse routing: the weight each token gives each expert.
let private denseWeights (e: int) (r: Routing) : torch.Tensor =
    torch.zeros([| r.Experts.shape[0]; int64 e |], dtype = r.Weights.dtype).scatter_add (1L, r.Experts, r.Weights)

/// A float64 tensor's values, unrounded.
let private toDoubles (t: torch.Tensor) : float[] = t.detach().contiguous().view(-1L).data<float>().ToArray()

let private maxAbsDiff (a: torch.Tensor) (b: torch.Tensor) : float =
    Tensors.scalar ((a.to_type f64 - b.to_type f64).abs().max ())

let private closeRel (tol: float) (a: float) (b: float) = abs (a - b) <= tol * (1.0 + abs a)

/// A random routing problem: sizes, K <= E, a seed and a logit scale.
type private Shape = { T: int; E: int; K: int; Seed: int; Scale: float }

let private genShape : Gen<Shape> =
    gen {
        let! t = Gen.choose (1, maxTokens)
        let! e = Gen.choose (1, maxExperts)
        let! k = Gen.choose (1, e)
        let! seed = Gen.choose (0, 1_000_000)
        let! scale = Gen.elements [ 0.1; 1.0; 4.0 ]
        return { T = t; E = e; K = k; Seed = seed; Scale = scale }
    }

let private genNormaliser = Gen.elements [ Softmax; Sparsemax ]
let private genOrder = Gen.elements [ NormaliseThenTopK; TopKThenNormalise ]

/// Every learned token-choice selection.
let private genTokenChoice : Gen<Selection> =
    Gen.oneof [ gen { let! o = genOrder
                      let! r = Gen.elements [ true; false ]
                      return TokenChoiceTopK(o, r) }
                Gen.constant SwitchTop1
                Gen.constant NoisyTopK ]

let private genCapacity : Gen<Capacity> =
    Gen.oneof [ Gen.constant Dropless
                Gen.elements [ 0.25; 0.5; 1.0; 1.25; 2.0 ] |> Gen.map Factor ]

/// Inputs for a learned router: logits, and a noise std for NoisyTopK (training, seeded noise).
let private inputsFor (selection: Selection) (s: Shape) (logits: torch.Tensor) : RouterInputs =
    match selection with
    | NoisyTopK ->
        let std = Tensors.softplus (randomLogits (s.Seed + 1) s.T s.E 1.0 f32)
        { RouterInputs.OfLogits logits with
            NoiseStd = Some std
            Training = true
            Generator = Some(new torch.Generator(uint64 (s.Seed + 2), torch.CPU)) }
    | _ -> RouterInputs.OfLogits logits

let private configFor (selection: Selection) (normaliser: Normaliser) (capacity: Capacity) (minCapacity: int) (s: Shape) =
    { RouterConfig.defaults with
        Experts = s.E
        K = s.K
        Selection = selection
        Normaliser = normaliser
        Capacity = capacity
        MinCapacity = minCapacity }

/// Expects an ArgumentException whose message contains every fragment.
let private throwsWith (fragments: string list) (f: unit -> unit) =
    let ex = Expect.throwsC f id
    Expect.isTrue (ex :? ArgumentException) (sprintf "expected an ArgumentException, got %s" (ex.GetType().Name))
    for fragment in fragments do
        Expect.stringContains ex.Message fragment "the error names what was expected"

/// Central finite-difference gradient of a scalar function of a float64 tensor, entry by entry.
let private finiteDifference (f: torch.Tensor -> float) (x: torch.Tensor) : float[] =
    let values = x.detach().clone ()
    Array.init (int values.NumberOfElements) (fun i ->
        let at delta =
            use shifted = values.clone ()
            use flat = shifted.view (-1L)
            flat[int64 i] <- Tensors.addScalar delta flat[int64 i]
            f shifted
        (at fdStep - at -fdStep) / (2.0 * fdStep))

let private autogradOf (f: torch.Tensor -> torch.Tensor) (x: torch.Tensor) : float[] =
    use leaf = x.detach().clone().requires_grad_ true
    use y = f leaf
    if y.requires_grad then
        y.backward ()
        leaf.grad.contiguous().data<float>().ToArray()
    else Array.zeroCreate (int x.NumberOfElements) // a constant (e.g. the load loss when K = E)

let properties =
    [ propertyWith "token choice picks K distinct experts per token" (Gen.zip3 genShape genTokenChoice genNormaliser) (fun (s, selection, normaliser) ->
        use _ = torch.NewDisposeScope()
        let cfg = configFor selection normaliser Dropless 0 s
        let r = route cfg (inputsFor selection s (randomLogits s.Seed s.T s.E s.Scale f32))
        let k = RouterConfig.picksPerToken cfg
        Expect.sequenceEqual r.Experts.shape [| int64 s.T; int64 k |] "Experts [T; K]"
        for row in rowsOf r.Experts do
            Expect.equal (Array.distinct row).Length k "distinct experts"
            Expect.all row (fun e -> e >= 0L && e < int64 s.E) "experts in 0..E-1")

      propertyWith "weights are non-negative, sum to 1 where renormalised and are 0 where dropped"
          (Gen.zip3 genShape (Gen.zip genOrder genNormaliser) genCapacity) (fun (s, (order, normaliser), capacity) ->
        use _ = torch.NewDisposeScope()
        let cfg = configFor (TokenChoiceTopK(order, true)) normaliser capacity 0 s
        let r = routeLogits cfg (randomLogits s.Seed s.T s.E s.Scale f32)
        let w = Tensors.toFloats r.Weights
        Expect.all w (fun x -> x >= 0.0f) "weights >= 0"
        for row in Tensors.toFloats r.Gates |> Array.chunkBySize s.K do
            Expect.floatClose { absolute = sumTol; relative = 0.0 } (Array.sumBy float row) 1.0 "gates sum to 1"
        let kept = Tensors.toInt64s (r.Kept.to_type torch.ScalarType.Int64)
        Array.iter2 (fun (wi: float32) ki -> if ki = 0L then Expect.equal wi 0.0f "dropped slot has weight 0") w kept)

      propertyWith "no expert over capacity; drops go to the lowest-priority assignments"
          (Gen.zip3 genShape (Gen.oneof [ genTokenChoice; Gen.constant AllExperts; Gen.constant (Hash(RandomHash 7)) ]) (Gen.zip genCapacity (Gen.choose (0, 4))))
          (fun (s, selection, (cap, minCapacity)) ->
        use _ = torch.NewDisposeScope()
        let cfg = configFor selection Softmax cap minCapacity s
        let inputs =
            match selection with
            | Hash _ -> RouterInputs.OfTokenIds(torch.randint (0L, 1000L, [| int64 s.T |], generator = new torch.Generator(uint64 s.Seed, torch.CPU)))
            | _ -> inputsFor selection s (randomLogits s.Seed s.T s.E s.Scale f32)
        let r = route cfg inputs
        let experts = rowsOf r.Experts
        let kept = rowsOf (r.Kept.to_type torch.ScalarType.Int64)
        let k = experts[0].Length
        // (priority, expert, kept) with priority = slot * T + token: slot-0 picks first, then by position
        let assignments = [ for t in 0 .. s.T - 1 do for j in 0 .. k - 1 -> j * s.T + t, experts[t][j], kept[t][j] = 1L ]
        Expect.equal r.Capacity (capacity cfg s.T) "reported capacity"
        for e in 0L .. int64 s.E - 1L do
            let mine = assignments |> List.filter (fun (_, x, _) -> x = e)
            let keptOnes = mine |> List.filter (fun (_, _, k) -> k)
            match r.Capacity with
            | Some c ->
                Expect.isLessThanOrEqual keptOnes.Length c "kept assignments <= C"
                let dropped = mine |> List.filter (fun (_, _, k) -> not k)
                if not dropped.IsEmpty then
                    Expect.equal keptOnes.Length c "an expert drops only when full"
                    let lastKept = keptOnes |> List.map (fun (p, _, _) -> p) |> List.max
                    let firstDropped = dropped |> List.map (fun (p, _, _) -> p) |> List.min
                    Expect.isLessThan lastKept firstDropped "first come, first served"
            | None -> Expect.equal keptOnes.Length mine.Length "dropless keeps all"
        let keptCount = assignments |> List.filter (fun (_, _, k) -> k) |> List.length
        Expect.floatClose { absolute = Tol.f32; relative = 0.0 } (Tensors.scalar r.Stats.DroppedFraction) (1.0 - float keptCount / float assignments.Length) "dropped fraction")

      propertyWith "hash routing is deterministic and independent of the hidden state"
          (Gen.zip3 genShape (Gen.choose (0, 1000)) (Gen.choose (1, 200))) (fun (s, hashSeed, vocab) ->
        use _ = torch.NewDisposeScope()
        let ids = torch.randint (0L, int64 vocab, [| int64 s.T |], generator = new torch.Generator(uint64 s.Seed, torch.CPU))
        let counts = Array.init vocab (fun i -> int64 ((i * 7919 + s.Seed) % 50))
        let table = torch.tensor (balancedHashTable s.E counts)
        for scheme in [ RandomHash hashSeed; BalancedHash ] do
            let cfg = configFor (Hash scheme) Softmax Dropless 0 s
            let withHidden seed =
                let inputs = { RouterInputs.OfTokenIds ids with Logits = Some(randomLogits seed s.T s.E 1.0 f32) }
                route cfg (if scheme = BalancedHash then { inputs with HashTable = Some table } else inputs)
            let a, b = withHidden s.Seed, withHidden (s.Seed + 1)
            Expect.sequenceEqual (Tensors.toInt64s a.Experts) (Tensors.toInt64s b.Experts) "same ids, other hidden states, same experts"
            Expect.sequenceEqual (Tensors.toFloats a.Weights) (Array.create s.T 1.0f) "weight 1"
            let expected =
                match scheme with
                | RandomHash seed -> randomHashTable seed s.E vocab
                | BalancedHash -> balancedHashTable s.E counts
            Expect.sequenceEqual (Tensors.toInt64s a.Experts) (Tensors.toInt64s ids |> Array.map (fun i -> expected[int i])) "the table's map"
            let losses = auxLosses a
            for l in [ losses.SwitchAux; losses.Importance; losses.Load; losses.ZLoss ] do
                Expect.equal (Tensors.scalar l) 0.0 "no learned router, no balancing loss")

      propertyWith "balanced hash spreads corpus mass within one token's count"
          (Gen.zip (Gen.choose (1, maxExperts)) (Gen.arrayOfLength 60 (Gen.choose (0, 500)))) (fun (e, raw) ->
        // a Zipf-like corpus: a few frequent ids and many rare ones
        let counts = raw |> Array.mapi (fun i c -> int64 (c / (1 + i / 4)))
        let table = balancedHashTable e counts
        let mass = Array.zeroCreate<int64> e
        table |> Array.iteri (fun id x -> mass[int x] <- mass[int x] + counts[id])
        Expect.isLessThanOrEqual (Array.max mass - Array.min mass) (Array.max counts) "greedy bound: spread <= largest count"
        Expect.all table (fun x -> x >= 0L && x < int64 e) "experts in range")

      propertyWith "sparsemax lies on the simplex and is the Euclidean projection" genShape (fun s ->
        use _ = torch.NewDisposeScope()
        let z = randomLogits s.Seed s.T s.E s.Scale f64
        let p = sparsemax z
        let pr = toDoubles p |> Array.chunkBySize s.E
        let zr = toDoubles z |> Array.chunkBySize s.E
        for row, zrow in Array.zip pr zr do
            Expect.all row (fun x -> x >= 0.0) "p >= 0"
            Expect.floatClose Accuracy.high (Array.sum row) 1.0 "sums to 1"
            // KKT of min ||p - z||^2 on the simplex: p_i = z_i - tau on the support, z_i <= tau off it
            let support = Array.zip row zrow |> Array.filter (fun (p, _) -> p > 0.0)
            let tau = (support |> Array.sumBy snd) - 1.0 |> fun x -> x / float support.Length
            for pi, zi in Array.zip row zrow do
                if pi > 0.0 then Expect.floatClose Accuracy.high pi (zi - tau) "p = z - tau on the support"
                else Expect.isLessThanOrEqual zi (tau + Accuracy.high.absolute) "z <= tau off the support")

      propertyWith "Switch aux loss is exactly 1 under uniform routing"
          (Gen.zip3 genShape genTokenChoice genCapacity) (fun (s, selection, capacity) ->
        use _ = torch.NewDisposeScope()
        let cfg = configFor selection Softmax capacity 0 s
        let uniform = torch.zeros ([| int64 s.T; int64 s.E |])
        let r = route cfg { inputsFor selection s uniform with Training = false } // noise would unbalance P
        Expect.floatClose { absolute = Tol.f32; relative = 0.0 } (Tensors.scalar (switchAuxLoss r)) 1.0 "E * sum f P = 1")

      propertyWith "router z-loss is >= 0 and equals mean logsumexp^2" genShape (fun s ->
        use _ = torch.NewDisposeScope()
        let logits = randomLogits s.Seed s.T s.E (s.Scale * 4.0) f32
        let z = Tensors.scalar (routerZLoss (routeLogits (configFor (TokenChoiceTopK(NormaliseThenTopK, true)) Softmax Dropless 0 s) logits))
        Expect.isGreaterThanOrEqual z 0.0 "z-loss >= 0"
        let rows = Tensors.toFloats logits |> Array.map float |> Array.chunkBySize s.E
        let expected = rows |> Array.averageBy (fun row -> let m = Array.max row in (m + log (Array.sumBy (fun x -> exp (x - m)) row)) ** 2.0)
        Expect.isTrue (closeRel sumTol z expected) (sprintf "z-loss %g = %g" z expected))

      propertyWith "balancing losses are invariant to permuting tokens"
          (Gen.zip3 genShape (Gen.oneof [ genTokenChoice; Gen.constant AllExperts; Gen.constant ExpertChoice ]) genCapacity)
          (fun (s, selection, capacity) ->
        use _ = torch.NewDisposeScope()
        let cfg = configFor selection Softmax capacity 0 s
        let logits = randomLogits s.Seed s.T s.E s.Scale f32
        let perm = torch.randperm (int64 s.T, generator = new torch.Generator(uint64 s.Seed, torch.CPU))
        let inputs (permute: torch.Tensor -> torch.Tensor) =
            match selection with
            | NoisyTopK -> // evaluation mode: the noise std still feeds the load estimator
                let std = Tensors.softplus (randomLogits (s.Seed + 1) s.T s.E 1.0 f32)
                { RouterInputs.OfLogits(permute logits) with NoiseStd = Some(permute std) }
            | _ -> RouterInputs.OfLogits(permute logits)
        let a = auxLosses (route cfg (inputs id))
        let b = auxLosses (route cfg (inputs (fun t -> t.index_select (0L, perm))))
        for name, x, y in [ "switch", a.SwitchAux, b.SwitchAux; "importance", a.Importance, b.Importance
                            "load", a.Load, b.Load; "z", a.ZLoss, b.ZLoss ] do
            Expect.isTrue (closeRel sumTol (Tensors.scalar x) (Tensors.scalar y)) (sprintf "%s loss %g vs %g" name (Tensors.scalar x) (Tensors.scalar y)))
    ]

let oracles =
    [ propertyWith "top-k with k = E equals dense softmax mixing" (Gen.zip genShape (Gen.zip genOrder (Gen.elements [ true; false ]))) (fun (s, (order, renorm)) ->
        use _ = torch.NewDisposeScope()
        let s = { s with K = s.E }
        let logits = randomLogits s.Seed s.T s.E s.Scale f32
        let r = routeLogits (configFor (TokenChoiceTopK(order, renorm)) Softmax Dropless 0 s) logits
        let dense = routeLogits (configFor AllExperts Softmax Dropless 0 s) logits
        let softmax = torch.nn.functional.softmax (logits, -1L)
        Expect.isLessThanOrEqual (maxAbsDiff (denseWeights s.E r) softmax) Tol.f32 "top-E = softmax"
        Expect.isLessThanOrEqual (maxAbsDiff (denseWeights s.E dense) softmax) Tol.f32 "all experts = softmax")

      propertyWith "expert choice with capacity T gives every expert every token"
          (Gen.zip genShape (Gen.elements [ true; false ])) (fun (s, dropless) ->
        use _ = torch.NewDisposeScope()
        let capacity = if dropless then Dropless else Factor(float s.E)
        let logits = randomLogits s.Seed s.T s.E s.Scale f32
        let r = routeLogits (configFor ExpertChoice Softmax capacity 0 s) logits
        Expect.equal r.Capacity (Some s.T) "C = T"
        Expect.isTrue (Tensors.scalar (r.Kept.all ()) = 1.0) "every slot kept"
        Expect.isLessThanOrEqual (maxAbsDiff (denseWeights s.E r) (torch.nn.functional.softmax (logits, -1L))) Tol.f32 "weights = softmax"
        Expect.equal (Tensors.scalar r.Stats.DroppedFraction) 0.0 "no token dropped")

      propertyWith "expert choice loads every expert with exactly C tokens"
          (Gen.zip genShape (Gen.elements [ 0.5; 1.0; 2.0 ])) (fun (s, factor) ->
        use _ = torch.NewDisposeScope()
        let cfg = configFor ExpertChoice Softmax (Factor factor) 1 s
        let r = routeLogits cfg (randomLogits s.Seed s.T s.E s.Scale f32)
        let c = (capacity cfg s.T).Value
        let perExpert = r.Kept.sum ([| 0L |], ``type`` = torch.ScalarType.Int64)
        Expect.sequenceEqual (Tensors.toInt64s perExpert) (Array.create s.E (int64 c)) "C tokens per expert"
        Expect.isLessThanOrEqual (maxAbsDiff r.Stats.TokensPerExpert (Tensors.withScalar (1.0 / float s.E) (fun v -> torch.full ([| int64 s.E |], v)))) Tol.f32 "uniform load")
    ]

let gradients =
    [ propertyWith "sparsemax gradient matches central finite differences (float64)" genShape (fun s ->
        use _ = torch.NewDisposeScope()
        let z = randomLogits s.Seed s.T s.E s.Scale f64
        let w = randomLogits (s.Seed + 1) s.T s.E 1.0 f64 // random readout, so every output matters
        let objective (x: torch.Tensor) = (sparsemax x * w).sum ()
        let analytic = autogradOf objective z
        let numeric = finiteDifference (fun x -> Tensors.scalar (objective x)) z
        Array.iter2 (fun a n -> Expect.floatClose { absolute = Tol.finiteDiff; relative = Tol.finiteDiff } a n "d/dz") analytic numeric)

      propertyWith "load loss gradient matches central finite differences through route (float64)"
          (Gen.zip genShape genNormaliser) (fun (s, normaliser) ->
        use _ = torch.NewDisposeScope()
        let cfg = configFor NoisyTopK normaliser Dropless 0 s
        let clean = randomLogits s.Seed s.T s.E s.Scale f64
        let rawStd = randomLogits (s.Seed + 1) s.T s.E 1.0 f64
        let loss (clean: torch.Tensor) (rawStd: torch.Tensor) =
            let inputs =
                { RouterInputs.OfLogits clean with
                    NoiseStd = Some(Tensors.softplus rawStd)
                    Training = true
                    Generator = Some(new torch.Generator(uint64 s.Seed, torch.CPU)) }
            loadLoss (route cfg inputs)
        for name, analytic, numeric in
            [ "d/dclean", autogradOf (fun c -> loss c rawStd) clean, finiteDifference (fun c -> Tensors.scalar (loss c rawStd)) clean
              "d/dstd", autogradOf (fun r -> loss clean r) rawStd, finiteDifference (fun r -> Tensors.scalar (loss clean r)) rawStd ] do
            Array.iter2 (fun a n -> Expect.floatClose { absolute = Tol.finiteDiff; relative = Tol.finiteDiff } a n name) analytic numeric)
    ]

let balancing =
    [ testCase "the selection bias changes who is picked, never the weights" <| fun () ->
        use _ = torch.NewDisposeScope()
        let s = { T = 16; E = 6; K = 2; Seed = 3; Scale = 1.0 }
        let logits = randomLogits s.Seed s.T s.E s.Scale f32
        let cfg = configFor (TokenChoiceTopK(NormaliseThenTopK, false)) Softmax Dropless 0 s
        let favoured = 4L
        let bias = Tensors.withScalar 10.0 (fun v -> torch.zeros(s.E).index_fill_ (0L, torch.tensor [| favoured |], v))
        let r = route cfg { RouterInputs.OfLogits logits with Bias = Some bias }
        Expect.all (rowsOf r.Experts) (fun row -> row[0] = favoured) "the favoured expert ranks first everywhere"
        let probs = torch.nn.functional.softmax (logits, -1L)
        Expect.isLessThanOrEqual (maxAbsDiff r.Weights (probs.gather (1L, r.Experts))) Tol.f32 "weights are the unbiased probabilities"

      testCase "updateBias follows the sign rule and balances a skewed router" <| fun () ->
        use _ = torch.NewDisposeScope()
        let bias = torch.tensor [| 0.0f; 0.5f; -0.5f; 0.0f |]
        let load = torch.tensor [| 10.0f; 2.0f; 4.0f; 0.0f |] // mean 4
        Expect.sequenceEqual (Tensors.toFloats (updateBias 0.25 bias load)) [| -0.25f; 0.75f; -0.5f; 0.25f |] "b + u sign(mean - load)"
        let s = { T = 64; E = 4; K = 1; Seed = 11; Scale = 1.0 }
        let skew = torch.tensor [| 2.0f; 0.0f; 0.0f; 0.0f |]
        let logits = Tensors.plus (randomLogits s.Seed s.T s.E s.Scale f32) skew
        let cfg = { configFor SwitchTop1 Softmax Dropless 0 s with BiasUpdateRate = Some 0.02 }
        let maxLoad (b: torch.Tensor) = Tensors.toFloats (route cfg { RouterInputs.OfLogits logits with Bias = Some b }).Stats.TokensPerExpert |> Array.max
        let mutable b = torch.zeros s.E
        let before = maxLoad b
        for _ in 1 .. 60 do
            use _ = torch.NewDisposeScope()
            let r = route cfg { RouterInputs.OfLogits logits with Bias = Some b }
            b <- (updateBias cfg.BiasUpdateRate.Value b r.Stats.TokensPerExpert).MoveToOuterDisposeScope()
        Expect.isLessThan (maxLoad b) before "the busiest expert gets lighter"
        Expect.isLessThanOrEqual (maxLoad b) 0.4f "close to 1/E after the updates"

      testCase "noisy top-k: evaluation is deterministic, training noise repeats with the seed" <| fun () ->
        use _ = torch.NewDisposeScope()
        let s = { T = 12; E = 5; K = 2; Seed = 5; Scale = 1.0 }
        let cfg = configFor NoisyTopK Softmax Dropless 0 s
        let logits = randomLogits s.Seed s.T s.E s.Scale f32
        let std = Tensors.withScalar 3.0 (fun v -> torch.full ([| 12L; 5L |], v))
        let run training seed =
            route cfg
                { RouterInputs.OfLogits logits with
                    NoiseStd = Some std
                    Training = training
                    Generator = Some(new torch.Generator(uint64 seed, torch.CPU)) }
        let clean = routeLogits (configFor (TokenChoiceTopK(TopKThenNormalise, true)) Softmax Dropless 0 s) logits
        Expect.sequenceEqual (Tensors.toInt64s (run false 1).Experts) (Tensors.toInt64s clean.Experts) "eval = clean top-k then softmax"
        Expect.sequenceEqual (Tensors.toFloats (run true 9).Weights) (Tensors.toFloats (run true 9).Weights) "same seed, same noise"
        Expect.isFalse (Tensors.toInt64s (run true 9).Experts = Tensors.toInt64s (run true 10).Experts) "other seed, other picks"

      testCase "jitter scales the input by U(1 - eps, 1 + eps)" <| fun () ->
        use _ = torch.NewDisposeScope()
        let cfg = { RouterConfig.defaults with Jitter = 0.1 }
        let x = torch.ones ([| 200L; 4L |])
        let y = Tensors.toFloats (jitter cfg (Some(new torch.Generator(3UL, torch.CPU))) x)
        Expect.all y (fun v -> float v >= 0.9 - Tol.f32 && float v <= 1.1 + Tol.f32) "within 1 +- eps"
        Expect.isGreaterThan (Array.max y - Array.min y) 0.1f "actually random"

      testCase "capacity follows Switch eq. 3 and Zhou et al.'s expert-choice rule" <| fun () ->
        let cfg = { RouterConfig.defaults with Experts = 4; K = 2; MinCapacity = 0 }
        Expect.equal (capacity { cfg with Capacity = Factor 1.0 } 10) (Some 5) "ceil(1.0 * 10 * 2 / 4)"
        Expect.equal (capacity { cfg with Capacity = Factor 1.25 } 10) (Some 7) "ceil(6.25)"
        Expect.equal (capacity { cfg with Capacity = Factor 1.25; MinCapacity = 9 } 10) (Some 9) "MinCapacity floor"
        Expect.equal (capacity { cfg with Capacity = Dropless } 10) None "dropless"
        Expect.equal (capacity { cfg with Selection = SwitchTop1; Capacity = Factor 1.0 } 8) (Some 2) "Switch: K = 1"
        Expect.equal (capacity { cfg with Selection = ExpertChoice; Capacity = Factor 2.0 } 10) (Some 5) "expert choice: ceil(2 * 10 / 4)"
        Expect.equal (capacity { cfg with Selection = ExpertChoice; Capacity = Factor 8.0 } 10) (Some 10) "expert choice: at most T"

      testCase "stats: fractions sum to 1, entropy of a uniform router is log E" <| fun () ->
        use _ = torch.NewDisposeScope()
        let s = { T = 10; E = 4; K = 2; Seed = 1; Scale = 1.0 }
        let r = routeLogits (configFor (TokenChoiceTopK(NormaliseThenTopK, true)) Softmax Dropless 0 s) (torch.zeros (10L, 4L))
        Expect.floatClose Accuracy.high (Tensors.scalar (r.Stats.TokensPerExpert.sum ())) 1.0 "fractions"
        Expect.floatClose { absolute = Tol.f32; relative = 0.0 } (Tensors.scalar r.Stats.RouterEntropy) (log 4.0) "log E"
        Expect.isFalse r.Stats.RouterEntropy.requires_grad "detached"

      testCase "importance and load losses are 0 when balanced and grow with imbalance" <| fun () ->
        use _ = torch.NewDisposeScope()
        let s = { T = 8; E = 4; K = 1; Seed = 1; Scale = 1.0 }
        let cfg = configFor NoisyTopK Softmax Dropless 0 s
        let std = torch.ones (8L, 4L)
        let balanced = torch.eye(4L).repeat (2L, 1L) |> Tensors.mulScalar 5.0 // token t prefers expert t mod 4
        let skewed = Tensors.withScalar 5.0 (fun v -> torch.zeros(8L, 4L).index_fill_ (1L, torch.tensor [| 0L |], v)) // everyone prefers expert 0
        let losses logits = auxLosses (route cfg { RouterInputs.OfLogits logits with NoiseStd = Some std })
        let b, k = losses balanced, losses skewed
        Expect.floatClose { absolute = Tol.f32; relative = 0.0 } (Tensors.scalar b.Importance) 0.0 "balanced importance"
        Expect.floatClose { absolute = Tol.f32; relative = 0.0 } (Tensors.scalar b.Load) 0.0 "balanced load"
        Expect.isGreaterThan (Tensors.scalar k.Importance) 1.0 "skewed importance"
        Expect.isGreaterThan (Tensors.scalar k.Load) 1.0 "skewed load"

      // sequenced: the live-tensor count is global, and parallel tests would move it
      testSequenced <| testCase "route and the losses leave no tensors behind" (fun () ->
        let s = { T = 16; E = 4; K = 2; Seed = 2; Scale = 1.0 }
        let cfg = configFor NoisyTopK Sparsemax (Factor 1.0) 1 s
        use logits = (randomLogits s.Seed s.T s.E s.Scale f32).requires_grad_ true
        use std = torch.ones (16L, 4L)
        let step () =
            use _ = torch.NewDisposeScope()
            let r = route cfg { RouterInputs.OfLogits logits with NoiseStd = Some std; Training = true }
            let l = auxLosses r
            (Tensors.plus (Tensors.plus (Tensors.plus l.SwitchAux l.Importance) l.Load) l.ZLoss).backward ()
        step ()
        let before = Tensors.liveTensors ()
        for _ in 1 .. 20 do step ()
        // <=, not =: finalizers of tensors other tests left to the GC may lower the count meanwhile
        Expect.isLessThanOrEqual (Tensors.liveTensors ()) before "live tensor count flat")

      testCase "the C# facade routes like route" <| fun () ->
        use _ = torch.NewDisposeScope()
        let s = { T = 6; E = 4; K = 2; Seed = 4; Scale = 1.0 }
        let cfg = configFor (TokenChoiceTopK(NormaliseThenTopK, true)) Softmax Dropless 0 s
        let logits = randomLogits s.Seed s.T s.E s.Scale f32
        let a, b = Routers.Route(cfg, logits), routeLogits cfg logits
        Expect.sequenceEqual (Tensors.toInt64s a.Experts) (Tensors.toInt64s b.Experts) "experts"
        Expect.sequenceEqual (Tensors.toFloats a.Weights) (Tensors.toFloats b.Weights) "weights"
    ]

let badInputs =
    let cfg = { RouterConfig.defaults with Experts = 4; K = 2 }
    let logits () = torch.randn (5L, 4L)
    [ testCase "logits of the wrong rank" <| fun () ->
        throwsWith [ "expected Logits [T; E] floating point with E = 4"; "[5; 4; 2] float32" ] (fun () -> routeLogits cfg (torch.randn (5L, 4L, 2L)) |> ignore)
      testCase "logits of the wrong dtype" <| fun () ->
        throwsWith [ "expected Logits [T; E] floating point with E = 4"; "int64" ] (fun () -> routeLogits cfg (torch.zeros ([| 5L; 4L |], dtype = torch.int64)) |> ignore)
      testCase "logits with the wrong expert count" <| fun () ->
        throwsWith [ "E = 4"; "[5; 3] float32" ] (fun () -> routeLogits cfg (torch.randn (5L, 3L)) |> ignore)
      testCase "no tokens" <| fun () ->
        throwsWith [ "T >= 1" ] (fun () -> routeLogits cfg (torch.randn (0L, 4L)) |> ignore)
      testCase "k > E" <| fun () ->
        throwsWith [ "K must be in 1..Experts (4), got 5" ] (fun () -> routeLogits { cfg with K = 5 } (logits ()) |> ignore)
      testCase "E < 1" <| fun () ->
        throwsWith [ "Experts must be >= 1, got 0" ] (fun () -> routeLogits { cfg with Experts = 0; K = 0 } (logits ()) |> ignore)
      testCase "capacity factor <= 0" <| fun () ->
        for f in [ 0.0; -1.0; nan ] do
            throwsWith [ "capacity factor must be > 0" ] (fun () -> routeLogits { cfg with Capacity = Factor f } (logits ()) |> ignore)
      testCase "every config problem at once" <| fun () ->
        throwsWith [ "Experts must be >= 1"; "capacity factor must be > 0"; "Jitter must be in [0, 1)" ]
            (fun () -> routeLogits { cfg with Experts = 0; Capacity = Factor 0.0; Jitter = 2.0 } (logits ()) |> ignore)
      testCase "NaN or infinite logits" <| fun () ->
        for bad in [ nan; infinity ] do
            let l = logits ()
            l[2L, 1L] <- torch.tensor bad
            throwsWith [ "expected Logits to be finite" ] (fun () -> routeLogits cfg l |> ignore)
      testCase "NoisyTopK without or with a misshapen noise std" <| fun () ->
        let noisy = { cfg with Selection = NoisyTopK }
        throwsWith [ "expected NoiseStd [T; E]"; "got None" ] (fun () -> routeLogits noisy (logits ()) |> ignore)
        throwsWith [ "expected NoiseStd [T; E] = [5; 4]"; "[6; 4] float32" ]
            (fun () -> route noisy { RouterInputs.OfLogits(logits ()) with NoiseStd = Some(torch.ones (6L, 4L)) } |> ignore)
        throwsWith [ "NoiseStd [T; E] >= 0" ]
            (fun () -> route noisy { RouterInputs.OfLogits(logits ()) with NoiseStd = Some(-torch.ones (5L, 4L)) } |> ignore)
      testCase "inputs the router cannot use" <| fun () ->
        throwsWith [ "NoiseStd is not used" ] (fun () -> route cfg { RouterInputs.OfLogits(logits ()) with NoiseStd = Some(torch.ones (5L, 4L)) } |> ignore)
        throwsWith [ "Bias is not used" ] (fun () -> route { cfg with Selection = ExpertChoice } { RouterInputs.OfLogits(logits ()) with Bias = Some(torch.zeros 4L) } |> ignore)
      testCase "a bias of the wrong length" <| fun () ->
        throwsWith [ "expected Bias [E] floating point with E = 4"; "[3] float32" ]
            (fun () -> route cfg { RouterInputs.OfLogits(logits ()) with Bias = Some(torch.zeros 3L) } |> ignore)
      testCase "hash routing without, or with bad, token ids and tables" <| fun () ->
        let hash = { cfg with Selection = Hash(RandomHash 1) }
        let balanced = { cfg with Selection = Hash BalancedHash }
        let ids = torch.tensor [| 0L; 3L; 9L |]
        throwsWith [ "expected TokenIds [T] int64"; "got None" ] (fun () -> routeLogits hash (logits ()) |> ignore)
        throwsWith [ "expected TokenIds [T] int64"; "[3] float32" ] (fun () -> route hash (RouterInputs.OfTokenIds(torch.zeros 3L)) |> ignore)
        throwsWith [ ">= 0" ] (fun () -> route hash (RouterInputs.OfTokenIds(torch.tensor [| 1L; -2L |])) |> ignore)
        throwsWith [ "expected HashTable [V] int64"; "got None" ] (fun () -> route balanced (RouterInputs.OfTokenIds ids) |> ignore)
        throwsWith [ "expected TokenIds < V = 5" ]
            (fun () -> route balanced { RouterInputs.OfTokenIds ids with HashTable = Some(torch.tensor (balancedHashTable 4 (Array.create 5 1L))) } |> ignore)
        throwsWith [ "values in 0..3" ]
            (fun () -> route balanced { RouterInputs.OfTokenIds ids with HashTable = Some(Tensors.withInt64Scalar 4L (fun v -> torch.full ([| 10L |], v, dtype = torch.int64))) } |> ignore)
      testCase "balanced hash table from bad counts" <| fun () ->
        throwsWith [ "expected counts >= 0" ] (fun () -> balancedHashTable 4 [| 3L; -1L |] |> ignore)
        throwsWith [ "expected experts >= 1" ] (fun () -> balancedHashTable 0 [| 3L |] |> ignore)
      testCase "updateBias with mismatched lengths" <| fun () ->
        throwsWith [ "expected tokensPerExpert [E] with E = 4" ] (fun () -> updateBias 0.1 (torch.zeros 4L) (torch.zeros 3L) |> ignore)
    ]

// ---------------------------------------------------------------- known answers

/// Known answers: each router and balancing loss on a small example worked by hand from its paper's equation
/// (the fractions are written out; `recipe` comments show the arithmetic). Inputs are float64, so the
/// routing math runs in float64 and the answers hold to round-off.
let private exact = { absolute = 1e-9; relative = 1e-9 }

/// Router probabilities of 4 tokens over 4 experts, no ties among any top-2: softmax(ln p + c_t) = p.
let private knownProbs =
    [| [| 0.5; 0.25; 0.125; 0.125 |]
       [| 0.1; 0.6; 0.2; 0.1 |]
       [| 0.3; 0.2; 0.4; 0.1 |]
       [| 0.7; 0.15; 0.1; 0.05 |] |]

/// Per-token shifts c_t of the logits: softmax ignores them, logsumexp(logits_t) = c_t (z-loss).
let private knownShifts = [| 1.0; -2.0; 0.5; 3.0 |]

/// logits[t, e] = ln p[t, e] + c_t. // [4; 4] float64
let private knownLogits () =
    torch.tensor(Array.concat [| for t in 0 .. 3 -> knownProbs[t] |> Array.map (fun p -> log p + knownShifts[t]) |], dtype = f64).reshape(4L, 4L)

/// Mean router probability per expert, P_e = (1/T) sum_t p[t, e]: column sums 1.6, 1.2, 0.825, 0.375 over 4.
let private knownMeanProbs = [| 0.4; 0.3; 0.20625; 0.09375 |]

let private closeAll (what: string) (expected: float[]) (actual: torch.Tensor) =
    let got = actual.to_type(f64).data<float>().ToArray()
    Expect.equal got.Length expected.Length (sprintf "%s: length" what)
    Array.iteri2 (fun i e g -> Expect.floatClose exact g e (sprintf "%s[%d]" what i)) expected got

/// Population CV^2 = var / mean^2 of a plain array (Shazeer et al. 2017 eq. 7), the hand formula.
let private cv2 (xs: float[]) =
    let m = Array.average xs
    (xs |> Array.averageBy (fun x -> (x - m) * (x - m))) / (m * m + 1e-10)

let private knownAnswers =
    let cfg k selection = { RouterConfig.defaults with Experts = 4; K = k; Selection = selection; Capacity = Dropless; Jitter = 0.0 }
    let topK k renorm = cfg k (TokenChoiceTopK(NormaliseThenTopK, renorm))
    [ testCase "top-1 (Switch eq. 2): argmax expert, gate p_i(x)" <| fun () ->
        let r = routeLogits (cfg 1 SwitchTop1) (knownLogits ())
        Expect.equal (rowsOf r.Experts) [| [| 0L |]; [| 1L |]; [| 2L |]; [| 0L |] |] "argmax per token"
        closeAll "gates" [| 0.5; 0.6; 0.4; 0.7 |] r.Weights
      testCase "top-2 normalise-then-top-k: the two best, renormalised over the pair, or raw (naive top-k)" <| fun () ->
        let r = routeLogits (topK 2 true) (knownLogits ())
        Expect.equal (rowsOf r.Experts) [| [| 0L; 1L |]; [| 1L; 2L |]; [| 2L; 0L |]; [| 0L; 1L |] |] "best first"
        // 0.5/0.75, 0.25/0.75 | 0.6/0.8, 0.2/0.8 | 0.4/0.7, 0.3/0.7 | 0.7/0.85, 0.15/0.85
        closeAll "renormalised gates" [| 2.0 / 3.0; 1.0 / 3.0; 0.75; 0.25; 4.0 / 7.0; 3.0 / 7.0; 14.0 / 17.0; 3.0 / 17.0 |] r.Weights
        let naive = routeLogits (topK 2 false) (knownLogits ())
        closeAll "naive gates" [| 0.5; 0.25; 0.6; 0.2; 0.4; 0.3; 0.7; 0.15 |] naive.Weights
      testCase "top-2 top-k-then-normalise (Megatron): softmax over the two picked logits" <| fun () ->
        let r = routeLogits (cfg 2 (TokenChoiceTopK(TopKThenNormalise, true))) (knownLogits ())
        // softmax(ln a + c, ln b + c) = (a, b) / (a + b): the same numbers as renormalising
        closeAll "gates" [| 2.0 / 3.0; 1.0 / 3.0; 0.75; 0.25; 4.0 / 7.0; 3.0 / 7.0; 14.0 / 17.0; 3.0 / 17.0 |] r.Weights
      testCase "all experts (soft mixing): weights are the probabilities" <| fun () ->
        let r = routeLogits (cfg 4 AllExperts) (knownLogits ())
        closeAll "weights" (Array.concat knownProbs) r.Weights
      testCase "noisy top-k in evaluation (Shazeer eq. 3-5 without noise): top-k then softmax" <| fun () ->
        let inputs = { RouterInputs.OfLogits(knownLogits ()) with NoiseStd = Some(torch.ones([| 4L; 4L |], dtype = f64)) }
        let r = route (cfg 2 NoisyTopK) inputs
        Expect.equal (rowsOf r.Experts) [| [| 0L; 1L |]; [| 1L; 2L |]; [| 2L; 0L |]; [| 0L; 1L |] |] "top-2 of the clean logits"
        closeAll "gates" [| 2.0 / 3.0; 1.0 / 3.0; 0.75; 0.25; 4.0 / 7.0; 3.0 / 7.0; 14.0 / 17.0; 3.0 / 17.0 |] r.Weights
      testCase "expert choice (Zhou et al. eq. 1): each expert takes its C best tokens, weighted S[t, e]" <| fun () ->
        // C = min(T, max(1, ceil(1.0 * 4 / 4))) = 1: e0 takes t3 (0.7), e1 t1 (0.6), e2 t2 (0.4), e3 t0 (0.125)
        let r = routeLogits { cfg 4 ExpertChoice with Capacity = Factor 1.0; MinCapacity = 1 } (knownLogits ())
        Expect.equal r.Capacity (Some 1) "C = 1"
        closeAll "weights" [| 0.0; 0.0; 0.0; 0.125; 0.0; 0.6; 0.0; 0.0; 0.0; 0.0; 0.4; 0.0; 0.7; 0.0; 0.0; 0.0 |] r.Weights
        closeAll "dropped (tokens no expert chose)" [| 0.0 |] (r.Stats.DroppedFraction.reshape 1L)
      testCase "capacity (Switch eq. 3; Zhou et al. sec. 3.1): ceil, floored at MinCapacity, expert choice capped at T" <| fun () ->
        let tc = { topK 2 true with Capacity = Factor 1.25; MinCapacity = 4 }
        Expect.equal (capacity tc 10) (Some 7) "ceil(1.25 * 10 * 2 / 4) = ceil(6.25) = 7"
        Expect.equal (capacity tc 4) (Some 4) "ceil(1.25 * 4 * 2 / 4) = 3, floored at MinCapacity 4"
        Expect.equal (capacity { tc with MinCapacity = 1 } 9) (Some 6) "ceil(1.25 * 9 * 2 / 4) = ceil(5.625) = 6"
        let ec = { cfg 4 ExpertChoice with Capacity = Factor 2.0; MinCapacity = 1 }
        Expect.equal (capacity ec 10) (Some 5) "ceil(2 * 10 / 4) = 5"
        Expect.equal (capacity { ec with Capacity = Factor 3.0 } 3) (Some 3) "ceil(3 * 3 / 4) = 3 = T"
        Expect.equal (capacity { ec with Capacity = Factor 8.0 } 3) (Some 3) "ceil(8 * 3 / 4) = 6, capped at T = 3"
        Expect.equal (capacity (topK 2 true) 10) None "dropless"
      testCase "capacity drops first-come in slot-major order (Switch/GShard)" <| fun () ->
        // slot 0: t0->e0, t1->e1, t2->e2, t3->e0 (e0 full: dropped); every slot-1 pick finds its expert full
        let r = routeLogits { topK 2 true with Capacity = Factor 0.5; MinCapacity = 1 } (knownLogits ())
        Expect.equal r.Capacity (Some 1) "ceil(0.5 * 4 * 2 / 4) = 1"
        Expect.equal (Tensors.toFloats (r.Kept.to_type torch.float32)) [| 1.0f; 0.0f; 1.0f; 0.0f; 1.0f; 0.0f; 0.0f; 0.0f |] "kept slots"
        closeAll "dropped fraction" [| 5.0 / 8.0 |] (r.Stats.DroppedFraction.reshape 1L)
      testCase "sparsemax (Martins & Astudillo eq. 2-4): support, threshold tau and projection" <| fun () ->
        // z = (1, 0.8, 0.1, -1): support k = 2 (1 + 2 * 0.8 > 1.8; 1 + 3 * 0.1 < 1.9), tau = (1.8 - 1) / 2 = 0.4
        closeAll "two in the support" [| 0.6; 0.4; 0.0; 0.0 |] (sparsemax (torch.tensor([| 1.0; 0.8; 0.1; -1.0 |], dtype = f64)))
        // z = (0.5, 0.4, 0.3, -0.5): support k = 3 (1 + 3 * 0.3 > 1.2), tau = (1.2 - 1) / 3
        closeAll "three in the support" [| 0.5 - 0.2 / 3.0; 0.4 - 0.2 / 3.0; 0.3 - 0.2 / 3.0; 0.0 |]
            (sparsemax (torch.tensor([| 0.5; 0.4; 0.3; -0.5 |], dtype = f64)))
      testCase "Switch aux loss (Fedus et al. eq. 4-6): E * sum_e f_e P_e, top-1 and top-2" <| fun () ->
        // top-1: f = (2, 1, 1, 0) / 4
        let top1 = 4.0 * (0.5 * knownMeanProbs[0] + 0.25 * knownMeanProbs[1] + 0.25 * knownMeanProbs[2])
        closeAll "top-1" [| top1 |] ((switchAuxLoss (routeLogits (cfg 1 SwitchTop1) (knownLogits ()))).reshape 1L)
        Expect.floatClose exact top1 1.30625 "by hand: 4 * (0.2 + 0.075 + 0.0515625)"
        // top-2: f over the T * K = 8 proposed assignments = (3, 3, 2, 0) / 8
        let top2 = 4.0 * (0.375 * knownMeanProbs[0] + 0.375 * knownMeanProbs[1] + 0.25 * knownMeanProbs[2])
        closeAll "top-2" [| top2 |] ((switchAuxLoss (routeLogits (topK 2 true) (knownLogits ()))).reshape 1L)
      testCase "importance loss (Shazeer et al. eq. 6-7): CV^2 of the summed gate values" <| fun () ->
        // Importance_e = sum_t G(x_t)_e over the renormalised top-2 gates
        let importance = [| 2.0 / 3.0 + 3.0 / 7.0 + 14.0 / 17.0; 1.0 / 3.0 + 0.75 + 3.0 / 17.0; 0.25 + 4.0 / 7.0; 0.0 |]
        let r = routeLogits (topK 2 true) (knownLogits ())
        closeAll "CV^2" [| cv2 importance |] ((importanceLoss r).reshape 1L)
        Expect.floatClose { absolute = 1e-12; relative = 1e-12 } (cv2 importance) 0.48587989112356705 "the hand formula's value"
      testCase "load probability (Shazeer et al. eq. 9): Phi((clean - threshold) / std), the threshold excluding the expert" <| fun () ->
        // k = 1, noisy = (1.2, 0.5, -2): expert 0 is in the top-1, its threshold is the 2nd noisy value 0.5;
        // experts 1 and 2 are out, theirs is the 1st, 1.2. Phi(x) = (1 + erf(x / sqrt 2)) / 2.
        let clean = torch.tensor([| 1.0; 0.0; -1.0 |], dtype = f64).reshape(1L, 3L)
        let noisy = torch.tensor([| 1.2; 0.5; -2.0 |], dtype = f64).reshape(1L, 3L)
        let std = torch.tensor([| 0.5; 2.0; 1.0 |], dtype = f64).reshape(1L, 3L)
        // Phi((1 - 0.5) / 0.5) = Phi(1), Phi((0 - 1.2) / 2) = Phi(-0.6), Phi((-1 - 1.2) / 1) = Phi(-2.2)
        closeAll "P" [| 0.8413447460685429; 0.2742531177500736; 0.01390344751349859 |] (loadProbability 1 clean noisy std)
      testCase "load loss (Shazeer et al. eq. 8-10): CV^2 of the summed load probabilities" <| fun () ->
        // evaluation: noisy = clean. t0 clean (1, 0, -1), std (0.5, 2, 1): P = Phi(2), Phi(-0.5), Phi(-2);
        // t1 clean (0.2, 0.5, -0.4), std 1: P = Phi(-0.3), Phi(0.3), Phi(-0.9)
        let logits = torch.tensor([| 1.0; 0.0; -1.0; 0.2; 0.5; -0.4 |], dtype = f64).reshape(2L, 3L)
        let std = torch.tensor([| 0.5; 2.0; 1.0; 1.0; 1.0; 1.0 |], dtype = f64).reshape(2L, 3L)
        let r = route { cfg 1 NoisyTopK with Experts = 3 } { RouterInputs.OfLogits logits with NoiseStd = Some std }
        closeAll "P" [| 0.9772498680518208; 0.3085375387259869; 0.02275013194817921; 0.3820885778110474; 0.6179114221889526; 0.18406012534675953 |]
            r.LoadProbability.Value
        let load = [| 0.9772498680518208 + 0.3820885778110474; 0.3085375387259869 + 0.6179114221889526; 0.02275013194817921 + 0.18406012534675953 |]
        closeAll "CV^2" [| cv2 load |] ((loadLoss r).reshape 1L)
        Expect.floatClose { absolute = 1e-12; relative = 1e-12 } (cv2 load) 0.32731052359593876 "the hand formula's value"
      testCase "router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2" <| fun () ->
        // logsumexp(ln p_t + c_t) = c_t: (1 + 4 + 0.25 + 9) / 4
        closeAll "z-loss" [| 3.5625 |] ((routerZLoss (routeLogits (topK 2 true) (knownLogits ()))).reshape 1L)
      testCase "hash routing (Roller et al.): the universal hash and the balanced table" <| fun () ->
        // seed 7: SplitMix64 gives a = 1751225710, b = 1880445814; ((a * id + b) mod (2^31 - 1)) mod 5
        // for ids 0, 1, 2, 1000, 123456789 (worked with big integers, as in the recipe above).
        Expect.equal (Tensors.toInt64s (randomHash 7 5 (torch.tensor [| 0L; 1L; 2L; 1000L; 123456789L |]))) [| 4L; 2L; 0L; 2L; 3L |] "random hash"
        // counts (10, 1, 5, 5, 0, 3), 2 experts, most frequent first to the lighter expert (ties: fewer ids, then lower
        // index): id0 -> e0 (10); id2 -> e1 (5); id3 -> e1 (10); id5: tie 10/10, e0 has fewer ids -> e0 (13);
        // id1 -> e1 (11); id4 -> e1 (11 < 13)
        Expect.equal (balancedHashTable 2 [| 10L; 1L; 5L; 5L; 0L; 3L |]) [| 0L; 1L; 1L; 1L; 1L; 0L |] "balanced table"
        let r = route (cfg 1 (Hash BalancedHash)) { RouterInputs.OfTokenIds(torch.tensor [| 3L; 0L; 5L |]) with HashTable = Some(torch.tensor [| 0L; 1L; 1L; 1L; 1L; 0L |]) }
        Expect.equal (rowsOf r.Experts) [| [| 1L |]; [| 0L |]; [| 0L |] |] "route reads the table"
        closeAll "weight 1" [| 1.0; 1.0; 1.0 |] r.Weights
      testCase "bias update (DeepSeek-V3 sec. 2.1.2): b + u * sign(mean load - load)" <| fun () ->
        let b = updateBias 0.01 (torch.tensor([| 0.0; 0.1; 0.0 |], dtype = f64)) (torch.tensor([| 3.0; 1.0; 2.0 |], dtype = f64))
        closeAll "bias" [| -0.01; 0.11; 0.0 |] b
      testCase "attention router logits (Vaswani et al. eq. 1): q . m_e / sqrt(R)" <| fun () ->
        let q = torch.tensor([| 1.0; 2.0 |], dtype = f64).reshape(1L, 2L)
        let m = torch.tensor([| 1.0; 0.0; 0.0; 1.0; 1.0; 1.0 |], dtype = f64).reshape(3L, 2L)
        closeAll "logits" [| 1.0 / sqrt 2.0; 2.0 / sqrt 2.0; 3.0 / sqrt 2.0 |] (attentionLogits q m) ]

let tests =
    testList "Routing" [
        testList "known answers" knownAnswers
        testList "properties" properties
        testList "oracles" oracles
        testList "gradients" gradients
        testList "balancing and stats" balancing
        testList "bad input" badInputs
    ]
