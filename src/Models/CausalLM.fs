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
