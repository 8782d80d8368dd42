// Fine-tuning a pretrained encoder-decoder (T5, BART, Pegasus, Switch) on a summarization data set with the
// toolkit's training loop, then the fine-tuned model's ROUGE against lead-1 and the from-scratch runs in runs/.
// Prints the validation loss before and after; the run folder (runs/finetune-NAME) holds the logs, checkpoints
// and hf/, the result in Hugging Face layout.
//
//   dotnet fsi scripts/finetune_t5.fsx --smoke                                  # tiny checkpoint, a few dozen XSum examples (what the tests run)
//   dotnet fsi scripts/finetune_t5.fsx --model DIR --data PATH [--lora R] [--steps N] [--runs-dir D]
#load "prelude.fsx"

open Moe

let main (args: string[]) =
    Native.initialise ()
    let shared = System.IO.Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared")
    match Finetune.ScriptOptions.parse shared args with
    | Ok o -> Finetune.runScript Train.RunOptions.Defaults o |> ignore
    | Error e ->
        eprintfn "error: %s" e
        exit 2

main (fsi.CommandLineArgs |> Array.tail)
