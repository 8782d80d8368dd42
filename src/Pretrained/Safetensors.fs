/// The safetensors file format (Hugging Face, https://github.com/huggingface/safetensors): an 8-byte
/// little-endian header length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}}`
/// (plus an optional `"__metadata__"` map of strings), then the raw little-endian tensor bytes, offsets
/// counted from the end of the header. Read here without Python, one tensor at a time (the header is read
/// and checked once, then each tensor's bytes are read straight into its own memory): `read` gives F32, F16
/// and BF16 as float32 and I64 as int64, `readTensor` the stored dtype. Our own reader rather than
/// TorchSharp.PyBridge's, which accepts overlapping tensors and names no file in its errors.
/// Axes: none (tensors of any shape).
module Moe.Safetensors

open System
open System.Buffers.Binary
open System.IO
open System.Text.Json
open TorchSharp
open Moe.Tensors

/// One header entry: the stored dtype name, shape and byte range within the data section.
type Entry = { Name: string; Dtype: string; Shape: int64[]; Begin: int64; End: int64 }

/// Bytes of the length prefix before the JSON header.
let private prefixBytes = 8L
/// The header key that holds free-form string metadata rather than a tensor.
let MetadataKey = "__metadata__"

/// Bytes per element of the dtypes read here.
let private elementBytes (dtype: string) : int64 option =
    match dtype with
    | "F32" -> Some 4L
    | "F16" | "BF16" -> Some 2L
    | "I64" -> Some 8L
    | _ -> None

let private fail (path: string) (msg: string) = invalidArg "path" (sprintf "safetensors file %s: %s" path msg)

/// A file's checked header: where the data section starts, the entries in data order and the metadata.
type Header = { Path: string; DataStart: int64; Entries: Entry list; Metadata: Map<string, string> }

/// Parses and checks a header: `json` is the header's bytes, `fileLen` the whole file's length. Every
/// entry's dtype is known, its byte range lies inside the data section (a truncated file fails here),
/// matches prod(shape) x element size, and overlaps no other entry.
let private parseHeader (path: string) (json: ReadOnlyMemory<byte>) (fileLen: int64) : Header =
    let dataStart = prefixBytes + int64 json.Length
    let dataLen = fileLen - dataStart
    use doc =
        try JsonDocument.Parse json
        with e -> fail path (sprintf "header is not valid JSON: %s" e.Message)
    if doc.RootElement.ValueKind <> JsonValueKind.Object then fail path "header is not a JSON object"
    let mutable metadata = Map.empty
    let entries =
        [ for p in doc.RootElement.EnumerateObject() do
            if p.Name = MetadataKey then
                if p.Value.ValueKind = JsonValueKind.Object then
                    for m in p.Value.EnumerateObject() do
                        metadata <- metadata.Add(m.Name, (if m.Value.ValueKind = JsonValueKind.String then m.Value.GetString() else m.Value.GetRawText()))
            else
                let bad msg = fail path (sprintf "tensor %s: %s" p.Name msg)
                let v = p.Value
                let prop (key: string) =
                    match v.ValueKind with
                    | JsonValueKind.Object ->
                        match v.TryGetProperty key with
                        | true, x -> x
                        | _ -> bad (sprintf "missing \"%s\"" key)
                    | _ -> bad "expected an object {dtype, shape, data_offsets}"
                let ints (key: string) =
                    let a = prop key
                    if a.ValueKind <> JsonValueKind.Array then bad (sprintf "expected \"%s\" to be an array of integers" key)
                    [| for x in a.EnumerateArray() ->
                        match x.TryGetInt64() with
                        | true, i when i >= 0L -> i
                        | _ -> bad (sprintf "expected \"%s\" to hold integers >= 0, got %s" key (x.GetRawText())) |]
                let dtype = (prop "dtype").GetString()
                let shape = ints "shape"
                let offsets = ints "data_offsets"
                if offsets.Length <> 2 then bad (sprintf "expected data_offsets [begin, end], got %A" offsets)
                let b, e = offsets[0], offsets[1]
                let size =
                    match elementBytes dtype with
                    | Some s -> s
                    | None -> bad (sprintf "unknown dtype %s (expected F32, F16, BF16 or I64)" dtype)
                if e < b || e > dataLen then
                    bad (sprintf "data_offsets [%d, %d] out of range (data section has %d bytes: truncated file?)" b e dataLen)
                let expected = (Array.fold (*) 1L shape) * size
                if e - b <> expected then
                    bad (sprintf "shape %A of %s needs %d bytes, data_offsets [%d, %d] give %d" shape dtype expected b e (e - b))
                yield { Name = p.Name; Dtype = dtype; Shape = shape; Begin = b; End = e } ]
    let ordered = entries |> List.sortBy (fun e -> e.Begin, e.End)
    for a, b in List.pairwise ordered do
        if b.Begin < a.End then
            fail path (sprintf "tensors %s [%d, %d] and %s [%d, %d] overlap" a.Name a.Begin a.End b.Name b.Begin b.End)
    { Path = path; DataStart = dataStart; Entries = ordered; Metadata = metadata }

