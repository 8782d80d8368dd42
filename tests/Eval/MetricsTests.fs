module Moe.Tests.MetricsTests

open System
open System.IO
open System.IO.Compression
open System.Text
open System.Text.Json
open Expecto
open FsCheck.FSharp
open Moe
open Moe.Metrics
open Moe.Tests.Support

/// Tolerances named for where the expected numbers come from.
module MTol =
    /// rouge-score's tests use assertAlmostEqual(places=5): |difference| rounds to 0 at 5 decimals.
    let places5 = 5e-6
    /// rouge-score's tests with places=3.
    let places3 = 5e-4
    /// sacreBLEU test_bleu.py EPSILON.
    let sacreBleu = 1e-8
    /// sacreBLEU test_sentence_bleu.py EPSILON.
    let sacreBleuSentence = 1e-3
    /// rouge-score scoring_test.py: percentiles of a three-example bootstrap are exact.
    let bootstrapExact = 1e-8
    /// Hand-computed ratios, float64 round-off only.
    let exact = 1e-12
    /// Issue 4: corpus ROUGE F1 within 0.0005 of rouge-score on every PyrXSum system.
    let rougeScoreOracle = 5e-4
    /// Issue 4: corpus BLEU within 0.05 of sacreBLEU.
    let sacreBleuOracle = 0.05
    /// Published ROUGE-1.5.5 (perl) numbers vs rouge-score's algorithm, in ROUGE points (x 100): the perl
    /// tokenizer differs slightly; the gap observed on the XSum test set is 0.02-0.45 points.
    let rouge155Points = 0.5

let private close (tol: float) (actual: float) (expected: float) (what: string) =
    if not (abs (actual - expected) <= tol) then
        failtestf "%s: expected %.10g, got %.10g (tolerance %g)" what expected actual tol

let private closePrf (tol: float) (actual: Prf) (p: float, r: float, f: float) (what: string) =
    close tol actual.Precision p (what + " precision")
    close tol actual.Recall r (what + " recall")
    close tol actual.F1 f (what + " f1")

let private tempFile (bytes: byte[]) : string =
    let path = Path.Combine(Path.GetTempPath(), sprintf "moe-metrics-%s.txt" (Guid.NewGuid().ToString "N"))
    File.WriteAllBytes(path, bytes)
    path

let private gunzipLines (path: string) : string[] =
    use file = File.OpenRead path
    use gz = new GZipStream(file, CompressionMode.Decompress)
    use reader = new StreamReader(gz, Encoding.UTF8)
    reader.ReadToEnd().Split('\n', StringSplitOptions.RemoveEmptyEntries)

// rouge-score testdata (google-research/google-research rouge/testdata, Apache-2.0), transcribed: the first two
// lines of target.txt and prediction.txt (read with readlines, so each keeps its "\n"), and
// pyrouge_files/target_multi.0.txt and prediction_multi.0.txt.
let private target0 =
    "ZfbCUIUuePaiLVUlCaUXxkpu XPeWing tUHfPMuZ',-Xd Y BrUgVJing M-HV.-DgdDaY.rFDJCRing Ht-LM EKBDXkME,yz'RBr q'wtion wIojNbN wL,b .a-'XdQggyFl jB-RPP'iyOIcUxer tKM L\n"
let private target1 =
    "KsJdPByEtAor fE-Qg Dpdbring cw-WeFyu vC MoBL Xdn g wkvcEiGvKtion BDFhrpMtion psing sbKao Q m qiing LMmer HqqLFXe,XPY,J XsurkMer ,ed nB'wH'bWVHjWFEing tQ.saefZwJtKrTlixYpMMsJing UCAPwNHeYVjDing c T BUySKtion gMPfJpwGw p'NvxAoping eu pBwMBKV'I DNxqelhu,PHPxDEq,mtion SN\n"
let private prediction0 =
    "rFDJCRtion Ht-LM EKtDXkME,yz'RBr q'wer wrojNbN wL,b .a-'XdQggyFl jB-RPP'iyOIcUxi\n"
let private prediction1 =
    "n cw-WeFyu vC MoBL Xdn g wkvcEiGvKtion BDFhrpMer pstion sbKao Q m qier LMmed HqqLFXe,XPY,J XsurkMeo ,ed nB'wH'bWVHjWFEer tQ.saefZwJtKrTlixYpMMNJtion UCAPwNHeYVjD\n"
let private targetMulti0 =
    target0 + target1
    + "NhETebUbBk'er WOvoHMTjSRizKgH'vHiing Xu,hWxfs VkNE QhgKiLHE -HidivzoM.dO anhtion jbLQiSGDTCsuhREebUaKM dv J dVN tmbOT\n"
    + "vMR HDm,xOAetion D,tion HJtodT.mHl UIv-p VjWH'BdyWjnfGU-OjT aEMdFICyLWfQMtion wEMfdOKing AwkeKbO 'DxqNOHBH qKtVvm OYJl mM\n"
let private predictionMulti0 =
    prediction0 + prediction1
    + "xfs VkJE QhgKiLHE -HidivzoM.dO anhing jbLQiSGDTCsuhREebUaKM dv J\n"
    + "VjWH'BdyWjnfGU-OjTNaEMdFICyLWfQMing wEMfdOKijg AwkeKbO 'DxqNO\n"

// sacreBLEU test_bleu.py (mjpost/sacrebleu f615c72): the README example with two reference streams.
let private bleuHyps = [| "The dog bit the man."; "It wasn't surprising."; "The man had just bitten him." |]
let private bleuRefs =
    [| [| "The dog bit the man."; "It was not unexpected."; "The man bit him first." |]
       [| "The dog had bit the man."; "No one was surprised."; "The man had bitten the dog." |] |]

/// sacreBLEU's `raw_corpus_bleu`: no tokenization, floor smoothing, effective order.
let private rawCfg (floor: float) =
    { Bleu.corpusDefaults with Tokenizer = Bleu.TokNone; Smoothing = Bleu.Floor floor; EffectiveOrder = true }

// sacreBLEU test_sentence_bleu.py (example from sacreBLEU issue #98).
let private sentRef = "producţia de zahăr brut se exprimă în zahăr alb;"
let private sentSys = "Producția de zahăr primă va fi exprimată în ceea ce privește zahărul alb;"

/// A deterministic toy encoder for the BERTScore tests: each token's vector is its letter counts over a-z.
type private LetterCountEmbedder() =
    interface BertScore.IContextualEmbedder with
        member _.Name = "letter-counts (test)"
        member _.Embed texts =
            texts
            |> Array.map (fun t ->
                let tokens = Rouge.tokenize false t
                { Tokens = tokens
                  Vectors = tokens |> Array.map (fun w -> Array.init 26 (fun k -> float32 (w |> Seq.filter (fun c -> int c - int 'a' = k) |> Seq.length))) })

