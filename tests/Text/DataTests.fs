module Moe.Tests.DataTests

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.RegularExpressions
open Expecto
open FsCheck.FSharp
open TorchSharp
open Moe
open Moe.Data
open Moe.DataInspection
open Moe.TextTools
open Moe.Tokenizers
open Moe.Batching
open Moe.Tests.Support

// ---------------------------------------------------------------- helpers

/// A fresh folder for one test, removed afterwards.
let private withTemp (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), "moe-data-" + Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    try body dir
    finally Directory.Delete(dir, true)

let private write (dir: string) (name: string) (text: string) =
    let p = Path.Combine(dir, name)
    File.WriteAllText(p, text, UTF8Encoding(false))
    p

let private writeBytes (dir: string) (name: string) (bytes: byte[]) =
    let p = Path.Combine(dir, name)
    File.WriteAllBytes(p, bytes)
    p

/// Runs `f`, expects a DataException and returns its message.
let private dataError (f: unit -> 'a) : string =
    try
        f () |> ignore
        failtest "expected a DataException"
    with :? DataException as e -> e.Message

let private cfg = DataConfig.defaults

/// Lowercased alphanumeric words.
let private words (s: string) =
    Regex.Matches(s.ToLowerInvariant(), "[a-z0-9]+") |> Seq.map (fun m -> m.Value) |> Array.ofSeq

/// Unigram F1 of `candidate` against `reference` (clipped counts), written here independently of any
/// library metric.
let private unigramF1 (candidate: string) (reference: string) =
    let c, r = words candidate, words reference
    let counts (xs: string[]) = xs |> Array.countBy id |> dict
    let rc = counts r
    let overlap = counts c |> Seq.sumBy (fun kv -> match rc.TryGetValue kv.Key with | true, n -> min n kv.Value | _ -> 0)
    if overlap = 0 then 0.0
    else
        let p = float overlap / float c.Length
        let q = float overlap / float r.Length
        2.0 * p * q / (p + q)

let private sentences (doc: string) = Regex.Split(doc, @"(?<=[.!?]) (?=[A-Z0-9])")

/// Lines of a file split on \n, keeping a last line without newline (the shared README's rule).
let private linesOf (path: string) =
    let t = File.ReadAllText path
    let parts = t.Split '\n'
    if t.EndsWith "\n" then parts[.. parts.Length - 2] else parts

// One cl100k instance for the whole list: loading its ranks takes a moment.
let private cl100k = lazy (Tokenizers.cl100k ())

// ---------------------------------------------------------------- GPT-2 reference BPE (oracle)

/// GPT-2 byte-level BPE written from the algorithm of openai/gpt-2 encoder.py, independently of
/// Microsoft.ML.Tokenizers, to check the library configuration against.
let private referenceGpt2 (encoderJson: string) (vocabBpe: string) : string -> int[] =
    let encoder =
        use doc = Text.Json.JsonDocument.Parse(File.ReadAllText encoderJson)
        doc.RootElement.EnumerateObject() |> Seq.map (fun p -> p.Name, p.Value.GetInt32()) |> dict
    let ranks = Dictionary<struct (string * string), int>()
    File.ReadAllText(vocabBpe).Split('\n')
    |> Array.skip 1
    |> Array.filter (fun l -> l <> "")
    |> Array.iteri (fun i l ->
        let parts = l.Split ' '
        ranks[struct (parts[0], parts[1])] <- i)
    // bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    let byteChar =
        let printable = [ yield! [ 33 .. 126 ]; yield! [ 161 .. 172 ]; yield! [ 174 .. 255 ] ] |> set
        let mutable extra = 0
        Array.init 256 (fun b ->
            if printable.Contains b then char b
            else
                let c = char (256 + extra)
                extra <- extra + 1
                c)
    let rx = Regex(Tokenizers.gpt2Pattern)
    let bpe (token: string) =
        let mutable parts = token |> Seq.map string |> List.ofSeq
        let mutable go = parts.Length > 1
        while go do
            let pairs = List.pairwise parts
            let best =
                pairs |> List.choose (fun (a, b) -> match ranks.TryGetValue(struct (a, b)) with | true, r -> Some(r, (a, b)) | _ -> None)
            match best with
            | [] -> go <- false
            | _ ->
                let _, (a, b) = List.minBy fst best
                let rec merge xs =
                    match xs with
                    | x :: y :: rest when x = a && y = b -> (x + y) :: merge rest
                    | x :: rest -> x :: merge rest
                    | [] -> []
                parts <- merge parts
                go <- parts.Length > 1
        parts
    fun text ->
        [| for m in rx.Matches text do
             let mapped = Encoding.UTF8.GetBytes m.Value |> Array.map (fun b -> byteChar[int b]) |> String
             for piece in bpe mapped -> encoder[piece] |]

// ---------------------------------------------------------------- a hand-built SentencePiece model

/// A minimal unigram SentencePiece ModelProto (google/sentencepiece sentencepiece_model.proto) written
/// field by field: <unk>, <s>, </s>, whole words and single letters. It is not a trained model; it only
/// exercises loading and the encode/decode path.
let private tinySentencePiece (path: string) =
    let open' (f: Google.Protobuf.CodedOutputStream -> unit) =
        use ms = new MemoryStream()
        let c = new Google.Protobuf.CodedOutputStream(ms)
        f c
        c.Flush()
        Google.Protobuf.ByteString.CopyFrom(ms.ToArray())
    let wt = Google.Protobuf.WireFormat.WireType.LengthDelimited
    let pieces =
        [ "<unk>", 0.0f, 2; "<s>", 0.0f, 3; "</s>", 0.0f, 3 ]
        @ ([ "▁the"; "▁cat"; "▁sat"; "▁on"; "▁mat"; "▁"; "t"; "h"; "e"; "c"; "a"; "s"; "o"; "n"; "m" ]
           |> List.mapi (fun i w -> w, -(float32 i) - 1.0f, 1))
    let model =
        open' (fun o ->
            for piece, score, kind in pieces do
                o.WriteTag(1, wt)
                o.WriteBytes(open' (fun c ->
                    c.WriteTag(1, wt); c.WriteString piece
                    c.WriteTag(2, Google.Protobuf.WireFormat.WireType.Fixed32); c.WriteFloat score
                    c.WriteTag(3, Google.Protobuf.WireFormat.WireType.Varint); c.WriteInt32 kind))
            o.WriteTag(2, wt)
            o.WriteBytes(open' (fun c ->
                let varint (field: int) (v: int) =
                    c.WriteTag(field, Google.Protobuf.WireFormat.WireType.Varint)
                    c.WriteInt32 v
                varint 3 1 // model_type UNIGRAM
                varint 4 pieces.Length
                varint 40 0 // unk_id
                varint 41 1 // bos_id
                varint 42 2 // eos_id
                varint 43 -1)) // pad_id
            o.WriteTag(3, wt)
            o.WriteBytes(open' (fun c ->
                c.WriteTag(1, wt); c.WriteString "identity"
                for field in [ 3; 4; 5 ] do // add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces
                    c.WriteTag(field, Google.Protobuf.WireFormat.WireType.Varint)
                    c.WriteBool true)))
    File.WriteAllBytes(path, model.ToByteArray())

