/// SummaC-Conv (Laban et al. 2022, sec. 3.2; tingofurro/summac `SummaCConv`): each summary chunk's column of the
/// NLI image (its probabilities against every document chunk) becomes a histogram over fixed bins, one learned
/// linear map of the histogram (a 1-D convolution whose kernel spans the whole histogram, summac's `mlp`) gives
/// one number per summary chunk, their mean over the first `Rows` chunks goes three times into `layer_final`
/// (3 -> 2), and the consistency score is the softmax probability of class 1. Parameter names are summac's, so its
/// published state dict loads by name.
///
/// Legend: N pairs, R histogram rows (summary chunks kept, `Rows`), F histogram width (labels x bins), P document
/// chunks, Q summary chunks.
module Moe.Metrics.SummaCConv

open System
open System.IO
open TorchSharp
open TorchSharp.Modules
open Moe
open Moe.Tensors

type Tensor = torch.Tensor

/// The histogram bins (summac's `bins` argument).
type Bins =
    /// summac's 23 fixed bins "based on the percentile of the distribution on some large number of summaries";
    /// the published weights use them.
    | Percentile
    /// `evenN`: numpy's `arange(0, 1, 1/N)` plus 1.0 as edges.
    | Even of int

/// SummaC-Conv's settings; `defaults` match the published weights (vitc, sentence, percentile, "e").
type ConvConfig =
    { Bins: Bins
      /// Which NLI classes are histogrammed, in summac's spelling: "e", "c", "n", "ec", "en", "cn" or "ecn" (the
      /// histograms are always concatenated in the order entailment, contradiction, neutral).
      Labels: string
      /// Summary chunks kept (summac's `n_rows`, 10): later ones are ignored, fewer are padded with empty rows.
      Rows: int }

/// The published weights' settings: percentile bins, entailment only, 10 rows.
let defaults = { Bins = Percentile; Labels = "e"; Rows = 10 }

let private labelChoices = [ "e"; "c"; "n"; "ec"; "en"; "cn"; "ecn" ]

let private percentileEdges =
    [| 0.0; 0.01; 0.02; 0.03; 0.04; 0.07; 0.13; 0.37; 0.90; 0.91; 0.92; 0.93; 0.94; 0.95; 0.955; 0.96; 0.965; 0.97
       0.975; 0.98; 0.985; 0.99; 0.995; 1.0 |]

/// Every problem with a config, all at once.
let validate (cfg: ConvConfig) : string list =
    [ match cfg.Bins with
      | Even n when n < 1 -> sprintf "Even bins need N >= 1, got %d" n
      | _ -> ()
      if not (List.contains cfg.Labels labelChoices) then
          sprintf "Labels must be one of %s, got \"%s\"" (String.Join(", ", labelChoices)) cfg.Labels
      if cfg.Rows < 1 then sprintf "Rows must be >= 1, got %d" cfg.Rows ]

let private check (cfg: ConvConfig) =
    match validate cfg with
    | [] -> ()
    | problems -> invalidArg "cfg" (String.concat "; " problems)

/// The bin edges: summac's percentile list, or numpy's `arange(0, 1, 1/N)` (ceil(1 / (1/N)) values k/N, which is
/// N + 1 values for a few N such as 49 and 98 in floating point) followed by 1.0.
let binEdges (bins: Bins) : float[] =
    match bins with
    | Percentile -> Array.copy percentileEdges
    | Even n ->
        let step = 1.0 / float n
        let count = int (ceil (1.0 / step))
        Array.append (Array.init count (fun k -> float k * step)) [| 1.0 |]

/// Parses summac's bins names: "percentile" or "evenN".
let parseBins (text: string) : Result<Bins, string> =
    match text with
    | "percentile" -> Ok Percentile
    | t when not (isNull t) && t.StartsWith "even" && (fst (Int32.TryParse(t.Substring 4))) && int (t.Substring 4) >= 1 -> Ok(Even(int (t.Substring 4)))
    | t -> Error(sprintf "unknown SummaC-Conv bins \"%s\": expected \"percentile\" or \"evenN\" with N >= 1 (e.g. even50)" t)

