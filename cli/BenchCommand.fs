/// `moe bench`: benchmarks. `moe-layer` times the MoE layer against its dense floor, the naive per-expert
/// loop and the all-experts layer (see `Bench`).
module Moe.BenchCommand

open System
open System.Diagnostics
open System.IO
open System.Reflection
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
            | Reps _ -> sprintf "timed interleaved rounds; the median is reported (default %d, at least %d advised)." Bench.Layer.BenchConfig.minReps Bench.Layer.BenchConfig.minReps
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
            | Allocator _ -> "system|retain: run under this CPU allocator policy (default: the process's, retain unless MOE_CPU_ALLOCATOR=system); another policy than the process's runs the benchmark in a child process."
            | Device _ -> "auto|cpu|cuda (default auto); peak memory is measured on the CPU only."
            | Json_Out _ -> "also write the JSON report to this file."
            | Markdown_Out _ -> "also write the table as Markdown to this file."

type LoadArgs =
    | Shape of name: string
    | Folder of path: string
    | Seed of seed: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Shape _ -> "bart-large|tiny: the checkpoint's tensor names and shapes (default bart-large: 406M parameters, a 1.6 GB file)."
            | Folder _ -> "where the random checkpoint is written, then deleted (default: a folder under the system's temp folder)."
            | Seed _ -> "seed of the random weights (default 0)."

type TrainStepArgs =
    | Shape of name: string
    | Allocators of names: string list
    | Json
    | Profile
    | Router of kind: string
    | Experts of e: int
    | K of k: int
    | Batch_Size of count: int
    | Warmup of count: int
    | Steps of count: int
    | Threads of count: int
    | Attention of impl: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Shape _ -> "toy|real|base: the default summarizer on the built-in corpus (toy, default); the same model at the lengths of real XSum articles (real: documents median 364 tokens cut at 512, summaries 25, a 23,573-id vocabulary); a Transformer-base-sized MoE at real lengths (base: d 512, 6+6 layers, 8 heads, 8 experts top-2, batch 8)."
            | Allocators _ -> "run the same steps once per CPU allocator policy, each in its own process (e.g. --allocators system retain), and print them side by side with ratios to the first and whether the losses are identical."
            | Json -> "print the run's numbers as JSON on stdout (the table goes to stderr)."
            | Profile -> "print the step's phases (batch + forward, backward, clip, optimizer) and, for MoE models, one MoE layer's phases."
            | Router _ -> "dense|topk|hash, as `moe train --router` (default: the default summarizer, dense)."
            | Experts _ -> "experts per MoE layer with --router topk|hash (default 4)."
            | K _ -> "experts per token with --router topk (default 2)."
            | Batch_Size _ -> "examples per batch (default: the training default)."
            | Warmup _ -> "untimed steps first (default 3)."
            | Steps _ -> "timed steps (default 10)."
            | Threads _ -> "libtorch intra-op threads (default: libtorch's choice)."
            | Attention _ -> "handwritten|library: the model's attention implementation (default handwritten)."

type DataArgs =
    | Documents of count: int
    | Folder of path: string
    | Seed of seed: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Documents _ -> sprintf "documents in the generated corpus (default %d, XSum's training split)." Bench.DataPipeline.DataBenchConfig.xsumTrainSize
            | Folder _ -> "where the corpus file and its token cache are written, then deleted (default: a folder under the system's temp folder)."
            | Seed _ -> "seed of the generated lengths and texts (default 0)."

