/// Checkpoint files: `checkpoints/last.ckpt` (the newest), `checkpoints/step-NNNNNNNN.ckpt` (older ones kept,
/// `RunOptions.KeepCheckpoints` in all with last.ckpt) and `checkpoints/best.ckpt` in the run folder.
///
/// Layout: 8-byte magic, then sections (meta JSON in UTF-8; model state as TorchSharp's `Module.save`;
/// optimizer state as `save_state_dict`; libtorch's CPU generator state), then a footer of 4 (offset, length)
/// pairs and an end magic. Parameters and optimizer state are float32 whatever `Bf16` says. The CUDA generator
/// is not saved (TorchSharp 0.107 cannot read its state); training re-seeds it every step instead
/// (`Native.RngResume.ReseedEachStep`). A file is written to a temporary name in the same folder, flushed to disk and
/// renamed over the old one, so a crash leaves the previous checkpoint whole; a file without its footer
/// is reported as truncated.
module Moe.Train.Checkpoint

open System
open System.IO
open System.Text
open System.Text.Json.Nodes
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Routing
open Moe.Layers
open Moe.Models

let private headMagic = "MOECKPT1"B
let private endMagic = "MOECKEND"B
let private sections = 4
let private footerBytes = int64 (sections * 16 + endMagic.Length)
/// Version of the meta JSON; bumped when its fields change meaning.
let formatVersion = 1

/// What a checkpoint's meta section holds.
type Meta =
    { Format: int
      State: TrainState
      Train: TrainConfig
      /// The task's configuration sections, as written to config.json.
      Config: JsonNode
      Tokenizer: string
      WrittenUtc: string }

let lastName = "last.ckpt"
let bestName = "best.ckpt"
/// The checkpoint folder of a run folder.
let folder (runDir: string) = Path.Combine(runDir, "checkpoints")
/// The path of the latest checkpoint of a run folder.
let last (runDir: string) = Path.Combine(folder runDir, lastName)
/// The path of the best-validation checkpoint of a run folder.
let best (runDir: string) = Path.Combine(folder runDir, bestName)

/// Raised when a checkpoint or run file cannot be written (disk full, read-only folder, ...): the message
/// names the file and says that what stood there before is unchanged.
type WriteFailedException(message: string, path: string, inner: exn) =
    inherit IOException(message, inner)
    member _.Path = path

/// Opens the temporary file a write goes to (a test substitutes a failing stream).
type OpenTemporary = string -> Stream

/// Creates the temporary file with nothing else sharing it.
let openTemporary : OpenTemporary = fun tmp -> new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None) :> Stream

/// Writes `write`'s bytes to a fresh temporary file beside `path`, flushed to disk; returns its path. On a
/// failure the temporary file is removed and a `WriteFailedException` names `path`.
let private writeTemporary (openTemp: OpenTemporary) (path: string) (write: Stream -> unit) : string =
    let dir = Path.GetDirectoryName(Path.GetFullPath path)
    let tmp = Path.Combine(dir, sprintf ".%s.tmp-%s" (Path.GetFileName path) (Guid.NewGuid().ToString("N")))
    try
        Directory.CreateDirectory dir |> ignore
        using (openTemp tmp) (fun fs ->
            write fs
            match fs with
            | :? FileStream as f -> f.Flush(true)
            | s -> s.Flush())
        tmp
    with
    | :? IOException | :? UnauthorizedAccessException as e ->
        (try File.Delete tmp with _ -> ())
        raise (WriteFailedException(sprintf "could not write %s (%s); the file that stood there is unchanged" path e.Message, path, e))
    | _ ->
        (try File.Delete tmp with _ -> ())
        reraise ()

/// Renames the finished temporary file over `path` (atomic on one file system).
let private commit (tmp: string) (path: string) : unit =
    try File.Move(tmp, path, true)
    with :? IOException | :? UnauthorizedAccessException as e ->
        (try File.Delete tmp with _ -> ())
        raise (WriteFailedException(sprintf "could not replace %s (%s); the file that stood there is unchanged" path e.Message, path, e))

/// `writeAtomic` with the temporary file opened by `openTemp`.
let writeAtomicVia (openTemp: OpenTemporary) (path: string) (write: Stream -> unit) : unit =
    commit (writeTemporary openTemp path write) path

/// Writes `path` atomically: temporary file beside it, flush to disk, rename over. A failed write (disk
/// full, read-only folder) raises `WriteFailedException` and leaves the old file whole, with no temporary.
let writeAtomic (path: string) (write: Stream -> unit) : unit = writeAtomicVia openTemporary path write

