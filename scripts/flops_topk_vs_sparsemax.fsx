// Analytic and measured FLOPs and time per token against the number of active experts: token-choice top-k
// for k = 1 .. E vs sparsemax over all experts (active = mean nonzeros per token). Times one MoE layer's
// forward + backward directly (no training run); DATA_PATH is accepted but unused.
// Prints its table and writes reports/flops_topk_vs_sparsemax.html (report page) and reports/flops_topk_vs_sparsemax.md (the table);
// its figure (FLOPs and time per token against active experts, top-k vs sparsemax) goes to reports/flops_topk_vs_sparsemax-figure.html and, where Chromium is installed, reports/flops_topk_vs_sparsemax.png;
// runs go to runs/flops_topk_vs_sparsemax/.
//
//   dotnet fsi scripts/flops_topk_vs_sparsemax.fsx               # quick settings: minutes on 2 CPU cores
//   dotnet fsi scripts/flops_topk_vs_sparsemax.fsx --full        # paper-scale settings
//   dotnet fsi scripts/flops_topk_vs_sparsemax.fsx --smoke       # a handful of steps (what the tests run)
//   dotnet fsi scripts/flops_topk_vs_sparsemax.fsx DATA_PATH     # a dataset folder or file instead of the synthetic corpus
#load "prelude.fsx"

open Moe

/// The experiment for script arguments (without the script's name).
let main (args: string[]) =
    Native.initialise ()
    Experiments.ExperimentOptions.parseOrFail args |> Experiments.flopsTopkVsSparsemax

main (fsi.CommandLineArgs |> Array.tail) |> ignore
