/// Routers and balancing losses: pure functions from router logits (or token ids) to a sparse routing
/// record. Routing math runs in float32 whatever the model's dtype (float64 inputs stay float64, so that
/// gradients can be checked against finite differences).
/// Axes: T tokens, E experts, K picks (slots) per token, C capacity per expert, V vocabulary, R router width.
module Moe.Routing

open System
open System.Collections.Generic
open System.Runtime.InteropServices
open TorchSharp
open Moe.Tensors
open Moe.Config

/// Per-batch routing statistics (detached, float32).
type RoutingStats =
    { /// Fraction of kept assignments that went to each expert. // [E] float32
      TokensPerExpert: Tensor
      /// Token choice: fraction of the T*K proposed assignments dropped by capacity (0 when dropless).
      /// Expert choice: fraction of tokens that no expert chose. // scalar
      DroppedFraction: Tensor
      /// Mean over tokens of the entropy (nats) of the router distribution; 0 for hash routing. // scalar
      RouterEntropy: Tensor }

/// Who goes where. Token-choice routers fill K slots per token, slot 0 holding the best pick; expert-choice
/// uses K = E slots, slot e of token t being expert e and kept when expert e chose t. Dispatch uses only
/// kept slots.
type Routing =
    { /// Expert of each (token, slot). // [T; K] int64
      Experts: Tensor
      /// Combine weight of each (token, slot); 0 where not kept. Differentiable. // [T; K] float32
      Weights: Tensor
      /// Whether the slot survived capacity (always true when dropless). // [T; K] bool
      Kept: Tensor
      /// Router distribution over all experts (the normaliser applied to every logit; the noisy logits for
      /// NoisyTopK in training), for the balancing losses; None for hash routing. // [T; E] float32
      Probs: Tensor option
      /// Clean router logits, for the z-loss; None for hash routing. // [T; E] float32
      Logits: Tensor option
      Stats: RoutingStats
      /// Combine weights before capacity: the gate values G(x) of Shazeer et al. 2017 eq. 6 that the
      /// importance loss sums. Weights = Gates where Kept, 0 elsewhere. // [T; K] float32
      Gates: Tensor
      /// P(expert e is in token t's noisy top-k), Shazeer et al. 2017 eq. 9, for the load loss;
      /// Some only for NoisyTopK. // [T; E] float32
      LoadProbability: Tensor option
      /// Capacity per expert applied to this batch; None when dropless token choice.
      Capacity: int option }

/// Unweighted balancing losses of one MoE layer (scalars; zero-valued where a router has none).
type AuxLosses =
    { SwitchAux: Tensor
      Importance: Tensor
      Load: Tensor
      ZLoss: Tensor }

/// What a router reads. Which fields are needed depends on `RouterConfig.Selection`:
/// - every learned router needs `Logits` [T; E] (from `x W_r`, or `attentionLogits`);
/// - NoisyTopK also needs `NoiseStd` [T; E] = softplus(x W_noise) (Shazeer et al. 2017 eq. 4), the
///   standard deviation already passed through softplus, >= 0;
/// - hash routing needs `TokenIds` [T] int64 (>= 0), and BalancedHash a `HashTable` [V] int64 from
///   `balancedHashTable`; hash routing ignores `Logits`, so a layer may pass them whatever the router;
/// - `Bias` [E] is the auxiliary-loss-free selection bias (DeepSeek-V3) for token-choice routers;
/// - `Training` turns on NoisyTopK's noise, drawn from `Generator` (the global generator when None).
/// Inputs a selection cannot use (a NoiseStd for a non-noisy router, a HashTable for RandomHash, a Bias
/// for a router that selects nothing) are errors rather than silently ignored.
type RouterInputs =
    { /// Router logits. // [T; E] floating point
      Logits: Tensor option
      /// Noise standard deviation softplus(x W_noise), NoisyTopK only. // [T; E] floating point
      NoiseStd: Tensor option
      /// Token ids, hash routing only. // [T] int64
      TokenIds: Tensor option
      /// Selection bias (DeepSeek-V3), token-choice routers only; see `updateBias`. // [E] floating point
      Bias: Tensor option
      /// Token id -> expert, BalancedHash only; keep it on the ids' device (it is moved there otherwise). // [V] int64
      HashTable: Tensor option
      Training: bool
      Generator: torch.Generator option }

    /// Inputs holding only the logits, in evaluation mode.
    static member OfLogits(logits: Tensor) : RouterInputs =
        { Logits = Some logits; NoiseStd = None; TokenIds = None; Bias = None; HashTable = None; Training = false; Generator = None }

    /// Inputs holding only the token ids (hash routing), in evaluation mode.
    static member OfTokenIds(tokenIds: Tensor) : RouterInputs =
        { Logits = None; NoiseStd = None; TokenIds = Some tokenIds; Bias = None; HashTable = None; Training = false; Generator = None }

// ---------------------------------------------------------------- named constants

/// Keeps renormalisation finite when every pick has zero probability (possible only with sparsemax and a
/// selection bias); such a token then gets zero weights.
let private renormaliseFloor = 1e-20

/// Shazeer et al. 2017 reference code: epsilon in CV^2 = var / (mean^2 + eps), so an all-zero vector gives 0.
let private cvEpsilon = 1e-10

/// Lower bound on the noise standard deviation inside the normal CDF of the load estimator (eq. 9), so a
/// zero std (no noise) yields a step instead of 0/0.
let private noiseStdFloor = 1e-9

/// Keeps log p finite at p = 0 in the entropy (0 log 0 = 0).
let private entropyFloor = 1e-30

/// The Mersenne prime 2^31 - 1: modulus of the universal hash, small enough that a * x fits in int64.
let private hashPrime = 2147483647L

// ---------------------------------------------------------------- small helpers

