/// The `./moe` launcher and the CLI's one error guard (`cli/InputErrors.fs`): the launcher builds only when
/// a source changed, each time into a fresh folder that `cli/bin/current` then points to, so a command still
/// running from an older build keeps its files; every command reports bad input as `error: ...`, exit code 2.
module Moe.Tests.LauncherTests

open System
open System.IO
open Expecto
open Moe
open Moe.Tests.Support

let private launcher = Path.Combine(repoRoot, "moe")
let private current = Path.Combine(repoRoot, "cli", "bin", "current")

/// The launcher's file in a build folder whose time says which sources that build saw.
let private marker = ".built-from"

/// The launcher's mark on a build folder that `current` moved past.
let private retired = ".retired"

/// Runs `./moe args` from the repository root: exit code and output.
let private moe (args: string list) : int * string = bash repoRoot [] (launcher :: args)

/// The build folder `current` points to.
let private currentBuild () : string =
    match Directory.ResolveLinkTarget(current, true) with
    | null -> failtestf "expected %s to be a link to a build folder" current
    | target -> target.FullName

/// `./moe ARGS` exits with 2 and says `error: ` and `expected` on its own line, without .NET's parameter suffix.
let private badInput (args: string list) (expected: string) =
    let code, output = moe args
    Expect.equal code 2 (sprintf "./moe %s: exit code 2 for bad input; output:\n%s" (String.concat " " args) output)
    Expect.stringContains output ("error: " + expected) "the message names what was expected"
    Expect.isFalse (output.Contains "(Parameter '") "no .NET parameter suffix"
    Expect.isFalse (output.Contains "   at ") "no stack trace"

