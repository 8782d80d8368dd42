// Hash and top-k routing, each with and without a load-balancing loss: quality (ROUGE), load CV and
// collapsed experts at the end of training, and expert load over time on the report page.
// Prints its table and writes reports/balance_ablation.html (report page) and reports/balance_ablation.md (the table);
// its figure (load CV over training steps, one line per run) goes to reports/balance_ablation-figure.html and, where Chromium is installed, reports/balance_ablation.png;
// runs go to runs/balance_ablation/.
//
//   dotnet fsi scripts/balance_ablation.fsx               # quick settings: minutes on 2 CPU cores
//   dotnet fsi scripts/balance_ablation.fsx --full        # paper-scale settings
//   dotnet fsi scripts/balance_ablation.fsx --smoke       # a handful of steps (what the tests run)
//   dotnet fsi scripts/balance_ablation.fsx DATA_PATH     # a dataset folder or file instead of the synthetic corpus
#load "prelude.fsx"

open Moe

/// The experiment for script arguments (without the script's name).
let main (args: string[]) =
    Native.initialise ()
    Experiments.ExperimentOptions.parseOrFail args |> Experiments.balanceAblation

main (fsi.CommandLineArgs |> Array.tail) |> ignore
