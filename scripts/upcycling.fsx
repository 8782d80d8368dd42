// Sparse upcycling (Komatsuzaki et al. 2023): a dense model trained N steps, then either trained M more steps
// dense or upcycled to a top-2 MoE (every expert a copy of its layer's FFN, routers fresh) and trained M more
// steps, against the same MoE trained from scratch for N + M steps: quality (ROUGE), validation loss and
// parameters (total and active per token).
// Prints its table and writes reports/upcycling.html (report page) and reports/upcycling.md (the table);
// its figure (validation loss over cumulative steps, one line per run) goes to reports/upcycling-figure.html and, where Chromium is installed, reports/upcycling.png;
// runs go to runs/upcycling/.
//
//   dotnet fsi scripts/upcycling.fsx               # quick settings: minutes on 2 CPU cores
//   dotnet fsi scripts/upcycling.fsx --full        # paper-scale settings
//   dotnet fsi scripts/upcycling.fsx --smoke       # a handful of steps (what the tests run)
//   dotnet fsi scripts/upcycling.fsx DATA_PATH     # a dataset folder or file instead of the synthetic corpus
#load "prelude.fsx"

open Moe

/// The experiment for script arguments (without the script's name).
let main (args: string[]) =
    Native.initialise ()
    Experiments.ExperimentOptions.parseOrFail args |> Experiments.upcycling

main (fsi.CommandLineArgs |> Array.tail) |> ignore
