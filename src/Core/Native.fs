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

// ---------------------------------------------------------------- the CPU allocator

module private Malloc =
    /// glibc: sets one allocator parameter; returns 1 on success.
    [<DllImport("libc.so.6", EntryPoint = "mallopt")>]
    extern int mallopt(int param, int value)

    /// glibc's allocator statistics (struct mallinfo2, glibc >= 2.33): ten size_t fields.
    [<Struct; StructLayout(LayoutKind.Sequential)>]
    type MallInfo2 =
        val Arena: unativeint
        val Ordblks: unativeint
        val Smblks: unativeint
        val Hblks: unativeint
        /// Bytes in blocks mapped on their own (mmap), not in the heap.
        val Hblkhd: unativeint
        val Usmblks: unativeint
        val Fsmblks: unativeint
        val Uordblks: unativeint
        val Fordblks: unativeint
        val Keepcost: unativeint

    [<DllImport("libc.so.6", EntryPoint = "mallinfo2")>]
    extern MallInfo2 mallinfo2()

    // mallopt parameter numbers from glibc's malloc.h.
    let M_TRIM_THRESHOLD = -1
    let M_TOP_PAD = -2
    let M_MMAP_THRESHOLD = -3

/// glibc malloc settings that keep freed memory for reuse (see `CpuAllocator.Retain`).
type RetainSettings =
    { /// A block at least this large is mapped on its own and unmapped when freed (M_MMAP_THRESHOLD); smaller
      /// ones come from the heap and are reused. glibc's default is 128 KiB, rising with use to at most 32 MiB,
      /// so every activation of a real-length batch was mapped fresh and zeroed by the kernel each step.
      MmapThresholdMib: int
      /// The bound on kept memory: once the free memory at the top of the heap exceeds this, glibc returns it
      /// to the kernel (M_TRIM_THRESHOLD; default 128 KiB).
      KeepMib: int
      /// Extra memory asked of the kernel each time the heap grows (M_TOP_PAD; default 128 KiB).
      TopPadMib: int }

/// How libtorch's CPU tensors get their memory. libtorch's CPU allocator is glibc malloc (posix_memalign),
/// which has no caching of its own as PyTorch's CUDA allocator does.
type CpuAllocator =
    /// glibc's defaults, untouched.
    | SystemAllocator
    /// Freed blocks stay in the heap up to a bound, so a training step reuses the previous step's memory
    /// instead of faulting in fresh zeroed pages (measured in the README's *Performance* section).
    | Retain of RetainSettings
    /// The user set glibc's malloc tunables (GLIBC_TUNABLES) themselves; the toolkit leaves them as given.
    | UserTunables of string

module CpuAllocator =
    /// The toolkit's policy: blocks from 1 GiB up mapped on their own; at most 2047 MiB of freed memory kept at
    /// the top of the heap (the most `mallopt` takes: an int of bytes). Freed memory the heap keeps was in use
    /// a moment before, so keeping it never raises the peak; the bound is what an idle process holds after its
    /// largest step. Measured in the README (*Real-length documents*): kernel time 68% -> 4% of user time at
    /// real lengths; on the Transformer-base MoE 35% -> 12% (1 GiB kept: 20%; unbounded: 8%).
    let retain =
        Retain { MmapThresholdMib = 1024; KeepMib = 2047; TopPadMib = 0 }

    /// The environment variable that turns the policy off (`system`) or names it (`retain`, the default).
    let environmentVariable = "MOE_CPU_ALLOCATOR"

    let name (a: CpuAllocator) : string =
        match a with
        | SystemAllocator -> "system"
        | Retain s -> sprintf "retain (keeps up to %d MiB freed; blocks from %d MiB mapped)" s.KeepMib s.MmapThresholdMib
        | UserTunables t -> sprintf "glibc tunables from GLIBC_TUNABLES (%s)" t

    /// `system` or `retain` (any case), as given to `MOE_CPU_ALLOCATOR` or `--allocator`.
    let parse (text: string) : Result<CpuAllocator, string> =
        match (if isNull text then "" else text.Trim().ToLowerInvariant()) with
        | "system" -> Ok SystemAllocator
        | "retain" -> Ok retain
        | other -> Error(sprintf "expected allocator system|retain, got '%s'" other)

