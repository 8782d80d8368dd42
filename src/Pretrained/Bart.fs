/// BART (Lewis et al. 2019, "BART: Denoising Sequence-to-Sequence Pre-training") exactly as transformers 4.45.1's
/// `BartForConditionalGeneration` computes it, with Hugging Face's parameter names so a checkpoint folder loads
/// without renaming. The same modules serve Pegasus (`Moe.Pegasus`): a `Layout` says where the two papers differ
/// (post- or pre-LayerNorm, learned or sinusoidal positions, an embedding LayerNorm or a final one).
/// Axes: N rows (batch), S source positions, T decoder positions, L key positions, D model width (d_model),
/// H heads, Dh = D / H, F feed-forward width, V vocabulary, P position-table rows.
module Moe.Bart

open System
open System.IO
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Config
open Moe.Layers
open Moe.Attention
open Moe.Models
open Moe.Seq2Seq

// ---------------------------------------------------------------- configuration

/// How a stack turns positions into vectors.
type PositionKind =
    /// A learned table whose row p + offset holds position p (BART keeps fairseq's offset of 2).
    | Learned of offset: int
    /// Fixed sinusoids with every sine in the first half of the vector and every cosine in the second
    /// (transformers' `PegasusSinusoidalPositionalEmbedding`), stored as a frozen table of P rows.
    | Sinusoidal

/// Where BART-like families differ from each other (the rest of the architecture is shared).
type Layout =
    { /// config.json's model_type.
      ModelType: string
      /// LayerNorm before each sublayer (Xiong et al. 2020; Pegasus) instead of after the residual sum (BART).
      PreLayerNorm: bool
      Positions: PositionKind
      /// `layernorm_embedding` after adding positions (BART).
      EmbeddingLayerNorm: bool
      /// `layer_norm` after the last layer of each stack (Pegasus, needed with pre-LayerNorm).
      FinalLayerNorm: bool }

module Layout =
    /// BART: post-LayerNorm, learned positions with offset 2, layernorm_embedding (Lewis et al. 2019 sec. 2.1).
    let bart = { ModelType = "bart"; PreLayerNorm = false; Positions = Learned 2; EmbeddingLayerNorm = true; FinalLayerNorm = false }
    /// Pegasus: pre-LayerNorm with a final layer_norm, sinusoidal positions (Zhang et al. 2020 sec. 6).
    let pegasus = { ModelType = "pegasus"; PreLayerNorm = true; Positions = Sinusoidal; EmbeddingLayerNorm = false; FinalLayerNorm = true }

/// The hyper-parameters of `BartConfig` / `PegasusConfig` that change what the model computes.
type BartConfig =
    { Layout: Layout
      /// V (vocab_size).
      VocabSize: int
      /// D (d_model).
      DModel: int
      EncoderLayers: int
      DecoderLayers: int
      EncoderHeads: int
      DecoderHeads: int
      /// F of the encoder's feed-forward sublayers (encoder_ffn_dim).
      EncoderFfnDim: int
      DecoderFfnDim: int
      /// transformers' activation_function name ("gelu", "relu", "gelu_new", ...).
      Activation: string
      /// Dropout on embeddings and on every sublayer's output (training only).
      Dropout: float
      /// Dropout on the attention probabilities (training only).
      AttentionDropout: float
      /// Dropout after the feed-forward activation (training only).
      ActivationDropout: float
      /// Probability of skipping a whole layer in training (Fan et al. 2019, LayerDrop).
      EncoderLayerDrop: float
      DecoderLayerDrop: float
      /// Positions each stack can embed (max_position_embeddings).
      MaxPositions: int
      /// Token embeddings multiplied by sqrt(D) (Vaswani et al. 2017 sec. 3.4).
      ScaleEmbedding: bool
      /// The padding id: its embedding row gets no gradient from the lookup, and labels' -100 become it.
      PadTokenId: int
      /// The first decoder input (shift_tokens_right puts it before the labels).
      DecoderStartTokenId: int
      /// Standard deviation of freshly initialised weights (init_std).
      InitStd: float
      /// The router of the MoE layers that replace every feed-forward sublayer after sparse upcycling
      /// (`upcycle`); None for the dense model a checkpoint holds.
      Moe: RouterConfig option }

/// LayerNorm epsilon: nn.LayerNorm's default, which both families use (no config field).
let layerNormEps = 1e-5
/// Labels equal to this are left out of the loss (torch's CrossEntropyLoss ignore_index).
let ignoreIndex = -100L

/// The activation functions of transformers' ACT2FN that these checkpoints use.
let supportedActivations = [ "gelu"; "relu"; "gelu_new"; "gelu_pytorch_tanh"; "silu"; "swish"; "tanh" ]

/// transformers' activation by name: "gelu" is the exact erf form, "gelu_new" and "gelu_pytorch_tanh" the tanh
/// approximation (Hendrycks & Gimpel 2016). Fails naming the supported ones.
let activation (name: string) : Tensor -> Tensor =
    match name with
    | "gelu" -> fun x -> functional.gelu x
    | "relu" -> fun x -> functional.relu x
    | "gelu_new" | "gelu_pytorch_tanh" -> Gpt2.geluNew
    | "silu" | "swish" -> fun x -> functional.silu x
    | "tanh" -> fun x -> x.tanh ()
    | other -> invalidArg "name" (sprintf "activation_function %s is not supported (supported: %s)" other (String.Join(", ", supportedActivations)))