/// A deterministic toy NLI model: entailment 1 when every hypothesis word is in the premise; contradiction 1
/// when the hypothesis says "not" and the premise does not; otherwise neutral.
type private WordNli() =
    interface Consistency.IEntailmentScorer with
        member _.Name = "word-overlap (test)"
        member _.Score pairs =
            pairs
            |> Array.map (fun p ->
                let premise = Set.ofArray (Rouge.tokenize false p.Premise)
                let hyp = Rouge.tokenize false p.Hypothesis
                if hyp |> Array.contains "not" && not (premise.Contains "not") then
                    { Entailment = 0.0; Neutral = 0.0; Contradiction = 1.0 }
                elif hyp |> Array.forall premise.Contains then { Entailment = 1.0; Neutral = 0.0; Contradiction = 0.0 }
                else { Entailment = 0.0; Neutral = 1.0; Contradiction = 0.0 })

let private pyrxsumSystems =
    [ "facebook-bart-large"; "google-pegasus"; "t5-large"; "BertSumAbs"; "BertSumExtAbs"; "TransformerAbs"
      "convs2s"; "topic-convs2s"; "ptgen"; "fast-abs-rl" ]

let private pyText =
    testList "PyText" [
        testCase "split and rstrip follow Python's white space, including U+001C..U+001F" <| fun () ->
            Expect.equal (PyText.split "  a\tb\u001Fc\u00A0d  ") [| "a"; "b"; "c"; "d" |] "str.split()"
            Expect.equal (PyText.split "") [||] "empty"
            Expect.equal (PyText.rstrip "ab \u001C\n") "ab" "str.rstrip()"
        testCase "lower maps U+0130 to i + combining dot, as Python" <| fun () ->
            Expect.equal (PyText.lower "İA") "i\u0307a" "SpecialCasing"
    ]

let private files =
    testList "readLines" [
        testCase "a last line without newline is kept; one trailing newline is not an extra line" <| fun () ->
            let a = tempFile (Encoding.UTF8.GetBytes "one\ntwo")
            let b = tempFile (Encoding.UTF8.GetBytes "one\ntwo\n")
            let c = tempFile (Encoding.UTF8.GetBytes "one\r\n\r\nthree\n")
            Expect.equal (readLines a) [| "one"; "two" |] "no trailing newline"
            Expect.equal (readLines b) [| "one"; "two" |] "trailing newline"
            Expect.equal (readLines c) [| "one"; ""; "three" |] "CRLF, and an empty line is an example"
        testCase "empty files, invalid UTF-8 and missing files are errors that name the file" <| fun () ->
            let empty = tempFile [||]
            let bad = tempFile [| byte 'o'; byte 'k'; 10uy; 0xC3uy; 0x28uy |]
            Expect.throwsT<InvalidDataException> (fun () -> readLines empty |> ignore) "empty"
            try readLines bad |> ignore; failtest "invalid UTF-8 accepted"
            with :? InvalidDataException as e ->
                Expect.stringContains e.Message (bad + ":2") "names file and line"
                Expect.stringContains e.Message "UTF-8" "says what was expected"
            Expect.throwsT<FileNotFoundException> (fun () -> readLines (bad + ".missing") |> ignore) "missing"
        testCase "a UTF-8 byte order mark is dropped" <| fun () ->
            let p = tempFile (Array.append [| 0xEFuy; 0xBBuy; 0xBFuy |] (Encoding.UTF8.GetBytes "x"))
            Expect.equal (readLines p) [| "x" |] "BOM"
        testCase "expectAligned names every file's line count" <| fun () ->
            try expectAligned [ "p.txt", [| "a" |]; "r.txt", [| "a"; "b" |] ]; failtest "accepted"
            with :? InvalidDataException as e -> Expect.stringContains e.Message "p.txt has 1, r.txt has 2" "counts"
    ]

let private porter =
    testList "Porter" [
        testCase "Martin mode reproduces Martin Porter's 23531-word vocabulary (voc.txt -> output.txt)" <| fun () ->
            let dir = Path.Combine(repoRoot, "tests", "data", "porter")
            let voc = gunzipLines (Path.Combine(dir, "voc.txt.gz"))
            let out = gunzipLines (Path.Combine(dir, "output.txt.gz"))
            Expect.equal voc.Length 23531 "vocabulary size"
            Expect.equal out.Length voc.Length "one stem per word"
            let wrong = Array.zip voc out |> Array.filter (fun (w, s) -> Porter.stem Porter.Martin w <> s)
            Expect.isEmpty (wrong |> Array.truncate 10) "every stem as published"
        testCase "NLTK mode: nltk/test/stem.doctest plurals" <| fun () ->
            let words = [ "caresses"; "flies"; "dies"; "mules"; "denied"; "died"; "agreed"; "owned"; "humbled"; "sized"; "meeting"; "stating"; "siezing"; "itemization"; "sensational"; "traditional"; "reference"; "colonizer"; "plotted" ]
            let stems = "caress fli die mule deni die agre own humbl size meet state siez item sensat tradit refer colon plot"
            Expect.equal (words |> List.map (Porter.stem Porter.Nltk) |> String.concat " ") stems "doctest output"
        testCase "NLTK mode: its departures and irregular forms" <| fun () ->
            let nltk = Porter.stem Porter.Nltk
            // nltk/test/unit/test_stem.py
            Expect.equal (nltk "oed") "o" "test_oed_bug"
            Expect.equal (nltk "On") "on" "lower-cases"
            Expect.equal (nltk "Github") "github" "lower-cases"
            // Branches in nltk/stem/porter.py that Martin's version lacks.
            for word, stem in [ "skies", "sky"; "dying", "die"; "news", "news"; "innings", "inning"; "proceed", "proceed"
                                "spied", "spi"; "happy", "happi"; "enjoy", "enjoy"; "abbey", "abbey"; "age", "age" ] do
                Expect.equal (nltk word) stem word
            Expect.equal (Porter.stem Porter.Martin "abbey") "abbei" "Martin's y -> i after any vowel-bearing stem"
            Expect.equal (Porter.stem Porter.Martin "age") "ag" "Martin's *o needs three letters"
        testCase "Original mode stems words of one or two letters; Martin's leaves them" <| fun () ->
            Expect.equal (Porter.stem Porter.Original "as") "a" "no length guard"
            Expect.equal (Porter.stem Porter.Martin "as") "as" "length guard"
    ]

