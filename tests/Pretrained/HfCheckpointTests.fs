/// Hugging Face checkpoint folders (`Moe.HfCheckpoint`): indexing and loading `model.safetensors`, its
/// shards and `pytorch_model.bin` one tensor at a time, `loadInto` by name with aliases and its errors, and
/// writing folders back (sharded too), on the shared tiny checkpoints and on files written here.
module Moe.Tests.HfCheckpointTests

open System
open System.Collections
open System.IO
open System.IO.Compression
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open Moe
open Moe.HfCheckpoint
open Moe.Tests.Support

type private Tensor = torch.Tensor

let private f32 = torch.ScalarType.Float32

/// The shared tiny checkpoints (../shared/models), beside ../shared/data.
let private sharedModels (sharedDataDir: string) = Path.GetFullPath(Path.Combine(sharedDataDir, "..", "models"))

let private withFolder (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), sprintf "moe-hfckpt-%s" (Guid.NewGuid().ToString "N"))
    try body dir finally if Directory.Exists dir then Directory.Delete(dir, true)

let private expectIdentical (what: string) (a: Tensor) (b: Tensor) =
    Expect.sequenceEqual a.shape b.shape (what + ": shape")
    Expect.equal a.dtype b.dtype (what + ": dtype")
    Expect.isTrue (a.eq(b).all().item<bool> ()) (what + ": values differ")

let private expectMessage (what: string) (fragments: string list) (f: unit -> unit) =
    let e = Expect.throwsC f id
    for s in fragments do Expect.stringContains e.Message s (sprintf "%s: the error names %s" what s)

let private config () = JsonNode.Parse """{"model_type": "test", "d_model": 4}"""

/// A small state dict of several shapes and dtypes, seeded.
let private state (seed: int) : (string * Tensor) list =
    let g = new torch.Generator(uint64 seed, torch.CPU)
    [ "model.shared.weight", torch.randn ([| 10L; 4L |], generator = g)
      "model.encoder.layers.0.fc1.weight", torch.randn ([| 8L; 4L |], generator = g)
      "model.encoder.layers.0.fc1.bias", torch.randn ([| 8L |], generator = g)
      "model.encoder.layers.0.fc2.weight", torch.randn ([| 4L; 8L |], generator = g)
      "final_logits_bias", torch.randn ([| 1L; 10L |], generator = g)
      "model.counter", torch.tensor [| 3L; -7L |] ]

let private sharedTests =
    testList "shared checkpoints" [
        testWithShared "every tiny model.safetensors indexes to its header and loads into a tree of its names" <| fun data ->
            let dirs = Directory.GetDirectories(sharedModels data) |> Array.filter (fun d -> File.Exists(Path.Combine(d, "model.safetensors")))
            Expect.isGreaterThanOrEqual dirs.Length 4 "the shared tiny checkpoints are there"
            for dir in dirs do
                use _ = torch.NewDisposeScope()
                use weights = openWeights dir
                let h = Safetensors.openHeader (Path.Combine(dir, "model.safetensors"))
                Expect.equal weights.Names [ for e in h.Entries -> e.Name ] (dir + ": names in file order")
                for e in h.Entries do
                    let info = weights.Info e.Name
                    Expect.sequenceEqual info.Shape e.Shape (sprintf "%s %s: shape" dir e.Name)
                    Expect.equal info.Dtype (Safetensors.storedType e.Dtype) (sprintf "%s %s: dtype" dir e.Name)
                use model = ParameterTree.Of weights
                let report = loadInto weights model LoadOptions.Strict
                Expect.equal report.Loaded.Length h.Entries.Length (dir + ": every tensor loaded")
                let own = dict [ for struct (n, p) in model.named_parameters () -> n, (p :> Tensor) ]
                for name, t in Safetensors.read (Path.Combine(dir, "model.safetensors")) do
                    expectIdentical (sprintf "%s %s" dir name) own[name] t

        testWithShared "bart-tiny's shared embedding has config.json's shape [vocab_size; d_model]" <| fun data ->
            let dir = Path.Combine(sharedModels data, "bart-tiny")
            let cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
            use weights = openWeights dir
            let field (name: string) = cfg[name].GetValue<int64>()
            Expect.sequenceEqual (weights.Info "model.shared.weight").Shape [| field "vocab_size"; field "d_model" |] "shape"
            Expect.equal (weights.Info "model.shared.weight").File (Path.Combine(Path.GetFullPath dir, "model.safetensors")) "file"

        testWithShared "copyTokenizerFiles copies bart-tiny's tokenizer and generation files, nothing else" <| fun data ->
            withFolder <| fun out ->
                let src = Path.Combine(sharedModels data, "bart-tiny")
                let copied = copyTokenizerFiles src out
                Expect.equal (set copied) (set [ "tokenizer.json"; "tokenizer_config.json"; "vocab.json"; "merges.txt"; "generation_config.json" ]) "copied"
                for name in copied do
                    Expect.sequenceEqual (File.ReadAllBytes(Path.Combine(out, name))) (File.ReadAllBytes(Path.Combine(src, name))) name
                Expect.equal (Directory.GetFiles out |> Array.map Path.GetFileName |> set) (set copied) "no other file, no temporary left"
    ]

