/// Makes TorchSharp's native shim load on hosts whose libstdc++ predates GLIBCXX_3.4.32
/// (Debian 12, Ubuntu 22.04). TorchSharp 0.107's libLibTorchSharp.so lists GLIBCXX_3.4.32 in its
/// version needs, but no relocation uses the one symbol that requires it, so marking that need weak
/// (VER_FLG_WEAK in its Vernaux entry) lets the dynamic loader accept an older libstdc++.
/// Shared by the MSBuild targets (build/MoeToolkit.targets, through build/patch-glibcxx.fsx; the MoeToolkit
/// package ships all three) and the library's start-up (`Startup.initialise`).
/// Files are rewritten through a temporary file and a rename, so a hard link into the NuGet cache
/// is replaced, never modified.
module GlibcxxPatch

open System
open System.IO
open System.Text

/// The version need that the host may lack.
[<Literal>]
let NeededVersion = "GLIBCXX_3.4.32"

// ELF constants (System V gABI; GNU symbol versioning as in glibc's elf.h).
let private shtGnuVerneed = 0x6ffffffeu
let private verFlgWeak = 0x2us

type PatchOutcome =
    | Patched
    | AlreadyWeak
    | NotNeeded

let private u16 (b: byte[]) (o: int64) = BitConverter.ToUInt16(b, int o)
let private u32 (b: byte[]) (o: int64) = BitConverter.ToUInt32(b, int o)
let private u64 (b: byte[]) (o: int64) = BitConverter.ToUInt64(b, int o)

let private cString (b: byte[]) (o: int64) =
    let start = int o
    let mutable stop = start
    while stop < b.Length && b[stop] <> 0uy do stop <- stop + 1
    Encoding.ASCII.GetString(b, start, stop - start)

/// Byte offsets of the `vna_flags` fields of every Vernaux entry whose name is `version`.
let vernauxFlagOffsets (version: string) (elf: byte[]) : int64 list =
    let isElf64Le = elf.Length > 64 && elf[0] = 0x7fuy && elf[1] = byte 'E' && elf[4] = 2uy && elf[5] = 1uy
    if not isElf64Le then failwithf "expected a little-endian ELF64 shared object, got %d bytes that are not one" elf.Length
    let shoff = int64 (u64 elf 0x28L)
    let shentsize = int64 (u16 elf 0x3AL)
    let shnum = int (u16 elf 0x3CL)
    let section i = shoff + int64 i * shentsize
    [ for i in 0 .. shnum - 1 do
        let sh = section i
        if u32 elf (sh + 4L) = shtGnuVerneed then
            let offset = int64 (u64 elf (sh + 0x18L))
            let strtab = int64 (u64 elf (section (int (u32 elf (sh + 0x28L))) + 0x18L))
            let count = int (u32 elf (sh + 0x2CL))
            let mutable need = offset
            for _ in 1 .. count do
                let auxCount = int (u16 elf (need + 2L))
                let mutable aux = need + int64 (u32 elf (need + 8L))
                for _ in 1 .. auxCount do
                    if cString elf (strtab + int64 (u32 elf (aux + 8L))) = version then yield aux + 4L
                    aux <- aux + int64 (u32 elf (aux + 12L))
                need <- need + int64 (u32 elf (need + 12L)) ]

/// Marks the GLIBCXX_3.4.32 need of `path` weak, writing through a temporary file and a rename.
/// The file's modification time is kept, so MSBuild's copy-if-changed check stays quiet.
let patchFile (path: string) : PatchOutcome =
    let elf = File.ReadAllBytes path
    let offsets = vernauxFlagOffsets NeededVersion elf
    if List.isEmpty offsets then NotNeeded
    elif offsets |> List.forall (fun o -> u16 elf o &&& verFlgWeak <> 0us) then AlreadyWeak
    else
        for o in offsets do
            let flags = u16 elf o ||| verFlgWeak
            elf[int o] <- byte (flags &&& 0xFFus)
            elf[int o + 1] <- byte (flags >>> 8)
        let stamp = File.GetLastWriteTimeUtc path
        let tmp = path + ".patching"
        File.WriteAllBytes(tmp, elf)
        File.SetUnixFileMode(tmp, File.GetUnixFileMode path)
        File.SetLastWriteTimeUtc(tmp, stamp)
        File.Move(tmp, path, true)
        Patched

let private libstdcxxCandidates () =
    let fromEnv =
        match Environment.GetEnvironmentVariable "LD_LIBRARY_PATH" with
        | null -> []
        | p -> p.Split(':', StringSplitOptions.RemoveEmptyEntries) |> List.ofArray
    fromEnv @ [ "/usr/lib/x86_64-linux-gnu"; "/lib/x86_64-linux-gnu"; "/usr/lib64"; "/lib64"; "/usr/lib"; "/lib" ]
    |> List.map (fun d -> Path.Combine(d, "libstdc++.so.6"))
    |> List.filter File.Exists

/// True when the libstdc++ the loader will find defines `version` (searched in LD_LIBRARY_PATH,
/// then the standard library directories). Not Linux, or no libstdc++ found: false.
let hostHasVersion (version: string) : bool =
    let needle = Encoding.ASCII.GetBytes(version + "\000")
    match libstdcxxCandidates () with
    | [] -> false
    | first :: _ -> (File.ReadAllBytes first).AsSpan().IndexOf(ReadOnlySpan needle) >= 0

/// Patches every libLibTorchSharp.so below `dir`, whatever the host (for a folder that may run elsewhere:
/// a published app or a tool package). Returns (path, outcome) for each file seen.
let patchTreeAlways (dir: string) : (string * PatchOutcome) list =
    if not (Directory.Exists dir) then []
    else
        Directory.GetFiles(dir, "libLibTorchSharp.so", SearchOption.AllDirectories)
        |> Array.map (fun f -> f, patchFile f)
        |> List.ofArray

/// Patches every libLibTorchSharp.so below `dir` when the host lacks GLIBCXX_3.4.32.
/// Returns (path, outcome) for each file seen.
let patchTree (dir: string) : (string * PatchOutcome) list =
    if not (OperatingSystem.IsLinux()) || hostHasVersion NeededVersion then [] else patchTreeAlways dir
