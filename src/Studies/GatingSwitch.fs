/// The gating-strategy study on a pretrained Switch Transformer (`scripts/gating_switch.fsx`): the router grid
/// of `Experiments.gatingStrategies` (linear vs attention router x softmax vs sparsemax x top-k vs every expert)
/// put into every MoE layer of a Switch checkpoint (`Switch.SwitchModel.ReplaceRouters`), each router started
/// from the pretrained one, then fine-tuned for summarization with `Finetune`'s data path and the toolkit's
/// training loop. Per cell: test ROUGE, validation loss, load balance and measured active experts per token on
/// the test split, FLOPs per token of one MoE layer (`Analysis.moeFlops`), training time; a table, a figure and
/// a report page through `Experiments.finish`.
/// Axes: T tokens, D d_model, E experts, R attention-router width, k = min(D, E).
module Moe.GatingSwitch

open System
open System.IO
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Layers
open Moe.Routing
open Moe.Switch
open Moe.Train
open Moe.Experiments

type Tensor = torch.Tensor

// ---------------------------------------------------------------- the grid

/// How a cell's router scores tokens.
type RouterKind =
    /// logits = h W_r, as the checkpoint's router.
    | Linear
    /// logits_e = (h W_q) . m_e / sqrt(R) (`Routing.attentionLogits`).
    | Attention

/// One cell of the grid.
type Cell =
    { Router: RouterKind
      Normaliser: Normaliser
      /// true: top-k token choice (Switch top-1 when k = 1); false: every expert, weighted by the normaliser
      /// (dense mixing).
      TopK: bool }

module Cell =
    /// The eight cells, the checkpoint's own (linear, softmax, top-k) first.
    let all : Cell list =
        [ for router in [ Linear; Attention ] do
            for norm in [ Softmax; Sparsemax ] do
                for topK in [ true; false ] -> { Router = router; Normaliser = norm; TopK = topK } ]

    /// "linear-softmax-top1", "attention-sparsemax-all", ...
    let name (k: int) (c: Cell) : string =
        sprintf "%s-%s-%s" (match c.Router with Linear -> "linear" | Attention -> "attention")
            (match c.Normaliser with Softmax -> "softmax" | Sparsemax -> "sparsemax") (if c.TopK then sprintf "top%d" k else "all")

    /// Whether the cell is the checkpoint's own router (linear, softmax, Switch top-1), which is kept as loaded.
    let isCheckpoint (k: int) (c: Cell) : bool = c.Router = Linear && c.Normaliser = Softmax && c.TopK && k = 1

/// The attention router's query width R: a quarter of d_model as in `Experiments.gatingStrategies`, and at least
/// E, so that the pretrained linear router (rank <= E) factors exactly into it.
let attentionDim (sw: SwitchConfig) : int = max sw.NumExperts (sw.T5.DModel / 4)

/// The router of a cell over the checkpoint's experts, from the checkpoint's own (`SwitchConfig.moeConfig`:
/// jitter and float32 routing kept): top-k is Switch's top-1 when k = 1, else token-choice top-k with the k
/// weights renormalised; "all" is every expert weighted by the normaliser's output.
let routerOf (sw: SwitchConfig) (k: int) (c: Cell) : RouterConfig =
    let r = (SwitchConfig.moeConfig sw).Router
    { r with
        Scorer = (match c.Router with Linear -> LinearRouter | Attention -> AttentionRouter(attentionDim sw))
        Normaliser = c.Normaliser
        Selection = (if not c.TopK then AllExperts elif k = 1 then SwitchTop1 else TokenChoiceTopK(NormaliseThenTopK, true))
        K = (if c.TopK then k else sw.NumExperts) }

/// The MoE layer config of a cell (the checkpoint's experts, the cell's router).
let moeOf (sw: SwitchConfig) (k: int) (c: Cell) : MoeConfig = { SwitchConfig.moeConfig sw with Router = routerOf sw k c }

/// Switch's per-sequence expert capacity for top-k cells; none for dense mixing, where every expert takes every
/// token (a capacity would drop tokens that every expert must see).
let groupCapacityOf (sw: SwitchConfig) (c: Cell) : int option = if c.TopK then Some sw.ExpertCapacity else None

