/// T5 / Flan-T5 (`Moe.T5`) against the outputs transformers 4.45.1 recorded for the tiny checkpoints in
/// ../shared/models (`sample_outputs.json`), plus the properties those samples cannot show: cached decoding
/// equals recomputing the prefix, a padded batch equals each row alone, export names and reload, clear errors.
module Moe.Tests.T5Tests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Moe
open Moe.Models
open Moe.Seq2Seq
open Moe.T5
open Moe.Tests.Support

/// Logits and losses against transformers' (the README's "about 1e-4").
let logitsTol = 1e-4

/// The tiny checkpoint folder `name` beside ../shared/data.
let modelDir (shared: string) (name: string) = Path.GetFullPath(Path.Combine(shared, "..", "models", name))

/// The checkpoint's sample_outputs.json.
let sample (dir: string) : JsonElement =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
    doc.RootElement.Clone()

/// An int64 (or bool) tensor of `shape` from its values in row-major order.
let tensorOf (data: 'a[]) (shape: int64[]) : torch.Tensor =
    match box data with
    | :? (int64[]) as d -> torch.tensor(d).reshape shape
    | :? (bool[]) as d -> torch.tensor(d).reshape shape
    | _ -> failwith "tensorOf: int64 or bool data"

/// A bool tensor of `shape`, all true.
let allTrue (shape: int64[]) : torch.Tensor = torch.ones(shape, dtype = torch.ScalarType.Bool)

/// A JSON array of arrays of integers as an int64 tensor [B; S].
let ids2d (e: JsonElement) : torch.Tensor =
    let rows = [| for r in e.EnumerateArray() -> [| for x in r.EnumerateArray() -> x.GetInt64() |] |]
    tensorOf (Array.concat rows) [| int64 rows.Length; int64 rows[0].Length |]

/// A JSON array of arrays of 0/1 as a bool tensor.
let mask2d (e: JsonElement) : torch.Tensor = (ids2d e).to_type torch.ScalarType.Bool

/// A JSON [B][L][8] array of floats.
let floats3d (e: JsonElement) : float[][][] =
    [| for a in e.EnumerateArray() -> [| for b in a.EnumerateArray() -> [| for x in b.EnumerateArray() -> x.GetDouble() |] |] |]

/// Largest |logits[.., :8] - expected|.
let sliceError (logits: torch.Tensor) (expected: float[][][]) : float =
    use slice = logits.narrow(2L, 0L, 8L).contiguous().to_type torch.ScalarType.Float64
    let got = slice.data<float>().ToArray()
    let want = expected |> Array.collect (Array.collect id)
    Array.map2 (fun (a: float) b -> abs (a - b)) got want |> Array.max

/// Greedy decoding through `ISeq2SeqModel` with the key/value cache: the decoder start token, then the
/// arg-max token each step until EOS or `maxNew` tokens (transformers' greedy with no logits processors).
let greedy (m: ISeq2SeqModel) (inputIds: torch.Tensor) (mask: torch.Tensor) (start: int64) (eos: int64) (maxNew: int) : int64 list =
    use _ = torch.no_grad ()
    use cache = m.NewCache()
    let enc = m.Encode(inputIds, mask)
    let rec loop (acc: int64 list) (last: int64) (n: int) =
        if n = maxNew || (n > 0 && last = eos) then List.rev acc
        else
            use scope = torch.NewDisposeScope()
            let out = m.Decode(tensorOf ([| last |]) [| 1L; 1L |], enc.Memory, mask, cache)
            let next = out.Logits[0L, -1L].argmax().item<int64> ()
            loop (next :: acc) next (n + 1)
    loop [ start ] start 0

/// Logits of the whole decoder input at once, and position by position through the cache.
let cachedVersusUncached (m: ISeq2SeqModel) (inputIds: torch.Tensor) (mask: torch.Tensor) (decoderIds: torch.Tensor) : float =
    use _ = torch.no_grad ()
    let enc = m.Encode(inputIds, mask)
    let full = m.Decode(decoderIds, enc.Memory, mask, Unchecked.defaultof<DecoderCache>).Logits // [B; L; V]
    use cache = m.NewCache()
    let steps =
        [| for i in 0L .. decoderIds.shape[1] - 1L -> m.Decode(decoderIds.narrow(1L, i, 1L), enc.Memory, mask, cache).Logits |]
    let stepped = torch.cat(steps, 1L)
    (full - stepped).abs().max().item<float32> () |> float

/// Two inputs of different lengths right-padded into one batch: the largest difference of each row's
/// logits from its own unpadded run.
let paddedVersusAlone (m: ISeq2SeqModel) (pad: int64) (a: int64[]) (b: int64[]) (decoderIds: torch.Tensor) : float =
    use _ = torch.no_grad ()
    let run (ids: torch.Tensor) (mask: torch.Tensor) (dec: torch.Tensor) =
        let enc = m.Encode(ids, mask)
        m.Decode(dec, enc.Memory, mask, Unchecked.defaultof<DecoderCache>).Logits
    let width = max a.Length b.Length
    let padded (x: int64[]) = Array.append x (Array.create (width - x.Length) pad)
    let valid (x: int64[]) = Array.init width (fun i -> i < x.Length)
    let batchIds = tensorOf (Array.append (padded a) (padded b)) [| 2L; int64 width |]
    let batchMask = tensorOf (Array.append (valid a) (valid b)) [| 2L; int64 width |]
    let both = run batchIds batchMask (torch.cat([| decoderIds; decoderIds |], 0L))
    let alone (x: int64[]) = run (tensorOf (x) [| 1L; int64 x.Length |]) (allTrue [| 1L; int64 x.Length |]) decoderIds
    max ((both[0L].unsqueeze(0L) - alone a).abs().max().item<float32> () |> float)
        ((both[1L].unsqueeze(0L) - alone b).abs().max().item<float32> () |> float)

/// The tensor names stored in a safetensors file.
let storedNames (path: string) : Set<string> =
    Safetensors.readHeader path |> fst |> List.map (fun e -> e.Name) |> set

/// A copy of a checkpoint folder in a temporary directory, its config.json rewritten by `editConfig` and its
/// tensors by `editTensors`; removed after `body`.
let withEditedCopy (dir: string) (editConfig: string -> string) (editTensors: (string * torch.Tensor) list -> (string * torch.Tensor) list) (body: string -> unit) =
    let tmp = Path.Combine(Path.GetTempPath(), "moe-t5-" + Guid.NewGuid().ToString "N")
    Directory.CreateDirectory tmp |> ignore
    try
        File.WriteAllText(Path.Combine(tmp, "config.json"), editConfig (File.ReadAllText(Path.Combine(dir, "config.json"))))
        Safetensors.write (Path.Combine(tmp, "model.safetensors")) (editTensors (Safetensors.read (Path.Combine(dir, "model.safetensors"))))
        body tmp
    finally Directory.Delete(tmp, true)

/// The message of the exception `f` raises (fails when it raises none).
let errorOf (f: unit -> unit) : string =
    try
        f ()
        failwith "expected an error, got none"
    with e when e.Message <> "expected an error, got none" -> e.Message

/// A few AdamW steps on one example; returns the first and last loss.
let trainSteps (model: torch.nn.Module) (loss: unit -> torch.Tensor) (steps: int) : float * float =
    model.train ()
    use opt = new Train.SafeAdamW(model.parameters (), 3e-3)
    let losses =
        [ for _ in 1 .. steps do
              use scope = torch.NewDisposeScope()
              opt.zero_grad ()
              let l = loss ()
              l.backward ()
              opt.step () |> ignore
              l.item<float32> () |> float ]
    model.eval ()
    List.head losses, List.last losses

/// `testWithShared` whose tensors are freed when the test ends (its own dispose scope), so they are not left
/// to finalizers that would change the global live-tensor count under later tests.
let scopedShared (name: string) (body: string -> unit) : Test =
    testWithShared name (fun shared ->
        use _ = torch.NewDisposeScope()
        body shared)

let private checkSample (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = fromFolder dir
    let s = (sample dir).GetProperty "doc0_alone"
    use _ = torch.no_grad ()
    let out = model.Forward(ids2d (s.GetProperty "input_ids"), mask2d (s.GetProperty "attention_mask"), ids2d (s.GetProperty "labels"))
    let shape = [| for x in (s.GetProperty "logits_shape").EnumerateArray() -> x.GetInt64() |]
    Expect.equal out.Logits.shape shape "logits shape"
    let err = sliceError out.Logits (floats3d (s.GetProperty "logits_slice_first8"))
    Expect.isLessThan err logitsTol (sprintf "%s logits[.., :8] within %g of transformers' (max error %g)" name logitsTol err)
    let loss = (s.GetProperty "loss").GetDouble()
    Expect.floatClose { absolute = logitsTol; relative = 0.0 } (out.Loss.item<float32> () |> float) loss "loss"
    Expect.isNone out.RouterLoss "dense T5 has no router loss"

let private checkGreedy (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = fromFolder dir
    let root = sample dir
    let g = root.GetProperty "doc0_greedy"
    let settings = g.GetProperty "settings"
    let input = root.GetProperty("doc0_alone").GetProperty "input_ids"
    let ids = ids2d input
    let got =
        greedy model ids (allTrue ids.shape) (settings.GetProperty("decoder_start_token_id").GetInt64())
            (settings.GetProperty("eos_token_id").GetInt64()) (settings.GetProperty("max_new_tokens").GetInt32())
    let want = [ for x in (g.GetProperty "greedy_ids").EnumerateArray() -> x.GetInt64() ]
    Expect.equal got want (sprintf "%s greedy ids equal transformers'" name)

let private docIds (shared: string) (name: string) : int64[] * torch.Tensor =
    let s = (sample (modelDir shared name)).GetProperty "doc0_alone"
    let ids = ids2d (s.GetProperty "input_ids")
    ids.data<int64>().ToArray(), ids2d (s.GetProperty "decoder_input_ids")

let tests =
    testList "T5" [
        test "relative position buckets follow T5's bucketing" {
            let buckets bidirectional (rel: int64[]) =
                (relativePositionBucket bidirectional 32 128 (torch.tensor rel)).data<int64>().ToArray()
            // bidirectional: 16 per direction, exact below 8, later keys in the upper half, 200 saturates
            Expect.equal (buckets true [| 0L; -1L; 1L; -7L; 8L; -200L; 200L |]) [| 0L; 1L; 17L; 7L; 24L; 15L; 31L |] "bidirectional"
            // causal: keys before the query only, exact below 16; distance 20 -> 16 + trunc(ln(20/16)/ln(8)*16) = 17
            Expect.equal (buckets false [| 0L; 3L; -3L; -20L; -127L; -1000L |]) [| 0L; 0L; 3L; 17L; 31L; 31L |] "unidirectional"
        }
        test "config: feed_forward_proj gated-gelu means gelu_new, dense_act_fn overrides it" {
            let dir = Path.Combine(Path.GetTempPath(), "moe-t5cfg-" + Guid.NewGuid().ToString "N")
            Directory.CreateDirectory dir |> ignore
            try
                let write (json: string) =
                    let p = Path.Combine(dir, "config.json")
                    File.WriteAllText(p, json)
                    p
                let cfg = T5Config.parse (write """{"model_type": "t5", "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0}""")
                Expect.equal (cfg.DenseActFn, cfg.IsGatedAct, cfg.NumDecoderLayers) ("gelu_new", true, 6) "derived from feed_forward_proj; decoder depth = num_layers"
                let cfg = T5Config.parse (write """{"model_type": "t5", "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu", "decoder_start_token_id": 0}""")
                Expect.equal cfg.DenseActFn "gelu" "the file's dense_act_fn wins, as in transformers"
                let msg = errorOf (fun () -> T5Config.parse (write """{"model_type": "t5", "feed_forward_proj": "gated-mish", "decoder_start_token_id": 0}""") |> ignore)
                Expect.stringContains msg "feed_forward_proj" "names the field"
                let msg = errorOf (fun () -> T5Config.parse (write """{"model_type": "t5", "decoder_start_token_id": 0, "rope_theta": 10000}""") |> ignore)
                Expect.stringContains msg "\"rope_theta\"" "an unknown field is refused by name"
                Expect.stringContains msg "config.json" "names the file"
            finally Directory.Delete(dir, true)
        }
        scopedShared "t5-tiny: logits and loss equal transformers'" (checkSample "t5-tiny")
        scopedShared "flan-t5-tiny: logits and loss equal transformers'" (checkSample "flan-t5-tiny")
        scopedShared "t5-tiny: greedy ids equal transformers'" (checkGreedy "t5-tiny")
        scopedShared "flan-t5-tiny: greedy ids equal transformers'" (checkGreedy "flan-t5-tiny")
        scopedShared "cached decoding equals recomputing the prefix (t5, flan-t5)" (fun shared ->
            for name in [ "t5-tiny"; "flan-t5-tiny" ] do
                use model = fromFolder (modelDir shared name)
                let ids, dec = docIds shared name
                let input = tensorOf (ids) [| 1L; int64 ids.Length |]
                let err = cachedVersusUncached model input (allTrue input.shape) dec
                Expect.isLessThan err logitsTol (sprintf "%s: cached and uncached logits (max difference %g)" name err))
        scopedShared "a right-padded batch equals each input alone (t5, flan-t5)" (fun shared ->
            for name in [ "t5-tiny"; "flan-t5-tiny" ] do
                use model = fromFolder (modelDir shared name)
                let ids, dec = docIds shared name
                let err = paddedVersusAlone model 0L ids[.. 30] ids[5 .. 17] (dec.narrow(1L, 0L, 9L))
                Expect.isLessThan err logitsTol (sprintf "%s: padded rows vs alone (max difference %g)" name err))
        scopedShared "export names equal the checkpoint's, and an export reloads to the same logits" (fun shared ->
            for name in [ "t5-tiny"; "flan-t5-tiny" ] do
                let dir = modelDir shared name
                use model = fromFolder dir
                let state = stateDict model
                Expect.equal (state |> List.map fst |> set) (storedNames (Path.Combine(dir, "model.safetensors"))) (sprintf "%s: stateDict names = safetensors names" name)
                let _, dec = docIds shared name
                withEditedCopy dir id (fun _ -> state) (fun copy ->
                    use reloaded = fromFolder copy
                    let ids, _ = docIds shared name
                    let input = tensorOf (ids) [| 1L; int64 ids.Length |]
                    let mask = allTrue input.shape
                    use _ = torch.no_grad ()
                    let logits (m: ISeq2SeqModel) = m.Decode(dec, (m.Encode(input, mask)).Memory, mask, Unchecked.defaultof<DecoderCache>).Logits
                    Expect.equal ((logits model - logits reloaded).abs().max().item<float32> ()) 0.0f "identical logits"))
        scopedShared "bad checkpoints: errors name the file and the tensor or field" (fun shared ->
            let dir = modelDir shared "t5-tiny"
            let dropped = "decoder.block.1.layer.0.SelfAttention.k.weight"
            withEditedCopy dir id (List.filter (fun (n, _) -> n <> dropped)) (fun copy ->
                let msg = errorOf (fun () -> fromFolder copy |> ignore)
                Expect.stringContains msg dropped "names the missing tensor"
                Expect.stringContains msg "model.safetensors" "names the file")
            withEditedCopy dir id (List.map (fun (n, t) -> if n = dropped then n, t.narrow(0L, 0L, 8L) else n, t)) (fun copy ->
                let msg = errorOf (fun () -> fromFolder copy |> ignore)
                Expect.stringContains msg dropped "names the tensor with the wrong shape"
                Expect.stringContains msg "shape" "says it is the shape")
            withEditedCopy dir (fun c -> c.Replace("\"d_ff\": 256", "\"d_ff\": 128")) id (fun copy ->
                let msg = errorOf (fun () -> fromFolder copy |> ignore)
                Expect.stringContains msg "DenseReluDense.wi.weight" "a config that does not match the weights names a tensor")
            withEditedCopy dir (fun c -> c.Replace("\"feed_forward_proj\": \"relu\"", "\"feed_forward_proj\": \"relu\", \"use_moe_magic\": true")) id (fun copy ->
                let msg = errorOf (fun () -> fromFolder copy |> ignore)
                Expect.stringContains msg "use_moe_magic" "an unsupported field is refused by name")
            withEditedCopy dir (fun c -> c.Replace("\"model_type\": \"t5\"", "\"model_type\": \"bart\"")) id (fun copy ->
                let msg = errorOf (fun () -> fromFolder copy |> ignore)
                Expect.stringContains msg "model_type" "a foreign model_type is refused"))
        testSequenced (scopedShared "cached greedy decoding frees its tensors (live tensor count stays flat)" (fun shared ->
            use model = fromFolder (modelDir shared "flan-t5-tiny")
            let ids, _ = docIds shared "flan-t5-tiny"
            let input = tensorOf ids [| 1L; int64 ids.Length |]
            let decode () =
                use _ = torch.NewDisposeScope()
                greedy model input (allTrue input.shape) 0L 1L 8 |> ignore
            decode ()
            let before = Tensors.liveTensors ()
            decode ()
            decode ()
            Expect.isLessThanOrEqual (Tensors.liveTensors ()) before "no tensor outlives its decoding (fewer: garbage of earlier tests finalized meanwhile)"))
        scopedShared "a few AdamW steps lower the loss (t5-tiny)" (fun shared ->
            let dir = modelDir shared "t5-tiny"
            use model = fromFolder dir
            let s = (sample dir).GetProperty "doc0_alone"
            let ids, mask, labels = ids2d (s.GetProperty "input_ids"), mask2d (s.GetProperty "attention_mask"), ids2d (s.GetProperty "labels")
            torch.manual_seed 1L |> ignore
            let first, last = trainSteps model (fun () -> (model.Forward(ids, mask, labels)).Loss) 6
            Expect.isLessThan last first (sprintf "loss fell (%g -> %g)" first last))
    ]
