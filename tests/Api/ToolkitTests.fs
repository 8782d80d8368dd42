/// The C# API (namespace MoeToolkit): its options objects resolve to the F# records, its objects compute what
/// the F# modules compute, and its disposable results free their tensors.
module Moe.Tests.ToolkitTests

open System
open Expecto
open TorchSharp
open Moe
open Moe.Config
open MoeToolkit

/// `f ()` throws ArgumentException whose message has every fragment.
let private throwsWith (fragments: string list) (f: unit -> unit) =
    let e = Expect.throwsC f id
    Expect.isTrue (e :? ArgumentException) (sprintf "expected ArgumentException, got %s" (e.GetType().Name))
    for fragment in fragments do Expect.stringContains e.Message fragment "names what was expected"

let tests =
    testList "Api" [
        testCase "default options are the F# defaults" <| fun () ->
            Expect.equal (RouterOptions().ToConfig()) RouterConfig.defaults "router"
            Expect.equal (MoeLayerOptions().ToConfig()) MoeConfig.defaults "MoE layer"
            Expect.equal (AuxLossWeights().ToConfig()) LossWeights.defaults "loss weights"
            Expect.equal (TransformerOptions(VocabSize = 512).ToConfig()) (Models.ModelApi.Config 512) "Transformer"

        testCase "options map to their record fields" <| fun () ->
            let r = RouterOptions(Experts = 6, TopK = 3, Kind = RouterKind.NoisyTopK, Sparsemax = true, CapacityFactor = 1.5, LossFreeBiasRate = 1e-3).ToConfig()
            Expect.equal (r.Experts, r.K, r.Selection, r.Normaliser, r.Capacity, r.BiasUpdateRate) (6, 3, NoisyTopK, Sparsemax, Factor 1.5, Some 1e-3) "router fields"
            Expect.equal (RouterOptions(Kind = RouterKind.Hash, HashSeed = 5).ToConfig().Selection) (Hash(RandomHash 5)) "hash seed"
            let m = MoeLayerOptions(ModelDim = 24, Activation = ExpertActivation.SwiGlu, SharedExperts = 1).ToConfig()
            Expect.equal (m.ModelDim, m.Activation, m.SharedExperts) (24, SwiGLU, 1) "layer fields"
            let t = TransformerOptions(VocabSize = 40, ModelDim = 32, Moe = MoeLayerOptions(ModelDim = 7), MoeEvery = 2).ToConfig()
            match t.Ffn with
            | Models.Moe moe -> Expect.equal (moe.ModelDim, t.MoeEvery) (32, 2) "MoE sublayers take the model's width"
            | other -> failtestf "expected MoE sublayers, got %A" other

        testCase "bad options: every problem in one ArgumentException" <| fun () ->
            throwsWith [ "K must be in 1..Experts (2), got 3"; "Jitter must be in [0, 1), got 1.5" ]
                (fun () -> RouterOptions(Experts = 2, TopK = 3, Jitter = 1.5).ToConfig() |> ignore)
            throwsWith [ "ExpertHidden must be >= 1, got 0" ] (fun () -> new MoeLayer(MoeLayerOptions(ExpertHidden = 0)) |> ignore)
            throwsWith [ "expected device auto|cpu|cuda, got 'tpu'" ] (fun () -> MoeRuntime.Device "tpu" |> ignore)

        testCase "MoeLayer.Forward is the F# layer's forward; its output frees its tensors" <| fun () ->
            MoeRuntime.Seed 11
            use layer = new MoeLayer(MoeLayerOptions(ModelDim = 8, ExpertHidden = 16, Router = RouterOptions(Experts = 4, TopK = 2, CapacityFactor = 1.0)))
            layer.Eval() |> ignore
            use x = torch.randn (32L, 8L)
            let y = layer.Forward x
            let reference = layer.Module.forward x
            let report = reference.Moe.Value
            Expect.isTrue (torch.allclose (y.Output, reference.Output)) "same output"
            Expect.sequenceEqual y.Statistics.TokensPerExpert (Tensors.toFloats report.Stats.TokensPerExpert) "same tokens per expert"
            Expect.floatClose Accuracy.high y.Statistics.DroppedFraction (Tensors.scalar report.Stats.DroppedFraction) "same dropped fraction"
            Expect.floatClose Accuracy.high (Tensors.scalar (y.AuxLoss())) (Tensors.scalar (Layers.weightedAux LossWeights.defaults report.Aux)) "same weighted aux loss"
            Expect.floatClose Accuracy.high y.Statistics.LoadCv (RunLog.loadCv (y.Statistics.TokensPerExpert |> Array.map float)) "load CV of the shares"
            Expect.equal (layer.NamedParameters() |> Seq.map (fun struct (n, _) -> n) |> Set.ofSeq) (set [ "router.weight"; "experts.w1"; "experts.w2" ]) "parameters by name"
            let owned = [ y.Output; y.AuxLosses.SwitchAux; y.AuxLosses.ZLoss ]
            (y :> IDisposable).Dispose()
            for t in owned do Expect.isTrue t.IsInvalid "disposed with the output"

        // Sequenced: it seeds libtorch's global generator and counts live tensors, which tests running beside it
        // change (a --parallel --gc-stress run failed it on that count).
        testSequenced <| testCase "Router.Route is Routing.route; forward and backward through the facade keep live tensors flat" (fun () ->
            MoeRuntime.Seed 12
            use logits = torch.randn (16L, 8L)
            let options = RouterOptions(Experts = 8, TopK = 2)
            use routed = Router.Route(options, logits)
            let reference = Routing.routeLogits (options.ToConfig()) logits
            Expect.sequenceEqual (Tensors.toInt64s routed.ExpertIndex) (Tensors.toInt64s reference.Experts) "same experts"
            Expect.isTrue (torch.allclose (routed.Weights, reference.Weights)) "same weights"
            use layer = new MoeLayer(MoeLayerOptions(ModelDim = 8, ExpertHidden = 16))
            layer.Train() |> ignore
            let step () =
                use scope = torch.NewDisposeScope()
                use y = layer.Forward(torch.randn (32L, 8L))
                (Tensors.plus ((Tensors.square y.Output).mean()) (y.AuxLoss())).backward ()
            step ()
            let live = Tensors.liveTensors ()
            for _ in 1 .. 5 do step ()
            Expect.isLessThanOrEqual (Tensors.liveTensors ()) live "live tensors do not grow")
    ]
