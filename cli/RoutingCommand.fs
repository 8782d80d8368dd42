/// `moe routing --model DIR`: a pretrained MoE LM's router choices per token (`--input-ids F --json`), or the
/// routing statistics, report charts and coloured per-token routes of a set of documents (`--data F`). The work
/// is `Moe.MoeLmRouting`'s; this file only reads the flags.
module Moe.RoutingCommand

open System.IO
open Argu
open Moe

type RoutingArgs =
    | [<Mandatory; AltCommandLine("-m")>] Model of path: string
    | Input_Ids of path: string
    | Data of path: string
    | Tokenizer of path: string
    | Json
    | Out of path: string
    | Limit of documents: int
    | Show of documents: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Model _ -> "a pretrained MoE LM checkpoint folder (mixtral, qwen2_moe, olmoe) in Hugging Face layout."
            | Input_Ids _ -> "inputs as token ids: one JSON array per line, or {\"ids\": [...], \"label\": \"...\"}."
            | Data _ -> "documents to route (JSONL/CSV/parquet/lines as moe train reads them; a label field groups expert use), tokenized with the model's tokenizer."
            | Tokenizer _ -> "a tokenizer folder of the model's vocabulary, for a checkpoint folder without tokenizer files."
            | Json -> "print, per input line, per MoE layer, each token's chosen experts in order and their weights (one JSON object per line)."
            | Out _ -> "folder for routing.jsonl, routing_by_label.json, routes.jsonl, routes.html and report.html (default runs/routing-<model folder>)."
            | Limit _ -> "route the first N documents of --data (default 100)."
            | Show _ -> "documents shown token by token in routes.html (default 3)."

/// Runs `moe routing`.
let run (args: ParseResults<RoutingArgs>) : int =
    Native.initialise ()
    let dir = args.GetResult Model
    use m = MoeLmRouting.openModel dir (args.TryGetResult Tokenizer)
    let inputs =
        match args.TryGetResult Input_Ids, args.TryGetResult Data with
        | Some _, Some _ -> invalidArg "--input-ids" "give --input-ids or --data, not both"
        | None, None -> invalidArg "--input-ids" "expected --input-ids F (token ids, one JSON array per line) or --data F (documents)"
        | Some f, None -> MoeLmRouting.readIdsFile f
        | None, Some d ->
            let inputs, notes = MoeLmRouting.readDocuments m Data.DataConfig.defaults d (args.GetResult(Limit, 100))
            for n in notes do eprintfn "%s" n
            inputs
    if args.Contains Json then
        for input in inputs do printfn "%s" (MoeLmRouting.jsonLine (MoeLmRouting.route m input.Ids))
    else
        let out = args.GetResult(Out, Path.Combine("runs", "routing-" + DirectoryInfo(Path.GetFullPath dir).Name))
        let r = MoeLmRouting.analyse (fun l -> eprintfn "%s" l) m inputs (args.GetResult(Show, 3)) out
        for f in r.Files do printfn "wrote %s" (Path.Combine(r.OutDir, f))
    0