let private rougeTests =
    let s1 = Rouge.score false (Rouge.RougeN 1)
    let s2 = Rouge.score false (Rouge.RougeN 2)
    let sl = Rouge.score false Rouge.RougeL
    let sls = Rouge.score false Rouge.RougeLsum
    testList "Rouge" [
        testCase "tokenizer: rouge-score tokenize_test.py, and its character rules" <| fun () ->
            Expect.equal (Rouge.tokenize false "one Two three") [| "one"; "two"; "three" |] "test_give_me_a_name"
            Expect.equal (Rouge.tokenize false "one\n Two \nthree") [| "one"; "two"; "three" |] "newlines"
            Expect.equal (Rouge.tokenize false "U.S.-based, 2024's café") [| "u"; "s"; "based"; "2024"; "s"; "caf" |] "non [a-z0-9] separates"
            Expect.equal (Rouge.tokenize false "İstanbul") [| "i"; "stanbul" |] "U+0130 lowers to i + U+0307"
            Expect.equal (Rouge.tokenize false "\u212Aelvin") [| "kelvin" |] "Kelvin sign lowers to k"
            Expect.equal (Rouge.tokenize true "the cats was running") [| "the"; "cat"; "was"; "run" |] "stems only tokens longer than 3"
        // rouge_scorer_test.py
        testCase "testRouge1, testRouge2, testRougeLConsecutive, testRougeLNonConsecutive" <| fun () ->
            closePrf MTol.places5 (s1 "testing one two" "testing") (1.0, 1.0 / 3.0, 1.0 / 2.0) "rouge1"
            closePrf MTol.places5 (s2 "testing one two" "testing one") (1.0, 1.0 / 2.0, 2.0 / 3.0) "rouge2"
            closePrf MTol.places5 (sl "testing one two" "testing one") (1.0, 2.0 / 3.0, 4.0 / 5.0) "rougeL consecutive"
            closePrf MTol.places5 (sl "testing one two" "testing two") (1.0, 2.0 / 3.0, 4.0 / 5.0) "rougeL non-consecutive"
        testCase "testRougeEmpty" <| fun () ->
            for t in [ Rouge.RougeN 1; Rouge.RougeN 2; Rouge.RougeL; Rouge.RougeLsum ] do
                closePrf MTol.places5 (Rouge.score false t "testing one two" "") (0.0, 0.0, 0.0) (Rouge.typeName t)
        testCase "testRouge1AgainstRouge155 and WithStemming" <| fun () ->
            closePrf MTol.places5 (s1 target0 prediction0) (0.68750, 0.40741, 0.51163) "line 0"
            closePrf MTol.places5 (s1 target1 prediction1) (0.65385, 0.40476, 0.50000) "line 1"
            let st = Rouge.score true (Rouge.RougeN 1)
            closePrf MTol.places5 (st target0 prediction0) (0.68750, 0.40741, 0.51163) "line 0 stemmed"
            closePrf MTol.places5 (st target1 prediction1) (0.69231, 0.42857, 0.52941) "line 1 stemmed"
        testCase "testRouge2AgainstRouge155 and WithStemming" <| fun () ->
            for stem in [ false; true ] do
                let s = Rouge.score stem (Rouge.RougeN 2)
                closePrf MTol.places5 (s target0 prediction0) (0.53333, 0.30769, 0.39024) (sprintf "line 0 stem=%b" stem)
                closePrf MTol.places5 (s target1 prediction1) (0.48000, 0.29268, 0.36364) (sprintf "line 1 stem=%b" stem)
        testCase "testRougeLAgainstRouge155" <| fun () ->
            closePrf MTol.places5 (sl target0 prediction0) (0.68750, 0.40741, 0.51163) "line 0"
            closePrf MTol.places5 (sl target1 prediction1) (0.65385, 0.40476, 0.50000) "line 1"
        testCase "testRougeLSumAgainstRouge155WithStemming" <| fun () ->
            closePrf MTol.places5 (Rouge.score true Rouge.RougeLsum targetMulti0 predictionMulti0) (0.66667, 0.36538, 0.47205) "multi.0"
        testCase "testLcsTable: table, backtracked indices and values" <| fun () ->
            let reference = [| 1; 2; 3; 4; 5 |]
            let c1 = [| 2; 5; 3; 4 |]
            let table = Rouge.lcsTable reference c1
            Expect.equal table[reference.Length, c1.Length] 3 "LCS length"
            Expect.equal (Rouge.lcsIndices reference c1) [| 1; 2; 3 |] "indices"
            Expect.equal (Rouge.lcsIndices reference c1 |> Array.map (fun i -> reference[i])) [| 2; 3; 4 |] "values"
            Expect.equal (Rouge.lcsIndices reference [| 8; 9 |]) [||] "no common subsequence"
        testCase "testUnionLcs (ROUGE paper section 3.2 example)" <| fun () ->
            Expect.equal (Rouge.unionLcs [| 1; 2; 3; 4; 5 |] [ [| 1; 2; 6; 7; 8 |]; [| 1; 3; 8; 9; 5 |] ]) [| 1; 2; 3; 5 |] "union"
            Expect.equal (Rouge.unionLcs [| 1; 2; 3; 4; 5 |] [ [| 1; 3; 8; 9; 5 |]; [| 1; 2; 6; 7; 8 |] ]) [| 1; 2; 3; 5 |] "order-free"
        testCase "testSummaryLevelLcs" <| fun () ->
            let tok (xs: int list) = xs |> List.map string |> Array.ofList
            let s = Rouge.scoreSummaryLevelLcs [| tok [ 1; 2; 3; 4; 5 ] |] [| tok [ 1; 2; 6; 7; 8 ]; tok [ 1; 3; 8; 9; 5 ] |]
            close MTol.exact s.Recall 0.8 "4 / 5"
            close MTol.exact s.Precision 0.4 "4 / 10"
            close MTol.places3 s.F1 0.5333 "f1"
            close MTol.exact (Rouge.scoreSummaryLevelLcs [| [| "reference" |] |] [| [||] |]).Recall 0.0 "tokenizer dropped every token"
        testCase "testRougeLsum" <| fun () ->
            closePrf MTol.places3 (sls "w1 w2 w3 w4 w5" "w1 w2 w6 w7 w8\nw1 w3 w8 w9 w5") (0.4, 0.8, 0.5333) "two sentences"
            closePrf MTol.places3 (sls "w1 w2 w3 w4 w5" "") (0.0, 0.0, 0.0) "empty prediction"
            closePrf MTol.places3 (sls "" "w1") (0.0, 0.0, 0.0) "empty target"
            closePrf MTol.places3 (sls "w1 w2 w3 w4 w5" "/") (0.0, 0.0, 0.0) "only non-word characters"
        testCase "ROUGE-Lsum counts a repeated token at most as often as each side has it (by hand)" <| fun () ->
            // Reference sentences "a b" and "a c"; candidate "a a b c" (one sentence). Union LCS of "a b" is
            // [a; b], of "a c" is [a; c]; the candidate has two a's and the reference two, so hits = 4.
            closePrf MTol.exact (sls "a b\na c" "a a b c") (1.0, 1.0, 1.0) "all matched"
            // Candidate "a b c": only one a, so the second reference sentence's a is not a hit: hits = 3.
            closePrf MTol.exact (sls "a b\na c" "a b c") (1.0, 0.75, fmeasure 1.0 0.75) "clipped"
        testCase "ROUGE-N for any n (ROUGE-3 and ROUGE-12 by hand)" <| fun () ->
            // Reference trigrams: [a b c; b c d]; prediction: [a b c; b c e]; one match.
            closePrf MTol.exact (Rouge.score false (Rouge.RougeN 3) "a b c d" "a b c e") (0.5, 0.5, 0.5) "rouge3"
            closePrf MTol.exact (Rouge.score false (Rouge.RougeN 12) "a b c" "a b c") (0.0, 0.0, 0.0) "no 12-grams"
            Expect.throwsT<ArgumentException> (fun () -> Rouge.scoreNgrams 0 [| "a" |] [| "a" |] |> ignore) "n >= 1"
        propertyWith "ROUGE scores are fractions and F1 lies between min(P, R) and max(P, R)"
            (Gen.zip (Gen.listOfLength 8 (Gen.elements [ "a"; "b"; "c"; "d"; " "; "\n" ])) (Gen.listOfLength 8 (Gen.elements [ "a"; "b"; "c"; "x"; " "; "\n" ])))
            (fun (r, p) ->
                let r, p = String.concat " " r, String.concat " " p
                for t in [ Rouge.RougeN 1; Rouge.RougeN 2; Rouge.RougeL; Rouge.RougeLsum ] do
                    let s = Rouge.score false t r p
                    for v in [ s.Precision; s.Recall; s.F1 ] do
                        Expect.isTrue (v >= 0.0 && v <= 1.0) (sprintf "%s in [0, 1]" (Rouge.typeName t))
                    Expect.isTrue (s.F1 <= max s.Precision s.Recall + MTol.exact && s.F1 >= min s.Precision s.Recall - MTol.exact) "harmonic mean")
    ]

