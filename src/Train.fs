/// The training loop, generic over the task: AdamW (Loshchilov & Hutter 2019) with linear warmup then
/// cosine or inverse-square-root decay, gradient clipping and accumulation, the total loss with the
/// MoE balancing losses weighted once here, optional bf16 mixed precision, JSONL logs, atomic checkpoints
/// that resume the same run exactly, validation with early stopping, and a progress display.
/// Axes: B batch, S sequence, V vocabulary, N counted target tokens, E experts.
module Moe.Train

open System
open System.Collections.Generic
open System.Diagnostics
open System.IO
open System.Text
open System.Text.Json.Nodes
open System.Threading
open System.Runtime.InteropServices
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Models

// ---------------------------------------------------------------- configuration

/// Learning-rate decay after the linear warmup.
type Schedule =
    /// Half-cosine from the peak down to `MinLrRatio` x peak at the last step (Loshchilov & Hutter 2017, SGDR without restarts).
    | Cosine
    /// peak x sqrt(warmup / step): the Transformer schedule's decay (Vaswani et al. 2017, eq. 3), floored at `MinLrRatio` x peak.
    | InverseSqrt
    /// The peak rate after warmup.
    | Constant

/// Training hyper-parameters. Runs override `TrainConfig.defaults` with `{ defaults with ... }`.
type TrainConfig =
    { /// Optimizer steps (each of `GradAccumulation` micro-batches).
      Steps: int
      /// Examples per micro-batch; read by the task when it builds batches.
      BatchSize: int
      /// Peak learning rate, reached at the end of warmup.
      LearningRate: float
      /// AdamW first-moment decay.
      Beta1: float
      /// AdamW second-moment decay; 0.98 as in Vaswani et al. 2017 sec. 5.3, steadier than 0.999 for Transformers.
      Beta2: float
      /// AdamW denominator epsilon.
      Eps: float
      /// Decoupled weight decay (Loshchilov & Hutter 2019), applied to matrices and embeddings only (rank >= 2),
      /// not to biases and norm gains, as in nanoGPT's configure_optimizers.
      WeightDecay: float
      /// Steps of linear warmup from peak/warmup to the peak.
      WarmupSteps: int
      Schedule: Schedule
      /// Floor of the decay as a fraction of the peak (cosine ends here).
      MinLrRatio: float
      /// Maximum global gradient L2 norm (Pascanu et al. 2013); 0 turns clipping off.
      GradClip: float
      /// Micro-batches whose gradients are summed (each loss divided by this) before one optimizer step.
      GradAccumulation: int
      /// Label smoothing epsilon (Szegedy et al. 2016); the task applies it in training through `crossEntropy`.
      LabelSmoothing: float
      /// Weights of the MoE balancing losses, applied once in `totalLoss` (0 turns one off).
      LossWeights: LossWeights
      /// Steps between lines in metrics.jsonl and routing.jsonl.
      LogEvery: int
      /// Steps between validation passes; 0 validates only at the end.
      EvalEvery: int
      /// Steps between checkpoints; 0 checkpoints only at the end.
      CheckpointEvery: int
      /// Validation passes without a new best loss before training stops; 0 never stops early.
      Patience: int
      /// Steps with a NaN or infinite loss or gradient that may be skipped before the run stops.
      MaxBadSteps: int
      /// Seeds libtorch's generators at the start and the data order of every epoch (on CUDA also every
      /// step's generator seed, `Native.stepSeed`, so resumed runs draw the same dropout masks).
      Seed: int
      Device: Native.DeviceChoice
      /// bf16 mixed precision (Micikevicius et al. 2018) on any device: the model's matmuls run in bfloat16
      /// while its parameters, optimizer state, residual stream, norms, softmax, routing and loss stay float32
      /// (`Models.Precision.BFloat16`, set on a model that implements `Models.IMixedPrecision`). TorchSharp
      /// 0.107 has no autocast, so the models cast by construction. Changes the trajectory: fixed on resume.
      Bf16: bool }

    /// The defaults (for C#; F# code uses `TrainConfig.defaults`).
    static member Defaults =
        { Steps = 1000
          BatchSize = 32
          LearningRate = 3e-4
          Beta1 = 0.9
          Beta2 = 0.98
          Eps = 1e-8
          WeightDecay = 0.01
          WarmupSteps = 100
          Schedule = Cosine
          MinLrRatio = 0.1
          GradClip = 1.0
          GradAccumulation = 1
          LabelSmoothing = 0.0
          LossWeights = LossWeights.defaults
          LogEvery = 10
          EvalEvery = 100
          CheckpointEvery = 100
          Patience = 0
          MaxBadSteps = 10
          Seed = 17
          Device = Native.Auto
          Bf16 = false }

module TrainConfig =
    /// 1000 steps of AdamW at 3e-4 with 100 warmup steps and cosine decay to 10%, clipping at 1.0.
    let defaults = TrainConfig.Defaults

    /// Every problem with the config, empty when it is usable.
    let validate (cfg: TrainConfig) : string list =
        let finite (x: float) = not (Double.IsNaN x || Double.IsInfinity x)
        [ if cfg.Steps < 1 then sprintf "Steps must be >= 1, got %d" cfg.Steps
          if cfg.BatchSize < 1 then sprintf "BatchSize must be >= 1, got %d" cfg.BatchSize
          if not (cfg.LearningRate > 0.0 && finite cfg.LearningRate) then sprintf "LearningRate must be > 0 and finite, got %g" cfg.LearningRate
          if not (cfg.Beta1 >= 0.0 && cfg.Beta1 < 1.0) then sprintf "Beta1 must be in [0, 1), got %g" cfg.Beta1
          if not (cfg.Beta2 >= 0.0 && cfg.Beta2 < 1.0) then sprintf "Beta2 must be in [0, 1), got %g" cfg.Beta2
          if not (cfg.Eps > 0.0 && finite cfg.Eps) then sprintf "Eps must be > 0, got %g" cfg.Eps
          if not (cfg.WeightDecay >= 0.0 && finite cfg.WeightDecay) then sprintf "WeightDecay must be >= 0, got %g" cfg.WeightDecay
          if cfg.WarmupSteps < 0 then sprintf "WarmupSteps must be >= 0, got %d" cfg.WarmupSteps
          elif cfg.WarmupSteps > cfg.Steps && cfg.Steps >= 1 then
              sprintf "WarmupSteps (%d) must be <= Steps (%d)" cfg.WarmupSteps cfg.Steps
          if not (cfg.MinLrRatio >= 0.0 && cfg.MinLrRatio <= 1.0) then sprintf "MinLrRatio must be in [0, 1], got %g" cfg.MinLrRatio
          if not (cfg.GradClip >= 0.0 && finite cfg.GradClip) then sprintf "GradClip must be >= 0 (0 = off), got %g" cfg.GradClip
          if cfg.GradAccumulation < 1 then sprintf "GradAccumulation must be >= 1, got %d" cfg.GradAccumulation
          if not (cfg.LabelSmoothing >= 0.0 && cfg.LabelSmoothing < 1.0) then sprintf "LabelSmoothing must be in [0, 1), got %g" cfg.LabelSmoothing
          for name, w in [ "SwitchAux", cfg.LossWeights.SwitchAux; "Importance", cfg.LossWeights.Importance
                           "Load", cfg.LossWeights.Load; "ZLoss", cfg.LossWeights.ZLoss ] do
              if not (w >= 0.0 && finite w) then sprintf "LossWeights.%s must be >= 0 and finite, got %g" name w
          if cfg.LogEvery < 1 then sprintf "LogEvery must be >= 1, got %d" cfg.LogEvery
          if cfg.EvalEvery < 0 then sprintf "EvalEvery must be >= 0 (0 = only at the end), got %d" cfg.EvalEvery
          if cfg.CheckpointEvery < 0 then sprintf "CheckpointEvery must be >= 0 (0 = only at the end), got %d" cfg.CheckpointEvery
          if cfg.Patience < 0 then sprintf "Patience must be >= 0 (0 = no early stopping), got %d" cfg.Patience
          elif cfg.Patience > 0 && cfg.EvalEvery = 0 then
              sprintf "Patience %d needs periodic validation, but EvalEvery is 0" cfg.Patience
          if cfg.MaxBadSteps < 0 then sprintf "MaxBadSteps must be >= 0, got %d" cfg.MaxBadSteps ]

