/// Grouped-query attention (written here, and through the library's fused kernel), attention masks and
/// the key/value cache used for incremental decoding.
/// Axes: B batch, S query positions, L key positions, D model width, H query heads, G key/value heads
/// (G divides H; r = H / G query heads share one key/value head), Dh head width (D / H).
///
/// Mask convention (the library's): a bool tensor, true where a query may attend a key, broadcastable to
/// [B; H; S; L] with one head slot: [B | 1; 1; S | 1; L]. Every query must see at least one key, otherwise
/// its softmax row is NaN (as in the library).
module Moe.Attention

open System
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors

/// Which implementation computes softmax(q k^T / sqrt(Dh)) v.
type AttentionImpl =
    /// Grouped-query attention written here: query heads are grouped over their shared key/value head,
    /// so keys and values are never copied per query head (Ainslie et al. 2023, "GQA").
    | Handwritten
    /// `torch.nn.functional.scaled_dot_product_attention`, with key/value heads expanded to H first.
    | Library

/// One attention sublayer's shape and regularisation.
type AttentionConfig =
    { ModelDim: int
      /// Query heads H.
      Heads: int
      /// Key/value heads G: H for multi-head attention, 1 for multi-query attention (Shazeer 2019).
      KvHeads: int
      /// Dropout on the attention probabilities, in training only.
      Dropout: float
      Impl: AttentionImpl }

module AttentionConfig =
    /// Multi-head attention, 4 heads over 64 dimensions.
    let defaults = { ModelDim = 64; Heads = 4; KvHeads = 4; Dropout = 0.0; Impl = Handwritten }

    /// Every problem with the config, empty when it is usable.
    let validate (cfg: AttentionConfig) : string list =
        [ if cfg.ModelDim < 1 then sprintf "ModelDim must be >= 1, got %d" cfg.ModelDim
          if cfg.Heads < 1 then sprintf "Heads must be >= 1, got %d" cfg.Heads
          elif cfg.ModelDim >= 1 && cfg.ModelDim % cfg.Heads <> 0 then
              sprintf "Heads (%d) must divide ModelDim (%d)" cfg.Heads cfg.ModelDim
          if cfg.KvHeads < 1 then sprintf "KvHeads must be >= 1, got %d" cfg.KvHeads
          elif cfg.Heads >= 1 && cfg.Heads % cfg.KvHeads <> 0 then
              sprintf "KvHeads (%d) must divide Heads (%d)" cfg.KvHeads cfg.Heads
          if not (cfg.Dropout >= 0.0 && cfg.Dropout < 1.0) then sprintf "Dropout must be in [0, 1), got %g" cfg.Dropout ]

    /// Width of one head, Dh = D / H.
    let headDim (cfg: AttentionConfig) : int = cfg.ModelDim / cfg.Heads

    /// Bytes one token adds to one layer's self-attention cache: keys and values, G heads of Dh each.
    let kvBytesPerToken (cfg: AttentionConfig) (elementBytes: int) : int64 =
        2L * int64 cfg.KvHeads * int64 (headDim cfg) * int64 elementBytes

// ---------------------------------------------------------------- masks

/// Causal mask for S queries that are the last S of L positions (S = L in training, S = 1 when decoding
/// with a cache): query i sits at position L - S + i and sees keys 0 .. L - S + i. // [1; 1; S; L] bool
let causalMask (device: torch.Device) (queries: int64) (keys: int64) : Tensor =
    if queries < 1L || keys < queries then
        invalidArg "queries" (sprintf "expected 1 <= queries <= keys, got queries %d and keys %d" queries keys)
    use ones = torch.ones([| queries; keys |], dtype = torch.ScalarType.Bool, device = device)
    use lower = torch.tril(ones, keys - queries)                            // [S; L]
    lower.view(1L, 1L, queries, keys)

/// Key padding mask from which key positions hold real tokens. valid [B; L] bool -> [B; 1; 1; L] bool.
let keyPaddingMask (valid: Tensor) : Tensor =
    expect "valid" "[B; L] bool" (fun t -> t.Dimensions = 2L && t.dtype = torch.ScalarType.Bool) valid
    valid.view(valid.shape[0], 1L, 1L, valid.shape[1])

/// Conjunction of optional masks (None where neither restricts).
let combineMasks (a: Tensor option) (b: Tensor option) : Tensor option =
    match a, b with
    | Some x, Some y -> Some(x.logical_and y)
    | Some x, None | None, Some x -> Some x
    | None, None -> None

// ---------------------------------------------------------------- the attention function

