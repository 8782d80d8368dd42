/// The NuGet packages as a user gets them: `dotnet pack` of the library (MoeToolkit) and the CLI tool
/// (MoeToolkit.Cli) into a temporary local feed, then, from a temporary folder outside the repository, a fresh
/// C# console project and a fresh F# script that take the library from that feed, and the tool installed into a
/// temporary tool path. Their own packages go to a temporary NuGet folder (the machine's NuGet cache serves
/// the dependencies read-only, as a fallback folder), so nothing is read from or written to HOME's NuGet cache
/// or data folders, and nothing a previous run left behind can stand in for this run's packages.
module Moe.Tests.PackagingTests

open System
open System.IO
open System.IO.Compression
open System.Text.RegularExpressions
open System.Xml.Linq
open Expecto
open Moe.Tests.Support

/// `VersionPrefix` of Directory.Build.props: the one place the version is set.
let private versionPrefix () : string =
    XDocument.Load(Path.Combine(repoRoot, "Directory.Build.props")).Descendants()
    |> Seq.filter (fun e -> e.Name.LocalName = "VersionPrefix")
    |> Seq.map (fun e -> e.Value.Trim())
    |> Seq.exactlyOne

/// Runs a command line with bash in `cwd`; fails the test with the output when it exits non-zero.
let private run (cwd: string) (env: (string * string) list) (what: string) (command: string) : string =
    let code, output = bash cwd env [ "-c"; command ]
    if code <> 0 then failtestf "%s: `%s` exited with %d:\n%s" what command code output
    output

/// The machine's NuGet global packages folder (where the repository's own restores put the dependencies).
let private globalPackages () : string =
    let output = run repoRoot [] "locate the NuGet cache" "dotnet nuget locals global-packages --list"
    let m = Regex.Match(output, @"global-packages:\s*(\S.*?)\s*$", RegexOptions.Multiline)
    if not m.Success then failtestf "expected 'global-packages: PATH' from dotnet nuget locals, got:\n%s" output
    m.Groups[1].Value

/// The nuspec inside a .nupkg.
let private nuspec (nupkg: string) : XDocument =
    use zip = ZipFile.OpenRead nupkg
    let entry = zip.Entries |> Seq.find (fun e -> e.FullName.EndsWith ".nuspec" && not (e.FullName.Contains "/"))
    use s = entry.Open()
    XDocument.Load s

let private entries (nupkg: string) : Set<string> =
    use zip = ZipFile.OpenRead nupkg
    zip.Entries |> Seq.map (fun e -> e.FullName) |> Set.ofSeq

let private metadata (doc: XDocument) (name: string) : string =
    match doc.Descendants() |> Seq.tryFind (fun e -> e.Name.LocalName = name) with
    | Some e -> e.Value
    | None -> failtestf "expected <%s> in the nuspec" name

/// True when the shim's GLIBCXX_3.4.32 need is marked weak (what build/GlibcxxPatch.fs does).
let private shimIsWeak (path: string) : bool =
    let elf = File.ReadAllBytes path
    let offsets = GlibcxxPatch.vernauxFlagOffsets GlibcxxPatch.NeededVersion elf
    not offsets.IsEmpty && offsets |> List.forall (fun o -> BitConverter.ToUInt16(elf, int o) &&& 0x2us <> 0us)

/// What the C# program and the F# script both do: a 4-expert top-2 layer, forward and backward, routing statistics.
let private csharpProgram = """
using MoeToolkit;
using TorchSharp;

MoeRuntime.Initialize();
MoeRuntime.Seed(3);
using var layer = new MoeLayer(new MoeLayerOptions
{
    ModelDim = 16, ExpertHidden = 32,
    Router = new RouterOptions { Experts = 4, TopK = 2, CapacityFactor = 1.25 },
});
layer.Train();
using var x = torch.randn(64, 16);
using var y = layer.Forward(x);
using var loss = y.Output.square().mean() + y.AuxLoss();
loss.backward();
Console.WriteLine($"routing: {y.Statistics}");
foreach (var (name, p) in layer.NamedParameters())
    Console.WriteLine($"grad {name}: {p.grad.norm().item<float>()}");
"""

let private fsharpScript (feed: string) (version: string) = $"""
#i "nuget: {feed}"
#r "nuget: MoeToolkit, {version}"
open MoeToolkit
open TorchSharp

MoeRuntime.Initialize ()
MoeRuntime.Seed 3
let options = MoeLayerOptions(ModelDim = 16, ExpertHidden = 32, Router = RouterOptions(Experts = 4, TopK = 2, CapacityFactor = 1.25))
let layer = new MoeLayer(options)
layer.Train () |> ignore
let x = torch.randn (64L, 16L)
let y = layer.Forward x
let loss = y.Output.square().mean() + y.AuxLoss ()
loss.backward ()
printfn "routing: %%O" y.Statistics
for struct (name, p) in layer.NamedParameters () do
    printfn "grad %%s: %%f" name (p.grad.norm().item<float32> ())
"""