module BartConfig =
    /// Every problem with a config, empty when it is usable.
    let validate (cfg: BartConfig) : string list =
        [ let positive (name: string) (v: int) = if v < 1 then Some(sprintf "%s must be >= 1, got %d" name v) else None
          yield! [ positive "vocab_size" cfg.VocabSize; positive "d_model" cfg.DModel; positive "encoder_ffn_dim" cfg.EncoderFfnDim
                   positive "decoder_ffn_dim" cfg.DecoderFfnDim; positive "max_position_embeddings" cfg.MaxPositions
                   positive "encoder_attention_heads" cfg.EncoderHeads; positive "decoder_attention_heads" cfg.DecoderHeads ] |> List.choose id
          if cfg.EncoderLayers < 0 || cfg.DecoderLayers < 0 then sprintf "layer counts must be >= 0, got %d and %d" cfg.EncoderLayers cfg.DecoderLayers
          for name, heads in [ "encoder_attention_heads", cfg.EncoderHeads; "decoder_attention_heads", cfg.DecoderHeads ] do
              if heads >= 1 && cfg.DModel % heads <> 0 then sprintf "%s (%d) must divide d_model (%d)" name heads cfg.DModel
          if not (List.contains cfg.Activation supportedActivations) then
              sprintf "activation_function %s is not supported (supported: %s)" cfg.Activation (String.Join(", ", supportedActivations))
          for name, p in [ "dropout", cfg.Dropout; "attention_dropout", cfg.AttentionDropout; "activation_dropout", cfg.ActivationDropout
                           "encoder_layerdrop", cfg.EncoderLayerDrop; "decoder_layerdrop", cfg.DecoderLayerDrop ] do
              if not (p >= 0.0 && p < 1.0) then sprintf "%s must be in [0, 1), got %g" name p
          if cfg.PadTokenId < 0 || cfg.PadTokenId >= cfg.VocabSize then sprintf "pad_token_id must be in [0, %d), got %d" cfg.VocabSize cfg.PadTokenId
          if cfg.DecoderStartTokenId < 0 || cfg.DecoderStartTokenId >= cfg.VocabSize then
              sprintf "decoder_start_token_id must be in [0, %d), got %d" cfg.VocabSize cfg.DecoderStartTokenId ]

    /// Fields of older BART/Pegasus configs that transformers 4.45.1 no longer reads; the layout fixes what they
    /// described, so a value other than the layout's is refused rather than silently computed differently.
    let private legacyLayoutFields (layout: Layout) : (string * string) list =
        [ "normalize_before", (if layout.PreLayerNorm then "true" else "false")
          "add_final_layer_norm", (if layout.FinalLayerNorm then "true" else "false")
          "normalize_embedding", (if layout.EmbeddingLayerNorm then "true" else "false")
          "static_position_embeddings", (if layout.Positions = Sinusoidal then "true" else "false")
          "add_bias_logits", "false"
          "do_blenderbot_90_layernorm", "false" ]
        // the learned table's offset; sinusoidal tables never read it (transformers 3.x ignored it there too)
        @ (match layout.Positions with
           | Learned offset -> [ "extra_pos_embeddings", string offset ]
           | Sinusoidal -> [])

    /// Fields that cannot change the conditional-generation model's output: the classification head's
    /// dropout and label count, distillation and bookkeeping leftovers of older configs, and the pre-4.x
    /// generation flags (generation reads its own settings).
    let private noEffectFields =
        [ "classifier_dropout"; "classif_dropout"; "_num_labels"; "num_labels"; "num_hidden_layers"; "output_past"
          "eos_token_ids"; "student_encoder_layers"; "student_decoder_layers"; "replacing_rate"
          "force_bos_token_to_be_generated" ]

    /// Parses a `config.json` of the given layout's model_type: every field is used, ignored by name (it cannot
    /// change the output), or refused naming it. Missing fields take the transformers config class's defaults.
    let parse (layout: Layout) (path: string) : BartConfig =
        let r = HfConfig.ConfigReader.Open path
        let modelType = r.String "model_type"
        if modelType <> layout.ModelType then r.Unsupported("model_type", sprintf "\"%s\" here" layout.ModelType)
        let pad, start = if layout.ModelType = "bart" then 1, 2 else 0, 0
        let cfg =
            { Layout = layout
              VocabSize = r.IntOr("vocab_size", 50265)
              DModel = r.IntOr("d_model", 1024)
              EncoderLayers = r.IntOr("encoder_layers", 12)
              DecoderLayers = r.IntOr("decoder_layers", 12)
              EncoderHeads = r.IntOr("encoder_attention_heads", 16)
              DecoderHeads = r.IntOr("decoder_attention_heads", 16)
              EncoderFfnDim = r.IntOr("encoder_ffn_dim", 4096)
              DecoderFfnDim = r.IntOr("decoder_ffn_dim", 4096)
              Activation = r.StringOr("activation_function", "gelu")
              Dropout = r.FloatOr("dropout", 0.1)
              AttentionDropout = r.FloatOr("attention_dropout", 0.0)
              ActivationDropout = r.FloatOr("activation_dropout", 0.0)
              EncoderLayerDrop = r.FloatOr("encoder_layerdrop", 0.0)
              DecoderLayerDrop = r.FloatOr("decoder_layerdrop", 0.0)
              MaxPositions = r.IntOr("max_position_embeddings", 1024)
              ScaleEmbedding = r.BoolOr("scale_embedding", false)
              PadTokenId = r.IntOr("pad_token_id", pad)
              DecoderStartTokenId = r.IntOr("decoder_start_token_id", start)
              InitStd = r.FloatOr("init_std", 0.02)
              Moe = None }
        if not (List.contains cfg.Activation supportedActivations) then
            r.Unsupported("activation_function", String.Join(", ", supportedActivations))
        for field, expected in legacyLayoutFields layout do
            match r.Element field with
            | Some v when v.GetRawText() <> expected ->
                r.Unsupported(field, sprintf "%s, which is what %s computes" expected layout.ModelType)
            | _ -> ()
        if layout.Positions = Sinusoidal then r.Ignore [ "extra_pos_embeddings" ]
        r.Ignore noEffectFields
        r.Ignore HfConfig.bookkeepingFields
        r.Finish()
        match validate cfg with
        | [] -> cfg
        | problems -> failwithf "%s: %s" path (String.Join("; ", problems))

