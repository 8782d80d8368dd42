/// Measuring on this machine: interleaved timing rounds and their medians, peak resident memory, the choice
/// of libtorch's CPU allocator, and the float32 matmul ceiling that utilisation is measured against.
module Moe.Bench.Measure

open System
open System.Diagnostics
open System.IO
open System.Runtime.InteropServices
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers

// ---------------------------------------------------------------- timing

/// A monotonic clock in milliseconds: `stopwatchClock ()` in real runs, a fake in tests.
type Clock = unit -> float

/// A clock reading a fresh `Stopwatch`.
let stopwatchClock () : Clock =
    let sw = Stopwatch.StartNew()
    fun () -> sw.Elapsed.TotalMilliseconds

/// The median; for an even count, the mean of the two middle values.
let median (xs: float[]) : float =
    if xs.Length = 0 then invalidArg "xs" "expected at least one sample, got none"
    let s = Array.sort xs
    let n = s.Length
    if n % 2 = 1 then s[n / 2] else (s[n / 2 - 1] + s[n / 2]) / 2.0

/// How often one action runs in `interleavedPlan`: untimed warm-up calls, then timed rounds.
type RunPlan = { Warmup: int; Reps: int }

/// Times `actions` interleaved, so that machine noise (other processes, frequency changes) hits every action
/// alike and their ratios hold on a busy machine. Warm-up first: in round w every action with more than w
/// warm-up calls runs once, untimed. Then timed round r runs, once each, the actions planned for more than r
/// rounds, starting at action r mod n so that no action always follows the same one (allocator and cache
/// state left by a neighbour); an action planned for fewer rounds (an expensive one) drops out after its
/// last. Returns the milliseconds of each action in each of its rounds: result[action][round].
let interleavedPlan (clock: Clock) (plans: RunPlan[]) (actions: (unit -> unit)[]) : float[][] =
    if plans.Length <> actions.Length then
        invalidArg "plans" (sprintf "expected one plan per action (%d), got %d" actions.Length plans.Length)
    for p in plans do
        if p.Warmup < 0 then invalidArg "plans" (sprintf "expected warm-up counts >= 0, got %d" p.Warmup)
        if p.Reps < 1 then invalidArg "plans" (sprintf "expected rounds >= 1, got %d" p.Reps)
    let n = actions.Length
    let most f = if n = 0 then 0 else plans |> Array.map f |> Array.max
    for w in 0 .. most (fun p -> p.Warmup) - 1 do
        for i in 0 .. n - 1 do
            if plans[i].Warmup > w then actions[i] ()
    let samples = plans |> Array.map (fun p -> Array.zeroCreate p.Reps)
    for r in 0 .. most (fun p -> p.Reps) - 1 do
        for j in 0 .. n - 1 do
            let i = (r + j) % n
            if plans[i].Reps > r then
                let start = clock ()
                actions[i] ()
                samples[i][r] <- clock () - start
    samples

/// `interleavedPlan` with the same warm-up and round counts for every action.
let interleaved (clock: Clock) (warmup: int) (reps: int) (actions: (unit -> unit)[]) : float[][] =
    interleavedPlan clock (Array.create actions.Length { Warmup = warmup; Reps = reps }) actions

// ---------------------------------------------------------------- memory

module private Libc =
    /// glibc: returns free heap pages to the kernel. Without it, memory freed by an earlier variant is
    /// reused without raising the resident set, and a later variant's peak would read too low.
    [<DllImport("libc", EntryPoint = "malloc_trim")>]
    extern int mallocTrim(unativeint pad)

let internal bytesPerMib = 1048576.0

/// A `/proc/self/status` field in kB ("VmHWM:   123456 kB"), or None.
let private procStatusKb (field: string) : int64 option =
    File.ReadAllLines "/proc/self/status"
    |> Array.tryFind (fun l -> l.StartsWith(field + ":"))
    |> Option.map (fun l -> l.Substring(field.Length + 1).Trim().Split(' ')[0] |> int64)