let private checkQkv (q: Tensor) (k: Tensor) (v: Tensor) (mask: Tensor option) =
    expectFloat "q" "[B; H; S; Dh]" 4 q
    expectFloat "k" "[B; G; L; Dh]" 4 k
    expect "v" (sprintf "[B; G; L; Dh] = %s like k" (describe k)) (fun t -> t.shape = k.shape && t.dtype = k.dtype) v
    let b, h, s, dh = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    let g, l = k.shape[1], k.shape[2]
    if k.shape[0] <> b || k.shape[3] <> dh || k.dtype <> q.dtype then
        invalidArg "k" (sprintf "expected k [%d; G; L; %d] %s matching q %s, got %s" b dh (dtypeName q.dtype) (describe q) (describe k))
    if h % g <> 0L then
        invalidArg "k" (sprintf "expected the key/value heads G (%d) to divide the query heads H (%d)" g h)
    match mask with
    | Some m ->
        let ok =
            m.dtype = torch.ScalarType.Bool && m.Dimensions = 4L && m.shape[1] = 1L
            && (m.shape[0] = 1L || m.shape[0] = b) && (m.shape[2] = 1L || m.shape[2] = s) && m.shape[3] = l
        if not ok then
            invalidArg "mask" (sprintf "expected mask [%d | 1; 1; %d | 1; %d] bool, got %s" b s l (describe m))
    | None -> ()

/// Grouped-query attention written out: softmax(q k^T / sqrt(Dh) masked) v, where query head h uses
/// key/value head h / r (Vaswani et al. 2017 eq. 1; Ainslie et al. 2023). G = H is multi-head attention,
/// G = 1 multi-query attention. `dropout` is applied to the probabilities (pass 0 outside training).
/// q [B; H; S; Dh], k and v [B; G; L; Dh], mask as in the module legend -> [B; H; S; Dh].
let groupedQueryAttention (dropout: float) (mask: Tensor option) (q: Tensor) (k: Tensor) (v: Tensor) : Tensor =
    checkQkv q k v mask
    use _ = torch.NewDisposeScope()
    let b, h, s, dh = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    let g, l = k.shape[1], k.shape[2]
    let r = h / g
    let qg = q.reshape(b, g, r, s, dh)                                      // [B; G; r; S; Dh]
    let kt = k.unsqueeze(2).transpose(-2L, -1L)                              // [B; G; 1; Dh; L]
    let scores = mulScalar_ (1.0 / Math.Sqrt(float dh)) (qg.matmul kt)               // [B; G; r; S; L]
    let scores =
        match mask with
        | Some m -> withScalar Double.NegativeInfinity (fun negInf -> scores.masked_fill(m.unsqueeze(1).logical_not (), negInf))  // m: [B|1; 1; 1; S|1; L]
        | None -> scores
    // Softmax in float32 whatever the activations' dtype, as the fused kernels do.
    let probs = scores.softmax(-1L, torch.ScalarType.Float32).to_type(q.dtype)  // [B; G; r; S; L]
    let probs = if dropout > 0.0 then functional.dropout(probs, dropout, true) else probs
    let out = probs.matmul(v.unsqueeze 2)                                   // [B; G; r; S; Dh]
    out.reshape(b, h, s, dh).MoveToOuterDisposeScope()

/// Repeats each of the G key/value heads r = H / G times, so head h of the result is head h / r of the
/// input (the layout `groupedQueryAttention` assumes). x [B; G; L; Dh] -> [B; G * r; L; Dh].
let repeatKvHeads (repeats: int) (x: Tensor) : Tensor =
    expectFloat "x" "[B; G; L; Dh]" 4 x
    if repeats < 1 then invalidArg "repeats" (sprintf "expected repeats >= 1, got %d" repeats)
    if repeats = 1 then x.alias ()
    else
        let b, g, l, dh = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        use e = x.unsqueeze(2).expand(b, g, int64 repeats, l, dh)              // [B; G; r; L; Dh]
        e.reshape(b, g * int64 repeats, l, dh)

/// The same attention through the library's `scaled_dot_product_attention`, key/value heads expanded
/// to H first (TorchSharp's binding has no grouped-query flag). Shapes as `groupedQueryAttention`.
let libraryAttention (dropout: float) (mask: Tensor option) (q: Tensor) (k: Tensor) (v: Tensor) : Tensor =
    checkQkv q k v mask
    use _ = torch.NewDisposeScope()
    let r = int (q.shape[1] / k.shape[1])
    let kx = repeatKvHeads r k                                              // [B; H; L; Dh]
    let vx = repeatKvHeads r v                                              // [B; H; L; Dh]
    let m = match mask with Some m -> m | None -> null
    functional.scaled_dot_product_attention(q, kx, vx, attn_mask = m, p = dropout).MoveToOuterDisposeScope()

