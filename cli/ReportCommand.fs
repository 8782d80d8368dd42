/// `moe report RUN_DIR... [--out FILE]`: one HTML page comparing runs (see `Moe.Report`).
module Moe.ReportCommand

open Argu
open Moe

type ReportArgs =
    | [<MainCommand; ExactlyOnce>] Runs of run_dir: string list
    | Out of file: string
    | Samples of count: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Runs _ -> "run folders (runs/<name>/) to compare."
            | Out _ -> sprintf "the HTML file to write (default %s)." Report.defaultOut
            | Samples _ -> sprintf "examples shown per test set (default %d)." Report.defaults.Samples

/// Writes the report; malformed run files (a `RunLog.RunFileException` naming file and line) are reported
/// by `InputErrors.guard` in `Cli.main`, exit code 2.
let run (args: ParseResults<ReportArgs>) : int =
    let dirs = args.GetResult Runs
    InputErrors.rejectUnknownFlags<ReportArgs> dirs
    if dirs.IsEmpty then invalidArg "RUN_DIR" "expected at least one run folder"
    let options = { Report.defaults with Samples = args.GetResult(Samples, Report.defaults.Samples) }
    let path = Report.write options (args.GetResult(Out, Report.defaultOut)) dirs
    printfn "wrote %s" path
    0
