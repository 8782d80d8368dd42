/// BART and Pegasus (`Moe.Bart`, `Moe.Pegasus`) against transformers 4.45.1's outputs on the shared tiny
/// checkpoints (../shared/models/*/sample_outputs.json), plus loading errors and export on tiny random models.
module Moe.Tests.BartTests

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open Moe
open Moe.Bart
open Moe.Seq2Seq
open Moe.Tensors
open Moe.Tests.Support

/// transformers' logits and loss are matched to this (float32 through a few layers and a softmax).
let private exact = Tol.f32Loose

let private modelDir (data: string) (name: string) = Path.GetFullPath(Path.Combine(data, "..", "models", name))

let private sample (dir: string) : JsonElement =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
    doc.RootElement.Clone()

let private ints (e: JsonElement) : int64[] = [| for x in e.EnumerateArray() -> x.GetInt64() |]

/// A [rows; cols] int64 tensor from a JSON array of arrays.
let private matrix (e: JsonElement) : torch.Tensor =
    let rows = [| for r in e.EnumerateArray() -> ints r |]
    torch.tensor(Array.concat rows).reshape(int64 rows.Length, int64 rows[0].Length)

let private maxDiff (a: torch.Tensor) (b: torch.Tensor) : float =
    use d = (a - b).abs().max ()
    Tensors.scalar d

/// The two families as the tests see them: folder name and loader.
let private families : (string * (string -> BartForConditionalGeneration)) list =
    [ "bart-tiny", Bart.fromFolder
      "pegasus-tiny", (fun dir -> Pegasus.fromFolder dir :> BartForConditionalGeneration) ]

/// doc0_alone's inputs: input ids [1; S], mask [1; S] bool, labels [1; T], decoder inputs [1; T].
let private doc0 (s: JsonElement) =
    let a = s.GetProperty "doc0_alone"
    let mask = matrix (a.GetProperty "attention_mask")
    matrix (a.GetProperty "input_ids"), mask.to_type torch.ScalarType.Bool, matrix (a.GetProperty "labels"), matrix (a.GetProperty "decoder_input_ids")

/// Greedy decoding through the interface generation uses, with the key/value cache: argmax at each step,
/// stop at EOS or after maxNew tokens. Returns the ids with the decoder start token first.
let private greedy (m: ISeq2SeqModel) (ids: torch.Tensor) (mask: torch.Tensor) (start: int64) (eos: int64) (maxNew: int) : int64 list =
    use _ = torch.NewDisposeScope()
    let encoded = m.Encode(ids, mask)
    use cache = m.NewCache()
    let rec loop (acc: int64 list) (last: int64) (left: int) =
        if left = 0 || (acc.Length > 1 && last = eos) then List.rev acc
        else
            use input = torch.tensor([| last |]).reshape(1L, 1L)
            let logits = m.Decode(input, encoded.Memory, mask, cache).Logits          // [1; 1; V]
            let next = logits[0L, -1L].argmax().item<int64> ()
            loop (next :: acc) next (left - 1)
    loop [ start ] start maxNew