// ---------------------------------------------------------------- learning rate

/// Learning rate of the optimizer step with 0-based index `step`: linear warmup over `WarmupSteps`
/// ((step + 1) / warmup x peak, so the first step already moves), then the configured decay.
/// Pure; `Steps` sets the cosine's length.
let learningRate (cfg: TrainConfig) (step: int) : float =
    let peak = cfg.LearningRate
    let floor = cfg.MinLrRatio * peak
    let w = cfg.WarmupSteps
    if step < w then peak * float (step + 1) / float w
    else
        match cfg.Schedule with
        | Constant -> peak
        | Cosine ->
            // progress runs 0 -> 1 over the decay steps, reaching 1 at the last step
            let decaySteps = max 1 (cfg.Steps - w - 1)
            let progress = min 1.0 (float (step - w) / float decaySteps)
            floor + (peak - floor) * 0.5 * (1.0 + cos (Math.PI * progress))
        | InverseSqrt -> max floor (peak * sqrt (float (max w 1) / float (step + 1)))

// ---------------------------------------------------------------- losses

/// Training or evaluation, passed to the task's loss so it can switch label smoothing and the like.
type Phase =
    | Training
    | Evaluation

/// What the task's loss returns for one batch.
type LossParts =
    { /// Mean task loss over the counted tokens (scalar; carries the graph in training).
      TaskLoss: Tensor
      /// One report per MoE layer in layer order, named as the model names them (`Models.LayerReport`,
      /// e.g. "enc.1"); empty for a dense model.
      Moe: LayerReport list
      /// Target tokens the task loss averages over: weights validation means and tokens/s.
      Tokens: int64 }

    /// For C#: the parts from a task loss, MoE reports (null for none) and the token count.
    static member Create(taskLoss: Tensor, moe: IEnumerable<LayerReport>, tokens: int64) : LossParts =
        { TaskLoss = taskLoss; Moe = (if isNull moe then [] else List.ofSeq moe); Tokens = tokens }

/// A cross-entropy and the number of tokens it averages over.
type TokenLoss = { Loss: Tensor; Tokens: int64 }

/// Mean cross-entropy of `logits` [..; V] against `targets` [..] int64 over positions whose target is not
/// `ignoreIndex` (padding), with label smoothing eps: the target distribution is (1 - eps) onehot + eps / V
/// (Szegedy et al. 2016, sec. 7). Computed in float32. Zero (with a graph) when every position is ignored.
let crossEntropy (labelSmoothing: float) (ignoreIndex: int64) (logits: Tensor) (targets: Tensor) : TokenLoss =
    if isNull logits || logits.Dimensions < 2L || not (isFloating logits) then
        invalidArg "logits" (sprintf "expected logits [..; V] floating point, got %s" (if isNull logits then "null" else describe logits))
    let lead = logits.shape[.. logits.shape.Length - 2]
    expect "targets" (sprintf "[%s] int64 (logits' leading shape)" (lead |> Array.map string |> String.concat "; "))
        (fun t -> t.dtype = torch.int64 && t.shape = lead) targets
    use scope = torch.NewDisposeScope()
    let v = logits.shape[logits.shape.Length - 1]
    let flat = logits.reshape(-1L, v).to_type torch.float32 // [N'; V]
    let tgt = targets.reshape(-1L) // [N']
    let counted = tgt.ne(torch.tensor(ignoreIndex, device = tgt.device)).sum().item<int64> ()
    let summed =
        torch.nn.functional.cross_entropy(flat, tgt, ignore_index = ignoreIndex,
                                          reduction = torch.nn.Reduction.Sum, label_smoothing = labelSmoothing)
    let mean = divScalar (float (max counted 1L)) summed
    { Loss = mean.MoveToOuterDisposeScope(); Tokens = counted }

/// The loss that is differentiated:
/// L = L_task + sum over MoE layers of (w_switch switch_aux + w_importance importance + w_load load + w_z z_loss),
/// each aux loss unweighted as the layer returned it (Switch eq. 4, Shazeer et al. 2017 eq. 6 and 10, ST-MoE eq. 5).
/// A term whose weight is 0 is left out of the graph entirely.
let totalLoss (weights: LossWeights) (parts: LossParts) : Tensor =
    expect "TaskLoss" "scalar floating point" (fun t -> t.Dimensions = 0L && isFloating t) parts.TaskLoss
    let terms =
        [ for r in parts.Moe do
            for w, t in [ weights.SwitchAux, r.Report.Aux.SwitchAux; weights.Importance, r.Report.Aux.Importance
                          weights.Load, r.Report.Aux.Load; weights.ZLoss, r.Report.Aux.ZLoss ] do
                if w <> 0.0 then mulScalar w t ]
    match terms with
    | [] -> parts.TaskLoss.alias ()
    | ts ->
        use scope = torch.NewDisposeScope()
        let total = ts |> List.fold (fun (acc: Tensor) t -> plus acc (castTo acc.dtype t)) parts.TaskLoss
        total.MoveToOuterDisposeScope()

// ---------------------------------------------------------------- the task

