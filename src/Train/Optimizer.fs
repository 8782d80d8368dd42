/// AdamW (Loshchilov & Hutter 2019) whose update keeps every Scalar it makes alive.
///
/// TorchSharp 0.107's `AdamW.step` turns its doubles into Scalars on the fly (`mul_(beta1)`,
/// `add_(grad, alpha: 1 - beta1)`, `addcdiv_(.., value: -step_size)`, ...), which a GC on another thread can
/// finalize while libtorch reads them (see `Tensors`, "scalar operands kept alive"). `SafeAdamW` derives from
/// TorchSharp's, so parameter groups, learning rates, the per-parameter state (step, exp_avg, exp_avg_sq) and
/// `save_state_dict` / `load_state_dict` (the checkpoint format) are TorchSharp's own; only `step` is
/// replaced, by the same update with its scalars held in `use` bindings. Its updates equal TorchSharp's.
namespace Moe.Train

open System
open TorchSharp
open TorchSharp.Modules

/// TorchSharp's AdamW with a scalar-safe `step` (decoupled weight decay, bias-corrected moments; no
/// AMSGrad, no maximize).
type SafeAdamW(groups: Modules.AdamW.ParamGroup seq, lr: float, beta1: float, beta2: float, eps: float, weightDecay: float) =
    inherit Modules.AdamW(groups, lr, beta1, beta2, eps, weightDecay, false, false)

    /// One group over `parameters` with `torch.optim.AdamW`'s defaults in TorchSharp 0.107 (betas 0.9 and
    /// 0.999, eps 1e-8, no weight decay): the scalar-safe stand-in for `torch.optim.AdamW(parameters, lr)`.
    new(parameters: Modules.Parameter seq, lr: float) =
        SafeAdamW([ Modules.AdamW.ParamGroup(parameters, lr, 0.9, 0.999, 1e-8, 0.0, false, false) ], lr, 0.9, 0.999, 1e-8, 0.0)

    /// One update of every parameter with a gradient:
    /// p <- p (1 - lr wd); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
    /// p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    override this.step(closure: Func<torch.Tensor>) : torch.Tensor =
        let loss =
            if isNull closure then null
            else
                use _ = torch.enable_grad ()
                closure.Invoke()
        use _ = torch.no_grad ()
        for group in this.ParamGroups do
            let g = group :?> Modules.AdamW.ParamGroup
            let o = g.Options
            let lr, b1, b2, eps, wd = g.LearningRate, o.beta1.Value, o.beta2.Value, o.eps.Value, o.weight_decay.Value
            for p in g.Parameters do
                let grad = p.grad
                if not (isNull grad) then
                    use _ = torch.NewDisposeScope()
                    let state = this._state[p.Handle] :?> Modules.AdamW.State
                    state.step <- state.step + 1L
                    let correction1 = 1.0 - Math.Pow(b1, float state.step)
                    let correction2 = 1.0 - Math.Pow(b2, float state.step)
                    use decay = (1.0 - lr * wd).ToScalar()
                    use beta1 = b1.ToScalar()
                    use oneMinusBeta1 = (1.0 - b1).ToScalar()
                    use beta2 = b2.ToScalar()
                    use oneMinusBeta2 = (1.0 - b2).ToScalar()
                    use rootCorrection2 = (Math.Sqrt correction2).ToScalar()
                    use epsilon = eps.ToScalar()
                    use one = (1L).ToScalar()
                    use stepSize = (-(lr / correction1)).ToScalar()
                    p.mul_ decay |> ignore
                    state.exp_avg.mul_(beta1).add_(grad, oneMinusBeta1) |> ignore
                    state.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, oneMinusBeta2) |> ignore
                    let denom = state.exp_avg_sq.sqrt().div_(rootCorrection2).add_(epsilon, one)
                    p.addcdiv_(state.exp_avg, denom, stepSize) |> ignore
        loss
