/// What the studies compute besides training: analytic FLOPs per token of FFN, MoE and LoRA-MoE sublayers,
/// a probe that routes a trained model's test tokens and records which experts each token id went to, the
/// kind of a token, and the mutual information between labels and experts.
/// Axes: D model width, H expert hidden width, E experts, L labels, V vocabulary.
module Moe.Analysis

open System
open System.Collections.Generic
open System.IO
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Layers
open Moe.Models
open Moe.Data
open Moe.Batching
open Moe.Train
open Moe.Summarizer
open Moe.RunLog

// ---------------------------------------------------------------- FLOPs

/// Weight matrices of one FFN: 3 for SwiGLU (gate, up, down), else 2.
let ffnMatrices (act: Activation) = match act with SwiGLU -> 3 | ReLU | GELU -> 2

/// Forward FLOPs per token of a dense FFN (a multiply-add counts 2): 2 D H per weight matrix.
let denseFfnFlops (modelDim: int) (hidden: int) (act: Activation) : float =
    2.0 * float modelDim * float hidden * float (ffnMatrices act)

/// Forward FLOPs per token of the router: 2 D E for a linear router, 2 D d_r + 2 d_r E for the attention
/// router, 0 for hash routing; the normaliser and top-k are O(E) and left out.
let routerFlops (modelDim: int) (cfg: RouterConfig) : float =
    match cfg.Selection, cfg.Scorer with
    | Hash _, _ -> 0.0
    | _, LinearRouter -> 2.0 * float modelDim * float cfg.Experts
    | _, AttentionRouter r -> 2.0 * float modelDim * float r + 2.0 * float r * float cfg.Experts

/// Forward FLOPs per token of an MoE layer with `activeExperts` experts per token on average (the router
/// plus that many expert FFNs plus the shared experts).
let moeFlops (cfg: MoeConfig) (activeExperts: float) : float =
    routerFlops cfg.ModelDim cfg.Router
    + (activeExperts + float cfg.SharedExperts) * denseFfnFlops cfg.ModelDim cfg.ExpertHidden cfg.Activation

/// Experts per token the config implies: k for token choice, 1 for Switch and hash, E for all-experts (before
/// sparsemax zeros), the capacity factor for expert choice (Zhou et al. 2022 sec. 3.1; E when dropless).
let configuredActiveExperts (cfg: RouterConfig) : float =
    match cfg.Selection, cfg.Capacity with
    | ExpertChoice, Factor f -> min f (float cfg.Experts)
    | _ -> float (RouterConfig.picksPerToken cfg)

/// Forward FLOPs per token of an MoE layer of LoRA experts (`Layers.LoraExpertFfn`, Hu et al. 2021) with
/// `activeExperts` experts per token on average, as the layer computes it: the router; the base input
/// projections (W1, and W3 for SwiGLU) once per token, since every expert shares them; per active expert the
/// base output projection W2 on that expert's hidden state and the adapters, x A (2 D r) then (x A) B
/// (2 r H or 2 r D) per adapted projection, i.e. 2 r (D + H) each; plus the shared experts.
let loraMoeFlops (cfg: MoeConfig) (lora: LoraConfig) (activeExperts: float) : float =
    let d, h, r = float cfg.ModelDim, float cfg.ExpertHidden, float lora.Rank
    let projections = float (ffnMatrices cfg.Activation)
    let baseInputs = (projections - 1.0) * 2.0 * d * h
    let perExpert = 2.0 * h * d + projections * 2.0 * r * (d + h)
    routerFlops cfg.ModelDim cfg.Router + baseInputs + activeExperts * perExpert
    + float cfg.SharedExperts * denseFfnFlops cfg.ModelDim cfg.ExpertHidden cfg.Activation