/// Routing math dtype: float64 stays float64 (gradient checks), everything else runs in float32.
let private mathDtype (t: Tensor) =
    if t.dtype = torch.ScalarType.Float64 then torch.ScalarType.Float64 else torch.ScalarType.Float32

let private required (what: string) (layout: string) (selection: Selection) (t: Tensor option) : Tensor =
    match t with
    | Some t when not (isNull t) -> t
    | _ -> invalidArg what (sprintf "expected %s %s for %A routing, got None" what layout selection)

let private checkTokens (name: string) (t: Tensor) =
    if t.shape[0] < 1L then invalidArg name (sprintf "expected %s with T >= 1 tokens, got %s" name (describe t))

/// Scalar zero on the routing's device and dtype, for losses a router does not have.
let private zeroFor (r: Routing) : Tensor =
    torch.zeros ([||], dtype = r.Weights.dtype, device = r.Weights.device)

/// Standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2.
let private normalCdf (x: Tensor) : Tensor =
    use scaled = divScalar (Math.Sqrt 2.0) x
    use e = torch.erf scaled
    use onePlus = addScalar 1.0 e
    mulScalar 0.5 onePlus

// ---------------------------------------------------------------- normalisers

/// Sparsemax (Martins & Astudillo 2016, eq. 2-4) along the last axis: the Euclidean projection of z onto
/// the probability simplex, p = max(z - tau(z), 0), with tau = (sum_{j in S} z_j - 1) / |S| over the
/// support S(z) = { j : 1 + k z_(k) > sum_{i<=k} z_(i) } of the sorted scores (eq. 4).
/// The support is found without gradient and held constant; tau is then recomputed differentiably over it,
/// so autograd yields exactly the paper's Jacobian (sec. 2.3): dp/dz = diag(s) - s s^T / |S|, s the
/// support indicator. Any rank >= 1, any floating dtype. // [..; E] -> [..; E]
let sparsemax (z: Tensor) : Tensor =
    expect "z" "[..; E] floating point with E >= 1" (fun t -> t.Dimensions >= 1L && isFloating t && t.shape[t.shape.Length - 1] >= 1L) z
    use scope = torch.NewDisposeScope()
    let e = z.shape[z.shape.Length - 1]
    let support = // [..; E] bool
        use _ = torch.no_grad ()
        let struct (sorted, _) = z.sort (-1L, descending = true) // [..; E]
        let cumulative = sorted.cumsum (-1L) // [..; E]
        let ranks = arange 1L (e + 1L) z.dtype z.device // [E]
        let inSupport = (addScalar 1.0 (ranks * sorted)).gt cumulative // [..; E], true on a prefix (eq. 4)
        let size = inSupport.sum (-1L, keepdim = true, ``type`` = z.dtype) // [..; 1]
        let cumulativeAtSize = cumulative.gather (-1L, (subScalar 1.0 size).to_type torch.ScalarType.Int64) // [..; 1]
        let tau = subScalar 1.0 cumulativeAtSize / size // [..; 1]
        let top = sorted.narrow (-1L, 0L, 1L) // [..; 1]
        // the arg-max is always in the support; the second test guards round-off on huge scores
        (z.gt tau).logical_or (z.eq top)
    let s = support.to_type z.dtype // [..; E]
    let tau = subScalar 1.0 ((z * s).sum (-1L, keepdim = true)) / s.sum (-1L, keepdim = true) // [..; 1]
    (s * (z - tau)).MoveToOuterDisposeScope()

/// The normaliser along the last axis: softmax, or sparsemax (Martins & Astudillo 2016). // [..; E] -> [..; E]
let normalise (normaliser: Normaliser) (z: Tensor) : Tensor =
    match normaliser with
    | Softmax -> torch.nn.functional.softmax (z, -1L)
    | Sparsemax -> sparsemax z

// ---------------------------------------------------------------- scores, jitter, bias

/// Attention router scores (scaled dot product, Vaswani et al. 2017 eq. 1): logits_e = q . m_e / sqrt(R),
/// where q = h W_q is the token's router query and m_e a learned expert embedding.
/// query [T; R], expertEmbeddings [E; R] -> logits [T; E].
let attentionLogits (query: Tensor) (expertEmbeddings: Tensor) : Tensor =
    expectFloat "query" "[T; R]" 2 query
    expectFloat "expertEmbeddings" "[E; R]" 2 expertEmbeddings
    if query.shape[1] <> expertEmbeddings.shape[1] then
        invalidArg "expertEmbeddings"
            (sprintf "expected expertEmbeddings [E; R] with R = %d (the query width), got %s" query.shape[1] (describe expertEmbeddings))
    use scope = torch.NewDisposeScope()
    let scores = query.matmul (expertEmbeddings.t ()) // [T; E]
    (divScalar (Math.Sqrt(float query.shape[1])) scores).MoveToOuterDisposeScope()

/// Switch Transformer multiplicative jitter (Fedus et al. 2022, sec. 2.4): x * u with u ~ U(1 - eps, 1 + eps)
/// elementwise, eps = cfg.Jitter. Switch applies it to the router INPUT (the hidden state) in training only;
/// routers here receive logits, so the MoE layer calls `jitter` on its router input when training a
/// SwitchTop1 router (any router may use it). Any shape; draws from `generator` (global when None).
let jitter (cfg: RouterConfig) (generator: torch.Generator option) (x: Tensor) : Tensor =
    expect "x" "floating point" isFloating x
    let cfg = orFail "router config" (RouterConfig.validate cfg) cfg
    use scope = torch.NewDisposeScope()
    let u = torch.rand (x.shape, dtype = x.dtype, device = x.device, generator = Option.toObj generator) // U(0, 1)
    let scale = addScalar (1.0 - cfg.Jitter) (mulScalar (2.0 * cfg.Jitter) u) // U(1 - eps, 1 + eps)
    (x * scale).MoveToOuterDisposeScope()