/// What a task gives the trainer. Batches are best cheap descriptions (example indices); tensors are made
/// inside `Loss`, which runs in the step's dispose scope, so skipping batches on resume costs nothing.
type TrainTask<'batch> =
    { /// The model being trained (moved to the config's device by the trainer).
      Model: torch.nn.Module
      /// The training batches of one epoch: `TrainBatches seed epoch`. Their order must depend only on
      /// (seed, epoch), so a resumed run replays the same order from where it stopped.
      TrainBatches: int -> int -> seq<'batch>
      /// Validation batches, the same every time.
      ValidBatches: unit -> seq<'batch>
      /// The batch's task loss, MoE reports and token count.
      Loss: Phase -> 'batch -> LossParts
      /// Named configuration sections written beside "Train" (the TrainConfig) in config.json and in every checkpoint
      /// (e.g. ["model", box modelCfg; "data", box dataCfg]).
      Config: (string * obj) list
      /// Opaque tokenizer mapping saved in checkpoints so they are self-contained ("" when none).
      Tokenizer: string }

    /// A task from .NET delegates (for C#).
    static member Create
        (model: torch.nn.Module, trainBatches: Func<int, int, IEnumerable<'batch>>, validBatches: Func<IEnumerable<'batch>>,
         loss: Func<Phase, 'batch, LossParts>, config: IDictionary<string, obj>, tokenizer: string) : TrainTask<'batch> =
        { Model = model
          TrainBatches = fun seed epoch -> trainBatches.Invoke(seed, epoch)
          ValidBatches = fun () -> validBatches.Invoke()
          Loss = fun phase batch -> loss.Invoke(phase, batch)
          Config = if isNull config then [] else [ for kv in config -> kv.Key, kv.Value ]
          Tokenizer = if isNull tokenizer then "" else tokenizer }

// ---------------------------------------------------------------- run state, options and results

/// A run's parameter counts, written to `parameters.json` when training starts (`RunFiles.writeParameters`).
type RunParameters =
    { /// Every parameter of the model.
      Total: int64
      /// Parameters one token uses (an MoE layer's router, shared experts and k experts; all of a dense model).
      Active: int64
      /// Parameters the optimiser updates (a frozen LoRA base is not among them).
      Trainable: int64 }

/// Why a run ended.
type StopReason =
    | Completed
    /// Validation did not improve for `Patience` passes.
    | EarlyStopped
    /// The caller's cancellation token fired; a checkpoint was written first.
    | Cancelled

/// Sums over the steps since the last log line (kept in checkpoints so a resumed run logs the same averages).
type LogWindow =
    { GoodSteps: int
      Loss: float
      TaskLoss: float
      /// Means over MoE layers, summed over steps: switch_aux, importance, load, z_loss.
      Aux: float[]
      Tokens: int64
      Seconds: float }

module private LogWindow =
    let empty = { GoodSteps = 0; Loss = 0.0; TaskLoss = 0.0; Aux = Array.zeroCreate 4; Tokens = 0L; Seconds = 0.0 }

/// Everything besides tensors that a resumed run needs.
type TrainState =
    { /// Optimizer steps completed (good or skipped).
      Step: int
      /// Data position: the epoch being read and the batches already taken from it.
      Epoch: int
      BatchInEpoch: int
      BadSteps: int
      BestValidLoss: float option
      EvalsSinceBest: int
      /// Training time over every session of this run.
      ElapsedSeconds: float
      Window: LogWindow
      LastLoss: float option
      Stopped: StopReason option }

/// How the run shows progress.
type ProgressMode =
    /// A live bar with ETA on a terminal; plain lines when output is redirected.
    | Auto
    | Bar
    | Lines
    | Silent

/// What `OnStep` sees after each optimizer step (after the step's tensors are freed).
type StepReport =
    { Step: int
      Loss: float
      TaskLoss: float
      LearningRate: float
      GradNorm: float
      /// The step had a NaN or infinite loss or gradient and made no update.
      Skipped: bool
      Tokens: int64 }

/// Options that do not change the trained model.
type RunOptions =
    { Progress: ProgressMode
      /// Where progress goes (Console.Out by default).
      Output: TextWriter
      /// Called after every optimizer step.
      OnStep: StepReport -> unit
      /// Stops after the current step, writing a checkpoint.
      Cancel: CancellationToken }

    static member Defaults =
        { Progress = Auto; Output = Console.Out; OnStep = ignore; Cancel = CancellationToken.None }

    /// Options from .NET delegates (for C#); a null writer or callback takes the default.
    static member Create(progress: ProgressMode, output: TextWriter, onStep: Action<StepReport>, cancel: CancellationToken) =
        { Progress = progress
          Output = (if isNull output then Console.Out else output)
          OnStep = (if isNull onStep then ignore else fun r -> onStep.Invoke r)
          Cancel = cancel }

/// The outcome of `run` / `resume`.
type TrainResult =
    { Steps: int
      Stop: StopReason
      BadSteps: int
      LastLoss: float option
      BestValidLoss: float option
      /// checkpoints/last.ckpt: the state at the end.
      LastCheckpoint: string
      /// checkpoints/best.ckpt: the state at the best validation loss, when there was a validation pass.
      BestCheckpoint: string option
      ElapsedSeconds: float }

/// Raised when more than `MaxBadSteps` steps had a NaN or infinite loss or gradient.
type TooManyBadStepsException(message: string, badSteps: int, step: int) =
    inherit Exception(message)
    member _.BadSteps = badSteps
    member _.Step = step

// ---------------------------------------------------------------- checkpoints

/// Checkpoint files: `checkpoints/last.ckpt` and `checkpoints/best.ckpt` in the run folder.
///
/// Layout: 8-byte magic, then sections (meta JSON in UTF-8; model state as TorchSharp's `Module.save`;
/// optimizer state as `save_state_dict`; libtorch's CPU generator state), then a footer of 4 (offset, length)
/// pairs and an end magic. Parameters and optimizer state are float32 whatever `Bf16` says. The CUDA generator
/// is not saved (TorchSharp 0.107 cannot read its state); training re-seeds it every step instead
/// (`Native.RngResume.ReseedEachStep`). A file is written to a temporary name in the same folder, flushed to disk and
/// renamed over the old one, so a crash leaves the previous checkpoint whole; a file without its footer
/// is reported as truncated.
module Checkpoint =
    let private headMagic = "MOECKPT1"B
    let private endMagic = "MOECKEND"B
    let private sections = 4
    let private footerBytes = int64 (sections * 16 + endMagic.Length)
    /// Version of the meta JSON; bumped when its fields change meaning.
    let formatVersion = 1

    /// What a checkpoint's meta section holds.
    type Meta =
        { Format: int
          State: TrainState
          Train: TrainConfig
          /// The task's configuration sections, as written to config.json.
          Config: JsonNode
          Tokenizer: string
          WrittenUtc: string }

    let lastName = "last.ckpt"
    let bestName = "best.ckpt"
    /// The checkpoint folder of a run folder.
    let folder (runDir: string) = Path.Combine(runDir, "checkpoints")
    /// The path of the latest checkpoint of a run folder.
    let last (runDir: string) = Path.Combine(folder runDir, lastName)
    /// The path of the best-validation checkpoint of a run folder.
    let best (runDir: string) = Path.Combine(folder runDir, bestName)

    /// Writes `path` atomically: temporary file beside it, flush to disk, rename over.
    let writeAtomic (path: string) (write: Stream -> unit) : unit =
        let dir = Path.GetDirectoryName(Path.GetFullPath path)
        Directory.CreateDirectory dir |> ignore
        let tmp = Path.Combine(dir, sprintf ".%s.tmp-%s" (Path.GetFileName path) (Guid.NewGuid().ToString("N")))
        try
            using (new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None)) (fun fs ->
                write fs
                fs.Flush(true))
            File.Move(tmp, path, true)
        with _ ->
            (try File.Delete tmp with _ -> ())
            reraise ()

    /// Removes temporary files that a crashed write left in a checkpoint folder.
    let cleanTemporaries (dir: string) : unit =
        if Directory.Exists dir then
            for f in Directory.GetFiles(dir, ".*.tmp-*") do
                try File.Delete f with _ -> ()

    /// Writes a checkpoint of the model, optimizer, libtorch CPU generator and `meta` to `path` atomically.
    let save (path: string) (model: torch.nn.Module) (optimizer: Modules.OptimizerHelper) (meta: Meta) : unit =
        writeAtomic path (fun fs ->
            use w = new BinaryWriter(fs, Encoding.UTF8, leaveOpen = true)
            w.Write headMagic
            let spans = ResizeArray<int64 * int64>()
            let section (body: unit -> unit) =
                w.Flush()
                let start = fs.Position
                body ()
                w.Flush()
                spans.Add((start, fs.Position - start))
            section (fun () -> w.Write(Encoding.UTF8.GetBytes(Json.serialize meta)))
            section (fun () -> model.save w |> ignore)
            section (fun () -> optimizer.save_state_dict w)
            section (fun () ->
                use rng = torch.get_rng_state ()
                w.Write(rng.data<byte>().ToArray()))
            for start, length in spans do
                w.Write start
                w.Write length
            w.Write endMagic)

    /// The (offset, length) of each section, or a clear error when the file is not a whole checkpoint.
    let private spans (path: string) (fs: FileStream) : (int64 * int64)[] =
        let fail why = invalidOp (sprintf "checkpoint %s is not usable: %s" path why)
        if fs.Length < int64 headMagic.Length + footerBytes then fail (sprintf "only %d bytes; it is truncated" fs.Length)
        use r = new BinaryReader(fs, Encoding.UTF8, leaveOpen = true)
        fs.Position <- 0L
        if r.ReadBytes headMagic.Length <> headMagic then fail "it does not start with the checkpoint magic (not a checkpoint)"
        fs.Position <- fs.Length - footerBytes
        let s = Array.init sections (fun _ -> let o = r.ReadInt64() in o, r.ReadInt64())
        if r.ReadBytes endMagic.Length <> endMagic then fail "the footer is missing; the file is truncated (a write was interrupted)"
        for o, l in s do
            if o < int64 headMagic.Length || l < 0L || o + l > fs.Length - footerBytes then fail "a section lies outside the file"
        s

    /// Reads a checkpoint's meta section (train config, task config, tokenizer, run state).
    let readMeta (path: string) : Meta =
        if not (File.Exists path) then invalidArg "path" (sprintf "expected a checkpoint file, but %s does not exist" path)
        use fs = File.OpenRead path
        let s = spans path fs
        let o, l = s[0]
        fs.Position <- o
        let bytes = Array.zeroCreate<byte> (int l)
        fs.ReadExactly(bytes, 0, bytes.Length)
        match Json.deserialize<Meta> (Encoding.UTF8.GetString bytes) with
        | Ok m when m.Format = formatVersion -> m
        | Ok m -> invalidOp (sprintf "checkpoint %s has meta format %d; this build reads format %d" path m.Format formatVersion)
        | Error problems -> invalidOp (sprintf "checkpoint %s has an unreadable meta section:\n  - %s" path (String.concat "\n  - " problems))

    /// Loads only the model weights from a checkpoint (for generation); the module must have the same parameters.
    let loadModel (path: string) (model: torch.nn.Module) : unit =
        if not (File.Exists path) then invalidArg "path" (sprintf "expected a checkpoint file, but %s does not exist" path)
        use fs = File.OpenRead path
        let s = spans path fs
        fs.Position <- fst s[1]
        use r = new BinaryReader(fs, Encoding.UTF8, leaveOpen = true)
        model.load(r, strict = true) |> ignore

    /// Restores model, optimizer and the libtorch CPU generator from a checkpoint; returns its meta.
    let restore (path: string) (model: torch.nn.Module) (optimizer: Modules.OptimizerHelper) : Meta =
        let meta = readMeta path
        use fs = File.OpenRead path
        let s = spans path fs
        use r = new BinaryReader(fs, Encoding.UTF8, leaveOpen = true)
        fs.Position <- fst s[1]
        model.load(r, strict = true) |> ignore
        fs.Position <- fst s[2]
        optimizer.load_state_dict r
        let o, l = s[3]
        fs.Position <- o
        let rng = r.ReadBytes(int l)
        use state = torch.tensor rng
        torch.set_rng_state state
        meta