let private familyTests (name: string) (load: string -> BartForConditionalGeneration) =
    testList name [
        testWithShared "parameter names and the state dict equal the checkpoint's tensor names" <| fun data ->
            let dir = modelDir data name
            use m = load dir
            let file = Path.Combine(dir, "model.safetensors")
            let entries, _ = Safetensors.readHeader file
            let inFile = entries |> List.map (fun e -> e.Name) |> List.sort
            let parameters = [ for struct (n, _) in m.named_parameters () -> n ]
            let buffers = [ for struct (n, _) in m.named_buffers () -> n ]
            Expect.equal buffers [ "final_logits_bias" ] "the one buffer is final_logits_bias"
            Expect.equal (List.sort (parameters @ buffers)) inFile "parameters + buffers = the file's names"
            Expect.equal (stateDict m |> List.map fst |> List.sort) inFile "stateDict names = the file's names"

        testWithShared "doc0_alone: logits slice and loss equal transformers'" <| fun data ->
            let dir = modelDir data name
            let s = sample dir
            use m = load dir
            use _ = torch.no_grad ()
            let ids, mask, labels, decoderInput = doc0 s
            let expectedDecoder = Bart.shiftTokensRight m.Config.PadTokenId m.Config.DecoderStartTokenId labels
            Expect.sequenceEqual (Tensors.toInt64s expectedDecoder) (Tensors.toInt64s decoderInput) "shift_tokens_right gives the recorded decoder inputs"
            let out = m.Forward(ids, mask, labels)
            let a = s.GetProperty "doc0_alone"
            Expect.sequenceEqual out.Logits.shape (ints (a.GetProperty "logits_shape")) "logits shape"
            let slice = [| for r in ((a.GetProperty "logits_slice_first8")[0]).EnumerateArray() -> [| for x in r.EnumerateArray() -> float32 (x.GetDouble()) |] |]
            use expected = torch.tensor(Array.concat slice).reshape(1L, int64 slice.Length, 8L)
            use got = out.Logits.narrow(2L, 0L, 8L)
            let d = maxDiff got expected
            Expect.isLessThan d exact (sprintf "logits slice within %g (max difference %g)" exact d)
            let loss = Tensors.scalar out.Loss
            let expectedLoss = (a.GetProperty "loss").GetDouble()
            Expect.floatClose { absolute = exact; relative = 0.0 } loss expectedLoss "loss"

        testWithShared "doc0_greedy: a greedy loop over ISeq2SeqModel with the cache gives transformers' ids" <| fun data ->
            let dir = modelDir data name
            let s = sample dir
            use m = load dir
            use _ = torch.no_grad ()
            let ids, mask, _, _ = doc0 s
            let g = s.GetProperty "doc0_greedy"
            let settings = g.GetProperty "settings"
            let got =
                greedy (m :> ISeq2SeqModel) ids mask ((settings.GetProperty "decoder_start_token_id").GetInt64())
                    ((settings.GetProperty "eos_token_id").GetInt64()) ((settings.GetProperty "max_new_tokens").GetInt32())
            Expect.sequenceEqual got (ints (g.GetProperty "greedy_ids")) "greedy ids"

        testWithShared "decoding step by step with the cache equals the teacher-forced logits" <| fun data ->
            let dir = modelDir data name
            use m = load dir
            use _ = torch.no_grad ()
            let ids, mask, _, decoderInput = doc0 (sample dir)
            let full = m.Logits(ids, mask, decoderInput).Logits                                    // [1; T; V]
            let seq = m :> ISeq2SeqModel
            let memory = seq.Encode(ids, mask).Memory
            use cache = seq.NewCache()
            let t = decoderInput.shape[1]
            let steps = [| for i in 0L .. t - 1L -> seq.Decode(decoderInput.narrow(1L, i, 1L), memory, mask, cache).Logits |]
            Expect.equal cache.Length t "the cache holds every decoded position"
            let d = maxDiff (torch.cat(steps, 1L)) full
            Expect.isLessThan d exact (sprintf "cached = uncached within %g (max difference %g)" exact d)

        testWithShared "a padded batch of two documents equals each document alone" <| fun data ->
            let dir = modelDir data name
            use m = load dir
            use _ = torch.no_grad ()
            let ids, mask, _, decoderInput = doc0 (sample dir)
            let s = ids.shape[1]
            let eos = ids[0L, -1L].item<int64> ()
            let shortLength = 40L
            // the short document: the first 39 tokens and the EOS, padded to S
            let short = torch.cat([| ids.narrow(1L, 0L, shortLength - 1L); torch.tensor([| eos |]).reshape(1L, 1L) |], 1L)  // [1; 40]
            let padding = Tensors.withInt64Scalar (int64 m.Config.PadTokenId) (fun v -> torch.full([| 1L; s - shortLength |], v, dtype = torch.ScalarType.Int64))
            let batchIds = torch.cat([| ids; torch.cat([| short; padding |], 1L) |], 0L)                                      // [2; S]
            let shortMask = torch.cat([| torch.ones([| 1L; shortLength |], dtype = torch.ScalarType.Bool); torch.zeros([| 1L; s - shortLength |], dtype = torch.ScalarType.Bool) |], 1L)
            let batchMask = torch.cat([| mask; shortMask |], 0L)
            let batchDecoder = torch.cat([| decoderInput; decoderInput |], 0L)
            let batch = m.Logits(batchIds, batchMask, batchDecoder).Logits                                                          // [2; T; V]
            let alone0 = m.Logits(ids, mask, decoderInput).Logits
            let alone1 = m.Logits(short, null, decoderInput).Logits
            let d0, d1 = maxDiff (batch.narrow(0L, 0L, 1L)) alone0, maxDiff (batch.narrow(0L, 1L, 1L)) alone1
            Expect.isLessThan d0 exact (sprintf "full row within %g (max difference %g)" exact d0)
            Expect.isLessThan d1 exact (sprintf "padded row within %g (max difference %g)" exact d1)
            // the padded row's greedy continuation through the cache equals the short document's alone
            let seq = m :> ISeq2SeqModel
            let start = int64 m.Config.DecoderStartTokenId
            let row1 = greedy seq (batchIds.narrow(0L, 1L, 1L)) (batchMask.narrow(0L, 1L, 1L)) start -1L 8
            Expect.sequenceEqual row1 (greedy seq short null start -1L 8) "greedy ids of the padded row"

        testWithShared "a few AdamW steps on one example lower its loss (dropout on in training)" (fun data ->
            let dir = modelDir data name
            use m = load dir
            let ids, mask, labels, _ = doc0 (sample dir)
            let lossNow () =
                m.eval () |> ignore
                use _ = torch.no_grad ()
                Tensors.scalar (m.Forward(ids, mask, labels).Loss)
            let before = lossNow ()
            torch.manual_seed 7L |> ignore
            let trainable = m.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.toArray
            use opt = new Train.SafeAdamW(trainable, 1e-3)
            m.train ()
            for _ in 1 .. 4 do
                use _ = torch.NewDisposeScope()
                opt.zero_grad ()
                m.Forward(ids, mask, labels).Loss.backward ()
                opt.step () |> ignore
            let after = lossNow ()
            Expect.isLessThan after before (sprintf "loss %g -> %g" before after))
        |> testSequenced
    ]

