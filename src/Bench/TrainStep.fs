/// The training-step benchmark (`moe bench train-step`): the summarizer's training-step tokens/s, its
/// model-FLOPs utilisation against the measured matmul ceiling, the CPU time it spends in the kernel and its
/// peak resident memory, on the built-in corpus or at the lengths of real news articles.
///
/// Axes: B batch, S sequence.
module Moe.Bench.TrainStep

open System
open System.Diagnostics
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

// ---------------------------------------------------------------- real-length data

/// A log-normal length distribution: its median and the standard deviation of the log.
type LogNormal = { Median: float; LogSd: float }

/// Document and summary lengths in tokens, before truncation.
type LengthModel = { Source: LogNormal; Target: LogNormal }

module LengthModel =
    /// XSum as measured on the 1,000 test articles of `xsum-test-docs` (../shared/data) tokenized with
    /// cl100k_base: documents median 372 tokens, 10% below 123, 10% above 968, 35% longer than 512 (log-normal
    /// fit: median 364, log sd 0.77); summaries median 26 (fit: median 25, log sd 0.26).
    let xsum = { Source = { Median = 364.0; LogSd = 0.77 }; Target = { Median = 25.0; LogSd = 0.26 } }

    /// The generator of stream `stream` of example `index`: seeded from a fixed mix of (seed, index, stream),
    /// never HashCode (randomised per process), so every process draws the same.
    let rngFor (seed: int) (index: int) (stream: int) : Random =
        Random(int (Native.stepSeed seed (index * 2 + stream) &&& 0x7FFFFFFFL))

    /// The (document, summary) lengths of example `index`, at least 1 each.
    let draw (model: LengthModel) (seed: int) (index: int) : int * int =
        let rng = rngFor seed index 0
        let one (d: LogNormal) =
            // Box-Muller: one standard normal from two uniforms.
            let z = sqrt (-2.0 * log (1.0 - rng.NextDouble())) * cos (2.0 * Math.PI * rng.NextDouble())
            max 1 (int (Math.Round(d.Median * exp (d.LogSd * z))))
        let source = one model.Source
        source, one model.Target

/// `count` tokenized examples with lengths drawn from `lengths` and ids uniform over the regular ids of a
/// `vocabSize` vocabulary: the shapes of a real corpus without its text. Lengths are drawn once (two ints per
/// example); ids are made on each read from (seed, index), so the same seed gives the same batches in every
/// process.
type GeneratedTokens(count: int, vocabSize: int, lengths: LengthModel, seed: int) =
    do
        if count < 1 then invalidArg "count" (sprintf "expected count >= 1, got %d" count)
        if vocabSize <= Tokenizers.SpecialCount then
            invalidArg "vocabSize" (sprintf "expected a vocabulary larger than the %d special ids, got %d" Tokenizers.SpecialCount vocabSize)
    let sourceLengths, targetLengths = Array.init count (LengthModel.draw lengths seed) |> Array.unzip
    member _.VocabSize = vocabSize
    interface Batching.ITokenSource with
        member _.Count = count
        member _.Specials = Tokenizers.specials
        member _.SourceLength i = sourceLengths[i]
        member _.TargetLength i = targetLengths[i]
        member _.Read i =
            let rng = LengthModel.rngFor seed i 1
            let ids n = Array.init n (fun _ -> rng.Next(Tokenizers.SpecialCount, vocabSize))
            let doc = ids sourceLengths[i]
            doc, ids targetLengths[i]
        member _.Id i = sprintf "generated-%d" i
        member _.Label _ = None

/// What the training steps run on.
type StepData =
    /// The summarizer's own data (`Summarizer.prepare`: by default the built-in synthetic corpus, whose documents
    /// are 100-250 words).
    | PreparedCorpus
    /// `GeneratedTokens` at real lengths, with the vocabulary size a real corpus gives the tokenizer.
    | RealLengths of examples: int * vocabSize: int * lengths: LengthModel

