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
        BartTests.tests
        T5Tests.tests
        SwitchTests.tests
        SwitchTests.upcycling
        HfSeq2SeqTests.tests
        LlamaTests.tests
        MoeLMsTests.tests
        DataTests.tests
        HfTokenizerTests.tests
        ChatTemplateTests.tests
        TaggingDataTests.tests
        MetricsTests.tests
        TaggingTests.tests
        TrainTests.tests
        SummarizerTests.tests
        FinetuneTests.tests
        BaselineTests.tests
        PlotsTests.tests
        SweepTests.tests
        LoraTests.tests
        BenchTests.tests
        LstmMoeTests.tests
        SmallGpt2Tests.tests
        PeftGpt2Tests.tests
        ToolkitTests.tests
        ScriptsTests.tests
        LauncherTests.tests
        PackagingTests.tests
        ReliabilityTests.tests
    ]

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
    // Sequenced by default: TorchSharp 0.107 frees Scalars it creates on the fly from a finalizer with no
    // GC.KeepAlive (dotnet/TorchSharp#1434, #1496), so a GC triggered by another test's thread can free one
    // mid-call. One test thread closes that window; libtorch still uses both cores inside each op.
    let sequenced = if argv |> Array.contains "--parallel" then [] else [ Sequenced ]
    // --gc-stress: a background thread forces full collections and runs finalizers continuously, so a
    // TorchSharp Scalar made on the fly and finalized mid-call fails a test here instead of once in many runs.
    use stopCollecting = new Threading.CancellationTokenSource()
    let stress = argv |> Array.contains "--gc-stress"
    if stress then
        let collect () =
            while not stopCollecting.IsCancellationRequested do
                GC.Collect()
                GC.WaitForPendingFinalizers()
                Threading.Thread.Sleep 1
        Threading.Thread(collect, IsBackground = true, Name = "gc-stress").Start()
    let argv = argv |> Array.filter (fun a -> a <> "--parallel" && a <> "--gc-stress")
    let code = runTestsWithCLIArgs (Append_Summary_Handler capture :: quiet @ sequenced) argv all
    stopCollecting.Cancel()
    if stress then eprintfn "gc-stress: %d full collections during the run" (GC.CollectionCount 2)
    Console.Out.Flush()
    // Written to the raw stream: Expecto's console writer pads lines it did not start.
    use stdout = Console.OpenStandardOutput()
    let bytes = Text.Encoding.UTF8.GetBytes("\n" + line + "\n")
    stdout.Write(bytes, 0, bytes.Length)
    code
