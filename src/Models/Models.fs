/// Pre-LayerNorm Transformers whose feed-forward sublayers are dense FFNs or sparse MoE layers: an
/// encoder-decoder (Vaswani et al. 2017) and a decoder-only variant (GPT), built from the same blocks, each
/// runnable in bf16 mixed precision over float32 master weights (`Precision`).
/// Axes: B batch, S source positions, L target positions, D model width, V vocabulary, E experts, K picks.
module Moe.Models

open System
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Config
open Moe.Layers
open Moe.Attention

// ---------------------------------------------------------------- configuration

/// What the feed-forward sublayers are.
type FfnKind =
    /// A dense FFN of this hidden width in every layer (the baseline).
    | Dense of hidden: int
    /// MoE layers every `MoeEvery`-th layer; the dense layers between them use the experts' hidden width
    /// and activation, as in the Switch Transformer's interleaving (Fedus et al. 2022, sec. 2).
    | Moe of MoeConfig
    /// `Moe` whose experts are LoRA adapters on one shared base FFN (`Layers.LoraMoeLayer`, Hu et al. 2021);
    /// placed by `MoeEvery` like `Moe`.
    | LoraMoe of MoeConfig * LoraConfig

/// How positions enter the embeddings.
type PositionalEncoding =
    /// Fixed sines and cosines (Vaswani et al. 2017 sec. 3.5).
    | Sinusoidal
    /// A trained table of `MaxLength` vectors per stack.
    | Learned

type ModelConfig =
    { /// Token ids are in 0 .. VocabSize - 1.
      VocabSize: int
      ModelDim: int
      /// Query heads per attention sublayer.
      Heads: int
      /// Key/value heads (divides Heads): Heads for multi-head, 1 for multi-query attention.
      KvHeads: int
      /// Encoder blocks (0 leaves only the embeddings and the final norm).
      EncoderLayers: int
      /// Decoder blocks (also the depth of the decoder-only model).
      DecoderLayers: int
      /// Dropout on the embeddings and on each sublayer's output before the residual addition, in training
      /// only (Vaswani et al. 2017 sec. 5.4).
      Dropout: float
      /// Dropout on the attention probabilities, in training only (tensor2tensor, T5). 0 by default, as in
      /// Vaswani et al. and BART's configuration: libtorch draws CPU dropout masks on one thread, and a mask
      /// for every [B; H; S; S] probability made the default summarizer's training step 23% slower
      /// (133 vs 108 ms, 2 threads; `./moe bench train-step --profile`).
      AttentionDropout: float
      /// Longest sequence a stack accepts (the learned position table's size).
      MaxLength: int
      Ffn: FfnKind
      /// Activation of the `Dense` FFN (MoE experts use their config's).
      Activation: Activation
      /// With `Moe`, layer i (0-based) is an MoE layer when (i + 1) % MoeEvery = 0: 1 = every layer,
      /// 2 = every other layer (Switch Transformer, GShard).
      MoeEvery: int
      Attention: AttentionImpl
      /// Share the input embedding with the output projection (Press & Wolf 2017; Vaswani et al. sec. 3.4).
      TiedEmbeddings: bool
      Positional: PositionalEncoding
      /// LayerNorm's epsilon (the library's default).
      LayerNormEps: float }

module ModelConfig =
    /// A small dense model: 2 + 2 layers of width 64, 4 heads, FFN 256, sinusoidal positions, tied embeddings.
    let defaults =
        { VocabSize = 512
          ModelDim = 64
          Heads = 4
          KvHeads = 4
          EncoderLayers = 2
          DecoderLayers = 2
          Dropout = 0.1
          AttentionDropout = 0.0
          MaxLength = 256
          Ffn = Dense 256
          Activation = GELU
          MoeEvery = 1
          Attention = Handwritten
          TiedEmbeddings = true
          Positional = Sinusoidal
          LayerNormEps = 1e-5 }

    /// The attention sublayers' config.
    let attention (cfg: ModelConfig) : AttentionConfig =
        { ModelDim = cfg.ModelDim; Heads = cfg.Heads; KvHeads = cfg.KvHeads; Dropout = cfg.AttentionDropout; Impl = cfg.Attention }

    /// Whether layer `layer` (0-based, within its stack) has an MoE feed-forward sublayer.
    let isMoeLayer (cfg: ModelConfig) (layer: int) : bool =
        match cfg.Ffn with
        | Moe _ | LoraMoe _ -> cfg.MoeEvery >= 1 && (layer + 1) % cfg.MoeEvery = 0
        | Dense _ -> false

    /// Every problem with the config, empty when it is usable.
    let validate (cfg: ModelConfig) : string list =
        [ if cfg.VocabSize < 2 then sprintf "VocabSize must be >= 2, got %d" cfg.VocabSize
          for name, p in [ "Dropout", cfg.Dropout; "AttentionDropout", cfg.AttentionDropout ] do
              if not (p >= 0.0 && p < 1.0) then sprintf "%s must be in [0, 1), got %g" name p
          yield! AttentionConfig.validate { attention cfg with Dropout = 0.0 } // its dropout is AttentionDropout, checked above
          if cfg.EncoderLayers < 0 then sprintf "EncoderLayers must be >= 0, got %d" cfg.EncoderLayers
          if cfg.DecoderLayers < 1 then sprintf "DecoderLayers must be >= 1, got %d" cfg.DecoderLayers
          if cfg.MaxLength < 2 then sprintf "MaxLength must be >= 2, got %d" cfg.MaxLength
          if not (cfg.LayerNormEps > 0.0) then sprintf "LayerNormEps must be > 0, got %g" cfg.LayerNormEps
          if cfg.Positional = Sinusoidal && cfg.ModelDim % 2 <> 0 then
              sprintf "sinusoidal positions need an even ModelDim, got %d" cfg.ModelDim
          match cfg.Ffn with
          | Dense hidden -> if hidden < 1 then sprintf "Dense FFN hidden width must be >= 1, got %d" hidden
          | Moe moe | LoraMoe (moe, _) ->
              for p in MoeConfig.validate moe do "Moe: " + p
              match cfg.Ffn with
              | LoraMoe (_, lora) -> for p in LoraConfig.validate lora do "Lora: " + p
              | _ -> ()
              if moe.ModelDim <> cfg.ModelDim then
                  sprintf "Moe.ModelDim (%d) must equal ModelDim (%d)" moe.ModelDim cfg.ModelDim
              if cfg.MoeEvery < 1 then sprintf "MoeEvery must be >= 1, got %d" cfg.MoeEvery
              elif cfg.MoeEvery > max cfg.EncoderLayers cfg.DecoderLayers then
                  sprintf "MoeEvery (%d) exceeds every stack's depth (%d encoder, %d decoder layers): no layer would be MoE"
                      cfg.MoeEvery cfg.EncoderLayers cfg.DecoderLayers ]

