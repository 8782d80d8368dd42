/// Reference MoE layers for benchmarks and tests ONLY: the per-expert mask loop (`naiveDispatch`) in the style
/// of the best-known model libraries (a boolean mask over all tokens per expert, index_select, the expert FFN,
/// index_add), and the dense all-experts mixture, kept so the shipped layer can be checked against them and
/// timed beside them. Models use `Layers.MoeLayer`.
///
/// Axes: T tokens, D model width, H expert hidden width, E experts, K picks per token.
module Moe.Bench.Reference

open System
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers

// ---------------------------------------------------------------- reference layers (benchmarks and tests only)

/// One expert FFN's weights in the x W layout: y = act(x W1) W2, or (silu(x W1) * x W3) W2 for SwiGLU.
type ExpertWeights =
    { /// [D; H]
      W1: Tensor
      /// [H; D]
      W2: Tensor
      /// [D; H], SwiGLU only.
      W3: Tensor option }

/// One expert FFN on the rows of x: [N; D] -> [N; D]. The same function as `Layers.DenseFfn`.
let expertForward (act: Activation) (w: ExpertWeights) (x: Tensor) : Tensor =
    let h = activate act (x.matmul w.W1) // [N; H]
    let h = match w.W3 with Some w3 -> h * x.matmul w3 | None -> h // [N; H]
    h.matmul w.W2 // [N; D]

/// REFERENCE ONLY. The per-expert mask loop of the best-known model libraries (e.g. the Mixtral sparse
/// block): for each expert, a boolean mask over every (token, slot), the token indices it selects,
/// index_select of those rows, the expert FFN, a multiply by the routing weight and index_add into the
/// output. Every expert scans all T * K slots, and each expert's small matmuls run one after another.
/// Slots with Kept = false are skipped. routing [T; K], x [T; D] -> [T; D].
let naiveDispatch (act: Activation) (experts: ExpertWeights[]) (routing: Routing) (x: Tensor) : Tensor =
    expectFloat "x" "[T; D]" 2 x
    use scope = torch.NewDisposeScope()
    let out = torch.zeros_like x // [T; D]
    for e in 0 .. experts.Length - 1 do
        let mask = routing.Experts.eq(torch.tensor (int64 e, device = x.device)).logical_and routing.Kept // [T; K] bool
        let hits = mask.nonzero () // [N; 2]: token, slot
        if hits.shape[0] > 0L then
            let tokens = hits.select (1L, 0L) // [N]
            let slots = hits.select (1L, 1L) // [N]
            let rows = x.index_select (0L, tokens) // [N; D]
            let weight = routing.Weights.index([| tokens; slots |]).to_type x.dtype // [N]
            let y = expertForward act experts[e] rows * weight.unsqueeze 1L // [N; D]
            withScalar 1.0 (fun one -> out.index_add_ (0L, tokens, y, one)) |> ignore
    out.MoveToOuterDisposeScope()

/// The dense all-experts mixture y = sum_e p_e(x) FFN_e(x), with p the router's normaliser over all E (soft
/// mixing, no top-k), computed as two wide matmuls over the experts laid side by side: h = act(x W1cat),
/// each expert's block of h scaled by its weight, then h W2cat. Weighting the hidden block before W2 equals
/// weighting the expert's output, since W2 is linear.
/// w1cat [D; E*H], w2cat [E*H; D], w3cat [D; E*H] (SwiGLU), probs [T; E], x [T; D] -> [T; D].
let allExpertsForward (act: Activation) (w1cat: Tensor) (w2cat: Tensor) (w3cat: Tensor option) (probs: Tensor) (x: Tensor) : Tensor =
    expectFloat "x" "[T; D]" 2 x
    expectFloat "probs" "[T; E]" 2 probs
    use scope = torch.NewDisposeScope()
    let t, e = x.shape[0], probs.shape[1]
    let h = activate act (x.matmul w1cat) // [T; E*H]
    let h = match w3cat with Some w3 -> h * x.matmul w3 | None -> h // [T; E*H]
    let mixed = (h.view (t, e, -1L) * probs.to_type(x.dtype).unsqueeze 2L).view (t, -1L) // [T; E*H]
    mixed.matmul(w2cat).MoveToOuterDisposeScope()

/// Leaf copies of one expert's weights (detached, requiring grad), so a reference layer has its own
/// parameters as a module-per-expert library would.
let internal leafCopy (t: Tensor) : Tensor = t.detach().clone().requires_grad_ true

/// Per-expert leaf copies of stacked expert weights. w1 [E; D; H], w2 [E; H; D], w3 [E; D; H] (SwiGLU).
let splitExperts (w1: Tensor) (w2: Tensor) (w3: Tensor option) : ExpertWeights[] =
    expectFloat "w1" "[E; D; H]" 3 w1
    expectFloat "w2" "[E; H; D]" 3 w2
    Array.init (int w1.shape[0]) (fun e ->
        { W1 = leafCopy w1[int64 e]
          W2 = leafCopy w2[int64 e]
          W3 = w3 |> Option.map (fun w -> leafCopy w[int64 e]) })

/// The experts laid side by side as leaf tensors for `allExpertsForward`:
/// w1 [E; D; H] -> [D; E*H], w2 [E; H; D] -> [E*H; D], w3 like w1.
let concatExperts (w1: Tensor) (w2: Tensor) (w3: Tensor option) : Tensor * Tensor * Tensor option =
    expectFloat "w1" "[E; D; H]" 3 w1
    expectFloat "w2" "[E; H; D]" 3 w2
    let side (w: Tensor) = leafCopy (w.detach().permute(1L, 0L, 2L).reshape (w.shape[1], -1L)) // [D; E*H]
    side w1, leafCopy (w2.detach().reshape (-1L, w2.shape[2])), w3 |> Option.map side
