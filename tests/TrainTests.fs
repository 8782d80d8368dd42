/// Tests of the training loop on a tiny next-token model with one routed sublayer.
/// Axes: B batch, S sequence, V vocabulary, D width, T tokens (B * S), E experts.
module Moe.Tests.TrainTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Train
open Moe.Tests.Support

// ---------------------------------------------------------------- a tiny model and task

/// Size of the toy problem: small enough that a step takes about a millisecond.
module Toy =
    let vocab = 12
    let dim = 16
    let experts = 4
    let seqLen = 8
    let examples = 48
    let batchSize = 8
    /// Token 0 pads; targets equal to it are ignored by the loss.
    let pad = 0L
    /// Dropout makes the run depend on libtorch's generator, which resume must restore.
    let dropout = 0.1

/// Embedding, a softmax router whose top probability gates a dense FFN residual, dropout, output head.
/// The router produces real balancing losses and statistics so the trainer's MoE plumbing is exercised.
type TinyRoutedLm(vocab: int, dim: int, experts: int) as this =
    inherit Module<torch.Tensor, torch.Tensor * MoeReport>("tiny")
    let emb = Embedding(int64 vocab, int64 dim)
    let router = Linear(int64 dim, int64 experts, hasBias = false)
    let ffn = new DenseFfn("ffn", dim, 2 * dim, GELU)
    let drop = Dropout(Toy.dropout)
    let head = Linear(int64 dim, int64 vocab)
    do this.RegisterComponents()

    member _.Router = router

    override _.forward(tokens: torch.Tensor) =
        let b, s = tokens.shape[0], tokens.shape[1]
        let x = emb.forward(tokens).reshape(-1L, int64 dim) // [T; D]
        let logits = router.forward x // [T; E]
        let probs = functional.softmax(logits, -1L) // [T; E]
        let struct (topP, topE) = probs.max(-1L) // [T], [T]
        let gate = topP.unsqueeze(-1L) // [T; 1]
        let h = Tensors.plus x (drop.forward (gate * (ffn.forward x).Output)) // [T; D]
        let out = head.forward(h).reshape(b, s, int64 vocab) // [B; S; V]
        let f = functional.one_hot(topE, int64 experts).to_type(torch.float32).mean([| 0L |]) // [E]
        let p = probs.mean([| 0L |]) // [E]
        let importance = probs.sum([| 0L |]) // [E]
        let report =
            { Aux =
                { SwitchAux = (f * p).sum() |> Tensors.mulScalar (float experts)
                  Importance = importance.var() / (Tensors.square (importance.mean()) |> Tensors.addScalar 1e-10)
                  Load = torch.zeros([||])
                  ZLoss = (Tensors.square (torch.logsumexp(logits, -1L))).mean() }
              Stats =
                { TokensPerExpert = f.detach()
                  DroppedFraction = torch.zeros([||])
                  RouterEntropy = (-(probs * (Tensors.addScalar 1e-9 probs).log()).sum(-1L).mean()).detach() } }
        out, report

/// Deterministic sequences that count upwards modulo the vocabulary, padded at the end.
let private sequences (seed: int) (step: int) : int64[][] =
    let rng = Random(seed)
    Array.init Toy.examples (fun _ ->
        let len = rng.Next(4, Toy.seqLen + 1)
        let start = rng.Next(1, Toy.vocab)
        Array.init Toy.seqLen (fun i ->
            if i < len then int64 (1 + ((start - 1 + step * i) % (Toy.vocab - 1) + (Toy.vocab - 1)) % (Toy.vocab - 1))
            else Toy.pad))

/// Training batches of one epoch: a shuffle that depends only on (seed, epoch), cut into index arrays.
let private epochOrder (seed: int) (epoch: int) : seq<int[]> =
    let rng = Random(seed * 7919 + epoch)
    let order = Array.init Toy.examples id
    for i in order.Length - 1 .. -1 .. 1 do
        let j = rng.Next(i + 1)
        let t = order[i]
        order[i] <- order[j]
        order[j] <- t
    Seq.chunkBySize Toy.batchSize order

type private ToyTask =
    { Task: TrainTask<int[]>
      Model: TinyRoutedLm }

/// The toy task. `initSeed` seeds the model's initial weights; `validStep` is the counting step of the
/// validation sequences (1 as in training; -1 makes validation disagree with training).
let private toyTask (initSeed: int) (validStep: int) (batches: int -> int -> seq<int[]>) : ToyTask =
    Native.seedAll initSeed
    let model = new TinyRoutedLm(Toy.vocab, Toy.dim, Toy.experts)
    let train = sequences 5 1
    let valid = sequences 6 validStep
    let lossOf (data: int64[][]) (phase: Phase) (idx: int[]) =
        let rows = idx |> Array.map (fun i -> data[i])
        use flat = torch.tensor(Array.concat rows)
        use all = flat.reshape(int64 rows.Length, int64 Toy.seqLen) // [B; S]
        let inputs = all.narrow(1L, 0L, int64 Toy.seqLen - 1L) // [B; S-1]
        let targets = all.narrow(1L, 1L, int64 Toy.seqLen - 1L) // [B; S-1]
        let logits, report = model.forward inputs
        let ce = crossEntropy (if phase = Training then 0.05 else 0.0) Toy.pad logits targets
        { TaskLoss = ce.Loss; Moe = [ { Layer = "tiny.0"; Report = report } ]; Tokens = ce.Tokens }
    { Model = model
      Task =
        { Model = model
          TrainBatches = batches
          ValidBatches = fun () -> Seq.chunkBySize 16 [| 0 .. Toy.examples - 1 |]
          Loss = fun phase idx -> (if phase = Training then lossOf train else lossOf valid) phase idx
          Config = [ "toy", box {| Vocab = Toy.vocab; Dim = Toy.dim; Experts = Toy.experts |} ]
          Tokenizer = "{\"toy\": \"identity\"}" } }

let private quiet = { RunOptions.Defaults with Progress = Silent }