let private bleuTests =
    testList "Bleu" [
        testCase "13a tokenizer: punctuation split, numbers kept, entities decoded" <| fun () ->
            Expect.equal (Bleu.tokenize13a "Hello, world.") "Hello , world ." "period and comma"
            Expect.equal (Bleu.tokenize13a "It costs 3.50, or 1,000 in 2019-20.") "It costs 3.50 , or 1,000 in 2019 - 20 ." "digits keep . and ,"
            Expect.equal (Bleu.tokenize13a "a&amp;b &quot;q&quot;") "a & b \" q \"" "entities"
            Expect.equal (Bleu.tokenize13a "it's (ok)") "it's ( ok )" "apostrophe stays"
        // test_bleu.py test_corpus_bleu
        testCase "corpus BLEU: test_corpus_bleu cases" <| fun () ->
            close MTol.sacreBleu (Bleu.corpus Bleu.corpusDefaults bleuHyps bleuRefs).Score 48.530827 "defaults"
            close MTol.sacreBleu (Bleu.corpus Bleu.corpusDefaults [| ""; ""; "" |] bleuRefs).Score 0.0 "empty hypotheses kept"
            close MTol.sacreBleu (Bleu.corpus { Bleu.corpusDefaults with Tokenizer = Bleu.TokNone } bleuHyps bleuRefs).Score 49.1919566 "tokenize none"
            close MTol.sacreBleu (Bleu.corpus { Bleu.corpusDefaults with Smoothing = Bleu.NoSmoothing } bleuHyps bleuRefs).Score 48.530827 "smooth none"
        testCase "raw corpus BLEU: test_raw_bleu, test_effective_order, test_statistics, test_offset" <| fun () ->
            let raw floor hyps refs = (Bleu.corpus (rawCfg floor) hyps refs).Score / 100.0
            close MTol.sacreBleu (raw 0.01 [| "this is a test"; "another test" |] [| [| "ref1"; "ref2" |] |]) 0.0 "no matches"
            close MTol.sacreBleu (raw 0.01 [| "this is a test" |] [| [| "this is a test" |] |]) 1.0 "identical"
            close MTol.sacreBleu (raw 0.01 [| "this is a fest" |] [| [| "this is a test" |] |]) 0.223606797749979 "one word off"
            close MTol.sacreBleu (raw 0.01 [| "test" |] [| [| "a test" |] |]) 0.3678794411714425 "effective order, short"
            close MTol.sacreBleu (raw 0.01 [| "a test" |] [| [| "a test" |] |]) 1.0 "effective order, equal"
            close MTol.sacreBleu (raw 0.01 [| "a little test" |] [| [| "a test" |] |]) 0.03218297948685433 "effective order, long"
            let stats = (Bleu.corpus (rawCfg 0.01) [| "am I am a character sequence" |] [| [| "I am a symbol string sequence a a" |] |]).Statistics
            Expect.equal stats.Correct [| 4; 2; 1; 0 |] "common counts"
            Expect.equal stats.Total [| 6; 5; 4; 3 |] "total counts"
            close MTol.sacreBleu (raw 0.0 [| "am I am a character sequence" |] [| [| "I am a symbol string sequence a a" |] |]) 0.0 "offset 0"
            close MTol.sacreBleu (raw Bleu.defaultFloor [| "am I am a character sequence" |] [| [| "I am a symbol string sequence a a" |] |]) 0.1555722182 "offset 0.1"
        testCase "compute_bleu: test_scoring and test_degenerate_statistics" <| fun () ->
            let st c t h r : Bleu.Statistics = { HypothesisLength = h; ReferenceLength = r; Correct = c; Total = t }
            // BLEU.compute_bleu's own default smoothing is 'none'.
            let none = { Bleu.corpusDefaults with Smoothing = Bleu.NoSmoothing }
            close MTol.sacreBleu ((Bleu.fromStatistics none (st [| 9; 7; 5; 3 |] [| 10; 8; 6; 4 |] 11 11)).Score / 100.0) 0.8375922397 "test_scoring"
            for c, t, h, r, offset in
                [ [| 0; 0; 0; 0 |], [| 4; 4; 2; 1 |], 0, 1, 0.0
                  [| 0; 0; 0; 0 |], [| 10; 11; 12; 0 |], 14, 10, 0.0
                  [| 0; 0; 0; 0 |], [| 0; 0; 0; 0 |], 0, 0, 0.0
                  [| 6; 5; 4; 0 |], [| 6; 5; 4; 3 |], 6, 6, 0.0
                  [| 0; 0; 0; 0 |], [| 0; 0; 0; 0 |], 0, 0, 0.1
                  [| 0; 0; 0; 0 |], [| 0; 0; 0; 0 |], 1, 5, 0.01 ] do
                let cfg = { Bleu.corpusDefaults with Smoothing = Bleu.Floor offset }
                Expect.equal (Bleu.fromStatistics cfg (st c t h r)).Score 0.0 "degenerate statistics score exactly 0"
        testCase "max n-gram order: test_max_ngram_order" <| fun () ->
            for order, expected in [ 1, "77.65"; 2, "60.50"; 3, "53.93"; 4, "48.53"; 5, "46.14"; 6, "43.28" ] do
                let score = (Bleu.corpus { Bleu.corpusDefaults with MaxOrder = order } bleuHyps bleuRefs).Score
                Expect.equal (score.ToString("F2", Globalization.CultureInfo.InvariantCulture)) expected (sprintf "order %d" order)
        testCase "sentence BLEU: test_sentence_bleu cases (13a and none tokenizers)" <| fun () ->
            let s cfg = (Bleu.sentence cfg sentSys [| sentRef |]).Score
            let d = Bleu.sentenceDefaults
            close MTol.sacreBleuSentence (s d) 8.493 "exp"
            close MTol.sacreBleuSentence (s { d with Smoothing = Bleu.NoSmoothing }) 0.0 "none"
            close MTol.sacreBleuSentence (s { d with Smoothing = Bleu.Floor Bleu.defaultFloor }) 4.51688 "floor 0.1"
            close MTol.sacreBleuSentence (s { d with Smoothing = Bleu.Floor 0.5 }) 10.10 "floor 0.5"
            close MTol.sacreBleuSentence (s { d with Smoothing = Bleu.AddK Bleu.defaultAddK }) 14.882 "add-k 1"
            close MTol.sacreBleuSentence (s { d with Smoothing = Bleu.AddK 2.0 }) 21.389 "add-k 2"
            close MTol.sacreBleuSentence (s { d with Tokenizer = Bleu.TokNone }) 7.347 "tokenize none"
            for smoothing in [ Bleu.Exp; Bleu.NoSmoothing; Bleu.Floor Bleu.defaultFloor; Bleu.AddK Bleu.defaultAddK ] do
                close MTol.sacreBleuSentence (Bleu.sentence { d with Smoothing = smoothing } "this is a cat" [| "okay thanks" |]).Score 0.0 (sprintf "issue #141 %A" smoothing)
        testCase "config problems are reported together" <| fun () ->
            let problems = Bleu.validate { Bleu.corpusDefaults with MaxOrder = 0; Smoothing = Bleu.Floor -1.0 }
            Expect.equal problems.Length 2 "both"
    ]

