/// GPT-2 (`Moe.Gpt2`), the safetensors reader/writer (`Moe.Safetensors`) and LoRA on GPT-2, on random
/// weights and tiny files in the real format (no pretrained weights can be downloaded here).
module Moe.Tests.Gpt2Tests

open System
open System.IO
open System.Buffers.Binary
open System.Text
open Expecto
open TorchSharp
open Moe
open Moe.Config
open Moe.Gpt2
open Moe.Tests.Support

let private f32 = torch.ScalarType.Float32
let private cfg = Gpt2Config.tiny
/// Batch and sequence length of the test inputs.
let private batch, seqLen = 2L, 7L

let private gen (seed: int) = new torch.Generator(uint64 seed, torch.CPU)
let private ids (seed: int) = torch.randint (int64 cfg.VocabSize, [| batch; seqLen |], generator = gen seed)

let private model (seed: int) =
    torch.manual_seed (int64 seed) |> ignore
    new Gpt2Model(cfg)

let private tempFile (name: string) = Path.Combine(Path.GetTempPath(), sprintf "moe-gpt2-%s-%s.safetensors" name (Guid.NewGuid().ToString "N"))

let private withTemp (name: string) (body: string -> unit) =
    let path = tempFile name
    try body path finally if File.Exists path then File.Delete path

/// Same shape and every element equal (bit-identical for finite floats).
let private identical (a: torch.Tensor) (b: torch.Tensor) =
    Seq.toList a.shape = Seq.toList b.shape && (a.eq b).all().item<bool> ()

let private maxDiff (a: torch.Tensor) (b: torch.Tensor) = Tensors.scalar ((a - b).abs().max ())

let private expectEqual (what: string) (a: torch.Tensor) (b: torch.Tensor) =
    Expect.sequenceEqual a.shape b.shape (what + ": shape")
    Expect.isTrue (a.dtype = b.dtype) (sprintf "%s: dtype %A vs %A" what a.dtype b.dtype)
    Expect.isTrue (identical a b) (sprintf "%s: not identical (max difference %g)" what (maxDiff (a.to_type torch.float64) (b.to_type torch.float64)))

/// Raw safetensors bytes from a header string and a data section.
let private rawFile (header: string) (data: byte[]) =
    let h = Encoding.UTF8.GetBytes header
    let len = Array.zeroCreate 8
    BinaryPrimitives.WriteUInt64LittleEndian(Span len, uint64 h.Length)
    Array.concat [ len; h; data ]

let private expectError (what: string) (fragments: string list) (path: string) =
    let e = Expect.throwsC (fun () -> Safetensors.read path |> ignore) id
    for f in path :: fragments do
        Expect.stringContains e.Message f (sprintf "%s: message names %s" what f)

