/// Summarization metrics that match the standard scorers: ROUGE as Google's rouge-score package computes it,
/// BLEU as sacreBLEU computes it, abstractiveness statistics of a summary against its document
/// (compression, extractiveness, novel n-grams, Grusky et al. 2018 fragment coverage and density),
/// seeded bootstrap intervals, and the aggregation math of BERTScore and SummaC-ZS over encoders that a
/// later issue plugs in (no pretrained weights live in this repository, so those two are never faked).
///
/// Legend: N examples, L tokens in one text, H embedding width, R reference streams, P premises, Q hypotheses.
/// Pure .NET: nothing here touches TorchSharp.
module Moe.Metrics

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json
open System.Text.RegularExpressions

/// Precision, recall and their harmonic mean, each a fraction in [0, 1].
type Prf = { Precision: float; Recall: float; F1: float }

/// The all-zero score that rouge-score returns for empty inputs.
let zeroPrf = { Precision = 0.0; Recall = 0.0; F1 = 0.0 }

/// F1 = 2PR / (P + R), and 0 when P + R = 0 (rouge-score scoring.fmeasure).
let fmeasure (precision: float) (recall: float) : float =
    if precision + recall > 0.0 then 2.0 * precision * recall / (precision + recall) else 0.0

// ---------------------------------------------------------------- text helpers shared with Python's semantics

/// String helpers that reproduce the Python built-ins the reference scorers call, so that token boundaries
/// agree character for character.
module PyText =
    /// Python's `str.isspace` for one UTF-16 unit: .NET's white space plus U+001C..U+001F, which Python counts
    /// as space (bidirectional classes B and S) and .NET does not.
    let isSpace (c: char) : bool = Char.IsWhiteSpace c || (c >= '\u001C' && c <= '\u001F')

    /// Python's `str.split()` with no argument: runs of white space separate, no empty pieces.
    let split (s: string) : string[] =
        let parts = ResizeArray<string>()
        let mutable start = -1
        for i in 0 .. s.Length - 1 do
            if isSpace s[i] then
                if start >= 0 then
                    parts.Add(s.Substring(start, i - start))
                    start <- -1
            elif start < 0 then start <- i
        if start >= 0 then parts.Add(s.Substring start)
        parts.ToArray()

    /// Python's `str.rstrip()` with no argument.
    let rstrip (s: string) : string =
        let mutable e = s.Length
        while e > 0 && isSpace s[e - 1] do e <- e - 1
        s.Substring(0, e)

    /// Python's `str.lower()`. .NET's invariant lower case agrees per character except for U+0130 (capital I
    /// with dot), which Python maps to two characters "i\u0307" (Unicode SpecialCasing.txt). Python's
    /// final-sigma rule (word-final capital sigma becomes U+03C2) is not reproduced; it only touches Greek text.
    let lower (s: string) : string =
        if s.IndexOf '\u0130' < 0 then s.ToLowerInvariant()
        else s.ToLowerInvariant().Replace("\u0130", "i\u0307")

// ---------------------------------------------------------------- input files

/// Reads a one-example-per-line file: strict UTF-8 (invalid bytes are an error naming the line), an optional
/// UTF-8 byte order mark dropped, lines split on '\n' with one '\r' before it removed, and a last line kept
/// whether or not the file ends with '\n'. An empty line is an example with empty text, never skipped.
/// Raises `FileNotFoundException` or `InvalidDataException` with the path in the message.
let readLines (path: string) : string[] =
    if not (File.Exists path) then
        raise (FileNotFoundException(sprintf "expected a text file at %s, but there is none" path, path))
    let bytes = File.ReadAllBytes path
    if bytes.Length = 0 then
        raise (InvalidDataException(sprintf "%s is empty; expected one example per line" path))
    let strict = UTF8Encoding(false, true)
    let text =
        try strict.GetString bytes
        with :? DecoderFallbackException as e ->
            let at = if e.Index >= 0 then e.Index else 0
            // The decoder reports the index of the bad byte; count the newlines before it for the line number.
            let line = 1 + (bytes |> Seq.take (min at bytes.Length) |> Seq.filter (fun b -> b = 10uy) |> Seq.length)
            raise (InvalidDataException(sprintf "%s:%d: not valid UTF-8 (bad byte near offset %d); expected UTF-8 text" path line at))
    let text = if text.Length > 0 && text[0] = '\uFEFF' then text.Substring 1 else text
    let lines = text.Split '\n'
    // "a\nb\n" holds two lines; the piece after the final newline is not an example.
    let lines = if lines.Length > 1 && lines[lines.Length - 1] = "" then lines[.. lines.Length - 2] else lines
    lines |> Array.map (fun l -> if l.EndsWith '\r' then l.Substring(0, l.Length - 1) else l)

