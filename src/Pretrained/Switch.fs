/// Switch Transformers (Fedus et al. 2022, "Switch Transformers: Scaling to Trillion Parameter Models with
/// Simple and Efficient Sparsity") as Hugging Face's `SwitchTransformersForConditionalGeneration`
/// (transformers 4.45.1) computes it, built on the toolkit's own router and MoE layer: T5 (`Moe.T5`) whose
/// feed-forward sublayer is, every `encoder_sparse_step` / `decoder_sparse_step` blocks, a `Layers.MoeLayer`
/// with a `SwitchTop1` router (softmax, top-1, gate = the chosen probability; multiplicative jitter on the
/// router input in training), `num_experts` ReLU experts and `expert_capacity` tokens per expert per sequence
/// (`Routing.limitPerGroup`). The loss adds transformers' router z-loss and load-balancing loss times the
/// config's coefficients. Any toolkit router can replace the checkpoint's (`SwitchModel.ReplaceRouters`).
///
/// Two corrections to transformers 4.45.1, as the shared samples make them (and later transformers does):
/// every expert that received a token runs (4.45.1 skips some when the batch has several rows, transformers
/// issue #33463), and a token over capacity gets zero from the MoE layer, so only its residual passes (4.45.1
/// passes its input through, scaled by its router probability). Deviation: the experts have no dropout on
/// their hidden layer in training (the toolkit's expert FFN has none); evaluation is unaffected.
/// Axes: B batch, S positions, D d_model, F d_ff, E experts, T = B * S tokens.
module Moe.Switch

open System
open System.IO
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.T5

// ---------------------------------------------------------------- configuration

/// The Switch Transformers hyper-parameters beyond T5's, named as in `SwitchTransformersConfig`.
type SwitchConfig =
    { T5: T5Config
      /// E (num_experts).
      NumExperts: int
      /// Tokens each expert takes per sequence (expert_capacity); the rest are dropped.
      ExpertCapacity: int
      /// Block i of the encoder is sparse when i % step = 1 (every block when step = 1; none when 0).
      EncoderSparseStep: int
      DecoderSparseStep: int
      /// Switch's multiplicative jitter epsilon on the router input in training (router_jitter_noise).
      RouterJitterNoise: float
      /// Weight of the router z-loss (ST-MoE, Zoph et al. 2022 eq. 5) in the loss (router_z_loss_coef).
      RouterZLossCoef: float
      /// Weight of the load-balancing loss (Fedus et al. 2022 eq. 4) in the loss (router_aux_loss_coef).
      RouterAuxLossCoef: float }

/// Expert activations the toolkit's expert FFN computes, by transformers' name.
let private expertActivations = [ "relu", ReLU; "gelu", GELU ]