/// Removes temporary files that a crashed write left in a checkpoint folder.
let cleanTemporaries (dir: string) : unit =
    if Directory.Exists dir then
        for f in Directory.GetFiles(dir, ".*.tmp-*") do
            try File.Delete f with _ -> ()

/// The bytes of a checkpoint: magic, sections, footer.
let private writeSections (model: torch.nn.Module) (optimizer: Modules.OptimizerHelper) (meta: Meta) (fs: Stream) : unit =
    use w = new BinaryWriter(fs, Encoding.UTF8, leaveOpen = true)
    w.Write headMagic
    let spans = ResizeArray<int64 * int64>()
    let section (body: unit -> unit) =
        w.Flush()
        let start = fs.Position
        body ()
        w.Flush()
        spans.Add((start, fs.Position - start))
    section (fun () -> w.Write(Encoding.UTF8.GetBytes(Json.serialize meta)))
    section (fun () -> model.save w |> ignore)
    section (fun () -> optimizer.save_state_dict w)
    section (fun () ->
        use rng = torch.get_rng_state ()
        w.Write(rng.data<byte>().ToArray()))
    for start, length in spans do
        w.Write start
        w.Write length
    w.Write endMagic

/// `save` with the temporary file opened by `openTemp`.
let saveVia (openTemp: OpenTemporary) (path: string) (model: torch.nn.Module) (optimizer: Modules.OptimizerHelper) (meta: Meta) : unit =
    writeAtomicVia openTemp path (writeSections model optimizer meta)

/// Writes a checkpoint of the model, optimizer, libtorch CPU generator and `meta` to `path` atomically.
let save (path: string) (model: torch.nn.Module) (optimizer: Modules.OptimizerHelper) (meta: Meta) : unit =
    saveVia openTemporary path model optimizer meta

/// The (offset, length) of each section, or a clear error when the file is not a whole checkpoint.
let private spans (path: string) (fs: FileStream) : (int64 * int64)[] =
    let fail why = invalidOp (sprintf "checkpoint %s is not usable: %s" path why)
    if fs.Length < int64 headMagic.Length + footerBytes then fail (sprintf "only %d bytes; it is truncated" fs.Length)
    use r = new BinaryReader(fs, Encoding.UTF8, leaveOpen = true)
    fs.Position <- 0L
    if r.ReadBytes headMagic.Length <> headMagic then fail "it does not start with the checkpoint magic (not a checkpoint)"
    fs.Position <- fs.Length - footerBytes
    let s = Array.init sections (fun _ -> let o = r.ReadInt64() in o, r.ReadInt64())
    if r.ReadBytes endMagic.Length <> endMagic then fail "the footer is missing; the file is truncated (a write was interrupted)"
    for o, l in s do
        if o < int64 headMagic.Length || l < 0L || o + l > fs.Length - footerBytes then fail "a section lies outside the file"
    s

/// Reads a checkpoint's meta section (train config, task config, tokenizer, run state).
let readMeta (path: string) : Meta =
    if not (File.Exists path) then invalidArg "path" (sprintf "expected a checkpoint file, but %s does not exist" path)
    use fs = File.OpenRead path
    let s = spans path fs
    let o, l = s[0]
    fs.Position <- o
    let bytes = Array.zeroCreate<byte> (int l)
    fs.ReadExactly(bytes, 0, bytes.Length)
    match Json.deserialize<Meta> (Encoding.UTF8.GetString bytes) with
    | Ok m when m.Format = formatVersion -> m
    | Ok m -> invalidOp (sprintf "checkpoint %s has meta format %d; this build reads format %d" path m.Format formatVersion)
    | Error problems -> invalidOp (sprintf "checkpoint %s has an unreadable meta section:\n  - %s" path (String.concat "\n  - " problems))

/// Loads only the model weights from a checkpoint (for generation); the module must have the same parameters.
let loadModel (path: string) (model: torch.nn.Module) : unit =
    if not (File.Exists path) then invalidArg "path" (sprintf "expected a checkpoint file, but %s does not exist" path)
    use fs = File.OpenRead path
    let s = spans path fs
    fs.Position <- fst s[1]
    use r = new BinaryReader(fs, Encoding.UTF8, leaveOpen = true)
    model.load(r, strict = true) |> ignore

/// Restores model, optimizer and the libtorch CPU generator from a checkpoint; returns its meta.
let restore (path: string) (model: torch.nn.Module) (optimizer: Modules.OptimizerHelper) : Meta =
    let meta = readMeta path
    use fs = File.OpenRead path
    let s = spans path fs
    use r = new BinaryReader(fs, Encoding.UTF8, leaveOpen = true)
    fs.Position <- fst s[1]
    model.load(r, strict = true) |> ignore
    fs.Position <- fst s[2]
    optimizer.load_state_dict r
    let o, l = s[3]
    fs.Position <- o
    let rng = r.ReadBytes(int l)
    use state = torch.tensor rng
    torch.set_rng_state state
    meta