// ---------------------------------------------------------------- tiny random models: export, load errors

/// A tiny BART config.json as transformers writes one, with `edit` applied.
let private tinyConfig (edit: JsonObject -> unit) : string =
    let o = JsonObject()
    for k, v in [ "model_type", JsonValue.Create "bart" :> JsonNode; "vocab_size", JsonValue.Create 40; "d_model", JsonValue.Create 16
                  "encoder_layers", JsonValue.Create 1; "decoder_layers", JsonValue.Create 2; "encoder_attention_heads", JsonValue.Create 2
                  "decoder_attention_heads", JsonValue.Create 4; "encoder_ffn_dim", JsonValue.Create 24; "decoder_ffn_dim", JsonValue.Create 20
                  "max_position_embeddings", JsonValue.Create 32; "activation_function", JsonValue.Create "gelu"; "scale_embedding", JsonValue.Create true
                  "pad_token_id", JsonValue.Create 1; "decoder_start_token_id", JsonValue.Create 2; "eos_token_id", JsonValue.Create 2
                  "dropout", JsonValue.Create 0.1; "attention_dropout", JsonValue.Create 0.0; "activation_dropout", JsonValue.Create 0.0
                  "normalize_before", JsonValue.Create false; "extra_pos_embeddings", JsonValue.Create 2 ] do
        o[k] <- v
    edit o
    o.ToJsonString()

