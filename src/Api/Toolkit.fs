/// The C# API: namespace `MoeToolkit` (`using MoeToolkit;`), ordinary .NET types over the F# modules:
/// PascalCase methods, options objects with settable properties, enums instead of unions, arrays instead
/// of F# lists, and `IDisposable` where a result owns tensors. F# code keeps using the curried modules.
/// Axes: T tokens, D model width, E experts, K picks per token.
namespace MoeToolkit

open System
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules
open Moe
open Moe.Config
open Moe.Train

// ---------------------------------------------------------------- start-up

/// libtorch start-up, seeding and devices.
[<AbstractClass; Sealed>]
type MoeRuntime =
    /// The one call before any tensor, in a built app and in `dotnet fsi` with `#r "nuget: MoeToolkit"`:
    /// loads libtorch (a GLIBCXX-patched copy of TorchSharp's shim where fsi needs one) and runs one
    /// operation; throws with the loader's message when libtorch cannot start (`Startup.initialise`).
    static member Initialize() : unit = Startup.initialise ()

    /// TorchSharp and libtorch versions, threads and CUDA devices, on one line.
    static member Describe() : string = Native.describeRuntime ()

    /// Seeds libtorch's CPU and CUDA generators.
    static member Seed(seed: int) : unit = Native.seedAll seed

    /// The device for "auto" (CUDA when libtorch sees a GPU, else the CPU), "cpu" or "cuda" (an error
    /// without a GPU, never a silent fallback).
    static member Device([<Optional; DefaultParameterValue("auto")>] choice: string) : torch.Device =
        match Native.parseDevice choice with
        | Ok c -> Native.resolveDevice c
        | Error e -> invalidArg "choice" e

// ---------------------------------------------------------------- options

/// Who chooses the experts, and how (`Config.Selection`).
type RouterKind =
    /// Each token picks its TopK experts: softmax over all experts, the k largest kept and renormalised
    /// (Switch, GShard, Mixtral).
    | TopK = 0
    /// Switch Transformer top-1 with multiplicative jitter in training (Fedus et al. 2022).
    | Switch = 1
    /// Trainable softplus noise on the logits in training, then top-k (Shazeer et al. 2017).
    | NoisyTopK = 2
    /// Each expert takes its top-C tokens (Zhou et al. 2022).
    | ExpertChoice = 3
    /// Every expert, weighted by the softmax (a soft mixture, no top-k).
    | AllExperts = 4
    /// A fixed random map token id -> expert (Roller et al. 2021); needs token ids, has no parameters.
    | Hash = 5

/// The expert feed-forward activation.
type ExpertActivation =
    | Relu = 0
    | Gelu = 1
    /// Shazeer 2020: (silu(x W1) * x W3) W2.
    | SwiGlu = 2

/// Router settings; the defaults are `RouterConfig.defaults` (top-2 of 8, dropless).
[<AllowNullLiteral>]
type RouterOptions() =
    /// Experts E.
    member val Experts = RouterConfig.defaults.Experts with get, set
    /// Picks per token for TopK and NoisyTopK.
    member val TopK = RouterConfig.defaults.K with get, set
    member val Kind = RouterKind.TopK with get, set
    /// Sparsemax instead of softmax (Martins & Astudillo 2016): exact zeros in the weights.
    member val Sparsemax = false with get, set
    /// Per-expert capacity factor (Switch eq. 3); 0 means dropless (no token is dropped).
    member val CapacityFactor = 0.0 with get, set
    /// Lower bound on capacity, so tiny batches do not drop everything (Switch uses 4).
    member val MinCapacity = RouterConfig.defaults.MinCapacity with get, set
    /// Switch's jitter epsilon (Kind = Switch).
    member val Jitter = RouterConfig.defaults.Jitter with get, set
    /// DeepSeek-V3 auxiliary-loss-free balancing: the bias update rate; 0 turns it off.
    member val LossFreeBiasRate = 0.0 with get, set
    /// The seed of the token -> expert map (Kind = Hash).
    member val HashSeed = 0 with get, set

    /// The F# record; throws `ArgumentException` listing every problem.
    member o.ToConfig() : RouterConfig =
        let cfg =
            { RouterConfig.defaults with
                Experts = o.Experts
                K = o.TopK
                Normaliser = (if o.Sparsemax then Sparsemax else Softmax)
                Selection =
                    (match o.Kind with
                     | RouterKind.TopK -> TokenChoiceTopK(NormaliseThenTopK, true)
                     | RouterKind.Switch -> SwitchTop1
                     | RouterKind.NoisyTopK -> NoisyTopK
                     | RouterKind.ExpertChoice -> ExpertChoice
                     | RouterKind.AllExperts -> AllExperts
                     | RouterKind.Hash -> Hash(RandomHash o.HashSeed)
                     | other -> invalidArg "Kind" (sprintf "expected a RouterKind, got %d" (int other)))
                Capacity = (if o.CapacityFactor > 0.0 then Factor o.CapacityFactor else Dropless)
                MinCapacity = o.MinCapacity
                Jitter = o.Jitter
                BiasUpdateRate = (if o.LossFreeBiasRate > 0.0 then Some o.LossFreeBiasRate else None) }
        match RouterConfig.validate cfg with
        | [] -> cfg
        | problems -> invalidArg "options" ("expected valid router options: " + String.Join("; ", problems))

