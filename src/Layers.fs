/// Feed-forward experts, the sparse MoE layer and their shared result type.
/// Axes: T tokens, D model width, H expert hidden width, E experts, K picks (slots) per token,
/// N kept (token, slot) assignments, R attention-router width, V vocabulary.
module Moe.Layers

open System
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.FusedExperts

/// What an MoE sublayer reports besides its output: unweighted aux losses and routing statistics.
type MoeReport =
    { Aux: AuxLosses
      Stats: RoutingStats }

/// What a Transformer block's feed-forward sublayer returns: the output, plus a report when it is an MoE layer.
type FfnResult =
    { Output: Tensor
      Moe: MoeReport option }

/// Applies an activation to the first projection (SwiGLU needs the gate projection too, see `DenseFfn`).
let activate (act: Activation) (x: Tensor) : Tensor =
    match act with
    | ReLU -> functional.relu x
    | GELU -> functional.gelu x
    | SwiGLU -> functional.silu x

/// The dense position-wise FFN: W2 act(W1 x), or for SwiGLU W2 (silu(W1 x) * W3 x) (Shazeer 2020).
/// Input [.., D], output [.., D] in the input's dtype.
[<AllowNullLiteral>]
type DenseFfn(name: string, modelDim: int, hidden: int, act: Activation) as this =
    inherit Module<Tensor, FfnResult>(name)
    let w1 = Linear(int64 modelDim, int64 hidden, hasBias = false)
    let w2 = Linear(int64 hidden, int64 modelDim, hasBias = false)
    let w3 = if act = SwiGLU then Linear(int64 modelDim, int64 hidden, hasBias = false) else null
    do
        if modelDim < 1 || hidden < 1 then
            invalidArg "hidden" (sprintf "expected modelDim >= 1 and hidden >= 1, got %d and %d" modelDim hidden)
        this.RegisterComponents()

    member _.W1 = w1
    member _.W2 = w2
    /// The SwiGLU value projection; null for ReLU and GELU.
    member _.W3 = w3
    member _.Activation = act

    override _.forward(x: Tensor) : FfnResult =
        expect "x" (sprintf "[..; %d] floating point" modelDim) (fun t -> t.Dimensions >= 1L && t.shape[t.shape.Length - 1] = int64 modelDim && isFloating t) x
        // weights are cast to the input's dtype when they differ, so float32 master weights serve a bfloat16 pass
        let project (layer: Linear) (input: Tensor) = linearLayerCast layer input
        use h = activate act (project w1 x)
        let out =
            if isNull w3 then project w2 h
            else
                use v = project w3 x
                use g = h * v
                project w2 g
        { Output = out; Moe = None }

// ---------------------------------------------------------------- experts

/// nn.Linear's default initialisation (PyTorch's kaiming_uniform with a = sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
let private linearInit (fanIn: int64) (shape: int64[]) : Parameter =
    let bound = 1.0 / Math.Sqrt(float fanIn)
    use _ = torch.no_grad ()
    Parameter(torch.empty(shape).uniform_ (-bound, bound))

/// Checks that a module's inputs live where its parameters do.
let private expectDevice (name: string) (device: torch.Device) (t: Tensor) =
    if t.device.``type`` <> device.``type`` || t.device.index <> device.index then
        invalidArg name (sprintf "expected %s on %O (the layer's parameters' device), got %s on %O" name device (describe t) t.device)

/// E expert FFNs with stacked weights, so one expert's rows run as one matmul per projection:
/// W1 [E; D; H], W2 [E; H; D] and, for SwiGLU, W3 [E; D; H]. Expert e maps a row x [D] to act(x W1[e]) W2[e],
/// or (silu(x W1[e]) * x W3[e]) W2[e] (Shazeer 2020), like `DenseFfn` (no biases). Initialised like nn.Linear.
type ExpertFfn(name: string, experts: int, modelDim: int, hidden: int, act: Activation) as this =
    inherit Module<Tensor, int64[], Tensor>(name)
    do
        if experts < 1 || modelDim < 1 || hidden < 1 then
            invalidArg "experts" (sprintf "expected experts, modelDim and hidden >= 1, got %d, %d and %d" experts modelDim hidden)
    let e, d, h = int64 experts, int64 modelDim, int64 hidden
    // Mutable because Module.to replaces parameter objects and writes them back into the fields that carry
    // the registered names; immutable F# fields are init-only and would keep the disposed originals.
    let mutable w1 = linearInit d [| e; d; h |] // [E; D; H]
    let mutable w2 = linearInit h [| e; h; d |] // [E; H; D]
    let mutable w3 = if act = SwiGLU then linearInit d [| e; d; h |] else null // [E; D; H]
    do
        this.register_parameter ("w1", w1)
        this.register_parameter ("w2", w2)
        if not (isNull w3) then this.register_parameter ("w3", w3)

    member _.Experts = experts
    member _.ModelDim = modelDim
    member _.Hidden = hidden
    member _.Activation = act
    /// First projection of every expert. // [E; D; H]
    member _.W1 : Tensor = w1
    /// Output projection of every expert. // [E; H; D]
    member _.W2 : Tensor = w2
    /// SwiGLU value projection of every expert; null for ReLU and GELU. // [E; D; H]
    member _.W3 : Tensor = w3

    /// Runs every expert on its contiguous block of rows: xs [N; D] holds counts[0] rows for expert 0, then
    /// counts[1] rows for expert 1, ...; returns [N; D] in the same order. The rows are cut with `split`
    /// (its backward is one concatenation; `narrow`'s would allocate an [N; D] zero tensor per expert) and the
    /// weights with `unbind` (backward: one stack). Weights are cast to the rows' dtype when they differ, so
    /// float32 master weights serve a bfloat16 pass.
    override _.forward(xs: Tensor, counts: int64[]) : Tensor =
        expect "xs" (sprintf "[N; %d] floating point" modelDim) (fun t -> t.Dimensions = 2L && t.shape[1] = d && isFloating t) xs
        expectDevice "xs" w1.device xs
        if isNull counts || counts.Length <> experts then
            invalidArg "counts" (sprintf "expected counts [E] with E = %d, got %s" experts (if isNull counts then "null" else sprintf "%d entries" counts.Length))
        if Array.exists (fun c -> c < 0L) counts || Array.sum counts <> xs.shape[0] then
            invalidArg "counts" (sprintf "expected counts >= 0 summing to N = %d (the rows of xs), got %A" xs.shape[0] counts)
        use scope = torch.NewDisposeScope()
        let dt = xs.dtype
        let perExpert (w: Tensor) = (if w.dtype = dt then w else w.to_type dt).unbind 0L
        let w1s = perExpert w1 // E x [D; H]
        let w2s = perExpert w2 // E x [H; D]
        let w3s = if isNull w3 then [||] else perExpert w3 // E x [D; H]
        let chunks = xs.split (counts, 0L) // E x [N_e; D]
        let outputs =
            [| for i in 0 .. experts - 1 do
                 if counts[i] > 0L then
                     let x = chunks[i] // [N_e; D]
                     let a = activate act (x.mm w1s[i]) // [N_e; H]
                     let a = if w3s.Length = 0 then a else a * x.mm w3s[i] // [N_e; H]
                     a.mm w2s[i] |] // [N_e; D]
        let y = if outputs.Length = 0 then torch.zeros ([| 0L; d |], dtype = dt, device = xs.device) else torch.cat (outputs, 0L)
        y.MoveToOuterDisposeScope()