/// Reads and checks a file's header only (the 8-byte length and the JSON), never the tensor data.
let openHeader (path: string) : Header =
    use f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read)
    let fileLen = f.Length
    if fileLen < prefixBytes then
        fail path (sprintf "truncated: %d bytes, expected at least the %d-byte header length" fileLen prefixBytes)
    let len = Array.zeroCreate (int prefixBytes)
    f.ReadExactly(Span len)
    let n = BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan len)
    if n > uint64 (fileLen - prefixBytes) then
        fail path (sprintf "header length %d goes beyond the file (%d bytes after the length prefix)" n (fileLen - prefixBytes))
    if n > uint64 Int32.MaxValue then fail path (sprintf "header length %d is beyond 2 GiB" n)
    let json = Array.zeroCreate (int n)
    f.ReadExactly(Span json)
    parseHeader path (ReadOnlyMemory json) fileLen

/// The header entries of a file (in data order) and its `__metadata__`, without reading tensors.
let readHeader (path: string) : Entry list * Map<string, string> =
    let h = openHeader path
    h.Entries, h.Metadata

/// The torch dtype a stored dtype name is read as, before any conversion.
let storedType (dtype: string) : torch.ScalarType =
    match dtype with
    | "F32" -> torch.ScalarType.Float32
    | "F16" -> torch.ScalarType.Float16
    | "BF16" -> torch.ScalarType.BFloat16
    | "I64" -> torch.ScalarType.Int64
    | other -> invalidArg "dtype" (sprintf "unknown safetensors dtype %s (expected F32, F16, BF16 or I64)" other)

/// Elements moved per `Span` when a tensor's bytes go to or from a stream (a Span's length is an int).
let private chunkElements (t: Tensor) : int64 = (1L <<< 30) / t.ElementSize

/// Fills a fresh contiguous CPU tensor from `stream` (exactly its bytes, little-endian), in chunks read
/// straight into the tensor's memory: no second copy of the tensor is ever held.
let internal readBytesInto (stream: Stream) (t: Tensor) : unit =
    if not BitConverter.IsLittleEndian then invalidOp "checkpoint files are little-endian; this host is big-endian"
    use flat = t.view -1L
    let n = flat.NumberOfElements
    let step = chunkElements t
    let mutable start = 0L
    while start < n do
        use part = flat.narrow (0L, start, min step (n - start))
        stream.ReadExactly(part.bytes)
        start <- start + step

/// Writes a tensor's bytes (little-endian, row-major) to `stream`, chunk by chunk from its own memory
/// (a contiguous CPU copy is made only for a tensor that is not one already).
let internal writeBytesOf (stream: Stream) (t: Tensor) : unit =
    if not BitConverter.IsLittleEndian then invalidOp "checkpoint files are little-endian; this host is big-endian"
    use _ = torch.NewDisposeScope()
    let flat = t.detach().cpu().contiguous().view -1L
    let n = flat.NumberOfElements
    let step = chunkElements t
    let mutable start = 0L
    while start < n do
        let part = flat.narrow (0L, start, min step (n - start))
        stream.Write(Span.op_Implicit part.bytes)
        start <- start + step