/// numpy's `histogram(values, bins=edges)`: counts of values in [e_k, e_k+1), the last bin closed [e_{B-1}, e_B];
/// values outside [e_0, e_B] are not counted.
let histogram (edges: float[]) (values: float seq) : int[] =
    if edges.Length < 2 then invalidArg "edges" (sprintf "expected at least 2 bin edges, got %d" edges.Length)
    for k in 1 .. edges.Length - 1 do
        if not (edges[k] >= edges[k - 1]) then invalidArg "edges" (sprintf "expected increasing bin edges, got %g before %g" edges[k - 1] edges[k])
    let counts = Array.zeroCreate (edges.Length - 1)
    let last = edges.Length - 1
    for v in values do
        if v >= edges[0] && v <= edges[last] then
            // The last edge k with edges[k] <= v (numpy's searchsorted 'right' - 1), the top edge in the last bin.
            let mutable k = Array.BinarySearch(edges, v)
            if k < 0 then k <- ~~~k - 1
            else
                while k + 1 <= last && edges[k + 1] = v do k <- k + 1
            counts[min k (last - 1)] <- counts[min k (last - 1)] + 1
    counts

/// Histogram width F: labels x bins.
let width (cfg: ConvConfig) : int = cfg.Labels.Length * ((binEdges cfg.Bins).Length - 1)

/// One image's histogram rows [R][F] (summac `compute_histogram`): for each of the first `Rows` summary chunks,
/// the histograms of its entailment, contradiction and neutral columns (those in `Labels`, in that order),
/// concatenated; missing rows are zeros. Also the number of real rows (summac's `seq_length`).
let histograms (cfg: ConvConfig) (image: Consistency.Image) : float32[][] * int =
    check cfg
    let edges = binEdges cfg.Bins
    let f = width cfg
    let p, q = Array2D.length1 image.Entailment, Array2D.length2 image.Entailment
    let channels =
        [ if cfg.Labels.Contains 'e' then image.Entailment
          if cfg.Labels.Contains 'c' then image.Contradiction
          if cfg.Labels.Contains 'n' then image.Neutral ]
    let rows = min q cfg.Rows
    let hist =
        Array.init cfg.Rows (fun j ->
            if j >= rows then Array.zeroCreate f
            else
                [| for m in channels do
                     for c in histogram edges (seq { for i in 0 .. p - 1 -> m[i, j] }) -> float32 c |])
    hist, rows

/// The learned part of SummaC-Conv, with summac's parameter names: `mlp` (F -> 1, applied to each histogram row)
/// and `layer_final` (3 -> 2). Forward: histograms [N; R; F] and row mask [N; R] (1 for real rows) -> logits [N; 2].
type ConvModel(cfg: ConvConfig) as this =
    inherit torch.nn.Module<Tensor, Tensor, Tensor>("SummaCConv")
    let cfg = (check cfg; cfg)
    let f = width cfg
    let mlp = torch.nn.Linear(int64 f, 1L)
    let layer_final = torch.nn.Linear(3L, 2L)
    do this.RegisterComponents()

    /// The settings the model was built for.
    member _.Config = cfg

    override _.forward(hist: Tensor, mask: Tensor) : Tensor =
        expect "histograms" (sprintf "[N; %d; %d] float32" cfg.Rows f) (fun t -> t.Dimensions = 3L && t.shape[1] = int64 cfg.Rows && t.shape[2] = int64 f && t.dtype = torch.float32) hist
        expect "mask" (sprintf "[N; %d] float32" cfg.Rows) (fun t -> t.Dimensions = 2L && t.shape[0] = hist.shape[0] && t.shape[1] = int64 cfg.Rows && t.dtype = torch.float32) mask
        use _ = torch.NewDisposeScope()
        let perRow = mlp.forward(hist).squeeze(-1L)                           // [N; R]
        let counted = mask.sum(1L)                                            // [N]
        // summac's agg "mean" over the real rows; a pair without rows gets the features 0, 0, 0.
        let mean = (perRow * mask).sum(1L) / clampMin 1.0 counted             // [N]
        let features = torch.stack([| mean; mean; mean |], 1L)               // [N; 3]
        layer_final.forward(features).MoveToOuterDisposeScope()