type BenchArgs =
    | [<CliPrefix(CliPrefix.None)>] Moe_Layer of ParseResults<MoeLayerArgs>
    | [<CliPrefix(CliPrefix.None)>] Train_Step of ParseResults<TrainStepArgs>
    | [<CliPrefix(CliPrefix.None)>] Data of ParseResults<DataArgs>
    | [<CliPrefix(CliPrefix.None)>] Load of ParseResults<LoadArgs>
    | [<CliPrefix(CliPrefix.None)>] Generate of ParseResults<PretrainedCommand.BenchGenerateArgs>
    | [<CliPrefix(CliPrefix.None)>] Bertscore of ParseResults<BertScoreCommand.BenchBertScoreArgs>
    | [<CliPrefix(CliPrefix.None)>] Summac of ParseResults<SummaCBenchCommand.SummaCBenchArgs>
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Moe_Layer _ -> "forward+backward time of the MoE layer against the FLOP-matched dense FFN, the naive loop and all-experts."
            | Train_Step _ -> "tokens/s, model-FLOPs utilisation, kernel CPU time and peak memory of a training step of the summarizer, on the built-in corpus or at real article lengths."
            | Data _ -> "an XSum-sized generated corpus through the JSON Lines loader, tokenization and the on-disk token cache: time and peak memory."
            | Load _ -> "a BART-shaped model.safetensors with random weights loaded into fresh parameters: time and peak resident memory against the file size."
            | Summac _ -> "SummaC-ZS NLI pairs per second with a random classifier of roberta-large-mnli's shape (give --tokenizer)."
            | Generate _ -> "generation speed of a checkpoint (--model) or bart-large's shape: encoder ms, decoder ms per token, tokens/s, the key/value cache's speed-up, against the memory-bandwidth floor."
            | Bertscore _ -> "BERTScore pairs per second with roberta-large-shaped random weights (a folder written, loaded and scored)."

/// The grid the arguments ask for: `--quick` or the defaults, with any listed value overriding.
let private configOf (args: ParseResults<MoeLayerArgs>) : Bench.Layer.BenchConfig =
    let start = if args.Contains Quick then Bench.Layer.BenchConfig.quick else Bench.Layer.BenchConfig.defaults
    let variants =
        match args.TryGetResult Variants with
        | None -> start.Variants
        | Some names ->
            [| for n in names ->
                match Bench.Layer.Variant.parse n with
                | Ok v -> v
                | Error msg -> invalidArg "--variants" msg |]
    { start with
        Tokens = args.TryGetResult Tokens |> Option.map Array.ofList |> Option.defaultValue start.Tokens
        Experts = args.TryGetResult MoeLayerArgs.Experts |> Option.map Array.ofList |> Option.defaultValue start.Experts
        Ks = args.TryGetResult MoeLayerArgs.K |> Option.map Array.ofList |> Option.defaultValue start.Ks
        ModelDim = args.GetResult(Model_Dim, start.ModelDim)
        ExpertHidden = args.GetResult(Expert_Hidden, start.ExpertHidden)
        Warmup = args.GetResult(MoeLayerArgs.Warmup, start.Warmup)
        Reps = args.GetResult(Reps, start.Reps)
        Variants = variants
        Seed = args.GetResult(MoeLayerArgs.Seed, start.Seed)
        AllExpertsReps = args.GetResult(All_Experts_Reps, start.AllExpertsReps) }

/// Runs this CLI again in a child process with `args` and `MOE_CPU_ALLOCATOR=allocator` (an allocator policy is
/// process-wide and set at start-up); its stderr passes through, its stdout is returned. Fails with the child's
/// exit code when it fails.
let private runUnderAllocator (allocator: string) (args: string list) : string =
    let host = Environment.ProcessPath
    let start = ProcessStartInfo(host, RedirectStandardOutput = true, UseShellExecute = false)
    // Under `dotnet Moe.Cli.dll` the host is dotnet and the program is the entry assembly; an apphost is both.
    if Path.GetFileNameWithoutExtension(host) = "dotnet" then start.ArgumentList.Add(Assembly.GetEntryAssembly().Location)
    for a in args do start.ArgumentList.Add a
    start.Environment[Native.CpuAllocator.environmentVariable] <- allocator
    use child = Process.Start start
    let out = child.StandardOutput.ReadToEnd()
    child.WaitForExit()
    if child.ExitCode <> 0 then
        invalidOp (sprintf "the benchmark under the %s allocator failed (exit code %d; its messages are above)" allocator child.ExitCode)
    out