/// Settings of the training-step benchmark.
type TrainStepConfig =
    { /// The job whose training step is timed (`Summarizer.SummarizerConfig.defaults`: the default summarizer).
      Summarizer: Summarizer.SummarizerConfig
      /// What the steps train on.
      Data: StepData
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
          Data = PreparedCorpus
          Warmup = 3
          Steps = 10
          CeilingSizes = Array.ofList ceilingSizes
          Profile = false }

    /// What cl100k_base trimmed to on 800 real XSum articles (the measurement that found the kernel time).
    let realVocabulary = 23573

    /// Source positions of the usual BART/PEGASUS XSum setting; summary positions with room for the long tail.
    let private realBatching (cfg: Summarizer.SummarizerConfig) =
        { cfg.Batching with MaxSourceTokens = 512; MaxTargetTokens = 64 }

    /// `cfg`'s summarizer at the lengths of real XSum articles (`LengthModel.xsum`, 2,000 examples).
    let realLength (cfg: TrainStepConfig) : TrainStepConfig =
        { cfg with
            Summarizer = { cfg.Summarizer with Batching = realBatching cfg.Summarizer }
            Data = RealLengths(2000, realVocabulary, LengthModel.xsum) }

    /// A Transformer-base-sized MoE at real lengths: d = 512, 6 + 6 layers, 8 heads, feed-forward sublayers of
    /// 8 experts (hidden 2048, Vaswani et al. 2017's base FFN) with top-2 routing, a 32,000-id vocabulary,
    /// batches of 8 documents; `cfg`'s attention implementation.
    let transformerBase (cfg: TrainStepConfig) : TrainStepConfig =
        let s = Summarizer.SummarizerConfig.topK 8 2 Summarizer.SummarizerConfig.defaults
        let model =
            { s.Model with
                ModelDim = 512; Heads = 8; KvHeads = 8; EncoderLayers = 6; DecoderLayers = 6
                Attention = cfg.Summarizer.Model.Attention }
        let ffn =
            match model.Ffn with
            | Models.Moe m -> Models.Moe { m with ModelDim = 512; ExpertHidden = 2048 }
            | other -> other
        let s = { s with Model = { model with Ffn = ffn }; Train = { s.Train with BatchSize = 8 } }
        { cfg with
            Summarizer = { s with Batching = realBatching s }
            Data = RealLengths(2000, 32000, LengthModel.xsum) }

    let validate (cfg: TrainStepConfig) : string list =
        [ if cfg.Warmup < 0 then sprintf "Warmup must be >= 0, got %d" cfg.Warmup
          if cfg.Steps < 1 then sprintf "Steps must be >= 1, got %d" cfg.Steps
          if cfg.CeilingSizes.Length = 0 || Array.exists (fun n -> n < 1) cfg.CeilingSizes then
              sprintf "CeilingSizes: expected sizes >= 1, got %A" cfg.CeilingSizes
          match cfg.Data with
          | RealLengths (n, v, _) when n < 1 || v <= Tokenizers.SpecialCount ->
              sprintf "Data: expected at least one example and a vocabulary above %d ids, got %d and %d" Tokenizers.SpecialCount n v
          | _ -> ()
          yield! Summarizer.SummarizerConfig.validate cfg.Summarizer |> List.map (fun p -> "Summarizer: " + p) ]

/// CPU time of this process (all threads), seconds: in user mode and in the kernel.
type CpuTimes = { UserS: float; SystemS: float }

/// This process's CPU times so far.
let cpuTimes () : CpuTimes =
    use p = Process.GetCurrentProcess()
    { UserS = p.UserProcessorTime.TotalSeconds; SystemS = p.PrivilegedProcessorTime.TotalSeconds }

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
      /// CPU time of the timed steps (all threads): user and kernel.
      Cpu: CpuTimes
      /// Peak resident memory of the process when the timed steps end, MiB (None off Linux).
      PeakRssMb: float option
      /// Padded positions that hold no token, over all positions of the timed batches (source and target).
      PaddingFraction: float
      /// Real source + target tokens per timed batch, on average.
      TokensPerBatch: float
      /// Each timed step's total loss: equal bit for bit across allocator policies (they change no arithmetic).
      Losses: float[]
      /// Median milliseconds per phase, with --profile: zero_grad + batch, encoder forward, decoder forward
      /// (with the output projection), loss, backward, clip, optimizer.
      Phases: (string * float) list
      /// With --profile and MoE layers: the first MoE layer alone at the step's mean token count.
      MoeProfile: LayerProfile option }