let private loadTests =
    testList "loadInto" [
        testCase "copies by name, tied weights through aliases, allowed absences and leftovers reported" <| fun () ->
            use _ = torch.NewDisposeScope()
            withFolder <| fun dir ->
                let s = state 1
                saveFolder dir (config ()) s None
                use weights = openWeights dir
                let shapes = [ for n, t in s -> n, t.shape, t.dtype ]
                let names =
                    [ "model.shared.weight", [| 10L; 4L |], f32
                      "model.encoder.embed_tokens.weight", [| 10L; 4L |], f32
                      "lm_head.weight", [| 10L; 4L |], f32
                      "model.encoder.layers.0.fc1.weight", [| 8L; 4L |], f32
                      "model.encoder.layers.0.fc1.bias", [| 8L |], f32
                      "model.encoder.layers.0.fc2.weight", [| 4L; 8L |], f32
                      "model.counter", [| 2L |], torch.ScalarType.Int64
                      "model.encoder.embed_positions.weight", [| 3L; 4L |], f32 ]
                use model = new ParameterTree("m", names)
                let options =
                    { LoadOptions.Strict with
                        Aliases = Map.ofList [ "lm_head.weight", [ "model.shared.weight" ]; "model.encoder.embed_tokens.weight", [ "model.shared.weight" ] ]
                        MayBeAbsent = [ @"embed_positions\.weight$" ]
                        MayBeUnexpected = [ "^final_logits_bias$" ] }
                let report = loadInto weights model options
                let own = dict [ for struct (n, p) in model.named_parameters () -> n, (p :> Tensor)
                                 for struct (n, b) in model.named_buffers () -> n, b ]
                let src = dict s
                for n, from in [ "lm_head.weight", "model.shared.weight"; "model.encoder.embed_tokens.weight", "model.shared.weight"; "model.shared.weight", "model.shared.weight"; "model.counter", "model.counter" ] do
                    expectIdentical n own[n] src[from]
                Expect.contains report.Loaded ("lm_head.weight", "model.shared.weight") "alias reported"
                Expect.equal report.Absent [ "model.encoder.embed_positions.weight" ] "absent"
                Expect.equal report.Unused [ "final_logits_bias" ] "unused"
                Expect.equal report.Loaded.Length 7 "loaded"
                ignore shapes

        testCase "missing, mismatched and unexpected tensors are refused, all named at once, model untouched" <| fun () ->
            use _ = torch.NewDisposeScope()
            withFolder <| fun dir ->
                saveFolder dir (config ()) (state 2) None
                use weights = openWeights dir
                let exact = [ for n, t in state 2 -> n, t.shape, t.dtype ]
                use missing = new ParameterTree("m", exact @ [ "lm_head.weight", [| 10L; 4L |], f32; "model.decoder.x", [| 1L |], f32 ])
                expectMessage "missing" [ dir; "lacks 2 tensor(s)"; "lm_head.weight"; "model.decoder.x" ] (fun () -> loadInto weights missing LoadOptions.Strict |> ignore)
                let bent = exact |> List.map (fun (n, s, d) -> if n = "model.encoder.layers.0.fc1.bias" then n, [| 9L |], d else n, s, d)
                use wrong = new ParameterTree("m", bent)
                let before = [ for struct (_, p) in wrong.named_parameters () -> p.clone () ]
                expectMessage "shape" [ "model.encoder.layers.0.fc1.bias in model.safetensors"; "expected [9], got [8]" ] (fun () -> loadInto weights wrong LoadOptions.Strict |> ignore)
                let after = [ for struct (_, p) in wrong.named_parameters () -> p :> Tensor ]
                for a, b in List.zip before after do
                    Expect.isTrue (a.eq(b).all().item<bool> () || a.isnan().any().item<bool> ()) "a refused load copies nothing"
                use fewer = new ParameterTree("m", exact |> List.filter (fun (n, _, _) -> n <> "final_logits_bias" && n <> "model.counter"))
                expectMessage "unexpected" [ "2 tensor(s) the model does not use"; "final_logits_bias"; "model.counter" ] (fun () -> loadInto weights fewer LoadOptions.Strict |> ignore)
                expectMessage "integer as float" [ "model.counter"; "Int64" ] (fun () -> weights.Load("model.counter", f32) |> ignore)

        testCase "float16 and bfloat16 tensors load into float32 exactly" <| fun () ->
            use _ = torch.NewDisposeScope()
            withFolder <| fun dir ->
                let g = new torch.Generator(7UL, torch.CPU)
                let h = (torch.randn ([| 5L; 3L |], generator = g)).to_type torch.float16
                let b = (torch.randn ([| 6L |], generator = g) |> Tensors.mulScalar 1000.0).to_type torch.bfloat16
                saveFolder dir (config ()) [ "h", h; "b", b ] None
                use weights = openWeights dir
                Expect.equal (weights.Info "h").Dtype torch.ScalarType.Float16 "stored float16"
                Expect.equal (weights.Info "b").Dtype torch.ScalarType.BFloat16 "stored bfloat16"
                use model = new ParameterTree("m", [ "h", [| 5L; 3L |], f32; "b", [| 6L |], f32 ])
                loadInto weights model LoadOptions.Strict |> ignore
                let own = dict [ for struct (n, p) in model.named_parameters () -> n, (p :> Tensor) ]
                expectIdentical "float16 -> float32" own["h"] (h.to_type f32)
                expectIdentical "bfloat16 -> float32" own["b"] (b.to_type f32)
                expectIdentical "bfloat16 kept" (weights.Load("b", torch.ScalarType.BFloat16)) b

        testCase "bfloat16 into bfloat16 parameters is bit-identical; copies through slices of rows smaller than the tensor are exact" <| fun () ->
            use _ = torch.NewDisposeScope()
            withFolder <| fun dir ->
                let g = new torch.Generator(11UL, torch.CPU)
                let big = (torch.randn ([| 37L; 5L |], generator = g)).to_type torch.bfloat16 // 370 bytes
                let h = (torch.randn ([| 9L; 4L |], generator = g)).to_type torch.float16
                let s = torch.tensor(2.5f).to_type torch.bfloat16
                saveFolder dir (config ()) [ "big", big; "h", h; "s", s ] None
                use weights = openWeights dir
                use model = new ParameterTree("m", [ "big", [| 37L; 5L |], torch.bfloat16; "h", [| 9L; 4L |], torch.float16; "s", [||], torch.bfloat16 ])
                loadInto weights model LoadOptions.Strict |> ignore
                let own = dict [ for struct (n, p) in model.named_parameters () -> n, (p :> Tensor) ]
                expectIdentical "bfloat16 -> bfloat16" own["big"] big
                expectIdentical "float16 -> float16" own["h"] h
                expectIdentical "0-dim bfloat16" own["s"] s
                for chunk in [ 1L; 40L; 64L; 1000L ] do
                    use into32 = torch.empty ([| 37L; 5L |], dtype = f32)
                    weights.CopyInto("big", into32, chunk)
                    expectIdentical (sprintf "bfloat16 -> float32 in %d-byte slices" chunk) into32 (big.to_type f32)
                    use half32 = torch.empty ([| 9L; 4L |], dtype = f32)
                    weights.CopyInto("h", half32, chunk)
                    expectIdentical (sprintf "float16 -> float32 in %d-byte slices" chunk) half32 (h.to_type f32)
                    use stacked = torch.zeros ([| 5L; 37L |], dtype = torch.bfloat16)
                    use view = stacked.t () // [37; 5], not contiguous: the layout of a transposed parameter
                    weights.CopyInto("big", view, chunk)
                    expectIdentical (sprintf "bfloat16 into a transposed view in %d-byte slices" chunk) stacked (big.t ())
                expectMessage "chunk" [ "chunkBytes > 0" ] (fun () -> weights.CopyInto("big", torch.empty ([| 37L; 5L |], dtype = f32), 0L))
                expectMessage "shape" [ "big"; "[37; 5]" ] (fun () -> weights.CopyInto("big", torch.empty ([| 5L; 37L |], dtype = f32)))
    ]

