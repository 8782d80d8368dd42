/// A recurrent host for the MoE layer, as Shazeer et al. 2017 first placed it: word embeddings, a bidirectional
/// LSTM, an expert layer (the toolkit's MoE layer, or one MLP expert as the baseline), a second bidirectional
/// LSTM, then a head: token classification (named-entity tags) or span extraction (start and end logits).
/// Padding-aware: both LSTMs run on packed sequences (the backward direction starts at each sequence's last real
/// token) and the expert layer sees only real tokens (`FeedForward.run` drops padding), so padding never reaches
/// a router, its statistics or its balancing losses.
/// Axes: B batch, S positions, De embedding width, H LSTM hidden width per direction, D = 2H, C classes,
/// V vocabulary, E experts.
module Moe.Recurrent

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Config
open Moe.Layers
open Moe.Models

/// What sits between the two recurrent layers.
type Middle =
    /// One MLP expert: `DenseFfn` act(x W1) W2 of the experts' hidden width (the baseline).
    | SingleExpert
    /// The toolkit's MoE layer (`Layers.MoeLayer`); its ModelDim must be 2 x Hidden.
    | Experts of MoeConfig

/// What the model predicts per position.
type Head =
    /// Logits over this many tags (named-entity recognition).
    | TokenClassification of tags: int
    /// Start and end logits (extractive question answering).
    | SpanExtraction

/// The model's shape.
type RecurrentConfig =
    { VocabSize: int
      /// Word vector width (GloVe 6B 50d: 50).
      EmbeddingDim: int
      /// Keep the word vectors as loaded (the special tokens' vectors train either way).
      FreezeEmbeddings: bool
      /// Ids below this are special tokens (padding, unknown, separator) with learned vectors.
      SpecialTokens: int
      /// LSTM hidden width per direction; each LSTM outputs 2 x Hidden.
      Hidden: int
      /// Hidden width of the baseline's expert (an MoE's experts use their MoeConfig's).
      ExpertHidden: int
      /// Activation of the baseline's expert.
      ExpertActivation: Activation
      Middle: Middle
      /// Dropout on the expert layer's output, in training only.
      ExpertDropout: float
      Head: Head }

module RecurrentConfig =
    /// The issue's shape: GloVe 50d, frozen; LSTMs of 128 per direction; one ReLU expert of hidden 128 with
    /// dropout 0.5 after it; 9 CoNLL-2003 tags.
    let defaults =
        { VocabSize = 1000; EmbeddingDim = 50; FreezeEmbeddings = true; SpecialTokens = 3; Hidden = 128; ExpertHidden = 128
          ExpertActivation = ReLU; Middle = SingleExpert; ExpertDropout = 0.5; Head = TokenClassification 9 }

    let validate (cfg: RecurrentConfig) : string list =
        [ if cfg.VocabSize < 1 then sprintf "VocabSize must be >= 1, got %d" cfg.VocabSize
          if cfg.EmbeddingDim < 1 then sprintf "EmbeddingDim must be >= 1, got %d" cfg.EmbeddingDim
          if cfg.SpecialTokens < 1 || cfg.SpecialTokens > cfg.VocabSize then
              sprintf "SpecialTokens must be in 1..VocabSize (%d), got %d" cfg.VocabSize cfg.SpecialTokens
          if cfg.Hidden < 1 then sprintf "Hidden must be >= 1, got %d" cfg.Hidden
          if cfg.ExpertHidden < 1 then sprintf "ExpertHidden must be >= 1, got %d" cfg.ExpertHidden
          if not (cfg.ExpertDropout >= 0.0 && cfg.ExpertDropout < 1.0) then sprintf "ExpertDropout must be in [0, 1), got %g" cfg.ExpertDropout
          match cfg.Middle with
          | Experts m ->
              if m.ModelDim <> 2 * cfg.Hidden then sprintf "the MoE layer's ModelDim must be 2 x Hidden = %d (the BiLSTM's output), got %d" (2 * cfg.Hidden) m.ModelDim
              yield! MoeConfig.validate m
          | SingleExpert -> ()
          match cfg.Head with
          | TokenClassification c when c < 1 -> sprintf "TokenClassification needs >= 1 tag, got %d" c
          | _ -> () ]

/// The model's result.
type RecurrentOutput =
    { /// [B; S; C] tag logits, or [B; S; 2] start and end logits; zeros at padding.
      Logits: Tensor
      /// The MoE layer's report (named "moe"); empty for the single expert.
      Moe: LayerReport list }

