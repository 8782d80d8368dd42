/// GPT-2 with some MLPs replaced by mixture-of-experts layers, built from a dense `Gpt2.Gpt2Model` by
/// Drop-Upcycling (Nakamura et al. 2025, "Drop-Upcycling: Training Sparse Mixture of Experts with Partial
/// Re-initialization", sec. 3): each expert starts as a copy of the dense MLP (sparse upcycling, Komatsuzaki
/// et al. 2023), then a fraction r of its intermediate units, sampled independently per expert, is
/// re-initialised from a normal distribution with the mean and standard deviation of the original matrix: for
/// a unit j in the sampled set S, column j of c_fc (its input weights) and row j of c_proj (its output weights)
/// are redrawn, each from its own matrix's statistics. r = 0 is plain sparse upcycling. GPT-2's MLP also has
/// biases, which the paper's (Llama-style) FFN lacks: c_fc's bias entries of the units in S are redrawn from
/// that bias vector's own mean and standard deviation, and c_proj's bias (one entry per output, not per unit)
/// is copied. Routers are the toolkit's `RouterModule` (so routing, jitter and balancing losses are the
/// toolkit's). Also GPT2ForSequenceClassification (a linear `score` head on the last non-pad token).
/// Parameter names follow Hugging Face's GPT-2 where the layer is dense (`h.0.mlp.c_fc.weight`); an MoE
/// layer holds `h.1.mlp.router.weight` [D; E], `h.1.mlp.experts.c_fc.weight` [E; D; H] and so on.
/// Axes: B batch, S sequence, D model width, H MLP hidden width (4 D), E experts, T = B S tokens,
/// N kept (token, expert) assignments, V vocabulary, L labels.
module Moe.Gpt2Moe

open System
open System.IO
open System.Text.Json
open TorchSharp
open TorchSharp.Modules
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Gpt2

type private Parameter = Modules.Parameter

// ---------------------------------------------------------------- configuration

/// How a dense GPT-2 becomes an MoE GPT-2.
type DropUpcycleConfig =
    { /// The router of every MoE layer; its `Experts` is E. Default: Switch top-1 (Fedus et al. 2022) over 8
      /// experts with multiplicative jitter 0.01 on the router input in training, dropless.
      Router: RouterConfig
      /// r, the fraction of each expert's intermediate units re-initialised (Nakamura et al. 2025 use 0.5 for
      /// their headline models; the study asked for 0.15); 0 = plain sparse upcycling.
      DropRatio: float
      /// Block i's MLP becomes an MoE layer when i % Every = Every - 1: 2 = every other block starting with
      /// the second (blocks 1, 3, 5, ..., as Switch Transformers' sparse step), 1 = every block.
      Every: int
      /// Seed of the unit sampling and the re-initialisation draws.
      Seed: int }

module DropUpcycleConfig =
    /// 8 experts, Switch top-1 with jitter 0.01, r = 0.15, every other MLP.
    let defaults =
        { Router = { RouterConfig.defaults with Experts = 8; K = 1; Selection = SwitchTop1; Capacity = Dropless; Jitter = 0.01 }
          DropRatio = 0.15
          Every = 2
          Seed = 0 }

    let validate (cfg: DropUpcycleConfig) : string list =
        [ yield! RouterConfig.validate cfg.Router
          if not (cfg.DropRatio >= 0.0 && cfg.DropRatio <= 1.0) then sprintf "DropRatio must be in [0, 1], got %g" cfg.DropRatio
          if cfg.Every < 1 then sprintf "Every must be >= 1, got %d" cfg.Every ]

    /// The blocks (0-based) whose MLP becomes an MoE layer in a model of `layers` blocks.
    let moeBlocks (cfg: DropUpcycleConfig) (layers: int) : int list =
        [ for i in 0 .. layers - 1 do if i % cfg.Every = cfg.Every - 1 then yield i ]

/// Units re-initialised per expert: round(r x H), halves away from zero.
let droppedUnits (ratio: float) (hidden: int) : int =
    int (Math.Round(ratio * float hidden, MidpointRounding.AwayFromZero))