let private formatTests =
    testList "formats" [
        testCase "no weights: the error names the folder and the files looked for" <| fun () ->
            withFolder <| fun dir ->
                Directory.CreateDirectory dir |> ignore
                File.WriteAllText(Path.Combine(dir, "config.json"), "{}")
                expectMessage "empty" [ dir; "model.safetensors"; "model.safetensors.index.json"; "pytorch_model.bin"; "pytorch_model.bin.index.json" ] (fun () -> openWeights dir |> ignore)
                expectMessage "no folder" [ Path.Combine(dir, "nope") ] (fun () -> openWeights (Path.Combine(dir, "nope")) |> ignore)

        testCase "a pytorch_model.bin that is not a PyTorch zip archive is refused, naming the file" <| fun () ->
            withFolder <| fun dir ->
                Directory.CreateDirectory dir |> ignore
                let path = Path.Combine(dir, "pytorch_model.bin")
                File.WriteAllBytes(path, [| 0x80uy; 2uy; 'N'B; '.'B |])
                expectMessage "not a zip" [ path; "PyTorch state dict" ] (fun () -> openWeights dir |> ignore)

        testCase "a truncated model.safetensors is refused, naming the file" <| fun () ->
            use _ = torch.NewDisposeScope()
            withFolder <| fun dir ->
                saveFolder dir (config ()) (state 3) None
                let path = Path.Combine(dir, "model.safetensors")
                let bytes = File.ReadAllBytes path
                File.WriteAllBytes(path, bytes[.. bytes.Length - 5])
                expectMessage "truncated" [ path; "truncated" ] (fun () -> openWeights dir |> ignore)

        testCase "pytorch_model.bin (written by TorchSharp.PyBridge) loads the same tensors as model.safetensors, float16 too" <| fun () ->
            use _ = torch.NewDisposeScope()
            withFolder <| fun dir ->
                let s = state 4 @ [ "half", torch.tensor([| 0.5f; -2.0f; 1024.0f |]).to_type torch.float16; "scalar", torch.tensor 2.5f ]
                Directory.CreateDirectory dir |> ignore
                let table = Hashtable()
                for n, t in s do table[n] <- t
                TorchSharp.PyBridge.PyTorchPickler.PickleStateDict(Path.Combine(dir, "pytorch_model.bin"), table)
                use weights = openWeights dir
                Expect.equal (set weights.Names) (set (List.map fst s)) "names"
                for n, t in s do
                    Expect.sequenceEqual (weights.Info n).Shape t.shape (n + ": shape")
                    Expect.equal (weights.Info n).Dtype t.dtype (n + ": dtype")
                    expectIdentical n (weights.Load(n, t.dtype)) t
                    expectIdentical (n + " again") (weights.Load(n, t.dtype)) t
                expectIdentical "half -> float32" (weights.Load("half", f32)) (torch.tensor [| 0.5f; -2.0f; 1024.0f |])
                withFolder <| fun st ->
                    saveFolder st (config ()) s None
                    use fromSt = openWeights st
                    use a = ParameterTree.Of weights
                    use b = ParameterTree.Of fromSt
                    loadInto weights a LoadOptions.Strict |> ignore
                    loadInto fromSt b LoadOptions.Strict |> ignore
                    let bs = dict [ for struct (n, p) in b.named_parameters () -> n, (p :> Tensor)
                                    for struct (n, t) in b.named_buffers () -> n, t ]
                    for struct (n, p) in a.named_parameters () do expectIdentical n p bs[n]

        testCase "pytorch_model.bin views (strides, storage offsets) read through their strides from their storage" <| fun () ->
            use _ = torch.NewDisposeScope()
            // TorchSharp.PyBridge writes contiguous tensors only; PyTorch also stores views (a tied transposed
            // matrix, a slice of a larger storage). Such files are made here by editing the pickled view of a
            // [3; 4] tensor (offset 0, shape (3, 4), stride (4, 1)): BININT1 opcodes K, TUPLE2 0x86, memo q.
            let storage = (Tensors.arange 0L 12L f32 torch.CPU).reshape (3L, 4L)
            let original = [| 'K'B; 0uy; 'K'B; 3uy; 'K'B; 4uy; 0x86uy; 'q'B; 7uy; 'K'B; 4uy; 'K'B; 1uy; 0x86uy |]
            let view (offset: byte) (shape: byte * byte) (stride: byte * byte) =
                [| 'K'B; offset; 'K'B; fst shape; 'K'B; snd shape; 0x86uy; 'q'B; 7uy; 'K'B; fst stride; 'K'B; snd stride; 0x86uy |]
            for what, patch, expected in
                [ "transposed", view 0uy (4uy, 3uy) (1uy, 4uy), storage.t().contiguous ()
                  "offset 4", view 4uy (2uy, 4uy) (4uy, 1uy), storage.narrow(0L, 1L, 2L).contiguous () ] do
                withFolder <| fun dir ->
                    Directory.CreateDirectory dir |> ignore
                    let path = Path.Combine(dir, "pytorch_model.bin")
                    let table = Hashtable()
                    table["w"] <- storage
                    TorchSharp.PyBridge.PyTorchPickler.PickleStateDict(path, table)
                    (use zip = ZipFile.Open(path, ZipArchiveMode.Update)
                     let entry = zip.Entries |> Seq.find (fun e -> e.Name = "data.pkl")
                     let name = entry.FullName
                     let bytes = (use s = entry.Open() in use ms = new MemoryStream() in s.CopyTo ms; ms.ToArray())
                     let at = Seq.windowed original.Length bytes |> Seq.findIndex (fun w -> w = original)
                     Array.blit patch 0 bytes at patch.Length
                     entry.Delete()
                     use s = zip.CreateEntry(name, CompressionLevel.NoCompression).Open()
                     s.Write(bytes, 0, bytes.Length))
                    use weights = openWeights dir
                    Expect.sequenceEqual (weights.Info "w").Shape expected.shape (what + ": shape")
                    expectIdentical what (weights.Load("w", f32)) expected
                    use wide = torch.empty (expected.shape, dtype = torch.float64)
                    weights.CopyInto("w", wide, 8L)
                    expectIdentical (what + ", one row at a time into float64") wide (expected.to_type torch.float64)

        testCase "sharded pytorch_model.bin.index.json loads every shard's tensors" <| fun () ->
            use _ = torch.NewDisposeScope()
            withFolder <| fun dir ->
                Directory.CreateDirectory dir |> ignore
                let s = state 5
                let halves = List.splitAt 3 s
                let files = [ "pytorch_model-00001-of-00002.bin", fst halves; "pytorch_model-00002-of-00002.bin", snd halves ]
                let map = JsonObject()
                for file, part in files do
                    let table = Hashtable()
                    for n, t in part do
                        table[n] <- t
                        map[n] <- JsonValue.Create file
                    TorchSharp.PyBridge.PyTorchPickler.PickleStateDict(Path.Combine(dir, file), table)
                let index = JsonObject()
                index["weight_map"] <- map
                File.WriteAllText(Path.Combine(dir, "pytorch_model.bin.index.json"), index.ToJsonString())
                use weights = openWeights dir
                for n, t in s do expectIdentical n (weights.Load(n, t.dtype)) t
                Expect.equal (Path.GetFileName (weights.Info "model.counter").File) "pytorch_model-00002-of-00002.bin" "the shard"
                File.Delete(Path.Combine(dir, "pytorch_model-00002-of-00002.bin"))
                expectMessage "missing shard" [ "pytorch_model.bin.index.json"; "pytorch_model-00002-of-00002.bin"; "missing" ] (fun () -> openWeights dir |> ignore)
    ]

