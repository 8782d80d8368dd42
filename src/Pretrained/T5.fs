/// T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
/// Transformer") as Hugging Face's `T5ForConditionalGeneration` (transformers 4.45.1) computes it: v1.0
/// (ReLU feed-forward, embeddings tied to the output projection whose input is scaled by d_model^-0.5) and
/// v1.1 / Flan-T5 (gated-GELU feed-forward, untied output projection), with Hugging Face's parameter names, so
/// a checkpoint folder loads without renaming. Pre-norm blocks with T5's RMS LayerNorm (no mean subtraction,
/// no bias), attention without the 1/sqrt(d) scaling, and relative position buckets (sec. 2.1) computed by
/// block 0's attention and shared by every block of its stack. Switch Transformers (`Moe.Switch`) are this
/// model with some feed-forward sublayers replaced (`FeedForwardSublayer`).
/// Axes: B batch, S source positions, L decoder positions (keys), Q decoder queries, D d_model, H heads,
/// Dk d_kv, F d_ff, V vocabulary, E experts.
module Moe.T5

open System
open System.IO
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Layers
open Moe.Attention
open Moe.Models
open Moe.Seq2Seq

type private Parameter = Modules.Parameter

// ---------------------------------------------------------------- configuration

/// The T5 hyper-parameters, named as in Hugging Face's `T5Config`.
type T5Config =
    { /// V (vocab_size).
      VocabSize: int
      /// D (d_model).
      DModel: int
      /// Width of one head (d_kv); the attention's inner width is NumHeads * DKv, which need not be D.
      DKv: int
      /// F, the feed-forward hidden width (d_ff).
      DFf: int
      /// Encoder blocks (num_layers).
      NumLayers: int
      /// Decoder blocks (num_decoder_layers; num_layers when absent).
      NumDecoderLayers: int
      /// H (num_heads).
      NumHeads: int
      /// Buckets of the relative position embedding (relative_attention_num_buckets).
      RelativeAttentionNumBuckets: int
      /// Distance beyond which positions share the last bucket (relative_attention_max_distance).
      RelativeAttentionMaxDistance: int
      /// Dropout on embeddings, sublayer outputs, attention probabilities and the FFN hidden layer, in training.
      DropoutRate: float
      /// Epsilon of the RMS LayerNorm (layer_norm_epsilon).
      LayerNormEpsilon: float
      /// The feed-forward activation, by transformers' name (dense_act_fn: relu, gelu, gelu_new, ...).
      DenseActFn: string
      /// Gated feed-forward (v1.1): wo (act(wi_0 x) * wi_1 x) instead of wo act(wi x).
      IsGatedAct: bool
      /// The output projection is the token embedding, its input scaled by d_model^-0.5 (v1.0).
      TieWordEmbeddings: bool
      /// Padding id: what labels of -100 become in the decoder input.
      PadTokenId: int
      /// First decoder input (T5: the padding id 0).
      DecoderStartTokenId: int }

/// The activations transformers' ACT2FN offers that the toolkit implements, by name.
let supportedActivations = [ "relu"; "gelu"; "gelu_new"; "gelu_pytorch_tanh"; "silu"; "swish" ]

/// A feed-forward activation by transformers' name: relu; gelu (erf); gelu_new and gelu_pytorch_tanh (the tanh
/// approximation, `Gpt2.geluNew`); silu / swish.
let activation (name: string) : Tensor -> Tensor =
    match name with
    | "relu" -> functional.relu
    | "gelu" -> fun x -> functional.gelu x
    | "gelu_new" | "gelu_pytorch_tanh" -> Gpt2.geluNew
    | "silu" | "swish" -> functional.silu
    | other -> invalidArg "name" (sprintf "unsupported activation \"%s\" (supported: %s)" other (String.Join(", ", supportedActivations)))

