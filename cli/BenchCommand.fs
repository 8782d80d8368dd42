/// `moe bench`: benchmarks. `moe-layer` times the MoE layer against its dense floor, the naive per-expert
/// loop and the all-experts layer (see `Bench`).
module Moe.BenchCommand

open System
open System.IO
open Argu
open TorchSharp
open Moe

type MoeLayerArgs =
    | Quick
    | Json
    | Profile
    | Reps of count: int
    | Warmup of count: int
    | Tokens of t: int list
    | Experts of e: int list
    | K of k: int list
    | Model_Dim of d: int
    | Expert_Hidden of h: int
    | Variants of names: string list
    | Seed of seed: int
    | All_Experts_Reps of count: int
    | Threads of count: int
    | Allocator of name: string
    | Device of device: string
    | Json_Out of path: string
    | Markdown_Out of path: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Quick -> "a subset of the grid (T = 2048, E in {8, 64}, k in {1, 2}, no all-experts): under two minutes on two idle cores."
            | Json -> "print the JSON report on stdout (the table goes to stderr)."
            | Profile -> "instead of the benchmark, time the MoE layer's phases (router, sort, gather, experts, combine) at every grid point."
            | Reps _ -> sprintf "timed interleaved rounds; the median is reported (default %d, at least %d advised)." Bench.BenchConfig.minReps Bench.BenchConfig.minReps
            | Warmup _ -> "untimed rounds before the timed ones (default 1)."
            | Tokens _ -> "token counts T (default 2048 8192)."
            | Experts _ -> "expert counts E (default 8 32 64)."
            | K _ -> "picks per token k (default 1 2)."
            | Model_Dim _ -> "model width d (default 512)."
            | Expert_Hidden _ -> "expert hidden width (default 1024)."
            | Variants _ -> "variants to time: moe naive_loop all_experts (dense_flop_matched is always timed)."
            | Seed _ -> "seed for inputs and weights (default 0)."
            | All_Experts_Reps _ -> "timed rounds of the all-experts layer, E/k times the others' work (default 3)."
            | Threads _ -> "libtorch intra-op threads (default: libtorch's choice, one per core)."
            | Allocator _ -> "system|retain (default system): retain keeps freed CPU memory in the heap (glibc mallopt), so large buffers are not page-faulted in every step."
            | Device _ -> "auto|cpu|cuda (default auto); peak memory is measured on the CPU only."
            | Json_Out _ -> "also write the JSON report to this file."
            | Markdown_Out _ -> "also write the table as Markdown to this file."

type BenchArgs =
    | [<CliPrefix(CliPrefix.None)>] Moe_Layer of ParseResults<MoeLayerArgs>
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Moe_Layer _ -> "forward+backward time of the MoE layer against the FLOP-matched dense FFN, the naive loop and all-experts."

/// The grid the arguments ask for: `--quick` or the defaults, with any listed value overriding.
let private configOf (args: ParseResults<MoeLayerArgs>) : Bench.BenchConfig =
    let start = if args.Contains Quick then Bench.BenchConfig.quick else Bench.BenchConfig.defaults
    let variants =
        match args.TryGetResult Variants with
        | None -> start.Variants
        | Some names ->
            [| for n in names ->
                match Bench.Variant.parse n with
                | Ok v -> v
                | Error msg -> invalidArg "--variants" msg |]
    { start with
        Tokens = args.TryGetResult Tokens |> Option.map Array.ofList |> Option.defaultValue start.Tokens
        Experts = args.TryGetResult Experts |> Option.map Array.ofList |> Option.defaultValue start.Experts
        Ks = args.TryGetResult K |> Option.map Array.ofList |> Option.defaultValue start.Ks
        ModelDim = args.GetResult(Model_Dim, start.ModelDim)
        ExpertHidden = args.GetResult(Expert_Hidden, start.ExpertHidden)
        Warmup = args.GetResult(Warmup, start.Warmup)
        Reps = args.GetResult(Reps, start.Reps)
        Variants = variants
        Seed = args.GetResult(Seed, start.Seed)
        AllExpertsReps = args.GetResult(All_Experts_Reps, start.AllExpertsReps)
        Allocator =
            match args.TryGetResult Allocator with
            | None -> start.Allocator
            | Some name ->
                match Bench.CpuAllocator.parse name with
                | Ok a -> a
                | Error msg -> invalidArg "--allocator" msg }

let private moeLayer (args: ParseResults<MoeLayerArgs>) : int =
    Native.initialise ()
    let device =
        match Native.parseDevice (args.GetResult(Device, "auto")) with
        | Ok choice -> Native.resolveDevice choice
        | Error msg -> invalidArg "--device" msg
    let cfg = configOf args
    match args.TryGetResult Threads with
    | Some n when n < 1 -> invalidArg "--threads" (sprintf "expected --threads >= 1, got %d" n)
    | Some n -> torch.set_num_threads n
    | None -> ()
    if args.Contains Profile then
        printfn "forward+backward medians over %d interleaved rounds; %d threads, %s allocator" cfg.Reps (torch.get_num_threads ()) (Bench.CpuAllocator.name cfg.Allocator)
        Bench.profileGrid cfg device (fun p -> printf "%s" (Bench.profileTable p))
        0
    else
    let json = args.Contains Json
    let report = Bench.run cfg device (fun line -> eprintfn "%s" line)
    let table = Bench.toTable report
    if json then
        eprintf "%s" table
        printfn "%s" (Bench.toJson report)
    else printf "%s" table
    args.TryGetResult Json_Out |> Option.iter (fun path -> File.WriteAllText(path, Bench.toJson report + "\n"))
    args.TryGetResult Markdown_Out |> Option.iter (fun path -> File.WriteAllText(path, Bench.toMarkdown report))
    0

/// Runs a bench subcommand; bad input prints "error: ..." and returns 2.
let run (args: ParseResults<BenchArgs>) : int =
    try
        match args.GetSubCommand() with
        | Moe_Layer a -> moeLayer a
    with :? ArgumentException as e ->
        eprintfn "error: %s" e.Message
        2
