/// One call that makes libtorch usable wherever the library runs: a built app, `dotnet fsi` with
/// `#r "nuget: MoeToolkit"`, or the repository's scripts (scripts/prelude.fsx).
///
/// A built app needs nothing here: its deps.json names the native files, and its build patched its copy of
/// libLibTorchSharp.so where the host lacks GLIBCXX_3.4.32 (build/MoeToolkit.targets). `dotnet fsi` has no
/// deps.json and no build: TorchSharp's shim would load straight from the NuGet cache, where it cannot be
/// patched (the cache is shared and must not change). So there libtorch is loaded first, through the same
/// name lookup TorchSharp uses (fsi resolves names in the referenced packages' native folders), and then a
/// patched copy of the shim from a cache folder by absolute path; TorchSharp's later lookup of the shim by
/// name finds the library already loaded.
module Moe.Startup

open System
open System.IO
open System.Runtime.InteropServices
open TorchSharp

/// TorchSharp's native shim, as named in its package.
[<Literal>]
let ShimFile = "libLibTorchSharp.so"

/// The libtorch libraries the shim links against, in dependency order (names as TorchSharp looks them up).
let private libtorchNames = [ "c10"; "torch_cpu"; "torch" ]

/// The libtorch CPU package the toolkit is built against (Directory.Packages.props; a test keeps them equal).
[<Literal>]
let LibtorchCpuVersion = "2.10.0"

/// `name`'s file in the libtorch CPU package beside TorchSharp's in the same package folder
/// (`<packages>/libtorch-cpu-linux-x64/<LibtorchCpuVersion>/runtimes/linux-x64/native/lib<name>.so`), where it
/// exists. fsi resolves native names only for the packages of the script being run, so a script that
/// `#load`s another script that references the packages (as every script here `#load`s prelude.fsx) finds
/// libtorch only this way.
let private besideTorchSharp (shim: string) (name: string) : string option =
    // shim = <packages>/torchsharp/<version>/runtimes/linux-x64/native/libLibTorchSharp.so
    let packages = DirectoryInfo(Path.GetDirectoryName shim).Parent.Parent.Parent.Parent.Parent.FullName
    let file = Path.Combine(packages, "libtorch-cpu-linux-x64", LibtorchCpuVersion, "runtimes", "linux-x64", "native", sprintf "lib%s.so" name)
    if File.Exists file then Some file else None

/// The shim inside TorchSharp's NuGet package folder when TorchSharp.dll was loaded from one
/// (`<package>/<version>/lib/<tfm>/TorchSharp.dll`: `dotnet fsi`, `#r "nuget: ..."`); None in a built app,
/// whose TorchSharp.dll sits in its output folder.
let packagedShim () : string option =
    let location = typeof<torch>.Assembly.Location
    if String.IsNullOrEmpty location then None
    else
        let packageVersionDir = Path.GetFullPath(Path.Combine(Path.GetDirectoryName location, "..", ".."))
        let shim = Path.Combine(packageVersionDir, "runtimes", "linux-x64", "native", ShimFile)
        if File.Exists shim then Some shim else None

/// Where the patched copy of a packaged shim goes: the user's local application data folder
/// (`$XDG_DATA_HOME` or `~/.local/share` on Linux), `moe-toolkit/torchsharp-<version>/`.
let shimCacheDir (shim: string) : string =
    // shim = <package>/<version>/runtimes/linux-x64/native/libLibTorchSharp.so
    let version = DirectoryInfo(Path.GetDirectoryName shim).Parent.Parent.Parent.Name
    let dataHome = Environment.GetFolderPath(Environment.SpecialFolder.LocalApplicationData, Environment.SpecialFolderOption.DoNotVerify)
    if String.IsNullOrEmpty dataHome then
        invalidOp "expected a home folder or XDG_DATA_HOME for the patched copy of TorchSharp's native shim; neither is set"
    Path.Combine(dataHome, "moe-toolkit", "torchsharp-" + version)

/// A copy of `shim` in `cacheDir`, refreshed when the shim's time stamp differs, and patched when the host's
/// libstdc++ lacks GLIBCXX_3.4.32. The copy is written through a temporary file and a rename, so a
/// concurrent reader sees the old file or the new one.
let patchedShimCopy (cacheDir: string) (shim: string) : string =
    let copy = Path.Combine(cacheDir, ShimFile)
    let stamp = File.GetLastWriteTimeUtc shim
    if not (File.Exists copy) || File.GetLastWriteTimeUtc copy <> stamp then
        Directory.CreateDirectory cacheDir |> ignore
        let tmp = sprintf "%s.%d.copy" copy Environment.ProcessId
        File.Copy(shim, tmp, true)
        File.SetLastWriteTimeUtc(tmp, stamp)
        File.Move(tmp, copy, true)
    if not (GlibcxxPatch.hostHasVersion GlibcxxPatch.NeededVersion) then GlibcxxPatch.patchFile copy |> ignore
    copy

/// Loads libtorch and a patched copy of the shim when TorchSharp runs from its NuGet package folder on Linux
/// (see the module comment); nothing in a built app or on other systems, where TorchSharp's loader is right.
let loadNatives () : unit =
    if OperatingSystem.IsLinux() then
        match packagedShim () with
        | None -> ()
        | Some shim ->
            let torchAssembly = typeof<torch>.Assembly
            for name in libtorchNames do
                match NativeLibrary.TryLoad(name, torchAssembly, Nullable()) with
                | true, _ -> ()
                | false, _ ->
                    match besideTorchSharp shim name with
                    | Some file -> NativeLibrary.Load file |> ignore
                    | None ->
                        invalidOp (
                            sprintf "could not load libtorch's %s by name nor from libtorch-cpu-linux-x64 %s beside TorchSharp's package: " name LibtorchCpuVersion
                            + "reference a libtorch package next to MoeToolkit (it brings libtorch-cpu-linux-x64; for CUDA, TorchSharp-cuda-linux), "
                            + "e.g. #r \"nuget: libtorch-cpu-linux-x64\"")
            NativeLibrary.Load(patchedShimCopy (shimCacheDir shim) shim) |> ignore

/// The one call before any tensor: OpenMP's passive wait and the CPU allocator policy (`Native.startup`), the
/// native libraries (`loadNatives`), then one libtorch operation (`Native.initialise`), which throws with the
/// loader's message when libtorch cannot start. Safe to call more than once.
let initialise () : unit =
    Native.startup ()
    loadNatives ()
    Native.initialise ()