module T5Config =
    /// Every problem with the config, empty when it is usable.
    let validate (cfg: T5Config) : string list =
        [ for name, v in [ "vocab_size", cfg.VocabSize; "d_model", cfg.DModel; "d_kv", cfg.DKv; "d_ff", cfg.DFf; "num_heads", cfg.NumHeads ] do
              if v < 1 then sprintf "%s must be >= 1, got %d" name v
          if cfg.NumLayers < 1 then sprintf "num_layers must be >= 1, got %d" cfg.NumLayers
          if cfg.NumDecoderLayers < 1 then sprintf "num_decoder_layers must be >= 1, got %d" cfg.NumDecoderLayers
          if cfg.RelativeAttentionNumBuckets < 4 then sprintf "relative_attention_num_buckets must be >= 4, got %d" cfg.RelativeAttentionNumBuckets
          if cfg.RelativeAttentionMaxDistance < 1 then sprintf "relative_attention_max_distance must be >= 1, got %d" cfg.RelativeAttentionMaxDistance
          if not (cfg.DropoutRate >= 0.0 && cfg.DropoutRate < 1.0) then sprintf "dropout_rate must be in [0, 1), got %g" cfg.DropoutRate
          if not (cfg.LayerNormEpsilon > 0.0) then sprintf "layer_norm_epsilon must be > 0, got %g" cfg.LayerNormEpsilon
          if not (List.contains cfg.DenseActFn supportedActivations) then
              sprintf "dense_act_fn \"%s\" is not supported (supported: %s)" cfg.DenseActFn (String.Join(", ", supportedActivations))
          for name, id in [ "pad_token_id", cfg.PadTokenId; "decoder_start_token_id", cfg.DecoderStartTokenId ] do
              if id < 0 || id >= cfg.VocabSize then sprintf "%s must be in 0 .. vocab_size - 1, got %d" name id ]

    /// Transformers' defaults for the fields a family's config may leave out (`T5Config`'s own when
    /// `family` is T5's; Switch passes its own).
    type Defaults =
        { VocabSize: int; DModel: int; DKv: int; DFf: int; NumLayers: int; NumHeads: int
          FeedForwardProj: string; TieWordEmbeddings: bool }

    /// `T5Config.__init__`'s defaults (t5-small's shape).
    let t5Defaults =
        { VocabSize = 32128; DModel = 512; DKv = 64; DFf = 2048; NumLayers = 6; NumHeads = 8
          FeedForwardProj = "relu"; TieWordEmbeddings = true }

    /// Fields every T5-family config may hold that cannot change what the model computes: initialisation
    /// (initializer_factor), T5's unused position count (n_positions), a legacy cache flag (output_past), the
    /// classification head's dropout (classifier_dropout, not part of conditional generation).
    let ignoredFields = [ "initializer_factor"; "n_positions"; "output_past"; "classifier_dropout" ]

    /// Reads the fields T5 and Switch Transformers share; the activation is the caller's. Marks them used.
    let readShared (r: HfConfig.ConfigReader) (d: Defaults) (denseActFn: string) (isGatedAct: bool) : T5Config =
        let layers = r.IntOr("num_layers", d.NumLayers)
        let cfg =
            { VocabSize = r.IntOr("vocab_size", d.VocabSize)
              DModel = r.IntOr("d_model", d.DModel)
              DKv = r.IntOr("d_kv", d.DKv)
              DFf = r.IntOr("d_ff", d.DFf)
              NumLayers = layers
              NumDecoderLayers = r.IntOr("num_decoder_layers", layers)
              NumHeads = r.IntOr("num_heads", d.NumHeads)
              RelativeAttentionNumBuckets = r.IntOr("relative_attention_num_buckets", 32)
              RelativeAttentionMaxDistance = r.IntOr("relative_attention_max_distance", 128)
              DropoutRate = r.FloatOr("dropout_rate", 0.1)
              LayerNormEpsilon = r.FloatOr("layer_norm_epsilon", 1e-6)
              DenseActFn = denseActFn
              IsGatedAct = isGatedAct
              TieWordEmbeddings = r.BoolOr("tie_word_embeddings", d.TieWordEmbeddings)
              PadTokenId = r.IntOr("pad_token_id", 0)
              // transformers' _shift_right refuses a config without it
              DecoderStartTokenId = r.Int "decoder_start_token_id" }
        match validate cfg with
        | [] -> cfg
        | problems -> failwithf "%s: %s" r.Path (String.Join("; ", problems))

    /// The activation and gating `T5Config.__init__` derives from `feed_forward_proj` ("relu", "gated-gelu", ...):
    /// the last part names the activation, a "gated-" prefix gates it, and "gated-gelu" means gelu_new. As in
    /// transformers, `dense_act_fn` and `is_gated_act` written in the file override what was derived.
    let readActivation (r: HfConfig.ConfigReader) (fallback: string) : string * bool =
        let proj = r.StringOr("feed_forward_proj", fallback)
        let parts = proj.Split '-'
        if (parts.Length > 1 && parts[0] <> "gated") || parts.Length > 2 then
            r.Unsupported("feed_forward_proj", "\"ACT\" or \"gated-ACT\", as transformers requires")
        let derived = if proj = "gated-gelu" then "gelu_new" else parts[parts.Length - 1]
        let act = r.StringOr("dense_act_fn", derived)
        if not (List.contains act supportedActivations) then
            r.Unsupported((if r.Has "dense_act_fn" then "dense_act_fn" else "feed_forward_proj"), String.Join(", ", supportedActivations))
        act, r.BoolOr("is_gated_act", parts[0] = "gated")

    /// Parses a T5 `config.json` (`model_type` "t5"): every field used, ignored by name (bookkeeping, generation
    /// defaults, `ignoredFields`) or refused by name.
    let parse (path: string) : T5Config =
        let r = HfConfig.ConfigReader.Open path
        match r.StringOr("model_type", "") with
        | "t5" -> ()
        | _ -> r.Unsupported("model_type", "\"t5\" (Moe.T5); \"switch_transformers\" loads with Moe.Switch")
        let act, gated = readActivation r t5Defaults.FeedForwardProj
        let cfg = readShared r t5Defaults act gated
        r.Ignore HfConfig.bookkeepingFields
        r.Ignore ignoredFields
        r.Finish()
        cfg

// ---------------------------------------------------------------- pieces

/// The most negative float32, which transformers adds to the scores of hidden keys (`torch.finfo.min`).
let private maskValue = float Single.MinValue

/// Additive mask from a bool mask: 0 where allowed, float32's minimum where not (transformers' convention,
/// so a row with every key hidden stays finite). allowed [..] bool -> float32 of its shape.
let additiveMask (allowed: Tensor) : Tensor =
    use zeros = torch.zeros(allowed.shape, dtype = torch.ScalarType.Float32, device = allowed.device)
    withScalar maskValue (fun m -> zeros.masked_fill (allowed.logical_not (), m))

let private addInt64 (value: int64) (t: Tensor) : Tensor =
    withInt64Scalar value (fun v -> withInt64Scalar 1L (fun one -> t.add (v, one)))