/// Reads rows `first ..` of one entry (along dim 0; a 0-dim entry whole, `first` 0) from an open stream of its
/// file into `target`, a contiguous CPU tensor of the entry's stored dtype (`storedType`) shaped as those
/// rows: [k; the entry's other dims].
let private fillRowsFrom (stream: Stream) (h: Header) (e: Entry) (first: int64) (target: Tensor) : unit =
    let fits =
        if e.Shape.Length = 0 then first = 0L && target.shape.Length = 0
        else target.shape.Length = e.Shape.Length && target.shape[1..] = e.Shape[1..] && first >= 0L && first + target.shape[0] <= e.Shape[0]
    if target.dtype <> storedType e.Dtype || not fits || target.device_type <> DeviceType.CPU || not (target.is_contiguous ()) then
        invalidArg "target" (sprintf "safetensors %s: tensor %s is %s %A; cannot read its rows from %d into %s" h.Path e.Name e.Dtype e.Shape first (describe target))
    let rowBytes = if e.Shape.Length = 0 then 0L else (Array.fold (*) 1L e.Shape[1..]) * target.ElementSize
    try
        stream.Seek(h.DataStart + e.Begin + first * rowBytes, SeekOrigin.Begin) |> ignore
        readBytesInto stream target
    with :? EndOfStreamException ->
        fail h.Path (sprintf "tensor %s: file ends inside its data [%d, %d] (truncated file?)" e.Name e.Begin e.End)

/// Reads one entry's bytes from an open stream of its file into `target`, a contiguous CPU tensor of the
/// entry's stored dtype (`storedType`) and shape.
let private fillFrom (stream: Stream) (h: Header) (e: Entry) (target: Tensor) : unit =
    if target.shape <> e.Shape then
        invalidArg "target" (sprintf "safetensors %s: tensor %s is %s %A; cannot read it into %s" h.Path e.Name e.Dtype e.Shape (describe target))
    fillRowsFrom stream h e 0L target

/// Reads one entry from an open stream of its file, in its stored dtype (`storedType`).
let private readFrom (stream: Stream) (h: Header) (e: Entry) : Tensor =
    let t = torch.empty (e.Shape, dtype = storedType e.Dtype)
    try
        fillFrom stream h e t
        t
    with _ ->
        t.Dispose()
        reraise ()

/// Reads rows `first ..` (along dim 0) of one tensor of a file whose header was read by `openHeader` straight
/// into `target`'s memory (a contiguous CPU tensor of the stored dtype shaped [k; the tensor's other dims]; a
/// 0-dim tensor whole, `first` 0): seeks to those rows' bytes and reads only them.
let fillRows (h: Header) (e: Entry) (first: int64) (target: Tensor) : unit =
    use f = new FileStream(h.Path, FileMode.Open, FileAccess.Read, FileShare.Read)
    fillRowsFrom f h e first target

/// Reads one tensor of a file whose header was read by `openHeader`, in its stored dtype (F32 float32,
/// F16 float16, BF16 bfloat16, I64 int64): seeks to its bytes and reads only them.
let readTensor (h: Header) (e: Entry) : Tensor =
    use f = new FileStream(h.Path, FileMode.Open, FileAccess.Read, FileShare.Read)
    readFrom f h e

/// Reads every tensor of a safetensors file, in data order: F32, F16 and BF16 as float32, I64 as int64.
/// Fails naming the file (and tensor) on a truncated file, a header length beyond the file, offsets out
/// of range or overlapping, an unknown dtype, or a shape that does not match its byte range.
let read (path: string) : (string * Tensor) list =
    let h = openHeader path
    use f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read)
    [ for e in h.Entries ->
        let t = readFrom f h e
        if t.dtype = torch.ScalarType.Float16 || t.dtype = torch.ScalarType.BFloat16 then
            use stored = t
            e.Name, stored.to_type torch.ScalarType.Float32
        else e.Name, t ]

/// C#-friendly `read`: name -> tensor.
let readDictionary (path: string) : Collections.Generic.Dictionary<string, Tensor> =
    let d = Collections.Generic.Dictionary<string, Tensor>()
    for k, v in read path do d[k] <- v
    d

/// One tensor planned for `writePlanned`: its name, dtype and shape, known before its values are made.
type Planned = { Name: string; Dtype: torch.ScalarType; Shape: int64[] }

