/// ROUGE-N, ROUGE-L and ROUGE-Lsum exactly as google-research's rouge-score package (rouge_scorer.py,
/// tokenize.py, scoring.py) computes them. Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004.
///
/// Legend: L tokens in one text.
module Moe.Metrics.Rouge

open System
open System.Collections.Generic
open System.Text

/// rouge-score stems only tokens longer than this many characters (after ROUGE-1.5.5).
let stemMinExclusiveLength = 3

/// Which ROUGE.
type RougeType =
    /// n-gram overlap, n >= 1 (rouge-score accepts rouge1 ... rouge9; any n works here).
    | RougeN of n: int
    /// Longest common subsequence over the whole text.
    | RougeL
    /// Summary-level LCS (union LCS per reference sentence, ROUGE paper section 3.2); sentences are the
    /// text's '\n'-separated lines.
    | RougeLsum

/// rouge-score's name for the type: rouge1, rougeL, rougeLsum.
let typeName (t: RougeType) : string =
    match t with
    | RougeN n -> sprintf "rouge%d" n
    | RougeL -> "rougeL"
    | RougeLsum -> "rougeLsum"

let private stemCache = Collections.Concurrent.ConcurrentDictionary<string, string>()

let private stemToken (token: string) =
    if token.Length > stemMinExclusiveLength then stemCache.GetOrAdd(token, fun t -> Porter.stem Porter.Nltk t) else token