// ---------------------------------------------------------------- loaders on the real samples

let private loaderTests =
    testList "loaders" [
        testWithShared "aligned lines: PyrXSum, last line without newline kept, ids from ids.txt" <| fun shared ->
            let dir = Path.Combine(shared, "pyrxsum")
            let d = Data.load cfg dir
            Expect.equal d.Report.Format (Some AlignedLines) "detected from documents.txt + references.txt"
            Expect.equal d.Examples.Length 100 "100 examples"
            let ids = linesOf (Path.Combine(dir, "ids.txt"))
            Expect.equal (d.Examples |> Array.map (fun e -> e.Id)) ids "ids in order"
            let lastRef = (linesOf (Path.Combine(dir, "references.txt")))[99]
            Expect.equal d.Examples[99].Summary (lastRef.Trim()) "the unterminated last line is example 100"
            Expect.isTrue (d.Examples |> Array.forall (fun e -> e.Document <> "" && e.Summary <> "")) "nothing empty"

        testWithShared "aligned lines: REALSumm <t> tags become one sentence per line" <| fun shared ->
            let d = Data.load cfg (Path.Combine(shared, "realsumm"))
            Expect.equal d.Examples.Length 100 "100 examples"
            Expect.equal d.Report.SentenceTagsStripped 100 "every reference was tagged"
            for e in d.Examples do
                Expect.isFalse (e.Summary.Contains "<t>" || e.Summary.Contains "</t>") "no tags left"
            Expect.isTrue (d.Examples |> Array.exists (fun e -> e.Summary.Contains '\n')) "sentences split by newlines"
            let raw = { cfg with StripSentenceTags = false }
            Expect.stringContains (Data.load raw (Path.Combine(shared, "realsumm"))).Examples[0].Summary "<t>" "kept when asked"

        testWithShared "aligned lines: X.source beside X.target, trailing newline is not an extra example" <| fun shared ->
            for split in [ "train"; "val"; "test" ] do
                let d = Data.load cfg (Path.Combine(shared, "xsum-raw-sample", "hf-dummy-1.1.0-preprocessed", split + ".source"))
                Expect.equal d.Examples.Length 1 (split + ": one line with a trailing newline is one example")

        testWithShared "XSum release: a split of the split file; FIRST-SENTENCE is the summary" <| fun shared ->
            let d = Data.load { cfg with Split = Some "test" } (Path.Combine(shared, "xsum-raw-sample"))
            Expect.equal d.Report.Format (Some XsumRaw) "detected from bbc-summary-data/"
            Expect.equal (d.Examples |> Array.map (fun e -> e.Id, e.Document, e.Summary)) [| "29750031", "some-body", "some-sentence" |] "the placeholder article"
            Expect.equal (Data.load { cfg with Split = Some "valid" } (Path.Combine(shared, "xsum-raw-sample"))).Examples.Length 1 "valid is validation"

        testWithShared "XSum release: every file without a split; the real article's mojibake is repaired and counted" <| fun shared ->
            let dir = Path.Combine(shared, "xsum-raw-sample", "bbc-summary-data")
            let d = Data.load cfg dir
            Expect.equal (d.Examples |> Array.map (fun e -> e.Id)) [| "10000983"; "29750031" |] "both files, sorted"
            let nhs = d.Examples[0]
            Expect.stringStarts nhs.Summary "It's being called \"evil\"" "FIRST-SENTENCE"
            Expect.stringStarts nhs.Document "Well, it's how the idea" "RESTBODY"
            Expect.stringContains nhs.Document "$10,000 (£6,076)" "Â£ repaired to £"
            Expect.equal d.Report.MojibakeRepaired 1 "counted"
            let raw = Data.load { cfg with RepairMojibake = false } dir
            Expect.stringContains raw.Examples[0].Document "(Â£6,076)" "left alone when asked"

        testWithShared "XSum release: split ids without files fail, or are skipped and counted" <| fun shared ->
            let split = Path.Combine(shared, "xsum-raw-sample", "full-split", XsumSplitFileName)
            let dir = Path.Combine(shared, "xsum-raw-sample", "bbc-summary-data")
            let c = { cfg with Split = Some "test"; SummaryDir = Some dir }
            let msg = dataError (fun () -> Data.load c split)
            Expect.stringContains msg "11334 of 11334 ids in split \"test\" have no .summary file" "names the count and split"
            Expect.stringContains msg "--allow-missing" "says how to go on"
            let d = Data.load { c with AllowMissingFiles = true } split
            Expect.equal d.Report.SkippedMissingFile 11334 "counted"
            Expect.isEmpty d.Examples "nothing made up"
            let ids = readXsumSplit split "train"
            Expect.equal ids.Length 204045 "the real train split lists 204045 ids"

        testWithShared "SAMSum JSON: CRLF turns become LF, emoji survive" <| fun shared ->
            let all =
                [ for f in [ "train"; "val"; "test" ] -> Data.load cfg (Path.Combine(shared, "samsum-sample", f + ".json")) ]
            for d in all do
                Expect.equal d.Report.Format (Some SamsumJson) "a JSON array"
                Expect.equal d.Examples.Length 5 "5 dialogues per file"
            let examples = all |> List.collect (fun d -> List.ofArray d.Examples)
            Expect.isTrue (examples |> List.forall (fun e -> not (e.Document.Contains '\r'))) "no CR left"
            Expect.isTrue (examples |> List.forall (fun e -> e.Document.Contains '\n')) "turns on separate lines"
            Expect.isTrue (examples |> List.exists (fun e -> e.Id = "13862856")) "the LF-only dialogue is there"
            Expect.isTrue (examples |> List.exists (fun e -> e.Document |> Seq.exists Char.IsSurrogate)) "emoji kept"

        testWithShared "CSV: CNN/DailyMail id,article,highlights with multi-line highlights" <| fun shared ->
            let d = Data.load cfg (Path.Combine(shared, "cnndm-sample", "train_sample.csv"))
            Expect.equal d.Examples.Length 100 "100 rows"
            Expect.equal d.Examples[0].Id "0001d1afc246a7964130f43ae940af6bc6c57f01" "first id"
            Expect.isTrue (d.Examples |> Array.forall (fun e -> Regex.IsMatch(e.Id, "^[0-9a-f]{40}$"))) "SHA1 ids"
            Expect.equal (d.Examples |> Array.filter (fun e -> e.Summary.Contains '\n') |> Array.length) 94 "94 multi-line highlights"

        testCase "parquet: Hugging Face XSum columns, a null document skipped and counted" <| fun () ->
            withTemp (fun dir ->
                let path = Path.Combine(dir, "xsum.parquet")
                let fields = [| Parquet.Schema.DataField("document", typeof<string>); Parquet.Schema.DataField("summary", typeof<string>)
                                Parquet.Schema.DataField("id", typeof<string>) |]
                do
                    use fs = File.Create path
                    let w = Parquet.ParquetWriter.CreateAsync(Parquet.Schema.ParquetSchema(fields |> Array.map (fun f -> f :> Parquet.Schema.Field)), fs).GetAwaiter().GetResult()
                    let g = w.CreateRowGroup()
                    let col (f: Parquet.Schema.DataField) (values: string[]) =
                        g.WriteAsync(f, (values :> IReadOnlyCollection<string>), Nullable()).GetAwaiter().GetResult()
                    col fields[0] [| "First article text."; null; "Third article, £5." |]
                    col fields[1] [| "One."; "Two."; "Three." |]
                    col fields[2] [| "a1"; "a2"; "a3" |]
                    g.Dispose()
                    w.DisposeAsync().AsTask().GetAwaiter().GetResult()
                let d = Data.load cfg path
                Expect.equal d.Report.Format (Some Parquet) "by extension"
                Expect.equal (d.Examples |> Array.map (fun e -> e.Id, e.Document, e.Summary))
                    [| "a1", "First article text.", "One."; "a3", "Third article, £5.", "Three." |] "rows in order"
                Expect.equal d.Report.SkippedEmptyDocument 1 "the null cell counted"
                let msg = dataError (fun () -> Data.load { cfg with SummaryColumn = Some "highlights" } path)
                Expect.stringContains msg "expected a column \"highlights\" (columns: document, summary, id)" "lists the columns"
                let notParquet = write dir "fake.parquet" "not parquet"
                Expect.stringContains (dataError (fun () -> Data.load cfg notParquet)) "expected a parquet file" "says what it expected")

        testCase "JSON Lines: fields, labels and configurable names" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "d.jsonl" "{\"id\": \"x1\", \"text\": \"Doc one.\", \"headline\": \"Sum one.\", \"topic\": \"sport\"}\n{\"id\": 7, \"text\": \"Doc two.\", \"headline\": \"Sum two.\", \"topic\": \"science\"}\n"
                let c = { cfg with DocumentColumn = Some "text"; SummaryColumn = Some "headline"; LabelColumn = Some "topic" }
                let d = Data.load c p
                Expect.equal d.Examples
                    [| { Id = "x1"; Document = "Doc one."; Summary = "Sum one."; Label = Some "sport" }
                       { Id = "7"; Document = "Doc two."; Summary = "Sum two."; Label = Some "science" } |] "both lines"
                let msg = dataError (fun () -> Data.load cfg p)
                Expect.stringContains msg "d.jsonl:1: expected a field \"document\" (fields: id, text, headline, topic)" "missing field, with line") ]

