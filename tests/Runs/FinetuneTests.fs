/// Fine-tuning pretrained checkpoints (`Finetune`): a run lowers the validation loss, its Hugging Face folder
/// reloads to the same logits, LoRA trains only its adapters and a PEFT adapter folder over the base equals the
/// merged model; the from-scratch summarizer's export reloads to the same logits; the script's smoke run.
module Moe.Tests.FinetuneTests

open System
open System.IO
open Expecto
open TorchSharp
open Moe
open Moe.Config
open Moe.Models
open Moe.Seq2Seq
open Moe.Train
open Moe.Summarizer
open Moe.Finetune
open Moe.Tests.Support

/// Reloaded weights are the same bits; merged LoRA weights W + s B A differ from W x + s B (A x) by float32
/// rounding, carried through every layer: the issue's logits tolerance.
let private sameBits = 0.0
let private mergeTol = 1e-4

/// The tiny checkpoint the tests fine-tune.
let private tinyModel = "t5-tiny"

let private quiet = { RunOptions.Defaults with Progress = Silent }

let private withDir (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), "moe-finetune-tests", Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    try body dir
    finally (try Directory.Delete(dir, true) with _ -> ())

let private models (data: string) = Path.Combine(data, "..", "models") |> Path.GetFullPath

/// A few steps on a few dozen shared XSum examples.
let private tinyRun (data: string) (runsDir: string) (name: string) : FinetuneConfig =
    let d = FinetuneConfig.defaults
    { d with
        Name = name
        RunsDir = runsDir
        Model = Path.Combine(models data, tinyModel)
        Data = Path.Combine(data, ScriptOptions.smokeData)
        MaxTrain = Some 24
        MaxValid = Some 6
        MaxTest = Some 4
        MaxSourceTokens = 96
        MaxTargetTokens = 24
        Train = { d.Train with Steps = 8; BatchSize = 4; LearningRate = 1e-3; WarmupSteps = 0; LogEvery = 4; EvalEvery = 0; CheckpointEvery = 0; Device = Native.Cpu } }

/// Teacher-forced logits [N; T; V] of a model on a fixed batch of the shared examples.
let private logitsOn (model: ISeq2SeqModel) (ids: torch.Tensor) (mask: torch.Tensor) (decoderIds: torch.Tensor) : torch.Tensor =
    use _ = torch.no_grad ()
    let enc = model.Encode(ids, mask)
    (model.Decode(decoderIds, enc.Memory, mask, Unchecked.defaultof<DecoderCache>)).Logits

let private batchOf (cfg: FinetuneConfig) (pad: int) (start: int) =
    use tok = HfTokenizer.fromFolder cfg.Model
    let p = prepare cfg tok
    let ids, mask, labels = collate pad p.Valid.[.. 2]
    ids, mask, Bart.shiftTokensRight pad start labels

let private maxDiff (a: torch.Tensor) (b: torch.Tensor) = (a - b).abs().max().item<float32> () |> float

