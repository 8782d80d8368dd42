/// Switch Transformers (`Moe.Switch`) against the outputs transformers 4.45.1 recorded for switch-tiny and
/// switch-tiny-capacity2 (with the two corrections ../shared/models/README.md describes), Switch's
/// per-sequence capacity (`Routing.limitPerGroup`), and replacing the checkpoint's router by another toolkit
/// router.
module Moe.Tests.SwitchTests

open System
open System.IO
open Expecto
open TorchSharp
open Moe
open Moe.Config
open Moe.Models
open Moe.Seq2Seq
open Moe.T5
open Moe.Switch
open Moe.Tests.Support
open Moe.Tests.T5Tests

let private source (shared: string) (name: string) =
    let s = (sample (modelDir shared name)).GetProperty "src0_alone"
    ids2d (s.GetProperty "input_ids"), mask2d (s.GetProperty "attention_mask"), ids2d (s.GetProperty "labels"), ids2d (s.GetProperty "decoder_input_ids")

let private checkSample (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = Switch.fromFolder dir
    let s = (sample dir).GetProperty "src0_alone"
    let ids, mask, labels, _ = source shared name
    use _ = torch.no_grad ()
    let out = model.Forward(ids, mask, labels)
    let err = sliceError out.Logits (floats3d (s.GetProperty "logits_slice_first8"))
    Expect.isLessThan err logitsTol (sprintf "%s logits[.., :8] within %g of transformers' (max error %g)" name logitsTol err)
    let close what (got: torch.Tensor) (key: string) =
        Expect.floatClose { absolute = logitsTol; relative = 0.0 } (got.item<float32> () |> float) ((s.GetProperty key).GetDouble()) what
    close "cross-entropy" out.CrossEntropy "ce_loss"
    close "loss with the router z and aux losses" out.Loss "loss"
    Expect.isSome out.RouterLoss "Switch adds router losses"
    Expect.equal (out.Moe |> List.map (fun r -> r.Layer)) [ "enc.1"; "enc.3"; "dec.1"; "dec.3" ] "the MoE layers report like the toolkit's"

let private checkGreedy (name: string) (shared: string) =
    let dir = modelDir shared name
    use model = Switch.fromFolder dir
    let g = (sample dir).GetProperty "src0_greedy"
    let settings = g.GetProperty "settings"
    let ids, mask, _, _ = source shared name
    let got =
        greedy model ids mask (settings.GetProperty("decoder_start_token_id").GetInt64()) (settings.GetProperty("eos_token_id").GetInt64())
            (settings.GetProperty("max_new_tokens").GetInt32())
    Expect.equal got [ for x in (g.GetProperty "greedy_ids").EnumerateArray() -> x.GetInt64() ] (sprintf "%s greedy ids equal transformers'" name)

let private routerConfig (selection: Selection) (k: int) =
    { RouterConfig.defaults with Experts = 8; K = k; Selection = selection; Capacity = Dropless }

let tests =
    testList "Switch" [
        test "limitPerGroup keeps the first c assignments per expert in each row" {
            // two rows of 5 tokens; row 0 sends 4 tokens to expert 1, row 1 sends 2
            let experts = torch.tensor([| 1L; 1L; 0L; 1L; 1L; 1L; 0L; 0L; 0L; 1L |]).reshape(10L, 1L)
            let cfg = routerConfig SwitchTop1 1
            let r = Routing.route cfg (Routing.RouterInputs.OfLogits (torch.nn.functional.one_hot(experts.squeeze 1L, 8L).to_type(torch.ScalarType.Float32)))
            let limited = Routing.limitPerGroup cfg 5 2 r
            let kept = limited.Kept.reshape(-1L).data<bool>().ToArray()
            Expect.equal kept [| true; true; true; false; false; true; true; true; false; true |] "first come per (row, expert); expert 0 in row 1 keeps 2 of 3"
            let weights = limited.Weights.reshape(-1L).data<float32>().ToArray()
            Expect.isTrue (Array.forall2 (fun k w -> k || w = 0.0f) kept weights) "dropped assignments weigh 0"
            Expect.floatClose Accuracy.high (Tensors.scalar limited.Stats.DroppedFraction) 0.3 "3 of 10 dropped"
        }
        scopedShared "switch-tiny: logits, loss and cross-entropy equal transformers'" (checkSample "switch-tiny")
        scopedShared "switch-tiny-capacity2: logits, loss and cross-entropy equal transformers' (tokens over capacity dropped)" (checkSample "switch-tiny-capacity2")
        scopedShared "switch-tiny: greedy ids equal transformers'" (checkGreedy "switch-tiny")
        scopedShared "switch-tiny-capacity2: greedy ids equal transformers'" (checkGreedy "switch-tiny-capacity2")
        scopedShared "switch-tiny: the first sparse layers' router choices equal transformers'" (fun shared ->
            let dir = modelDir shared "switch-tiny"
            use model = Switch.fromFolder dir
            let r = (sample dir).GetProperty "src0_router_first_sparse_layer"
            let ids, mask, labels, _ = source shared "switch-tiny"
            use _ = torch.no_grad ()
            let out = model.Forward(ids, mask, labels)
            let choices (decoder: bool) =
                let layer = r.GetProperty(if decoder then "decoder_layer" else "encoder_layer").GetInt32()
                let _, trace = out.Routers |> List.find (fun (p, _) -> p.Decoder = decoder && p.Layer = layer)
                trace.Dispatch.argmax(-1L).reshape(-1L).data<int64>().ToArray() |> List.ofArray
            let want (key: string) = [ for row in (r.GetProperty key).EnumerateArray() do for x in row.EnumerateArray() -> x.GetInt64() ]
            Expect.equal (choices false) (want "encoder_expert_index") "encoder experts"
            Expect.equal (choices true) (want "decoder_expert_index") "decoder experts")
        scopedShared "switch-tiny: cached decoding equals recomputing the prefix" (fun shared ->
            use model = Switch.fromFolder (modelDir shared "switch-tiny")
            let ids, mask, _, dec = source shared "switch-tiny"
            let err = cachedVersusUncached model ids mask dec
            Expect.isLessThan err logitsTol (sprintf "cached and uncached logits (max difference %g)" err)
            use _ = torch.no_grad ()
            let m = model :> ISeq2SeqModel
            let enc = m.Encode(ids, mask)
            use cache = m.NewCache()
            let out = m.Decode(dec.narrow(1L, 0L, 1L), enc.Memory, mask, cache)
            Expect.equal (enc.Moe |> List.map (fun r -> r.Layer)) [ "enc.1"; "enc.3" ] "Encode reports the encoder's MoE layers"
            Expect.equal (out.Moe |> List.map (fun r -> r.Layer)) [ "dec.1"; "dec.3" ] "Decode reports the decoder's MoE layers"
            for r in out.Moe do
                Expect.floatClose Accuracy.high (float (Array.sum (Tensors.toFloats r.Report.Stats.TokensPerExpert))) 1.0 "expert shares sum to 1")
        scopedShared "a right-padded batch equals each input alone (capacity is per sequence)" (fun shared ->
            for name in [ "switch-tiny"; "switch-tiny-capacity2" ] do
                use model = Switch.fromFolder (modelDir shared name)
                let ids, _, _, dec = source shared name
                let ids = ids.data<int64>().ToArray()
                let err = paddedVersusAlone model 0L ids[.. 40] ids[3 .. 20] (dec.narrow(1L, 0L, 6L))
                Expect.isLessThan err logitsTol (sprintf "%s: padded rows vs alone (max difference %g)" name err))
        scopedShared "export names equal the checkpoint's, and an export reloads to the same logits" (fun shared ->
            let dir = modelDir shared "switch-tiny"
            use model = Switch.fromFolder dir
            let state = stateDict model
            Expect.equal (state |> List.map fst |> set) (storedNames (Path.Combine(dir, "model.safetensors"))) "stateDict names = safetensors names"
            let ids, mask, _, dec = source shared "switch-tiny"
            withEditedCopy dir id (fun _ -> state) (fun copy ->
                use reloaded = Switch.fromFolder copy
                use _ = torch.no_grad ()
                let logits (m: ISeq2SeqModel) = m.Decode(dec, (m.Encode(ids, mask)).Memory, mask, Unchecked.defaultof<DecoderCache>).Logits
                Expect.equal ((logits model - logits reloaded).abs().max().item<float32> ()) 0.0f "identical logits"))
        scopedShared "bad configs and weights: errors name the field or tensor" (fun shared ->
            let dir = modelDir shared "switch-tiny"
            let refused (edit: string -> string) (field: string) =
                withEditedCopy dir edit id (fun copy ->
                    let msg = errorOf (fun () -> Switch.fromFolder copy |> ignore)
                    Expect.stringContains msg field (sprintf "names %s" field)
                    Expect.stringContains msg "config.json" "names the file")
            refused (fun c -> c.Replace("\"router_bias\": false", "\"router_bias\": true")) "router_bias"
            refused (fun c -> c.Replace("\"router_dtype\": \"float32\"", "\"router_dtype\": \"bfloat16\"")) "router_dtype"
            refused (fun c -> c.Replace("\"router_ignore_padding_tokens\": false", "\"router_ignore_padding_tokens\": true")) "router_ignore_padding_tokens"
            refused (fun c -> c.Replace("\"dense_act_fn\": \"relu\"", "\"dense_act_fn\": \"gelu_new\"")) "dense_act_fn"
            refused (fun c -> c.Replace("\"num_experts\": 8", "\"num_experts\": 8, \"moe_top_k\": 2")) "moe_top_k"
            let expert = "encoder.block.3.layer.1.mlp.experts.expert_5.wo.weight"
            withEditedCopy dir id (List.filter (fun (n, _) -> n <> expert)) (fun copy ->
                let msg = errorOf (fun () -> Switch.fromFolder copy |> ignore)
                Expect.stringContains msg expert "names the missing expert tensor"))
        scopedShared "another toolkit router replaces the checkpoint's and trains (top-2, expert choice)" (fun shared ->
            let ids, mask, labels, _ = source shared "switch-tiny"
            for router in [ routerConfig (TokenChoiceTopK(NormaliseThenTopK, true)) 2
                            { routerConfig ExpertChoice 8 with Capacity = Factor 1.0 } ] do
                use model = Switch.fromFolder (modelDir shared "switch-tiny")
                torch.manual_seed 3L |> ignore
                model.ReplaceRouters(router, None)
                let layers = model.MoeLayers()
                Expect.equal layers.Length 4 "four MoE layers"
                for _, m in layers do Expect.equal m.Config.Router.Selection router.Selection "router replaced"
                let first, last = trainSteps model (fun () -> (model.Forward(ids, mask, labels)).Loss) 6
                Expect.isLessThan last first (sprintf "%A: loss fell (%g -> %g)" router.Selection first last))
        testSequenced (scopedShared "cached greedy decoding frees its tensors (live tensor count stays flat)" (fun shared ->
            use model = Switch.fromFolder (modelDir shared "switch-tiny-capacity2")
            let ids, mask, _, _ = source shared "switch-tiny-capacity2"
            let decode () =
                use _ = torch.NewDisposeScope()
                greedy model ids mask 0L 1L 8 |> ignore
            decode ()
            let before = Tensors.liveTensors ()
            decode ()
            decode ()
            Expect.isLessThanOrEqual (Tensors.liveTensors ()) before "no tensor outlives its decoding (fewer: garbage of earlier tests finalized meanwhile)"))
        scopedShared "a few AdamW steps lower the loss with the checkpoint's own router (jitter on)" (fun shared ->
            use model = Switch.fromFolder (modelDir shared "switch-tiny-capacity2")
            let ids, mask, labels, _ = source shared "switch-tiny-capacity2"
            torch.manual_seed 2L |> ignore
            let first, last = trainSteps model (fun () -> (model.Forward(ids, mask, labels)).Loss) 6
            Expect.isLessThan last first (sprintf "loss fell (%g -> %g)" first last))
    ]

/// Sparse upcycling of the pretrained t5-tiny (`Switch.upcycle`).
let upcycling =
    testList "Upcycle T5" [
        scopedShared "upcycled t5-tiny with identical experts and renormalised top-2 equals the dense model" (fun shared ->
            let dir = modelDir shared "t5-tiny"
            use dense = T5.fromFolder dir
            let moe =
                { MoeConfig.defaults with
                    ModelDim = dense.Config.DModel; ExpertHidden = dense.Config.DFf; Activation = ReLU
                    Router = { routerConfig (TokenChoiceTopK(NormaliseThenTopK, true)) 2 with Experts = 4 } }
            let s = (sample dir).GetProperty "doc0_alone"
            let ids, mask, labels = ids2d (s.GetProperty "input_ids"), mask2d (s.GetProperty "attention_mask"), ids2d (s.GetProperty "labels")
            use _ = torch.no_grad ()
            let want = dense.Forward(ids, mask, labels)
            for step in [ 1; 2 ] do
                torch.manual_seed 5L |> ignore
                use upcycled = upcycle moe step dense
                let got = upcycled.Forward(ids, mask, labels)
                let err = (got.Logits - want.Logits).abs().max().item<float32> () |> float
                Expect.isLessThan err 1e-4 (sprintf "step %d: logits equal the dense model's (max difference %g)" step err)
                Expect.equal got.Moe.Length (if step = 1 then 4 else 2) "MoE layers where the step says")
        scopedShared "upcycling refuses a gated T5 by name" (fun shared ->
            use flan = T5.fromFolder (modelDir shared "flan-t5-tiny")
            let moe = { MoeConfig.defaults with ModelDim = 64; ExpertHidden = flan.Config.DFf; Activation = GELU }
            let msg = errorOf (fun () -> upcycle moe 1 flan |> ignore)
            Expect.stringContains msg "gated" "says why")
    ]