let private abstractiveness =
    testList "Abstractiveness" [
        testCase "stop words: NLTK's English list has 179 entries" <| fun () ->
            Expect.equal Abstractiveness.stopWords.Count 179 "size"
        testCase "fragments, coverage, density, novel n-grams, extractiveness and compression by hand" <| fun () ->
            let s = Abstractiveness.words "The cat sat on the mat today."
            let d = Abstractiveness.words "Yesterday the cat sat on a mat."
            let f = Abstractiveness.fragments s d
            // "the cat sat on" (4), then "the" (1), "mat" (1); "today" is novel.
            Expect.equal f [| { SummaryStart = 0; DocumentStart = 1; Length = 4 }; { SummaryStart = 4; DocumentStart = 1; Length = 1 }; { SummaryStart = 5; DocumentStart = 6; Length = 1 } |] "greedy fragments"
            let stats = Abstractiveness.score "The cat sat on the mat today." "Yesterday the cat sat on a mat."
            close MTol.exact stats.Coverage (6.0 / 7.0) "coverage"
            close MTol.exact stats.Density (18.0 / 7.0) "density"
            close MTol.exact stats.NovelNgrams[0] (1.0 / 7.0) "novel unigrams"
            // Summary bigrams: the cat, cat sat, sat on, on the, the mat, mat today; the last three are new.
            close MTol.exact stats.NovelNgrams[1] 0.5 "novel bigrams"
            // Content words cat, sat, mat, today; three occur in the document.
            close MTol.exact stats.Extractiveness 0.75 "extractiveness"
            close MTol.exact stats.Compression 1.0 "7 / 7 words"
        testCase "the longest of several matches wins, the first on ties" <| fun () ->
            let f = Abstractiveness.fragments [| "a"; "b"; "c" |] [| "a"; "x"; "a"; "b"; "c"; "a"; "b" |]
            Expect.equal f [| { SummaryStart = 0; DocumentStart = 2; Length = 3 } |] "longest"
        testCase "empty summary or document: every statistic is 0" <| fun () ->
            let z = Abstractiveness.score "" "some document"
            Expect.equal (z.Compression, z.Extractiveness, z.Coverage, z.Density) (0.0, 0.0, 0.0, 0.0) "empty summary"
            Expect.equal z.NovelNgrams [| 0.0; 0.0; 0.0; 0.0 |] "no n-grams"
            Expect.equal (Abstractiveness.score "words" "").Compression 0.0 "empty document"
    ]

let private bootstrap =
    testList "Bootstrap" [
        // rouge-score scoring_test.py: three examples, percentiles land on exact thirds.
        testCase "testConsistentPercentiles (confidence 0.9)" <| fun () ->
            let cols = [| [| 1.0; 0.0; 1.0 |]; [| 1.0 / 3.0; 0.0; 1.0 |]; [| 0.5; 0.0; 1.0 |] |]
            let iv = Bootstrap.intervals { Bootstrap.defaults with Confidence = 0.9 } cols
            for (i: Bootstrap.Interval), (lo, mid, hi) in Array.zip iv [| (1.0 / 3.0, 2.0 / 3.0, 1.0); (1.0 / 9.0, 4.0 / 9.0, 7.0 / 9.0); (1.0 / 6.0, 3.0 / 6.0, 5.0 / 6.0) |] do
                close MTol.bootstrapExact i.Low lo "low"
                close MTol.bootstrapExact i.Mid mid "mid"
                close MTol.bootstrapExact i.High hi "high"
        testCase "testLargeConfidence (confidence 0: every bound is the median)" <| fun () ->
            let iv = Bootstrap.intervals { Bootstrap.defaults with Confidence = 0.0 } [| [| 1.0; 0.0; 1.0 |] |]
            for v in [ iv[0].Low; iv[0].Mid; iv[0].High ] do close MTol.bootstrapExact v (2.0 / 3.0) "median"
        testCase "percentile interpolates linearly, as NumPy" <| fun () ->
            let v = [| 1.0; 2.0; 4.0; 8.0 |]
            close MTol.exact (Bootstrap.percentile v 50.0) 3.0 "between 2 and 4"
            close MTol.exact (Bootstrap.percentile v 2.5) 1.075 "pos 0.075"
            close MTol.exact (Bootstrap.percentile v 100.0) 8.0 "max"
        testCase "same seed, same interval; a constant column has a zero-width interval" <| fun () ->
            let col = Array.init 50 (fun i -> float (i % 7))
            Expect.equal (Bootstrap.intervals Bootstrap.defaults [| col |]) (Bootstrap.intervals Bootstrap.defaults [| col |]) "seeded"
            let c = Bootstrap.intervals Bootstrap.defaults [| Array.create 10 0.25 |]
            Expect.equal (c[0].Low, c[0].High) (0.25, 0.25) "constant"
        testCase "bad settings are all reported" <| fun () ->
            Expect.equal (Bootstrap.validate { Samples = 0; Confidence = 1.5; Seed = 0 }).Length 2 "both"
    ]

