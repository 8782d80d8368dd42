/// What generation and training need from a decoder-only language model, so that one greedy/beam/sampling
/// search and one loss serve every pretrained family (Llama, Qwen2, Mixtral, Qwen2-MoE, OLMoE) alike.
/// Axes: N rows decoded together, T positions given now, P positions already in the cache, V vocabulary.
module Moe.CausalLM

open TorchSharp
open Moe.Tensors
open Moe.Models

type Tensor = torch.Tensor

/// A decoder-only language model as generation sees it.
type ICausalLM =
    /// Logits' last axis.
    abstract VocabSize : int
    /// An empty key/value cache, one self-attention entry per layer. Dispose it when done.
    abstract NewCache : unit -> DecoderCache
    /// Logits [N; T; V] float32 (and the MoE layers' reports) for inputIds [N; T] int64 that continue the
    /// P positions already in `cache` (null: no cache, P = 0). attentionMask [N; P + T] bool (true = real
    /// token; null = all real) covers the cached positions too; positionIds [N; T] int64 (null: computed
    /// from the attention mask with `positionIds`).
    abstract Forward : inputIds: Tensor * attentionMask: Tensor * positionIds: Tensor * cache: DecoderCache -> ModelOutput

/// Position ids from an attention mask as transformers' `generate` computes them for left-padded batches:
/// the running count of real tokens minus one, and 1 at padding positions (which no real token attends).
/// attentionMask [N; L] bool -> [N; L] int64.
let positionIds (attentionMask: Tensor) : Tensor =
    expect "attentionMask" "[N; L] bool" (fun t -> t.Dimensions = 2L && t.dtype = torch.ScalarType.Bool) attentionMask
    use scope = torch.NewDisposeScope()
    let counted = attentionMask.to_type(torch.ScalarType.Int64).cumsum(1L) // [N; L]
    let ids = withInt64Scalar 1L (fun one -> counted.sub one) // [N; L]
    (withInt64Scalar 1L (fun one -> ids.masked_fill(attentionMask.logical_not (), one))).MoveToOuterDisposeScope()

/// Checks a decoder-only forward pass's inputs and derives what it needs, in the caller's dispose scope:
/// inputIds [N; T] int64 with ids below `vocabSize`, continuing the P positions of `cache` (null: none), with
/// P + T <= `maxPositions` (`positionsField` names the config field in the error); attentionMask [N; P + T]
/// bool (null: all real); positionIds [N; T] int64 (null: from the mask, `positionIds`); a cache of `layers`
/// layers. -> (mask [N; P + T] bool, positions [N; T] int64, P).
let prepareInputs (vocabSize: int) (maxPositions: int) (positionsField: string) (layers: int)
                  (inputIds: Tensor) (attentionMask: Tensor) (givenPositions: Tensor) (cache: DecoderCache) : Tensor * Tensor * int64 =
    expectIndex "inputIds" "[N; T]" 2 inputIds
    let n, t = inputIds.shape[0], inputIds.shape[1]
    if t < 1L then invalidArg "inputIds" (sprintf "expected inputIds [N; T] with T >= 1, got %s" (describe inputIds))
    let hasCache = not (isNull (box cache))
    let past = if hasCache then cache.Length else 0L
    let l = past + t
    if l > int64 maxPositions then
        invalidArg "inputIds" (sprintf "the sequence has %d positions, more than the model's %d (%s)" l maxPositions positionsField)
    let lo, hi =
        use lo = inputIds.min ()
        use hi = inputIds.max ()
        lo.item<int64> (), hi.item<int64> ()
    if lo < 0L || hi >= int64 vocabSize then invalidArg "inputIds" (sprintf "expected token ids in 0..%d (vocab_size - 1)" (vocabSize - 1))
    if hasCache && cache.Layers.Length <> layers then
        invalidArg "cache" (sprintf "expected a cache of %d layers (NewCache), got %d" layers cache.Layers.Length)
    let mask =
        if isNull attentionMask then torch.ones([| n; l |], dtype = torch.ScalarType.Bool, device = inputIds.device)
        else
            expect "attentionMask" (sprintf "[%d; %d] bool (cached and new positions)" n l)
                (fun m -> m.dtype = torch.ScalarType.Bool && m.Dimensions = 2L && m.shape[0] = n && m.shape[1] = l) attentionMask
            attentionMask
    let positions =
        if isNull givenPositions then (positionIds mask).narrow(1L, past, t)
        else
            expect "positionIds" (sprintf "[%d; %d] int64" n t) (fun p -> p.dtype = torch.ScalarType.Int64 && p.shape = [| n; t |]) givenPositions
            givenPositions
    mask, positions, past

/// transformers' causal-LM loss: the mean cross-entropy of logits [N; T; V] at position t against labels
/// [N; T] int64 at t + 1 (-100 ignored).
let shiftedLoss (logits: Tensor) (labels: Tensor) : Tensor =
    let n, t, v = logits.shape[0], logits.shape[1], logits.shape[2]
    expect "labels" (sprintf "[%d; %d] int64 (-100 ignored)" n t) (fun y -> y.dtype = torch.ScalarType.Int64 && y.shape = [| n; t |]) labels
    use scope = torch.NewDisposeScope()
    let shifted = logits.narrow(1L, 0L, t - 1L).reshape(-1L, v) // [N*(T-1); V]
    let targets = labels.narrow(1L, 1L, t - 1L).reshape(-1L) // [N*(T-1)]
    torch.nn.functional.cross_entropy(shifted, targets, ignore_index = -100L).MoveToOuterDisposeScope()