/// Forward FLOPs per token of one FFN sublayer of the model (the part the routing choices change).
let ffnFlops (cfg: SummarizerConfig) (activeExperts: float) : float =
    match cfg.Model.Ffn with
    | Dense h -> denseFfnFlops cfg.Model.ModelDim h cfg.Model.Activation
    | Moe m -> moeFlops m activeExperts
    | LoraMoe (m, lora) -> loraMoeFlops m lora activeExperts

// ---------------------------------------------------------------- probing a trained model

/// What the probe saw in one MoE layer over the test split.
type LayerProbe =
    { Layer: string
      Experts: int
      /// Tokens routed (real tokens only: padding is skipped before the layer).
      Tokens: int64
      /// Mean number of experts per token with a kept slot and a nonzero combine weight (sparsemax's
      /// nonzeros; k for top-k).
      MeanActive: float
      /// Kept assignments of each token id to each expert. // [V; E]
      ByTokenId: float[][] }

let internal readLinesOf (path: string) = if File.Exists path then RunLog.readLines path else [||]

/// Routes the run's test documents and references (documents.txt, references.txt) through its best
/// checkpoint with teacher forcing in evaluation mode and records, per MoE layer, the experts each token
/// id went to and the mean number of active experts per token. Empty for a dense model; MoE layers of full
/// and of LoRA experts (`Models.LoraMoe`) are probed alike, since only their routers are read.
let probe (runDir: string) : LayerProbe list =
    use loaded = Summarizer.load runDir None Native.Cpu
    let cfg = loaded.Config
    match cfg.Model.Ffn with
    | Dense _ -> []
    | Moe moeCfg | LoraMoe (moeCfg, _) ->
        let vocab = cfg.Model.VocabSize
        let experts = moeCfg.Router.Experts
        let seen = Dictionary<string, int64 ref * float ref * float[][]>()
        // Hash routers (balanced or random) route on token ids, learned routers on hidden states.
        let readsIds (router: RouterModule) = match router.Config.Selection with Hash _ -> true | _ -> false
        let record (name: string) (router: RouterModule) (x: Tensor) (ids: Tensor) =
            use _ = torch.NewDisposeScope()
            let routing = router.Route(x, (if readsIds router then Some ids else None)) // [T; K]
            let active = routing.Kept.logical_and(routing.Weights.gt(torch.tensor 0.0f))                     // [T; K] bool
            let tokens, activeSum, table =
                match seen.TryGetValue name with
                | true, v -> v
                | _ ->
                    let v = (ref 0L, ref 0.0, Array.init vocab (fun _ -> Array.zeroCreate<float> experts))
                    seen[name] <- v
                    v
            tokens.Value <- tokens.Value + x.shape[0]
            activeSum.Value <- activeSum.Value + float (active.sum().item<int64> ())
            let idArr = ids.data<int64>().ToArray()
            let ex = routing.Experts.data<int64>().ToArray()
            let act = active.data<bool>().ToArray()
            let k = int routing.Experts.shape[1]
            for t in 0 .. idArr.Length - 1 do
                for s in 0 .. k - 1 do
                    if act[t * k + s] then
                        let row = table[int idArr[t]]
                        row[int ex[t * k + s]] <- row[int ex[t * k + s]] + 1.0
        let factory =
            Func<FfnSite, FeedForward>(fun site ->
                let ff = FeedForward.create cfg.Model site
                // The layer runs as usual (token ids only for hash routers) after its router's choices are recorded.
                let recorded (router: RouterModule) (forward: Tensor * Tensor -> FfnResult) =
                    { ff with
                        WithTokenIds =
                          Some(fun x ids ->
                              record site.Name router x ids
                              forward (x, (if readsIds router then ids else null))) }
                match ff.Module with
                | :? MoeLayer as layer -> recorded layer.Router layer.forward
                | :? LoraMoeLayer as layer -> recorded layer.Router layer.forward
                | _ -> ff)
        use model = new EncoderDecoder(cfg.Model, factory)
        for (_, router), (_, trained) in Array.zip (model.Routers()) (loaded.Model.Routers()) do
            if not (isNull trained.HashTable) then
                router.SetHashTable(trained.HashTable.data<int64>().ToArray())
        Checkpoint.loadModel loaded.Checkpoint model
        model.eval ()
        let docs = readLinesOf (Path.Combine(runDir, FileNames.documents))
        let refs = readLinesOf (Path.Combine(runDir, FileNames.references))
        let examples = Array.map2 (fun d r -> { Id = ""; Document = d; Summary = r; Label = None }) docs refs
        if examples.Length > 0 then
            let source = TokenizedSet(loaded.Tokenizer, examples) :> ITokenSource
            use _ = torch.no_grad ()
            for indices in Batching.plan { cfg.Batching with Shuffle = false } source 0 do
                use _ = torch.NewDisposeScope()
                let b = Batching.collate cfg.Batching source indices
                model.Forward(b.Source, b.DecoderInput, b.SourceMask, b.TargetMask) |> ignore
        [ for name, _ in model.Routers() do
            match seen.TryGetValue name with
            | true, (tokens, active, table) ->
                { Layer = name; Experts = experts; Tokens = tokens.Value
                  MeanActive = (if tokens.Value = 0L then nan else active.Value / float tokens.Value)
                  ByTokenId = table }
            | _ -> () ]

