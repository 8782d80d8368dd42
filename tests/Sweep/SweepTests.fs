/// Tests of the sweep runner: grid checking, expansion and names, dry-run listing, skipping and resuming,
/// the Slurm job array (checked with bash), and results read back from synthetic run folders.
module Moe.Tests.SweepTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open Moe
open Moe.Sweep
open Moe.Sweep.Grid
open Moe.Sweep.Runner
open Moe.Sweep.Results
open Moe.Sweep.Slurm
open Moe.Tests.Support

/// The config file the tests sweep over: a `train` section (TrainConfig) and a `moe` section (MoeConfig),
/// so paths reach records, unions with fields and options.
let schema =
    Schema.combine
        (Schema.ofSection "train" Train.TrainConfig.defaults Train.TrainConfig.validate)
        (Schema.ofSection "moe" Config.MoeConfig.defaults Config.MoeConfig.validate)
    |> Schema.withSeedField "train.Seed"

/// A job config shaped like the summarizer's: one record that names its own run folder `RunsDir/Name`.
type JobConfig =
    { Name: string
      RunsDir: string
      Train: Train.TrainConfig
      Moe: Config.MoeConfig }

module JobConfig =
    let defaults = { Name = "job"; RunsDir = "runs"; Train = Train.TrainConfig.defaults; Moe = Config.MoeConfig.defaults }
    let validate (c: JobConfig) = Train.TrainConfig.validate c.Train @ Config.MoeConfig.validate c.Moe

let jobSchema =
    Schema.ofRecord JobConfig.defaults JobConfig.validate
    |> Schema.withSeedField "Train.Seed"
    |> Schema.withRunFolder "RunsDir" "Name"