// ---------------------------------------------------------------- feed-forward sublayers

/// Which stack a block belongs to.
type Stack =
    | Encoder
    | Decoder

/// Where a feed-forward sublayer sits: its stack, 0-based layer index and report name ("enc.1", "dec.3").
type FfnSite =
    { Stack: Stack
      Layer: int
      Name: string }

/// A block's feed-forward sublayer as the factory builds it.
type FeedForward =
    { /// The sublayer; registered in its block as `ffn`.
      Module: Module<Tensor, FfnResult>
      /// Called instead of `Module.forward` with x [T; D] and the tokens' ids [T] int64, for FFNs that
      /// route on token ids (hash layers); None when the FFN needs only x [B; S; D].
      WithTokenIds: (Tensor -> Tensor -> FfnResult) option
      /// Drop padding positions before the sublayer, so routing statistics and capacity count real tokens only.
      SkipPadding: bool
      /// Parameters one token uses: all of a dense FFN's; an MoE layer's router, shared experts and k experts.
      ActiveParameters: int64 }

    /// For C#: a sublayer from its module, a forward taking (x [T; D], token ids [T]) or null when it needs
    /// none, whether padding is dropped before it, and the parameters one token uses.
    static member Create(m: Module<Tensor, FfnResult>, withTokenIds: Func<Tensor, Tensor, FfnResult>, skipPadding: bool, activeParameters: int64) =
        { Module = m
          WithTokenIds = if isNull withTokenIds then None else Some(fun x ids -> withTokenIds.Invoke(x, ids))
          SkipPadding = skipPadding
          ActiveParameters = activeParameters }

/// Number of scalars in a module's parameters.
let parameterCount (m: torch.nn.Module) : int64 =
    m.parameters () |> Seq.sumBy (fun p -> p.NumberOfElements)

/// Number of scalars in a module's parameters that the optimiser updates (requires_grad).
let trainableParameterCount (m: torch.nn.Module) : int64 =
    m.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.sumBy (fun p -> p.NumberOfElements)

/// Moves a report's tensors to the enclosing dispose scope (they outlive the scope that made them).
let moveReportOut (r: MoeReport) : unit =
    for t in [ r.Aux.SwitchAux; r.Aux.Importance; r.Aux.Load; r.Aux.ZLoss
               r.Stats.TokensPerExpert; r.Stats.DroppedFraction; r.Stats.RouterEntropy ] do
        if not (isNull t) then t.MoveToOuterDisposeScope() |> ignore