// ---------------------------------------------------------------- modules

/// Dropout in training only.
let private dropIn (training: bool) (p: float) (x: Tensor) : Tensor =
    if training && p > 0.0 then functional.dropout(x, p, true) else x

/// Multi-head attention with biased projections named as transformers' `BartAttention` (q_proj, k_proj, v_proj,
/// out_proj); softmax(q k^T / sqrt Dh) v itself is the toolkit's `Attention.attend` (Vaswani et al. 2017 eq. 1),
/// and keys/values are kept in the toolkit's `KvCache`. The projections (and the FFN's fc1/fc2) run through
/// `call`, not `forward`, so forward hooks fire: `Finetune`'s LoRA adapters hook onto these Linear modules.
[<AllowNullLiteral>]
type BartAttention(name: string, dModel: int, heads: int, dropout: float) as this =
    inherit torch.nn.Module(name)
    let d = int64 dModel
    let h = int64 heads
    let dh = int64 (dModel / heads)
    let q_proj = Linear(d, d)
    let k_proj = Linear(d, d)
    let v_proj = Linear(d, d)
    let out_proj = Linear(d, d)
    do this.RegisterComponents()

    /// [N; S; D] -> [N; H; S; Dh].
    let split (x: Tensor) : Tensor = x.view(x.shape[0], x.shape[1], h, dh).transpose(1L, 2L)

    /// Attends q [N; H; T; Dh] over k, v [N; H; L; Dh], merges heads and projects -> [N; T; D].
    let attendProject (mask: Tensor option) (q: Tensor) (k: Tensor) (v: Tensor) : Tensor =
        use _ = torch.NewDisposeScope()
        let o = attend Handwritten (if this.training then dropout else 0.0) mask q k v    // [N; H; T; Dh]
        (out_proj.call (o.transpose(1L, 2L).reshape(q.shape[0], q.shape[2], d))).MoveToOuterDisposeScope()

    member _.QProj = q_proj
    member _.KProj = k_proj
    member _.VProj = v_proj
    member _.OutProj = out_proj

    /// Self-attention over x [N; T; D]: keyValid [N; T] bool (null = all real), `causal` hides later positions,
    /// a non-null cache receives this call's keys and supplies the earlier ones. Returns [N; T; D].
    member _.SelfAttend(x: Tensor, keyValid: Tensor, causal: bool, cache: KvCache) : Tensor =
        use _ = torch.NewDisposeScope()
        let q = split (q_proj.call x)                                           // [N; H; T; Dh]
        let kNew, vNew = split (k_proj.call x), split (v_proj.call x)        // [N; H; T; Dh]
        let k, v =
            if isNull cache then kNew, vNew
            else
                cache.Append(kNew, vNew)
                cache.Keys, cache.Values                                            // [N; H; L; Dh]
        let causalPart = if causal then Some(causalMask x.device x.shape[1] k.shape[2]) else None
        let paddingPart = if isNull keyValid then None else Some(keyPaddingMask keyValid)
        (attendProject (combineMasks causalPart paddingPart) q k v).MoveToOuterDisposeScope()

    /// Cross-attention from x [N; T; D] to encoder states memory [N; S; D] with memoryValid [N; S] bool (null =
    /// all). With a non-null cache, the memory's keys and values are computed once and reused (memory may then be
    /// null). Returns [N; T; D].
    member _.CrossAttend(x: Tensor, memory: Tensor, memoryValid: Tensor, cache: KvCache) : Tensor =
        use _ = torch.NewDisposeScope()
        let q = split (q_proj.call x)                                           // [N; H; T; Dh]
        let k, v =
            if not (isNull cache) && not cache.IsEmpty then cache.Keys, cache.Values
            else
                if isNull memory then invalidArg "memory" "expected encoder states [N; S; D] (only a filled cache lets them be null)"
                let k, v = split (k_proj.call memory), split (v_proj.call memory)  // [N; H; S; Dh]
                if not (isNull cache) then cache.Set(k, v)
                k, v
        let mask = if isNull memoryValid then None else Some(keyPaddingMask memoryValid)
        (attendProject mask q k v).MoveToOuterDisposeScope()