/// MoE layer settings; the defaults are `MoeConfig.defaults` (d = 64, expert hidden 128, GELU).
[<AllowNullLiteral>]
type MoeLayerOptions() =
    /// Model width D (input and output).
    member val ModelDim = MoeConfig.defaults.ModelDim with get, set
    /// Hidden width of each expert FFN.
    member val ExpertHidden = MoeConfig.defaults.ExpertHidden with get, set
    member val Activation = ExpertActivation.Gelu with get, set
    /// Always-on experts added to every token's output (DeepSeekMoE); 0 for none.
    member val SharedExperts = 0 with get, set
    member val Router = RouterOptions() with get, set

    /// The F# record; throws `ArgumentException` listing every problem.
    member o.ToConfig() : MoeConfig =
        if isNull o.Router then invalidArg "Router" "expected router options, got null"
        let cfg =
            { ModelDim = o.ModelDim
              ExpertHidden = o.ExpertHidden
              Activation =
                (match o.Activation with
                 | ExpertActivation.Relu -> ReLU
                 | ExpertActivation.Gelu -> GELU
                 | ExpertActivation.SwiGlu -> SwiGLU
                 | other -> invalidArg "Activation" (sprintf "expected an ExpertActivation, got %d" (int other)))
              Router = o.Router.ToConfig()
              SharedExperts = o.SharedExperts }
        match MoeConfig.validate cfg with
        | [] -> cfg
        | problems -> invalidArg "options" ("expected valid MoE layer options: " + String.Join("; ", problems))

/// Weights of the balancing losses where they are added to the task loss; defaults `LossWeights.defaults`.
[<AllowNullLiteral>]
type AuxLossWeights() =
    /// Switch Transformer eq. 4.
    member val SwitchAux = LossWeights.defaults.SwitchAux with get, set
    /// Shazeer et al. 2017 eq. 6.
    member val Importance = LossWeights.defaults.Importance with get, set
    /// Shazeer et al. 2017 eq. 10.
    member val Load = LossWeights.defaults.Load with get, set
    /// ST-MoE eq. 5.
    member val ZLoss = LossWeights.defaults.ZLoss with get, set
    member w.ToConfig() : LossWeights = { SwitchAux = w.SwitchAux; Importance = w.Importance; Load = w.Load; ZLoss = w.ZLoss }

// ---------------------------------------------------------------- routing results