let private bertScore =
    testList "BertScore" [
        testCase "greedy matching by hand (eq. 2-3)" <| fun () ->
            let e tokens vectors : BertScore.TokenEmbeddings = { Tokens = tokens; Vectors = vectors }
            let cand = e [| "a"; "b" |] [| [| 1.0f; 0.0f |]; [| 0.0f; 1.0f |] |]
            let refr = e [| "a" |] [| [| 1.0f; 0.0f |] |]
            // Precision: a matches a (1), b matches a (0): 1/2. Recall: a matches a: 1.
            closePrf MTol.exact (BertScore.greedyMatch (fun _ -> 1.0) cand refr) (0.5, 1.0, 2.0 / 3.0) "unweighted"
            // Weight b three times as much as a: precision (1 + 0) / 4.
            closePrf MTol.exact (BertScore.greedyMatch (fun t -> if t = "b" then 3.0 else 1.0) cand refr) (0.25, 1.0, 0.4) "weighted"
        testCase "idf = ln((M + 1) / (df + 1)), unseen tokens ln(M + 1)" <| fun () ->
            let idf = BertScore.idf [| [| "a"; "b"; "a" |]; [| "a" |] |]
            close MTol.exact (idf "a") 0.0 "in both references"
            close MTol.exact (idf "b") (log 1.5) "in one"
            close MTol.exact (idf "zzz") (log 3.0) "unseen"
        testCase "with a toy encoder: identical texts score 1, ignored tokens and baseline rescaling apply" <| fun () ->
            let embedder = LetterCountEmbedder() :> BertScore.IContextualEmbedder
            let same = BertScore.score BertScore.defaults embedder [| "the cat sat" |] [| "the cat sat" |]
            closePrf 1e-6 same[0] (1.0, 1.0, 1.0) "identical"
            let b : Prf = { Precision = 0.5; Recall = 0.5; F1 = 0.5 }
            let rescaled = BertScore.score { BertScore.defaults with Baseline = Some b } embedder [| "the cat sat" |] [| "the cat sat" |]
            closePrf 1e-6 rescaled[0] (1.0, 1.0, 1.0) "(1 - b) / (1 - b)"
            // "zz" shares no letter with "ab": cosine 0. Ignoring "zz" leaves only "ab" in the candidate.
            let plain = BertScore.score BertScore.defaults embedder [| "ab zz" |] [| "ab" |]
            closePrf 1e-6 plain[0] (0.5, 1.0, 2.0 / 3.0) "zz unmatched"
            let ignoring = BertScore.score { BertScore.defaults with IgnoredTokens = [| "zz" |] } embedder [| "ab zz" |] [| "ab" |]
            closePrf 1e-6 ignoring[0] (1.0, 1.0, 1.0) "zz weighted 0"
        testCase "mismatched inputs are errors" <| fun () ->
            let embedder = LetterCountEmbedder() :> BertScore.IContextualEmbedder
            Expect.throwsT<ArgumentException> (fun () -> BertScore.score BertScore.defaults embedder [| "a" |] [||] |> ignore) "one reference per candidate"
    ]

let private consistency =
    testList "Consistency" [
        testCase "SummaC-ZS: max over premises, mean over hypotheses" <| fun () ->
            let m = array2D [ [ 0.2; -0.5 ]; [ 0.9; 0.1 ] ]
            close MTol.exact (Consistency.aggregate m) 0.5 "(0.9 + 0.1) / 2"
            let p : Consistency.NliProbabilities = { Entailment = 0.7; Neutral = 0.1; Contradiction = 0.2 }
            let d = Consistency.defaults
            close MTol.exact (Consistency.pairScore d p) 0.5 "e - c"
            close MTol.exact (Consistency.pairScore { d with UseContradiction = false } p) 0.7 "e"
            close MTol.exact (Consistency.pairScore { d with UseEntailment = false } p) 0.8 "1 - c"
            Expect.isNonEmpty (Consistency.validate { d with UseEntailment = false; UseContradiction = false }) "one must be on"
        testCase "with a toy NLI model: a supported sentence scores 1, a contradicted one -1, an unsupported one 0" <| fun () ->
            let nli = WordNli() :> Consistency.IEntailmentScorer
            let doc = "The cat sat on the mat. The dog slept in the sun."
            let score = Consistency.summacZs Consistency.defaults nli doc
            close MTol.exact (score "The dog slept.") 1.0 "entailed by the second sentence"
            close MTol.exact (score "The cat did not sit.") -1.0 "contradicted by both"
            close MTol.exact (score "The cat sat. A bird sang.") 0.5 "(1 + 0) / 2"
            Expect.throwsT<ArgumentException> (fun () -> score "" |> ignore) "an empty summary is an error"
        testCase "the default sentence splitter" <| fun () ->
            Expect.equal (Consistency.splitSentences "Hello there. How are you? \"Fine!\" Good") [| "Hello there."; "How are you?"; "\"Fine!\""; "Good" |] "split"
    ]

let private corpus =
    testList "scoreCorpus" [
        testCase "JSON has exactly the documented keys, with and without documents" <| fun () ->
            let r = scoreCorpus defaultOptions [| "the cat sat"; "" |] [| "the cat sat down"; "a dog" |] None
            use doc = JsonDocument.Parse(toJson r)
            let keys (e: JsonElement) = [ for p in e.EnumerateObject() -> p.Name ]
            Expect.equal (keys doc.RootElement) [ "n"; "rouge1"; "rouge2"; "rougeL"; "rougeLsum"; "bleu" ] "no document keys"
            Expect.equal (keys (doc.RootElement.GetProperty "rouge1")) [ "precision"; "recall"; "f1" ] "PRF"
            Expect.equal (doc.RootElement.GetProperty("n").GetInt32()) 2 "the empty prediction is counted"
            let rd = scoreCorpus defaultOptions [| "the cat sat"; "" |] [| "the cat sat down"; "a dog" |] (Some [| "the cat sat down today"; "a dog barked" |])
            use docd = JsonDocument.Parse(toJson rd)
            Expect.equal (keys docd.RootElement) [ "n"; "rouge1"; "rouge2"; "rougeL"; "rougeLsum"; "bleu"; "compression"; "extractiveness"; "novel_ngrams" ] "document keys"
            Expect.equal (keys (docd.RootElement.GetProperty "novel_ngrams")) [ "1"; "2"; "3"; "4" ] "orders"
        testCase "an empty prediction scores 0 and pulls the mean down" <| fun () ->
            let r = scoreCorpus defaultOptions [| "the cat sat"; "" |] [| "the cat sat"; "a dog" |] None
            close MTol.exact r.Examples[1].Rouge.Rouge1.F1 0.0 "empty"
            close MTol.exact r.Rouge1.F1.Mean 0.5 "(1 + 0) / 2"
            close MTol.exact r.Bleu.Score (Bleu.corpus Bleu.corpusDefaults [| "the cat sat"; "" |] [| [| "the cat sat"; "a dog" |] |]).Score "corpus BLEU"
        testCase "mismatched lengths and empty input are errors naming the counts" <| fun () ->
            try scoreCorpus defaultOptions [| "a"; "b" |] [| "a" |] None |> ignore; failtest "accepted"
            with :? ArgumentException as e -> Expect.stringContains e.Message "2 predictions and 1 references" "counts"
            Expect.throwsT<ArgumentException> (fun () -> scoreCorpus defaultOptions [||] [||] None |> ignore) "empty"
            Expect.throwsT<ArgumentException> (fun () -> scoreCorpus defaultOptions [| "a" |] [| "a" |] (Some [||]) |> ignore) "documents"
        testCase "the table lists every metric" <| fun () ->
            let table = formatTable (scoreCorpus defaultOptions [| "a b" |] [| "a b" |] (Some [| "a b c" |]))
            for name in [ "rouge1"; "rouge2"; "rougeL"; "rougeLsum"; "bleu"; "compression"; "novel-4gram"; "coverage"; "density" ] do
                Expect.stringContains table name name
    ]