module FeedForward =
    /// A dense FFN sublayer: every parameter is active.
    let dense (m: Module<Tensor, FfnResult>) : FeedForward =
        { Module = m; WithTokenIds = None; SkipPadding = false; ActiveParameters = parameterCount m }

    /// Runs the sublayer on x [B; S; D] with the block's token ids [B; S] and, when it skips padding,
    /// valid [B; S] bool (null = all real). Returns the output [B; S; D] and the MoE report, if any.
    let run (ffn: FeedForward) (x: Tensor) (tokenIds: Tensor) (valid: Tensor) : FfnResult =
        use _ = torch.NewDisposeScope()
        let b, s, d = x.shape[0], x.shape[1], x.shape[2]
        let call (rows: Tensor) (ids: Tensor) =                                // rows [T; D], ids [T]
            match ffn.WithTokenIds with
            | Some f -> f rows ids
            | None -> ffn.Module.forward rows
        let result =
            if ffn.SkipPadding && not (isNull valid) then
                let keep = valid.reshape(-1L).nonzero().squeeze(1L)             // [T] int64
                let rows = x.reshape(-1L, d).index_select(0L, keep)           // [T; D]
                let ids = tokenIds.reshape(-1L).index_select(0L, keep)         // [T]
                let r = call rows ids
                let full = torch.zeros([| b * s; d |], dtype = x.dtype, device = x.device).index_copy(0L, keep, r.Output)
                { r with Output = full.view(b, s, d) }                          // [B; S; D], 0 at padding
            elif ffn.WithTokenIds.IsSome then
                let r = call (x.reshape(-1L, d)) (tokenIds.reshape(-1L))
                { r with Output = r.Output.view(b, s, d) }
            else ffn.Module.forward x
        result.Moe |> Option.iter moveReportOut
        { result with Output = result.Output.MoveToOuterDisposeScope() }

    /// A routed sublayer: padding dropped before routing (statistics and capacity count real tokens only),
    /// and `withIds` called with the token ids when the router hashes them.
    let private routed (cfg: MoeConfig) (m: Module<Tensor, FfnResult>) (withIds: Tensor -> Tensor -> FfnResult) (active: int64) : FeedForward =
        { Module = m
          WithTokenIds = (match cfg.Router.Selection with Hash _ -> Some withIds | _ -> None)
          SkipPadding = true
          ActiveParameters = active }

    /// An MoE sublayer (`Layers.MoeLayer`) that drops padding before routing and, for hash routers, passes
    /// the token ids. Active parameters: all but the (E - k) experts a token skips, k = picks per token.
    let moe (cfg: MoeConfig) : FeedForward =
        let layer = new MoeLayer("ffn", cfg)
        let experts = int64 cfg.Router.Experts
        let picks = int64 (RouterConfig.picksPerToken cfg.Router)
        let perExpert = parameterCount layer.Experts / experts
        routed cfg layer (fun x ids -> layer.forward(x, ids)) (parameterCount layer - (experts - picks) * perExpert)

    /// An MoE sublayer of LoRA experts (`Layers.LoraMoeLayer`), wired like `moe`. Active parameters: all but
    /// the adapters of the (E - k) experts a token skips; the shared base FFN is always active.
    let loraMoe (cfg: MoeConfig) (lora: LoraConfig) : FeedForward =
        let layer = new LoraMoeLayer("ffn", cfg, lora)
        let skipped = int64 (cfg.Router.Experts - RouterConfig.picksPerToken cfg.Router)
        routed cfg layer (fun x ids -> layer.forward(x, ids)) (parameterCount layer - skipped * layer.Experts.AdapterParametersPerExpert)

    /// The default factory: a `DenseFfn` for `Dense`, and for `Moe` an MoE layer where
    /// `ModelConfig.isMoeLayer` says so and a dense FFN of the experts' width elsewhere (`LoraMoe` likewise).
    let create (cfg: ModelConfig) (site: FfnSite) : FeedForward =
        match cfg.Ffn with
        | Dense hidden -> dense (new DenseFfn("ffn", cfg.ModelDim, hidden, cfg.Activation))
        | Moe m | LoraMoe (m, _) when not (ModelConfig.isMoeLayer cfg site.Layer) ->
            dense (new DenseFfn("ffn", cfg.ModelDim, m.ExpertHidden, m.Activation))
        | Moe m -> moe m
        | LoraMoe (m, lora) -> loraMoe m lora

// ---------------------------------------------------------------- caches and outputs

/// One decoder block's caches: self-attention keys grow per step; cross-attention keys are set once.
[<AllowNullLiteral>]
type LayerCache() =
    let self = new KvCache()
    let cross = new KvCache()
    member _.Self = self
    member _.Cross = cross
    member _.Bytes = self.Bytes + cross.Bytes
    interface IDisposable with
        member _.Dispose() =
            (self :> IDisposable).Dispose()
            (cross :> IDisposable).Dispose()

/// The caches of every decoder block, for incremental decoding. Dispose it when done.
type DecoderCache(layers: int) =
    let caches = Array.init layers (fun _ -> new LayerCache())
    member _.Layers : LayerCache[] = caches
    /// Positions decoded so far.
    member _.Length : int64 = if caches.Length = 0 then 0L else caches[0].Self.Length
    /// Bytes held by all self- and cross-attention keys and values.
    member _.Bytes : int64 = caches |> Array.sumBy (fun c -> c.Bytes)
    /// Bytes held by the self-attention caches only (what grows with the output length).
    member _.SelfAttentionBytes : int64 = caches |> Array.sumBy (fun c -> c.Self.Bytes)
    /// Keeps batch rows `rows` [B'] int64 in that order; cross-attention caches too when `includeCross`
    /// (beam search moves hypotheses only within a source's own rows, so it can leave them).
    member _.Reorder(rows: Tensor, includeCross: bool) =
        for c in caches do
            c.Self.Reorder rows
            if includeCross then c.Cross.Reorder rows
    interface IDisposable with
        member _.Dispose() = for c in caches do (c :> IDisposable).Dispose()

/// One MoE layer's report, named by its place ("enc.1", "dec.3").
type LayerReport =
    { Layer: string
      Report: MoeReport }

/// The encoder's result.
type EncoderOutput =
    { /// Final-normed encoder states. // [B; S; D]
      Memory: Tensor
      /// MoE layers' reports in layer order.
      Moe: LayerReport list }

/// A model's result.
type ModelOutput =
    { /// Next-token logits. // [B; L; V]
      Logits: Tensor
      /// MoE layers' reports in layer order (encoder first); empty for a dense model.
      Moe: LayerReport list }

/// Total parameters, and those one token uses (shared parameters plus k experts per MoE layer).
type ParameterCount =
    { Total: int64
      Active: int64 }

// ---------------------------------------------------------------- precision