// ---------------------------------------------------------------- bad input

let private badInputTests =
    testList "bad input" [
        testCase "missing file or folder" <| fun () ->
            let msg = dataError (fun () -> Data.load cfg "/nonexistent/data.jsonl")
            Expect.equal msg "/nonexistent/data.jsonl: file or folder not found" "names the path"

        testCase "missing CSV column names the columns found and the flag" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "d.csv" "id,story,highlights\n1,a,b\n"
                let msg = dataError (fun () -> Data.load cfg p)
                Expect.stringContains msg "expected a column \"article\" (columns: id, story, highlights); choose another with --document-column" "clear")

        testCase "an explicitly named id column must exist; the default one may be absent (noted)" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "d.csv" "article,highlights\nA doc.,A sum.\n"
                let d = Data.load cfg p
                Expect.equal d.Examples[0].Id "1" "row number"
                Expect.isTrue (d.Report.Notes |> List.exists (fun n -> n.Contains "ids are row numbers")) "noted"
                Expect.stringContains (dataError (fun () -> Data.load { cfg with IdColumn = Some "id" } p)) "expected a column \"id\"" "required when named")

        testCase "malformed JSON line reports file and line" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "d.jsonl" "{\"id\":\"1\",\"document\":\"d\",\"summary\":\"s\"}\n{\"id\":\"2\",\"document\":\"d\",\"summary\":\"s\"}\n{\"id\":\"3\",\"document\":\"d\" \"summary\":\"s\"}\n"
                let msg = dataError (fun () -> Data.load cfg p)
                Expect.stringStarts msg (p + ":3: malformed JSON line") "file:line"
                let notObject = write dir "e.jsonl" "[1, 2]\n"
                Expect.stringContains (dataError (fun () -> Data.load cfg notObject)) "e.jsonl:1: expected a JSON object, got a JSON Array" "not an object")

        testCase "malformed CSV reports the record's line" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "d.csv" "id,article,highlights\n1,\"multi\nline\",h\n2,\"bad\"quote,z\n"
                let msg = dataError (fun () -> Data.load cfg p)
                Expect.stringStarts msg (p + ":4: malformed CSV") "line 4, after a two-line record"
                let extra = write dir "e.csv" "id,article,highlights\n1,a,b\n2,a,b,c\n"
                Expect.stringContains (dataError (fun () -> Data.load cfg extra)) "has 4 fields but 3 were expected" "field count")

        testCase "invalid UTF-8 is reported with file, line and byte" <| fun () ->
            withTemp (fun dir ->
                let bytes = Array.concat [ "{\"id\":\"1\",\"document\":\"ok\",\"summary\":\"ok\"}\n{\"id\":\"2\",\"document\":\"caf"B; [| 0xE9uy |]; "\",\"summary\":\"s\"}\n"B ]
                let p = writeBytes dir "d.jsonl" bytes
                let msg = dataError (fun () -> Data.load cfg p)
                Expect.equal msg (p + ":2: invalid UTF-8 at byte 26 of the line (0xE9 0x22 0x2C 0x22); expected UTF-8 text") "exact place"
                let csv = writeBytes dir "d.csv" (Array.concat [ "id,article,highlights\n1,ok,ok\n2,caf"B; [| 0xFFuy |]; ",s\n"B ])
                Expect.stringContains (dataError (fun () -> Data.load cfg csv)) "d.csv:3: invalid UTF-8 in column \"article\"" "CSV too"
                let lines = writeBytes dir "documents.txt" (Array.concat [ "fine\nbad "B; [| 0xC3uy; 0x28uy |]; "\n"B ])
                write dir "references.txt" "a\nb\n" |> ignore
                Expect.stringContains (dataError (fun () -> Data.load cfg dir)) "documents.txt:2: invalid UTF-8 at byte 5" "line files too")

        testCase "empty document or summary: skipped and counted by default, or an error naming the example" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "d.jsonl" "{\"id\":\"1\",\"document\":\"d\",\"summary\":\"s\"}\n{\"id\":\"2\",\"document\":\"   \",\"summary\":\"s\"}\n{\"id\":\"3\",\"document\":\"d\",\"summary\":null}\n"
                let d = Data.load cfg p
                Expect.equal (d.Examples |> Array.map (fun e -> e.Id)) [| "1" |] "only the complete example"
                Expect.equal (d.Report.SkippedEmptyDocument, d.Report.SkippedEmptySummary) (1, 1) "both counted"
                let msg = dataError (fun () -> Data.load { cfg with OnEmpty = FailOnEmpty } p)
                Expect.equal msg (p + ":2: empty document in example \"2\" (skip such examples with OnEmpty = SkipEmpty / --on-empty skip)") "fails with place")

        testCase "long documents are truncated at a word boundary and counted" <| fun () ->
            withTemp (fun dir ->
                let long = String.Join(" ", Array.replicate 40 "word")
                let p = write dir "d.jsonl" (sprintf "{\"id\":\"1\",\"document\":\"%s\",\"summary\":\"s\"}\n{\"id\":\"2\",\"document\":\"short\",\"summary\":\"s\"}\n" long)
                let d = Data.load { cfg with MaxDocumentChars = 52 } p
                Expect.equal d.Report.TruncatedDocuments 1 "one truncated"
                Expect.equal d.Examples[0].Document (String.Join(" ", Array.replicate 10 "word")) "cut after a whole word"
                Expect.equal d.Examples[1].Document "short" "short one untouched")

        testCase "aligned files of different lengths" <| fun () ->
            withTemp (fun dir ->
                write dir "documents.txt" "d1\nd2\nd3" |> ignore
                write dir "references.txt" "r1\nr2\n" |> ignore
                let msg = dataError (fun () -> Data.load cfg dir)
                Expect.stringContains msg "references end before document line 3" "names the line"
                write dir "ids.txt" "a\nb" |> ignore
                write dir "references.txt" "r1\nr2\nr3\n" |> ignore
                Expect.stringContains (dataError (fun () -> Data.load cfg dir)) "ids end before line 3" "ids too")

        testCase "an XSum .summary file without RESTBODY" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "123.summary" "[SN]URL[SN]\nhttp://x\n\n[SN]FIRST-SENTENCE[SN]\nA summary.\n"
                let msg = dataError (fun () -> Data.load cfg p)
                Expect.equal msg (p + ": expected a [SN]RESTBODY[SN] section (found: [SN]URL[SN], [SN]FIRST-SENTENCE[SN])") "names the section")

        testCase "unknown formats ask for --format" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "d.xml" "<a/>"
                Expect.stringContains (dataError (fun () -> Data.load cfg p)) "cannot tell the format from the extension \".xml\"; pass --format parquet|jsonl|csv|samsum|xsum-raw|lines" "lists formats"
                Expect.stringContains (dataError (fun () -> Data.load cfg dir)) "cannot tell the format of this folder" "folders too"
                Expect.equal (Format.parse "xml") (Error "expected a format parquet|jsonl|csv|samsum|xsum-raw|lines, got \"xml\"") "parse")

        testCase "config validation returns every problem" <| fun () ->
            let problems =
                DataConfig.validate { cfg with MaxDocumentChars = 0; DocumentColumn = Some "x"; SummaryColumn = Some "x"; Split = Some "dev2" }
            Expect.equal problems
                [ "MaxDocumentChars must be >= 1, got 0"
                  "DocumentColumn and SummaryColumn must differ, both are \"x\""
                  "Split must be train|validation|test, got \"dev2\"" ] "all three"
            Expect.isEmpty (DataConfig.validate DataConfig.defaults) "defaults are valid"

        testCase "text that was already lossy (U+FFFD) is counted" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "d.jsonl" "{\"id\":\"1\",\"document\":\"caf\uFFFD au lait\",\"summary\":\"s\"}\n"
                let d = Data.load cfg p
                Expect.equal d.Report.ReplacementCharacters 1 "counted"
                Expect.isTrue (d.Report.Notes |> List.exists (fun n -> n.Contains "U+FFFD")) "noted")

        testCase "duplicate ids are counted and noted" <| fun () ->
            withTemp (fun dir ->
                let p = write dir "d.jsonl" "{\"id\":\"1\",\"document\":\"d\",\"summary\":\"s\"}\n{\"id\":\"1\",\"document\":\"e\",\"summary\":\"t\"}\n"
                let i = inspect cfg p
                Expect.equal i.Report.DuplicateIds 1 "one duplicate"
                Expect.isTrue (i.Problems |> List.exists (fun s -> s.StartsWith "1 duplicate ids (first: 1")) "in the problems") ]

