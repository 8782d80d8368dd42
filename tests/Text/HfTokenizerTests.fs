module Moe.Tests.HfTokenizerTests

open System
open System.IO
open System.Text.Json
open System.Text.RegularExpressions
open Expecto
open TorchSharp
open Moe
open Moe.HfTokenizer
open Moe.Tests.Support

/// Every shared folder with tokenizer files.
let private folders =
    [ "bart-tiny"; "pegasus-tiny"; "t5-tiny"; "flan-t5-tiny"; "switch-tiny"; "qwen2-tiny"; "llama3-tokenizer-tiny"
      "gpt2-tiny-hf"; "roberta-tiny"; "roberta-tiny-mnli" ]

let private modelsDir (data: string) = Path.GetFullPath(Path.Combine(data, "..", "models"))

let private hasSlowFiles (dir: string) =
    File.Exists(Path.Combine(dir, "spiece.model")) || File.Exists(Path.Combine(dir, "merges.txt"))

let private hasTokenizerJson (dir: string) = File.Exists(Path.Combine(dir, "tokenizer.json"))

let private ints (e: JsonElement) : int[] = e.EnumerateArray() |> Seq.map (fun x -> x.GetInt32()) |> Array.ofSeq

let private sample (dir: string) : JsonElement =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
    doc.RootElement.Clone()

let private prop (name: string) (e: JsonElement) : JsonElement option =
    match e.TryGetProperty name with
    | true, v -> Some v
    | _ -> None

/// The shared XSum documents (PyrXSum, one per line; `docs[0]` of the samples is the first).
let private documents (data: string) : string[] =
    File.ReadAllText(Path.Combine(data, "pyrxsum", "documents.txt")).Split('\n')

let private references (data: string) : string[] =
    File.ReadAllText(Path.Combine(data, "pyrxsum", "references.txt")).Split('\n')

/// A few hundred real sentences (the documents' sentences, whose paragraph breaks left no space, and the
/// references), plus strings that exercise special tokens, spacing, digits and non-ASCII text.
let private sentences (data: string) : string[] =
    let fromDocs =
        documents data
        |> Array.collect (fun d -> Regex.Split(d, @"(?<=[.!?])(?=[A-Z""])"))
        |> Array.filter (fun s -> s.Trim() <> "")
        |> Array.truncate 300
    let refs = references data |> Array.truncate 50
    let edge =
        [| ""; " "; "Hello  world"; "  leading and trailing  "; "tabs\tand\nnew lines\n\nhere"; "£20m in 2010, 1,000,000 (3.5%)"
           "naïve café – “quotes” — 東京 🙂"; "<s>inside</s> <mask> <pad> <unk>"; "<extra_id_0> and <extra_id_99>"
           "<|endoftext|><|im_start|>user<|im_end|>"; "don't can't I'm we've you're"; "a . b , c ! d ?" |]
    Array.concat [ fromDocs; refs; edge ]

let private loadFolder = Collections.Concurrent.ConcurrentDictionary<string, Lazy<HfTokenizer>>()
let private loadSlow = Collections.Concurrent.ConcurrentDictionary<string, Lazy<HfTokenizer>>()
/// One tokenizer per folder and source for the whole run (each loads three native tokenizers).
let private folderTokenizer (dir: string) = loadFolder.GetOrAdd(dir, fun d -> lazy (fromFolder d)).Value
let private slowTokenizer (dir: string) = loadSlow.GetOrAdd(dir, fun d -> lazy (fromSlowFiles d)).Value

/// The tokenizers a folder can be read as: its preferred files, and its slow files where it also has those.
let private readings (dir: string) : (string * HfTokenizer) list =
    [ "folder", folderTokenizer dir
      if hasTokenizerJson dir && hasSlowFiles dir then "slow files", slowTokenizer dir ]

