/// Device choice, seeding and libtorch start-up: the only module that knows which machine it runs on.
module Moe.Native

open System
open System.Runtime.InteropServices
open TorchSharp

module private Libc =
    [<DllImport("libc.so.6", SetLastError = true)>]
    extern int setenv(string name, string value, int overwrite)

/// Asks libgomp (libtorch's OpenMP runtime) to sleep rather than spin at barriers, unless the user set
/// OMP_WAIT_POLICY. With spinning barriers, any machine busier than its cores (a laptop with a browser,
/// a shared CI box) slows libtorch's many small ops 10-25x: measured here, the main job trained at
/// 290 tokens/s spinning and 2,700-3,100 passive under the same load. libgomp reads the variable when it
/// loads, so this must run before the first torch call; .NET's Environment.SetEnvironmentVariable does not
/// reach native getenv on Unix, hence libc's setenv.
let preferPassiveOpenMpWait () : unit =
    if not (OperatingSystem.IsWindows()) && String.IsNullOrEmpty(Environment.GetEnvironmentVariable "OMP_WAIT_POLICY") then
        Libc.setenv ("OMP_WAIT_POLICY", "PASSIVE", 0) |> ignore

/// Where tensors live: `Auto` takes CUDA when libtorch sees a GPU, otherwise the CPU.
type DeviceChoice =
    | Auto
    | Cpu
    | Cuda

/// Parses `auto|cpu|cuda` (any case) as given to `--device`.
let parseDevice (text: string) : Result<DeviceChoice, string> =
    match (if isNull text then "" else text.Trim().ToLowerInvariant()) with
    | "auto" -> Ok Auto
    | "cpu" -> Ok Cpu
    | "cuda" -> Ok Cuda
    | other -> Error(sprintf "expected device auto|cpu|cuda, got '%s'" other)

/// True when libtorch was built with CUDA and sees at least one GPU.
let cudaAvailable () : bool = torch.cuda.is_available ()

/// The torch device for a choice; asking for CUDA where there is none is an error, not a fallback.
let resolveDevice (choice: DeviceChoice) : torch.Device =
    match choice with
    | Cpu -> torch.CPU
    | Auto -> if cudaAvailable () then torch.CUDA else torch.CPU
    | Cuda ->
        if cudaAvailable () then torch.CUDA
        else invalidOp "device cuda was asked for, but libtorch sees no CUDA GPU (CPU build, or no driver); use --device cpu or auto"

/// Seeds libtorch's CPU and CUDA generators. With the same seed, thread count and build, CPU runs repeat exactly.
let seedAll (seed: int) : unit =
    torch.manual_seed (int64 seed) |> ignore
    if cudaAvailable () then torch.cuda.manual_seed_all (int64 seed)

/// How a training run makes a device's random draws (dropout masks, router noise) repeat after a resume.
type RngResume =
    /// The generator's state is saved in each checkpoint and restored on resume (libtorch's CPU generator).
    | SavedState
    /// The generator is re-seeded at the start of every optimizer step from (run seed, step), so step n
    /// draws the same numbers whether or not the run was resumed before it. Used for CUDA: TorchSharp 0.107
    /// cannot read the CUDA generator's state (no `torch.cuda.get_rng_state`; `torch.Generator.Default` is
    /// the CPU generator and `new torch.Generator(seed, cuda)` makes a CPU one), but it can seed it.
    | ReseedEachStep

/// The resume strategy for random draws on a device type.
let rngResume (device: DeviceType) : RngResume =
    match device with
    | DeviceType.CUDA -> ReseedEachStep
    | _ -> SavedState

/// SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijection on 64-bit words whose outputs for
/// neighbouring inputs look independent.
let private splitMix64 (z: uint64) : uint64 =
    let z = z + 0x9E3779B97F4A7C15UL
    let z = (z ^^^ (z >>> 30)) * 0xBF58476D1CE4E5B9UL
    let z = (z ^^^ (z >>> 27)) * 0x94D049BB133111EBUL
    z ^^^ (z >>> 31)

/// The generator seed of 0-based optimizer step `step` of a run seeded with `seed`: a pure function, distinct
/// for distinct (seed, step) (a bijection of the packed pair). It may be negative: libtorch takes the seed as
/// the uint64 with the same bits.
let stepSeed (seed: int) (step: int) : int64 =
    let packed = (uint64 (uint32 seed) <<< 32) ||| uint64 (uint32 step)
    int64 (splitMix64 packed)

/// Re-seeds every CUDA device's generator for step `step` (`ReseedEachStep`); nothing without CUDA.
let reseedCudaForStep (seed: int) (step: int) : unit =
    if cudaAvailable () then torch.cuda.manual_seed_all (stepSeed seed step)

/// A one-line description of the runtime: libtorch build, threads, devices.
let describeRuntime () : string =
    let cuda = if cudaAvailable () then sprintf "cuda x%d" (torch.cuda.device_count ()) else "no cuda"
    sprintf "TorchSharp %s, libtorch %s, %d threads, %s"
        (typeof<torch.Tensor>.Assembly.GetName().Version.ToString())
        (torch.__version__)
        (torch.get_num_threads ())
        cuda

/// Forces libtorch to load and run one operation; throws with the loader's message when it cannot.
let initialise () : unit =
    try
        use t = torch.ones (2L)
        use s = t.sum ()
        if s.item<float32> () <> 2.0f then invalidOp "libtorch computed 1 + 1 <> 2"
    with e ->
        let rec root (e: exn) = if isNull e.InnerException then e else root e.InnerException
        raise (InvalidOperationException(
            "libtorch failed to initialise: " + (root e).Message
            + " (on hosts whose libstdc++ lacks GLIBCXX_3.4.32 the build patches libLibTorchSharp.so; rebuild, or run scripts through scripts/prelude.fsx)", e))