/// A fresh folder holding config.json and model.safetensors (with `tensors`); deleted after `body`.
let private withFolder (config: string) (tensors: (string * torch.Tensor) list) (body: string -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), sprintf "moe-bart-%s" (Guid.NewGuid().ToString "N"))
    Directory.CreateDirectory dir |> ignore
    try
        File.WriteAllText(Path.Combine(dir, "config.json"), config)
        Safetensors.write (Path.Combine(dir, "model.safetensors")) tensors
        body dir
    finally Directory.Delete(dir, true)

let private tinyBartConfig () =
    let path = Path.Combine(Path.GetTempPath(), sprintf "moe-bart-config-%s.json" (Guid.NewGuid().ToString "N"))
    try
        File.WriteAllText(path, tinyConfig ignore)
        BartConfig.parse Layout.bart path
    finally File.Delete path

let private tinyModel () =
    let cfg = tinyBartConfig ()
    torch.manual_seed 3L |> ignore
    let m = new BartForConditionalGeneration(cfg, "BartForConditionalGeneration")
    // a non-zero final_logits_bias, so that export and loading are seen to carry it
    using (torch.no_grad ()) (fun _ -> m.FinalLogitsBias.normal_(0.0, 0.1) |> ignore)
    m

let private tinyInputs () =
    let g = new torch.Generator(11UL, torch.CPU)
    torch.randint(3L, 40L, [| 2L; 9L |], generator = g), torch.randint(3L, 40L, [| 2L; 5L |], generator = g)

let private expectFailure (fragments: string list) (f: unit -> unit) =
    let e = Expect.throwsC f id
    for x in fragments do Expect.stringContains e.Message x (sprintf "the message names %s" x)