// ---------------------------------------------------------------- text helpers and inspect

let private textTests =
    testList "text" [
        testCase "readLines: the shared README's newline rules, CRLF and BOM" <| fun () ->
            withTemp (fun dir ->
                let lines (text: byte[]) = TextTools.readLines (writeBytes dir "x.txt" text) |> Seq.map snd |> List.ofSeq
                Expect.equal (lines "a\nb"B) [ "a"; "b" ] "last line without newline kept"
                Expect.equal (lines "a\nb\n"B) [ "a"; "b" ] "final newline ends, not starts, a line"
                Expect.equal (lines "a\n\n"B) [ "a"; "" ] "an empty last line is a line"
                Expect.equal (lines ""B) [] "empty file"
                Expect.equal (lines "a\r\nb\r\n"B) [ "a"; "b" ] "CRLF"
                Expect.equal (lines (Array.append [| 0xEFuy; 0xBBuy; 0xBFuy |] "a\nb"B)) [ "a"; "b" ] "BOM dropped"
                let big = String.replicate 70000 "x"
                Expect.equal (lines (Encoding.UTF8.GetBytes(big + "\nz"))) [ big; "z" ] "a line longer than the read buffer")

        testCase "mojibake repair undoes UTF-8 read as Windows-1252, and leaves real text alone" <| fun () ->
            Expect.equal (TextTools.repairMojibake "cost Â£5") ("cost £5", true) "pound"
            Expect.equal (TextTools.repairMojibake "it wasnâ€™t") ("it wasn’t", true) "curly apostrophe via cp1252"
            Expect.equal (TextTools.repairMojibake "ðŸ˜ˆ") ("😈", true) "4-byte emoji"
            Expect.equal (TextTools.repairMojibake "São Paulo, café, Motörhead") ("São Paulo, café, Motörhead", false) "real accents"

        testCase "percentiles are nearest-rank" <| fun () ->
            let p = percentiles [| 1 .. 100 |]
            Expect.equal (p.P50, p.P90, p.P99, p.Max) (50, 90, 99, 100) "1..100"
            Expect.equal (percentiles [||]) { P50 = 0; P90 = 0; P99 = 0; Max = 0 } "empty"

        testWithShared "inspect: counts, word percentiles, problems" <| fun shared ->
            let i = inspect cfg (Path.Combine(shared, "xsum-raw-sample", "hf-dummy-1.1.0-preprocessed", "train.source"))
            Expect.equal i.Count 1 "one example"
            Expect.equal i.DocumentWords.Max 13 "13 words"
            Expect.contains i.Problems "1 summaries are longer than their document" "the dummy pair looks swapped"
            let text = formatInspection i
            Expect.stringContains text "document          13      13      13      13" "table row"
            Expect.stringContains text "problems:" "problems printed" ]

