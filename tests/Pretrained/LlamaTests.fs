/// Decoder-only LMs (`Moe.Llama`, `Moe.HfCausalLM`, `Generate.runCausal`) against the outputs transformers
/// 4.45.1 recorded for llama-tiny-hf (Llama-3.2 layout, rope_scaling llama3) and qwen2-tiny (q/k/v biases,
/// tied embeddings), and the properties generation relies on: cached = uncached, a left-padded batch equals
/// each sequence alone, parameter names equal the checkpoint's. The checks are shared with `MoeLMsTests`.
module Moe.Tests.LlamaTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Moe
open Moe.Models
open Moe.Generate
open Moe.Llama
open Moe.Tests.Support
open Moe.Tests.T5Tests

/// The sample's forward-pass entry and greedy entry (named differently for the dense and MoE checkpoints).
let private entries (dir: string) =
    let s = sample dir
    let alone = if s.TryGetProperty("seq_doc0_alone") |> fst then "seq_doc0_alone" else "seq0_alone"
    let greedy = if alone = "seq_doc0_alone" then "seq_doc0_greedy" else "seq0_greedy"
    s.GetProperty alone, s.GetProperty greedy

/// The recorded input ids [1; S] and labels (the ids themselves where none are recorded: transformers'
/// `labels=input_ids`).
let private inputs (dir: string) =
    let alone, _ = entries dir
    let ids = ids2d (alone.GetProperty "input_ids")
    let labels = match alone.TryGetProperty "labels" with | true, l -> ids2d l | _ -> ids.clone ()
    ids, labels

let noCache = Unchecked.defaultof<DecoderCache>