/// T5's relative position buckets (Raffel et al. 2020 sec. 2.1; transformers' `_relative_position_bucket`),
/// relative = key position - query position: half the buckets (all, when not `bidirectional`) count exact
/// distances below numBuckets / 4 (/ 2), the rest grow logarithmically up to maxDistance, beyond which
/// distances share the last bucket; bidirectional buckets give later keys the upper half. The logarithm runs
/// in float32 and is truncated, as transformers does. relative [..] int64 -> buckets [..] int64.
let relativePositionBucket (bidirectional: bool) (numBuckets: int) (maxDistance: int) (relative: Tensor) : Tensor =
    expect "relative" "int64 relative positions" (fun t -> t.dtype = torch.ScalarType.Int64) relative
    use scope = torch.NewDisposeScope()
    let zero = torch.zeros_like relative
    let buckets = if bidirectional then numBuckets / 2 else numBuckets
    let offset, distance =
        if bidirectional then mulInt64 (int64 buckets) (relative.gt(zero).to_type torch.ScalarType.Int64), relative.abs ()
        else zero, torch.minimum(relative, zero).neg ()
    let maxExact = buckets / 2
    let isSmall = withInt64Scalar (int64 maxExact) (fun m -> distance.lt m)
    let logRatio = (divScalar (float maxExact) (distance.to_type torch.ScalarType.Float32)).log () // -inf at 0, unused there
    let scaled = mulScalar (float (buckets - maxExact)) (divScalar (Math.Log(float maxDistance / float maxExact)) logRatio)
    let large = addInt64 (int64 maxExact) (scaled.to_type torch.ScalarType.Int64)
    let large = withInt64Scalar (int64 (buckets - 1)) (fun top -> large.clamp_max top)
    (plus offset (torch.where(isSmall, distance, large))).MoveToOuterDisposeScope()

