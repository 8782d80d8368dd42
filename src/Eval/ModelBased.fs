/// Model-based metrics whose models are plugged in: the exact aggregation math of BERTScore and SummaC-ZS over
/// an encoder or NLI interface (no pretrained weights live in this repository, so these two are never faked).
///
/// Legend: L tokens in one text, H embedding width, P premises, Q hypotheses.
namespace Moe.Metrics

open System
open System.Collections.Generic
open System.Text.RegularExpressions

/// BERTScore (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT", eq. 1-4): greedy cosine
/// matching of contextual token embeddings, optionally idf-weighted. The encoder is an interface; this module
/// holds the exact aggregation so a checkpoint can be plugged in later. Nothing here invents embeddings.
module BertScore =
    /// The contextual embeddings of one text: tokens [L] and vectors [L][H].
    type TokenEmbeddings = { Tokens: string[]; Vectors: float32[][] }

    /// A pretrained contextual encoder (e.g. roberta-large layer 17, BERTScore's English default).
    type IContextualEmbedder =
        /// The model and layer, for the report.
        abstract Name: string
        /// One `TokenEmbeddings` per text, in order.
        abstract Embed: texts: string[] -> TokenEmbeddings[]

    /// BERTScore settings.
    type BertScoreConfig =
        { /// Weight tokens by idf computed on the references (eq. 4).
          UseIdf: bool
          /// Tokens given weight 0, e.g. "[CLS]" and "[SEP]" or "<s>" and "</s>" (bert_score zeroes them).
          IgnoredTokens: string[]
          /// Baseline (P, R, F) for rescaling x -> (x - b) / (1 - b); bert_score's `rescale_with_baseline`.
          Baseline: Prf option }

    /// No idf, no ignored tokens, no rescaling.
    let defaults = { UseIdf = false; IgnoredTokens = [||]; Baseline = None }

    /// idf(w) = ln((M + 1) / (df(w) + 1)) over the M references' token sets (bert_score `get_idf_dict`); a token
    /// never seen gets ln(M + 1).
    let idf (referenceTokens: string[][]) : string -> float =
        let df = Dictionary<string, int>(StringComparer.Ordinal)
        for tokens in referenceTokens do
            for t in Seq.distinct tokens do
                df[t] <- (match df.TryGetValue t with | true, c -> c + 1 | _ -> 1)
        let m = float referenceTokens.Length
        fun token ->
            match df.TryGetValue token with
            | true, c -> log ((m + 1.0) / (float c + 1.0))
            | _ -> log (m + 1.0)

    let private cosine (a: float32[]) (b: float32[]) : float =
        if a.Length <> b.Length then invalidArg "vectors" (sprintf "expected embeddings of one width H, got %d and %d" a.Length b.Length)
        let mutable dot = 0.0
        let mutable na = 0.0
        let mutable nb = 0.0
        for i in 0 .. a.Length - 1 do
            dot <- dot + float a[i] * float b[i]
            na <- na + float a[i] * float a[i]
            nb <- nb + float b[i] * float b[i]
        if na = 0.0 || nb = 0.0 then 0.0 else dot / (sqrt na * sqrt nb)

    let private expectShape (name: string) (e: TokenEmbeddings) =
        if e.Tokens.Length <> e.Vectors.Length then
            invalidArg name (sprintf "expected %s with one vector per token, got %d tokens and %d vectors" name e.Tokens.Length e.Vectors.Length)

    /// Greedy matching (eq. 2-3): each candidate token takes its most similar reference token for precision,
    /// each reference token its most similar candidate token for recall; weighted means with `weight`.
    /// An empty side, or all weights zero, scores 0.
    let greedyMatch (weight: string -> float) (candidate: TokenEmbeddings) (reference: TokenEmbeddings) : Prf =
        expectShape "candidate" candidate
        expectShape "reference" reference
        if candidate.Tokens.Length = 0 || reference.Tokens.Length = 0 then zeroPrf
        else
            let sim = Array2D.init candidate.Tokens.Length reference.Tokens.Length (fun i j -> cosine candidate.Vectors[i] reference.Vectors[j]) // [Lc, Lr]
            let side (tokens: string[]) (best: int -> float) =
                let mutable num = 0.0
                let mutable den = 0.0
                for i in 0 .. tokens.Length - 1 do
                    let w = weight tokens[i]
                    num <- num + w * best i
                    den <- den + w
                if den = 0.0 then 0.0 else num / den
            let precision = side candidate.Tokens (fun i -> Seq.max (seq { for j in 0 .. reference.Tokens.Length - 1 -> sim[i, j] }))
            let recall = side reference.Tokens (fun j -> Seq.max (seq { for i in 0 .. candidate.Tokens.Length - 1 -> sim[i, j] }))
            { Precision = precision; Recall = recall; F1 = fmeasure precision recall }

    /// BERTScore of each candidate against its reference [N], embedding both with `embedder`.
    let score (cfg: BertScoreConfig) (embedder: IContextualEmbedder) (candidates: string[]) (references: string[]) : Prf[] =
        if candidates.Length <> references.Length then
            invalidArg "references" (sprintf "expected one reference per candidate, got %d candidates and %d references" candidates.Length references.Length)
        let cands = embedder.Embed candidates
        let refs = embedder.Embed references
        if cands.Length <> candidates.Length || refs.Length <> references.Length then
            invalidOp (sprintf "embedder %s returned %d and %d embeddings for %d texts each" embedder.Name cands.Length refs.Length candidates.Length)
        let ignored = HashSet<string>(cfg.IgnoredTokens, StringComparer.Ordinal)
        let baseWeight = if cfg.UseIdf then idf (refs |> Array.map (fun r -> r.Tokens)) else fun _ -> 1.0
        let weight t = if ignored.Contains t then 0.0 else baseWeight t
        let rescale (b: float) (x: float) = (x - b) / (1.0 - b)
        Array.map2 (greedyMatch weight) cands refs
        |> Array.map (fun s ->
            match cfg.Baseline with
            | None -> s
            | Some b -> { Precision = rescale b.Precision s.Precision; Recall = rescale b.Recall s.Recall; F1 = rescale b.F1 s.F1 })