/// Routing statistics as numbers, copied off the device.
type RoutingStatistics(tokensPerExpert: float32[], droppedFraction: float, routerEntropy: float) =
    /// Each routing statistic tensor read once.
    static member internal Of(stats: Routing.RoutingStats) =
        RoutingStatistics(Tensors.toFloats stats.TokensPerExpert, Tensors.scalar stats.DroppedFraction, Tensors.scalar stats.RouterEntropy)
    /// Fraction of kept assignments that went to each expert [E] (sums to 1).
    member _.TokensPerExpert = tokensPerExpert
    /// Fraction of proposed assignments dropped by capacity.
    member _.DroppedFraction = droppedFraction
    /// Mean router entropy in nats.
    member _.RouterEntropy = routerEntropy
    /// Coefficient of variation of the expert loads (standard deviation over mean): 0 is perfect balance.
    member _.LoadCv = RunLog.loadCv (tokensPerExpert |> Array.map float)
    override s.ToString() =
        sprintf "tokens per expert [%s], load CV %.4f, dropped %.4f, router entropy %.4f nats"
            (String.Join(" ", tokensPerExpert |> Array.map (fun f -> f.ToString("F3", Globalization.CultureInfo.InvariantCulture))))
            s.LoadCv droppedFraction routerEntropy

/// The four balancing losses, unweighted (differentiable scalars); disposing frees them.
type AuxLossValues internal (aux: Routing.AuxLosses) =
    /// Switch Transformer eq. 4.
    member _.SwitchAux = aux.SwitchAux
    /// Shazeer et al. 2017 eq. 6.
    member _.Importance = aux.Importance
    /// Shazeer et al. 2017 eq. 10.
    member _.Load = aux.Load
    /// ST-MoE eq. 5.
    member _.ZLoss = aux.ZLoss
    /// The F# record.
    member _.Record = aux
    /// The losses weighted and summed (a new differentiable scalar); null weights take the defaults.
    member _.Weighted([<Optional; DefaultParameterValue(null: AuxLossWeights)>] weights: AuxLossWeights) : torch.Tensor =
        Layers.weightedAux (if isNull weights then LossWeights.defaults else weights.ToConfig()) aux
    interface IDisposable with
        member _.Dispose() =
            for t in [ aux.SwitchAux; aux.Importance; aux.Load; aux.ZLoss ] do t.Dispose()

/// What `MoeLayer.Forward` returns; it owns its tensors (`using var y = layer.Forward(x);`).
type MoeLayerOutput internal (output: torch.Tensor, aux: AuxLossValues, statistics: RoutingStatistics) =
    /// [.., D], like the input.
    member _.Output = output
    /// The unweighted balancing losses.
    member _.AuxLosses = aux
    /// The balancing losses weighted and summed, ready to add to the task loss; null weights take the defaults.
    member _.AuxLoss([<Optional; DefaultParameterValue(null: AuxLossWeights)>] weights: AuxLossWeights) : torch.Tensor = aux.Weighted weights
    member _.Statistics = statistics
    interface IDisposable with
        member _.Dispose() =
            output.Dispose()
            (aux :> IDisposable).Dispose()

/// A routing decision (`Router.Route`); it owns its tensors.
type RoutingResult internal (routing: Routing.Routing) =
    /// Expert of each (token, slot) [T; K] int64.
    member _.ExpertIndex = routing.Experts
    /// Combine weight of each (token, slot) [T; K].
    member _.Weights = routing.Weights
    /// Whether each (token, slot) survived capacity [T; K] bool.
    member _.Kept = routing.Kept
    /// Capacity per expert; null when dropless.
    member _.Capacity = Option.toNullable routing.Capacity
    member val Statistics = RoutingStatistics.Of routing.Stats
    /// The F# record.
    member _.Record = routing
    /// The four balancing losses of this routing, unweighted (new tensors the caller disposes).
    member _.AuxLosses() : AuxLossValues = new AuxLossValues(Routing.auxLosses routing)
    interface IDisposable with
        member _.Dispose() =
            let r = routing
            for t in [ r.Experts; r.Weights; r.Kept; r.Gates; r.Stats.TokensPerExpert; r.Stats.DroppedFraction; r.Stats.RouterEntropy ] do t.Dispose()
            for t in [ r.Probs; r.Logits; r.LoadProbability ] do Option.iter (fun (t: torch.Tensor) -> t.Dispose()) t

// ---------------------------------------------------------------- router and layer

