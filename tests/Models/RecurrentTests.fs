/// The BiLSTM host model: padding never reaches the router (routing statistics, balancing losses and outputs
/// are the same with and without extra padding), the one-expert baseline equals an MoE with one expert and
/// k = 1, parameters are registered, no tensor leaks per step, and best-span decoding on hand-made logits.
module Moe.Tests.RecurrentTests

open System
open Expecto
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Config
open Moe.Layers
open Moe.Models
open Moe.Recurrent
open Moe.Tests.Support
open Moe.Tests.ModelsTests

/// A model small enough for a unit test: vocabulary 20, vectors of 6, LSTMs of 8 per direction.
let private small (middle: Middle) (head: Head) =
    { RecurrentConfig.defaults with VocabSize = 20; EmbeddingDim = 6; Hidden = 8; ExpertHidden = 12; Middle = middle; Head = head }

let private moeOf (selection: Selection) (experts: int) (k: int) =
    Experts
        { MoeConfig.defaults with
            ModelDim = 16; ExpertHidden = 12; Activation = ReLU
            Router = { RouterConfig.defaults with Experts = experts; K = k; Selection = selection } }

/// Rows of ids padded to `width` with `fill` (any id: padding must not matter).
let private padded (rows: int64[][]) (width: int) (fill: int64) : torch.Tensor =
    let flat = rows |> Array.collect (fun r -> Array.append r (Array.create (width - r.Length) fill))
    torch.tensor(flat).reshape (int64 rows.Length, int64 width)

let private rows = [| [| 3L; 5L; 7L; 9L; 11L |]; [| 4L; 0L; 1L |]; [| 13L; 2L; 17L; 19L |] |]
let private lengths = rows |> Array.map (fun r -> int64 r.Length)