/// The value of the constant hidden unit that carries fc2's bias through an upcycled expert (see
/// `moeConfig`): a power of two that relu and gelu both return exactly in float32 (gelu(16) = 16 Phi(16) = 16),
/// so bias / 16 * 16 is the bias bit for bit.
let private biasUnitInput = 16.0

/// The toolkit's expert activation for a transformers activation name, for upcycling.
let private expertActivation (name: string) : Activation =
    match name with
    | "gelu" -> GELU
    | "relu" -> ReLU
    | other -> invalidArg "name" (sprintf "upcycling needs an activation the toolkit's experts have (gelu, relu); activation_function is %s" other)

/// The MoE layer that replaces a feed-forward sublayer of width F after upcycling. The toolkit's experts
/// have no biases, so fc1's and fc2's ride on one extra input coordinate fixed at 1: experts see (x, 1)
/// (D + 1 wide, so the router also gets a per-expert bias), W1 [D + 1; F + 1] holds fc1's bias in its last
/// row, and the extra hidden unit, fed only by that coordinate with weight `biasUnitInput`, carries fc2's
/// bias through the last row of W2 [F + 1; D + 1]. The extra output coordinate is dropped.
let moeConfig (cfg: BartConfig) (isDecoder: bool) (router: RouterConfig) : MoeConfig =
    { ModelDim = cfg.DModel + 1
      ExpertHidden = (if isDecoder then cfg.DecoderFfnDim else cfg.EncoderFfnDim) + 1
      Activation = expertActivation cfg.Activation
      Router = router
      SharedExperts = 0 }

/// One encoder layer (self-attention, feed-forward) or decoder layer (causal self-attention, cross-attention,
/// feed-forward), named as transformers' BartEncoderLayer / BartDecoderLayer. Each sublayer is wrapped as the
/// layout says: post-LN LN(x + drop(f x)) (BART) or pre-LN x + drop(f (LN x)) (Pegasus). After upcycling the
/// feed-forward sublayer is the toolkit's MoE layer `moe` instead of fc1 and fc2.
type BartLayer(name: string, cfg: BartConfig, isDecoder: bool) as this =
    inherit torch.nn.Module(name)
    let d = int64 cfg.DModel
    let heads = if isDecoder then cfg.DecoderHeads else cfg.EncoderHeads
    let ffnDim = int64 (if isDecoder then cfg.DecoderFfnDim else cfg.EncoderFfnDim)
    let self_attn = new BartAttention("self_attn", cfg.DModel, heads, cfg.AttentionDropout)
    let self_attn_layer_norm = LayerNorm(d, eps = layerNormEps)
    let encoder_attn = if isDecoder then new BartAttention("encoder_attn", cfg.DModel, heads, cfg.AttentionDropout) else null
    let encoder_attn_layer_norm = if isDecoder then LayerNorm(d, eps = layerNormEps) else null
    let moeFfn = cfg.Moe |> Option.map (fun router -> FeedForward.moe (moeConfig cfg isDecoder router))
    let fc1 = if moeFfn.IsNone then Linear(d, ffnDim) else null
    let fc2 = if moeFfn.IsNone then Linear(ffnDim, d) else null
    let moe = match moeFfn with Some f -> f.Module | None -> null
    let final_layer_norm = LayerNorm(d, eps = layerNormEps)
    let act = activation cfg.Activation
    do this.RegisterComponents()

    let sublayer (norm: LayerNorm) (f: Tensor -> Tensor) (x: Tensor) : Tensor =
        if cfg.Layout.PreLayerNorm then plus x (dropIn this.training cfg.Dropout (f (norm.forward x)))
        else norm.forward (plus x (dropIn this.training cfg.Dropout (f x)))

    /// fc2(drop(act(fc1 x))). x [N; T; D] -> [N; T; D].
    let feedForward (x: Tensor) : Tensor =
        fc2.call (dropIn this.training cfg.ActivationDropout (act (fc1.call x)))

    /// The upcycled sublayer on (x, 1) with the tokens' ids (hash routers) and valid [N; T] (padding is not
    /// routed; null = all). x [N; T; D] -> [N; T; D] and the MoE report.
    let moeForward (ids: Tensor) (valid: Tensor) (x: Tensor) : Tensor * MoeReport option =
        use _ = torch.NewDisposeScope()
        let one = torch.ones([| x.shape[0]; x.shape[1]; 1L |], dtype = x.dtype, device = x.device)
        let r = FeedForward.run moeFfn.Value (torch.cat([| x; one |], 2L)) ids valid   // [N; T; D + 1]
        r.Moe |> Option.iter moveReportOut
        r.Output.narrow(2L, 0L, d).MoveToOuterDisposeScope(), r.Moe

    member _.SelfAttention = self_attn
    /// Cross-attention; null in encoder layers.
    member _.EncoderAttention = encoder_attn
    /// The dense feed-forward projections; null after upcycling.
    member _.Fc1 = fc1
    member _.Fc2 = fc2
    /// The MoE layer of an upcycled model; None in the dense model.
    member _.Moe : MoeLayer option = match moe with :? MoeLayer as m -> Some m | _ -> None

    /// x [N; T; D] of token ids [N; T]; valid [N; T] bool masks encoder keys (null = all; decoder layers are
    /// causal instead); memory [N; S; D] and memoryValid [N; S] for cross-attention; cache for incremental
    /// decoding (null = none). Returns the new x and, after upcycling, the MoE layer's report.
    member _.Forward(x: Tensor, ids: Tensor, valid: Tensor, memory: Tensor, memoryValid: Tensor, cache: LayerCache) : Tensor * MoeReport option =
        use _ = torch.NewDisposeScope()
        let selfCache, crossCache = if isNull cache then null, null else cache.Self, cache.Cross
        let x = sublayer self_attn_layer_norm (fun h -> self_attn.SelfAttend(h, (if isDecoder then null else valid), isDecoder, selfCache)) x
        let x =
            if isDecoder then sublayer encoder_attn_layer_norm (fun h -> encoder_attn.CrossAttend(h, memory, memoryValid, crossCache)) x
            else x
        let mutable report = None
        let ffn (h: Tensor) =
            if isNull moe then feedForward h
            else
                let out, r = moeForward ids (if isDecoder then null else valid) h
                report <- r
                out
        let x = sublayer final_layer_norm ffn x
        report |> Option.iter moveReportOut
        x.MoveToOuterDisposeScope(), report

