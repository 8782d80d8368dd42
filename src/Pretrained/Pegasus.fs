/// Pegasus (Zhang et al. 2020, "PEGASUS: Pre-training with Extracted Gap-sentences for Abstractive
/// Summarization") exactly as transformers 4.45.1's `PegasusForConditionalGeneration` computes it: BART's modules
/// (`Moe.Bart`) with Pegasus' layout: pre-LayerNorm with a final layer_norm on each stack, sinusoidal positions
/// (sines in the first half of each vector, cosines in the second; a frozen table that checkpoints may store),
/// token embeddings scaled by sqrt(d_model) as config.json's scale_embedding says, no layernorm_embedding.
/// Axes: N rows, S source positions, T decoder positions, D model width, V vocabulary.
module Moe.Pegasus

open System.IO
open Moe.Bart

/// transformers' PegasusForConditionalGeneration: a `BartForConditionalGeneration` with the Pegasus layout.
type PegasusForConditionalGeneration(cfg: BartConfig) =
    inherit BartForConditionalGeneration({ cfg with Layout = Layout.pegasus }, "PegasusForConditionalGeneration")

/// Parses a Pegasus `config.json` (model_type "pegasus"): every field used, ignored by name or refused.
let parseConfig (path: string) : BartConfig = BartConfig.parse Layout.pegasus path

/// `PegasusForConditionalGeneration` from a Hugging Face checkpoint folder (config.json, model.safetensors),
/// in evaluation mode. A checkpoint without the position tables gets them computed.
let fromFolder (dir: string) : PegasusForConditionalGeneration =
    fromFolderWith Layout.pegasus (fun cfg -> new PegasusForConditionalGeneration(cfg)) dir