/// rouge-score's default tokenizer: Python lower-casing, every run of characters outside [a-z0-9] becomes a
/// separator, optional Porter stemming (NLTK mode) of tokens longer than 3 characters.
/// Lower-casing is done per character: 'A'-'Z' and the Kelvin sign U+212A lower to ASCII letters; U+0130
/// lowers to "i" followed by the combining dot U+0307, which ends the token; every other non-ASCII
/// character lowers to a non-ASCII character and so separates tokens.
let tokenize (stem: bool) (text: string) : string[] =
    let tokens = ResizeArray<string>()
    let current = StringBuilder()
    let flush () =
        if current.Length > 0 then
            let t = current.ToString()
            tokens.Add(if stem then stemToken t else t)
            current.Clear() |> ignore
    for c in text do
        if (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') then current.Append c |> ignore
        elif c >= 'A' && c <= 'Z' then current.Append(Char.ToLowerInvariant c) |> ignore
        elif c = '\u212A' then current.Append 'k' |> ignore
        elif c = '\u0130' then
            current.Append 'i' |> ignore
            flush ()
        else flush ()
    flush ()
    tokens.ToArray()

/// Counts of each n-gram (joined with a space; tokens never contain one).
let ngramCounts (n: int) (tokens: string[]) : Dictionary<string, int> =
    let counts = Dictionary<string, int>(StringComparer.Ordinal)
    for i in 0 .. tokens.Length - n do
        let key = String.Join(" ", tokens, i, n)
        counts[key] <- (match counts.TryGetValue key with | true, c -> c + 1 | _ -> 1)
    counts

/// ROUGE-N from tokens: clipped n-gram matches over max(count, 1) on each side.
let scoreNgrams (n: int) (reference: string[]) (prediction: string[]) : Prf =
    if n <= 0 then invalidArg "n" (sprintf "expected ROUGE-N order n >= 1, got %d" n)
    let r = ngramCounts n reference
    let p = ngramCounts n prediction
    let mutable overlap = 0
    for KeyValue(gram, count) in r do
        match p.TryGetValue gram with
        | true, c -> overlap <- overlap + min count c
        | _ -> ()
    let rTotal = Seq.sum r.Values
    let pTotal = Seq.sum p.Values
    let precision = float overlap / float (max pTotal 1)
    let recall = float overlap / float (max rTotal 1)
    { Precision = precision; Recall = recall; F1 = fmeasure precision recall }

/// The LCS dynamic-programming table t [|ref| + 1, |can| + 1]; t[i, j] = LCS of ref[..i-1] and can[..j-1].
let lcsTable (reference: 'T[]) (candidate: 'T[]) : int[,] =
    let t = Array2D.zeroCreate (reference.Length + 1) (candidate.Length + 1)
    let cmp = EqualityComparer<'T>.Default
    for i in 1 .. reference.Length do
        for j in 1 .. candidate.Length do
            t[i, j] <-
                if cmp.Equals(reference[i - 1], candidate[j - 1]) then t[i - 1, j - 1] + 1
                else max t[i - 1, j] t[i, j - 1]
    t

/// Indices into `reference` of one longest common subsequence, read back from the end of the table and
/// preferring to drop a candidate token only when that keeps a strictly longer LCS (rouge-score
/// `_backtrack_norec`; which LCS is chosen matters for ROUGE-Lsum's union).
let lcsIndices (reference: 'T[]) (candidate: 'T[]) : int[] =
    let t = lcsTable reference candidate
    let cmp = EqualityComparer<'T>.Default
    let picked = ResizeArray<int>()
    let mutable i = reference.Length
    let mutable j = candidate.Length
    while i > 0 && j > 0 do
        if cmp.Equals(reference[i - 1], candidate[j - 1]) then
            picked.Add(i - 1)
            i <- i - 1
            j <- j - 1
        elif t[i, j - 1] > t[i - 1, j] then j <- j - 1
        else i <- i - 1
    picked.Reverse()
    picked.ToArray()

/// ROUGE-L from tokens; 0 when either side is empty.
let scoreLcs (reference: string[]) (prediction: string[]) : Prf =
    if reference.Length = 0 || prediction.Length = 0 then zeroPrf
    else
        let lcs = (lcsTable reference prediction)[reference.Length, prediction.Length]
        let precision = float lcs / float prediction.Length
        let recall = float lcs / float reference.Length
        { Precision = precision; Recall = recall; F1 = fmeasure precision recall }

/// Sorted union of the LCS indices of `reference` against each candidate sentence, as tokens of `reference`.
let unionLcs (reference: 'T[]) (candidates: 'T[] seq) : 'T[] =
    candidates
    |> Seq.collect (lcsIndices reference)
    |> Seq.distinct
    |> Seq.sort
    |> Seq.map (fun i -> reference[i])
    |> Seq.toArray

/// Summary-level LCS (ROUGE paper section 3.2) from tokenized sentences. A token is a hit at most as many
/// times as it occurs on each side, as ROUGE-1.5.5 and rouge-score count it.
let scoreSummaryLevelLcs (reference: string[][]) (prediction: string[][]) : Prf =
    let m = reference |> Array.sumBy Array.length
    let n = prediction |> Array.sumBy Array.length
    if reference.Length = 0 || prediction.Length = 0 || m = 0 || n = 0 then zeroPrf
    else
        let count (sentences: string[][]) =
            let d = Dictionary<string, int>(StringComparer.Ordinal)
            for s in sentences do
                for t in s do
                    d[t] <- (match d.TryGetValue t with | true, c -> c + 1 | _ -> 1)
            d
        let left = count reference
        let right = count prediction
        let mutable hits = 0
        for r in reference do
            for t in unionLcs r prediction do
                if right[t] > 0 && left[t] > 0 then
                    hits <- hits + 1
                    right[t] <- right[t] - 1
                    left[t] <- left[t] - 1
        let precision = float hits / float n
        let recall = float hits / float m
        { Precision = precision; Recall = recall; F1 = fmeasure precision recall }

/// rouge-score's sentences for ROUGE-Lsum: the '\n'-separated pieces that are not empty strings.
let sentences (text: string) : string[] =
    text.Split '\n' |> Array.filter (fun s -> s.Length > 0)

/// One ROUGE score between a reference (rouge-score's "target") and a prediction.
let score (stem: bool) (rougeType: RougeType) (reference: string) (prediction: string) : Prf =
    match rougeType with
    | RougeN n -> scoreNgrams n (tokenize stem reference) (tokenize stem prediction)
    | RougeL -> scoreLcs (tokenize stem reference) (tokenize stem prediction)
    | RougeLsum ->
        let split text = sentences text |> Array.map (tokenize stem)
        scoreSummaryLevelLcs (split reference) (split prediction)

/// The four scores every report carries, for one example.
type RougeScores = { Rouge1: Prf; Rouge2: Prf; RougeL: Prf; RougeLsum: Prf }

/// ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum, tokenizing each text once for the first three.
let scoreAll (stem: bool) (reference: string) (prediction: string) : RougeScores =
    let r = tokenize stem reference
    let p = tokenize stem prediction
    { Rouge1 = scoreNgrams 1 r p
      Rouge2 = scoreNgrams 2 r p
      RougeL = scoreLcs r p
      RougeLsum = score stem RougeLsum reference prediction }
