/// Checkpoint files: `checkpoints/last.ckpt` and `checkpoints/best.ckpt` in the run folder.
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

/// Writes `path` atomically: temporary file beside it, flush to disk, rename over.
let writeAtomic (path: string) (write: Stream -> unit) : unit =
    let dir = Path.GetDirectoryName(Path.GetFullPath path)
    Directory.CreateDirectory dir |> ignore
    let tmp = Path.Combine(dir, sprintf ".%s.tmp-%s" (Path.GetFileName path) (Guid.NewGuid().ToString("N")))
    try
        using (new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None)) (fun fs ->
            write fs
            fs.Flush(true))
        File.Move(tmp, path, true)
    with _ ->
        (try File.Delete tmp with _ -> ())
        reraise ()

/// Removes temporary files that a crashed write left in a checkpoint folder.
let cleanTemporaries (dir: string) : unit =
    if Directory.Exists dir then
        for f in Directory.GetFiles(dir, ".*.tmp-*") do
            try File.Delete f with _ -> ()

/// Writes a checkpoint of the model, optimizer, libtorch CPU generator and `meta` to `path` atomically.
let save (path: string) (model: torch.nn.Module) (optimizer: Modules.OptimizerHelper) (meta: Meta) : unit =
    writeAtomic path (fun fs ->
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
        w.Write endMagic)

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