/// transformers' sinusoidal table (`PegasusSinusoidalPositionalEmbedding._init_weight`): row p holds
/// sin(p / 10000^(2k/D)) at column k for k < ceil(D/2) and cos(p / 10000^(2k/D)) at column ceil(D/2) + k,
/// computed in float64 and rounded to float32 as numpy and torch do there. // [P; D] float32
let sinusoidTable (rows: int) (dim: int) : Tensor =
    let sentinel = (dim + 1) / 2
    let values =
        Array.init (rows * dim) (fun i ->
            let p, c = i / dim, i % dim
            let k, trig = if c < sentinel then c, Math.Sin else c - sentinel, Math.Cos
            float32 (trig (float p / Math.Pow(10000.0, float (2 * k) / float dim))))
    torch.tensor(values).reshape(int64 rows, int64 dim)

/// An encoder or decoder stack named as transformers' BartEncoder / BartDecoder (PegasusEncoder / Decoder):
/// embed_positions, layers, and layernorm_embedding or layer_norm as the layout says. The token embedding is
/// the model's `shared` table, reached through `embedTokens` so it is registered once (as transformers'
/// state dict saves it).
type BartStack(name: string, cfg: BartConfig, isDecoder: bool, embedTokens: Tensor -> Tensor) as this =
    inherit torch.nn.Module(name)
    let d = int64 cfg.DModel
    let offset = match cfg.Layout.Positions with Learned o -> int64 o | Sinusoidal -> 0L
    let embed_positions = Embedding(int64 cfg.MaxPositions + offset, d)
    let layerCount = if isDecoder then cfg.DecoderLayers else cfg.EncoderLayers
    let layerDrop = if isDecoder then cfg.DecoderLayerDrop else cfg.EncoderLayerDrop
    /// MoE reports are named by place as the toolkit's own models name them ("enc.1", "dec.0").
    let stackName = if isDecoder then "dec" else "enc"
    let layers = new ModuleList<BartLayer>([| for i in 0 .. layerCount - 1 -> new BartLayer(string i, cfg, isDecoder) |])
    /// LayerDrop (Fan et al. 2019): whether to skip a layer this training step, drawn from libtorch's RNG.
    let dropLayer () =
        use u = torch.rand([| 1L |])
        u.item<float32> () < float32 layerDrop
    let layernorm_embedding = if cfg.Layout.EmbeddingLayerNorm then LayerNorm(d, eps = layerNormEps) else null
    let layer_norm = if cfg.Layout.FinalLayerNorm then LayerNorm(d, eps = layerNormEps) else null
    do
        if cfg.Layout.Positions = Sinusoidal then
            use _ = torch.no_grad ()
            use table = sinusoidTable cfg.MaxPositions cfg.DModel
            embed_positions.weight.copy_ table |> ignore
            // frozen as in transformers (requires_grad = False), yet a parameter saved in the state dict
            embed_positions.weight.requires_grad <- false
        this.RegisterComponents()

    member _.Layers : BartLayer list = [ for l in layers -> l ]
    /// The position table [P (+ offset); D].
    member _.PositionTable = embed_positions

    /// Token ids [N; T] int64 whose positions start at `start` (a decoder continuing a cache) -> states [N; T; D].
    /// valid [N; T] bool masks encoder padding (null = all); memory and memoryValid feed cross-attention; cache
    /// (null = none) holds each decoder layer's keys and values.
    member _.Forward(ids: Tensor, start: int64, valid: Tensor, memory: Tensor, memoryValid: Tensor, cache: DecoderCache) : Tensor * LayerReport list =
        let t = ids.shape[1]
        if start + t > int64 cfg.MaxPositions then
            invalidArg "ids" (sprintf "expected at most max_position_embeddings = %d positions, got positions %d .. %d" cfg.MaxPositions start (start + t - 1L))
        use _ = torch.NewDisposeScope()
        let positions =
            use rows = arange (start + offset) (start + offset + t) torch.ScalarType.Int64 ids.device
            embed_positions.forward rows                                              // [T; D]
        let x = plus (embedTokens ids) positions                                      // [N; T; D]
        let x = if isNull layernorm_embedding then x else layernorm_embedding.forward x
        let mutable x = dropIn this.training cfg.Dropout x
        let reports = ResizeArray<LayerReport>()
        for i in 0 .. layers.Count - 1 do
            if not (this.training && layerDrop > 0.0 && dropLayer ()) then
                let layerCache = if isNull (box cache) then null else cache.Layers[i]
                let next, report = layers[i].Forward(x, ids, valid, memory, memoryValid, layerCache)
                x <- next
                report |> Option.iter (fun r -> reports.Add { Layer = sprintf "%s.%d" stackName i; Report = r })
        let x = if isNull layer_norm then x else layer_norm.forward x
        for r in reports do moveReportOut r.Report
        x.MoveToOuterDisposeScope(), List.ofSeq reports

