/// Fault injection on real processes: `./moe train` stopped by SIGTERM, SIGUSR1 and SIGINT, killed with
/// SIGKILL at a random step, resumed (the loss curve equals the uninterrupted one); a second process on the
/// same run folder and a rerun without flags refused; the Slurm script's signal forwarding and requeue run
/// with bash against a stand-in trainer and `scontrol`.
module Moe.Tests.ReliabilityTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json.Nodes
open System.Threading
open Expecto
open Moe
open Moe.Tests.Support

let private launcher = Path.Combine(repoRoot, "moe")

/// A summarization run small enough to train in a few seconds: 30 steps, one thread, a step-5 checkpoint
/// cadence, every step logged.
let private tiny =
    [ for a in [ "Source.Synthetic.TrainSize=200"; "Source.Synthetic.ValidSize=16"; "Source.Synthetic.TestSize=8"
                 "Source.Synthetic.MinWords=20"; "Source.Synthetic.MaxWords=40"; "Source.Synthetic.MinSentences=4"
                 "Source.Synthetic.MaxSentences=5"; "Batching.BatchSize=8"; "Model.ModelDim=16"; "Model.Ffn.Moe.ModelDim=16"
                 "Model.Ffn.Moe.ExpertHidden=32"; "Model.Heads=2"; "Model.KvHeads=2"; "Model.EncoderLayers=1"
                 "Model.DecoderLayers=1"; "Train.Steps=30"; "Train.LogEvery=1"; "Train.EvalEvery=10"
                 "Train.CheckpointEvery=5"; "Train.WarmupSteps=5"; "Generate.MaxLength=8"; "BootstrapSamples=10" ] do
        yield "--set"
        yield a
      yield! [ "--device"; "cpu"; "--threads"; "1"; "--plain" ] ]

/// A fresh runs folder under the temp directory, deleted afterwards.
let private withRuns (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), "moe-reliability-tests", Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    try body dir
    finally (try Directory.Delete(dir, true) with _ -> ())

/// `./moe train` of the tiny run `name` under `runs`, with `extra` flags, started in the background; the
/// launcher execs dotnet, so the process id is the trainer's. SIGINT's disposition is reset to the default
/// first (coreutils `env --default-signal`): a test run started as a background job of a non-interactive
/// shell inherits SIGINT ignored, and .NET leaves a signal ignored at start-up ignored.
let private startTrain (runs: string) (name: string) (extra: string list) : Process =
    let psi = ProcessStartInfo("env", UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = repoRoot)
    for a in [ "--default-signal=INT"; "bash"; launcher; "train" ] @ tiny @ [ "--runs-dir"; runs; "--name"; name ] @ extra do psi.ArgumentList.Add a
    Process.Start psi

/// Waits for `p` to exit; its exit code and output (stdout then stderr).
let private finish (p: Process) : int * string =
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    if not (p.WaitForExit 180_000) then
        p.Kill true
        failtest "moe train did not exit within 180 s"
    p.ExitCode, out.Result + err.Result

/// Runs the tiny training to its end.
let private train (runs: string) (name: string) (extra: string list) : int * string = finish (startTrain runs name extra)

let private metricsPath (runs: string) (name: string) = Path.Combine(runs, name, Train.RunFiles.metricsName)

/// (step, loss) of every train line of the run's metrics.jsonl.
let private trainLosses (runs: string) (name: string) : (int * float)[] =
    File.ReadAllLines(metricsPath runs name)
    |> Array.filter (String.IsNullOrWhiteSpace >> not)
    |> Array.map JsonNode.Parse
    |> Array.filter (fun n -> n["split"].GetValue<string>() = "train")
    |> Array.map (fun n -> n["step"].GetValue<int>(), n["loss"].GetValue<float>())

/// Train lines logged so far (0 while the file is absent or being opened).
let private stepsLogged (runs: string) (name: string) : int =
    try
        use fs = new FileStream(metricsPath runs name, FileMode.Open, FileAccess.Read, FileShare.ReadWrite ||| FileShare.Delete)
        use r = new StreamReader(fs)
        r.ReadToEnd().Split('\n') |> Array.filter (fun l -> l.Contains "\"split\":\"train\"") |> Array.length
    with :? IOException -> 0