// ---------------------------------------------------------------- experts

/// E stacked Conv1D projections: weight [E; in; out], bias [E; out]; expert e maps x to x W[e] + b[e].
type ExpertConv1D(name: string, experts: int, inputs: int, outputs: int) as this =
    inherit torch.nn.Module(name)
    let mutable weight = new Parameter(torch.randn [| int64 experts; int64 inputs; int64 outputs |] |> mulScalar_ InitializerRange) // [E; in; out]
    let mutable bias = new Parameter(torch.zeros [| int64 experts; int64 outputs |]) // [E; out]
    do
        this.register_parameter ("weight", weight)
        this.register_parameter ("bias", bias)
    member _.Weight : Tensor = weight
    member _.Bias : Tensor = bias

/// GPT-2 MLPs as experts: c_fc [E; D; H] + [E; H], gelu_new, c_proj [E; H; D] + [E; D].
type Gpt2Experts(name: string, experts: int, embd: int, hidden: int) as this =
    inherit torch.nn.Module(name)
    let c_fc = new ExpertConv1D("c_fc", experts, embd, hidden)
    let c_proj = new ExpertConv1D("c_proj", experts, hidden, embd)
    do this.RegisterComponents()
    member _.Experts = experts
    member _.CFc = c_fc
    member _.CProj = c_proj

    /// Runs expert e on its contiguous block of counts[e] rows of xs [N; D]; returns [N; D] in the same order.
    member _.Run(xs: Tensor, counts: int64[]) : Tensor =
        use scope = torch.NewDisposeScope()
        let chunks = xs.split (counts, 0L) // E x [N_e; D]
        let outputs =
            [| for e in 0 .. experts - 1 do
                 if counts[e] > 0L then
                     let a = geluNew (torch.addmm (c_fc.Bias[e], chunks[e], c_fc.Weight[e], 1.0f, 1.0f)) // [N_e; H]
                     torch.addmm (c_proj.Bias[e], a, c_proj.Weight[e], 1.0f, 1.0f) |] // [N_e; D]
        let y = if outputs.Length = 0 then torch.zeros ([| 0L; int64 embd |], dtype = xs.dtype, device = xs.device) else torch.cat (outputs, 0L)
        y.MoveToOuterDisposeScope()

/// One MoE MLP: the toolkit's router picks experts per token, the experts run on their tokens (sort by
/// expert, one matmul pair per expert), outputs are combined with the routing weights:
/// y_t = sum over kept slots j of w_tj E_{e_tj}(x_t) (Shazeer et al. 2017 eq. 1). Submodules `router`, `experts`.
type Gpt2MoeMlp(name: string, embd: int, router: RouterConfig) as this =
    inherit torch.nn.Module(name)
    let hidden = 4 * embd
    let router = new RouterModule("router", router, embd)
    let experts = new Gpt2Experts("experts", router.Config.Experts, embd, hidden)
    do this.RegisterComponents()
    member _.Router = router
    member _.Experts = experts
    member _.Hidden = hidden

    /// x [B; S; D] -> output [B; S; D] and the routing of its T = B S tokens (in this call's caller's scope).
    member _.Forward(x: Tensor) : Tensor * Routing =
        let d = int64 embd
        expect "x" (sprintf "[..; %d] floating point" d) (fun t -> t.Dimensions >= 1L && t.shape[t.shape.Length - 1] = d && isFloating t) x
        let h = x.reshape (-1L, d) // [T; D]
        let routing = router.Route(h, None)
        use scope = torch.NewDisposeScope()
        let order = sortByExpert experts.Experts routing.Experts routing.Kept
        let w = routing.Weights.reshape(-1L).index_select(0L, order.Slot).to_type x.dtype // [N]
        let ys = experts.Run(h.index_select (0L, order.Token), order.Counts) // [N; D]
        let y = withScalar 1.0 (fun one -> torch.zeros_like(h).index_add (0L, order.Token, ys * w.unsqueeze 1L, one)) // [T; D]
        y.reshape(x.shape).MoveToOuterDisposeScope(), routing

