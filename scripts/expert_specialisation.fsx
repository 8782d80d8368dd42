// Which experts serve which topics and token kinds: expert-use heatmaps by topic (report page) and the
// mutual information between topic (or token kind) and expert, per layer, for top-k and hash routing.
// Prints its table and writes reports/expert_specialisation.html (report page) and reports/expert_specialisation.md (the table);
// its figure (topic x expert heatmap of the top-k run's most specialised layer) goes to reports/expert_specialisation-figure.html and, where Chromium is installed, reports/expert_specialisation.png;
// runs go to runs/expert_specialisation/.
//
//   dotnet fsi scripts/expert_specialisation.fsx               # quick settings: minutes on 2 CPU cores
//   dotnet fsi scripts/expert_specialisation.fsx --full        # paper-scale settings
//   dotnet fsi scripts/expert_specialisation.fsx --smoke       # a handful of steps (what the tests run)
//   dotnet fsi scripts/expert_specialisation.fsx DATA_PATH     # a dataset folder or file instead of the synthetic corpus
#load "prelude.fsx"

open Moe

/// The experiment for script arguments (without the script's name).
let main (args: string[]) =
    Native.initialise ()
    Experiments.ExperimentOptions.parseOrFail args |> Experiments.expertSpecialisation

main (fsi.CommandLineArgs |> Array.tail) |> ignore