// ---------------------------------------------------------------- dispatch and combine

/// How `combineExpertsWith` runs the experts.
type DispatchPath =
    /// Per-expert matmuls through autograd: `ExpertFfn.forward` on the split rows (any device).
    | Autograd
    /// One custom autograd function runs each expert's whole block (gather, projections, activation, weighted
    /// output; and the matching backward) as a job, jobs spread over the intra-op threads with one torch thread
    /// each (expert parallelism, as grouped GEMMs do on GPUs), so small expert blocks do not pay an OpenMP
    /// fork/join per op. Every temporary is one expert's block ([N_e; D] or [N_e; H]), never an [N; .] tensor
    /// for all N routed rows, so the allocator reuses memory instead of mapping fresh pages each step; no
    /// concatenation or stacking; the backward reuses the forward's sort (gathers only); and weight gradients
    /// of parameters are accumulated in place into their .grad (Megatron-LM's gradient accumulation fusion), so
    /// no [E; D; H] gradient is allocated per step once .grad exists. Results are summed in expert order, so
    /// runs repeat bit for bit. Because the weight gradients bypass autograd's return path,
    /// `torch.autograd.grad` with respect to the expert weights and double backward need the Autograd path.
    /// CPU only: its backward runs managed code, which on CUDA would run on the autograd device threads.
    | Fused

/// The path `combineExperts` takes: fused on the CPU, autograd elsewhere (see `DispatchPath.Fused`).
let defaultPath (device: torch.Device) : DispatchPath =
    if device.``type`` = DeviceType.CPU then Fused else Autograd

/// Sort-and-split dispatch with a weighted combine: the kept (token, slot) assignments are sorted by expert
/// (stably, so each expert sees its tokens in order), the token rows gathered once, every expert run on its
/// contiguous block, the outputs scaled by their combine weights and index-added back to their tokens:
/// y_t = sum over kept slots j of w_tj E_{e_tj}(x_t) (Shazeer et al. 2017 eq. 1).
/// No per-expert masks over all tokens and no [T; E; C] buffers: memory is O(N (D + H)) for N kept assignments.
/// Gradients reach x, the expert weights and `weights` (hence the router). Expert weights are cast to x's
/// dtype when they differ (float32 master weights for a bfloat16 pass).
/// expertIndex [T; K] int64, weights [T; K] floating, kept [T; K] bool, x [T; D] -> [T; D] in x's dtype.
let combineExpertsWith (path: DispatchPath) (experts: ExpertFfn) (expertIndex: Tensor) (weights: Tensor) (kept: Tensor) (x: Tensor) : Tensor =
    let d = int64 experts.ModelDim
    expect "x" (sprintf "[T; %d] floating point (D = the experts' model width)" d) (fun t -> t.Dimensions = 2L && t.shape[1] = d && isFloating t) x
    let t = x.shape[0]
    expect "expertIndex" (sprintf "[T; K] int64 with T = %d (the rows of x)" t)
        (fun i -> i.Dimensions = 2L && i.dtype = torch.ScalarType.Int64 && i.shape[0] = t) expertIndex
    let k = expertIndex.shape[1]
    let slots = sprintf "[T; K] = [%d; %d]" t k
    expect "weights" (slots + " floating point") (fun w -> isFloating w && w.shape = expertIndex.shape) weights
    expect "kept" (slots + " bool") (fun m -> m.dtype = torch.ScalarType.Bool && m.shape = expertIndex.shape) kept
    let device = experts.W1.device
    for name, tensor in [ "x", x; "expertIndex", expertIndex; "weights", weights; "kept", kept ] do
        expectDevice name device tensor
    if path = Fused && device.``type`` <> DeviceType.CPU then
        invalidArg "path" (sprintf "the fused dispatch path runs on the CPU only; x is on %O (use Autograd)" device)
    let numExperts = int64 experts.Experts
    use scope = torch.NewDisposeScope()
    let flat = expertIndex.reshape (-1L) // [T*K]
    if flat.NumberOfElements > 0L then
        let lo, hi = (flat.min ()).item<int64> (), (flat.max ()).item<int64> ()
        if lo < 0L || hi >= numExperts then
            invalidArg "expertIndex" (sprintf "expected expertIndex values in 0..%d (E - 1), got values from %d to %d" (numExperts - 1L) lo hi)
    let key = withInt64Scalar numExperts (fun e -> flat.masked_fill (kept.reshape(-1L).logical_not (), e)) // [T*K], dropped slots after every expert
    let struct (_, order) = key.sort (0L, false, true) // [T*K], slot ids grouped by expert, stable
    let counts = toInt64s (torch.bincount (key, minlength = numExperts + 1L)) // [E + 1], the last counts dropped slots
    let perExpert = counts[0 .. int numExperts - 1]
    let n = Array.sum perExpert
    let slot = order.narrow (0L, 0L, n) // [N]
    let token = withInt64Scalar (int64 k) (fun k -> slot.div (k, rounding_mode = torch.RoundingMode.floor)) // [N]
    let w = weights.reshape(-1L).index_select(0L, slot).to_type x.dtype // [N]
    let out =
        if path = Autograd || n = 0L then
            let outputs = experts.forward (x.index_select (0L, token), perExpert) // [N; D]
            withScalar 1.0 (fun one -> torch.zeros_like(x).index_add (0L, token, outputs * w.unsqueeze 1L, one))
        else
            let cast (p: Tensor) = if p.dtype = x.dtype then p else p.to_type x.dtype
            let weights = [ yield cast experts.W1; yield cast experts.W2; if not (isNull experts.W3) then yield cast experts.W3 ]
            let outs = torch.autograd.MultiTensorFunction<ExpertBlock>.apply ([| yield box x; yield box token; yield box w; yield box perExpert; yield box experts.Activation; for p in weights -> box p |])
            outs[0]
    out.MoveToOuterDisposeScope()