/// The allocator policy a flag names, and whether it differs from the one this process runs under.
let private allocatorOf (name: string) : Native.CpuAllocator =
    match Native.CpuAllocator.parse name with
    | Ok a -> a
    | Error msg -> invalidArg "--allocator" msg

let private setThreads (threads: int option) =
    match threads with
    | Some n when n < 1 -> invalidArg "--threads" (sprintf "expected --threads >= 1, got %d" n)
    | Some n -> torch.set_num_threads n
    | None -> ()

let private moeLayer (args: ParseResults<MoeLayerArgs>) : int =
    match args.TryGetResult Allocator with
    | Some name when allocatorOf name <> Native.cpuAllocatorInForce () ->
        let rest = args.GetAllResults() |> List.filter (function Allocator _ -> false | _ -> true)
        printf "%s" (runUnderAllocator name ("bench" :: "moe-layer" :: (args.Parser.PrintCommandLineArguments rest |> List.ofArray)))
        0
    | _ ->
    Native.initialise ()
    let device =
        match Native.parseDevice (args.GetResult(Device, "auto")) with
        | Ok choice -> Native.resolveDevice choice
        | Error msg -> invalidArg "--device" msg
    let cfg = configOf args
    setThreads (args.TryGetResult MoeLayerArgs.Threads)
    if args.Contains MoeLayerArgs.Profile then
        printfn "forward+backward medians over %d interleaved rounds; %d threads, %s allocator" cfg.Reps (torch.get_num_threads ()) (Native.CpuAllocator.name (Native.cpuAllocatorInForce ()))
        Bench.Layer.profileGrid cfg device (fun p -> printf "%s" (Bench.Layer.profileTable p))
        0
    else
    let json = args.Contains MoeLayerArgs.Json
    let report = Bench.Layer.run cfg device (fun line -> eprintfn "%s" line)
    let table = Bench.Layer.toTable report
    if json then
        eprintf "%s" table
        printfn "%s" (Bench.Layer.toJson report)
    else printf "%s" table
    args.TryGetResult Json_Out |> Option.iter (fun path -> File.WriteAllText(path, Bench.Layer.toJson report + "\n"))
    args.TryGetResult Markdown_Out |> Option.iter (fun path -> File.WriteAllText(path, Bench.Layer.toMarkdown report))
    0