// ---------------------------------------------------------------- run folder files

/// The run folder's JSONL logs (see the run folder format in the README).
module RunFiles =
    let metricsName = "metrics.jsonl"
    let routingName = "routing.jsonl"
    let configName = "config.json"
    let parametersName = "parameters.json"

    let private compact = System.Text.Json.JsonSerializerOptions(WriteIndented = false)

    /// One JSON object as one line.
    let line (o: JsonObject) : string = o.ToJsonString compact

    let private num (x: float) : JsonNode = if Double.IsNaN x || Double.IsInfinity x then null else JsonValue.Create x

    /// `{"step", "split": "train", "loss", "task_loss", "aux": {...}, "lr", "tokens_per_s", "elapsed_s", ...}`.
    /// `aux` holds each balancing loss unweighted, averaged over MoE layers and the logged steps.
    let trainLine (step: int) (loss: float) (taskLoss: float) (aux: float[]) (lr: float) (tokensPerSecond: float)
                  (elapsed: float) (gradNorm: float) (badSteps: int) (moeLayers: int) : string =
        let auxObj = JsonObject()
        for name, v in Array.zip [| "switch_aux"; "importance"; "load"; "z_loss" |] aux do auxObj[name] <- num v
        let o = JsonObject()
        o["step"] <- JsonValue.Create step
        o["split"] <- JsonValue.Create "train"
        o["loss"] <- num loss
        o["task_loss"] <- num taskLoss
        o["aux"] <- auxObj
        o["lr"] <- num lr
        o["tokens_per_s"] <- num tokensPerSecond
        o["elapsed_s"] <- num elapsed
        o["grad_norm"] <- num gradNorm
        o["bad_steps"] <- JsonValue.Create badSteps
        o["moe_layers"] <- JsonValue.Create moeLayers
        line o

    /// `{"step", "split": "valid", "loss"}`.
    let validLine (step: int) (loss: float) (best: float) : string =
        let o = JsonObject()
        o["step"] <- JsonValue.Create step
        o["split"] <- JsonValue.Create "valid"
        o["loss"] <- num loss
        o["best_loss"] <- num best
        line o

    /// `{"step", "layer", "tokens_per_expert": [...], "dropped_fraction", "router_entropy"}`.
    let routingLine (step: int) (layer: string) (tokensPerExpert: float[]) (dropped: float) (entropy: float) : string =
        let o = JsonObject()
        o["step"] <- JsonValue.Create step
        o["layer"] <- JsonValue.Create layer
        let a = JsonArray()
        for x in tokensPerExpert do a.Add(num x)
        o["tokens_per_expert"] <- a
        o["dropped_fraction"] <- num dropped
        o["router_entropy"] <- num entropy
        line o

    /// Keeps only lines whose "step" is at most `step` (a resumed run rewrites what followed its checkpoint).
    let truncateAfter (step: int) (path: string) : unit =
        if File.Exists path then
            let keep =
                File.ReadAllLines path
                |> Array.filter (fun l ->
                    if String.IsNullOrWhiteSpace l then false
                    else
                        match Json.parse l with
                        | Ok n when not (isNull n) && not (isNull n["step"]) -> n["step"].GetValue<int>() <= step
                        | _ -> false)
            Checkpoint.writeAtomic path (fun fs ->
                use w = new StreamWriter(fs, UTF8Encoding(false), leaveOpen = true)
                for l in keep do w.WriteLine l)

    /// Writes `runDir/parameters.json` atomically: `{"total": N, "active": N, "trainable": N}`.
    let writeParameters (runDir: string) (counts: RunParameters) : unit =
        let o = JsonObject()
        o["total"] <- JsonValue.Create counts.Total
        o["active"] <- JsonValue.Create counts.Active
        o["trainable"] <- JsonValue.Create counts.Trainable
        Checkpoint.writeAtomic (Path.Combine(runDir, parametersName)) (fun fs ->
            let bytes = UTF8Encoding(false).GetBytes(Json.format o)
            fs.Write(bytes, 0, bytes.Length))

    /// Reads `runDir/parameters.json` as `writeParameters` writes it: None when the file is absent, an error
    /// naming the file and the field when it is malformed (not JSON, a count missing or not a whole number >= 0).
    let readParameters (runDir: string) : Result<RunParameters, string> option =
        let path = Path.Combine(runDir, parametersName)
        if not (File.Exists path) then None
        else
            let count (o: JsonObject) (name: string) =
                match o[name] with
                | :? JsonValue as v ->
                    match v.TryGetValue<int64>() with
                    | true, n when n >= 0L -> Ok n
                    | _ -> Error(sprintf "%s: expected \"%s\" a whole number >= 0, got %s" path name (v.ToJsonString()))
                | _ -> Error(sprintf "%s: expected a number \"%s\", got none" path name)
            match Json.parse (File.ReadAllText path) with
            | Ok(:? JsonObject as o) ->
                match count o "total", count o "active", count o "trainable" with
                | Ok total, Ok active, Ok trainable -> Some(Ok { Total = total; Active = active; Trainable = trainable })
                | total, active, trainable ->
                    let problems = [ total; active; trainable ] |> List.choose (function Error e -> Some e | Ok _ -> None)
                    Some(Error(String.concat "; " problems))
            | Ok _ -> Some(Error(sprintf "%s: expected a JSON object {\"total\", \"active\", \"trainable\"}" path))
            | Error e -> Some(Error(sprintf "%s: %s" path e))

