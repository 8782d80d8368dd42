// Gating strategies: router linear/attention x softmax/sparsemax x top-2/all experts; naive top-k,
// top-k mask, noisy top-k (+ load loss), top-k mask + importance loss, Switch top-1 with jitter, expert choice,
// loss-free bias balancing, and a dense FFN of equal active compute. Table: quality, validation loss, load CV,
// active experts per token (measured), FFN FLOPs per token.
// Prints its table and writes reports/gating_strategies.html (report page) and reports/gating_strategies.md (the table);
// its figure (ROUGE-1, FFN FLOPs/token and load CV per variant, best first) goes to reports/gating_strategies-figure.html and, where Chromium is installed, reports/gating_strategies.png;
// runs go to runs/gating_strategies/.
//
//   dotnet fsi scripts/gating_strategies.fsx               # quick settings: minutes on 2 CPU cores
//   dotnet fsi scripts/gating_strategies.fsx --full        # paper-scale settings
//   dotnet fsi scripts/gating_strategies.fsx --smoke       # a handful of steps (what the tests run)
//   dotnet fsi scripts/gating_strategies.fsx DATA_PATH     # a dataset folder or file instead of the synthetic corpus
#load "prelude.fsx"

open Moe

/// The experiment for script arguments (without the script's name).
let main (args: string[]) =
    Native.initialise ()
    Experiments.ExperimentOptions.parseOrFail args |> Experiments.gatingStrategies

main (fsi.CommandLineArgs |> Array.tail) |> ignore
