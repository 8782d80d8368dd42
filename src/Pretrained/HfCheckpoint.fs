/// Hugging Face checkpoint folders: the weights of `model.safetensors`, sharded `model.safetensors.index.json`,
/// `pytorch_model.bin` or sharded `pytorch_model.bin.index.json`, indexed once (name, shape, dtype, file) and
/// read one tensor at a time (`openWeights`); copied into a model by Hugging Face parameter name (`loadInto`);
/// and written back in the layout `transformers` reads (`saveFolder`, `copyTokenizerFiles`).
///
/// What each format goes through: safetensors files through our own reader (`Moe.Safetensors`: it refuses
/// overlapping or out-of-range tensors and a truncated file, naming the file; TorchSharp.PyBridge's reader
/// accepts overlapping tensors and names no file in its errors); `pytorch_model.bin` (the PyTorch zip +
/// pickle format) through TorchSharp.PyBridge's unpickler, a maintained library, rather than a hand-written
/// one: it gives each tensor's storage (the archive entry), dtype, shape, stride and offset, and the bytes
/// are then read here from the archive, one tensor at a time.
/// Axes: none (tensors of any shape).
module Moe.HfCheckpoint

open System
open System.Collections
open System.IO
open System.IO.Compression
open System.Text.Json
open System.Text.Json.Nodes
open System.Text.RegularExpressions
open TorchSharp
open Moe.Tensors

type Tensor = torch.Tensor

/// One checkpoint tensor as the index records it: its name, stored shape and dtype, and the file holding it.
type TensorInfo = { Name: string; Shape: int64[]; Dtype: torch.ScalarType; File: string }

/// The weight files looked for in a folder, in the order `transformers` prefers them.
let weightFileNames : string list =
    [ "model.safetensors"; "model.safetensors.index.json"; "pytorch_model.bin"; "pytorch_model.bin.index.json" ]

/// The tokenizer and generation files `copyTokenizerFiles` carries from one checkpoint folder to another.
let tokenizerFileNames : string list =
    [ "tokenizer.json"; "tokenizer_config.json"; "special_tokens_map.json"; "vocab.json"; "merges.txt"
      "spiece.model"; "added_tokens.json"; "generation_config.json" ]

let private shapeText (shape: int64[]) = "[" + (shape |> Array.map string |> String.concat "; ") + "]"

let private isFloatingType (t: torch.ScalarType) =
    match t with
    | torch.ScalarType.Float32 | torch.ScalarType.Float16 | torch.ScalarType.BFloat16 | torch.ScalarType.Float64 -> true
    | _ -> false

/// Bytes of the file slices a conversion or a copy to another device goes through (`WeightSource.CopyInto`):
/// large enough that reads are sequential, small enough that loading never holds a second copy of a large
/// tensor (Llama-3's 128256 x 2048 embedding is 1 GiB in float32).
let defaultChunkBytes : int64 = 64L <<< 20

