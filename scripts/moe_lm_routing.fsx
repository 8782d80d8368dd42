// Routing analysis of a pretrained MoE LM (Mixtral, Qwen2-MoE, OLMoE): documents run through the model and
// every MoE layer's router choices are written as a from-scratch run's routing statistics (routing.jsonl:
// per-layer expert load and router entropy; routing_by_label.json: expert use by topic or language when the
// data has a label field), with report.html (the report's charts) and routes.html (a few documents' tokens
// coloured by expert). The same as `./moe routing --model DIR --data F`.
//
//   dotnet fsi scripts/moe_lm_routing.fsx --smoke      # qwen2-moe-tiny on 2 MLSUM documents of de/es/fr (what the tests run)
//   dotnet fsi scripts/moe_lm_routing.fsx --model ~/checkpoints/OLMoE-1B-7B --data ~/data/mlsum.jsonl
//       [--tokenizer DIR] [--input-ids F] [--out DIR] [--limit 100] [--show 3]
//
// The tiny shared checkpoints ship no tokenizer: the smoke tokenizes with qwen2-tiny's tokenizer and folds the
// ids into the model's 1000-token vocabulary (id mod 1000), which is said here because it is not a real
// tokenization. A real checkpoint uses its own tokenizer files (or --tokenizer DIR of the same vocabulary);
// text for a folder without one is refused, and --input-ids takes ids made elsewhere.
#load "prelude.fsx"

open System.IO
open Moe

let main (args: string[]) =
    Native.initialise ()
    let shared = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared", "data"))
    let r = MoeLmRouting.runScript (printfn "%s") shared args
    for f in r.Files do printfn "wrote %s" (Path.Combine(r.OutDir, f))

main (fsi.CommandLineArgs |> Array.tail)
