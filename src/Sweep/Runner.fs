/// Running a sweep: each run's status read from its folder, its config file, and its command started as a
/// child process, one run after another (finished runs skipped, interrupted ones resumed).
///
/// Runs are started with the grid's `command` (placeholders: `{moe}` the launcher, `{config}` the run's
/// config file, `{run_dir}`, `{name}`, and `{resume}`, a whole item that becomes `--resume` for an
/// interrupted run, `--overwrite` for a started one that left files but no checkpoint, and nothing
/// otherwise), the same command line a Slurm task runs (`Slurm`), so a sweep behaves alike on a laptop and
/// on a cluster. A run is finished when its folder holds test_scores.json or the completion marker the
/// sweep writes when the command exits with 0, and interrupted when it holds a checkpoint (checkpoints/*.ckpt).
/// The sweep holds the lock of its output folder while it runs (`Train.RunFolder`): a second `moe sweep`
/// of the same grid is refused; each run's own folder is locked by its `moe train`.
module Moe.Sweep.Runner

open System
open System.Diagnostics
open System.IO
open System.Text
open System.Text.Json.Nodes
open Moe
open Moe.Sweep.ConfigTree
open Moe.Sweep.Grid

/// Where a run stands, judged from its folder.
type RunStatus =
    /// No folder yet.
    | NotStarted
    /// A folder without a checkpoint: the run starts from the beginning.
    | Started
    /// A checkpoint but no completion: the run resumes from it.
    | Interrupted
    /// test_scores.json or the sweep's completion marker is there: the run is skipped.
    | Finished

/// Written in a run folder when its command exits with 0, by the sweep or by the Slurm task.
let completionMarker = Train.RunFolder.completionMarker
/// The evaluation's output; a run that has it is finished.
let testScoresName = "test_scores.json"

/// The status of the run folder `runDir`.
let status (runDir: string) : RunStatus =
    if File.Exists(Path.Combine(runDir, testScoresName)) || File.Exists(Path.Combine(runDir, completionMarker)) then Finished
    elif Directory.Exists(Train.Checkpoint.folder runDir) && Directory.GetFiles(Train.Checkpoint.folder runDir, "*.ckpt").Length > 0 then Interrupted
    elif Directory.Exists runDir then Started
    else NotStarted

/// `finished`, `interrupted`, `started`, `not started`.
let statusText (s: RunStatus) : string =
    match s with
    | NotStarted -> "not started"
    | Started -> "started"
    | Interrupted -> "interrupted"
    | Finished -> "finished"

/// The config file of a run, under the sweep's output folder.
let configPath (spec: SweepSpec) (run: Run) : string = Path.Combine(spec.OutputDir, "configs", run.Name + ".json")

/// Writes each run's config file; returns their paths in run order.
let writeConfigs (plan: Plan) (dir: string) : string list =
    Directory.CreateDirectory dir |> ignore
    [ for r in plan.Runs do
        let path = Path.Combine(dir, r.Name + ".json")
        File.WriteAllText(path, r.Config.ToJsonString indented + "\n")
        yield path ]

/// What {resume} becomes for a run found in `status`: `--resume` when interrupted, `--overwrite` when
/// started without a checkpoint but with run files (a start that failed early), nothing otherwise.
let resumeFlags (status: RunStatus) (runDir: string) : string list =
    match status with
    | Interrupted -> [ "--resume" ]
    | Started when not (Train.RunFolder.existingRun runDir).IsEmpty -> [ "--overwrite" ]
    | _ -> []

/// The command line of `run` with its placeholders filled: `launcher` for {moe}, `config` for {config},
/// and `resume` (see `resumeFlags`) for {resume}.
let commandLine (spec: SweepSpec) (launcher: string) (config: string) (run: Run) (resume: string list) : string list =
    spec.Command
    |> List.collect (fun token ->
        if token = "{resume}" then resume
        else
            [ token.Replace("{moe}", launcher).Replace("{config}", config).Replace("{run_dir}", run.RunDir).Replace("{name}", run.Name) ])

/// A table of the runs: index, status, name and overrides (what `--dry-run` prints).
let describePlan (plan: Plan) : string =
    let sb = StringBuilder()
    let spec = plan.Spec
    let counts = plan.Runs |> List.countBy (fun r -> status r.RunDir)
    sb.AppendLine(sprintf "sweep %s: %d runs (%s); run folders in %s, results in %s" spec.Name plan.Runs.Length
                      (counts |> List.map (fun (s, n) -> sprintf "%d %s" n (statusText s)) |> String.concat ", ")
                      spec.RunsDir spec.OutputDir) |> ignore
    for r in plan.Runs do
        sb.AppendLine(sprintf "%3d  %-11s  %s" r.Index (statusText (status r.RunDir)) r.Name) |> ignore
        for path, v in r.Overrides do
            sb.AppendLine(sprintf "       %s = %s" path (oneLine v)) |> ignore
    sb.ToString()

