/// What a run carries between steps and across a resume, the options a caller passes, and what a run returns.
namespace Moe.Train

open System
open System.IO
open System.Threading
open TorchSharp
open Moe
open Moe.Routing
open Moe.Layers
open Moe.Models

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

module internal LogWindow =
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
      Cancel: CancellationToken
      /// A fresh run replaces a run already in its folder (otherwise it refuses; see `RunFolder.startFresh`).
      Overwrite: bool
      /// Checkpoints kept besides best.ckpt: last.ckpt and the `KeepCheckpoints - 1` before it (step-N.ckpt).
      KeepCheckpoints: int
      /// A resume starts from this checkpoint file instead of the newest loadable one of the run folder.
      ResumeFrom: string option }

    static member Defaults =
        { Progress = Auto; Output = Console.Out; OnStep = ignore; Cancel = CancellationToken.None
          Overwrite = false; KeepCheckpoints = 2; ResumeFrom = None }

    /// Options from .NET delegates (for C#); a null writer or callback takes the default.
    static member Create(progress: ProgressMode, output: TextWriter, onStep: Action<StepReport>, cancel: CancellationToken) =
        { Progress = progress
          Output = (if isNull output then Console.Out else output)
          OnStep = (if isNull onStep then ignore else fun r -> onStep.Invoke r)
          Cancel = cancel
          Overwrite = false
          KeepCheckpoints = RunOptions.Defaults.KeepCheckpoints
          ResumeFrom = None }

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