/// `combineExpertsWith (defaultPath device)`: fused on the CPU, autograd elsewhere.
let combineExperts (experts: ExpertFfn) (expertIndex: Tensor) (weights: Tensor) (kept: Tensor) (x: Tensor) : Tensor =
    combineExpertsWith (defaultPath experts.W1.device) experts expertIndex weights kept x

/// `combineExperts` with a routing record's experts, weights and kept mask. x [T; D] -> [T; D].
let dispatch (experts: ExpertFfn) (routing: Routing) (x: Tensor) : Tensor =
    combineExperts experts routing.Experts routing.Weights routing.Kept x

// ---------------------------------------------------------------- router parameters

/// The learned (or hashed) part of a router, holding what `Routing.route` reads:
/// - LinearRouter: `weight` W_r [D; E], logits = h W_r;
/// - AttentionRouter R: `query` W_q [D; R] and `expert_embeddings` [E; R], logits = (h W_q) m^T / sqrt(R)
///   (`Routing.attentionLogits`);
/// - NoisyTopK: `noise_weight` W_noise [D; E], noise std softplus(h W_noise) (Shazeer et al. 2017 eq. 4),
///   initialised to zero as in that paper;
/// - BiasUpdateRate: buffer `selection_bias` [E] (DeepSeek-V3), changed only by `UpdateBias`, which the MoE
///   layer calls after every training forward with that batch's tokens per expert;
/// - Hash BalancedHash: buffer `hash_table` [V] int64, set by `SetHashTable` / `SetHashTableFromCounts`.
/// Hash routing has no learned parameters. Router math runs in float32 (float64 inputs stay float64).
type RouterModule(name: string, cfg: RouterConfig, modelDim: int) as this =
    inherit Module<Tensor, Routing>(name)
    let cfg = orFail "router config" (RouterConfig.validate cfg) cfg
    do if modelDim < 1 then invalidArg "modelDim" (sprintf "expected modelDim >= 1, got %d" modelDim)
    let isHash = match cfg.Selection with Hash _ -> true | _ -> false
    let e, d = int64 cfg.Experts, int64 modelDim
    // Mutable for Module.to (see ExpertFfn); null where the config has no such parameter.
    let mutable weight = if not isHash && cfg.Scorer = LinearRouter then linearInit d [| d; e |] else null // [D; E]
    let mutable query = // [D; R]
        match cfg.Scorer with
        | AttentionRouter r when not isHash -> linearInit d [| d; int64 r |]
        | _ -> null
    let mutable expert_embeddings = // [E; R], N(0, 1) like nn.Embedding
        match cfg.Scorer with
        | AttentionRouter r when not isHash -> Parameter(torch.randn ([| e; int64 r |]))
        | _ -> null
    let mutable noise_weight = // [D; E]
        if cfg.Selection = NoisyTopK then Parameter(torch.zeros ([| d; e |])) else null
    let mutable selection_bias = // [E] float32
        if cfg.BiasUpdateRate.IsSome then torch.zeros ([| e |]) else null
    let mutable hash_table = // [V] int64, empty until set
        if cfg.Selection = Hash BalancedHash then torch.zeros ([| 0L |], dtype = torch.ScalarType.Int64) else null
    do
        for key, p in [ "weight", weight; "query", query; "expert_embeddings", expert_embeddings; "noise_weight", noise_weight ] do
            if not (isNull p) then this.register_parameter (key, p)
        for key, b in [ "selection_bias", selection_bias; "hash_table", hash_table ] do
            if not (isNull b) then this.register_buffer (key, b)

    let mathDtype (x: Tensor) = if x.dtype = torch.ScalarType.Float64 then torch.ScalarType.Float64 else torch.ScalarType.Float32

    member _.Config = cfg
    member _.ModelDim = modelDim
    /// W_r [D; E] (LinearRouter); null otherwise.
    member _.Weight : Tensor = weight
    /// W_q [D; R] (AttentionRouter); null otherwise.
    member _.Query : Tensor = query
    /// Expert embeddings [E; R] (AttentionRouter); null otherwise.
    member _.ExpertEmbeddings : Tensor = expert_embeddings
    /// W_noise [D; E] (NoisyTopK); null otherwise.
    member _.NoiseWeight : Tensor = noise_weight
    /// The loss-free selection bias [E] (BiasUpdateRate set); null otherwise.
    member _.SelectionBias : Tensor = selection_bias
    /// Token id -> expert [V] int64 (BalancedHash); null otherwise, empty until set.
    member _.HashTable : Tensor = hash_table

    /// Router logits in float32 (float64 for float64 input). h [T; D] -> [T; E]. None for hash routing.
    member _.Logits(h: Tensor) : Tensor =
        expect "h" (sprintf "[T; %d] floating point" modelDim) (fun t -> t.Dimensions = 2L && t.shape[1] = d && isFloating t) h
        if isHash then invalidOp (sprintf "%A routing has no logits" cfg.Selection)
        use scope = torch.NewDisposeScope()
        let dt = mathDtype h
        let hm = h.to_type dt // [T; D]
        let logits =
            if isNull query then hm.mm (weight.to_type dt) // [T; E]
            else attentionLogits (hm.mm (query.to_type dt)) (expert_embeddings.to_type dt) // [T; E]
        logits.MoveToOuterDisposeScope()

    /// Routes a batch: h [T; D] and, for hash routing, tokenIds [T] int64 (None otherwise). Training mode
    /// (`Module.train`) turns on NoisyTopK noise and, for SwitchTop1, multiplicative jitter on the router input
    /// (Fedus et al. 2022, sec. 2.4).
    member this.Route(h: Tensor, tokenIds: Tensor option) : Routing =
        expect "h" (sprintf "[T; %d] floating point" modelDim) (fun t -> t.Dimensions = 2L && t.shape[1] = d && isFloating t) h
        use scope = torch.NewDisposeScope()
        let training = this.training
        let routing =
            if isHash then
                let ids =
                    match tokenIds with
                    | Some ids when not (isNull ids) -> ids
                    | _ -> invalidArg "tokenIds" (sprintf "expected tokenIds [T] int64 for %A routing (hash routers read token ids, not hidden states), got None" cfg.Selection)
                if not (isNull hash_table) && hash_table.NumberOfElements = 0L then
                    invalidOp "BalancedHash routing needs its token id -> expert table: call SetHashTableFromCounts (corpus token counts) or SetHashTable first"
                route cfg { RouterInputs.OfTokenIds ids with HashTable = Option.ofObj hash_table; Training = training }
            else
                if tokenIds.IsSome then
                    invalidArg "tokenIds" (sprintf "%A routing reads hidden states, not token ids; pass None" cfg.Selection)
                let dt = mathDtype h
                let hm = if training && cfg.Selection = SwitchTop1 && cfg.Jitter > 0.0 then jitter cfg None (h.to_type dt) else h.to_type dt // [T; D]
                let noiseStd = if isNull noise_weight then None else Some(Tensors.softplus (hm.mm (noise_weight.to_type dt))) // [T; E]
                { RouterInputs.OfLogits (this.Logits hm) with
                    NoiseStd = noiseStd
                    Bias = Option.ofObj selection_bias
                    Training = training }
                |> route cfg
        { routing with
            Experts = routing.Experts.MoveToOuterDisposeScope()
            Weights = routing.Weights.MoveToOuterDisposeScope()
            Kept = routing.Kept.MoveToOuterDisposeScope()
            Probs = routing.Probs |> Option.map (fun t -> t.MoveToOuterDisposeScope())
            Logits = routing.Logits |> Option.map (fun t -> t.MoveToOuterDisposeScope())
            Stats =
                { TokensPerExpert = routing.Stats.TokensPerExpert.MoveToOuterDisposeScope()
                  DroppedFraction = routing.Stats.DroppedFraction.MoveToOuterDisposeScope()
                  RouterEntropy = routing.Stats.RouterEntropy.MoveToOuterDisposeScope() }
            Gates = routing.Gates.MoveToOuterDisposeScope()
            LoadProbability = routing.LoadProbability |> Option.map (fun t -> t.MoveToOuterDisposeScope()) }

    /// Routes hidden states with a learned router (hash routers need `Route(h, Some tokenIds)`). h [T; D].
    override this.forward(h: Tensor) : Routing = this.Route(h, None)

    /// DeepSeek-V3 loss-free balancing step: selection_bias <- `Routing.updateBias` rate bias tokensPerExpert,
    /// in place. tokensPerExpert [E] (counts or fractions).
    member _.UpdateBias(tokensPerExpert: Tensor) : unit =
        match cfg.BiasUpdateRate with
        | Some rate when not (isNull selection_bias) ->
            use _ = torch.no_grad ()
            use updated = updateBias rate selection_bias (tokensPerExpert.``to`` selection_bias.device)
            selection_bias.copy_ updated |> ignore
        | _ -> invalidOp "this router has no loss-free bias (RouterConfig.BiasUpdateRate = None)"

    /// Sets the BalancedHash table: table[id] = expert, ids 0 .. V-1 (from `Routing.balancedHashTable`).
    member _.SetHashTable(table: int64[]) : unit =
        if isNull hash_table then invalidOp (sprintf "only BalancedHash routing has a hash table; this router is %A" cfg.Selection)
        if isNull table || table.Length = 0 then invalidArg "table" "expected table [V] with V >= 1 token ids, got none"
        match Array.tryFindIndex (fun x -> x < 0L || x >= e) table with
        | Some id -> invalidArg "table" (sprintf "expected experts in 0..%d, got %d for token id %d" (e - 1L) table[id] id)
        | None -> ()
        use _ = torch.no_grad ()
        // set_ swaps in the new storage and keeps the registered buffer object, so state_dict sees the new table
        use values = torch.tensor(table).``to`` hash_table.device // [V]
        hash_table.set_ values |> ignore

    /// Sets the BalancedHash table from corpus token counts (counts[id] = occurrences of token id), binning
    /// ids by frequency so each expert receives about the same number of tokens (Roller et al. 2021).
    member this.SetHashTableFromCounts(counts: int64[]) : unit =
        this.SetHashTable(balancedHashTable cfg.Experts counts)

    /// Sets the BalancedHash table from a corpus of token ids (any shape, int64, each in 0 .. vocab-1):
    /// counts the ids, then `SetHashTableFromCounts`.
    member this.SetHashTableFromCorpus(tokenIds: Tensor, vocab: int) : unit =
        if vocab < 1 then invalidArg "vocab" (sprintf "expected vocab >= 1, got %d" vocab)
        expect "tokenIds" (sprintf "int64 ids in 0..%d" (vocab - 1)) (fun t -> t.dtype = torch.ScalarType.Int64 && t.NumberOfElements > 0L) tokenIds
        use flat = tokenIds.reshape(-1L).cpu ()
        let lo, hi = (flat.min ()).item<int64> (), (flat.max ()).item<int64> ()
        if lo < 0L || hi >= int64 vocab then
            invalidArg "tokenIds" (sprintf "expected token ids in 0..%d (vocab - 1), got ids from %d to %d" (vocab - 1) lo hi)
        use counts = torch.bincount (flat, minlength = int64 vocab) // [V]
        this.SetHashTableFromCounts(toInt64s counts)