/// A fresh folder under the system temp folder, removed after `body`.
let withTemp (body: string -> unit) : unit =
    let dir = Path.Combine(Path.GetTempPath(), "moe-sweep-tests-" + Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    try body dir
    finally
        try Directory.Delete(dir, true) with _ -> ()

/// Writes `text` to `dir/name` and returns the path.
let write (dir: string) (name: string) (text: string) : string =
    let path = Path.Combine(dir, name)
    Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
    File.WriteAllText(path, text)
    path

/// Loads a grid given as text, with run folders and outputs under `dir`.
let loadText (dir: string) (text: string) : Result<Plan, string list> =
    load schema (write dir (sprintf "grid-%s.json" (Guid.NewGuid().ToString("N"))) text)

let loadOk (dir: string) (text: string) : Plan =
    match loadText dir text with
    | Ok plan -> plan
    | Error es -> failtestf "expected a valid grid, got:\n%s" (String.concat "\n" es)

let problemsOf (dir: string) (text: string) : string list =
    match loadText dir text with
    | Ok plan -> failtestf "expected the grid to be rejected, but it expanded into %d runs" plan.Runs.Length
    | Error es -> es

/// A stand-in for the training command that records its arguments (one line per call, NUL-free, tab-separated)
/// and creates the run folder it is given after `--run-dir`; exits with 3 when the run folder's name contains
/// `failing` (use "" for none).
let recorder (dir: string) (failing: string) : string * string =
    let calls = Path.Combine(dir, "calls.txt")
    let script =
        write dir "fake-moe.sh"
            (String.concat "\n"
                [ "#!/usr/bin/env bash"
                  "set -eu"
                  sprintf "printf '%%s\\t' \"$@\" >> '%s'" calls
                  sprintf "printf '\\n' >> '%s'" calls
                  "prev=''"
                  "for a in \"$@\"; do if [ \"$prev\" = --run-dir ]; then mkdir -p \"$a\"; run_dir=\"$a\"; fi; prev=\"$a\"; done"
                  "echo \"fake training of ${run_dir:-?}\""
                  (if failing = "" then "exit 0" else sprintf "case \"${run_dir:-}\" in *%s*) exit 3;; esac" failing)
                  "exit 0"
                  "" ])
    File.SetUnixFileMode(script, File.GetUnixFileMode script ||| UnixFileMode.UserExecute)
    script, calls

let recordedCalls (calls: string) : string list list =
    if not (File.Exists calls) then []
    else
        File.ReadAllLines calls
        |> Array.filter (fun l -> l <> "")
        |> Array.map (fun l -> l.TrimEnd('\t').Split('\t') |> List.ofArray)
        |> List.ofArray

/// A grid with 2 variants x 2 x 3 grid values x 2 seeds = 24 runs.
let bigGrid (dir: string) =
    sprintf """{
      "name": "big",
      "base": { "train": { "Steps": 40, "WarmupSteps": 4 } },
      "variants": [ { "name": "plain", "set": {} }, { "name": "wide", "set": { "moe.ExpertHidden": 256 } } ],
      "grid": {
        "moe.Router.Selection": [ "SwitchTop1", { "Hash": { "RandomHash": 3 } } ],
        "train.LossWeights.SwitchAux": [ 0.0, 0.01, 0.1 ]
      },
      "seeds": [ 0, 1 ],
      "runs_dir": "%s",
      "output_dir": "%s"
    }""" (Path.Combine(dir, "runs").Replace("\\", "/")) (Path.Combine(dir, "out").Replace("\\", "/"))

/// A small valid grid (2 x 2 = 4 runs) with outputs under `dir`.
let smallGrid (dir: string) (command: string) =
    sprintf """{
      "name": "small",
      "base": { "train": { "Steps": 20, "WarmupSteps": 2 } },
      "grid": { "train.Schedule": [ "Cosine", "Constant" ], "train.LossWeights.SwitchAux": [ 0.0, 0.01 ] },
      "runs_dir": "%s",
      "output_dir": "%s"%s
    }""" (Path.Combine(dir, "runs")) (Path.Combine(dir, "out")) command

let private num (n: JsonNode) = n.GetValue<double>()

/// The node at `path` (keys joined by dots) in a config tree, or null.
let private nodeAt (path: string) (root: JsonNode) : JsonNode =
    path.Split '.' |> Array.fold (fun (n: JsonNode) k -> if isNull n then null else n.[k]) root

/// The summarizer's `Model.Ffn` as an MoE with `router`, as `Json` writes it: every field of the case, since
/// `Json` reads a union case whole and a path into a case changes the case the base holds.
let private moeFfn (router: Config.RouterConfig) : string =
    (Json.toNode (Models.Moe { Config.MoeConfig.defaults with Router = router })).ToJsonString()

/// A grid for the summarizer's config whose base sets `Model.Ffn` to `ffn` (JSON) and a short `Train`.
let private summarizerGrid (ffn: string) (body: string) : string =
    sprintf """{ "name": "cases", "base": { "Model": { "Ffn": %s }, "Train": { "Steps": 20, "WarmupSteps": 2 } }, %s }""" ffn body

let tests =
    testList "Sweep" [
        testCase "expansion: count and order are variants, then grid keys in file order, then seeds" <| fun () ->
            withTemp (fun dir ->
                let plan = loadOk dir (bigGrid dir)
                Expect.equal plan.Runs.Length 24 "2 variants x 2 selections x 3 weights x 2 seeds"
                Expect.equal (plan.Spec.Axes |> List.map _.Column)
                    [ "variant"; "moe.Router.Selection"; "train.LossWeights.SwitchAux"; "train.Seed" ] "axes slowest first"
                for r in plan.Runs do
                    // mixed-radix digits of the index, slowest axis first
                    let v, s, w, seed = r.Index / 12, (r.Index / 6) % 2, (r.Index / 2) % 3, r.Index % 2
                    let get (path: string) = nodeAt path r.Config
                    Expect.equal (get "train.Seed" |> num) (float seed) (sprintf "run %d seed" r.Index)
                    Expect.floatClose Accuracy.veryHigh (get "train.LossWeights.SwitchAux" |> num) ([| 0.0; 0.01; 0.1 |].[w]) "weight"
                    Expect.equal (Grid.valueLabel (get "moe.Router.Selection")) ([| "SwitchTop1"; """{"Hash":{"RandomHash":3}}""" |].[s]) "selection"
                    Expect.equal (get "moe.ExpertHidden" |> Option.ofObj |> Option.map num) (if v = 1 then Some 256.0 else None) "variant"
                    Expect.equal (get "train.Steps" |> num) 40.0 "base kept"
                    Expect.equal r.RunDir (Path.Combine(dir, "runs", r.Name)) "run folder")

        testCase "names are readable, unique, and the same for the same configs whatever the file's layout" <| fun () ->
            withTemp (fun dir ->
                let a = loadOk dir (bigGrid dir)
                let reordered =
                    (bigGrid dir)
                        .Replace("""{ "Steps": 40, "WarmupSteps": 4 }""", """{"WarmupSteps":4,"Steps":40}""")
                        .Replace("[ 0.0, 0.01, 0.1 ]", "[0, 1e-2, 0.100]")
                let b = loadOk dir reordered
                let names (p: Plan) = p.Runs |> List.map _.Name
                Expect.equal (names a) (names b) "names depend on the config, not its spelling"
                Expect.equal (names a |> List.distinct).Length 24 "unique"
                // The hash is Python's hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")))[:8]
                // of this run's config, computed outside this code base. If the name changes, every existing run
                // folder is renamed and finished runs run again.
                Expect.equal a.Runs[13].Name "big_wide_Selection-SwitchTop1_SwitchAux-0_Seed-1_691ee71e" "pinned name"
                for n in names a do
                    Expect.isMatch n @"^big_(plain|wide)_Selection-[A-Za-z0-9.+-]+_SwitchAux-[0-9.e+-]+_Seed-[01]_[0-9a-f]{8}$" "name layout")

        testCase "adding a value keeps the names of the runs that were there; a new base renames them all" <| fun () ->
            withTemp (fun dir ->
                let before = loadOk dir (smallGrid dir "")
                let more = loadOk dir ((smallGrid dir "").Replace("[ 0.0, 0.01 ]", "[ 0.0, 0.01, 0.1 ]"))
                let newBase = loadOk dir ((smallGrid dir "").Replace("\"Steps\": 20", "\"Steps\": 30"))
                let names (p: Plan) = p.Runs |> List.map _.Name |> Set.ofList
                Expect.isTrue (Set.isSubset (names before) (names more)) "old runs keep their folders"
                Expect.equal (Set.count (names more)) 6 "two more runs"
                Expect.isEmpty (Set.intersect (names before) (names newBase)) "another base is another set of runs")

        testCase "a base config file is read relative to the grid file" <| fun () ->
            withTemp (fun dir ->
                write dir "configs/base.json" """{ "train": { "Steps": 77, "WarmupSteps": 7 }, "moe": { "Router": { "Experts": 4 } } }""" |> ignore
                let grid =
                    sprintf """{ "name": "b", "base": "configs/base.json", "grid": { "moe.Router.K": [1, 2] }, "runs_dir": "%s" }"""
                        (Path.Combine(dir, "runs"))
                let plan = loadOk dir grid
                for r in plan.Runs do
                    Expect.equal (r.Config |> nodeAt "train.Steps" |> num) 77.0 "base value"
                    Expect.equal (r.Config |> nodeAt "moe.Router.Experts" |> num) 4.0 "nested base value"
                Expect.equal (plan.Runs |> List.map (fun r -> r.Config |> nodeAt "moe.Router.K" |> num)) [ 1.0; 2.0 ] "grid values")

        testCase "a bad grid is rejected with every problem and its JSON path" <| fun () ->
            withTemp (fun dir ->
                let problems =
                    problemsOf dir """{
                      "name": "bad name",
                      "gird": {},
                      "base": { "train": { "LearningRate": "fast" }, "modle": {} },
                      "grid": {
                        "train.LossWeights.Switchaux": [0.0],
                        "train.Schedule": ["Cosine", "Linear"],
                        "train.Steps": [],
                        "train.BatchSize": 8,
                        "moe.Router.Selection": ["SwitchTop1", {"Hash": "Nope"}],
                        "train.Eps": [1e-8, 1e-8]
                      },
                      "seeds": [0, "one"],
                      "variants": [ {"name": "a", "set": {"train.Bf16": 3}}, {"name": "a", "sett": {}} ],
                      "command": ["{moe}", "train", "--resume={resume}", "{cfg}"]
                    }"""
                let expected =
                    [ "$: unknown key 'gird'"
                      "$.name: expected letters"
                      "$.base.train.LearningRate: expected a number, got \"fast\""
                      "$.base: unknown section 'modle'"
                      "$.grid[\"train.LossWeights.Switchaux\"]: train.LossWeights: unknown field 'Switchaux' in LossWeights (did you mean 'SwitchAux'?"
                      "$.grid[\"train.Schedule\"][1]: expected one of Cosine|InverseSqrt|Constant, got \"Linear\""
                      "$.grid[\"train.Steps\"]: empty"
                      "$.grid[\"train.BatchSize\"]: expected a list of values"
                      "$.grid[\"moe.Router.Selection\"][1].Hash: expected one of RandomHash|BalancedHash"
                      "$.grid[\"train.Eps\"][1]: duplicate of $.grid[\"train.Eps\"][0]"
                      "$.seeds[1]: expected an integer, got \"one\""
                      "$.variants[0].set[\"train.Bf16\"]: expected true or false, got 3"
                      "$.variants[1]: unknown key 'sett'"
                      "$.variants[1].name: \"a\" is also the name of $.variants[0]"
                      "$.command: never passes {config}"
                      "$.command[2]: {resume} must be a whole item"
                      "$.command[3]: unknown placeholder {cfg}" ]
                for e in expected do
                    Expect.isTrue (problems |> List.exists (fun p -> p.StartsWith e))
                        (sprintf "expected a problem starting with %s; got:\n%s" e (String.concat "\n" problems))
                Expect.equal problems.Length expected.Length (sprintf "one message per problem:\n%s" (String.concat "\n" problems)))

        testCase "an empty grid, a grid with nothing to sweep and a missing name are rejected" <| fun () ->
            withTemp (fun dir ->
                let empty = problemsOf dir """{ "name": "e", "grid": {} }"""
                Expect.equal empty.Length 1 "one problem"
                Expect.stringStarts empty[0] "$.grid: empty" "empty grid"
                let nothing = problemsOf dir """{ "name": "n", "base": { "train": { "Steps": 5 } } }"""
                Expect.stringStarts (List.exactlyOne nothing) "$: nothing to sweep" "no axis"
                let unnamed = problemsOf dir """{ "grid": { "train.Steps": [1] }, "variants": [] }"""
                Expect.equal unnamed.Length 2 "missing name and empty variants"
                Expect.stringStarts unnamed[0] "$.name: missing" "missing name"
                Expect.stringStarts unnamed[1] "$.variants: empty" "empty variants"
                let notObject = problemsOf dir "[1, 2]"
                Expect.stringStarts (List.exactlyOne notObject) "$: expected a grid object" "not an object"
                match load schema (Path.Combine(dir, "missing.json")) with
                | Error [ e ] -> Expect.stringContains e "does not exist" "missing file"
                | other -> failtestf "expected one problem for a missing file, got %A" other
                let malformed = problemsOf dir """{ "name": "m", "grid": { "train.Steps": [1, }"""
                Expect.stringContains (List.exactlyOne malformed) "malformed JSON" "malformed file")

        testCase "runs with the same config, or a field varied by two axes, are rejected before anything runs" <| fun () ->
            withTemp (fun dir ->
                let twins =
                    problemsOf dir """{ "name": "t", "variants": [ { "name": "a", "set": {} }, { "name": "b" } ], "seeds": [1, 2] }"""
                Expect.equal twins.Length 2 "one problem per pair of twin runs (seed 1 and seed 2)"
                for p in twins do
                    Expect.stringStarts p "duplicate runs: #" "says which runs"
                    Expect.stringContains p "resolve to the same config" "says why"
                let overlap =
                    problemsOf dir """{ "name": "o", "grid": { "train.LossWeights": [ { "ZLoss": 0.0 } ], "train.Seed": [1] },
                                        "variants": [ { "name": "a", "set": { "train.LossWeights.SwitchAux": 0.5 } } ], "seeds": [3] }"""
                Expect.equal overlap.Length 2 (sprintf "variants vs grid and seeds vs grid:\n%s" (String.concat "\n" overlap))
                Expect.isTrue (overlap |> List.exists (fun p -> p.StartsWith "$.variants[0].set[\"train.LossWeights.SwitchAux\"]: train.LossWeights.SwitchAux is also varied by $.grid[\"train.LossWeights\"]")) "prefix overlap"
                Expect.isTrue (overlap |> List.exists (fun p -> p.StartsWith "$.seeds: train.Seed is also varied by $.grid[\"train.Seed\"]")) "seed field in the grid")

        testCase "each run's resolved config is validated; a problem is listed once with the runs it concerns" <| fun () ->
            withTemp (fun dir ->
                let problems =
                    problemsOf dir """{ "name": "s", "grid": { "train.WarmupSteps": [10, 5000], "moe.Router.K": [2, 9] } }"""
                Expect.equal problems.Length 2 (String.concat "\n" problems)
                Expect.stringStarts problems[0] "config.moe: K must be in 1..Experts (8), got 9 (#1 " "K runs, in order of first appearance"
                Expect.stringContains problems[0] ", #3 " "both runs with K = 9"
                Expect.stringStarts problems[1] "config.train: WarmupSteps (5000) must be <= Steps (1000) (#2 " "warmup runs")

        testCase "dry-run lists every run with its status and overrides" <| fun () ->
            withTemp (fun dir ->
                let plan = loadOk dir (smallGrid dir "")
                Directory.CreateDirectory(Path.Combine(plan.Runs[1].RunDir, "checkpoints")) |> ignore
                File.WriteAllText(Train.Checkpoint.last plan.Runs[1].RunDir, "")
                write plan.Runs[2].RunDir Runner.testScoresName "{}" |> ignore
                let text = describePlan plan
                Expect.stringStarts text "sweep small: 4 runs (" "header"
                for r in plan.Runs do Expect.stringContains text r.Name "each run is listed"
                Expect.stringContains text ("  1  interrupted  " + plan.Runs[1].Name) "interrupted"
                Expect.stringContains text ("  2  finished     " + plan.Runs[2].Name) "finished"
                Expect.stringContains text ("  0  not started  " + plan.Runs[0].Name) "not started"
                Expect.stringContains text "train.Schedule = \"Constant\"" "overrides"
                Expect.stringContains text "train.LossWeights.SwitchAux = 0.01" "overrides")

        testCase "a run folder's status: finished by test scores or the marker, interrupted by a checkpoint" <| fun () ->
            withTemp (fun dir ->
                let run = Path.Combine(dir, "r")
                Expect.equal (status run) NotStarted "no folder"
                Directory.CreateDirectory run |> ignore
                Expect.equal (status run) Started "a folder only: start over"
                write run "checkpoints/last.ckpt" "" |> ignore
                Expect.equal (status run) Interrupted "a checkpoint: resume"
                write run completionMarker "{}" |> ignore
                Expect.equal (status run) Finished "marker"
                File.Delete(Path.Combine(run, completionMarker))
                write run testScoresName "{}" |> ignore
                Expect.equal (status run) Finished "test scores")

        testCase "runAll skips finished runs, resumes interrupted ones, marks successes and goes on after a failure" <| fun () ->
            withTemp (fun dir ->
                let command = """, "command": [ "{moe}", "train", "--config", "{config}", "--run-dir", "{run_dir}", "--name={name}", "{resume}" ]"""
                let plan = loadOk dir (smallGrid dir command)
                let runs = plan.Runs
                write runs[0].RunDir testScoresName "{}" |> ignore
                write runs[1].RunDir "checkpoints/last.ckpt" "" |> ignore
                let failing = runs[3].Hash
                let launcher, calls = recorder dir failing
                let out = new StringWriter()
                let outcomes = runAll { Launcher = launcher; Output = out; StopOnFailure = false } plan
                let recorded = recordedCalls calls
                Expect.equal recorded.Length 3 "runs 1, 2 and 3 ran; run 0 was finished"
                let callOf (r: Run) = recorded |> List.find (fun c -> List.contains r.RunDir c)
                Expect.equal (callOf runs[1])
                    [ "train"; "--config"; Path.GetFullPath(configPath plan.Spec runs[1]); "--run-dir"; runs[1].RunDir; "--name=" + runs[1].Name; "--resume" ]
                    "interrupted run resumes with its own config"
                Expect.isFalse (List.contains "--resume" (callOf runs[2])) "a new run starts from scratch"
                let written = JsonNode.Parse(File.ReadAllText(configPath plan.Spec runs[2]))
                Expect.equal (ConfigTree.canonical written) (ConfigTree.canonical runs[2].Config) "the config file is the run's resolved config"
                Expect.equal (outcomes |> List.map _.ExitCode) [ None; Some 0; Some 0; Some 3 ] "outcomes"
                Expect.isTrue (File.Exists(Path.Combine(runs[2].RunDir, completionMarker))) "success marked"
                Expect.isFalse (File.Exists(Path.Combine(runs[3].RunDir, completionMarker))) "failure not marked"
                Expect.stringContains (out.ToString()) ("fake training of " + runs[2].RunDir) "child output shown"
                Expect.stringContains (File.ReadAllText(Path.Combine(dir, "out", "logs", runs[2].Name + ".log"))) "fake training" "and logged"
                Expect.stringContains (out.ToString()) "failed with exit code 3" "failure reported"
                // A second sweep only retries the failure.
                File.Delete calls
                let again = runAll { Launcher = launcher; Output = new StringWriter(); StopOnFailure = true } plan
                Expect.equal (recordedCalls calls |> List.map (List.item 4)) [ runs[3].RunDir ] "only the failed run runs again"
                Expect.equal (again |> List.map _.ExitCode) [ None; None; None; Some 3 ] "finished runs skipped")

        testCase "the Slurm job array passes bash -n and task i runs run i's config, resuming or skipping as the folder says" <| fun () ->
            withTemp (fun dir ->
                let root = Path.Combine(dir, "repo")
                Directory.CreateDirectory root |> ignore
                let grid =
                    (smallGrid root "").Replace("\"name\": \"small\"", "\"name\": \"small\", \"slurm\": [\"--time=00:10:00\", \"--gres=gpu:1\"]")
                let plan = loadOk dir grid
                let files = emitSlurm plan (Path.Combine(root, "slurm")) root (Path.Combine(root, "moe"))
                let script = File.ReadAllText files.Script
                Expect.stringContains script "#SBATCH --array=0-3" "one task per run"
                Expect.stringContains script "#SBATCH --gres=gpu:1" "user options"
                Expect.stringContains script (sprintf "moe=${MOE:-'%s'}" (Path.Combine(root, "moe"))) "the launcher unless MOE says otherwise"
                let rc, out = bash dir [] [ "-n"; files.Script ]
                Expect.equal rc 0 (sprintf "bash -n: %s" out)
                let launcher, calls = recorder dir ""
                let env task = [ "SLURM_ARRAY_TASK_ID", string task; "MOE", launcher; "MOE_ROOT", root ]
                let rc, out = bash dir (env 1) [ files.Script ]
                Expect.equal rc 0 (sprintf "task 1: %s" out)
                match recordedCalls calls with
                | [ [ "train"; "--config"; config; "--run-dir"; runDir ] ] ->
                    let config = Path.Combine(root, config)
                    Expect.equal (Path.GetFullPath config) (Path.GetFullPath files.Configs[1]) "task 1 gets run 1's config"
                    Expect.equal (ConfigTree.canonical (JsonNode.Parse(File.ReadAllText config))) (ConfigTree.canonical plan.Runs[1].Config) "the resolved config"
                    Expect.equal (Path.GetFullPath(Path.Combine(root, runDir))) (Path.GetFullPath plan.Runs[1].RunDir) "run 1's folder"
                | other -> failtestf "expected one call without --resume, got %A" other
                Expect.equal (status plan.Runs[1].RunDir) Finished "the task marks its run complete"
                // Again: finished, nothing runs.
                File.Delete calls
                let rc, out = bash dir (env 1) [ files.Script ]
                Expect.equal rc 0 out
                Expect.stringContains out "is finished; nothing to do" "skipped"
                Expect.isEmpty (recordedCalls calls) "not run again"
                // An interrupted run resumes.
                write plan.Runs[2].RunDir "checkpoints/last.ckpt" "" |> ignore
                let rc, out = bash dir (env 2) [ files.Script ]
                Expect.equal rc 0 out
                Expect.equal (recordedCalls calls |> List.exactlyOne |> List.last) "--resume" "resumed"
                // A task id outside the array is an error.
                let rc, out = bash dir (env 4) [ files.Script ]
                Expect.equal rc 2 out
                Expect.stringContains out "task 4 is not a run of this sweep (0..3)" "says why"
                let rc, out = bash dir [ "MOE", launcher ] [ files.Script ]
                Expect.notEqual rc 0 "no task id"
                Expect.stringContains out "SLURM_ARRAY_TASK_ID" "names what is missing"
                let tsv = File.ReadAllLines files.RunList
                Expect.equal tsv.Length 5 "header and one line per run"
                Expect.stringStarts tsv[2] ("1\t" + plan.Runs[1].Name + "\t") "run list")

        testCase "a Slurm task forwards SIGUSR1 to the trainer and requeues itself, forwards SIGTERM without; the requeued task resumes" <| fun () ->
            withTemp (fun dir ->
                let root = Path.Combine(dir, "repo")
                Directory.CreateDirectory root |> ignore
                let plan = loadOk dir (smallGrid root "")
                let files = emitSlurm plan (Path.Combine(root, "slurm")) root (Path.Combine(root, "moe"))
                let script = File.ReadAllText files.Script
                for line in [ "#SBATCH --requeue"; "#SBATCH --open-mode=append"; sprintf "#SBATCH --signal=B:USR1@%d" warningSeconds
                              "trap 'forward USR1' USR1"; "trap 'forward TERM' TERM"; "scontrol requeue \"$SLURM_JOB_ID\"" ] do
                    Expect.stringContains script line (sprintf "the script has %s" line)
                // A stand-in trainer: records its arguments; a --resume call finishes, any other waits for a
                // signal, then writes a checkpoint and exits with 128 + the signal's number, as moe train does.
                let trainer =
                    write dir "trainer.sh" (String.concat "\n" [
                        "#!/usr/bin/env bash"
                        sprintf "echo \"$*\" >> '%s/calls'" dir
                        "run_dir=\"${@: -1}\""
                        "if [ \"$run_dir\" = --resume ]; then exit 0; fi"
                        "stop() { echo \"$1\" >> \"" + dir + "/signals\"; mkdir -p \"$run_dir/checkpoints\"; echo ckpt > \"$run_dir/checkpoints/last.ckpt\"; exit \"$2\"; }"
                        "trap 'stop USR1 138' USR1"
                        "trap 'stop TERM 143' TERM"
                        sprintf "touch '%s/started'" dir
                        "while :; do sleep 0.05; done" ])
                let bin = Path.Combine(dir, "bin")
                Directory.CreateDirectory bin |> ignore
                let scontrol = write bin "scontrol" (sprintf "#!/usr/bin/env bash\necho \"$*\" >> '%s/scontrol'\n" dir)
                for f in [ trainer; scontrol ] do File.SetUnixFileMode(f, File.GetUnixFileMode f ||| UnixFileMode.UserExecute)
                let lines (name: string) = let p = Path.Combine(dir, name) in if File.Exists p then File.ReadAllLines p |> List.ofArray else []
                let task (index: int) (signal: string option) =
                    File.Delete(Path.Combine(dir, "started"))
                    let psi = Diagnostics.ProcessStartInfo("bash", UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true)
                    psi.ArgumentList.Add files.Script
                    for k, v in [ "SLURM_ARRAY_TASK_ID", string index; "SLURM_JOB_ID", "4242"; "MOE", trainer; "MOE_ROOT", root
                                  "PATH", bin + ":" + Environment.GetEnvironmentVariable "PATH" ] do
                        psi.Environment[k] <- v
                    use p = Diagnostics.Process.Start psi
                    let out = p.StandardOutput.ReadToEndAsync()
                    let err = p.StandardError.ReadToEndAsync()
                    match signal with
                    | Some name ->
                        let clock = Diagnostics.Stopwatch.StartNew()
                        while not (File.Exists(Path.Combine(dir, "started"))) && clock.Elapsed.TotalSeconds < 30.0 do Threading.Thread.Sleep 10
                        let rc, o = bash dir [] [ "-c"; sprintf "kill -s %s %d" name p.Id ]
                        Expect.equal rc 0 o
                    | None -> ()
                    if not (p.WaitForExit 30_000) then (p.Kill true; failtest "the task did not exit")
                    p.ExitCode, out.Result + err.Result
                // The time-limit warning: forwarded, checkpointed, requeued, no completion marker.
                let rc, out = task 0 (Some "USR1")
                Expect.equal rc 0 (sprintf "a requeued task exits 0; output:\n%s" out)
                Expect.equal (lines "signals") [ "USR1" ] "the trainer got SIGUSR1"
                Expect.equal (lines "scontrol") [ "requeue 4242" ] "the task requeued itself"
                Expect.stringContains out "requeueing task 0" "and said so"
                Expect.equal (status plan.Runs[0].RunDir) Interrupted "interrupted, with its checkpoint"
                // The requeued task resumes by itself and completes.
                let rc, out = task 0 None
                Expect.equal rc 0 out
                Expect.equal (lines "calls" |> List.last |> fun c -> c.EndsWith "--resume") true "the second attempt resumes"
                Expect.equal (status plan.Runs[0].RunDir) Finished "and completes"
                // scancel: SIGTERM is forwarded, the task ends with the trainer's code and is not requeued.
                let rc, out = task 1 (Some "TERM")
                Expect.equal rc 143 (sprintf "exit code of the stopped trainer; output:\n%s" out)
                Expect.equal (lines "signals") [ "USR1"; "TERM" ] "the trainer got SIGTERM"
                Expect.equal (lines "scontrol") [ "requeue 4242" ] "no requeue after SIGTERM"
                Expect.equal (status plan.Runs[1].RunDir) Interrupted "resumable later")

        testCase "a config that names its run folder gets each run's name and runs_dir; the sweep alone sets them" <| fun () ->
            withTemp (fun dir ->
                let runs = Path.Combine(dir, "runs")
                let grid =
                    sprintf """{ "name": "job", "base": { "Name": "ignored", "Train": { "Steps": 30, "WarmupSteps": 3 } },
                                 "grid": { "Moe.Router.K": [1, 2] }, "seeds": [5], "runs_dir": "%s" }""" runs
                let plan =
                    match load jobSchema (write dir "job.json" grid) with
                    | Ok p -> p
                    | Error es -> failtestf "%A" es
                for r in plan.Runs do
                    Expect.equal (r.Config |> nodeAt "Name" |> fun n -> n.GetValue<string>()) r.Name "name field"
                    Expect.equal (r.Config |> nodeAt "RunsDir" |> fun n -> n.GetValue<string>()) runs "runs folder field"
                    Expect.equal (r.Config |> nodeAt "Train.Seed" |> num) 5.0 "the schema's seed field"
                    Expect.equal r.RunDir (Path.Combine(runs, r.Name)) "the folder the training command will write"
                    Expect.isOk (Json.readOver JobConfig.defaults r.Config) "the run's config file reads as the job config"
                Expect.equal plan.Spec.Command [ "{moe}"; "train"; "--config"; "{config}"; "{resume}" ] "no --run-dir needed"
                let other = grid.Replace("\"ignored\"", "\"also ignored\"").Replace(runs, Path.Combine(dir, "elsewhere"))
                match load jobSchema (write dir "job2.json" other) with
                | Ok p -> Expect.equal (p.Runs |> List.map _.Name) (plan.Runs |> List.map _.Name) "the base's Name and runs_dir do not change run names"
                | Error es -> failtestf "%A" es
                let varied = grid.Replace("\"Moe.Router.K\"", "\"Name\": [\"a\", \"b\"], \"Moe.Router.K\"")
                match load jobSchema (write dir "job3.json" varied) with
                | Error [ e ] -> Expect.stringStarts e "$.grid[\"Name\"]: Name is set by the sweep" "run folder fields cannot be varied"
                | other -> failtestf "expected one problem, got %A" other
                let noSeedField = Schema.ofRecord JobConfig.defaults JobConfig.validate
                match load noSeedField (write dir "job4.json" grid) with
                | Error [ e ] -> Expect.stringStarts e "$.seeds: this config has no default seed field" "seeds need a field"
                | other -> failtestf "expected one problem, got %A" other)

        testCase "the summarizer's config: its paths, union values and run folder, checked before anything runs" <| fun () ->
            withTemp (fun dir ->
                let grid =
                    """{ "name": "sum", "base": { "Train": { "Steps": 20, "WarmupSteps": 2 } },
                         "variants": [ { "name": "dense", "set": {} },
                                       { "name": "hash", "set": { "Model.Ffn": { "Moe": { "ModelDim": 64, "ExpertHidden": 128, "Activation": "GELU",
                                           "SharedExperts": 0, "Router": { "Experts": 4, "K": 1, "Scorer": "LinearRouter", "Normaliser": "Softmax",
                                           "Selection": { "Hash": "BalancedHash" }, "Capacity": "Dropless", "MinCapacity": 4, "Jitter": 0.0,
                                           "BiasUpdateRate": null } } } } } ],
                         "grid": { "Train.LossWeights.SwitchAux": [ 0.0, 0.01 ] }, "seeds": [ 3 ] }"""
                match load Schema.summarizerSchema (write dir "sum.json" grid) with
                | Ok plan ->
                    Expect.equal plan.Runs.Length 4 "2 variants x 2 weights x 1 seed"
                    for r in plan.Runs do
                        match Json.readOver Summarizer.SummarizerConfig.defaults r.Config with
                        | Ok cfg ->
                            Expect.equal cfg.Name r.Name "the run writes the folder the sweep reads"
                            Expect.equal (Path.Combine(cfg.RunsDir, cfg.Name)) r.RunDir "run folder"
                            Expect.equal cfg.Train.Seed 3 "seed"
                            Expect.isEmpty (Summarizer.SummarizerConfig.validate cfg) "valid"
                        | Error es -> failtestf "the run's config does not read as a SummarizerConfig: %A" es
                | Error es -> failtestf "expected a valid grid, got %A" es
                let bad =
                    grid.Replace("\"Hash\": \"BalancedHash\"", "\"Hash\": \"Balanced\"")
                        .Replace("Train.LossWeights.SwitchAux", "Train.LossWeight.SwitchAux")
                match load Schema.summarizerSchema (write dir "bad.json" bad) with
                | Error es ->
                    Expect.equal es.Length 2 (String.concat "\n" es)
                    Expect.stringStarts es[1] "$.variants[1].set[\"Model.Ffn\"].Moe.Router.Selection.Hash: expected one of RandomHash|BalancedHash" "union value"
                    Expect.stringStarts es[0] "$.grid[\"Train.LossWeight.SwitchAux\"]: Train: unknown field 'LossWeight' in TrainConfig" "path"
                | Ok _ -> failtest "expected the grid to be rejected")

        testCase "the combined report page covers the runs that have files, or says why it is missing" <| fun () ->
            withTemp (fun dir ->
                let plan = loadOk dir (smallGrid dir "")
                Expect.equal (writeReport plan) "Combined report page: not written; no run folder has logs or scores yet." "nothing yet"
                let r0 = plan.Runs[0]
                write r0.RunDir "metrics.jsonl"
                    (String.concat "\n"
                        [ """{"step": 10, "split": "train", "loss": 3.0, "task_loss": 2.9, "tokens_per_s": 1000.0}"""
                          """{"step": 10, "split": "valid", "loss": 3.5}""" ]) |> ignore
                write r0.RunDir "routing.jsonl"
                    """{"step": 10, "layer": "enc.0", "tokens_per_expert": [0.5, 0.5], "dropped_fraction": 0.0, "router_entropy": 0.6}""" |> ignore
                let note = writeReport plan
                Expect.equal note "Combined report page: [report.html](report.html) (1 of 4 runs; `./moe report` with the same folders redraws it)." "written"
                let page = File.ReadAllText(reportPath plan.Spec)
                Expect.stringContains page "Sweep small" "titled by the sweep"
                Expect.stringContains page r0.Name "the run is on the page"
                write plan.Runs[1].RunDir "metrics.jsonl" "not json\n" |> ignore
                let broken = writeReport plan
                Expect.stringStarts broken "Combined report page: not written; a run file is malformed: " "why"
                Expect.stringContains broken "metrics.jsonl" "which file")

        testCase "collect builds results.csv and results.md from run folders, with intervals, load CV and notes" <| fun () ->
            withTemp (fun dir ->
                let plan = loadOk dir (smallGrid dir "")
                let r0, r1 = plan.Runs[0], plan.Runs[1]
                write r0.RunDir "metrics.jsonl"
                    (String.concat "\n"
                        [ """{"step": 10, "split": "train", "loss": 3.0, "task_loss": 2.9, "tokens_per_s": 1000.0}"""
                          """{"step": 10, "split": "valid", "loss": 3.5}"""
                          """{"step": 20, "split": "train", "loss": 2.0, "task_loss": 1.9, "tokens_per_s": 3000.0}"""
                          """{"step": 20, "split": "valid", "loss": 3.25}"""
                          """{"step": 30, "split": "valid", "loss": 3.375}"""
                          "" ]) |> ignore
                write r0.RunDir "routing.jsonl"
                    (String.concat "\n"
                        [ """{"step": 10, "layer": "enc.0", "tokens_per_expert": [1.0, 0.0, 0.0, 0.0], "dropped_fraction": 0.5}"""
                          """{"step": 20, "layer": "enc.0", "tokens_per_expert": [0.5, 0.25, 0.25, 0.0], "dropped_fraction": 0.1}"""
                          """{"step": 20, "layer": "dec.0", "tokens_per_expert": [0.25, 0.25, 0.25, 0.25], "dropped_fraction": 0.0}""" ]) |> ignore
                write r0.RunDir testScoresName
                    """{"model": {"n": 50, "rouge1": {"precision": 0.4, "recall": 0.3, "f1": 0.34}, "rouge2": {"f1": 0.12}, "bleu": 7.5},
                        "lead1": {"n": 50, "rouge1": {"f1": 0.2}},
                        "model_ci": {"rouge1": {"low": 0.31, "mid": 0.34, "high": 0.37}, "bleu": {"low": 6.0, "mid": 7.5, "high": 9.0}}}""" |> ignore
                Train.RunFiles.writeParameters r0.RunDir { Total = 1234567L; Active = 456789L; Trainable = 1234567L }
                write r1.RunDir "metrics.jsonl" "{\"step\": 5, \"split\": \"train\", \"tokens_per_s\": 10.0}\nnot json\n" |> ignore
                write r1.RunDir "parameters.json" """{"total": 2000, "active": 1000}""" |> ignore
                let rows = collect plan
                let row0 = rows[0]
                Expect.equal row0.Status Finished "test scores present"
                Expect.equal row0.Steps (Some 30) "last step"
                Expect.equal row0.ValidLoss (Some 3.375) "last validation loss"
                Expect.equal row0.BestValidLoss (Some 3.25) "best validation loss"
                Expect.equal row0.TokensPerSecond (Some 2000.0) "mean tokens/s"
                // last step 20: enc.0 [0.5, 0.25, 0.25, 0] has mean 0.25 and std sqrt(0.125 / 4); dec.0 is uniform (CV 0)
                Expect.floatClose Accuracy.veryHigh row0.LoadCv.Value (sqrt (0.125 / 4.0) / 0.25 / 2.0) "load CV averaged over layers"
                Expect.floatClose Accuracy.veryHigh row0.DroppedFraction.Value 0.05 "dropped fraction at the last step"
                Expect.equal (row0.Test |> List.map fst) [ "rouge1"; "rouge2"; "bleu" ] "model metrics, n left out"
                Expect.equal (row0.Test |> List.find (fst >> (=) "rouge1") |> snd) { Value = 0.34; Low = Some 0.31; High = Some 0.37 } "F1 with interval"
                Expect.equal (row0.Test |> List.find (fst >> (=) "rouge2") |> snd) { Value = 0.12; Low = None; High = None } "no interval stored"
                Expect.equal (row0.ParametersTotal, row0.ParametersActive) (Some 1234567L, Some 456789L) "parameters.json"
                Expect.equal (rows[1].ParametersTotal, rows[1].ParametersActive) (None, None) "malformed parameters.json: no counts"
                Expect.equal rows[1].Notes.Length 2 "two problems noted"
                Expect.equal rows[1].Notes[0] "metrics.jsonl line 2: not a JSON object" "malformed line noted, not guessed"
                Expect.stringContains rows[1].Notes[1] "parameters.json: expected a number \"trainable\"" "missing count noted by name"
                Expect.equal rows[2].Status NotStarted "missing run"
                let csvPath, mdPath = writeResults plan rows "report note"
                let csv = File.ReadAllLines csvPath
                Expect.equal csv[0]
                    "index,run,status,train.Schedule,train.LossWeights.SwitchAux,steps,valid_loss,best_valid_loss,rouge1,rouge1_low,rouge1_high,rouge2,rouge2_low,rouge2_high,bleu,bleu_low,bleu_high,load_cv,dropped_fraction,tokens_per_s,params_total,params_active,notes"
                    "CSV header"
                Expect.stringStarts csv[1] (sprintf "0,%s,finished,Cosine,0,30,3.375,3.25,0.34,0.31,0.37,0.12,,,7.5,6,9," r0.Name) "CSV row with exact numbers"
                Expect.stringEnds csv[1] ",0.05,2000,1234567,456789," "CSV tail"
                Expect.stringStarts csv[3] (sprintf "2,%s,not started,Constant,0,,,," plan.Runs[2].Name) "empty fields for a missing run"
                Expect.equal csv.Length 5 "header and 4 rows"
                let md = File.ReadAllText mdPath
                Expect.stringContains md "| 0 | finished | Cosine | 0 | 3.375 (3.25) | 0.34 [0.31, 0.37] | 0.12 | 7.5 [6, 9] | 0.3536 | 0.05 | 2000 | 1.23M (456.8k) |" "MD row"
                Expect.stringContains md "metrics.jsonl line 2: not a JSON object" "notes listed"
                Expect.stringContains md "1 finished, 1 started, 2 not started" "status count"
                Expect.stringEnds (md.TrimEnd()) "report note" "report note")

        testCase "a grid path steps into the union case the base holds; each run's config file reads back as the trainer reads it" <| fun () ->
            withTemp (fun dir ->
                let router = { Config.RouterConfig.defaults with Experts = 4; Capacity = Config.Factor 1.25 }
                let grid =
                    summarizerGrid (moeFfn router)
                        """ "grid": { "Model.Ffn.Moe.Router.K": [1, 2], "Model.Ffn.Moe.Router.Capacity.Factor": [1.0, 2.0],
                                      "Model.Ffn.Moe.Router.Selection.TokenChoiceTopK.renormalise": [true, false] } """
                match load Schema.summarizerSchema (write dir "cases.json" grid) with
                | Error es -> failtestf "expected a valid grid, got:\n%s" (String.concat "\n" es)
                | Ok plan ->
                    Expect.equal plan.Runs.Length 8 "2 K x 2 factors x 2 renormalise"
                    let files = writeConfigs plan (Path.Combine(dir, "configs"))
                    for r, file in List.zip plan.Runs files do
                        // mixed-radix digits of the index, the first grid key slowest
                        let k, factor, renormalise = [| 1; 2 |].[r.Index / 4], [| 1.0; 2.0 |].[(r.Index / 2) % 2], [| true; false |].[r.Index % 2]
                        let written = JsonNode.Parse(File.ReadAllText file)
                        Expect.equal (written |> nodeAt "Model.Ffn.Moe.Router.K" |> num) (float k) "K inside the Moe case"
                        Expect.floatClose Accuracy.veryHigh (written |> nodeAt "Model.Ffn.Moe.Router.Capacity.Factor" |> num) factor "inside the Factor case"
                        // What `moe train --config FILE` does with the file.
                        match Summarizer.SummarizerConfig.load Summarizer.SummarizerConfig.defaults (Some file) [] with
                        | Ok cfg ->
                            match cfg.Model.Ffn with
                            | Models.Moe m ->
                                Expect.equal m.Router.K k "K"
                                match m.Router.Capacity with
                                | Config.Factor f -> Expect.floatClose Accuracy.veryHigh f factor "capacity factor"
                                | other -> failtestf "expected a capacity factor, got %A" other
                                Expect.equal m.Router.Selection (Config.TokenChoiceTopK(Config.NormaliseThenTopK, renormalise)) "selection"
                                Expect.equal m.Router.Experts 4 "the case's other fields come from the base"
                            | other -> failtestf "expected the Moe case, got %A" other
                        | Error es -> failtestf "the trainer's reader rejects %s: %A" file es)

        testCase "a path into a union case the base does not hold is rejected, naming the path, the case it needs and the case the base holds" <| fun () ->
            withTemp (fun dir ->
                let problemsFor (name: string) (grid: string) =
                    match load Schema.summarizerSchema (write dir name grid) with
                    | Error es -> es
                    | Ok plan -> failtestf "expected %s to be rejected, but it expanded into %d runs" name plan.Runs.Length
                let dense = problemsFor "dense.json" (summarizerGrid """{ "Dense": 256 }""" """ "grid": { "Model.Ffn.Moe.Router.K": [1, 2] } """)
                Expect.equal dense
                    [ "$.grid[\"Model.Ffn.Moe.Router.K\"]: Model.Ffn.Moe.Router.K steps into case Moe of Model.Ffn, but the base config holds Dense there; a path into a case changes the case the base holds (to choose the case, give Model.Ffn a whole value)" ]
                    "one problem, before anything runs"
                let unset = problemsFor "unset.json" """{ "name": "unset", "variants": [ { "name": "k1", "set": { "Model.Ffn.Moe.Router.K": 1 } } ] }"""
                Expect.stringStarts (List.exactlyOne unset)
                    "$.variants[0].set[\"Model.Ffn.Moe.Router.K\"]: Model.Ffn.Moe.Router.K steps into case Moe of Model.Ffn, but the base config does not set Model.Ffn;"
                    "a variant's path, and a base without the union"
                let dropless =
                    problemsFor "dropless.json"
                        (summarizerGrid (moeFfn Config.RouterConfig.defaults) """ "grid": { "Model.Ffn.Moe.Router.Capacity.Factor": [1.0, 2.0] } """)
                Expect.stringStarts (List.exactlyOne dropless)
                    "$.grid[\"Model.Ffn.Moe.Router.Capacity.Factor\"]: Model.Ffn.Moe.Router.Capacity.Factor steps into case Factor of Model.Ffn.Moe.Router.Capacity, but the base config holds Dropless there;"
                    "a case inside a case")

        testCase "an unknown case, or an unknown field under a case, is rejected with the names there are" <| fun () ->
            withTemp (fun dir ->
                let grid =
                    summarizerGrid (moeFfn Config.RouterConfig.defaults)
                        """ "grid": { "Model.Ffn.Moe.Routr.K": [1], "Model.Ffn.Mixture.Router.K": [1], "Model.Ffn.moe.Router.K": [1],
                                      "Model.Ffn.Moe.Router.Selection.TokenChoiceTopK.renorm": [true],
                                      "Model.Ffn.Moe.Router.Selection.SwitchTop1.K": [1] } """
                match load Schema.summarizerSchema (write dir "unknown.json" grid) with
                | Ok _ -> failtest "expected the grid to be rejected"
                | Error es ->
                    Expect.equal es
                        [ "$.grid[\"Model.Ffn.Moe.Routr.K\"]: Model.Ffn.Moe: unknown field 'Routr' in MoeConfig; expected one of ModelDim, ExpertHidden, Activation, Router, SharedExperts"
                          "$.grid[\"Model.Ffn.Mixture.Router.K\"]: Model.Ffn: unknown case 'Mixture' in FfnKind; expected one of Dense, Moe, LoraMoe"
                          "$.grid[\"Model.Ffn.moe.Router.K\"]: Model.Ffn: unknown case 'moe' in FfnKind (did you mean 'Moe'? names are case-sensitive); expected one of Dense, Moe, LoraMoe"
                          "$.grid[\"Model.Ffn.Moe.Router.Selection.TokenChoiceTopK.renorm\"]: Model.Ffn.Moe.Router.Selection.TokenChoiceTopK: unknown field 'renorm' in case TokenChoiceTopK; expected one of order, renormalise"
                          "$.grid[\"Model.Ffn.Moe.Router.Selection.SwitchTop1.K\"]: Model.Ffn.Moe.Router.Selection.SwitchTop1: case SwitchTop1 of Selection has no fields; give Model.Ffn.Moe.Router.Selection the value \"SwitchTop1\"" ]
                        "one problem per path, naming the fields or cases there are")

        testCase "the example grids in examples/sweeps parse, expand and pass every check, with their run counts" <| fun () ->
            let folder = Path.Combine(Support.repoRoot, "examples", "sweeps")
            let expected =
                [ "balance-ablation.json", 8   // 2 variants (top-2, top-1) x 2 SwitchAux x 2 ZLoss
                  "routers-k.json", 8          // 4 router variants x 2 K
                  "capacity.json", 8 ]         // 4 capacities x 2 K
            let grids = Directory.GetFiles(folder, "*.json") |> Array.map Path.GetFileName |> Array.filter ((<>) "quick-moe.json")
            Expect.equal (Array.sort grids |> List.ofArray) (expected |> List.map fst |> List.sort) "every example grid is counted here (quick-moe.json is their base)"
            for file, runs in expected do
                // What `./moe sweep FILE --dry-run` does: load (parse, expand, check every run's config), then list.
                match load Schema.summarizerSchema (Path.Combine(folder, file)) with
                | Ok plan ->
                    Expect.equal plan.Runs.Length runs (sprintf "%s: runs" file)
                    Expect.stringStarts (describePlan plan) (sprintf "sweep %s: %d runs" plan.Spec.Name runs) (sprintf "%s: listing" file)
                | Error es -> failtestf "%s is rejected:\n%s" file (String.concat "\n" es)
    ]