/// Raises `InvalidDataException` unless every named line array has the same length as the first.
let expectAligned (named: (string * string[]) list) : unit =
    match named with
    | [] -> ()
    | (firstName, first) :: _ ->
        let bad = named |> List.filter (fun (_, lines) -> lines.Length <> first.Length)
        if not bad.IsEmpty then
            let counts = named |> List.map (fun (name, lines) -> sprintf "%s has %d" name lines.Length) |> String.concat ", "
            raise (InvalidDataException(sprintf "expected the same number of lines in every file (aligned by line, as %s), got: %s" firstName counts))

// ---------------------------------------------------------------- Porter stemmer

/// The Porter stemmer as NLTK implements it (nltk/stem/porter.py), in its three modes. rouge-score builds
/// `nltk.stem.porter.PorterStemmer()` with no argument, which is `Nltk` mode.
/// Porter, M. "An algorithm for suffix stripping." Program 14.3 (1980): 130-137.
module Porter =
    /// Which variant of the algorithm.
    type Mode =
        /// The 1980 paper as published.
        | Original
        /// With the departures Martin Porter made in his own implementations (tartarus.org/martin/PorterStemmer).
        | Martin
        /// Martin's departures plus NLTK's own (NLTK's default, and rouge-score's).
        | Nltk

    /// NLTK mode's irregular forms: word -> stem (nltk porter.py `irregular_forms`).
    let irregularForms : IReadOnlyDictionary<string, string> =
        [ "sky", [ "sky"; "skies" ]
          "die", [ "dying" ]
          "lie", [ "lying" ]
          "tie", [ "tying" ]
          "news", [ "news" ]
          "inning", [ "innings"; "inning" ]
          "outing", [ "outings"; "outing" ]
          "canning", [ "cannings"; "canning" ]
          "howe", [ "howe" ]
          "proceed", [ "proceed" ]
          "exceed", [ "exceed" ]
          "succeed", [ "succeed" ] ]
        |> List.collect (fun (stem, forms) -> forms |> List.map (fun f -> f, stem))
        |> readOnlyDict

    /// A consonant is a letter other than a, e, i, o, u, and other than y preceded by a consonant.
    let rec private isConsonant (w: string) (i: int) : bool =
        match w[i] with
        | 'a' | 'e' | 'i' | 'o' | 'u' -> false
        | 'y' -> i = 0 || not (isConsonant w (i - 1))
        | _ -> true

    /// m in [C](VC){m}[V]: the number of vowel-consonant boundaries.
    let private measure (stem: string) : int =
        let mutable m = 0
        for i in 1 .. stem.Length - 1 do
            if not (isConsonant stem (i - 1)) && isConsonant stem i then m <- m + 1
        m

    let private positiveMeasure (stem: string) = measure stem > 0

    let private containsVowel (stem: string) =
        seq { 0 .. stem.Length - 1 } |> Seq.exists (fun i -> not (isConsonant stem i))

    /// Condition *d: ends with a double consonant.
    let private endsDoubleConsonant (w: string) =
        w.Length >= 2 && w[w.Length - 1] = w[w.Length - 2] && isConsonant w (w.Length - 1)

    /// Condition *o: ends consonant-vowel-consonant, the last not w, x or y; NLTK mode also accepts a
    /// two-letter vowel-consonant word.
    let private endsCvc (mode: Mode) (w: string) =
        (w.Length >= 3
         && isConsonant w (w.Length - 3)
         && not (isConsonant w (w.Length - 2))
         && isConsonant w (w.Length - 1)
         && not (w[w.Length - 1] = 'w' || w[w.Length - 1] = 'x' || w[w.Length - 1] = 'y'))
        || (mode = Nltk && w.Length = 2 && not (isConsonant w 0) && isConsonant w 1)

    /// One suffix rule: the first rule whose suffix matches decides, whether or not its condition holds.
    type private Rule =
        | Suffix of suffix: string * replacement: string * condition: (string -> bool)
        /// Porter's "*d" pseudo-suffix: a double consonant, replaced as a unit.
        | DoubleConsonant of replacement: string * condition: (string -> bool)

    let private always (_: string) = true

    let private chop (w: string) (suffix: string) = w.Substring(0, w.Length - suffix.Length)

    let private applyRules (word: string) (rules: Rule list) : string =
        let rec go rules =
            match rules with
            | [] -> word
            | DoubleConsonant(replacement, condition) :: rest ->
                if endsDoubleConsonant word then
                    let stem = word.Substring(0, word.Length - 2)
                    if condition stem then stem + replacement else word
                else go rest
            | Suffix(suffix, replacement, condition) :: rest ->
                if word.EndsWith(suffix, StringComparison.Ordinal) then
                    let stem = chop word suffix
                    if condition stem then stem + replacement else word
                else go rest
        go rules

    let private step1a mode (word: string) =
        // NLTK: 'flies' -> 'fli' but 'dies' -> 'die'.
        if mode = Nltk && word.EndsWith("ies", StringComparison.Ordinal) && word.Length = 4 then chop word "ies" + "ie"
        else
            applyRules word [ Suffix("sses", "ss", always); Suffix("ies", "i", always); Suffix("ss", "ss", always); Suffix("s", "", always) ]

    let private step1b mode (word: string) =
        if mode = Nltk && word.EndsWith("ied", StringComparison.Ordinal) then
            // NLTK: 'spied' -> 'spi' but 'died' -> 'die'.
            if word.Length = 4 then chop word "ied" + "ie" else chop word "ied" + "i"
        elif word.EndsWith("eed", StringComparison.Ordinal) then
            let stem = chop word "eed"
            if measure stem > 0 then stem + "ee" else word
        else
            let stripped =
                [ "ed"; "ing" ]
                |> List.tryPick (fun suffix ->
                    if word.EndsWith(suffix, StringComparison.Ordinal) then
                        let stem = chop word suffix
                        if containsVowel stem then Some stem else None
                    else None)
            match stripped with
            | None -> word
            | Some stem ->
                let last = stem[stem.Length - 1]
                applyRules stem [
                    Suffix("at", "ate", always)
                    Suffix("bl", "ble", always)
                    Suffix("iz", "ize", always)
                    DoubleConsonant(string last, fun _ -> not (last = 'l' || last = 's' || last = 'z'))
                    Suffix("", "e", fun s -> measure s = 1 && endsCvc mode s) ]

    let private step1c mode (word: string) =
        let condition =
            match mode with
            // NLTK: y -> i only after a consonant that is not the whole stem ('happy' -> 'happi', 'enjoy' stays).
            | Nltk -> fun (s: string) -> s.Length > 1 && isConsonant s (s.Length - 1)
            | Original | Martin -> containsVowel
        applyRules word [ Suffix("y", "i", condition) ]

    let rec private step2 mode (word: string) : string =
        let alli = "alli"
        if mode = Nltk && word.EndsWith(alli, StringComparison.Ordinal) && positiveMeasure (chop word alli) then
            // NLTK applies ALLI -> AL first and runs the result through step 2 again.
            step2 mode (chop word alli + "al")
        else
            let common =
                [ Suffix("ational", "ate", positiveMeasure)
                  Suffix("tional", "tion", positiveMeasure)
                  Suffix("enci", "ence", positiveMeasure)
                  Suffix("anci", "ance", positiveMeasure)
                  Suffix("izer", "ize", positiveMeasure)
                  (if mode = Original then Suffix("abli", "able", positiveMeasure) else Suffix("bli", "ble", positiveMeasure))
                  Suffix("alli", "al", positiveMeasure)
                  Suffix("entli", "ent", positiveMeasure)
                  Suffix("eli", "e", positiveMeasure)
                  Suffix("ousli", "ous", positiveMeasure)
                  Suffix("ization", "ize", positiveMeasure)
                  Suffix("ation", "ate", positiveMeasure)
                  Suffix("ator", "ate", positiveMeasure)
                  Suffix("alism", "al", positiveMeasure)
                  Suffix("iveness", "ive", positiveMeasure)
                  Suffix("fulness", "ful", positiveMeasure)
                  Suffix("ousness", "ous", positiveMeasure)
                  Suffix("aliti", "al", positiveMeasure)
                  Suffix("iviti", "ive", positiveMeasure)
                  Suffix("biliti", "ble", positiveMeasure) ]
            let extra =
                match mode with
                // NLTK keeps the 'l' of 'logi' with the stem so that short stems ('geo', 'theo') qualify.
                | Nltk -> [ Suffix("fulli", "ful", positiveMeasure); Suffix("logi", "log", fun _ -> positiveMeasure (word.Substring(0, word.Length - 3))) ]
                | Martin -> [ Suffix("logi", "log", positiveMeasure) ]
                | Original -> []
            applyRules word (common @ extra)

    let private step3 (word: string) =
        applyRules word [
            Suffix("icate", "ic", positiveMeasure)
            Suffix("ative", "", positiveMeasure)
            Suffix("alize", "al", positiveMeasure)
            Suffix("iciti", "ic", positiveMeasure)
            Suffix("ical", "ic", positiveMeasure)
            Suffix("ful", "", positiveMeasure)
            Suffix("ness", "", positiveMeasure) ]

    let private step4 (word: string) =
        let gt1 (s: string) = measure s > 1
        applyRules word [
            for suffix in [ "al"; "ance"; "ence"; "er"; "ic"; "able"; "ible"; "ant"; "ement"; "ment"; "ent" ] do
                Suffix(suffix, "", gt1)
            Suffix("ion", "", fun s -> measure s > 1 && (s[s.Length - 1] = 's' || s[s.Length - 1] = 't'))
            for suffix in [ "ou"; "ism"; "ate"; "iti"; "ous"; "ive"; "ize" ] do
                Suffix(suffix, "", gt1) ]

    /// Step 5a tries both of its rules (m > 1, then m = 1 and not *o), so it is not a first-match rule list.
    let private step5a mode (word: string) =
        if word.EndsWith 'e' then
            let stem = chop word "e"
            if measure stem > 1 then stem
            elif measure stem = 1 && not (endsCvc mode stem) then stem
            else word
        else word

    let private step5b (word: string) =
        applyRules word [ Suffix("ll", "l", fun _ -> measure (word.Substring(0, word.Length - 1)) > 1) ]

    /// The stem of one word (lower-cased first, as NLTK's `stem(word)` does by default).
    let stem (mode: Mode) (word: string) : string =
        let lowered = word.ToLowerInvariant()
        match mode with
        | Nltk when irregularForms.ContainsKey word -> irregularForms[lowered]
        // Martin's and NLTK's versions leave words of one or two letters alone.
        | Martin | Nltk when word.Length <= 2 -> lowered
        | _ ->
            lowered
            |> step1a mode
            |> step1b mode
            |> step1c mode
            |> step2 mode
            |> step3
            |> step4
            |> step5a mode
            |> step5b