/// Routers as pure functions over logits (no parameters): `Router.Route(options, logits)`.
[<AbstractClass; Sealed>]
type Router =
    /// Routes T tokens: logits [T; E] float32; tokenIds [T] int64 for hash routing, else null; training turns
    /// on Switch jitter and NoisyTopK noise, whose scale noiseStd [T; E] (softplus(x W_noise), Shazeer et al.
    /// 2017 eq. 4) a noisy router in training needs, else null.
    static member Route(options: RouterOptions, logits: torch.Tensor,
                        [<Optional; DefaultParameterValue(null: torch.Tensor)>] tokenIds: torch.Tensor,
                        [<Optional; DefaultParameterValue(false)>] training: bool,
                        [<Optional; DefaultParameterValue(null: torch.Tensor)>] noiseStd: torch.Tensor) : RoutingResult =
        if isNull options then invalidArg "options" "expected router options, got null"
        new RoutingResult(Routing.Routers.Route(options.ToConfig(), logits, noiseStd = noiseStd, tokenIds = tokenIds, training = training))

/// A sparse MoE layer (`Layers.MoeLayer`): a router, E expert FFNs and optional shared experts.
/// `Module` is the TorchSharp module, to register in your own model.
type MoeLayer(options: MoeLayerOptions) =
    let inner = new Layers.MoeLayer("moe", (if isNull options then MoeLayerOptions() else options).ToConfig())

    /// The TorchSharp module (its forward returns the F# result record).
    member _.Module = inner
    /// The resolved configuration.
    member _.Config = inner.Config
    /// Runs the layer on x [.., D]; tokenIds (hash routing only) holds one int64 id per token.
    member _.Forward(x: torch.Tensor, [<Optional; DefaultParameterValue(null: torch.Tensor)>] tokenIds: torch.Tensor) : MoeLayerOutput =
        let r = inner.forward (x, tokenIds)
        match r.Moe with
        | Some report -> new MoeLayerOutput(r.Output, new AuxLossValues(report.Aux), RoutingStatistics.Of report.Stats)
        | None -> invalidOp "an MoE layer always reports its routing"
    /// The parameters, for an optimizer.
    member _.Parameters() : Parameter seq = inner.parameters ()
    /// The parameters by name ("router.weight", "experts.w1", ...).
    member _.NamedParameters() : struct (string * Parameter) seq = inner.named_parameters ()
    /// Number of parameters.
    member _.ParameterCount : int64 = inner.parameters () |> Seq.sumBy (fun p -> p.numel ())
    /// Training mode (router noise, jitter, loss-free bias updates).
    member this.Train() : MoeLayer = inner.train () |> ignore; this
    /// Evaluation mode.
    member this.Eval() : MoeLayer = inner.eval () |> ignore; this
    /// Moves the parameters to a device.
    member this.To(device: torch.Device) : MoeLayer = inner.``to`` device |> ignore; this
    interface IDisposable with
        member _.Dispose() = inner.Dispose()

// ---------------------------------------------------------------- models

/// Encoder-decoder or decoder-only Transformer settings; the defaults are `ModelConfig.defaults`.
[<AllowNullLiteral>]
type TransformerOptions() =
    member val VocabSize = 512 with get, set
    member val ModelDim = Models.ModelConfig.defaults.ModelDim with get, set
    member val Heads = Models.ModelConfig.defaults.Heads with get, set
    /// Grouped-query attention's key/value heads; 0 means as many as Heads.
    member val KvHeads = 0 with get, set
    member val EncoderLayers = Models.ModelConfig.defaults.EncoderLayers with get, set
    member val DecoderLayers = Models.ModelConfig.defaults.DecoderLayers with get, set
    member val Dropout = Models.ModelConfig.defaults.Dropout with get, set
    member val MaxLength = Models.ModelConfig.defaults.MaxLength with get, set
    /// Hidden width of the dense FFNs (ignored by MoE sublayers, which use Moe.ExpertHidden).
    member val FfnHidden = 256 with get, set
    /// MoE feed-forward sublayers (ModelDim is taken from the model); null for a dense model.
    member val Moe : MoeLayerOptions = null with get, set
    /// Every MoeEvery-th layer is an MoE layer (1 = all).
    member val MoeEvery = 1 with get, set

    /// The F# record; throws `ArgumentException` listing every problem.
    member o.ToConfig() : Models.ModelConfig =
        let dense =
            Models.ModelApi.Config(o.VocabSize, modelDim = o.ModelDim, heads = o.Heads, kvHeads = o.KvHeads,
                                   encoderLayers = o.EncoderLayers, decoderLayers = o.DecoderLayers, dropout = o.Dropout,
                                   maxLength = o.MaxLength, ffnHidden = o.FfnHidden)
        let cfg = if isNull o.Moe then dense else Models.ModelApi.WithMoe(dense, o.Moe.ToConfig(), o.MoeEvery)
        match Models.ModelApi.Validate cfg with
        | [||] -> cfg
        | problems -> invalidArg "options" ("expected valid Transformer options: " + String.Join("; ", problems))

