module Moe.Tests.Main

open System
open Expecto
open Expecto.Impl

let all =
    testList "Moe" [
        FoundationTests.tests
        FoundationTests.consistency
        RoutingTests.tests
        MetricsTests.tests
        LayersTests.tests
        DataTests.tests
        TrainTests.tests
        SummarizerTests.tests
        ModelsTests.tests
        PlotsTests.tests
        LoraTests.tests
    ]

[<EntryPoint>]
let main argv =
    Moe.Native.initialise ()
    // CI reads a last line `N passed, N failed, N skipped`; Expecto's own summary is worded
    // differently, so the counts are captured here and printed after Expecto has finished writing.
    let mutable line = "0 passed, 1 failed, 0 skipped"
    let capture =
        SummaryHandler (fun summary ->
            line <- sprintf "%d passed, %d failed, %d skipped"
                        summary.passed.Length (summary.failed.Length + summary.errored.Length) summary.ignored.Length)
    let quiet = if Console.IsOutputRedirected then [ No_Spinner; Colours 0 ] else []
    let code = runTestsWithCLIArgs (Append_Summary_Handler capture :: quiet) argv all
    Console.Out.Flush()
    // Written to the raw stream: Expecto's console writer pads lines it did not start.
    use stdout = Console.OpenStandardOutput()
    let bytes = Text.Encoding.UTF8.GetBytes("\n" + line + "\n")
    stdout.Write(bytes, 0, bytes.Length)
    code