let tests =
    testList "Recurrent" [
        test "pads never reach a router: statistics, balancing losses and outputs ignore extra padding" {
            for name, selection in [ "top-k mask", TokenChoiceTopK(NormaliseThenTopK, true); "noisy top-k", NoisyTopK ] do
                Native.seedAll 5
                use model = new BiLstmMoe("m", small (moeOf selection 4 2) (TokenClassification 5))
                model.eval ()
                use _ = torch.no_grad ()
                let tight = model.forward (padded rows 5 0L, lengths)
                let loose = model.forward (padded rows 11 15L, lengths)
                let report (o: RecurrentOutput) = (List.exactlyOne o.Moe).Report
                let a, b = report tight, report loose
                for what, x, y in [ "tokens per expert", a.Stats.TokensPerExpert, b.Stats.TokensPerExpert
                                    "router entropy", a.Stats.RouterEntropy, b.Stats.RouterEntropy
                                    "dropped fraction", a.Stats.DroppedFraction, b.Stats.DroppedFraction
                                    "switch aux", a.Aux.SwitchAux, b.Aux.SwitchAux
                                    "importance", a.Aux.Importance, b.Aux.Importance
                                    "load", a.Aux.Load, b.Aux.Load
                                    "z-loss", a.Aux.ZLoss, b.Aux.ZLoss ] do
                    expectClose Tol.f32 x y (sprintf "%s: %s" name what)
                // 12 real tokens, 2 picks each: shares are multiples of 1/24.
                let counts = toFloats a.Stats.TokensPerExpert |> Array.map (fun f -> float f * 24.0)
                for c in counts do Expect.floatClose Accuracy.medium c (Math.Round c) (name + ": shares count 12 tokens x 2 picks")
                expectClose Tol.f32 (tight.Logits) (loose.Logits.narrow (1L, 0L, 5L)) (name + ": logits at real positions")
                Expect.equal (scalar (loose.Logits.narrow(1L, 5L, 6L).abs().max ())) 0.0 (name + ": zeros past every row")
        }
        test "the one-expert baseline equals an MoE with one expert and k = 1" {
            Native.seedAll 3
            use baseline = new BiLstmMoe("m", small SingleExpert SpanExtraction)
            use moe = new BiLstmMoe("m", small (moeOf (TokenChoiceTopK(NormaliseThenTopK, true)) 1 1) SpanExtraction)
            use _ = torch.no_grad ()
            let target = dict [ for struct (name, p) in moe.named_parameters () -> name, p ]
            for struct (name, p) in baseline.named_parameters () do
                if not (name.StartsWith "middle.") then target[name].copy_ p |> ignore
            let dense = baseline.Middle :?> DenseFfn
            let layer = moe.Middle :?> MoeLayer
            layer.Experts.W1.copy_ (dense.W1.weight.t().unsqueeze 0L) |> ignore // Linear [H; D] -> [1; D; H]
            layer.Experts.W2.copy_ (dense.W2.weight.t().unsqueeze 0L) |> ignore // Linear [D; H] -> [1; H; D]
            baseline.eval ()
            moe.eval ()
            let ids = padded rows 5 0L
            let a, b = baseline.forward (ids, lengths), moe.forward (ids, lengths)
            expectClose Tol.f32 a.Logits b.Logits "same logits"
            Expect.isEmpty a.Moe "the baseline has no router"
            Expect.equal (toFloats (List.exactlyOne b.Moe).Report.Stats.TokensPerExpert) [| 1.0f |] "every token to the one expert"
        }
        test "parameters are registered under their names; frozen word vectors do not train" {
            use model = new BiLstmMoe("m", small (moeOf NoisyTopK 4 2) (TokenClassification 5))
            let names = model.named_parameters () |> Seq.map (fun struct (n, _) -> n) |> Set.ofSeq
            for n in [ "embedding.weight"; "special.weight"; "middle.router.weight"; "middle.router.noise_weight"; "middle.experts.w1"; "head.weight" ] do
                Expect.contains names n (sprintf "registers %s" n)
            Expect.exists names (fun n -> n.StartsWith "lstm1.") "first LSTM"
            Expect.exists names (fun n -> n.StartsWith "lstm2.") "second LSTM"
            Expect.isFalse model.Embedding.weight.requires_grad "frozen GloVe table"
            use trainable = new BiLstmMoe("m", { small SingleExpert SpanExtraction with FreezeEmbeddings = false })
            Expect.isTrue trainable.Embedding.weight.requires_grad "trainable GloVe table"
            Expect.isLessThan model.ActiveParameters (parameterCount model) "two of four experts active"
            model.SetEmbeddings(Array.init 20 (fun i -> Array.create 6 (float32 i)))
            Expect.equal (scalar (model.Embedding.weight[7L, 3L])) 7.0 "vectors copied"
            Expect.throwsT<ArgumentException> (fun () -> model.forward (padded rows 5 0L, [| 5L; 0L; 4L |]) |> ignore) "a zero length is refused"
        }
        sequencedCase "20 training steps keep the live tensor count flat" (fun () ->
            Native.seedAll 11
            use model = new BiLstmMoe("m", small (moeOf NoisyTopK 4 2) SpanExtraction)
            model.train ()
            let ids = padded rows 5 0L
            let step () =
                use _ = torch.NewDisposeScope()
                model.zero_grad ()
                let out = model.forward (ids, lengths)
                let report = (List.exactlyOne out.Moe).Report
                (Tensors.plus (Tensors.plus ((Tensors.square out.Logits).mean ()) report.Aux.Load) report.Aux.Importance).backward ()
            step ()
            let before = liveTensors ()
            for _ in 1 .. 20 do step ()
            Expect.isLessThanOrEqual (liveTensors () - before) 0L "no tensor leaks per step")
        test "best span: the highest start + end with start <= end < start + maxLength, inside the allowed positions" {
            let logits (xs: float32[]) = torch.tensor(xs).unsqueeze 0L
            let all = torch.ones([| 1L; 4L |], dtype = torch.ScalarType.Bool)
            let s, e = logits [| 0.0f; 5.0f; 1.0f; 0.0f |], logits [| 0.0f; 1.0f; 0.0f; 6.0f |]
            Expect.equal (bestSpans 2 s e all) [| 2, 3 |] "(1,3) = 11 is 3 long; (2,3) = 7 beats (1,1) = 6"
            Expect.equal (bestSpans 3 s e all) [| 1, 3 |] "3 tokens allowed"
            let reversed = bestSpans 4 (logits [| 0.0f; 0.0f; 9.0f; 0.0f |]) (logits [| 8.0f; 0.0f; 1.0f; 0.0f |]) all
            Expect.equal reversed [| 2, 2 |] "(2,0) = 17 would end before it starts; (2,2) = 10"
            let context = torch.tensor([| true; true; false; false |]).unsqueeze 0L
            Expect.equal (bestSpans 3 s e context) [| 1, 1 |] "only the context"
            Expect.throwsT<ArgumentException> (fun () -> bestSpans 3 s e (torch.zeros([| 1L; 4L |], dtype = torch.ScalarType.Bool)) |> ignore) "nothing allowed"
            let masked = maskSpanLogits context s
            Expect.equal (scalar (masked[0L, 3L])) maskedLogit "masked logits"
        }
    ]
