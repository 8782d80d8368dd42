/// Decoder-only checkpoints through `moe generate --model` and `moe summarize --model` (`Moe.CausalBaseline`,
/// the functions the CLI calls): greedy ids equal transformers' recorded ones for every tiny decoder-only
/// checkpoint, text prompts left-padded in one batch, several EOS ids, the chat-template prompt for
/// summarization, and the refusals (unknown model_type, text without a tokenizer, mismatched tokenizer, a prompt
/// past the model's positions, a template that cannot be rendered).
module Moe.Tests.CausalBaselineTests

open System
open System.IO
open System.Text.Json
open Expecto
open Moe
open Moe.Tests.Support

let private models (shared: string) = Path.GetFullPath(Path.Combine(shared, "..", "models"))

/// The recorded prompt ids and transformers' greedy new ids with their max_new_tokens.
let private greedySample (dir: string) : int[] * int[] * int =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
    let s = doc.RootElement
    let alone, greedy = if fst (s.TryGetProperty "seq_doc0_alone") then "seq_doc0_alone", "seq_doc0_greedy" else "seq0_alone", "seq0_greedy"
    let prompt = [| for e in (s.GetProperty(alone).GetProperty("input_ids")[0]).EnumerateArray() -> e.GetInt32() |]
    let g = s.GetProperty greedy
    let all = [| for e in g.GetProperty("ids").EnumerateArray() -> e.GetInt32() |]
    prompt, all[prompt.Length ..], g.GetProperty("settings").GetProperty("max_new_tokens").GetInt32()

let private tempDir () = Directory.CreateTempSubdirectory("moe-causal-baseline-").FullName

/// A copy of a checkpoint folder.
let private copyFolder (src: string) : string =
    let dst = tempDir ()
    for f in Directory.GetFiles src do File.Copy(f, Path.Combine(dst, Path.GetFileName f))
    dst

let private message (f: unit -> unit) : string =
    try f (); failwith "expected an error"
    with e when e.Message <> "expected an error" -> e.Message

let private xsum (shared: string) = Path.Combine(shared, "xsum-test-docs", "test.llm_decoding.jsonl")

