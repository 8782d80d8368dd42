/// Llama (Touvron et al. 2023; Llama 3, Dubey et al. 2024) and Qwen2 (Yang et al. 2024) as Hugging Face's
/// `LlamaForCausalLM` and `Qwen2ForCausalLM` (transformers 4.45.1) compute them: pre-norm decoder layers with
/// RMSNorm (Zhang & Sennrich 2019), grouped-query attention (Ainslie et al. 2023) with rotary position
/// embeddings (Su et al. 2021; `rope_scaling` none, "linear" or "llama3"), a SwiGLU MLP (Shazeer 2020), and a
/// language-model head tied to the embeddings or not. The decoder stack here is shared with the MoE families
/// (`Moe.MoeLMs`): a layer's feed-forward sublayer is pluggable (`FeedForward`), and QK-norm (OLMoE) and the
/// attention biases are config switches. Parameter names are Hugging Face's, so checkpoints load by name.
/// Deviations: none in float32 (the shared samples match to 1e-4); Qwen2's sliding-window attention is refused
/// unless off, as is every rope type but default/linear/llama3.
/// Axes: N rows, T positions given, P cached positions, L = P + T key positions, D hidden_size,
/// H query heads, G key/value heads, Dh head_dim, F intermediate_size, V vocabulary, E experts, K picks.
module Moe.Llama

open System
open System.IO
open System.Text.Json
open System.Text.RegularExpressions
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Models
open Moe.CausalLM

type Tensor = torch.Tensor

// ---------------------------------------------------------------- configuration

/// `rope_scaling` of the config (transformers' `ROPE_INIT_FUNCTIONS`).
type RopeScaling =
    | NoScaling
    /// Position interpolation (Chen et al. 2023): every frequency divided by `factor`.
    | LinearScaling of factor: float
    /// Llama 3.1's frequency-dependent scaling: low frequencies divided by `factor`, high ones kept, a smooth
    /// ramp between the wavelengths original_max / low_freq_factor and original_max / high_freq_factor.
    | Llama3Scaling of factor: float * lowFreqFactor: float * highFreqFactor: float * originalMaxPositions: int

/// The shape and switches of a decoder-only Transformer, named as in transformers' configs.
type DecoderConfig =
    { /// The transformers class it mirrors ("LlamaForCausalLM", ...), for messages.
      Architecture: string
      VocabSize: int
      /// D (hidden_size).
      HiddenSize: int
      /// F of the dense MLP (intermediate_size).
      IntermediateSize: int
      NumLayers: int
      /// H (num_attention_heads).
      NumHeads: int
      /// G (num_key_value_heads); H for multi-head attention.
      NumKvHeads: int
      /// Dh (head_dim; hidden_size / H where the family has no such field).
      HeadDim: int
      RmsNormEps: float
      RopeTheta: float
      RopeScaling: RopeScaling
      /// Longest sequence the positions cover (max_position_embeddings); longer inputs are refused.
      MaxPositions: int
      /// lm_head shares the embedding matrix (tie_word_embeddings).
      TieWordEmbeddings: bool
      /// Biases on q_proj, k_proj, v_proj (Llama's attention_bias, always in Qwen2).
      QkvBias: bool
      /// Bias on o_proj (Llama's attention_bias; never in Qwen2).
      OutputBias: bool
      /// Biases in the MLP (Llama's mlp_bias).
      MlpBias: bool
      /// RMSNorm on the projected queries and keys before the heads are split (OLMoE).
      QkNorm: bool
      /// Dropout on the attention probabilities in training (attention_dropout).
      AttentionDropout: float
      PadTokenId: int option
      BosTokenId: int option
      EosTokenIds: int list }

/// Fields of the decoder configs that cannot change what the model computes.
let private ignoredFields =
    [ // initialisation of fresh weights only
      "initializer_range"
      // Llama: the MLP and attention projections split into slices whose results are concatenated again;
      // the same numbers up to summation order
      "pretraining_tp" ]

