/// The training-step benchmark (`moe bench train-step`): the summarizer's training-step tokens/s and its
/// model-FLOPs utilisation against the measured matmul ceiling.
///
/// Axes: B batch, S sequence.
module Moe.Bench.TrainStep

open System
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Bench.Measure
open Moe.Bench.Layer

// ---------------------------------------------------------------- a training step of the summarizer

/// Forward FLOPs per token of the feed-forward sublayer of layer `layer` (0-based) in a stack: a dense FFN
/// (also between interleaved MoE layers), an MoE layer's router, configured active experts and shared experts
/// (`Analysis.moeFlops`), or a LoRA-MoE layer's router, shared base and active adapters
/// (`Analysis.loraMoeFlops`).
let ffnForwardPerToken (cfg: Models.ModelConfig) (layer: int) : float =
    match cfg.Ffn with
    | Models.Dense hidden -> Flops.ffnForward cfg.Activation cfg.ModelDim hidden
    | Models.Moe m | Models.LoraMoe (m, _) when not (Models.ModelConfig.isMoeLayer cfg layer) ->
        Flops.ffnForward m.Activation m.ModelDim m.ExpertHidden
    | Models.Moe m -> Analysis.moeFlops m (Analysis.configuredActiveExperts m.Router)
    | Models.LoraMoe (m, lora) -> Analysis.loraMoeFlops m lora (Analysis.configuredActiveExperts m.Router)

/// Token counts of one encoder-decoder batch that the FLOP count reads.
type BatchTokens =
    { /// Real (unpadded) source tokens.
      SourceTokens: int64
      /// Real decoder positions (summary tokens and eos).
      TargetTokens: int64
      /// Padded source length S (each source position attends over S keys).
      SourceLength: int64
      /// Padded decoder length L.
      TargetLength: int64 }

/// Model forward FLOPs of one encoder-decoder batch, matrix multiplications only, counted on real tokens
/// (padding is waste, not model work; Chowdhery et al. 2022, app. B, count model FLOPs the same way):
/// per encoder layer and source token, the Q, K, V, O projections (2 d (2 d + 2 d_kv), d_kv = d KvHeads / Heads),
/// scores and weighted values over S keys (2 * 2 S d) and the FFN; per decoder layer and target token, self
/// attention likewise over L keys, cross-attention Q and O projections (2 * 2 d^2) and scores over S keys,
/// and the FFN; cross-attention K and V projections of every source token in every decoder layer
/// (2 * 2 d d_kv); the output projection (2 d V) per target token. Embedding lookups and norms are free.
let modelForwardFlops (cfg: Models.ModelConfig) (b: BatchTokens) : float =
    let d = float cfg.ModelDim
    let dkv = d * float cfg.KvHeads / float cfg.Heads
    let projections = 2.0 * d * (2.0 * d + 2.0 * dkv)
    let attend keys = 2.0 * 2.0 * float keys * d
    let encoder =
        [ for l in 0 .. cfg.EncoderLayers - 1 -> float b.SourceTokens * (projections + attend b.SourceLength + ffnForwardPerToken cfg l) ]
        |> List.sum
    let decoder =
        [ for l in 0 .. cfg.DecoderLayers - 1 ->
            let self = projections + attend b.TargetLength
            let cross = 2.0 * 2.0 * d * d + attend b.SourceLength
            float b.TargetTokens * (self + cross + ffnForwardPerToken cfg l)
            + (if cfg.EncoderLayers > 0 then float b.SourceTokens * 2.0 * 2.0 * d * dkv else 0.0) ]
        |> List.sum
    encoder + decoder + float b.TargetTokens * 2.0 * d * float cfg.VocabSize

/// Settings of the training-step benchmark.
type TrainStepConfig =
    { /// The job whose training step is timed (`Summarizer.SummarizerConfig.defaults`: the default summarizer).
      Summarizer: Summarizer.SummarizerConfig
      /// Untimed steps first (allocations, AdamW state).
      Warmup: int
      /// Timed steps; medians are reported.
      Steps: int
      /// Square matmul sizes for the ceiling (`matmulGflops`).
      CeilingSizes: int[]
      /// Time the step's phases (batch, encoder, decoder, loss, backward, clipping, optimizer; the forward
      /// then runs as `Summarizer.task` does, in parts) and, for MoE models, profile one MoE layer at the
      /// step's token count (`profileLayer`).
      Profile: bool }