/// A tiny MoE encoder-decoder (top-2 of 4 experts, dropout on) that copies its source through
/// cross-attention: the model the Bf16 tests train, since mixed precision is a property of `Models`.
let private copyTask (initSeed: int) : TrainTask<int[]> * Models.EncoderDecoder =
    Native.seedAll initSeed
    let moe = { MoeConfig.defaults with ModelDim = Toy.dim; ExpertHidden = 2 * Toy.dim
                                        Router = { RouterConfig.defaults with Experts = Toy.experts; K = 2 } }
    let modelCfg =
        { Models.ModelConfig.defaults with
            VocabSize = Toy.vocab; ModelDim = Toy.dim; Heads = 2; KvHeads = 2; EncoderLayers = 1; DecoderLayers = 1
            Dropout = Toy.dropout; MaxLength = Toy.seqLen; Ffn = Models.Moe moe }
    let model = new Models.EncoderDecoder(modelCfg)
    let train, valid = sequences 5 1, sequences 6 1
    let lossOf (data: int64[][]) (phase: Phase) (idx: int[]) =
        let rows = idx |> Array.map (fun i -> data[i])
        let all = torch.tensor(Array.concat rows).reshape(int64 rows.Length, int64 Toy.seqLen) // [B; S]
        let valid = all.ne(torch.tensor Toy.pad) // [B; S]
        let input = all.narrow(1L, 0L, int64 Toy.seqLen - 1L) // [B; S-1]
        let target = all.narrow(1L, 1L, int64 Toy.seqLen - 1L) // [B; S-1]
        let out = model.Forward(all, input, valid, valid.narrow(1L, 0L, int64 Toy.seqLen - 1L))
        let ce = crossEntropy (if phase = Training then 0.05 else 0.0) Toy.pad out.Logits target
        { TaskLoss = ce.Loss; Moe = out.Moe; Tokens = ce.Tokens }
    { Model = model
      TrainBatches = epochOrder
      ValidBatches = fun () -> Seq.chunkBySize 16 [| 0 .. Toy.examples - 1 |]
      Loss = fun phase idx -> (if phase = Training then lossOf train else lossOf valid) phase idx
      Config = [ "model", box modelCfg ]
      Tokenizer = "" },
    model

let private cfg =
    { TrainConfig.defaults with
        Steps = 12
        BatchSize = Toy.batchSize
        LearningRate = 1e-2
        WarmupSteps = 3
        GradAccumulation = 2
        LabelSmoothing = 0.05
        LogEvery = 1
        EvalEvery = 4
        CheckpointEvery = 4
        Device = Native.Cpu }

/// A fresh run folder under the temp directory, deleted afterwards.
let private withRunDir (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), "moe-train-tests", Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    try body dir
    finally (try Directory.Delete(dir, true) with _ -> ())

let private jsonLines (path: string) : JsonNode list =
    File.ReadAllLines path |> Array.filter (String.IsNullOrWhiteSpace >> not) |> Array.map JsonNode.Parse |> List.ofArray

let private trainLosses (runDir: string) : (int * float)[] =
    jsonLines (Path.Combine(runDir, RunFiles.metricsName))
    |> List.filter (fun n -> n["split"].GetValue<string>() = "train")
    |> List.map (fun n -> n["step"].GetValue<int>(), n["loss"].GetValue<float>())
    |> Array.ofList

let private validLosses (runDir: string) : (int * float)[] =
    jsonLines (Path.Combine(runDir, RunFiles.metricsName))
    |> List.filter (fun n -> n["split"].GetValue<string>() = "valid")
    |> List.map (fun n -> n["step"].GetValue<int>(), n["loss"].GetValue<float>())
    |> Array.ofList

let private parameters (m: torch.nn.Module) : float32[] =
    m.parameters () |> Seq.collect (fun p -> Tensors.toFloats p) |> Array.ofSeq

/// Losses computed in float32 repeat exactly on one CPU thread layout; this allows for summation order.
let private resumeTol = Tol.f32

// ---------------------------------------------------------------- run folders and checkpoints

/// A stream that fails like a full disk once `limit` bytes have been written.
type private FullDisk(inner: Stream, limit: int64) =
    inherit Stream()
    let mutable written = 0L
    override _.CanRead = false
    override _.CanSeek = inner.CanSeek
    override _.CanWrite = true
    override _.Length = inner.Length
    override _.Position with get () = inner.Position and set v = inner.Position <- v
    override _.Flush() = inner.Flush()
    override _.Read(_, _, _) = raise (NotSupportedException())
    override _.Seek(o, origin) = inner.Seek(o, origin)
    override _.SetLength v = inner.SetLength v
    override _.Write(buffer: byte[], offset: int, count: int) =
        if written + int64 count > limit then raise (IOException "No space left on device")
        written <- written + int64 count
        inner.Write(buffer, offset, count)
    override _.Dispose(disposing: bool) =
        if disposing then inner.Dispose()
        base.Dispose disposing

/// The checkpoint files of a run folder, by name.
let private checkpointNames (dir: string) =
    Directory.GetFiles(Checkpoint.folder dir) |> Array.map Path.GetFileName |> Array.sort |> List.ofArray