module SwitchConfig =
    /// `SwitchTransformersConfig.__init__`'s defaults (google/switch-base-8's shape).
    let defaults : T5Config.Defaults =
        { VocabSize = 32128; DModel = 768; DKv = 64; DFf = 2048; NumLayers = 12; NumHeads = 12
          FeedForwardProj = "relu"; TieWordEmbeddings = true }

    /// Whether block `layer` of a stack with this sparse step is an MoE layer (transformers' rule).
    let isSparse (step: int) (layer: int) : bool = step > 0 && (layer % step = 1 || step = 1)

    /// The expert activation of the config.
    let expertActivation (cfg: SwitchConfig) : Activation =
        match List.tryFind (fun (n, _) -> n = cfg.T5.DenseActFn) expertActivations with
        | Some(_, a) -> a
        | None -> invalidArg "cfg" (sprintf "dense_act_fn \"%s\" has no expert FFN (supported: relu, gelu)" cfg.T5.DenseActFn)

    let validate (cfg: SwitchConfig) : string list =
        [ yield! T5Config.validate cfg.T5
          if cfg.NumExperts < 1 then sprintf "num_experts must be >= 1, got %d" cfg.NumExperts
          if cfg.ExpertCapacity < 0 then sprintf "expert_capacity must be >= 0, got %d" cfg.ExpertCapacity
          if cfg.EncoderSparseStep < 0 then sprintf "encoder_sparse_step must be >= 0, got %d" cfg.EncoderSparseStep
          if cfg.DecoderSparseStep < 0 then sprintf "decoder_sparse_step must be >= 0, got %d" cfg.DecoderSparseStep
          if cfg.RouterJitterNoise < 0.0 || cfg.RouterJitterNoise >= 1.0 then sprintf "router_jitter_noise must be in [0, 1), got %g" cfg.RouterJitterNoise
          if not (List.exists (fun (n, _) -> n = cfg.T5.DenseActFn) expertActivations) then
              sprintf "dense_act_fn \"%s\" is not supported for experts (supported: relu, gelu)" cfg.T5.DenseActFn ]

    /// Parses a Switch Transformers `config.json` (`model_type` "switch_transformers"): every field used,
    /// ignored by name, or refused by name. As in transformers, `encoder_sparse_step` / `decoder_sparse_step`
    /// written in the file win over num_layers / num_sparse_*_layers; `feed_forward_proj`, `is_gated_act` and
    /// `router_type`, which transformers' Switch never reads, are accepted only with the values it computes.
    let parse (path: string) : SwitchConfig =
        let r = HfConfig.ConfigReader.Open path
        match r.StringOr("model_type", "") with
        | "switch_transformers" -> ()
        | _ -> r.Unsupported("model_type", "\"switch_transformers\" (Moe.Switch); \"t5\" loads with Moe.T5")
        let act = r.StringOr("dense_act_fn", "relu")
        if not (List.exists (fun (n, _) -> n = act) expertActivations) then r.Unsupported("dense_act_fn", "\"relu\", \"gelu\"")
        if r.StringOr("feed_forward_proj", act) <> act then r.Unsupported("feed_forward_proj", sprintf "absent or \"%s\" (dense_act_fn; transformers' Switch has no gated feed-forward)" act)
        if r.BoolOr("is_gated_act", false) then r.Unsupported("is_gated_act", "false (transformers' Switch has no gated feed-forward)")
        if r.StringOr("router_type", "tokens_masked") <> "tokens_masked" then r.Unsupported("router_type", "\"tokens_masked\" (top-1 token choice)")
        let t5 = T5Config.readShared r defaults act false
        let step (sparseLayers: string) (layers: int) (stepField: string) =
            let sparse = r.IntOr(sparseLayers, 3)
            r.IntOr(stepField, (if sparse > 0 then layers / sparse else 0))
        let encoderStep = step "num_sparse_encoder_layers" t5.NumLayers "encoder_sparse_step"
        let decoderStep = step "num_sparse_decoder_layers" t5.NumDecoderLayers "decoder_sparse_step"
        if r.BoolOr("router_bias", false) then r.Unsupported("router_bias", "false (the toolkit's linear router has no bias)")
        if r.StringOr("router_dtype", "float32") <> "float32" then r.Unsupported("router_dtype", "\"float32\" (the toolkit routes in float32)")
        // transformers 4.45.1 stores router_ignore_padding_tokens but never applies it; true would promise
        // something neither computes
        if r.BoolOr("router_ignore_padding_tokens", false) then
            r.Unsupported("router_ignore_padding_tokens", "false (transformers 4.45.1 never applies it: padding is routed)")
        let cfg =
            { T5 = t5
              NumExperts = r.IntOr("num_experts", 8)
              ExpertCapacity = r.IntOr("expert_capacity", 64)
              EncoderSparseStep = encoderStep
              DecoderSparseStep = decoderStep
              RouterJitterNoise = r.FloatOr("router_jitter_noise", 0.01)
              RouterZLossCoef = r.FloatOr("router_z_loss_coef", 0.001)
              RouterAuxLossCoef = r.FloatOr("router_aux_loss_coef", 0.001) }
        // add_router_probs only adds router probabilities to the outputs
        r.Ignore [ "add_router_probs" ]
        r.Ignore HfConfig.bookkeepingFields
        r.Ignore T5Config.ignoredFields
        r.Finish()
        match validate cfg with
        | [] -> cfg
        | problems -> failwithf "%s: %s" path (String.Join("; ", problems))

    /// The checkpoint's MoE layer: `SwitchTop1` over `num_experts` linear-router experts of width d_ff, no
    /// capacity of its own (the per-sequence `expert_capacity` is applied by the sublayer), jitter as configured.
    let moeConfig (cfg: SwitchConfig) : MoeConfig =
        { ModelDim = cfg.T5.DModel
          ExpertHidden = cfg.T5.DFf
          Activation = expertActivation cfg
          SharedExperts = 0
          Router =
            { RouterConfig.defaults with
                Experts = cfg.NumExperts
                K = 1
                Scorer = LinearRouter
                Normaliser = Softmax
                Selection = SwitchTop1
                Capacity = Dropless
                Jitter = cfg.RouterJitterNoise } }