/// A checkpoint's weights, indexed but not read: each tensor's name, shape, dtype and file are known, and
/// `Load` reads one tensor when asked. `fill info first target` reads a tensor's stored rows `first ..`
/// (along dim 0; a 0-dim tensor whole, `first` 0) into a contiguous CPU tensor of its stored dtype shaped
/// [k; its other dims]. Dispose it to close a `pytorch_model.bin` archive (safetensors files are opened per
/// read and hold nothing between loads).
[<Sealed>]
type WeightSource internal (folder: string, files: string list, tensors: TensorInfo list, fill: TensorInfo -> int64 -> Tensor -> unit, release: unit -> unit) =
    let byName = Collections.Generic.Dictionary<string, TensorInfo>()
    do for t in tensors do byName[t.Name] <- t

    /// The checkpoint folder.
    member _.Folder = folder
    /// The files indexed, index files first (full paths).
    member _.Files = files
    /// Every tensor, in checkpoint order.
    member _.Tensors = tensors
    /// Every tensor's name, in checkpoint order.
    member _.Names = tensors |> List.map (fun t -> t.Name)
    /// Whether the checkpoint has a tensor of this name.
    member _.Contains(name: string) = byName.ContainsKey name
    /// A tensor's index entry; an error naming the folder when there is none.
    member _.Info(name: string) : TensorInfo =
        match byName.TryGetValue name with
        | true, t -> t
        | _ -> invalidArg "name" (sprintf "checkpoint %s has no tensor %s (files: %s)" folder name (files |> List.map Path.GetFileName |> String.concat ", "))
    /// Reads one tensor, converted to `dtype` (`CopyInto` a fresh tensor): a floating tensor (float16,
    /// bfloat16, float32, float64) to any floating `dtype`; any other only as itself. The caller owns (and
    /// disposes) the result.
    member this.Load(name: string, dtype: torch.ScalarType) : Tensor =
        let info = this.Info name
        let t = torch.empty (info.Shape, dtype = dtype)
        try
            this.CopyInto(name, t)
            t
        with _ ->
            t.Dispose()
            reraise ()
    /// Reads one tensor into `target` (same shape; any layout, e.g. a transposed view of a parameter;
    /// converted to its dtype, moved to its device): straight into its memory when it is a contiguous CPU
    /// tensor of the stored dtype; otherwise `chunkBytes` at a time, each slice of rows (along dim 0) read
    /// in the stored dtype and copied into the target's rows, so no temporary of the whole tensor exists.
    /// A floating tensor (float16, bfloat16, float32, float64) goes into any floating target; any other
    /// only into its own dtype.
    member this.CopyInto(name: string, target: Tensor, chunkBytes: int64) : unit =
        let info = this.Info name
        if info.Shape <> target.shape then
            invalidArg "target" (sprintf "%s: tensor %s has shape %s, the target %s" info.File name (shapeText info.Shape) (describe target))
        if info.Dtype <> target.dtype && not (isFloatingType info.Dtype && isFloatingType target.dtype) then
            invalidArg "target" (sprintf "%s: tensor %s is %A; it cannot be loaded as %A" info.File name info.Dtype target.dtype)
        if chunkBytes <= 0L then invalidArg "chunkBytes" (sprintf "expected chunkBytes > 0, got %d" chunkBytes)
        use _ = torch.no_grad ()
        if info.Dtype = target.dtype && target.device_type = DeviceType.CPU && target.is_contiguous () then
            use alias = target.detach ()
            fill info 0L alias
        elif info.Shape.Length = 0 then
            use stored = torch.empty (info.Shape, dtype = info.Dtype)
            fill info 0L stored
            target.copy_ stored |> ignore
        else
            let rows = info.Shape[0]
            let rowShape = info.Shape[1..]
            let storedSize = (use one = torch.empty ([| 1L |], dtype = info.Dtype) in one.ElementSize)
            let rowBytes = (Array.fold (*) 1L rowShape) * max storedSize target.ElementSize
            let perChunk = max 1L (min rows (chunkBytes / max 1L rowBytes))
            use scratch = torch.empty (Array.append [| perChunk |] rowShape, dtype = info.Dtype) // [k; ..] stored dtype
            let mutable first = 0L
            while first < rows do
                let k = min perChunk (rows - first)
                use part = scratch.narrow (0L, 0L, k)
                fill info first part
                use dst = target.narrow (0L, first, k)
                dst.copy_ part |> ignore
                first <- first + k
    /// `CopyInto` with `defaultChunkBytes`.
    member this.CopyInto(name: string, target: Tensor) : unit = this.CopyInto(name, target, defaultChunkBytes)
    interface IDisposable with
        member _.Dispose() = release ()

// ---------------------------------------------------------------- safetensors

/// The tensors of safetensors files, each read by seeking to its bytes.
let private safetensorsSource (folder: string) (files: string list) (entries: (Safetensors.Header * Safetensors.Entry) list) : WeightSource =
    let located = Collections.Generic.Dictionary<string, Safetensors.Header * Safetensors.Entry>()
    let infos =
        [ for h, e in entries ->
            located[e.Name] <- (h, e)
            { Name = e.Name; Shape = e.Shape; Dtype = Safetensors.storedType e.Dtype; File = h.Path } ]
    new WeightSource(folder, files, infos, (fun info first target -> let h, e = located[info.Name] in Safetensors.fillRows h e first target), ignore)

// ---------------------------------------------------------------- pytorch_model.bin

/// One tensor of a PyTorch archive: where its storage is and how the tensor views it.
type private PickledTensor = { Info: TensorInfo; Entry: int; Offset: int64; Stride: int64[] }

