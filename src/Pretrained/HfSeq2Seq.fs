/// A pretrained encoder-decoder from a Hugging Face checkpoint folder, whatever its family: `config.json`'s
/// `model_type` picks the family (BART, Pegasus, T5, Switch Transformers), and the result is one record that
/// generation, summarization runs, fine-tuning and export use without knowing the family.
/// Axes: N rows, S source positions, T target positions.
module Moe.HfSeq2Seq

open System
open System.IO
open TorchSharp
open Moe.Models
open Moe.Seq2Seq

type Tensor = torch.Tensor

/// A loaded pretrained encoder-decoder.
type HfSeq2Seq =
    { /// The checkpoint folder it was read from.
      Folder: string
      /// config.json's model_type.
      ModelType: string
      /// The module: parameters, train/eval mode, device moves.
      Module: torch.nn.Module
      /// What generation calls.
      Model: ISeq2SeqModel
      PadTokenId: int
      DecoderStartTokenId: int
      /// transformers' forward with labels: inputIds [N; S] int64, attentionMask [N; S] bool, labels [N; T]
      /// int64 (-100 ignored) -> the loss it returns (cross-entropy plus the family's weighted router losses)
      /// and the MoE layers' reports.
      Loss: Tensor -> Tensor -> Tensor -> Tensor * LayerReport list
      /// Parameters and buffers under the names a transformers safetensors save writes.
      StateDict: unit -> (string * Tensor) list }
    interface IDisposable with
        member this.Dispose() = this.Module.Dispose()

/// The model_type values this module loads.
let supportedModelTypes = [ "bart"; "pegasus"; "t5"; "switch_transformers" ]

/// config.json's model_type in `dir`; errors name the file.
let modelType (dir: string) : string =
    let path = Path.Combine(dir, "config.json")
    let r = HfConfig.ConfigReader.Open path
    match r.StringOption "model_type" with
    | Some t -> t
    | None -> failwithf "%s: missing field \"model_type\" (expected one of %s)" path (String.Join(", ", supportedModelTypes))

let private ofBart (dir: string) (modelType: string) (model: Bart.BartForConditionalGeneration) : HfSeq2Seq =
    { Folder = dir
      ModelType = modelType
      Module = model
      Model = model
      PadTokenId = model.Config.PadTokenId
      DecoderStartTokenId = model.Config.DecoderStartTokenId
      Loss = fun ids mask labels -> let out = model.Forward(ids, mask, labels) in out.Logits.Dispose(); out.Loss, out.Moe
      StateDict = fun () -> model.StateDict() }

let private ofT5 (dir: string) (modelType: string) (model: T5.T5Model) : HfSeq2Seq =
    { Folder = dir
      ModelType = modelType
      Module = model
      Model = model
      PadTokenId = model.Config.PadTokenId
      DecoderStartTokenId = model.Config.DecoderStartTokenId
      Loss =
        fun ids mask labels ->
            let out = model.Forward(ids, mask, labels)
            out.Logits.Dispose()
            out.CrossEntropy.Dispose()
            out.RouterLoss |> Option.iter (fun t -> t.Dispose())
            out.Loss, out.Moe
      StateDict = fun () -> T5.stateDict model }

/// Loads the encoder-decoder in `dir` (config.json and its weights) in evaluation mode, dispatching on
/// model_type; an unknown model_type is refused naming the file and the supported ones.
let load (dir: string) : HfSeq2Seq =
    if not (Directory.Exists dir) then failwithf "%s: checkpoint folder not found" dir
    match modelType dir with
    | "bart" -> Bart.fromFolder dir |> ofBart dir "bart"
    | "pegasus" -> Pegasus.fromFolder dir |> ofBart dir "pegasus"
    | "t5" -> T5.fromFolder dir |> ofT5 dir "t5"
    | "switch_transformers" -> Switch.fromFolder dir :> T5.T5Model |> ofT5 dir "switch_transformers"
    | other ->
        failwithf "%s: model_type \"%s\" is not an encoder-decoder this toolkit loads (supported: %s)"
            (Path.Combine(dir, "config.json")) other (String.Join(", ", supportedModelTypes))