let private reliability =
    testList "reliability" [
        testCase "the last KeepCheckpoints checkpoints are kept, older ones under their step, best apart" <| fun () ->
            for keep, expected in [ 1, [ "best.ckpt"; "last.ckpt" ]
                                    2, [ "best.ckpt"; "last.ckpt"; "step-00000008.ckpt" ]
                                    3, [ "best.ckpt"; "last.ckpt"; "step-00000004.ckpt"; "step-00000008.ckpt" ] ] do
                withRunDir (fun dir ->
                    let t = toyTask 1 1 epochOrder
                    runWith { quiet with KeepCheckpoints = keep } cfg t.Task dir |> ignore
                    Expect.equal (checkpointNames dir) expected (sprintf "KeepCheckpoints = %d" keep)
                    for f in Directory.GetFiles(Checkpoint.folder dir, "step-*.ckpt") do
                        let step = (Checkpoint.readMeta f).State.Step
                        Expect.equal (Checkpoint.stepName step) (Path.GetFileName f) "named by the step it holds")

        testCase "a truncated newest checkpoint: resume falls back to the previous one, says why, same curve" <| fun () ->
            withRunDir (fun whole ->
            withRunDir (fun broken ->
                runWith quiet cfg (toyTask 1 1 epochOrder).Task whole |> ignore
                use stop = new Threading.CancellationTokenSource()
                let t = toyTask 1 1 epochOrder
                runWith { quiet with OnStep = (fun r -> if r.Step = 10 then stop.Cancel()); Cancel = stop.Token } cfg t.Task broken |> ignore
                let last = Checkpoint.last broken
                Expect.equal ((Checkpoint.readMeta last).State.Step) 10 "stopped at step 10"
                let bytes = File.ReadAllBytes last
                File.WriteAllBytes(last, bytes[.. bytes.Length / 2])
                let said = new StringWriter()
                let r = resumeWith { quiet with Progress = Lines; Output = said } cfg (toyTask 99 1 epochOrder).Task broken
                Expect.equal r.Steps 12 "finished"
                let text = said.ToString()
                Expect.stringContains text (sprintf "resume: skipped %s" last) "names the skipped file"
                Expect.stringContains text "truncated" "and why"
                Expect.stringContains text ("resumed at step 8 from " + Path.Combine(Checkpoint.folder broken, Checkpoint.stepName 8)) "from the step-8 checkpoint"
                let la, lb = trainLosses whole, trainLosses broken
                Expect.equal (Array.map fst lb) (Array.map fst la) "same steps logged"
                for (s, x), (_, y) in Array.zip la lb do
                    Expect.floatClose { absolute = resumeTol; relative = resumeTol } y x (sprintf "train loss at step %d" s)))

        testCase "every checkpoint unusable: resume says so, naming each file and why" <| fun () ->
            withRunDir (fun dir ->
                runWith quiet { cfg with Steps = 8 } (toyTask 1 1 epochOrder).Task dir |> ignore
                for f in Directory.GetFiles(Checkpoint.folder dir, "*.ckpt") do File.WriteAllBytes(f, "MOECKPT1 cut"B)
                Expect.throwsC (fun () -> resumeWith quiet { cfg with Steps = 8 } (toyTask 1 1 epochOrder).Task dir |> ignore)
                    (fun e ->
                        Expect.stringContains e.Message "no checkpoint could be loaded" "says so"
                        for f in Directory.GetFiles(Checkpoint.folder dir, "*.ckpt") do
                            Expect.stringContains e.Message f "names each file"
                        Expect.stringContains e.Message "truncated" "and why"))

        testCase "ResumeFrom restarts from an explicit checkpoint; later ones are set aside" <| fun () ->
            withRunDir (fun whole ->
            withRunDir (fun dir ->
                runWith quiet cfg (toyTask 1 1 epochOrder).Task whole |> ignore
                runWith { quiet with KeepCheckpoints = 3 } cfg (toyTask 1 1 epochOrder).Task dir |> ignore
                let at4 = Path.Combine(Checkpoint.folder dir, Checkpoint.stepName 4)
                let r = resumeWith { quiet with ResumeFrom = Some at4 } cfg (toyTask 99 1 epochOrder).Task dir
                Expect.equal r.Steps 12 "finished again"
                let aside = Directory.GetDirectories(Checkpoint.folder dir, "after-step-4-*")
                Expect.equal aside.Length 1 "one folder of set-aside checkpoints"
                Expect.equal (Directory.GetFiles aside[0] |> Array.map Path.GetFileName |> Array.sort)
                    [| "best.ckpt"; "last.ckpt"; "step-00000008.ckpt" |] "the checkpoints after step 4"
                for (s, x), (_, y) in Array.zip (trainLosses whole) (trainLosses dir) do
                    Expect.floatClose { absolute = resumeTol; relative = resumeTol } y x (sprintf "train loss at step %d" s)))

        testCase "a write failure mid-checkpoint: clear error, the previous checkpoints whole, no temporary left" <| fun () ->
            withRunDir (fun dir ->
                let t = toyTask 1 1 epochOrder
                runWith quiet { cfg with Steps = 8 } t.Task dir |> ignore
                let files = Directory.GetFiles(Checkpoint.folder dir) |> Array.sort
                let before = files |> Array.map File.ReadAllBytes
                let last = Checkpoint.last dir
                let meta = Checkpoint.readMeta last
                use optimizer = makeOptimizer cfg t.Model
                let fullDisk (tmp: string) = new FullDisk(Checkpoint.openTemporary tmp, int64 before[1].Length / 2L) :> Stream
                Expect.throwsC (fun () ->
                    Checkpoint.saveLastVia fullDisk 2 dir t.Model optimizer { meta with State = { meta.State with Step = 9 } })
                    (fun e ->
                        Expect.isTrue (e :? Checkpoint.WriteFailedException) (sprintf "a WriteFailedException, got %s" (e.GetType().Name))
                        Expect.stringContains e.Message (sprintf "could not write %s (No space left on device)" last) "names the file and the cause"
                        Expect.stringContains e.Message "unchanged" "says the old file stands")
                Expect.equal (Directory.GetFiles(Checkpoint.folder dir) |> Array.sort) files "no file added, none removed"
                Array.iter2 (fun f (b: byte[]) -> Expect.sequenceEqual (File.ReadAllBytes f) b (sprintf "%s unchanged" f)) files before
                Expect.equal (Checkpoint.readMeta last).State.Step 8 "last.ckpt still loads"
                // A run file's write fails the same way.
                let metricsBefore = File.ReadAllBytes(Path.Combine(dir, RunFiles.metricsName))
                Expect.throwsT<Checkpoint.WriteFailedException> (fun () ->
                    Checkpoint.writeAtomicVia (fun tmp -> new FullDisk(Checkpoint.openTemporary tmp, 10L) :> Stream)
                        (Path.Combine(dir, RunFiles.metricsName)) (fun fs -> fs.Write(metricsBefore, 0, metricsBefore.Length)))
                    "a run file's failed write raises the same error"
                Expect.sequenceEqual (File.ReadAllBytes(Path.Combine(dir, RunFiles.metricsName))) metricsBefore "metrics.jsonl unchanged"
                Expect.isEmpty (Directory.GetFiles(dir, ".*.tmp-*", SearchOption.AllDirectories)) "no temporary left")

        testCase "a fresh run refuses a folder holding a run unless Overwrite; the folder is locked while it runs" <| fun () ->
            withRunDir (fun dir ->
                let heldDuring = ref false
                let opts = { quiet with OnStep = fun _ -> heldDuring.Value <- RunFolder.isHeld dir }
                runWith opts { cfg with Steps = 4 } (toyTask 1 1 epochOrder).Task dir |> ignore
                Expect.isTrue heldDuring.Value "locked while training"
                Expect.isFalse (RunFolder.isHeld dir) "released at the end"
                let before = File.ReadAllBytes(Checkpoint.last dir)
                Expect.throwsC (fun () -> runWith quiet { cfg with Steps = 4 } (toyTask 2 1 epochOrder).Task dir |> ignore)
                    (fun e ->
                        Expect.isTrue (e :? ArgumentException) "bad input"
                        Expect.stringContains e.Message "already holds a run (checkpoints/best.ckpt, checkpoints/last.ckpt, metrics.jsonl)" "names what it found"
                        Expect.stringContains e.Message "Overwrite" "and the way to replace it")
                Expect.sequenceEqual (File.ReadAllBytes(Checkpoint.last dir)) before "the run is untouched"
                Expect.isFalse (RunFolder.isHeld dir) "released after the refusal"
                let r = runWith { quiet with Overwrite = true } { cfg with Steps = 4 } (toyTask 2 1 epochOrder).Task dir
                Expect.equal r.Steps 4 "Overwrite trains from scratch"
                Expect.equal (trainLosses dir |> Array.map fst) [| 1; 2; 3; 4 |] "a fresh log")
    ]