/// Checks the output of the C# program or the F# script: fractions per expert summing to 1, and every
/// parameter reached by backward.
let private expectRouting (who: string) (output: string) =
    let m = Regex.Match(output, @"routing: tokens per expert \[([^\]]*)\], load CV ([0-9.]+), dropped ([0-9.]+), router entropy ([0-9.]+) nats")
    if not m.Success then failtestf "%s: expected a 'routing: tokens per expert [...]' line, got:\n%s" who output
    let fractions = m.Groups[1].Value.Split(' ', StringSplitOptions.RemoveEmptyEntries) |> Array.map float
    Expect.equal fractions.Length 4 (sprintf "%s: one fraction per expert" who)
    Expect.floatClose { absolute = 4e-3; relative = 0.0 } (Array.sum fractions) 1.0 (sprintf "%s: fractions sum to 1 (3 decimals each)" who)
    Expect.isGreaterThan (float m.Groups[4].Value) 0.0 (sprintf "%s: router entropy > 0" who)
    let grads =
        Regex.Matches(output, @"grad (\S+): ([0-9.eE+-]+)") |> Seq.map (fun g -> g.Groups[1].Value, float g.Groups[2].Value) |> Map.ofSeq
    for p in [ "router.weight"; "experts.w1"; "experts.w2" ] do
        match grads.TryFind p with
        | Some g -> Expect.isGreaterThan g 0.0 (sprintf "%s: backward reached %s" who p)
        | None -> failtestf "%s: expected a gradient line for %s in:\n%s" who p output

