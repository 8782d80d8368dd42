// Top-k MoE with the grouped-query attention written here vs the library attention, for several key/value
// head counts: quality, training tokens/s, KV-cache bytes per token (analytic and measured) and decode time.
// Prints its table and writes reports/attention_gqa.html (report page) and reports/attention_gqa.md (the table);
// its figure (KV-cache bytes/token, ROUGE-1 and decode ms/step per variant) goes to reports/attention_gqa-figure.html and, where Chromium is installed, reports/attention_gqa.png;
// runs go to runs/attention_gqa/.
//
//   dotnet fsi scripts/attention_gqa.fsx               # quick settings: minutes on 2 CPU cores
//   dotnet fsi scripts/attention_gqa.fsx --full        # paper-scale settings
//   dotnet fsi scripts/attention_gqa.fsx --smoke       # a handful of steps (what the tests run)
//   dotnet fsi scripts/attention_gqa.fsx DATA_PATH     # a dataset folder or file instead of the synthetic corpus
#load "prelude.fsx"

open Moe

/// The experiment for script arguments (without the script's name).
let main (args: string[]) =
    Native.initialise ()
    Experiments.ExperimentOptions.parseOrFail args |> Experiments.attentionGqa

main (fsi.CommandLineArgs |> Array.tail) |> ignore