// ---------------------------------------------------------------- the MoE layer

/// Moves a report's tensors to the enclosing dispose scope.
let private moveReportOut (report: MoeReport) : MoeReport =
    let out (t: Tensor) = t.MoveToOuterDisposeScope()
    { Aux = { SwitchAux = out report.Aux.SwitchAux; Importance = out report.Aux.Importance; Load = out report.Aux.Load; ZLoss = out report.Aux.ZLoss }
      Stats = { TokensPerExpert = out report.Stats.TokensPerExpert; DroppedFraction = out report.Stats.DroppedFraction; RouterEntropy = out report.Stats.RouterEntropy } }

/// A sparse MoE layer replacing a Transformer FFN (Shazeer et al. 2017; Switch, GShard, Mixtral): route each
/// token to experts (`RouterModule`, `Routing.route`), run the experts on their tokens by sort-and-split
/// (`dispatch`), combine with the routing weights, and add the always-on shared experts (DeepSeekMoE). S
/// shared experts of hidden size H sum to one FFN of hidden size S*H (the sum over experts is the sum over
/// hidden units of W2 act(W1 x)), so they are held as one `DenseFfn`.
/// x [.., D] -> { Output [.., D]; Moe = Some { Aux = unweighted `Routing.auxLosses`; Stats } }.
/// Routing runs in float32, experts in x's dtype (float32, bfloat16, float64). In training mode with
/// `BiasUpdateRate` set, every forward updates the loss-free bias from that batch's tokens per expert.
/// Submodules: `router`, `experts` and, with SharedExperts > 0, `shared`.
type MoeLayer(name: string, cfg: MoeConfig) as this =
    inherit Module<Tensor, FfnResult>(name)
    let cfg = orFail "MoE config" (MoeConfig.validate cfg) cfg
    let router = new RouterModule("router", cfg.Router, cfg.ModelDim)
    let experts = new ExpertFfn("experts", cfg.Router.Experts, cfg.ModelDim, cfg.ExpertHidden, cfg.Activation)
    let shared =
        if cfg.SharedExperts > 0 then new DenseFfn("shared", cfg.ModelDim, cfg.SharedExperts * cfg.ExpertHidden, cfg.Activation)
        else null
    do
        this.register_module ("router", router)
        this.register_module ("experts", experts)
        if not (isNull shared) then this.register_module ("shared", shared)

    member _.Config = cfg
    member _.Router = router
    member _.Experts = experts
    /// The shared experts as one FFN of hidden size SharedExperts * ExpertHidden; null when SharedExperts = 0.
    member _.Shared = shared

    /// Routes, dispatches and combines; `groups` = Some capacity limits each expert to `capacity` assignments
    /// per row of x [G; S; D] (`Routing.limitPerGroup`). Returns the result and, when `keepRouting`, the
    /// routing (moved out of this call's scope; otherwise freed with it).
    member private this.Run(x: Tensor, tokenIds: Tensor, groupCapacity: int option, keepRouting: bool) : FfnResult * Routing option =
        let d = int64 cfg.ModelDim
        expect "x" (sprintf "[..; %d] floating point (D = ModelDim)" d) (fun t -> t.Dimensions >= 1L && t.shape[t.shape.Length - 1] = d && isFloating t) x
        expectDevice "x" experts.W1.device x
        let shape = x.shape
        let tokens = x.NumberOfElements / d
        let ids =
            if isNull tokenIds then None
            else
                expect "tokenIds" (sprintf "int64 with %d entries (one per token of x %s)" tokens (describe x))
                    (fun t -> t.dtype = torch.ScalarType.Int64 && t.NumberOfElements = tokens) tokenIds
                Some(tokenIds.reshape(-1L).``to`` x.device)
        use scope = torch.NewDisposeScope()
        let h = x.reshape (-1L, d) // [T; D]
        let routing = router.Route(h, ids)
        let routing =
            match groupCapacity with
            | Some c -> limitPerGroup cfg.Router (int shape[shape.Length - 2]) c routing
            | None -> routing
        let routed = dispatch experts routing h // [T; D]
        let y = if isNull shared then routed else plus routed (shared.forward h).Output // [T; D]
        if this.training && cfg.Router.BiasUpdateRate.IsSome then router.UpdateBias routing.Stats.TokensPerExpert
        let report = { Aux = auxLosses routing; Stats = routing.Stats }
        let result = { Output = y.reshape(shape).MoveToOuterDisposeScope(); Moe = Some(moveReportOut report) }
        let out (t: Tensor) = t.MoveToOuterDisposeScope()
        // the statistics left with the report; each tensor is moved out once
        result,
        (if keepRouting then
             Some { routing with
                      Experts = out routing.Experts; Weights = out routing.Weights; Kept = out routing.Kept
                      Probs = Option.map out routing.Probs; Logits = Option.map out routing.Logits; Gates = out routing.Gates
                      LoadProbability = Option.map out routing.LoadProbability }
         else None)

    /// The layer for hash routers: x [.., D] with token ids of the same leading shape [..] int64.
    /// Learned routers take tokenIds = null.
    member this.forward(x: Tensor, tokenIds: Tensor) : FfnResult = this.Run(x, tokenIds, None, false) |> fst

    /// The layer returning its routing too (router logits, kept assignments), from which a checkpoint's own
    /// losses can be computed. With `groupCapacity` = Some c, the capacity of Switch Transformers (Fedus et al.
    /// 2022; transformers' `SwitchTransformersTop1Router`): x [G; S; D] is G groups (the rows of a batch) of S
    /// tokens, and each expert keeps at most c assignments per group, first come in token order
    /// (`Routing.limitPerGroup`), on top of the router's own capacity; a dropped token's MoE output is zero.
    /// With None, exactly `forward`. tokenIds like x's leading shape for hash routers, null otherwise.
    member this.ForwardWithRouting(x: Tensor, tokenIds: Tensor, groupCapacity: int option) : FfnResult * Routing =
        match groupCapacity with
        | Some c ->
            expect "x" (sprintf "[G; S; %d] floating point (groups of tokens)" cfg.ModelDim) (fun t -> t.Dimensions = 3L) x
            if c < 0 then invalidArg "groupCapacity" (sprintf "expected groupCapacity >= 0, got %d" c)
        | None -> ()
        match this.Run(x, tokenIds, groupCapacity, true) with
        | result, Some routing -> result, routing
        | _, None -> failwith "unreachable: the routing is kept when asked for"

    /// The layer for learned routers. x [.., D] -> [.., D].
    override this.forward(x: Tensor) : FfnResult = this.forward (x, null)