/// The dtype a model's matmuls run in: bf16 mixed precision with float32 master weights (Micikevicius et
/// al. 2018), written out because TorchSharp 0.107 has no autocast. With `BFloat16` the inputs of every
/// projection (attention q, k, v, o; dense FFNs and MoE experts; the output projection) are cast to
/// bfloat16 and the float32 weights are cast on the fly (differentiably, so gradients and optimizer state
/// stay float32); the residual stream, LayerNorms, attention softmax, routing and the logits handed to the
/// loss stay float32, as in PyTorch's autocast op lists.
[<RequireQualifiedAccess>]
type Precision =
    /// No casts: everything runs in the parameters' own dtype (float32, or float64 for gradient checks).
    | Full
    /// bfloat16 matmuls over float32 master weights; norms, softmax, routing and logits in float32.
    | BFloat16

module Precision =
    /// Casts a sublayer input to the compute dtype (the identity for `Full`).
    let cast (p: Precision) (t: Tensor) : Tensor =
        match p with
        | Precision.Full -> t
        | Precision.BFloat16 -> castTo torch.ScalarType.BFloat16 t

    /// Logits for the loss: float32 after a bfloat16 output projection (autocast runs the loss in float32),
    /// untouched otherwise.
    let logits (p: Precision) (t: Tensor) : Tensor =
        match p with
        | Precision.Full -> t
        | Precision.BFloat16 -> t.to_type torch.ScalarType.Float32

/// A model whose matmuls can run in bfloat16 over float32 master weights: what `TrainConfig.Bf16` sets.
type IMixedPrecision =
    /// The compute precision of forward passes (training, validation and generation alike).
    abstract Precision: Precision with get, set

// ---------------------------------------------------------------- blocks

/// Pre-LayerNorm Transformer block (Xiong et al. 2020): x + Attn(LN x), then, with a memory, x + Cross(LN x, memory),
/// then x + FFN(LN x); dropout on each residual branch. The residual stream x and the LayerNorms stay in
/// x's dtype (float32); each normed sublayer input (and the memory) is cast to `Precision`'s compute dtype,
/// and the sublayer's output is added back to the residual, which the addition promotes to float32.
type Block(name: string, cfg: ModelConfig, causal: bool, withCross: bool, feedForward: FeedForward) as this =
    inherit torch.nn.Module(name)
    let d = int64 cfg.ModelDim
    let attnNorm = LayerNorm(d, eps = cfg.LayerNormEps)
    let attn = new GroupedQueryAttention("attn", ModelConfig.attention cfg)
    let crossNorm = if withCross then LayerNorm(d, eps = cfg.LayerNormEps) else null
    let cross = if withCross then new GroupedQueryAttention("cross", ModelConfig.attention cfg) else null
    let ffnNorm = LayerNorm(d, eps = cfg.LayerNormEps)
    let ffn = feedForward.Module
    do this.RegisterComponents()

    let mutable precision = Precision.Full

    let residualDropout (t: Tensor) =
        if this.training && cfg.Dropout > 0.0 then functional.dropout(t, cfg.Dropout, true) else t

    member _.Name = name
    /// The dtype the sublayers compute in (the model sets it on every block).
    member _.Precision with get () = precision and set (p: Precision) = precision <- p
    member _.Attention = attn
    /// Cross-attention sublayer; null in encoder and decoder-only blocks.
    member _.CrossAttention = cross
    member _.FeedForward = feedForward
    /// The feed-forward sublayer's module (registered as `ffn`).
    member _.Ffn = ffn
    member _.Causal = causal

    /// x [B; S; D] with its token ids [B; S] and valid [B; S] bool (null = all real); memory [B; L; D] and
    /// memoryValid [B; L] for cross-attention (ignored without it); cache for incremental decoding (null = none).
    /// Returns the new x [B; S; D] and the FFN's MoE report.
    member _.Forward(x: Tensor, tokenIds: Tensor, valid: Tensor, memory: Tensor, memoryValid: Tensor, cache: LayerCache) : Tensor * MoeReport option =
        use _ = torch.NewDisposeScope()
        let compute = Precision.cast precision
        let memory = if isNull memory then memory else compute memory            // [B; L; D]
        let selfCache = if isNull cache then null else cache.Self
        // With a cache, valid covers only the new positions; earlier ones were real when they were decoded.
        let keyValid =
            if isNull valid || isNull cache || cache.Self.IsEmpty then valid
            else
                use earlier = torch.ones([| x.shape[0]; cache.Self.Length |], dtype = torch.ScalarType.Bool, device = x.device)
                torch.cat([| earlier; valid |], 1L)
        let x = plus x (residualDropout (attn.SelfAttend(compute (attnNorm.forward x), keyValid, causal, selfCache)))  // [B; S; D]
        let x =
            if isNull cross then x
            else
                let crossCache = if isNull cache then null else cache.Cross
                plus x (residualDropout (cross.CrossAttend(compute (crossNorm.forward x), memory, memoryValid, crossCache)))
        let r = FeedForward.run feedForward (compute (ffnNorm.forward x)) tokenIds valid
        let x = plus x (residualDropout r.Output)                                   // [B; S; D]
        r.Moe |> Option.iter moveReportOut
        x.MoveToOuterDisposeScope(), r.Moe

    member _.ReportName = name

// ---------------------------------------------------------------- embeddings

/// Vaswani et al. 2017 sec. 3.4 multiply embeddings by sqrt(D); drawing them at std D^-1/2 then gives
/// unit-variance inputs, and tied output logits near unit variance at initialisation.
let embeddingStd (modelDim: int) : float = 1.0 / Math.Sqrt(float modelDim)

