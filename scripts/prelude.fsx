// Loads the toolkit into `dotnet fsi` with no build step: package references, native libraries
// by absolute path, then the library's sources in their compile order.
//
// Why natives by hand: fsi has no deps.json, so TorchSharp would look libtorch up by name and may
// pick a system copy. Loading libc10, libtorch_cpu, libtorch and a GLIBCXX-patched copy of
// libLibTorchSharp first makes every later lookup by name resolve to these.
#r "nuget: TorchSharp, 0.107.0"
#r "nuget: libtorch-cpu-linux-x64, 2.10.0"
#r "nuget: Microsoft.ML.Tokenizers, 2.0.1"
#r "nuget: Microsoft.ML.Tokenizers.Data.Cl100kBase, 2.0.1"
#r "nuget: Parquet.Net, 6.1.0"
#r "nuget: CsvHelper, 34.0.0"
#r "nuget: Plotly.NET, 6.0.0"
#load "../build/GlibcxxPatch.fs"

module Prelude =
    open System
    open System.IO
    open System.Runtime.InteropServices

    let private packages =
        match Environment.GetEnvironmentVariable "NUGET_PACKAGES" with
        | null | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".nuget", "packages")
        | p -> p

    let private nativeDir package version =
        let dir = Path.Combine(packages, package, version, "runtimes", "linux-x64", "native")
        if not (Directory.Exists dir) then
            failwithf "expected the NuGet package %s %s at %s (the #r lines above restore it; check NUGET_PACKAGES)" package version dir
        dir

    /// Loads libtorch and the patched shim; on non-Linux hosts TorchSharp's own loader is used as is.
    let loadNatives () =
        if OperatingSystem.IsLinux() then
            let torchDir = nativeDir "libtorch-cpu-linux-x64" "2.10.0"
            for lib in [ "libc10.so"; "libtorch_cpu.so"; "libtorch.so" ] do
                NativeLibrary.Load(Path.Combine(torchDir, lib)) |> ignore
            let shim = Path.Combine(nativeDir "torchsharp" "0.107.0", "libLibTorchSharp.so")
            let cache = Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.LocalApplicationData, "moe-toolkit", "torchsharp-0.107.0")
            let patched = Path.Combine(cache, "libLibTorchSharp.so")
            if not (File.Exists patched) || File.GetLastWriteTimeUtc patched <> File.GetLastWriteTimeUtc shim then
                Directory.CreateDirectory cache |> ignore
                let tmp = patched + ".copy"
                File.Copy(shim, tmp, true)
                File.SetLastWriteTimeUtc(tmp, File.GetLastWriteTimeUtc shim)
                File.Move(tmp, patched, true)
            if not (GlibcxxPatch.hostHasVersion GlibcxxPatch.NeededVersion) then GlibcxxPatch.patchFile patched |> ignore
            NativeLibrary.Load patched |> ignore

#load "../src/Core/Native.fs"
Moe.Native.preferPassiveOpenMpWait ()
Prelude.loadNatives ()

#load "../src/Core/Tensors.fs"
#load "../src/Core/Config.fs"
#load "../src/Core/Json.fs"
#load "../src/Core/FusedExperts.fs"
#load "../src/Routing.fs"
#load "../src/Layers.fs"
#load "../src/Models/Attention.fs"
#load "../src/Models/Models.fs"
#load "../src/Models/Upcycle.fs"
#load "../src/Models/Generate.fs"
#load "../src/Pretrained/Safetensors.fs"
#load "../src/Pretrained/Gpt2.fs"
#load "../src/Text/Tokenizers.fs"
#load "../src/Text/TextTools.fs"
#load "../src/Text/Data.fs"
#load "../src/Text/DataInspection.fs"
#load "../src/Text/Corpus.fs"
#load "../src/Text/Batching.fs"
#load "../src/Eval/Basics.fs"
#load "../src/Eval/Porter.fs"
#load "../src/Eval/Rouge.fs"
#load "../src/Eval/Bleu.fs"
#load "../src/Eval/Abstractiveness.fs"
#load "../src/Eval/Bootstrap.fs"
#load "../src/Eval/ModelBased.fs"
#load "../src/Eval/Scoring.fs"
#load "../src/Eval/HumanEval.fs"
#load "../src/Train/Config.fs"
#load "../src/Train/Optimizer.fs"
#load "../src/Train/Task.fs"
#load "../src/Train/State.fs"
#load "../src/Train/Checkpoint.fs"
#load "../src/Train/RunFiles.fs"
#load "../src/Train/RunFolder.fs"
#load "../src/Train.fs"
#load "../src/Runs/Summarizer.fs"
#load "../src/Runs/RunLog.fs"
#load "../src/Reports/Browser.fs"
#load "../src/Reports/Plots.fs"
#load "../src/Reports/Report.fs"
#load "../src/Sweep/ConfigTree.fs"
#load "../src/Sweep/Schema.fs"
#load "../src/Sweep/Grid.fs"
#load "../src/Sweep/Runner.fs"
#load "../src/Sweep/Results.fs"
#load "../src/Sweep/Slurm.fs"
#load "../src/Sweep/SweepRunner.fs"
#load "../src/Studies/LoraExperiment.fs"
#load "../src/Studies/Analysis.fs"
#load "../src/Studies/Experiments.fs"
#load "../src/Bench/Measure.fs"
#load "../src/Bench/Reference.fs"
#load "../src/Bench/Layer.fs"
#load "../src/Bench/TrainStep.fs"
#load "../src/Bench/Facade.fs"
