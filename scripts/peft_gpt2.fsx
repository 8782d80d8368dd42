// Parameter-efficient fine-tuning of GPT-2 for summarization on CNN/DailyMail: prompt tuning (Lester et al.
// 2021), LoRA (Hu et al. 2021), the last layer (the output layer, untied from the token embeddings), the last
// blocks, and full fine-tuning as the reference; evaluation loss, ROUGE, BLEU, training time, trainable and
// added parameters and peak memory, from the runs this script just made (runs/peft_gpt2/<method>/).
// Without --model the base is a small GPT-2 pretrained here for a few minutes on the C4 sample
// (runs/gpt2-small-c4-quick/, reused by later runs); the table says which base was used.
// Writes reports/peft_gpt2.md, reports/peft_gpt2.html and reports/peft_gpt2-figure.html (and .png with Chromium).
//
//   dotnet fsi scripts/peft_gpt2.fsx                      # quick: the small GPT-2, 200 training articles
//   dotnet fsi scripts/peft_gpt2.fsx --model gpt2/        # a real GPT-2 folder in Hugging Face's layout
//   dotnet fsi scripts/peft_gpt2.fsx --full --model gpt2/ --data CNNDM_DIR   # 21,000 / 6,000 / 3,000, 10 epochs
//   dotnet fsi scripts/peft_gpt2.fsx --smoke              # a handful of steps: checks the path only
#load "prelude.fsx"

open System.IO
open Moe

/// The study for script arguments (without the script's name); data defaults to the repository's ../shared/data.
let main (args: string[]) =
    Native.initialise ()
    let shared = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared", "data"))
    PeftGpt2.PeftOptions.parseOrFail shared args |> PeftGpt2.run

main (fsi.CommandLineArgs |> Array.tail) |> ignore