let private realData =
    testList "real data" [
        testWithShared "pyrxsum: all 10 systems score in range, pretrained models beat ptgen" <| fun dir ->
            let root = Path.Combine(dir, "pyrxsum")
            let refs = readLines (Path.Combine(root, "references.txt"))
            let docs = readLines (Path.Combine(root, "documents.txt"))
            Expect.equal refs.Length 100 "100 references"
            let fast = { defaultOptions with Bootstrap = { Bootstrap.defaults with Samples = 100 } }
            for stem in [ false; true ] do
                let reports =
                    pyrxsumSystems
                    |> List.map (fun name ->
                        let preds = readLines (Path.Combine(root, "summaries", name + ".summary"))
                        name, scoreCorpus { fast with Stem = stem } preds refs (Some docs))
                    |> dict
                for KeyValue(name, r) in reports do
                    Expect.equal r.N 100 name
                    for e in [ r.Rouge1; r.Rouge2; r.RougeL; r.RougeLsum ] do
                        for v in [ e.Precision.Mean; e.Recall.Mean; e.F1.Mean ] do
                            Expect.isTrue (v > 0.0 && v < 1.0) (sprintf "%s ROUGE in (0, 1)" name)
                    // One line per example, so no sentence breaks: summary-level LCS equals LCS.
                    close MTol.exact r.RougeLsum.F1.Mean r.RougeL.F1.Mean (name + " Lsum = L on one-line texts")
                    Expect.isTrue (r.Bleu.Score > 0.0 && r.Bleu.Score < 100.0) (sprintf "%s BLEU in (0, 100)" name)
                    Expect.isTrue (r.Rouge1.F1.Low <= r.Rouge1.F1.Mean && r.Rouge1.F1.Mean <= r.Rouge1.F1.High) "interval holds the mean"
                    let d = r.Document.Value
                    Expect.isTrue (d.Compression.Mean > 0.0 && d.Compression.Mean < 0.5) (name + " summaries are much shorter")
                    Expect.isTrue (d.NovelNgrams[0].Mean < d.NovelNgrams[3].Mean) (name + " more novel 4-grams than unigrams")
                for strong in [ "facebook-bart-large"; "google-pegasus" ] do
                    for pick, what in [ (fun (r: ScoreReport) -> r.Rouge1.F1.Mean), "rouge1"; (fun r -> r.Rouge2.F1.Mean), "rouge2"; (fun r -> r.RougeL.F1.Mean), "rougeL"; (fun r -> r.Bleu.Score), "bleu" ] do
                        Expect.isGreaterThan (pick reports[strong]) (pick reports["ptgen"]) (sprintf "%s beats ptgen on %s (stem=%b)" strong what stem)
                Expect.isGreaterThan reports["google-pegasus"].Rouge1.F1.Mean reports["fast-abs-rl"].Rouge1.F1.Mean "pegasus beats fast-abs-rl"
        testWithShared "pyrxsum: every system's ROUGE-1/2/L/Lsum (P, R, F1; stemmed and not) and BLEU match rouge-score and sacreBLEU" <| fun dir ->
            // tests/data/pyrxsum-oracle/scores.json: the oracles' own numbers for these files (how they were made:
            // the README beside it). The issue allows 0.0005 ROUGE and 0.05 BLEU; both agree to float64 round-off.
            let root = Path.Combine(dir, "pyrxsum")
            let refs = readLines (Path.Combine(root, "references.txt"))
            use oracle = JsonDocument.Parse(File.ReadAllText(Path.Combine(repoRoot, "tests", "data", "pyrxsum-oracle", "scores.json")))
            let systems = oracle.RootElement.GetProperty("systems")
            Expect.equal (oracle.RootElement.GetProperty("n").GetInt32()) refs.Length "oracle scored the same examples"
            Expect.equal (systems.EnumerateObject() |> Seq.map (fun p -> p.Name) |> Seq.sort |> List.ofSeq) (List.sort pyrxsumSystems) "every system"
            let noBootstrap = { defaultOptions with Bootstrap = { Bootstrap.defaults with Samples = 1 } }
            let mutable worstRouge, worstBleu = 0.0, 0.0
            for name in pyrxsumSystems do
                let preds = readLines (Path.Combine(root, "summaries", name + ".summary"))
                let expected = systems.GetProperty(name)
                for stem, key in [ false, "unstemmed"; true, "stemmed" ] do
                    let r = scoreCorpus { noBootstrap with Stem = stem } preds refs None
                    for rouge, e in [ "rouge1", r.Rouge1; "rouge2", r.Rouge2; "rougeL", r.RougeL; "rougeLsum", r.RougeLsum ] do
                        for field, ours in [ "precision", e.Precision.Mean; "recall", e.Recall.Mean; "f1", e.F1.Mean ] do
                            let theirs = expected.GetProperty(key).GetProperty(rouge).GetProperty(field).GetDouble()
                            worstRouge <- max worstRouge (abs (ours - theirs))
                            close MTol.rougeScoreOracle ours theirs (sprintf "%s %s %s %s" name key rouge field)
                    let bleu = expected.GetProperty("bleu").GetDouble()
                    worstBleu <- max worstBleu (abs (r.Bleu.Score - bleu))
                    close MTol.sacreBleuOracle r.Bleu.Score bleu (sprintf "%s BLEU" name)
            printfn "pyrxsum vs rouge-score/sacreBLEU: largest ROUGE difference %.2g, largest BLEU difference %.2g" worstRouge worstBleu
        testWithShared "XSum test set (11334 examples): stemmed ROUGE within 0.5 points of the XSum paper's ROUGE-1.5.5 numbers" <| fun dir ->
            // Narayan, Cohen & Lapata 2018 (EMNLP, "Don't Give Me the Details, Just the Summary!"), automatic
            // evaluation on the XSum test set, ROUGE-1/2/L F1 from ROUGE-1.5.5, for the outputs the authors
            // released (EdinburghNLP/XSum xsum-model-predictions.tar.gz). rouge-score reimplements ROUGE-1.5.5 -m
            // with its own tokenizer, so agreement is close but not exact.
            let root = Path.Combine(dir, "xsum-test-full-edinburgh")
            let refs = readLines (Path.Combine(root, "gold-test-sentences.txt"))
            Expect.equal refs.Length 11334 "full test set"
            let published = [ "lead", (16.30, 1.60, 11.95); "ext-oracle", (29.79, 8.81, 22.66); "ptgen", (29.70, 9.21, 23.24); "topic-convs2s", (31.89, 11.54, 25.75) ]
            let ours =
                [ for name, (r1, r2, rl) in published do
                    let preds = readLines (Path.Combine(root, name + "-test-output.txt"))
                    let scores = Array.map2 (Rouge.scoreAll true) refs preds
                    let mean f = 100.0 * (scores |> Array.averageBy f)
                    let m1, m2, ml = mean (fun s -> s.Rouge1.F1), mean (fun s -> s.Rouge2.F1), mean (fun s -> s.RougeL.F1)
                    close MTol.rouge155Points m1 r1 (name + " ROUGE-1")
                    close MTol.rouge155Points m2 r2 (name + " ROUGE-2")
                    close MTol.rouge155Points ml rl (name + " ROUGE-L")
                    name, m1 ]
            Expect.equal (ours |> List.sortBy snd |> List.map fst) (published |> List.sortBy (fun (_, (r1, _, _)) -> r1) |> List.map fst) "same ROUGE-1 ranking"
    ]

