/// The small pretrained GPT-2 (`SmallGpt2`) and the web-text loader (`WebText`): the loader's counts and
/// errors; `loadFolder` on a real Hugging Face GPT-2 folder against transformers' logits; a smoke
/// pretraining whose saved folder reloads to the same logits.
module Moe.Tests.SmallGpt2Tests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Moe
open Moe.Tests.Support

/// Logits through a save and a reload are the same float32 computation on the same weights.
let private reloadTolerance = 1e-6
/// transformers' logits printed with float32's digits; this GPT-2 sums in another order.
let private referenceTolerance = 1e-4

let private floats (e: JsonElement) = [| for x in e.EnumerateArray() -> x.GetDouble() |]

let tests =
    testSequenced <| testList "SmallGpt2" [
        testCase "web text: documents kept, empty and null texts skipped and counted, blank lines ignored" <| fun () ->
            use tmp = new TempDir("moe-webtext")
            let dir = tmp.Path
            let path = Path.Combine(dir, "c4.jsonl")
            File.WriteAllLines(path, [ """{"text": "First document.", "url": "u"}"""; """{"text": "   "}"""; ""; """{"text": null}"""; """{"text": " Second. "}""" ])
            let set = WebText.load WebText.WebTextConfig.defaults path
            Expect.equal set.Documents [| "First document."; "Second." |] "the non-empty documents, trimmed"
            Expect.equal (set.Report.Read, set.Report.Kept, set.Report.SkippedEmpty, set.Report.SkippedNull, set.Report.BlankLines) (4, 2, 1, 1, 1) "counts"
            let capped = WebText.load { WebText.WebTextConfig.defaults with MaxDocuments = Some 1 } path
            Expect.equal capped.Documents [| "First document." |] "MaxDocuments stops early"

        testCase "web text: a missing field, a non-string text and bad JSON fail naming the file and line" <| fun () ->
            use tmp = new TempDir("moe-webtext")
            let dir = tmp.Path
            let check (lines: string list) (parts: string list) =
                let path = Path.Combine(dir, Guid.NewGuid().ToString("N") + ".jsonl")
                File.WriteAllLines(path, lines)
                throwsWith (fun () -> WebText.load WebText.WebTextConfig.defaults path |> ignore) (path + ":2" :: parts) "bad web text"
            check [ """{"text": "ok"}"""; """{"body": "x"}""" ] [ "expected a field \"text\""; "body" ]
            check [ """{"text": "ok"}"""; """{"text": 3}""" ] [ "expected \"text\" to be a string" ]
            check [ """{"text": "ok"}"""; """{"text": "x" """ ] [ "malformed JSON" ]
            check [ """{"text": "ok"}"""; """[1]""" ] [ "expected a JSON object" ]
            let empty = Path.Combine(dir, "empty.jsonl")
            File.WriteAllLines(empty, [ """{"text": ""}""" ])
            throwsWith (fun () -> WebText.load WebText.WebTextConfig.defaults empty |> ignore) [ "no web-text documents"; "1 empty" ] "nothing left"

        testCase "config.json: settings the model does not compute are refused by name" <| fun () ->
            use tmp = new TempDir("moe-gpt2-config")
            let dir = tmp.Path
            let path = Path.Combine(dir, "config.json")
            let write (field: string) (value: string) =
                File.WriteAllText(path, sprintf """{"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 16, "vocab_size": 23, "%s": %s}""" field value)
            write "activation_function" "\"relu\""
            throwsWith (fun () -> SmallGpt2.readConfig path |> ignore) [ "activation_function" ] "another activation"
            write "scale_attn_by_inverse_layer_idx" "true"
            throwsWith (fun () -> SmallGpt2.readConfig path |> ignore) [ "scale_attn_by_inverse_layer_idx" ] "layer-scaled attention"
            write "n_inner" "12"
            throwsWith (fun () -> SmallGpt2.readConfig path |> ignore) [ "n_inner" ] "another MLP width"
            write "n_inner" "null"
            Expect.equal (SmallGpt2.readConfig path) { Gpt2.Gpt2Config.tiny with Positions = 16; Layers = 1 } "the sizes"

        testCase "a config.json / model.safetensors GPT-2 folder loads as transformers computes it (gpt2-tiny-hf)" <| fun () ->
            match sharedData with
            | None -> skiptest "needs ../shared (tiny Hugging Face checkpoints); absent in this clone"
            | Some data ->
                let dir = Path.Combine(data, "..", "models", "gpt2-tiny-hf")
                use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
                let sample = doc.RootElement.GetProperty "seq_doc0_alone"
                let ids = [| for row in sample.GetProperty("input_ids").EnumerateArray() do for x in row.EnumerateArray() -> x.GetInt64() |]
                use model = SmallGpt2.loadFolder dir
                use _ = torch.no_grad ()
                use input = torch.tensor(ids).view(1L, -1L)
                use logits = model.forward input
                let expected = [| for pos in (sample.GetProperty("logits_slice_first8")[0]).EnumerateArray() -> floats pos |]
                for p in 0 .. expected.Length - 1 do
                    let got = [| for v in 0 .. 7 -> logits[0L, int64 p, int64 v].ToDouble() |]
                    for v in 0 .. 7 do Expect.floatClose { absolute = referenceTolerance; relative = referenceTolerance } (got[v]) (expected[p][v]) (sprintf "logit [%d, %d]" p v)
                use loss = Gpt2.nextTokenLoss model input
                Expect.floatClose { absolute = referenceTolerance; relative = referenceTolerance } (loss.ToDouble()) (sample.GetProperty("loss").GetDouble()) "loss"

        testWithShared "smoke pretraining on C4 writes a Hugging Face folder that reloads to the same logits" <| fun data ->
            use tmp = new TempDir("moe-small-gpt2")
            let dir = tmp.Path
            let folder = Path.Combine(dir, "gpt2-small")
            let result =
                SmallGpt2.pretrain { Train.RunOptions.Defaults with Progress = Train.Silent } SmallGpt2.PretrainSettings.smoke
                    (Path.Combine(data, "c4-en-sample")) (Path.Combine(data, "gpt2-bpe")) (Path.Combine(dir, "run")) folder
            Expect.equal result.Data.Kept 20 "documents read"
            Expect.isTrue result.BestValidLoss.IsSome "validated"
            for f in [ "config.json"; "model.safetensors"; "vocab.json"; "merges.txt"; "tokenizer_config.json"; "generation_config.json" ] do
                Expect.isTrue (File.Exists(Path.Combine(folder, f))) (sprintf "%s written" f)
            let tokenizer = SmallGpt2.loadTokenizer folder
            Expect.equal (tokenizer.Encode("Hello world", false)) [| 15496; 995 |] "GPT-2's BPE"
            // the saved weights against the best checkpoint's, through the folder loader
            use fromCheckpoint = new Gpt2.Gpt2Model(SmallGpt2.PretrainSettings.smoke.Model)
            Train.Checkpoint.loadModel (Path.Combine(result.RunDir, "checkpoints", "best.ckpt")) fromCheckpoint
            use reloaded = SmallGpt2.loadFolder folder
            Expect.equal reloaded.Config SmallGpt2.PretrainSettings.smoke.Model "config.json round trip"
            use _ = torch.no_grad ()
            use ids = torch.tensor([| 15496L; 995L; 13L; 50256L; 464L |]).view(1L, -1L)
            use a = fromCheckpoint.forward ids
            use b = reloaded.forward ids
            Expect.isTrue (a.allclose(b, reloadTolerance, reloadTolerance)) "the same logits after save and reload"
    ]