let private trainStep (args: ParseResults<TrainStepArgs>) : int =
    match args.TryGetResult Allocators with
    | Some names ->
        if names.IsEmpty then invalidArg "--allocators" "expected at least one of system|retain after --allocators"
        names |> List.iter (allocatorOf >> ignore)
        let rest = args.GetAllResults() |> List.filter (function Allocators _ | TrainStepArgs.Json -> false | _ -> true)
        let flags = (args.Parser.PrintCommandLineArguments rest |> List.ofArray)
        let runs =
            [ for name in names ->
                eprintfn "--- the %s allocator, in a child process" name
                let json = runUnderAllocator name ([ "bench"; "train-step" ] @ flags @ [ "--json" ])
                match Json.deserialize<Bench.TrainStep.StepSummary> json with
                | Ok s -> s
                | Error problems -> invalidOp (sprintf "could not read the child's report: %s" (String.Join("; ", problems))) ]
        printf "%s" (Bench.TrainStep.allocatorComparison runs)
        0
    | None ->
    Native.initialise ()
    setThreads (args.TryGetResult TrainStepArgs.Threads)
    let start = Summarizer.SummarizerConfig.defaults
    let experts = args.GetResult(TrainStepArgs.Experts, 4)
    let summarizer =
        match args.TryGetResult Router |> Option.map (fun r -> r.Trim().ToLowerInvariant()) with
        | None | Some "dense" -> start
        | Some "topk" -> Summarizer.SummarizerConfig.topK experts (args.GetResult(TrainStepArgs.K, 2)) start
        | Some "hash" -> Summarizer.SummarizerConfig.hash experts start
        | Some other -> invalidArg "--router" (sprintf "expected dense|topk|hash, got '%s'" other)
    let summarizer =
        match args.TryGetResult Attention |> Option.map (fun a -> a.Trim().ToLowerInvariant()) with
        | None -> summarizer
        | Some "handwritten" -> { summarizer with Model = { summarizer.Model with Attention = Attention.Handwritten } }
        | Some "library" -> { summarizer with Model = { summarizer.Model with Attention = Attention.Library } }
        | Some other -> invalidArg "--attention" (sprintf "expected handwritten|library, got '%s'" other)
    let shaped =
        let start = { Bench.TrainStep.TrainStepConfig.defaults with Summarizer = summarizer }
        match args.TryGetResult Shape |> Option.map (fun s -> s.Trim().ToLowerInvariant()) with
        | None | Some "toy" -> start
        | Some "real" -> Bench.TrainStep.TrainStepConfig.realLength start
        | Some "base" ->
            if args.Contains Router || args.Contains TrainStepArgs.Experts || args.Contains TrainStepArgs.K then
                invalidArg "--shape" "--shape base is its own model (8 experts, top-2); --router, --experts and --k apply to toy and real"
            Bench.TrainStep.TrainStepConfig.transformerBase start
        | Some other -> invalidArg "--shape" (sprintf "expected toy|real|base, got '%s'" other)
    let shaped =
        match args.TryGetResult Batch_Size with
        | Some b -> { shaped with Summarizer = { shaped.Summarizer with Train = { shaped.Summarizer.Train with BatchSize = b } } }
        | None -> shaped
    let cfg =
        { shaped with
            Warmup = args.GetResult(TrainStepArgs.Warmup, shaped.Warmup)
            Steps = args.GetResult(Steps, shaped.Steps)
            Profile = args.Contains TrainStepArgs.Profile }
    let report = Bench.TrainStep.trainStep cfg (fun line -> eprintfn "%s" line)
    let table = Bench.TrainStep.trainStepTable report
    if args.Contains TrainStepArgs.Json then
        eprintf "%s" table
        printfn "%s" (Json.serialize (Bench.TrainStep.summaryOf report))
    else printf "%s" table
    0

let private data (args: ParseResults<DataArgs>) : int =
    let d = Bench.DataPipeline.DataBenchConfig.defaults
    let cfg =
        { d with
            Documents = args.GetResult(Documents, d.Documents)
            Folder = args.GetResult(Folder, d.Folder)
            Seed = args.GetResult(DataArgs.Seed, d.Seed) }
    let report = Bench.DataPipeline.run cfg (fun line -> eprintfn "%s" line)
    printf "%s" (Bench.DataPipeline.table report)
    0

let private load (args: ParseResults<LoadArgs>) : int =
    let shape =
        match Bench.CheckpointLoad.BartShape.parse (args.GetResult(LoadArgs.Shape, "bart-large")) with
        | Ok s -> s
        | Error e -> invalidArg "--shape" e
    let folder = args.GetResult(LoadArgs.Folder, Path.Combine(Path.GetTempPath(), sprintf "moe-bench-load-%d" (Environment.ProcessId)))
    let report = Bench.CheckpointLoad.run shape folder (args.GetResult(LoadArgs.Seed, 0)) (fun line -> eprintfn "%s" line)
    printf "%s" (Bench.CheckpointLoad.table report)
    0

/// Runs a bench subcommand (bad input: `InputErrors.guard` in `Cli.main` reports it, exit code 2).
let run (args: ParseResults<BenchArgs>) : int =
    match args.GetSubCommand() with
    | Moe_Layer a -> moeLayer a
    | Train_Step a -> trainStep a
    | Data a -> data a
    | Load a -> load a
    | Generate a -> PretrainedCommand.benchGenerate a
    | Bertscore a -> BertScoreCommand.bench a
    | Summac a -> SummaCBenchCommand.run a
