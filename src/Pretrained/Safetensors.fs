/// The safetensors file format (Hugging Face, https://github.com/huggingface/safetensors): an 8-byte
/// little-endian header length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}}`
/// (plus an optional `"__metadata__"` map of strings), then the raw little-endian tensor bytes, offsets
/// counted from the end of the header. Read here without Python: F32, F16 and BF16 come back as float32,
/// I64 as int64. Axes: none (tensors of any shape).
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

/// Parses and checks the header of a file's bytes: the entries in data order and the metadata. Every
/// entry's dtype is known, its byte range lies inside the data section, matches prod(shape) x element
/// size, and overlaps no other entry.
let private parseHeader (path: string) (bytes: byte[]) : Entry list * Map<string, string> =
    let fileLen = int64 bytes.Length
    if fileLen < prefixBytes then
        fail path (sprintf "truncated: %d bytes, expected at least the %d-byte header length" fileLen prefixBytes)
    let n = BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan(bytes, 0, int prefixBytes))
    if n > uint64 (fileLen - prefixBytes) then
        fail path (sprintf "header length %d goes beyond the file (%d bytes after the length prefix)" n (fileLen - prefixBytes))
    let dataStart = prefixBytes + int64 n
    let dataLen = fileLen - dataStart
    use doc =
        try JsonDocument.Parse(ReadOnlyMemory(bytes, int prefixBytes, int n))
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
                    bad (sprintf "data_offsets [%d, %d] out of range (data section has %d bytes)" b e dataLen)
                let expected = (Array.fold (*) 1L shape) * size
                if e - b <> expected then
                    bad (sprintf "shape %A of %s needs %d bytes, data_offsets [%d, %d] give %d" shape dtype expected b e (e - b))
                yield { Name = p.Name; Dtype = dtype; Shape = shape; Begin = b; End = e } ]
    let ordered = entries |> List.sortBy (fun e -> e.Begin, e.End)
    for a, b in List.pairwise ordered do
        if b.Begin < a.End then
            fail path (sprintf "tensors %s [%d, %d] and %s [%d, %d] overlap" a.Name a.Begin a.End b.Name b.Begin b.End)
    ordered, metadata

/// The header entries of a file (in data order) and its `__metadata__`, without reading tensors.
let readHeader (path: string) : Entry list * Map<string, string> = parseHeader path (File.ReadAllBytes path)

/// Decodes one entry's bytes: F32/F16/BF16 as a float32 tensor, I64 as int64, in the stored shape.
let private decode (bytes: byte[]) (dataStart: int64) (e: Entry) : Tensor =
    let span = ReadOnlySpan(bytes, int (dataStart + e.Begin), int (e.End - e.Begin))
    let t =
        match e.Dtype with
        | "F32" -> torch.tensor (Array.init (span.Length / 4) (fun i -> BinaryPrimitives.ReadSingleLittleEndian(ReadOnlySpan(bytes, int (dataStart + e.Begin) + 4 * i, 4))))
        | "F16" ->
            torch.tensor (Array.init (span.Length / 2) (fun i ->
                float32 (BinaryPrimitives.ReadHalfLittleEndian(ReadOnlySpan(bytes, int (dataStart + e.Begin) + 2 * i, 2)))))
        | "BF16" ->
            // bfloat16 is the top half of a float32 (Kalamkar et al. 2019): shift the 16 bits up.
            torch.tensor (Array.init (span.Length / 2) (fun i ->
                let bits = BinaryPrimitives.ReadUInt16LittleEndian(ReadOnlySpan(bytes, int (dataStart + e.Begin) + 2 * i, 2))
                BitConverter.Int32BitsToSingle(int bits <<< 16)))
        | _ ->
            torch.tensor (Array.init (span.Length / 8) (fun i -> BinaryPrimitives.ReadInt64LittleEndian(ReadOnlySpan(bytes, int (dataStart + e.Begin) + 8 * i, 8))))
    t.reshape e.Shape

/// Reads every tensor of a safetensors file, in data order: F32, F16 and BF16 as float32, I64 as int64.
/// Fails naming the file (and tensor) on a truncated file, a header length beyond the file, offsets out
/// of range or overlapping, an unknown dtype, or a shape that does not match its byte range.
let read (path: string) : (string * Tensor) list =
    let bytes = File.ReadAllBytes path
    let entries, _ = parseHeader path bytes
    let dataStart = prefixBytes + int64 (BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan(bytes, 0, int prefixBytes)))
    [ for e in entries -> e.Name, decode bytes dataStart e ]