/// Initial standard deviation of a learned position table (GPT-2's).
let learnedPositionStd = 0.02

/// The base of the sinusoids' geometric wavelengths (Vaswani et al. 2017 sec. 3.5).
let sinusoidBase = 10000.0

/// Sinusoidal position vectors of positions offset .. offset + S - 1 (Vaswani et al. 2017 sec. 3.5):
/// PE[p, 2i] = sin(p / base^(2i/D)), PE[p, 2i+1] = cos(p / base^(2i/D)). D even. // [S; D] float32
let sinusoidalPositions (device: torch.Device) (offset: int64) (length: int64) (modelDim: int) : Tensor =
    if modelDim % 2 <> 0 then invalidArg "modelDim" (sprintf "expected an even model width, got %d" modelDim)
    use _ = torch.NewDisposeScope()
    let pos = (arange offset (offset + length) torch.ScalarType.Float32 device).unsqueeze(1L)  // [S; 1]
    use zero = (0L).ToScalar() // Scalars held until the native call returns (see Tensors.withScalar)
    use width = (int64 modelDim).ToScalar()
    use two = (2L).ToScalar()
    let twoI = torch.arange(zero, width, two, dtype = torch.ScalarType.Float32, device = device)                   // [D/2]
    let inverseWavelength = (mulScalar (-Math.Log sinusoidBase / float modelDim) twoI).exp_()                   // [D/2]
    let angles = pos * inverseWavelength.unsqueeze(0L)                                                              // [S; D/2]
    torch.stack([| angles.sin(); angles.cos() |], 2L).reshape(length, int64 modelDim).MoveToOuterDisposeScope()   // [S; D]

/// Position vectors of one stack: sinusoids, or a learned table of MaxLength rows.
type Positions(name: string, cfg: ModelConfig) as this =
    inherit torch.nn.Module(name)
    let table =
        match cfg.Positional with
        | Learned -> Embedding(int64 cfg.MaxLength, int64 cfg.ModelDim)
        | Sinusoidal -> null
    do
        if not (isNull table) then
            use _ = torch.no_grad ()
            init.normal_(table.weight, 0.0, learnedPositionStd) |> ignore
        this.RegisterComponents()

    /// The learned table; null for sinusoidal positions.
    member _.Table = table

    /// Vectors of positions offset .. offset + length - 1. // [S; D]
    member _.Forward(offset: int64, length: int64, device: torch.Device) : Tensor =
        if offset < 0L || offset + length > int64 cfg.MaxLength then
            invalidArg "length" (sprintf "expected positions within MaxLength %d, got positions %d .. %d" cfg.MaxLength offset (offset + length - 1L))
        if isNull table then sinusoidalPositions device offset length cfg.ModelDim
        else
            use ids = arange offset (offset + length) torch.ScalarType.Int64 device
            table.forward ids

// ---------------------------------------------------------------- models

let private checkTokens (name: string) (vocab: int) (ids: Tensor) =
    expectIndex name "[B; S]" 2 ids
    if ids.NumberOfElements > 0L then
        use lo = ids.min ()
        use hi = ids.max ()
        let lo, hi = lo.item<int64> (), hi.item<int64> ()
        if lo < 0L || hi >= int64 vocab then
            invalidArg name (sprintf "expected %s token ids in 0 .. %d, got ids in %d .. %d" name (vocab - 1) lo hi)

let private checkValid (name: string) (ids: Tensor) (valid: Tensor) =
    if not (isNull valid) then
        expect name (sprintf "[%d; %d] bool like the token ids" ids.shape[0] ids.shape[1])
            (fun t -> t.dtype = torch.ScalarType.Bool && t.shape = ids.shape) valid

let private stackName (stack: Stack) = match stack with Encoder -> "enc" | Decoder -> "dec"

let private site (stack: Stack) (layer: int) : FfnSite =
    { Stack = stack; Layer = layer; Name = sprintf "%s.%d" (stackName stack) layer }

/// The MoE layers among blocks, named by place ("enc.1"): to set hash tables or inspect routers.
let private moeLayersOf (blocks: ModuleList<Block>) : (string * MoeLayer)[] =
    [| for i in 0 .. blocks.Count - 1 do
           match blocks[i].Ffn with
           | :? MoeLayer as m -> blocks[i].ReportName, m
           | _ -> () |]

/// The routers of the MoE and LoRA-MoE layers among blocks, named by place: to set hash tables.
let private routersOf (blocks: ModuleList<Block>) : (string * RouterModule)[] =
    [| for i in 0 .. blocks.Count - 1 do
           match blocks[i].Ffn with
           | :? MoeLayer as m -> blocks[i].ReportName, m.Router
           | :? LoraMoeLayer as m -> blocks[i].ReportName, m.Router
           | _ -> () |]

/// Runs blocks in order, collecting MoE reports by block name. x [B; S; D] -> [B; S; D].
let private runBlocks (blocks: ModuleList<Block>) (x: Tensor) (ids: Tensor) (valid: Tensor) (memory: Tensor) (memoryValid: Tensor)
                      (cache: DecoderCache) : Tensor * LayerReport list =
    let mutable x = x
    let reports = ResizeArray<LayerReport>()
    for i in 0 .. blocks.Count - 1 do
        let block = blocks[i]
        let layerCache = if isNull (box cache) then null else cache.Layers[i]
        let next, report = block.Forward(x, ids, valid, memory, memoryValid, layerCache)
        x <- next
        report |> Option.iter (fun r -> reports.Add { Layer = block.ReportName; Report = r })
    x, List.ofSeq reports