/// Dispatches on the implementation.
let attend (impl: AttentionImpl) (dropout: float) (mask: Tensor option) (q: Tensor) (k: Tensor) (v: Tensor) : Tensor =
    match impl with
    | Handwritten -> groupedQueryAttention dropout mask q k v
    | Library -> libraryAttention dropout mask q k v

// ---------------------------------------------------------------- the key/value cache

/// Keys and values of one attention sublayer kept across decoding steps. It owns its tensors (they
/// outlive the callers' dispose scopes) and frees them on `Clear` or `Dispose`.
/// Self-attention appends each step's keys; cross-attention stores the encoder's keys once.
[<AllowNullLiteral>]
type KvCache() =
    let mutable keys: Tensor = null      // [B; G; L; Dh]
    let mutable values: Tensor = null    // [B; G; L; Dh]

    let replace (k: Tensor) (v: Tensor) =
        let oldK, oldV = keys, values
        keys <- k.DetachFromDisposeScope()
        values <- v.DetachFromDisposeScope()
        if not (isNull oldK) then oldK.Dispose()
        if not (isNull oldV) then oldV.Dispose()

    /// Cached keys [B; G; L; Dh]; null while empty.
    member _.Keys = keys
    /// Cached values [B; G; L; Dh]; null while empty.
    member _.Values = values
    member _.IsEmpty = isNull keys
    /// Cached positions L (0 while empty).
    member _.Length : int64 = if isNull keys then 0L else keys.shape[2]

    /// Memory held by the cached keys and values, in bytes.
    member _.Bytes : int64 =
        if isNull keys then 0L
        else keys.NumberOfElements * keys.element_size () + values.NumberOfElements * values.element_size ()

    /// Appends keys and values of new positions. k, v [B; G; S; Dh].
    member _.Append(k: Tensor, v: Tensor) =
        if isNull keys then replace (k.clone ()) (v.clone ())
        else
            expect "k" (sprintf "[%d; %d; S; %d] like the cached keys" keys.shape[0] keys.shape[1] keys.shape[3])
                (fun t -> t.Dimensions = 4L && t.shape[0] = keys.shape[0] && t.shape[1] = keys.shape[1] && t.shape[3] = keys.shape[3]) k
            replace (torch.cat([| keys; k |], 2L)) (torch.cat([| values; v |], 2L))

    /// Replaces the whole cache (cross-attention stores the encoder's keys once). k, v [B; G; L; Dh].
    member _.Set(k: Tensor, v: Tensor) = replace (k.clone ()) (v.clone ())

    /// Keeps batch rows `rows` in that order (beam search moves hypotheses between rows). rows [B'] int64.
    member _.Reorder(rows: Tensor) =
        expectIndex "rows" "[B']" 1 rows
        if not (isNull keys) then replace (keys.index_select(0L, rows)) (values.index_select(0L, rows))

    /// Frees the cached tensors.
    member _.Clear() =
        if not (isNull keys) then keys.Dispose(); values.Dispose()
        keys <- null
        values <- null

    interface IDisposable with
        member this.Dispose() = this.Clear()

// ---------------------------------------------------------------- the module