// ---------------------------------------------------------------- ROUGE

/// ROUGE-N, ROUGE-L and ROUGE-Lsum exactly as google-research's rouge-score package (rouge_scorer.py,
/// tokenize.py, scoring.py) computes them. Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004.
module Rouge =
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

// ---------------------------------------------------------------- BLEU

/// BLEU (Papineni et al. 2002) exactly as sacreBLEU 2.x computes it (sacrebleu/metrics/bleu.py,
/// tokenizers/tokenizer_13a.py and tokenizer_re.py), scores in [0, 100].
module Bleu =
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

// ---------------------------------------------------------------- abstractiveness against the document

/// How a summary relates to its document: compression, extractiveness, novel n-grams, and the extractive
/// fragment coverage and density of Grusky, Naaman & Artzi 2018 ("Newsroom", section 4.1). Texts are tokenized
/// with rouge-score's tokenizer without stemming (lower-case alphanumeric runs), so the numbers do not depend on
/// whether a system's output was PTB-tokenized.
module Abstractiveness =
    /// Novel n-gram rates are reported for n = 1 .. this (as in Narayan et al. 2018, XSum, table 1).
    let novelNgramOrders = 4

    /// The NLTK English stop word list (nltk_data corpora/stopwords/english, 179 words). Under the alphanumeric
    /// tokenizer only the entries without an apostrophe can match; "don't" arrives as "don" and "t", both listed.
    let stopWords : IReadOnlySet<string> =
        HashSet<string>(
            [ "i"; "me"; "my"; "myself"; "we"; "our"; "ours"; "ourselves"; "you"; "you're"; "you've"; "you'll"; "you'd"
              "your"; "yours"; "yourself"; "yourselves"; "he"; "him"; "his"; "himself"; "she"; "she's"; "her"; "hers"
              "herself"; "it"; "it's"; "its"; "itself"; "they"; "them"; "their"; "theirs"; "themselves"; "what"; "which"
              "who"; "whom"; "this"; "that"; "that'll"; "these"; "those"; "am"; "is"; "are"; "was"; "were"; "be"; "been"
              "being"; "have"; "has"; "had"; "having"; "do"; "does"; "did"; "doing"; "a"; "an"; "the"; "and"; "but"; "if"
              "or"; "because"; "as"; "until"; "while"; "of"; "at"; "by"; "for"; "with"; "about"; "against"; "between"
              "into"; "through"; "during"; "before"; "after"; "above"; "below"; "to"; "from"; "up"; "down"; "in"; "out"
              "on"; "off"; "over"; "under"; "again"; "further"; "then"; "once"; "here"; "there"; "when"; "where"; "why"
              "how"; "all"; "any"; "both"; "each"; "few"; "more"; "most"; "other"; "some"; "such"; "no"; "nor"; "not"
              "only"; "own"; "same"; "so"; "than"; "too"; "very"; "s"; "t"; "can"; "will"; "just"; "don"; "don't"
              "should"; "should've"; "now"; "d"; "ll"; "m"; "o"; "re"; "ve"; "y"; "ain"; "aren"; "aren't"; "couldn"
              "couldn't"; "didn"; "didn't"; "doesn"; "doesn't"; "hadn"; "hadn't"; "hasn"; "hasn't"; "haven"; "haven't"
              "isn"; "isn't"; "ma"; "mightn"; "mightn't"; "mustn"; "mustn't"; "needn"; "needn't"; "shan"; "shan't"
              "shouldn"; "shouldn't"; "wasn"; "wasn't"; "weren"; "weren't"; "won"; "won't"; "wouldn"; "wouldn't" ],
            StringComparer.Ordinal)
        :> IReadOnlySet<string>

    /// The words the document statistics count.
    let words (text: string) : string[] = Rouge.tokenize false text

    /// One extractive fragment: a maximal shared token sequence found greedily.
    type Fragment = { SummaryStart: int; DocumentStart: int; Length: int }

    /// Newsroom's greedy matching (lil-lab/newsroom analyze/fragments.py `_match`): from each summary position,
    /// the longest document match (the first of equal length) becomes a fragment and the scan resumes after it;
    /// a summary token with no match is skipped.
    let fragments (summary: string[]) (document: string[]) : Fragment[] =
        let found = ResizeArray<Fragment>()
        let mutable i = 0
        while i < summary.Length do
            let mutable best = None
            let mutable bestLength = 0
            let mutable j = 0
            while j < document.Length do
                if summary[i] = document[j] then
                    let mutable i2 = i
                    let mutable j2 = j
                    while i2 < summary.Length && j2 < document.Length && document[j2] = summary[i2] do
                        i2 <- i2 + 1
                        j2 <- j2 + 1
                    let length = i2 - i
                    if length > bestLength then
                        best <- Some { SummaryStart = i; DocumentStart = j; Length = length }
                        bestLength <- length
                    j <- j2
                else j <- j + 1
            match best with
            | Some f ->
                found.Add f
                i <- i + f.Length
            | None -> i <- i + 1
        found.ToArray()

    /// Coverage = (1/|S|) sum |f|: the share of summary tokens inside some fragment (0 for an empty summary).
    let coverage (summaryLength: int) (found: Fragment[]) : float =
        if summaryLength = 0 then 0.0 else float (found |> Array.sumBy (fun f -> f.Length)) / float summaryLength

    /// Density = (1/|S|) sum |f|^2: the average length of the fragment each summary token belongs to.
    let density (summaryLength: int) (found: Fragment[]) : float =
        if summaryLength = 0 then 0.0 else float (found |> Array.sumBy (fun f -> f.Length * f.Length)) / float summaryLength

    /// The statistics of one summary against its document.
    type DocumentStats =
        { /// Summary words / document words (0 for an empty document).
          Compression: float
          /// Share of the summary's content words (stop words removed) that occur in the document.
          Extractiveness: float
          /// Share of summary n-grams (with repeats) absent from the document, for n = 1 .. 4 [4].
          NovelNgrams: float[]
          Coverage: float
          Density: float }

    let private ratio (num: int) (den: int) = if den = 0 then 0.0 else float num / float den

    /// Share of the summary's n-grams, counted with repeats, that never occur in the document.
    let novelNgramRate (n: int) (summary: string[]) (document: string[]) : float =
        let inDocument = HashSet<string>(Rouge.ngramCounts n document |> Seq.map (fun kv -> kv.Key), StringComparer.Ordinal)
        let mutable total = 0
        let mutable novel = 0
        for i in 0 .. summary.Length - n do
            total <- total + 1
            if not (inDocument.Contains(String.Join(" ", summary, i, n))) then novel <- novel + 1
        ratio novel total

    /// All statistics of one summary against its document.
    let score (summary: string) (document: string) : DocumentStats =
        let s = words summary
        let d = words document
        let docWords = HashSet<string>(d, StringComparer.Ordinal)
        let content = s |> Array.filter (fun w -> not (stopWords.Contains w))
        let found = fragments s d
        { Compression = ratio s.Length d.Length
          Extractiveness = ratio (content |> Array.filter docWords.Contains |> Array.length) content.Length
          NovelNgrams = Array.init novelNgramOrders (fun k -> novelNgramRate (k + 1) s d)
          Coverage = coverage s.Length found
          Density = density s.Length found }