/// Pre-LayerNorm encoder-decoder Transformer with one token embedding shared by both stacks (and, when
/// tied, by the output projection). Feed-forward sublayers come from the factory, one per block.
type EncoderDecoder(cfg: ModelConfig, ffnFactory: Func<FfnSite, FeedForward>) as this =
    inherit torch.nn.Module("encoder_decoder")
    let cfg = orFail "model config" (ModelConfig.validate cfg) cfg
    let d = int64 cfg.ModelDim
    let embed = Embedding(int64 cfg.VocabSize, d)
    let encPos = new Positions("encPos", cfg)
    let decPos = new Positions("decPos", cfg)
    let encFfns = Array.init cfg.EncoderLayers (fun i -> ffnFactory.Invoke(site Encoder i))
    let decFfns = Array.init cfg.DecoderLayers (fun i -> ffnFactory.Invoke(site Decoder i))
    let enc = new ModuleList<Block>([| for i in 0 .. cfg.EncoderLayers - 1 -> new Block((site Encoder i).Name, cfg, false, false, encFfns[i]) |])
    let dec = new ModuleList<Block>([| for i in 0 .. cfg.DecoderLayers - 1 -> new Block((site Decoder i).Name, cfg, true, true, decFfns[i]) |])
    let encNorm = LayerNorm(d, eps = cfg.LayerNormEps)
    let decNorm = LayerNorm(d, eps = cfg.LayerNormEps)
    let lmHead = if cfg.TiedEmbeddings then null else Linear(d, int64 cfg.VocabSize, hasBias = false)
    let inactiveParameters =
        Array.append encFfns decFfns |> Array.sumBy (fun f -> parameterCount f.Module - f.ActiveParameters)
    let mutable precision = Precision.Full
    do
        use _ = torch.no_grad ()
        init.normal_(embed.weight, 0.0, embeddingStd cfg.ModelDim) |> ignore
        this.RegisterComponents()

    /// Token embeddings scaled by sqrt(D) plus positions, with dropout. ids [B; S] -> [B; S; D].
    let embedTokens (positions: Positions) (offset: int64) (ids: Tensor) : Tensor =
        use _ = torch.NewDisposeScope()
        let x = mulScalar_ (Math.Sqrt(float cfg.ModelDim)) (embed.forward ids)
        let x = plus x (positions.Forward(offset, ids.shape[1], ids.device))
        let x = if this.training && cfg.Dropout > 0.0 then functional.dropout(x, cfg.Dropout, true) else x
        x.MoveToOuterDisposeScope()

    /// Final-normed states [B; L; D] -> logits [B; L; V], float32 under bf16 mixed precision.
    let project (h: Tensor) : Tensor =
        use _ = torch.NewDisposeScope()
        let h = Precision.cast precision h                                     // [B; L; D]
        let logits = linearCast (if isNull lmHead then embed.weight else lmHead.weight) h  // [B; L; V]
        (Precision.logits precision logits).MoveToOuterDisposeScope()

    /// A model whose feed-forward sublayers are `FeedForward.create cfg`: dense, or MoE by `MoeEvery`.
    new(cfg: ModelConfig) = new EncoderDecoder(cfg, Func<FfnSite, FeedForward>(FeedForward.create cfg))

    member _.Config = cfg
    /// The token embedding [V; D], shared by both stacks and, when tied, the output projection.
    member _.Embedding = embed
    member _.EncoderBlocks = enc
    member _.DecoderBlocks = dec
    /// The untied output projection; null when embeddings are tied.
    member _.OutputProjection = lmHead
    /// LayerNorm on the encoder's output.
    member _.EncoderNorm = encNorm
    /// LayerNorm before the output projection.
    member _.DecoderNorm = decNorm

    /// The compute precision (default `Full`): `BFloat16` runs every matmul in bfloat16 over the float32
    /// parameters, with norms, softmax, routing and the returned logits in float32 (see `Precision`).
    /// Training sets it from `TrainConfig.Bf16`; key/value caches made afterwards hold the compute dtype.
    member _.Precision
        with get () = precision
        and set (p: Precision) =
            precision <- p
            for b in Seq.append enc dec do b.Precision <- p

    interface IMixedPrecision with
        member this.Precision with get () = this.Precision and set p = this.Precision <- p

    /// The MoE layers by name ("enc.1", "dec.3"), encoder first: to set balanced hash tables, read routers.
    member _.MoeLayers() : (string * MoeLayer)[] = Array.append (moeLayersOf enc) (moeLayersOf dec)

    /// The routers of every MoE layer (`MoeLayer` or `LoraMoeLayer`) by name, encoder first.
    member _.Routers() : (string * RouterModule)[] = Array.append (routersOf enc) (routersOf dec)

    /// Parameters the optimiser updates (a frozen LoRA base is not among them).
    member this.TrainableParameterCount() : int64 = trainableParameterCount this

    /// Total and active (per token) parameter counts.
    member this.ParameterCount() : ParameterCount =
        let total = parameterCount this
        { Total = total; Active = total - inactiveParameters }

    /// An empty cache for `Decode`, one entry per decoder block. Dispose it when done.
    member _.NewCache() : DecoderCache = new DecoderCache(cfg.DecoderLayers)

    /// Encodes source ids src [B; S] int64 with srcValid [B; S] bool (true = real token; null = all).
    member _.Encode(src: Tensor, srcValid: Tensor) : EncoderOutput =
        checkTokens "src" cfg.VocabSize src
        checkValid "srcValid" src srcValid
        use _ = torch.NewDisposeScope()
        let x = embedTokens encPos 0L src                                       // [B; S; D]
        let x, reports = runBlocks enc x src srcValid null null Unchecked.defaultof<DecoderCache>
        let memory = encNorm.forward x                                          // [B; S; D]
        for r in reports do moveReportOut r.Report
        { Memory = memory.MoveToOuterDisposeScope(); Moe = reports }

    /// Decodes target ids tgt [B; L] int64 (teacher forcing, or the newest ids with a cache) against an
    /// encoder memory [B; S; D] with memoryValid [B; S] bool (null = all); tgtValid [B; L] bool (null = all).
    /// With a non-null cache the positions continue from `cache.Length`, earlier keys come from the cache,
    /// and memory may be null after the first call. Returns logits [B; L; V] and the decoder's MoE reports.
    member _.Decode(memory: Tensor, memoryValid: Tensor, tgt: Tensor, tgtValid: Tensor, cache: DecoderCache) : ModelOutput =
        checkTokens "tgt" cfg.VocabSize tgt
        checkValid "tgtValid" tgt tgtValid
        let hasCache = not (isNull (box cache))
        if hasCache && cache.Layers.Length <> cfg.DecoderLayers then
            invalidArg "cache" (sprintf "expected a cache of %d decoder layers (from NewCache), got %d" cfg.DecoderLayers cache.Layers.Length)
        if isNull memory && not (hasCache && cache.Length > 0L) then
            invalidArg "memory" "expected an encoder memory [B; S; D] (only a filled cache lets it be null)"
        use _ = torch.NewDisposeScope()
        let offset = if hasCache then cache.Length else 0L
        let x = embedTokens decPos offset tgt                                   // [B; L; D]
        // cast once here rather than in every block's cross-attention
        let memory = if isNull memory then memory else Precision.cast precision memory  // [B; S; D]
        let x, reports = runBlocks dec x tgt tgtValid memory memoryValid cache
        let logits = project (decNorm.forward x)                               // [B; L; V]
        for r in reports do moveReportOut r.Report
        { Logits = logits.MoveToOuterDisposeScope(); Moe = reports }

    /// Teacher-forced forward: src [B; S] and decoder input tgt [B; L] int64, their valid masks [B; S],
    /// [B; L] bool (null = all real). Returns logits [B; L; V] and every MoE layer's report, encoder first.
    member this.Forward(src: Tensor, tgt: Tensor, srcValid: Tensor, tgtValid: Tensor) : ModelOutput =
        use _ = torch.NewDisposeScope()
        let encoded = this.Encode(src, srcValid)
        let out = this.Decode(encoded.Memory, srcValid, tgt, tgtValid, Unchecked.defaultof<DecoderCache>)
        let reports = encoded.Moe @ out.Moe
        for r in reports do moveReportOut r.Report
        { Logits = out.Logits.MoveToOuterDisposeScope(); Moe = reports }

    /// Teacher-forced forward with no padding.
    member this.Forward(src: Tensor, tgt: Tensor) : ModelOutput = this.Forward(src, tgt, null, null)