/// Attention sublayer with separate query, key, value and output projections (no biases). Serves as
/// self-attention (`SelfAttend`) or cross-attention (`CrossAttend`); `forward x` is unmasked self-attention.
/// The projections run in the input's dtype (`Tensors.linearLayerCast`: float32 weights serve a bfloat16
/// input), the softmax in float32; keys and values, cached ones included, are in the input's dtype.
[<AllowNullLiteral>]
type GroupedQueryAttention(name: string, cfg: AttentionConfig) as this =
    inherit Module<Tensor, Tensor>(name)
    let cfg = Moe.Config.orFail "attention config" (AttentionConfig.validate cfg) cfg
    let headDim = AttentionConfig.headDim cfg
    let d, h, g = int64 cfg.ModelDim, int64 cfg.Heads, int64 cfg.KvHeads
    let wq = Linear(d, h * int64 headDim, hasBias = false)
    let wk = Linear(d, g * int64 headDim, hasBias = false)
    let wv = Linear(d, g * int64 headDim, hasBias = false)
    let wo = Linear(h * int64 headDim, d, hasBias = false)
    do this.RegisterComponents()

    /// x [B; S; n * Dh] -> [B; n; S; Dh].
    let splitHeads (heads: int64) (x: Tensor) : Tensor =
        use v = x.view(x.shape[0], x.shape[1], heads, int64 headDim)
        v.transpose(1L, 2L)

    let checkInput (what: string) (x: Tensor) =
        expect what (sprintf "[B; S; %d] floating point" cfg.ModelDim)
            (fun t -> t.Dimensions = 3L && t.shape[2] = d && isFloating t) x

    /// Attends q [B; H; S; Dh] over k, v [B; G; L; Dh], then merges heads and projects -> [B; S; D].
    let attendAndProject (mask: Tensor option) (q: Tensor) (k: Tensor) (v: Tensor) : Tensor =
        use _ = torch.NewDisposeScope()
        let p = if this.training then cfg.Dropout else 0.0
        let o = attend cfg.Impl p mask q k v                                    // [B; H; S; Dh]
        let merged = o.transpose(1L, 2L).reshape(q.shape[0], q.shape[2], h * int64 headDim)  // [B; S; H*Dh]
        (linearLayerCast wo merged).MoveToOuterDisposeScope()

    member _.Config = cfg
    member _.Wq = wq
    member _.Wk = wk
    member _.Wv = wv
    member _.Wo = wo

    /// Self-attention. x [B; S; D]; keyValid [B; L] bool (true = real token, null = all), where L = S
    /// without a cache and L = cached + S with one; `causal` hides later positions; a non-null `cache`
    /// receives this step's keys and values and supplies the earlier ones. Returns [B; S; D].
    member _.SelfAttend(x: Tensor, keyValid: Tensor, causal: bool, cache: KvCache) : Tensor =
        checkInput "x" x
        use _ = torch.NewDisposeScope()
        let q = splitHeads h (linearLayerCast wq x)                            // [B; H; S; Dh]
        let kNew = splitHeads g (linearLayerCast wk x)                         // [B; G; S; Dh]
        let vNew = splitHeads g (linearLayerCast wv x)                         // [B; G; S; Dh]
        let k, v =
            if isNull cache then kNew, vNew
            else
                cache.Append(kNew, vNew)
                cache.Keys, cache.Values                                        // [B; G; L; Dh]
        let l = k.shape[2]
        let causalPart = if causal then Some(causalMask x.device x.shape[1] l) else None
        let paddingPart =
            if isNull keyValid then None
            else
                expect "keyValid" (sprintf "[%d; %d] bool (one flag per key position)" x.shape[0] l)
                    (fun t -> t.Dimensions = 2L && t.shape[0] = x.shape[0] && t.shape[1] = l && t.dtype = torch.ScalarType.Bool) keyValid
                Some(keyPaddingMask keyValid)
        (attendAndProject (combineMasks causalPart paddingPart) q k v).MoveToOuterDisposeScope()

    /// Cross-attention from x [B; S; D] to an encoder output memory [B; L; D]; memoryValid [B; L] bool
    /// (null = all). With a non-null `cache` the memory's keys and values are computed on the first call
    /// and reused afterwards (memory may then be null). Returns [B; S; D].
    member _.CrossAttend(x: Tensor, memory: Tensor, memoryValid: Tensor, cache: KvCache) : Tensor =
        checkInput "x" x
        use _ = torch.NewDisposeScope()
        let q = splitHeads h (linearLayerCast wq x)                            // [B; H; S; Dh]
        let k, v =
            if not (isNull cache) && not cache.IsEmpty then cache.Keys, cache.Values
            else
                checkInput "memory" memory
                if memory.shape[0] <> x.shape[0] then
                    invalidArg "memory" (sprintf "expected memory with batch %d like x, got %s" x.shape[0] (describe memory))
                let k = splitHeads g (linearLayerCast wk memory)               // [B; G; L; Dh]
                let v = splitHeads g (linearLayerCast wv memory)               // [B; G; L; Dh]
                if not (isNull cache) then cache.Set(k, v)
                k, v
        let mask =
            if isNull memoryValid then None
            else
                expect "memoryValid" (sprintf "[%d; %d] bool (one flag per memory position)" x.shape[0] k.shape[2])
                    (fun t -> t.Dimensions = 2L && t.shape[0] = x.shape[0] && t.shape[1] = k.shape[2] && t.dtype = torch.ScalarType.Bool) memoryValid
                Some(keyPaddingMask memoryValid)
        (attendAndProject mask q k v).MoveToOuterDisposeScope()

    /// Unmasked self-attention. x [B; S; D] -> [B; S; D].
    override this.forward(x: Tensor) : Tensor = this.SelfAttend(x, null, false, null)

