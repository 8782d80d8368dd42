/// A pretrained decoder-only language model from a Hugging Face checkpoint folder, whatever its family:
/// `config.json`'s `model_type` picks the family (Llama, Qwen2, Mixtral, Qwen2-MoE, OLMoE), and the result is
/// one record that generation, fine-tuning, routing analysis and export use without knowing the family.
/// Axes: N rows, T positions.
module Moe.HfCausalLM

open System
open System.IO
open TorchSharp
open Moe.Models
open Moe.CausalLM

type Tensor = torch.Tensor

/// A loaded pretrained decoder-only LM.
type HfCausalLM =
    { /// The checkpoint folder it was read from.
      Folder: string
      /// config.json's model_type.
      ModelType: string
      /// The module: parameters, train/eval mode, device moves.
      Module: torch.nn.Module
      /// The Llama-style decoder stack (Llama, Qwen2 and the MoE families); None for GPT-2.
      Decoder: Llama.DecoderOnlyLM option
      /// config.json's longest sequence (max_position_embeddings; n_positions for GPT-2).
      MaxPositions: int
      /// What generation calls.
      Model: ICausalLM
      /// config.json's pad_token_id (None when the checkpoint has none).
      PadTokenId: int option
      /// config.json's eos_token_id (one or several).
      EosTokenIds: int list
      /// transformers' forward with labels: inputIds [N; T] int64, attentionMask [N; T] bool (null = all real),
      /// labels [N; T] int64 (-100 ignored, shifted inside) -> the loss it returns (cross-entropy, plus the
      /// weighted load-balancing loss where output_router_logits is set) and the MoE layers' reports.
      Loss: Tensor -> Tensor -> Tensor -> Tensor * LayerReport list
      /// Parameters under the names a transformers safetensors save writes.
      StateDict: unit -> (string * Tensor) list }
    interface IDisposable with
        member this.Dispose() = this.Module.Dispose()

/// The model_type values this module loads.
let supportedModelTypes = [ "llama"; "qwen2"; "mixtral"; "qwen2_moe"; "olmoe"; "gpt2" ]

/// Loads the decoder-only LM in `dir` (config.json and its weights) in evaluation mode, dispatching on
/// model_type; an unknown model_type is refused naming the file and the supported ones.
let load (dir: string) : HfCausalLM =
    if not (Directory.Exists dir) then failwithf "%s: checkpoint folder not found" dir
    let path = Path.Combine(dir, "config.json")
    let modelType =
        match (HfConfig.ConfigReader.Open path).StringOption "model_type" with
        | Some t -> t
        | None -> failwithf "%s: missing field \"model_type\" (expected one of %s)" path (String.Join(", ", supportedModelTypes))
    let decoder (model: Llama.DecoderOnlyLM) =
        { Folder = dir
          ModelType = modelType
          Module = model
          Decoder = Some model
          MaxPositions = model.Config.MaxPositions
          Model = model
          PadTokenId = model.Config.PadTokenId
          EosTokenIds = model.Config.EosTokenIds
          Loss = fun ids mask labels -> model.Loss(ids, mask, labels)
          StateDict = fun () -> Llama.stateDict model }
    match modelType with
    | "llama" -> decoder (Llama.llamaFromFolder dir)
    | "qwen2" -> decoder (Llama.qwen2FromFolder dir)
    | "mixtral" -> decoder (MoeLMs.mixtralFromFolder dir)
    | "qwen2_moe" -> decoder (MoeLMs.qwen2MoeFromFolder dir)
    | "olmoe" -> decoder (MoeLMs.olmoeFromFolder dir)
    | "gpt2" ->
        let model = Gpt2Causal.fromFolder dir
        { Folder = dir
          ModelType = modelType
          Module = model
          Decoder = None
          MaxPositions = model.Config.Sizes.Positions
          Model = model
          PadTokenId = model.Config.PadTokenId
          EosTokenIds = model.Config.EosTokenIds
          Loss = fun ids mask labels -> model.Loss(ids, mask, labels)
          StateDict = fun () -> model.StateDict() }
    | other ->
        failwithf "%s: model_type \"%s\" is not a decoder-only LM this toolkit loads (supported: %s)"
            path other (String.Join(", ", supportedModelTypes))
