module Moe.Tests.Main

open System
open Expecto
open Expecto.Impl

let all =
    testList "Moe" [
        FoundationTests.tests
        FoundationTests.consistency
        RoutingTests.tests
        LayersTests.tests
        ModelsTests.tests
        UpcycleTests.tests
        RecurrentTests.tests
        GenerateTests.tests
        HfCheckpointTests.tests
        Gpt2Tests.tests
        Gpt2MoeTests.tests
        BartTests.tests
        T5Tests.tests
        SwitchTests.tests
        SwitchTests.upcycling
        HfSeq2SeqTests.tests
        LlamaTests.tests
        MoeLMsTests.tests
        EncodersTests.tests
        Gpt2CausalTests.tests
        DataTests.tests
        HfTokenizerTests.tests
        WordPieceTests.tests
        ChatTemplateTests.tests
        TaggingDataTests.tests
        NliTests.tests
        MetricsTests.tests
        BertScoreTests.tests
        SummaCTests.tests
        TaggingTests.tests
        TrainTests.tests
        SummarizerTests.tests
        FinetuneTests.tests
        BaselineTests.tests
        InstructTuneTests.tests
        CausalBaselineTests.tests
        PlotsTests.tests
        SweepTests.tests
        LoraTests.tests
        BenchTests.tests
        LstmMoeTests.tests
        GatingSwitchTests.tests
        MoeLmRoutingTests.tests
        SmallGpt2Tests.tests
        DropUpcycleTests.tests
        PeftGpt2Tests.tests
        ToolkitTests.tests
        ScriptsTests.tests
        LauncherTests.tests
        PackagingTests.tests
        ReliabilityTests.tests
    ]

/// Every test case's full name while it runs, with its start time: the watchdog's view of the run.
let private running = Collections.Concurrent.ConcurrentDictionary<string, DateTime>()

/// Each finished test case's wall time, for `--slowest N`.
let private durations = Collections.Concurrent.ConcurrentDictionary<string, TimeSpan>()

let private finished (name: string) =
    match running.TryRemove name with
    | true, start -> durations[name] <- DateTime.UtcNow - start
    | false, _ -> ()