/// The name of the expert layer in routing logs.
let moeLayerName = "moe"

/// Embedding -> BiLSTM -> expert layer (+ dropout) -> BiLSTM -> head. Submodules: `embedding` (the word
/// vectors, `weight` [V; De], frozen when FreezeEmbeddings), `special` (learned vectors of the special tokens
/// [SpecialTokens; De]), `lstm1`, `middle`, `lstm2`, `head`.
type BiLstmMoe(name: string, cfg: RecurrentConfig) as this =
    inherit Module<Tensor, int64[], RecurrentOutput>(name)
    let cfg = orFail "recurrent config" (RecurrentConfig.validate cfg) cfg
    let d = 2 * cfg.Hidden
    let embedding = Embedding(int64 cfg.VocabSize, int64 cfg.EmbeddingDim)
    let special = Embedding(int64 cfg.SpecialTokens, int64 cfg.EmbeddingDim)
    let lstm1 = LSTM(int64 cfg.EmbeddingDim, int64 cfg.Hidden, batchFirst = true, bidirectional = true)
    let ffn =
        match cfg.Middle with
        | SingleExpert -> { FeedForward.dense (new DenseFfn("ffn", d, cfg.ExpertHidden, cfg.ExpertActivation)) with SkipPadding = true }
        | Experts m -> FeedForward.moe m
    let middle = ffn.Module
    let dropout = Dropout(cfg.ExpertDropout)
    let lstm2 = LSTM(int64 d, int64 cfg.Hidden, batchFirst = true, bidirectional = true)
    let classes = match cfg.Head with TokenClassification c -> c | SpanExtraction -> 2
    let head = Linear(int64 d, int64 classes)
    do
        if cfg.FreezeEmbeddings then embedding.weight.requires_grad <- false
        this.register_module ("embedding", embedding)
        this.register_module ("special", special)
        this.register_module ("lstm1", lstm1)
        this.register_module ("middle", middle)
        this.register_module ("dropout", dropout)
        this.register_module ("lstm2", lstm2)
        this.register_module ("head", head)

    member _.Config = cfg
    member _.Embedding = embedding
    member _.Lstm1 = lstm1
    member _.Lstm2 = lstm2
    /// The expert layer: a `DenseFfn` (SingleExpert) or a `MoeLayer`.
    member _.Middle = middle
    member _.Head = head
    /// Parameters one token uses: all but the (E - k) experts it skips.
    member _.ActiveParameters : int64 = parameterCount this - parameterCount middle + ffn.ActiveParameters

    /// Copies word vectors [V][De] into the embedding table (rows of the special tokens are not used).
    member _.SetEmbeddings(vectors: float32[][]) : unit =
        if isNull vectors || vectors.Length <> cfg.VocabSize || vectors |> Array.exists (fun v -> isNull v || v.Length <> cfg.EmbeddingDim) then
            invalidArg "vectors" (sprintf "expected %d vectors of %d numbers (VocabSize x EmbeddingDim)" cfg.VocabSize cfg.EmbeddingDim)
        use _ = torch.no_grad ()
        use flat = torch.tensor (Array.concat vectors: float32[])
        use t = flat.reshape (int64 cfg.VocabSize, int64 cfg.EmbeddingDim)
        embedding.weight.copy_ t |> ignore

    /// A bidirectional LSTM over the real positions only: x [B; S; In] -> [B; S; D], zeros at padding.
    member private _.Packed(lstm: LSTM, x: Tensor, lengths: Tensor) : Tensor =
        use packed = torch.nn.utils.rnn.pack_padded_sequence (x, lengths, true, false)
        let struct (out, h, c) = lstm.call (packed)
        h.Dispose()
        c.Dispose()
        use out = out
        let struct (padded, _) = torch.nn.utils.rnn.pad_packed_sequence (out, true, 0.0, Nullable x.shape[1])
        padded

    /// ids [B; S] int64 (padding anywhere past each row's length), lengths [B] (each in 1..S) ->
    /// logits and the MoE report. Positions past a row's length are ignored throughout.
    override this.forward(ids: Tensor, lengths: int64[]) : RecurrentOutput =
        expect "ids" "[B; S] int64" (fun t -> t.Dimensions = 2L && t.dtype = torch.ScalarType.Int64) ids
        let b, s = ids.shape[0], ids.shape[1]
        if isNull lengths || int64 lengths.Length <> b || lengths |> Array.exists (fun l -> l < 1L || l > s) then
            invalidArg "lengths" (sprintf "expected %d lengths in 1..%d (one per row of ids %s)" b s (describe ids))
        use scope = torch.NewDisposeScope()
        let device = ids.device
        let lengthsCpu = torch.tensor lengths // [B], on the CPU as pack_padded_sequence needs
        let valid = (arange 0L s torch.int64 device).unsqueeze(0L).lt (lengthsCpu.``to``(device).unsqueeze 1L) // [B; S]
        let isSpecial = withInt64Scalar (int64 cfg.SpecialTokens) (fun n -> ids.lt n) // [B; S]
        let specialIds = withInt64Scalar (int64 cfg.SpecialTokens - 1L) (fun n -> ids.clamp_max n) // [B; S]
        let x = torch.where(isSpecial.unsqueeze -1L, special.forward specialIds, embedding.forward ids) // [B; S; De]
        let h1 = this.Packed(lstm1, x, lengthsCpu) // [B; S; D]
        let mid = FeedForward.run ffn h1 ids valid // [B; S; D], zeros at padding
        let h2 = this.Packed(lstm2, dropout.forward mid.Output, lengthsCpu) // [B; S; D]
        let logits = head.forward h2 * valid.unsqueeze(-1L).to_type h2.dtype // [B; S; C]
        let reports = match mid.Moe with Some r -> [ { Layer = moeLayerName; Report = r } ] | None -> []
        for r in reports do moveReportOut r.Report
        { Logits = logits.MoveToOuterDisposeScope(); Moe = reports }