// ---------------------------------------------------------------- C# facade

/// The balancing losses weighted and summed: the one place coefficients meet the unweighted losses.
let weightedAux (weights: LossWeights) (aux: AuxLosses) : Tensor =
    [ mulScalar weights.SwitchAux aux.SwitchAux; mulScalar weights.Importance aux.Importance
      mulScalar weights.Load aux.Load; mulScalar weights.ZLoss aux.ZLoss ]
    |> List.reduce plus

/// What `MoeApi.Forward` returns: the output and the unweighted aux losses (differentiable tensors), and the
/// routing statistics as plain numbers.
type MoeForwardResult =
    { /// [.., D], like the input.
      Output: Tensor
      Aux: AuxLosses
      /// Fraction of kept assignments that went to each expert. // [E]
      TokensPerExpert: float32[]
      /// Fraction of proposed assignments dropped by capacity.
      DroppedFraction: float
      /// Mean router entropy in nats.
      RouterEntropy: float }

    /// The aux losses weighted by `weights` and summed (a differentiable scalar).
    member r.WeightedAux(weights: LossWeights) : Tensor = weightedAux weights r.Aux

/// The MoE layer from C#: methods with optional arguments instead of F# records and curried functions.
[<AbstractClass; Sealed>]
type MoeApi =
    /// A layer from a full config.
    static member CreateLayer(cfg: MoeConfig) : MoeLayer = new MoeLayer("moe", cfg)

    /// A token-choice top-k layer (softmax then top-k, renormalised, linear router). activation: "relu", "gelu"
    /// or "swiglu"; capacityFactor <= 0 means dropless; lossFreeBiasRate > 0 turns on DeepSeek-V3 balancing.
    static member CreateLayer(modelDim: int, expertHidden: int, experts: int, k: int,
                              [<Optional; DefaultParameterValue("gelu")>] activation: string,
                              [<Optional; DefaultParameterValue(0)>] sharedExperts: int,
                              [<Optional; DefaultParameterValue(0.0)>] capacityFactor: float,
                              [<Optional; DefaultParameterValue(0.0)>] lossFreeBiasRate: float) : MoeLayer =
        let act =
            match (if isNull activation then "" else activation.Trim().ToLowerInvariant()) with
            | "relu" -> ReLU
            | "gelu" -> GELU
            | "swiglu" -> SwiGLU
            | other -> invalidArg "activation" (sprintf "expected activation relu|gelu|swiglu, got '%s'" other)
        MoeApi.CreateLayer
            { MoeConfig.defaults with
                ModelDim = modelDim
                ExpertHidden = expertHidden
                Activation = act
                SharedExperts = sharedExperts
                Router =
                    { RouterConfig.defaults with
                        Experts = experts
                        K = k
                        Capacity = if capacityFactor > 0.0 then Factor capacityFactor else Dropless
                        BiasUpdateRate = if lossFreeBiasRate > 0.0 then Some lossFreeBiasRate else None } }

    /// Runs the layer: x [.., D]; tokenIds (hash routers only) int64 with one id per token.
    static member Forward(layer: MoeLayer, x: Tensor, [<Optional; DefaultParameterValue(null: Tensor)>] tokenIds: Tensor) : MoeForwardResult =
        let result = layer.forward (x, tokenIds)
        match result.Moe with
        | Some report ->
            { Output = result.Output
              Aux = report.Aux
              TokensPerExpert = toFloats report.Stats.TokensPerExpert
              DroppedFraction = scalar report.Stats.DroppedFraction
              RouterEntropy = scalar report.Stats.RouterEntropy }
        | None -> invalidOp "an MoE layer always reports its routing"

    /// The aux losses weighted by `weights` and summed (a differentiable scalar).
    static member WeightedAux(aux: AuxLosses, weights: LossWeights) : Tensor = weightedAux weights aux

    /// The aux losses weighted by `LossWeights.defaults` and summed.
    static member WeightedAux(aux: AuxLosses) : Tensor = weightedAux LossWeights.defaults aux