/// Starts an attention router from a pretrained linear one: with the thin SVD W_r = U diag(s) V^T ([D; k],
/// [k], [k; E]), the query's first k columns are U diag(sqrt s) R^(1/4) and the expert embeddings' first k
/// columns V diag(sqrt s) R^(1/4), so (h W_q) . m_e / sqrt(R) = (h W_r)_e: the attention router scores exactly
/// as the linear one did. The query's other R - k columns are zero and the embeddings' keep their random
/// initialisation, so those directions start silent yet receive gradients. linear [D; E]; router with R >= k.
let initAttentionFromLinear (linear: Tensor) (router: RouterModule) : unit =
    expectFloat "linear" "[D; E]" 2 linear
    if isNull router.Query then invalidArg "router" (sprintf "expected an attention router, got %A" router.Config.Scorer)
    let d, e, r = linear.shape[0], linear.shape[1], router.Query.shape[1]
    if router.Query.shape[0] <> d || router.ExpertEmbeddings.shape[0] <> e then
        invalidArg "linear" (sprintf "expected the linear router [%d; %d] of the attention router's shape, got %s" router.Query.shape[0] router.ExpertEmbeddings.shape[0] (describe linear))
    let k = min d e
    if r < k then invalidArg "router" (sprintf "expected an attention router width R >= min(D, E) = %d to hold the linear router, got %d" k r)
    use _ = torch.no_grad ()
    use _ = torch.NewDisposeScope()
    let struct (u, s, vh) = torch.linalg.svd (linear.to_type torch.ScalarType.Float64, fullMatrices = false) // [D; k], [k], [k; E]
    let root = (mulScalar (Math.Pow(float r, 0.25)) (s.sqrt ())).unsqueeze 0L // [1; k]
    router.Query.zero_ () |> ignore
    router.Query.narrow(1L, 0L, k).copy_ (u * root) |> ignore // [D; k]
    router.ExpertEmbeddings.narrow(1L, 0L, k).copy_ (vh.t () * root) |> ignore // [E; k]

/// Puts the cell's router into every MoE layer of `model`: the checkpoint's cell keeps the loaded router as it
/// is; every other cell gets a fresh router (`ReplaceRouters`, experts kept) started from the pretrained one:
/// a linear router copies W_r, an attention router factors it (`initAttentionFromLinear`).
let configure (k: int) (c: Cell) (model: SwitchModel) : unit =
    if not (Cell.isCheckpoint k c) then
        let sw = model.SwitchConfig
        let pretrained = [ for _, layer in model.MoeLayers() -> layer.Router.Weight.detach().clone () ] // each [D; E]
        try
            model.ReplaceRouters(routerOf sw k c, groupCapacityOf sw c)
            use _ = torch.no_grad ()
            for (_, layer), w in List.zip (List.ofArray (model.MoeLayers())) pretrained do
                match c.Router with
                | Linear -> layer.Router.Weight.copy_ w |> ignore
                | Attention -> initAttentionFromLinear w layer.Router
        finally
            for w in pretrained do w.Dispose()

// ---------------------------------------------------------------- measuring routing on the test split

/// What one MoE layer's routing did over the measured tokens.
type LayerTally =
    { Layer: string
      Experts: int
      mutable Tokens: int64
      /// Kept slots with a nonzero weight: the experts that computed for a token.
      mutable Active: int64
      /// Tokens no expert took (only their residual passes).
      mutable Dropped: int64
      /// Router entropy (nats) summed over tokens.
      mutable EntropySum: float
      /// Active assignments per expert. // [E]
      Load: float[] }

    /// Adds one forward's routing (its T tokens).
    member t.Add(r: Routing) =
        use _ = torch.NewDisposeScope()
        let n = r.Experts.shape[0]
        let active = r.Kept.logical_and (r.Weights.gt (torch.zeros ([||], dtype = r.Weights.dtype))) // [T; K]
        t.Tokens <- t.Tokens + n
        t.Active <- t.Active + active.sum().item<int64> ()
        t.Dropped <- t.Dropped + (active.any(1L).logical_not ()).sum().item<int64> ()
        t.EntropySum <- t.EntropySum + float (r.Stats.RouterEntropy.item<float32> ()) * float n
        let perExpert = torch.bincount (r.Experts.masked_select active, minlength = int64 t.Experts) // [E]
        perExpert.data<int64>().ToArray() |> Array.iteri (fun e c -> t.Load[e] <- t.Load[e] + float c)

