/// Tests of sparse upcycling (`Upcycle`, Komatsuzaki et al. 2023): the oracle that an upcycled model with
/// renormalised top-k routing computes the dense model's function, copies that share no storage, and the
/// mismatches it refuses.
module Moe.Tests.UpcycleTests

open System
open Expecto
open TorchSharp
open Moe
open Moe.Config
open Moe.Layers
open Moe.Models
open Moe.Tests.Support
open Moe.Tests.ModelsTests

/// Logits through 2 + 2 layers where each MoE output is a convex mix of k equal float32 expert outputs:
/// the mix differs from one expert's output by float32 rounding of the weights (about 1e-7 relative),
/// amplified by the layers after it.
let private upcycleTol = Tol.f32Loose

/// A tiny dense encoder-decoder.
let private denseConfig (act: Activation) : ModelConfig =
    { ModelConfig.defaults with
        VocabSize = 40; ModelDim = 16; Heads = 2; KvHeads = 2; EncoderLayers = 2; DecoderLayers = 2
        MaxLength = 16; Ffn = Dense 24; Activation = act }

/// Top-2 of 4 experts, softmax then top-k renormalised, no capacity drops: any mix of equal experts is the
/// dense FFN.
let private moeFor (dense: ModelConfig) : MoeConfig =
    { MoeConfig.defaults with
        ModelDim = dense.ModelDim
        ExpertHidden = (match dense.Ffn with Dense h -> h | _ -> failwith "expected a dense config")
        Activation = dense.Activation
        Router = { RouterConfig.defaults with Experts = 4; K = 2; Selection = TokenChoiceTopK(NormaliseThenTopK, true); Capacity = Dropless } }

/// The logits of both models at the real target positions of a padded batch, in eval mode. MoE layers skip
/// padding (their output there is 0, a dense FFN's is not), so padded target positions are left out; padded
/// source positions are masked out of cross-attention and so cannot matter.
let private logitsAtRealPositions (model: EncoderDecoder) =
    torch.manual_seed 7L |> ignore
    let src = randIds 0L 40L [| 3L; 7L |]
    let tgt = randIds 0L 40L [| 3L; 5L |]
    let srcValid = torch.tensor([| for b in 0 .. 2 do for s in 0 .. 6 -> s < 7 - 2 * b |]).reshape(3L, 7L)
    let tgtValid = torch.tensor([| for b in 0 .. 2 do for l in 0 .. 4 -> l < 5 - b |]).reshape(3L, 5L)
    model.eval ()
    use _ = torch.no_grad ()
    let out = model.Forward(src, tgt, srcValid, tgtValid)
    out.Logits.index(torch.TensorIndex.Tensor tgtValid)                        // [real positions; V]