/// transformers' BartModel / PegasusModel: the `shared` token embedding [V; D] (scaled by sqrt D when
/// scale_embedding) and the two stacks.
type BartModel(cfg: BartConfig) as this =
    inherit torch.nn.Module("model")
    let d = int64 cfg.DModel
    let shared = Embedding(int64 cfg.VocabSize, d, padding_idx = int64 cfg.PadTokenId)
    let scale = if cfg.ScaleEmbedding then Math.Sqrt(float cfg.DModel) else 1.0
    let embedTokens (ids: Tensor) : Tensor =
        let e = shared.forward ids                                                     // [N; T; D]
        if scale = 1.0 then e else mulScalar scale e
    let encoder = new BartStack("encoder", cfg, false, embedTokens)
    let decoder = new BartStack("decoder", cfg, true, embedTokens)
    do this.RegisterComponents()
    member _.Shared = shared
    member _.Encoder = encoder
    member _.Decoder = decoder

/// What the teacher-forced forward returns.
type Seq2SeqLMOutput =
    { /// [N; T; V] float32.
      Logits: Tensor
      /// Mean cross-entropy over labels that are not -100 (transformers' CrossEntropyLoss). Scalar.
      Loss: Tensor
      /// MoE layers' reports (aux losses, routing statistics), encoder first; empty for the dense model.
      Moe: LayerReport list }

/// transformers' shift_tokens_right: decoder inputs are the labels moved one step right behind the decoder
/// start token, with -100 replaced by the padding id. labels [N; T] int64 -> [N; T] int64.
let shiftTokensRight (padTokenId: int) (decoderStartTokenId: int) (labels: Tensor) : Tensor =
    expectIndex "labels" "[N; T]" 2 labels
    use _ = torch.NewDisposeScope()
    let n, t = labels.shape[0], labels.shape[1]
    let first = withInt64Scalar (int64 decoderStartTokenId) (fun s -> torch.full([| n; 1L |], s, dtype = torch.ScalarType.Int64, device = labels.device))
    let shifted = torch.cat([| first; labels.narrow(1L, 0L, t - 1L) |], 1L)              // [N; T]
    let ignored = withInt64Scalar ignoreIndex (fun s -> shifted.eq s)
    (withInt64Scalar (int64 padTokenId) (fun s -> shifted.masked_fill(ignored, s))).MoveToOuterDisposeScope()

