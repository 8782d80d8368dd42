/// `moe data ...`: look at a dataset before training on it.
module Moe.DataCommand

open System
open System.IO
open Argu
open Moe

type InspectArgs =
    | [<MainCommand>] Path of path: string
    | Format of format: string
    | Document_Column of name: string
    | Summary_Column of name: string
    | Id_Column of name: string
    | Label_Column of name: string
    | Split of split: string
    | Split_File of path: string
    | Summary_Dir of path: string
    | References of path: string
    | Ids of path: string
    | On_Empty of policy: string
    | Max_Doc_Chars of chars: int
    | No_Mojibake_Repair
    | Allow_Missing
    | Synthetic of examples: int
    | Seed of seed: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Path _ -> "a data file or folder, as moe train --data takes it (format from the extension or contents; a folder of train*/validation*/test* files is inspected split by split)."
            | Format _ -> sprintf "override the format: %s." Data.Format.names
            | Document_Column _ -> "document column/field (default: per format, e.g. article for CSV, dialogue for SAMSum)."
            | Summary_Column _ -> "summary column/field (default: per format, e.g. highlights for CSV)."
            | Id_Column _ -> "id column/field (default id; row numbers when absent)."
            | Label_Column _ -> "label column/field (default label, when present)."
            | Split _ -> "XSum release: train|validation|test (default: every .summary file)."
            | Split_File _ -> "XSum release: the split JSON (default: beside the data)."
            | Summary_Dir _ -> "XSum release: the folder of .summary files (default: bbc-summary-data beside the split file)."
            | References _ -> "aligned lines: the references file when PATH is a documents file."
            | Ids _ -> "aligned lines: the ids file (default ids.txt beside the documents)."
            | On_Empty _ -> "skip|fail: what an empty document or summary does (default skip, counted)."
            | Max_Doc_Chars _ -> sprintf "truncate longer documents, counted (default %d)." Data.DataConfig.defaults.MaxDocumentChars
            | No_Mojibake_Repair -> "keep UTF-8-read-as-Windows-1252 text (Â£) as it is."
            | Allow_Missing -> "XSum release: skip split ids without a .summary file instead of failing."
            | Synthetic _ -> "inspect N examples of the built-in synthetic corpus instead of a path."
            | Seed _ -> sprintf "seed of the synthetic corpus (default %d)." Corpus.CorpusConfig.defaults.Seed

[<RequireSubcommand>]
type DataArgs =
    | [<CliPrefix(CliPrefix.None)>] Inspect of ParseResults<InspectArgs>
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Inspect _ -> "print counts, length percentiles (words) and problems of a dataset."

/// The data config the flags describe; bad values are `ArgumentException`s naming the flag.
let configOf (args: ParseResults<InspectArgs>) : Data.DataConfig =
    let d = Data.DataConfig.defaults
    let format =
        args.TryGetResult InspectArgs.Format
        |> Option.map (fun f ->
            match Data.Format.parse f with
            | Ok f -> f
            | Error msg -> invalidArg "--format" msg)
    let onEmpty =
        match args.TryGetResult On_Empty |> Option.map (fun s -> s.Trim().ToLowerInvariant()) with
        | None | Some "skip" -> Data.SkipEmpty
        | Some "fail" -> Data.FailOnEmpty
        | Some other -> invalidArg "--on-empty" (sprintf "expected skip|fail, got \"%s\"" other)
    let cfg =
        { d with
            Format = format
            DocumentColumn = args.TryGetResult Document_Column
            SummaryColumn = args.TryGetResult Summary_Column
            IdColumn = args.TryGetResult Id_Column
            LabelColumn = args.TryGetResult Label_Column
            Split = args.TryGetResult Split
            SplitFile = args.TryGetResult Split_File
            SummaryDir = args.TryGetResult Summary_Dir
            ReferencesFile = args.TryGetResult References
            IdsFile = args.TryGetResult Ids
            OnEmpty = onEmpty
            MaxDocumentChars = defaultArg (args.TryGetResult Max_Doc_Chars) d.MaxDocumentChars
            RepairMojibake = not (args.Contains No_Mojibake_Repair)
            AllowMissingFiles = args.Contains Allow_Missing }
    match Data.DataConfig.validate cfg with
    | [] -> cfg
    | problems -> invalidArg "data options" (String.Join("; ", problems))

let private inspect (args: ParseResults<InspectArgs>) : int =
    let paths = args.GetResults Path
    InputErrors.rejectUnknownFlags<InspectArgs> paths
    let inspections =
        match paths, args.TryGetResult Synthetic with
        | _ :: _, Some _ -> invalidArg "PATH" "give a PATH or --synthetic N, not both"
        | [], None -> invalidArg "PATH" "expected a data file or folder (or --synthetic N)"
        | [], Some n ->
            if n < 1 then invalidArg "--synthetic" (sprintf "expected at least 1 example, got %d" n)
            let seed = defaultArg (args.TryGetResult Seed) Corpus.CorpusConfig.defaults.Seed
            let examples = Corpus.generateWith { Corpus.CorpusConfig.defaults with Seed = seed } 0 n
            let report = DataInspection.generatedReport (sprintf "synthetic corpus, seed %d" seed) n
            [ "", DataInspection.inspectExamples report examples ]
        | [ path ], None -> DataInspection.inspectPath (configOf args) path
        | many, None -> invalidArg "PATH" (sprintf "expected one data file or folder, got %d: %s" many.Length (String.concat ", " many))
    for split, inspection in inspections do
        if split <> "" then printfn "== %s ==" split
        printf "%s" (DataInspection.formatInspection inspection)
    0

/// Runs `moe data ...`; bad data (a `TextTools.DataException` naming file and line) is reported by
/// `InputErrors.guard` in `Cli.main`, exit code 2.
let run (args: ParseResults<DataArgs>) : int =
    match args.GetSubCommand() with
    | Inspect a -> inspect a