/// The tensors of a `pytorch_model.bin` (PyTorch's zip archive of a pickled state dict), indexed by
/// TorchSharp.PyBridge's unpickler without reading any tensor data (`skipTensorRead`): its records give
/// each tensor's archive entry, dtype, shape, stride and storage offset.
let private indexPickled (path: string) : PickledTensor list =
    let bad (msg: string) = invalidArg "path" (sprintf "PyTorch checkpoint %s: %s" path msg)
    use stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read)
    let table : Hashtable =
        try TorchSharp.PyBridge.PyTorchUnpickler.UnpickleStateDict(stream, true, true)
        with e -> bad (sprintf "cannot read it as a PyTorch state dict (torch.save of a state_dict, zip format): %s: %s" (e.GetType().Name) e.Message)
    [ for key in table.Keys do
        let name = string key
        let record = table[key]
        let prop (p: string) : obj =
            match record.GetType().GetProperty p with
            | null -> bad (sprintf "tensor %s: the unpickler gave a %s, expected a tensor record with %s" name (record.GetType().Name) p)
            | pi -> pi.GetValue record
        match prop "Data" with
        | :? IDisposable as d -> d.Dispose()
        | _ -> ()
        yield
            { Info = { Name = name; Shape = (prop "Shape" :?> int64[]); Dtype = (prop "DType" :?> torch.ScalarType); File = path }
              Entry = (prop "ArchiveIndex" :?> int)
              Offset = int64 (prop "StorageOffset" :?> int)
              Stride = (prop "Stride" :?> int64[]) } ]
    |> List.sortBy (fun t -> t.Entry, t.Offset, t.Info.Name)

/// Row-major strides of a shape.
let private contiguousStrides (shape: int64[]) : int64[] =
    let s = Array.create shape.Length 1L
    for i in shape.Length - 2 .. -1 .. 0 do s[i] <- s[i + 1] * shape[i + 1]
    s

/// Reads rows `first ..` of one tensor (along dim 0; a 0-dim tensor whole, `first` 0) from an open archive
/// into `target` (contiguous, CPU, its dtype, shaped [k; its other dims]): skips to those rows in its
/// storage, then reads their bytes (a strided view reads the storage span the rows cover and copies it).
let private fillPickled (archive: ZipArchive) (t: PickledTensor) (first: int64) (target: Tensor) : unit =
    let info = t.Info
    let bad (msg: string) = invalidArg "path" (sprintf "PyTorch checkpoint %s: tensor %s: %s" info.File info.Name msg)
    let fits =
        if info.Shape.Length = 0 then first = 0L && target.shape.Length = 0
        else target.shape.Length = info.Shape.Length && target.shape[1..] = info.Shape[1..] && first >= 0L && first + target.shape[0] <= info.Shape[0]
    if target.dtype <> info.Dtype || not fits || target.device_type <> DeviceType.CPU || not (target.is_contiguous ()) then
        bad (sprintf "it is %A %s; cannot read its rows from %d into %s" info.Dtype (shapeText info.Shape) first (describe target))
    let entry = archive.Entries[t.Entry]
    let shape = target.shape
    let offset = if shape.Length = 0 then t.Offset else t.Offset + first * t.Stride[0]
    let numel = Array.fold (*) 1L shape
    let elementSize = target.ElementSize
    let contiguous = Array.forall2 (fun (n: int64) (a, b) -> n = 1L || a = b) shape (Array.zip t.Stride (contiguousStrides shape))
    let extent = if numel = 0L then 0L elif contiguous then numel else 1L + Array.fold2 (fun acc n s -> acc + (n - 1L) * s) 0L shape t.Stride
    if (offset + extent) * elementSize > entry.Length then
        bad (sprintf "its storage %s holds %d bytes, the tensor needs %d from element %d (truncated file?)" entry.FullName entry.Length (extent * elementSize) offset)
    use s = entry.Open()
    let mutable skip = offset * elementSize
    let scratch = Array.zeroCreate (int (min skip (1L <<< 20)))
    while skip > 0L do
        let n = int (min skip (int64 scratch.Length))
        s.ReadExactly(scratch, 0, n)
        skip <- skip - int64 n
    if contiguous then Safetensors.readBytesInto s target
    else
        use storage = torch.empty ([| extent |], dtype = info.Dtype)
        Safetensors.readBytesInto s storage
        use view = storage.as_strided (shape, t.Stride, 0L)
        target.copy_ view |> ignore