// ---------------------------------------------------------------- bootstrap intervals

/// Bootstrap confidence intervals on a mean, as rouge-score's `BootstrapAggregator`: resample the N examples
/// with replacement, take the mean of each resample, and report percentiles of those means with NumPy's
/// default (linear) interpolation. The random stream is .NET's seeded `Random`, so intervals are reproducible
/// here but not bit-identical to NumPy's.
module Bootstrap =
    /// Resampling settings.
    type BootstrapConfig =
        { /// Number of resamples (rouge-score's default: 1000).
          Samples: int
          /// Two-sided confidence level (rouge-score's default: 0.95, hence percentiles 2.5 / 50 / 97.5).
          Confidence: float
          Seed: int }

    /// rouge-score's defaults with seed 0.
    let defaults = { Samples = 1000; Confidence = 0.95; Seed = 0 }

    /// Every problem with a config, all at once.
    let validate (cfg: BootstrapConfig) : string list =
        [ if cfg.Samples <= 0 then sprintf "Samples must be positive, got %d" cfg.Samples
          if not (cfg.Confidence >= 0.0 && cfg.Confidence <= 1.0) then sprintf "Confidence must be in [0, 1], got %g" cfg.Confidence ]

    /// Percentiles of the resampled means: low and high bound the interval, mid is the median.
    type Interval = { Low: float; Mid: float; High: float }

    /// The q-th percentile (q in [0, 100]) of ascending `sorted`, interpolating linearly between neighbours
    /// (NumPy `percentile`, method "linear").
    let percentile (sorted: float[]) (q: float) : float =
        if sorted.Length = 0 then invalidArg "sorted" "expected at least one value"
        let pos = q / 100.0 * float (sorted.Length - 1)
        let lo = int (floor pos)
        let hi = min (lo + 1) (sorted.Length - 1)
        sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - float lo)

    /// Intervals for several per-example columns [M][N] at once; every resample draws one index set shared by
    /// all columns, so paired measures (P, R, F) stay paired.
    let intervals (cfg: BootstrapConfig) (columns: float[][]) : Interval[] =
        match validate cfg with
        | [] -> ()
        | problems -> invalidArg "cfg" (String.concat "; " problems)
        let n = if columns.Length = 0 then 0 else columns[0].Length
        if n = 0 then invalidArg "columns" "expected at least one example to resample"
        if columns |> Array.exists (fun c -> c.Length <> n) then invalidArg "columns" "expected every column to have one value per example"
        let rng = Random cfg.Seed
        let means = Array.init columns.Length (fun _ -> Array.zeroCreate cfg.Samples) // [M][Samples]
        let index = Array.zeroCreate n
        for s in 0 .. cfg.Samples - 1 do
            for k in 0 .. n - 1 do index[k] <- rng.Next n
            for m in 0 .. columns.Length - 1 do
                let col = columns[m]
                let mutable sum = 0.0
                for k in index do sum <- sum + col[k]
                means[m][s] <- sum / float n
        let delta = (1.0 - cfg.Confidence) / 2.0
        means
        |> Array.map (fun ms ->
            Array.sortInPlace ms
            { Low = percentile ms (100.0 * delta); Mid = percentile ms 50.0; High = percentile ms (100.0 * (1.0 - delta)) })

