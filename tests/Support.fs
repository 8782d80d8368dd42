/// Tolerances, generators and helpers shared by the test lists.
module Moe.Tests.Support

open System
open System.IO
open Expecto
open FsCheck
open FsCheck.FSharp

/// Named tolerances for float comparisons.
module Tol =
    /// float32 round-off on sums of a few hundred terms.
    let f32 = 1e-5
    /// float32 after a softmax or a matmul chain.
    let f32Loose = 1e-4
    /// central finite differences in float64 with step 1e-6.
    let finiteDiff = 1e-5

/// `--gc-stress`: a background thread collects garbage and runs finalizers continuously, so a TorchSharp Scalar
/// made on the fly and finalized mid-call fails a test instead of once in many runs. Such a Scalar is young and a
/// generation-0 collection finalizes it, so the thread collects generation 0 about every millisecond (cheap: the
/// suite keeps close to its normal speed) and the whole heap every 100th time.
module GcStress =
    let private gate = obj ()
    let private stop = new Threading.CancellationTokenSource()

    /// Starts the collecting thread.
    let start () =
        let collect () =
            let mutable n = 0
            while not stop.IsCancellationRequested do
                n <- n + 1
                lock gate (fun () ->
                    if n % 100 = 0 then GC.Collect() else GC.Collect(0, GCCollectionMode.Forced, true)
                    GC.WaitForPendingFinalizers())
                Threading.Thread.Sleep 1
        Threading.Thread(collect, IsBackground = true, Name = "gc-stress").Start()

    /// Stops it.
    let finish () = stop.Cancel()

    /// Runs `f` with the collecting thread held off, in a sequenced test (no other test thread allocates): the
    /// reference step of TorchSharp's own AdamW (it makes Scalars on the fly) and the peak-memory measurement.
    let withoutCollections (f: unit -> 'a) : 'a = lock gate f

/// A fresh folder under the system temp folder, deleted with everything in it when disposed:
/// `use dir = new TempDir("moe-x")`, then `dir.Path`.
type TempDir(prefix: string) =
    let path = Path.Combine(Path.GetTempPath(), prefix + "-" + Guid.NewGuid().ToString "N")
    do Directory.CreateDirectory path |> ignore
    member _.Path = path
    interface IDisposable with
        member _.Dispose() = try Directory.Delete(path, true) with _ -> ()

/// FsCheck settings: few, small cases so the whole suite stays fast; replay seed printed on failure.
let propConfig = { FsCheckConfig.defaultConfig with maxTest = 40 }

/// A property over generated values that uses `gen`, not filters.
let propertyWith (name: string) (gen: Gen<'a>) (body: 'a -> unit) : Test =
    testPropertyWithConfig propConfig name (Prop.forAll (Arb.fromGen gen) body)

/// The repository's ../shared/data folder, if this checkout has one beside it.
let sharedData : string option =
    let rec up (dir: DirectoryInfo) =
        if isNull dir then None
        else
            let candidate = Path.Combine(dir.FullName, "..", "shared", "data")
            if Directory.Exists candidate && File.Exists(Path.Combine(dir.FullName, "Directory.Packages.props")) then
                Some(Path.GetFullPath candidate)
            else up dir.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

/// The repository root (where Directory.Packages.props is).
let repoRoot : string =
    let rec up (dir: DirectoryInfo) =
        if isNull dir then failwith "expected to run inside the repository (no Directory.Packages.props above the test binary)"
        elif File.Exists(Path.Combine(dir.FullName, "Directory.Packages.props")) then dir.FullName
        else up dir.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

/// Runs bash with `args` (a script and its arguments, or -c and a command line) in `cwd` with extra
/// environment variables; returns the exit code and the output (stdout, then stderr).
let bash (cwd: string) (env: (string * string) list) (args: string list) : int * string =
    let psi = Diagnostics.ProcessStartInfo("bash", UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = cwd)
    for a in args do psi.ArgumentList.Add a
    for k, v in env do psi.Environment[k] <- v
    use p = Diagnostics.Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEnd()
    p.WaitForExit()
    p.ExitCode, out.Result + err

/// Fails unless `f` throws an error whose message contains every one of `parts`; `what` names the case.
let throwsWith (f: unit -> unit) (parts: string list) (what: string) =
    let message =
        try
            f ()
            None
        with e -> Some e.Message
    match message with
    | None -> failtestf "%s: expected an error" what
    | Some m -> for p in parts do Expect.stringContains m p (sprintf "%s: the error names %s" what p)

/// A test that needs ../shared/data: skipped, with the reason, where it is absent.
let testWithShared (name: string) (body: string -> unit) : Test =
    testCase name (fun () ->
        match sharedData with
        | Some dir -> body dir
        | None -> skiptest "needs ../shared/data beside the repository (real sample data); absent in this clone")

/// Central finite differences of `f` with respect to every entry of the float64 tensor `p`, perturbing it
/// in place entry by entry (so `f` may close over `p` through a module's parameters).
let finiteDifferenceInPlace (step: float) (f: unit -> float) (p: TorchSharp.torch.Tensor) : float[] =
    use _ = TorchSharp.torch.no_grad ()
    use flat = p.detach().view (-1L)
    Array.init (int flat.NumberOfElements) (fun i ->
        let original = flat[int64 i].item<float> ()
        let at (v: float) =
            flat[int64 i] <- TorchSharp.torch.tensor (v, dtype = TorchSharp.torch.float64)
            f ()
        let up, down = at (original + step), at (original - step)
        flat[int64 i] <- TorchSharp.torch.tensor (original, dtype = TorchSharp.torch.float64)
        (up - down) / (2.0 * step))