/// Transformers with MoE feed-forward sublayers; the models are TorchSharp modules (IDisposable).
[<AbstractClass; Sealed>]
type Transformer =
    /// An encoder-decoder (Vaswani et al. 2017): `model.Forward(src, tgt)` gives logits and MoE reports.
    static member EncoderDecoder(options: TransformerOptions) : Models.EncoderDecoder = new Models.EncoderDecoder(options.ToConfig())
    /// A decoder-only language model (EncoderLayers is ignored).
    static member DecoderOnly(options: TransformerOptions) : Models.DecoderOnly = new Models.DecoderOnly(options.ToConfig())

// ---------------------------------------------------------------- training and generating

/// A summarization run (the toolkit's main job) from C#; the defaults are `moe train`'s: the built-in
/// synthetic corpus and top-2 of 4 experts in every layer.
[<AllowNullLiteral>]
type SummarizerOptions() =
    /// The run folder is RunsDir/Name.
    member val Name = "summarizer" with get, set
    member val RunsDir = "runs" with get, set
    /// A data set (a file, or a folder with train*/valid*/test* files; see the README's data formats); null
    /// for the built-in synthetic corpus.
    member val DataPath : string = null with get, set
    /// Experts per MoE layer; 0 for a dense model.
    member val Experts = Moe.Summarizer.SummarizerConfig.mainJobExperts with get, set
    member val TopK = Moe.Summarizer.SummarizerConfig.mainJobK with get, set
    /// Hash routing (balanced by training-corpus frequency) instead of top-k.
    member val HashRouting = false with get, set
    member val Steps = Moe.Summarizer.SummarizerConfig.defaults.Train.Steps with get, set
    member val BatchSize = Moe.Summarizer.SummarizerConfig.defaults.Train.BatchSize with get, set
    member val LearningRate = Moe.Summarizer.SummarizerConfig.defaults.Train.LearningRate with get, set
    member val Seed = Moe.Summarizer.SummarizerConfig.defaults.Train.Seed with get, set
    /// "auto", "cpu" or "cuda".
    member val Device = "auto" with get, set
    /// Keep at most this many examples per split; 0 keeps all.
    member val MaxExamples = 0 with get, set
    /// Where progress lines go; null for the console.
    member val Output : IO.TextWriter = null with get, set

    /// The F# record, starting from `SummarizerConfig.defaults` (or the full record you pass to `Summarizer.Train`).
    member o.ToConfig() : Moe.Summarizer.SummarizerConfig =
        let d = Moe.Summarizer.SummarizerConfig.defaults
        let routed =
            if o.Experts <= 0 then d
            elif o.HashRouting then Moe.Summarizer.SummarizerConfig.hash o.Experts d
            else Moe.Summarizer.SummarizerConfig.topK o.Experts o.TopK d
        let device = match Native.parseDevice o.Device with Ok c -> c | Error e -> invalidArg "Device" e
        let cap = if o.MaxExamples > 0 then Some o.MaxExamples else None
        { routed with
            Name = o.Name
            RunsDir = o.RunsDir
            Source = (if isNull o.DataPath then routed.Source else Moe.Summarizer.Files(Moe.Summarizer.splitFilesOf o.DataPath))
            MaxTrain = cap
            MaxValid = cap
            MaxTest = cap
            Train = { routed.Train with Steps = o.Steps; BatchSize = o.BatchSize; LearningRate = o.LearningRate; Seed = o.Seed; Device = device } }