// ---------------------------------------------------------------- BERTScore (aggregation over a plugged-in encoder)

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

// ---------------------------------------------------------------- NLI factual consistency (SummaC-ZS)

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

// ---------------------------------------------------------------- corpus report

/// Settings for scoring a corpus.
type ScoreOptions =
    { /// Porter-stem tokens longer than 3 characters for ROUGE (rouge-score `use_stemmer`).
      Stem: bool
      /// Corpus BLEU settings; sentence BLEU uses the same with effective order.
      Bleu: Bleu.BleuConfig
      Bootstrap: Bootstrap.BootstrapConfig }

/// No stemming, sacreBLEU's corpus defaults, rouge-score's bootstrap defaults with seed 0.
let defaultOptions = { Stem = false; Bleu = Bleu.corpusDefaults; Bootstrap = Bootstrap.defaults }

/// A corpus mean with its bootstrap interval.
type Estimate = { Mean: float; Low: float; Mid: float; High: float }

/// Estimates of precision, recall and F1.
type PrfEstimate = { Precision: Estimate; Recall: Estimate; F1: Estimate }

/// Everything scored for one example.
type ExampleScores =
    { Rouge: Rouge.RougeScores
      /// Sentence BLEU in [0, 100].
      SentenceBleu: float
      /// Present when documents were given.
      Document: Abstractiveness.DocumentStats option }