/// transformers' BartForConditionalGeneration (and, with the Pegasus layout, PegasusForConditionalGeneration):
/// `model` plus the `final_logits_bias` buffer [1; V]; logits = decoder states x shared^T + final_logits_bias
/// (lm_head is tied to model.shared, so it has no parameter of its own).
type BartForConditionalGeneration(cfg: BartConfig, name: string) as this =
    inherit torch.nn.Module(name)
    let cfg = Config.orFail (sprintf "%s config" cfg.Layout.ModelType) (BartConfig.validate cfg) cfg
    let model = new BartModel(cfg)
    let mutable final_logits_bias = torch.zeros([| 1L; int64 cfg.VocabSize |])           // [1; V]
    do
        this.RegisterComponents()   // registers final_logits_bias as a buffer
        // transformers' _init_weights: linear and embedding weights N(0, init_std), biases and the padding row 0
        use _ = torch.no_grad ()
        for m in this.modules () do
            match m with
            | :? Linear as l ->
                init.normal_(l.weight, 0.0, cfg.InitStd) |> ignore
                init.zeros_(l.bias) |> ignore
            | :? Embedding as e when e.weight.requires_grad ->
                init.normal_(e.weight, 0.0, cfg.InitStd) |> ignore
            | _ -> ()
        model.Shared.weight[int64 cfg.PadTokenId].zero_() |> ignore

    let checkIds (what: string) (ids: Tensor) =
        expectIndex what "[N; T]" 2 ids
        if ids.NumberOfElements > 0L then
            use lo = ids.min ()
            use hi = ids.max ()
            let lo, hi = lo.item<int64> (), hi.item<int64> ()
            if lo < 0L || hi >= int64 cfg.VocabSize then
                invalidArg what (sprintf "expected %s in 0 .. %d (vocab_size - 1), got ids in %d .. %d" what (cfg.VocabSize - 1) lo hi)

    let checkMask (what: string) (ids: Tensor) (mask: Tensor) =
        if not (isNull mask) then
            expect what (sprintf "[%d; %d] bool like the input ids" ids.shape[0] ids.shape[1])
                (fun m -> m.dtype = torch.ScalarType.Bool && m.shape = ids.shape) mask

    /// For `Module.to`: the buffer object is replaced and written back into this field.
    member _.FinalLogitsBias : Tensor = final_logits_bias

    member _.Config = cfg
    member _.Model = model

    /// The name given at construction ("BartForConditionalGeneration", "PegasusForConditionalGeneration").
    member _.ModelName = name

    /// Encodes inputIds [N; S] int64 with attentionMask [N; S] bool (true = real; null = all): the encoder
    /// states [N; S; D] and, after upcycling, the encoder's MoE reports.
    member _.Encode(inputIds: Tensor, attentionMask: Tensor) : EncoderOutput =
        checkIds "inputIds" inputIds
        checkMask "attentionMask" inputIds attentionMask
        let memory, reports = model.Encoder.Forward(inputIds, 0L, attentionMask, null, null, Unchecked.defaultof<DecoderCache>)
        { Memory = memory; Moe = reports }

    /// Logits [N; T; V] of decoderIds [N; T] int64 continuing `cache` (null = the whole prefix from the decoder
    /// start token) against encoder states [N; S; D] (null once the cache holds the cross-attention keys) with
    /// attentionMask [N; S] bool, and, after upcycling, the decoder's MoE reports.
    member _.Decode(decoderIds: Tensor, encoderStates: Tensor, attentionMask: Tensor, cache: DecoderCache) : ModelOutput =
        checkIds "decoderIds" decoderIds
        let hasCache = not (isNull (box cache))
        if hasCache && cache.Layers.Length <> cfg.DecoderLayers then
            invalidArg "cache" (sprintf "expected a cache of %d decoder layers (from NewCache), got %d" cfg.DecoderLayers cache.Layers.Length)
        use _ = torch.NewDisposeScope()
        let start = if hasCache then cache.Length else 0L
        let h, reports = model.Decoder.Forward(decoderIds, start, null, encoderStates, attentionMask, cache)  // [N; T; D]
        let logits = plus (functional.linear(h, model.Shared.weight)) final_logits_bias                       // [N; T; V]
        for r in reports do moveReportOut r.Report
        { Logits = logits.MoveToOuterDisposeScope(); Moe = reports }

    /// Teacher-forced pass for inputIds [N; S], attentionMask [N; S] bool (null = all) and decoderInputIds
    /// [N; T]: logits [N; T; V] and every MoE report, encoder first.
    member this.Logits(inputIds: Tensor, attentionMask: Tensor, decoderInputIds: Tensor) : ModelOutput =
        use _ = torch.NewDisposeScope()
        let encoded = this.Encode(inputIds, attentionMask)
        let out = this.Decode(decoderInputIds, encoded.Memory, attentionMask, Unchecked.defaultof<DecoderCache>)
        let reports = encoded.Moe @ out.Moe
        for r in reports do moveReportOut r.Report
        { Logits = out.Logits.MoveToOuterDisposeScope(); Moe = reports }

    /// transformers' forward with labels: decoder inputs = shift_tokens_right(labels, pad, decoder start), logits
    /// [N; T; V] and the mean cross-entropy over labels [N; T] int64 that are not -100 (MoE balancing losses,
    /// after upcycling, are in the reports for the caller to weight).
    member this.Forward(inputIds: Tensor, attentionMask: Tensor, labels: Tensor) : Seq2SeqLMOutput =
        expectIndex "labels" "[N; T]" 2 labels
        if labels.shape[0] <> inputIds.shape[0] then
            invalidArg "labels" (sprintf "expected labels with %d rows like inputIds, got %s" inputIds.shape[0] (describe labels))
        use _ = torch.NewDisposeScope()
        let decoderInput = shiftTokensRight cfg.PadTokenId cfg.DecoderStartTokenId labels     // [N; T]
        let out = this.Logits(inputIds, attentionMask, decoderInput)                           // [N; T; V]
        let loss = functional.cross_entropy(out.Logits.reshape(-1L, int64 cfg.VocabSize), labels.reshape(-1L), ignore_index = ignoreIndex)
        for r in out.Moe do moveReportOut r.Report
        { Logits = out.Logits.MoveToOuterDisposeScope(); Loss = loss.MoveToOuterDisposeScope(); Moe = out.Moe }

    /// Parameters and buffers under the names a transformers safetensors save writes: the tied lm_head and
    /// embed_tokens are left out (they are model.shared.weight), final_logits_bias is included. (An upcycled
    /// model's MoE layers add their own names.)
    member this.StateDict() : (string * Tensor) list =
        [ for struct (n, p) in this.named_parameters () -> n, (p :> Tensor)
          for struct (n, b) in this.named_buffers () -> n, b ]

    interface ISeq2SeqModel with
        member _.VocabSize = cfg.VocabSize
        member _.NewCache() = new DecoderCache(cfg.DecoderLayers)
        member this.Encode(inputIds, attentionMask) = this.Encode(inputIds, attentionMask)
        member this.Decode(decoderIds, encoderStates, attentionMask, cache) = this.Decode(decoderIds, encoderStates, attentionMask, cache)

// ---------------------------------------------------------------- loading and export

/// transformers' names for the tied copies of model.shared.weight that some checkpoints also store
/// (pytorch_model.bin keeps them; a safetensors save drops them).
let tiedAliases = [ "model.encoder.embed_tokens.weight"; "model.decoder.embed_tokens.weight"; "lm_head.weight" ]