// ---------------------------------------------------------------- tests

/// Sequenced: these tests seed and draw from libtorch's global generator and count live tensors, and
/// Expecto runs sequenced tests after the parallel ones, one at a time.
let tests =
  testSequenced <|
    testList "Train" [
        testList "learning rate" [
            let lrCfg = { TrainConfig.defaults with Steps = 100; WarmupSteps = 10; LearningRate = 1e-3; MinLrRatio = 0.1 }
            testCase "warmup rises linearly to the peak" <| fun () ->
                for s in 0 .. 9 do
                    Expect.floatClose Accuracy.high (learningRate lrCfg s) (1e-3 * float (s + 1) / 10.0) (sprintf "step %d" s)
                Expect.floatClose Accuracy.high (learningRate lrCfg 10) 1e-3 "peak right after warmup"

            testCase "cosine decays monotonically to the floor at the last step" <| fun () ->
                let lrs = [| for s in 10 .. 99 -> learningRate lrCfg s |]
                for a, b in Array.pairwise lrs do Expect.isLessThanOrEqual b (a + 1e-15) "non-increasing"
                Expect.floatClose Accuracy.high lrs[lrs.Length - 1] 1e-4 "ends at MinLrRatio x peak"
                let mid = learningRate lrCfg (10 + 89 / 2)
                Expect.isTrue (mid > 4e-4 && mid < 7e-4) (sprintf "halfway near the mean of peak and floor, got %g" mid)

            testCase "inverse square root follows peak * sqrt(warmup / step), floored" <| fun () ->
                let c = { lrCfg with Schedule = InverseSqrt; MinLrRatio = 0.2 }
                Expect.floatClose Accuracy.high (learningRate c 39) (1e-3 * sqrt (10.0 / 40.0)) "step 40"
                Expect.floatClose Accuracy.high (learningRate c 99) (max 2e-4 (1e-3 * sqrt (10.0 / 100.0))) "floored"
                let far = { c with Steps = 10000 }
                Expect.floatClose Accuracy.high (learningRate far 9999) 2e-4 "the floor holds late"

            testCase "constant stays at the peak; no warmup starts at the peak" <| fun () ->
                let c = { lrCfg with Schedule = Constant; WarmupSteps = 0 }
                for s in [ 0; 50; 99 ] do Expect.floatClose Accuracy.high (learningRate c s) 1e-3 (sprintf "step %d" s)
        ]

        testCase "validate lists every problem at once" <| fun () ->
            Expect.isEmpty (TrainConfig.validate TrainConfig.defaults) "defaults are valid"
            let bad =
                { TrainConfig.defaults with
                    Steps = 0; LearningRate = -1.0; Beta2 = 1.0; GradAccumulation = 0; LabelSmoothing = 1.0
                    Patience = 3; EvalEvery = 0; LossWeights = { LossWeights.defaults with ZLoss = -1.0 } }
            let problems = TrainConfig.validate bad
            for field in [ "Steps"; "LearningRate"; "Beta2"; "GradAccumulation"; "LabelSmoothing"; "Patience"; "LossWeights.ZLoss" ] do
                Expect.exists problems (fun p -> p.Contains field) (sprintf "names %s in %A" field problems)
            let ex = Expect.throwsC (fun () -> Config.orFail "TrainConfig" problems bad |> ignore) id
            Expect.stringContains ex.Message "LearningRate must be > 0" "one error lists them"

        testList "json" [
            testCase "a config round-trips through JSON" <| fun () ->
                let c = { cfg with Schedule = InverseSqrt; Device = Native.Cuda; LossWeights = LossWeights.none }
                Expect.equal (Json.deserialize<TrainConfig> (Json.serialize c)) (Ok c) "round trip"
                Expect.equal (Json.ofNode<TrainConfig> (Json.toNode c)) (Ok c) "nodes built in code read back too"
                let moe = { MoeConfig.defaults with Router = { RouterConfig.defaults with Capacity = Factor 1.25; BiasUpdateRate = Some 0.001; Selection = TokenChoiceTopK(TopKThenNormalise, false) } }
                Expect.equal (Json.deserialize<MoeConfig> (Json.serialize moe)) (Ok moe) "unions with fields and options"

            testCase "a partial file overrides only what it names; mistakes are all reported" <| fun () ->
                match Json.deserializeOver TrainConfig.defaults """{"Steps": 50, "Schedule": "Constant", "LossWeights": {"ZLoss": 0}}""" with
                | Ok c ->
                    Expect.equal c { TrainConfig.defaults with Steps = 50; Schedule = Constant; LossWeights = { LossWeights.defaults with ZLoss = 0.0 } } "overrides"
                | Error e -> failtestf "unexpected %A" e
                match Json.deserializeOver TrainConfig.defaults """{"Stepz": 5, "Schedule": "Cos", "LearningRate": "fast"}""" with
                | Error problems ->
                    Expect.equal problems.Length 3 (sprintf "three problems: %A" problems)
                    Expect.exists problems (fun p -> p.Contains "unknown field 'Stepz'") "typo"
                    Expect.exists problems (fun p -> p.Contains "Cosine|InverseSqrt|Constant") "lists the cases"
                    Expect.exists problems (fun p -> p.Contains "config.LearningRate: expected a number") "path and expectation"
                | Ok _ -> failtest "expected errors"

            testCase "command-line assignments set nested fields, typed by the record" <| fun () ->
                let node = JsonNode.Parse "{\"train\": {\"Steps\": 10}}"
                match Json.applyAssignments node [ "train.Steps=500"; "train.Schedule=InverseSqrt"; "train.LossWeights.ZLoss=0"; "train.Device=\"Cpu\"" ] with
                | Ok n ->
                    match Json.readOver TrainConfig.defaults n["train"] with
                    | Ok c ->
                        Expect.equal c { TrainConfig.defaults with Steps = 500; Schedule = InverseSqrt; Device = Native.Cpu
                                                                   LossWeights = { LossWeights.defaults with ZLoss = 0.0 } } "applied"
                    | Error e -> failtestf "unexpected %A" e
                | Error e -> failtestf "unexpected %A" e
                match Json.applyAssignments node [ "noequals"; "train.Steps.x=1" ] with
                | Error es -> Expect.equal es.Length 2 (sprintf "both reported: %A" es)
                | Ok _ -> failtest "expected errors"
        ]

        testCase "cross-entropy with label smoothing and padding matches the formula" <| fun () ->
            use logits = torch.randn([| 2L; 3L; 5L |])
            use flat = torch.tensor([| 1L; 0L; 4L; 2L; 0L; 0L |])
            use targets = flat.reshape(2L, 3L)
            let eps = 0.1
            let r = crossEntropy eps 0L logits targets
            let lp = Tensors.toFloats (functional.log_softmax(logits, -1L)) |> Array.map float
            let tg = Tensors.toInt64s targets
            let per =
                [ for i in 0 .. 5 do
                    if tg[i] <> 0L then
                        let row = lp[i * 5 .. i * 5 + 4]
                        -(1.0 - eps) * row[int tg[i]] - eps / 5.0 * Array.sum row ]
            Expect.equal r.Tokens 3L "padding is not counted"
            Expect.floatClose Accuracy.medium (Tensors.scalar r.Loss) (List.average per) "mean over counted tokens"
            use allPad = torch.zeros([| 2L; 3L |], dtype = torch.int64)
            Expect.floatClose Accuracy.high (Tensors.scalar (crossEntropy eps 0L logits allPad).Loss) 0.0 "no tokens, zero loss"
            Expect.throwsC (fun () -> crossEntropy eps 0L logits (torch.zeros([| 3L; 2L |], dtype = torch.int64)) |> ignore)
                (fun e -> Expect.stringContains e.Message "expected targets [2; 3] int64" "shape message")

        testCase "aux loss weights are applied once; weight 0 turns a loss off" <| fun () ->
            use task = torch.tensor(2.0f)
            let aux (v: float32) : AuxLosses = { SwitchAux = torch.tensor(v); Importance = torch.tensor(v); Load = torch.tensor(v); ZLoss = torch.tensor(v) }
            let stats = { TokensPerExpert = torch.ones(2L); DroppedFraction = torch.zeros([||]); RouterEntropy = torch.zeros([||]) }
            let parts (v: float32) = { TaskLoss = task; Moe = [ for l in [ "a"; "b" ] -> { Layer = l; Report = { Aux = aux v; Stats = stats } } ]; Tokens = 4L }
            let w : LossWeights = { SwitchAux = 0.1; Importance = 0.0; Load = 0.0; ZLoss = 0.01 }
            Expect.floatClose Accuracy.medium (Tensors.scalar (totalLoss w (parts 3.0f))) (2.0 + 2.0 * (0.1 * 3.0 + 0.01 * 3.0)) "task + sum over layers of w * aux"
            Expect.floatClose Accuracy.high (Tensors.scalar (totalLoss LossWeights.none (parts nanf))) 2.0 "all off: NaN aux never enters"
            Expect.isTrue (Double.IsNaN(Tensors.scalar (totalLoss { LossWeights.none with Load = 1.0 } (parts nanf)))) "one on: it enters"

        testCase "aux weights 0 leave the router trained by the task loss only" <| fun () ->
            let t = toyTask 3 1 epochOrder
            let p = t.Task.Loss Training [| 0 .. 7 |]
            let off = totalLoss LossWeights.none p
            let on = totalLoss { LossWeights.none with SwitchAux = 1.0; ZLoss = 1.0 } p
            Expect.floatClose Accuracy.high (Tensors.scalar off) (Tensors.scalar p.TaskLoss) "total = task loss"
            let routerGrad (loss: torch.Tensor) =
                t.Model.zero_grad ()
                loss.backward(retain_graph = true)
                Tensors.toFloats t.Model.Router.weight.grad
            let gOff, gOn = routerGrad off, routerGrad on
            Expect.isGreaterThan (Array.map2 (fun a b -> abs (a - b)) gOff gOn |> Array.max) 1e-6f "aux changes the router gradient"

        testCase "run writes metrics, routing and config lines with the documented fields" <| fun () ->
            withRunDir (fun dir ->
                let t = toyTask 1 1 epochOrder
                let r = runWith quiet cfg t.Task dir
                Expect.equal r.Steps 12 "all steps"
                Expect.equal r.Stop Completed "completed"
                let lines = jsonLines (Path.Combine(dir, RunFiles.metricsName))
                let train = lines |> List.filter (fun n -> n["split"].GetValue<string>() = "train")
                Expect.equal train.Length 12 "one train line per step (LogEvery 1)"
                for n in train do
                    for f in [ "step"; "loss"; "task_loss"; "lr"; "tokens_per_s"; "elapsed_s" ] do
                        Expect.isNotNull n[f] (sprintf "field %s" f)
                    for a in [ "switch_aux"; "importance"; "load"; "z_loss" ] do
                        let auxNode = n["aux"]
                        Expect.isNotNull auxNode[a] (sprintf "aux.%s" a)
                    Expect.isGreaterThan (n["loss"].GetValue<float>()) (n["task_loss"].GetValue<float>()) "aux weights add to the loss"
                Expect.floatClose Accuracy.high (train.Head["lr"].GetValue<float>()) (learningRate cfg 0) "lr of step 1"
                let valid = lines |> List.filter (fun n -> n["split"].GetValue<string>() = "valid")
                Expect.equal (valid |> List.map (fun n -> n["step"].GetValue<int>())) [ 4; 8; 12 ] "valid every 4 steps"
                let routing = jsonLines (Path.Combine(dir, RunFiles.routingName))
                Expect.equal routing.Length 12 "one layer x 12 log steps"
                for n in routing do
                    Expect.equal (n["layer"].GetValue<string>()) "tiny.0" "layer name"
                    let tpe = n["tokens_per_expert"].AsArray() |> Seq.map (fun x -> x.GetValue<float>()) |> Array.ofSeq
                    Expect.equal tpe.Length Toy.experts "E fractions"
                    Expect.floatClose Accuracy.medium (Array.sum tpe) 1.0 "fractions sum to 1"
                    Expect.isNotNull n["dropped_fraction"] "dropped_fraction"
                    Expect.isGreaterThan (n["router_entropy"].GetValue<float>()) 0.0 "entropy"
                let config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, RunFiles.configName)))
                let trainSection, toySection = config["Train"], config["toy"]
                Expect.equal (trainSection["Steps"].GetValue<int>()) 12 "train section"
                Expect.equal (toySection["Experts"].GetValue<int>()) Toy.experts "task section"
                let first, last = snd (Array.head (trainLosses dir)), snd (Array.last (trainLosses dir))
                Expect.isLessThan last first "the loss goes down")

        testCase "a crash mid-write leaves the previous checkpoint loadable" <| fun () ->
            withRunDir (fun dir ->
                let t = toyTask 1 1 epochOrder
                runWith quiet { cfg with Steps = 4 } t.Task dir |> ignore
                let last = Checkpoint.last dir
                let before = File.ReadAllBytes last
                // A write that dies halfway: the temporary file is left behind, the checkpoint untouched.
                Expect.throwsT<Checkpoint.WriteFailedException> (fun () ->
                    Checkpoint.writeAtomic last (fun fs ->
                        fs.Write(before, 0, before.Length / 2)
                        raise (IOException "disk pulled"))) "the failure propagates"
                // A process killed mid-write cannot clean up: simulate its partial temp file.
                File.WriteAllBytes(Path.Combine(Checkpoint.folder dir, ".last.ckpt.tmp-crashed"), before[.. before.Length / 3])
                Expect.sequenceEqual (File.ReadAllBytes last) before "the last good checkpoint is unchanged"
                let meta = Checkpoint.readMeta last
                Expect.equal meta.State.Step 4 "loadable, at step 4"
                Expect.equal meta.Tokenizer "{\"toy\": \"identity\"}" "tokenizer mapping saved"
                Expect.equal meta.Train { cfg with Steps = 4 } "config saved"
                // A truncated file is refused with a clear message, never half-loaded.
                let truncated = Path.Combine(dir, "truncated.ckpt")
                File.WriteAllBytes(truncated, before[.. before.Length - 20])
                Expect.throwsC (fun () -> Checkpoint.readMeta truncated |> ignore)
                    (fun e -> Expect.stringContains e.Message "truncated" "says truncated")
                // The leftover is cleaned when training resumes from the good checkpoint.
                let again = toyTask 2 1 epochOrder
                Checkpoint.loadModel last again.Model
                Expect.sequenceEqual (parameters again.Model) (parameters t.Model) "weights restored"
                resumeWith quiet { cfg with Steps = 4 } again.Task dir |> ignore
                Expect.isEmpty (Directory.GetFiles(Checkpoint.folder dir, ".*.tmp-*")) "temporaries removed")

        testCase "resuming after a crash gives the uninterrupted loss curve" <| fun () ->
            withRunDir (fun whole ->
            withRunDir (fun broken ->
                let a = toyTask 1 1 epochOrder
                runWith quiet cfg a.Task whole |> ignore
                // Dies reading the 15th micro-batch, in step 8 of 12: after the step-4 checkpoint, before step 8's.
                let served = ref 0
                let crashing seed epoch =
                    epochOrder seed epoch |> Seq.map (fun b ->
                        served.Value <- served.Value + 1
                        if served.Value = 15 then raise (OperationCanceledException "killed") else b)
                let b = toyTask 1 1 crashing
                Expect.throwsT<OperationCanceledException> (fun () -> runWith quiet cfg b.Task broken |> ignore) "the run dies"
                Expect.equal ((Checkpoint.readMeta (Checkpoint.last broken)).State.Step) 4 "last checkpoint at step 4"
                Expect.equal (trainLosses broken).Length 7 "lines up to step 7 were written before the crash"
                // A fresh process: new model with other initial weights, resumed from the checkpoint.
                let c = toyTask 99 1 epochOrder
                let r = resumeWith quiet cfg c.Task broken
                Expect.equal r.Steps 12 "finished"
                let la, lb = trainLosses whole, trainLosses broken
                Expect.equal (Array.map fst lb) (Array.map fst la) "same steps logged, no duplicates"
                for (s, x), (_, y) in Array.zip la lb do
                    Expect.floatClose { absolute = resumeTol; relative = resumeTol } y x (sprintf "train loss at step %d" s)
                for (s, x), (_, y) in Array.zip (validLosses whole) (validLosses broken) do
                    Expect.floatClose { absolute = resumeTol; relative = resumeTol } y x (sprintf "valid loss at step %d" s)
                let pa, pc = parameters a.Model, parameters c.Model
                let maxDiff = Array.map2 (fun (x: float32) y -> abs (x - y)) pa pc |> Array.max
                Expect.isLessThan (float maxDiff) resumeTol "final weights agree"))

        testCase "a cancelled run checkpoints, and resuming it continues to the end" <| fun () ->
            withRunDir (fun dir ->
                let t = toyTask 1 1 epochOrder
                use stop = new Threading.CancellationTokenSource()
                let opts = { quiet with OnStep = (fun r -> if r.Step = 5 then stop.Cancel()); Cancel = stop.Token }
                let r = runWith opts cfg t.Task dir
                Expect.equal (r.Stop, r.Steps) (Cancelled, 5) "stopped after step 5"
                Expect.equal ((Checkpoint.readMeta (Checkpoint.last dir)).State.Step) 5 "checkpoint at the stop"
                let again = resumeWith quiet cfg t.Task dir
                Expect.equal (again.Stop, again.Steps) (Completed, 12) "continued to the end")

        testCase "resume refuses a config that changes the schedule" <| fun () ->
            withRunDir (fun dir ->
                let t = toyTask 1 1 epochOrder
                runWith quiet { cfg with Steps = 4 } t.Task dir |> ignore
                Expect.throwsC (fun () -> resumeWith quiet { cfg with Steps = 4; LearningRate = 0.5 } t.Task dir |> ignore)
                    (fun e -> Expect.stringContains e.Message "LearningRate" "names the field")
                Expect.throwsC (fun () -> resumeWith quiet cfg t.Task (Path.Combine(dir, "nowhere")) |> ignore)
                    (fun e -> Expect.stringContains e.Message "expected a checkpoint" "no checkpoint"))

        testCase "a NaN loss skips the step without an update and is counted" <| fun () ->
            withRunDir (fun dir ->
                let t = toyTask 1 1 epochOrder
                let calls = ref 0
                let poisoned =
                    { t.Task with
                        Loss = fun phase b ->
                            let p = t.Task.Loss phase b
                            if phase = Training then calls.Value <- calls.Value + 1
                            // micro-batch 5 belongs to step 3 (two per step)
                            if phase = Training && calls.Value = 5 then { p with TaskLoss = Tensors.mulScalar nan p.TaskLoss } else p }
                let snapshots = Collections.Generic.List<bool * float32[]>()
                let opts = { quiet with OnStep = fun r -> snapshots.Add((r.Skipped, parameters t.Model)) }
                let r = runWith opts { cfg with Steps = 5 } poisoned dir
                Expect.equal r.BadSteps 1 "counted"
                Expect.equal r.Steps 5 "training went on"
                Expect.equal (snapshots |> Seq.map fst |> List.ofSeq) [ false; false; true; false; false ] "step 3 skipped"
                Expect.sequenceEqual (snd snapshots[2]) (snd snapshots[1]) "no update on the skipped step"
                Expect.isFalse ((snd snapshots[3]) = (snd snapshots[2])) "updates resume after it"
                let line3 = jsonLines (Path.Combine(dir, RunFiles.metricsName)) |> List.find (fun n -> n["step"].GetValue<int>() = 3)
                Expect.equal (line3["bad_steps"].GetValue<int>()) 1 "logged")

        testCase "too many bad steps stop the run with a clear message" <| fun () ->
            withRunDir (fun dir ->
                let t = toyTask 1 1 epochOrder
                let alwaysNan = { t.Task with Loss = fun phase b -> let p = t.Task.Loss phase b in { p with TaskLoss = Tensors.divScalar 0.0 p.TaskLoss } }
                let ex = Expect.throwsC (fun () -> runWith quiet { cfg with MaxBadSteps = 2 } alwaysNan dir |> ignore) id
                match ex with
                | :? TooManyBadStepsException as e ->
                    Expect.equal e.BadSteps 3 "stops at the third"
                    Expect.stringContains e.Message "MaxBadSteps = 2" "names the limit"
                    Expect.stringContains e.Message "NaN or infinite" "names the cause"
                | other -> failtestf "expected TooManyBadStepsException, got %O" other)

        testCase "validation that stops improving stops training early" <| fun () ->
            withRunDir (fun dir ->
                // Validation counts downwards while training counts upwards: the better the fit, the worse validation.
                let t = toyTask 1 -1 epochOrder
                let r = runWith quiet { cfg with Steps = 200; EvalEvery = 2; Patience = 2; CheckpointEvery = 0 } t.Task dir
                Expect.equal r.Stop EarlyStopped "early stop"
                Expect.isLessThan r.Steps 200 "before the end"
                let v = validLosses dir
                Expect.isGreaterThanOrEqual v.Length 3 "at least best + patience passes"
                Expect.equal r.BestValidLoss (Some(v |> Array.map snd |> Array.min)) "best is the minimum"
                Expect.isSome r.BestCheckpoint "best checkpoint written"
                Expect.equal ((Checkpoint.readMeta (Checkpoint.last dir)).State.Stopped) (Some EarlyStopped) "recorded"
                // Resuming a stopped run does nothing more.
                let again = resumeWith quiet { cfg with Steps = 200; EvalEvery = 2; Patience = 2; CheckpointEvery = 0 } t.Task dir
                Expect.equal again.Steps r.Steps "no further steps")

        testCase "progress shows plain lines when redirected and a bar with ETA on a terminal" <| fun () ->
            withRunDir (fun dir ->
                let t = toyTask 1 1 epochOrder
                let c = { cfg with Steps = 6; LogEvery = 3; EvalEvery = 0; CheckpointEvery = 0 }
                let lines = new StringWriter()
                runWith { quiet with Progress = Lines; Output = lines } c t.Task dir |> ignore
                let text = lines.ToString()
                Expect.stringContains text "step 3/6" "a line at the log step"
                Expect.stringContains text "ETA" "with an ETA"
                Expect.isFalse (text.Contains "\r") "no carriage returns in plain lines"
                let bar = new StringWriter()
                runWith { quiet with Progress = Bar; Output = bar; Overwrite = true } c t.Task dir |> ignore
                Expect.stringContains (bar.ToString()) "\rstep 6/6 [########################]" "the bar redraws in place"
                let silent = new StringWriter()
                runWith { quiet with Output = silent; Overwrite = true } c t.Task dir |> ignore
                Expect.equal (silent.ToString()) "" "silent is silent")

        testCase "Bf16 trains an encoder-decoder in mixed precision: loss falls, float32 checkpoint, exact resume" <| fun () ->
            withRunDir (fun whole ->
            withRunDir (fun broken ->
                let bf = { cfg with Bf16 = true }
                let log = new StringWriter()
                let task, model = copyTask 1
                runWith { quiet with Progress = Lines; Output = log } bf task whole |> ignore
                Expect.stringContains (log.ToString()) "bf16 mixed precision: bfloat16 matmuls, float32 master weights, norms, softmax and loss" "logged"
                Expect.equal model.Precision Models.Precision.BFloat16 "the trainer set the model's precision"
                let losses = trainLosses whole
                Expect.isLessThan (snd (Array.last losses)) (snd losses[0]) "the loss goes down"
                // The checkpoint holds the float32 master weights.
                let _, reloaded = copyTask 7
                Checkpoint.loadModel (Checkpoint.last whole) reloaded
                for struct (name, p) in reloaded.named_parameters () do
                    Expect.equal p.dtype torch.ScalarType.Float32 (sprintf "%s saved as float32" name)
                Expect.sequenceEqual (parameters reloaded) (parameters model) "weights restored"
                // Stopped after step 5 and resumed in a fresh model: the uninterrupted curve.
                let first, _ = copyTask 1
                use stop = new Threading.CancellationTokenSource()
                runWith { quiet with OnStep = (fun r -> if r.Step = 5 then stop.Cancel()); Cancel = stop.Token } bf first broken |> ignore
                let again, resumed = copyTask 99
                Expect.equal (resumeWith quiet bf again broken).Steps 12 "finished"
                let la, lb = trainLosses whole, trainLosses broken
                Expect.equal (Array.map fst lb) (Array.map fst la) "same steps logged"
                for (step, x), (_, y) in Array.zip la lb do
                    Expect.floatClose { absolute = resumeTol; relative = resumeTol } y x (sprintf "train loss at step %d" step)
                let maxDiff = Array.map2 (fun (x: float32) y -> abs (x - y)) (parameters model) (parameters resumed) |> Array.max
                Expect.isLessThan (float maxDiff) resumeTol "final weights agree"
                // Bf16 shapes the trajectory, so a resume may not switch it.
                Expect.throwsC (fun () -> resumeWith quiet cfg (fst (copyTask 1)) whole |> ignore)
                    (fun e -> Expect.stringContains e.Message "Bf16" "names the field")))

        testCase "Bf16 refuses a model that cannot run mixed precision" <| fun () ->
            withRunDir (fun dir ->
                let t = toyTask 1 1 epochOrder
                Expect.throwsC (fun () -> runWith quiet { cfg with Bf16 = true } t.Task dir |> ignore)
                    (fun e -> Expect.stringContains e.Message "IMixedPrecision" "names what is missing"))

        testCase "CUDA generators are re-seeded per step from (Seed, step); the CPU one is saved in checkpoints" <| fun () ->
            Expect.equal (Native.rngResume DeviceType.CUDA) Native.ReseedEachStep "CUDA: re-seed each step"
            Expect.equal (Native.rngResume DeviceType.CPU) Native.SavedState "CPU: saved state"
            Expect.equal (Native.stepSeed 17 5) (Native.stepSeed 17 5) "a pure function of (seed, step)"
            let seeds = [ for seed in [ 0; 1; 17; -3; Int32.MaxValue ] do for step in 0 .. 199 -> Native.stepSeed seed step ]
            Expect.equal (List.distinct seeds).Length seeds.Length "distinct for distinct (seed, step)"
            // Without CUDA the re-seed touches nothing: the CPU generator's state is unchanged.
            use before = torch.get_rng_state ()
            Native.reseedCudaForStep 17 3
            use after = torch.get_rng_state ()
            Expect.sequenceEqual (Tensors.toInt64s after) (Tensors.toInt64s before) "CPU generator untouched"

        testCase "live tensors stay flat over steps" <| fun () ->
            withRunDir (fun dir ->
                // Tensors earlier tests left to the finalizer would be freed mid-run and lower the count
                // (seen once in a full run: 4519 -> 4431); freed now, only this run's tensors are counted.
                GC.Collect()
                GC.WaitForPendingFinalizers()
                GC.Collect()
                let t = toyTask 1 1 epochOrder
                let counts = Collections.Generic.List<int64>()
                let opts = { quiet with OnStep = fun _ -> counts.Add(Tensors.liveTensors ()) }
                runWith opts { cfg with Steps = 10; EvalEvery = 0; CheckpointEvery = 0 } t.Task dir |> ignore
                // Step 1 creates the optimizer's moment buffers; from step 2 on nothing may accumulate.
                Expect.isLessThanOrEqual counts[counts.Count - 1] counts[1] (sprintf "live tensors per step: %A" (List.ofSeq counts)))

        reliability
    ]