/// Auxiliary-loss-free balancing (DeepSeek-V3, Liu et al. 2024, sec. 2.1.2; Wang et al. 2024):
/// b_e <- b_e + u * sign(mean load - load_e), so overloaded experts become less likely to be selected.
/// `tokensPerExpert` [E] may be counts or fractions (the sign is scale-free); bias [E]. Pure: returns the
/// new bias, detached. The bias changes selection only (see `route`).
let updateBias (rate: float) (bias: Tensor) (tokensPerExpert: Tensor) : Tensor =
    if not (rate >= 0.0) then invalidArg "rate" (sprintf "expected a bias update rate >= 0, got %g" rate)
    expectFloat "bias" "[E]" 1 bias
    expect "tokensPerExpert" (sprintf "[E] with E = %d (the bias length)" bias.shape[0])
        (fun t -> t.Dimensions = 1L && t.shape[0] = bias.shape[0]) tokensPerExpert
    use scope = torch.NewDisposeScope()
    use _ = torch.no_grad ()
    let load = tokensPerExpert.to_type bias.dtype // [E]
    let step = mulScalar rate (torch.sign (load.mean () - load)) // [E]
    (plus bias step).detach().MoveToOuterDisposeScope()

// ---------------------------------------------------------------- hash tables

/// SplitMix64 (Steele, Lea & Flood 2014): a fixed bijective mixer used to derive hash parameters from a seed.
let private splitMix64 (x: uint64) : uint64 =
    let z = x + 0x9E3779B97F4A7C15UL
    let z = (z ^^^ (z >>> 30)) * 0xBF58476D1CE4E5B9UL
    let z = (z ^^^ (z >>> 27)) * 0x94D049BB133111EBUL
    z ^^^ (z >>> 31)

/// Parameters (a, b) of the universal hash drawn from a seed: 1 <= a < p, 0 <= b < p.
let private hashParameters (seed: int) : int64 * int64 =
    let m1 = splitMix64 (uint64 (int64 seed))
    let m2 = splitMix64 m1
    1L + int64 (m1 % uint64 (hashPrime - 1L)), int64 (m2 % uint64 hashPrime)

/// The random hash of Roller et al. 2021 ("Random Hash"), as a Carter-Wegman universal hash:
/// expert(id) = ((a * (id mod p) + b) mod p) mod E with p = 2^31 - 1 and (a, b) fixed by `seed`.
/// The same map as `randomHashTable`, computed on the ids' device with no table. ids [T] int64 >= 0 -> [T] int64.
let randomHash (seed: int) (experts: int) (tokenIds: Tensor) : Tensor =
    if experts < 1 then invalidArg "experts" (sprintf "expected experts >= 1, got %d" experts)
    expectIndex "tokenIds" "[T]" 1 tokenIds
    let a, b = hashParameters seed
    use scope = torch.NewDisposeScope()
    use p = hashPrime.ToScalar()
    use aScalar = a.ToScalar()
    use bScalar = b.ToScalar()
    use one = (1L).ToScalar()
    let h = (tokenIds.remainder(p).mul(aScalar).add(bScalar, one)).remainder p // [T], < p
    (withInt64Scalar (int64 experts) (fun e -> h.remainder e)).MoveToOuterDisposeScope()

/// The `randomHash` map materialised for ids 0 .. vocab-1: table[id] = expert.
let randomHashTable (seed: int) (experts: int) (vocab: int) : int64[] =
    if experts < 1 then invalidArg "experts" (sprintf "expected experts >= 1, got %d" experts)
    if vocab < 1 then invalidArg "vocab" (sprintf "expected vocab >= 1, got %d" vocab)
    let a, b = hashParameters seed
    Array.init vocab (fun id -> ((a * (int64 id % hashPrime) + b) % hashPrime) % int64 experts)

/// Balanced hash (Roller et al. 2021, sec. 3, "Balanced assignment"): token ids sorted by corpus frequency,
/// most frequent first, each assigned greedily to the expert with the least token mass so far (ties: fewer
/// ids, then lower index, so unseen ids are spread evenly). counts[id] = corpus count of id (>= 0);
/// returns table[id] = expert, for `route` as `RouterInputs.HashTable`.
let balancedHashTable (experts: int) (counts: int64[]) : int64[] =
    if experts < 1 then invalidArg "experts" (sprintf "expected experts >= 1, got %d" experts)
    if isNull counts || counts.Length = 0 then invalidArg "counts" "expected counts [V] with V >= 1 token ids, got none"
    match Array.tryFindIndex (fun c -> c < 0L) counts with
    | Some id -> invalidArg "counts" (sprintf "expected counts >= 0, got %d for token id %d" counts[id] id)
    | None -> ()
    let byFrequency = Array.init counts.Length id |> Array.sortBy (fun id -> struct (-counts[id], id))
    let table = Array.zeroCreate<int64> counts.Length
    let queue = PriorityQueue<int, struct (int64 * int * int)>()
    for e in 0 .. experts - 1 do
        queue.Enqueue(e, struct (0L, 0, e))
    for id in byFrequency do
        let mutable e = 0
        let mutable priority = struct (0L, 0, 0)
        queue.TryDequeue(&e, &priority) |> ignore
        let struct (mass, ids, _) = priority
        table[id] <- int64 e
        queue.Enqueue(e, struct (mass + counts[id], ids + 1, e))
    table

// ---------------------------------------------------------------- capacity