/// Logits slice and loss equal transformers'.
let checkSample (load: string -> DecoderOnlyLM) (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = load dir
    let alone, _ = entries dir
    let ids, labels = inputs dir
    use _ = torch.no_grad ()
    let out = model.Forward(ids, null, null, noCache, labels)
    let err = sliceError out.Logits (floats3d (alone.GetProperty "logits_slice_first8"))
    Expect.isLessThan err logitsTol (sprintf "%s logits[.., :8] within %g of transformers' (max error %g)" name logitsTol err)
    Expect.floatClose { absolute = logitsTol; relative = 0.0 } (Tensors.scalar out.Loss.Value) ((alone.GetProperty "loss").GetDouble())
        (sprintf "%s loss equals transformers'" name)

let private intList (e: JsonElement) =
    if e.ValueKind = JsonValueKind.Array then [ for x in e.EnumerateArray() -> x.GetInt32() ] else [ e.GetInt32() ]

/// The greedy settings recorded with the sample.
let greedySettings (dir: string) : GenerationConfig =
    let _, g = entries dir
    let s = g.GetProperty "settings"
    let optionalInt (key: string) =
        match s.TryGetProperty key with
        | true, v when v.ValueKind = JsonValueKind.Number -> Some(v.GetInt32())
        | _ -> None
    GenerationConfig.greedyOf
        { GenerationConfig.defaults with
            MaxNewTokens = Some((s.GetProperty "max_new_tokens").GetInt32())
            EosTokenId = intList (s.GetProperty "eos_token_id")
            PadTokenId = optionalInt "pad_token_id"
            BosTokenId = optionalInt "bos_token_id" }

/// Greedy decoding (cached, and uncached) gives transformers' ids.
let checkGreedy (load: string -> DecoderOnlyLM) (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = load dir
    let _, g = entries dir
    let ids, _ = inputs dir
    let expected = [| for x in (g.GetProperty "ids").EnumerateArray() -> x.GetInt32() |][int ids.shape[1] ..]
    let cfg = greedySettings dir
    let cached = (runCausal cfg model ids null).[0].Sequences[0]
    Expect.equal cached expected (sprintf "%s greedy ids equal transformers'" name)
    let uncached = (runCausal { cfg with UseCache = false } model ids null).[0].Sequences[0]
    Expect.equal uncached expected (sprintf "%s greedy ids without the cache equal transformers'" name)

/// Feeding the sequence through the cache in pieces gives the logits of one full pass.
let checkCache (load: string -> DecoderOnlyLM) (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = load dir
    let ids, _ = inputs dir
    use _ = torch.no_grad ()
    let t = ids.shape[1]
    let full = model.Forward(ids, null, null, noCache, null).Logits // [1; T; V]
    use cache = model.NewCache()
    let first = t - 3L
    let stepped =
        [ yield model.Forward(ids.narrow(1L, 0L, first), null, null, cache, null).Logits
          for i in first .. t - 1L do
              yield model.Forward(ids.narrow(1L, i, 1L), null, null, cache, null).Logits ]
    let joined = torch.cat (List.toArray stepped, 1L)
    let err = Tensors.scalar ((joined - full).abs().max ())
    Expect.isLessThan err logitsTol (sprintf "%s: cached logits equal uncached (max error %g)" name err)
    Expect.equal cache.Length t "the cache holds every position"

/// A left-padded batch gives each sequence's logits and greedy ids alone.
let checkLeftPadding (load: string -> DecoderOnlyLM) (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = load dir
    let ids, _ = inputs dir
    use _ = torch.no_grad ()
    let t = ids.shape[1]
    let pad = 5L
    let shortIds = ids.narrow(1L, 0L, t - pad) // [1; T - 5]
    let padded = torch.cat ([| torch.zeros ([| 1L; pad |], dtype = torch.ScalarType.Int64); shortIds |], 1L)
    let batch = torch.cat ([| ids; padded |], 0L) // [2; T]
    let mask = torch.tensor([| for row in 0L .. 1L do for i in 0L .. t - 1L -> row = 0L || i >= pad |]).view(2L, t)
    let together = model.Forward(batch, mask, null, noCache, null).Logits
    let aloneLong = model.Forward(ids, null, null, noCache, null).Logits
    let aloneShort = model.Forward(shortIds, null, null, noCache, null).Logits
    let errLong = Tensors.scalar ((together[0L].unsqueeze 0L - aloneLong).abs().max ())
    let errShort = Tensors.scalar ((together[1L].narrow(0L, pad, t - pad).unsqueeze 0L - aloneShort).abs().max ())
    Expect.isLessThan (max errLong errShort) logitsTol (sprintf "%s: the batch's logits equal each sequence's alone (max error %g, %g)" name errLong errShort)
    let cfg = { greedySettings dir with MaxNewTokens = Some 6 }
    let batched = runCausal cfg model batch mask
    let single = [ runCausal cfg model ids null; runCausal cfg model shortIds null ]
    Expect.equal [ for r in batched -> r.Sequences[0] ] [ for r in single -> r[0].Sequences[0] ] (sprintf "%s: left-padded greedy equals each prompt alone" name)

/// The model's tensors carry the checkpoint's names, both ways.
let checkNames (load: string -> DecoderOnlyLM) (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = load dir
    use weights = HfCheckpoint.openWeights dir
    let ours = model.HfTensors () |> List.map (fun t -> t.Name) |> set
    Expect.equal ours (set weights.Names) (sprintf "%s: parameter names equal the safetensors names" name)

/// A config.json with one field changed is refused naming that field.
let checkRefused (parse: string -> unit) (name: string) (field: string) (value: string) (shared: string) =
    let dir = modelDir shared name
    let tmp = Directory.CreateTempSubdirectory("moe-causal-")
    try
        let node = Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
        node[field] <- Nodes.JsonNode.Parse value
        let path = Path.Combine(tmp.FullName, "config.json")
        File.WriteAllText(path, node.ToJsonString())
        let e = Expect.throwsC (fun () -> parse path) id
        Expect.stringContains e.Message (sprintf "\"%s\"" field) (sprintf "%s: %s = %s is refused by name" name field value)
    finally tmp.Delete true

/// A few AdamW steps on the sample lower transformers' loss.
let checkTraining (model: DecoderOnlyLM) (ids: torch.Tensor) (labels: torch.Tensor) : float * float =
    model.train ()
    use opt = new Train.SafeAdamW(model.parameters (), 3e-3)
    let losses =
        [ for _ in 1 .. 4 do
            use _ = torch.NewDisposeScope()
            opt.zero_grad ()
            let loss, _ = model.Loss(ids, null, labels)
            loss.backward ()
            opt.step () |> ignore
            Tensors.scalar loss ]
    model.eval () |> ignore
    use _ = torch.no_grad ()
    let final, _ = model.Loss(ids, null, labels)
    List.head losses, Tensors.scalar final

let private llama (dir: string) : DecoderOnlyLM = llamaFromFolder dir
let private qwen2 (dir: string) : DecoderOnlyLM = qwen2FromFolder dir

let private family (name: string) (load: string -> DecoderOnlyLM) (parse: string -> unit) (field: string) (value: string) =
    [ scopedShared (sprintf "%s: logits and loss equal transformers'" name) (checkSample load name)
      scopedShared (sprintf "%s: greedy ids equal transformers' (cached and uncached)" name) (checkGreedy load name)
      scopedShared (sprintf "%s: cached logits equal uncached" name) (checkCache load name)
      scopedShared (sprintf "%s: a left-padded batch equals each sequence alone" name) (checkLeftPadding load name)
      scopedShared (sprintf "%s: parameter names equal the safetensors names" name) (checkNames load name)
      scopedShared (sprintf "%s: %s = %s is refused by name" name field value) (checkRefused parse name field value)
      scopedShared (sprintf "%s: a few AdamW steps lower the loss" name) (fun shared ->
          let dir = modelDir shared name
          use model = load dir
          let ids, labels = inputs dir
          let before, after = checkTraining model ids labels
          Expect.isLessThan after before (sprintf "%s: loss %g -> %g" name before after)) ]

let tests =
    testList "Llama" [
        test "positionIds: running count of real tokens minus one, 1 at padding" {
            let mask = torch.tensor([| false; false; true; true; true; true; true; true |]).view(2L, 4L)
            Expect.equal (Tensors.toInt64s (CausalLM.positionIds mask)) [| 1L; 1L; 0L; 1L; 0L; 1L; 2L; 3L |] "left padding as generate computes it"
        }
        test "llama3 rope scaling keeps high frequencies and divides low ones by the factor" {
            let cfg =
                { Architecture = "LlamaForCausalLM"; VocabSize = 10; HiddenSize = 64; IntermediateSize = 8; NumLayers = 1
                  NumHeads = 1; NumKvHeads = 1; HeadDim = 64; RmsNormEps = 1e-5; RopeTheta = 500000.0
                  RopeScaling = Llama3Scaling(32.0, 1.0, 4.0, 8192); MaxPositions = 100; TieWordEmbeddings = true
                  QkvBias = false; OutputBias = false; MlpBias = false; QkNorm = false; AttentionDropout = 0.0
                  PadTokenId = None; BosTokenId = None; EosTokenIds = [] }
            let scaled = (inverseFrequencies cfg).data<float32>().ToArray()
            let plain = (inverseFrequencies { cfg with RopeScaling = NoScaling }).data<float32>().ToArray()
            Expect.equal scaled[0] plain[0] "the highest frequency (wavelength 2 pi < 2048) is kept"
            Expect.floatClose Accuracy.medium (float scaled[31]) (float plain[31] / 32.0) "the lowest frequency (wavelength > 8192) is divided by 32"
        }
        testSequenced <| test "TokenEmbedding: a table in the default dtype, rows by id, gradients counted per id as nn.Embedding's" {
            let previous = torch.get_default_dtype ()
            torch.set_default_dtype torch.ScalarType.BFloat16
            let e = try new TokenEmbedding("embed_tokens", 7, 3) finally torch.set_default_dtype previous
            use _ = e
            Expect.equal [ for struct (n, _) in e.named_parameters () -> n ] [ "weight" ] "one parameter, weight"
            Expect.equal e.weight.dtype torch.ScalarType.BFloat16 "made in the default dtype (bfloat16), no float32 table"
            use ids = torch.tensor([| 2L; 0L; 2L; 6L |]).view(2L, 2L)
            use out = e.forward ids // [2; 2; 3]
            Expect.sequenceEqual out.shape [| 2L; 2L; 3L |] "[..; D]"
            Expect.isTrue (out.reshape(4L, 3L).eq(e.weight.index_select(0L, ids.reshape -1L)).all().item<bool> ()) "row i of the table"
            use total = out.to_type(torch.ScalarType.Float32).sum ()
            total.backward ()
            let counts = e.weight.grad.to_type(torch.ScalarType.Float32).select(1L, 0L)
            Expect.equal (Tensors.toFloats counts) [| 1.0f; 0.0f; 2.0f; 0.0f; 0.0f; 0.0f; 1.0f |] "each row's gradient counts its ids"
        }
        yield! family "llama-tiny-hf" llama (DecoderConfig.parseLlama >> ignore) "rope_scaling" """{"rope_type": "dynamic", "factor": 2.0}"""
        yield! family "qwen2-tiny" qwen2 (DecoderConfig.parseQwen2 >> ignore) "use_sliding_window" "true"
        scopedShared "HfCausalLM.load: an unknown model_type is refused naming the file and the supported ones" (fun _ ->
            let tmp = Directory.CreateTempSubdirectory("moe-causal-")
            try
                File.WriteAllText(Path.Combine(tmp.FullName, "config.json"), """{"model_type": "gpt_neox"}""")
                let e = Expect.throwsC (fun () -> HfCausalLM.load tmp.FullName |> ignore) id
                Expect.stringContains e.Message "config.json" "names the file"
                Expect.stringContains e.Message "gpt_neox" "names the model_type"
                Expect.stringContains e.Message "qwen2_moe" "lists the supported ones"
            finally tmp.Delete true)
        scopedShared "llama-tiny-hf: a sequence longer than max_position_embeddings is refused" (fun shared ->
            let dir = modelDir shared "llama-tiny-hf"
            let tmp = Directory.CreateTempSubdirectory("moe-causal-")
            try
                let node = Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
                node["max_position_embeddings"] <- Nodes.JsonNode.Parse "8"
                File.WriteAllText(Path.Combine(tmp.FullName, "config.json"), node.ToJsonString())
                File.Copy(Path.Combine(dir, "model.safetensors"), Path.Combine(tmp.FullName, "model.safetensors"))
                use lm = HfCausalLM.load tmp.FullName
                let ids, _ = inputs dir
                let e = Expect.throwsC (fun () -> lm.Model.Forward(ids, null, null, noCache) |> ignore) id
                Expect.stringContains e.Message "max_position_embeddings" "names the limit"
            finally tmp.Delete true)
        scopedShared "qwen2-tiny: its generation_config.json (two EOS ids, top-k, top-p, temperature, repetition penalty) drives seeded sampling" (fun shared ->
            let dir = modelDir shared "qwen2-tiny"
            use model = qwen2FromFolder dir
            let ids, _ = inputs dir
            let cfg = { GenerationConfig.load dir with MaxNewTokens = Some 8; Seed = 7L }
            Expect.equal cfg.EosTokenId [ 50258; 50256 ] "both EOS ids"
            Expect.isTrue cfg.DoSample "the checkpoint samples"
            let first = (runCausal cfg model ids null).[0].Sequences[0]
            let again = (runCausal cfg model ids null).[0].Sequences[0]
            Expect.equal again first "the same seed draws the same tokens"
            Expect.isTrue (first.Length >= 1 && first.Length <= 8) "at most max_new_tokens"
            let greedy = (runCausal { GenerationConfig.greedyOf cfg with MaxNewTokens = Some 16 } model ids null).[0].Sequences[0]
            let _, g = entries dir
            let expected = [| for x in (g.GetProperty "ids").EnumerateArray() -> x.GetInt32() |][int ids.shape[1] ..]
            Expect.equal greedy expected "greedy from the loaded config equals transformers'")
        scopedShared "HfCausalLM.load: qwen2-tiny's record gives the loss and its EOS ids" (fun shared ->
            let dir = modelDir shared "qwen2-tiny"
            use lm = HfCausalLM.load dir
            let ids, labels = inputs dir
            use _ = torch.no_grad ()
            let loss, moe = lm.Loss ids null labels
            let alone, _ = entries dir
            Expect.floatClose { absolute = logitsTol; relative = 0.0 } (Tensors.scalar loss) ((alone.GetProperty "loss").GetDouble()) "loss"
            Expect.isEmpty moe "a dense model has no MoE reports"
            Expect.equal lm.EosTokenIds [ 50258 ] "config.json's eos_token_id"
            Expect.equal (lm.StateDict () |> List.length) 26 "every tensor of the checkpoint")
    ]