/// The token sources the steps train on: the summarizer's own data, or `GeneratedTokens` with a tokenizer of
/// the same vocabulary size (cl100k_base's first ids: only its size matters to a training step).
let private prepareData (cfg: TrainStepConfig) : Summarizer.Prepared =
    match cfg.Data with
    | PreparedCorpus -> Summarizer.prepare cfg.Summarizer
    | RealLengths (examples, vocabSize, lengths) ->
        let encoder = Tokenizers.cl100k ()
        let counts = Array.init encoder.Size (fun i -> if i < vocabSize - Tokenizers.SpecialCount then 1L else 0L)
        let tokenizer = Tokenizers.Tokenizer(encoder, Tokenizers.Vocabulary.trimmed encoder 1 counts)
        let source = GeneratedTokens(examples, vocabSize, lengths, cfg.Summarizer.Train.Seed) :> Batching.ITokenSource
        { Tokenizer = tokenizer; Train = source; Valid = source; Test = source; TestExamples = [||]; Notes = []; Resources = [] }

/// Times training steps of the summarizer exactly as `Train` takes them (its task's loss, `Train.Losses.totalLoss`,
/// backward, `clip_grad_norm_`, AdamW from `Train.Loop.makeOptimizer`, gradients zeroed in place), on batches from
/// the training plan in order. Model FLOPs come from `modelForwardFlops` of each batch; the ceiling from
/// `matmulGflops`. Nothing is written to disk.
let trainStep (cfg: TrainStepConfig) (progress: string -> unit) : TrainStepReport =
    let cfg = orFail "train-step config" (TrainStepConfig.validate cfg) cfg
    let device = cfg.Summarizer.Train.Device |> Native.resolveDevice
    progress "measuring the float32 matmul ceiling"
    let machine = { MatmulGflops = matmulGflops device (List.ofArray cfg.CeilingSizes) BenchConfig.minReps; Threads = torch.get_num_threads (); Allocator = Native.cpuAllocatorInForce () }
    progress "preparing the data and the model"
    use prepared = prepareData cfg
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
          TargetLength = b.Target.shape[1] }, b.Size
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
    /// One step as `Train` takes it; returns the clock readings' differences (the last one the whole step)
    /// and the step's total loss.
    let runStep (indices: int[]) : float[] * float =
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
        let loss = total.item<float32> () |> float
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
           yield marks[marks.Count - 1] - marks[0] |], loss
    progress (sprintf "%d warm-up and %d timed steps" cfg.Warmup cfg.Steps)
    let pick i = batches[i % batches.Length]
    for i in 0 .. cfg.Warmup - 1 do runStep (pick i) |> ignore
    let shapes = [| for i in cfg.Warmup .. cfg.Warmup + cfg.Steps - 1 -> tokensOf (pick i) |]
    let before = cpuTimes ()
    let steps = [| for i in cfg.Warmup .. cfg.Warmup + cfg.Steps - 1 -> runStep (pick i) |]
    let after = cpuTimes ()
    let peak = peakRssMb ()
    let timed = Array.zip (Array.map fst shapes) (Array.map fst steps)
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
    let positions = shapes |> Array.sumBy (fun (b, size) -> float size * float (b.SourceLength + b.TargetLength))
    let real = shapes |> Array.sumBy (fun (b, _) -> float (b.SourceTokens + b.TargetTokens))
    { Machine = machine
      Parameters = model.ParameterCount()
      StepMs = median stepMs
      TokensPerS = median tokensPerS
      ModelGflops = modelGflops
      Mfu = modelGflops / machine.MatmulGflops
      Cpu = { UserS = after.UserS - before.UserS; SystemS = after.SystemS - before.SystemS }
      PeakRssMb = peak
      PaddingFraction = 1.0 - real / positions
      TokensPerBatch = real / float shapes.Length
      Losses = Array.map snd steps
      Phases = if cfg.Profile then [ for i, name in List.indexed phaseNames -> name, median (timed |> Array.map (fun (_, t) -> t[i])) ] else []
      MoeProfile = moeProfile }