/// This process's peak resident set so far in MiB (VmHWM), or None off Linux.
let peakRssMb () : float option =
    if not (File.Exists "/proc/self/status") then None
    else procStatusKb "VmHWM" |> Option.map (fun kb -> float kb * 1024.0 / bytesPerMib)

/// True where the kernel lets a process reset its resident high-water mark (Linux, /proc/self/clear_refs).
let canMeasurePeakRss () : bool =
    OperatingSystem.IsLinux() && File.Exists "/proc/self/clear_refs" && File.Exists "/proc/self/status"

/// Extra peak resident memory, in MiB, of one call of `action` on the CPU: free heap pages go back to the
/// kernel (glibc malloc_trim), the kernel's high-water mark is reset to the current resident set (writing
/// "5" to /proc/self/clear_refs), then the result is VmHWM after the call minus VmRSS before it. Tensors
/// that live across the call (inputs, weights, existing gradients) are not counted; gradients allocated by a
/// backward are.
/// None where the kernel does not offer this (not Linux); CUDA memory is not host memory and TorchSharp
/// 0.107 exposes no CUDA allocator statistics, so callers pass only CPU work here.
let peakExtraMb (action: unit -> unit) : float option =
    if not (canMeasurePeakRss ()) then None
    else
        try Libc.mallocTrim 0un |> ignore with :? EntryPointNotFoundException | :? DllNotFoundException -> ()
        File.WriteAllText("/proc/self/clear_refs", "5")
        match procStatusKb "VmRSS" with
        | None -> None
        | Some before ->
            action ()
            procStatusKb "VmHWM" |> Option.map (fun peak -> float (max 0L (peak - before)) * 1024.0 / bytesPerMib)

/// A `/proc/meminfo` field in kB, or None (not Linux).
let private memInfoKb (field: string) : int64 option =
    if not (File.Exists "/proc/meminfo") then None
    else
        File.ReadAllLines "/proc/meminfo"
        |> Array.tryFind (fun l -> l.StartsWith(field + ":"))
        |> Option.map (fun l -> l.Substring(field.Length + 1).Trim().Split(' ')[0] |> int64)

/// Memory the kernel could give this process now without swapping, in MiB; None where unknown.
let availableMb () : float option = memInfoKb "MemAvailable" |> Option.map (fun kb -> float kb / 1024.0)

// ---------------------------------------------------------------- matmul ceiling

/// Square sizes whose float32 matmul throughput is taken as the machine's ceiling: large enough that BLAS
/// runs at its best, small enough to time in a second on two cores.
let ceilingSizes : int list = [ 1024; 2048 ]

/// Waits for queued GPU work so a clock reading covers it; nothing to wait for on the CPU.
let synchronize (device: torch.Device) : unit =
    if device.``type`` = DeviceType.CUDA then torch.cuda.synchronize ()

/// The measured float32 matmul ceiling in GFLOP/s: for each square size n, the fastest of `reps` timed
/// products of 2 n^3 FLOPs (after one untimed product); the best size wins. The fastest, not the median: a
/// ceiling is what the machine can do, and on a shared machine slower runs measure the neighbours.
let matmulGflops (device: torch.Device) (sizes: int list) (reps: int) : float =
    if List.isEmpty sizes then invalidArg "sizes" "expected at least one matmul size, got none"
    if reps < 1 then invalidArg "reps" (sprintf "expected reps >= 1, got %d" reps)
    let clock = stopwatchClock ()
    sizes
    |> List.map (fun n ->
        use _ = torch.NewDisposeScope()
        let a = torch.randn ([| int64 n; int64 n |], device = device) // [n; n]
        let b = torch.randn ([| int64 n; int64 n |], device = device) // [n; n]
        let product () =
            use _ = torch.NewDisposeScope()
            a.matmul b |> ignore
            synchronize device
        let ms = (interleaved clock 1 reps [| product |])[0] |> Array.min
        2.0 * float n ** 3.0 / (ms / 1000.0) / 1e9)
    |> List.max