/// Waits until the running trainer has logged `steps` steps (or has exited).
let private waitForStep (p: Process) (runs: string) (name: string) (steps: int) =
    let clock = Stopwatch.StartNew()
    while stepsLogged runs name < steps && not p.HasExited && clock.Elapsed.TotalSeconds < 180.0 do
        Thread.Sleep 10
    Expect.isFalse p.HasExited (sprintf "the trainer was still running at step %d" steps)

let private signal (name: string) (pid: int) =
    let code, output = bash repoRoot [] [ "-c"; sprintf "kill -s %s %d" name pid ]
    Expect.equal code 0 (sprintf "kill -s %s %d: %s" name pid output)

/// Float32 losses repeat exactly on one thread; this allows for the last bit.
let private curveTol = { absolute = Tol.f32; relative = Tol.f32 }

let private expectSameCurve (reference: (int * float)[]) (resumed: (int * float)[]) (what: string) =
    Expect.equal (Array.map fst resumed) (Array.map fst reference) (sprintf "%s: every step logged once" what)
    for (s, x), (_, y) in Array.zip reference resumed do
        Expect.floatClose curveTol y x (sprintf "%s: train loss at step %d" what s)

/// The uninterrupted tiny run, trained once for the tests that compare against it.
let private reference =
    lazy (
        let runs = Path.Combine(Path.GetTempPath(), "moe-reliability-tests", "reference-" + Guid.NewGuid().ToString("N"))
        let code, output = train runs "whole" []
        Expect.equal code 0 (sprintf "the reference run finishes; output:\n%s" output)
        let curve = trainLosses runs "whole"
        (try Directory.Delete(runs, true) with _ -> ())
        curve)