/// One recorded encode/decode section: text, ids, ids_no_special, decode, and tokens where recorded.
let private checkSection (name: string) (tok: HfTokenizer) (section: JsonElement) =
    let text = section.GetProperty("text").GetString()
    let ids = ints (section.GetProperty "ids")
    Expect.equal (tok.Encode(text, true)) ids (name + ": ids")
    Expect.equal (tok.Encode(text, false)) (ints (section.GetProperty "ids_no_special")) (name + ": ids without special tokens")
    Expect.equal (tok.Decode(ids, false)) (section.GetProperty("decode").GetString()) (name + ": decode")
    match prop "tokens" section with
    | Some tokens ->
        Expect.equal (tok.Tokens(text, true)) (tokens.EnumerateArray() |> Seq.map (fun t -> t.GetString()) |> Array.ofSeq) (name + ": tokens")
    | None -> ()

let private sampleTests =
    [ for name in folders ->
          testWithShared (sprintf "%s: recorded ids, tokens and decoded text, from tokenizer.json and from the slow files" name) (fun data ->
              let dir = Path.Combine(modelsDir data, name)
              let s = sample dir
              let doc0 = (documents data).[0]
              let prefix = prop "source_prefix" s |> Option.map _.GetString() |> Option.defaultValue ""
              let mutable checkedSections = 0
              for how, tok in readings dir do
                  let label = sprintf "%s (%s)" name how
                  for section in [ prop "tokenizer_hello_world" s; prop "tokenizer_json" s |> Option.bind (prop "hello_world") ] do
                      match section with
                      | Some sec ->
                          checkSection label tok sec
                          checkedSections <- checkedSections + 1
                      | None -> ()
                  match prop "doc0_first20_ids" s with
                  | Some first20 ->
                      Expect.equal (tok.Encode(prefix + doc0, true).[.. 19]) (ints first20) (label + ": the first 20 ids of docs[0]")
                      checkedSections <- checkedSections + 1
                  | None -> ()
                  // Recorded model inputs: docs[0] truncated to the recorded length (special tokens kept), refs[0]
                  // as labels, and Switch's span-corruption source and target.
                  match prop "doc0_alone" s with
                  | Some alone ->
                      let recorded = ints ((alone.GetProperty "input_ids").[0])
                      Expect.isGreaterThan (tok.Encode(prefix + doc0, true).Length) recorded.Length (label + ": docs[0] is longer than the recorded input")
                      use _ = torch.NewDisposeScope()
                      let batch = tok.EncodeBatch([| prefix + doc0 |], Some recorded.Length, true)
                      Expect.equal (batch.Ids.data<int64>().ToArray() |> Array.map int) recorded (label + ": doc0_alone input_ids (truncated)")
                      match prop "labels" alone with
                      | Some labels -> Expect.equal (tok.Encode((references data).[0], true)) (ints labels.[0]) (label + ": doc0_alone labels (refs[0])")
                      | None -> ()
                      checkedSections <- checkedSections + 1
                  | None -> ()
                  match prop "src0_alone" s with
                  | Some src ->
                      let source = (src.GetProperty "source_text").[0].GetString()
                      let target = (src.GetProperty "target_text").[0].GetString()
                      Expect.equal (tok.Encode(source, true)) (ints ((src.GetProperty "input_ids").[0])) (label + ": src0_alone input_ids")
                      Expect.equal (tok.Encode(target, true)) (ints ((src.GetProperty "labels").[0])) (label + ": src0_alone labels")
                      checkedSections <- checkedSections + 1
                  | None -> ()
                  match prop "pair0_alone" s with
                  | Some pair ->
                      // MNLI: premise docs[0], hypothesis refs[0], truncated longest-first to the recorded length.
                      let recorded = ints (pair.GetProperty "input_ids")
                      Expect.equal (tok.EncodePair(doc0, (references data).[0], true, recorded.Length)) recorded (label + ": pair0_alone input_ids")
                      checkedSections <- checkedSections + 1
                  | None -> ()
                  match prop "seq_doc0_alone" s |> Option.bind (prop "input_ids") with
                  | Some inputIds ->
                      let recorded = ints (inputIds.[0])
                      Expect.equal (tok.Encode(doc0, false).[.. recorded.Length - 1]) recorded (label + ": seq_doc0_alone input_ids (docs[0]'s first tokens)")
                  | None -> ()
              Expect.isGreaterThan checkedSections 0 (name + ": the sample has tokenizer sections")) ]

