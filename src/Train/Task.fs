/// What a task gives the trainer (its batches and its loss for one batch) and the loss arithmetic: the
/// cross-entropy of a task and the total loss with the MoE balancing losses weighted once, here.
///
/// Axes: B batch, S sequence, V vocabulary, N counted target tokens.
namespace Moe.Train

open System
open System.Collections.Generic
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Models

/// Training or evaluation, passed to the task's loss so it can switch label smoothing and the like.
type Phase =
    | Training
    | Evaluation

/// What the task's loss returns for one batch.
type LossParts =
    { /// Mean task loss over the counted tokens (scalar; carries the graph in training).
      TaskLoss: Tensor
      /// One report per MoE layer in layer order, named as the model names them (`Models.LayerReport`,
      /// e.g. "enc.1"); empty for a dense model.
      Moe: LayerReport list
      /// Target tokens the task loss averages over: weights validation means and tokens/s.
      Tokens: int64 }

    /// For C#: the parts from a task loss, MoE reports (null for none) and the token count.
    static member Create(taskLoss: Tensor, moe: IEnumerable<LayerReport>, tokens: int64) : LossParts =
        { TaskLoss = taskLoss; Moe = (if isNull moe then [] else List.ofSeq moe); Tokens = tokens }

/// A cross-entropy and the number of tokens it averages over.
type TokenLoss = { Loss: Tensor; Tokens: int64 }

/// What a task gives the trainer. Batches are best cheap descriptions (example indices); tensors are made
/// inside `Loss`, which runs in the step's dispose scope, so skipping batches on resume costs nothing.
type TrainTask<'batch> =
    { /// The model being trained (moved to the config's device by the trainer).
      Model: torch.nn.Module
      /// The training batches of one epoch: `TrainBatches seed epoch`. Their order must depend only on
      /// (seed, epoch), so a resumed run replays the same order from where it stopped.
      TrainBatches: int -> int -> seq<'batch>
      /// Validation batches, the same every time.
      ValidBatches: unit -> seq<'batch>
      /// The batch's task loss, MoE reports and token count.
      Loss: Phase -> 'batch -> LossParts
      /// Named configuration sections written beside "Train" (the TrainConfig) in config.json and in every checkpoint
      /// (e.g. ["model", box modelCfg; "data", box dataCfg]).
      Config: (string * obj) list
      /// Opaque tokenizer mapping saved in checkpoints so they are self-contained ("" when none).
      Tokenizer: string }

    /// A task from .NET delegates (for C#).
    static member Create
        (model: torch.nn.Module, trainBatches: Func<int, int, IEnumerable<'batch>>, validBatches: Func<IEnumerable<'batch>>,
         loss: Func<Phase, 'batch, LossParts>, config: IDictionary<string, obj>, tokenizer: string) : TrainTask<'batch> =
        { Model = model
          TrainBatches = fun seed epoch -> trainBatches.Invoke(seed, epoch)
          ValidBatches = fun () -> validBatches.Invoke()
          Loss = fun phase batch -> loss.Invoke(phase, batch)
          Config = if isNull config then [] else [ for kv in config -> kv.Key, kv.Value ]
          Tokenizer = if isNull tokenizer then "" else tokenizer }

/// The task and total losses, opened with `Moe.Train`.
[<AutoOpen>]
module Losses =
    /// Mean cross-entropy of `logits` [..; V] against `targets` [..] int64 over positions whose target is not
    /// `ignoreIndex` (padding), with label smoothing eps: the target distribution is (1 - eps) onehot + eps / V
    /// (Szegedy et al. 2016, sec. 7). Computed in float32. Zero (with a graph) when every position is ignored.
    let crossEntropy (labelSmoothing: float) (ignoreIndex: int64) (logits: Tensor) (targets: Tensor) : TokenLoss =
        if isNull logits || logits.Dimensions < 2L || not (isFloating logits) then
            invalidArg "logits" (sprintf "expected logits [..; V] floating point, got %s" (if isNull logits then "null" else describe logits))
        let lead = logits.shape[.. logits.shape.Length - 2]
        expect "targets" (sprintf "[%s] int64 (logits' leading shape)" (lead |> Array.map string |> String.concat "; "))
            (fun t -> t.dtype = torch.int64 && t.shape = lead) targets
        use scope = torch.NewDisposeScope()
        let v = logits.shape[logits.shape.Length - 1]
        let flat = logits.reshape(-1L, v).to_type torch.float32 // [N'; V]
        let tgt = targets.reshape(-1L) // [N']
        let counted = tgt.ne(torch.tensor(ignoreIndex, device = tgt.device)).sum().item<int64> ()
        let summed =
            torch.nn.functional.cross_entropy(flat, tgt, ignore_index = ignoreIndex,
                                              reduction = torch.nn.Reduction.Sum, label_smoothing = labelSmoothing)
        let mean = divScalar (float (max counted 1L)) summed
        { Loss = mean.MoveToOuterDisposeScope(); Tokens = counted }

    /// The loss that is differentiated:
    /// L = L_task + sum over MoE layers of (w_switch switch_aux + w_importance importance + w_load load + w_z z_loss),
    /// each aux loss unweighted as the layer returned it (Switch eq. 4, Shazeer et al. 2017 eq. 6 and 10, ST-MoE eq. 5).
    /// A term whose weight is 0 is left out of the graph entirely.
    let totalLoss (weights: LossWeights) (parts: LossParts) : Tensor =
        expect "TaskLoss" "scalar floating point" (fun t -> t.Dimensions = 0L && isFloating t) parts.TaskLoss
        let terms =
            [ for r in parts.Moe do
                for w, t in [ weights.SwitchAux, r.Report.Aux.SwitchAux; weights.Importance, r.Report.Aux.Importance
                              weights.Load, r.Report.Aux.Load; weights.ZLoss, r.Report.Aux.ZLoss ] do
                    if w <> 0.0 then mulScalar w t ]
        match terms with
        | [] -> parts.TaskLoss.alias ()
        | ts ->
            use scope = torch.NewDisposeScope()
            let total = ts |> List.fold (fun (acc: Tensor) t -> plus acc (castTo acc.dtype t)) parts.TaskLoss
            total.MoveToOuterDisposeScope()
