/// The training loop, generic over the task: AdamW (Loshchilov & Hutter 2019) with linear warmup then
/// cosine or inverse-square-root decay, gradient clipping and accumulation, the total loss with the
/// MoE balancing losses weighted once (`Losses.totalLoss`), optional bf16 mixed precision, JSONL logs, atomic
/// checkpoints that resume the same run exactly, validation with early stopping, and a progress display.
/// Its configuration, task interface, state, checkpoint and log formats are in `Train/`; `Trainer` is the C# facade.
/// Axes: B batch, S sequence, V vocabulary, N counted target tokens, E experts.
namespace Moe.Train

open System
open System.Collections.Generic
open System.Diagnostics
open System.IO
open System.Text
open System.Text.Json.Nodes
open System.Runtime.InteropServices
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Models

/// The loop, opened with `Moe.Train`.
[<AutoOpen>]
module Loop =
    /// Appends lines to a file, flushing each, so a crash leaves whole lines only; a failed append (disk
    /// full) raises `Checkpoint.WriteFailedException` naming the file.
    type private LineLog(path: string) =
        let w = new StreamWriter(path, true, UTF8Encoding(false))
        member _.Write(line: string) =
            try
                w.WriteLine line
                w.Flush()
            with :? IOException as e when not (e :? Checkpoint.WriteFailedException) ->
                raise (Checkpoint.WriteFailedException(sprintf "could not append to %s (%s); the lines before are whole" path e.Message, path, e))
        interface IDisposable with
            // A line that could not be flushed stays in the buffer; disposing must not raise over the first error.
            member _.Dispose() = try w.Dispose() with :? IOException -> ()


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

    /// AdamW over two groups: rank >= 2 parameters decay, biases and norm gains do not (nanoGPT). The
    /// toolkit's `SafeAdamW`: TorchSharp's AdamW with a step that keeps its scalars alive.
    let makeOptimizer (cfg: TrainConfig) (model: torch.nn.Module) : Modules.AdamW =
        let trainable = model.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.toArray
        if trainable.Length = 0 then invalidArg "model" "expected a model with trainable parameters, got none"
        let decay, noDecay = trainable |> Array.partition (fun p -> p.Dimensions >= 2L)
        let group (ps: Modules.Parameter[]) (wd: float) =
            Modules.AdamW.ParamGroup(ps, cfg.LearningRate, cfg.Beta1, cfg.Beta2, cfg.Eps, wd, false, false)
        let groups =
            [| if decay.Length > 0 then group decay cfg.WeightDecay
               if noDecay.Length > 0 then group noDecay 0.0 |]
        new SafeAdamW(groups, cfg.LearningRate, cfg.Beta1, cfg.Beta2, cfg.Eps, cfg.WeightDecay) :> Modules.AdamW

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

    /// Where a resume starts: the checkpoints to try in order, and those already found unusable (with why).
    type private ResumePlan = { Candidates: string list; Skipped: (string * string) list }

    let private runCore (opts: RunOptions) (cfg: TrainConfig) (task: TrainTask<'batch>) (runDir: string) (resumeFrom: ResumePlan option) : TrainResult =
        Config.orFail "TrainConfig" (TrainConfig.validate cfg) cfg |> ignore
        if isNull (box task.Model) then invalidArg "task" "expected a task with a model, got null"
        if opts.KeepCheckpoints < 1 then invalidArg "opts" (sprintf "expected KeepCheckpoints >= 1, got %d" opts.KeepCheckpoints)
        use _lock = RunFolder.acquire "training" runDir
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

        let start, resumedFrom, skipped =
            match resumeFrom with
            | None ->
                RunFolder.startFresh opts.Overwrite runDir
                for p in [ metricsPath; routingPath ] do
                    if File.Exists p then File.Delete p
                Native.seedAll cfg.Seed
                { Step = 0; Epoch = 0; BatchInEpoch = 0; BadSteps = 0; BestValidLoss = None; EvalsSinceBest = 0
                  ElapsedSeconds = 0.0; Window = LogWindow.empty; LastLoss = None; Stopped = None }, None, []
            | Some plan ->
                // The newest checkpoint that restores; one that fails part-way is overwritten by the next.
                let rec restoreFirst (candidates: string list) (skipped: (string * string) list) =
                    match candidates with
                    | [] ->
                        invalidOp (sprintf "cannot resume %s: no checkpoint could be loaded%s" runDir
                                       (skipped |> List.rev |> List.map (fun (f, why) -> sprintf "\n  - %s: %s" f why) |> String.concat ""))
                    | path :: rest ->
                        try Checkpoint.restore path task.Model optimizer, path, List.rev skipped
                        with e when not (e :? OutOfMemoryException) -> restoreFirst rest ((path, e.Message) :: skipped)
                let meta, path, skipped = restoreFirst plan.Candidates (List.rev plan.Skipped)
                match trajectoryDifferences meta.Train cfg with
                | [] -> ()
                | ds -> invalidArg "cfg" (sprintf "cannot resume %s with a different schedule:\n  - %s" path (String.concat "\n  - " ds))
                Checkpoint.setAsideAfter meta.State.Step runDir |> ignore
                RunFiles.truncateAfter meta.State.Step metricsPath
                RunFiles.truncateAfter meta.State.Step routingPath
                meta.State, Some path, skipped
        Checkpoint.writeAtomic (Path.Combine(runDir, RunFiles.configName)) (fun fs ->
            let bytes = Encoding.UTF8.GetBytes(Json.format configNode)
            fs.Write(bytes, 0, bytes.Length))

        let reporter = Reporter(opts.Progress, (if isNull opts.Output then Console.Out else opts.Output), cfg.Steps, start.Step)
        for path, why in skipped do reporter.Message(sprintf "resume: skipped %s: %s" path why)
        reporter.Message(sprintf "training %d steps on %O (%s)%s" cfg.Steps device (Native.describeRuntime ())
                             (match resumedFrom with Some p -> sprintf ", resumed at step %d from %s" start.Step p | None -> ""))
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
        let saveBest () =
            state <- { state with ElapsedSeconds = elapsed () }
            Checkpoint.save (Checkpoint.best runDir) task.Model optimizer (meta ())
        let saveLast () =
            state <- { state with ElapsedSeconds = elapsed () }
            Checkpoint.saveLast opts.KeepCheckpoints runDir task.Model optimizer (meta ())

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
                    if improved then saveBest ()
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
                saveLast ()
            elif cfg.CheckpointEvery > 0 && stepNo % cfg.CheckpointEvery = 0 then
                saveLast ()
        reporter.Finish()
        let reason = defaultArg state.Stopped Completed
        if not (File.Exists(Checkpoint.last runDir)) then saveLast ()
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
    /// holding the folder's lock (`RunFolder`) throughout. A folder that already holds a run is refused unless
    /// `opts.Overwrite`, which replaces that run's logs and checkpoints.
    let runWith (opts: RunOptions) (cfg: TrainConfig) (task: TrainTask<'batch>) (runDir: string) : TrainResult =
        runCore opts cfg task runDir None

    /// Continues the run in `runDir` from its newest loadable checkpoint (`Checkpoint.resumeCandidates`: last.ckpt,
    /// else the kept step-N.ckpt or best.ckpt with the highest step; each one skipped is reported with why), or from
    /// `opts.ResumeFrom` when given: model, optimizer, schedule, step, data position
    /// and the libtorch CPU generator (a CUDA generator is re-seeded per step instead), so the loss curve is the
    /// one an uninterrupted run would have drawn (exactly on the CPU; on CUDA the random draws repeat, but
    /// kernels with nondeterministic reductions need not). The config may change logging, evaluation and checkpoint cadence,
    /// patience and the bad-step limit, nothing that shapes the trajectory. `task.Model` must be built as before.
    /// Checkpoints written after the one resumed from are moved to `checkpoints/after-step-N-TIME/`.
    let resumeWith (opts: RunOptions) (cfg: TrainConfig) (task: TrainTask<'batch>) (runDir: string) : TrainResult =
        let plan =
            match opts.ResumeFrom with
            | Some path ->
                if not (File.Exists path) then invalidArg "opts" (sprintf "expected a checkpoint file to resume from, but %s does not exist" path)
                { Candidates = [ path ]; Skipped = [] }
            | None ->
                match Checkpoint.resumeCandidates runDir with
                | [], [] ->
                    invalidArg "runDir" (sprintf "expected a checkpoint to resume from in %s, found none (start with run instead)" (Checkpoint.folder runDir))
                | candidates, skipped -> { Candidates = candidates; Skipped = skipped }
        runCore opts cfg task runDir (Some plan)

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
