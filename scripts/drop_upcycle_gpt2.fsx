// Drop-Upcycling (Nakamura et al. 2025) of GPT-2 into a top-1-of-8 MoE (every other MLP; r = 0.15 of each
// expert's units re-initialised from the original weights' statistics; Switch loss 0.01, router jitter),
// continued pretraining on web text for the MoE and for the dense GPT-2 with the same schedule (the fair
// baseline), XNLI fine-tuning as GPT2ForSequenceClassification on English (or --train-languages en,es,fr),
// zero-shot accuracy on all 15 languages, and the MoE's expert share by language and by label per MoE layer.
// Without --model it first pretrains a small GPT-2 on the web text (SmallGpt2; kept in runs/small_gpt2/hf
// and reused). Prints its tables and writes reports/drop_upcycle_gpt2.html (report page: loss curves, router
// distributions of the four runs) and reports/drop_upcycle_gpt2.md (the tables); its figure (accuracy per
// language, expert shares) goes to reports/drop_upcycle_gpt2-figure.html and, where Chromium is installed,
// reports/drop_upcycle_gpt2.png; runs go to runs/drop_upcycle_gpt2/.
//
//   dotnet fsi scripts/drop_upcycle_gpt2.fsx                  # quick settings on the samples in ../shared/data
//   dotnet fsi scripts/drop_upcycle_gpt2.fsx --smoke          # a handful of steps (what the tests run)
//   dotnet fsi scripts/drop_upcycle_gpt2.fsx --full --model gpt2/ --web-text c4.jsonl --xnli xnli.test.tsv --xnli-train multinli.train.jsonl
//   options: --train-languages en,es,fr  --drop-ratio 0.15  --experts 8  --every 2  --verbose
#load "prelude.fsx"

open System.IO
open Moe

/// The study for script arguments (without the script's name); data defaults to the repository's ../shared/data.
let main (args: string[]) =
    Native.initialise ()
    let shared = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared", "data"))
    DropUpcycle.DropUpcycleOptions.parseOrFail shared args |> DropUpcycle.run

main (fsi.CommandLineArgs |> Array.tail) |> ignore