let private modelTests =
    testList "model" [
        testCase "parameter names are Hugging Face's GPT2Model state dict" <| fun () ->
            use m = model 1
            let names = stateDict m |> List.map fst |> Set.ofList
            let expected =
                set [ yield! [ "wte.weight"; "wpe.weight"; "ln_f.weight"; "ln_f.bias" ]
                      for i in 0 .. cfg.Layers - 1 do
                          for p in [ "ln_1"; "ln_2"; "attn.c_attn"; "attn.c_proj"; "mlp.c_fc"; "mlp.c_proj" ] do
                              for w in [ "weight"; "bias" ] do yield sprintf "h.%d.%s.%s" i p w ]
            Expect.equal names expected "state dict names"
            let shape n = (stateDict m |> List.find (fun (k, _) -> k = n) |> snd).shape
            let d = int64 cfg.Embd
            Expect.sequenceEqual (shape "h.0.attn.c_attn.weight") [| d; 3L * d |] "c_attn Conv1D [D; 3D]"
            Expect.sequenceEqual (shape "h.0.mlp.c_fc.weight") [| d; 4L * d |] "c_fc Conv1D [D; 4D]"
            Expect.sequenceEqual (shape "h.0.mlp.c_proj.weight") [| 4L * d; d |] "c_proj Conv1D [4D; D]"

        testCase "logits are [B; S; V] and causal: a later token never changes earlier logits" <| fun () ->
            use _ = torch.NewDisposeScope()
            use m = model 2
            use _ = torch.no_grad ()
            let x = ids 3
            let y = m.forward x
            Expect.sequenceEqual y.shape [| batch; seqLen; int64 cfg.VocabSize |] "logits shape"
            for t in 1L .. seqLen - 1L do
                // x2 = x with tokens t.. shifted by one (mod V).
                let tail = x.narrow(1L, t, seqLen - t) |> fun z -> Tensors.withInt64Scalar 1L (fun one -> z.add (one, one)) |> fun z -> Tensors.withInt64Scalar (int64 cfg.VocabSize) (fun v -> z.remainder v)
                let x2 = torch.cat ([| x.narrow (1L, 0L, t); tail |], 1L)
                Expect.isFalse (identical x x2) "the later tokens changed"
                let y2 = m.forward x2
                expectEqual (sprintf "logits before position %d" t) (y.narrow (1L, 0L, t)) (y2.narrow (1L, 0L, t))
                Expect.isFalse (identical (y.narrow (1L, t, 1L)) (y2.narrow (1L, t, 1L))) (sprintf "position %d sees its own token" t)

        testCase "the output layer is tied to wte and gelu_new is the tanh approximation" <| fun () ->
            use _ = torch.NewDisposeScope()
            let x = torch.tensor [| -3.0f; -1.0f; 0.0f; 0.5f; 2.0f |]
            let expected = x.to_type torch.float64 |> fun z -> Tensors.mulScalar 0.5 z * Tensors.addScalar 1.0 (torch.tanh (Tensors.mulScalar (Math.Sqrt(2.0 / Math.PI)) (Tensors.plus z (Tensors.mulScalar 0.044715 (z * z * z)))))
            Expect.isLessThanOrEqual (maxDiff (geluNew x |> fun t -> t.to_type torch.float64) expected) Tol.f32 "gelu_new"
            use m = model 4
            Expect.equal (stateDict m |> List.filter (fun (n, _) -> n.Contains "lm_head")) [] "no separate output layer"

        testCase "bad ids are rejected with the expected layout" <| fun () ->
            use m = model 5
            let tooLong = torch.zeros ([| 1L; int64 cfg.Positions + 1L |], dtype = torch.int64)
            let e = Expect.throwsC (fun () -> m.forward tooLong |> ignore) id
            Expect.stringContains e.Message "n_positions" "names the position limit"
            let e = Expect.throwsC (fun () -> m.forward (torch.tensor([| int64 cfg.VocabSize; 0L |]).reshape (1L, 2L)) |> ignore) id
            Expect.stringContains e.Message "token ids in [0, 23)" "names the vocabulary"
    ]