/// Capacity per expert for a batch of `tokens` tokens, or None when unlimited.
/// Token choice: C = max(MinCapacity, ceil(f * T * K / E)) (Switch eq. 3), K = `RouterConfig.picksPerToken`.
/// Expert choice: C = min(T, max(MinCapacity, ceil(f * T / E))) (Zhou et al. 2022, sec. 3.1, f being the
/// average number of experts per token), and C = T when dropless.
let capacity (cfg: RouterConfig) (tokens: int) : int option =
    if tokens < 1 then invalidArg "tokens" (sprintf "expected tokens >= 1, got %d" tokens)
    let cfg = orFail "router config" (RouterConfig.validate cfg) cfg
    // decimal keeps f = 1.0 with T * K / E whole exact (no 4.0000001 -> 5)
    let ceilOf (f: float) (n: int) = int (Math.Ceiling(decimal f * decimal n / decimal cfg.Experts))
    match cfg.Selection, cfg.Capacity with
    | ExpertChoice, Dropless -> Some tokens
    | ExpertChoice, Factor f -> Some(min tokens (max cfg.MinCapacity (ceilOf f tokens)))
    | _, Dropless -> None
    | _, Factor f -> Some(max cfg.MinCapacity (ceilOf f (tokens * RouterConfig.picksPerToken cfg)))

/// Which token-choice assignments fit within capacity c. Priority is first-come in slot-major order, as in
/// Switch/GShard: every token's slot-0 pick before any slot-1 pick, and within a slot by token position.
/// Sort-based (no [T; E; C] one-hot): rank each assignment within its expert, keep rank < c.
/// experts [T; K] int64 -> kept [T; K] bool.
let private keepWithinCapacity (c: int) (numExperts: int) (experts: Tensor) : Tensor =
    use scope = torch.NewDisposeScope()
    let t, k = experts.shape[0], experts.shape[1]
    let n = t * k
    let slotMajor = experts.t().reshape n // [K*T], entry j = slot * T + token
    let order = arange 0L n torch.ScalarType.Int64 experts.device // [K*T]
    let perm = (plus (mulInt64 n slotMajor) order).argsort () // by expert, then priority
    let counts = torch.bincount (slotMajor, minlength = int64 numExperts) // [E]
    let starts = counts.cumsum 0L - counts // [E], first sorted position of each expert
    let sortedExperts = slotMajor.index_select (0L, perm) // [K*T]
    let rankSorted = order - starts.index_select (0L, sortedExperts) // [K*T], position within its expert
    let rank = torch.zeros_like(rankSorted).scatter (0L, perm, rankSorted) // [K*T], slot-major
    (withInt64Scalar (int64 c) (fun c -> rank.lt c)).reshape(k, t).t().contiguous().MoveToOuterDisposeScope()

// ---------------------------------------------------------------- routers (before capacity)

/// A router's proposal: who each slot goes to, the gate values and, for expert choice, who was chosen.
type private Proposal =
    { PExperts: Tensor // [T; K] int64
      PGates: Tensor // [T; K]
      PProbs: Tensor option // [T; E]
      PLogits: Tensor option // [T; E]
      PLoad: Tensor option // [T; E]
      /// Expert choice decides kept slots itself. // [T; E] bool
      PChosen: Tensor option }

/// Indices of the k largest scores per token, best first; the bias shifts the ranking only. // [T; k]
let private selectTopK (k: int) (bias: Tensor option) (scores: Tensor) : Tensor =
    let ranked =
        match bias with
        | Some b -> plus (scores.detach ()) b
        | None -> scores.detach ()
    let struct (_, idx) = ranked.topk k
    idx

/// Token-choice top-k (Switch/Mixtral/GShard; Megatron-LM for TopKThenNormalise): the k best experts per
/// token. NormaliseThenTopK: p = normalise(logits) over all E, gates = p at the picks (renormalised to sum 1
/// over the k picks when `renormalise`, "top-k mask"; raw, "naive top-k", otherwise). TopKThenNormalise:
/// gates = normalise(logits at the picks), which already sums to 1. The DeepSeek-V3 bias is added to the
/// ranked scores (the probabilities, or the logits for TopKThenNormalise) for selection only.
let private tokenChoiceTopK (normaliser: Normaliser) (k: int) (order: TopKOrder) (renorm: bool) (bias: Tensor option) (logits: Tensor) : Proposal =
    let probs = normalise normaliser logits // [T; E]
    match order with
    | NormaliseThenTopK ->
        let idx = selectTopK k bias probs // [T; K]
        let picked = probs.gather (1L, idx) // [T; K]
        let gates = if renorm then picked / clampMin renormaliseFloor (picked.sum(-1L, keepdim = true)) else picked
        { PExperts = idx; PGates = gates; PProbs = Some probs; PLogits = Some logits; PLoad = None; PChosen = None }
    | TopKThenNormalise ->
        let idx = selectTopK k bias logits // [T; K]
        let gates = normalise normaliser (logits.gather (1L, idx)) // [T; K]
        { PExperts = idx; PGates = gates; PProbs = Some probs; PLogits = Some logits; PLoad = None; PChosen = None }

/// Shazeer et al. 2017 eq. 9: P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / std_i), the probability
/// that expert i stays in the top-k when only its own noise is redrawn. kth_excluding is the (k+1)-th largest
/// noisy logit for an expert now in the top-k and the k-th largest otherwise (their reference code). When
/// k >= E every expert is always selected and P = 1. Differentiable in clean, noisy and std.
/// clean, noisy, noiseStd [T; E] -> [T; E].
let loadProbability (k: int) (clean: Tensor) (noisy: Tensor) (noiseStd: Tensor) : Tensor =
    expectFloat "clean" "[T; E]" 2 clean
    let sameShape name (t: Tensor) =
        expect name (sprintf "[T; E] = [%d; %d] floating point (the clean logits' shape)" clean.shape[0] clean.shape[1])
            (fun t -> isFloating t && t.shape = clean.shape) t
    sameShape "noisy" noisy
    sameShape "noiseStd" noiseStd
    let e = int clean.shape[1]
    if k < 1 then invalidArg "k" (sprintf "expected k >= 1, got %d" k)
    use scope = torch.NewDisposeScope()
    if k >= e then torch.ones_like(clean).MoveToOuterDisposeScope()
    else
        let struct (top, _) = noisy.topk (k + 1) // [T; k+1]
        let thresholdIfIn = top.narrow (1L, int64 k, 1L) // [T; 1]
        let thresholdIfOut = top.narrow (1L, int64 (k - 1), 1L) // [T; 1]
        let isIn = noisy.gt thresholdIfIn // [T; E]
        let std = clampMin noiseStdFloor noiseStd // [T; E]
        let probIfIn = normalCdf ((clean - thresholdIfIn) / std) // [T; E]
        let probIfOut = normalCdf ((clean - thresholdIfOut) / std) // [T; E]
        torch.where(isIn, probIfIn, probIfOut).MoveToOuterDisposeScope()