// ---------------------------------------------------------------- LoRA experts

/// The kept (token, slot) assignments of a routing, grouped by expert (the sort of `combineExperts`).
type ExpertOrder =
    { /// Slot ids t * K + j of the kept assignments, grouped by expert, tokens in order within each. // [N] int64
      Slot: Tensor
      /// The token of each kept assignment. // [N] int64
      Token: Tensor
      /// Kept assignments per expert, summing to N. // [E]
      Counts: int64[] }

/// Groups the kept assignments of expertIndex [T; K] int64 (values in 0..E-1) and kept [T; K] bool by expert:
/// dropped slots get the key E, a stable sort puts each expert's slots together in token order, and the
/// first N = (kept count) entries are the ones to run. The tensors are made in the caller's dispose scope.
let sortByExpert (experts: int) (expertIndex: Tensor) (kept: Tensor) : ExpertOrder =
    expect "expertIndex" "[T; K] int64" (fun i -> i.Dimensions = 2L && i.dtype = torch.ScalarType.Int64) expertIndex
    expect "kept" (sprintf "[T; K] = %A bool" expertIndex.shape) (fun m -> m.dtype = torch.ScalarType.Bool && m.shape = expertIndex.shape) kept
    let e = int64 experts
    let flat = expertIndex.reshape (-1L) // [T*K]
    if flat.NumberOfElements > 0L then
        use lo = flat.min ()
        use hi = flat.max ()
        if lo.item<int64> () < 0L || hi.item<int64> () >= e then
            invalidArg "expertIndex" (sprintf "expected expertIndex values in 0..%d (E - 1), got values from %d to %d" (e - 1L) (lo.item<int64> ()) (hi.item<int64> ()))
    let key = withInt64Scalar e (fun dropped -> flat.masked_fill (kept.reshape(-1L).logical_not (), dropped)) // [T*K]
    let struct (_, order) = key.sort (0L, false, true) // [T*K]
    let counts = (toInt64s (torch.bincount (key, minlength = e + 1L)))[0 .. experts - 1] // [E]
    let slot = order.narrow (0L, 0L, Array.sum counts) // [N]
    { Slot = slot
      Token = withInt64Scalar expertIndex.shape[1] (fun k -> slot.div (k, rounding_mode = torch.RoundingMode.floor)) // [N]
      Counts = counts }