let private safetensorsTests =
    testList "safetensors" [
        testCase "write then read gives the same tensors, F16/BF16 rounded as torch rounds" <| fun () ->
            use _ = torch.NewDisposeScope()
            withTemp "roundtrip" <| fun path ->
                let g = gen 11
                let a = torch.randn ([| 3L; 4L |], generator = g)
                let h = torch.randn ([| 5L |], generator = g) |> Tensors.mulScalar 100.0
                let b = torch.randn ([| 2L; 3L; 2L |], generator = g)
                let i = torch.tensor [| -5L; 0L; Int64.MaxValue |]
                let s = torch.tensor 3.5f
                Safetensors.writeWithMetadata path [ "format", "pt" ] [ "a", a; "h", h.to_type torch.float16; "b", b.to_type torch.bfloat16; "i", i; "s", s ]
                let back = Safetensors.read path |> Map.ofList
                Expect.equal (back |> Map.keys |> Set.ofSeq) (set [ "a"; "h"; "b"; "i"; "s" ]) "names"
                expectEqual "F32" back["a"] a
                expectEqual "F16 -> float32" back["h"] (h.to_type(torch.float16).to_type f32)
                expectEqual "BF16 -> float32" back["b"] (b.to_type(torch.bfloat16).to_type f32)
                expectEqual "I64" back["i"] i
                expectEqual "scalar (shape [])" back["s"] s
                let _, meta = Safetensors.readHeader path
                Expect.equal meta (Map.ofList [ "format", "pt" ]) "metadata"
                Expect.isEmpty (Directory.GetFiles(Path.GetDirectoryName path, "." + Path.GetFileName path + ".*")) "no temporary file left"

        testCase "a hand-built file decodes to known values" <| fun () ->
            withTemp "hand" <| fun path ->
                // Data: F32 [1.0, -2.5] at [0, 8); BF16 1.5 = 0x3FC0 at [8, 10); F16 1.0 = 0x3C00, -2.0 = 0xC000 at
                // [10, 14); I64 [7] at [14, 22). Header keys out of data order, with metadata, as files have.
                let data =
                    [| 0x00uy; 0x00uy; 0x80uy; 0x3Fuy; 0x00uy; 0x00uy; 0x20uy; 0xC0uy
                       0xC0uy; 0x3Fuy
                       0x00uy; 0x3Cuy; 0x00uy; 0xC0uy
                       7uy; 0uy; 0uy; 0uy; 0uy; 0uy; 0uy; 0uy |]
                let header =
                    """{"i":{"dtype":"I64","shape":[1,1],"data_offsets":[14,22]},"__metadata__":{"format":"pt"},"""
                    + """"f":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"bf":{"dtype":"BF16","shape":[],"data_offsets":[8,10]},"""
                    + """"h":{"dtype":"F16","shape":[2,1],"data_offsets":[10,14]}}"""
                File.WriteAllBytes(path, rawFile header data)
                let t = Safetensors.read path
                Expect.equal (List.map fst t) [ "f"; "bf"; "h"; "i" ] "data order"
                let m = Map.ofList t
                Expect.equal (Tensors.toFloats m["f"]) [| 1.0f; -2.5f |] "F32 values"
                Expect.sequenceEqual m["bf"].shape [||] "BF16 scalar shape"
                Expect.equal (Tensors.toFloats m["bf"]) [| 1.5f |] "BF16 value"
                Expect.sequenceEqual m["h"].shape [| 2L; 1L |] "F16 shape"
                Expect.equal (Tensors.toFloats m["h"]) [| 1.0f; -2.0f |] "F16 values"
                Expect.isTrue (m["i"].dtype = torch.int64) "I64 stays int64"
                Expect.equal (Tensors.toInt64s m["i"]) [| 7L |] "I64 value"

        testCase "bad files give errors naming the file, the tensor and the problem" <| fun () ->
            let f32Header (shape: string) (b: int) (e: int) = sprintf """{"w":{"dtype":"F32","shape":%s,"data_offsets":[%d,%d]}}""" shape b e
            let cases =
                [ "truncated", [| 1uy; 2uy; 3uy |], [ "truncated" ]
                  "header beyond file", (let len = Array.zeroCreate 8 in BinaryPrimitives.WriteUInt64LittleEndian(Span len, 1000UL); Array.append len [| 1uy |]), [ "header length 1000" ]
                  "offsets out of range", rawFile (f32Header "[2]" 0 8) (Array.zeroCreate 4), [ "tensor w"; "out of range" ]
                  "unknown dtype", rawFile """{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}""" (Array.zeroCreate 8), [ "tensor w"; "unknown dtype C64" ]
                  "shape/size mismatch", rawFile (f32Header "[3]" 0 8) (Array.zeroCreate 8), [ "tensor w"; "needs 12 bytes" ]
                  "overlap",
                  rawFile """{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""" (Array.zeroCreate 8),
                  [ "a [0, 8]"; "b [4, 8]"; "overlap" ]
                  "not JSON", rawFile "{nope" [||], [ "not valid JSON" ] ]
            for what, bytes, fragments in cases do
                withTemp "bad" <| fun path ->
                    File.WriteAllBytes(path, bytes)
                    expectError what fragments path
            use _ = torch.NewDisposeScope()
            let e = Expect.throwsC (fun () -> Safetensors.write (tempFile "int32") [ "n", torch.zeros ([| 2L |], dtype = torch.int32) ]) id
            Expect.stringContains e.Message "tensor n" "writer names the tensor of an unsupported dtype"
    ]