let private randomModelTests =
    testList "tiny random BART" [
        testCase "an exported state dict reloads to identical logits, also with transformers' tied duplicates" <| fun () ->
            use m = tinyModel ()
            m.eval () |> ignore
            let ids, dec = tinyInputs ()
            use _ = torch.no_grad ()
            let expected = m.Logits(ids, null, dec).Logits
            withFolder (tinyConfig ignore) (stateDict m) (fun dir ->
                use back = Bart.fromFolder dir
                Expect.equal (maxDiff (back.Logits(ids, null, dec).Logits) expected) 0.0 "identical logits")
            // pytorch_model.bin-style: the shared table under its tied names only
            let shared = stateDict m |> List.find (fun (n, _) -> n = "model.shared.weight") |> snd
            let tied = (stateDict m |> List.filter (fun (n, _) -> n <> "model.shared.weight")) @ [ for a in tiedAliases -> a, shared ]
            withFolder (tinyConfig ignore) tied (fun dir ->
                use back = Bart.fromFolder dir
                Expect.equal (maxDiff (back.Logits(ids, null, dec).Logits) expected) 0.0 "identical logits from the tied names")
            // BartModel-style names (no `model.` prefix) with every tied duplicate, and no final_logits_bias
            let bare = [ for n, t in stateDict m do if n <> "final_logits_bias" then yield n.Replace("model.", ""), t
                         yield "lm_head.weight", shared ]
            withFolder (tinyConfig ignore) bare (fun dir ->
                use back = Bart.fromFolder dir
                let bias = m.FinalLogitsBias.unsqueeze(0L)
                Expect.equal (maxDiff (plus (back.Logits(ids, null, dec).Logits) bias) expected) 0.0 "identical logits up to the absent (zero) final_logits_bias")

        testCase "a missing tensor and a shape mismatch name the file and the tensor" <| fun () ->
            use m = tinyModel ()
            let name = "model.decoder.layers.1.fc1.weight"
            withFolder (tinyConfig ignore) (stateDict m |> List.filter (fun (n, _) -> n <> name)) (fun dir ->
                expectFailure [ dir; "model.safetensors"; name; "lacks" ] (fun () -> Bart.fromFolder dir |> ignore))
            let wrong = stateDict m |> List.map (fun (n, t) -> if n = name then n, torch.zeros([| 3L; 16L |]) else n, t)
            withFolder (tinyConfig ignore) wrong (fun dir ->
                expectFailure [ dir; "model.safetensors"; name; "[3; 16]"; "[20; 16]" ] (fun () -> Bart.fromFolder dir |> ignore))
            let extra = stateDict m @ [ "model.encoder.layers.5.fc1.weight", torch.zeros([| 2L |]) ]
            withFolder (tinyConfig ignore) extra (fun dir ->
                expectFailure [ "model.encoder.layers.5.fc1.weight"; "does not use" ] (fun () -> Bart.fromFolder dir |> ignore))

        testCase "unsupported config values are refused naming the field" <| fun () ->
            use m = tinyModel ()
            let refused (field: string) (edit: JsonObject -> unit) =
                withFolder (tinyConfig edit) (stateDict m) (fun dir ->
                    expectFailure [ Path.Combine(dir, "config.json"); field ] (fun () -> Bart.fromFolder dir |> ignore))
            refused "activation_function" (fun o -> o["activation_function"] <- JsonValue.Create "quick_gelu")
            refused "normalize_before" (fun o -> o["normalize_before"] <- JsonValue.Create true)
            refused "add_bias_logits" (fun o -> o["add_bias_logits"] <- JsonValue.Create true)
            refused "extra_pos_embeddings" (fun o -> o["extra_pos_embeddings"] <- JsonValue.Create 0)
            refused "some_new_field" (fun o -> o["some_new_field"] <- JsonValue.Create 1)
            refused "model_type" (fun o -> o["model_type"] <- JsonValue.Create "pegasus")

        testCase "older configs' legacy fields are accepted where they agree with the family" <| fun () ->
            let parses (layout: Layout) (edit: JsonObject -> unit) =
                let path = Path.Combine(Path.GetTempPath(), sprintf "moe-bart-legacy-%s.json" (Guid.NewGuid().ToString "N"))
                try
                    File.WriteAllText(path, tinyConfig edit)
                    BartConfig.parse layout path
                finally File.Delete path
            let legacy (o: JsonObject) =
                o["output_past"] <- JsonValue.Create true
                o["eos_token_ids"] <- JsonArray(JsonValue.Create 2)
                o["force_bos_token_to_be_generated"] <- JsonValue.Create false
                o["classif_dropout"] <- JsonValue.Create 0.0
                o["_num_labels"] <- JsonValue.Create 3
                o["student_encoder_layers"] <- null
                o["add_bias_logits"] <- JsonValue.Create false
            let bart =
                parses Layout.bart (fun o ->
                    legacy o
                    o["add_final_layer_norm"] <- JsonValue.Create false
                    o["normalize_embedding"] <- JsonValue.Create true
                    o["static_position_embeddings"] <- JsonValue.Create false)
            Expect.equal bart.Layout Layout.bart "BART layout"
            let pegasus =
                parses Layout.pegasus (fun o ->
                    legacy o
                    o["model_type"] <- JsonValue.Create "pegasus"
                    o["normalize_before"] <- JsonValue.Create true
                    o["add_final_layer_norm"] <- JsonValue.Create true
                    o["normalize_embedding"] <- JsonValue.Create false
                    o["static_position_embeddings"] <- JsonValue.Create true
                    o["extra_pos_embeddings"] <- JsonValue.Create 1)
            Expect.equal pegasus.Layout Layout.pegasus "Pegasus layout"

        testCase "dropout acts in training only, and each family's activation is transformers'" <| fun () ->
            use m = tinyModel ()
            let ids, dec = tinyInputs ()
            use _ = torch.no_grad ()
            m.eval () |> ignore
            let a, b = m.Logits(ids, null, dec).Logits, m.Logits(ids, null, dec).Logits
            Expect.equal (maxDiff a b) 0.0 "evaluation is deterministic"
            m.train () |> ignore
            Expect.isGreaterThan (maxDiff (m.Logits(ids, null, dec).Logits) a) 0.0 "dropout 0.1 changes the training forward"
            // known answers: 0.5 (1 + erf(1 / sqrt 2)) and 0.5 (1 + tanh(sqrt(2 / pi) 1.044715))
            use one = torch.ones([| 1L |])
            Expect.floatClose Accuracy.medium (Tensors.scalar ((activation "gelu") one)) 0.8413447460685429 "gelu(1) is the exact erf form"
            Expect.floatClose Accuracy.medium (Tensors.scalar ((activation "gelu_new") one)) 0.8411919906082768 "gelu_new(1) is the tanh form"
    ]

