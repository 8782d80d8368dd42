// The main job with token-choice top-k routing: trains a small MoE summarizer (every feed-forward sublayer
// an MoE layer of 4 experts, 2 per token), decodes the test split, and prints the model against lead-1.
// Writes runs/topk/, replacing an earlier run there (config.json, metrics.jsonl, routing.jsonl, checkpoints, predictions, test_scores.json) and the
// figure of expert usage over training, reports/train_topk-figure.html and, where Chromium is installed, reports/train_topk.png.
//
//   dotnet fsi scripts/train_topk.fsx               # the built-in synthetic corpus
//   dotnet fsi scripts/train_topk.fsx DATA_PATH     # a dataset folder (train*/validation*/test* files) or XSum release
#load "prelude.fsx"

open Moe
open Moe.Summarizer

let cfg =
    { SummarizerConfig.mainJob with Name = "topk" }
    |> fun c ->
        match fsi.CommandLineArgs |> Array.tail with
        | [| path |] -> { c with Source = Files(splitFilesOf path) }
        | _ -> c

Native.initialise ()
let result = Summarizer.runWith { Train.RunOptions.Defaults with Overwrite = true } false cfg
Experiments.runFigure true "reports" "train_topk" result.RunDir |> ignore