let private loadTests =
    testList "load" [
        testCase "load of a written tiny checkpoint reproduces the model's logits exactly" <| fun () ->
            use _ = torch.NewDisposeScope()
            withTemp "ckpt" <| fun path ->
                use m = model 21
                save path m
                use loaded = loadHeads cfg.Heads path
                Expect.equal loaded.Config cfg "config inferred from shapes (heads given)"
                use _ = torch.no_grad ()
                let x = ids 22
                expectEqual "logits" (loaded.forward x) (m.forward x)

        testCase "GPT2LMHeadModel names, mask buffers and lm_head load; missing and unexpected names are reported" <| fun () ->
            use _ = torch.NewDisposeScope()
            withTemp "partial" <| fun path ->
                use m = model 23
                let state = stateDict m
                let d = int64 cfg.Embd
                let written =
                    [ for n, t in state do if n <> "h.1.mlp.c_fc.bias" then "transformer." + n, t
                      "transformer.h.0.attn.bias", torch.ones [| 1L; 1L; 4L; 4L |]
                      "lm_head.weight", (state |> List.find (fun (n, _) -> n = "wte.weight") |> snd)
                      "transformer.h.0.extra.weight", torch.zeros [| d |] ]
                Safetensors.write path written
                let loaded, report = loadWithReport cfg.Heads path
                use loaded = loaded
                Expect.equal report.Missing [ "h.1.mlp.c_fc.bias" ] "missing"
                Expect.equal report.Unexpected [ "h.0.extra.weight" ] "unexpected"
                Expect.equal (Set.ofList report.Ignored) (set [ "h.0.attn.bias"; "lm_head.weight" ]) "ignored buffers and tied head"
                let e = Expect.throwsC (fun () -> loadHeads cfg.Heads path |> ignore) id
                for f in [ path; "h.1.mlp.c_fc.bias"; "h.0.extra.weight" ] do
                    Expect.stringContains e.Message f "strict load names the file and the names"
    ]

/// LoRA settings of the tests: rank 2, alpha 4 (scale 2).
let private loraCfg (targets: string list) = { Lora = { Rank = 2; Alpha = 4.0; FreezeBase = true }; Targets = targets }
/// AdamW learning rate and steps of the tiny fine-tuning check.
let private lr, steps = 0.02, 8

let private randomiseB (m: Gpt2Model) =
    use _ = torch.no_grad ()
    for i, (_, c) in List.indexed m.Projections do
        if c.HasLora then c.LoraB.copy_ (torch.randn (c.LoraB.shape, generator = gen (100 + i)) |> Tensors.mulScalar 0.1) |> ignore