/// Appends lines to a file, flushing each, so a crash leaves whole lines only.
type private LineLog(path: string) =
    let w = new StreamWriter(path, true, UTF8Encoding(false))
    member _.Write(line: string) =
        w.WriteLine line
        w.Flush()
    interface IDisposable with
        member _.Dispose() = w.Dispose()

// ---------------------------------------------------------------- progress display

type private Reporter(mode: ProgressMode, out: TextWriter, total: int, firstStep: int) =
    let bar =
        match mode with
        | Bar -> true
        | Auto -> not Console.IsOutputRedirected
        | Lines | Silent -> false
    let quiet = (mode = Silent)
    let clock = Stopwatch.StartNew()
    let redraw = Stopwatch.StartNew()
    // The bar is redrawn at most this often so a fast loop does not spend its time printing.
    let redrawSeconds = 0.1
    let barWidth = 24
    let mutable shown = 0

    let eta (step: int) =
        let done' = step - firstStep
        if done' <= 0 then "?"
        else
            let t = TimeSpan.FromSeconds(clock.Elapsed.TotalSeconds / float done' * float (total - step))
            if t.TotalHours >= 1.0 then sprintf "%d:%02d:%02d" (int t.TotalHours) t.Minutes t.Seconds
            else sprintf "%d:%02d" t.Minutes t.Seconds

    let sci (x: float) = x.ToString("0.00e+00", Globalization.CultureInfo.InvariantCulture)

    let clearBar () =
        if shown > 0 then
            out.Write("\r" + String(' ', shown) + "\r")
            shown <- 0

    member _.Message(text: string) =
        if not quiet then
            clearBar ()
            out.WriteLine text
            out.Flush()

    /// Called every step; draws the bar on a terminal.
    member _.Step(step: int, loss: float, lr: float, tokensPerSecond: float) =
        if bar && (redraw.Elapsed.TotalSeconds >= redrawSeconds || step = total) then
            redraw.Restart()
            let filled = int (float barWidth * float step / float total)
            let text =
                sprintf "step %d/%d [%s%s] loss %.4f lr %s %.0f tok/s ETA %s"
                    step total (String('#', filled)) (String('.', barWidth - filled)) loss (sci lr) tokensPerSecond (eta step)
            out.Write("\r" + text.PadRight shown)
            shown <- text.Length
            out.Flush()

    /// Called at log steps; prints a plain line when there is no bar.
    member this.Logged(step: int, loss: float, taskLoss: float, lr: float, tokensPerSecond: float) =
        if not bar && not quiet then
            this.Message(sprintf "step %d/%d  loss %.4f  task %.4f  lr %s  %.0f tok/s  ETA %s"
                             step total loss taskLoss (sci lr) tokensPerSecond (eta step))

    member _.Finish() =
        if shown > 0 then
            out.WriteLine()
            shown <- 0
            out.Flush()

// ---------------------------------------------------------------- the loop

/// Reads training batches epoch after epoch from a resumable position.
type private Cursor<'batch>(batches: int -> int -> seq<'batch>, seed: int, startEpoch: int, startIndex: int) =
    let mutable epoch = startEpoch
    let mutable index = 0
    let mutable items: IEnumerator<'batch> = null
    let openEpoch () =
        if not (isNull items) then items.Dispose()
        items <- (batches seed epoch).GetEnumerator()
        index <- 0
    let skipTo (n: int) =
        // Skipped batches may hold tensors; they are freed with this scope.
        use _ = torch.NewDisposeScope()
        while index < n do
            if not (items.MoveNext()) then
                invalidOp (sprintf "cannot resume: epoch %d has fewer than %d training batches now; the data changed since the checkpoint" epoch n)
            index <- index + 1
    do
        openEpoch ()
        skipTo startIndex

    member _.Epoch = epoch
    member _.Index = index

    member _.Next() : 'batch =
        if items.MoveNext() then
            index <- index + 1
            items.Current
        else
            if index = 0 then invalidOp (sprintf "epoch %d has no training batches" epoch)
            epoch <- epoch + 1
            openEpoch ()
            if items.MoveNext() then
                index <- 1
                items.Current
            else invalidOp (sprintf "epoch %d has no training batches" epoch)

    interface IDisposable with
        member _.Dispose() = if not (isNull items) then items.Dispose()

/// AdamW over two groups: rank >= 2 parameters decay, biases and norm gains do not (nanoGPT).
let makeOptimizer (cfg: TrainConfig) (model: torch.nn.Module) : Modules.AdamW =
    let trainable = model.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.toArray
    if trainable.Length = 0 then invalidArg "model" "expected a model with trainable parameters, got none"
    let decay, noDecay = trainable |> Array.partition (fun p -> p.Dimensions >= 2L)
    let group (ps: Modules.Parameter[]) (wd: float) =
        Modules.AdamW.ParamGroup(ps, cfg.LearningRate, cfg.Beta1, cfg.Beta2, cfg.Eps, wd, false, false)
    let groups =
        [| if decay.Length > 0 then group decay cfg.WeightDecay
           if noDecay.Length > 0 then group noDecay 0.0 |]
    torch.optim.AdamW(groups, cfg.LearningRate, cfg.Beta1, cfg.Beta2, cfg.Eps, cfg.WeightDecay, false, false)