module DecoderConfig =
    /// transformers' `rope_scaling` dictionary: absent/null, {"rope_type" | "type": "default" | "linear" |
    /// "llama3", ...}; any other type or field is refused naming the file.
    let readRopeScaling (r: HfConfig.ConfigReader) : RopeScaling =
        match r.Element "rope_scaling" with
        | None -> NoScaling
        | Some e when e.ValueKind <> JsonValueKind.Object -> r.Unsupported("rope_scaling", "null or an object")
        | Some e ->
            let fields = [ for p in e.EnumerateObject() -> p.Name, p.Value ]
            let num name =
                match List.tryFind (fun (n, _) -> n = name) fields with
                | Some(_, v) when v.ValueKind = JsonValueKind.Number -> Some(v.GetDouble())
                | Some _ -> r.Unsupported("rope_scaling", sprintf "a number in \"%s\"" name)
                | None -> None
            let need name = match num name with Some v -> v | None -> r.Unsupported("rope_scaling", sprintf "\"%s\" for this rope type" name)
            let kind =
                match List.tryFind (fun (n, _) -> n = "rope_type") fields, List.tryFind (fun (n, _) -> n = "type") fields with
                | Some(_, v), _ | None, Some(_, v) when v.ValueKind = JsonValueKind.String -> v.GetString()
                | _ -> r.Unsupported("rope_scaling", "an object with \"rope_type\" default, linear or llama3")
            let allowed names =
                match fields |> List.filter (fun (n, _) -> not (List.contains n ("rope_type" :: "type" :: names))) with
                | [] -> ()
                | extra -> r.Unsupported("rope_scaling", sprintf "only the fields %s for rope type \"%s\" (got also %s)" (String.Join(", ", names)) kind (String.Join(", ", extra |> List.map fst)))
            match kind with
            | "default" -> allowed []; NoScaling
            | "linear" -> allowed [ "factor" ]; LinearScaling(need "factor")
            | "llama3" ->
                allowed [ "factor"; "low_freq_factor"; "high_freq_factor"; "original_max_position_embeddings" ]
                Llama3Scaling(need "factor", need "low_freq_factor", need "high_freq_factor", int (need "original_max_position_embeddings"))
            | other -> r.Unsupported("rope_scaling", sprintf "rope_type default, linear or llama3, not \"%s\"" other)

    /// Every problem with the config, empty when it is usable.
    let validate (cfg: DecoderConfig) : string list =
        [ for name, v in [ "vocab_size", cfg.VocabSize; "hidden_size", cfg.HiddenSize; "intermediate_size", cfg.IntermediateSize
                           "num_hidden_layers", cfg.NumLayers; "num_attention_heads", cfg.NumHeads; "num_key_value_heads", cfg.NumKvHeads
                           "head_dim", cfg.HeadDim; "max_position_embeddings", cfg.MaxPositions ] do
              if v < 1 then sprintf "%s must be >= 1, got %d" name v
          if cfg.NumKvHeads >= 1 && cfg.NumHeads % cfg.NumKvHeads <> 0 then
              sprintf "num_key_value_heads (%d) must divide num_attention_heads (%d)" cfg.NumKvHeads cfg.NumHeads
          if cfg.HeadDim % 2 <> 0 then sprintf "head_dim must be even for rotary embeddings, got %d" cfg.HeadDim
          if not (cfg.RmsNormEps > 0.0) then sprintf "rms_norm_eps must be > 0, got %g" cfg.RmsNormEps
          if not (cfg.RopeTheta > 0.0) then sprintf "rope_theta must be > 0, got %g" cfg.RopeTheta
          if not (cfg.AttentionDropout >= 0.0 && cfg.AttentionDropout < 1.0) then sprintf "attention_dropout must be in [0, 1), got %g" cfg.AttentionDropout
          match cfg.RopeScaling with
          | LinearScaling f when not (f > 0.0) -> sprintf "rope_scaling factor must be > 0, got %g" f
          | Llama3Scaling(f, lo, hi, _) when not (f > 0.0 && lo > 0.0 && hi > lo) ->
              sprintf "rope_scaling llama3 needs factor > 0 and high_freq_factor > low_freq_factor > 0, got %g, %g, %g" f lo hi
          | _ -> () ]

    /// The fields every decoder family reads the same way. `headDimField`: whether the family honours a
    /// `head_dim` field (Llama does; Qwen2, Mixtral, OLMoE compute hidden_size / H and refuse another value).
    let readShared (r: HfConfig.ConfigReader) (architecture: string) (headDimField: bool) : DecoderConfig =
        match r.StringOr("hidden_act", "silu") with
        | "silu" -> ()
        | _ -> r.Unsupported("hidden_act", "\"silu\" (the SwiGLU MLP)")
        let hidden = r.Int "hidden_size"
        let heads = r.Int "num_attention_heads"
        let derived = if heads > 0 then hidden / heads else 0
        let headDim =
            match r.IntOption "head_dim" with
            | Some d when headDimField -> d
            | Some d when d <> derived -> r.Unsupported("head_dim", sprintf "absent or hidden_size / num_attention_heads = %d (%s computes that)" derived architecture)
            | _ -> derived
        { Architecture = architecture
          VocabSize = r.Int "vocab_size"
          HiddenSize = hidden
          IntermediateSize = r.Int "intermediate_size"
          NumLayers = r.Int "num_hidden_layers"
          NumHeads = heads
          NumKvHeads = r.IntOr("num_key_value_heads", heads)
          HeadDim = headDim
          RmsNormEps = r.FloatOr("rms_norm_eps", 1e-6)
          RopeTheta = r.FloatOr("rope_theta", 10000.0)
          RopeScaling = NoScaling
          MaxPositions = r.Int "max_position_embeddings"
          TieWordEmbeddings = r.BoolOr("tie_word_embeddings", false)
          QkvBias = false
          OutputBias = false
          MlpBias = false
          QkNorm = false
          AttentionDropout = r.FloatOr("attention_dropout", 0.0)
          PadTokenId = r.IntOption "pad_token_id"
          BosTokenId = r.IntOption "bos_token_id"
          EosTokenIds = r.IntList "eos_token_id" }

    /// Marks the bookkeeping and never-computing fields read, refuses anything left, and validates.
    let finish (r: HfConfig.ConfigReader) (cfg: DecoderConfig) : DecoderConfig =
        r.Ignore HfConfig.bookkeepingFields
        r.Ignore ignoredFields
        r.Finish()
        match validate cfg with
        | [] -> cfg
        | problems -> failwithf "%s: %s" r.Path (String.Join("; ", problems))

    /// Qwen2's sliding-window attention: accepted only when off (`use_sliding_window` false; then transformers
    /// ignores `sliding_window` and `max_window_layers`).
    let refuseSlidingWindow (r: HfConfig.ConfigReader) =
        if r.BoolOr("use_sliding_window", false) then
            r.Unsupported("use_sliding_window", "false (sliding-window attention is not implemented)")
        r.Ignore [ "sliding_window"; "max_window_layers" ]

    /// Parses a `LlamaForCausalLM` config.json (model_type "llama").
    let parseLlama (path: string) : DecoderConfig =
        let r = HfConfig.ConfigReader.Open path
        if r.StringOr("model_type", "") <> "llama" then r.Unsupported("model_type", "\"llama\"")
        let bias = r.BoolOr("attention_bias", false)
        let cfg =
            { readShared r "LlamaForCausalLM" true with
                RopeScaling = readRopeScaling r
                QkvBias = bias
                OutputBias = bias
                MlpBias = r.BoolOr("mlp_bias", false) }
        finish r cfg

    /// Parses a `Qwen2ForCausalLM` config.json (model_type "qwen2").
    let parseQwen2 (path: string) : DecoderConfig =
        let r = HfConfig.ConfigReader.Open path
        if r.StringOr("model_type", "") <> "qwen2" then r.Unsupported("model_type", "\"qwen2\"")
        refuseSlidingWindow r
        let cfg = { readShared r "Qwen2ForCausalLM" false with RopeScaling = readRopeScaling r; QkvBias = true }
        finish r cfg