// ---------------------------------------------------------------- the sparse sublayer and its losses

/// transformers' `expert_index` one-hot per token after capacity: 1 at the expert each kept assignment went
/// to. A token none of whose assignments was kept counts for expert 0, as transformers' arg-max over its
/// all-zero row of the router mask gives (this enters the load-balancing loss).
/// routing over T tokens -> [T; E] float32.
let dispatchMask (experts: int) (r: Routing) : Tensor =
    use scope = torch.NewDisposeScope()
    let oneHot = torch.nn.functional.one_hot (r.Experts, int64 experts) // [T; K; E]
    let kept = oneHot * r.Kept.unsqueeze(2L).to_type oneHot.dtype // [T; K; E]
    let sent = kept.amax ([| 1L |]) // [T; E]
    let none = (sent.sum (1L)).eq (torch.zeros ([||], dtype = sent.dtype)) // [T]
    let firstExpert = torch.zeros_like sent
    let firstExpert = withInt64Scalar 1L (fun one -> firstExpert.index_fill (1L, torch.zeros ([| 1L |], dtype = torch.ScalarType.Int64), one)) // [T; E]
    torch.where(none.unsqueeze 1L, firstExpert, sent).to_type(torch.ScalarType.Float32).MoveToOuterDisposeScope()

/// A block's sparse feed-forward sublayer (`mlp`): the MoE layer on normed x [B; S; D] with `groupCapacity`
/// assignments per expert per sequence (None: only the router's own capacity), and its router trace.
let sparseSublayer (layer: MoeLayer) (groupCapacity: int option) : FeedForwardSublayer =
    let run (x: Tensor) : FfnOutput =
        let b, s = x.shape[0], x.shape[1]
        let result, routing = layer.ForwardWithRouting(x, null, groupCapacity)
        let logits =
            match routing.Logits with
            | Some l -> l
            | None -> invalidOp (sprintf "%A routing has no router logits for the router losses" layer.Config.Router.Selection)
        let e = int64 layer.Config.Router.Experts
        { Output = result.Output
          Router =
            Some { Logits = logits.view (b, s, e); Dispatch = (dispatchMask layer.Config.Router.Experts routing).view (b, s, e)
                   Report = Option.get result.Moe } }
    { Name = "mlp"; Module = layer; Run = run }

/// Unweighted router losses of one stack, as transformers computes them over the concatenation (along the
/// sequence) of every sparse sublayer's router outputs.
type RouterLosses =
    { /// Router z-loss (Zoph et al. 2022 eq. 5): mean over tokens and layers of logsumexp(logits)^2.
      ZLoss: Tensor
      /// Load balancing (Fedus et al. 2022 eq. 4-6) per sequence: E^2 * mean over rows and experts of
      /// (fraction of the row's tokens sent to e) * (mean router probability of e), i.e. E * sum_e f_e P_e
      /// averaged over rows.
      AuxLoss: Tensor }