/// The config fields that shape the trajectory; a resume must not change them.
let private trajectoryDifferences (saved: TrainConfig) (now: TrainConfig) : string list =
    let fields = Reflection.FSharpType.GetRecordFields typeof<TrainConfig>
    // Cadence, patience, limits and device change what is logged or where, not the curve.
    let free = set [ "LogEvery"; "EvalEvery"; "CheckpointEvery"; "Patience"; "MaxBadSteps"; "Device" ]
    [ for f in fields do
        if not (free.Contains f.Name) then
            let a, b = f.GetValue saved, f.GetValue now
            if a <> b then sprintf "%s: checkpoint has %A, config has %A" f.Name a b ]

/// Sets the model's compute precision from `Bf16` (`Full` otherwise); a model that cannot run mixed
/// precision is refused when Bf16 asks for it, rather than silently training in float32.
let setPrecision (cfg: TrainConfig) (model: torch.nn.Module) : unit =
    match box model with
    | :? IMixedPrecision as m -> m.Precision <- (if cfg.Bf16 then Precision.BFloat16 else Precision.Full)
    | _ when cfg.Bf16 ->
        invalidArg "cfg" (sprintf "Bf16 needs a model that implements Models.IMixedPrecision (EncoderDecoder, DecoderOnly); %s does not. Set Bf16 = false, or implement the interface by casting sublayer inputs to bfloat16"
                              (model.GetType().Name))
    | _ -> ()

let private configJson (cfg: TrainConfig) (sections: (string * obj) list) : JsonObject =
    let o = JsonObject()
    o["Train"] <- Json.toNode cfg
    for name, value in sections do
        o[name] <- (if isNull value then null else Json.ofTyped (value.GetType()) value)
    o

let private meanOver (xs: Tensor list) (device: torch.Device) : Tensor =
    match xs with
    | [] -> torch.zeros([||], dtype = torch.float32, device = device)
    | _ -> torch.stack(xs |> List.map (fun t -> t.detach().to_type(torch.float32).reshape([||]))).mean()

