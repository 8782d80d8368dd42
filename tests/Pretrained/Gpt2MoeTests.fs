/// Drop-Upcycling of GPT-2 (`Moe.Gpt2Moe`): with r = 0 and renormalised top-1 routing the MoE model computes
/// the dense model's function; with r > 0 exactly round(r H) units per expert are redrawn from the original
/// matrices' statistics and everything else is copied; the sequence-classification head reads the last
/// non-pad token as transformers does.
module Moe.Tests.Gpt2MoeTests

open System
open System.IO
open Expecto
open TorchSharp
open Moe
open Moe.Config
open Moe.Gpt2
open Moe.Gpt2Moe
open Moe.Tests.Support

/// float32 logits of the same function computed through different matmul groupings.
let private sameFunction = 1e-5

let private maxDiff (a: torch.Tensor) (b: torch.Tensor) = Tensors.scalar ((a - b).abs().max ())

let private gen (seed: int) = new torch.Generator(uint64 seed, torch.CPU)

let private dense (cfg: Gpt2Config) (seed: int) =
    torch.manual_seed (int64 seed) |> ignore
    let m = new Gpt2Model(cfg)
    // Non-zero biases and LayerNorm parameters, so that copying them is checked too.
    use _ = torch.no_grad ()
    for struct (n, p) in m.named_parameters () do
        if n.EndsWith ".bias" || n.Contains "ln_" then p.copy_ (torch.randn (p.shape, generator = gen (seed + n.Length)) |> Tensors.mulScalar 0.1) |> ignore
    m

/// Top-1 with the kept weight renormalised to 1: the MoE output is exactly the chosen expert's.
let private renormalisedTop1 (experts: int) =
    { DropUpcycleConfig.defaults.Router with Experts = experts; K = 1; Selection = TokenChoiceTopK(NormaliseThenTopK, true) }