// ---------------------------------------------------------------- running

/// How `runAll` starts and reports runs.
type SweepOptions =
    { /// What {moe} becomes: the launcher of this repository (`./moe`).
      Launcher: string
      /// Progress and each run's output go here.
      Output: TextWriter
      /// Stop at the first failed run instead of going on with the others.
      StopOnFailure: bool }

    /// Options for C#: a null writer means Console.Out.
    static member Create(launcher: string, output: TextWriter, stopOnFailure: bool) =
        { Launcher = launcher; Output = (if isNull output then Console.Out else output); StopOnFailure = stopOnFailure }

/// What happened to one run.
type Outcome =
    { Run: Run
      /// The status found before the sweep touched it.
      Before: RunStatus
      /// None when the run was skipped; the exit code otherwise (-1 when it could not be started).
      ExitCode: int option
      Seconds: float
      Message: string }

/// Writes the completion marker of a run.
let private markComplete (run: Run) (exitCode: int) =
    let o = JsonObject()
    o["run"] <- JsonValue.Create run.Name
    o["config_hash"] <- JsonValue.Create run.Hash
    o["exit_code"] <- JsonValue.Create exitCode
    o["finished_utc"] <- JsonValue.Create(DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", inv))
    Directory.CreateDirectory run.RunDir |> ignore
    File.WriteAllText(Path.Combine(run.RunDir, completionMarker), o.ToJsonString compact + "\n")

/// Runs `argv` as a child process, copying its output lines to `out` and to `logPath`; returns its exit code.
let private runProcess (argv: string list) (out: TextWriter) (logPath: string) : int =
    let psi = ProcessStartInfo(List.head argv, UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true)
    for a in List.tail argv do psi.ArgumentList.Add a
    Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath logPath)) |> ignore
    use log = new StreamWriter(logPath, true, UTF8Encoding(false))
    let gate = obj ()
    let copy (e: DataReceivedEventArgs) =
        if not (isNull e.Data) then
            lock gate (fun () ->
                out.WriteLine e.Data
                log.WriteLine e.Data
                log.Flush())
    use p = new Process(StartInfo = psi)
    p.OutputDataReceived.Add copy
    p.ErrorDataReceived.Add copy
    p.Start() |> ignore
    p.BeginOutputReadLine()
    p.BeginErrorReadLine()
    p.WaitForExit()
    out.Flush()
    p.ExitCode

/// Runs the sweep's runs one after another: a finished run is skipped, an interrupted one resumed, any
/// other started from the beginning. Each run's config goes to `<output>/configs/<run>.json`, its output
/// to the console and `<output>/logs/<run>.log`; a run whose command exits with 0 gets the completion
/// marker. A failed run is reported and the sweep goes on (unless `StopOnFailure`).
let runAll (opts: SweepOptions) (plan: Plan) : Outcome list =
    let spec = plan.Spec
    use _lock = Train.RunFolder.acquire (sprintf "moe sweep %s" spec.Name) spec.OutputDir
    let configs = writeConfigs plan (Path.Combine(spec.OutputDir, "configs"))
    let total = plan.Runs.Length
    let mutable stop = false
    [ for run, config in List.zip plan.Runs configs do
        if not stop then
            let before = status run.RunDir
            let say (text: string) =
                opts.Output.WriteLine(sprintf "[%d/%d] %s: %s" (run.Index + 1) total run.Name text)
                opts.Output.Flush()
            match before with
            | Finished ->
                say "finished, skipped"
                yield { Run = run; Before = before; ExitCode = None; Seconds = 0.0; Message = "finished, skipped" }
            | _ ->
                let resume = resumeFlags before run.RunDir
                let argv = commandLine spec opts.Launcher (Path.GetFullPath config) run resume
                say (sprintf "%s: %s" (if before = Interrupted then "resuming" else "starting") (String.concat " " argv))
                let clock = Stopwatch.StartNew()
                let code, message =
                    try
                        let code = runProcess argv opts.Output (Path.Combine(spec.OutputDir, "logs", run.Name + ".log"))
                        code, (if code = 0 then "done" else sprintf "failed with exit code %d" code)
                    with :? ComponentModel.Win32Exception as e ->
                        -1, sprintf "could not start %s: %s" (List.head argv) e.Message
                if code = 0 then markComplete run code
                say (sprintf "%s in %.1f s" message clock.Elapsed.TotalSeconds)
                if code <> 0 && opts.StopOnFailure then stop <- true
                yield { Run = run; Before = before; ExitCode = Some code; Seconds = clock.Elapsed.TotalSeconds; Message = message } ]
