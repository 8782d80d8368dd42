/// How a summary relates to its document: compression, extractiveness, novel n-grams, and the extractive
/// fragment coverage and density of Grusky, Naaman & Artzi 2018 ("Newsroom", section 4.1). Texts are tokenized
/// with rouge-score's tokenizer without stemming (lower-case alphanumeric runs), so the numbers do not depend on
/// whether a system's output was PTB-tokenized.
///
/// Legend: L tokens in one text.
module Moe.Metrics.Abstractiveness

open System
open System.Collections.Generic

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
