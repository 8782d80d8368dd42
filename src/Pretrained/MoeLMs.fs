/// Pretrained mixture-of-experts language models as Hugging Face's classes (transformers 4.45.1) compute them,
/// built on the toolkit's router (`Routing.route`, token-choice top-k) and MoE layer (`Layers.MoeLayer`, SwiGLU
/// experts), so their routing is reported (`LayerReport`), traced per layer, and swappable for any toolkit
/// router (`MoeCausalLM.ReplaceRouters`):
/// - `MixtralForCausalLM` (Jiang et al. 2024): every layer's `block_sparse_moe` routes top-2 of 8 (softmax over
///   all experts, then top-k, renormalised over the k);
/// - `Qwen2MoeForCausalLM` (Qwen1.5-MoE / Qwen2-MoE): top-k of the softmax WITHOUT renormalisation when
///   `norm_topk_prob` is false, plus a shared expert scaled by a sigmoid gate; sparse layers every
///   `decoder_sparse_step`, dense `mlp` in `mlp_only_layers`;
/// - `OlmoeForCausalLM` (Muennighoff et al. 2024): QK-norm in attention, top-k with `norm_topk_prob`.
/// Their auxiliary loss is transformers' `load_balancing_loss_func` (Fedus et al. 2022 eq. 4 over the k picks,
/// padding excluded through the attention mask, all sparse layers' tokens pooled), added to the cross-entropy
/// with `router_aux_loss_coef` when `output_router_logits` is set, as transformers' forward does.
/// Deviations: Mixtral's router jitter (`router_jitter_noise` > 0, which also scales the experts' input in
/// training) and sliding-window attention are refused; OLMoE's `clip_qkv` is refused.
/// Axes: N rows, T positions, D hidden_size, F expert width, E experts, K picks per token.
module Moe.MoeLMs

open System
open System.IO
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Llama

type Tensor = torch.Tensor

// ---------------------------------------------------------------- configuration

/// Which family's names and rules apply.
type MoeFamily =
    | Mixtral
    | Qwen2Moe
    | Olmoe

/// The MoE hyper-parameters beyond the decoder's, named as in the families' configs.
type MoeLMConfig =
    { Decoder: DecoderConfig
      Family: MoeFamily
      /// E (num_local_experts / num_experts).
      NumExperts: int
      /// K (num_experts_per_tok).
      TopK: int
      /// Renormalise the k picked probabilities to sum 1 (Mixtral always; norm_topk_prob otherwise).
      NormTopKProb: bool
      /// F of each expert (Mixtral's and OLMoE's intermediate_size, Qwen2-MoE's moe_intermediate_size).
      ExpertIntermediate: int
      /// Qwen2-MoE's shared expert width (shared_expert_intermediate_size); None elsewhere.
      SharedExpertIntermediate: int option
      /// Layer i is sparse when (i + 1) % step = 0 and i is not in MlpOnlyLayers (Qwen2-MoE; 1 elsewhere).
      SparseStep: int
      MlpOnlyLayers: int list
      /// Weight of the load-balancing loss in the loss (router_aux_loss_coef).
      RouterAuxLossCoef: float
      /// Whether the forward with labels adds the weighted load-balancing loss (output_router_logits).
      OutputRouterLogits: bool }