// ---------------------------------------------------------------- span decoding

/// Large negative logit for positions a span may not use (finite, so a softmax over a row stays defined).
let maskedLogit = -1e9

/// Start and end logits [B; S] with positions outside `allowed` [B; S] bool set to `maskedLogit`.
let maskSpanLogits (allowed: Tensor) (logits: Tensor) : Tensor =
    expect "allowed" (sprintf "%s bool (the logits' shape)" (describe logits)) (fun a -> a.dtype = torch.ScalarType.Bool && a.shape = logits.shape) allowed
    withScalar maskedLogit (fun v -> logits.masked_fill (allowed.logical_not (), v))

/// The best answer span of each row: the (start, end) maximising start logit + end logit over allowed
/// positions with start <= end < start + maxLength (the standard decoding of extractive QA since BiDAF,
/// Seo et al. 2017). startLogits, endLogits [B; S] floating, allowed [B; S] bool with at least one allowed
/// position per row -> (start, end) per row.
let bestSpans (maxLength: int) (startLogits: Tensor) (endLogits: Tensor) (allowed: Tensor) : (int * int)[] =
    if maxLength < 1 then invalidArg "maxLength" (sprintf "expected a maximum answer length >= 1, got %d" maxLength)
    expectFloat "startLogits" "[B; S]" 2 startLogits
    expect "endLogits" (sprintf "%s floating point (the start logits' shape)" (describe startLogits)) (fun e -> isFloating e && e.shape = startLogits.shape) endLogits
    expect "allowed" (sprintf "%s bool (the logits' shape)" (describe startLogits)) (fun a -> a.dtype = torch.ScalarType.Bool && a.shape = startLogits.shape) allowed
    use _ = torch.no_grad ()
    use scope = torch.NewDisposeScope()
    let b, s = startLogits.shape[0], startLogits.shape[1]
    if (allowed.any(1L).logical_not().any ()).item<bool> () then invalidArg "allowed" "expected at least one allowed position in every row"
    let scores = plus (startLogits.to_type(torch.float64).unsqueeze 2L) (endLogits.to_type(torch.float64).unsqueeze 1L) // [B; S; S]: (start, end)
    let ones = torch.ones([| s; s |], dtype = torch.ScalarType.Bool, device = startLogits.device)
    let ordered = ones.triu(0L).logical_and (ones.triu(int64 maxLength).logical_not ()) // [S; S]: start <= end < start + maxLength
    let both = allowed.unsqueeze(2L).logical_and (allowed.unsqueeze 1L) // [B; S; S]
    let valid = both.logical_and (ordered.unsqueeze 0L) // [B; S; S]
    let masked = withScalar Double.NegativeInfinity (fun v -> scores.masked_fill (valid.logical_not (), v)) // [B; S; S]
    let best = toInt64s (masked.reshape(b, s * s).argmax 1L) // [B]
    best |> Array.map (fun i -> int (i / s), int (i % s))