/// The tensors of PyTorch archives, each archive kept open (one file handle per archive) until disposed.
let private pickledSource (folder: string) (indexFiles: string list) (archives: string list) (pick: (string * PickledTensor) list -> (string * PickledTensor) list) : WeightSource =
    let opened = Collections.Generic.Dictionary<string, ZipArchive>()
    let release () =
        for a in opened.Values do a.Dispose()
        opened.Clear()
    try
        let all = [ for path in archives do for t in indexPickled path -> path, t ] |> pick
        let byName = Collections.Generic.Dictionary<string, PickledTensor>()
        for _, t in all do byName[t.Info.Name] <- t
        let fill (info: TensorInfo) (first: int64) (target: Tensor) =
            let archive =
                match opened.TryGetValue info.File with
                | true, a -> a
                | _ ->
                    let a = new ZipArchive(new FileStream(info.File, FileMode.Open, FileAccess.Read, FileShare.Read), ZipArchiveMode.Read, false)
                    opened[info.File] <- a
                    a
            fillPickled archive byName[info.Name] first target
        new WeightSource(folder, indexFiles @ archives, [ for _, t in all -> t.Info ], fill, release)
    with _ ->
        release ()
        reraise ()

// ---------------------------------------------------------------- folders

/// A sharded checkpoint's index (`*.index.json`): tensor name -> shard file, in file order. Every shard
/// must exist beside the index.
let private readIndex (indexPath: string) : (string * string) list =
    let bad (msg: string) = invalidArg "folder" (sprintf "checkpoint index %s: %s" indexPath msg)
    use doc =
        try JsonDocument.Parse(File.ReadAllText indexPath)
        with :? JsonException as e -> bad (sprintf "not valid JSON: %s" e.Message)
    let map =
        match doc.RootElement.ValueKind, doc.RootElement.TryGetProperty "weight_map" with
        | JsonValueKind.Object, (true, m) when m.ValueKind = JsonValueKind.Object -> m
        | _ -> bad "expected an object with a \"weight_map\" object {tensor name: shard file}"
    let dir = Path.GetDirectoryName(Path.GetFullPath indexPath)
    let pairs =
        [ for p in map.EnumerateObject() ->
            if p.Value.ValueKind <> JsonValueKind.String then bad (sprintf "weight_map[%s] is %s, expected a file name" p.Name (p.Value.GetRawText()))
            p.Name, p.Value.GetString() ]
    if pairs.IsEmpty then bad "weight_map is empty"
    for shard in pairs |> List.map snd |> List.distinct do
        if Path.GetFileName shard <> shard then bad (sprintf "shard %s is not a plain file name" shard)
        if not (File.Exists(Path.Combine(dir, shard))) then bad (sprintf "shard %s is missing from %s" shard dir)
    pairs

/// Opens a checkpoint folder's weights: the first of `weightFileNames` present (safetensors before
/// PyTorch, whole before sharded, as `transformers` prefers), indexed without reading tensor data. An
/// error names the folder and the files looked for when none is there, and the file (and tensor) when
/// one is bad.
let openWeights (folder: string) : WeightSource =
    if not (Directory.Exists folder) then invalidArg "folder" (sprintf "checkpoint folder %s does not exist" folder)
    let at (name: string) = Path.Combine(Path.GetFullPath folder, name)
    match weightFileNames |> List.tryFind (at >> File.Exists) with
    | None ->
        invalidArg "folder" (sprintf "checkpoint folder %s has no weights: looked for %s" folder (String.concat ", " weightFileNames))
    | Some "model.safetensors" ->
        let h = Safetensors.openHeader (at "model.safetensors")
        safetensorsSource folder [ h.Path ] [ for e in h.Entries -> h, e ]
    | Some "model.safetensors.index.json" ->
        let index = at "model.safetensors.index.json"
        let map = readIndex index
        let headers = map |> List.map snd |> List.distinct |> List.map (fun shard -> shard, Safetensors.openHeader (at shard)) |> dict
        let entries =
            [ for name, shard in map ->
                let h = headers[shard]
                match h.Entries |> List.tryFind (fun e -> e.Name = name) with
                | Some e -> h, e
                | None -> invalidArg "folder" (sprintf "checkpoint index %s maps %s to %s, which has no such tensor" index name h.Path) ]
        safetensorsSource folder (index :: [ for h in headers.Values -> h.Path ]) entries
    | Some "pytorch_model.bin" -> pickledSource folder [] [ at "pytorch_model.bin" ] id
    | Some _ ->
        let index = at "pytorch_model.bin.index.json"
        let map = readIndex index
        let wanted = dict map
        let pick (all: (string * PickledTensor) list) =
            let found = [ for path, t in all do if wanted.ContainsKey t.Info.Name && Path.GetFileName path = wanted[t.Info.Name] then yield path, t ]
            let have = found |> List.map (fun (_, t) -> t.Info.Name) |> set
            match map |> List.filter (fun (n, _) -> not (have.Contains n)) with
            | [] -> found
            | (n, shard) :: _ -> invalidArg "folder" (sprintf "checkpoint index %s maps %s to %s, which has no such tensor" index n shard)
        pickledSource folder [ index ] (map |> List.map (snd >> at) |> List.distinct) pick

