// Zero-shot summarization with a pretrained checkpoint (the assignment's facebook/bart-large-xsum baseline):
// the checkpoint summarizes a data set's test split into runs/NAME (predictions, references, documents,
// test_scores.json with the main job's score record, baseline.json saying what produced it), then the script
// prints its table against lead-1 (same documents) and against the from-scratch runs found in runs/ (each on
// its own test set; n says how many documents).
//
//   dotnet fsi scripts/baseline_bart_xsum.fsx --smoke      # bart-tiny on 4 shared XSum documents (what the tests run)
//   dotnet fsi scripts/baseline_bart_xsum.fsx --model ~/checkpoints/bart-large-xsum --data ~/data/xsum --limit 500
//       [--split test] [--batch-size 8] [--name NAME] [--runs-dir runs] [--set Generate.NumBeams=4] [--overwrite]
//
// A checkpoint is a Hugging Face folder downloaded elsewhere (config.json, generation_config.json,
// model.safetensors or pytorch_model.bin, tokenizer files); see the README's "Pretrained baselines".
#load "prelude.fsx"

open System.IO
open Moe

let main (args: string[]) =
    Native.initialise ()
    let shared = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared"))
    Baseline.runScript (printfn "%s") shared args |> ignore

main (fsi.CommandLineArgs |> Array.tail)
