module Moe.Tests.FoundationTests

open System
open System.IO
open System.Text.RegularExpressions
open Expecto
open TorchSharp
open Moe

let tests =
    testList "Foundation" [
        testCase "libtorch initialises and computes" <| fun () ->
            Native.initialise ()
            use a = torch.tensor ([| 1.0f; 2.0f; 3.0f |])
            Expect.floatClose Accuracy.high (Tensors.scalar (a.sum ())) 6.0 "1 + 2 + 3"

        testCase "the bin copy of libLibTorchSharp.so is patched where the host lacks GLIBCXX_3.4.32" <| fun () ->
            let shim = Path.Combine(System.AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libLibTorchSharp.so")
            if not (File.Exists shim) then skiptest "no linux-x64 libLibTorchSharp.so in this build"
            let offsets = GlibcxxPatch.vernauxFlagOffsets GlibcxxPatch.NeededVersion (File.ReadAllBytes shim)
            if GlibcxxPatch.hostHasVersion GlibcxxPatch.NeededVersion then
                Expect.isTrue true "host libstdc++ has the version; no patch needed"
            else
                let bytes = File.ReadAllBytes shim
                Expect.isNonEmpty offsets "the shim lists GLIBCXX_3.4.32"
                for o in offsets do
                    Expect.equal (int bytes[int o] &&& 2) 2 "VER_FLG_WEAK set on the GLIBCXX_3.4.32 need"

        testCase "device parsing names what it expected" <| fun () ->
            Expect.equal (Native.parseDevice "CPU") (Ok Native.Cpu) "case-insensitive"
            Expect.equal (Native.parseDevice "auto") (Ok Native.Auto) "auto"
            match Native.parseDevice "gpu" with
            | Error msg -> Expect.stringContains msg "auto|cpu|cuda" "lists the choices"
            | Ok _ -> failtest "gpu is not a device name"

        testCase "auto picks the CPU when there is no GPU; cuda without one is an error" <| fun () ->
            if Native.cudaAvailable () then
                Expect.equal (Native.resolveDevice Native.Auto).``type`` DeviceType.CUDA "auto takes the GPU"
            else
                Expect.equal (Native.resolveDevice Native.Auto).``type`` DeviceType.CPU "auto falls to CPU"
                Expect.throwsT<System.InvalidOperationException> (fun () -> Native.resolveDevice Native.Cuda |> ignore) "no silent fallback"

        testCase "the same seed repeats CPU random draws" <| fun () ->
            let draw () =
                Native.seedAll 17
                use r = torch.randn (5L)
                Tensors.toFloats r
            Expect.sequenceEqual (draw ()) (draw ()) "same seed, same draws"

        testCase "the CPU allocator policy the environment asks for is in force after the tests' start-up" <| fun () ->
            let asked = Native.cpuAllocatorFromEnvironment ()
            Expect.equal (Native.cpuAllocatorInForce ()) asked "Main ran Native.startup"
            match asked with
            | Native.Retain _ ->
                // glibc maps blocks above 32 MiB on their own under its defaults; under the policy the heap serves them.
                Expect.isTrue (Native.heapServes 40) "a 40 MiB block comes from the heap"
            | Native.SystemAllocator | Native.UserTunables _ -> ()
            Expect.throwsT<InvalidOperationException> (fun () -> Native.useCpuAllocator Native.SystemAllocator)
                "glibc cannot be put back to its defaults in-process; the error says to start with MOE_CPU_ALLOCATOR=system"
            Expect.equal (Native.CpuAllocator.parse "RETAIN") (Ok Native.CpuAllocator.retain) "case-insensitive"
            match Native.CpuAllocator.parse "jemalloc" with
            | Error msg -> Expect.stringContains msg "system|retain" "lists the choices"
            | Ok a -> failtestf "jemalloc is not a policy, got %A" a

        testCase "the script prelude and Startup.initialise start the policy before libtorch loads" <| fun () ->
            let lines = File.ReadAllLines(Path.Combine(Support.repoRoot, "scripts", "prelude.fsx")) |> Array.map (fun l -> l.Trim())
            let at (line: string) =
                match Array.tryFindIndex ((=) line) lines with
                | Some i -> i
                | None -> failtestf "expected the line %s in scripts/prelude.fsx" line
            let start = at "Moe.Startup.initialise ()"
            Expect.isLessThan (at "#load \"../src/Core/Startup.fs\"") start "Startup is loaded first"
            Expect.isLessThan start (at "#load \"../src/Core/Tensors.fs\"") "before any other source"
            // Startup.initialise runs Native.startup before it loads libtorch; here (libtorch already loaded) it
            // is idempotent and leaves the policy the environment asks for in force.
            Startup.initialise ()
            Expect.equal (Native.cpuAllocatorInForce ()) (Native.cpuAllocatorFromEnvironment ()) "policy in force after Startup.initialise"
            let body = File.ReadAllText(Path.Combine(Support.repoRoot, "src", "Core", "Startup.fs"))
            let initialise = body.Substring(body.IndexOf "let initialise () : unit =")
            Expect.isLessThan (initialise.IndexOf "Native.startup ()") (initialise.IndexOf "loadNatives ()") "the policy is set before the natives load"

        testCase "shape errors name the expected layout" <| fun () ->
            use t = torch.zeros ([| 4L; 3L; 8L |], dtype = torch.int64)
            let ex = Expect.throwsC (fun () -> Tensors.expectFloat "logits" "[T; E]" 2 t) id
            Expect.stringContains ex.Message "expected logits [T; E] floating point, got [4; 3; 8] int64" "message"
    ]

/// The library's sources (paths relative to src/) in the fsproj's compile order.
let private librarySources () : string[] =
    File.ReadAllLines(Path.Combine(Support.repoRoot, "src", "Moe.fsproj"))
    |> Array.choose (fun l ->
        let m = System.Text.RegularExpressions.Regex.Match(l, "<Compile Include=\"([^\"]+)\"")
        if m.Success then Some m.Groups[1].Value else None)
    |> Array.filter (fun f -> not (f.StartsWith "../"))

/// A compiled file's layer: its folder with a trailing slash, or the file itself at the root of src/.
let private layerOf (file: string) : string =
    match file.LastIndexOf '/' with
    | -1 -> file
    | i -> file.Substring(0, i + 1)

/// Each layer of src/ in compile order with the layers its files refer to: a file refers to an earlier file
/// of another layer when, outside comments and strings, it opens that file's module or namespace or writes
/// one of its names (full, last part, or without the leading `Moe.`) followed by a dot.
let private layerUses () : (string * Set<string>)[] =
    let files = librarySources ()
    let src f = File.ReadAllText(Path.Combine(Support.repoRoot, "src", f))
    let declared = Regex(@"^(?:\[<AutoOpen>\]\s*)?(?:module|namespace)\s+([\w.]+)", RegexOptions.Multiline)
    let code (text: string) =
        let noBlock = Regex.Replace(text, @"\(\*.*?\*\)", "", RegexOptions.Singleline)
        let noStrings = Regex.Replace(noBlock, "\"(?:[^\"\\\\]|\\\\.)*\"", "\"\"")
        Regex.Replace(noStrings, "//.*", "")
    let referrers =
        files
        |> Array.map (fun f ->
            let full = declared.Match(src f).Groups[1].Value
            let parts = full.Split '.'
            let names = [ full; parts[parts.Length - 1]; String.Join(".", parts[1..]) ] |> List.filter ((<>) "") |> List.distinct
            let patterns = Regex(@"\bopen\s+" + Regex.Escape full + @"\b") :: [ for n in names -> Regex(@"(?<![\w.])" + Regex.Escape n + @"\.[A-Za-z]") ]
            f, patterns)
    let layers = files |> Array.map layerOf |> Array.distinct
    [| for layer in layers ->
         let used =
             files
             |> Array.mapi (fun i f -> i, f)
             |> Array.filter (fun (_, f) -> layerOf f = layer)
             |> Array.collect (fun (i, f) ->
                 let text = code (src f)
                 referrers[.. i - 1]
                 |> Array.filter (fun (g, patterns) -> layerOf g <> layer && patterns |> List.exists (fun p -> p.IsMatch text))
                 |> Array.map (fst >> layerOf))
             |> Set.ofArray
         layer, used |]

/// The README's table rows that `row` matches, between the line containing `startMarker` and the next line
/// starting with `endPrefix`.
let private readmeRows (startMarker: string) (endPrefix: string) (row: Regex) : Match[] =
    File.ReadAllLines(Path.Combine(Support.repoRoot, "README.md"))
    |> Array.skipWhile (fun l -> not (l.Contains startMarker))
    |> Array.takeWhile (fun l -> not (l.StartsWith endPrefix))
    |> Array.map row.Match
    |> Array.filter (fun m -> m.Success)

/// The script prelude must load the library's sources in the fsproj's compile order and pin the same
/// package versions as Directory.Packages.props, or scripts and the compiled library drift apart.
let consistency =
    testList "Foundation.consistency" [
        testCase "prelude #load list equals the fsproj compile order" <| fun () ->
            let loaded =
                File.ReadAllLines(Path.Combine(Support.repoRoot, "scripts", "prelude.fsx"))
                |> Array.choose (fun l ->
                    let m = System.Text.RegularExpressions.Regex.Match(l, "^#load \"\\.\\./src/([^\"]+)\"")
                    if m.Success then Some m.Groups[1].Value else None)
            Expect.sequenceEqual loaded (librarySources ()) "scripts/prelude.fsx #load order = src/Moe.fsproj <Compile> order"

        testCase "every library source is compiled, and each folder is one contiguous layer" <| fun () ->
            let compiled = librarySources ()
            let src = Path.Combine(Support.repoRoot, "src")
            let onDisk =
                Directory.GetFiles(src, "*.fs", SearchOption.AllDirectories)
                |> Array.map (fun f -> Path.GetRelativePath(src, f).Replace('\\', '/'))
                |> Array.filter (fun f -> not (f.StartsWith "obj/" || f.StartsWith "bin/"))
            Expect.sequenceEqual (Array.sort onDisk) (Array.sort compiled) "files under src/ = the fsproj's <Compile> items"
            // A folder that reappears after another one would mean a layer reaching into a later one.
            let folderOf (f: string) = match f.LastIndexOf '/' with -1 -> "" | i -> f.Substring(0, i)
            let runs = compiled |> Array.map folderOf |> Array.fold (fun acc d -> match acc with h :: _ when h = d -> acc | _ -> d :: acc) [] |> List.rev
            let folders = runs |> List.filter ((<>) "")
            Expect.equal (List.distinct folders) folders (sprintf "each folder's files are adjacent in the compile order (folder runs: %A)" runs)

        testCase "README layout table: each layer's uses column is what its sources refer to" <| fun () ->
            let documented =
                readmeRows "**Layout.**" "- **Packages" (Regex(@"^\s*\| `([^`]+)` \| .* \| ([^|]*) \|\s*$"))
                |> Array.map (fun m ->
                    let uses = m.Groups[2].Value.Trim()
                    let used = if uses = "-" then Set.empty else uses.Split(',', StringSplitOptions.TrimEntries) |> Array.map (fun u -> u.Trim '`') |> Set.ofArray
                    m.Groups[1].Value, used)
            let actual = layerUses ()
            Expect.sequenceEqual (documented |> Array.map fst) (actual |> Array.map fst) "the table lists every layer, in compile order"
            for (layer, claimed), (_, found) in Array.zip documented actual do
                Expect.equal claimed found (sprintf "README uses column of %s (what its sources refer to)" layer)

        testCase "README C# entry points exist under the namespace and in the folder it names" <| fun () ->
            let rows = readmeRows "The C# entry points" "**PEFT" (Regex(@"^\| `([^`]+)` \| `([\w.]+)` \| (.*) \|\s*$"))
            Expect.isGreaterThanOrEqual rows.Length 8 "the table has its rows"
            let assembly = typeof<Moe.Layers.MoeApi>.Assembly
            for m in rows do
                let folder, ns = m.Groups[1].Value, m.Groups[2].Value
                for entry in Regex.Matches(m.Groups[3].Value, "`([\\w.]+)`") |> Seq.map (fun e -> e.Groups[1].Value) do
                    // C# writes a type nested in an F# module as Module.Type; the CLR names it Module+Type.
                    let clrName = ns + "." + entry.Replace(".", "+")
                    let t = assembly.GetType clrName
                    Expect.isNotNull t (sprintf "%s (using %s) is the CLR type %s" entry ns clrName)
                    Expect.isTrue (t.IsPublic || t.IsNestedPublic) (sprintf "%s is public" entry)
                    Expect.isNonEmpty (t.GetMethods(Reflection.BindingFlags.Public ||| Reflection.BindingFlags.Static)) (sprintf "%s has static entry points" entry)
                    let dir = Path.Combine(Support.repoRoot, (if folder = "src/" then "src" else Path.Combine("src", folder.TrimEnd '/')))
                    let declares = Regex(@"^\s*type " + Regex.Escape(entry.Split('.') |> Array.last) + @"\b", RegexOptions.Multiline)
                    let inFolder = Directory.GetFiles(dir, "*.fs") |> Array.exists (fun f -> declares.IsMatch(File.ReadAllText f))
                    Expect.isTrue inFolder (sprintf "%s is declared in a file of %s" entry folder)

        testCase "prelude package versions equal Directory.Packages.props" <| fun () ->
            let root = Support.repoRoot
            let pinned =
                System.Xml.Linq.XDocument.Load(Path.Combine(root, "Directory.Packages.props")).Descendants()
                |> Seq.filter (fun e -> e.Name.LocalName = "PackageVersion")
                |> Seq.map (fun e -> e.Attribute(System.Xml.Linq.XName.Get "Include").Value.ToLowerInvariant(), e.Attribute(System.Xml.Linq.XName.Get "Version").Value)
                |> Map.ofSeq
            let refs =
                File.ReadAllLines(Path.Combine(root, "scripts", "prelude.fsx"))
                |> Array.choose (fun l ->
                    let m = System.Text.RegularExpressions.Regex.Match(l, "^#r \"nuget: ([^,]+), ([^\"]+)\"")
                    if m.Success then Some(m.Groups[1].Value.Trim(), m.Groups[2].Value.Trim()) else None)
            Expect.isNonEmpty refs "prelude references packages"
            for name, version in refs do
                Expect.equal (Map.tryFind (name.ToLowerInvariant()) pinned) (Some version) (sprintf "%s version in prelude vs Directory.Packages.props" name)
            Expect.equal (Map.tryFind "libtorch-cpu-linux-x64" pinned) (Some Startup.LibtorchCpuVersion) "Startup.LibtorchCpuVersion vs Directory.Packages.props"
    ]
