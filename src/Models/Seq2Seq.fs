/// What generation needs from an encoder-decoder, so that one search (greedy, beam, sampling) serves the
/// toolkit's own models and the pretrained families (BART, Pegasus, T5, Switch Transformers) alike.
/// Axes: N rows decoded together, S source positions, T decoder positions given, D width, V vocabulary.
module Moe.Seq2Seq

open TorchSharp
open Moe.Models

type Tensor = torch.Tensor

/// An encoder-decoder as generation sees it.
type ISeq2SeqModel =
    /// Logits' last axis.
    abstract VocabSize : int
    /// An empty key/value cache, one entry per decoder layer. Dispose it when done.
    abstract NewCache : unit -> DecoderCache
    /// Encodes inputIds [N; S] int64 with attentionMask [N; S] bool (true = real token).
    /// Returns the encoder states [N; S; D] and the encoder's MoE reports.
    abstract Encode : inputIds: Tensor * attentionMask: Tensor -> EncoderOutput
    /// Logits [N; T; V] float32 for decoderIds [N; T] int64, which continue the positions already in `cache`
    /// (`cache.Length`); a null cache means decoderIds hold the whole prefix from the decoder start token.
    /// encoderStates [N; S; D] and attentionMask [N; S] bool come from `Encode`.
    abstract Decode : decoderIds: Tensor * encoderStates: Tensor * attentionMask: Tensor * cache: DecoderCache -> ModelOutput

/// The toolkit's own encoder-decoder as generation sees it.
let ofModel (model: EncoderDecoder) : ISeq2SeqModel =
    { new ISeq2SeqModel with
        member _.VocabSize = model.Config.VocabSize
        member _.NewCache() = model.NewCache()
        member _.Encode(inputIds, attentionMask) = model.Encode(inputIds, attentionMask)
        member _.Decode(decoderIds, encoderStates, attentionMask, cache) =
            model.Decode(encoderStates, attentionMask, decoderIds, null, cache) }