/// Noisy top-k gating (Shazeer et al. 2017 eq. 3-5): H = clean + N(0, 1) * noiseStd in training (clean in
/// evaluation), G = normalise(KeepTopK(H, k)), i.e. top-k then normalise. Also returns the eq. 9 load
/// probabilities, with the selection bias (if any) shifting both clean and noisy scores as it shifts selection.
let private noisyTopK (normaliser: Normaliser) (k: int) (training: bool) (generator: torch.Generator option)
                      (bias: Tensor option) (noiseStd: Tensor) (logits: Tensor) : Proposal =
    let noisy = // [T; E]
        if training then
            let eps = torch.randn (logits.shape, dtype = logits.dtype, device = logits.device, generator = Option.toObj generator)
            plus logits (eps * noiseStd)
        else logits.alias ()
    let idx = selectTopK k bias noisy // [T; K]
    let gates = normalise normaliser (noisy.gather (1L, idx)) // [T; K], eq. 3
    let load =
        match bias with
        | Some b -> loadProbability k (plus logits b) (plus noisy b) noiseStd
        | None -> loadProbability k logits noisy noiseStd
    { PExperts = idx; PGates = gates; PProbs = Some(normalise normaliser noisy); PLogits = Some logits
      PLoad = Some load; PChosen = None }

/// Every expert for every token, weighted by the normaliser's output (soft MoE without top-k).
let private allExperts (normaliser: Normaliser) (logits: Tensor) : Proposal =
    let t, e = logits.shape[0], logits.shape[1]
    let probs = normalise normaliser logits // [T; E]
    let experts = (arange 0L e torch.ScalarType.Int64 logits.device).expand(t, e).contiguous () // [T; E]
    { PExperts = experts; PGates = probs; PProbs = Some probs; PLogits = Some logits; PLoad = None; PChosen = None }

/// Expert-choice routing (Zhou et al. 2022, eq. 1): S = softmax(logits) [T; E]; each expert e takes the C
/// tokens with the largest S[:, e] (I, G = TopK(S^T, C)). Represented with K = E slots: slot e of token t is
/// expert e, kept when e chose t, weighted S[t, e].
let private expertChoice (c: int) (logits: Tensor) : Proposal =
    let t, e = logits.shape[0], logits.shape[1]
    let probs = normalise Softmax logits // [T; E]
    let struct (_, chosenTokens) = probs.detach().topk (c, dim = 0) // [C; E]
    let chosen = torch.zeros([| t; e |], dtype = torch.ScalarType.Bool, device = logits.device).scatter (0L, chosenTokens, torch.ones_like (chosenTokens, dtype = torch.ScalarType.Bool)) // [T; E]
    let experts = (arange 0L e torch.ScalarType.Int64 logits.device).expand(t, e).contiguous () // [T; E]
    { PExperts = experts; PGates = probs * chosen.to_type probs.dtype; PProbs = Some probs; PLogits = Some logits
      PLoad = None; PChosen = Some chosen }

/// Hash routing (Roller et al. 2021): one expert per token, a fixed function of the token id, weight 1; no
/// learned parameters, independent of the hidden state.
let private hashRoute (scheme: HashScheme) (experts: int) (table: Tensor option) (tokenIds: Tensor) : Proposal =
    let picks = // [T]
        match scheme, table with
        | RandomHash seed, _ -> randomHash seed experts tokenIds
        | BalancedHash, Some table -> table.``to``(tokenIds.device).index_select (0L, tokenIds)
        | BalancedHash, None -> invalidArg "HashTable" "expected HashTable [V] int64 for BalancedHash routing, got None"
    let expertsOf = picks.unsqueeze 1L // [T; 1]
    { PExperts = expertsOf; PGates = torch.ones (expertsOf.shape, dtype = torch.ScalarType.Float32, device = tokenIds.device)
      PProbs = None; PLogits = None; PLoad = None; PChosen = None }

// ---------------------------------------------------------------- statistics and the entry point

/// Tokens-per-expert fractions, dropped fraction and mean router entropy, detached, float32.
let private statsOf (numExperts: int) (expertChoiceDrop: bool) (experts: Tensor) (kept: Tensor) (probs: Tensor option) : RoutingStats =
    use _ = torch.no_grad ()
    let f32 = torch.ScalarType.Float32
    let keptF = kept.to_type f32 // [T; K]
    let perExpert = torch.bincount (experts.flatten (), keptF.flatten (), int64 numExperts) // [E]
    let fractions = (perExpert / clampMin 1.0 (perExpert.sum ())).to_type f32 // [E]
    let dropped =
        if expertChoiceDrop then rsubScalar 1.0 (kept.any(1L).to_type(f32).mean ())
        else rsubScalar 1.0 (keptF.mean ())
    let entropy =
        match probs with
        | Some p ->
            let p = p.detach().to_type f32 // [T; E]
            (-(p * (clampMin entropyFloor p).log ()).sum (-1L)).mean ()
        | None -> torch.zeros ([||], dtype = f32, device = experts.device)
    { TokensPerExpert = fractions; DroppedFraction = dropped; RouterEntropy = entropy }