let private runCore (opts: RunOptions) (cfg: TrainConfig) (task: TrainTask<'batch>) (runDir: string) (resumeFrom: string option) : TrainResult =
    Config.orFail "TrainConfig" (TrainConfig.validate cfg) cfg |> ignore
    if isNull (box task.Model) then invalidArg "task" "expected a task with a model, got null"
    let device = Native.resolveDevice cfg.Device
    task.Model.``to``(device) |> ignore
    setPrecision cfg task.Model
    let rngResume = Native.rngResume device.``type``
    let optimizer = makeOptimizer cfg task.Model
    let trainable = task.Model.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.toArray
    let ckDir = Checkpoint.folder runDir
    Directory.CreateDirectory ckDir |> ignore
    Checkpoint.cleanTemporaries ckDir
    let metricsPath = Path.Combine(runDir, RunFiles.metricsName)
    let routingPath = Path.Combine(runDir, RunFiles.routingName)
    let configNode = configJson cfg task.Config

    let start =
        match resumeFrom with
        | None ->
            for p in [ metricsPath; routingPath; Checkpoint.last runDir; Checkpoint.best runDir ] do
                if File.Exists p then File.Delete p
            Native.seedAll cfg.Seed
            { Step = 0; Epoch = 0; BatchInEpoch = 0; BadSteps = 0; BestValidLoss = None; EvalsSinceBest = 0
              ElapsedSeconds = 0.0; Window = LogWindow.empty; LastLoss = None; Stopped = None }
        | Some path ->
            let meta = Checkpoint.restore path task.Model optimizer
            match trajectoryDifferences meta.Train cfg with
            | [] -> ()
            | ds -> invalidArg "cfg" (sprintf "cannot resume %s with a different schedule:\n  - %s" path (String.concat "\n  - " ds))
            RunFiles.truncateAfter meta.State.Step metricsPath
            RunFiles.truncateAfter meta.State.Step routingPath
            meta.State
    Checkpoint.writeAtomic (Path.Combine(runDir, RunFiles.configName)) (fun fs ->
        let bytes = Encoding.UTF8.GetBytes(Json.format configNode)
        fs.Write(bytes, 0, bytes.Length))

    let reporter = Reporter(opts.Progress, (if isNull opts.Output then Console.Out else opts.Output), cfg.Steps, start.Step)
    reporter.Message(sprintf "training %d steps on %O (%s)%s" cfg.Steps device (Native.describeRuntime ())
                         (match resumeFrom with Some p -> sprintf ", resumed at step %d from %s" start.Step p | None -> ""))
    if cfg.Bf16 then reporter.Message "bf16 mixed precision: bfloat16 matmuls, float32 master weights, norms, softmax and loss"
    if rngResume = Native.ReseedEachStep then
        reporter.Message(sprintf "%O generator re-seeded every step from (Seed %d, step): resumed runs draw the same dropout masks" device cfg.Seed)

    let mutable state = start
    let meta () : Checkpoint.Meta =
        { Format = Checkpoint.formatVersion; State = state; Train = cfg; Config = configNode; Tokenizer = task.Tokenizer
          WrittenUtc = DateTime.UtcNow.ToString("o") }
    let session = Stopwatch.StartNew()
    let elapsedAtStart = state.ElapsedSeconds
    let elapsed () = elapsedAtStart + session.Elapsed.TotalSeconds
    let saveTo path =
        state <- { state with ElapsedSeconds = elapsed () }
        Checkpoint.save path task.Model optimizer (meta ())

    let validate () : float option =
        task.Model.eval ()
        try
            use _ = torch.no_grad ()
            let mutable sum = 0.0
            let mutable tokens = 0L
            for b in task.ValidBatches () do
                use _ = torch.NewDisposeScope()
                let p = task.Loss Evaluation b
                if p.Tokens > 0L then
                    sum <- sum + scalar p.TaskLoss * float p.Tokens
                    tokens <- tokens + p.Tokens
            if tokens = 0L then None else Some(sum / float tokens)
        finally
            task.Model.train ()

    use metrics = new LineLog(metricsPath)
    use routing = new LineLog(routingPath)
    use cursor = new Cursor<'batch>(task.TrainBatches, cfg.Seed, state.Epoch, state.BatchInEpoch)
    let mutable lastLog = Stopwatch.StartNew()
    task.Model.train ()

    /// One optimizer step inside its own dispose scope; returns plain numbers only.
    let oneStep (stepIndex: int) (isLogStep: bool) =
        use scope = torch.NewDisposeScope()
        if rngResume = Native.ReseedEachStep then Native.reseedCudaForStep cfg.Seed stepIndex
        let lr = learningRate cfg stepIndex
        for g in optimizer.ParamGroups do g.LearningRate <- lr
        optimizer.zero_grad ()
        let mutable bad = false
        let mutable tokens = 0L
        let sums = Array.zeroCreate<float> 6 // total, task, switch, importance, load, z
        let routingSums = Dictionary<string, float[] * float * float>()
        let mutable layers = 0
        for _ in 1 .. cfg.GradAccumulation do
            let batch = cursor.Next()
            let parts = task.Loss Training batch
            let total = totalLoss cfg.LossWeights parts
            let aux (pick: AuxLosses -> Tensor) = meanOver [ for r in parts.Moe -> pick r.Report.Aux ] total.device
            let logged =
                torch.stack([| total.detach().to_type(torch.float32).reshape([||])
                               parts.TaskLoss.detach().to_type(torch.float32).reshape([||])
                               aux (fun a -> a.SwitchAux); aux (fun a -> a.Importance)
                               aux (fun a -> a.Load); aux (fun a -> a.ZLoss) |])
            let values = toFloats logged
            tokens <- tokens + parts.Tokens
            layers <- List.length parts.Moe
            if values |> Array.exists (fun v -> Single.IsNaN v || Single.IsInfinity v) then bad <- true
            for i in 0 .. 5 do sums[i] <- sums[i] + float values[i]
            if not bad then (divScalar (float cfg.GradAccumulation) total).backward ()
            if isLogStep then
                for r in parts.Moe do
                    let tpe = toFloats r.Report.Stats.TokensPerExpert |> Array.map float
                    let d, e = scalar r.Report.Stats.DroppedFraction, scalar r.Report.Stats.RouterEntropy
                    match routingSums.TryGetValue r.Layer with
                    | true, (a, d0, e0) -> routingSums[r.Layer] <- (Array.map2 (+) a tpe, d0 + d, e0 + e)
                    | _ -> routingSums[r.Layer] <- (tpe, d, e)
        let micro = float cfg.GradAccumulation
        let gradNorm =
            if bad then nan
            else torch.nn.utils.clip_grad_norm_(trainable, (if cfg.GradClip > 0.0 then cfg.GradClip else Double.PositiveInfinity), 2.0)
        let skipped = bad || Double.IsNaN gradNorm || Double.IsInfinity gradNorm
        if skipped then optimizer.zero_grad () else optimizer.step () |> ignore
        let routingMeans =
            [ for kv in routingSums ->
                let a, d, e = kv.Value
                kv.Key, (a |> Array.map (fun x -> x / micro)), d / micro, e / micro ]
        {| Lr = lr; Skipped = skipped; GradNorm = gradNorm; Tokens = tokens; Layers = layers
           BadLoss = bad; Means = sums |> Array.map (fun s -> s / micro); Routing = routingMeans |}

    // A cancelled run continues when resumed; a completed or early-stopped one is over.
    if state.Stopped = Some Cancelled then state <- { state with Stopped = None }
    let mutable stop: StopReason option = state.Stopped
    while stop.IsNone && state.Step < cfg.Steps do
        let stepIndex = state.Step
        let stepNo = stepIndex + 1
        let isLogStep = stepNo % cfg.LogEvery = 0 || stepNo = cfg.Steps
        let r = oneStep stepIndex isLogStep
        let w = state.Window
        let window =
            if r.Skipped then { w with Tokens = w.Tokens + r.Tokens }
            else
                { w with
                    GoodSteps = w.GoodSteps + 1
                    Loss = w.Loss + r.Means[0]
                    TaskLoss = w.TaskLoss + r.Means[1]
                    Aux = Array.init 4 (fun i -> w.Aux[i] + r.Means[2 + i])
                    Tokens = w.Tokens + r.Tokens }
        state <-
            { state with
                Step = stepNo
                Epoch = cursor.Epoch
                BatchInEpoch = cursor.Index
                BadSteps = state.BadSteps + (if r.Skipped then 1 else 0)
                LastLoss = (if r.Skipped then state.LastLoss else Some r.Means[0])
                Window = window }
        let windowSeconds = state.Window.Seconds + lastLog.Elapsed.TotalSeconds
        let tokensPerSecond = if windowSeconds > 0.0 then float state.Window.Tokens / windowSeconds else 0.0
        reporter.Step(stepNo, (if r.Skipped then nan else r.Means[0]), r.Lr, tokensPerSecond)
        opts.OnStep { Step = stepNo; Loss = r.Means[0]; TaskLoss = r.Means[1]; LearningRate = r.Lr
                      GradNorm = r.GradNorm; Skipped = r.Skipped; Tokens = r.Tokens }
        if r.Skipped then
            reporter.Message(sprintf "step %d: NaN or inf %s; skipped without an update (%d bad so far, limit %d)"
                                 stepNo (if r.BadLoss then "loss" else "gradient norm")
                                 state.BadSteps cfg.MaxBadSteps)
            if state.BadSteps > cfg.MaxBadSteps then
                reporter.Finish()
                let msg =
                    sprintf "training stopped at step %d: %d steps had a NaN or infinite loss or gradient, more than MaxBadSteps = %d. The model diverged or the data has bad batches: lower LearningRate (%g), lengthen WarmupSteps (%d), keep GradClip on, or check the data. The last good checkpoint is %s"
                        stepNo state.BadSteps cfg.MaxBadSteps cfg.LearningRate cfg.WarmupSteps
                        (if File.Exists(Checkpoint.last runDir) then Checkpoint.last runDir else "(none yet)")
                raise (TooManyBadStepsException(msg, state.BadSteps, stepNo))
        if isLogStep then
            let win = state.Window
            let n = float (max win.GoodSteps 1)
            let avg x = if win.GoodSteps = 0 then nan else x / n
            metrics.Write(RunFiles.trainLine stepNo (avg win.Loss) (avg win.TaskLoss) (win.Aux |> Array.map avg) r.Lr
                              tokensPerSecond (elapsed ()) r.GradNorm state.BadSteps r.Layers)
            for layer, tpe, d, e in r.Routing do
                routing.Write(RunFiles.routingLine stepNo layer tpe d e)
            reporter.Logged(stepNo, avg win.Loss, avg win.TaskLoss, r.Lr, tokensPerSecond)
            state <- { state with Window = LogWindow.empty }
            lastLog <- Stopwatch.StartNew()
        else
            state <- { state with Window = { state.Window with Seconds = windowSeconds } }
            lastLog <- Stopwatch.StartNew()
        let isEvalStep = (cfg.EvalEvery > 0 && stepNo % cfg.EvalEvery = 0) || stepNo = cfg.Steps
        if isEvalStep then
            match validate () with
            | Some v ->
                let improved = match state.BestValidLoss with Some b -> v < b | None -> not (Double.IsNaN v)
                state <-
                    { state with
                        BestValidLoss = (if improved then Some v else state.BestValidLoss)
                        EvalsSinceBest = (if improved then 0 else state.EvalsSinceBest + 1) }
                metrics.Write(RunFiles.validLine stepNo v (defaultArg state.BestValidLoss nan))
                reporter.Message(sprintf "step %d: valid loss %.4f%s" stepNo v (if improved then " (best)" else ""))
                if improved then saveTo (Checkpoint.best runDir)
                if cfg.Patience > 0 && state.EvalsSinceBest >= cfg.Patience then
                    reporter.Message(sprintf "early stopping at step %d: no better validation loss in %d passes (best %.4f)"
                                         stepNo cfg.Patience (defaultArg state.BestValidLoss nan))
                    stop <- Some EarlyStopped
            | None -> ()
        if stop.IsNone && opts.Cancel.IsCancellationRequested then
            reporter.Message(sprintf "cancelled at step %d; writing a checkpoint" stepNo)
            stop <- Some Cancelled
        let finished = stop.IsSome || stepNo = cfg.Steps
        if finished then
            state <- { state with Stopped = Some(defaultArg stop Completed) }
            saveTo (Checkpoint.last runDir)
        elif cfg.CheckpointEvery > 0 && stepNo % cfg.CheckpointEvery = 0 then
            saveTo (Checkpoint.last runDir)
    reporter.Finish()
    let reason = defaultArg state.Stopped Completed
    if not (File.Exists(Checkpoint.last runDir)) then saveTo (Checkpoint.last runDir)
    reporter.Message(sprintf "done: %d steps (%A), %d bad, last loss %s, best valid %s, %.1f s"
                         state.Step reason state.BadSteps
                         (match state.LastLoss with Some l -> sprintf "%.4f" l | None -> "-")
                         (match state.BestValidLoss with Some l -> sprintf "%.4f" l | None -> "-")
                         (elapsed ()))
    { Steps = state.Step
      Stop = reason
      BadSteps = state.BadSteps
      LastLoss = state.LastLoss
      BestValidLoss = state.BestValidLoss
      LastCheckpoint = Checkpoint.last runDir
      BestCheckpoint = (if File.Exists(Checkpoint.best runDir) then Some(Checkpoint.best runDir) else None)
      ElapsedSeconds = elapsed () }

/// Trains `task` from scratch into `runDir` (config.json, metrics.jsonl, routing.jsonl, checkpoints/),
/// replacing the logs and checkpoints of an earlier run there.
let runWith (opts: RunOptions) (cfg: TrainConfig) (task: TrainTask<'batch>) (runDir: string) : TrainResult =
    runCore opts cfg task runDir None

/// Continues the run in `runDir` from checkpoints/last.ckpt: model, optimizer, schedule, step, data position
/// and the libtorch CPU generator (a CUDA generator is re-seeded per step instead), so the loss curve is the
/// one an uninterrupted run would have drawn (exactly on the CPU; on CUDA the random draws repeat, but
/// kernels with nondeterministic reductions need not). The config may change logging, evaluation and checkpoint cadence,
/// patience and the bad-step limit, nothing that shapes the trajectory. `task.Model` must be built as before.
let resumeWith (opts: RunOptions) (cfg: TrainConfig) (task: TrainTask<'batch>) (runDir: string) : TrainResult =
    let path = Checkpoint.last runDir
    if not (File.Exists path) then
        invalidArg "runDir" (sprintf "expected a checkpoint to resume from at %s, found none (start with run instead)" path)
    runCore opts cfg task runDir (Some path)

/// `runWith` with default options (progress on the console).
let run (cfg: TrainConfig) (task: TrainTask<'batch>) (runDir: string) : TrainResult = runWith RunOptions.Defaults cfg task runDir

/// `resumeWith` with default options.
let resume (cfg: TrainConfig) (task: TrainTask<'batch>) (runDir: string) : TrainResult = resumeWith RunOptions.Defaults cfg task runDir

/// The trainer for C#: `Trainer.Run(Trainer.Config(steps: 500), task, runDir)`.
type Trainer =
    /// `TrainConfig.defaults` with the named arguments changed (omitted ones keep the defaults).
    /// schedule: cosine | inverse-sqrt | constant; device: auto | cpu | cuda; bf16: bfloat16 mixed precision.
    static member Config([<Optional>] steps: Nullable<int>, [<Optional>] batchSize: Nullable<int>,
                         [<Optional>] learningRate: Nullable<float>, [<Optional>] warmupSteps: Nullable<int>,
                         [<Optional>] schedule: string, [<Optional>] minLrRatio: Nullable<float>,
                         [<Optional>] weightDecay: Nullable<float>, [<Optional>] gradClip: Nullable<float>,
                         [<Optional>] gradAccumulation: Nullable<int>, [<Optional>] labelSmoothing: Nullable<float>,
                         [<Optional>] lossWeights: LossWeights, [<Optional>] logEvery: Nullable<int>,
                         [<Optional>] evalEvery: Nullable<int>, [<Optional>] checkpointEvery: Nullable<int>,
                         [<Optional>] patience: Nullable<int>, [<Optional>] maxBadSteps: Nullable<int>,
                         [<Optional>] seed: Nullable<int>, [<Optional>] device: string,
                         [<Optional>] bf16: Nullable<bool>) : TrainConfig =
        let d = TrainConfig.defaults
        let pick (v: Nullable<'a>) (fallback: 'a) = if v.HasValue then v.Value else fallback
        let cfg =
            { d with
                Steps = pick steps d.Steps
                BatchSize = pick batchSize d.BatchSize
                LearningRate = pick learningRate d.LearningRate
                WarmupSteps = pick warmupSteps d.WarmupSteps
                Schedule =
                    (match (if isNull schedule then "" else schedule.Trim().ToLowerInvariant()) with
                     | "" -> d.Schedule
                     | "cosine" -> Cosine
                     | "inverse-sqrt" | "inversesqrt" -> InverseSqrt
                     | "constant" -> Constant
                     | other -> invalidArg "schedule" (sprintf "expected cosine|inverse-sqrt|constant, got '%s'" other))
                MinLrRatio = pick minLrRatio d.MinLrRatio
                WeightDecay = pick weightDecay d.WeightDecay
                GradClip = pick gradClip d.GradClip
                GradAccumulation = pick gradAccumulation d.GradAccumulation
                LabelSmoothing = pick labelSmoothing d.LabelSmoothing
                LossWeights = (if isNull (box lossWeights) then d.LossWeights else lossWeights)
                LogEvery = pick logEvery d.LogEvery
                EvalEvery = pick evalEvery d.EvalEvery
                CheckpointEvery = pick checkpointEvery d.CheckpointEvery
                Patience = pick patience d.Patience
                MaxBadSteps = pick maxBadSteps d.MaxBadSteps
                Seed = pick seed d.Seed
                Bf16 = pick bf16 d.Bf16
                Device =
                    (if isNull device then d.Device
                     else match Native.parseDevice device with
                          | Ok c -> c
                          | Error msg -> invalidArg "device" msg) }
        Config.orFail "TrainConfig" (TrainConfig.validate cfg) cfg
    static member Run(cfg: TrainConfig, task: TrainTask<'batch>, runDir: string) : TrainResult = run cfg task runDir
    static member Run(cfg: TrainConfig, task: TrainTask<'batch>, runDir: string, options: RunOptions) : TrainResult =
        runWith options cfg task runDir
    static member Resume(cfg: TrainConfig, task: TrainTask<'batch>, runDir: string) : TrainResult = resume cfg task runDir
    static member Resume(cfg: TrainConfig, task: TrainTask<'batch>, runDir: string, options: RunOptions) : TrainResult =
        resumeWith options cfg task runDir
    static member LearningRate(cfg: TrainConfig, step: int) : float = learningRate cfg step
    static member Validate(cfg: TrainConfig) : string[] = TrainConfig.validate cfg |> List.toArray