/// NLI-based factual consistency as SummaC-ZS (Laban et al. 2022, "SummaC: Re-Visiting NLI-based Models for
/// Inconsistency Detection in Summarization", section 3.1): an NLI model scores every (document sentence,
/// summary sentence) pair; each summary sentence keeps its best premise (max over the P document sentences),
/// and the summary's score is the mean over its Q sentences. The NLI model is an interface.
module Consistency =
    /// An NLI model's class probabilities for one pair.
    type NliProbabilities = { Entailment: float; Neutral: float; Contradiction: float }

    /// One premise-hypothesis pair.
    type NliPair = { Premise: string; Hypothesis: string }

    /// A pretrained NLI classifier (SummaC's default is tals/albert-xlarge-vitaminc-mnli).
    type IEntailmentScorer =
        abstract Name: string
        /// Probabilities per pair, in order.
        abstract Score: pairs: NliPair[] -> NliProbabilities[]

    /// SummaC-ZS settings.
    type SummaCConfig =
        { /// Count entailment probability (SummaC `use_ent`, default true).
          UseEntailment: bool
          /// Count contradiction probability (SummaC `use_con`, default true).
          UseContradiction: bool
          /// Splits a text into its sentences (SummaC's "sentence" granularity uses NLTK's Punkt).
          SplitSentences: Func<string, string[]> }

    /// Splits after '.', '!' or '?' (and any closing quotes or brackets) followed by white space. A simple rule,
    /// not Punkt: abbreviations such as "Mr. Smith" split; supply a better splitter through the config.
    let splitSentences (text: string) : string[] =
        Regex.Split(text.Trim(), @"(?<=[.!?][""'’”)\]]*)\s+") |> Array.filter (fun s -> s.Trim().Length > 0)

    /// Entailment minus contradiction, the SummaC-ZS defaults.
    let defaults = { UseEntailment = true; UseContradiction = true; SplitSentences = Func<string, string[]> splitSentences }

    /// Every problem with a config, all at once.
    let validate (cfg: SummaCConfig) : string list =
        [ if not cfg.UseEntailment && not cfg.UseContradiction then "at least one of UseEntailment and UseContradiction must be true" ]

    /// The score of one pair: e - c with both, e with entailment only, 1 - c with contradiction only.
    let pairScore (cfg: SummaCConfig) (p: NliProbabilities) : float =
        match cfg.UseEntailment, cfg.UseContradiction with
        | true, true -> p.Entailment - p.Contradiction
        | true, false -> p.Entailment
        | false, true -> 1.0 - p.Contradiction
        | false, false -> invalidArg "cfg" "at least one of UseEntailment and UseContradiction must be true"

    /// Max over premises (rows) then mean over hypotheses (columns) of a pair-score matrix [P, Q].
    let aggregate (scores: float[,]) : float =
        let p = Array2D.length1 scores
        let q = Array2D.length2 scores
        if p = 0 || q = 0 then 0.0
        else Seq.average (seq { for j in 0 .. q - 1 -> Seq.max (seq { for i in 0 .. p - 1 -> scores[i, j] }) })

    /// SummaC-ZS consistency of a summary with its document, in [-1, 1] with the defaults; 0 when either has no
    /// sentence.
    let summacZs (cfg: SummaCConfig) (scorer: IEntailmentScorer) (document: string) (summary: string) : float =
        match validate cfg with
        | [] -> ()
        | problems -> invalidArg "cfg" (String.concat "; " problems)
        let premises = cfg.SplitSentences.Invoke document
        let hypotheses = cfg.SplitSentences.Invoke summary
        if premises.Length = 0 || hypotheses.Length = 0 then 0.0
        else
            let pairs = [| for pr in premises do for h in hypotheses -> { Premise = pr; Hypothesis = h } |]
            let probs = scorer.Score pairs
            if probs.Length <> pairs.Length then
                invalidOp (sprintf "NLI scorer %s returned %d results for %d pairs" scorer.Name probs.Length pairs.Length)
            aggregate (Array2D.init premises.Length hypotheses.Length (fun i j -> pairScore cfg probs[i * hypotheses.Length + j]))