/// Routing measured over a split: means over the MoE layers.
type RoutingMeasure =
    { Tokens: int64
      /// Experts that computed per token (kept with a nonzero weight): sparsemax's zeros count as inactive.
      ActivePerToken: float
      /// Fraction of tokens no expert took.
      DroppedTokens: float
      /// Mean router entropy in nats.
      Entropy: float
      /// Coefficient of variation of the experts' loads (`RunLog.loadCv`; 0 = balanced).
      LoadCv: float
      Layers: LayerTally list }

let private summarise (tallies: LayerTally list) : RoutingMeasure =
    let mean (f: LayerTally -> float) = if tallies.IsEmpty then nan else tallies |> List.averageBy f
    let per (t: LayerTally) (x: float) = if t.Tokens = 0L then nan else x / float t.Tokens
    { Tokens = (match tallies with t :: _ -> t.Tokens | [] -> 0L)
      ActivePerToken = mean (fun t -> per t (float t.Active))
      DroppedTokens = mean (fun t -> per t (float t.Dropped))
      Entropy = mean (fun t -> per t t.EntropySum)
      LoadCv = mean (fun t -> RunLog.loadCv t.Load)
      Layers = tallies }

/// Routes `rows` through `model` one example at a time (no padding routed), teacher-forced, in evaluation mode,
/// and tallies each MoE layer's kept, active and dropped assignments with the cell's capacity.
let measureRouting (model: HfSeq2Seq.HfSeq2Seq) (groupCapacity: int option) (rows: Finetune.Encoded[]) : RoutingMeasure =
    let sw =
        match model.Module with
        | :? SwitchModel as s -> s
        | other -> invalidArg "model" (sprintf "expected a Switch Transformers model, got %s" (other.GetType().Name))
    let blocks = [ for place, block in sw.Blocks do match block.FeedForward.Module with :? MoeLayer as m -> yield place, block, m | _ -> () ]
    let tallies =
        [ for place, _, m in blocks ->
            { Layer = place.Name; Experts = m.Config.Router.Experts; Tokens = 0L; Active = 0L; Dropped = 0L; EntropySum = 0.0
              Load = Array.zeroCreate m.Config.Router.Experts } ]
    let wasTraining = model.Module.training
    model.Module.eval ()
    let device = (Seq.head (sw.parameters ())).device
    try
        for (_, block, layer), tally in List.zip blocks tallies do
            block.ReplaceFeedForward
                { Name = "mlp"; Module = layer
                  Run = fun x -> let result, routing = layer.ForwardWithRouting(x, null, groupCapacity) in tally.Add routing; { Output = result.Output; Router = None } }
        use _ = torch.no_grad ()
        for row in rows do
            use _ = torch.NewDisposeScope()
            let ids, mask, labels = Finetune.collate model.PadTokenId [| row |]
            model.Loss (ids.``to`` device) (mask.``to`` device) (labels.``to`` device) |> ignore
    finally
        for _, block, layer in blocks do block.ReplaceFeedForward(sparseSublayer layer groupCapacity)
        if wasTraining then model.Module.train ()
    summarise tallies

// ---------------------------------------------------------------- options

/// What `scripts/gating_switch.fsx` takes.
type GatingSwitchOptions =
    { Scale: Scale
      /// The Switch checkpoint folder (Hugging Face layout).
      Model: string
      /// XSum-format data (`Finetune.readSplits`: a split folder, an XSum release, or one file divided).
      Data: string
      /// Picks per token of the top-k cells (1: Switch's own top-1, whose linear softmax cell is the checkpoint).
      TopK: int
      RunsDir: string
      ReportsDir: string
      Verbose: bool
      /// Screenshot the figure with Chromium where installed.
      Screenshot: bool }