/// One weights file rather than a folder: a `.safetensors` file, or anything else as a PyTorch `torch.save` state
/// dict in the zip format (e.g. summac's published `summac_conv_vitc_sent_perc_e.bin`), indexed as `openWeights`
/// indexes a folder's files.
let openWeightFile (path: string) : WeightSource =
    if not (File.Exists path) then invalidArg "path" (sprintf "weights file %s does not exist" path)
    let full = Path.GetFullPath path
    let folder = Path.GetDirectoryName full
    if full.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) then
        let h = Safetensors.openHeader full
        safetensorsSource folder [ full ] [ for e in h.Entries -> h, e ]
    else pickledSource folder [] [ full ] id

// ---------------------------------------------------------------- loading into a model

/// How `loadInto` maps a model onto a checkpoint.
type LoadOptions =
    { /// Model name -> other checkpoint names it may be found under, tried in order after its own (tied
      /// weights: `lm_head.weight` from `model.shared.weight`).
      Aliases: Map<string, string list>
      /// Regular expressions (searched, as `transformers`' `_keys_to_ignore_on_load_missing`) of model
      /// names the checkpoint may lack: they keep the model's own values (buffers it computes itself).
      MayBeAbsent: string list
      /// Regular expressions of checkpoint names the model may leave unused (as
      /// `_keys_to_ignore_on_load_unexpected`).
      MayBeUnexpected: string list }

    /// Every name must match exactly, both ways; no aliases.
    static member Strict = { Aliases = Map.empty; MayBeAbsent = []; MayBeUnexpected = [] }

/// What `loadInto` did.
type LoadReport =
    { /// (model name, checkpoint name it was read from), in model order.
      Loaded: (string * string) list
      /// Model names absent from the checkpoint, allowed by `MayBeAbsent` (left as they were).
      Absent: string list
      /// Checkpoint names no model name used, allowed by `MayBeUnexpected`.
      Unused: string list }

let private matchesAny (patterns: string list) (name: string) = patterns |> List.exists (fun p -> Regex.IsMatch(name, p))

