/// The pretrained MoE LMs (`Moe.MoeLMs`: Mixtral, Qwen2-MoE, OLMoE) against the outputs transformers 4.45.1
/// recorded for mixtral-tiny, qwen2-moe-tiny and olmoe-tiny (logits, loss, greedy ids, layer 0's router
/// choices), their load-balancing loss, and replacing the checkpoint's router by another toolkit router.
module Moe.Tests.MoeLMsTests

open System
open System.IO
open Expecto
open TorchSharp
open Moe
open Moe.Config
open Moe.Llama
open Moe.MoeLMs
open Moe.Tests.Support
open Moe.Tests.T5Tests
open Moe.Tests.LlamaTests

let private ids (dir: string) = ids2d (((sample dir).GetProperty "seq0_alone").GetProperty "input_ids")
let private labels (dir: string) = ids2d (((sample dir).GetProperty "seq0_alone").GetProperty "labels")

/// Layer 0's router picks equal transformers' (expert indices in rank order).
let private checkRouter (load: string -> DecoderOnlyLM) (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = load dir
    use _ = torch.no_grad ()
    let out = model.Forward(ids dir, null, null, noCache, null)
    let expected =
        [ for row in ((sample dir).GetProperty "seq0_router_layer0").GetProperty("selected_experts").EnumerateArray() do
            for token in row.EnumerateArray() -> [ for e in token.EnumerateArray() -> e.GetInt64() ] ]
    let layer, trace = List.head out.Routers
    Expect.equal layer 0 "the first MoE layer is layer 0"
    let k = int trace.Routing.Experts.shape[1]
    let got = Tensors.toInt64s trace.Routing.Experts |> Array.chunkBySize k |> Array.map List.ofArray |> List.ofArray
    Expect.equal got expected (sprintf "%s: layer 0's router choices equal transformers'" name)
    Expect.equal (out.Moe |> List.map (fun r -> r.Layer)) [ for i in 0 .. model.Config.NumLayers - 1 -> sprintf "layers.%d" i ] "every layer reports its routing"

/// A config.json copy with `output_router_logits` true beside the checkpoint's weights: the loss adds
/// router_aux_loss_coef times the load-balancing loss, as transformers' forward does.
let private checkAuxInLoss (load: string -> DecoderOnlyLM) (name: string) (shared: string) =
    let dir = modelDir shared name
    let tmp = Directory.CreateTempSubdirectory("moe-causal-")
    try
        let node = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
        node["output_router_logits"] <- System.Text.Json.Nodes.JsonNode.Parse "true"
        File.WriteAllText(Path.Combine(tmp.FullName, "config.json"), node.ToJsonString())
        File.Copy(Path.Combine(dir, "model.safetensors"), Path.Combine(tmp.FullName, "model.safetensors"))
        use plain = load dir
        use withAux = load tmp.FullName
        use _ = torch.no_grad ()
        let a = plain.Forward(ids dir, null, null, noCache, labels dir)
        let b = withAux.Forward(ids dir, null, null, noCache, labels dir)
        let coef = (withAux :?> MoeCausalLM).MoeConfig.RouterAuxLossCoef
        let aux = Tensors.scalar b.AuxLoss.Value
        Expect.isGreaterThanOrEqual aux 1.0 "E * sum f P >= 1 for top-k picks (K at a uniform router)"
        Expect.floatClose Accuracy.high (Tensors.scalar b.Loss.Value) (Tensors.scalar a.Loss.Value + coef * aux) "loss = cross-entropy + coef * aux"
    finally tmp.Delete true

let private mixtral (dir: string) : DecoderOnlyLM = mixtralFromFolder dir
let private qwen2Moe (dir: string) : DecoderOnlyLM = qwen2MoeFromFolder dir
let private olmoe (dir: string) : DecoderOnlyLM = olmoeFromFolder dir

let private family (name: string) (load: string -> DecoderOnlyLM) (parse: string -> unit) (field: string) (value: string) =
    [ scopedShared (sprintf "%s: logits and loss equal transformers'" name) (checkSample load name)
      scopedShared (sprintf "%s: greedy ids equal transformers' (cached and uncached)" name) (checkGreedy load name)
      scopedShared (sprintf "%s: layer 0's router choices equal transformers'" name) (checkRouter load name)
      scopedShared (sprintf "%s: cached logits equal uncached" name) (checkCache load name)
      scopedShared (sprintf "%s: a left-padded batch equals each sequence alone" name) (checkLeftPadding load name)
      scopedShared (sprintf "%s: parameter names equal the safetensors names" name) (checkNames load name)
      scopedShared (sprintf "%s: %s = %s is refused by name" name field value) (checkRefused parse name field value)
      scopedShared (sprintf "%s: output_router_logits adds router_aux_loss_coef * the load-balancing loss" name) (checkAuxInLoss load name)
      scopedShared (sprintf "%s: a few AdamW steps lower the loss" name) (fun shared ->
          let dir = modelDir shared name
          use model = load dir
          let before, after = checkTraining model (ids dir) (labels dir)
          Expect.isLessThan after before (sprintf "%s: loss %g -> %g" name before after)) ]

let tests =
    testList "MoeLMs" [
        test "loadBalancingLoss: a uniform router gives K, padding excluded" {
            let logits = torch.zeros ([| 6L; 8L |])
            Expect.floatClose Accuracy.high (Tensors.scalar (loadBalancingLoss 8 2 null [ logits ])) 2.0 "E * sum_k,e f P = K at P = 1/E"
            // one expert always first: f = (1, ..) for slot 0; padding rows would pull P towards uniform
            let rows = [| for token in 0 .. 5 -> if token = 3 then [| 0.0f; 0.0f; 0.0f; 0.0f |] else [| 10.0f; 0.0f; 0.0f; 0.0f |] |]
            let peaked = torch.tensor(Array.concat rows).view(6L, 4L)
            let mask = torch.tensor([| true; true; true; false; true; true |]).view(2L, 3L)
            let masked = loadBalancingLoss 4 1 mask [ peaked ]
            let real = loadBalancingLoss 4 1 null [ torch.cat ([| peaked.narrow(0L, 0L, 3L); peaked.narrow(0L, 4L, 2L) |], 0L) ]
            Expect.floatClose Accuracy.high (Tensors.scalar masked) (Tensors.scalar real) "masked tokens count as if absent"
        }
        yield! family "mixtral-tiny" mixtral (MoeLMConfig.parseMixtral >> ignore) "router_jitter_noise" "0.1"
        yield! family "qwen2-moe-tiny" qwen2Moe (MoeLMConfig.parseQwen2Moe >> ignore) "use_sliding_window" "true"
        yield! family "olmoe-tiny" olmoe (MoeLMConfig.parseOlmoe >> ignore) "clip_qkv" "8.0"
        scopedShared "mixtral-tiny: beam search on a left-padded batch equals each prompt alone" (fun shared ->
            let dir = modelDir shared "mixtral-tiny"
            use model = mixtralFromFolder dir
            let prompt = ids dir
            let t = prompt.shape[1]
            let short = prompt.narrow(1L, 0L, t - 4L)
            let batch = torch.cat ([| prompt; torch.cat ([| torch.zeros ([| 1L; 4L |], dtype = torch.ScalarType.Int64); short |], 1L) |], 0L)
            let mask = torch.tensor([| for row in 0L .. 1L do for i in 0L .. t - 1L -> row = 0L || i >= 4L |]).view(2L, t)
            let cfg = { greedySettings dir with NumBeams = 3; NumReturnSequences = 2; MaxNewTokens = Some 5 }
            let batched = Generate.runCausal cfg model batch mask
            let single = [| (Generate.runCausal cfg model prompt null)[0]; (Generate.runCausal cfg model short null)[0] |]
            for b, s in Array.zip batched single do
                Expect.equal b.Sequences s.Sequences "the same beams"
                for x, y in Array.zip b.Scores.Value s.Scores.Value do
                    Expect.floatClose { absolute = 1e-4; relative = 0.0 } x y "the same beam scores"
            let uncached = Generate.runCausal { cfg with UseCache = false } model batch mask
            Expect.equal [ for r in uncached -> r.Sequences ] [ for r in batched -> r.Sequences ] "cached beam search equals uncached")
        testSequenced (scopedShared "mixtral-tiny: cached greedy decoding frees its tensors (live tensor count stays flat)" (fun shared ->
            let dir = modelDir shared "mixtral-tiny"
            use model = mixtralFromFolder dir
            let prompt = ids dir
            let cfg = greedySettings dir
            let decode () =
                use _ = torch.NewDisposeScope()
                Generate.runCausal cfg model prompt null |> ignore
            decode ()
            let before = Tensors.liveTensors ()
            decode ()
            decode ()
            Expect.isLessThanOrEqual (Tensors.liveTensors ()) before "no tensor outlives its decoding (fewer: garbage of earlier tests finalized meanwhile)"))
        scopedShared "mixtral-tiny: another toolkit router (noisy top-2) replaces the checkpoint's and trains" (fun shared ->
            let dir = modelDir shared "mixtral-tiny"
            use model = mixtralFromFolder dir
            model.ReplaceRouters { RouterConfig.defaults with Experts = 8; K = 2; Selection = NoisyTopK; Capacity = Dropless }
            for _, block in model.SparseBlocks do
                Expect.equal block.Moe.Config.Router.Selection NoisyTopK "the new router is in place"
            let names = model.HfTensors () |> List.map (fun t -> t.Name)
            Expect.contains names "model.layers.0.block_sparse_moe.gate.weight" "the new linear router keeps Hugging Face's name"
            Expect.contains names "model.layers.0.block_sparse_moe.moe.router.noise_weight" "its noise weights keep the toolkit's"
            let before, after = checkTraining model (ids dir) (labels dir)
            Expect.isLessThan after before (sprintf "loss %g -> %g" before after))
    ]