/// E experts that share one base FFN and differ by low-rank adapters (Hu et al. 2021, "LoRA", eq. 3):
/// expert e computes act(x (W1 + s A1_e B1_e)) (W2 + s A2_e B2_e) with s = alpha / r, A1_e [D; r],
/// B1_e [r; H], A2_e [H; r], B2_e [r; D] (SwiGLU: the value projection W3 gets adapters A3_e, B3_e too).
/// The B's start at zero, so every expert starts equal to the base FFN; the A's are initialised like
/// nn.Linear, as in the LoRA reference code. With `FreezeBase` the base weights have requires_grad = false.
/// Parameters: `w1` [D; H], `w2` [H; D], (`w3` [D; H]), `a1` [E; D; r], `b1` [E; r; H], `a2` [E; H; r],
/// `b2` [E; r; D], (`a3` [E; D; r], `b3` [E; r; H]).
type LoraExpertFfn(name: string, experts: int, modelDim: int, hidden: int, act: Activation, lora: LoraConfig) as this =
    inherit torch.nn.Module(name)
    do
        if experts < 1 || modelDim < 1 || hidden < 1 then
            invalidArg "experts" (sprintf "expected experts, modelDim and hidden >= 1, got %d, %d and %d" experts modelDim hidden)
    let lora = orFail "LoRA config" (LoraConfig.validate lora) lora
    let e, d, h, r = int64 experts, int64 modelDim, int64 hidden, int64 lora.Rank
    let swiglu = act = SwiGLU
    let baseWeight (fanIn: int64) (shape: int64[]) =
        let p = linearInit fanIn shape
        if lora.FreezeBase then p.requires_grad <- false
        p
    let zeros (shape: int64[]) = Parameter(torch.zeros shape)
    // Mutable for Module.to (see ExpertFfn).
    let mutable w1 = baseWeight d [| d; h |] // [D; H]
    let mutable w2 = baseWeight h [| h; d |] // [H; D]
    let mutable w3 = if swiglu then baseWeight d [| d; h |] else null // [D; H]
    let mutable a1 = linearInit d [| e; d; r |] // [E; D; r]
    let mutable b1 = zeros [| e; r; h |] // [E; r; H]
    let mutable a2 = linearInit h [| e; h; r |] // [E; H; r]
    let mutable b2 = zeros [| e; r; d |] // [E; r; D]
    let mutable a3 = if swiglu then linearInit d [| e; d; r |] else null // [E; D; r]
    let mutable b3 = if swiglu then zeros [| e; r; h |] else null // [E; r; H]
    do
        for key, p in [ "w1", w1; "w2", w2; "w3", w3; "a1", a1; "b1", b1; "a2", a2; "b2", b2; "a3", a3; "b3", b3 ] do
            if not (isNull p) then this.register_parameter (key, p)

    member _.Experts = experts
    member _.ModelDim = modelDim
    member _.Hidden = hidden
    member _.Activation = act
    member _.Lora = lora
    /// Shared base weights. // [D; H], [H; D], [D; H] (W3 null unless SwiGLU)
    member _.W1 : Tensor = w1
    member _.W2 : Tensor = w2
    member _.W3 : Tensor = w3
    /// Adapters of the first projection. // [E; D; r], [E; r; H]
    member _.A1 : Tensor = a1
    member _.B1 : Tensor = b1
    /// Adapters of the output projection. // [E; H; r], [E; r; D]
    member _.A2 : Tensor = a2
    member _.B2 : Tensor = b2
    /// Adapters of the SwiGLU value projection; null otherwise. // [E; D; r], [E; r; H]
    member _.A3 : Tensor = a3
    member _.B3 : Tensor = b3
    /// Parameters of the shared base FFN.
    member _.BaseParameters : int64 = [ w1; w2; w3 ] |> List.sumBy (fun p -> if isNull p then 0L else p.NumberOfElements)
    /// Adapter parameters of one expert: r (D + H) per adapted projection.
    member _.AdapterParametersPerExpert : int64 = (if swiglu then 3L else 2L) * r * (d + h)

    /// Runs the kept assignments: xs [T; D] the tokens, token [N] int64 the token of each assignment, grouped
    /// by expert with counts[e] assignments for expert e (`sortByExpert`). Returns [N; D] in that order.
    /// The base first projection runs once per token (not per assignment) and is gathered; the adapters run
    /// per expert on its contiguous rows, x A_e first, so they cost O(N r (D + H)).
    member _.Forward(xs: Tensor, token: Tensor, counts: int64[]) : Tensor =
        expect "xs" (sprintf "[T; %d] floating point" modelDim) (fun t -> t.Dimensions = 2L && t.shape[1] = d && isFloating t) xs
        expectDevice "xs" w1.device xs
        if isNull counts || counts.Length <> experts || Array.exists (fun c -> c < 0L) counts then
            invalidArg "counts" (sprintf "expected counts [E] >= 0 with E = %d, got %A" experts counts)
        expect "token" (sprintf "[N] int64 with N = %d (the sum of counts)" (Array.sum counts))
            (fun t -> t.Dimensions = 1L && t.dtype = torch.ScalarType.Int64 && t.shape[0] = Array.sum counts) token
        use scope = torch.NewDisposeScope()
        let dt = xs.dtype
        let cast (w: Tensor) = if w.dtype = dt then w else w.to_type dt
        let n = Array.sum counts
        let y =
            if n = 0L then torch.zeros ([| 0L; d |], dtype = dt, device = xs.device)
            else
                use s = (LoraConfig.scale lora).ToScalar() // held until the native calls return (see Tensors.withScalar)
                let present = [| for i in 0 .. experts - 1 do if counts[i] > 0L then i |]
                // sum over experts of (rows_e A_e) B_e, stacked in the rows' order. chunks: E x [N_e; in]
                let lowRank (a: Tensor) (b: Tensor) (chunks: Tensor[]) =
                    let az, bz = (cast a).unbind 0L, (cast b).unbind 0L
                    torch.cat ([| for i in present -> chunks[i].mm(az[i]).mm (bz[i]) |], 0L) // [N; out]
                let perToken (w: Tensor) = xs.mm(cast w).index_select (0L, token) // [N; H]
                let rows = xs.index_select(0L, token).split (counts, 0L) // E x [N_e; D]
                let pre = plus (perToken w1) (lowRank a1 b1 rows * s) // [N; H]
                let hid = activate act pre // [N; H]
                let hid = if swiglu then hid * plus (perToken w3) (lowRank a3 b3 rows * s) else hid // [N; H]
                plus (hid.mm (cast w2)) (lowRank a2 b2 (hid.split (counts, 0L)) * s) // [N; D]
        y.MoveToOuterDisposeScope()