// ---------------------------------------------------------------- tokenizers

let private tokenizerTests =
    testList "tokenizers" [
        testWithShared "GPT-2 BPE: known encodings" <| fun shared ->
            let dir = Path.Combine(shared, "gpt2-bpe")
            let enc = Tokenizers.gpt2 (Path.Combine(dir, "encoder.json")) (Path.Combine(dir, "vocab.bpe"))
            Expect.equal enc.Size 50257 "vocabulary"
            Expect.equal (enc.Encode "Hello world") [| 15496; 995 |] "Hello world"
            Expect.equal (enc.Encode " Hello world") [| 18435; 995 |] "leading space"

        testWithShared "GPT-2 BPE equals an independent reference implementation on real articles, and round-trips" <| fun shared ->
            let dir = Path.Combine(shared, "gpt2-bpe")
            let encoderJson, vocabBpe = Path.Combine(dir, "encoder.json"), Path.Combine(dir, "vocab.bpe")
            let enc = Tokenizers.gpt2 encoderJson vocabBpe
            let reference = referenceGpt2 encoderJson vocabBpe
            let texts =
                [ yield! linesOf (Path.Combine(shared, "pyrxsum", "documents.txt")) |> Array.take 5
                  yield (File.ReadAllText(Path.Combine(shared, "samsum-sample", "test.json"))).Substring(0, 2000)
                  yield "It's 42 £6,076 — naïve\r\n  x  😀" ]
            for t in texts do
                let ids = enc.Encode t
                Expect.equal ids (reference t) "same ids as the reference BPE"
                Expect.equal (enc.Decode ids) t "decode inverts encode"

        testCase "cl100k_base: known encoding and round trip" <| fun () ->
            let enc = cl100k.Force()
            Expect.equal (enc.Encode "Hello world") [| 9906; 1917 |] "Hello world"
            let t = "Hannah: Hey 😀\nAmanda: £6,076 — naïve"
            Expect.equal (enc.Decode(enc.Encode t)) t "round trip"

        testCase "trimmed vocabulary: seen ids plus four specials, unseen text becomes unk" <| fun () ->
            let training = [ "the storm hit the coast"; "the team won the match" ]
            let tok = Tokenizers.train TokenizerConfig.defaults training
            let t = tok :> ITokenizer
            let distinct = training |> Seq.collect (cl100k.Force().Encode) |> Seq.distinct |> Seq.length
            Expect.equal t.VocabSize (SpecialCount + distinct) "specials + seen ids"
            Expect.equal t.Specials { Pad = 0; Bos = 1; Eos = 2; Unk = 3 } "specials first"
            let ids = t.Encode "the team hit the coast"
            Expect.isTrue (ids |> Array.forall (fun i -> i >= SpecialCount && i < t.VocabSize)) "all seen"
            Expect.equal (t.Decode ids) "the team hit the coast" "round trip"
            let unseen = t.Encode "the zebra"
            Expect.contains unseen t.Specials.Unk "unk for an unseen word"
            Expect.equal (t.Decode unseen) ("the" + String.replicate (unseen.Length - 1) UnkText) "unk written out"
            Expect.equal (t.Decode(Array.concat [ [| 1 |]; ids; [| 2; 0; 0 |] ])) "the team hit the coast" "bos/eos/pad dropped"
            Expect.throwsT<ArgumentException> (fun () -> t.Decode [| t.VocabSize |] |> ignore) "out of range"

        testCase "MinCount drops rare ids" <| fun () ->
            let tok = Tokenizers.train { TokenizerConfig.defaults with MinCount = 2 } [ "alpha beta"; "alpha gamma" ] :> ITokenizer
            let enc = cl100k.Force()
            let alpha = enc.Encode "alpha" |> Array.distinct
            Expect.equal tok.VocabSize (SpecialCount + alpha.Length) "only alpha was seen twice"
            Expect.equal (tok.Encode "alpha beta") (Array.append (Array.init alpha.Length (fun i -> SpecialCount + i)) (Array.replicate (enc.Encode " beta").Length tok.Specials.Unk)) "beta, seen once, is unk"
            Expect.isEmpty (TokenizerConfig.validate TokenizerConfig.defaults) "defaults valid"
            Expect.equal (TokenizerConfig.validate { TokenizerConfig.defaults with MinCount = 0; Base = SentencePieceModel "/none.model" })
                [ "MinCount must be >= 1, got 0"; "SentencePiece model not found: /none.model" ] "every problem"

        testCase "vocabulary JSON save/load round trip; a changed base is refused" <| fun () ->
            withTemp (fun dir ->
                let tok = Tokenizers.train TokenizerConfig.defaults [ "storm flooded the valley"; "profits rose" ]
                let path = Path.Combine(dir, "vocab.json")
                Tokenizers.save path tok
                let back = Tokenizers.load path
                Expect.equal back.Vocabulary tok.Vocabulary "same mapping"
                for s in [ "profits flooded the valley"; "unseen words here" ] do
                    Expect.equal (back.Encode s) (tok.Encode s) "same ids"
                let json = File.ReadAllText path
                File.WriteAllText(path, json.Replace("\"cl100k_base/", "\"cl100k_base-other/"))
                let e = Expect.throwsC (fun () -> Tokenizers.load path |> ignore) id
                Expect.stringContains e.Message "got one saved for cl100k_base-other/" "names both"
                File.WriteAllText(path, "{ not json")
                let e2 = Expect.throwsC (fun () -> Vocabulary.load path |> ignore) id
                Expect.stringContains e2.Message "expected a vocabulary JSON object, got malformed JSON" "malformed"
                File.WriteAllText(path, json.Replace("\"format\"", "\"fmt\""))
                let e3 = Expect.throwsC (fun () -> Vocabulary.load path |> ignore) id
                Expect.stringContains e3.Message "expected a \"format\" field" "missing field")

        testCase "a full (untrimmed) vocabulary saves without listing ids" <| fun () ->
            withTemp (fun dir ->
                let tok = Tokenizers.train { TokenizerConfig.defaults with Trim = false } []
                Expect.equal (tok :> ITokenizer).VocabSize (SpecialCount + cl100k.Force().Size) "all base ids"
                let path = Path.Combine(dir, "v.json")
                Tokenizers.save path tok
                Expect.isLessThan (FileInfo(path).Length) 2000L "no id list"
                Expect.equal (Tokenizers.load path).Vocabulary tok.Vocabulary "round trip")

        testCase "SentencePiece: missing, empty and invalid model files give clear errors" <| fun () ->
            withTemp (fun dir ->
                let missing = Path.Combine(dir, "none.model")
                let e = Expect.throwsC (fun () -> Tokenizers.sentencePiece missing |> ignore) id
                Expect.stringStarts e.Message "SentencePiece model not found:" "missing"
                let empty = writeBytes dir "empty.model" [||]
                let e2 = Expect.throwsC (fun () -> Tokenizers.sentencePiece empty |> ignore) id
                Expect.stringStarts e2.Message "expected a non-empty SentencePiece model, got an empty file" "empty"
                let junk = write dir "junk.model" "this is not a protobuf"
                let e3 = Expect.throwsC (fun () -> Tokenizers.sentencePiece junk |> ignore) id
                Expect.stringStarts e3.Message "expected a SentencePiece model (ModelProto protobuf, BPE or unigram), could not read" "invalid")

        testCase "SentencePiece: a hand-built unigram model loads, encodes, decodes and trims" <| fun () ->
            withTemp (fun dir ->
                let path = Path.Combine(dir, "tiny.model")
                tinySentencePiece path
                let enc = Tokenizers.sentencePiece path
                Expect.equal enc.Size 18 "3 specials + 15 pieces"
                let ids = enc.Encode "the cat sat on the mat"
                Expect.equal ids [| 3; 4; 5; 6; 3; 7 |] "whole-word pieces"
                Expect.equal (enc.Decode ids) "the cat sat on the mat" "decode"
                let tok = Tokenizers.train { TokenizerConfig.defaults with Base = SentencePieceModel path } [ "the cat sat" ]
                Expect.equal (tok :> ITokenizer).VocabSize (SpecialCount + 3) "three pieces seen"
                Expect.equal ((tok :> ITokenizer).Decode(tok.Encode "the cat on")) "the cat<unk>" "unseen piece is unk") ]

