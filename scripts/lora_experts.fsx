// Experts as LoRA adapters (Hu et al. 2021) on one shared base FFN per layer, frozen or trainable, at several
// ranks, against full experts: parameters (total, active, trainable), quality (ROUGE on the test split,
// validation loss) and training speed (tokens/s). Every number in the table comes from the runs this script
// just made (runs/lora/<variant>/). Writes reports/lora_experts.md, reports/lora_experts.html and the figure
// (trainable parameters vs ROUGE-1) reports/lora_experts-figure.html and, where Chromium is installed, .png.
//
//   dotnet fsi scripts/lora_experts.fsx            # quick: tiny models, minutes on 2 CPU cores
//   dotnet fsi scripts/lora_experts.fsx --full     # paper-scale settings (the summarizer's default job)
//   dotnet fsi scripts/lora_experts.fsx --smoke    # a handful of steps: checks the path only
#load "prelude.fsx"

open System.IO
open Moe

let args = fsi.CommandLineArgs |> Array.tail
let runsDir = Path.Combine("runs", "lora")
let settings =
    match args with
    | [||] -> LoraExperiment.Settings.quick runsDir
    | [| "--full" |] -> LoraExperiment.Settings.full runsDir
    | [| "--smoke" |] -> LoraExperiment.Settings.smoke runsDir
    | other -> invalidArg "args" (sprintf "expected no argument, --full or --smoke, got %A" other)

Native.initialise ()
let rows = LoraExperiment.run { Train.RunOptions.Defaults with Progress = Train.Lines } settings
printfn "%s" (LoraExperiment.table rows)
let reports = LoraExperiment.writeReports true "reports" "lora_experts" rows
printfn "report: %s\ntable: %s" reports.Report reports.Markdown
for line in Plots.figureLines reports.Figure do printfn "%s" line