/// An MoE layer whose experts are LoRA adapters on one shared FFN (`LoraExpertFfn`; Hu et al. 2021 applied
/// per expert as in mixture-of-LoRA-experts models): routing as `MoeLayer` (`RouterModule`, `Routing.route`),
/// sort-by-expert dispatch (`sortByExpert`), combine y_t = sum over kept slots j of w_tj E_{e_tj}(x_t)
/// (Shazeer et al. 2017 eq. 1), plus the shared experts when SharedExperts > 0. Starts equal to the base FFN
/// mixed by weights that sum to 1. x [.., D] -> { Output [.., D]; Moe = Some report }.
/// Submodules: `router`, `experts` and, with SharedExperts > 0, `shared`.
type LoraMoeLayer(name: string, cfg: MoeConfig, lora: LoraConfig) as this =
    inherit Module<Tensor, FfnResult>(name)
    let cfg = orFail "MoE config" (MoeConfig.validate cfg) cfg
    let router = new RouterModule("router", cfg.Router, cfg.ModelDim)
    let experts = new LoraExpertFfn("experts", cfg.Router.Experts, cfg.ModelDim, cfg.ExpertHidden, cfg.Activation, lora)
    let shared = if cfg.SharedExperts > 0 then new DenseFfn("shared", cfg.ModelDim, cfg.SharedExperts * cfg.ExpertHidden, cfg.Activation) else null
    do
        this.register_module ("router", router)
        this.register_module ("experts", experts)
        if not (isNull shared) then this.register_module ("shared", shared)

    member _.Config = cfg
    member _.Lora = experts.Lora
    member _.Router = router
    member _.Experts = experts
    /// The shared experts as one FFN; null when SharedExperts = 0.
    member _.Shared = shared

    /// The layer for hash routers: x [.., D] with token ids [..] int64; learned routers take tokenIds = null.
    member this.forward(x: Tensor, tokenIds: Tensor) : FfnResult =
        let d = int64 cfg.ModelDim
        expect "x" (sprintf "[..; %d] floating point (D = ModelDim)" d) (fun t -> t.Dimensions >= 1L && t.shape[t.shape.Length - 1] = d && isFloating t) x
        let tokens = x.NumberOfElements / d
        if not (isNull tokenIds) then
            expect "tokenIds" (sprintf "int64 with %d entries (one per token of x)" tokens) (fun t -> t.dtype = torch.ScalarType.Int64 && t.NumberOfElements = tokens) tokenIds
        use scope = torch.NewDisposeScope()
        let h = x.reshape (-1L, d) // [T; D]
        let routing = router.Route(h, (if isNull tokenIds then None else Some(tokenIds.reshape(-1L).``to`` x.device)))
        let order = sortByExpert cfg.Router.Experts routing.Experts routing.Kept
        let outputs = experts.Forward(h, order.Token, order.Counts) // [N; D]
        let w = routing.Weights.reshape(-1L).index_select(0L, order.Slot).to_type(h.dtype).unsqueeze 1L // [N; 1]
        let routed = withScalar 1.0 (fun one -> torch.zeros_like(h).index_add (0L, order.Token, outputs * w, one)) // [T; D]
        let y = if isNull shared then routed else plus routed (shared.forward h).Output // [T; D]
        if this.training && cfg.Router.BiasUpdateRate.IsSome then router.UpdateBias routing.Stats.TokensPerExpert
        { Output = y.reshape(x.shape).MoveToOuterDisposeScope()
          Moe = Some(moveReportOut { Aux = auxLosses routing; Stats = routing.Stats }) }

    /// The layer for learned routers. x [.., D] -> [.., D].
    override this.forward(x: Tensor) : FfnResult = this.forward (x, null)