/// Decoder-only Transformer (GPT-style): causal self-attention blocks, no cross-attention, `DecoderLayers` deep.
type DecoderOnly(cfg: ModelConfig, ffnFactory: Func<FfnSite, FeedForward>) as this =
    inherit torch.nn.Module("decoder_only")
    let cfg = orFail "model config" (ModelConfig.validate cfg) cfg
    let d = int64 cfg.ModelDim
    let embed = Embedding(int64 cfg.VocabSize, d)
    let pos = new Positions("pos", cfg)
    let ffns = Array.init cfg.DecoderLayers (fun i -> ffnFactory.Invoke(site Decoder i))
    let blocks = new ModuleList<Block>([| for i in 0 .. cfg.DecoderLayers - 1 -> new Block((site Decoder i).Name, cfg, true, false, ffns[i]) |])
    let norm = LayerNorm(d, eps = cfg.LayerNormEps)
    let lmHead = if cfg.TiedEmbeddings then null else Linear(d, int64 cfg.VocabSize, hasBias = false)
    let inactiveParameters = ffns |> Array.sumBy (fun f -> parameterCount f.Module - f.ActiveParameters)
    let mutable precision = Precision.Full
    do
        use _ = torch.no_grad ()
        init.normal_(embed.weight, 0.0, embeddingStd cfg.ModelDim) |> ignore
        this.RegisterComponents()

    new(cfg: ModelConfig) = new DecoderOnly(cfg, Func<FfnSite, FeedForward>(FeedForward.create cfg))

    member _.Config = cfg
    member _.Embedding = embed
    member _.Blocks = blocks
    member _.OutputProjection = lmHead

    /// The compute precision (default `Full`); see `EncoderDecoder.Precision`.
    member _.Precision
        with get () = precision
        and set (p: Precision) =
            precision <- p
            for b in blocks do b.Precision <- p

    interface IMixedPrecision with
        member this.Precision with get () = this.Precision and set p = this.Precision <- p

    /// The MoE layers by name ("dec.1").
    member _.MoeLayers() : (string * MoeLayer)[] = moeLayersOf blocks

    member this.ParameterCount() : ParameterCount =
        let total = parameterCount this
        { Total = total; Active = total - inactiveParameters }

    /// An empty cache for incremental `Forward` calls (its cross-attention entries stay empty).
    member _.NewCache() : DecoderCache = new DecoderCache(cfg.DecoderLayers)

    /// ids [B; L] int64 with valid [B; L] bool (null = all real); with a non-null cache, ids are the newest
    /// positions after `cache.Length`. Returns next-token logits [B; L; V] and the MoE reports.
    member _.Forward(ids: Tensor, valid: Tensor, cache: DecoderCache) : ModelOutput =
        checkTokens "ids" cfg.VocabSize ids
        checkValid "valid" ids valid
        let hasCache = not (isNull (box cache))
        if hasCache && cache.Layers.Length <> cfg.DecoderLayers then
            invalidArg "cache" (sprintf "expected a cache of %d layers (from NewCache), got %d" cfg.DecoderLayers cache.Layers.Length)
        use _ = torch.NewDisposeScope()
        let offset = if hasCache then cache.Length else 0L
        let x = mulScalar_ (Math.Sqrt(float cfg.ModelDim)) (embed.forward ids)
        let x = plus x (pos.Forward(offset, ids.shape[1], ids.device))            // [B; L; D]
        let x = if this.training && cfg.Dropout > 0.0 then functional.dropout(x, cfg.Dropout, true) else x
        let x, reports = runBlocks blocks x ids valid null null cache
        let h = Precision.cast precision (norm.forward x)                      // [B; L; D]
        let logits = linearCast (if isNull lmHead then embed.weight else lmHead.weight) h  // [B; L; V]
        let logits = Precision.logits precision logits                          // [B; L; V] float32 under bf16
        for r in reports do moveReportOut r.Report
        { Logits = logits.MoveToOuterDisposeScope(); Moe = reports }

    /// Forward over ids [B; L] with no padding and no cache.
    member this.Forward(ids: Tensor) : ModelOutput = this.Forward(ids, null, Unchecked.defaultof<DecoderCache>)