module MoeLMConfig =
    let validate (cfg: MoeLMConfig) : string list =
        [ yield! DecoderConfig.validate cfg.Decoder
          if cfg.NumExperts < 1 then sprintf "the number of experts must be >= 1, got %d" cfg.NumExperts
          if cfg.TopK < 1 || cfg.TopK > cfg.NumExperts then sprintf "num_experts_per_tok must be in 1..%d, got %d" cfg.NumExperts cfg.TopK
          if cfg.ExpertIntermediate < 1 then sprintf "the experts' intermediate size must be >= 1, got %d" cfg.ExpertIntermediate
          if cfg.SparseStep < 1 then sprintf "decoder_sparse_step must be >= 1, got %d" cfg.SparseStep
          match cfg.SharedExpertIntermediate with
          | Some s when s < 1 -> sprintf "shared_expert_intermediate_size must be >= 1, got %d" s
          | _ -> () ]

    /// Whether layer i has an MoE feed-forward sublayer (transformers' Qwen2MoeDecoderLayer rule).
    let isSparse (cfg: MoeLMConfig) (layer: int) : bool =
        not (List.contains layer cfg.MlpOnlyLayers) && (layer + 1) % cfg.SparseStep = 0

    let private finish (r: HfConfig.ConfigReader) (cfg: MoeLMConfig) : MoeLMConfig =
        DecoderConfig.finish r cfg.Decoder |> ignore
        match validate cfg with
        | [] -> cfg
        | problems -> failwithf "%s: %s" r.Path (String.Join("; ", problems))

    let private open' (path: string) (modelType: string) =
        let r = HfConfig.ConfigReader.Open path
        if r.StringOr("model_type", "") <> modelType then r.Unsupported("model_type", sprintf "\"%s\"" modelType)
        r

    /// Parses a `MixtralForCausalLM` config.json (model_type "mixtral").
    let parseMixtral (path: string) : MoeLMConfig =
        let r = open' path "mixtral"
        if r.FloatOr("router_jitter_noise", 0.0) <> 0.0 then
            r.Unsupported("router_jitter_noise", "0 (Mixtral's training jitter also scales the experts' input; not implemented)")
        if r.Has "sliding_window" then r.Unsupported("sliding_window", "null (sliding-window attention is not implemented)")
        r.Ignore [ "sliding_window" ]
        let decoder = DecoderConfig.readShared r "MixtralForCausalLM" false
        finish r
            { Decoder = decoder
              Family = Mixtral
              NumExperts = r.IntOr("num_local_experts", 8)
              TopK = r.IntOr("num_experts_per_tok", 2)
              NormTopKProb = true
              ExpertIntermediate = decoder.IntermediateSize
              SharedExpertIntermediate = None
              SparseStep = 1
              MlpOnlyLayers = []
              RouterAuxLossCoef = r.FloatOr("router_aux_loss_coef", 0.001)
              OutputRouterLogits = r.BoolOr("output_router_logits", false) }

    /// Parses a `Qwen2MoeForCausalLM` config.json (model_type "qwen2_moe").
    let parseQwen2Moe (path: string) : MoeLMConfig =
        let r = open' path "qwen2_moe"
        DecoderConfig.refuseSlidingWindow r
        let decoder = { DecoderConfig.readShared r "Qwen2MoeForCausalLM" false with RopeScaling = DecoderConfig.readRopeScaling r; QkvBias = true }
        let mlpOnly =
            match r.Element "mlp_only_layers" with
            | None -> []
            | Some e when e.ValueKind = Text.Json.JsonValueKind.Array ->
                [ for v in e.EnumerateArray() do
                    match v.TryGetInt32() with
                    | true, i -> i
                    | _ -> r.Unsupported("mlp_only_layers", "a list of layer indices") ]
            | Some _ -> r.Unsupported("mlp_only_layers", "a list of layer indices")
        finish r
            { Decoder = decoder
              Family = Qwen2Moe
              NumExperts = r.IntOr("num_experts", 60)
              TopK = r.IntOr("num_experts_per_tok", 4)
              NormTopKProb = r.BoolOr("norm_topk_prob", false)
              ExpertIntermediate = r.IntOr("moe_intermediate_size", 1408)
              SharedExpertIntermediate = Some(r.IntOr("shared_expert_intermediate_size", 5632))
              SparseStep = r.IntOr("decoder_sparse_step", 1)
              MlpOnlyLayers = mlpOnly
              RouterAuxLossCoef = r.FloatOr("router_aux_loss_coef", 0.001)
              OutputRouterLogits = r.BoolOr("output_router_logits", false) }

    /// Parses an `OlmoeForCausalLM` config.json (model_type "olmoe").
    let parseOlmoe (path: string) : MoeLMConfig =
        let r = open' path "olmoe"
        if r.Has "clip_qkv" then r.Unsupported("clip_qkv", "null (clipping of q, k, v is not implemented)")
        r.Ignore [ "clip_qkv" ]
        let bias = r.BoolOr("attention_bias", false)
        let decoder =
            { DecoderConfig.readShared r "OlmoeForCausalLM" false with
                RopeScaling = DecoderConfig.readRopeScaling r; QkvBias = bias; OutputBias = bias; QkNorm = true }
        finish r
            { Decoder = decoder
              Family = Olmoe
              NumExperts = r.IntOr("num_experts", 64)
              TopK = r.IntOr("num_experts_per_tok", 8)
              NormTopKProb = r.BoolOr("norm_topk_prob", false)
              ExpertIntermediate = decoder.IntermediateSize
              SharedExpertIntermediate = None
              SparseStep = 1
              MlpOnlyLayers = []
              RouterAuxLossCoef = r.FloatOr("router_aux_loss_coef", 0.01)
              OutputRouterLogits = r.BoolOr("output_router_logits", false) }

    /// The checkpoint's MoE layer: a linear router, softmax over all E experts, then the top K (renormalised
    /// when NormTopKProb), no capacity (every token reaches its K experts), SwiGLU experts of width F.
    let moeConfig (cfg: MoeLMConfig) : MoeConfig =
        { ModelDim = cfg.Decoder.HiddenSize
          ExpertHidden = cfg.ExpertIntermediate
          Activation = SwiGLU
          SharedExperts = 0
          Router =
            { RouterConfig.defaults with
                Experts = cfg.NumExperts
                K = cfg.TopK
                Scorer = LinearRouter
                Normaliser = Softmax
                Selection = TokenChoiceTopK(NormaliseThenTopK, cfg.NormTopKProb)
                Capacity = Dropless
                Jitter = 0.0 } }

    /// The registered name of the sparse sublayer and the names of an expert's three projections.
    let names (family: MoeFamily) : string * (string * string * string) =
        match family with
        | Mixtral -> "block_sparse_moe", ("w1", "w3", "w2")
        | Qwen2Moe | Olmoe -> "mlp", ("gate_proj", "up_proj", "down_proj")