module TrainStepConfig =
    let defaults =
        { Summarizer = Summarizer.SummarizerConfig.defaults
          Warmup = 3
          Steps = 10
          CeilingSizes = Array.ofList ceilingSizes
          Profile = false }

    let validate (cfg: TrainStepConfig) : string list =
        [ if cfg.Warmup < 0 then sprintf "Warmup must be >= 0, got %d" cfg.Warmup
          if cfg.Steps < 1 then sprintf "Steps must be >= 1, got %d" cfg.Steps
          if cfg.CeilingSizes.Length = 0 || Array.exists (fun n -> n < 1) cfg.CeilingSizes then
              sprintf "CeilingSizes: expected sizes >= 1, got %A" cfg.CeilingSizes
          yield! Summarizer.SummarizerConfig.validate cfg.Summarizer |> List.map (fun p -> "Summarizer: " + p) ]

/// What one training step costs.
type TrainStepReport =
    { Machine: Machine
      /// Total and active parameters of the model.
      Parameters: Models.ParameterCount
      /// Median step time, ms.
      StepMs: float
      /// Real source + target tokens per second (median over steps of tokens / time).
      TokensPerS: float
      /// Model FLOPs (3 x `modelForwardFlops`) per second, median over steps, GFLOP/s.
      ModelGflops: float
      /// ModelGflops over the matmul ceiling.
      Mfu: float
      /// Median milliseconds per phase, with --profile: zero_grad + batch, encoder forward, decoder forward
      /// (with the output projection), loss, backward, clip, optimizer.
      Phases: (string * float) list
      /// With --profile and MoE layers: the first MoE layer alone at the step's mean token count.
      MoeProfile: LayerProfile option }