// ---------------------------------------------------------------- the model

/// The most negative float32: masked attention scores, as transformers uses (torch.finfo(dtype).min); finite,
/// so a query whose keys are all masked (a left-padding position) gets a uniform row instead of NaN.
let private maskValue = float Single.MinValue

/// GPT-2's causal self-attention (`Gpt2.Attention`'s weights) with an optional key mask keep [B; S] (1 = real
/// token, 0 = padding): masked keys get the score float32-min, as transformers' attention_mask does.
let attend (attn: Attention) (heads: int) (keep: Tensor option) (x: Tensor) : Tensor =
    use scope = torch.NewDisposeScope()
    let b, s, embd = x.shape[0], x.shape[1], x.shape[2]
    let dh = embd / int64 heads
    let qkv = attn.CAttn.forward x // [B; S; 3D]
    let split (t: Tensor) = t.reshape(b, s, int64 heads, dh).transpose (1L, 2L) // [B; H; S; Dh]
    let parts = qkv.chunk (3L, 2L)
    let q, k, v = split parts[0], split parts[1], split parts[2]
    let scores = q.matmul (k.transpose (-2L, -1L)) |> divScalar (Math.Sqrt(float dh)) // [B; H; S; S]
    let future = torch.ones([| s; s |], dtype = torch.ScalarType.Bool, device = x.device).triu(1L).expand (b, 1L, s, s) // [B; 1; S; S]
    let masked =
        match keep with
        | None -> future
        | Some m -> future.logical_or (m.eq(torch.zeros_like m).reshape (b, 1L, 1L, s)) // [B; 1; S; S]
    let scores = withScalar maskValue (fun low -> scores.masked_fill (masked, low))
    let y = scores.softmax(-1L).matmul(v).transpose(1L, 2L).reshape (b, s, embd) // [B; S; D]
    (attn.CProj.forward y).MoveToOuterDisposeScope()

/// A pre-LN GPT-2 block whose MLP is dense (`Gpt2.Mlp`) or an MoE layer (`Gpt2MoeMlp`), both named `mlp`.
type Gpt2MoeBlock(name: string, cfg: Gpt2Config, router: RouterConfig option) as this =
    inherit torch.nn.Module(name)
    let ln_1 = torch.nn.LayerNorm(int64 cfg.Embd, cfg.LayerNormEpsilon)
    let attn = new Attention("attn", cfg.Embd, cfg.Heads)
    let ln_2 = torch.nn.LayerNorm(int64 cfg.Embd, cfg.LayerNormEpsilon)
    let dense = match router with None -> Some(new Mlp("mlp", cfg.Embd)) | Some _ -> None
    let moe = match router with Some r -> Some(new Gpt2MoeMlp("mlp", cfg.Embd, r)) | None -> None
    do
        this.register_module ("ln_1", ln_1)
        this.register_module ("attn", attn)
        this.register_module ("ln_2", ln_2)
        match dense, moe with
        | Some m, _ -> this.register_module ("mlp", m)
        | _, Some m -> this.register_module ("mlp", m)
        | None, None -> ()
    member _.Attn = attn
    /// The dense MLP; None in an MoE block.
    member _.DenseMlp : Mlp option = dense
    /// The MoE MLP; fails in a dense block.
    member _.MoeMlp : Gpt2MoeMlp = match moe with Some m -> m | None -> invalidOp (sprintf "block %s has a dense MLP, not an MoE layer" name)
    member _.IsMoe = moe.IsSome

    /// x [B; S; D], key mask [B; S] -> [B; S; D] and the block's routing (MoE blocks).
    member _.Forward(x: Tensor, keep: Tensor option) : Tensor * Routing option =
        let x = plus x (attend attn cfg.Heads keep (ln_1.forward x))
        let h = ln_2.forward x
        match dense, moe with
        | Some m, _ -> plus x (m.forward h), None
        | _, Some m ->
            let y, routing = m.Forward h
            plus x y, Some routing
        | None, None -> failwith "unreachable: a block has a dense or an MoE MLP"