/// Copies every parameter and persistent buffer of `model` from the checkpoint, by name (the model's
/// `named_parameters()`/`named_buffers()` keys are the checkpoint's names), under no_grad, converting each
/// tensor to the parameter's dtype and moving it to its device (`WeightSource.CopyInto`: a float32 CPU
/// parameter is read straight into its memory, so loading holds no second copy of the weights, not even of
/// one tensor). Everything is checked before anything is copied, so a refused checkpoint leaves the model untouched: one error lists every missing tensor, one
/// every shape mismatch (expected vs got, with the file), one every unexpected tensor.
let loadInto (weights: WeightSource) (model: torch.nn.Module) (options: LoadOptions) : LoadReport =
    let targets =
        [ for struct (n, p) in model.named_parameters () -> n, (p :> Tensor)
          for struct (n, b) in model.named_buffers (include_nonpersistent = false) -> n, b ]
    let where = sprintf "checkpoint %s (%s)" weights.Folder (weights.Files |> List.map Path.GetFileName |> String.concat ", ")
    let sourceOf (name: string) =
        name :: (options.Aliases |> Map.tryFind name |> Option.defaultValue []) |> List.tryFind weights.Contains
    let found = [ for n, t in targets -> n, t, sourceOf n ]
    let missing = [ for n, _, src in found do if src.IsNone && not (matchesAny options.MayBeAbsent n) then yield n ]
    if not missing.IsEmpty then
        invalidArg "weights" (sprintf "%s lacks %d tensor(s) the model needs: %s" where missing.Length (String.concat ", " missing))
    let pairs = [ for n, t, src in found do match src with Some s -> yield n, t, s | None -> () ]
    let mismatched =
        [ for n, t, s in pairs do
            let info = weights.Info s
            if info.Shape <> t.shape then
                yield sprintf "%s in %s: expected %s%s, got %s" s (Path.GetFileName info.File) (shapeText t.shape) (if s = n then "" else sprintf " (for %s)" n) (shapeText info.Shape) ]
    if not mismatched.IsEmpty then
        invalidArg "weights" (sprintf "%s: shape mismatch: %s" where (String.concat "; " mismatched))
    let used = pairs |> List.map (fun (_, _, s) -> s) |> set
    let unused = weights.Names |> List.filter (fun n -> not (used.Contains n))
    let unexpected = unused |> List.filter (fun n -> not (matchesAny options.MayBeUnexpected n))
    if not unexpected.IsEmpty then
        invalidArg "weights" (sprintf "%s has %d tensor(s) the model does not use: %s" where unexpected.Length (String.concat ", " unexpected))
    for _, t, s in pairs do weights.CopyInto(s, t)
    { Loaded = [ for n, _, s in pairs -> n, s ]
      Absent = [ for n, _, src in found do if src.IsNone then yield n ]
      Unused = unused }

/// A module holding uninitialised (`torch.empty`) tensors under dotted Hugging Face names, nested one
/// child module per name segment so that `named_parameters()` gives the names back: floating tensors as
/// parameters, others as buffers. A checkpoint's own shape for `loadInto` where no model class is needed
/// (tools, tests, the loading benchmark).
type ParameterTree(name: string, tensors: (string * int64[] * torch.ScalarType) list) as this =
    inherit torch.nn.Module(name)
    do
        let own, nested = tensors |> List.partition (fun (n, _, _) -> not (n.Contains '.'))
        for n, shape, dtype in own do
            let t = torch.empty (shape, dtype = dtype)
            if isFloatingType dtype then this.register_parameter (n, new TorchSharp.Modules.Parameter(t, false))
            else this.register_buffer (n, t)
        for child, group in nested |> List.groupBy (fun (n, _, _) -> n.Substring(0, n.IndexOf '.')) do
            let inner = [ for n, shape, dtype in group -> n.Substring(n.IndexOf '.' + 1), shape, dtype ]
            this.register_module (child, new ParameterTree(child, inner))

    /// A tree with one tensor per checkpoint tensor, in its stored dtype.
    static member Of(weights: WeightSource) : ParameterTree =
        new ParameterTree("checkpoint", [ for t in weights.Tensors -> t.Name, t.Shape, t.Dtype ])

// ---------------------------------------------------------------- writing

/// Writes `text` to `path` through a temporary file beside it and a rename: a reader sees the old file or
/// the new one, never half of one.
let private writeTextAtomically (path: string) (text: string) : unit =
    let tmp = Path.Combine(Path.GetDirectoryName(Path.GetFullPath path), sprintf ".%s.%s.tmp" (Path.GetFileName path) (Guid.NewGuid().ToString "N"))
    try
        File.WriteAllText(tmp, text)
        File.Move(tmp, path, true)
    finally
        if File.Exists tmp then File.Delete tmp

/// Bytes a tensor takes in a safetensors file.
let private storedBytes (t: Tensor) : int64 = t.NumberOfElements * t.ElementSize

/// Splits tensors into shards as `transformers` does: in order, a new shard when the next tensor would
/// take the current one past `maxBytes` (a tensor larger than `maxBytes` gets a shard of its own).
let private shards (maxBytes: int64) (state: (string * Tensor) list) : (string * Tensor) list list =
    let folder (acc: (string * Tensor) list list, size: int64) (name: string, t: Tensor) =
        let b = storedBytes t
        match acc with
        | current :: rest when size + b <= maxBytes || current.IsEmpty -> ((name, t) :: current) :: rest, size + b
        | _ -> [ name, t ] :: acc, b
    state |> List.fold folder ([ [] ], 0L) |> fst |> List.map List.rev |> List.rev |> List.filter (List.isEmpty >> not)