let private pegasusTests =
    testList "Pegasus layout" [
        testCase "sinusoid table: ceil(D/2) sines, then floor(D/2) cosines of the same frequencies (odd D too)" <| fun () ->
            use table = sinusoidTable 3 5                                                 // [3; 5]
            let f k = 2.0 / Math.Pow(10000.0, float (2 * k) / 5.0)
            let expected = [| sin (f 0); sin (f 1); sin (f 2); cos (f 0); cos (f 1) |]
            let got = Tensors.toFloats table[2L] |> Array.map float
            for c in 0 .. 4 do Expect.floatClose Accuracy.medium got[c] expected[c] (sprintf "row 2, column %d" c)
        testWithShared "a checkpoint without the position tables gets them computed: same logits" <| fun data ->
            let dir = modelDir data "pegasus-tiny"
            use m = Pegasus.fromFolder dir
            let ids, mask, _, decoderInput = doc0 (sample dir)
            use _ = torch.no_grad ()
            let expected = m.Logits(ids, mask, decoderInput).Logits
            let kept = Safetensors.read (Path.Combine(dir, "model.safetensors")) |> List.filter (fun (n, _) -> not (n.EndsWith "embed_positions.weight"))
            withFolder (File.ReadAllText(Path.Combine(dir, "config.json"))) kept (fun stripped ->
                use back = Pegasus.fromFolder stripped
                let d = maxDiff (back.Logits(ids, mask, decoderInput).Logits) expected
                Expect.isLessThan d 1e-5 (sprintf "within 1e-5 (max difference %g)" d))

        testWithShared "the checkpoint's position tables are transformers' sinusoids (sines first, then cosines)" <| fun data ->
            let dir = modelDir data "pegasus-tiny"
            let stored = Safetensors.read (Path.Combine(dir, "model.safetensors")) |> List.filter (fun (n, _) -> n.EndsWith "embed_positions.weight")
            Expect.equal stored.Length 2 "encoder and decoder tables stored"
            for n, t in stored do
                use computed = sinusoidTable (int t.shape[0]) (int t.shape[1])
                let d = maxDiff t computed
                Expect.isLessThan d 1e-6 (sprintf "%s within 1e-6 of the computed table (max difference %g)" n d)
            use m = Pegasus.fromFolder dir
            Expect.isFalse m.Model.Encoder.PositionTable.weight.requires_grad "the table is frozen"
    ]

let private memoryTests =
    testList "memory" [
        testSequenced <| testCase "teacher-forced passes and cached decoding leave no live tensors behind" (fun () ->
            use m = tinyModel ()
            m.eval () |> ignore
            let ids, dec = tinyInputs ()
            let labels = dec
            use _ = torch.no_grad ()
            let pass () =
                let out = m.Forward(ids, null, labels)
                out.Logits.Dispose()
                out.Loss.Dispose()
                let seq = m :> ISeq2SeqModel
                let encoded = seq.Encode(ids, null)
                use cache = seq.NewCache()
                for i in 0L .. dec.shape[1] - 1L do
                    use step = dec.narrow(1L, i, 1L)
                    seq.Decode(step, encoded.Memory, null, cache).Logits.Dispose()
                encoded.Memory.Dispose()
            pass ()
            let before = Tensors.liveTensors ()
            pass ()
            pass ()
            Expect.isLessThanOrEqual (Tensors.liveTensors ()) before "live tensors after two more passes (fewer: garbage of earlier tests finalized meanwhile)")
    ]