// ---------------------------------------------------------------- norms and rotary embeddings

/// RMSNorm as transformers' LlamaRMSNorm: weight * (x / sqrt(mean(x^2) + eps)) with the normalisation in float32
/// and cast back to x's dtype before the weight. Parameter `weight` [D]. x [..; D] -> [..; D].
[<AllowNullLiteral>]
type RmsNorm(name: string, dim: int, eps: float) as this =
    inherit Module<Tensor, Tensor>(name)
    let mutable weight = new Parameter(torch.ones [| int64 dim |]) // [D]
    do this.register_parameter ("weight", weight)
    override _.RegisterComponents() = ()
    member _.Weight : Tensor = weight
    override _.forward(x: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let x32 = x.to_type torch.ScalarType.Float32
        let variance = (square x32).mean ([| -1L |], keepdim = true) // [..; 1]
        let normed = (x32 * torch.rsqrt (addScalar eps variance)).to_type x.dtype // [..; D]
        (castTo x.dtype weight * normed).MoveToOuterDisposeScope()

/// The rotary inverse frequencies theta^(-2i/Dh), i < Dh/2, after `rope_scaling` (transformers'
/// `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
/// `_compute_llama3_parameters`; the attention factor is 1 for all three). -> [Dh/2] float32.
let inverseFrequencies (cfg: DecoderConfig) : Tensor =
    let dh = cfg.HeadDim
    let baseFreqs = [| for i in 0 .. 2 .. dh - 1 -> 1.0 / Math.Pow(cfg.RopeTheta, float (float32 i / float32 dh)) |]
    let scaled =
        match cfg.RopeScaling with
        | NoScaling -> baseFreqs
        | LinearScaling factor -> baseFreqs |> Array.map (fun f -> f / factor)
        | Llama3Scaling(factor, low, high, original) ->
            let lowWavelen = float original / low
            let highWavelen = float original / high
            [| for f in baseFreqs do
                 let wavelen = 2.0 * Math.PI / f
                 if wavelen < highWavelen then f
                 elif wavelen > lowWavelen then f / factor
                 else
                     let smooth = (float original / wavelen - low) / (high - low)
                     (1.0 - smooth) * f / factor + smooth * f |]
    torch.tensor(scaled |> Array.map float32)

/// cos and sin of the rotary angles position * frequency, each [N; T; Dh] float32 (the Dh/2 angles twice, as
/// transformers concatenates them). positionIds [N; T] int64, invFreq [Dh/2] float32.
let rotaryCosSin (invFreq: Tensor) (positionIds: Tensor) : Tensor * Tensor =
    use scope = torch.NewDisposeScope()
    let angles = positionIds.to_type(torch.ScalarType.Float32).unsqueeze(2L) * invFreq.``to``(positionIds.device).view(1L, 1L, -1L) // [N; T; Dh/2]
    let emb = torch.cat ([| angles; angles |], -1L) // [N; T; Dh]
    emb.cos().MoveToOuterDisposeScope(), emb.sin().MoveToOuterDisposeScope()

/// x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2; x1] over the two halves of the head (Su et al. 2021
/// eq. 34 in transformers' half-split layout). x [N; n; T; Dh]; cos, sin [N; T; Dh] float32.
let applyRotary (cos: Tensor) (sin: Tensor) (x: Tensor) : Tensor =
    use scope = torch.NewDisposeScope()
    let half = x.shape[3] / 2L
    let x1 = x.narrow (3L, 0L, half)
    let x2 = x.narrow (3L, half, half)
    let rotated = torch.cat ([| x2.neg (); x1 |], 3L) // [N; n; T; Dh]
    let c = cos.unsqueeze(1L).to_type x.dtype // [N; 1; T; Dh]
    let s = sin.unsqueeze(1L).to_type x.dtype
    (plus (x * c) (rotated * s)).MoveToOuterDisposeScope()

// ---------------------------------------------------------------- attention and MLP

/// A projection through `call` (forward hooks run: LoRA adapters, `Finetune.applyLora`) when the weights share x's
/// dtype, else `Tensors.linearLayerCast`. x [..; In] -> [..; Out].
let private project (layer: Linear) (x: Tensor) : Tensor =
    if layer.weight.dtype = x.dtype then layer.call x else linearLayerCast layer x

/// `self_attn`: q_proj, k_proj, v_proj, o_proj (biases as the config says) and, with QK-norm, q_norm and k_norm
/// (RMSNorm over all heads' queries [H*Dh] and keys [G*Dh]); rotary embeddings on queries and keys, then the
/// toolkit's grouped-query attention (`Attention.groupedQueryAttention`: softmax in float32, scale 1/sqrt(Dh)).
type DecoderAttention(name: string, cfg: DecoderConfig) as this =
    inherit torch.nn.Module(name)
    let d, h, g, dh = int64 cfg.HiddenSize, int64 cfg.NumHeads, int64 cfg.NumKvHeads, int64 cfg.HeadDim
    let q_proj = Linear(d, h * dh, hasBias = cfg.QkvBias)
    let k_proj = Linear(d, g * dh, hasBias = cfg.QkvBias)
    let v_proj = Linear(d, g * dh, hasBias = cfg.QkvBias)
    let o_proj = Linear(h * dh, d, hasBias = cfg.OutputBias)
    let q_norm = if cfg.QkNorm then new RmsNorm("q_norm", int (h * dh), cfg.RmsNormEps) else null
    let k_norm = if cfg.QkNorm then new RmsNorm("k_norm", int (g * dh), cfg.RmsNormEps) else null
    do
        for key, m in [ "q_proj", q_proj :> torch.nn.Module; "k_proj", k_proj; "v_proj", v_proj; "o_proj", o_proj ] do
            this.register_module (key, m)
        if cfg.QkNorm then
            this.register_module ("q_norm", q_norm)
            this.register_module ("k_norm", k_norm)
    override _.RegisterComponents() = ()

    /// x [N; T; D]; cos, sin [N; T; Dh]; mask [N; 1; T; L] bool; a non-null cache gets this step's keys and
    /// values and supplies the earlier ones. -> [N; T; D].
    member this.Forward(x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Attention.KvCache) : Tensor =
        use scope = torch.NewDisposeScope()
        let n, t = x.shape[0], x.shape[1]
        let heads (count: int64) (y: Tensor) = y.view(n, t, count, dh).transpose(1L, 2L) // [N; count; T; Dh]
        let q = project q_proj x
        let k = project k_proj x
        let q, k = if cfg.QkNorm then q_norm.forward q, k_norm.forward k else q, k
        let q = applyRotary cos sin (heads h q) // [N; H; T; Dh]
        let kNew = applyRotary cos sin (heads g k) // [N; G; T; Dh]
        let vNew = heads g (project v_proj x) // [N; G; T; Dh]
        let k, v =
            if isNull cache then kNew, vNew
            else
                cache.Append(kNew, vNew)
                cache.Keys, cache.Values // [N; G; L; Dh]
        let p = if this.training then cfg.AttentionDropout else 0.0
        let o = Attention.groupedQueryAttention p (Some mask) q k v // [N; H; T; Dh]
        let merged = o.transpose(1L, 2L).reshape(n, t, h * dh) // [N; T; H*Dh]
        (project o_proj merged).MoveToOuterDisposeScope()

/// The SwiGLU MLP (Shazeer 2020): down_proj(silu(gate_proj x) * up_proj x), as LlamaMLP. x [..; D] -> [..; D].
[<AllowNullLiteral>]
type DecoderMlp(name: string, hidden: int, intermediate: int, bias: bool) as this =
    inherit Module<Tensor, Tensor>(name)
    let gate_proj = Linear(int64 hidden, int64 intermediate, hasBias = bias)
    let up_proj = Linear(int64 hidden, int64 intermediate, hasBias = bias)
    let down_proj = Linear(int64 intermediate, int64 hidden, hasBias = bias)
    do
        this.register_module ("gate_proj", gate_proj)
        this.register_module ("up_proj", up_proj)
        this.register_module ("down_proj", down_proj)
    override _.RegisterComponents() = ()
    member _.GateProj = gate_proj
    member _.UpProj = up_proj
    member _.DownProj = down_proj
    override _.forward(x: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let a = functional.silu (project gate_proj x) * project up_proj x
        (project down_proj a).MoveToOuterDisposeScope()

// ---------------------------------------------------------------- decoder layers

/// What an MoE sublayer decided for one forward pass.
type RouterTrace =
    { /// The toolkit's routing: experts [T; K] in rank order, weights, router logits [T; E]. T = N * T tokens.
      Routing: Routing
      /// Unweighted aux losses and statistics, for logs and plots.
      Report: MoeReport }

/// Moves a router trace's tensors to the enclosing dispose scope.
let moveTraceOut (t: RouterTrace) : unit =
    let keep (tensor: Tensor) = tensor.MoveToOuterDisposeScope() |> ignore
    for tensor in [ t.Routing.Experts; t.Routing.Weights; t.Routing.Kept; t.Routing.Gates ] do keep tensor
    t.Routing.Logits |> Option.iter keep
    t.Routing.Probs |> Option.iter keep
    for tensor in [ t.Report.Aux.SwitchAux; t.Report.Aux.Importance; t.Report.Aux.Load; t.Report.Aux.ZLoss
                    t.Report.Stats.TokensPerExpert; t.Report.Stats.DroppedFraction; t.Report.Stats.RouterEntropy ] do
        keep tensor

/// A decoder layer's feed-forward sublayer: the module registered under `Name` (`mlp`, `block_sparse_moe`) and
/// what it computes on the normed x [N; T; D]: the output [N; T; D] and, for an MoE sublayer, its router trace.
type FeedForward =
    { Name: string
      Module: torch.nn.Module
      Run: Tensor -> Tensor * RouterTrace option }

/// The dense SwiGLU MLP as a feed-forward sublayer named `mlp`.
let denseFeedForward (cfg: DecoderConfig) (intermediate: int) : FeedForward =
    let mlp = new DecoderMlp("mlp", cfg.HiddenSize, intermediate, cfg.MlpBias)
    { Name = "mlp"; Module = mlp; Run = fun x -> mlp.forward x, None }

/// One pre-norm decoder layer: x + self_attn(input_layernorm x), then + ffn(post_attention_layernorm x).
type DecoderLayer(name: string, cfg: DecoderConfig, ffn: FeedForward) as this =
    inherit torch.nn.Module(name)
    let input_layernorm = new RmsNorm("input_layernorm", cfg.HiddenSize, cfg.RmsNormEps)
    let self_attn = new DecoderAttention("self_attn", cfg)
    let post_attention_layernorm = new RmsNorm("post_attention_layernorm", cfg.HiddenSize, cfg.RmsNormEps)
    let mutable ffn = ffn
    do
        this.register_module ("input_layernorm", input_layernorm)
        this.register_module ("self_attn", self_attn)
        this.register_module ("post_attention_layernorm", post_attention_layernorm)
        this.register_module (ffn.Name, ffn.Module)
    override _.RegisterComponents() = ()

    member _.SelfAttention = self_attn
    member _.FeedForward = ffn

    /// Replaces the feed-forward sublayer (a swapped router).
    member _.ReplaceFeedForward(sublayer: FeedForward) =
        this.register_module (ffn.Name, null)
        this.register_module (sublayer.Name, sublayer.Module)
        ffn <- sublayer

    /// x [N; T; D] -> the new x and the feed-forward sublayer's router trace.
    member _.Forward(x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Attention.KvCache) : Tensor * RouterTrace option =
        use scope = torch.NewDisposeScope()
        let x = plus x (self_attn.Forward(input_layernorm.forward x, cos, sin, mask, cache))
        let y, trace = ffn.Run (post_attention_layernorm.forward x)
        let out = plus x y
        trace |> Option.iter moveTraceOut
        out.MoveToOuterDisposeScope(), trace

/// A token embedding table, `weight` [V; D] in the default dtype, N(0, 1) as nn.Embedding initialises it.
/// ids [..] int64 -> [..; D]. Not TorchSharp's `Embedding`: its native constructor makes the table in
/// float32 and converts it, which under a bfloat16 default dtype holds an extra float32 copy (1 GiB for
/// Llama-3.2's 128256 x 2048 table) for as long as the module lives.
type TokenEmbedding(name: string, vocab: int, dim: int) as this =
    inherit Module<Tensor, Tensor>(name)
    let table =
        use _ = torch.no_grad ()
        new Parameter(torch.empty([| int64 vocab; int64 dim |]).normal_ ()) // [V; D]
    do this.register_parameter ("weight", table)
    override _.RegisterComponents() = ()
    member _.weight : Parameter = table
    override _.forward(ids: Tensor) : Tensor =
        use flat = ids.reshape -1L
        use rows = table.index_select (0L, flat) // [numel ids; D]
        rows.reshape (Array.append ids.shape [| int64 dim |])

/// `model`: embed_tokens, layers, norm.
type DecoderStack(name: string, cfg: DecoderConfig, feedForward: int -> FeedForward) as this =
    inherit torch.nn.Module(name)
    let embed_tokens = new TokenEmbedding("embed_tokens", cfg.VocabSize, cfg.HiddenSize)
    let layers = new ModuleList<DecoderLayer>([| for i in 0 .. cfg.NumLayers - 1 -> new DecoderLayer(string i, cfg, feedForward i) |])
    let norm = new RmsNorm("norm", cfg.HiddenSize, cfg.RmsNormEps)
    do
        this.register_module ("embed_tokens", embed_tokens)
        this.register_module ("layers", layers)
        this.register_module ("norm", norm)
    override _.RegisterComponents() = ()
    member _.EmbedTokens = embed_tokens
    member _.Layers = layers
    member _.Norm = norm

/// A forward pass's result.
type CausalLMOutput =
    { /// [N; T; V] float32
      Logits: Tensor
      /// transformers' loss when labels were given: cross-entropy plus, for the MoE families with
      /// output_router_logits, router_aux_loss_coef * AuxLoss.
      Loss: Tensor option
      /// The load-balancing loss of the MoE layers (transformers' `load_balancing_loss_func`, unweighted);
      /// None for a dense model.
      AuxLoss: Tensor option
      /// MoE layers' reports, "layers.i", in layer order.
      Moe: LayerReport list
      /// MoE layers' router traces, (layer index, trace), in layer order.
      Routers: (int * RouterTrace) list }

/// Labels the loss ignores (transformers' CrossEntropyLoss ignore_index).
let ignoreIndex = -100L

/// The attention mask of T queries over L = P + T keys: causal, and a key must be a real token; a padding
/// query sees every earlier position instead, so its row stays finite (its output is never read).
/// attentionMask [N; L] bool -> [N; 1; T; L] bool.
let decoderMask (t: int64) (attentionMask: Tensor) : Tensor =
    use scope = torch.NewDisposeScope()
    let n, l = attentionMask.shape[0], attentionMask.shape[1]
    let causal = Attention.causalMask attentionMask.device t l // [1; 1; T; L]
    let keys = attentionMask.view(n, 1L, 1L, l) // [N; 1; 1; L]
    let padQuery = attentionMask.narrow(1L, l - t, t).logical_not().view(n, 1L, t, 1L) // [N; 1; T; 1]
    causal.logical_and(keys.logical_or padQuery).MoveToOuterDisposeScope()

/// A checkpoint tensor under its Hugging Face name, and how to read and write it in the model's layout.
type HfTensor = T5.HfTensor

/// A parameter stored as is under `name`.
let plainTensor (name: string) (p: Tensor) : HfTensor =
    { T5.HfTensor.Name = name; T5.HfTensor.Shape = p.shape; T5.HfTensor.Read = (fun () -> p.detach ()); T5.HfTensor.Write = (fun t -> p.copy_ t |> ignore); T5.HfTensor.Target = Some p }

/// A matrix stored transposed under `name` (the toolkit's [in; out] router and expert weights). p [A; B].
let transposedTensor (name: string) (p: Tensor) : HfTensor =
    { T5.HfTensor.Name = name; T5.HfTensor.Shape = [| p.shape[1]; p.shape[0] |]; T5.HfTensor.Read = (fun () -> p.detach().t ())
      T5.HfTensor.Write = (fun t -> p.copy_ (t.t ()) |> ignore); T5.HfTensor.Target = Some (p.t ()) }

/// Whether a cache was given (DecoderCache is an F# class: null only through interop).
let private hasCache (cache: DecoderCache) = not (isNull (box cache))

/// A decoder-only causal LM: `model` (DecoderStack) and `lm_head` (absent when tied). `feedForward i` builds
/// layer i's feed-forward sublayer. Subclasses add router losses (`RouterLoss`) and map their MoE layers'
/// tensors to Hugging Face's layout (`HfTensors`).
type DecoderOnlyLM(cfg: DecoderConfig, feedForward: int -> FeedForward) as this =
    inherit torch.nn.Module(cfg.Architecture)
    let cfg = Moe.Config.orFail "decoder config" (DecoderConfig.validate cfg) cfg
    let model = new DecoderStack("model", cfg, feedForward)
    let lm_head = if cfg.TieWordEmbeddings then null else Linear(int64 cfg.HiddenSize, int64 cfg.VocabSize, hasBias = false)
    let invFreq = inverseFrequencies cfg // [Dh/2]
    do
        this.register_module ("model", model)
        if not (isNull lm_head) then this.register_module ("lm_head", lm_head)
        this.eval () |> ignore
    override _.RegisterComponents() = ()

    member _.Config = cfg
    member _.Model = model
    member _.Layers : DecoderLayer list = [ for l in model.Layers -> l ]

    /// The unweighted load-balancing loss of the MoE layers' router traces, with the attention mask [N; T]
    /// bool of the tokens routed (None for a dense model).
    abstract AuxLoss : traces: (int * RouterTrace) list * attentionMask: Tensor -> Tensor option
    default _.AuxLoss(_, _) = None

    /// The weight of `AuxLoss` in the loss when labels are given; None when the loss is the cross-entropy alone.
    abstract AuxLossWeight : float option
    default _.AuxLossWeight = None

    /// The model's tensors under Hugging Face's names (what a checkpoint stores): its parameters as named.
    abstract HfTensors : unit -> HfTensor list
    default this.HfTensors() =
        [ for struct (name, p) in this.named_parameters () ->
              plainTensor name (p :> Tensor) ]

    /// Checkpoint names transformers ignores on loading: the tied lm_head and old rotary buffers.
    member _.Ignorable(name: string) =
        (cfg.TieWordEmbeddings && name = "lm_head.weight") || name.EndsWith ".rotary_emb.inv_freq"

    /// The forward pass. inputIds [N; T] int64 continue the cache's P positions; attentionMask [N; P + T] bool
    /// (null: all real); positionIds [N; T] int64 (null: from the mask); labels [N; T] int64 (null: no loss;
    /// -100 ignored; shifted inside, as transformers).
    member this.Forward(inputIds: Tensor, attentionMask: Tensor, positionIds: Tensor, cache: DecoderCache, labels: Tensor) : CausalLMOutput =
        use scope = torch.NewDisposeScope()
        let mask, positions, past =
            CausalLM.prepareInputs cfg.VocabSize cfg.MaxPositions "max_position_embeddings" cfg.NumLayers inputIds attentionMask positionIds cache
        let t = inputIds.shape[1]
        let cos, sin = rotaryCosSin invFreq positions // [N; T; Dh]
        let attnMask = decoderMask t mask // [N; 1; T; L]
        let mutable x = model.EmbedTokens.forward inputIds // [N; T; D]
        let traces = ResizeArray<int * RouterTrace>()
        for i in 0 .. cfg.NumLayers - 1 do
            let layerCache = if hasCache cache then cache.Layers[i].Self else null
            let y, trace = model.Layers[i].Forward(x, cos, sin, attnMask, layerCache)
            x <- y
            trace |> Option.iter (fun tr -> traces.Add((i, tr)))
        let hidden = model.Norm.forward x
        let logits =
            (if isNull lm_head then linearCast (model.EmbedTokens.weight :> Tensor) hidden else linearLayerCast lm_head hidden)
                .to_type torch.ScalarType.Float32 // [N; T; V]
        let traces = List.ofSeq traces
        let aux = this.AuxLoss(traces, mask.narrow(1L, past, t))
        let loss =
            if isNull labels then None
            else
                let ce = CausalLM.shiftedLoss logits labels
                match aux, this.AuxLossWeight with
                | Some a, Some w -> Some(plus ce (mulScalar w a))
                | _ -> Some ce
        let keep (tensor: Tensor) = tensor.MoveToOuterDisposeScope()
        for _, tr in traces do moveTraceOut tr
        { Logits = keep logits
          Loss = loss |> Option.map keep
          AuxLoss = aux |> Option.map keep
          Moe = [ for i, tr in traces -> { Layer = sprintf "layers.%d" i; Report = tr.Report } ]
          Routers = traces }

    /// transformers' forward with labels: the loss (cross-entropy, plus the weighted router loss where the
    /// family adds one) and the MoE reports. inputIds, labels [N; T] int64; attentionMask [N; T] bool or null.
    member this.Loss(inputIds: Tensor, attentionMask: Tensor, labels: Tensor) : Tensor * LayerReport list =
        let out = this.Forward(inputIds, attentionMask, null, Unchecked.defaultof<DecoderCache>, labels)
        out.Logits.Dispose()
        out.AuxLoss |> Option.iter (fun t -> t.Dispose())
        Option.get out.Loss, out.Moe

    /// An empty cache of one self-attention entry per layer.
    member _.NewCache() : DecoderCache = new DecoderCache(cfg.NumLayers)

    interface ICausalLM with
        member _.VocabSize = cfg.VocabSize
        member this.NewCache() = this.NewCache()
        member this.Forward(inputIds, attentionMask, positionIds, cache) =
            let out = this.Forward(inputIds, attentionMask, positionIds, cache, null)
            { Logits = out.Logits; Moe = out.Moe }

// ---------------------------------------------------------------- checkpoints

/// Loads a checkpoint's tensors into a model by Hugging Face name (`HfTensors`) under no_grad, after checking
/// everything: every tensor the model needs is present with its shape, and the checkpoint holds nothing else
/// but what transformers ignores (`Ignorable`). Errors name the checkpoint's files and the tensors.
let loadInto (weights: HfCheckpoint.WeightSource) (model: DecoderOnlyLM) : unit =
    let where = sprintf "checkpoint %s (%s)" weights.Folder (weights.Files |> List.map Path.GetFileName |> String.concat ", ")
    let expected = model.HfTensors ()
    let problems =
        [ for t in expected do
            if not (weights.Contains t.Name) then sprintf "missing %s %A" t.Name t.Shape
            elif (weights.Info t.Name).Shape <> t.Shape then
                sprintf "%s has shape %A, expected %A (from config.json)" t.Name (weights.Info t.Name).Shape t.Shape
          let known = set [ for t in expected -> t.Name ]
          for name in weights.Names do
              if not (known.Contains name) && not (model.Ignorable name) then sprintf "unexpected %s (the model has no such tensor)" name ]
    if not problems.IsEmpty then failwithf "%s: %s" where (String.Join("; ", problems))
    use _ = torch.no_grad ()
    for t in expected do
        match t.Target with
        | Some p -> weights.CopyInto(t.Name, p)
        | None ->
            use value = weights.Load(t.Name, torch.ScalarType.Float32)
            t.Write value

/// The model's tensors under their Hugging Face names, as a checkpoint stores them.
let stateDict (model: DecoderOnlyLM) : (string * Tensor) list = [ for t in model.HfTensors () -> t.Name, t.Read () ]

/// Builds the model of a config and loads the folder's weights (`HfCheckpoint.openWeights`), in evaluation mode.
let load (dir: string) (build: unit -> DecoderOnlyLM) : DecoderOnlyLM =
    use weights = HfCheckpoint.openWeights dir
    let model = build ()
    loadInto weights model
    model

/// `LlamaForCausalLM`: the decoder stack with the dense SwiGLU MLP in every layer.
type LlamaForCausalLM(cfg: DecoderConfig) =
    inherit DecoderOnlyLM(cfg, fun _ -> denseFeedForward cfg cfg.IntermediateSize)

/// `Qwen2ForCausalLM`: Llama's modules with q/k/v biases (the config from `DecoderConfig.parseQwen2`).
type Qwen2ForCausalLM(cfg: DecoderConfig) =
    inherit DecoderOnlyLM(cfg, fun _ -> denseFeedForward cfg cfg.IntermediateSize)

/// Loads a `LlamaForCausalLM` checkpoint folder (config.json and its weights), in evaluation mode.
let llamaFromFolder (dir: string) : LlamaForCausalLM =
    let cfg = DecoderConfig.parseLlama (Path.Combine(dir, "config.json"))
    load dir (fun () -> new LlamaForCausalLM(cfg)) :?> LlamaForCausalLM

/// Loads a `Qwen2ForCausalLM` checkpoint folder (config.json and its weights), in evaluation mode.
let qwen2FromFolder (dir: string) : Qwen2ForCausalLM =
    let cfg = DecoderConfig.parseQwen2 (Path.Combine(dir, "config.json"))
    load dir (fun () -> new Qwen2ForCausalLM(cfg)) :?> Qwen2ForCausalLM