let private upcycleTests =
    testList "drop-upcycling" [
        testCase "r = 0, renormalised top-1: the upcycled model's logits equal the dense model's (every other and every block)" <| fun () ->
            let cfg = { Gpt2Config.tiny with Layers = 3 }
            use d = dense cfg 3
            use ids = torch.randint (int64 cfg.VocabSize, [| 2L; 9L |], generator = gen 4)
            d.eval ()
            use expected = d.forward ids
            for every in [ 2; 1 ] do
                let m, report = dropUpcycle { DropUpcycleConfig.defaults with Router = renormalisedTop1 4; DropRatio = 0.0; Every = every } d
                use m = m
                m.eval ()
                Expect.equal m.MoeBlocks (if every = 2 then [ 1 ] else [ 0; 1; 2 ]) "MoE blocks"
                Expect.isTrue (report.Units |> List.forall (fun (_, u) -> u |> Array.forall (fun a -> a.Length = 0))) "nothing re-initialised"
                use logits = m.Logits ids
                Expect.isLessThan (maxDiff logits expected) sameFunction (sprintf "every %d: logits equal the dense model's" every)
                // The routing is real: tokens are spread by a fresh router, each to one expert.
                let out = m.Run(ids, None)
                for _, r in out.Routings do Expect.sequenceEqual r.Experts.shape [| 18L; 1L |] "one expert per token"

        testWithShared "r = 0 upcycling of the shared tiny GPT-2 keeps its logits" (fun data ->
            let dir = Path.Combine(Path.GetDirectoryName data, "models", "gpt2-tiny-hf")
            use d = loadDenseFolder dir
            d.eval ()
            use ids = torch.randint (1000L, [| 1L; 12L |], generator = gen 5)
            use expected = d.forward ids
            let m, _ = dropUpcycle { DropUpcycleConfig.defaults with Router = renormalisedTop1 8; DropRatio = 0.0 } d
            use m = m
            m.eval ()
            use logits = m.Logits ids
            Expect.isLessThan (maxDiff logits expected) sameFunction "logits equal the dense model's")

        testCase "r > 0: exactly round(r H) units per expert redrawn with the original mean and std, the rest copied" <| fun () ->
            let cfg = { Gpt2Config.tiny with Embd = 32; Heads = 2; Layers = 2 }
            use d = dense cfg 7
            // Distinctive statistics per matrix, so the test tells them apart.
            let fc, proj = d.Blocks[1].Mlp.CFc, d.Blocks[1].Mlp.CProj
            do
                use _ = torch.no_grad ()
                fc.Weight.copy_ (torch.randn (fc.Weight.shape, generator = gen 8) |> Tensors.mulScalar 0.7 |> Tensors.addScalar 0.3) |> ignore
                fc.Bias.copy_ (torch.randn (fc.Bias.shape, generator = gen 9) |> Tensors.mulScalar 0.2 |> Tensors.addScalar (-0.5)) |> ignore
                proj.Weight.copy_ (torch.randn (proj.Weight.shape, generator = gen 10) |> Tensors.mulScalar 0.05 |> Tensors.addScalar (-0.1)) |> ignore
            let ratio, experts = 0.15, 8
            let hidden = 4 * cfg.Embd
            let k = int (Math.Round(ratio * float hidden))
            let m, report = dropUpcycle { DropUpcycleConfig.defaults with DropRatio = ratio; Router = { DropUpcycleConfig.defaults.Router with Experts = experts } } d
            use m = m
            Expect.equal (droppedUnits ratio hidden) 19 "round(0.15 x 128) = 19"
            let units = report.Units |> List.exactlyOne |> snd
            let ex = m.Blocks[1].MoeMlp.Experts
            let fcRedrawn, biasRedrawn, projRedrawn = ResizeArray<float32>(), ResizeArray<float32>(), ResizeArray<float32>()
            for e in 0 .. experts - 1 do
                Expect.equal units[e].Length k (sprintf "expert %d: %d units" e k)
                let changedCols = (ex.CFc.Weight[e].ne fc.Weight).any(0L) // [H]
                let changedRows = (ex.CProj.Weight[e].ne proj.Weight).any(1L) // [H]
                let changedBias = ex.CFc.Bias[e].ne fc.Bias // [H]
                let indices (mask: torch.Tensor) = Tensors.toInt64s (mask.nonzero().reshape(-1L)) |> Array.map int
                Expect.sequenceEqual (indices changedCols) units[e] (sprintf "expert %d: c_fc columns redrawn exactly at the sampled units" e)
                Expect.sequenceEqual (indices changedRows) units[e] (sprintf "expert %d: c_proj rows redrawn at the same units" e)
                Expect.sequenceEqual (indices changedBias) units[e] (sprintf "expert %d: c_fc bias redrawn at the same units" e)
                Expect.isTrue ((ex.CProj.Bias[e].eq proj.Bias).all().item<bool> ()) (sprintf "expert %d: c_proj bias copied" e)
                use idx = torch.tensor (units[e] |> Array.map int64)
                fcRedrawn.AddRange(Tensors.toFloats (ex.CFc.Weight[e].index_select (1L, idx)))
                biasRedrawn.AddRange(Tensors.toFloats (ex.CFc.Bias[e].index_select (0L, idx)))
                projRedrawn.AddRange(Tensors.toFloats (ex.CProj.Weight[e].index_select (0L, idx)))
            Expect.isGreaterThan (units |> Array.distinct |> Array.length) 1 "experts sample their units independently"
            // Redrawn values follow N(mean, std) of their original matrix: the sample mean within 5 standard
            // errors, the sample std within 10% (n = 4864 weights; 152 biases: 20%).
            let check (what: string) (original: torch.Tensor) (values: ResizeArray<float32>) (stdTolerance: float) =
                let mu, sigma = Tensors.scalar (original.mean ()), Tensors.scalar (original.std ())
                let xs = values |> Seq.map float |> Array.ofSeq
                let mean = Array.average xs
                let sd = sqrt (xs |> Array.averageBy (fun x -> (x - mean) ** 2.0))
                Expect.isLessThan (abs (mean - mu)) (5.0 * sigma / sqrt (float xs.Length)) (sprintf "%s: mean %g vs original %g" what mean mu)
                Expect.isLessThan (abs (sd / sigma - 1.0)) stdTolerance (sprintf "%s: std %g vs original %g" what sd sigma)
            check "c_fc weight" fc.Weight fcRedrawn 0.1
            check "c_fc bias" fc.Bias biasRedrawn 0.2
            check "c_proj weight" proj.Weight projRedrawn 0.1
            // Everything outside the MoE layer is a copy.
            let source = dict [ for struct (n, p) in d.named_parameters () -> n, (p :> torch.Tensor) ]
            for struct (n, p) in m.named_parameters () do
                if not (n.StartsWith "h.1.mlp") then
                    Expect.isTrue ((p.eq source[n]).all().item<bool> ()) (sprintf "%s copied" n)

        testCase "Switch top-1 with jitter: routings per MoE block, aux loss, gradients reach the router" <| fun () ->
            use d = dense { Gpt2Config.tiny with Layers = 2 } 11
            let m, _ = dropUpcycle DropUpcycleConfig.defaults d
            use m = m
            m.train ()
            use ids = torch.randint (int64 Gpt2Config.tiny.VocabSize, [| 2L; 8L |], generator = gen 12)
            let loss, aux = lmLosses m ids
            Expect.isGreaterThan (Tensors.scalar aux) 0.0 "Switch loss of one MoE block"
            (Tensors.plus loss aux).backward ()
            let router = m.Blocks[1].MoeMlp.Router.Weight
            Expect.isGreaterThan (Tensors.scalar (router.grad.abs().sum ())) 0.0 "router gradient"
            let counts = parameterCounts m
            Expect.equal counts.Experts (8L * (2L * 8L * 32L + 32L + 8L)) "8 experts of c_fc [8; 32] + [32] and c_proj [32; 8] + [8]"
            Expect.equal counts.Routers (8L * 8L) "router [D; E]"

        test "configuration problems are listed together" {
            let problems = DropUpcycleConfig.validate { DropUpcycleConfig.defaults with DropRatio = 1.5; Every = 0 }
            Expect.equal problems.Length 2 (sprintf "%A" problems)
        }
    ]