/// Sequenced: `runWith` seeds libtorch's global generator, and draws by tests running beside it change the run's
/// dropout masks (one --gc-stress run saw the 8-step validation loss rise by 0.03).
let tests =
  testSequenced <|
    testList "Finetune" [
        testWithShared "full fine-tuning lowers the validation loss; hf/ reloads to the checkpoint's logits" <| fun data ->
            withDir (fun dir ->
                let cfg = tinyRun data dir "full"
                let r = runWith quiet false cfg
                Expect.isLessThan r.ValidLossAfter r.ValidLossBefore "validation loss went down"
                use tok = HfTokenizer.fromFolder cfg.Model
                Expect.equal (prepare cfg tok).Prefix "summarize: " "T5's prefix from task_specific_params.summarization"
                Expect.equal r.Trainable r.Total "full fine-tuning trains every parameter"
                for f in [ "config.json"; "generation_config.json"; "model.safetensors"; "tokenizer.json"; "spiece.model"; "tokenizer_config.json" ] do
                    Expect.isTrue (File.Exists(Path.Combine(r.HfFolder, f))) (sprintf "hf/%s" f)
                Expect.equal (File.ReadAllText(Path.Combine(r.HfFolder, "config.json"))) (File.ReadAllText(Path.Combine(cfg.Model, "config.json")))
                    "config.json is the source checkpoint's as is"
                use exported = HfSeq2Seq.load r.HfFolder
                let names (dir: string) = Safetensors.readHeader (Path.Combine(dir, "model.safetensors")) |> fst |> List.map (fun e -> e.Name) |> set
                Expect.equal (names r.HfFolder) (names cfg.Model) "the tensors transformers saves: tied copies once"
                use trained = HfSeq2Seq.load cfg.Model
                Checkpoint.loadModel (defaultArg r.Train.BestCheckpoint r.Train.LastCheckpoint) trained.Module
                trained.Module.eval ()
                let ids, mask, dec = batchOf cfg trained.PadTokenId trained.DecoderStartTokenId
                use a = logitsOn exported.Model ids mask dec
                use b = logitsOn trained.Model ids mask dec
                Expect.equal (maxDiff a b) sameBits "identical logits"
                use pretrained = HfSeq2Seq.load cfg.Model
                use c = logitsOn pretrained.Model ids mask dec
                Expect.isGreaterThan (maxDiff a c) 0.0 "and not the pretrained model's")

        testWithShared "applyLora: outputs unchanged at start, base frozen, PEFT names and shapes" <| fun data ->
            use model = HfSeq2Seq.load (Path.Combine(models data, tinyModel))
            let cfg = tinyRun data "" "x"
            let ids, mask, dec = batchOf { cfg with Model = model.Folder } model.PadTokenId model.DecoderStartTokenId
            use before = logitsOn model.Model ids mask dec
            let adapters = applyLora { LoraSettings.defaults with r = 4 } (LoraSettings.defaultTargets "t5") model.Module
            Expect.equal adapters.Length 12 "q and v of 2 encoder self, 2 decoder self and 2 decoder cross attentions"
            use after = logitsOn model.Model ids mask dec
            Expect.equal (maxDiff before after) 0.0 "B = 0: the same function"
            let trainable = [ for struct (n, p) in model.Module.named_parameters () do if p.requires_grad then n ]
            Expect.equal (List.length trainable) 24 "only A and B train"
            Expect.all trainable isAdapterName "every trainable parameter is an adapter's"
            let names = adapterState adapters |> List.map fst
            Expect.contains names "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" "PEFT's name"
            let a, b = adapters.Head.A.weight, adapters.Head.B.weight
            Expect.equal a.shape [| 4L; 64L |] "lora_A [r; in]"
            Expect.equal b.shape [| 64L; 4L |] "lora_B [out; r]"
            Expect.isTrue (model.StateDict() |> List.exists (fun (n, _) -> n = "encoder.block.0.layer.0.SelfAttention.q.weight")) "base names unchanged"

        testWithShared "LoRA trains only adapters, leaves the base weights; the adapter folder over the base equals the merged model" <| fun data ->
            withDir (fun dir ->
                let cfg = { tinyRun data dir "lora" with Lora = Some { LoraSettings.defaults with r = 4; lora_alpha = 8.0 }; AdapterOnly = true }
                let cfg = { cfg with Train = { cfg.Train with LearningRate = 3e-2; EvalEvery = 4 } }
                let r = runWith quiet false cfg
                Expect.isLessThan r.ValidLossAfter r.ValidLossBefore "validation loss went down"
                Expect.equal r.Trainable (12L * 2L * 4L * 64L) "12 adapters of r (in + out) parameters"
                for f in [ adapterConfigName; adapterWeightsName; "tokenizer.json" ] do
                    Expect.isTrue (File.Exists(Path.Combine(r.HfFolder, f))) f
                let saved = readAdapterConfig r.HfFolder
                Expect.equal (saved.r, saved.lora_alpha, saved.target_modules) (4, 8.0, [ "q"; "v" ]) "adapter_config.json"
                // The base weights in the trained checkpoint are the pretrained ones, bit for bit.
                use pretrained = HfSeq2Seq.load cfg.Model
                use fromCheckpoint = HfSeq2Seq.load cfg.Model
                applyLora cfg.Lora.Value [ "q"; "v" ] fromCheckpoint.Module |> ignore
                Checkpoint.loadModel (defaultArg r.Train.BestCheckpoint r.Train.LastCheckpoint) fromCheckpoint.Module
                let trained = fromCheckpoint.StateDict() |> dict
                for n, t in pretrained.StateDict() do
                    Expect.equal (maxDiff trained[n] t) 0.0 (sprintf "%s unchanged" n)
                let (adapted, adapters) = loadWithAdapter cfg.Model r.HfFolder
                use adapted = adapted
                Expect.isTrue (adapters |> List.exists (fun a -> a.B.weight.abs().sum().item<float32> () > 0.0f)) "the adapters trained (B moved off zero)"
                let merged = Path.Combine(dir, "merged")
                use tok = HfTokenizer.fromFolder cfg.Model
                saveMerged false merged adapted adapters tok
                use mergedModel = HfSeq2Seq.load merged
                let ids, mask, dec = batchOf cfg adapted.PadTokenId adapted.DecoderStartTokenId
                use a = logitsOn adapted.Model ids mask dec
                use b = logitsOn mergedModel.Model ids mask dec
                Expect.isLessThanOrEqual (maxDiff a b) mergeTol "adapter over the base = merged model"
                use c = logitsOn pretrained.Model ids mask dec
                Expect.isGreaterThan (maxDiff a c) (10.0 * mergeTol) "and differs from the base")

        testSequenced <| testCase "exportRun: a from-scratch run's export reloads through HfSeq2Seq.load to identical logits" (fun () ->
            withDir (fun dir ->
                let d = SummarizerConfig.defaults
                let cfg =
                    { d with
                        Name = "scratch"
                        RunsDir = dir
                        Source = Synthetic { Moe.Corpus.CorpusConfig.defaults with TrainSize = 32; ValidSize = 4; TestSize = 4 }
                        Model = { d.Model with ModelDim = 32; Heads = 2; KvHeads = 2; EncoderLayers = 1; DecoderLayers = 1; Ffn = Dense 64 }
                        Train = { d.Train with Steps = 4; BatchSize = 8; WarmupSteps = 1; LogEvery = 2; EvalEvery = 2; CheckpointEvery = 2; Device = Native.Cpu }
                        Generate = { d.Generate with MaxLength = 8 }
                        BootstrapSamples = 10 }
                    |> SummarizerConfig.topK 2 1
                Summarizer.runWith quiet false cfg |> ignore
                let runDir = Path.Combine(dir, "scratch")
                let out = Path.Combine(dir, "export")
                exportRun false runDir out
                for f in [ "config.json"; "generation_config.json"; "model.safetensors"; moeTokenizerFileName; "README.md" ] do
                    Expect.isTrue (File.Exists(Path.Combine(out, f))) f
                Expect.stringContains (File.ReadAllText(Path.Combine(out, "README.md"))) "| lead-1 |" "the model card has the run's scores"
                Expect.throwsC (fun () -> exportRun false runDir out) (fun e -> Expect.stringContains e.Message "not empty" "refuses to overwrite")
                use loaded = Summarizer.load runDir None Native.Cpu
                use exported = HfSeq2Seq.load out
                Expect.equal exported.ModelType HfSeq2Seq.moeSummarizerType "model_type"
                let tok = loadExportedTokenizer out
                Expect.equal (tok.Encode "The council said on Tuesday") (loaded.Tokenizer.Encode "The council said on Tuesday") "the same tokenizer"
                let ids = torch.tensor([| 5L; 6L; 7L; 8L; 2L; 9L; 10L; 2L |], ReadOnlySpan<int64> [| 2L; 4L |])
                let mask = torch.ones([| 2L; 4L |], dtype = torch.ScalarType.Bool)
                let dec = torch.tensor([| 1L; 5L; 6L; 1L; 7L; 8L |], ReadOnlySpan<int64> [| 2L; 3L |])
                use a = logitsOn exported.Model ids mask dec
                use b = logitsOn (Seq2Seq.ofModel loaded.Model) ids mask dec
                Expect.equal (maxDiff a b) sameBits "identical logits"
                // The family's loss: the mean cross-entropy of the labels.
                let labels = torch.tensor([| 5L; 6L; 2L; 7L; -100L; -100L |], ReadOnlySpan<int64> [| 2L; 3L |])
                let loss, _ = exported.Loss ids mask labels
                Expect.isTrue (Double.IsFinite(loss.item<float32> () |> float)) "a finite loss"
                // The toolkit's attention multiplies by its Linear weights directly: LoRA hooks would never run there.
                let adapters = applyLora { LoraSettings.defaults with r = 2 } [ "wq" ] exported.Module
                Expect.throwsC (fun () -> checkAdaptersRun exported adapters)
                    (fun e -> Expect.stringContains e.Message "skips forward hooks" "a LoRA that would do nothing is refused, saying why")))

        testWithShared "scripts/finetune_t5.fsx --smoke: losses before/after and the table against lead-1" <| fun data ->
            withDir (fun dir ->
                let shared = Path.GetFullPath(Path.Combine(data, ".."))
                match ScriptOptions.parse shared [| "--smoke"; "--runs-dir"; dir; "--steps"; "6" |] with
                | Error e -> failtest e
                | Ok o ->
                    use w = new StringWriter()
                    let r, scores = runScript { quiet with Output = w } o
                    let text = w.ToString()
                    Expect.stringContains text "validation loss:" "prints the losses"
                    Expect.stringContains text "lead-1" "and the table"
                    Expect.equal scores.Model.N 8 "the smoke test split"
                    Expect.isLessThan r.ValidLossAfter r.ValidLossBefore "the smoke run learns")
            Expect.isError (ScriptOptions.parse "/x" [| "--model"; "m" |]) "needs --data too"
    ]