/// The name an older checkpoint is kept under once a newer last.ckpt replaces it.
let stepName (step: int) = sprintf "step-%08d.ckpt" step

/// The meta section, or why the file cannot be used.
let tryReadMeta (path: string) : Result<Meta, string> =
    try Ok(readMeta path)
    with
    | :? InvalidOperationException | :? ArgumentException | :? IOException | :? UnauthorizedAccessException as e -> Error e.Message

/// Kept checkpoints in the folder other than last.ckpt and best.ckpt, newest (highest step) first.
let private older (dir: string) : (int * string) list =
    if not (Directory.Exists dir) then []
    else
        [ for f in Directory.GetFiles(dir, "step-*.ckpt") do
            match Int32.TryParse((Path.GetFileNameWithoutExtension f).Substring 5) with
            | true, step -> step, f
            | _ -> () ]
        |> List.sortByDescending fst

/// Writes `checkpoints/last.ckpt` atomically and keeps the `keep` newest checkpoints in all: the last.ckpt it
/// replaces becomes `step-<its step>.ckpt` (after the new file is complete, so a failed write leaves it where
/// it was), and older step files beyond `keep - 1` are removed. best.ckpt is never touched.
let saveLastVia (openTemp: OpenTemporary) (keep: int) (runDir: string) (model: torch.nn.Module) (optimizer: Modules.OptimizerHelper) (meta: Meta) : unit =
    if keep < 1 then invalidArg "keep" (sprintf "expected to keep at least 1 checkpoint, got %d" keep)
    let path = last runDir
    let tmp = writeTemporary openTemp path (writeSections model optimizer meta)
    if keep > 1 && File.Exists path then
        match tryReadMeta path with
        | Ok m when m.State.Step <> meta.State.Step ->
            try File.Move(path, Path.Combine(folder runDir, stepName m.State.Step), true)
            with :? IOException | :? UnauthorizedAccessException as e ->
                (try File.Delete tmp with _ -> ())
                raise (WriteFailedException(sprintf "could not keep %s as %s (%s); it is unchanged" path (stepName m.State.Step) e.Message, path, e))
        | _ -> () // unreadable, or the same step: the new file replaces it
    commit tmp path
    let kept = older (folder runDir)
    for _, f in List.skip (min (keep - 1) kept.Length) kept do
        try File.Delete f with _ -> ()

/// `saveLastVia` writing real files.
let saveLast (keep: int) (runDir: string) (model: torch.nn.Module) (optimizer: Modules.OptimizerHelper) (meta: Meta) : unit =
    saveLastVia openTemporary keep runDir model optimizer meta

/// The checkpoints a resume may start from, in the order it tries them: every *.ckpt of the folder whose
/// meta section reads, highest step first (at one step: last.ckpt, then a kept step file, then best.ckpt);
/// and the files that cannot be used, each with the reason.
let resumeCandidates (runDir: string) : string list * (string * string) list =
    let dir = folder runDir
    let files = if Directory.Exists dir then Directory.GetFiles(dir, "*.ckpt") |> List.ofArray else []
    let rank (f: string) = match Path.GetFileName f with n when n = lastName -> 0 | n when n = bestName -> 2 | _ -> 1
    let read = files |> List.map (fun f -> f, tryReadMeta f)
    let usable =
        read
        |> List.choose (fun (f, m) -> match m with Ok m -> Some(m.State.Step, f) | Error _ -> None)
        |> List.sortBy (fun (step, f) -> -step, rank f)
        |> List.map snd
    let skipped = read |> List.choose (fun (f, m) -> match m with Error why -> Some(f, why) | Ok _ -> None)
    usable, skipped

/// Moves the checkpoints of `runDir` written after `step` (an abandoned continuation, when a run resumes from
/// an older checkpoint) into `checkpoints/after-step-<step>-<time>/`, so a later resume cannot pick them;
/// returns the files moved.
let setAsideAfter (step: int) (runDir: string) : string list =
    let dir = folder runDir
    let later =
        if not (Directory.Exists dir) then []
        else
            [ for f in Directory.GetFiles(dir, "*.ckpt") do
                match tryReadMeta f with
                | Ok m when m.State.Step > step -> f
                | _ -> () ]
    if not later.IsEmpty then
        let aside = Path.Combine(dir, sprintf "after-step-%d-%s" step (DateTime.UtcNow.ToString("yyyyMMddTHHmmss")))
        Directory.CreateDirectory aside |> ignore
        for f in later do File.Move(f, Path.Combine(aside, Path.GetFileName f))
    later