module GatingSwitchOptions =
    /// The tiny checkpoint and the XSum documents of the shared folder (models/, data/).
    let defaultModel = "switch-tiny"
    let defaultData = Path.Combine("xsum-test-docs", "test.h2o_helm.jsonl")
    let usage = "arguments: [--smoke | --full] [--model DIR] [--data PATH] [--top-k K] [--verbose]"

    /// Options from script arguments; `shared` is the folder holding models/ and data/. Every problem at once.
    let parse (shared: string) (args: string[]) : Result<GatingSwitchOptions, string list> =
        let start =
            { Scale = Quick; Model = Path.Combine(shared, "models", defaultModel); Data = Path.Combine(shared, "data", defaultData); TopK = 1
              RunsDir = "runs"; ReportsDir = "reports"; Verbose = false; Screenshot = true }
        let rec go (o: GatingSwitchOptions) (problems: string list) (rest: string list) =
            match rest with
            | [] -> o, List.rev problems
            | "--smoke" :: r -> go { o with Scale = (if o.Scale = Full then o.Scale else Smoke) } (if o.Scale = Full then "--smoke and --full exclude each other" :: problems else problems) r
            | "--full" :: r -> go { o with Scale = (if o.Scale = Smoke then o.Scale else Full) } (if o.Scale = Smoke then "--smoke and --full exclude each other" :: problems else problems) r
            | "--verbose" :: r -> go { o with Verbose = true } problems r
            | "--model" :: v :: r when not (v.StartsWith "--") -> go { o with Model = v } problems r
            | "--data" :: v :: r when not (v.StartsWith "--") -> go { o with Data = v } problems r
            | "--top-k" :: v :: r ->
                match Int32.TryParse v with
                | true, n when n >= 1 -> go { o with TopK = n } problems r
                | _ -> go o (sprintf "--top-k expects a whole number >= 1, got '%s'" v :: problems) r
            | flag :: r when flag = "--model" || flag = "--data" || flag = "--top-k" -> go o (sprintf "%s expects a value (%s)" flag usage :: problems) r
            | other :: r -> go o (sprintf "unknown argument %s (%s)" other usage :: problems) r
        let o, problems = go start [] (List.ofArray args)
        let problems =
            [ yield! problems
              if not (File.Exists(Path.Combine(o.Model, "config.json"))) then sprintf "--model %s: no config.json there (expected a Switch Transformers checkpoint folder)" o.Model
              if not (File.Exists o.Data || Directory.Exists o.Data) then sprintf "--data %s does not exist" o.Data ]
        if problems.IsEmpty then Ok o else Error problems

    /// `parse`, raising one ArgumentException that lists every problem.
    let parseOrFail (shared: string) (args: string[]) : GatingSwitchOptions =
        match parse shared args with
        | Ok o -> o
        | Error ps -> invalidArg "args" (sprintf "bad script arguments:\n  - %s" (String.concat "\n  - " ps))

// ---------------------------------------------------------------- scale presets

/// Per scale: examples per split, token limits, the training schedule and the decoding length.
type private Settings =
    { MaxTrain: int option; MaxValid: int option; MaxTest: int option
      SourceTokens: int; TargetTokens: int
      Steps: int; BatchSize: int; LearningRate: float; Warmup: int; EvalEvery: int
      /// max_new_tokens for the test summaries (None: the checkpoint's generation config).
      MaxNewTokens: int option }

/// Smoke: seconds on switch-tiny. Quick: minutes on 2 CPU cores with switch-tiny. Full: XSum-scale fine-tuning
/// of switch-base-8 (Fedus et al. 2022 fine-tune at 1e-4-scale rates; a GPU helps).
let private settingsOf (scale: Scale) : Settings =
    match scale with
    | Smoke ->
        { MaxTrain = Some 8; MaxValid = Some 2; MaxTest = Some 2; SourceTokens = 48; TargetTokens = 12
          Steps = 2; BatchSize = 4; LearningRate = 1e-3; Warmup = 0; EvalEvery = 0; MaxNewTokens = Some 6 }
    | Quick ->
        { MaxTrain = Some 256; MaxValid = Some 24; MaxTest = Some 24; SourceTokens = 192; TargetTokens = 40
          Steps = 48; BatchSize = 8; LearningRate = 1e-3; Warmup = 4; EvalEvery = 16; MaxNewTokens = Some 32 }
    | Full ->
        { MaxTrain = None; MaxValid = Some 1000; MaxTest = Some 1000; SourceTokens = 512; TargetTokens = 64
          Steps = 10000; BatchSize = 8; LearningRate = 1e-4; Warmup = 500; EvalEvery = 1000; MaxNewTokens = None }