/// A stop signal at step `at`, then `--resume`: the documented exit code, a checkpoint at the stop, and the
/// uninterrupted loss curve.
let private signalThenResume (sig': string) (exitCode: int) (at: int) =
    withRuns (fun runs ->
        let p = startTrain runs "run" []
        waitForStep p runs "run" at
        signal sig' p.Id
        let code, output = finish p
        Expect.equal code exitCode (sprintf "exit code after SIG%s; output:\n%s" sig' output)
        Expect.stringContains output (sprintf "SIG%s: stopping after this step with a checkpoint" sig') "says what it does"
        let stopped = (Train.Checkpoint.readMeta (Train.Checkpoint.last (Path.Combine(runs, "run")))).State
        Expect.equal stopped.Stopped (Some Train.Cancelled) "the checkpoint records the stop"
        Expect.isGreaterThanOrEqual stopped.Step at "checkpoint at or after the signal's step"
        Expect.isLessThan stopped.Step 30 "before the end"
        let code, output = train runs "run" [ "--resume" ]
        Expect.equal code 0 (sprintf "the resumed run finishes; output:\n%s" output)
        Expect.stringContains output (sprintf "resumed at step %d" stopped.Step) "from the stop"
        expectSameCurve reference.Value (trainLosses runs "run") (sprintf "SIG%s at step %d" sig' at))


// ---------------------------------------------------------------- TorchSharp scalars

/// Reads method bodies for the calls they make (call, callvirt, newobj), resolving tokens in the method's module.
module private IlCalls =
    open System.Reflection

    let private flags = BindingFlags.Instance ||| BindingFlags.Static ||| BindingFlags.Public ||| BindingFlags.NonPublic ||| BindingFlags.DeclaredOnly

    /// Each call, callvirt or newobj in `m`'s body: the method called and whether the next instruction stores its
    /// result (stloc, stfld, stsfld, after a dup) or returns it.
    let private calls (m: MethodBase) : (MethodBase * bool) list =
        let body = try m.GetMethodBody() with _ -> null
        if isNull body then []
        else
            let il = body.GetILAsByteArray()
            let typeArgs = if m.DeclaringType.IsGenericType then m.DeclaringType.GetGenericArguments() else null
            let methodArgs = if m.IsGenericMethod then m.GetGenericArguments() else null
            let rec stores (j: int) =
                j >= il.Length
                || (il[j] = 0x25uy && stores (j + 1))
                || (il[j] >= 0x0Auy && il[j] <= 0x0Duy) || il[j] = 0x13uy || il[j] = 0x7Duy || il[j] = 0x80uy || il[j] = 0x2Auy
                || (il[j] = 0xFEuy && j + 1 < il.Length && il[j + 1] = 0x0Euy)
            // Opcode bytes of call, callvirt and newobj, each followed by a 4-byte method token; a byte that merely
            // looks like one resolves to nothing or to an unrelated method, which can only add callees.
            [ for i in 0 .. il.Length - 5 do
                if il[i] = 0x28uy || il[i] = 0x6Fuy || il[i] = 0x73uy then
                    match (try m.Module.ResolveMethod(BitConverter.ToInt32(il, i + 1), typeArgs, methodArgs) with _ -> null) with
                    | null -> ()
                    | c -> yield c, stores (i + 5) ]

    /// The methods `m` calls.
    let callees (m: MethodBase) : MethodBase list = calls m |> List.map fst

    /// The methods `m` calls whose result goes straight on as an argument (not stored, not returned).
    let unboundCallees (m: MethodBase) : MethodBase list = calls m |> List.filter (snd >> not) |> List.map fst

    /// Every method and constructor declared in `a`.
    let methodsOf (a: Assembly) : MethodBase list =
        let types = try a.GetTypes() with :? ReflectionTypeLoadException as e -> e.Types |> Array.filter (isNull >> not)
        [ for t in types do
            for m in t.GetMethods flags do yield m :> MethodBase
            for c in t.GetConstructors flags do yield c :> MethodBase ]

/// Scalar's implicit conversion from a .NET number: the Scalar made on the fly that a finalizer may free mid-call.
let private isImplicitScalar (m: Reflection.MethodBase) = m.DeclaringType = typeof<TorchSharp.Scalar> && m.Name = "op_Implicit"

/// `value.ToScalar()`: safe when bound (`use s = v.ToScalar()`), made on the fly when passed straight to a call.
let private isExplicitScalar (m: Reflection.MethodBase) = m.Name = "ToScalar" && m.DeclaringType.Assembly = typeof<TorchSharp.Scalar>.Assembly

/// TorchSharp methods that make a Scalar on the fly, directly or through one TorchSharp call that does
/// (`a + b` is `add(b, 1)`; `arange(n)` converts n).
let private scalarMakers =
    lazy (
        let methods = IlCalls.methodsOf typeof<TorchSharp.Scalar>.Assembly
        let direct = Collections.Generic.HashSet<Reflection.MethodBase>(methods |> List.filter (IlCalls.callees >> List.exists isImplicitScalar))
        let viaOne = methods |> List.filter (fun m -> not (direct.Contains m) && IlCalls.callees m |> List.exists direct.Contains)
        Collections.Generic.HashSet<Reflection.MethodBase>(Seq.append direct viaOne))

/// A TorchSharp optimizer made by `caller`: its `step` makes Scalars on the fly (AdamW's `mul_(beta1)`, ...) in a
/// lambda the call scan does not follow, so making one counts as making them; `SafeAdamW` calling its base
/// constructor does not.
let private makesTorchSharpOptimizer (caller: Reflection.MethodBase) (c: Reflection.MethodBase) =
    let optimizer (t: Type) = typeof<TorchSharp.Modules.OptimizerHelper>.IsAssignableFrom t
    c.DeclaringType.Assembly = typeof<TorchSharp.Scalar>.Assembly
    && (match c with
        | :? Reflection.ConstructorInfo -> optimizer c.DeclaringType && not (caller.DeclaringType.IsSubclassOf c.DeclaringType)
        | :? Reflection.MethodInfo as mi -> c.DeclaringType = typeof<TorchSharp.torch.optim> && optimizer mi.ReturnType
        | _ -> false)

/// The one function allowed to use TorchSharp's own AdamW: the reference `SafeAdamW` is checked against.
let private referenceName = "torchSharpAdamWSteps"

/// "Type.method calls X, Y" for every method of `a` that makes a Scalar on the fly.
let private scalarOffenders (a: Reflection.Assembly) : string list =
    let makers = scalarMakers.Value
    [ for m in IlCalls.methodsOf a do
      if not (m.Name = referenceName || m.DeclaringType.Name.StartsWith referenceName) then
        let unbound = IlCalls.unboundCallees m |> List.filter isExplicitScalar
        let bad =
            IlCalls.callees m
            |> List.filter (fun c -> isImplicitScalar c || makers.Contains c || makesTorchSharpOptimizer m c)
            |> List.append unbound
            |> List.map (fun c -> sprintf "%s.%s" c.DeclaringType.Name c.Name)
            |> List.distinct
        if not bad.IsEmpty then sprintf "%s.%s calls %s" m.DeclaringType.FullName m.Name (String.concat ", " bad) ]

/// The schedule both AdamWs run in the comparison: two groups, decay, warmup.
let private adamWConfig = { Train.TrainConfig.defaults with LearningRate = 1e-2; WeightDecay = 0.1; Beta2 = 0.95; Steps = 20; WarmupSteps = 5 }

/// `adamWConfig.Steps` steps of mean(y^2) on inputs from a generator seeded 11 (the same for every call), with the
/// learning-rate schedule set on `opt`'s groups before each `step ()`.
let private adamWSteps (m: TorchSharp.Modules.Linear) (opt: TorchSharp.Modules.OptimizerHelper) (step: unit -> unit) =
    let g = new TorchSharp.torch.Generator(11UL)
    for i in 0 .. adamWConfig.Steps - 1 do
        use x = TorchSharp.torch.randn([| 8L; 6L |], generator = g)
        for group in opt.ParamGroups do group.LearningRate <- Train.LearningRate.learningRate adamWConfig i
        opt.zero_grad ()
        use y = m.forward x
        use loss = (Tensors.square y).mean ()
        loss.backward ()
        step ()

/// TorchSharp's own AdamW over `m` in `makeOptimizer`'s two groups, stepped as `adamWSteps` does: the reference for
/// `SafeAdamW`. Its `step` makes Scalars on the fly, so it runs with the --gc-stress collector held off (the test
/// is sequenced, so no other test thread allocates meanwhile).
let private torchSharpAdamWSteps (m: TorchSharp.Modules.Linear) =
    let cfg = adamWConfig
    let decay, noDecay = m.parameters () |> Seq.toArray |> Array.partition (fun p -> p.Dimensions >= 2L)
    let groups =
        [| TorchSharp.Modules.AdamW.ParamGroup(decay, cfg.LearningRate, cfg.Beta1, cfg.Beta2, cfg.Eps, cfg.WeightDecay, false, false)
           TorchSharp.Modules.AdamW.ParamGroup(noDecay, cfg.LearningRate, cfg.Beta1, cfg.Beta2, cfg.Eps, 0.0, false, false) |]
    use theirs = TorchSharp.torch.optim.AdamW(groups, cfg.LearningRate, cfg.Beta1, cfg.Beta2, cfg.Eps, cfg.WeightDecay, false, false)
    adamWSteps m theirs (fun () -> GcStress.withoutCollections (fun () -> theirs.step () |> ignore))

let scalarTests =
    testList "scalars" [
        testCase "the library makes no TorchSharp Scalar on the fly: an IL scan of Moe.dll" <| fun () ->
            Expect.isGreaterThan scalarMakers.Value.Count 50 "the scan finds TorchSharp's scalar-making methods (Tensor.add, torch.arange, ...)"
            let offenders = scalarOffenders typeof<Routing.Routing>.Assembly
            Expect.isEmpty offenders
                (sprintf "keep Scalars alive (Tensors.withScalar, plus, arange, mulScalar, ...) instead of implicit conversions or TorchSharp calls that make them:\n  %s"
                     (String.concat "\n  " offenders))

        // The tests run in parallel (and beside --gc-stress's collector), so their own code is exposed to the race
        // too: a --gc-stress run failed in a test's direct use of TorchSharp's AdamW ("Unknown scalar type" in div).
        testCase "the tests make no TorchSharp Scalar on the fly either: an IL scan of Moe.Tests.dll" <| fun () ->
            let offenders = scalarOffenders (Reflection.Assembly.GetExecutingAssembly())
            Expect.isEmpty offenders
                (sprintf "%d test methods make Scalars on the fly; keep them alive (Tensors.withScalar, plus, minus, ...):\n  %s"
                     offenders.Length (String.concat "\n  " offenders))

        testCase "training uses the toolkit's AdamW, whose step keeps its scalars alive, not TorchSharp's" <| fun () ->
            use model = TorchSharp.torch.nn.Linear(3L, 2L)
            use optimizer = Train.Loop.makeOptimizer Train.TrainConfig.defaults model
            Expect.equal (optimizer.GetType()) typeof<Train.SafeAdamW> "makeOptimizer's optimizer"
            let step = typeof<Train.SafeAdamW>.GetMethod("step")
            Expect.equal step.DeclaringType typeof<Train.SafeAdamW> "step is the toolkit's override"

        testCase "the toolkit's AdamW updates equal TorchSharp's over 20 steps with two groups, decay and warmup" <| fun () ->
            let build () =
                Native.seedAll 3
                TorchSharp.torch.nn.Linear(6L, 4L)
            use a = build ()
            use b = build ()
            use ours = Train.Loop.makeOptimizer adamWConfig a
            adamWSteps a ours (fun () -> ours.step () |> ignore)
            torchSharpAdamWSteps b
            let flat (m: TorchSharp.torch.nn.Module) = m.parameters () |> Seq.collect Tensors.toFloats |> Array.ofSeq
            let pa, pb = flat a, flat b
            Expect.isGreaterThan (Array.map2 (fun (x: float32) y -> abs (x - y)) pa (flat (build ())) |> Array.max) 1e-3f "the weights moved"
            let worst = Array.map2 (fun (x: float32) y -> abs (x - y)) pa pb |> Array.max
            Expect.isLessThan (float worst) 1e-6 (sprintf "largest difference from TorchSharp's AdamW after %d steps: %g" adamWConfig.Steps worst)
    ]

let tests =
    testSequenced <| testList "Reliability" [
        testCase "SIGTERM mid-run: checkpoint at the next step, exit 143, --resume gives the uninterrupted curve" <| fun () ->
            signalThenResume "TERM" 143 8

        testCase "SIGUSR1 mid-run: checkpoint at the next step, exit 138, --resume gives the uninterrupted curve" <| fun () ->
            signalThenResume "USR1" 138 13

        testCase "SIGINT mid-run: checkpoint at the next step, exit 130, --resume gives the uninterrupted curve" <| fun () ->
            signalThenResume "INT" 130 21

        testCase "kill -9 at a random step after the first checkpoint, then --resume: the uninterrupted curve" <| fun () ->
            // Before step 5 there is no checkpoint to resume (--resume refuses; the run starts over with --overwrite).
            let at = Random().Next(6, 29)
            withRuns (fun runs ->
                let p = startTrain runs "run" []
                waitForStep p runs "run" at
                signal "KILL" p.Id
                let code, _ = finish p
                Expect.equal code 137 (sprintf "killed at step %d" at)
                let code, output = train runs "run" [ "--resume" ]
                Expect.equal code 0 (sprintf "killed at step %d: the resumed run finishes; output:\n%s" at output)
                expectSameCurve reference.Value (trainLosses runs "run") (sprintf "kill -9 at step %d" at))

        testCase "a rerun without flags is refused and changes nothing; --overwrite starts over" <| fun () ->
            withRuns (fun runs ->
                let code, output = train runs "run" []
                Expect.equal code 0 (sprintf "first run; output:\n%s" output)
                let scores = Path.Combine(runs, "run", "test_scores.json")
                let before = File.ReadAllBytes scores, File.ReadAllBytes(metricsPath runs "run")
                let code, output = train runs "run" []
                Expect.equal code 2 (sprintf "refused (bad input); output:\n%s" output)
                Expect.stringContains output "already holds a run" "says why"
                Expect.stringContains output "--resume" "names the way to continue"
                Expect.stringContains output "--overwrite" "and the way to replace it"
                Expect.equal (File.ReadAllBytes scores, File.ReadAllBytes(metricsPath runs "run")) before "the finished run is untouched"
                let code, output = train runs "run" [ "--overwrite" ]
                Expect.equal code 0 (sprintf "--overwrite runs; output:\n%s" output)
                expectSameCurve reference.Value (trainLosses runs "run") "the overwritten run")

        testCase "a second process on a run folder in use is refused, naming the holder" <| fun () ->
            withRuns (fun runs ->
                let first = startTrain runs "run" [ "--set"; "Train.Steps=100000" ]
                waitForStep first runs "run" 1
                let code, output = train runs "run" [ "--overwrite" ]
                signal "TERM" first.Id
                let firstCode, firstOutput = finish first
                Expect.equal code 1 (sprintf "the second is refused; output:\n%s" output)
                Expect.stringContains output (sprintf "is in use by pid %d on host %s" first.Id Environment.MachineName) "names the holder"
                Expect.stringContains output "started " "and when it started"
                Expect.equal firstCode 143 (sprintf "the first ran on undisturbed and stopped on SIGTERM; output:\n%s" firstOutput)
                Expect.isTrue (File.Exists(Train.Checkpoint.last (Path.Combine(runs, "run")))) "with its checkpoint")

        testCase "a disk that fills up mid-run (a 1000 KiB tmpfs): exit 1 naming the file, earlier checkpoints whole, --resume elsewhere continues" <| fun () ->
            // A real ENOSPC: a small tmpfs mounted in a user namespace (unshare -rm), where the runner allows one.
            let canMount, why = bash repoRoot [] [ "-c"; "unshare -rm bash -c 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs \"$d\" && umount \"$d\"; rmdir \"$d\"'" ]
            if canMount <> 0 then skiptestf "needs unshare -rm and a tmpfs mount in a user namespace (unavailable here: %s)" why
            withRuns (fun dir ->
                let small, kept = Path.Combine(dir, "small"), Path.Combine(dir, "kept")
                Directory.CreateDirectory small |> ignore
                Directory.CreateDirectory kept |> ignore
                // Inside the namespace: mount, train until the disk is full, copy what is left out before the mount goes.
                let script =
                    "mount -t tmpfs -o size=1000k tmpfs \"$1\" && shift && runs=\"$1\" && kept=\"$2\" && shift 2 && "
                    + "\"$@\" --runs-dir \"$runs\" --name run; code=$?; cp -r \"$runs/run\" \"$kept/\"; exit $code"
                let code, output =
                    bash repoRoot [] ([ "-c"; sprintf "unshare -rm bash -c '%s' bash \"$@\"" script; "bash"; small; small; kept; launcher; "train" ] @ tiny)
                Expect.equal code 1 (sprintf "a failed write ends the run with exit code 1; output:\n%s" output)
                Expect.stringContains output "error: could not " "a clear error"
                Expect.stringContains output "No space left on device" "with the cause"
                let run = Path.Combine(kept, "run")
                Expect.isEmpty (Directory.GetFiles(run, ".*.tmp-*", SearchOption.AllDirectories)) "no temporary left"
                let checkpoints = Directory.GetFiles(Train.Checkpoint.folder run, "*.ckpt")
                Expect.isNonEmpty checkpoints "the checkpoints written before the disk filled"
                for f in checkpoints do
                    Expect.isTrue (Train.Checkpoint.tryReadMeta f |> Result.isOk) (sprintf "%s loads" f)
                // On a disk with room: resume continues to the end, on the uninterrupted curve.
                let moved = Path.Combine(dir, "roomy")
                Directory.CreateDirectory moved |> ignore
                Directory.Move(run, Path.Combine(moved, "run"))
                let code, output = train moved "run" [ "--resume" ]
                Expect.equal code 0 (sprintf "resumed; output:\n%s" output)
                expectSameCurve reference.Value (trainLosses moved "run") "resumed after a full disk")

        scalarTests
    ]
