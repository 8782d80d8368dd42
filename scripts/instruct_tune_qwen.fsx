// LoRA instruction tuning of a decoder-only instruct checkpoint (the assignment's third baseline: Qwen2.5-3B-
// Instruct or Llama-3.2-1B/3B-Instruct on XSum): each example is the checkpoint's chat template with a system
// prompt, the document in the user turn and the reference summary as the answer (loss on the answer only);
// then greedy summaries of the test split and a table against lead-1 and the baselines and from-scratch runs
// found in runs/. The logic is `InstructTune.runScript`.
//
//   dotnet fsi scripts/instruct_tune_qwen.fsx --smoke     # qwen2-tiny on a few shared XSum documents (what the tests run)
//   dotnet fsi scripts/instruct_tune_qwen.fsx --model ~/checkpoints/Qwen2.5-3B-Instruct --data ~/data/xsum
//       [--lora 16] [--steps 2000] [--runs-dir runs] [--base-dtype bfloat16] [--gradient-checkpointing]
#load "prelude.fsx"

open System.IO
open Moe

let main (args: string[]) =
    Native.initialise ()
    let shared = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared"))
    match InstructTune.ScriptOptions.parse shared args with
    | Error e -> eprintfn "%s" e; exit 2
    | Ok o -> InstructTune.runScript Train.RunOptions.Defaults o |> ignore

main (fsi.CommandLineArgs |> Array.tail)