/// The fine-tuning config of one cell: `Finetune`'s defaults at the scale's sizes; the trainer adds no loss
/// weights, because Switch's loss already holds its weighted router losses (`Finetune.lossIncludesRouterLosses`).
let finetuneConfig (o: GatingSwitchOptions) (name: string) : Finetune.FinetuneConfig =
    let s = settingsOf o.Scale
    let d = Finetune.FinetuneConfig.defaults
    { d with
        Name = name
        RunsDir = Path.Combine(o.RunsDir, "gating_switch")
        Model = o.Model
        Data = o.Data
        MaxTrain = s.MaxTrain; MaxValid = s.MaxValid; MaxTest = s.MaxTest
        MaxSourceTokens = s.SourceTokens; MaxTargetTokens = s.TargetTokens
        Train =
            { d.Train with
                Steps = s.Steps; BatchSize = s.BatchSize; LearningRate = s.LearningRate; WarmupSteps = s.Warmup
                LogEvery = max 1 (min d.Train.LogEvery (s.Steps / 4)); EvalEvery = s.EvalEvery; CheckpointEvery = s.EvalEvery
                LossWeights = LossWeights.none } }

// ---------------------------------------------------------------- one cell

/// What one cell produced.
type CellResult =
    { Cell: Cell
      Name: string
      RunDir: string
      Moe: MoeConfig
      Scores: Summarizer.TestScores
      ValidLossBefore: float
      ValidLossAfter: float
      TrainSeconds: float
      /// Routing on the test split after fine-tuning.
      Routing: RoutingMeasure
      /// Experts per token the config implies (`Analysis.configuredActiveExperts`).
      Configured: float }

    /// Test ROUGE-1 F1 (a fraction).
    member r.Rouge1 = r.Scores.Model.Rouge1.F1.Mean
    /// Forward FLOPs per token of one MoE layer at the configured and at the measured active experts.
    member r.FlopsAnalytic = Analysis.moeFlops r.Moe r.Configured
    member r.FlopsMeasured = Analysis.moeFlops r.Moe r.Routing.ActivePerToken

/// Test summaries of the in-memory model with the checkpoint's generation config (and its summarization task
/// settings), max_new_tokens overridden where given.
let private decodeTest (modelDir: string) (model: HfSeq2Seq.HfSeq2Seq) (tokenizer: HfTokenizer.HfTokenizer) (rows: Finetune.Encoded[]) (batch: int) (maxNew: int option) : string[] =
    let gen = Generate.GenerationConfig.load modelDir
    let gen = if (Finetune.checkpointPrefix modelDir).IsSome then fst (Generate.GenerationConfig.withTaskParams (Path.Combine(modelDir, "config.json")) "summarization" gen) else gen
    let gen = Generate.GenerationConfig.setAll [ for n in Option.toList maxNew -> sprintf "max_new_tokens=%d" n ] gen
    let device = (Seq.head (model.Module.parameters ())).device
    use _ = torch.no_grad ()
    [| for chunk in Array.chunkBySize batch rows do
        use _ = torch.NewDisposeScope()
        let ids, mask, _ = Finetune.collate model.PadTokenId chunk
        for r in Generate.run gen model.Model (ids.``to`` device) (mask.``to`` device) -> tokenizer.Decode(r.Sequences[0], true) |]

let private oneLine (s: string) = s.Replace('\r', ' ').Replace('\n', ' ')

