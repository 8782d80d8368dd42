/// `moe human-eval`: draw rating sheets from system outputs, or summarize filled sheets.
module Moe.HumanEvalCommand

open System
open System.IO
open Argu
open Moe

type HumanEvalArgs =
    | [<AltCommandLine("-d")>] Documents of path: string
    | [<AltCommandLine("-r")>] References of path: string
    | [<AltCommandLine("-s")>] System of spec: string
    | [<AltCommandLine("-n")>] Examples of count: int
    | Seed of seed: int
    | [<AltCommandLine("-o")>] Out of dir: string
    | Labeled
    | Include_Reference
    | Summarize of sheet: string
    | Key of path: string
    | Json
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Documents _ -> "source documents, one per line."
            | References _ -> "reference summaries, aligned by line."
            | System _ -> "NAME=PATH of one system's summaries, aligned by line; repeat for each system."
            | Examples _ -> sprintf "examples to sample (default %d)." HumanEval.defaults.Examples
            | Seed _ -> "sampling seed (default 0); the same seed draws the same sheet."
            | Out _ -> "folder for human-eval.md, human-eval.csv and human-eval-key.csv (default human-eval)."
            | Labeled -> "show system names in the sheets (default: blind, names only in the key file)."
            | Include_Reference -> "rate the reference as one more (blind) summary instead of showing it."
            | Summarize _ -> "a filled CSV sheet to aggregate (repeat for several raters) instead of drawing a sheet."
            | Key _ -> "the key file of a blind sheet, for --summarize."
            | Json -> "with --summarize, print JSON instead of the table."

let private parseSystem (spec: string) : string * string =
    match spec.IndexOf '=' with
    | i when i > 0 && i < spec.Length - 1 -> spec.Substring(0, i), spec.Substring(i + 1)
    | _ -> raise (ArgumentException(sprintf "expected --system NAME=PATH, got '%s'" spec))

let private draw (args: ParseResults<HumanEvalArgs>) =
    let required name (value: string option) =
        match value with
        | Some v -> v
        | None -> raise (ArgumentException(sprintf "expected --%s (or --summarize FILE to aggregate ratings)" name))
    let documentsPath = required "documents" (args.TryGetResult Documents)
    let referencesPath = required "references" (args.TryGetResult References)
    let specs = args.GetResults System |> List.map parseSystem
    if specs.IsEmpty then raise (ArgumentException "expected at least one --system NAME=PATH")
    let documents = Metrics.Basics.readLines documentsPath
    let references = Metrics.Basics.readLines referencesPath
    let systems = specs |> List.map (fun (name, path) -> name, path, Metrics.Basics.readLines path)
    Metrics.Basics.expectAligned ([ documentsPath, documents; referencesPath, references ] @ (systems |> List.map (fun (_, p, l) -> p, l)))
    let cfg =
        { HumanEval.defaults with
            Examples = args.GetResult(Examples, min HumanEval.defaults.Examples documents.Length)
            Seed = args.GetResult(Seed, HumanEval.defaults.Seed)
            Blind = not (args.Contains Labeled)
            IncludeReference = args.Contains Include_Reference }
    let outputs = systems |> List.map (fun (name, _, lines) -> ({ Name = name; Summaries = lines } : HumanEval.SystemOutputs)) |> List.toArray
    let items = HumanEval.sample cfg documents references outputs
    let files = HumanEval.writeSheets cfg (args.GetResult(Out, "human-eval")) items
    printfn "wrote %s" files.Markdown
    printfn "wrote %s (%d rows to rate)" files.Csv items.Length
    files.Key |> Option.iter (printfn "wrote %s (item -> system; keep it from the raters)")

let private summarize (args: ParseResults<HumanEvalArgs>) (sheets: string list) =
    let key = args.TryGetResult Key |> Option.map HumanEval.readKey
    let summary = HumanEval.readRatings key sheets |> HumanEval.summarize
    if args.Contains Json then printfn "%s" (HumanEval.summaryToJson summary)
    else printf "%s" (HumanEval.formatSummary summary)

/// Runs the command (bad input: `InputErrors.guard` in `Cli.main` reports it, exit code 2).
let run (args: ParseResults<HumanEvalArgs>) : int =
    match args.GetResults Summarize with
    | [] -> draw args
    | sheets -> summarize args sheets
    0