/// The weight files a save writes or replaces: `model.safetensors`, its index, its shards, and the
/// PyTorch files an older save may have left (which `openWeights` would otherwise not prefer but keep).
let private isWeightFile (name: string) =
    List.contains name weightFileNames || Regex.IsMatch(name, @"^(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)$")

/// Writes a checkpoint folder `transformers` loads: `config.json` (indented) and `model.safetensors`, or
/// shards `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` (`metadata.total_size`,
/// `weight_map`) when `maxShardBytes` is given and the weights exceed it. Every file is written under a
/// temporary name and renamed into place, weights first, the index and config last. Refuses a non-empty
/// folder unless `overwrite`; overwriting removes weight files of an earlier save that this one does not
/// write (stale shards), after the new ones are in place.
let saveFolderWith (overwrite: bool) (folder: string) (config: JsonNode) (state: (string * Tensor) list) (maxShardBytes: int64 option) : unit =
    if isNull config then invalidArg "config" "expected a config.json object, got null"
    if state.IsEmpty then invalidArg "state" (sprintf "saving %s: expected at least one tensor, got none" folder)
    match maxShardBytes with
    | Some b when b <= 0L -> invalidArg "maxShardBytes" (sprintf "expected a shard size > 0 bytes, got %d" b)
    | _ -> ()
    if Directory.Exists folder && not overwrite && not (Seq.isEmpty (Directory.EnumerateFileSystemEntries folder)) then
        invalidArg "folder" (sprintf "%s is not empty; refusing to write a checkpoint over it (pass overwrite to replace its weights and config)" folder)
    Directory.CreateDirectory folder |> ignore
    let metadata = [ "format", "pt" ]
    let parts =
        match maxShardBytes with
        | Some b when state |> List.sumBy (snd >> storedBytes) > b -> shards b state
        | _ -> [ state ]
    let written =
        match parts with
        | [ whole ] ->
            Safetensors.writeWithMetadata (Path.Combine(folder, "model.safetensors")) metadata whole
            [ "model.safetensors" ]
        | _ ->
            let n = parts.Length
            let names = parts |> List.mapi (fun i _ -> sprintf "model-%05d-of-%05d.safetensors" (i + 1) n)
            for name, part in List.zip names parts do
                Safetensors.writeWithMetadata (Path.Combine(folder, name)) metadata part
            let index = JsonObject()
            let meta = JsonObject()
            meta["total_size"] <- JsonValue.Create(state |> List.sumBy (snd >> storedBytes))
            index["metadata"] <- meta
            let map = JsonObject()
            for name, part in List.zip names parts do
                for tensor, _ in part do map[tensor] <- JsonValue.Create name
            index["weight_map"] <- map
            writeTextAtomically (Path.Combine(folder, "model.safetensors.index.json")) (index.ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n")
            "model.safetensors.index.json" :: names
    writeTextAtomically (Path.Combine(folder, "config.json")) (config.ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n")
    for f in Directory.GetFiles folder do
        let name = Path.GetFileName f
        if isWeightFile name && not (List.contains name written) then File.Delete f

/// `saveFolderWith false`: writes a checkpoint folder, refusing a non-empty one.
let saveFolder (folder: string) (config: JsonNode) (state: (string * Tensor) list) (maxShardBytes: int64 option) : unit =
    saveFolderWith false folder config state maxShardBytes

/// Copies the tokenizer and generation files (`tokenizerFileNames`) that `srcDir` has into `dstDir`, each
/// through a temporary name and a rename; returns the names copied.
let copyTokenizerFiles (srcDir: string) (dstDir: string) : string list =
    if not (Directory.Exists srcDir) then invalidArg "srcDir" (sprintf "checkpoint folder %s does not exist" srcDir)
    Directory.CreateDirectory dstDir |> ignore
    [ for name in tokenizerFileNames do
        let src = Path.Combine(srcDir, name)
        if File.Exists src then
            let dst = Path.Combine(dstDir, name)
            let tmp = Path.Combine(dstDir, sprintf ".%s.%s.tmp" name (Guid.NewGuid().ToString "N"))
            try
                File.Copy(src, tmp)
                File.Move(tmp, dst, true)
            finally
                if File.Exists tmp then File.Delete tmp
            yield name ]