let private humanEval =
    let docs = Array.init 12 (fun i -> sprintf "Document %d, with \"quotes\", commas and text." i)
    let refs = Array.init 12 (fun i -> sprintf "Reference %d." i)
    let systems : HumanEval.SystemOutputs[] =
        [| { Name = "alpha"; Summaries = Array.init 12 (sprintf "alpha says %d") }
           { Name = "beta"; Summaries = Array.init 12 (sprintf "beta says %d") }
           { Name = "gamma"; Summaries = Array.init 12 (sprintf "gamma says %d") } |]
    let fill (csv: string) (rate: int -> string[] -> string list) =
        let rows = HumanEval.Csv.parse "sheet" csv
        let _, header = rows[0]
        let sb = StringBuilder(HumanEval.Csv.row header)
        rows[1..] |> Array.iteri (fun i (_, f) -> sb.Append(HumanEval.Csv.row (Array.append f[.. f.Length - 5] (Array.ofList (rate i f))))|> ignore)
        sb.ToString()
    testList "HumanEval" [
        testCase "sampling is seeded, distinct, and shuffles system order per example" <| fun () ->
            let cfg = { HumanEval.defaults with Examples = 5; Seed = 3 }
            let a = HumanEval.sample cfg docs refs systems
            Expect.equal a (HumanEval.sample cfg docs refs systems) "same seed, same sheet"
            Expect.notEqual a (HumanEval.sample { cfg with Seed = 4 } docs refs systems) "another seed, another sheet"
            Expect.equal a.Length 15 "5 examples x 3 systems"
            Expect.equal (a |> Array.map _.Example |> Array.distinct |> Array.length) 5 "distinct examples"
            for it in a do
                Expect.stringContains it.Summary it.System "summary belongs to its system"
                Expect.equal it.Document docs[it.Example - 1] "document of the line"
            let orders = a |> Array.groupBy _.Example |> Array.map (fun (_, its) -> its |> Array.map _.System |> String.concat ",") |> Array.distinct
            Expect.isGreaterThan orders.Length 1 "system order varies across examples"
        testCase "bad inputs are all reported" <| fun () ->
            let problems = HumanEval.validate { HumanEval.defaults with Examples = 50 } docs refs[..3] (Array.append systems [| systems[0] |])
            Expect.equal problems.Length 3 "references, duplicate name, too many examples"
        testCase "sheets round-trip through CSV and the key; summaries aggregate per system" <| fun () ->
            let cfg = { HumanEval.defaults with Examples = 4; Seed = 1 }
            let items = HumanEval.sample cfg docs refs systems
            use tmp = new TempDir("moe-he")
            let dir = tmp.Path
            let files = HumanEval.writeSheets cfg dir items
            Expect.stringContains (File.ReadAllText files.Markdown) "## Example" "markdown sheet"
            let csv = File.ReadAllText files.Csv
            let rows = HumanEval.Csv.parse files.Csv csv
            let _, firstRow = rows[1]
            Expect.equal firstRow[2] items[0].Document "quoted document survives"
            Expect.isFalse (csv.Contains "alpha,") "blind sheet hides system names"
            // Rate alpha 5 everywhere, others 1..4 by row.
            let key = HumanEval.readKey files.Key.Value
            let filled = fill csv (fun i f -> if key[f[0]] = "alpha" then [ "5"; "5"; "5"; "5" ] else [ string (1 + i % 4); ""; "3"; "2" ])
            let filledPath = Path.Combine(dir, "filled.csv")
            File.WriteAllText(filledPath, filled)
            let summary = HumanEval.readRatings (Some key) [ filledPath ] |> HumanEval.summarize
            let alpha = summary |> Array.filter (fun s -> s.System = "alpha")
            Expect.equal alpha.Length 4 "all criteria"
            for s in alpha do
                Expect.equal (s.Mean, s.Std, s.Count) (5.0, 0.0, 4) s.Criterion
            Expect.isFalse (summary |> Array.exists (fun s -> s.System <> "alpha" && s.Criterion = "coherence")) "empty cells are unrated"
        testCase "ratings outside 1-5 are rejected with file:line, all at once" <| fun () ->
            let cfg = { HumanEval.defaults with Examples = 2; Seed = 1; Blind = false }
            let items = HumanEval.sample cfg docs refs systems
            let csv = HumanEval.sheetCsv false items
            let filled = fill csv (fun i _ -> if i = 0 then [ "6"; "3"; "3"; "3" ] elif i = 2 then [ "3"; "0"; "x"; "3.5" ] else [ "3"; "3"; "3"; "3" ])
            let path = tempFile (Encoding.UTF8.GetBytes filled)
            try HumanEval.readRatings None [ path ] |> ignore; failtest "accepted"
            with :? InvalidDataException as e ->
                let lines = e.Message.Split '\n'
                Expect.equal lines.Length 4 "four bad cells"
                Expect.stringContains lines[0] (path + ":2: relevance") "first data row is line 2"
                Expect.stringContains lines[1] (path + ":4: coherence") "third data row is line 4"
        testCase "a blind sheet without its key is an error that says what to give" <| fun () ->
            let items = HumanEval.sample { HumanEval.defaults with Examples = 1 } docs refs systems
            let path = tempFile (Encoding.UTF8.GetBytes(HumanEval.sheetCsv true items))
            try HumanEval.readRatings None [ path ] |> ignore; failtest "accepted"
            with :? InvalidDataException as e -> Expect.stringContains e.Message "--key" "names the option"
        testCase "CSV: quotes, commas and line breaks; unterminated quote names its line" <| fun () ->
            let text = HumanEval.Csv.row [ "a,b"; "say \"hi\""; "two\nlines"; " pad" ] + HumanEval.Csv.row [ "x" ]
            let rows = HumanEval.Csv.parse "t" text
            Expect.equal rows [| 1, [| "a,b"; "say \"hi\""; "two\nlines"; " pad" |]; 3, [| "x" |] |] "round trip with line numbers"
            Expect.throwsT<InvalidDataException> (fun () -> HumanEval.Csv.parse "t" "a\n\"open,b\n" |> ignore) "unterminated"
    ]

let tests =
    testList "Metrics" [ pyText; files; porter; rougeTests; bleuTests; abstractiveness; bootstrap; bertScore; consistency; corpus; realData; humanEval ]