let tests =
    testSequenced <| testList "CausalBaseline" [
        testWithShared "generate --model --input-ids --greedy: GPT-2, Llama, Qwen2 and OLMoE give transformers' greedy ids" <| fun shared ->
            for name in [ "gpt2-tiny-hf"; "llama-tiny-hf"; "qwen2-tiny"; "olmoe-tiny" ] do
                let dir = Path.Combine(models shared, name)
                let prompt, expected, maxNew = greedySample dir
                let outs = CausalBaseline.generateFolder dir [ sprintf "Generate.MaxNewTokens=%d" maxNew ] true 8 (Baseline.SourceIds [| prompt |])
                Expect.equal outs[0].Ids expected (sprintf "%s: greedy ids equal transformers'" name)

        testWithShared "generate --model --input: text prompts of different lengths in one left-padded batch equal each alone, with text" <| fun shared ->
            let dir = Path.Combine(models shared, "gpt2-tiny-hf")
            let docs = [| "Hello world"; "The quick brown fox jumps over the lazy dog near the river bank." |]
            let settings = [ "Generate.MaxNewTokens=5" ]
            let together = CausalBaseline.generateFolder dir settings true 8 (Baseline.Documents docs)
            let alone = docs |> Array.map (fun d -> (CausalBaseline.generateFolder dir settings true 1 (Baseline.Documents [| d |]))[0])
            Expect.equal [ for g in together -> g.Ids ] [ for g in alone -> g.Ids ] "batched = alone"
            Expect.isTrue (together |> Array.forall (fun g -> g.Text.IsSome && g.Ids.Length = 5)) "5 new tokens each, and their text"
            let beams = CausalBaseline.generateFolder dir [ "Generate.MaxNewTokens=4"; "Generate.NumBeams=2" ] true 8 (Baseline.Documents docs)
            Expect.isTrue (beams |> Array.forall (fun g -> g.Ids.Length >= 1 && g.Ids.Length <= 4)) "beam search within MaxNewTokens"

        testWithShared "openCausal: qwen2-tiny's generation_config.json gives both EOS ids; the prompt's tokens equal the tokenizer's" <| fun shared ->
            let dir = Path.Combine(models shared, "qwen2-tiny")
            use p = CausalBaseline.openCausal dir None []
            Expect.equal p.Generation.EosTokenId [ 50258; 50256 ] "two EOS ids"
            use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
            let hello = doc.RootElement.GetProperty "tokenizer_hello_world"
            Expect.equal (CausalBaseline.promptIds p "Hello world") [| for e in hello.GetProperty("ids").EnumerateArray() -> e.GetInt32() |] "tokenizer(text) ids"

        testWithShared "generate --model refusals: unknown model_type, text without a tokenizer, a mismatched tokenizer, a prompt past n_positions" <| fun shared ->
            let tmp = tempDir ()
            try
                File.WriteAllText(Path.Combine(tmp, "config.json"), """{"model_type": "gpt_neox"}""")
                let m = message (fun () -> CausalBaseline.kindOf tmp |> ignore)
                for part in [ "gpt_neox"; "config.json"; "gpt2"; "bart" ] do Expect.stringContains m part "names the model_type, the file and the supported ones"
            finally Directory.Delete(tmp, true)
            let llama = Path.Combine(models shared, "llama-tiny-hf")
            let m = message (fun () -> CausalBaseline.generateFolder llama [] true 8 (Baseline.Documents [| "some text" |]) |> ignore)
            Expect.stringContains m "no tokenizer files" "text without a tokenizer is refused"
            Expect.stringContains m "--input-ids" "says what to give instead"
            let m = message (fun () -> CausalBaseline.openCausal llama (Some(Path.Combine(models shared, "qwen2-tiny"))) [] |> ignore)
            Expect.stringContains m "vocab_size is 1000" "a tokenizer past the model's vocabulary is refused"
            let m = message (fun () -> CausalBaseline.openCausal llama (Some llama) [] |> ignore)
            Expect.stringContains m "has no tokenizer files" "a named folder without tokenizer files is refused"
            let gpt2 = Path.Combine(models shared, "gpt2-tiny-hf")
            let m = message (fun () -> CausalBaseline.generateFolder gpt2 [ "Generate.MaxNewTokens=4" ] true 8 (Baseline.SourceIds [| Array.create 126 11 |]) |> ignore)
            Expect.stringContains m "n_positions" "a prompt with its new tokens past the positions is refused naming the limit"
            Expect.stringContains m "130" "and the positions needed"

        testWithShared "summarize --model qwen2-tiny: the chat-template prompt's ids equal ChatTemplate's, the run folder is written and scored" <| fun shared ->
            let dir = Path.Combine(models shared, "qwen2-tiny")
            use p = CausalBaseline.openCausal dir None []
            let style = CausalBaseline.promptStyleOf dir
            let prompt = { CausalBaseline.SummaryPrompt.defaults with System = Some "You are a careful editor." }
            let ids, cut = CausalBaseline.summaryPromptIds p style prompt 16 "A short document."
            let template = ChatTemplate.fromFolder dir
            let expected =
                ChatTemplate.applyChatTemplate p.Tokenizer.Value template
                    [ "system", "You are a careful editor."; "user", "Summarize the following document in one sentence.\n\nA short document." ] ChatTemplate.defaults
            Expect.equal ids expected "prompt ids = apply_chat_template(add_generation_prompt=True)"
            Expect.isFalse cut "not cut"
            let runs = tempDir ()
            try
                let lines = ResizeArray<string>()
                let cfg =
                    { Baseline.BaselineConfig.defaults dir (xsum shared) with
                        Limit = Some 2; RunsDir = runs; Name = "qwen2"; BootstrapSamples = 20; Settings = [ "Generate.MaxNewTokens=4"; "Generate.DoSample=false" ] }
                let r = CausalBaseline.summarize lines.Add CausalBaseline.SummaryPrompt.defaults cfg
                for f in [ "predictions.txt"; "references.txt"; "documents.txt"; "ids.txt"; "test_scores.json"; Baseline.recordName ] do
                    Expect.isTrue (File.Exists(Path.Combine(r.RunDir, f))) (sprintf "%s written" f)
                Expect.equal r.Scores.Model.N 2 "scored on 2 documents"
                Expect.isTrue (lines |> Seq.exists (fun l -> l.Contains "chat template")) "the output says the chat template is used"
                use record = JsonDocument.Parse(File.ReadAllText(Path.Combine(r.RunDir, Baseline.recordName)))
                Expect.equal (record.RootElement.GetProperty("model_type").GetString()) "qwen2" "the record names the model_type"
                Expect.stringContains (record.RootElement.GetProperty("user_prompt").GetString()) "one sentence" "the record holds the prompt"
            finally Directory.Delete(runs, true)

        testWithShared "summarize --model gpt2-tiny-hf: no chat template, a plain prompt, said in the output" <| fun shared ->
            let dir = Path.Combine(models shared, "gpt2-tiny-hf")
            let runs = tempDir ()
            try
                let lines = ResizeArray<string>()
                let cfg = { Baseline.BaselineConfig.defaults dir (xsum shared) with Limit = Some 1; RunsDir = runs; Name = "gpt2"; BootstrapSamples = 20; Settings = [ "Generate.MaxNewTokens=3" ] }
                let r = CausalBaseline.summarize lines.Add CausalBaseline.SummaryPrompt.defaults cfg
                Expect.isTrue (lines |> Seq.exists (fun l -> l.Contains "no chat template: plain prompt")) "the output says a plain prompt is used"
                Expect.isGreaterThan (Metrics.Basics.readLines (Path.Combine(runs, "gpt2", "documents.txt"))).Length 0 "documents written"
                Expect.equal r.Documents 1 "one document (cut to the 128 positions)"
            finally Directory.Delete(runs, true)

        testWithShared "summarize --model: a chat template that cannot be rendered is refused naming the template" <| fun shared ->
            let dir = copyFolder (Path.Combine(models shared, "qwen2-tiny"))
            let runs = tempDir ()
            try
                let config = Path.Combine(dir, "tokenizer_config.json")
                let node = Nodes.JsonNode.Parse(File.ReadAllText config)
                node["chat_template"] <- Nodes.JsonValue.Create "{% for m in messages %}{{ m.content }}{% endfor"
                File.WriteAllText(config, node.ToJsonString())
                let cfg = { Baseline.BaselineConfig.defaults dir (xsum shared) with Limit = Some 1; RunsDir = runs; Name = "bad" }
                let m = message (fun () -> CausalBaseline.summarize ignore CausalBaseline.SummaryPrompt.defaults cfg |> ignore)
                Expect.stringContains m "chat template" "names the chat template"
                Expect.stringContains m "tokenizer_config.json" "names the file"
                let m = message (fun () -> CausalBaseline.summarize ignore { CausalBaseline.SummaryPrompt.defaults with User = "Summarize." } { cfg with Overwrite = true } |> ignore)
                Expect.stringContains m "{document}" "a user prompt without the document marker is refused"
            finally
                Directory.Delete(dir, true)
                Directory.Delete(runs, true)
    ]