let private agreementTests =
    [ for name in folders ->
          testWithShared (sprintf "%s: tokenizer.json and the slow files agree on real sentences" name) (fun data ->
              let dir = Path.Combine(modelsDir data, name)
              if hasTokenizerJson dir && hasSlowFiles dir then
                  let fast, slow = folderTokenizer dir, slowTokenizer dir
                  Expect.equal slow.VocabSize fast.VocabSize "vocabulary sizes"
                  Expect.equal (slow.BosId, slow.EosId, slow.PadId, slow.UnkId, slow.MaskId) (fast.BosId, fast.EosId, fast.PadId, fast.UnkId, fast.MaskId) "special ids"
                  let texts = sentences data
                  Expect.isGreaterThan texts.Length 300 "a few hundred sentences"
                  for text in texts do
                      let ids = fast.Encode(text, true)
                      Expect.equal (slow.Encode(text, true)) ids (sprintf "ids of %A" text)
                      Expect.equal (slow.Encode(text, false)) (fast.Encode(text, false)) (sprintf "ids without special tokens of %A" text)
                      Expect.equal (slow.Decode(ids, false)) (fast.Decode(ids, false)) (sprintf "decode of %A" text)
                      Expect.equal (slow.Decode(ids, true)) (fast.Decode(ids, true)) (sprintf "decode without special tokens of %A" text)
              else
                  // Only one source: it still round-trips the real sentences.
                  let tok = folderTokenizer dir
                  for text in sentences data |> Array.truncate 100 do
                      let ids = tok.Encode(text, false)
                      Expect.all ids (fun id -> id >= 0 && id <= tok.MaxId) (sprintf "ids of %A within the vocabulary" text)) ]

