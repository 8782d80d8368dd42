/// How commands that read user files report bad input: the message on stderr and exit code 2.
module Moe.InputErrors

open System
open System.IO

/// Runs `command`; a missing file, malformed data or a bad argument prints `error: ...` and returns 2.
let guard (command: unit -> int) : int =
    try command ()
    with
    | :? FileNotFoundException as e ->
        eprintfn "error: %s" e.Message
        2
    | :? InvalidDataException as e ->
        eprintfn "error: %s" e.Message
        2
    | :? ArgumentException as e ->
        eprintfn "error: %s" e.Message
        2