/// transformers' `router_z_loss_func` and `load_balancing_loss_func` over the traces of one stack.
let routerLosses (traces: RouterTrace list) : RouterLosses =
    if List.isEmpty traces then invalidArg "traces" "expected the router traces of at least one sparse sublayer"
    use scope = torch.NewDisposeScope()
    let logits = torch.cat ([| for t in traces -> t.Logits |], 1L) // [B; S*n; E]
    let e = float logits.shape[2]
    let z = (square (logits.logsumexp (-1L))).mean ()
    let probs = torch.nn.functional.softmax (logits, -1L) // [B; S*n; E]
    let sent = torch.cat ([| for t in traces -> t.Dispatch |], 1L) // [B; S*n; E]
    let aux = mulScalar (e * e) ((sent.mean ([| 1L |]) * probs.mean ([| 1L |])).mean ())
    { ZLoss = z.MoveToOuterDisposeScope(); AuxLoss = aux.MoveToOuterDisposeScope() }

// ---------------------------------------------------------------- the model

/// The T5 part of a config after checking the whole config.
let private checkedT5 (cfg: SwitchConfig) : T5Config = (orFail "Switch config" (SwitchConfig.validate cfg) cfg).T5

/// A block's feed-forward sublayer (`mlp`): an MoE layer where `SwitchConfig.isSparse` says so (capacity
/// `expert_capacity` per sequence), transformers' dense ReLU FFN elsewhere.
let private feedForward (cfg: SwitchConfig) (place: FfnPlace) : FeedForwardSublayer =
    let step = if place.Decoder then cfg.DecoderSparseStep else cfg.EncoderSparseStep
    if SwitchConfig.isSparse step place.Layer then
        sparseSublayer (new MoeLayer("mlp", SwitchConfig.moeConfig cfg)) (Some cfg.ExpertCapacity)
    else
        (new T5DenseFfn("mlp", cfg.T5.DModel, cfg.T5.DFf, cfg.T5.DenseActFn, false, cfg.T5.DropoutRate)).AsSublayer "mlp"

