/// The CoNLL-2003, SQuAD 1.1 and GloVe loaders: small files written here (formats, conversions and every
/// bad-input error with its file and line), and the real samples in ../shared/data (their documented counts,
/// and the character-to-token answer mapping round-tripping on every aligned answer).
module Moe.Tests.TaggingDataTests

open System
open System.IO
open Expecto
open Moe
open Moe.TextTools
open Moe.Tests.Support

let private withFile (name: string) (text: string) (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), "moe-tagging-data", Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    let path = Path.Combine(dir, name)
    File.WriteAllText(path, text)
    try body path
    finally (try Directory.Delete(dir, true) with _ -> ())

/// The DataException of `f`, checked to name the file and the line.
let private failsAt (path: string) (line: int64 option) (mentions: string) (f: unit -> unit) =
    let ex = Expect.throwsC f (fun e -> e)
    match ex with
    | :? DataException as d ->
        Expect.equal d.File path "names the file"
        Expect.equal d.Line line "names the line"
        Expect.stringContains d.Message mentions "says what was wrong"
    | other -> failtestf "expected a DataException, got %s: %s" (other.GetType().Name) other.Message

let private conllText =
    "-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\nGerman JJ I-NP I-MISC\ncall NN I-NP O\n\nPeter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\n\n-DOCSTART- -X- O O\n\nIn IN I-PP O\nEurope NNP I-NP I-LOC\nAsia NNP I-NP B-LOC\n\n"

let private squadJson (answerStart: int) =
    sprintf """{"data": [{"title": "T", "paragraphs": [{"context": "Denver won the 1970s title in Santa Clara.", "qas": [{"id": "q1", "question": "Who won?", "answers": [{"answer_start": 0, "text": "Denver"}, {"answer_start": 15, "text": "1970"}]}, {"id": "q2", "question": "Where?", "answers": [{"answer_start": %d, "text": "Santa Clara"}]}]}]}], "version": "1.1"}""" answerStart