/// C#-friendly `read`: name -> tensor.
let readDictionary (path: string) : Collections.Generic.Dictionary<string, Tensor> =
    let d = Collections.Generic.Dictionary<string, Tensor>()
    for k, v in read path do d[k] <- v
    d

/// Rounds a float32 to bfloat16 bits, to nearest even, as torch does (NaN stays a quiet NaN).
let private toBf16Bits (x: float32) : uint16 =
    if Single.IsNaN x then 0x7FC0us
    else
        let bits = uint32 (BitConverter.SingleToInt32Bits x)
        let roundingBias = 0x7FFFu + ((bits >>> 16) &&& 1u)
        uint16 ((bits + roundingBias) >>> 16)

/// Writes tensors to a safetensors file, each in its own dtype (float32 -> F32, float16 -> F16,
/// bfloat16 -> BF16, int64 -> I64; anything else is an error naming the tensor), with optional string
/// metadata. Written to a temporary file beside `path` and moved into place, so readers never see half
/// a file.
let writeWithMetadata (path: string) (metadata: (string * string) list) (tensors: (string * Tensor) list) : unit =
    let names = tensors |> List.map fst
    match names |> List.countBy id |> List.filter (fun (_, c) -> c > 1) with
    | [] -> ()
    | dups -> invalidArg "tensors" (sprintf "safetensors %s: duplicate tensor names %A" path (List.map fst dups))
    if List.contains MetadataKey names then invalidArg "tensors" (sprintf "safetensors %s: %s is reserved for metadata" path MetadataKey)
    let encoded =
        [ for name, t in tensors ->
            let t = t.detach().cpu().contiguous()
            let floats () = toFloats t
            let dtype, data =
                match t.dtype with
                | torch.ScalarType.Float32 ->
                    "F32", (floats () |> Array.collect (fun v -> let b = Array.zeroCreate 4 in BinaryPrimitives.WriteSingleLittleEndian(Span b, v); b))
                | torch.ScalarType.Float16 ->
                    "F16", (floats () |> Array.collect (fun v -> let b = Array.zeroCreate 2 in BinaryPrimitives.WriteHalfLittleEndian(Span b, Half.op_Explicit v); b))
                | torch.ScalarType.BFloat16 ->
                    "BF16", (floats () |> Array.collect (fun v -> let b = Array.zeroCreate 2 in BinaryPrimitives.WriteUInt16LittleEndian(Span b, toBf16Bits v); b))
                | torch.ScalarType.Int64 ->
                    "I64", (toInt64s t |> Array.collect (fun v -> let b = Array.zeroCreate 8 in BinaryPrimitives.WriteInt64LittleEndian(Span b, v); b))
                | _ -> invalidArg "tensors" (sprintf "safetensors %s: tensor %s is %s; expected float32, float16, bfloat16 or int64" path name (describe t))
            name, dtype, t.shape, data ]
    let header =
        use ms = new MemoryStream()
        (use w = new Utf8JsonWriter(ms)
         w.WriteStartObject()
         if not metadata.IsEmpty then
             w.WriteStartObject MetadataKey
             for k, v in metadata do w.WriteString(k, v)
             w.WriteEndObject()
         let mutable offset = 0L
         for name, dtype, shape, data in encoded do
             w.WriteStartObject name
             w.WriteString("dtype", dtype)
             w.WriteStartArray "shape"
             for s in shape do w.WriteNumberValue s
             w.WriteEndArray()
             w.WriteStartArray "data_offsets"
             w.WriteNumberValue offset
             w.WriteNumberValue(offset + int64 data.Length)
             w.WriteEndArray()
             w.WriteEndObject()
             offset <- offset + int64 data.Length
         w.WriteEndObject())
        ms.ToArray()
    let dir = Path.GetDirectoryName(Path.GetFullPath path)
    Directory.CreateDirectory dir |> ignore
    let tmp = Path.Combine(dir, sprintf ".%s.%s.tmp" (Path.GetFileName path) (Guid.NewGuid().ToString "N"))
    try
        (use f = File.Create tmp
         let len = Array.zeroCreate 8
         BinaryPrimitives.WriteUInt64LittleEndian(Span len, uint64 header.Length)
         f.Write(len, 0, len.Length)
         f.Write(header, 0, header.Length)
         for _, _, _, data in encoded do f.Write(data, 0, data.Length))
        File.Move(tmp, path, true)
    finally
        if File.Exists tmp then File.Delete tmp

/// Writes tensors to a safetensors file (no metadata); see `writeWithMetadata`.
let write (path: string) (tensors: (string * Tensor) list) : unit = writeWithMetadata path [] tensors