/// How a checkpoint maps onto the model: every name may also appear without the `model.` prefix (BartModel /
/// PegasusModel checkpoints); model.shared.weight may come from its tied copies, which are otherwise unused;
/// final_logits_bias may be absent (zeros, as transformers' _keys_to_ignore_on_load_missing), and so may
/// sinusoidal position tables (computed); fairseq's version markers are skipped as transformers skips them.
let loadOptions (model: BartForConditionalGeneration) : HfCheckpoint.LoadOptions =
    let unprefixed (n: string) = if n.StartsWith "model." then [ n.Substring "model.".Length ] else []
    let shared = "model.shared.weight"
    { Aliases =
        Map [ for n, _ in model.StateDict() ->
                n, (if n = shared then unprefixed n @ tiedAliases @ List.collect unprefixed tiedAliases else unprefixed n) ]
      MayBeAbsent =
        [ yield "^final_logits_bias$"
          if model.Config.Layout.Positions = Sinusoidal then yield @"^model\.(encoder|decoder)\.embed_positions\.weight$" ]
      MayBeUnexpected =
        [ @"^(model\.)?(encoder|decoder)\.embed_tokens\.weight$"; @"^lm_head\.weight$"; @"^(model\.)?(encoder|decoder)\.version$" ] }

/// Reads the weights of a checkpoint folder (model.safetensors, its shards or pytorch_model.bin) into the
/// model, one tensor at a time; errors name the folder, the file and the tensor.
let loadWeights (dir: string) (model: #BartForConditionalGeneration) : unit =
    use weights = HfCheckpoint.openWeights dir
    HfCheckpoint.loadInto weights model (loadOptions (model :> BartForConditionalGeneration)) |> ignore

/// A model of the given layout built by `build` from `dir/config.json` and loaded from its weights, in
/// evaluation mode.
let fromFolderWith<'M when 'M :> BartForConditionalGeneration> (layout: Layout) (build: BartConfig -> 'M) (dir: string) : 'M =
    let cfg = BartConfig.parse layout (Path.Combine(dir, "config.json"))
    let model = build cfg
    loadWeights dir model
    model.eval () |> ignore
    model

/// `BartForConditionalGeneration` from a Hugging Face checkpoint folder (config.json, model.safetensors),
/// in evaluation mode.
let fromFolder (dir: string) : BartForConditionalGeneration =
    fromFolderWith Layout.bart (fun cfg -> new BartForConditionalGeneration(cfg, "BartForConditionalGeneration")) dir

/// The state dict as transformers saves it (see `StateDict`).
let stateDict (model: BartForConditionalGeneration) : (string * Tensor) list = model.StateDict()

// ---------------------------------------------------------------- sparse upcycling

/// Sparse upcycling (Komatsuzaki et al. 2023, sec. 2) of a pretrained BART or Pegasus: a new model whose every
/// feed-forward sublayer is the toolkit's MoE layer with `router` (any of the toolkit's routers), each expert
/// a copy of that layer's fc1/fc2 (with their biases, see `moeConfig`), the routers fresh, everything else
/// copied. With a router whose kept weights sum to 1 (token-choice top-k renormalised, all experts) it computes
/// what the dense model computes until training moves the experts apart. In training mode.
let upcycle (router: RouterConfig) (dense: BartForConditionalGeneration) : BartForConditionalGeneration =
    if dense.Config.Moe.IsSome then invalidArg "dense" "expected a dense model (its config already has MoE layers)"
    let cfg = { dense.Config with Moe = Some router }
    // fail before building anything when the activation has no expert counterpart
    moeConfig cfg false router |> ignore
    let target = new BartForConditionalGeneration(cfg, dense.ModelName)
    use _ = torch.no_grad ()
    let denseTensors = dict (dense.StateDict())
    let moeTensors =
        [ for l in target.Model.Encoder.Layers @ target.Model.Decoder.Layers do
            for struct (_, p) in l.Moe.Value.named_parameters () -> (p :> Tensor).Handle
            for struct (_, b) in l.Moe.Value.named_buffers () -> b.Handle ] |> set
    for n, t in target.StateDict() do
        if not (moeTensors.Contains t.Handle) then t.copy_(denseTensors[n]) |> ignore
    for source, layer in List.zip (dense.Model.Encoder.Layers @ dense.Model.Decoder.Layers) (target.Model.Encoder.Layers @ target.Model.Decoder.Layers) do
        let experts = layer.Moe.Value.Experts
        let e, d, f = int64 experts.Experts, source.Fc1.weight.shape[1], source.Fc1.weight.shape[0]
        let w1 = torch.zeros([| d + 1L; f + 1L |])                               // [D + 1; F + 1]
        w1.narrow(0L, 0L, d).narrow(1L, 0L, f).copy_(source.Fc1.weight.t ()) |> ignore
        w1[d].narrow(0L, 0L, f).copy_(source.Fc1.bias) |> ignore
        w1[d, f] <- torch.tensor(biasUnitInput, dtype = torch.ScalarType.Float32)
        let w2 = torch.zeros([| f + 1L; d + 1L |])                               // [F + 1; D + 1]
        w2.narrow(0L, 0L, f).narrow(1L, 0L, d).copy_(source.Fc2.weight.t ()) |> ignore
        w2[f].narrow(0L, 0L, d).copy_(divScalar biasUnitInput source.Fc2.bias) |> ignore
        experts.W1.copy_(w1.unsqueeze(0L).expand(e, d + 1L, f + 1L)) |> ignore
        experts.W2.copy_(w2.unsqueeze(0L).expand(e, f + 1L, d + 1L)) |> ignore
    target
