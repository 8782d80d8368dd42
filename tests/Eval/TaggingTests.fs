/// Known answers of the tagging and QA metrics: conlleval's entity chunks and scores on hand-made sequences
/// (partial overlaps, type errors, IOB1 against IOB2) and SQuAD 1.1's exact match and F1 on hand-made cases
/// worked out from evaluate-v1.1.py's definitions.
module Moe.Tests.TaggingTests

open System
open Expecto
open Moe
open Moe.Conll
open Moe.Metrics
open Moe.Metrics.Tagging

/// Ratios of small counts: float64 round-off only.
let private exact = 1e-12

let private close (actual: float) (expected: float) (what: string) =
    Expect.floatClose { absolute = exact; relative = exact } actual expected what

let private words (s: string) = s.Split(' ', StringSplitOptions.RemoveEmptyEntries)

let tests =
    testList "Tagging" [
        testList "chunks" [
            test "IOB1 and IOB2 spellings of one annotation give the same entities" {
                let iob1 = words "I-PER I-PER O I-LOC B-LOC I-MISC I-ORG O"
                let iob2 = words "B-PER I-PER O B-LOC B-LOC B-MISC B-ORG O"
                let expected =
                    [| { Type = "PER"; Start = 0; End = 1 }; { Type = "LOC"; Start = 3; End = 3 }; { Type = "LOC"; Start = 4; End = 4 }
                       { Type = "MISC"; Start = 5; End = 5 }; { Type = "ORG"; Start = 6; End = 6 } |]
                Expect.equal (chunks iob1) expected "IOB1: I-X after O or another type starts an entity, B-X splits two of a type"
                Expect.equal (chunks iob2) expected "IOB2"
                Expect.equal (iob1ToIob2 iob1) iob2 "conversion"
                Expect.equal (iob1ToIob2 iob2) iob2 "IOB2 is a fixed point"
                Expect.equal (iob2Violations iob1) [| 0; 3; 5; 6 |] "where IOB1 breaks IOB2"
                Expect.isEmpty (iob2Violations iob2) "IOB2 is valid"
            }
            test "a sentence ending inside an entity closes it; O-only has none" {
                Expect.equal (chunks (words "O B-ORG I-ORG")) [| { Type = "ORG"; Start = 1; End = 2 } |] "closed at the end"
                Expect.isEmpty (chunks (words "O O O")) "no entity"
                Expect.isEmpty (chunks [||]) "empty sentence"
            }
            test "bad tags are refused by name" {
                let ex = Expect.throwsC (fun () -> chunks (words "O X-PER") |> ignore) id
                Expect.stringContains ex.Message "X-PER" "names the tag"
                Expect.throwsT<ArgumentException> (fun () -> splitTag "B-" |> ignore) "no type"
                Expect.throwsT<ArgumentException> (fun () -> splitTag "PER" |> ignore) "no prefix"
            }
        ]
        testList "conlleval scores" [
            test "partial overlaps count as wrong, exact spans of the right type as right" {
                // gold: PER 0-1, LOC 3, ORG 5-7. predicted: PER 0-1 (right), LOC 3-4 (too long), ORG 6-7 (too short).
                let gold = words "B-PER I-PER O B-LOC O B-ORG I-ORG I-ORG"
                let pred = words "B-PER I-PER O B-LOC I-LOC O B-ORG I-ORG"
                let s = nerScores [ gold, pred ]
                Expect.equal (s.Overall.Gold, s.Overall.Predicted, s.Overall.Correct) (3, 3, 1) "counts"
                close s.Overall.Precision (1.0 / 3.0) "P"
                close s.Overall.Recall (1.0 / 3.0) "R"
                close s.Overall.F1 (1.0 / 3.0) "F1"
                close s.TokenAccuracy (5.0 / 8.0) "5 of 8 tags right"
                let perType = Map.ofArray s.PerType
                close perType["PER"].F1 1.0 "PER all right"
                Expect.equal (perType["LOC"].Correct, perType["ORG"].Correct) (0, 0) "LOC and ORG boundaries wrong"
            }
            test "a wrong type is wrong; precision and recall differ when counts do" {
                // gold: PER 0, LOC 2-3, MISC 5. predicted: ORG 0 (type wrong), LOC 2-3 (right); MISC missed.
                let s = nerScores [ words "B-PER O B-LOC I-LOC O B-MISC", words "B-ORG O B-LOC I-LOC O O" ]
                Expect.equal (s.Overall.Gold, s.Overall.Predicted, s.Overall.Correct) (3, 2, 1) "counts"
                close s.Overall.Precision 0.5 "P = 1/2"
                close s.Overall.Recall (1.0 / 3.0) "R = 1/3"
                close s.Overall.F1 (2.0 * 0.5 * (1.0 / 3.0) / (0.5 + 1.0 / 3.0)) "F1 = 2PR/(P+R) = 0.4"
                Expect.equal (s.PerType |> Array.map fst) [| "LOC"; "MISC"; "ORG"; "PER" |] "types from gold and predicted, sorted"
            }
            test "IOB1 gold against IOB2 predictions of the same entities scores 100" {
                let iob1 = words "I-PER I-PER O I-LOC B-LOC I-MISC"
                let s = nerScores [ iob1, iob1ToIob2 iob1 ]
                close s.Overall.F1 1.0 "same entities"
                Expect.isLessThan s.TokenAccuracy 1.0 "token accuracy compares tags as written"
            }
            test "several sentences: entities never cross a boundary, counts add up" {
                let s = nerScores [ words "O I-PER", words "O I-PER"; words "I-PER O", words "O O" ]
                Expect.equal (s.Overall.Gold, s.Overall.Predicted, s.Overall.Correct) (2, 1, 1) "an I-PER at a sentence start opens a new entity"
                close s.Overall.Recall 0.5 "R"
                Expect.equal (s.Sentences, s.Tokens) (2, 4) "sizes"
            }
            test "no prediction: precision 0 as conlleval prints it; unequal lengths and no tokens are errors" {
                let s = nerScores [ words "B-PER", words "O" ]
                Expect.equal (s.Overall.Precision, s.Overall.Recall, s.Overall.F1) (0.0, 0.0, 0.0) "zeros"
                Expect.throwsT<ArgumentException> (fun () -> nerScores [ words "O O", words "O" ] |> ignore) "lengths"
                Expect.throwsT<ArgumentException> (fun () -> nerScores [] |> ignore) "nothing to score"
            }
        ]
        testList "SQuAD" [
            test "normalisation: lower case, no punctuation, no articles, single spaces" {
                Expect.equal (normaliseAnswer "The  Quick, brown fox!") "quick brown fox" "the, comma, bang, double space"
                Expect.equal (normaliseAnswer "an apple a day") "apple day" "articles as words"
                Expect.equal (normaliseAnswer "Theatre and another") "theatre and another" "articles inside words stay"
                Expect.equal (normaliseAnswer "U.S. $1,000") "us 1000" "punctuation removed inside tokens"
                Expect.equal (normaliseAnswer "the-end") "theend" "punctuation removed before articles: 'theend' is no article"
                Expect.equal (normaliseAnswer "rock 'n' roll") "rock n roll" "quotes"
            }
            test "exact match and F1 as evaluate-v1.1.py defines them" {
                Expect.isTrue (exactMatch "Denver Broncos" "the Denver Broncos.") "normalised equal"
                Expect.isFalse (exactMatch "Broncos" "Denver Broncos") "a part is not a match"
                close (answerF1 "the cat sat" "cat sat on mat") (2.0 * 1.0 * 0.5 / 1.5) "P = 2/2, R = 2/4"
                close (answerF1 "x x y" "x y y") (2.0 / 3.0) "bags: common = min counts = x:1, y:1"
                close (answerF1 "blue" "red") 0.0 "nothing shared"
                Expect.isTrue (exactMatch "the" "a") "both empty after normalisation: equal"
                close (answerF1 "the" "a") 0.0 "v1.1: no shared token gives F1 0, even both empty"
            }
            test "corpus scores take the best gold answer per question, then the mean" {
                let s = squadScores [ "Broncos", [| "Denver Broncos"; "Broncos" |]; "blue", [| "red" |]; "big cat", [| "a cat" |] ]
                Expect.equal s.Questions 3 "questions"
                close s.ExactMatch (1.0 / 3.0) "only the first matches exactly"
                close s.F1 ((1.0 + 0.0 + 2.0 * 0.5 * 1.0 / 1.5) / 3.0) "1, 0 and F1(big cat, cat) = 2/3"
                Expect.throwsT<ArgumentException> (fun () -> squadScores [ "x", [||] ] |> ignore) "no gold answer"
                Expect.throwsT<ArgumentException> (fun () -> squadScores [] |> ignore) "no question"
            }
        ]
    ]
