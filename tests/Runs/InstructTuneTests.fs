/// Instruction tuning of decoder-only checkpoints (`InstructTune`): LoRA with B = 0 is the base, the merged
/// export equals the adapted model, the PEFT adapter folder reloads to the same outputs, prompt tokens add
/// nothing to the gradient, recomputed activations give the plain gradients, a run on qwen2-tiny lowers the
/// validation loss, and bad input (no tokenizer, a target that matches nothing) is refused clearly.
module Moe.Tests.InstructTuneTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Moe
open Moe.Models
open Moe.Data
open Moe.Train
open Moe.Finetune
open Moe.InstructTune
open Moe.Tests.Support

type Tensor = torch.Tensor

/// Merged weights W + s B A against W x + s B (A x): float32 rounding through every layer (the issue's 1e-4).
let private mergeTol = 1e-4

let private quiet = { RunOptions.Defaults with Progress = Silent }

let private withDir (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), "moe-instruct-tests", Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    try body dir
    finally (try Directory.Delete(dir, true) with _ -> ())

let private modelDir (data: string) (name: string) = Path.Combine(data, "..", "models", name) |> Path.GetFullPath

let private maxDiff (a: Tensor) (b: Tensor) = (a - b).abs().max().item<float32> () |> float

/// Fixed ids [2; 12] below 1000 (both tiny checkpoints' vocabularies are at least that).
let private fixedIds () =
    use g = new torch.Generator(7UL)
    torch.randint(0L, 1000L, [| 2L; 12L |], dtype = torch.ScalarType.Int64, generator = g)

let private logitsOf (lm: HfCausalLM.HfCausalLM) (ids: Tensor) : Tensor =
    use _ = torch.no_grad ()
    lm.Model.Forward(ids, null, null, Unchecked.defaultof<DecoderCache>).Logits

/// Gives every adapter's B small random values, so that the adapters change the model.
let private perturb (adapters: LoraAdapter list) =
    use g = new torch.Generator(11UL)
    use _ = torch.no_grad ()
    for a in adapters do
        use r = torch.randn(a.B.weight.shape, generator = g)
        use scaled = Tensors.mulScalar 0.05 r
        a.B.weight.copy_ scaled |> ignore

let private lora r = { LoraSettings.defaults with r = r; lora_alpha = float (2 * r) }

/// A few steps on a few shared XSum documents, qwen2-tiny's chat template.
let private tinyRun (data: string) (runsDir: string) (name: string) : InstructConfig =
    let d = InstructConfig.defaults
    { d with
        Finetune =
            { d.Finetune with
                Name = name
                RunsDir = runsDir
                Model = modelDir data "qwen2-tiny"
                Data = Path.Combine(data, ScriptOptions.smokeData)
                MaxTrain = Some 8
                MaxValid = Some 2
                MaxTest = Some 2
                MaxSourceTokens = 24
                MaxTargetTokens = 16
                Lora = Some(lora 4)
                Train = { d.Finetune.Train with Steps = 6; BatchSize = 2; LearningRate = 3e-2; WarmupSteps = 0; LogEvery = 3; EvalEvery = 3
                                                Patience = 2; CheckpointEvery = 0; Device = Native.Cpu } } }