/// What the model computed: the final hidden states (after ln_f) and each MoE block's routing.
type Gpt2MoeOutput =
    { /// [B; S; D]
      Hidden: Tensor
      /// (block index, routing of its B S tokens), in block order.
      Routings: (int * Routing) list }

/// GPT-2 whose blocks `moeBlocks` have MoE MLPs routed by `router`; the rest is `Gpt2.Gpt2Model`'s
/// architecture and names (wte, wpe, h.N, ln_f; logits tied to wte). With no MoE blocks it is a dense GPT-2.
type Gpt2MoeModel(cfg: Gpt2Config, moeBlocks: int list, router: RouterConfig) as this =
    inherit torch.nn.Module("gpt2")
    let cfg = orFail "GPT-2 config" (Gpt2Config.validate cfg) cfg
    do
        for i in moeBlocks do
            if i < 0 || i >= cfg.Layers then invalidArg "moeBlocks" (sprintf "expected MoE blocks in 0..%d, got %d" (cfg.Layers - 1) i)
    let wte = torch.nn.Embedding(int64 cfg.VocabSize, int64 cfg.Embd)
    let wpe = torch.nn.Embedding(int64 cfg.Positions, int64 cfg.Embd)
    let h =
        torch.nn.ModuleList<Gpt2MoeBlock>(
            [| for i in 0 .. cfg.Layers - 1 -> new Gpt2MoeBlock(string i, cfg, (if List.contains i moeBlocks then Some router else None)) |])
    let ln_f = torch.nn.LayerNorm(int64 cfg.Embd, cfg.LayerNormEpsilon)
    do this.RegisterComponents()

    member _.Config = cfg
    member _.Router = router
    member _.Blocks : Gpt2MoeBlock list = [ for b in h -> b ]
    /// The blocks with MoE MLPs (0-based), ascending.
    member _.MoeBlocks : int list = [ for i, b in Seq.indexed h do if b.IsMoe then yield i ]
    /// The token embedding wte [V; D] (also the output layer).
    member _.Wte : Tensor = wte.weight

    /// ids [B; S] int64, optional key mask keep [B; S] (1 = token, 0 = padding, as transformers'
    /// attention_mask; positions stay 0..S-1 as in transformers when no position ids are given).
    member _.Run(ids: Tensor, keep: Tensor option) : Gpt2MoeOutput =
        expectIndex "ids" "[B; S]" 2 ids
        if ids.shape[1] < 1L || ids.shape[1] > int64 cfg.Positions then
            invalidArg "ids" (sprintf "expected ids [B; S] with 1 <= S <= %d (n_positions), got %s" cfg.Positions (describe ids))
        match keep with
        | Some m when m.shape <> ids.shape -> invalidArg "keep" (sprintf "expected an attention mask of ids' shape %A, got %s" ids.shape (describe m))
        | _ -> ()
        if ids.numel () > 0L then
            let lo, hi = scalar (ids.min ()), scalar (ids.max ())
            if lo < 0.0 || hi >= float cfg.VocabSize then
                invalidArg "ids" (sprintf "expected token ids in [0, %d), got values in [%g, %g]" cfg.VocabSize lo hi)
        let pos = arange 0L ids.shape[1] torch.ScalarType.Int64 ids.device // [S]
        let mutable x = plus (wte.forward ids) (wpe.forward pos) // [B; S; D]
        let routings = ResizeArray()
        for i, b in Seq.indexed h do
            let y, r = b.Forward(x, keep)
            x <- y
            r |> Option.iter (fun r -> routings.Add(i, r))
        { Hidden = ln_f.forward x; Routings = List.ofSeq routings }

    /// ids [B; S] -> logits [B; S; V] (x wte^T).
    member this.Logits(ids: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let out = this.Run(ids, None)
        (out.Hidden.matmul (wte.weight.t ())).MoveToOuterDisposeScope()

/// Parameters of every MoE layer's experts and routers, and the rest.
let parameterCounts (model: Gpt2MoeModel) : {| Total: int64; Experts: int64; Routers: int64 |} =
    let count (m: torch.nn.Module) = m.parameters () |> Seq.sumBy (fun p -> p.NumberOfElements)
    let moe = model.Blocks |> List.filter (fun b -> b.IsMoe) |> List.map (fun b -> b.MoeMlp)
    {| Total = count model
       Experts = moe |> List.sumBy (fun m -> count m.Experts)
       Routers = moe |> List.sumBy (fun m -> count m.Router) |}

// ---------------------------------------------------------------- upcycling

/// The units each expert of each MoE block had re-initialised: (block, per expert the sorted unit indices).
type DropReport = { Units: (int * int[][]) list }

/// k distinct indices of 0..n-1, uniformly (partial Fisher-Yates), sorted.
let private sample (rng: Random) (n: int) (k: int) : int[] =
    let a = Array.init n id
    for i in 0 .. k - 1 do
        let j = rng.Next(i, n)
        let t = a[i]
        a[i] <- a[j]
        a[j] <- t
    Array.sort a[.. k - 1]

/// Mean and (unbiased) standard deviation of a tensor, as float.
let private stats (t: Tensor) : float * float =
    use _ = torch.NewDisposeScope()
    scalar (t.mean ()), scalar (t.std ())

/// Draws from N(mean, std) of the given shape with `gen`.
let private normalLike (gen: torch.Generator) (mean: float, std: float) (shape: int64[]) : Tensor =
    use z = torch.randn (shape, generator = gen)
    z |> mulScalar std |> addScalar mean

/// Copies a dense GPT-2 into `target` (same sizes; `problems` empty): every non-MLP tensor and every dense
/// block's MLP by name; each MoE block's experts from that block's dense MLP with Drop-Upcycling's diversity
/// re-initialisation of round(r H) units per expert (see the module comment). Routers keep their own
/// initialisation. Returns the re-initialised units.
let copyDropUpcycled (ratio: float) (seed: int) (dense: Gpt2Model) (target: Gpt2MoeModel) : DropReport =
    let dc, tc = dense.Config, target.Config
    if dc <> tc then invalidArg "target" (sprintf "expected the MoE model to have the dense model's config %A, got %A" dc tc)
    if not (ratio >= 0.0 && ratio <= 1.0) then invalidArg "ratio" (sprintf "expected a drop ratio in [0, 1], got %g" ratio)
    use _ = torch.no_grad ()
    let source = dict [ for struct (n, p) in dense.named_parameters () -> n, (p :> Tensor) ]
    for struct (n, p) in target.named_parameters () do
        let parts = n.Split '.'
        let inMoe = parts.Length > 3 && parts[0] = "h" && parts[2] = "mlp" && target.Blocks[int parts[1]].IsMoe
        if not inMoe then
            match source.TryGetValue n with
            | true, s -> p.copy_ s |> ignore
            | _ -> invalidArg "dense" (sprintf "expected the dense GPT-2 to have %s, but it does not" n)
    let rng = Random seed
    use gen = new torch.Generator(uint64 seed)
    let units =
        [ for i, (d, t) in List.indexed (List.zip dense.Blocks target.Blocks) do
            if t.IsMoe then
                let fc, proj = d.Mlp.CFc, d.Mlp.CProj
                let experts = t.MoeMlp.Experts
                let hidden = int fc.Outputs
                let k = droppedUnits ratio hidden
                let wFc, bFc, wProj = stats fc.Weight, stats fc.Bias, stats proj.Weight
                let chosen =
                    [| for e in 0 .. experts.Experts - 1 ->
                         let sel = sample rng hidden k
                         let ew, eb = experts.CFc.Weight[e], experts.CFc.Bias[e] // [D; H], [H]
                         let pw, pb = experts.CProj.Weight[e], experts.CProj.Bias[e] // [H; D], [D]
                         ew.copy_ fc.Weight |> ignore
                         eb.copy_ fc.Bias |> ignore
                         pw.copy_ proj.Weight |> ignore
                         pb.copy_ proj.Bias |> ignore
                         if k > 0 then
                             use idx = torch.tensor (sel |> Array.map int64) // [k]
                             use cols = normalLike gen wFc [| fc.Weight.shape[0]; int64 k |] // [D; k]
                             use biases = normalLike gen bFc [| int64 k |] // [k]
                             use rows = normalLike gen wProj [| int64 k; proj.Weight.shape[1] |] // [k; D]
                             ew.index_copy_ (1L, idx, cols) |> ignore
                             eb.index_copy_ (0L, idx, biases) |> ignore
                             pw.index_copy_ (0L, idx, rows) |> ignore
                         sel |]
                yield i, chosen ]
    { Units = units }

/// A new MoE GPT-2 from a dense one by Drop-Upcycling (`copyDropUpcycled`): `cfg.Every` decides which MLPs
/// become MoE layers, `cfg.Router` their routers, `cfg.DropRatio` the re-initialised fraction.
let dropUpcycle (cfg: DropUpcycleConfig) (dense: Gpt2Model) : Gpt2MoeModel * DropReport =
    let cfg = orFail "Drop-Upcycling config" (DropUpcycleConfig.validate cfg) cfg
    let target = new Gpt2MoeModel(dense.Config, DropUpcycleConfig.moeBlocks cfg dense.Config.Layers, cfg.Router)
    let report = copyDropUpcycled cfg.DropRatio cfg.Seed dense target
    target, report

/// The dense GPT-2 as a `Gpt2MoeModel` with no MoE blocks (the same function, for a study's dense baseline).
let ofDense (dense: Gpt2Model) : Gpt2MoeModel =
    let target = new Gpt2MoeModel(dense.Config, [], DropUpcycleConfig.defaults.Router)
    copyDropUpcycled 0.0 0 dense target |> ignore
    target

// ---------------------------------------------------------------- losses

/// The language-model loss of ids [B; S] (position t predicts t + 1, Radford et al. 2018 eq. 1) and the
/// unweighted Switch balancing loss (Fedus et al. 2022 eq. 4) summed over the MoE blocks (0 when dense).
let lmLosses (model: Gpt2MoeModel) (ids: Tensor) : Tensor * Tensor =
    expectIndex "ids" "[B; S] with S >= 2" 2 ids
    if ids.shape[1] < 2L then invalidArg "ids" (sprintf "expected ids [B; S] with S >= 2, got %s" (describe ids))
    use scope = torch.NewDisposeScope()
    let s = ids.shape[1]
    let out = model.Run(ids.narrow (1L, 0L, s - 1L), None)
    let logits = out.Hidden.matmul (model.Wte.t ()) // [B; S-1; V]
    let targets = ids.narrow (1L, 1L, s - 1L) // [B; S-1]
    let loss = torch.nn.functional.cross_entropy (logits.reshape (-1L, logits.shape[2]), targets.reshape (-1L))
    let aux = out.Routings |> List.fold (fun acc (_, r) -> plus acc (switchAuxLoss r)) (torch.zeros ([||], device = ids.device))
    loss.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope()

// ---------------------------------------------------------------- sequence classification

/// A routing's tensors moved to the enclosing dispose scope.
let private moveOut (r: Routing) : Routing =
    let out (t: Tensor) = t.MoveToOuterDisposeScope()
    { r with
        Experts = out r.Experts; Weights = out r.Weights; Kept = out r.Kept; Probs = Option.map out r.Probs
        Logits = Option.map out r.Logits; Gates = out r.Gates; LoadProbability = Option.map out r.LoadProbability
        Stats = { TokensPerExpert = out r.Stats.TokensPerExpert; DroppedFraction = out r.Stats.DroppedFraction; RouterEntropy = out r.Stats.RouterEntropy } }

/// transformers' GPT2ForSequenceClassification: `transformer` (a `Gpt2MoeModel`, dense or MoE) and `score`,
/// a linear map [L; D] without bias, applied to the hidden state of each row's last non-pad token. That token
/// is found as transformers finds it: the first pad id in the row, minus one, modulo S, so a row without pad
/// ids (or left-padded: its first pad at 0) uses position S - 1, and a right-padded row the token before its
/// first pad. Without a pad id only batches of one row are accepted (transformers raises too).
type Gpt2ForSequenceClassification(transformer: Gpt2MoeModel, labels: int, padTokenId: int option) as this =
    inherit torch.nn.Module("gpt2_classifier")
    do if labels < 1 then invalidArg "labels" (sprintf "expected labels >= 1, got %d" labels)
    let score = torch.nn.Linear(int64 transformer.Config.Embd, int64 labels, hasBias = false)
    do
        use _ = torch.no_grad ()
        // transformers' _init_weights: Linear weights N(0, initializer_range).
        torch.nn.init.normal_ (score.weight, 0.0, InitializerRange) |> ignore
        this.register_module ("transformer", transformer)
        this.register_module ("score", score)
    member _.Transformer = transformer
    member _.Score = score
    member _.Labels = labels
    member _.PadTokenId = padTokenId

    /// The position of each row's last non-pad token, as transformers computes it. ids [B; S] -> [B] int64.
    member _.LastTokenIndex(ids: Tensor) : Tensor =
        expectIndex "ids" "[B; S]" 2 ids
        let s = ids.shape[1]
        match padTokenId with
        | None ->
            if ids.shape[0] <> 1L then invalidArg "ids" (sprintf "cannot handle batch sizes > 1 without a pad token id (got %s); set one" (describe ids))
            withInt64Scalar (s - 1L) (fun last -> torch.full ([| 1L |], last, dtype = torch.ScalarType.Int64, device = ids.device))
        | Some pad ->
            use _ = torch.NewDisposeScope()
            let isPad = withInt64Scalar (int64 pad) (fun p -> ids.eq p) // [B; S] bool
            let firstPad = isPad.to_type(torch.ScalarType.Int32).argmax (-1L) // [B]
            let idx = withInt64Scalar 1L (fun one -> firstPad.sub one) // [B]
            (withInt64Scalar s (fun m -> idx.remainder m)).MoveToOuterDisposeScope()

    /// ids [B; S], optional attention mask keep [B; S] -> logits [B; L] and the MoE blocks' routings.
    member this.Run(ids: Tensor, keep: Tensor option) : Tensor * (int * Routing) list =
        use scope = torch.NewDisposeScope()
        let out = transformer.Run(ids, keep)
        let idx = this.LastTokenIndex ids // [B]
        let rows = arange 0L ids.shape[0] torch.ScalarType.Int64 ids.device // [B]
        let last = out.Hidden.index ([| rows; idx |]) // [B; D]
        let logits = score.forward last // [B; L]
        logits.MoveToOuterDisposeScope(), [ for i, r in out.Routings -> i, moveOut r ]

// ---------------------------------------------------------------- loading

/// A dense GPT-2 from a Hugging Face folder: config.json (model_type gpt2; n_head read from it) and
/// model.safetensors; fails naming the file when either is missing or does not fit.
let loadDenseFolder (dir: string) : Gpt2Model =
    let config = Path.Combine(dir, "config.json")
    let weights = Path.Combine(dir, "model.safetensors")
    for f in [ config; weights ] do
        if not (File.Exists f) then invalidArg "dir" (sprintf "expected a GPT-2 folder with config.json and model.safetensors, %s is missing" f)
    use doc = JsonDocument.Parse(File.ReadAllText config)
    let root = doc.RootElement
    match root.TryGetProperty "model_type" with
    | true, t when t.GetString() = "gpt2" -> ()
    | true, t -> invalidArg "dir" (sprintf "%s: expected model_type \"gpt2\", got \"%s\"" config (t.GetString()))
    | _ -> invalidArg "dir" (sprintf "%s: expected a model_type field (\"gpt2\")" config)
    let heads =
        match root.TryGetProperty "n_head" with
        | true, h when h.ValueKind = JsonValueKind.Number -> h.GetInt32()
        | _ -> invalidArg "dir" (sprintf "%s: expected an integer n_head" config)
    loadHeads heads weights
