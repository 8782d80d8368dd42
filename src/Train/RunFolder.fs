/// A run folder belongs to one process at a time, and a run in it is never replaced by accident.
///
/// The lock is `run.lock` in the folder, opened with `FileShare.None`: .NET takes an exclusive `flock` on it
/// (Linux, macOS; a sharing lock on Windows) for as long as the run holds it, and the OS drops it when the
/// process dies, however it dies, so a crashed run never leaves a stale lock. The holder (pid, host, start
/// time, command line) is written beside it in `run.lock.json` for the message a second process prints; the
/// lock file itself is kept (removing it would let two processes lock two different files of that name).
/// Within one process the lock is re-entrant (the summarization job and the training loop it calls both
/// take it). A folder on a network file system is only as exclusive as its `flock` is there.
module Moe.Train.RunFolder

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json.Nodes
open Moe

/// The file the lock is taken on.
let lockName = "run.lock"
/// Who holds the lock: {"pid", "host", "started_utc", "command"}.
let holderName = "run.lock.json"
/// What `moe sweep` writes in a run folder whose command exited with 0 (see `Moe.Sweep.Runner`).
let completionMarker = "sweep-complete.json"

/// Raised when another process holds the run folder's lock.
type RunFolderBusyException(message: string, runDir: string) =
    inherit InvalidOperationException(message)
    member _.RunDir = runDir

/// The files a run writes in its folder (besides checkpoints/*.ckpt): what an overwrite removes.
let runFiles =
    [ RunFiles.metricsName; RunFiles.routingName; RunFiles.configName; RunFiles.parametersName
      "test_scores.json"; "predictions.txt"; "references.txt"; "documents.txt"; "ids.txt"; "routing_by_label.json"
      completionMarker; "baseline.json" ]

/// The files whose presence means the folder holds a run (started or finished): checkpoints, the metrics
/// log with at least one line, test scores, predictions. Paths relative to the folder.
let existingRun (runDir: string) : string list =
    let ckDir = Checkpoint.folder runDir
    [ if Directory.Exists ckDir then
          for f in Directory.GetFiles(ckDir, "*.ckpt") |> Array.sort do yield Path.GetRelativePath(runDir, f)
      for name in [ RunFiles.metricsName; "test_scores.json"; "predictions.txt"; completionMarker ] do
          let p = Path.Combine(runDir, name)
          if File.Exists p && FileInfo(p).Length > 0L then yield name ]

/// Prepares `runDir` for a run from scratch: a folder that holds a run is refused (ArgumentException naming
/// the files and the ways on) unless `overwrite`, which removes the run's files and checkpoints first.
let startFresh (overwrite: bool) (runDir: string) : unit =
    match existingRun runDir with
    | [] -> ()
    | found when not overwrite ->
        invalidArg "runDir"
            (sprintf "run folder %s already holds a run (%s); continue it with --resume (Train.resume, Summarizer.resume), replace it with --overwrite (RunOptions.Overwrite = true), or choose another name"
                 runDir (String.concat ", " found))
    | _ ->
        for name in runFiles do
            let p = Path.Combine(runDir, name)
            if File.Exists p then File.Delete p
        let ckDir = Checkpoint.folder runDir
        if Directory.Exists ckDir then
            for f in Directory.GetFiles(ckDir, "*.ckpt") do File.Delete f

/// Open locks of this process: full path of the folder -> (lock file, how many holders).
let private held = Dictionary<string, FileStream * int ref>()

/// The holder's description for the refusal message, read from run.lock.json (best effort: the holder may
/// have the lock but not have written it yet).
let private describeHolder (dir: string) : string =
    let path = Path.Combine(dir, holderName)
    try
        match Json.parse (File.ReadAllText path) with
        | Ok(:? JsonObject as o) ->
            let field (name: string) = match o[name] with null -> "?" | v -> v.ToString()
            sprintf "pid %s on host %s, started %s (%s)" (field "pid") (field "host") (field "started_utc") (field "command")
        | _ -> sprintf "a process whose %s is unreadable" holderName
    with _ -> sprintf "a process that has not written %s yet" holderName

/// A sharing violation (another process holds the flock) as .NET reports it: EWOULDBLOCK on Unix,
/// ERROR_SHARING_VIOLATION / ERROR_LOCK_VIOLATION on Windows.
let private isLockConflict (e: IOException) =
    e.GetType() = typeof<IOException> && (e.HResult = 11 || (e.HResult &&& 0xFFFF) = 32 || (e.HResult &&& 0xFFFF) = 33)

/// Takes the exclusive lock of `runDir` (creating the folder) for this process until the result is disposed;
/// raises `RunFolderBusyException` naming the holder when another process has it. `what` is written as the
/// holder's command (e.g. "moe train --name x").
let acquire (what: string) (runDir: string) : IDisposable =
    let dir = Path.GetFullPath runDir
    Directory.CreateDirectory dir |> ignore
    lock held (fun () ->
        match held.TryGetValue dir with
        | true, (_, count) -> count.Value <- count.Value + 1
        | _ ->
            let path = Path.Combine(dir, lockName)
            let fs =
                try new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None)
                with :? IOException as e when isLockConflict e ->
                    raise (RunFolderBusyException(
                            sprintf "run folder %s is in use by %s; wait for it to finish or stop it (the lock %s goes when that process ends)"
                                runDir (describeHolder dir) path, runDir))
            let o = JsonObject()
            o["pid"] <- JsonValue.Create Environment.ProcessId
            o["host"] <- JsonValue.Create Environment.MachineName
            o["started_utc"] <- JsonValue.Create(DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", Globalization.CultureInfo.InvariantCulture))
            o["command"] <- JsonValue.Create what
            File.WriteAllText(Path.Combine(dir, holderName), Json.format o + "\n", UTF8Encoding(false))
            held[dir] <- (fs, ref 1))
    let mutable released = false
    { new IDisposable with
        member _.Dispose() =
            lock held (fun () ->
                if not released then
                    released <- true
                    match held.TryGetValue dir with
                    | true, (fs, count) ->
                        count.Value <- count.Value - 1
                        if count.Value = 0 then
                            held.Remove dir |> ignore
                            (try File.Delete(Path.Combine(dir, holderName)) with _ -> ())
                            fs.Dispose()
                    | _ -> ()) }

/// Whether this process holds the lock of `runDir`.
let isHeld (runDir: string) : bool = lock held (fun () -> held.ContainsKey(Path.GetFullPath runDir))