/// The safetensors dtype name of a torch dtype, or None where the format is not written here.
let private dtypeName (t: torch.ScalarType) : string option =
    match t with
    | torch.ScalarType.Float32 -> Some "F32"
    | torch.ScalarType.Float16 -> Some "F16"
    | torch.ScalarType.BFloat16 -> Some "BF16"
    | torch.ScalarType.Int64 -> Some "I64"
    | _ -> None

/// Writes a safetensors file whose header is known in advance (`plan`), asking `produce` for each
/// tensor only when its bytes are due and disposing it right after, so a file larger than memory can be
/// written one tensor at a time. Each produced tensor must match its plan's dtype and shape. Written to
/// a temporary file beside `path` and moved into place, so readers never see half a file.
let writePlanned (path: string) (metadata: (string * string) list) (plan: Planned list) (produce: Planned -> Tensor) : unit =
    let names = plan |> List.map (fun p -> p.Name)
    match names |> List.countBy id |> List.filter (fun (_, c) -> c > 1) with
    | [] -> ()
    | dups -> invalidArg "tensors" (sprintf "safetensors %s: duplicate tensor names %A" path (List.map fst dups))
    if List.contains MetadataKey names then invalidArg "tensors" (sprintf "safetensors %s: %s is reserved for metadata" path MetadataKey)
    let typed =
        [ for p in plan ->
            match dtypeName p.Dtype with
            | Some name -> p, name
            | None -> invalidArg "tensors" (sprintf "safetensors %s: tensor %s is %A; expected float32, float16, bfloat16 or int64" path p.Name p.Dtype) ]
    let header =
        use ms = new MemoryStream()
        (use w = new Utf8JsonWriter(ms)
         w.WriteStartObject()
         if not metadata.IsEmpty then
             w.WriteStartObject MetadataKey
             for k, v in metadata do w.WriteString(k, v)
             w.WriteEndObject()
         let mutable offset = 0L
         for p, dtype in typed do
             let bytes = (Array.fold (*) 1L p.Shape) * (elementBytes dtype).Value
             w.WriteStartObject p.Name
             w.WriteString("dtype", dtype)
             w.WriteStartArray "shape"
             for s in p.Shape do w.WriteNumberValue s
             w.WriteEndArray()
             w.WriteStartArray "data_offsets"
             w.WriteNumberValue offset
             w.WriteNumberValue(offset + bytes)
             w.WriteEndArray()
             w.WriteEndObject()
             offset <- offset + bytes
         w.WriteEndObject())
        ms.ToArray()
    let dir = Path.GetDirectoryName(Path.GetFullPath path)
    Directory.CreateDirectory dir |> ignore
    let tmp = Path.Combine(dir, sprintf ".%s.%s.tmp" (Path.GetFileName path) (Guid.NewGuid().ToString "N"))
    try
        (use f = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 <<< 20)
         let len = Array.zeroCreate 8
         BinaryPrimitives.WriteUInt64LittleEndian(Span len, uint64 header.Length)
         f.Write(len, 0, len.Length)
         f.Write(header, 0, header.Length)
         for p, _ in typed do
             use t = produce p
             if t.dtype <> p.Dtype || t.shape <> p.Shape then
                 invalidArg "tensors" (sprintf "safetensors %s: tensor %s was planned as %A %A, got %s" path p.Name p.Dtype p.Shape (describe t))
             writeBytesOf f t)
        File.Move(tmp, path, true)
    finally
        if File.Exists tmp then File.Delete tmp

/// Writes tensors to a safetensors file, each in its own dtype (float32 -> F32, float16 -> F16,
/// bfloat16 -> BF16, int64 -> I64; anything else is an error naming the tensor), with optional string
/// metadata. Written to a temporary file beside `path` and moved into place, so readers never see half
/// a file.
let writeWithMetadata (path: string) (metadata: (string * string) list) (tensors: (string * Tensor) list) : unit =
    let byName = Map.ofList tensors
    let plan = [ for name, t in tensors -> { Name = name; Dtype = t.dtype; Shape = t.shape } ]
    // writePlanned disposes what `produce` returns: hand it an alias, never the caller's tensor.
    writePlanned path metadata plan (fun p -> byName[p.Name].alias ())

/// Writes tensors to a safetensors file (no metadata); see `writeWithMetadata`.
let write (path: string) (tensors: (string * Tensor) list) : unit = writeWithMetadata path [] tensors
