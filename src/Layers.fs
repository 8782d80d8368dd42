/// Feed-forward experts, the sparse MoE layer and their shared result type.
/// Axes: T tokens, D model width, H expert hidden width, E experts, K picks per token.
module Moe.Layers

open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Config
open Moe.Routing

/// What an MoE sublayer reports besides its output: unweighted aux losses and routing statistics.
type MoeReport =
    { Aux: AuxLosses
      Stats: RoutingStats }

/// What a Transformer block's feed-forward sublayer returns: the output, plus a report when it is an MoE layer.
type FfnResult =
    { Output: Tensor
      Moe: MoeReport option }

/// Applies an activation to the first projection (SwiGLU needs the gate projection too, see `DenseFfn`).
let activate (act: Activation) (x: Tensor) : Tensor =
    match act with
    | ReLU -> functional.relu x
    | GELU -> functional.gelu x
    | SwiGLU -> functional.silu x

/// The dense position-wise FFN: W2 act(W1 x), or for SwiGLU W2 (silu(W1 x) * W3 x) (Shazeer 2020).
/// Input [.., D], output [.., D].
type DenseFfn(name: string, modelDim: int, hidden: int, act: Activation) as this =
    inherit Module<Tensor, FfnResult>(name)
    let w1 = Linear(int64 modelDim, int64 hidden, hasBias = false)
    let w2 = Linear(int64 hidden, int64 modelDim, hasBias = false)
    let w3 = if act = SwiGLU then Linear(int64 modelDim, int64 hidden, hasBias = false) else null
    do
        if modelDim < 1 || hidden < 1 then
            invalidArg "hidden" (sprintf "expected modelDim >= 1 and hidden >= 1, got %d and %d" modelDim hidden)
        this.RegisterComponents()

    member _.W1 = w1
    member _.W2 = w2
    /// The SwiGLU value projection; null for ReLU and GELU.
    member _.W3 = w3
    member _.Activation = act

    override _.forward(x: Tensor) : FfnResult =
        expect "x" (sprintf "[..; %d] floating point" modelDim) (fun t -> t.Dimensions >= 1L && t.shape[t.shape.Length - 1] = int64 modelDim && isFloating t) x
        use h = activate act (w1.forward x)
        let out =
            if isNull w3 then w2.forward h
            else
                use v = w3.forward x
                use g = h * v
                w2.forward g
        { Output = out; Moe = None }