// ---------------------------------------------------------------- the synthetic corpus

let private corpusTests =
    let defaults = Corpus.CorpusConfig.defaults
    testList "corpus" [
        testCase "same seed, same corpus; another seed, another corpus; a prefix of a larger corpus" <| fun () ->
            Expect.equal (Corpus.generate 5 200) (Corpus.generate 5 200) "deterministic"
            Expect.notEqual (Corpus.generate 6 50) (Corpus.generate 5 50) "seed matters"
            Expect.equal (Corpus.generate 5 50) (Array.take 50 (Corpus.generate 5 200)) "prefix"

        propertyWith "documents have 5-15 sentences and 100-250 words, summaries 10-20 words, and carry the summary's facts"
            (Gen.zip (Gen.choose (0, 100000)) (Gen.choose (0, 1000000))) <| fun (seed, index) ->
            let e = Corpus.example { defaults with Seed = seed } index
            let n = (sentences e.Document).Length
            let w = TextTools.words e.Document
            if n < 5 || n > 15 then failwithf "%d sentences in %s" n e.Id
            if w < 100 || w > 250 then failwithf "%d words in %s" w e.Id
            let sw = TextTools.words e.Summary
            if sw < 10 || sw > 20 then failwithf "%d summary words in %s" sw e.Id
            for number in Regex.Matches(e.Summary, @"\d+") do
                if not (Regex.IsMatch(e.Document, @"\b" + number.Value + @"\b")) then failwithf "%s: %s not in the document" e.Id number.Value
            if e.Document.Contains e.Summary then failwithf "%s: summary copied from the document" e.Id
            if not (Array.contains e.Label.Value Corpus.topicNames) then failwithf "%s: label %A" e.Id e.Label

        testCase "lead-1 overlaps the summary little; the best sentence more; every topic appears" <| fun () ->
            let examples = Corpus.generate 11 600
            let lead = examples |> Array.averageBy (fun e -> unigramF1 (sentences e.Document).[0] e.Summary)
            // The summary's words are spread over three fact sentences, so even the best single sentence is partial.
            Expect.isLessThan lead 0.25 "lead-1 unigram F1 is low"
            let oracle = examples |> Array.averageBy (fun e -> sentences e.Document |> Array.map (fun s -> unigramF1 s e.Summary) |> Array.max)
            Expect.isGreaterThan oracle lead "some sentence carries the key fact"
            Expect.isLessThan oracle 0.5 "but no single sentence is the summary"
            let labels = examples |> Array.choose (fun e -> e.Label) |> Array.distinct |> Array.sort
            Expect.equal labels (Array.sort Corpus.topicNames) "all six topics"

        testCase "the vocabulary is modest" <| fun () ->
            let vocab = Corpus.generate 3 2000 |> Seq.collect (fun e -> Seq.append (words e.Document) (words e.Summary)) |> Set.ofSeq
            Expect.isLessThan vocab.Count 2500 "a small model can learn every word"

        testCase "splits are disjoint consecutive ranges" <| fun () ->
            let s = Corpus.splits { defaults with TrainSize = 50; ValidSize = 10; TestSize = 10 }
            let ids = [ s.Train; s.Valid; s.Test ] |> Seq.concat |> Seq.map (fun e -> e.Id) |> Seq.toArray
            Expect.equal (Array.distinct ids).Length 70 "no overlap"
            Expect.equal s.Valid[0] (Corpus.example defaults 50) "validation follows train"
            Expect.equal (Corpus.CorpusConfig.validate { defaults with MinSentences = 2; MaxWords = 10; HardDistractorRate = 2.0 }).Length 3 "every problem" ]