let tests =
    testSequenced <| testList "InstructTune" [
        testWithShared "LoRA with B = 0 is the base; merged export equals the adapted model; the PEFT adapter folder reloads" <| fun data ->
            withDir (fun dir ->
                let baseDir = modelDir data "llama-tiny-hf"
                use lm = HfCausalLM.load baseDir
                use ids = fixedIds ()
                use before = logitsOf lm ids
                let adapters = attachLora (lora 4) decoderTargets lm
                Expect.equal adapters.Length (2 * 7) "seven projections in each of 2 layers"
                use zeroB = logitsOf lm ids
                Expect.equal (maxDiff before zeroB) 0.0 "B = 0: the base's logits exactly"
                let trainable = [ for struct (n, p) in lm.Module.named_parameters () do if p.requires_grad then n ]
                Expect.all trainable isAdapterName "only adapters train"
                perturb adapters
                use adapted = logitsOf lm ids
                Expect.isGreaterThan (maxDiff before adapted) 1e-3 "the perturbed adapters change the logits"
                let merged = Path.Combine(dir, "merged")
                saveMerged false merged lm adapters
                use mergedLm = HfCausalLM.load merged
                use m = logitsOf mergedLm ids
                Expect.isLessThanOrEqual (maxDiff adapted m) mergeTol "merged equals unmerged (HfCausalLM.load)"
                Expect.equal (File.ReadAllText(Path.Combine(merged, "config.json"))) (File.ReadAllText(Path.Combine(baseDir, "config.json"))) "config.json as is"
                let adapterDir = Path.Combine(dir, "adapter")
                saveAdapterAs "CAUSAL_LM" adapterDir baseDir (lora 4) decoderTargets adapters
                use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(adapterDir, adapterConfigName)))
                let root = config.RootElement
                Expect.equal (root.GetProperty("task_type").GetString()) "CAUSAL_LM" "task_type"
                Expect.equal (root.GetProperty("peft_type").GetString()) "LORA" "peft_type"
                Expect.equal [ for t in root.GetProperty("target_modules").EnumerateArray() -> t.GetString() ] decoderTargets "target_modules"
                Expect.equal (root.GetProperty("lora_alpha").GetDouble()) 8.0 "lora_alpha"
                let names = Safetensors.readHeader (Path.Combine(adapterDir, adapterWeightsName)) |> fst |> List.map (fun e -> e.Name) |> set
                Expect.isTrue (names.Contains "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") "PEFT's lora_A name"
                Expect.isTrue (names.Contains "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight") "PEFT's lora_B name"
                Expect.equal names.Count (2 * 7 * 2) "A and B of each adapter"
                let reloaded, _ = loadWithAdapter baseDir adapterDir
                use reloaded = reloaded
                use r = logitsOf reloaded ids
                Expect.equal (maxDiff adapted r) 0.0 "the adapter folder over the base: the same logits")

        testWithShared "a LoRA target that matches nothing is refused, naming it and the model's modules" <| fun data ->
            use lm = HfCausalLM.load (modelDir data "llama-tiny-hf")
            throwsWith (fun () -> attachLora (lora 2) [ "q_proj"; "query" ] lm |> ignore) [ "query"; "match no Linear"; "gate_proj" ]
                "names the target that matches nothing and lists the model's Linear names"

        testWithShared "prompt tokens get zero gradient: d loss / d logits vanishes where the next token is the prompt's" <| fun data ->
            let cfg = tinyRun data "" "x"
            let tokenizer, template = openChat cfg.Finetune.Model
            use tokenizer = tokenizer
            let example = { Example.Id = "1"; Document = "The council approved the new bridge on Monday."; Summary = "A bridge was approved."; Label = None }
            let e = encodeExample tokenizer template cfg example
            Expect.isGreaterThan e.PromptLength 10 "system and user turns"
            Expect.isGreaterThan e.Ids.Length (e.PromptLength + 2) "the answer follows"
            use lm = HfCausalLM.load cfg.Finetune.Model
            attachLora (lora 2) decoderTargets lm |> ignore
            let ids, mask, labels = collate 0 [| e |]
            let out = lm.Decoder.Value.Forward(ids, mask, null, Unchecked.defaultof<DecoderCache>, labels)
            let grads = torch.autograd.grad([| out.Loss.Value |], [| out.Logits |], retain_graph = true)
            let perPosition = grads[0].abs().sum(-1L).squeeze(0L) // [L]
            let g = [| for i in 0L .. perPosition.shape[0] - 1L -> perPosition[i].item<float32> () |]
            // Logits at position i predict token i + 1: a prompt token when i + 1 < PromptLength.
            for i in 0 .. e.PromptLength - 2 do
                Expect.equal g[i] 0.0f (sprintf "position %d predicts a prompt token: no gradient" i)
            for i in e.PromptLength - 1 .. e.Ids.Length - 2 do
                Expect.isGreaterThan g[i] 0.0f (sprintf "position %d predicts an answer token" i)
            Expect.equal g[e.Ids.Length - 1] 0.0f "the last position predicts nothing"
            let lossGrads = torch.autograd.grad([| out.Loss.Value |], [| for p in lm.Module.parameters () do if p.requires_grad then p |], allow_unused = true)
            Expect.isTrue (lossGrads |> Seq.exists (fun t -> not (isNull t) && t.abs().sum().item<float32> () > 0.0f)) "the adapters get gradient"

        testWithShared "activation recomputation gives the plain loss and gradients (with LoRA dropout)" <| fun data ->
            use lm = HfCausalLM.load (modelDir data "llama-tiny-hf")
            let adapters = attachLora { lora 4 with lora_dropout = 0.1 } decoderTargets lm
            perturb adapters
            lm.Module.train ()
            use ids = fixedIds ()
            use mask = torch.ones([| 2L; 12L |], dtype = torch.ScalarType.Bool)
            use labels = ids.clone ()
            let gradsOf (recompute: bool) =
                for p in lm.Module.parameters () do (if not (isNull p.grad) then p.grad.zero_ () |> ignore)
                torch.manual_seed 5L |> ignore
                use loss = fst (batchLoss lm recompute ids mask labels)
                loss.backward ()
                loss.item<float32> (), [ for a in adapters do yield a.A.weight.grad.clone (); yield a.B.weight.grad.clone () ]
            let plainLoss, plain = gradsOf false
            let recLoss, recomputed = gradsOf true
            Expect.equal recLoss plainLoss "the same loss (same dropout masks)"
            let worst = List.map2 maxDiff plain recomputed |> List.max
            Expect.isLessThanOrEqual worst 1e-6 "the same gradients"
            Expect.isTrue (plain |> List.exists (fun t -> t.abs().sum().item<float32> () > 0.0f)) "non-zero gradients"

        testWithShared "a checkpoint without tokenizer files (llama-tiny-hf) is refused for text data, saying why" <| fun data ->
            throwsWith (fun () -> openChat (modelDir data "llama-tiny-hf") |> ignore) [ "no usable tokenizer"; "chat template" ]
                "says what is missing and why it is needed"

        testWithShared "a LoRA run on qwen2-tiny lowers the validation loss and writes a PEFT adapter folder that reloads" <| fun data ->
            withDir (fun dir ->
                let cfg = tinyRun data dir "qwen"
                let cfg = { cfg with Recompute = true; Finetune = { cfg.Finetune with AdapterOnly = true } }
                let r = runWith quiet false cfg
                Expect.isLessThan r.ValidLossAfter r.ValidLossBefore "validation loss went down"
                for f in [ adapterConfigName; adapterWeightsName; "tokenizer_config.json" ] do
                    Expect.isTrue (File.Exists(Path.Combine(r.HfFolder, f))) f
                let reloaded, adapters = loadWithAdapter cfg.Finetune.Model r.HfFolder
                use reloaded = reloaded
                Expect.isTrue (adapters |> List.exists (fun a -> a.B.weight.abs().sum().item<float32> () > 0.0f)) "trained adapters"
                let pad = padId reloaded None
                let tokenizer, template = openChat cfg.Finetune.Model
                use tokenizer = tokenizer
                let p = prepare cfg tokenizer template
                let after = meanLoss reloaded pad p.Valid 4 (torch.CPU)
                Expect.floatClose { absolute = 1e-5; relative = 1e-5 } after r.ValidLossAfter "the reloaded adapters give the run's validation loss")
    
        testWithShared "scripts/instruct_tune_qwen.fsx --smoke: qwen2-tiny tuned, the test split decoded, its table with lead-1 and the runs found" <| fun data ->
            withDir (fun runs ->
                match InstructTune.ScriptOptions.parse (Path.Combine(data, "..")) [| "--smoke"; "--runs-dir"; runs; "--steps"; "2" |] with
                | Error e -> failtest e
                | Ok o ->
                    let r, scores, table = runScript quiet o
                    Expect.equal r.Train.Steps 2 "two steps"
                    Expect.equal scores.Model.N 2 "two test documents"
                    Expect.stringContains table "qwen2-tiny + LoRA r 4" "the tuned model's row"
                    Expect.stringContains table "lead-1" "the lead-1 row"
                    Expect.isTrue (File.Exists(Path.Combine(r.HfFolder, "model.safetensors"))) "merged weights")
    ]
