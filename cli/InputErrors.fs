/// How every command reports what went wrong: the message on stderr as `error: ...`, exit code 2 for bad
/// input (a missing file or folder, malformed data or run files, a bad argument) and 1 for a run that failed
/// (too many non-finite losses, a checkpoint or run file that could not be written, a run folder in use by
/// another process, an operation the state does not allow). `Cli.main` wraps each command in `guard`.
module Moe.InputErrors

open System
open System.IO

/// Exit code of a command given bad input.
[<Literal>]
let BadInput = 2

/// Exit code of a command that failed on good input.
[<Literal>]
let Failed = 1

/// An ArgumentException's message without the " (Parameter 'name')" that .NET appends: the message
/// already says which flag or value was wrong.
let private withoutParameterSuffix (e: ArgumentException) : string =
    let suffix = if isNull e.ParamName then "" else sprintf " (Parameter '%s')" e.ParamName
    if suffix <> "" && e.Message.EndsWith suffix then e.Message.Substring(0, e.Message.Length - suffix.Length) else e.Message

/// Argu takes an unknown `--flag` placed among a command's main values (paths) for one of them; this refuses
/// any such value that starts with "-" and names no existing file or folder, naming it and the known flags.
let rejectUnknownFlags<'T when 'T :> Argu.IArgParserTemplate> (values: string list) : unit =
    let known =
        Argu.ArgumentParser.Create<'T>().GetArgumentCases()
        |> List.collect (fun c -> c.CommandLineNames.Value)
        |> List.filter (fun n -> n.StartsWith "-")
    for v in values do
        if v.StartsWith "-" && v.Length > 1 && not (File.Exists v || Directory.Exists v) then
            invalidArg "args" (sprintf "unknown flag %s; expected a path or one of %s (--help lists them)" v (String.concat ", " known))

/// Runs `command`, turning the exceptions of bad input into exit code 2 and those of a failed run into 1,
/// each with its message; anything else is a bug and propagates with its stack trace.
let guard (command: unit -> int) : int =
    let report (message: string) (code: int) =
        eprintfn "error: %s" message
        code
    try command ()
    with
    // Named from `Moe.` on: under `open System` a bare `TextTools.DataException` is System.Data's, never thrown here.
    | :? FileNotFoundException as e -> report e.Message BadInput
    | :? DirectoryNotFoundException as e -> report e.Message BadInput
    | :? InvalidDataException as e -> report e.Message BadInput
    | :? Moe.TextTools.DataException as e -> report e.Message BadInput
    | :? Moe.RunLog.RunFileException as e -> report e.Message BadInput
    | :? ArgumentException as e -> report (withoutParameterSuffix e) BadInput
    | :? Moe.Train.TooManyBadStepsException as e -> report e.Message Failed
    | :? Moe.Train.Checkpoint.WriteFailedException as e -> report e.Message Failed
    | :? InvalidOperationException as e -> report e.Message Failed
