/// `moe sweep GRID.json`: expand a grid file into runs and run them one after another (finished runs
/// skipped, interrupted ones resumed), list them (`--dry-run`), emit a Slurm job array (`--emit-slurm DIR`),
/// or read the results from the run folders (`--collect`). The grid format is documented in `Moe.Sweep.Grid`.
module Moe.SweepCommand

open System
open System.IO
open Argu
open Moe

type SweepArgs =
    | [<MainCommand; ExactlyOnce>] Grid of path: string
    | Dry_Run
    | Collect
    | Emit_Slurm of dir: string
    | Launcher of path: string
    | Stop_On_Failure
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Grid _ -> "the grid file (JSON): name, base config, grid of field path -> values, variants, seeds."
            | Dry_Run -> "list the runs (name, status, overrides) and run nothing."
            | Collect -> "only build sweep/<name>/results.csv and results.md from the run folders (after a cluster run)."
            | Emit_Slurm _ -> "write per-run configs and a Slurm job-array script into DIR instead of running; task i runs run i."
            | Launcher _ -> "the program that {moe} stands for in the run command (default: this repository's ./moe)."
            | Stop_On_Failure -> "stop at the first run that fails (default: report it and go on)."

/// The training command's config file, as the sweep checks field paths and values against it.
let runConfigSchema : Sweep.Schema = Sweep.Schema.summarizerSchema

/// This repository's launcher: `moe` beside Directory.Packages.props above the running program.
let private defaultLauncher () : string =
    let rec up (dir: DirectoryInfo) =
        if isNull dir then
            invalidArg "--launcher" "expected to find this repository's ./moe above the CLI's folder; pass --launcher PATH"
        elif File.Exists(Path.Combine(dir.FullName, "moe")) && File.Exists(Path.Combine(dir.FullName, "Directory.Packages.props")) then
            Path.Combine(dir.FullName, "moe")
        else up dir.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

let private writeResults (plan: Sweep.Grid.Plan) : unit =
    let note = Sweep.Results.writeReport plan
    let rows = Sweep.Results.collect plan
    let csv, md = Sweep.Results.writeResults plan rows note
    printfn "%s" (Sweep.Results.formatMarkdown plan rows note)
    printfn "wrote %s and %s" csv md

/// Runs the command; a bad grid prints every problem and returns 2; a failed run returns 1.
let run (args: ParseResults<SweepArgs>) : int =
    let modes = [ args.Contains Dry_Run; args.Contains Collect; args.Contains Emit_Slurm ] |> List.filter id
    let gridPath = args.GetResult Grid
    match Sweep.Grid.load runConfigSchema gridPath with
    | _ when modes.Length > 1 ->
        eprintfn "error: choose one of --dry-run, --collect and --emit-slurm"
        2
    | Error problems ->
        eprintfn "error: invalid grid %s (%d problems); nothing was run:" gridPath problems.Length
        for p in problems do eprintfn "  - %s" p
        2
    | Ok plan ->
        if args.Contains Dry_Run then
            printf "%s" (Sweep.Runner.describePlan plan)
            0
        elif args.Contains Collect then
            writeResults plan
            0
        else
            match args.TryGetResult Emit_Slurm with
            | Some dir ->
                let launcher = args.TryGetResult Launcher |> Option.defaultWith defaultLauncher
                let files = Sweep.Slurm.emitSlurm plan dir (Directory.GetCurrentDirectory()) launcher
                printfn "wrote %d run configs, %s and %s" files.Configs.Length files.RunList files.Script
                printfn "submit: sbatch %s" files.Script
                printfn "afterwards: ./moe sweep %s --collect" gridPath
                0
            | None ->
                let options : Sweep.Runner.SweepOptions =
                    { Launcher = args.TryGetResult Launcher |> Option.defaultWith defaultLauncher
                      Output = Console.Out
                      StopOnFailure = args.Contains Stop_On_Failure }
                let outcomes = Sweep.Runner.runAll options plan
                writeResults plan
                let failed = outcomes |> List.filter (fun o -> match o.ExitCode with Some c -> c <> 0 | None -> false)
                let notRun = plan.Runs.Length - outcomes.Length
                for o in failed do eprintfn "run %s %s (log: %s)" o.Run.Name o.Message (Path.Combine(plan.Spec.OutputDir, "logs", o.Run.Name + ".log"))
                if notRun > 0 then eprintfn "%d runs not started (--stop-on-failure)" notRun
                if failed.IsEmpty then 0 else 1