let mutable private allocatorInForce = SystemAllocator

/// Applies an allocator policy to this process (glibc mallopt; process-wide, for later allocations).
/// `SystemAllocator` after `Retain` is refused: glibc cannot be put back to its adaptive defaults.
/// Raises where `Retain` cannot be applied (no glibc), rather than silently running without it.
let useCpuAllocator (allocator: CpuAllocator) : unit =
    match allocator, allocatorInForce with
    | SystemAllocator, Retain _ ->
        invalidOp "the retain allocator is in force in this process and glibc cannot be reset to its defaults; start the process with MOE_CPU_ALLOCATOR=system"
    | Retain s, _ ->
        let mib (n: int) = n * 1024 * 1024
        let ok =
            try
                Malloc.mallopt (Malloc.M_MMAP_THRESHOLD, mib s.MmapThresholdMib) = 1
                && Malloc.mallopt (Malloc.M_TRIM_THRESHOLD, mib s.KeepMib) = 1
                && Malloc.mallopt (Malloc.M_TOP_PAD, mib s.TopPadMib) = 1
            with :? EntryPointNotFoundException | :? DllNotFoundException -> false
        if not ok then
            invalidOp (sprintf "the retain allocator needs glibc's mallopt to accept %A (Linux with glibc); set %s=system" s CpuAllocator.environmentVariable)
        allocatorInForce <- allocator
    | SystemAllocator, _ | UserTunables _, _ -> allocatorInForce <- allocator

/// The policy this process runs under (`SystemAllocator` until `useCpuAllocator` or `startup` applied one).
let cpuAllocatorInForce () : CpuAllocator = allocatorInForce

/// The policy the environment asks for: glibc tunables the user set win; then `MOE_CPU_ALLOCATOR`
/// (`system` turns the toolkit's policy off); otherwise `CpuAllocator.retain`. Off Linux, `SystemAllocator`.
let cpuAllocatorFromEnvironment () : CpuAllocator =
    let tunables = Environment.GetEnvironmentVariable "GLIBC_TUNABLES"
    if not (OperatingSystem.IsLinux()) then SystemAllocator
    elif not (String.IsNullOrEmpty tunables) && tunables.Contains "glibc.malloc." then UserTunables tunables
    else
        match Environment.GetEnvironmentVariable CpuAllocator.environmentVariable with
        | null | "" -> CpuAllocator.retain
        | text ->
            match CpuAllocator.parse text with
            | Ok a -> a
            | Error msg -> invalidArg CpuAllocator.environmentVariable (sprintf "%s: %s" CpuAllocator.environmentVariable msg)

/// True when a block of `mib` MiB just allocated with malloc is served from the heap rather than mapped on
/// its own (glibc mallinfo2's mapped bytes do not grow): a check that a `Retain` policy is in force, since
/// glibc has no getter for its settings. Blocks above 32 MiB are always mapped under glibc's defaults.
let heapServes (mib: int) : bool =
    let before = Malloc.mallinfo2 ()
    let block = Marshal.AllocHGlobal(nativeint mib * 1048576n)
    try
        let after = Malloc.mallinfo2 ()
        after.Hblkhd <= before.Hblkhd
    finally Marshal.FreeHGlobal block

/// Process start-up for every entry point (CLI, tests, script prelude), before the first tensor: the OpenMP
/// wait policy and the CPU allocator policy the environment asks for.
let startup () : unit =
    preferPassiveOpenMpWait ()
    useCpuAllocator (cpuAllocatorFromEnvironment ())

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
    sprintf "TorchSharp %s, libtorch %s, %d threads, %s, CPU allocator %s"
        (typeof<torch.Tensor>.Assembly.GetName().Version.ToString())
        (torch.__version__)
        (torch.get_num_threads ())
        cuda
        (CpuAllocator.name allocatorInForce)

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
