/// SummaC over a corpus with a classifier checkpoint: SummaC-ZS of every (document, summary) pair and, with
/// convolution weights, SummaC-Conv from the same NLI images, with the counts a reader needs to trust them
/// (pairs cut to the token limit, summaries without a chunk, document chunks not scored). What `moe score
/// --summac` runs; `Scoring.withSummaC` adds the result to a score report.
///
/// Legend: N examples.
module Moe.Metrics.SummaC

open System
open Moe.Metrics.Consistency

/// One example's SummaC scores.
type SummaCExample =
    { /// SummaC-ZS (entailment minus contradiction by default, in [-1, 1]).
      Zs: float
      /// SummaC-Conv's probability of "consistent", when convolution weights were given.
      Conv: float option }

/// SummaC scores of N examples and how they were computed.
type SummaCRun =
    { /// The NLI model (its folder).
      Model: string
      /// summac's granularity name, e.g. "sentence" or "paragraph-sentence".
      Granularity: string
      /// The convolution weights file, when SummaC-Conv was computed.
      ConvWeights: string option
      /// NLI pairs scored.
      Pairs: int
      /// Pairs cut to `MaxTokens` (longest-first).
      TruncatedPairs: int
      /// Tokens per pair, special tokens included.
      MaxTokens: int
      /// Summaries with no chunk longer than `MinChunkChars`: summac's zero image, ZS 0.
      SummariesWithoutChunks: int
      /// Document chunks past `MaxDocumentChunks`, summed over examples, not scored.
      DroppedDocumentChunks: int
      Examples: SummaCExample[] }

/// The granularity name of a config, as summac spells its argument.
let granularityName (cfg: SummaCConfig) : string =
    if cfg.DocumentGranularity = cfg.SummaryGranularity then Granularity.name cfg.DocumentGranularity
    else Granularity.name cfg.DocumentGranularity + "-" + Granularity.name cfg.SummaryGranularity

/// SummaC-ZS (and SummaC-Conv with `conv`: the model and its weights file) of N summaries against their documents
/// with a checkpoint NLI model. Empty documents or summaries raise `ArgumentException` naming the line.
let run (cfg: SummaCConfig) (conv: (SummaCConv.ConvModel * string) option) (nli: Nli.CheckpointNli) (documents: string[]) (summaries: string[]) : SummaCRun =
    let scorer = entailmentScorer nli
    let pairsBefore, truncatedBefore = nli.ScoredPairs, nli.TruncatedPairs
    let imgs = images cfg scorer documents summaries
    let convScores = conv |> Option.map (fun (model, _) -> SummaCConv.score model imgs)
    { Model = (nli :> INliModel).Name
      Granularity = granularityName cfg
      ConvWeights = conv |> Option.map snd
      Pairs = nli.ScoredPairs - pairsBefore
      TruncatedPairs = nli.TruncatedPairs - truncatedBefore
      MaxTokens = nli.MaxTokens
      SummariesWithoutChunks = imgs |> Array.filter (fun i -> i.SummaryChunks.Length = 0) |> Array.length
      DroppedDocumentChunks = imgs |> Array.sumBy _.DroppedDocumentChunks
      Examples = imgs |> Array.mapi (fun k img -> { Zs = zsScore cfg img; Conv = convScores |> Option.map (fun s -> s[k]) }) }
