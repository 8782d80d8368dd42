/// Model-based metrics whose models are plugged in: the exact aggregation math of BERTScore and SummaC-ZS over
/// an encoder or NLI interface (no pretrained weights live in this repository, so these two are never faked).
///
/// Legend: L tokens in one text, H embedding width, P document chunks (premises), Q summary chunks (hypotheses).
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

/// NLI-based factual consistency as SummaC (Laban et al. 2022, "SummaC: Re-Visiting NLI-based Models for
/// Inconsistency Detection in Summarization", sec. 3), following tingofurro/summac's `model_summac.py`: the document
/// and the summary are cut into chunks at a granularity (`split_text`), an NLI model scores every (document chunk,
/// summary chunk) pair, and the probabilities form an "image" [3; P; Q] (entailment, contradiction, neutral).
/// SummaC-ZS (sec. 3.1, `SummaCZS.image2score`) reduces it: per summary chunk the maximum entailment over the
/// document chunks minus the maximum contradiction (each reduced on its own, not the maximum of differences), then
/// the mean over summary chunks. The NLI model is an interface; `Nli` implements it over a classifier checkpoint.
module Consistency =
    /// An NLI model's class probabilities for one pair.
    type NliProbabilities = { Entailment: float; Neutral: float; Contradiction: float }

    /// One premise-hypothesis pair.
    type NliPair = { Premise: string; Hypothesis: string }

    /// A pretrained NLI classifier seen through its three NLI classes (SummaC's default model card is
    /// tals/albert-xlarge-vitaminc-mnli; its "mnli" card is roberta-large-mnli).
    type IEntailmentScorer =
        abstract Name: string
        /// Probabilities per pair, in order.
        abstract Score: pairs: NliPair[] -> NliProbabilities[]

    /// An NLI classifier as it is stored: its label names (config.json's `id2label`, in id order) and a
    /// probability per label for each pair.
    type INliModel =
        abstract Name: string
        /// The label names in id order.
        abstract Labels: string[]
        /// One probability per label [labels] for each pair, in order.
        abstract Probabilities: pairs: NliPair[] -> float[][]

    /// Label names (lower-case) read as entailment: MNLI's and VitaminC's (`SUPPORTS`).
    let entailmentNames = set [ "entailment"; "entailed"; "supports" ]
    /// Label names read as contradiction: MNLI's and VitaminC's (`REFUTES`).
    let contradictionNames = set [ "contradiction"; "contradicted"; "refutes" ]
    /// Label names read as neutral: MNLI's and VitaminC's (`NOT ENOUGH INFO`).
    let neutralNames = set [ "neutral"; "not enough info"; "not_enough_info" ]

    /// The ids of entailment, contradiction and (when there is one) neutral among `labels`. Raises
    /// `ArgumentException` naming `source` and the labels when entailment or contradiction is missing: a model whose
    /// config.json says LABEL_0, LABEL_1, ... cannot be read as NLI without guessing. A third label with another
    /// name is taken as neutral, as summac's `get_neutral_idx` does.
    let labelIds (source: string) (labels: string[]) : int * int * int option =
        let find (names: Set<string>) = labels |> Array.tryFindIndex (fun l -> names.Contains(l.Trim().ToLowerInvariant()))
        match find entailmentNames, find contradictionNames with
        | Some e, Some c ->
            let n =
                match find neutralNames with
                | Some n -> Some n
                | None when labels.Length = 3 -> Some(3 - e - c)
                | None -> None
            e, c, n
        | _ ->
            invalidArg "labels"
                (sprintf "%s: expected NLI labels with an entailment (%s) and a contradiction (%s) class, got [%s]; set id2label in config.json"
                    source (String.Join("/", entailmentNames)) (String.Join("/", contradictionNames)) (String.Join(", ", labels)))

    /// Reads an `INliModel`'s probabilities as entailment, neutral and contradiction (`labelIds`; neutral is 0 for a
    /// model without that class).
    let entailmentScorer (model: INliModel) : IEntailmentScorer =
        let e, c, n = labelIds model.Name model.Labels
        { new IEntailmentScorer with
            member _.Name = model.Name
            member _.Score pairs =
                let probs = model.Probabilities pairs
                if probs.Length <> pairs.Length then
                    invalidOp (sprintf "NLI model %s returned %d results for %d pairs" model.Name probs.Length pairs.Length)
                probs |> Array.map (fun p ->
                    if p.Length <> model.Labels.Length then
                        invalidOp (sprintf "NLI model %s returned %d probabilities for %d labels" model.Name p.Length model.Labels.Length)
                    { Entailment = p[e]; Contradiction = p[c]; Neutral = (match n with Some k -> p[k] | None -> 0.0) }) }

    /// How a text is cut into chunks (summac's `granularity`).
    type Granularity =
        /// The whole text, one chunk.
        | Document
        /// Paragraphs: split at blank lines when there are any, else at line breaks.
        | Paragraph
        /// Sentences (the sentence splitter).
        | Sentence
        /// Each sentence joined with the next by a space (the last one alone): "2sents".
        | TwoSentences
        /// Sentences, then paragraphs.
        | Mixed

    /// Granularity names as summac spells them.
    module Granularity =
        let name (g: Granularity) =
            match g with
            | Document -> "document"
            | Paragraph -> "paragraph"
            | Sentence -> "sentence"
            | TwoSentences -> "2sents"
            | Mixed -> "mixed"

        let private all = [ Document; Paragraph; Sentence; TwoSentences; Mixed ]

        /// One name ("sentence": both sides) or "DOC-SUMMARY" ("paragraph-sentence"): the document's and the
        /// summary's granularities, as summac's `granularity` argument.
        let parse (text: string) : Result<Granularity * Granularity, string> =
            let one (s: string) = all |> List.tryFind (fun g -> name g = s)
            let expected = sprintf "expected one of %s, or two joined by '-' (document's, summary's)" (all |> List.map name |> String.concat ", ")
            match (if isNull text then [||] else text.Split('-')) |> Array.map one with
            | [| Some g |] -> Ok(g, g)
            | [| Some d; Some s |] -> Ok(d, s)
            | _ -> Error(sprintf "unknown SummaC granularity \"%s\": %s" text expected)

    /// How chunk scores are reduced (summac's `op1` over document chunks, `op2` over summary chunks).
    type Reduce =
        | Max
        | Mean
        | Min

    /// SummaC settings; `defaults` are summac's SummaC-ZS defaults at sentence granularity.
    type SummaCConfig =
        { /// Count entailment probability (summac `use_ent`, default true).
          UseEntailment: bool
          /// Count contradiction probability (summac `use_con`, default true).
          UseContradiction: bool
          /// How the document is cut (the first half of summac's `granularity`).
          DocumentGranularity: Granularity
          /// How the summary is cut (the second half, or the same).
          SummaryGranularity: Granularity
          /// Sentence and paragraph chunks of at most this many characters are dropped (summac keeps `len > 10`).
          MinChunkChars: int
          /// Document chunks after this many are not scored (summac `max_doc_sents`, 100); counted in the image.
          MaxDocumentChunks: int
          /// Reduction over document chunks (summac `op1`, max).
          OverDocument: Reduce
          /// Reduction over summary chunks (summac `op2`, mean).
          OverSummary: Reduce
          /// Splits a text into its sentences (summac uses NLTK's Punkt; the default is `Sentences.split`).
          SplitSentences: Func<string, string[]> }

    /// The rule-based splitter `Sentences.split` (its rules are documented there).
    let splitSentences (text: string) : string[] = Moe.Sentences.split text

    /// Entailment minus contradiction, max over the document, mean over the summary, sentence granularity (summac's
    /// README settings for SummaC-ZS), chunks longer than 10 characters, at most 100 document chunks.
    let defaults =
        { UseEntailment = true
          UseContradiction = true
          DocumentGranularity = Sentence
          SummaryGranularity = Sentence
          MinChunkChars = 10
          MaxDocumentChunks = 100
          OverDocument = Max
          OverSummary = Mean
          SplitSentences = Func<string, string[]> splitSentences }

    /// Every problem with a config, all at once.
    let validate (cfg: SummaCConfig) : string list =
        [ if not cfg.UseEntailment && not cfg.UseContradiction then "at least one of UseEntailment and UseContradiction must be true"
          if cfg.MinChunkChars < 0 then sprintf "MinChunkChars must be >= 0, got %d" cfg.MinChunkChars
          if cfg.MaxDocumentChunks < 1 then sprintf "MaxDocumentChunks must be >= 1, got %d" cfg.MaxDocumentChunks
          if isNull cfg.SplitSentences then "SplitSentences must be a function, got null" ]

    let private check (cfg: SummaCConfig) =
        match validate cfg with
        | [] -> ()
        | problems -> invalidArg "cfg" (String.concat "; " problems)

    /// The chunks of `text` at a granularity (summac's `split_text`): sentences and paragraphs of at most
    /// `cfg.MinChunkChars` characters are dropped; "2sents" joins each kept sentence with the next by a space.
    let chunks (cfg: SummaCConfig) (granularity: Granularity) (text: string) : string[] =
        if isNull text then invalidArg "text" "expected a text, got null"
        let keep (xs: string[]) = xs |> Array.filter (fun s -> s.Length > cfg.MinChunkChars)
        let sentences () = keep (cfg.SplitSentences.Invoke text)
        let paragraphs () =
            let parts = if text.Contains "\n\n" then text.Split("\n\n") else text.Split('\n')
            keep (parts |> Array.map (fun p -> p.Trim()))
        match granularity with
        | Document -> [| text |]
        | Paragraph -> paragraphs ()
        | Sentence -> sentences ()
        | TwoSentences ->
            let s = sentences ()
            Array.init s.Length (fun i -> String.Join(" ", s[i .. min (i + 1) (s.Length - 1)]))
        | Mixed -> Array.append (sentences ()) (paragraphs ())

    /// One document-summary pair's NLI probabilities [P; Q] per class, with the chunks they came from. When either
    /// side has no chunk, the image is summac's zero image [1; 1] and the chunk arrays are empty.
    type Image =
        { Entailment: float[,]
          Contradiction: float[,]
          Neutral: float[,]
          DocumentChunks: string[]
          SummaryChunks: string[]
          /// Document chunks past `MaxDocumentChunks`, not scored.
          DroppedDocumentChunks: int }

    let private expectText (what: string) (i: int) (text: string) =
        if isNull text || String.IsNullOrWhiteSpace text then
            invalidArg what (sprintf "expected a non-empty %s, got an empty one at index %d (line %d)" what i (i + 1))

    /// The images of N (document, summary) pairs, scoring all their chunk pairs in one call of `scorer` (summac's
    /// `build_images`). Raises `ArgumentException` for an empty document or summary, naming its index.
    let images (cfg: SummaCConfig) (scorer: IEntailmentScorer) (documents: string[]) (summaries: string[]) : Image[] =
        check cfg
        if documents.Length <> summaries.Length then
            invalidArg "summaries" (sprintf "expected one summary per document, got %d documents and %d summaries" documents.Length summaries.Length)
        documents |> Array.iteri (expectText "document")
        summaries |> Array.iteri (expectText "summary")
        let cut =
            Array.map2 (fun d s ->
                let all = chunks cfg cfg.DocumentGranularity d
                let kept = Array.truncate cfg.MaxDocumentChunks all
                kept, chunks cfg cfg.SummaryGranularity s, all.Length - kept.Length) documents summaries
        let pairs =
            [| for premises, hypotheses, _ in cut do
                 for p in premises do
                     for h in hypotheses -> { Premise = p; Hypothesis = h } |]
        let probs = if pairs.Length = 0 then [||] else scorer.Score pairs
        if probs.Length <> pairs.Length then
            invalidOp (sprintf "NLI scorer %s returned %d results for %d pairs" scorer.Name probs.Length pairs.Length)
        let mutable at = 0
        [| for premises, hypotheses, dropped in cut ->
             let p, q = premises.Length, hypotheses.Length
             if p = 0 || q = 0 then
                 { Entailment = Array2D.zeroCreate 1 1; Contradiction = Array2D.zeroCreate 1 1; Neutral = Array2D.zeroCreate 1 1
                   DocumentChunks = [||]; SummaryChunks = [||]; DroppedDocumentChunks = dropped }
             else
                 let base' = at
                 at <- at + p * q
                 let channel (f: NliProbabilities -> float) = Array2D.init p q (fun i j -> f probs[base' + i * q + j])
                 { Entailment = channel _.Entailment; Contradiction = channel _.Contradiction; Neutral = channel _.Neutral
                   DocumentChunks = premises; SummaryChunks = hypotheses; DroppedDocumentChunks = dropped } |]

    let private reduce (r: Reduce) (xs: float seq) =
        match r with
        | Max -> Seq.max xs
        | Mean -> Seq.average xs
        | Min -> Seq.min xs

    /// The score of one summary chunk from its reduced entailment e and contradiction c: e - c with both, e with
    /// entailment only, 1 - c with contradiction only (summac `image2score`).
    let combine (cfg: SummaCConfig) (e: float) (c: float) : float =
        match cfg.UseEntailment, cfg.UseContradiction with
        | true, true -> e - c
        | true, false -> e
        | false, true -> 1.0 - c
        | false, false -> invalidArg "cfg" "at least one of UseEntailment and UseContradiction must be true"

    /// `combine` of one pair's probabilities (a document of one chunk).
    let pairScore (cfg: SummaCConfig) (p: NliProbabilities) : float = combine cfg p.Entailment p.Contradiction

    /// Each summary chunk's score [Q]: entailment and contradiction each reduced over the document chunks
    /// (`OverDocument`), then combined.
    let chunkScores (cfg: SummaCConfig) (image: Image) : float[] =
        let p, q = Array2D.length1 image.Entailment, Array2D.length2 image.Entailment
        Array.init q (fun j ->
            let over (m: float[,]) = reduce cfg.OverDocument (seq { for i in 0 .. p - 1 -> m[i, j] })
            combine cfg (over image.Entailment) (over image.Contradiction))

    /// SummaC-ZS of one image: `chunkScores` reduced over the summary (`OverSummary`).
    let zsScore (cfg: SummaCConfig) (image: Image) : float = reduce cfg.OverSummary (chunkScores cfg image)

    /// Max over premises (rows) then mean over hypotheses (columns) of one score matrix [P, Q]; 0 when empty.
    let aggregate (scores: float[,]) : float =
        let p = Array2D.length1 scores
        let q = Array2D.length2 scores
        if p = 0 || q = 0 then 0.0
        else Seq.average (seq { for j in 0 .. q - 1 -> Seq.max (seq { for i in 0 .. p - 1 -> scores[i, j] }) })

    /// SummaC-ZS consistency of a summary with its document, in [-1, 1] with the defaults. A side with no chunk
    /// longer than `MinChunkChars` scores 0 (summac's zero image); an empty text raises `ArgumentException`.
    let summacZs (cfg: SummaCConfig) (scorer: IEntailmentScorer) (document: string) (summary: string) : float =
        let image = (images cfg scorer [| document |] [| summary |])[0]
        zsScore cfg image
