/// Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense
/// Checkpoints", sec. 2): an MoE model initialised from a trained dense one. Every parameter outside the
/// feed-forward sublayers (embeddings, attention, norms, output projection) is copied; each MoE layer's
/// experts all start as copies of that layer's dense FFN; the routers start fresh, as the MoE config
/// initialises them. Layers that stay dense (`MoeEvery` > 1) copy their FFN unchanged.
/// Axes: E experts, D model width, H FFN hidden width.
module Moe.Upcycle

open System.Collections.Generic
open System.Runtime.InteropServices
open TorchSharp
open Moe.Config
open Moe.Layers
open Moe.Models

/// Every reason the dense config `dense` cannot be upcycled into `target`, empty when it can: `dense` has
/// dense FFNs, `target` has MoE layers (full experts, no shared experts) whose experts have the dense FFN's
/// hidden width and activation, and every setting that shapes a non-FFN parameter is the same.
let problems (dense: ModelConfig) (target: ModelConfig) : string list =
    [ yield! ModelConfig.validate target |> List.map (fun p -> "target: " + p)
      let same (name: string) (a: 'a) (b: 'a) =
          if a <> b then Some(sprintf "%s differs: dense %A, target %A" name a b) else None
      yield!
          [ same "VocabSize" dense.VocabSize target.VocabSize
            same "ModelDim (model width)" dense.ModelDim target.ModelDim
            same "Heads" dense.Heads target.Heads
            same "KvHeads" dense.KvHeads target.KvHeads
            same "EncoderLayers" dense.EncoderLayers target.EncoderLayers
            same "DecoderLayers" dense.DecoderLayers target.DecoderLayers
            same "MaxLength" dense.MaxLength target.MaxLength
            same "Positional" dense.Positional target.Positional
            same "TiedEmbeddings" dense.TiedEmbeddings target.TiedEmbeddings ]
          |> List.choose id
      match dense.Ffn, target.Ffn with
      | Dense hidden, Moe moe ->
          if moe.ExpertHidden <> hidden then
              sprintf "expert hidden width (Moe.ExpertHidden = %d) must equal the dense FFN's hidden width (%d)" moe.ExpertHidden hidden
          if moe.Activation <> dense.Activation then
              sprintf "expert activation (%A) must equal the dense FFN's activation (%A)" moe.Activation dense.Activation
          if moe.ModelDim <> dense.ModelDim then
              sprintf "Moe.ModelDim (%d) must equal the dense model width (%d)" moe.ModelDim dense.ModelDim
          if moe.SharedExperts <> 0 then
              sprintf "SharedExperts must be 0 (a dense FFN has no shared-expert counterpart), got %d" moe.SharedExperts
      | Dense _, other -> sprintf "expected a target with MoE feed-forward layers (Ffn = Moe), got %A" other
      | other, _ -> sprintf "expected a dense model to upcycle (Ffn = Dense), got %A" other ]

/// The dense config with MoE layers `moe` every `every`-th layer (1 = all): the config `upcycle` builds.
let config (moe: MoeConfig) (every: int) (dense: ModelConfig) : ModelConfig =
    { dense with Ffn = Moe moe; MoeEvery = every }

/// The dense FFN of a dense model's block, or a failure naming the block.
let private denseFfnOf (what: string) (m: torch.nn.Module) : DenseFfn =
    match m with
    | :? DenseFfn as f -> f
    | other -> invalidArg what (sprintf "expected a dense FFN in %s, got %s" what (other.GetType().Name))

/// Copies `source` into `target` (same shape) without recording gradients.
let private copyTensor (what: string) (source: torch.Tensor) (target: torch.Tensor) : unit =
    if source.shape <> target.shape then
        invalidArg what (sprintf "expected %s of shape %A in both models, got dense %A and target %A" what target.shape source.shape target.shape)
    target.copy_(source) |> ignore