/// Corpus means of the document statistics.
type DocumentReport =
    { Compression: Estimate
      Extractiveness: Estimate
      /// n = 1 .. 4 [4].
      NovelNgrams: Estimate[]
      Coverage: Estimate
      Density: Estimate }

/// The scores of a whole corpus.
type ScoreReport =
    { N: int
      /// The options the report was computed with.
      Options: ScoreOptions
      Rouge1: PrfEstimate
      Rouge2: PrfEstimate
      RougeL: PrfEstimate
      RougeLsum: PrfEstimate
      /// Corpus BLEU (not a mean of sentence BLEU).
      Bleu: Bleu.BleuScore
      /// Mean sentence BLEU with its interval.
      SentenceBleu: Estimate
      Document: DocumentReport option
      Examples: ExampleScores[] }

/// Scores N predictions against N references (and N documents when given): per-example ROUGE-1/2/L/Lsum,
/// sentence BLEU and document statistics, their corpus means with bootstrap intervals, and corpus BLEU.
/// An empty prediction is scored (0), never skipped. Raises `ArgumentException` for mismatched lengths or N = 0.
let scoreCorpus (opts: ScoreOptions) (predictions: string[]) (references: string[]) (documents: string[] option) : ScoreReport =
    let n = predictions.Length
    if n = 0 then invalidArg "predictions" "expected at least one prediction, got none"
    if references.Length <> n then
        invalidArg "references" (sprintf "expected one reference per prediction, got %d predictions and %d references" n references.Length)
    match documents with
    | Some d when d.Length <> n ->
        invalidArg "documents" (sprintf "expected one document per prediction, got %d predictions and %d documents" n d.Length)
    | _ -> ()
    let sentenceCfg = { opts.Bleu with EffectiveOrder = true }
    let stats = Array.map2 (fun p r -> Bleu.segmentStatistics opts.Bleu p [| r |]) predictions references
    let examples =
        Array.init n (fun i ->
            { Rouge = Rouge.scoreAll opts.Stem references[i] predictions[i]
              SentenceBleu = (Bleu.fromStatistics sentenceCfg stats[i]).Score
              Document = documents |> Option.map (fun d -> Abstractiveness.score predictions[i] d[i]) })
    // Every per-example measure becomes one column [N]; all columns are resampled together.
    let columns = ResizeArray<float[]>()
    let add (f: ExampleScores -> float) =
        columns.Add(examples |> Array.map f)
        columns.Count - 1
    let addPrf (pick: Rouge.RougeScores -> Prf) =
        add (fun e -> (pick e.Rouge).Precision), add (fun e -> (pick e.Rouge).Recall), add (fun e -> (pick e.Rouge).F1)
    let rouge1, rouge2, rougeL, rougeLsum = addPrf _.Rouge1, addPrf _.Rouge2, addPrf _.RougeL, addPrf _.RougeLsum
    let sentenceBleu = add _.SentenceBleu
    let docIndices =
        documents
        |> Option.map (fun _ ->
            let doc (f: Abstractiveness.DocumentStats -> float) = add (fun e -> f e.Document.Value)
            let compression = doc _.Compression
            let extractiveness = doc _.Extractiveness
            let novel = Array.init Abstractiveness.novelNgramOrders (fun k -> doc (fun s -> s.NovelNgrams[k]))
            compression, extractiveness, novel, doc _.Coverage, doc _.Density)
    let intervals = Bootstrap.intervals opts.Bootstrap (columns.ToArray())
    let estimate k =
        let iv = intervals[k]
        { Mean = Array.average columns[k]; Low = iv.Low; Mid = iv.Mid; High = iv.High }
    let prf (p, r, f) = { Precision = estimate p; Recall = estimate r; F1 = estimate f }
    { N = n
      Options = opts
      Rouge1 = prf rouge1
      Rouge2 = prf rouge2
      RougeL = prf rougeL
      RougeLsum = prf rougeLsum
      Bleu = stats |> Bleu.sumStatistics opts.Bleu.MaxOrder |> Bleu.fromStatistics opts.Bleu
      SentenceBleu = estimate sentenceBleu
      Document =
        docIndices
        |> Option.map (fun (compression, extractiveness, novel, coverage, density) ->
            { Compression = estimate compression
              Extractiveness = estimate extractiveness
              NovelNgrams = novel |> Array.map estimate
              Coverage = estimate coverage
              Density = estimate density })
      Examples = examples }

