/// The training configuration: optimizer, schedule, precision, logging, checkpointing and early stopping, and
/// the learning-rate schedule it describes.
namespace Moe.Train

open System
open TorchSharp
open Moe
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Models

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

/// The learning rate at each step, opened with `Moe.Train`.
[<AutoOpen>]
module LearningRate =
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