/// Copies one block's FFN: an MoE layer's E experts each get the dense weights (nn.Linear stores W [out; in],
/// experts stack W1 [E; D; H], W2 [E; H; D], so each is transposed), a dense FFN is copied as is.
let private copyFfn (name: string) (dense: DenseFfn) (target: torch.nn.Module) : unit =
    let linearPairs (t: DenseFfn) = [ "w1", dense.W1, t.W1; "w2", dense.W2, t.W2; "w3", dense.W3, t.W3 ]
    match target with
    | :? MoeLayer as moe ->
        let experts = moe.Experts
        let e = int64 experts.Experts
        let stacked (what: string) (linear: Modules.Linear) (w: torch.Tensor) =
            if isNull linear <> isNull w then invalidArg name (sprintf "%s.%s exists in only one of the dense FFN and the experts" name what)
            if not (isNull w) then
                let t = linear.weight.t()                                           // [in; out] = [D; H] or [H; D]
                copyTensor (sprintf "%s.experts.%s" name what) (t.unsqueeze(0L).expand(e, t.shape[0], t.shape[1])) w
        stacked "w1" dense.W1 experts.W1                                             // [E; D; H]
        stacked "w2" dense.W2 experts.W2                                             // [E; H; D]
        stacked "w3" dense.W3 experts.W3                                             // [E; D; H]
    | :? DenseFfn as f ->
        for what, s, t in linearPairs f do
            if isNull s <> isNull t then invalidArg name (sprintf "%s.%s exists in only one model" name what)
            if not (isNull s) then copyTensor (sprintf "%s.%s" name what) s.weight t.weight
    | other -> invalidArg name (sprintf "expected an MoE layer or a dense FFN in %s, got %s" name (other.GetType().Name))

/// Copies a trained dense model into `target`, an MoE model of the same shape (`problems` lists what must
/// match): non-FFN parameters and buffers by name, each MoE layer's experts from that layer's dense FFN,
/// dense layers unchanged; the routers keep `target`'s own initialisation. Raises naming every mismatch.
let copyInto (dense: EncoderDecoder) (target: EncoderDecoder) : unit =
    orFail "upcycling" (problems dense.Config target.Config) () |> ignore
    use _ = torch.no_grad ()
    let blocks (m: EncoderDecoder) =
        Array.append (m.EncoderBlocks |> Seq.mapi (fun i b -> sprintf "enc.%d" i, b) |> Seq.toArray)
                     (m.DecoderBlocks |> Seq.mapi (fun i b -> sprintf "dec.%d" i, b) |> Seq.toArray)
    let ffnHandles =
        HashSet(blocks target |> Seq.collect (fun (_, b) -> Seq.append (b.Ffn.parameters () |> Seq.map (fun p -> p :> torch.Tensor)) (b.Ffn.buffers ())) |> Seq.map (fun t -> t.Handle))
    let denseTensors =
        Seq.append (dense.named_parameters () |> Seq.map (fun struct (n, p) -> n, (p :> torch.Tensor))) (dense.named_buffers () |> Seq.map (fun struct (n, b) -> n, b))
        |> dict
    let targetTensors =
        Seq.append (target.named_parameters () |> Seq.map (fun struct (n, p) -> n, (p :> torch.Tensor))) (target.named_buffers () |> Seq.map (fun struct (n, b) -> n, b))
    for name, t in targetTensors do
        if not (ffnHandles.Contains t.Handle) then
            match denseTensors.TryGetValue name with
            | true, s -> copyTensor name s t
            | false, _ -> invalidArg "dense" (sprintf "expected the dense model to have %s (a non-FFN tensor of the target), but it does not" name)
    for (name, d: Block), (_, t: Block) in Array.zip (blocks dense) (blocks target) do
        copyFfn name (denseFfnOf name d.Ffn) t.Ffn

/// A new MoE model from a trained dense one (Komatsuzaki et al. 2023): `config moe every dense.Config`,
/// its experts copies of the dense FFNs, everything else copied, routers fresh. Raises, naming every
/// mismatch, when the MoE config does not fit the dense model. The result is in training mode, on the CPU.
let upcycle (moe: MoeConfig) (every: int) (dense: EncoderDecoder) : EncoderDecoder =
    let cfg = config moe every dense.Config
    orFail "upcycling" (problems dense.Config cfg) () |> ignore
    let target = new EncoderDecoder(cfg)
    copyInto dense target
    target

/// Sparse upcycling from C#.
[<AbstractClass; Sealed>]
type UpcycleApi =
    /// A new MoE model whose every `every`-th FFN (1 = all) is an MoE layer of `moe`, initialised from `dense`.
    static member Upcycle(dense: EncoderDecoder, moe: MoeConfig, [<Optional; DefaultParameterValue(1)>] every: int) : EncoderDecoder =
        upcycle moe every dense

    /// Copies `dense` into an existing MoE model of the same shape (routers keep their initialisation).
    static member CopyInto(dense: EncoderDecoder, target: EncoderDecoder) : unit = copyInto dense target

    /// Why `dense` cannot be upcycled into `target` (empty when it can).
    static member Problems(dense: ModelConfig, target: ModelConfig) : string[] = problems dense target |> Array.ofList