let private moveOut (r: Routing) : Routing =
    let out (t: Tensor) = t.MoveToOuterDisposeScope()
    { Experts = out r.Experts
      Weights = out r.Weights
      Kept = out r.Kept
      Probs = Option.map out r.Probs
      Logits = Option.map out r.Logits
      Stats =
        { TokensPerExpert = out r.Stats.TokensPerExpert
          DroppedFraction = out r.Stats.DroppedFraction
          RouterEntropy = out r.Stats.RouterEntropy }
      Gates = out r.Gates
      LoadProbability = Option.map out r.LoadProbability
      Capacity = r.Capacity }

/// Checks a floating [T; E] input: rank, dtype, E = cfg.Experts, the logits' T, finite values.
let private checkScores (name: string) (experts: int) (tokens: int64 option) (t: Tensor) =
    let layout =
        match tokens with
        | Some n -> sprintf "[T; E] = [%d; %d] floating point" n experts
        | None -> sprintf "[T; E] floating point with E = %d" experts
    expect name layout (fun t -> t.Dimensions = 2L && isFloating t && t.shape[1] = int64 experts && (tokens.IsNone || Some t.shape[0] = tokens)) t
    checkTokens name t
    expectFinite name t

/// The single entry point: routes a batch per `cfg.Selection` (see `RouterInputs` for what each router
/// reads), applies capacity and reports statistics. Validates the config and every input at the boundary
/// (shape, dtype, expert count, finiteness) with an error naming the expected layout.
/// Token choice keeps assignments within capacity first-come in slot-major order (slot 0 of every token
/// before slot 1; by token position within a slot, as Switch/GShard); dropped slots get Kept = false and
/// Weight = 0. Expert choice uses K = E slots. Weights come from unbiased scores; the DeepSeek-V3 `Bias`
/// steers selection only. Math in float32 (float64 inputs stay float64).
let route (cfg: RouterConfig) (inputs: RouterInputs) : Routing =
    let cfg = orFail "router config" (RouterConfig.validate cfg) cfg
    let e = cfg.Experts
    let unused what why (t: Tensor option) =
        if t.IsSome then invalidArg what (sprintf "%s is not used by %A routing (%s); pass None" what cfg.Selection why)
    use scope = torch.NewDisposeScope()
    let routing =
        match cfg.Selection with
        | Hash scheme ->
            let ids = required "TokenIds" "[T] int64" cfg.Selection inputs.TokenIds
            expectIndex "TokenIds" "[T]" 1 ids
            checkTokens "TokenIds" ids
            unused "NoiseStd" "only NoisyTopK draws noise" inputs.NoiseStd
            unused "Bias" "hash routing has no scores to bias" inputs.Bias
            if (ids.min ()).item<int64> () < 0L then
                invalidArg "TokenIds" (sprintf "expected TokenIds [T] int64 >= 0, got a negative id in %s" (describe ids))
            let table =
                match scheme with
                | RandomHash _ -> unused "HashTable" "RandomHash computes its map from the seed" inputs.HashTable; None
                | BalancedHash ->
                    let table = required "HashTable" "[V] int64 (from balancedHashTable)" cfg.Selection inputs.HashTable
                    expectIndex "HashTable" "[V]" 1 table
                    checkTokens "HashTable" table
                    if (table.min ()).item<int64> () < 0L || (table.max ()).item<int64> () >= int64 e then
                        invalidArg "HashTable" (sprintf "expected HashTable [V] int64 with values in 0..%d (experts), got values outside in %s" (e - 1) (describe table))
                    if (ids.max ()).item<int64> () >= table.shape[0] then
                        invalidArg "TokenIds" (sprintf "expected TokenIds < V = %d (the HashTable length), got id %d" table.shape[0] ((ids.max ()).item<int64> ()))
                    Some table
            let p = hashRoute scheme e table ids
            let t = int ids.shape[0]
            let c = capacity cfg t
            let kept = match c with Some c -> keepWithinCapacity c e p.PExperts | None -> torch.ones_like (p.PExperts, dtype = torch.ScalarType.Bool)
            { Experts = p.PExperts; Weights = p.PGates * kept.to_type p.PGates.dtype; Kept = kept; Probs = None; Logits = None
              Stats = statsOf e false p.PExperts kept None; Gates = p.PGates; LoadProbability = None; Capacity = c }
        | selection ->
            let raw = required "Logits" (sprintf "[T; E] floating point with E = %d" e) selection inputs.Logits
            checkScores "Logits" e None raw
            let dt = mathDtype raw
            let logits = raw.to_type dt // [T; E]
            let t = int logits.shape[0]
            let bias =
                match selection, inputs.Bias with
                | (AllExperts | ExpertChoice), Some _ -> unused "Bias" "it selects no top-k a bias could steer" inputs.Bias; None
                | _, Some b when not (isNull b) ->
                    expect "Bias" (sprintf "[E] floating point with E = %d" e) (fun b -> b.Dimensions = 1L && isFloating b && b.shape[0] = int64 e) b
                    expectFinite "Bias" b
                    Some(b.detach().to_type(dt).``to`` logits.device)
                | _ -> None
            if selection <> NoisyTopK then unused "NoiseStd" "only NoisyTopK draws noise" inputs.NoiseStd
            unused "HashTable" "only BalancedHash reads a table" inputs.HashTable
            let c = capacity cfg t
            let p =
                match selection with
                | TokenChoiceTopK(order, renorm) -> tokenChoiceTopK cfg.Normaliser cfg.K order renorm bias logits
                | SwitchTop1 -> tokenChoiceTopK cfg.Normaliser 1 NormaliseThenTopK false bias logits // Switch eq. 2: gate = p_i(x)
                | NoisyTopK ->
                    let std = required "NoiseStd" "[T; E] floating point (softplus(x W_noise), Shazeer eq. 4)" selection inputs.NoiseStd
                    checkScores "NoiseStd" e (Some logits.shape[0]) std
                    if scalar (std.min ()) < 0.0 then
                        invalidArg "NoiseStd" (sprintf "expected NoiseStd [T; E] >= 0 (a standard deviation), got a negative value in %s" (describe std))
                    noisyTopK cfg.Normaliser cfg.K inputs.Training inputs.Generator bias (std.to_type dt) logits
                | AllExperts -> allExperts cfg.Normaliser logits
                | ExpertChoice -> expertChoice (Option.get c) logits
                | Hash _ -> failwith "unreachable: hash routing handled above"
            let kept =
                match p.PChosen, c with
                | Some chosen, _ -> chosen
                | None, Some c -> keepWithinCapacity c e p.PExperts
                | None, None -> torch.ones_like (p.PExperts, dtype = torch.ScalarType.Bool)
            { Experts = p.PExperts; Weights = p.PGates * kept.to_type p.PGates.dtype; Kept = kept; Probs = p.PProbs
              Logits = p.PLogits; Stats = statsOf e (selection = ExpertChoice) p.PExperts kept p.PProbs; Gates = p.PGates
              LoadProbability = p.PLoad; Capacity = c }
    moveOut routing