let tests =
    testSequenced <| testList "Packaging" [
        testCase "dotnet pack; a fresh C# project and a fresh F# script use MoeToolkit from the feed; the moe tool installs and scores" <| fun () ->
            let tmp = Directory.CreateTempSubdirectory("moe-packaging-").FullName
            // Seconds per phase, printed at the end: this is one of the suite's slowest tests.
            let clock = Diagnostics.Stopwatch.StartNew()
            let phases = Collections.Generic.List<string>()
            let phase (name: string) =
                phases.Add(sprintf "%s %.0f s" name clock.Elapsed.TotalSeconds)
                clock.Restart()
            try
                let feed = Path.Combine(tmp, "feed")
                let cache = globalPackages ()
                // A version no cache can hold: the one place's prefix and a suffix for this run.
                let version = sprintf "%s-local.%s" (versionPrefix ()) (DateTime.UtcNow.ToString "yyyyMMddHHmmss")
                let quiet = "--nologo -v q -nodeReuse:false -p:UseSharedCompilation=false"
                // Release, as a release is packed. Never Debug: that build's Moe.dll is hard-linked into the running
                // test binary's folder, and a rebuild (a source edited during the run) would rewrite it in place.
                // The launcher tests before this one leave the Release build up to date.
                for project in [ "src/Moe.fsproj"; "cli/Moe.Cli.fsproj" ] do
                    run repoRoot [] ("pack " + project) (sprintf "dotnet pack %s -c Release -o '%s' -p:PackageVersion=%s %s" project feed version quiet) |> ignore
                phase "pack"

                // The packages: metadata, the build targets and the patched shim inside the tool.
                let lib, tool = Path.Combine(feed, sprintf "MoeToolkit.%s.nupkg" version), Path.Combine(feed, sprintf "MoeToolkit.Cli.%s.nupkg" version)
                for p in [ lib; tool ] do Expect.isTrue (File.Exists p) (sprintf "%s was packed" (Path.GetFileName p))
                let spec = nuspec lib
                for field in [ "description"; "license"; "readme"; "tags"; "authors" ] do
                    Expect.isNotEmpty (metadata spec field) (sprintf "the library's nuspec has a %s" field)
                Expect.isNotEmpty ((spec.Descendants() |> Seq.find (fun e -> e.Name.LocalName = "repository")).Attribute(XName.Get "commit").Value) "repository commit"
                let dependencies = spec.Descendants() |> Seq.filter (fun e -> e.Name.LocalName = "dependency") |> Seq.map (fun e -> e.Attribute(XName.Get "id").Value) |> Set.ofSeq
                Expect.isTrue (dependencies.Contains "TorchSharp" && dependencies.Contains "libtorch-cpu-linux-x64") (sprintf "depends on TorchSharp and libtorch-cpu-linux-x64: %A" dependencies)
                let libFiles = entries lib
                for f in [ "lib/net10.0/Moe.dll"; "lib/net10.0/Moe.xml"; "README.md"; "buildTransitive/MoeToolkit.targets"; "buildTransitive/patch-glibcxx.fsx"; "buildTransitive/GlibcxxPatch.fs" ] do
                    Expect.isTrue (libFiles.Contains f) (sprintf "the library package holds %s" f)
                let toolType = (nuspec tool).Descendants() |> Seq.find (fun e -> e.Name.LocalName = "packageType")
                Expect.equal (toolType.Attribute(XName.Get "name").Value) "DotnetTool" "the CLI is a .NET tool"

                // Child processes: packages of this run in tmp, the machine's cache as a read-only fallback, data in tmp.
                let env =
                    [ "NUGET_PACKAGES", Path.Combine(tmp, "packages")
                      "NUGET_FALLBACK_PACKAGES", cache
                      "XDG_DATA_HOME", Path.Combine(tmp, "data")
                      "DOTNET_CLI_TELEMETRY_OPTOUT", "1"
                      "DOTNET_NOLOGO", "1"
                      "DOTNET_CLI_USE_MSBUILD_SERVER", "0" ]
                File.WriteAllText(Path.Combine(tmp, "nuget.config"),
                                  $"""<?xml version="1.0" encoding="utf-8"?>
<configuration><packageSources><add key="moe-local-feed" value="{feed}" /></packageSources></configuration>""")
                let hostLacksGlibcxx = OperatingSystem.IsLinux() && not (GlibcxxPatch.hostHasVersion GlibcxxPatch.NeededVersion)
                let cachedShim = Path.Combine(cache, "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so")
                let cachedShimWeak = File.Exists cachedShim && shimIsWeak cachedShim

                // (a) A fresh C# console project.
                let app = Path.Combine(tmp, "CsApp")
                run tmp env "dotnet new console" "dotnet new console -o CsApp --no-restore" |> ignore
                run app env "dotnet add package" (sprintf "dotnet add package MoeToolkit --version %s" version) |> ignore
                File.WriteAllText(Path.Combine(app, "Program.cs"), csharpProgram)
                run app env "build the C# project" (sprintf "dotnet build %s" quiet) |> ignore
                let binShim = Path.Combine(app, "bin", "Debug", "net10.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so")
                if hostLacksGlibcxx then
                    Expect.isTrue (shimIsWeak binShim) "this host lacks GLIBCXX_3.4.32: the package's buildTransitive target patched the app's copy of the shim"
                expectRouting "C# project" (run app env "run the C# project" "dotnet bin/Debug/net10.0/CsApp.dll")
                phase "C# project"

                // (b) A fresh F# script.
                let scriptDir = Path.Combine(tmp, "script")
                Directory.CreateDirectory scriptDir |> ignore
                File.WriteAllText(Path.Combine(scriptDir, "moe.fsx"), fsharpScript feed version)
                expectRouting "F# script" (run scriptDir env "dotnet fsi moe.fsx" "dotnet fsi moe.fsx")
                if hostLacksGlibcxx then
                    let copy = Path.Combine(tmp, "data", "moe-toolkit", "torchsharp-0.107.0", "libLibTorchSharp.so")
                    Expect.isTrue (File.Exists copy && shimIsWeak copy) "the script ran with a patched copy of the shim in XDG_DATA_HOME"
                Expect.equal (File.Exists cachedShim && shimIsWeak cachedShim) cachedShimWeak "the NuGet cache's shim is left as it was"
                phase "F# script"

                // (c) The tool.
                let tools = Path.Combine(tmp, "tools")
                run tmp env "dotnet tool install" (sprintf "dotnet tool install MoeToolkit.Cli --version %s --tool-path '%s'" version tools) |> ignore
                let moe = Path.Combine(tools, "moe")
                let help = run tmp env "moe --help" (sprintf "'%s' --help" moe)
                for command in [ "train"; "score"; "report" ] do Expect.stringContains help command (sprintf "moe --help lists %s" command)
                let predictions = [| "the cat sat on the mat"; "a storm closed the harbour on monday" |]
                let references = [| "the cat was on the mat"; "the harbour closed on monday after a storm" |]
                File.WriteAllLines(Path.Combine(tmp, "pred.txt"), predictions)
                File.WriteAllLines(Path.Combine(tmp, "ref.txt"), references)
                let json = run tmp env "moe score" (sprintf "'%s' score -p pred.txt -r ref.txt --json" moe)
                let expected = Moe.Metrics.Scorer.ToJson(Moe.Metrics.Scorer.Score(predictions, references, null, false))
                Expect.equal (json.Trim()) (expected.Trim()) "moe score --json from the installed tool = the library's scores of the same lines"
                phase "tool"
                printfn "packaging test: %s" (String.Join(", ", phases))
            finally
                try Directory.Delete(tmp, true) with _ -> ()
    ]