let private loraTests =
    testList "lora" [
        testCase "with B = 0 the adapted model equals the base model exactly; only A and B train" <| fun () ->
            use _ = torch.NewDisposeScope()
            use m = model 31
            let x = ids 32
            let before = (use _ = torch.no_grad () in m.forward x)
            let adapted = applyLora (loraCfg [ "c_attn"; "mlp.c_fc" ]) m
            Expect.equal adapted [ "h.0.attn.c_attn"; "h.0.mlp.c_fc"; "h.1.attn.c_attn"; "h.1.mlp.c_fc" ] "adapted projections"
            let after = (use _ = torch.no_grad () in m.forward x)
            expectEqual "logits with B = 0" after before
            let trainable = [ for struct (n, p) in m.named_parameters () do if p.requires_grad then n ]
            Expect.isNonEmpty trainable "some parameters train"
            for n in trainable do
                Expect.isTrue (n.EndsWith ".lora_A" || n.EndsWith ".lora_B") (sprintf "%s trains" n)
            Expect.equal trainable.Length (2 * adapted.Length) "one A and one B per adapted projection"

        testCase "trainable parameters = r (in + out) per adapted projection" <| fun () ->
            use m = model 33
            let total0 = totalParameters m
            let cfgL = loraCfg [ "c_attn"; "c_proj" ]
            let adapted = applyLora cfgL m
            let d = int64 cfg.Embd
            let r = int64 cfgL.Lora.Rank
            // c_attn D -> 3D, attn.c_proj D -> D, mlp.c_proj 4D -> D, per layer.
            let expected = int64 cfg.Layers * r * ((d + 3L * d) + (d + d) + (4L * d + d))
            Expect.equal adapted.Length (3 * cfg.Layers) "c_proj matches both output projections"
            Expect.equal (trainableParameters m) expected "trainable"
            Expect.equal (totalParameters m) (total0 + expected) "total = base + adapters"
            let e = Expect.throwsC (fun () -> applyLora (loraCfg [ "q_proj" ]) m |> ignore) id
            Expect.stringContains e.Message "q_proj" "unknown target named"

        testCase "AdamW on the adapters lowers a next-token loss; base weights stay bit-identical" <| fun () ->
            use _ = torch.NewDisposeScope()
            use m = model 35
            applyLora (loraCfg [ "c_attn"; "c_fc" ]) m |> ignore
            let baseBefore = [ for struct (n, p) in m.named_parameters () do if not p.requires_grad then n, p.detach().clone () ]
            let x = ids 36
            let trainable = m.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.toArray
            use opt = new Train.SafeAdamW(trainable, lr)
            let lossAt () = (use _ = torch.no_grad () in Tensors.scalar (nextTokenLoss m x))
            let first = lossAt ()
            for _ in 1 .. steps do
                use _ = torch.NewDisposeScope()
                opt.zero_grad ()
                (nextTokenLoss m x).backward ()
                opt.step () |> ignore
            let last = lossAt ()
            Expect.isLessThan last first (sprintf "loss %g -> %g" first last)
            let now = dict [ for struct (n, p) in m.named_parameters () -> n, p ]
            for n, b in baseBefore do expectEqual (sprintf "frozen %s" n) (now[n].detach ()) b

        testCase "merge folds the adapters into W: same logits within float32 round-off" <| fun () ->
            use _ = torch.NewDisposeScope()
            use m = model 37
            applyLora (loraCfg [ "c_attn"; "c_proj"; "c_fc" ]) m |> ignore
            randomiseB m
            use _ = torch.no_grad ()
            let x = ids 38
            let unmerged = m.forward x
            let w0 = stateDict m |> List.filter (fun (n, _) -> n = "h.0.attn.c_attn.weight") |> List.map (fun (_, t) -> t.clone ())
            merge m
            let merged = m.forward x
            let scale = 1.0 + Tensors.scalar (unmerged.abs().max ())
            Expect.isLessThanOrEqual (maxDiff merged unmerged / scale) Tol.f32Loose "merged vs unmerged logits"
            withTemp "merged" <| fun path ->
                save path m
                use reloaded = loadHeads cfg.Heads path
                expectEqual "a saved merged model reloads as a plain GPT-2" (reloaded.forward x) merged
            Expect.isFalse (identical w0.Head (stateDict m |> List.find (fun (n, _) -> n = "h.0.attn.c_attn.weight") |> snd)) "W changed"
    ]

let tests = testList "Gpt2" [ modelTests; safetensorsTests; loadTests; loraTests ]
