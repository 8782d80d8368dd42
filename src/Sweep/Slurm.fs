/// Slurm: a sweep emitted as a job array whose task i runs run i with the same command line as `Runner`
/// (skipping a finished run, resuming an interrupted one), with one config file per run; the results are
/// read back afterwards with `./moe sweep GRID.json --collect`.
module Moe.Sweep.Slurm

open System
open System.IO
open System.Text.RegularExpressions
open Moe
open Moe.Sweep.Grid
open Moe.Sweep.Runner

/// A string as one bash word in single quotes.
let private bashQuote (s: string) = "'" + s.Replace("'", "'\\''") + "'"

/// A command token as a bash word, its placeholders becoming the script's variables.
let private bashWord (token: string) : string =
    if token = "{resume}" then "${resume[@]+\"${resume[@]}\"}"
    else
        let parts = Regex.Split(token, @"(\{moe\}|\{config\}|\{run_dir\}|\{name\})")
        parts
        |> Array.filter (fun p -> p <> "")
        |> Array.map (fun p ->
            match p with
            | "{moe}" -> "\"$moe\""
            | "{config}" -> "\"$config\""
            | "{run_dir}" -> "\"$run_dir\""
            | "{name}" -> "\"$name\""
            | literal -> bashQuote literal)
        |> String.concat ""

/// `path` relative to `root` when it lies under it (the script `cd`s to root, so the tree can move), else absolute.
let private underRoot (root: string) (path: string) : string =
    let full = Path.GetFullPath path
    let rel = Path.GetRelativePath(root, full)
    if rel.StartsWith ".." || Path.IsPathRooted rel then full else rel

/// The files `emitSlurm` wrote.
type SlurmFiles =
    { /// The job-array script: `sbatch` it; task i runs run i.
      Script: string
      /// One config file per run, in run order.
      Configs: string list
      /// index, name, config, run folder: one line per run, tab-separated.
      RunList: string }

/// Seconds before the time limit at which Slurm sends the batch shell SIGUSR1 (`--signal=B:USR1@N`): time
/// for the step in flight, a checkpoint write and the requeue.
let warningSeconds = 300