/// A trained summarizer read back from its run folder; disposing frees the model.
type TrainedSummarizer internal (loaded: Moe.Summarizer.Loaded) =
    /// The checkpoint it was read from.
    member _.Checkpoint = loaded.Checkpoint
    /// The model (a TorchSharp module).
    member _.Model = loaded.Model
    /// One summary per document, decoded with the run's settings; beamSize > 0 overrides its beam size.
    member _.Summarize(documents: string[], [<Optional; DefaultParameterValue(0)>] beamSize: int) : string[] =
        let gen = if beamSize > 0 then Some { loaded.Config.Generate with BeamSize = beamSize } else None
        Moe.Summarizer.summarizeTexts loaded gen documents
    interface IDisposable with
        member _.Dispose() = (loaded :> IDisposable).Dispose()

/// Training, resuming and reopening summarization runs.
[<AbstractClass; Sealed>]
type Summarizer =
    /// Trains, decodes the test split and scores it against lead-1; writes the run folder (README, "What the
    /// main job produces"). Returns the F# result record: RunDir, Train, Scores, Checkpoint.
    static member Train(options: SummarizerOptions) : Moe.Summarizer.SummaryResult =
        let opts = if isNull options then SummarizerOptions() else options
        let runOptions = { RunOptions.Defaults with Output = (if isNull opts.Output then Console.Out else opts.Output) }
        Moe.Summarizer.runWith runOptions false (opts.ToConfig())
    /// Continues a run from its last checkpoint with the same options.
    static member Resume(options: SummarizerOptions) : Moe.Summarizer.SummaryResult =
        let opts = if isNull options then SummarizerOptions() else options
        let runOptions = { RunOptions.Defaults with Output = (if isNull opts.Output then Console.Out else opts.Output) }
        Moe.Summarizer.runWith runOptions true (opts.ToConfig())
    /// Reopens a trained run (its best checkpoint, else its last) on a device ("auto", "cpu", "cuda").
    static member Load(runDir: string, [<Optional; DefaultParameterValue("auto")>] device: string) : TrainedSummarizer =
        let choice = match Native.parseDevice device with Ok c -> c | Error e -> invalidArg "device" e
        new TrainedSummarizer(Moe.Summarizer.load runDir None choice)

// ---------------------------------------------------------------- scoring and reporting

/// Summary scores: ROUGE-1/2/L/Lsum (as rouge-score), BLEU (as sacreBLEU), and with documents compression,
/// extractiveness, novel n-grams, coverage and density; means with bootstrap 95% intervals.
[<AbstractClass; Sealed>]
type Scores =
    /// Scores predictions against references, line by line; documents may be null; stem Porter-stems
    /// tokens for ROUGE (rouge-score's use_stemmer).
    static member Compute(predictions: string[], references: string[],
                          [<Optional; DefaultParameterValue(null: string[])>] documents: string[],
                          [<Optional; DefaultParameterValue(false)>] stem: bool) : Metrics.ScoreReport =
        Metrics.Scorer.Score(predictions, references, documents, stem)
    /// The JSON object `moe score --json` prints.
    static member ToJson(report: Metrics.ScoreReport) : string = Metrics.Scorer.ToJson report
    /// The text table `moe score` prints.
    static member ToTable(report: Metrics.ScoreReport) : string = Metrics.Scorer.ToTable report

/// The comparison page of run folders (`moe report`).
[<AbstractClass; Sealed>]
type Reports =
    /// Writes one self-contained HTML page comparing the runs; returns its full path.
    static member Write(runDirs: string seq, outPath: string) : string = Report.MoeReport.Write(runDirs, outPath)
    /// Reads a run folder (config, metrics, routing, scores).
    static member ReadRun(runDir: string) : RunLog.Run = RunLog.RunFolder.Load runDir