/// Histograms and masks of N images as tensors: [N; R; F] and [N; R].
let batch (cfg: ConvConfig) (images: Consistency.Image[]) : Tensor * Tensor =
    let rows = images |> Array.map (histograms cfg)
    let f = width cfg
    let flat = [| for hist, _ in rows do for row in hist do yield! row |]
    let mask = [| for _, n in rows do for j in 0 .. cfg.Rows - 1 -> if j < n then 1.0f else 0.0f |]
    let n = int64 images.Length
    torch.tensor(flat, ReadOnlySpan<int64>([| n; int64 cfg.Rows; int64 f |])), torch.tensor(mask, ReadOnlySpan<int64>([| n; int64 cfg.Rows |]))

/// SummaC-Conv scores of N images [N]: softmax(logits)[:, 1] (summac `SummaCConv.score`).
let score (model: ConvModel) (images: Consistency.Image[]) : float[] =
    if images.Length = 0 then [||]
    else
        use _ = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let hist, mask = batch model.Config images
        let probs = torch.nn.functional.softmax(model.forward(hist, mask), 1L)
        toFloats (probs.select(1L, 1L).contiguous ()) |> Array.map float

let private configKeys = [ "summac_bins"; "summac_labels"; "summac_rows" ]

let private binsName (b: Bins) =
    match b with
    | Percentile -> "percentile"
    | Even n -> sprintf "even%d" n

/// Writes the model's weights as safetensors with its settings in the metadata (`summac_bins`, `summac_labels`,
/// `summac_rows`), so `load` needs no settings for it.
let save (path: string) (model: ConvModel) : unit =
    let cfg = model.Config
    let tensors = [ for KeyValue(name, p) in model.state_dict () -> name, p.detach().cpu () ]
    Safetensors.writeWithMetadata path
        (List.zip configKeys [ binsName cfg.Bins; cfg.Labels; string cfg.Rows ]) tensors

/// Loads convolution weights: summac's published `.bin` (a PyTorch state dict; give the settings it was trained
/// with, `defaults` for `summac_conv_vitc_sent_perc_e.bin`) or a `.safetensors` file written by `save` (its
/// metadata's settings win over `cfg`). Raises `ArgumentException` naming the file when a tensor is missing or
/// its shape does not fit the settings (e.g. weights for 50 bins read with percentile bins).
let load (cfg: ConvConfig) (path: string) : ConvModel =
    let cfg =
        if path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) && File.Exists path then
            let _, meta = Safetensors.readHeader path
            match configKeys |> List.map meta.TryFind with
            | [ Some b; Some l; Some r ] ->
                match parseBins b, Int32.TryParse r with
                | Ok bins, (true, rows) -> { Bins = bins; Labels = l; Rows = rows }
                | Error e, _ -> invalidArg "path" (sprintf "%s: %s" path e)
                | _, _ -> invalidArg "path" (sprintf "%s: summac_rows \"%s\" is not an integer" path r)
            | _ -> cfg
        else cfg
    use source = HfCheckpoint.openWeightFile path
    let model = new ConvModel(cfg)
    let expected = model.state_dict () |> Seq.map (fun kv -> kv.Key) |> Set.ofSeq
    let extra = source.Names |> List.filter (fun n -> not (expected.Contains n))
    if not extra.IsEmpty then
        invalidArg "path" (sprintf "%s: expected SummaC-Conv weights (%s), found also %s" path (String.Join(", ", expected)) (String.Join(", ", extra)))
    for KeyValue(name, p) in model.state_dict () do
        if not (source.Contains name) then
            invalidArg "path" (sprintf "%s: expected SummaC-Conv weights with a tensor %s, found [%s]" path name (String.Join(", ", source.Names)))
        let info = source.Info name
        if info.Shape <> p.shape then
            invalidArg "path"
                (sprintf "%s: tensor %s has shape [%s], but bins %s with labels \"%s\" need [%s]; give the settings the weights were trained with"
                    path name (info.Shape |> Array.map string |> String.concat "; ") (binsName cfg.Bins) cfg.Labels (p.shape |> Array.map string |> String.concat "; "))
        source.CopyInto(name, p)
    model