// ---------------------------------------------------------------- information

/// Mutual information I(L; E) in nats between the row variable (a label: topic, token kind) and the column
/// variable (the expert) of a count table [L; E]: sum p(l,e) log(p(l,e) / (p(l) p(e))) with p = counts /
/// total (Cover & Thomas eq. 2.28). 0 when rows are proportional (the expert says nothing about the label);
/// H(L) when each expert serves one label. Zero cells contribute 0.
let mutualInformation (counts: float[][]) : float =
    if isNull counts || counts.Length = 0 then invalidArg "counts" "expected a count table [L; E] with at least one row, got none"
    let e = counts[0].Length
    if e = 0 then invalidArg "counts" "expected a count table [L; E] with at least one column, got rows of 0"
    counts |> Array.iteri (fun i r ->
        if r.Length <> e then invalidArg "counts" (sprintf "expected a rectangular table [L; %d], row %d has %d entries" e i r.Length)
        if r |> Array.exists (fun x -> not (x >= 0.0) || Double.IsInfinity x) then
            invalidArg "counts" (sprintf "expected finite counts >= 0, row %d has %A" i r))
    let total = counts |> Array.sumBy Array.sum
    if total = 0.0 then invalidArg "counts" "expected some counts > 0, got a table of zeros"
    let pl = counts |> Array.map (fun r -> Array.sum r / total)                              // [L]
    let pe = Array.init e (fun j -> (counts |> Array.sumBy (fun r -> r[j])) / total)         // [E]
    let mutable mi = 0.0
    for i in 0 .. counts.Length - 1 do
        for j in 0 .. e - 1 do
            let p = counts[i][j] / total
            if p > 0.0 then mi <- mi + p * log (p / (pl[i] * pe[j]))
    max 0.0 mi

/// Entropy in nats of a count vector's distribution: the upper bound of `mutualInformation` for its rows.
let entropy (counts: float[]) : float =
    let total = Array.sum counts
    if not (total > 0.0) then invalidArg "counts" "expected counts with a positive sum"
    counts |> Array.sumBy (fun c -> if c > 0.0 then let p = c / total in -p * log p else 0.0)

/// The kind of a token by its text: special, number, punctuation, capitalised word, word, other.
let tokenKind (text: string) : string =
    let t = text.Trim()
    if t = "" then "space"
    elif t |> Seq.forall Char.IsDigit then "number"
    elif t |> Seq.forall (fun c -> Char.IsPunctuation c || Char.IsSymbol c) then "punctuation"
    elif Char.IsUpper t[0] && t |> Seq.forall Char.IsLetter then "capitalised"
    elif t |> Seq.forall Char.IsLetter then "word"
    else "other"