// ---------------------------------------------------------------- C# facade

/// Model configs and models from C#: optional arguments instead of F# record copies and unions.
[<AbstractClass; Sealed>]
type ModelApi =
    /// A dense model config; omitted arguments take `ModelConfig.defaults`' values. kvHeads 0 means = heads.
    /// activation: relu | gelu | swiglu; attention: handwritten | library; positional: sinusoidal | learned.
    static member Config(vocabSize: int,
                         [<Optional; DefaultParameterValue(64)>] modelDim: int,
                         [<Optional; DefaultParameterValue(4)>] heads: int,
                         [<Optional; DefaultParameterValue(0)>] kvHeads: int,
                         [<Optional; DefaultParameterValue(2)>] encoderLayers: int,
                         [<Optional; DefaultParameterValue(2)>] decoderLayers: int,
                         [<Optional; DefaultParameterValue(0.1)>] dropout: float,
                         [<Optional; DefaultParameterValue(256)>] maxLength: int,
                         [<Optional; DefaultParameterValue(256)>] ffnHidden: int,
                         [<Optional; DefaultParameterValue("gelu")>] activation: string,
                         [<Optional; DefaultParameterValue("handwritten")>] attention: string,
                         [<Optional; DefaultParameterValue("sinusoidal")>] positional: string,
                         [<Optional; DefaultParameterValue(true)>] tiedEmbeddings: bool,
                         [<Optional; DefaultParameterValue(0.0)>] attentionDropout: float) : ModelConfig =
        let word (what: string) (s: string) = if isNull s then invalidArg what (sprintf "expected %s, got null" what) else s.Trim().ToLowerInvariant()
        { ModelConfig.defaults with
            VocabSize = vocabSize
            ModelDim = modelDim
            Heads = heads
            KvHeads = (if kvHeads = 0 then heads else kvHeads)
            EncoderLayers = encoderLayers
            DecoderLayers = decoderLayers
            Dropout = dropout
            AttentionDropout = attentionDropout
            MaxLength = maxLength
            Ffn = Dense ffnHidden
            Activation =
                (match word "activation" activation with
                 | "relu" -> ReLU
                 | "gelu" -> GELU
                 | "swiglu" -> SwiGLU
                 | other -> invalidArg "activation" (sprintf "expected activation relu|gelu|swiglu, got '%s'" other))
            Attention =
                (match word "attention" attention with
                 | "handwritten" -> Handwritten
                 | "library" -> Library
                 | other -> invalidArg "attention" (sprintf "expected attention handwritten|library, got '%s'" other))
            Positional =
                (match word "positional" positional with
                 | "sinusoidal" -> Sinusoidal
                 | "learned" -> Learned
                 | other -> invalidArg "positional" (sprintf "expected positional sinusoidal|learned, got '%s'" other))
            TiedEmbeddings = tiedEmbeddings }

    /// The same config with MoE layers every `every`-th layer (1 = all); the MoE config's ModelDim is set to the model's.
    static member WithMoe(cfg: ModelConfig, moe: MoeConfig, [<Optional; DefaultParameterValue(1)>] every: int) : ModelConfig =
        { cfg with Ffn = Moe { moe with ModelDim = cfg.ModelDim }; MoeEvery = every }

    /// Every problem with a config (empty when usable).
    static member Validate(cfg: ModelConfig) : string[] = ModelConfig.validate cfg |> Array.ofList
