/// BLEU (Papineni et al. 2002) exactly as sacreBLEU 2.x computes it (sacrebleu/metrics/bleu.py,
/// tokenizers/tokenizer_13a.py and tokenizer_re.py), scores in [0, 100].
///
/// Legend: R reference streams.
module Moe.Metrics.Bleu

open System
open System.Collections.Generic
open System.Text.RegularExpressions

/// How segments are split into tokens before n-gram counting.
type Tokenizer =
    /// mteval-v13a as sacreBLEU implements it (its default).
    | Tok13a
    /// Whitespace only (sacreBLEU `tokenize='none'`).
    | TokNone

/// What to do with n-gram orders that have no match (Chen & Cherry 2014).
type Smoothing =
    | NoSmoothing
    /// Method 1: a zero count becomes `epsilon` matches (sacreBLEU's default epsilon is 0.1).
    | Floor of epsilon: float
    /// Method 2: add k to matches and totals of orders 2 and up (sacreBLEU's default k is 1).
    | AddK of k: float
    /// Method 3 (NIST, mteval-v13a): the i-th zero-match order gets precision 1 / (2^i total). sacreBLEU's default.
    | Exp

/// sacreBLEU's default epsilon for `Floor` smoothing.
let defaultFloor = 0.1
/// sacreBLEU's default k for `AddK` smoothing.
let defaultAddK = 1.0

/// BLEU settings.
type BleuConfig =
    { Tokenizer: Tokenizer
      Smoothing: Smoothing
      /// Highest n-gram order (4 in BLEU).
      MaxOrder: int
      Lowercase: bool
      /// Average only over orders up to the highest one with any hypothesis n-grams; for sentence BLEU.
      EffectiveOrder: bool }

/// `sacrebleu.corpus_bleu` defaults: 13a, exp smoothing, order 4, cased, no effective order.
let corpusDefaults =
    { Tokenizer = Tok13a; Smoothing = Exp; MaxOrder = 4; Lowercase = false; EffectiveOrder = false }

/// `sacrebleu.sentence_bleu` defaults: as corpus BLEU but with effective order.
let sentenceDefaults = { corpusDefaults with EffectiveOrder = true }

/// Every problem with a config, all at once.
let validate (cfg: BleuConfig) : string list =
    [ if cfg.MaxOrder < 1 then sprintf "MaxOrder must be >= 1, got %d" cfg.MaxOrder
      match cfg.Smoothing with
      | Floor e when not (e >= 0.0) -> sprintf "Floor epsilon must be >= 0, got %g" e
      | AddK k when not (k >= 0.0) -> sprintf "AddK k must be >= 0, got %g" k
      | _ -> () ]

// mteval-v13a's language-dependent part, in order (sacreBLEU TokenizerRegexp).
let private symbols = Regex(@"([{-~\[-` -&(-+:-@/])", RegexOptions.Compiled)
let private periodCommaAfterNonDigit = Regex(@"([^0-9])([.,])", RegexOptions.Compiled)
let private periodCommaBeforeNonDigit = Regex(@"([.,])([^0-9])", RegexOptions.Compiled)
let private dashAfterDigit = Regex(@"([0-9])(-)", RegexOptions.Compiled)

/// The mteval-v13a tokenization of one segment, tokens joined by single spaces.
let tokenize13a (line: string) : string =
    let mutable s = line.Replace("<skipped>", "").Replace("-\n", "").Replace("\n", " ")
    if s.Contains '&' then
        s <- s.Replace("&quot;", "\"").Replace("&amp;", "&").Replace("&lt;", "<").Replace("&gt;", ">")
    s <- " " + s + " "
    s <- symbols.Replace(s, " $1 ")
    s <- periodCommaAfterNonDigit.Replace(s, "$1 $2 ")
    s <- periodCommaBeforeNonDigit.Replace(s, " $1 $2")
    s <- dashAfterDigit.Replace(s, "$1 $2 ")
    String.Join(" ", PyText.split s)

/// The tokens sacreBLEU counts for one segment (after optional lower-casing and right-stripping).
let tokens (cfg: BleuConfig) (segment: string) : string[] =
    let s = if cfg.Lowercase then PyText.lower segment else segment
    let s = PyText.rstrip s
    match cfg.Tokenizer with
    | Tok13a -> PyText.split (tokenize13a s)
    | TokNone -> PyText.split s

/// Sufficient statistics of one segment: lengths and per-order matched and total n-gram counts.
type Statistics =
    { HypothesisLength: int
      /// The reference length closest to the hypothesis length (the shorter on ties).
      ReferenceLength: int
      /// Clipped matches per order [MaxOrder].
      Correct: int[]
      /// Hypothesis n-grams per order [MaxOrder].
      Total: int[] }

/// A BLEU score with the numbers it came from.
type BleuScore =
    { /// BLEU in [0, 100].
      Score: float
      /// Per-order precisions in [0, 100] after smoothing.
      Precisions: float[]
      BrevityPenalty: float
      Statistics: Statistics }

let private ngrams (maxOrder: int) (tokens: string[]) : Dictionary<string, int> =
    let counts = Dictionary<string, int>(StringComparer.Ordinal)
    for n in 1 .. maxOrder do
        for i in 0 .. tokens.Length - n do
            // A tab never occurs inside a token (tokens are split on white space), so it separates unambiguously.
            let key = String.Join("\t", tokens, i, n)
            counts[key] <- (match counts.TryGetValue key with | true, c -> c + 1 | _ -> 1)
    counts