/// `SwitchTransformersForConditionalGeneration`: `T5Model` whose sparse blocks' `mlp` is a `Layers.MoeLayer`.
/// The loss is cross-entropy + router_z_loss_coef * (encoder z + decoder z) + router_aux_loss_coef * (encoder
/// aux + decoder aux), each stack's pair from `routerLosses`, counted only when its sparse step is > 1
/// (transformers' condition: a stack whose every block is sparse adds no router loss there).
type SwitchModel(cfg: SwitchConfig) =
    inherit T5Model(checkedT5 cfg, feedForward cfg, "SwitchTransformersForConditionalGeneration")

    /// Each stack's unweighted router losses (None where transformers computes none: no sparse block, or a
    /// sparse step of 1).
    let stackLosses (step: int) (traces: (FfnPlace * RouterTrace) list) =
        if step > 1 && not traces.IsEmpty then Some(routerLosses (List.map snd traces)) else None

    member _.SwitchConfig = cfg

    /// The MoE layers by place ("enc.1", "dec.3"), encoder first.
    member this.MoeLayers() : (string * MoeLayer)[] =
        [| for place, block in this.Blocks do
               match block.FeedForward.Module with
               | :? MoeLayer as m -> place.Name, m
               | _ -> () |]

    /// The unweighted encoder and decoder router losses of a forward pass's traces (`T5Output.Routers`).
    member _.RouterLosses(routers: (FfnPlace * RouterTrace) list) : RouterLosses option * RouterLosses option =
        let enc, dec = routers |> List.partition (fun (p, _) -> not p.Decoder)
        stackLosses cfg.EncoderSparseStep enc, stackLosses cfg.DecoderSparseStep dec

    override _.RouterLoss(encoder, decoder) =
        let weighted (losses: RouterLosses option) =
            losses |> Option.map (fun l -> plus (mulScalar cfg.RouterZLossCoef l.ZLoss) (mulScalar cfg.RouterAuxLossCoef l.AuxLoss))
        match weighted (stackLosses cfg.EncoderSparseStep encoder), weighted (stackLosses cfg.DecoderSparseStep decoder) with
        | Some a, Some b -> Some(plus a b)
        | Some a, None | None, Some a -> Some a
        | None, None -> None

    /// Replaces every MoE layer's router with a fresh one of `router` (any toolkit router but hash routing,
    /// which needs token ids the blocks do not pass), keeping the experts' weights; `groupCapacity` = Some c
    /// keeps Switch's per-sequence capacity c on top of the router's own (None: the router's own only).
    member this.ReplaceRouters(router: RouterConfig, groupCapacity: int option) : unit =
        match router.Selection with
        | Hash _ -> invalidArg "router" "hash routing needs token ids, which the T5 blocks do not pass to their feed-forward layers"
        | _ -> ()
        if router.Experts <> cfg.NumExperts then
            invalidArg "router" (sprintf "expected a router over the checkpoint's %d experts, got Experts = %d" cfg.NumExperts router.Experts)
        for _, block in this.Blocks do
            match block.FeedForward.Module with
            | :? MoeLayer as old ->
                let fresh = new MoeLayer("mlp", { old.Config with Router = router })
                using (torch.no_grad ()) (fun _ ->
                    fresh.Experts.W1.copy_ old.Experts.W1 |> ignore
                    fresh.Experts.W2.copy_ old.Experts.W2 |> ignore)
                if this.training then fresh.train () else fresh.eval ()
                block.ReplaceFeedForward(sparseSublayer fresh groupCapacity)
                old.Dispose()
            | _ -> ()

    /// Hugging Face's layout for the MoE layers: `mlp.router.classifier.weight` [E; D] (the router's W_r
    /// transposed) and `mlp.experts.expert_i.wi.weight` [F; D], `.wo.weight` [D; F] (slices of the stacked
    /// expert weights, transposed); every other tensor under its own name. A replaced router that is not a
    /// linear one keeps the toolkit's names for its parameters.
    override this.HfTensors() =
        let plain (name: string) (p: Tensor) =
            { Name = name; Shape = p.shape; Read = (fun () -> p.detach ()); Write = (fun t -> p.copy_ t |> ignore); Target = Some p }
        let transposed (name: string) (p: Tensor) =
            { Name = name; Shape = [| p.shape[1]; p.shape[0] |]; Read = (fun () -> p.detach().t ()); Write = (fun t -> p.copy_ (t.t ()) |> ignore); Target = Some (p.t ()) }
        [ for struct (name, p) in this.named_parameters () do
              let p = p :> Tensor
              if name.EndsWith ".mlp.router.weight" then
                  yield transposed (name.Substring(0, name.Length - ".weight".Length) + ".classifier.weight") p
              elif name.EndsWith ".mlp.experts.w1" || name.EndsWith ".mlp.experts.w2" then
                  let prefix = name.Substring(0, name.Length - "w1".Length)
                  let projection = if name.EndsWith "w1" then "wi" else "wo"
                  for i in 0 .. int p.shape[0] - 1 do
                      yield transposed (sprintf "%sexpert_%d.%s.weight" prefix i projection) (p[int64 i])
              else yield plain name p ]

/// Loads a `SwitchTransformersForConditionalGeneration` checkpoint folder (`config.json`; weights as
/// `HfCheckpoint.openWeights` finds them), in evaluation mode.
let fromFolder (dir: string) : SwitchModel =
    let cfg = SwitchConfig.parse (Path.Combine(dir, "config.json"))
    use weights = HfCheckpoint.openWeights dir
    let model = new SwitchModel(cfg)
    loadInto weights model
    model

// ---------------------------------------------------------------- sparse upcycling of a pretrained T5