/// Times training steps of the summarizer exactly as `Train` takes them (its task's loss, `Train.Losses.totalLoss`,
/// backward, `clip_grad_norm_`, AdamW from `Train.Loop.makeOptimizer`, gradients zeroed in place), on batches from
/// the training plan in order. Model FLOPs come from `modelForwardFlops` of each batch; the ceiling from
/// `matmulGflops`. Nothing is written to disk.
let trainStep (cfg: TrainStepConfig) (progress: string -> unit) : TrainStepReport =
    let cfg = orFail "train-step config" (TrainStepConfig.validate cfg) cfg
    let device = cfg.Summarizer.Train.Device |> Native.resolveDevice
    progress "measuring the float32 matmul ceiling"
    let machine = { MatmulGflops = matmulGflops device (List.ofArray cfg.CeilingSizes) BenchConfig.minReps; Threads = torch.get_num_threads (); Allocator = SystemAllocator }
    progress "preparing the data and the model"
    use prepared = Summarizer.prepare cfg.Summarizer
    let sc = Summarizer.SummarizerConfig.resolve (prepared.Tokenizer :> Tokenizers.ITokenizer).VocabSize cfg.Summarizer
    let counts = // as `Summarizer.runWith`: balanced hash tables need the training corpus's token counts
        match sc.Model.Ffn with
        | Models.Moe m when m.Router.Selection = Hash BalancedHash -> Some(Summarizer.tokenCounts sc.Model.VocabSize prepared.Train)
        | _ -> None
    use model = Summarizer.buildModel sc counts
    model.``to`` device |> ignore
    let task = Summarizer.task sc prepared model device
    let optimizer = Train.Loop.makeOptimizer sc.Train model
    let trainable = model.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.toArray
    model.train ()
    let batches = task.TrainBatches sc.Train.Seed 0 |> Seq.toArray
    if batches.Length = 0 then invalidOp "the training plan has no batches"
    let tokensOf (indices: int[]) =
        use _ = torch.NewDisposeScope()
        let b = Batching.collate sc.Batching prepared.Train indices
        { SourceTokens = b.SourceMask.sum().item<int64> ()
          TargetTokens = b.TargetMask.sum().item<int64> ()
          SourceLength = b.Source.shape[1]
          TargetLength = b.Target.shape[1] }
    let clock = stopwatchClock ()
    let pad = int64 Tokenizers.specials.Pad
    /// The forward and loss as `Summarizer.task` computes them, with a clock reading after each part:
    /// collate, encoder, decoder (with the output projection), loss.
    let profiledLoss (indices: int[]) (marks: Collections.Generic.List<float>) : Tensor =
        let on (t: Tensor) = if t.device = device then t else t.``to`` device
        let b = Batching.collate sc.Batching prepared.Train indices
        let src, srcValid = on b.Source, on b.SourceMask
        marks.Add(clock ())
        let encoded = model.Encode(src, srcValid)
        synchronize device
        marks.Add(clock ())
        let out = model.Decode(encoded.Memory, srcValid, on b.DecoderInput, on b.TargetMask, Unchecked.defaultof<Models.DecoderCache>)
        synchronize device
        marks.Add(clock ())
        let ce = Train.Losses.crossEntropy sc.Train.LabelSmoothing pad out.Logits (on b.Target)
        let total = Train.Losses.totalLoss sc.Train.LossWeights { TaskLoss = ce.Loss; Moe = encoded.Moe @ out.Moe; Tokens = ce.Tokens }
        synchronize device
        marks.Add(clock ())
        total
    /// One step as `Train` takes it; returns the clock readings' differences, the last one the whole step.
    let runStep (indices: int[]) : float[] =
        use _ = torch.NewDisposeScope()
        let marks = Collections.Generic.List<float>()
        marks.Add(clock ())
        optimizer.zero_grad ()
        let total =
            if cfg.Profile then profiledLoss indices marks
            else
                let t = Train.Losses.totalLoss sc.Train.LossWeights (task.Loss Train.Training indices)
                synchronize device
                marks.Add(clock ())
                t
        total.backward ()
        synchronize device
        marks.Add(clock ())
        let clip = if sc.Train.GradClip > 0.0 then sc.Train.GradClip else Double.PositiveInfinity
        torch.nn.utils.clip_grad_norm_ (trainable, clip, 2.0) |> ignore
        marks.Add(clock ())
        optimizer.step () |> ignore
        synchronize device
        marks.Add(clock ())
        [| for i in 1 .. marks.Count - 1 -> marks[i] - marks[i - 1]
           yield marks[marks.Count - 1] - marks[0] |]
    progress (sprintf "%d warm-up and %d timed steps" cfg.Warmup cfg.Steps)
    let pick i = batches[i % batches.Length]
    for i in 0 .. cfg.Warmup - 1 do runStep (pick i) |> ignore
    let timed = [| for i in cfg.Warmup .. cfg.Warmup + cfg.Steps - 1 -> tokensOf (pick i), runStep (pick i) |]
    let whole (t: float[]) = t[t.Length - 1]
    let stepMs = timed |> Array.map (snd >> whole)
    let tokensPerS = timed |> Array.map (fun (b, t) -> float (b.SourceTokens + b.TargetTokens) / (whole t / 1000.0))
    let gflops = timed |> Array.map (fun (b, t) -> 3.0 * modelForwardFlops sc.Model b / (whole t / 1000.0) / 1e9)
    let phaseNames = [ "zero_grad + batch"; "encoder forward"; "decoder forward"; "loss"; "backward"; "clip"; "optimizer" ]
    let moeProfile =
        match cfg.Profile, sc.Model.Ffn with
        | true, Models.Moe m ->
            let meanTokens = timed |> Array.averageBy (fun (b, _) -> float b.SourceTokens) |> int
            let shape = { Tokens = meanTokens; ModelDim = m.ModelDim; ExpertHidden = m.ExpertHidden; Experts = m.Router.Experts; K = RouterConfig.picksPerToken m.Router; Activation = m.Activation }
            progress (sprintf "profiling one MoE layer at %d tokens (an encoder layer's batch)" meanTokens)
            Some(profileLayer { BenchConfig.defaults with Reps = BenchConfig.minReps } device shape)
        | _ -> None
    let modelGflops = median gflops
    { Machine = machine
      Parameters = model.ParameterCount()
      StepMs = median stepMs
      TokensPerS = median tokensPerS
      ModelGflops = modelGflops
      Mfu = modelGflops / machine.MatmulGflops
      Phases = if cfg.Profile then [ for i, name in List.indexed phaseNames -> name, median (timed |> Array.map (fun (_, t) -> t[i])) ] else []
      MoeProfile = moeProfile }

/// The training-step report as text.
let trainStepTable (r: TrainStepReport) : string =
    String.concat "\n"
        [ sprintf "parameters %d (active per token %d); matmul ceiling %.1f GFLOP/s (float32), %d threads" r.Parameters.Total r.Parameters.Active r.Machine.MatmulGflops r.Machine.Threads
          sprintf "step %.1f ms (median), %.0f tokens/s, model %.2f GFLOP/s = %.1f%% of the ceiling (MFU)" r.StepMs r.TokensPerS r.ModelGflops (100.0 * r.Mfu)
          if not r.Phases.IsEmpty then
              "phases (median ms, share of the step):"
              for name, ms in r.Phases do
                  sprintf "  %-18s %9.1f ms  %5.0f%%" name ms (100.0 * ms / r.StepMs)
          match r.MoeProfile with
          | Some p -> "one MoE layer alone at the step's token count:\n" + profileTable p
          | None -> () ] + "\n"