/// The report as the JSON object `moe score --json` prints and runs store in test_scores.json:
/// {"n", "rouge1"/"rouge2"/"rougeL"/"rougeLsum": {"precision", "recall", "f1"}, "bleu"} and, with documents,
/// "compression", "extractiveness" and "novel_ngrams": {"1" .. "4"}. ROUGE are fractions in [0, 1]: the exact
/// mean of the per-example scores (rouge-score's `BootstrapAggregator` reports the median of resampled means
/// as "mid", which differs from this mean by resampling noise; the report keeps it as `Mid`). BLEU is corpus
/// BLEU in [0, 100].
let toJson (report: ScoreReport) : string =
    use stream = new MemoryStream()
    let w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = false))
    w.WriteStartObject()
    w.WriteNumber("n", report.N)
    let prf (name: string) (e: PrfEstimate) =
        w.WriteStartObject(name)
        w.WriteNumber("precision", e.Precision.Mean)
        w.WriteNumber("recall", e.Recall.Mean)
        w.WriteNumber("f1", e.F1.Mean)
        w.WriteEndObject()
    prf "rouge1" report.Rouge1
    prf "rouge2" report.Rouge2
    prf "rougeL" report.RougeL
    prf "rougeLsum" report.RougeLsum
    w.WriteNumber("bleu", report.Bleu.Score)
    match report.Document with
    | None -> ()
    | Some d ->
        w.WriteNumber("compression", d.Compression.Mean)
        w.WriteNumber("extractiveness", d.Extractiveness.Mean)
        w.WriteStartObject("novel_ngrams")
        d.NovelNgrams |> Array.iteri (fun k e -> w.WriteNumber(string (k + 1), e.Mean))
        w.WriteEndObject()
    w.WriteEndObject()
    w.Flush()
    w.Dispose()
    Encoding.UTF8.GetString(stream.ToArray())