/// `route` with only logits, in evaluation mode: `logits |> routeLogits cfg`.
let routeLogits (cfg: RouterConfig) (logits: Tensor) : Routing = route cfg (RouterInputs.OfLogits logits)

/// Capacity within groups of tokens, on top of a routing's own capacity: the T tokens are G consecutive groups of
/// `groupSize` (the rows of a [G; S; D] batch), and each expert keeps at most `capacity` assignments per group,
/// first come in slot-major order within the group (every slot-0 pick before any slot-1 pick, then by position).
/// This is Switch Transformers' capacity as Mesh TensorFlow and transformers' `SwitchTransformersTop1Router`
/// define it: an absolute `expert_capacity` per group (transformers: per sequence, a cumulative sum along the
/// sequence), not a factor of the whole batch as `capacity` computes it. Assignments the routing had already
/// dropped stay dropped and take no place. Dropped assignments get Kept = false and Weight = 0; statistics
/// are recomputed. `cfg` is the router config that produced the routing (for expert choice, the dropped
/// fraction counts tokens no expert kept).
let limitPerGroup (cfg: RouterConfig) (groupSize: int) (capacity: int) (r: Routing) : Routing =
    if groupSize < 1 then invalidArg "groupSize" (sprintf "expected groupSize >= 1, got %d" groupSize)
    if capacity < 0 then invalidArg "capacity" (sprintf "expected capacity >= 0, got %d" capacity)
    let t, k = r.Experts.shape[0], r.Experts.shape[1]
    if t % int64 groupSize <> 0L then
        invalidArg "groupSize" (sprintf "expected the routing's T = %d tokens to be whole groups of %d" t groupSize)
    use scope = torch.NewDisposeScope()
    let e = int64 cfg.Experts
    let s = int64 groupSize
    let groups = t / s
    let dev = r.Experts.device
    let token = arange 0L t torch.ScalarType.Int64 dev // [T]
    let group = withInt64Scalar s (fun s -> token.div (s, rounding_mode = torch.RoundingMode.floor)) // [T]
    let position = token - mulInt64 s group // [T], position within the group
    let slot = arange 0L k torch.ScalarType.Int64 dev // [K]
    let priority = plus (mulInt64 s (slot.unsqueeze 0L)) (position.unsqueeze 1L) // [T; K], slot-major within the group
    // bucket (group, expert) for kept slots; dropped slots share one bucket after all the others
    let bucket = plus (mulInt64 e (group.unsqueeze 1L)) r.Experts // [T; K]
    let bucket = withInt64Scalar (groups * e) (fun sentinel -> bucket.masked_fill (r.Kept.logical_not (), sentinel)) // [T; K]
    let flatBucket = bucket.reshape (-1L) // [T*K]
    let key = plus (mulInt64 (k * s) flatBucket) (priority.reshape (-1L)) // [T*K], by bucket, then priority
    let order = key.argsort () // [T*K]
    let counts = torch.bincount (flatBucket, minlength = groups * e + 1L) // [G*E + 1]
    let starts = counts.cumsum 0L - counts // [G*E + 1]
    let sortedBuckets = flatBucket.index_select (0L, order) // [T*K]
    let rankSorted = arange 0L (t * k) torch.ScalarType.Int64 dev - starts.index_select (0L, sortedBuckets) // [T*K]
    let rank = torch.zeros_like(rankSorted).scatter (0L, order, rankSorted) // [T*K]
    let withinCapacity = withInt64Scalar (int64 capacity) (fun c -> rank.lt c) // [T*K]
    let kept = r.Kept.logical_and (withinCapacity.reshape (t, k)) // [T; K]
    let stats = statsOf cfg.Experts (cfg.Selection = ExpertChoice) r.Experts kept r.Probs
    // only the new tensors leave this scope; the others stay where the caller's routing keeps them
    { r with
        Kept = kept.MoveToOuterDisposeScope()
        Weights = (r.Gates * kept.to_type r.Gates.dtype).MoveToOuterDisposeScope()
        Stats =
            { TokensPerExpert = stats.TokensPerExpert.MoveToOuterDisposeScope()
              DroppedFraction = stats.DroppedFraction.MoveToOuterDisposeScope()
              RouterEntropy = stats.RouterEntropy.MoveToOuterDisposeScope() }
        Capacity = Some(match r.Capacity with Some c -> min c capacity | None -> capacity) }

