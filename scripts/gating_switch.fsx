// Gating strategies on a pretrained Switch Transformer: linear vs attention router x softmax vs sparsemax x
// top-k vs every expert (dense mixing) put into every MoE layer of the checkpoint, each router started from the
// pretrained one (the linear/softmax/top-1 cell is the checkpoint itself), fine-tuned for summarization on
// XSum-format data with the toolkit's training loop. Table: ROUGE-1/2/L, validation loss, load CV, dropped
// tokens, router entropy, configured and measured active experts per token, MoE FLOPs per token, training time.
// Prints its table and writes reports/gating_switch.html (report page) and reports/gating_switch.md (the table);
// its figure (ROUGE-1, measured MoE FLOPs/token and load CV per cell, best first) goes to
// reports/gating_switch-figure.html and, where Chromium is installed, reports/gating_switch.png;
// runs go to runs/gating_switch/.
//
//   dotnet fsi scripts/gating_switch.fsx                          # quick settings: switch-tiny from ../shared, minutes on 2 CPU cores
//   dotnet fsi scripts/gating_switch.fsx --smoke                  # a few steps on a few documents (what the tests run)
//   dotnet fsi scripts/gating_switch.fsx --full --model switch-base-8/ --data xsum/   # a real checkpoint, XSum-scale fine-tuning
//   options: --model DIR (a Switch checkpoint folder), --data PATH (XSum-format data), --top-k K, --verbose
#load "prelude.fsx"

open System.IO
open Moe

/// The study for script arguments (without the script's name); checkpoint and data default to ../shared.
let main (args: string[]) =
    Native.initialise ()
    let shared = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared"))
    GatingSwitch.GatingSwitchOptions.parseOrFail shared args |> GatingSwitch.run

main (fsi.CommandLineArgs |> Array.tail) |> ignore