// ---------------------------------------------------------------- batches and the token cache

let private batchTests =
    let bcfg = { BatchConfig.defaults with BatchSize = 8; MaxSourceTokens = 400; MaxTargetTokens = 40; Seed = 3 }
    let corpus = lazy (Corpus.generate 21 300)
    let tokenizer = lazy (Tokenizer(cl100k.Force(), Vocabulary.trimmed (cl100k.Force()) 1 (countIds (cl100k.Force()) (corpus.Force() |> Seq.collect (fun e -> [ e.Document; e.Summary ])))))
    let memory = lazy (TokenizedSet(tokenizer.Force(), corpus.Force()) :> ITokenSource)
    testList "batches" [
        testCase "shapes, masks, bos/eos and the teacher-forcing shift" <| fun () ->
            use _ = torch.NewDisposeScope()
            let src = memory.Force()
            let idx = [| 0; 5; 9 |]
            let b = Batching.collate bcfg src idx
            let lens = idx |> Array.map src.SourceLength
            let tl = idx |> Array.map (fun i -> src.TargetLength i + 1)
            Expect.equal b.Source.shape [| 3L; int64 (Array.max lens) |] "[B; S]"
            Expect.equal b.DecoderInput.shape [| 3L; int64 (Array.max tl) |] "[B; T]"
            Expect.equal b.Target.shape b.DecoderInput.shape "same T"
            Expect.equal (b.Source.dtype, b.SourceMask.dtype, b.Target.dtype) (torch.ScalarType.Int64, torch.ScalarType.Bool, torch.ScalarType.Int64) "dtypes"
            Expect.equal (Tensors.toInt64s (b.SourceMask.sum([| 1L |]))) (lens |> Array.map int64) "mask counts tokens"
            Expect.equal (Tensors.toInt64s (b.TargetMask.sum([| 1L |]))) (tl |> Array.map int64) "summary + eos scored"
            Expect.equal b.TargetTokens (Array.sum tl) "TargetTokens"
            let dec = Tensors.toInt64s b.DecoderInput
            let tgt = Tensors.toInt64s b.Target
            let srcIds = Tensors.toInt64s b.Source
            let t = int b.Target.shape[1]
            let s = int b.Source.shape[1]
            for r in 0 .. 2 do
                let doc, sum = src.Read idx[r]
                Expect.equal srcIds[r * s .. r * s + doc.Length - 1] (doc |> Array.map int64) "document tokens"
                Expect.isTrue (srcIds[r * s + doc.Length .. r * s + s - 1] |> Array.forall ((=) 0L)) "pad after"
                Expect.equal dec[r * t] 1L "bos first"
                Expect.equal dec[r * t + 1 .. r * t + sum.Length] (sum |> Array.map int64) "bos + summary"
                Expect.equal tgt[r * t .. r * t + sum.Length - 1] (sum |> Array.map int64) "summary"
                Expect.equal tgt[r * t + sum.Length] 2L "then eos"
            Expect.equal b.Ids (idx |> Array.map src.Id) "ids"
            Expect.equal b.Labels (idx |> Array.map src.Label) "labels"

        testCase "truncation keeps the first tokens and is counted" <| fun () ->
            use _ = torch.NewDisposeScope()
            let src = memory.Force()
            let c = { bcfg with MaxSourceTokens = 20; MaxTargetTokens = 6 }
            let b = Batching.collate c src [| 0; 1 |]
            Expect.equal b.Source.shape [| 2L; 20L |] "cut to 20"
            Expect.equal b.Target.shape [| 2L; 6L |] "5 summary tokens + eos"
            Expect.equal (Tensors.toInt64s b.Target).[5] 2L "eos kept after a cut summary"
            let stats = truncation c src
            Expect.equal stats { Total = 300; SourcesTruncated = 300; TargetsTruncated = 300 } "all cut"
            Expect.equal (truncation bcfg src).SourcesTruncated 0 "none at 400"

        testCase "a plan covers every example once, respects the limits, and is deterministic per epoch" <| fun () ->
            let src = memory.Force()
            let c = { bcfg with MaxBatchTokens = Some 1200 }
            let p = plan c src 0
            Expect.equal (p |> Array.concat |> Array.sort) [| 0 .. 299 |] "each example once"
            for b in p do
                Expect.isLessThanOrEqual b.Length c.BatchSize "BatchSize"
                let longest = b |> Array.map (fun i -> min c.MaxSourceTokens (src.SourceLength i)) |> Array.max
                Expect.isLessThanOrEqual (longest * b.Length) 1200 "MaxBatchTokens"
            Expect.equal (plan c src 0) p "same epoch, same plan"
            Expect.notEqual (plan c src 1) p "next epoch reshuffles"

        testCase "length bucketing wastes less padding than random batches" <| fun () ->
            let src = memory.Force()
            let bucketed = paddingFraction src bcfg (plan bcfg src 0)
            let random = paddingFraction src bcfg (plan { bcfg with BucketPool = 1 } src 0)
            Expect.isLessThan bucketed (random / 2.0) "sorting within pools"

        testCase "sequential batches keep source order" <| fun () ->
            use _ = torch.NewDisposeScope()
            let ids = Batching.sequential bcfg (memory.Force()) |> Seq.collect (fun b -> b.Ids) |> Seq.toArray
            Expect.equal ids (corpus.Force() |> Array.map (fun e -> e.Id)) "in order"

        testCase "batches do not leak tensors" <| fun () ->
            // Counted in a dispose scope of this thread: the global count moves with tests running beside it.
            let src = memory.Force()
            use scope = torch.NewDisposeScope()
            for b in Batching.epoch bcfg src 0 |> Seq.truncate 5 do
                use _ = b
                Expect.equal scope.DisposablesCount 5 "a batch owns five tensors"
            Expect.equal scope.DisposablesCount 0 "disposing a batch frees all of them"

        testCase "validation lists every problem" <| fun () ->
            let problems = BatchConfig.validate { bcfg with BatchSize = 0; MaxTargetTokens = 1; MaxBatchTokens = Some 10 }
            Expect.equal problems.Length 3 "three problems"

        testCase "token cache: streamed build, lazy reads equal in-memory batches, counts give the same vocabulary" <| fun () ->
            withTemp (fun dir ->
                use _ = torch.NewDisposeScope()
                let enc = cl100k.Force()
                let examples = Corpus.generate 4 3000
                let path = Path.Combine(dir, "train.tokens")
                let mutable pulled = 0
                let streamed = examples |> Seq.map (fun e -> pulled <- pulled + 1; e)
                let info = TokenCache.build enc "synthetic seed 4, 3000" streamed path
                Expect.equal (info.Count, pulled) (3000, 3000) "every example, pulled through the sequence"
                Expect.isFalse (File.Exists(path + ".tmp")) "temporary renamed"
                use cache = TokenCache.openRead path
                Expect.equal cache.Info info "index matches the build"
                for i in [ 0; 1234; 2999 ] do
                    let d, s = cache.ReadBase i
                    Expect.equal d (enc.Encode examples[i].Document) "document ids"
                    Expect.equal s (enc.Encode examples[i].Summary) "summary ids"
                    Expect.equal (cache.Id i, cache.Label i) (examples[i].Id, examples[i].Label) "id and label"
                let trimmed = TokenCache.tokenizer enc 1 cache
                let direct = Tokenizers.train TokenizerConfig.defaults (examples |> Seq.collect (fun e -> [ e.Document; e.Summary ]))
                Expect.equal trimmed.Vocabulary direct.Vocabulary "vocabulary from the cache's counts"
                let disk = cache.WithTokenizer trimmed
                let mem = TokenizedSet(trimmed, examples) :> ITokenSource
                let p = plan bcfg disk 0
                Expect.equal (plan bcfg mem 0) p "lengths agree, so plans agree"
                for indices in p |> Array.truncate 4 do
                    let a = Batching.collate bcfg disk indices
                    let b = Batching.collate bcfg mem indices
                    Expect.equal (Tensors.toInt64s a.Source) (Tensors.toInt64s b.Source) "source"
                    Expect.equal (Tensors.toInt64s a.Target) (Tensors.toInt64s b.Target) "target"
                    Expect.equal a.Ids b.Ids "ids")

        testCase "a generated corpus written as JSON Lines streams from the loader into a token cache" <| fun () ->
            withTemp (fun dir ->
                let enc = cl100k.Force()
                let examples = Corpus.generate 9 2000
                let jsonl = Path.Combine(dir, "synthetic.jsonl")
                Data.writeJsonLines jsonl examples
                let reader = Data.read cfg jsonl
                let info = TokenCache.build enc jsonl reader.Examples (Path.Combine(dir, "synthetic.tokens"))
                Expect.equal info.Count 2000 "every example"
                Expect.equal reader.Report.Kept 2000 "the loader's report is complete after streaming"
                Expect.equal (Data.load cfg jsonl).Examples examples "JSON Lines round trip, labels included"
                use cache = TokenCache.openRead info.Path
                Expect.equal (cache.ReadBase 1999) (enc.Encode examples[1999].Document, enc.Encode examples[1999].Summary) "last example")

        testCase "token cache: unfinished or foreign files are refused; openOrBuild rebuilds on a new key" <| fun () ->
            withTemp (fun dir ->
                let enc = cl100k.Force()
                let examples = Corpus.generate 8 20
                let path = Path.Combine(dir, "c.tokens")
                TokenCache.build enc "k1" examples path |> ignore
                let bytes = File.ReadAllBytes path
                Array.fill bytes 24 8 0uy
                let broken = writeBytes dir "broken.tokens" bytes
                let e = Expect.throwsC (fun () -> TokenCache.openRead broken |> ignore) id
                Expect.stringContains e.Message "the build did not finish (no index)" "unfinished"
                let other = write dir "other.tokens" (String.replicate 40 "x")
                let e2 = Expect.throwsC (fun () -> TokenCache.openRead other |> ignore) id
                Expect.stringContains e2.Message "expected the MOETOKC1 header" "foreign"
                let mutable pulled = 0
                let counting = examples |> Seq.map (fun e -> pulled <- pulled + 1; e)
                (TokenCache.openOrBuild enc "k1" counting path).Dispose()
                Expect.equal pulled 0 "same key: reused"
                use c = TokenCache.openOrBuild enc "k2" counting path
                Expect.equal (pulled, c.Info.Key) (20, "k2") "new key: rebuilt"
                let gpt2Fingerprint = "gpt2-bpe/other"
                let fake = { new IBaseEncoder with
                                member _.Kind = Cl100kBase
                                member _.Size = enc.Size
                                member _.Fingerprint = gpt2Fingerprint
                                member _.Encode t = enc.Encode t
                                member _.Decode ids = enc.Decode ids }
                let e3 = Expect.throwsC (fun () -> c.WithTokenizer(Tokenizer(fake, Vocabulary.full fake)) |> ignore) id
                Expect.stringContains e3.Message "expected a tokenizer with encoder cl100k_base" "encoder mismatch") ]

let tests =
    testList "Data" [ loaderTests; badInputTests; textTests; tokenizerTests; corpusTests; batchTests ]