let tests =
    testSequenced <| testList "Launcher" [
        testCase "./moe runs under the retain allocator; MOE_CPU_ALLOCATOR=system turns it off; a bad value is named" <| fun () ->
            let code, output = moe [ "info" ]
            Expect.equal code 0 (sprintf "./moe info: %s" output)
            Expect.stringContains output "CPU allocator retain" "the policy is in force by default"
            let code, output = bash repoRoot [ Native.CpuAllocator.environmentVariable, "system" ] [ launcher; "info" ]
            Expect.equal code 0 (sprintf "./moe info: %s" output)
            Expect.stringContains output "CPU allocator system" "turned off"
            let code, output = bash repoRoot [ Native.CpuAllocator.environmentVariable, "fast" ] [ launcher; "info" ]
            Expect.equal code 2 "bad input"
            Expect.stringContains output "error: MOE_CPU_ALLOCATOR: expected allocator system|retain, got 'fast'" "names the variable and the choices"

        testCase "bench train-step compares allocator policies in child processes: same losses bit for bit" <| fun () ->
            let code, output =
                moe [ "bench"; "train-step"; "--shape"; "real"; "--allocators"; "system"; "retain"; "--steps"; "2"; "--warmup"; "0"; "--batch-size"; "2" ]
            Expect.equal code 0 (sprintf "./moe bench train-step: %s" output)
            Expect.stringContains output "--- the system allocator, in a child process" "one child per policy"
            Expect.stringContains output "CPU allocator retain" "the second child ran under the policy"
            Expect.stringContains output "retain vs system: tokens/s" "ratios to the first"
            Expect.stringContains output "losses identical bit for bit" "the policy changes no arithmetic"

        testCase "a script that #loads the prelude starts libtorch under the allocator policy" <| fun () ->
            // Every script #loads prelude.fsx; fsi then resolves native names only for the outer script's packages,
            // so this is the path the main job takes, and the only place the prelude itself runs in the suite.
            let dir = Path.Combine(Path.GetTempPath(), "moe-prelude-tests", Guid.NewGuid().ToString("N"))
            Directory.CreateDirectory dir |> ignore
            try
                let script = Path.Combine(dir, "probe.fsx")
                let prelude = Path.Combine(repoRoot, "scripts", "prelude.fsx").Replace("\\", "/")
                File.WriteAllText(script, sprintf "#load \"%s\"\nprintfn \"runtime: %%s\" (Moe.Native.describeRuntime ())\nprintfn \"heap serves 40 MiB: %%b\" (Moe.Native.heapServes 40)\n" prelude)
                let code, output = bash dir [] [ "-c"; sprintf "dotnet fsi --quiet %s" script ]
                Expect.equal code 0 (sprintf "dotnet fsi probe.fsx: %s" output)
                Expect.stringContains output "CPU allocator retain" "the prelude applied the policy"
                Expect.stringContains output "heap serves 40 MiB: true" "and glibc follows it"
            finally (try Directory.Delete(dir, true) with _ -> ())

        testCase "the launcher is valid bash" <| fun () ->
            let code, output = bash repoRoot [] [ "-n"; launcher ]
            Expect.equal code 0 (sprintf "bash -n moe: %s" output)

        testCase "./moe info twice builds once; a newer source builds a fresh folder and leaves the old one whole" <| fun () ->
            let info () =
                let code, output = moe [ "info" ]
                Expect.equal code 0 (sprintf "./moe info: exit code; output:\n%s" output)
                Expect.stringContains output "device: " "prints the device"
            info ()
            let first = currentBuild ()
            let builtAt = File.GetLastWriteTimeUtc(Path.Combine(first, marker))
            info ()
            Expect.equal (currentBuild ()) first "no source changed: the same build"
            Expect.equal (File.GetLastWriteTimeUtc(Path.Combine(first, marker))) builtAt "and not rebuilt in place"
            // A build that predates every source stands for a source edited since: the next call rebuilds.
            let dll = Path.Combine(first, "Moe.Cli.dll")
            let dllWritten = File.GetLastWriteTimeUtc dll
            File.SetLastWriteTimeUtc(Path.Combine(first, marker), DateTime(2000, 1, 1, 0, 0, 0, DateTimeKind.Utc))
            info ()
            let second = currentBuild ()
            Expect.notEqual second first "rebuilt into a fresh folder"
            Expect.isTrue (File.Exists dll) "the old build's files stay for the processes running from it"
            Expect.equal (File.GetLastWriteTimeUtc dll) dllWritten "the old build is not written to"
            Expect.isTrue (File.Exists(Path.Combine(first, retired))) "the old build is marked retired"

        testCase "every command reports bad input through one guard: error line, exit code 2" <| fun () ->
            let missing = Path.Combine(Path.GetTempPath(), "moe-launcher-tests", Guid.NewGuid().ToString("N"))
            badInput [ "data"; "inspect"; Path.Combine(missing, "x.jsonl") ] (Path.Combine(missing, "x.jsonl"))
            badInput [ "train"; "--router"; "bogus" ] "expected dense|topk|hash, got 'bogus'"
            badInput [ "score"; "--predictions"; Path.Combine(missing, "p.txt"); "--references"; Path.Combine(missing, "r.txt") ]
                "expected a text file at"
            badInput [ "report"; missing ] missing
            badInput [ "train"; "--router"; "hash"; "--k"; "2" ] "--k applies to --router topk, not hash"

        testCase "score --summac: per-example SummaC in the JSON; an empty prediction or no --documents is bad input" <| fun () ->
            match sharedData with
            | None -> skiptest "needs ../shared/models/roberta-tiny-mnli beside the repository; absent in this clone"
            | Some data ->
                let nli = Path.Combine(data, "..", "models", "roberta-tiny-mnli")
                let dir = Path.Combine(Path.GetTempPath(), "moe-launcher-tests", Guid.NewGuid().ToString("N"))
                Directory.CreateDirectory dir |> ignore
                try
                    let write name (lines: string list) = File.WriteAllLines(Path.Combine(dir, name), lines); Path.Combine(dir, name)
                    let docs = write "d.txt" [ "The cat sat on the mat all day. The dog slept in the warm sun." ]
                    let refs = write "r.txt" [ "The cat sat on the mat." ]
                    let preds = write "p.txt" [ "The dog slept in the sun." ]
                    let code, output = moe [ "score"; "-p"; preds; "-r"; refs; "-d"; docs; "--summac"; nli; "--json"; "--per-example" ]
                    Expect.equal code 0 (sprintf "./moe score --summac: exit code; output:\n%s" output)
                    let json = Text.Json.JsonDocument.Parse(output.Trim().Split('\n') |> Array.last).RootElement
                    let perExample = (json.GetProperty "examples").[0].GetProperty("summac_zs").GetDouble()
                    Expect.equal (json.GetProperty("summac_zs").GetDouble()) perExample "one example: the mean is its score"
                    badInput [ "score"; "-p"; write "e.txt" [ "" ]; "-r"; refs; "-d"; docs; "--summac"; nli ] "expected a non-empty summary"
                    badInput [ "score"; "-p"; preds; "-r"; refs; "--summac"; nli ] "SummaC scores predictions against their documents: give --documents"
                finally (try Directory.Delete(dir, true) with _ -> ())

        testCase "score --bertscore / summarize --bertscore with a folder that is no encoder: error naming it, exit code 2" <| fun () ->
            let missing = Path.Combine(Path.GetTempPath(), "moe-launcher-tests", Guid.NewGuid().ToString("N"))
            Directory.CreateDirectory missing |> ignore
            try
                let write name (lines: string list) = File.WriteAllLines(Path.Combine(missing, name), lines); Path.Combine(missing, name)
                let preds, refs = write "p.txt" [ "a cat sat" ], write "r.txt" [ "a cat sat down" ]
                let nowhere = Path.Combine(missing, "no-model")
                badInput [ "score"; "-p"; preds; "-r"; refs; "--bertscore"; nowhere ] ("--bertscore: no such model folder: " + nowhere)
                match sharedData with
                | None -> ()
                | Some data ->
                    let bart = Path.Combine(data, "..", "models", "bart-tiny")
                    badInput [ "score"; "-p"; preds; "-r"; refs; "--bertscore"; bart ] "--bertscore: "
                    badInput [ "summarize"; "--model"; bart; "--data"; refs; "--summac"; bart ] "--summac: "
            finally (try Directory.Delete(missing, true) with _ -> ())

        testCase "an unknown flag is an error naming it, also where a command takes paths" <| fun () ->
            let dir = Path.Combine(Path.GetTempPath(), "moe-launcher-tests", Guid.NewGuid().ToString("N"))
            Directory.CreateDirectory dir |> ignore
            try
                badInput [ "report"; dir; "--output"; "x.html" ] "unknown flag --output; expected a path or one of --out, --samples"
                badInput [ "data"; "inspect"; dir; "--bogus" ] "unknown flag --bogus"
                badInput [ "data"; "inspect"; "--bogus"; dir ] "unknown flag --bogus"
                for command in [ [ "train" ]; [ "sweep"; Path.Combine(dir, "grid.json") ]; [ "info" ]; [ "generate"; "--run"; dir ] ] do
                    let code, output = moe (command @ [ "--bogus" ])
                    Expect.equal code 2 (sprintf "./moe %s --bogus: exit code 2; output:\n%s" (String.concat " " command) output)
                    Expect.stringContains output "unrecognized argument: '--bogus'" "Argu names it"
            finally Directory.Delete(dir, true)

        testCase "data inspect reads what train --data reads: a split folder split by split, --format on it" <| fun () ->
            let dir = Path.Combine(Path.GetTempPath(), "moe-launcher-tests", Guid.NewGuid().ToString("N"))
            Directory.CreateDirectory dir |> ignore
            try
                let line (i: int) = sprintf "{\"id\": \"%d\", \"document\": \"Document %d has words.\", \"summary\": \"Summary %d.\"}" i i i
                for split, n in [ "train", 3; "validation", 2; "test", 1 ] do
                    File.WriteAllLines(Path.Combine(dir, split + ".jsonl"), [ for i in 1 .. n -> line i ])
                for extra in [ []; [ "--format"; "jsonl" ] ] do
                    let code, output = moe ([ "data"; "inspect"; dir ] @ extra)
                    Expect.equal code 0 (sprintf "data inspect %A; output:\n%s" extra output)
                    for split, n in [ "train", 3; "validation", 2; "test", 1 ] do
                        Expect.stringContains output (sprintf "== %s ==\nsource:   %s" split (Path.Combine(dir, split + ".jsonl"))) (sprintf "%s inspected" split)
                        Expect.stringContains output (sprintf "examples: %d kept of %d read" n n) (sprintf "%s counted" split)
                File.Delete(Path.Combine(dir, "test.jsonl"))
                badInput [ "data"; "inspect"; dir ] (dir + ": cannot tell the format of this folder: expected train*/validation*/test* files (a split folder")
                badInput [ "data"; "inspect"; dir; "--format"; "jsonl" ] (dir + ": expected a jsonl file, but this is a folder; a folder holds train*/validation*/test* files")
            finally Directory.Delete(dir, true)

        testCase "train without --router is the main job's top-2 of 4 experts; --k alone resizes it" <| fun () ->
            let ffn (args: string list) =
                let code, out = moe ("train" :: args @ [ "--print-config" ])
                Expect.equal code 0 out
                let json = out.Replace(" ", "").Replace("\n", "")
                json.Substring(json.IndexOf "\"Ffn\":")
            let main = ffn []
            Expect.stringStarts main "\"Ffn\":{\"Moe\":" "an MoE model by default"
            Expect.stringContains main "\"Router\":{\"Experts\":4,\"K\":2," "top-2 of 4"
            Expect.stringContains main "\"TokenChoiceTopK\"" "token-choice top-k"
            Expect.stringContains (ffn [ "--k"; "1" ]) "\"Router\":{\"Experts\":4,\"K\":1," "--k alone"
            Expect.stringStarts (ffn [ "--router"; "dense" ]) "\"Ffn\":{\"Dense\":256}" "--router dense"

        testCase "train --bf16 sets Train.Bf16 in the resolved config" <| fun () ->
            let code, out = moe [ "train"; "--bf16"; "--print-config" ]
            Expect.equal code 0 out
            Expect.stringContains (out.Replace(" ", "")) "\"Bf16\":true" "--bf16 turns bf16 on"
            let code, out = moe [ "train"; "--print-config" ]
            Expect.equal code 0 out
            Expect.stringContains (out.Replace(" ", "")) "\"Bf16\":false" "off by default"
    ]
