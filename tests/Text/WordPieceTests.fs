/// BERT's WordPiece tokenizer from vocab.txt (`Moe.WordPiece`): the tokenizer.json BertConverter writes, run by
/// the tokenizers library, on a small vocabulary written here (lowercasing, accent stripping, ## pieces, unknown
/// words, Chinese characters, pairs and their token types, the cased setting).
module Moe.Tests.WordPieceTests

open System
open System.IO
open Expecto
open Moe

let private vocab =
    [ "[PAD]"; "[UNK]"; "[CLS]"; "[SEP]"; "[MASK]"; "hello"; "world"; "##s"; "un"; "##aff"; "##able"; ","; "!"; "the"; "我" ]

/// A folder with vocab.txt, config.json (model_type bert) and, when given, tokenizer_config.json.
let private withVocabFolder (tokenizerConfig: string option) (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), "moe-wordpiece-" + Guid.NewGuid().ToString "N")
    Directory.CreateDirectory dir |> ignore
    try
        File.WriteAllLines(Path.Combine(dir, "vocab.txt"), vocab)
        File.WriteAllText(Path.Combine(dir, "config.json"), """{"model_type": "bert", "vocab_size": 15}""")
        tokenizerConfig |> Option.iter (fun t -> File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), t))
        body dir
    finally Directory.Delete(dir, true)

let tests =
    testList "WordPiece" [
        testCase "uncased BERT: lowercase, accents, ## pieces, [UNK], Chinese characters, specials" (fun () ->
            withVocabFolder None (fun dir ->
                use tok = WordPiece.fromFolder dir
                Expect.equal (tok.Encode("Hello, worlds! unaffable xyz héllo 我的", true))
                    [| 2; 5; 11; 6; 7; 12; 8; 9; 10; 1; 5; 14; 1; 3 |] "BertTokenizer's ids"
                Expect.equal (tok.Tokens("unaffable", false)) [| "un"; "##aff"; "##able" |] "greedy longest-match pieces"
                Expect.equal tok.PadId (Some 0) "[PAD] by BertTokenizer's default"
                Expect.equal (tok.Decode([| 2; 5; 6; 7; 3 |], true)) "hello worlds" "## pieces join, specials skipped"
                let pair = tok.EncodePair("hello", "the world", true)
                Expect.equal pair [| 2; 5; 3; 13; 6; 3 |] "[CLS] A [SEP] B [SEP]"
                Expect.equal (WordPiece.pairTokenTypes 3 pair) [| 0L; 0L; 0L; 1L; 1L; 1L |] "type 1 after the first [SEP]"))

        testCase "cased BERT (do_lower_case false) keeps case, so Hello is unknown" (fun () ->
            withVocabFolder (Some """{"do_lower_case": false, "tokenizer_class": "BertTokenizer"}""") (fun dir ->
                use tok = WordPiece.fromFolder dir
                Expect.equal (tok.Encode("Hello hello", false)) [| 1; 5 |] "no lowercasing"
                let normalizer = tok.Document.["normalizer"]
                let lowercase = normalizer.["lowercase"].GetValue<bool>()
                Expect.isFalse lowercase "BertNormalizer lowercase false"))

        testCase "a special token missing from vocab.txt is refused naming the file" (fun () ->
            withVocabFolder (Some """{"cls_token": "<cls>"}""") (fun dir ->
                let err = try ((WordPiece.fromFolder dir) :> IDisposable).Dispose(); "" with e -> e.Message
                Expect.stringContains err "vocab.txt" "names the file"
                Expect.stringContains err "<cls>" "names the token"))
    ]