/// T5's LayerNorm (Zhang & Sennrich 2019's RMSNorm): weight * x / sqrt(mean(x^2) + eps), no mean subtraction,
/// no bias; the mean of squares in float32. Parameter `weight` [D]. x [..; D] -> [..; D].
type T5LayerNorm(name: string, dim: int, eps: float) as this =
    inherit Module<Tensor, Tensor>(name)
    let mutable weight = new Parameter(torch.ones [| int64 dim |]) // [D]
    do this.register_parameter ("weight", weight)
    /// Every submodule is registered by hand under its Hugging Face name; TorchSharp's registration of fields
    /// by reflection would add them again under the F# field names.
    override _.RegisterComponents() = ()

    member _.Weight : Tensor = weight
    override _.forward(x: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let variance = (square (x.to_type torch.ScalarType.Float32)).mean ([| -1L |], keepdim = true) // [..; 1]
        let normed = x * torch.rsqrt (addScalar eps variance) // [..; D]
        (weight * normed).MoveToOuterDisposeScope()

/// What a feed-forward sublayer's router decided, for the router losses transformers computes from it.
type RouterTrace =
    { /// Router logits (from the jittered input in training, as transformers' router). // [B; S; E] float32
      Logits: Tensor
      /// 1 where a token was sent after capacity, transformers' `expert_index` one-hot (see `Moe.Switch`). // [B; S; E] float32
      Dispatch: Tensor
      /// The toolkit's routing report: unweighted aux losses and statistics, for logs and plots.
      Report: MoeReport }

/// A feed-forward sublayer's result.
type FfnOutput =
    { /// [B; S; D]
      Output: Tensor
      /// Some for a sparse (MoE) sublayer.
      Router: RouterTrace option }

/// The module a block's feed-forward layer runs on its normed input, and the name it is registered under
/// (`DenseReluDense` in T5, `mlp` in Switch Transformers).
type FeedForwardSublayer =
    { Name: string
      Module: torch.nn.Module
      /// normed x [B; S; D] -> output [B; S; D] (and the router's decisions, for a sparse sublayer).
      Run: Tensor -> FfnOutput }

/// Moves a router trace's tensors to the enclosing dispose scope.
let moveTraceOut (t: RouterTrace) : unit =
    t.Logits.MoveToOuterDisposeScope() |> ignore
    t.Dispatch.MoveToOuterDisposeScope() |> ignore
    Models.moveReportOut t.Report

let private dropoutIf (training: bool) (rate: float) (t: Tensor) : Tensor =
    if training && rate > 0.0 then functional.dropout (t, rate, true) else t

/// T5's feed-forward network: wo (dropout (act (wi x))), or gated (v1.1) wo (dropout (act (wi_0 x) * wi_1 x)),
/// no biases (transformers' `T5DenseActDense` / `T5DenseGatedActDense`). Parameters `wi.weight` [F; D] (or
/// `wi_0.weight`, `wi_1.weight`), `wo.weight` [D; F]. x [B; S; D] -> [B; S; D].
type T5DenseFfn(name: string, dModel: int, dFf: int, act: string, gated: bool, dropout: float) as this =
    inherit torch.nn.Module(name)
    let wi = if gated then null else Linear(int64 dModel, int64 dFf, hasBias = false)
    let wi_0 = if gated then Linear(int64 dModel, int64 dFf, hasBias = false) else null
    let wi_1 = if gated then Linear(int64 dModel, int64 dFf, hasBias = false) else null
    let wo = Linear(int64 dFf, int64 dModel, hasBias = false)
    let actFn = activation act
    do
        for key, m in [ "wi", wi; "wi_0", wi_0; "wi_1", wi_1; "wo", wo ] do
            if not (isNull m) then this.register_module (key, m)

    /// The ungated input projection; null when gated.
    /// Every submodule is registered by hand under its Hugging Face name; TorchSharp's registration of fields
    /// by reflection would add them again under the F# field names.
    override _.RegisterComponents() = ()

    member _.Wi = wi
    /// The gated activation's projection; null when ungated.
    member _.Wi0 = wi_0
    /// The gated linear projection; null when ungated.
    member _.Wi1 = wi_1
    member _.Wo = wo
    member _.Gated = gated

    member this.Forward(x: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let h = if gated then actFn (wi_0.call x) * wi_1.call x else actFn (wi.call x) // [B; S; F]
        (wo.call (dropoutIf this.training dropout h)).MoveToOuterDisposeScope()

    /// As a block's feed-forward sublayer registered under `key`.
    member this.AsSublayer(key: string) : FeedForwardSublayer =
        { Name = key; Module = this; Run = fun x -> { Output = this.Forward x; Router = None } }

/// T5's attention (transformers' `T5Attention`): q, k, v projections D -> H * Dk and o back, no biases, scores
/// q k^T without 1/sqrt(Dk) scaling (Mesh TensorFlow folds it into the initialisation) plus an additive bias
/// (relative positions and masks), softmax in float32, dropout on the probabilities in training. Block 0
/// holds `relative_attention_bias` [buckets; H]. Parameters `q.weight`, `k.weight`, `v.weight` [H*Dk; D],
/// `o.weight` [D; H*Dk]. The projections (and the FFN's wi/wo) run through `call`, not `forward`, so forward
/// hooks fire: `Finetune`'s LoRA adapters hook onto these Linear modules.
[<AllowNullLiteral>]
type T5Attention(name: string, cfg: T5Config, hasRelativeBias: bool, bidirectional: bool) as this =
    inherit torch.nn.Module(name)
    let d = int64 cfg.DModel
    let h, dk = int64 cfg.NumHeads, int64 cfg.DKv
    let q = Linear(d, h * dk, hasBias = false)
    let k = Linear(d, h * dk, hasBias = false)
    let v = Linear(d, h * dk, hasBias = false)
    let o = Linear(h * dk, d, hasBias = false)
    let relative_attention_bias = if hasRelativeBias then Embedding(int64 cfg.RelativeAttentionNumBuckets, h) else null
    do
        for key, m in [ "q", q :> torch.nn.Module; "k", k; "v", v; "o", o; "relative_attention_bias", relative_attention_bias ] do
            if not (isNull m) then this.register_module (key, m)

    /// x [B; S; H*Dk] -> [B; H; S; Dk].
    let splitHeads (x: Tensor) : Tensor =
        use view = x.view (x.shape[0], x.shape[1], h, dk)
        view.transpose (1L, 2L)

    /// Every submodule is registered by hand under its Hugging Face name; TorchSharp's registration of fields
    /// by reflection would add them again under the F# field names.
    override _.RegisterComponents() = ()

    member _.Q = q
    member _.K = k
    member _.V = v
    member _.O = o
    /// The relative position embedding [buckets; H]; null outside block 0.
    member _.RelativeAttentionBias = relative_attention_bias

    /// Position bias of `queries` queries at positions offset .. offset + queries - 1 over keys 0 .. keys - 1
    /// (transformers' `compute_bias` with the cache's offset). // [1; H; Q; L] float32
    member _.ComputeBias(offset: int64, queries: int64, keys: int64, device: torch.Device) : Tensor =
        if isNull relative_attention_bias then invalidOp (sprintf "%s has no relative_attention_bias (only block 0 does)" name)
        use scope = torch.NewDisposeScope()
        let context = (arange offset (offset + queries) torch.ScalarType.Int64 device).unsqueeze 1L // [Q; 1]
        let memory = (arange 0L keys torch.ScalarType.Int64 device).unsqueeze 0L // [1; L]
        let buckets =
            relativePositionBucket bidirectional cfg.RelativeAttentionNumBuckets cfg.RelativeAttentionMaxDistance (memory - context) // [Q; L]
        let values = relative_attention_bias.forward buckets // [Q; L; H]
        values.permute(2L, 0L, 1L).unsqueeze(0L).MoveToOuterDisposeScope()

    /// Attends x [B; Q; D] over itself (memory = null) or over an encoder memory [B; S; D], with an additive
    /// bias broadcastable to [B; H; Q; L]. Self-attention appends its keys and values to a non-null cache
    /// and attends over all cached positions; cross-attention fills an empty cache once and reuses it
    /// (memory may then be null). Returns [B; Q; D].
    member this.Forward(x: Tensor, memory: Tensor, bias: Tensor, cache: KvCache, cross: bool) : Tensor =
        use scope = torch.NewDisposeScope()
        let queries = splitHeads (q.call x) // [B; H; Q; Dk]
        let keys, values =
            if cross then
                if not (isNull cache) && not cache.IsEmpty then cache.Keys, cache.Values
                else
                    if isNull memory then invalidArg "memory" "expected the encoder states [B; S; D] (only a filled cache lets them be null)"
                    let kk, vv = splitHeads (k.call memory), splitHeads (v.call memory) // [B; H; S; Dk]
                    if not (isNull cache) then cache.Set(kk, vv)
                    kk, vv
            else
                let kk, vv = splitHeads (k.call x), splitHeads (v.call x) // [B; H; Q; Dk]
                if isNull cache then kk, vv
                else
                    cache.Append(kk, vv)
                    cache.Keys, cache.Values // [B; H; L; Dk]
        let scores = plus (queries.matmul (keys.transpose (-2L, -1L))) bias // [B; H; Q; L]
        let probs = scores.softmax(-1L, torch.ScalarType.Float32).to_type scores.dtype // [B; H; Q; L]
        let probs = dropoutIf this.training cfg.DropoutRate probs
        let out = probs.matmul values // [B; H; Q; Dk]
        let merged = out.transpose(1L, 2L).reshape (x.shape[0], x.shape[1], h * dk) // [B; Q; H*Dk]
        (o.call merged).MoveToOuterDisposeScope()

/// One sublayer of a block: a normed residual branch x + dropout(f(layer_norm x)), with its modules
/// registered under Hugging Face's names (`SelfAttention` / `EncDecAttention` / the FFN's, and `layer_norm`).
[<AllowNullLiteral>]
type T5Sublayer(name: string, cfg: T5Config, key: string, inner: torch.nn.Module) as this =
    inherit torch.nn.Module(name)
    let layer_norm = new T5LayerNorm("layer_norm", cfg.DModel, cfg.LayerNormEpsilon)
    let mutable inner = inner
    do
        this.register_module (key, inner)
        this.register_module ("layer_norm", layer_norm)
    /// Every submodule is registered by hand under its Hugging Face name; TorchSharp's registration of fields
    /// by reflection would add them again under the F# field names.
    override _.RegisterComponents() = ()

    member _.LayerNorm = layer_norm
    member _.Inner = inner
    /// Replaces the inner module (registered under `newKey`), e.g. a sparse layer's MoE.
    member _.Replace(oldKey: string, newKey: string, m: torch.nn.Module) =
        this.register_module (oldKey, null)
        this.register_module (newKey, m)
        inner <- m
    /// x + dropout(f(layer_norm x)).
    member this.Residual(x: Tensor, f: Tensor -> Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        (plus x (dropoutIf this.training cfg.DropoutRate (f (layer_norm.forward x)))).MoveToOuterDisposeScope()

/// A T5 block: `layer.0` self-attention, `layer.1` cross-attention (decoder only), then the feed-forward layer.
type T5Block(name: string, cfg: T5Config, isDecoder: bool, hasRelativeBias: bool, ffn: FeedForwardSublayer) as this =
    inherit torch.nn.Module(name)
    let selfAttention = new T5Attention("SelfAttention", cfg, hasRelativeBias, not isDecoder)
    let selfLayer = new T5Sublayer("layer.0", cfg, "SelfAttention", selfAttention)
    let crossAttention = if isDecoder then new T5Attention("EncDecAttention", cfg, false, false) else null
    let crossLayer = if isDecoder then new T5Sublayer("layer.1", cfg, "EncDecAttention", crossAttention) else null
    let mutable ffn = ffn
    let ffnLayer = new T5Sublayer("layer.ff", cfg, ffn.Name, ffn.Module)
    let layer = new ModuleList<torch.nn.Module>(if isDecoder then [| selfLayer :> torch.nn.Module; crossLayer; ffnLayer |] else [| selfLayer; ffnLayer |])
    do this.register_module ("layer", layer)

    /// Every submodule is registered by hand under its Hugging Face name; TorchSharp's registration of fields
    /// by reflection would add them again under the F# field names.
    override _.RegisterComponents() = ()

    member _.SelfAttention = selfAttention
    /// null in the encoder.
    member _.CrossAttention = crossAttention
    member _.FeedForward = ffn
    member _.FeedForwardLayer = ffnLayer
    member _.SelfAttentionLayer = selfLayer
    member _.CrossAttentionLayer = crossLayer

    /// Replaces the feed-forward sublayer (same registration rules; Switch swaps routers this way).
    member _.ReplaceFeedForward(sublayer: FeedForwardSublayer) =
        ffnLayer.Replace(ffn.Name, sublayer.Name, sublayer.Module)
        ffn <- sublayer

    /// x [B; Q; D] with the self-attention bias [B | 1; H; Q; L] and, in the decoder, the encoder memory
    /// [B; S; D] with its bias [B; 1; 1; S]. Returns the new x and the FFN's router trace.
    member this.Forward(x: Tensor, selfBias: Tensor, memory: Tensor, crossBias: Tensor, cache: LayerCache) : Tensor * RouterTrace option =
        use scope = torch.NewDisposeScope()
        let selfCache, crossCache = if isNull cache then null, null else cache.Self, cache.Cross
        let x = selfLayer.Residual(x, fun h -> selfAttention.Forward(h, null, selfBias, selfCache, false))
        let x = if isDecoder then crossLayer.Residual(x, fun h -> crossAttention.Forward(h, memory, crossBias, crossCache, true)) else x
        let r = ffn.Run (ffnLayer.LayerNorm.forward x)
        let x = plus x (dropoutIf this.training cfg.DropoutRate r.Output) // [B; Q; D]
        r.Router |> Option.iter moveTraceOut
        x.MoveToOuterDisposeScope(), r.Router

// ---------------------------------------------------------------- stacks

/// Where a feed-forward sublayer sits: the stack and the block's index.
type FfnPlace =
    { Decoder: bool
      Layer: int }

    /// The report name the toolkit's models use ("enc.1", "dec.3").
    member p.Name = sprintf "%s.%d" (if p.Decoder then "dec" else "enc") p.Layer

/// An encoder or decoder stack (transformers' `T5Stack`): the shared token embedding (held, not registered;
/// the model registers it as `shared`), dropout, `block.N`, `final_layer_norm`, dropout.
type T5Stack(name: string, cfg: T5Config, isDecoder: bool, embed: Tensor -> Tensor, ffnFactory: FfnPlace -> FeedForwardSublayer) as this =
    inherit torch.nn.Module(name)
    let layers = if isDecoder then cfg.NumDecoderLayers else cfg.NumLayers
    let blocks =
        new ModuleList<T5Block>(
            [| for i in 0 .. layers - 1 ->
                 new T5Block(string i, cfg, isDecoder, (i = 0), ffnFactory { Decoder = isDecoder; Layer = i }) |])
    let final_layer_norm = new T5LayerNorm("final_layer_norm", cfg.DModel, cfg.LayerNormEpsilon)
    do
        this.register_module ("block", blocks)
        this.register_module ("final_layer_norm", final_layer_norm)

    /// Every submodule is registered by hand under its Hugging Face name; TorchSharp's registration of fields
    /// by reflection would add them again under the F# field names.
    override _.RegisterComponents() = ()

    member _.Blocks = blocks
    member _.FinalLayerNorm = final_layer_norm

    /// Runs the stack on ids [B; Q] int64. Encoder: `mask` [B; Q] bool (true = real token). Decoder: the
    /// positions continue from the cache's length (0 without one), queries see earlier positions only, and
    /// memory [B; S; D] is attended with memoryMask [B; S] bool. Returns the final-normed states [B; Q; D] and
    /// the sparse sublayers' router traces by place.
    member this.Forward(ids: Tensor, mask: Tensor, memory: Tensor, memoryMask: Tensor, cache: DecoderCache) : Tensor * (FfnPlace * RouterTrace) list =
        use scope = torch.NewDisposeScope()
        let b, q = ids.shape[0], ids.shape[1]
        let device = ids.device
        let hasCache = not (isNull (box cache))
        let offset = if hasCache then cache.Length else 0L
        let keys = offset + q
        let position = blocks[0].SelfAttention.ComputeBias(offset, q, keys, device) // [1; H; Q; L]
        let selfBias =
            if isDecoder then plus position (additiveMask (causalMask device q keys)) // [1; H; Q; L]
            else plus position ((additiveMask mask).view (b, 1L, 1L, q)) // [B; H; Q; Q]
        let crossBias = if isDecoder then (additiveMask memoryMask).view (b, 1L, 1L, memoryMask.shape[1]) else null // [B; 1; 1; S]
        let mutable x = dropoutIf this.training cfg.DropoutRate (embed ids) // [B; Q; D]
        let traces = ResizeArray()
        for i in 0 .. blocks.Count - 1 do
            let layerCache = if hasCache then cache.Layers[i] else null
            let next, trace = blocks[i].Forward(x, selfBias, memory, crossBias, layerCache)
            x <- next
            trace |> Option.iter (fun t -> traces.Add({ Decoder = isDecoder; Layer = i }, t))
        let out = dropoutIf this.training cfg.DropoutRate (final_layer_norm.forward x) // [B; Q; D]
        for _, t in traces do moveTraceOut t
        out.MoveToOuterDisposeScope(), List.ofSeq traces

// ---------------------------------------------------------------- the model

/// A teacher-forced forward pass with labels.
type T5Output =
    { /// [B; L; V] float32
      Logits: Tensor
      /// What transformers' forward returns as `loss`: the cross-entropy plus, for Switch Transformers, the
      /// weighted router losses. // scalar
      Loss: Tensor
      /// Mean cross-entropy over labels other than -100. // scalar
      CrossEntropy: Tensor
      /// The weighted router losses added to the cross-entropy (Switch); None for dense T5.
      RouterLoss: Tensor option
      /// The sparse sublayers' routing reports (encoder first), as the toolkit's models report them.
      Moe: LayerReport list
      /// The sparse sublayers' router decisions by place, encoder first.
      Routers: (FfnPlace * RouterTrace) list }

/// A tensor under its Hugging Face name: its shape, the tensor to export, and how to load a checkpoint's.
type HfTensor =
    { Name: string
      Shape: int64[]
      /// The value as the checkpoint stores it (a detached view or a copy).
      Read: unit -> Tensor
      /// Copies a checkpoint tensor of `Shape` in (called without gradient recording).
      Write: Tensor -> unit
      /// A view of the parameter in the checkpoint's layout that loading copies into (`WeightSource.CopyInto`):
      /// the parameter itself when it is stored as is (read straight into its memory), a transposed view for
      /// Switch's stacked experts (read in bounded slices); None where no view exists (`Write` then gets the
      /// whole tensor).
      Target: Tensor option }

/// Labels the loss ignores (transformers' CrossEntropyLoss ignore_index).
let ignoreIndex = -100L

/// transformers' `_shift_right`: the decoder input is the decoder start token followed by the labels but the
/// last, with -100 replaced by the padding id. labels [B; L] int64 -> [B; L] int64.
let shiftRight (decoderStart: int) (pad: int) (labels: Tensor) : Tensor =
    expectIndex "labels" "[B; L]" 2 labels
    use scope = torch.NewDisposeScope()
    let b, l = labels.shape[0], labels.shape[1]
    let start = withInt64Scalar (int64 decoderStart) (fun s -> torch.full ([| b; 1L |], s, dtype = torch.ScalarType.Int64, device = labels.device))
    let shifted = torch.cat ([| start; labels.narrow (1L, 0L, l - 1L) |], 1L) // [B; L]
    let ignored = withInt64Scalar ignoreIndex (fun i -> shifted.eq i)
    (withInt64Scalar (int64 pad) (fun p -> shifted.masked_fill (ignored, p))).MoveToOuterDisposeScope()

let private checkIds (what: string) (vocab: int) (ids: Tensor) =
    expectIndex what "[B; S]" 2 ids
    if ids.shape[1] < 1L then invalidArg what (sprintf "expected %s with at least one position, got %s" what (describe ids))
    use lo = ids.min ()
    use hi = ids.max ()
    if lo.item<int64> () < 0L || hi.item<int64> () >= int64 vocab then
        invalidArg what (sprintf "expected %s in 0 .. %d (vocab_size - 1), got ids from %d to %d" what (vocab - 1) (lo.item<int64> ()) (hi.item<int64> ()))

let private checkMask (what: string) (ids: Tensor) (mask: Tensor) =
    expect what (sprintf "[%d; %d] bool (true = real token) like the ids" ids.shape[0] ids.shape[1])
        (fun m -> not (isNull m) && m.dtype = torch.ScalarType.Bool && m.shape = ids.shape) mask

/// `T5ForConditionalGeneration`: `shared` token embedding [V; D], `encoder`, `decoder` and, when untied,
/// `lm_head` [V; D]; tied, the output projection is `shared` with its input scaled by d_model^-0.5 (Mesh
/// TensorFlow's convention). `ffnFactory` builds each block's feed-forward sublayer (T5: `T5DenseFfn` as
/// `DenseReluDense`; Switch Transformers: MoE layers in some blocks). Implements `Seq2Seq.ISeq2SeqModel`.
type T5Model(cfg: T5Config, ffnFactory: FfnPlace -> FeedForwardSublayer, className: string) as this =
    inherit torch.nn.Module(className)
    let cfg = Config.orFail "T5 config" (T5Config.validate cfg) cfg
    let shared = Embedding(int64 cfg.VocabSize, int64 cfg.DModel)
    let embed (ids: Tensor) = shared.forward ids
    let encoder = new T5Stack("encoder", cfg, false, embed, ffnFactory)
    let decoder = new T5Stack("decoder", cfg, true, embed, ffnFactory)
    let lm_head = if cfg.TieWordEmbeddings then null else Linear(int64 cfg.DModel, int64 cfg.VocabSize, hasBias = false)
    do
        this.register_module ("shared", shared)
        this.register_module ("encoder", encoder)
        this.register_module ("decoder", decoder)
        if not (isNull lm_head) then this.register_module ("lm_head", lm_head)
        this.eval ()

    let reports (traces: (FfnPlace * RouterTrace) list) : LayerReport list =
        [ for place, t in traces -> { Layer = place.Name; Report = t.Report } ]

    /// Final decoder states [B; L; D] -> logits [B; L; V].
    let project (h: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let logits =
            if isNull lm_head then (mulScalar (1.0 / Math.Sqrt(float cfg.DModel)) h).matmul (shared.weight.t ())
            else lm_head.forward h
        logits.MoveToOuterDisposeScope()

    /// The dense T5 of `cfg`: every feed-forward sublayer a `T5DenseFfn` registered as `DenseReluDense`.
    new(cfg: T5Config) =
        let dense (_: FfnPlace) =
            (new T5DenseFfn("DenseReluDense", cfg.DModel, cfg.DFf, cfg.DenseActFn, cfg.IsGatedAct, cfg.DropoutRate)).AsSublayer "DenseReluDense"
        new T5Model(cfg, dense, "T5ForConditionalGeneration")

    /// Every submodule is registered by hand under its Hugging Face name; TorchSharp's registration of fields
    /// by reflection would add them again under the F# field names.
    override _.RegisterComponents() = ()

    member _.Config = cfg
    /// The token embedding [V; D] of both stacks (and the output projection when tied).
    member _.Shared = shared
    member _.Encoder = encoder
    member _.Decoder = decoder
    /// The untied output projection; null when tied.
    member _.LmHead = lm_head
    /// Every block of both stacks with its place, encoder first.
    member _.Blocks : (FfnPlace * T5Block) list =
        [ for i in 0 .. encoder.Blocks.Count - 1 -> { Decoder = false; Layer = i }, encoder.Blocks[i]
          for i in 0 .. decoder.Blocks.Count - 1 -> { Decoder = true; Layer = i }, decoder.Blocks[i] ]

    /// The router losses added to the cross-entropy, from the sparse sublayers' traces of the encoder and the
    /// decoder; None for a dense model (Switch Transformers override it).
    abstract RouterLoss: encoder: (FfnPlace * RouterTrace) list * decoder: (FfnPlace * RouterTrace) list -> Tensor option
    default _.RouterLoss(_, _) = None

    /// The model's tensors under their Hugging Face names, in the checkpoint's layout (what `stateDict`
    /// exports and `loadInto` fills): T5's are its parameters as named; Switch maps its MoE layers.
    abstract HfTensors: unit -> HfTensor list
    default this.HfTensors() =
        [ for struct (name, p) in this.named_parameters () ->
              { Name = name; Shape = p.shape; Read = (fun () -> p.detach ()); Write = (fun t -> p.copy_ t |> ignore); Target = Some p } ]

    /// Encodes inputIds [B; S] int64 with attentionMask [B; S] bool: the final encoder states [B; S; D] and the
    /// sparse sublayers' traces.
    member _.EncodeTraced(inputIds: Tensor, attentionMask: Tensor) : Tensor * (FfnPlace * RouterTrace) list =
        checkIds "inputIds" cfg.VocabSize inputIds
        checkMask "attentionMask" inputIds attentionMask
        encoder.Forward(inputIds, attentionMask, null, null, Unchecked.defaultof<DecoderCache>)

    /// Logits [B; Q; V] of decoderIds [B; Q] against encoder states [B; S; D] with attentionMask [B; S] bool,
    /// continuing the positions of a non-null cache; and the decoder's sparse sublayers' traces.
    member _.DecodeTraced(decoderIds: Tensor, encoderStates: Tensor, attentionMask: Tensor, cache: DecoderCache) : Tensor * (FfnPlace * RouterTrace) list =
        checkIds "decoderIds" cfg.VocabSize decoderIds
        expect "attentionMask" "[B; S] bool (true = real token)" (fun m -> not (isNull m) && m.dtype = torch.ScalarType.Bool && m.Dimensions = 2L && m.shape[0] = decoderIds.shape[0]) attentionMask
        if not (isNull (box cache)) && cache.Layers.Length <> cfg.NumDecoderLayers then
            invalidArg "cache" (sprintf "expected a cache of %d decoder layers (from NewCache), got %d" cfg.NumDecoderLayers cache.Layers.Length)
        use scope = torch.NewDisposeScope()
        let h, traces = decoder.Forward(decoderIds, null, encoderStates, attentionMask, cache)
        let logits = project h
        for _, t in traces do moveTraceOut t
        logits.MoveToOuterDisposeScope(), traces

    /// transformers' forward with labels: the decoder input is `shiftRight` of labels [B; L] int64 (-100 =
    /// ignored), the loss the mean cross-entropy over the other labels plus `RouterLoss`.
    /// inputIds [B; S] int64, attentionMask [B; S] bool.
    member this.Forward(inputIds: Tensor, attentionMask: Tensor, labels: Tensor) : T5Output =
        expectIndex "labels" "[B; L]" 2 labels
        if labels.shape[0] <> inputIds.shape[0] then
            invalidArg "labels" (sprintf "expected labels [%d; L] (one row per input), got %s" inputIds.shape[0] (describe labels))
        use scope = torch.NewDisposeScope()
        let memory, encTraces = this.EncodeTraced(inputIds, attentionMask)
        let decoderIds = shiftRight cfg.DecoderStartTokenId cfg.PadTokenId labels
        let logits, decTraces = this.DecodeTraced(decoderIds, memory, attentionMask, Unchecked.defaultof<DecoderCache>)
        let v = int64 cfg.VocabSize
        let ce = functional.cross_entropy (logits.reshape (-1L, v), labels.reshape (-1L), ignore_index = ignoreIndex)
        let routerLoss = this.RouterLoss(encTraces, decTraces)
        let loss = match routerLoss with Some r -> plus ce r | None -> ce.alias ()
        let traces = encTraces @ decTraces
        for _, t in traces do moveTraceOut t
        { Logits = logits.MoveToOuterDisposeScope()
          Loss = loss.MoveToOuterDisposeScope()
          CrossEntropy = ce.MoveToOuterDisposeScope()
          RouterLoss = routerLoss |> Option.map (fun r -> r.MoveToOuterDisposeScope())
          Moe = reports traces
          Routers = traces }

    interface ISeq2SeqModel with
        member _.VocabSize = cfg.VocabSize
        member _.NewCache() = new DecoderCache(cfg.NumDecoderLayers)
        member this.Encode(inputIds, attentionMask) =
            let memory, traces = this.EncodeTraced(inputIds, attentionMask)
            { Memory = memory; Moe = reports traces }
        member this.Decode(decoderIds, encoderStates, attentionMask, cache) =
            let logits, traces = this.DecodeTraced(decoderIds, encoderStates, attentionMask, cache)
            { Logits = logits; Moe = reports traces }

// ---------------------------------------------------------------- checkpoints

/// Tensors a T5-family checkpoint may hold that are copies of another (transformers ties them and ignores
/// the stored values): the stacks' embeddings (always `shared`) and, when tied, `lm_head.weight`.
let private tiedCopies (tied: bool) =
    set [ "encoder.embed_tokens.weight"; "decoder.embed_tokens.weight"; if tied then "lm_head.weight" ]

/// Loads a checkpoint's tensors into a model by Hugging Face name (`HfTensors`), one tensor at a time, under
/// no_grad, after checking everything: every tensor the model needs is present with its shape, and the
/// checkpoint holds nothing else but the tied copies transformers ignores. Errors name the checkpoint's
/// files and the tensors.
let loadInto (weights: HfCheckpoint.WeightSource) (model: T5Model) : unit =
    let files = weights.Files |> List.map Path.GetFileName |> String.concat ", "
    let where = sprintf "checkpoint %s (%s)" weights.Folder files
    let expected = model.HfTensors ()
    match [ for t in expected do if not (weights.Contains t.Name) then sprintf "%s %A" t.Name t.Shape ] with
    | [] -> ()
    | missing -> failwithf "%s: missing tensor(s) the model needs: %s" where (String.Join(", ", missing))
    match
        [ for t in expected do
            let info = weights.Info t.Name
            if info.Shape <> t.Shape then sprintf "%s in %s has shape %A, expected %A (from config.json)" t.Name (Path.GetFileName info.File) info.Shape t.Shape ] with
    | [] -> ()
    | wrong -> failwithf "%s: shape mismatch: %s" where (String.Join("; ", wrong))
    let known = set [ for t in expected -> t.Name ]
    let ignorable = tiedCopies model.Config.TieWordEmbeddings
    match [ for n in weights.Names do if not (known.Contains n) && not (ignorable.Contains n) then n ] with
    | [] -> ()
    | extra -> failwithf "%s: tensor(s) the model does not have: %s" where (String.Join(", ", extra))
    use _ = torch.no_grad ()
    for t in expected do
        match t.Target with
        | Some p -> weights.CopyInto(t.Name, p)
        | None ->
            use value = weights.Load(t.Name, torch.ScalarType.Float32)
            t.Write value

/// The model's tensors under their Hugging Face names, as a checkpoint stores them (for `Safetensors.write`).
let stateDict (model: T5Model) : (string * Tensor) list =
    [ for t in model.HfTensors () -> t.Name, t.Read () ]

/// Loads a `T5ForConditionalGeneration` checkpoint folder (`config.json`; weights as `HfCheckpoint.openWeights`
/// finds them: model.safetensors, its shards or pytorch_model.bin), in evaluation mode.
let fromFolder (dir: string) : T5Model =
    let cfg = T5Config.parse (Path.Combine(dir, "config.json"))
    use weights = HfCheckpoint.openWeights dir
    let model = new T5Model(cfg)
    loadInto weights model
    model
