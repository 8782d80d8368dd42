/// Bootstrap confidence intervals on a mean, as rouge-score's `BootstrapAggregator`: resample the N examples
/// with replacement, take the mean of each resample, and report percentiles of those means with NumPy's
/// default (linear) interpolation. The random stream is .NET's seeded `Random`, so intervals are reproducible
/// here but not bit-identical to NumPy's.
///
/// Legend: N examples.
module Moe.Metrics.Bootstrap

open System

/// Resampling settings.
type BootstrapConfig =
    { /// Number of resamples (rouge-score's default: 1000).
      Samples: int
      /// Two-sided confidence level (rouge-score's default: 0.95, hence percentiles 2.5 / 50 / 97.5).
      Confidence: float
      Seed: int }

/// rouge-score's defaults with seed 0.
let defaults = { Samples = 1000; Confidence = 0.95; Seed = 0 }

/// Every problem with a config, all at once.
let validate (cfg: BootstrapConfig) : string list =
    [ if cfg.Samples <= 0 then sprintf "Samples must be positive, got %d" cfg.Samples
      if not (cfg.Confidence >= 0.0 && cfg.Confidence <= 1.0) then sprintf "Confidence must be in [0, 1], got %g" cfg.Confidence ]

/// Percentiles of the resampled means: low and high bound the interval, mid is the median.
type Interval = { Low: float; Mid: float; High: float }

/// The q-th percentile (q in [0, 100]) of ascending `sorted`, interpolating linearly between neighbours
/// (NumPy `percentile`, method "linear").
let percentile (sorted: float[]) (q: float) : float =
    if sorted.Length = 0 then invalidArg "sorted" "expected at least one value"
    let pos = q / 100.0 * float (sorted.Length - 1)
    let lo = int (floor pos)
    let hi = min (lo + 1) (sorted.Length - 1)
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - float lo)

/// Intervals for several per-example columns [M][N] at once; every resample draws one index set shared by
/// all columns, so paired measures (P, R, F) stay paired.
let intervals (cfg: BootstrapConfig) (columns: float[][]) : Interval[] =
    match validate cfg with
    | [] -> ()
    | problems -> invalidArg "cfg" (String.concat "; " problems)
    let n = if columns.Length = 0 then 0 else columns[0].Length
    if n = 0 then invalidArg "columns" "expected at least one example to resample"
    if columns |> Array.exists (fun c -> c.Length <> n) then invalidArg "columns" "expected every column to have one value per example"
    let rng = Random cfg.Seed
    let means = Array.init columns.Length (fun _ -> Array.zeroCreate cfg.Samples) // [M][Samples]
    let index = Array.zeroCreate n
    for s in 0 .. cfg.Samples - 1 do
        for k in 0 .. n - 1 do index[k] <- rng.Next n
        for m in 0 .. columns.Length - 1 do
            let col = columns[m]
            let mutable sum = 0.0
            for k in index do sum <- sum + col[k]
            means[m][s] <- sum / float n
    let delta = (1.0 - cfg.Confidence) / 2.0
    means
    |> Array.map (fun ms ->
        Array.sortInPlace ms
        { Low = percentile ms (100.0 * delta); Mid = percentile ms 50.0; High = percentile ms (100.0 * (1.0 - delta)) })