let tests =
    testList "TaggingData" [
        testList "CoNLL" [
            test "documents, blank-line sentences, the last column, IOB1 converted to IOB2" {
                withFile "eng.train" conllText (fun path ->
                    let f = Conll.read Conll.ConllConfig.defaults path
                    Expect.equal f.Documents 2 "two -DOCSTART-"
                    Expect.equal (f.Sentences |> Array.map (fun s -> s.Words.Length)) [| 4; 2; 3 |] "three sentences"
                    Expect.equal f.Tokens 9 "tokens"
                    Expect.equal f.Sentences[0].Tags [| "B-ORG"; "O"; "B-MISC"; "O" |] "I- at an entity start became B-"
                    Expect.equal f.Sentences[2].Tags [| "O"; "B-LOC"; "B-LOC" |] "B- between two LOC kept"
                    Expect.equal f.Sentences[1].Line 8L "first token's line"
                    Expect.equal f.ConvertedTags 4 "EU, German, Peter, Europe"
                    let chunks = f.Sentences |> Array.collect (fun s -> Conll.chunks s.Tags) |> Array.map (fun c -> c.Type)
                    Expect.equal chunks [| "ORG"; "MISC"; "PER"; "LOC"; "LOC" |] "entities")
            }
            test "IOB2 files are read as they are, and an IOB1 file read as IOB2 is refused at its line" {
                withFile "iob2.txt" "EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn I-PER\n" (fun path ->
                    let f = Conll.read { Conll.ConllConfig.defaults with Scheme = Conll.Iob2 } path
                    Expect.equal f.Sentences[1].Tags [| "B-PER"; "I-PER" |] "unchanged"
                    Expect.equal f.ConvertedTags 0 "nothing converted")
                withFile "eng.train" conllText (fun path ->
                    failsAt path (Some 3L) "IOB1" (fun () -> Conll.read { Conll.ConllConfig.defaults with Scheme = Conll.Iob2 } path |> ignore))
            }
            test "bad lines are errors naming the file and line" {
                withFile "bad.txt" "EU NNP I-NP I-ORG\nrejects VBZ O\n" (fun path ->
                    failsAt path (Some 2L) "expected 4 space-separated columns" (fun () -> Conll.read Conll.ConllConfig.defaults path |> ignore))
                withFile "bad.txt" "EU NNP I-NP I-ORG\nrejects VBZ I-VP X-PER\n" (fun path ->
                    failsAt path (Some 2L) "X-PER" (fun () -> Conll.read Conll.ConllConfig.defaults path |> ignore))
                withFile "bad.txt" "EU I-ORG\n" (fun path ->
                    failsAt path (Some 1L) "column 3" (fun () -> Conll.read { Conll.ConllConfig.defaults with NerColumn = Some 3 } path |> ignore))
                withFile "empty.txt" "-DOCSTART- -X- O O\n\n" (fun path ->
                    failsAt path None "no sentence" (fun () -> Conll.read Conll.ConllConfig.defaults path |> ignore))
            }
            testWithShared "the shared sample has its documented counts (and entities, read through IOB1)" (fun shared ->
                let train, testa, testb = Conll.splitFiles (Path.Combine(shared, "conll2003-sample"))
                let counts (path: string) =
                    let f = Conll.read Conll.ConllConfig.defaults path
                    let types = f.Sentences |> Array.collect (fun s -> Conll.chunks s.Tags) |> Array.countBy (fun c -> c.Type) |> Map.ofArray
                    f.Sentences.Length, f.Tokens, f.Documents, (types["LOC"], types["MISC"], types["ORG"], types["PER"])
                // ../shared/data/conll2003-sample/README.md, "Counts".
                Expect.equal (counts train) (2000, 29031, 140, (1255, 577, 656, 1084)) "eng.train"
                Expect.equal (counts testa) (500, 5700, 21, (268, 85, 195, 332)) "eng.testa"
                Expect.equal (counts testb) (500, 5945, 28, (288, 65, 188, 442)) "eng.testb")
        ]
        testList "SQuAD" [
            test "tokens with offsets, aligned and misaligned answers counted" {
                withFile "train.json" (squadJson 30) (fun path ->
                    let f = Squad.read path
                    Expect.equal (f.Articles, f.Paragraphs, f.Questions.Length, f.AnswerCount) (1, 1, 2, 3) "sizes"
                    let q1 = f.Questions[0]
                    Expect.equal (q1.ContextTokens |> Array.map (fun t -> t.Text)) [| "Denver"; "won"; "the"; "1970s"; "title"; "in"; "Santa"; "Clara"; "." |] "tokens"
                    Expect.equal q1.Answers[0].Tokens (Some(0, 0)) "Denver"
                    Expect.equal q1.Answers[1].Tokens None "1970 ends inside 1970s"
                    Expect.equal f.Questions[1].Answers[0].Tokens (Some(6, 7)) "Santa Clara"
                    Expect.equal (Squad.spanText q1.Context q1.ContextTokens 6 7) "Santa Clara" "span text"
                    Expect.equal (f.Misaligned, f.QuestionsWithoutAlignedAnswer) (1, 0) "q1 still has an aligned answer")
            }
            test "an answer_start that misses its text, a missing field and bad JSON are errors naming the item" {
                withFile "train.json" (squadJson 29) (fun path ->
                    failsAt path None "data[0].paragraphs[0].qas[1].answers[0] (question q2)" (fun () -> Squad.read path |> ignore))
                withFile "train.json" ((squadJson 30).Replace("\"question\": \"Where?\", ", "")) (fun path ->
                    failsAt path None "data[0].paragraphs[0].qas[1]: expected a field \"question\"" (fun () -> Squad.read path |> ignore))
                withFile "train.json" "{\"data\": [" (fun path ->
                    failsAt path None "malformed JSON" (fun () -> Squad.read path |> ignore))
            }
            testWithShared "char-to-token mapping round-trips on every aligned answer of the shared sample" (fun shared ->
                for name, questions, answers in [ "train-v1.1-sample.json", 1483, 1483; "dev-v1.1-sample.json", 1877, 5623 ] do
                    let f = Squad.read (Path.Combine(shared, "squad-v1.1-sample", name))
                    Expect.equal (f.Questions.Length, f.AnswerCount) (questions, answers) (name + ": README counts")
                    let mutable aligned = 0
                    for q in f.Questions do
                        for a in q.Answers do
                            match a.Tokens with
                            | Some(first, last) ->
                                aligned <- aligned + 1
                                Expect.equal (Squad.spanText q.Context q.ContextTokens first last) a.Text (sprintf "%s %s: %s" name q.Id a.Text)
                                Expect.equal q.ContextTokens[first].Start a.CharStart "starts where answer_start says"
                            | None -> ()
                    Expect.equal (aligned + f.Misaligned) answers (name + ": every answer aligned or counted")
                    Expect.isLessThan (float f.Misaligned / float answers) 0.05 (name + ": few answers misaligned"))
        ]
        testList "GloVe" [
            test "vocabulary pruned to GloVe, lower-cased, special tokens first, unknown words to <unk>" {
                withFile "glove.txt" "the 0.1 0.2\nking 0.5 -1e-3\nqueen 1 2\n" (fun path ->
                    let v = Glove.vocabulary true [ path ] [ "The"; "King"; "the"; "zebra"; "the" ]
                    Expect.equal v.Words [| "<pad>"; "<unk>"; "<sep>"; "the"; "king" |] "specials, then by frequency; queen pruned"
                    Expect.equal (v.Vectors[4]) [| 0.5f; -0.001f |] "king's vector"
                    Expect.equal (v.Vectors[Glove.unknownId]) [| 0.0f; 0.0f |] "special rows are zeros (the model learns them)"
                    Expect.equal (Glove.idOf v "KING", Glove.idOf v "zebra") (4, Glove.unknownId) "lookup"
                    Expect.equal (v.Types, v.CoveredTypes, v.Tokens, v.CoveredTokens) (3, 2, 5L, 4L) "coverage")
            }
            test "lines of the wrong width, non-numbers and empty lines are errors naming the line" {
                withFile "glove.txt" "the 0.1 0.2\nking 0.5\n" (fun path ->
                    failsAt path (Some 2L) "a word and 2 numbers" (fun () -> Glove.read (fun _ -> true) [ path ] |> ignore))
                withFile "glove.txt" "the 0.1 0.2\nking 0.5 abc\n" (fun path ->
                    failsAt path (Some 2L) "'abc'" (fun () -> Glove.read (fun _ -> true) [ path ] |> ignore))
                withFile "glove.txt" "the 0.1 0.2\n\nking 0.5 1\n" (fun path ->
                    failsAt path (Some 2L) "empty line" (fun () -> Glove.read (fun _ -> true) [ path ] |> ignore))
            }
            testWithShared "the shared subset: 50-d vectors, documented counts and a known vector" (fun shared ->
                let dir = Path.Combine(shared, "glove-6b-50d-subset")
                let files = Glove.files dir
                let g = Glove.read (fun w -> w = "king" || w = "the") files
                Expect.equal (g.Dim, g.Lines, g.Duplicates) (50, 2446 + 2753, 0) "README counts"
                Expect.equal (g.Table["king"].[0 .. 1]) [| 0.50451f; 0.68607f |] "king 0.50451 0.68607 ..."
                Expect.equal g.Table.Count 2 "only the kept words are stored")
        ]
    ]
