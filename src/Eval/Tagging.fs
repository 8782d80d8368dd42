/// Metrics of the two token-level tasks: named-entity tagging (token accuracy, and entity-level precision,
/// recall and F1 with the chunk semantics of the CoNLL shared tasks' `conlleval` script, so IOB1 and IOB2 tags
/// give the same entities) and extractive question answering (exact match and F1 as SQuAD 1.1's official
/// `evaluate-v1.1.py` computes them, with its answer normalisation).
///
/// Legend: L tokens in one sentence, G gold answers of one question.
module Moe.Metrics.Tagging

open System
open System.Collections.Generic
open System.Text
open System.Text.RegularExpressions
open Moe.Conll

// ---------------------------------------------------------------- NER scores

/// Entity counts and the precision, recall and F1 they give (fractions in [0, 1]).
type EntityScore =
    { /// Entities in the gold tags.
      Gold: int
      /// Entities in the predicted tags.
      Predicted: int
      /// Predicted entities with the same type, first and last token as a gold entity.
      Correct: int
      /// Correct / Predicted; 0 when nothing was predicted (conlleval prints 0.00 there).
      Precision: float
      /// Correct / Gold; 0 when there is no gold entity.
      Recall: float
      /// 2 P R / (P + R); 0 when P + R = 0 (conlleval).
      F1: float }

let private entityScore (gold: int) (predicted: int) (correct: int) : EntityScore =
    let p = if predicted = 0 then 0.0 else float correct / float predicted
    let r = if gold = 0 then 0.0 else float correct / float gold
    { Gold = gold; Predicted = predicted; Correct = correct; Precision = p; Recall = r
      F1 = (if p + r = 0.0 then 0.0 else 2.0 * p * r / (p + r)) }

/// What conlleval reports for a corpus of tagged sentences.
type NerScores =
    { /// Tokens whose predicted tag equals the gold tag, over all tokens (conlleval's "accuracy"; O tokens count).
      TokenAccuracy: float
      Tokens: int
      Sentences: int
      /// Over all entity types.
      Overall: EntityScore
      /// Per entity type, sorted by type name.
      PerType: (string * EntityScore)[] }

/// Token accuracy and entity-level scores (conlleval) of predicted against gold tags, sentence by sentence
/// (entities never cross a sentence). Each pair holds the gold and the predicted tags of one sentence, of equal
/// length; O, B-X and I-X tags in IOB1 or IOB2 (the two may even be mixed: entities are read by `chunks`).
let nerScores (sentences: (string[] * string[]) seq) : NerScores =
    if isNull (box sentences) then invalidArg "sentences" "expected (gold, predicted) tag sequences, got null"
    let gold, predicted, correct = Dictionary<string, int>(), Dictionary<string, int>(), Dictionary<string, int>()
    let bump (d: Dictionary<string, int>) (k: string) = d[k] <- (match d.TryGetValue k with | true, n -> n + 1 | _ -> 1)
    let mutable tokens, right, count = 0, 0, 0
    for i, (g, p) in Seq.indexed sentences do
        if isNull g || isNull p || g.Length <> p.Length then
            invalidArg "sentences" (sprintf "expected gold and predicted tags of equal length in sentence %d, got %s and %s" i
                                        (if isNull g then "null" else string g.Length) (if isNull p then "null" else string p.Length))
        count <- count + 1
        tokens <- tokens + g.Length
        for j in 0 .. g.Length - 1 do
            if g[j] = p[j] then right <- right + 1
        let gc, pc = chunks g, chunks p
        for c in gc do bump gold c.Type
        for c in pc do bump predicted c.Type
        let goldSet = HashSet<Chunk>(gc)
        for c in pc do
            if goldSet.Contains c then bump correct c.Type
    if tokens = 0 then invalidArg "sentences" "expected at least one token to score, got none"
    let get (d: Dictionary<string, int>) k = match d.TryGetValue k with | true, n -> n | _ -> 0
    let types = Seq.append gold.Keys predicted.Keys |> Seq.distinct |> Seq.sort |> Seq.toArray
    let total (d: Dictionary<string, int>) = d.Values |> Seq.sum
    { TokenAccuracy = float right / float tokens
      Tokens = tokens
      Sentences = count
      Overall = entityScore (total gold) (total predicted) (total correct)
      PerType = types |> Array.map (fun t -> t, entityScore (get gold t) (get predicted t) (get correct t)) }

// ---------------------------------------------------------------- SQuAD

/// Python's `string.punctuation`, which the official script removes.
let private punctuation = HashSet<char>("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

let private articles = Regex(@"\b(a|an|the)\b", RegexOptions.Compiled)

/// SQuAD's `normalize_answer`: lower case, remove punctuation (Python's `string.punctuation`), replace the
/// articles a, an, the (as whole words) with a space, then collapse white space.
let normaliseAnswer (s: string) : string =
    if isNull s then invalidArg "s" "expected an answer string, got null"
    let lowered = PyText.lower s
    let sb = StringBuilder(lowered.Length)
    for c in lowered do
        if not (punctuation.Contains c) then sb.Append c |> ignore
    let noArticles = articles.Replace(sb.ToString(), " ")
    String.Join(" ", PyText.split noArticles)

/// SQuAD's `exact_match_score`: the normalised strings are equal.
let exactMatch (prediction: string) (gold: string) : bool = normaliseAnswer prediction = normaliseAnswer gold

/// SQuAD 1.1's `f1_score`: F1 of the bags of normalised white-space tokens; 0 when they share no token (so
/// also when either is empty after normalisation, as in the v1.1 script).
let answerF1 (prediction: string) (gold: string) : float =
    let p, g = PyText.split (normaliseAnswer prediction), PyText.split (normaliseAnswer gold)
    let counts = Dictionary<string, int>()
    for t in g do counts[t] <- (match counts.TryGetValue t with | true, n -> n + 1 | _ -> 1)
    let mutable same = 0
    for t in p do
        match counts.TryGetValue t with
        | true, n when n > 0 ->
            same <- same + 1
            counts[t] <- n - 1
        | _ -> ()
    if same = 0 then 0.0
    else
        let precision, recall = float same / float p.Length, float same / float g.Length
        2.0 * precision * recall / (precision + recall)

/// Exact match and F1 of a corpus of questions, fractions in [0, 1] (the official script prints them x 100).
type SquadScores = { ExactMatch: float; F1: float; Questions: int }

/// SQuAD 1.1's `evaluate`: per question the maximum over its gold answers of exact match and of F1, averaged
/// over questions. Each pair is a prediction and the question's gold answers (at least one).
let squadScores (questions: (string * string[]) seq) : SquadScores =
    if isNull (box questions) then invalidArg "questions" "expected (prediction, gold answers) pairs, got null"
    let mutable em, f1, n = 0.0, 0.0, 0
    for i, (prediction, golds) in Seq.indexed questions do
        if isNull golds || golds.Length = 0 then invalidArg "questions" (sprintf "expected at least one gold answer for question %d, got none" i)
        if isNull prediction then invalidArg "questions" (sprintf "expected a prediction for question %d, got null" i)
        em <- em + (if golds |> Array.exists (exactMatch prediction) then 1.0 else 0.0)
        f1 <- f1 + (golds |> Array.map (answerF1 prediction) |> Array.max)
        n <- n + 1
    if n = 0 then invalidArg "questions" "expected at least one question to score, got none"
    { ExactMatch = em / float n; F1 = f1 / float n; Questions = n }