// ---------------------------------------------------------------- balancing losses (unweighted)

/// Squared coefficient of variation var(x) / (mean(x)^2 + eps), population variance (Shazeer et al. 2017:
/// the CV^2 of the importance loss, eq. 7, and of the load loss, appendix A; eps from their reference code).
/// x [E] -> scalar.
let cvSquared (x: Tensor) : Tensor =
    expectFloat "x" "[E]" 1 x
    use scope = torch.NewDisposeScope()
    let mean = x.mean () // scalar
    let variance = (square (x - mean)).mean () // scalar
    (variance / addScalar cvEpsilon (square mean)).MoveToOuterDisposeScope()

/// Switch Transformer auxiliary loss (Fedus et al. 2022, eq. 4-6; GShard's l_aux): E * sum_e f_e * P_e, with
/// P_e the mean router probability of expert e and f_e the fraction of ALL proposed assignments (every slot
/// of every token, before capacity, over T*K) that pick e; for K = 1 this is eq. 5 exactly, and for top-k it is
/// Megatron-LM's normalisation. f is a count (no gradient); the gradient flows through P. Equals 1 when P is
/// uniform. Zero for hash routing.
let switchAuxLoss (r: Routing) : Tensor =
    match r.Probs with
    | None -> zeroFor r
    | Some probs ->
        use scope = torch.NewDisposeScope()
        let e = probs.shape[1]
        let counts = torch.bincount (r.Experts.flatten (), minlength = e) // [E]
        let f = divScalar (float r.Experts.NumberOfElements) (counts.to_type probs.dtype) // [E], sums to 1
        let p = probs.mean [| 0L |] // [E]
        (mulScalar (float e) ((f * p).sum ())).MoveToOuterDisposeScope()

/// Importance loss (Shazeer et al. 2017, eq. 6-7, unweighted): CV(Importance)^2 with Importance_e the sum
/// over the batch of the gate values G(x)_e (the routing's `Gates`, before capacity). Zero for hash routing.
let importanceLoss (r: Routing) : Tensor =
    match r.Probs with
    | None -> zeroFor r
    | Some probs ->
        use scope = torch.NewDisposeScope()
        let importance = torch.zeros ([| probs.shape[1] |], dtype = r.Gates.dtype, device = r.Gates.device) // [E]
        let importance = withScalar 1.0 (fun one -> importance.index_add (0L, r.Experts.flatten (), r.Gates.flatten (), one)) // [E]
        (cvSquared importance).MoveToOuterDisposeScope()

/// Load loss (Shazeer et al. 2017, appendix A, eq. 8-10, unweighted): CV(Load)^2 with Load_e = sum over tokens of the
/// smooth estimate P(x, e) (eq. 9, `loadProbability`) that e stays in the noisy top-k; differentiable.
/// Zero for routers without noise (only NoisyTopK has it).
let loadLoss (r: Routing) : Tensor =
    match r.LoadProbability with
    | None -> zeroFor r
    | Some p ->
        use scope = torch.NewDisposeScope()
        (cvSquared (p.sum [| 0L |])).MoveToOuterDisposeScope()

/// Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5, unweighted): mean over tokens of logsumexp(logits)^2.
/// Zero for hash routing.
let routerZLoss (r: Routing) : Tensor =
    match r.Logits with
    | None -> zeroFor r
    | Some logits ->
        use scope = torch.NewDisposeScope()
        ((square (logits.logsumexp -1L)).mean ()).MoveToOuterDisposeScope()

/// All four balancing losses, unweighted (coefficients are applied once, where the total loss is assembled).
let auxLosses (r: Routing) : AuxLosses =
    { SwitchAux = switchAuxLoss r; Importance = importanceLoss r; Load = loadLoss r; ZLoss = routerZLoss r }

// ---------------------------------------------------------------- C# facade

/// The main entry points as methods, for C# callers. Null stands for an absent optional tensor.
[<AbstractClass; Sealed>]
type Routers =
    /// `route`: routes a batch. logits [T; E]; noiseStd [T; E] (NoisyTopK); tokenIds [T] int64 (hash);
    /// bias [E] (DeepSeek-V3 selection bias); hashTable [V] int64 (BalancedHash).
    static member Route(cfg: RouterConfig, logits: Tensor,
                        [<Optional; DefaultParameterValue(null: Tensor)>] noiseStd: Tensor,
                        [<Optional; DefaultParameterValue(null: Tensor)>] tokenIds: Tensor,
                        [<Optional; DefaultParameterValue(null: Tensor)>] bias: Tensor,
                        [<Optional; DefaultParameterValue(null: Tensor)>] hashTable: Tensor,
                        [<Optional; DefaultParameterValue(false)>] training: bool,
                        [<Optional; DefaultParameterValue(null: torch.Generator)>] generator: torch.Generator) : Routing =
        route cfg
            { Logits = Option.ofObj logits; NoiseStd = Option.ofObj noiseStd; TokenIds = Option.ofObj tokenIds
              Bias = Option.ofObj bias; HashTable = Option.ofObj hashTable; Training = training
              Generator = Option.ofObj generator }

    /// `auxLosses`: the four unweighted balancing losses of a routing.
    static member AuxLosses(routing: Routing) : AuxLosses = auxLosses routing

    /// `updateBias`: the DeepSeek-V3 sign-rule bias update.
    static member UpdateBias(rate: float, bias: Tensor, tokensPerExpert: Tensor) : Tensor = updateBias rate bias tokensPerExpert

    /// `normalise`: softmax or sparsemax along the last axis.
    static member Normalise(normaliser: Normaliser, z: Tensor) : Tensor = normalise normaliser z

    /// `balancedHashTable`: token id -> expert table balanced by corpus counts.
    static member BalancedHashTable(experts: int, counts: int64[]) : int64[] = balancedHashTable experts counts