let private classifierTests =
    testList "sequence classification" [
        testCase "the logit comes from the last non-pad token, with right or left padding" <| fun () ->
            let cfg = Gpt2Config.tiny
            use d = dense cfg 21
            let pad = cfg.VocabSize - 1
            let body = [| 3L; 7L; 1L; 9L; 4L |]
            let m, _ = dropUpcycle { DropUpcycleConfig.defaults with DropRatio = 0.2 } d
            use clf = new Gpt2ForSequenceClassification(m, 3, Some pad)
            clf.eval ()
            let p = int64 pad
            use alone = torch.tensor(body).unsqueeze 0L // [1; 5]
            use right = torch.tensor([| yield! body; p; p; |]).unsqueeze 0L // [1; 7]
            use left = torch.tensor([| p; p; yield! body |]).unsqueeze 0L // [1; 7]
            use both = torch.cat ([| right; left |], 0L) // [2; 7]
            let logits (ids: torch.Tensor) (keep: torch.Tensor option) = fst (clf.Run(ids, keep))
            Expect.sequenceEqual (Tensors.toInt64s (clf.LastTokenIndex both)) [| 4L; 6L |] "right: before the first pad; left: the last position"
            use expected = logits alone None
            use batch = logits both None
            Expect.isLessThan (maxDiff batch[0] expected[0]) sameFunction "right padding: the unpadded row's logits"
            // Left padding: position S - 1 holds the last real token; with transformers' attention mask the
            // pads are not attended to, and the logit is the score of that position's hidden state.
            use keep = both.ne(torch.tensor p).to_type torch.ScalarType.Int64
            use masked = logits both (Some keep)
            let out = m.Run(both, Some keep)
            use direct = clf.Score.forward (out.Hidden[1, 6L])
            Expect.isLessThan (maxDiff masked[1] direct) sameFunction "left padding: score of the hidden state at S - 1"
            Expect.isLessThan (maxDiff masked[0] expected[0]) sameFunction "right padding with the mask: unchanged"
            Expect.sequenceEqual batch.shape [| 2L; 3L |] "[B; L]"

        testCase "no pad id: one row only, as transformers" <| fun () ->
            use d = dense Gpt2Config.tiny 22
            use clf = new Gpt2ForSequenceClassification(ofDense d, 2, None)
            use ids = torch.zeros ([| 2L; 3L |], dtype = torch.ScalarType.Int64)
            let e = Expect.throwsC (fun () -> clf.Run(ids, None) |> ignore) id
            Expect.stringContains e.Message "pad token" "names the missing pad token id"
            let names = [ for struct (n, _) in clf.named_parameters () -> n ]
            Expect.contains names "score.weight" "transformers' name of the head"
            Expect.contains names "transformer.wte.weight" "transformers' name of the body"
            Expect.isFalse (names |> List.contains "score.bias") "no bias"
    ]

let tests = testSequenced (testList "Gpt2Moe" [ upcycleTests; classifierTests ])