/// Writes into `dir` one config file per run (`configs/<run>.json`), `runs.tsv`, a `logs/` folder and
/// `<name>.sbatch`: a Slurm job array (`--array=0-(n-1)`) whose task i `cd`s to `workDir` (or $MOE_ROOT),
/// the folder relative paths of the sweep mean the same from, skips run i when it is finished, adds
/// `--resume` when it has a checkpoint, runs the sweep's command with `{moe}` = `$MOE` or `launcher`, and
/// writes the completion marker when the command succeeds. `./moe sweep GRID --collect` reads the results.
///
/// Preemption: the script asks for `--requeue`, `--open-mode=append` (a requeued task appends to its log)
/// and `--signal=B:USR1@warningSeconds`. It runs the command in the background and forwards SIGUSR1,
/// SIGTERM and SIGINT to it (so `scancel`, `scancel --batch`, preemption and the time limit reach the
/// trainer, which checkpoints at its next step boundary and exits); after SIGUSR1, the time-limit warning,
/// it requeues its own task (`scontrol requeue $SLURM_JOB_ID`), and the requeued task resumes from the
/// checkpoint by itself (`--resume` when the run folder holds one).
let emitSlurm (plan: Plan) (dir: string) (workDir: string) (launcher: string) : SlurmFiles =
    let spec = plan.Spec
    let root = Path.GetFullPath workDir
    let dir = Path.GetFullPath dir
    let configs = writeConfigs plan (Path.Combine(dir, "configs"))
    let logs = Path.Combine(dir, "logs")
    Directory.CreateDirectory logs |> ignore
    let runList = Path.Combine(dir, "runs.tsv")
    File.WriteAllLines(runList,
        [ yield "index\tname\tconfig\trun_dir"
          for r, c in List.zip plan.Runs configs do
              yield sprintf "%d\t%s\t%s\t%s" r.Index r.Name (underRoot root c) (underRoot root r.RunDir) ])
    let array (name: string) (items: string list) =
        sprintf "%s=(\n%s\n)" name (items |> List.map (fun s -> "  " + bashQuote s) |> String.concat "\n")
    let n = plan.Runs.Length
    let script =
        [ "#!/usr/bin/env bash"
          sprintf "# Slurm job array for sweep %s (%d runs), written by `moe sweep --emit-slurm`." spec.Name n
          sprintf "# Submit: sbatch %s" (bashQuote (Path.Combine(dir, spec.Name + ".sbatch")))
          "# One task by hand: SLURM_ARRAY_TASK_ID=0 bash <this file>. Results afterwards: ./moe sweep GRID.json --collect"
          "# MOE_ROOT overrides the working folder and MOE the launcher (when the tree moved)."
          sprintf "#SBATCH --job-name=moe-%s" spec.Name
          sprintf "#SBATCH --array=0-%d" (n - 1)
          sprintf "#SBATCH --output=%s/%%x-%%A_%%a.out" logs
          "#SBATCH --open-mode=append"
          "#SBATCH --requeue"
          sprintf "#SBATCH --signal=B:USR1@%d" warningSeconds
          for o in spec.SlurmOptions do sprintf "#SBATCH %s" o
          "set -euo pipefail"
          // Unquoted ${..:-'word'} in an assignment: no splitting, and the single-quoted default stays literal.
          sprintf "root=${MOE_ROOT:-%s}" (bashQuote root)
          sprintf "moe=${MOE:-%s}" (bashQuote (Path.GetFullPath launcher))
          "cd \"$root\""
          array "names" (plan.Runs |> List.map (fun r -> r.Name))
          array "configs" (configs |> List.map (underRoot root))
          array "run_dirs" (plan.Runs |> List.map (fun r -> underRoot root r.RunDir))
          "task=\"${SLURM_ARRAY_TASK_ID:?expected SLURM_ARRAY_TASK_ID (set by sbatch --array, or by hand to run one task)}\""
          "if ! [[ \"$task\" =~ ^[0-9]+$ ]] || (( task >= ${#names[@]} )); then"
          "  echo \"moe sweep: task $task is not a run of this sweep (0..$(( ${#names[@]} - 1 )))\" >&2"
          "  exit 2"
          "fi"
          "name=\"${names[$task]}\""
          "config=\"${configs[$task]}\""
          "run_dir=\"${run_dirs[$task]}\""
          sprintf "if [ -f \"$run_dir/%s\" ] || [ -f \"$run_dir/%s\" ]; then" testScoresName completionMarker
          "  echo \"moe sweep: $name is finished; nothing to do\""
          "  exit 0"
          "fi"
          "# As Runner.resumeFlags: --resume with a checkpoint, --overwrite for a start that failed before its first one."
          "resume=()"
          "if compgen -G \"$run_dir/checkpoints/*.ckpt\" > /dev/null; then resume=(--resume)"
          sprintf "elif [ -s \"$run_dir/%s\" ] || [ -s \"$run_dir/predictions.txt\" ]; then resume=(--overwrite); fi" Train.RunFiles.metricsName
          "echo \"moe sweep: task $task runs $name ${resume[*]+${resume[*]}} (attempt ${SLURM_RESTART_COUNT:-0})\""
          "# Signals reach the trainer: Slurm signals this shell (B:USR1 before the time limit, TERM on scancel --batch),"
          "# so the command runs in the background and each signal is forwarded; the trainer checkpoints and exits."
          "got=''"
          "child=''"
          "forward() { got=\"$1\"; if [ -n \"$child\" ]; then kill -s \"$1\" \"$child\" 2>/dev/null || true; fi; }"
          "trap 'forward USR1' USR1"
          "trap 'forward TERM' TERM"
          "# A background command of a script ignores SIGINT, so an interrupt is forwarded as SIGTERM."
          "trap 'forward TERM' INT"
          "set +e"
          (spec.Command |> List.map bashWord |> String.concat " ") + " &"
          "child=$!"
          "# wait returns early when a trapped signal arrives; wait again until the trainer has exited."
          "while kill -0 \"$child\" 2>/dev/null; do wait \"$child\"; done"
          "wait \"$child\""
          "status=$?"
          "set -e"
          "if [ \"$got\" = USR1 ]; then"
          "  echo \"moe sweep: $name stopped before the time limit (exit $status); requeueing task $task\""
          "  if [ -n \"${SLURM_JOB_ID:-}\" ]; then scontrol requeue \"$SLURM_JOB_ID\"; fi"
          "  exit 0"
          "fi"
          "if [ \"$status\" -ne 0 ]; then"
          "  echo \"moe sweep: $name exited with $status${got:+ after SIG$got}\" >&2"
          "  exit \"$status\""
          "fi"
          "mkdir -p \"$run_dir\""
          sprintf "printf '{\"run\":\"%%s\",\"exit_code\":0,\"finished_utc\":\"%%s\"}\\n' \"$name\" \"$(date -u +%%Y-%%m-%%dT%%H:%%M:%%SZ)\" > \"$run_dir/%s\"" completionMarker ]
        |> String.concat "\n"
    let scriptPath = Path.Combine(dir, spec.Name + ".sbatch")
    File.WriteAllText(scriptPath, script + "\n")
    if not (OperatingSystem.IsWindows()) then
        File.SetUnixFileMode(scriptPath, File.GetUnixFileMode scriptPath ||| UnixFileMode.UserExecute ||| UnixFileMode.GroupExecute)
    { Script = scriptPath; Configs = configs; RunList = runList }