// ---------------------------------------------------------------- the sparse sublayer

/// A layer's sparse feed-forward sublayer: the toolkit's MoE layer (`moe`) and, for Qwen2-MoE, a shared expert
/// added to every token scaled by sigmoid(shared_expert_gate x). x [N; T; D] -> [N; T; D].
type SparseBlock(name: string, moe: MoeLayer, shared: DecoderMlp, sharedGate: Linear) as this =
    inherit torch.nn.Module(name)
    let mutable moe = moe
    do
        this.register_module ("moe", moe)
        if not (isNull shared) then
            this.register_module ("shared_expert", shared)
            this.register_module ("shared_expert_gate", sharedGate)
    override _.RegisterComponents() = ()

    member _.Moe = moe
    member _.SharedExpert = shared

    /// Replaces the MoE layer (a swapped router); the caller copies what it keeps.
    member _.ReplaceMoe(fresh: MoeLayer) =
        this.register_module ("moe", null)
        this.register_module ("moe", fresh)
        moe <- fresh

    member _.Run(x: Tensor) : Tensor * RouterTrace option =
        use scope = torch.NewDisposeScope()
        let result, routing = moe.ForwardWithRouting(x, null, None)
        let y =
            if isNull shared then result.Output
            else plus result.Output (torch.sigmoid (linearLayerCast sharedGate x) * shared.forward x) // [N; T; D]
        let trace = { Routing = routing; Report = Option.get result.Moe }
        moveTraceOut trace
        y.MoveToOuterDisposeScope(), Some trace

/// Layer i's feed-forward sublayer: a `SparseBlock` where `MoeLMConfig.isSparse` says so, the dense MLP elsewhere.
let private feedForward (cfg: MoeLMConfig) (layer: int) : FeedForward =
    if MoeLMConfig.isSparse cfg layer then
        let name, _ = MoeLMConfig.names cfg.Family
        let moe = new MoeLayer("moe", MoeLMConfig.moeConfig cfg)
        let shared, gate =
            match cfg.SharedExpertIntermediate with
            | Some width -> new DecoderMlp("shared_expert", cfg.Decoder.HiddenSize, width, false), Linear(int64 cfg.Decoder.HiddenSize, 1L, hasBias = false)
            | None -> null, null
        let block = new SparseBlock(name, moe, shared, gate)
        { Name = name; Module = block; Run = block.Run }
    else denseFeedForward cfg.Decoder cfg.Decoder.IntermediateSize

