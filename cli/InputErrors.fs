/// How every command reports what went wrong: the message on stderr as `error: ...`, exit code 2 for bad
/// input (a missing file or folder, malformed data or run files, a bad argument) and 1 for a run that failed
/// (too many non-finite losses, an operation the state does not allow). `Cli.main` wraps each command in `guard`.
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
    | :? InvalidOperationException as e -> report e.Message Failed