let private saveTests =
    testList "saveFolder" [
        testCase "save -> openWeights gives identical tensors, whole and sharded in transformers' layout" <| fun () ->
            use _ = torch.NewDisposeScope()
            let s = state 6
            withFolder <| fun dir ->
                saveFolder dir (config ()) s None
                Expect.equal (Directory.GetFiles dir |> Array.map Path.GetFileName |> set) (set [ "config.json"; "model.safetensors" ]) "files"
                let written = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
                let dModel = written["d_model"].GetValue<int>()
                Expect.equal dModel 4 "config"
                use weights = openWeights dir
                for n, t in s do expectIdentical n (weights.Load(n, t.dtype)) t
                let _, meta = Safetensors.readHeader (Path.Combine(dir, "model.safetensors"))
                Expect.equal meta (Map.ofList [ "format", "pt" ]) "transformers' metadata"
            withFolder <| fun dir ->
                // 160 + 128 + 32 + 128 + 40 + 16 bytes: shards of at most 200 bytes hold [shared], [fc1.w, fc1.b], [fc2.w, bias, counter].
                saveFolder dir (config ()) s (Some 200L)
                let index = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "model.safetensors.index.json")))
                let metadata = index["metadata"]
                let total = metadata["total_size"].GetValue<int64>()
                Expect.equal total 504L "total_size"
                let map = index["weight_map"].AsObject()
                Expect.equal map.Count s.Length "weight_map covers every tensor"
                let shardOf (name: string) = map[name].GetValue<string>()
                Expect.equal (shardOf "model.shared.weight") "model-00001-of-00003.safetensors" "first shard"
                Expect.equal (shardOf "model.encoder.layers.0.fc1.bias") "model-00002-of-00003.safetensors" "second shard"
                Expect.equal (shardOf "model.counter") "model-00003-of-00003.safetensors" "third shard"
                use weights = openWeights dir
                Expect.equal weights.Names (List.map fst s) "names in order"
                for n, t in s do expectIdentical n (weights.Load(n, t.dtype)) t

        testCase "a non-empty folder is refused; overwriting replaces the weights and removes stale shards" <| fun () ->
            use _ = torch.NewDisposeScope()
            withFolder <| fun dir ->
                saveFolder dir (config ()) (state 7) (Some 200L)
                expectMessage "non-empty" [ dir; "not empty" ] (fun () -> saveFolder dir (config ()) (state 8) None)
                saveFolderWith true dir (config ()) (state 8) None
                Expect.equal (Directory.GetFiles dir |> Array.map Path.GetFileName |> set) (set [ "config.json"; "model.safetensors" ]) "only the new files"
                use weights = openWeights dir
                for n, t in state 8 do expectIdentical n (weights.Load(n, t.dtype)) t
    ]

let tests = testList "HfCheckpoint" [ sharedTests; loadTests; formatTests; saveTests ]