// ---------------------------------------------------------------- the load-balancing loss

/// transformers' `load_balancing_loss_func` (Fedus et al. 2022 eq. 4-6 over K picks): every sparse layer's
/// router logits pooled; p = softmax(logits); f_e = fraction of (token, slot) picks of the top-K of p that
/// go to e, per slot; P_e = mean p_e; loss = E * sum_{k,e} f_{k,e} P_e, the means over real tokens only
/// (attentionMask [N; T] bool, null = all). logits: one [N*T; E] per sparse layer, in layer order. -> scalar.
let loadBalancingLoss (experts: int) (topK: int) (attentionMask: Tensor) (logits: Tensor list) : Tensor =
    if List.isEmpty logits then invalidArg "logits" "expected the router logits of at least one sparse layer"
    use scope = torch.NewDisposeScope()
    let all = (torch.cat (List.toArray logits, 0L)).to_type torch.ScalarType.Float32 // [M; E], M = layers * N * T
    let probs = functional.softmax (all, -1L) // [M; E]
    let struct (_, selected) = probs.topk topK // [M; K]
    let picks = functional.one_hot(selected, int64 experts).to_type torch.ScalarType.Float32 // [M; K; E]
    let weights = // [M] float32, 1 for a real token
        if isNull attentionMask then torch.ones ([| all.shape[0] |], dtype = torch.ScalarType.Float32, device = all.device)
        else attentionMask.reshape(-1L).to_type(torch.ScalarType.Float32).repeat ([| int64 logits.Length |])
    if weights.shape[0] <> all.shape[0] then
        invalidArg "attentionMask" (sprintf "expected an attention mask of %d tokens per layer, got %s" (all.shape[0] / int64 logits.Length) (describe attentionMask))
    let total = weights.sum ()
    let tokensPerExpert = (picks * weights.view(-1L, 1L, 1L)).sum ([| 0L |]) / total // [K; E]
    let routerProb = (probs * weights.view(-1L, 1L)).sum ([| 0L |]) / total // [E]
    (mulScalar (float experts) ((tokensPerExpert * routerProb.unsqueeze 0L).sum ())).MoveToOuterDisposeScope()

// ---------------------------------------------------------------- the model

let private checkedDecoder (cfg: MoeLMConfig) : DecoderConfig =
    (orFail "MoE LM config" (MoeLMConfig.validate cfg) cfg).Decoder