/// Statistics of one hypothesis against one or more references (counts clipped by the per-n-gram maximum
/// over references, as sacreBLEU merges them).
let segmentStatistics (cfg: BleuConfig) (hypothesis: string) (references: string[]) : Statistics =
    if references.Length = 0 then invalidArg "references" "expected at least one reference for the hypothesis"
    let refTokens = references |> Array.map (tokens cfg)
    let merged = Dictionary<string, int>(StringComparer.Ordinal)
    for r in refTokens do
        for KeyValue(gram, count) in ngrams cfg.MaxOrder r do
            match merged.TryGetValue gram with
            | true, c when c >= count -> ()
            | _ -> merged[gram] <- count
    let hyp = tokens cfg hypothesis
    let closest =
        refTokens
        |> Array.map Array.length
        |> Array.minBy (fun len -> abs (hyp.Length - len), len)
    let correct = Array.zeroCreate cfg.MaxOrder
    let total = Array.zeroCreate cfg.MaxOrder
    for KeyValue(gram, count) in ngrams cfg.MaxOrder hyp do
        let order = gram.Split('\t').Length - 1
        total[order] <- total[order] + count
        match merged.TryGetValue gram with
        | true, c -> correct[order] <- correct[order] + min count c
        | _ -> ()
    { HypothesisLength = hyp.Length; ReferenceLength = closest; Correct = correct; Total = total }

/// Sums segment statistics into corpus statistics.
let sumStatistics (maxOrder: int) (stats: Statistics seq) : Statistics =
    let correct = Array.zeroCreate maxOrder
    let total = Array.zeroCreate maxOrder
    let mutable hyp = 0
    let mutable ref = 0
    for s in stats do
        hyp <- hyp + s.HypothesisLength
        ref <- ref + s.ReferenceLength
        for n in 0 .. maxOrder - 1 do
            correct[n] <- correct[n] + s.Correct[n]
            total[n] <- total[n] + s.Total[n]
    { HypothesisLength = hyp; ReferenceLength = ref; Correct = correct; Total = total }

/// sacreBLEU's floor on log 0.
let private logFloor = -9999999999.0

/// BLEU from statistics (sacreBLEU `BLEU.compute_bleu`): brevity penalty times the geometric mean of
/// smoothed precisions; 0 when nothing matches at any order.
let fromStatistics (cfg: BleuConfig) (stats: Statistics) : BleuScore =
    match validate cfg with
    | [] -> ()
    | problems -> invalidArg "cfg" (String.concat "; " problems)
    let bp =
        if stats.HypothesisLength < stats.ReferenceLength then
            if stats.HypothesisLength > 0 then exp (1.0 - float stats.ReferenceLength / float stats.HypothesisLength) else 0.0
        else 1.0
    let precisions = Array.zeroCreate cfg.MaxOrder
    if stats.Correct |> Array.forall ((=) 0) then
        { Score = 0.0; Precisions = precisions; BrevityPenalty = bp; Statistics = stats }
    else
        let correct = stats.Correct |> Array.map float
        let total = stats.Total |> Array.map float
        let mutable expFactor = 1.0
        let mutable effective = cfg.MaxOrder
        let mutable stop = false
        let mutable n = 1
        while not stop && n <= cfg.MaxOrder do
            match cfg.Smoothing with
            | AddK k when n > 1 ->
                correct[n - 1] <- correct[n - 1] + k
                total[n - 1] <- total[n - 1] + k
            | _ -> ()
            if total[n - 1] = 0.0 then stop <- true
            else
                if cfg.EffectiveOrder then effective <- n
                if correct[n - 1] = 0.0 then
                    match cfg.Smoothing with
                    | Exp ->
                        expFactor <- expFactor * 2.0
                        precisions[n - 1] <- 100.0 / (expFactor * total[n - 1])
                    | Floor epsilon -> precisions[n - 1] <- 100.0 * epsilon / total[n - 1]
                    | NoSmoothing | AddK _ -> ()
                else precisions[n - 1] <- 100.0 * correct[n - 1] / total[n - 1]
                n <- n + 1
        let logSum = precisions[.. effective - 1] |> Array.sumBy (fun p -> if p = 0.0 then logFloor else log p)
        { Score = bp * exp (logSum / float effective); Precisions = precisions; BrevityPenalty = bp; Statistics = stats }

/// Corpus BLEU of N hypotheses against R reference streams, each [N] (sacreBLEU `corpus_bleu`).
let corpus (cfg: BleuConfig) (hypotheses: string[]) (referenceStreams: string[][]) : BleuScore =
    if referenceStreams.Length = 0 then invalidArg "referenceStreams" "expected at least one reference stream"
    for stream in referenceStreams do
        if stream.Length <> hypotheses.Length then
            invalidArg "referenceStreams" (sprintf "expected every reference stream to have %d segments (one per hypothesis), got %d" hypotheses.Length stream.Length)
    hypotheses
    |> Array.mapi (fun i h -> segmentStatistics cfg h (referenceStreams |> Array.map (fun s -> s[i])))
    |> sumStatistics cfg.MaxOrder
    |> fromStatistics cfg

/// Sentence BLEU of one hypothesis against its references (sacreBLEU `sentence_bleu` with `cfg` =
/// `sentenceDefaults`).
let sentence (cfg: BleuConfig) (hypothesis: string) (references: string[]) : BleuScore =
    fromStatistics cfg (segmentStatistics cfg hypothesis references)