/// Wraps every test case so that `running` holds it from start to end and `durations` gets its time.
let rec private tracked (path: string) (test: Test) : Test =
    let around (name: string) (body: unit -> 'a) : 'a =
        running[name] <- DateTime.UtcNow
        try body () finally finished name
    let aroundAsync (name: string) (body: Async<unit>) : Async<unit> =
        async {
            running[name] <- DateTime.UtcNow
            try do! body finally finished name }
    match test with
    | TestCase (Sync f, state) -> TestCase(Sync(fun () -> around path f), state)
    | TestCase (SyncWithCancel f, state) -> TestCase(SyncWithCancel(fun ct -> around path (fun () -> f ct)), state)
    | TestCase (Async a, state) -> TestCase(Async(aroundAsync path a), state)
    | TestCase (AsyncFsCheck (c1, c2, f), state) -> TestCase(AsyncFsCheck(c1, c2, fun c -> aroundAsync path (f c)), state)
    | TestList (tests, state) -> TestList(tests |> List.map (tracked path), state)
    | TestLabel (label, inner, state) -> TestLabel(label, tracked (if path = "" then label else path + "/" + label) inner, state)
    | Test.Sequenced (how, inner) -> Test.Sequenced(how, tracked path inner)

/// A test that runs longer than `limit` hangs the run: the watchdog names every test still running, with how
/// long each has run, then ends the process with exit code 3, so a hang is a failure that names its test
/// instead of a run that never ends. The limit is far above the slowest test (about 1 min on 2 loaded cores).
let private startWatchdog (limit: TimeSpan) =
    let watch () =
        while true do
            Threading.Thread.Sleep(TimeSpan.FromSeconds 10.0)
            let now = DateTime.UtcNow
            let snapshot = running.ToArray()
            if snapshot |> Array.exists (fun kv -> now - kv.Value > limit) then
                eprintfn "watchdog: a test has run for more than %g min; the tests running now:" limit.TotalMinutes
                for kv in snapshot |> Array.sortBy (fun kv -> kv.Value) do
                    eprintfn "  %s (%.1f min)" kv.Key (now - kv.Value).TotalMinutes
                Console.Out.Flush()
                use stdout = Console.OpenStandardOutput()
                let bytes = Text.Encoding.UTF8.GetBytes(sprintf "\n0 passed, %d failed, 0 skipped (hung)\n" snapshot.Length)
                stdout.Write(bytes, 0, bytes.Length)
                exit 3
    Threading.Thread(watch, IsBackground = true, Name = "test-watchdog").Start()

/// `--hang-limit MINUTES` (default 15): see `startWatchdog`.
let private hangLimit (argv: string[]) : TimeSpan * string[] =
    match argv |> Array.tryFindIndex ((=) "--hang-limit") with
    | None -> TimeSpan.FromMinutes 15.0, argv
    | Some i ->
        let minutes =
            match Array.tryItem (i + 1) argv |> Option.bind (fun v -> match Double.TryParse(v, Globalization.CultureInfo.InvariantCulture) with | true, m when m > 0.0 -> Some m | _ -> None) with
            | Some m -> m
            | None -> failwithf "--hang-limit expects a positive number of minutes, got %A" (Array.tryItem (i + 1) argv)
        TimeSpan.FromMinutes minutes, Array.append argv[.. i - 1] argv[i + 2 ..]

[<EntryPoint>]
let main argv =
    Moe.Native.startup ()
    Moe.Native.initialise ()
    // CI reads a last line `N passed, N failed, N skipped`; Expecto's own summary is worded
    // differently, so the counts are captured here and printed after Expecto has finished writing.
    let mutable line = "0 passed, 1 failed, 0 skipped"
    let capture =
        SummaryHandler (fun summary ->
            line <- sprintf "%d passed, %d failed, %d skipped"
                        summary.passed.Length (summary.failed.Length + summary.errored.Length) summary.ignored.Length)
    let quiet = if Console.IsOutputRedirected then [ No_Spinner; Colours 0 ] else []
    // Parallel by default. TorchSharp 0.107 frees Scalars it creates on the fly from a finalizer with no
    // GC.KeepAlive (dotnet/TorchSharp#1434, #1496), so a collection triggered by another test's thread could free
    // one mid-call; the library and the tests make none (ReliabilityTests' IL scan), and the whole suite passed
    // 30 runs in a row in parallel under --gc-stress (README, Design). Tests that read process-wide state (the
    // global generator, process memory, live-tensor counts) are testSequenced. --sequential runs one at a time;
    // --parallel is kept for older command lines and changes nothing.
    let sequenced = if argv |> Array.contains "--sequential" then [ Sequenced ] else []
    // --gc-stress: see Support.GcStress.
    let stress = argv |> Array.contains "--gc-stress"
    if stress then Support.GcStress.start ()
    let argv = argv |> Array.filter (fun a -> a <> "--parallel" && a <> "--sequential" && a <> "--gc-stress")
    let limit, argv = hangLimit argv
    // --slowest N: after the run, the N slowest test cases with their wall times (on stderr).
    let slowest, argv =
        match argv |> Array.tryFindIndex ((=) "--slowest") with
        | None -> 0, argv
        | Some i ->
            match Array.tryItem (i + 1) argv |> Option.map Int32.TryParse with
            | Some (true, n) when n > 0 -> n, Array.append argv[.. i - 1] argv[i + 2 ..]
            | _ -> failwithf "--slowest expects a positive count, got %A" (Array.tryItem (i + 1) argv)
    startWatchdog limit
    let code = runTestsWithCLIArgs (Append_Summary_Handler capture :: quiet @ sequenced) argv (tracked "" all)
    Support.GcStress.finish ()
    if stress then
        eprintfn "gc-stress: %d collections, %d of them of the whole heap, during the run" (GC.CollectionCount 0) (GC.CollectionCount 2)
    if slowest > 0 then
        eprintfn "slowest %d test cases:" slowest
        for kv in durations.ToArray() |> Array.sortByDescending (fun kv -> kv.Value) |> Array.truncate slowest do
            eprintfn "  %6.1f s  %s" kv.Value.TotalSeconds kv.Key
    Console.Out.Flush()
    // Written to the raw stream: Expecto's console writer pads lines it did not start.
    use stdout = Console.OpenStandardOutput()
    let bytes = Text.Encoding.UTF8.GetBytes("\n" + line + "\n")
    stdout.Write(bytes, 0, bytes.Length)
    code