/// The training-step report as text.
let trainStepTable (r: TrainStepReport) : string =
    String.concat "\n"
        [ sprintf "parameters %d (active per token %d); matmul ceiling %.1f GFLOP/s (float32), %d threads" r.Parameters.Total r.Parameters.Active r.Machine.MatmulGflops r.Machine.Threads
          sprintf "step %.1f ms (median), %.0f tokens/s, model %.2f GFLOP/s = %.1f%% of the ceiling (MFU)" r.StepMs r.TokensPerS r.ModelGflops (100.0 * r.Mfu)
          sprintf "%.0f real tokens per batch, %.1f%% of positions padding; CPU allocator %s" r.TokensPerBatch (100.0 * r.PaddingFraction) (Native.CpuAllocator.name r.Machine.Allocator)
          sprintf "CPU time of the %d timed steps: user %.2f s, system %.2f s (%.1f%% of user); peak RSS %s"
              r.Losses.Length r.Cpu.UserS r.Cpu.SystemS (100.0 * r.Cpu.SystemS / r.Cpu.UserS)
              (match r.PeakRssMb with Some mb -> sprintf "%.0f MiB" mb | None -> "not measured here")
          if not r.Phases.IsEmpty then
              "phases (median ms, share of the step):"
              for name, ms in r.Phases do
                  sprintf "  %-18s %9.1f ms  %5.0f%%" name ms (100.0 * ms / r.StepMs)
          match r.MoeProfile with
          | Some p -> "one MoE layer alone at the step's token count:\n" + profileTable p
          | None -> () ] + "\n"

// ---------------------------------------------------------------- allocator policies compared

/// The numbers of one run that a comparison across processes needs (what `--json` prints).
type StepSummary =
    { Allocator: string
      Threads: int
      MatmulGflops: float
      Parameters: int64
      ActiveParameters: int64
      StepMs: float
      TokensPerS: float
      Mfu: float
      UserS: float
      SystemS: float
      PeakRssMb: float option
      PaddingFraction: float
      TokensPerBatch: float
      Losses: float[] }

/// The comparable numbers of a report.
let summaryOf (r: TrainStepReport) : StepSummary =
    { Allocator = Native.CpuAllocator.name r.Machine.Allocator
      Threads = r.Machine.Threads
      MatmulGflops = r.Machine.MatmulGflops
      Parameters = r.Parameters.Total
      ActiveParameters = r.Parameters.Active
      StepMs = r.StepMs
      TokensPerS = r.TokensPerS
      Mfu = r.Mfu
      UserS = r.Cpu.UserS
      SystemS = r.Cpu.SystemS
      PeakRssMb = r.PeakRssMb
      PaddingFraction = r.PaddingFraction
      TokensPerBatch = r.TokensPerBatch
      Losses = r.Losses }

/// Runs of the same steps under different allocator policies (each in its own process, since a policy is
/// process-wide), the first one the baseline: a row per run, then each later run's ratios to the first and
/// whether its losses equal the baseline's bit for bit.
let allocatorComparison (runs: StepSummary list) : string =
    match runs with
    | [] -> invalidArg "runs" "expected at least one run to compare, got none"
    | first :: rest ->
        let rss (s: StepSummary) = match s.PeakRssMb with Some mb -> sprintf "%8.0f" mb | None -> "       -"
        let row (s: StepSummary) =
            sprintf "%-10s %9.1f %9.0f %6.1f%% %8.2f %8.2f %7.1f%% %s" (s.Allocator.Split(' ')[0]) s.StepMs s.TokensPerS (100.0 * s.Mfu) s.UserS s.SystemS (100.0 * s.SystemS / s.UserS) (rss s)
        let ratios (s: StepSummary) =
            let rssRatio =
                match s.PeakRssMb, first.PeakRssMb with
                | Some a, Some b -> sprintf "peak RSS %.2fx" (a / b)
                | _ -> "peak RSS not measured"
            let same = s.Losses.Length = first.Losses.Length && Array.forall2 (fun (a: float) b -> BitConverter.DoubleToInt64Bits a = BitConverter.DoubleToInt64Bits b) s.Losses first.Losses
            sprintf "%s vs %s: tokens/s %.2fx, system time %.2fx, %s; losses %s"
                (s.Allocator.Split(' ')[0]) (first.Allocator.Split(' ')[0]) (s.TokensPerS / first.TokensPerS) (s.SystemS / first.SystemS) rssRatio
                (if same then "identical bit for bit" else "DIFFER")
        String.concat "\n"
            [ yield sprintf "%d parameters (%d active), %d threads, matmul ceiling %.1f GFLOP/s; %.0f real tokens per batch, %.1f%% padding"
                    first.Parameters first.ActiveParameters first.Threads first.MatmulGflops first.TokensPerBatch (100.0 * first.PaddingFraction)
              yield sprintf "%-10s %9s %9s %7s %8s %8s %8s %8s" "allocator" "step ms" "tokens/s" "MFU" "user s" "sys s" "sys/user" "peak MiB"
              for s in runs -> row s
              for s in rest -> ratios s ] + "\n"