/// Loads the checkpoint, puts the cell's router in (`configure`), fine-tunes it on `prepared` into
/// `RunsDir/gating_switch/<cell>` with `Train.Loop`, reloads the best checkpoint, decodes and scores the test
/// split (test_scores.json, predictions.txt, references.txt, documents.txt) and measures its routing there.
let runCell (o: GatingSwitchOptions) (prepared: Finetune.Prepared) (c: Cell) : CellResult =
    let name = Cell.name o.TopK c
    let cfg = finetuneConfig o name
    let runDir = Path.Combine(cfg.RunsDir, name)
    use _lock = RunFolder.acquire (sprintf "gating run %s" name) runDir
    RunFolder.startFresh true runDir
    use tokenizer = HfTokenizer.fromFolder cfg.Model
    use model = HfSeq2Seq.load cfg.Model
    HfTokenizer.checkAgainst model.Model.VocabSize tokenizer
    let sw =
        match model.Module with
        | :? SwitchModel as s -> s
        | _ -> invalidArg "o" (sprintf "%s: expected a Switch Transformers checkpoint (model_type switch_transformers), got %s" cfg.Model model.ModelType)
    // the attention router's fresh directions come from the run's seed
    Native.seedAll cfg.Train.Seed
    configure o.TopK c sw
    let total = sw.parameters () |> Seq.sumBy (fun p -> p.NumberOfElements)
    RunFiles.writeParameters runDir { Total = total; Active = total; Trainable = total }
    let device = Native.resolveDevice cfg.Train.Device
    sw.``to`` device |> ignore
    let before = Finetune.meanLoss model prepared.Valid cfg.Train.BatchSize device
    let runOpts = { RunOptions.Defaults with Progress = (if o.Verbose then Lines else Silent); Overwrite = false }
    let trained = Train.Loop.runWith runOpts cfg.Train (Finetune.task cfg model prepared device) runDir
    Checkpoint.loadModel (defaultArg trained.BestCheckpoint trained.LastCheckpoint) sw
    sw.eval ()
    let after = Finetune.meanLoss model prepared.Valid cfg.Train.BatchSize device
    let predictions = decodeTest cfg.Model model tokenizer prepared.Test cfg.Train.BatchSize (settingsOf o.Scale).MaxNewTokens
    let scores = Finetune.scoreTest predictions prepared.TestExamples
    RunLog.writeTestScores (Path.Combine(runDir, RunLog.FileNames.testScores)) [| "model", scores.Model; "lead1", scores.Lead1 |]
    Summarizer.writeLines (Path.Combine(runDir, RunLog.FileNames.predictions)) (predictions |> Array.map oneLine)
    Summarizer.writeLines (Path.Combine(runDir, RunLog.FileNames.references)) (prepared.TestExamples |> Array.map (fun e -> oneLine e.Summary))
    Summarizer.writeLines (Path.Combine(runDir, RunLog.FileNames.documents)) (prepared.TestExamples |> Array.map (fun e -> oneLine e.Document))
    let sw' = sw.SwitchConfig
    let measured = measureRouting model (groupCapacityOf sw' c) prepared.Test
    { Cell = c; Name = name; RunDir = Path.GetFullPath runDir; Moe = moeOf sw' o.TopK c; Scores = scores
      ValidLossBefore = before; ValidLossAfter = after; TrainSeconds = trained.ElapsedSeconds; Routing = measured
      Configured = Analysis.configuredActiveExperts (routerOf sw' o.TopK c) }

// ---------------------------------------------------------------- the study

/// What the study produced.
type GatingSwitchResult =
    { Experiment: ExperimentResult
      Cells: CellResult list
      /// The checkpoint folder's name, as the table names the base model.
      BaseModel: string }

/// A path's folder and file name ("xsum-test-docs/test.jsonl"): what the tables show of a data path, with no
/// machine-specific prefix.
let private lastTwo (path: string) : string =
    let full = Path.GetFullPath(path).TrimEnd('/', '\\')
    Path.Combine(Path.GetFileName(Path.GetDirectoryName full), Path.GetFileName full)

/// The grid on the checkpoint: every cell fine-tuned and measured (`runCell`), one table (ROUGE-1/2/L,
/// validation loss before and after, load CV, dropped tokens, router entropy, configured and measured active
/// experts per token, FLOPs per token of one MoE layer at both, training seconds), the figure (ROUGE-1, measured
/// FLOPs per token and load CV per cell, best ROUGE-1 first) and the report page of the runs.
let run (o: GatingSwitchOptions) : GatingSwitchResult =
    let experiment = "gating_switch"
    let baseModel = DirectoryInfo(Path.GetFullPath(o.Model).TrimEnd('/', '\\')).Name
    let sw = SwitchConfig.parse (Path.Combine(o.Model, "config.json"))
    let prepared =
        use tokenizer = HfTokenizer.fromFolder o.Model
        Finetune.prepare (finetuneConfig o "prepare") tokenizer
    let sparseLayers (step: int) (layers: int) = List.filter (SwitchConfig.isSparse step) [ 0 .. layers - 1 ] |> List.length
    printfn "%s: %d experts, %d MoE layers; data %s: %d train, %d validation, %d test examples" baseModel sw.NumExperts
        (sparseLayers sw.EncoderSparseStep sw.T5.NumLayers + sparseLayers sw.DecoderSparseStep sw.T5.NumDecoderLayers)
        (lastTwo o.Data) prepared.Train.Length prepared.Valid.Length prepared.Test.Length
    let n = Cell.all.Length
    let cells =
        Cell.all |> List.mapi (fun i c ->
            printfn "[%d/%d] %s ..." (i + 1) n (Cell.name o.TopK c)
            let r = runCell o prepared c
            printfn "[%d/%d] %s: %.0f s" (i + 1) n r.Name r.TrainSeconds
            r)
    let table =
        { Title = sprintf "Gating strategies on pretrained %s (%d experts, top-k k = %d; %A scale)" baseModel sw.NumExperts o.TopK o.Scale
          Columns =
            [| "cell"; "base model"; "R-1"; "R-2"; "R-L"; "valid loss before"; "valid loss after"; "load CV"; "dropped tokens %"; "router entropy"
               "active experts/token (configured)"; "active experts/token (measured)"; "MoE FLOPs/token (analytic)"; "MoE FLOPs/token (measured)"; "train s" |]
          Rows =
            [| for r in cells ->
                [| r.Name; baseModel; Table.pct r.Rouge1; Table.pct (r.Scores.Model.Rouge2.F1.Mean); Table.pct (r.Scores.Model.RougeL.F1.Mean)
                   Table.num 3 r.ValidLossBefore; Table.num 3 r.ValidLossAfter; Table.num 3 r.Routing.LoadCv; Table.pct r.Routing.DroppedTokens
                   Table.num 3 r.Routing.Entropy; Table.num 0 r.Configured; Table.num 2 r.Routing.ActivePerToken
                   Table.si r.FlopsAnalytic; Table.si r.FlopsMeasured; Table.num 0 r.TrainSeconds |] |] }
    let notes =
        [ sprintf "Base model: %s. Every cell starts from it: %s keeps the checkpoint's router; linear routers copy its W_r; attention routers (R = %d) factor W_r by SVD so that they score exactly as it did (GatingSwitch.initAttentionFromLinear)."
              baseModel (Cell.name o.TopK Cell.all.Head) (attentionDim sw)
          sprintf "Top-k cells keep Switch's per-sequence expert capacity (%d); 'all' cells mix every expert with the normaliser's weights and drop nothing (their load-balancing term is then the constant E: every expert takes every token)." sw.ExpertCapacity
          "Routing columns: measured on the test split after fine-tuning, one example at a time, teacher-forced, mean over MoE layers; active = kept with a nonzero weight (sparsemax's zeros are inactive); dropped = tokens no expert took."
          "MoE FLOPs/token: one MoE layer, forward, multiply-add = 2 (Analysis.moeFlops): router + active experts x 2 D d_ff x 2 matrices; analytic at the configured experts per token, measured at the measured ones."
          "Valid loss: Switch's loss (cross-entropy + weighted router z and aux losses) on the validation split, before fine-tuning and with the best checkpoint; quality: ROUGE F1 x100 on the test split (Porter stemming)." ]
    let byQuality = cells |> List.sortByDescending (fun r -> r.Rouge1) |> List.toArray
    let figure =
        Plots.barPanels (sprintf "Gating strategies on pretrained %s, best ROUGE-1 first: quality, compute and load balance" baseModel)
            (byQuality |> Array.map (fun r -> r.Name))
            [ { Title = "test ROUGE-1 F1 × 100"; Values = byQuality |> Array.map (fun r -> 100.0 * r.Rouge1); Text = byQuality |> Array.map (fun r -> Table.pct r.Rouge1) }
              { Title = "MoE FLOPs per token (measured active experts)"; Values = byQuality |> Array.map (fun r -> r.FlopsMeasured); Text = byQuality |> Array.map (fun r -> Table.si r.FlopsMeasured) }
              { Title = "load CV on the test split (0 = balanced)"; Values = byQuality |> Array.map (fun r -> r.Routing.LoadCv); Text = byQuality |> Array.map (fun r -> Table.num 3 r.Routing.LoadCv) } ]
    let opts =
        { Scale = o.Scale; DataPath = Some(lastTwo o.Data); RunsDir = o.RunsDir; ReportsDir = o.ReportsDir; Verbose = o.Verbose; Screenshot = o.Screenshot }
    let result = finish opts experiment (sprintf "Gating strategies on a pretrained Switch Transformer (%s)" baseModel) notes [ table ] (cells |> List.map (fun r -> r.RunDir)) figure
    { Experiment = result; Cells = cells; BaseModel = baseModel }