let private withTemp (body: string -> 'a) : 'a =
    let dir = Path.Combine(Path.GetTempPath(), "moe-hftok-" + Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    try body dir
    finally Directory.Delete(dir, true)

let private behaviourTests =
    [ testWithShared "settings: special ids, add_prefix_space, model_max_length, clean-up, and null roles" (fun data ->
          let m = modelsDir data
          let bart = folderTokenizer (Path.Combine(m, "bart-tiny"))
          Expect.equal (bart.BosId, bart.EosId, bart.PadId, bart.UnkId, bart.MaskId) (Some 0, Some 2, Some 1, Some 3, Some 50264) "BART's specials"
          Expect.equal bart.AddPrefixSpace (Some false) "add_prefix_space"
          Expect.equal bart.ModelMaxLength (Some 1024) "model_max_length"
          Expect.isTrue bart.CleanUpTokenizationSpaces "BART cleans up tokenization spaces"
          let t5 = folderTokenizer (Path.Combine(m, "t5-tiny"))
          Expect.equal (t5.BosId, t5.EosId, t5.PadId, t5.UnkId) (None, Some 1, Some 0, Some 2) "T5's specials"
          Expect.equal t5.VocabSize 4100 "T5: 4000 pieces and 100 extra ids"
          Expect.equal (t5.TokenToId "<extra_id_0>") (Some 4099) "extra ids count down from the last id"
          Expect.isFalse t5.CleanUpTokenizationSpaces "T5 leaves spaces (transformers 4.45's default)"
          let pegasus = folderTokenizer (Path.Combine(m, "pegasus-tiny"))
          Expect.equal (pegasus.PadId, pegasus.EosId, pegasus.UnkId, pegasus.MaskId) (Some 0, Some 1, Some 105, Some 3) "Pegasus's specials with offset 103"
          let qwen = folderTokenizer (Path.Combine(m, "qwen2-tiny"))
          Expect.equal (qwen.BosId, qwen.EosId, qwen.PadId) (None, Some 50258, Some 50256) "Qwen2: bos_token null, eos <|im_end|>, pad <|endoftext|>"
          let gpt2 = folderTokenizer (Path.Combine(m, "gpt2-tiny-hf"))
          Expect.equal (gpt2.BosId, gpt2.EosId, gpt2.PadId) (Some 50256, Some 50256, None) "GPT-2: no pad token")

      testWithShared "decode: special tokens kept or skipped, and clean-up as the config says" (fun data ->
          let m = modelsDir data
          let bart = folderTokenizer (Path.Combine(m, "bart-tiny"))
          let ids = bart.Encode("Hello world , isn't it ?", true)
          Expect.equal (bart.Decode(ids, false)) "<s>Hello world, isn't it?</s>" "BART: specials kept, spaces before punctuation cleaned"
          Expect.equal (bart.Decode(ids, true)) "Hello world, isn't it?" "BART: specials skipped"
          let t5 = folderTokenizer (Path.Combine(m, "t5-tiny"))
          let ids = t5.Encode("<extra_id_0> Hello world , yes", true)
          Expect.equal ids.[0] 4099 "<extra_id_0> is one token"
          Expect.equal (t5.Decode(ids, true)) "Hello world , yes" "T5: no clean-up, specials skipped"
          let qwen = folderTokenizer (Path.Combine(m, "qwen2-tiny"))
          let ids = qwen.Encode("<|im_start|>user\nHi<|im_end|>", false)
          Expect.equal ids.[0] 50257 "<|im_start|> is one token"
          Expect.equal (qwen.Decode(ids, false)) "<|im_start|>user\nHi<|im_end|>" "Qwen2 round trip with specials")

      testWithShared "EncodeBatch: right and left padding, masks, truncation that keeps the special tokens" (fun data ->
          let m = modelsDir data
          let bart = folderTokenizer (Path.Combine(m, "bart-tiny"))
          let texts = [| "Hello world"; "A longer sentence about the club's new signing." |]
          let long = bart.Encode(texts.[1], true)
          use _ = torch.NewDisposeScope()
          let b = bart.EncodeBatch(texts, None, false)
          Expect.equal b.Ids.shape [| 2L; int64 long.Length |] "ids [B; L]"
          Expect.equal b.Ids.dtype torch.ScalarType.Int64 "int64 ids"
          Expect.equal b.Mask.dtype torch.ScalarType.Bool "bool mask"
          let row0 = b.Ids.[0].data<int64>().ToArray() |> Array.map int
          let mask0 = b.Mask.[0].data<bool>().ToArray()
          Expect.equal row0.[.. 3] [| 0; 15500; 999; 2 |] "row 0 first"
          Expect.all row0.[4..] (fun id -> id = 1) "right padding with <pad> = 1"
          Expect.equal (mask0 |> Array.filter id |> Array.length) 4 "mask marks the 4 real tokens"
          Expect.isFalse mask0.[4] "padding masked out"
          let left = bart.EncodeBatch(texts, None, false, PadLeft)
          let lrow0 = left.Ids.[0].data<int64>().ToArray() |> Array.map int
          Expect.equal lrow0.[lrow0.Length - 4 ..] [| 0; 15500; 999; 2 |] "left padding puts the tokens last"
          Expect.isTrue (left.Mask.[0].data<bool>().ToArray() |> Array.last) "left-padded mask ends with real tokens"
          let cut = bart.EncodeBatch(texts, Some 6, true)
          let cut1 = cut.Ids.[1].data<int64>().ToArray() |> Array.map int
          Expect.equal cut1 (Array.concat [ long.[.. 4]; [| 2 |] ]) "truncated to 6 with <s> kept and </s> last"
          throwsWith (fun () -> bart.EncodeBatch(texts, Some 6, false) |> ignore) [ "maxLength 6"; "truncation" ] "too long without truncation"
          let gpt2 = folderTokenizer (Path.Combine(m, "gpt2-tiny-hf"))
          throwsWith (fun () -> gpt2.EncodeBatch(texts, None, false) |> ignore) [ "no pad token"; "padId" ] "GPT-2 has no pad token"
          let g = gpt2.EncodeBatch(texts, None, false, PadLeft, 50256)
          Expect.equal (g.Ids.[0].[0].item<int64>()) 50256L "left padding with the given pad id")

      testWithShared "checkAgainst: a tokenizer producing ids beyond the model's vocabulary is refused, naming its file" (fun data ->
          let dir = Path.Combine(modelsDir data, "t5-tiny")
          let tok = folderTokenizer dir
          checkAgainst 4100 tok
          checkAgainst 32128 tok
          throwsWith (fun () -> checkAgainst 4000 tok) [ Path.Combine(dir, "tokenizer.json"); "does not match the vocabulary size"; "4000"; "4099" ] "t5-tiny against 4000 ids"
          throwsWith (fun () -> checkAgainst 4000 (slowTokenizer dir)) [ Path.Combine(dir, "spiece.model") ] "from spiece.model")

      testWithShared "EncodePair: each family's pair layout and longest-first truncation" (fun data ->
          let m = modelsDir data
          let t5 = folderTokenizer (Path.Combine(m, "t5-tiny"))
          let a, b = t5.Encode("first text", false), t5.Encode("second", false)
          Expect.equal (t5.EncodePair("first text", "second", true)) (Array.concat [ a; [| 1 |]; b; [| 1 |] ]) "T5: A </s> B </s>"
          let pegasus = folderTokenizer (Path.Combine(m, "pegasus-tiny"))
          let a, b = pegasus.Encode("first text", false), pegasus.Encode("second", false)
          Expect.equal (pegasus.EncodePair("first text", "second", true)) (Array.concat [ a; b; [| 1 |] ]) "Pegasus: A B </s>"
          let llama = folderTokenizer (Path.Combine(m, "llama3-tokenizer-tiny"))
          let a, b = llama.Encode("first text", false), llama.Encode("second", false)
          Expect.equal (llama.EncodePair("first text", "second", true)) (Array.concat [ [| 50256 |]; a; [| 50256 |]; b ]) "Llama-3: bos A bos B"
          let bart = folderTokenizer (Path.Combine(m, "bart-tiny"))
          let long = String.replicate 30 "word "
          let cut = bart.EncodePair(long, long, true, 21)
          Expect.equal cut.Length 21 "fits maxLength"
          Expect.equal (cut |> Array.filter (fun id -> id = 2) |> Array.length) 3 "RoBERTa layout keeps its three </s>"
          Expect.equal (Array.IndexOf(cut, 2)) 9 "two equally long texts share the budget of 17: 8 for the first, 9 for the second"
          let short = "a few words"
          let s = bart.Encode(short, false)
          let cut = bart.EncodePair(long, short, true, 21)
          Expect.equal cut.[cut.Length - 1 - s.Length ..] (Array.append s [| 2 |]) "a short second text is kept whole"
          Expect.equal (Array.IndexOf(cut, 2)) (1 + 17 - s.Length) "the long first text gets the rest")

      testWithShared "spiece.model: T5's legacy=false and add_prefix_space=false choose the converters' prepend scheme" (fun data ->
          let spiece = Path.Combine(modelsDir data, "t5-tiny", "spiece.model")
          let schemeWith (config: string) =
              withTemp (fun dir ->
                  File.Copy(spiece, Path.Combine(dir, "spiece.model"))
                  File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), config)
                  use tok = fromFolder dir
                  Expect.equal (tok.Encode("Hello world", true)) [| 131; 53; 205; 241; 1 |] "same ids for one plain sentence"
                  let scheme = tok.Document.["pre_tokenizer"].["prepend_scheme"].GetValue<string>()
                  Expect.equal (tok.Document.["decoder"].["prepend_scheme"].GetValue<string>()) scheme "the decoder's scheme follows"
                  scheme)
          Expect.equal (schemeWith """{"tokenizer_class": "T5Tokenizer"}""") "always" "legacy (the default): every word"
          Expect.equal (schemeWith """{"tokenizer_class": "T5Tokenizer", "legacy": false}""") "first" "legacy=false: the first word only")

      testWithShared "save: a folder written from slow files reloads through tokenizer.json with the same ids and text" (fun data ->
          for name in [ "roberta-tiny"; "pegasus-tiny" ] do
              let tok = slowTokenizer (Path.Combine(modelsDir data, name))
              withTemp (fun dir ->
                  save dir tok
                  Expect.isTrue (File.Exists(Path.Combine(dir, "tokenizer.json"))) (name + ": tokenizer.json written")
                  use back = fromFolder dir
                  Expect.stringEnds back.Source "tokenizer.json" (name + ": reloads from tokenizer.json")
                  Expect.equal (back.EosId, back.PadId, back.VocabSize) (tok.EosId, tok.PadId, tok.VocabSize) (name + ": specials and size")
                  for text in sentences data |> Array.truncate 40 do
                      let ids = tok.Encode(text, true)
                      Expect.equal (back.Encode(text, true)) ids (sprintf "%s: ids of %A" name text)
                      Expect.equal (back.Decode(ids, false)) (tok.Decode(ids, false)) (sprintf "%s: text of %A" name text)))

      testCase "missing tokenizer files: the error names the folder and the files looked for" (fun () ->
          withTemp (fun dir ->
              throwsWith (fun () -> fromFolder dir |> ignore) [ dir; "tokenizer.json"; "vocab.json + merges.txt"; "spiece.model" ] "empty folder"
              File.WriteAllText(Path.Combine(dir, "vocab.json"), "{}")
              throwsWith (fun () -> fromFolder dir |> ignore) [ dir; "merges.txt" ] "vocab.json without merges.txt"
              throwsWith (fun () -> fromFolder (Path.Combine(dir, "absent")) |> ignore) [ "absent" ] "no such folder"))

      testCase "bad tokenizer files: errors name the file and line" (fun () ->
          withTemp (fun dir ->
              File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), """{"tokenizer_class": "GPT2Tokenizer"}""")
              File.WriteAllText(Path.Combine(dir, "vocab.json"), """{"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}""")
              File.WriteAllText(Path.Combine(dir, "merges.txt"), "#version: 0.2\na b\nbroken\n")
              throwsWith (fun () -> fromFolder dir |> ignore) [ Path.Combine(dir, "merges.txt") + ":3"; "broken" ] "a bad merges line"
              File.Delete(Path.Combine(dir, "merges.txt"))
              File.Delete(Path.Combine(dir, "vocab.json"))
              File.WriteAllBytes(Path.Combine(dir, "spiece.model"), [| 0x0Auy; 0x7Fuy; 0x01uy |])
              throwsWith (fun () -> fromFolder dir |> ignore) [ Path.Combine(dir, "spiece.model"); "SentencePiece" ] "a truncated spiece.model"))

      testCase "a byte-level BPE built from vocab.json + merges.txt encodes, decodes and adds GPT-2's bos when asked" (fun () ->
          withTemp (fun dir ->
              File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), """{"tokenizer_class": "GPT2Tokenizer", "add_bos_token": true}""")
              File.WriteAllText(Path.Combine(dir, "vocab.json"), """{"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġab": 4, "<|endoftext|>": 5}""")
              File.WriteAllText(Path.Combine(dir, "merges.txt"), "#version: 0.2\na b\nĠ ab\n")
              use tok = fromFolder dir
              Expect.equal (tok.Encode("ab ab", false)) [| 2; 4 |] "merges applied in order"
              Expect.equal (tok.Encode("ab ab", true)) [| 5; 2; 4 |] "add_bos_token puts <|endoftext|> first"
              Expect.equal (tok.Decode([| 5; 2; 4 |], true)) "ab ab" "decode"
              Expect.equal tok.VocabSize 6 "vocabulary size"
              Expect.equal (tok.Tokens("ab ab", false)) [| "ab"; "Ġab" |] "tokens")) ]

let tests =
    testList "HfTokenizer" [
        testList "samples" sampleTests
        testList "tokenizer.json vs slow files" agreementTests
        testList "behaviour" behaviourTests
    ]
