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
let supportedModelTypes = [ "bart"; "pegasus"; "t5"; "switch_transformers"; "moe_summarizer" ]

/// The model_type of the toolkit's own from-scratch summarizer exported in Hugging Face layout
/// (`Finetune.exportRun`).
let moeSummarizerType = "moe_summarizer"

/// The config.json field holding the exported summarizer's `Models.ModelConfig` (the toolkit's JSON of it).
let moeConfigField = "moe_config"

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

/// Parameters and persistent buffers by their module names, as `exportRun` writes and `HfCheckpoint.loadInto` reads them.
let private moduleState (m: torch.nn.Module) : (string * Tensor) list =
    [ for struct (n, p) in m.named_parameters () -> n, (p :> Tensor)
      for struct (n, b) in m.named_buffers (include_nonpersistent = false) -> n, b ]

/// The toolkit's EncoderDecoder from an exported folder: `moe_config` rebuilds it, the weights load by the
/// module's own names with nothing missing or left over. Labels are the target ids followed by EOS (-100
/// ignored); the decoder reads them shifted right behind the start token, as the run trained it.
let private ofMoeSummarizer (dir: string) : HfSeq2Seq =
    let path = Path.Combine(dir, "config.json")
    let r = HfConfig.ConfigReader.Open path
    let cfg =
        match r.Element moeConfigField with
        | None -> failwithf "%s: missing field \"%s\" (the toolkit's model config of a moe_summarizer export)" path moeConfigField
        | Some e ->
            match Json.parse (e.GetRawText()) |> Result.mapError List.singleton |> Result.bind Json.ofNode<ModelConfig> with
            | Ok c -> c
            | Error ps -> failwithf "%s: field \"%s\" is not a model config:\n  - %s" path moeConfigField (String.concat "\n  - " ps)
    let vocab = r.Int "vocab_size"
    if vocab <> cfg.VocabSize then failwithf "%s: vocab_size %d differs from %s.VocabSize %d" path vocab moeConfigField cfg.VocabSize
    let pad = r.Int "pad_token_id"
    let start = r.Int "decoder_start_token_id"
    r.Ignore [ "model_type"; "bos_token_id"; "eos_token_id"; "is_encoder_decoder" ]
    r.Finish()
    let model = new EncoderDecoder(cfg)
    try
        use weights = HfCheckpoint.openWeights dir
        HfCheckpoint.loadInto weights model HfCheckpoint.LoadOptions.Strict |> ignore
    with _ ->
        model.Dispose()
        reraise ()
    model.eval ()
    let loss (ids: Tensor) (mask: Tensor) (labels: Tensor) =
        use _ = torch.NewDisposeScope()
        let decoderInput = Bart.shiftTokensRight pad start labels                  // [N; T]
        let valid = Tensors.withInt64Scalar Bart.ignoreIndex (fun s -> labels.ne s) // [N; T]
        let out = model.Forward(ids, decoderInput, mask, valid)
        let v = out.Logits.shape[out.Logits.shape.Length - 1]
        let ce = torch.nn.functional.cross_entropy(out.Logits.reshape(-1L, v).to_type torch.float32, labels.reshape(-1L), ignore_index = Bart.ignoreIndex)
        for rep in out.Moe do moveReportOut rep.Report
        ce.MoveToOuterDisposeScope(), out.Moe
    { Folder = dir
      ModelType = moeSummarizerType
      Module = model
      Model = Seq2Seq.ofModel model
      PadTokenId = pad
      DecoderStartTokenId = start
      Loss = loss
      StateDict = fun () -> moduleState model }

/// Loads the encoder-decoder in `dir` (config.json and its weights) in evaluation mode, dispatching on
/// model_type; an unknown model_type is refused naming the file and the supported ones.
let load (dir: string) : HfSeq2Seq =
    if not (Directory.Exists dir) then failwithf "%s: checkpoint folder not found" dir
    match modelType dir with
    | "bart" -> Bart.fromFolder dir |> ofBart dir "bart"
    | "pegasus" -> Pegasus.fromFolder dir |> ofBart dir "pegasus"
    | "t5" -> T5.fromFolder dir |> ofT5 dir "t5"
    | "switch_transformers" -> Switch.fromFolder dir :> T5.T5Model |> ofT5 dir "switch_transformers"
    | t when t = moeSummarizerType -> ofMoeSummarizer dir
    | other ->
        failwithf "%s: model_type \"%s\" is not an encoder-decoder this toolkit loads (supported: %s)"
            (Path.Combine(dir, "config.json")) other (String.Join(", ", supportedModelTypes))