/// Every reason a dense T5 cannot be upcycled into MoE layers of `moe`, empty when it can: an ungated T5
/// whose activation the experts compute (relu or gelu), experts of the FFN's width, no shared experts, and a
/// router that reads hidden states (hash routers need token ids the blocks do not pass).
let upcycleProblems (moe: MoeConfig) (dense: T5Config) : string list =
    [ yield! MoeConfig.validate moe
      if dense.IsGatedAct then
          sprintf "the T5 has a gated feed-forward (%s, wi_0 and wi_1), which the toolkit's experts do not compute" dense.DenseActFn
      match List.tryFind (fun (n, _) -> n = dense.DenseActFn) expertActivations with
      | Some(_, a) when a <> moe.Activation -> sprintf "expert activation %A must be the T5's %s" moe.Activation dense.DenseActFn
      | None -> sprintf "dense_act_fn \"%s\" has no expert FFN (relu, gelu)" dense.DenseActFn
      | _ -> ()
      if moe.ModelDim <> dense.DModel then sprintf "ModelDim (%d) must be d_model (%d)" moe.ModelDim dense.DModel
      if moe.ExpertHidden <> dense.DFf then sprintf "ExpertHidden (%d) must be d_ff (%d)" moe.ExpertHidden dense.DFf
      if moe.SharedExperts <> 0 then sprintf "SharedExperts must be 0, got %d" moe.SharedExperts
      match moe.Router.Selection with
      | Hash _ -> "hash routing needs token ids, which the T5 blocks do not pass to their feed-forward layers"
      | _ -> () ]

/// Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling", sec. 2) of a pretrained T5: a new model whose
/// feed-forward sublayer is an MoE layer of `moe` (registered as `mlp`) in every block where
/// `SwitchConfig.isSparse step` says so (1: every block; 2: blocks 1, 3, ..., as Switch interleaves them), each
/// of its experts a copy of that block's dense FFN and its router fresh (the MoE config's initialisation);
/// every other parameter, dense FFNs included, copied. Its forward adds no router loss (`T5Output.Routers`
/// holds the traces, `routerLosses` computes Switch's). With renormalised top-k weights the upcycled model
/// computes exactly what the dense one does until training moves the experts apart.
let upcycle (moe: MoeConfig) (step: int) (dense: T5Model) : T5Model =
    let cfg = dense.Config
    orFail "upcycling" (upcycleProblems moe cfg) () |> ignore
    if step < 1 then invalidArg "step" (sprintf "expected a sparse step >= 1, got %d" step)
    let factory (place: FfnPlace) =
        if SwitchConfig.isSparse step place.Layer then sparseSublayer (new MoeLayer("mlp", moe)) None
        else (new T5DenseFfn("DenseReluDense", cfg.DModel, cfg.DFf, cfg.DenseActFn, false, cfg.DropoutRate)).AsSublayer "DenseReluDense"
    let target = new T5Model(cfg, factory, "T5ForConditionalGeneration")
    use _ = torch.no_grad ()
    let denseFfn (block: T5Block) =
        match block.FeedForward.Module with
        | :? T5DenseFfn as f -> f
        | other -> invalidArg "dense" (sprintf "expected a dense T5 (T5DenseFfn in every block), got %s" (other.GetType().Name))
    let ffnHandles =
        set [ for _, b in target.Blocks do for p in b.FeedForward.Module.parameters () -> p.Handle ]
    let denseParameters = dict [ for struct (n, p) in dense.named_parameters () -> n, (p :> Tensor) ]
    for struct (name, p) in target.named_parameters () do
        if not (ffnHandles.Contains p.Handle) then p.copy_ denseParameters[name] |> ignore
    for (_, d), (_, t) in List.zip dense.Blocks target.Blocks do
        let source = denseFfn d
        match t.FeedForward.Module with
        | :? MoeLayer as m ->
            for e in 0L .. int64 moe.Router.Experts - 1L do
                m.Experts.W1[e].copy_ (source.Wi.weight.t ()) |> ignore // [D; F]
                m.Experts.W2[e].copy_ (source.Wo.weight.t ()) |> ignore // [F; D]
        | :? T5DenseFfn as f ->
            f.Wi.weight.copy_ source.Wi.weight |> ignore
            f.Wo.weight.copy_ source.Wo.weight |> ignore
        | other -> invalidOp (sprintf "unexpected feed-forward module %s" (other.GetType().Name))
    if dense.training then target.train () else target.eval ()
    target