/// A plain-text table of the report: each metric's mean and bootstrap interval (ROUGE and document statistics
/// as fractions, BLEU in [0, 100]).
let formatTable (report: ScoreReport) : string =
    let sb = StringBuilder()
    let line (fmt: string) = sb.AppendLine fmt |> ignore
    let boot = report.Options.Bootstrap
    line (sprintf "examples: %d   stemming: %s   intervals: %g%% bootstrap (%d resamples, seed %d)"
            report.N (if report.Options.Stem then "on" else "off") (100.0 * boot.Confidence) boot.Samples boot.Seed)
    line ""
    line (sprintf "%-12s %-9s %8s   %-19s" "metric" "measure" "mean" "interval")
    let row (metric: string) (measure: string) (e: Estimate) =
        line (sprintf "%-12s %-9s %8.4f   [%.4f, %.4f]" metric measure e.Mean e.Low e.High)
    for name, e in [ "rouge1", report.Rouge1; "rouge2", report.Rouge2; "rougeL", report.RougeL; "rougeLsum", report.RougeLsum ] do
        row name "precision" e.Precision
        row name "recall" e.Recall
        row name "f1" e.F1
    let b = report.Bleu
    line (sprintf "%-12s %-9s %8.2f   %s (BP %.3f, hyp %d, ref %d)" "bleu" "corpus" b.Score
            (b.Precisions |> Array.map (sprintf "%.1f") |> String.concat "/") b.BrevityPenalty b.Statistics.HypothesisLength b.Statistics.ReferenceLength)
    line (sprintf "%-12s %-9s %8.2f   [%.2f, %.2f]" "bleu" "sentence" report.SentenceBleu.Mean report.SentenceBleu.Low report.SentenceBleu.High)
    match report.Document with
    | None -> ()
    | Some d ->
        row "compression" "mean" d.Compression
        row "extractive" "mean" d.Extractiveness
        d.NovelNgrams |> Array.iteri (fun k e -> row (sprintf "novel-%dgram" (k + 1)) "mean" e)
        row "coverage" "mean" d.Coverage
        line (sprintf "%-12s %-9s %8.3f   [%.3f, %.3f]" "density" "mean" d.Density.Mean d.Density.Low d.Density.High)
    sb.ToString()

/// A C#-friendly facade over `scoreCorpus`, `toJson` and `formatTable`.
type Scorer =
    /// Scores in-memory lists; `documents` may be null.
    static member Score(predictions: string[], references: string[], documents: string[], stem: bool) : ScoreReport =
        scoreCorpus { defaultOptions with Stem = stem } predictions references (Option.ofObj documents)

    /// Scores with explicit options; `documents` may be null.
    static member Score(options: ScoreOptions, predictions: string[], references: string[], documents: string[]) : ScoreReport =
        scoreCorpus options predictions references (Option.ofObj documents)

    /// The JSON object of `moe score --json`.
    static member ToJson(report: ScoreReport) : string = toJson report

    /// The text table of `moe score`.
    static member ToTable(report: ScoreReport) : string = formatTable report
