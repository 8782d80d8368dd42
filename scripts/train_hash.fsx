// The main job with hash routing (Roller et al. 2021): every feed-forward sublayer an MoE layer of 4
// experts, each token sent to one expert by a frequency-balanced hash of its id; no router parameters.
// Writes runs/hash/, replacing an earlier run there (config.json, metrics.jsonl, routing.jsonl, checkpoints, predictions, test_scores.json) and the
// figure of expert usage over training, reports/train_hash-figure.html and, where Chromium is installed, reports/train_hash.png.
//
//   dotnet fsi scripts/train_hash.fsx               # the built-in synthetic corpus
//   dotnet fsi scripts/train_hash.fsx DATA_PATH     # a dataset folder (train*/validation*/test* files) or XSum release
#load "prelude.fsx"

open Moe
open Moe.Summarizer

let cfg =
    { SummarizerConfig.defaults with Name = "hash" }
    |> SummarizerConfig.hash 4
    |> fun c ->
        match fsi.CommandLineArgs |> Array.tail with
        | [| path |] -> { c with Source = Files(splitFilesOf path) }
        | _ -> c

Native.initialise ()
let result = Summarizer.runWith { Train.RunOptions.Defaults with Overwrite = true } false cfg
Experiments.runFigure true "reports" "train_hash" result.RunDir |> ignore