let private upcycleTests =
    testList "upcycling" [
        for name, _ in families do
            testWithShared (sprintf "%s: with every expert a copy of fc1/fc2, the upcycled model computes the dense one's logits" name) <| fun data ->
                let dir = modelDir data name
                let load = families |> List.find (fun (n, _) -> n = name) |> snd
                use dense = load dir
                torch.manual_seed 5L |> ignore
                // top-2 of 4, renormalised: the kept weights sum to 1, so equal experts give the dense output
                let router = { Config.RouterConfig.defaults with Experts = 4; K = 2 }
                use moe = Bart.upcycle router dense
                moe.eval () |> ignore
                use _ = torch.no_grad ()
                let ids, mask, labels, _ = doc0 (sample dir)
                let expected = dense.Forward(ids, mask, labels)
                let got = moe.Forward(ids, mask, labels)
                let d = maxDiff got.Logits expected.Logits
                Expect.isLessThan d 1e-5 (sprintf "logits within 1e-5 (max difference %g)" d)
                Expect.floatClose Accuracy.medium (Tensors.scalar got.Loss) (Tensors.scalar expected.Loss) "loss"
                let layers = moe.Config.EncoderLayers + moe.Config.DecoderLayers
                Expect.equal (got.Moe |> List.map (fun r -> r.Layer)) [ for i in 0 .. moe.Config.EncoderLayers - 1 -> sprintf "enc.%d" i
                                                                        for i in 0 .. moe.Config.DecoderLayers - 1 -> sprintf "dec.%d" i ] "one report per layer, named by place"
                Expect.equal got.Moe.Length layers "every FFN is an MoE layer"
                let names = [ for struct (n, _) in moe.named_parameters () -> n ]
                Expect.isFalse (names |> List.exists (fun n -> n.Contains ".fc1.")) "no dense fc1 left"
                Expect.contains names "model.decoder.layers.0.moe.router.weight" "a router per layer"
                // greedy through the cache agrees too
                let seq = moe :> ISeq2SeqModel
                let start = int64 moe.Config.DecoderStartTokenId
                Expect.sequenceEqual (greedy seq ids mask start -1L 6) (greedy (dense :> ISeq2SeqModel) ids mask start -1L 6) "greedy ids"

        testWithShared "an upcycled BART trains: the router and the experts get gradients" <| fun data ->
            use dense = Bart.fromFolder (modelDir data "bart-tiny")
            torch.manual_seed 5L |> ignore
            use moe = Bart.upcycle { Config.RouterConfig.defaults with Experts = 2; K = 1 } dense
            let ids, mask, labels, _ = doc0 (sample (modelDir data "bart-tiny"))
            let out = moe.Forward(ids, mask, labels)
            let aux = out.Moe |> List.map (fun r -> Layers.weightedAux Config.LossWeights.defaults r.Report.Aux) |> List.reduce Tensors.plus
            (Tensors.plus out.Loss aux).backward ()
            let layer = moe.Model.Encoder.Layers[0].Moe.Value
            Expect.isGreaterThan (Tensors.scalar (layer.Router.Weight.grad.abs().sum ())) 0.0 "router gradient"
            Expect.isGreaterThan (Tensors.scalar (layer.Experts.W1.grad.abs().sum ())) 0.0 "expert gradient"
    ]

let tests =
    testList "Bart" ([ for name, load in families -> familyTests name load ] @ [ randomModelTests; pegasusTests; memoryTests; upcycleTests ])