/// A pretrained MoE causal LM (Mixtral, Qwen2-MoE, OLMoE): the decoder stack whose sparse layers hold a
/// `SparseBlock` over the toolkit's MoE layer.
type MoeCausalLM(cfg: MoeLMConfig) =
    inherit DecoderOnlyLM(checkedDecoder cfg, feedForward cfg)

    let sparseName, (gateName, upName, downName) = MoeLMConfig.names cfg.Family

    member _.MoeConfig = cfg

    /// The sparse blocks by layer index.
    member this.SparseBlocks : (int * SparseBlock) list =
        [ for i, layer in List.indexed this.Layers do
            match layer.FeedForward.Module with
            | :? SparseBlock as b -> i, b
            | _ -> () ]

    override _.AuxLoss(traces, attentionMask) =
        let logits =
            [ for _, t in traces do
                match t.Routing.Logits with
                | Some l -> l
                | None -> invalidOp "a router without logits (hash routing) has no load-balancing loss" ]
        if logits.IsEmpty then None else Some(loadBalancingLoss cfg.NumExperts cfg.TopK attentionMask logits)

    override _.AuxLossWeight = if cfg.OutputRouterLogits then Some cfg.RouterAuxLossCoef else None

    /// Replaces every MoE layer's router with a fresh one of `router` (any toolkit router but hash routing,
    /// which needs token ids the layers do not pass), keeping the experts' weights.
    member this.ReplaceRouters(router: RouterConfig) : unit =
        match router.Selection with
        | Hash _ -> invalidArg "router" "hash routing needs token ids, which the decoder layers do not pass to their MoE layers"
        | _ -> ()
        if router.Experts <> cfg.NumExperts then
            invalidArg "router" (sprintf "expected a router over the checkpoint's %d experts, got Experts = %d" cfg.NumExperts router.Experts)
        for _, block in this.SparseBlocks do
            let old = block.Moe
            let fresh = new MoeLayer("moe", { old.Config with Router = router })
            using (torch.no_grad ()) (fun _ ->
                fresh.Experts.W1.copy_ old.Experts.W1 |> ignore
                fresh.Experts.W2.copy_ old.Experts.W2 |> ignore
                fresh.Experts.W3.copy_ old.Experts.W3 |> ignore)
            if this.training then fresh.train () else fresh.eval ()
            block.ReplaceMoe fresh
            old.Dispose()

    /// Hugging Face's layout for the MoE layers: `<sparse>.gate.weight` [E; D] (the router's W_r transposed) and
    /// `<sparse>.experts.j.<gate|up|down>.weight` (slices of the stacked expert weights, transposed); the shared
    /// expert and every other tensor under its own name. A replaced router that is not a linear one keeps the
    /// toolkit's names for its parameters.
    override this.HfTensors() =
        let moePrefix = sprintf ".%s.moe." sparseName
        [ for struct (name, p) in this.named_parameters () do
              let p = p :> Tensor
              let at = name.IndexOf moePrefix
              if at < 0 then yield plainTensor name p
              else
                  let block = name.Substring(0, at + sparseName.Length + 2) // "model.layers.i.<sparse>."
                  match name.Substring(at + moePrefix.Length) with
                  | "router.weight" -> yield transposedTensor (block + "gate.weight") p
                  | "experts.w1" | "experts.w2" | "experts.w3" as which ->
                      let projection = match which with "experts.w1" -> gateName | "experts.w3" -> upName | _ -> downName
                      for j in 0 .. int p.shape[0] - 1 do
                          yield transposedTensor (sprintf "%sexperts.%d.%s.weight" block j projection) (p[int64 j])
                  | rest -> yield plainTensor (block + "moe." + rest) p ]

/// `MixtralForCausalLM`.
type MixtralForCausalLM(cfg: MoeLMConfig) =
    inherit MoeCausalLM(cfg)

/// `Qwen2MoeForCausalLM`.
type Qwen2MoeForCausalLM(cfg: MoeLMConfig) =
    inherit MoeCausalLM(cfg)

/// `OlmoeForCausalLM`.
type OlmoeForCausalLM(cfg: MoeLMConfig) =
    inherit MoeCausalLM(cfg)

/// Loads a `MixtralForCausalLM` checkpoint folder, in evaluation mode.
let mixtralFromFolder (dir: string) : MixtralForCausalLM =
    let cfg = MoeLMConfig.parseMixtral (Path.Combine(dir, "config.json"))
    load dir (fun () -> new MixtralForCausalLM(cfg)) :?> MixtralForCausalLM

/// Loads a `Qwen2MoeForCausalLM` checkpoint folder, in evaluation mode.
let qwen2MoeFromFolder (dir: string) : Qwen2MoeForCausalLM =
    let cfg = MoeLMConfig.parseQwen2Moe (Path.Combine(dir, "config.json"))
    load dir (fun () -> new Qwen2MoeForCausalLM(cfg)) :?> Qwen2MoeForCausalLM

/// Loads an `OlmoeForCausalLM` checkpoint folder, in evaluation mode.
let olmoeFromFolder (dir: string) : OlmoeForCausalLM =
    let cfg = MoeLMConfig.parseOlmoe (Path.Combine(dir, "config.json"))
    load dir (fun () -> new OlmoeForCausalLM(cfg)) :?> OlmoeForCausalLM