let tests =
    testList "Upcycle" [
        for act in [ GELU; SwiGLU ] do
            for every in [ 1; 2 ] do
                sequencedCase (sprintf "oracle: upcycled logits = dense logits (%A, MoeEvery %d, padded batch)" act every) (fun () ->
                    torch.manual_seed 3L |> ignore
                    use dense = new EncoderDecoder(denseConfig act)
                    use moe = Upcycle.upcycle (moeFor dense.Config) every dense
                    Expect.equal (moe.MoeLayers().Length) (if every = 1 then 4 else 2) "MoE layers by MoeEvery"
                    expectClose upcycleTol (logitsAtRealPositions moe) (logitsAtRealPositions dense) "logits at real positions")

        sequencedCase "the oracle can fail: without renormalising, the k weights sum below 1 and the logits move" (fun () ->
            torch.manual_seed 3L |> ignore
            use dense = new EncoderDecoder(denseConfig GELU)
            let moe = moeFor dense.Config
            use naive = Upcycle.upcycle { moe with Router = { moe.Router with Selection = TokenChoiceTopK(NormaliseThenTopK, false) } } 1 dense
            let diff = maxAbsDiff (logitsAtRealPositions naive) (logitsAtRealPositions dense)
            Expect.isGreaterThan diff upcycleTol (sprintf "naive top-k: max |difference| %g" diff))

        sequencedCase "every expert is its layer's dense FFN, transposed; routers start fresh" (fun () ->
            torch.manual_seed 4L |> ignore
            use dense = new EncoderDecoder(denseConfig SwiGLU)
            use moe = Upcycle.upcycle (moeFor dense.Config) 1 dense
            for (name, layer), block in Array.zip (moe.MoeLayers()) (Array.append (Seq.toArray dense.EncoderBlocks) (Seq.toArray dense.DecoderBlocks)) do
                let ffn = block.Ffn :?> DenseFfn
                for e in 0L .. 3L do
                    for what, stacked, linear in [ "w1", layer.Experts.W1, ffn.W1; "w2", layer.Experts.W2, ffn.W2; "w3", layer.Experts.W3, ffn.W3 ] do
                        expectClose Tol.f32 stacked[e] (linear.weight.t()) (sprintf "%s expert %d %s" name e what)
                Expect.isGreaterThan (layer.Router.Weight.abs().sum().item<float32>()) 0.0f (name + ": router initialised"))

        sequencedCase "non-FFN parameters are copied, not shared; experts are separate copies" (fun () ->
            torch.manual_seed 5L |> ignore
            use dense = new EncoderDecoder(denseConfig GELU)
            use moe = Upcycle.upcycle (moeFor dense.Config) 1 dense
            expectClose Tol.f32 moe.Embedding.weight dense.Embedding.weight "embedding copied"
            let before = moe.Embedding.weight.clone()
            use _ = torch.no_grad ()
            Tensors.plus_ dense.Embedding.weight (torch.ones_like dense.Embedding.weight) |> ignore
            expectClose Tol.f32 moe.Embedding.weight before "changing the dense embedding leaves the copy"
            let _, layer = moe.MoeLayers()[0]
            let expert1 = layer.Experts.W1[1L].clone()
            let denseW1 = ((dense.EncoderBlocks[0].Ffn :?> DenseFfn).W1.weight).clone()
            Tensors.plus_ layer.Experts.W1[0L] (torch.ones_like layer.Experts.W1[0L]) |> ignore
            expectClose Tol.f32 layer.Experts.W1[1L] expert1 "expert 1 unchanged when expert 0 changes"
            expectClose Tol.f32 ((dense.EncoderBlocks[0].Ffn :?> DenseFfn).W1.weight) denseW1 "dense FFN unchanged when an expert changes")

        test "mismatches are refused, every one named" {
            let dense = denseConfig GELU
            let moe = moeFor dense
            let problems (m: MoeConfig) = Upcycle.problems dense (Upcycle.config m 1 dense)
            Expect.isEmpty (problems moe) "a fitting config"
            let both = problems { moe with ExpertHidden = 32; Activation = ReLU }
            Expect.equal both.Length 2 "both problems at once"
            Expect.stringContains both[0] "expert hidden width (Moe.ExpertHidden = 32) must equal the dense FFN's hidden width (24)" "hidden"
            Expect.stringContains both[1] "activation" "activation"
            Expect.exists (problems { moe with ModelDim = 8 }) (fun p -> p.Contains "ModelDim") "model width"
            Expect.exists (problems { moe with SharedExperts = 1 }) (fun p -> p.Contains "SharedExperts") "shared experts"
            let wider = { dense with ModelDim = 32; Heads = 2; KvHeads = 2 }
            Expect.exists (Upcycle.problems dense (Upcycle.config { moe with ModelDim = 32 } 1 wider)) (fun p -> p.Contains "ModelDim (model width) differs") "model width differs"
            Expect.exists (Upcycle.problems (Upcycle.config moe 1 dense) (Upcycle.config moe 1 dense)) (fun p -> p.Contains "expected a dense model") "an MoE source"
            torch.manual_seed 6L |> ignore
            use model = new EncoderDecoder(dense)
            let ex = Expect.throwsC (fun () -> Upcycle.upcycle { moe with ExpertHidden = 32 } 1 model |> ignore) id
            Expect.isTrue (ex :? ArgumentException) "an ArgumentException"
            Expect.stringContains ex.Message "ExpertHidden" "the message names the mismatch"
        }
    ]
