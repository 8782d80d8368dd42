/// Training SummaC-Conv's convolution (`Metrics.SummaCConv.ConvModel`) on a labelled consistency set with the
/// toolkit's training loop (`Train.runWith`), as summac's `train_summac.py` does: NLI images are computed once,
/// turned into histograms, and the convolution is fitted with cross-entropy against the labels (1 consistent,
/// 0 inconsistent), Adam at 0.1 in batches of 32 for 5 epochs by default. The weights are written to the run folder
/// as `summac_conv.safetensors` (with their settings; `SummaCConv.load` reads them).
///
/// Legend: N examples, B batch, R histogram rows, F histogram width.
module Moe.ConsistencyTraining

open System
open System.IO
open System.Text.Json
open TorchSharp
open Moe
open Moe.Metrics
open Moe.Train

/// One labelled example of a consistency set.
type LabelledPair = { Document: string; Summary: string; Label: int }

/// Reads a JSON Lines consistency set: one object per line with "document", "summary" (strings) and "label"
/// (1 consistent, 0 inconsistent, as summac's benchmark files); blank lines are skipped. Bad lines raise
/// `TextTools.DataException` naming the file and line.
let readJsonl (path: string) : LabelledPair[] =
    if not (File.Exists path) then invalidArg "path" (sprintf "consistency set %s does not exist" path)
    [| for i, line in File.ReadAllLines path |> Array.indexed do
         if not (String.IsNullOrWhiteSpace line) then
             let fail (what: string) = raise (TextTools.DataException(sprintf "%s:%d: %s" path (i + 1) what, path, Some(int64 (i + 1))))
             let root =
                 try JsonDocument.Parse(line).RootElement
                 with :? JsonException as e -> fail (sprintf "expected a JSON object, got invalid JSON (%s)" e.Message)
             if root.ValueKind <> JsonValueKind.Object then fail "expected a JSON object with document, summary and label"
             let text (name: string) =
                 match root.TryGetProperty name with
                 | true, v when v.ValueKind = JsonValueKind.String -> v.GetString()
                 | _ -> fail (sprintf "expected a string field \"%s\"" name)
             let label =
                 match root.TryGetProperty "label" with
                 | true, v when v.ValueKind = JsonValueKind.Number && (v.GetDouble() = 0.0 || v.GetDouble() = 1.0) -> int (v.GetDouble())
                 | _ -> fail "expected a field \"label\" that is 0 (inconsistent) or 1 (consistent)"
             yield { Document = text "document"; Summary = text "summary"; Label = label } |]

/// What is trained and how.
type ConvTraining =
    { Conv: SummaCConv.ConvConfig
      /// Passes over the training set (summac `num_epochs`, 5); sets the loop's Steps.
      Epochs: int
      /// The loop's settings; Steps is replaced by Epochs x batches per epoch.
      Train: TrainConfig }

/// summac's `train_summac.py` defaults on the toolkit's loop: Adam (AdamW without weight decay) at a constant 0.1,
/// batches of 32, 5 epochs, no warmup or clipping, on the CPU, even-50 bins (its default), entailment only.
let defaults =
    { Conv = { SummaCConv.defaults with Bins = SummaCConv.Even 50 }
      Epochs = 5
      Train =
        { TrainConfig.defaults with
            BatchSize = 32; LearningRate = 0.1; Beta2 = 0.999; WeightDecay = 0.0; WarmupSteps = 0; Schedule = Constant
            GradClip = 0.0; EvalEvery = 0; CheckpointEvery = 0; LogEvery = 1; Device = Native.Cpu } }

/// The weights file written in the run folder.
let weightsName = "summac_conv.safetensors"

/// Fits a convolution to precomputed NLI images and their labels (1 consistent, 0 inconsistent); the last batch
/// of an epoch may be smaller. Validation (for the loop's log) is the training set. Returns the trained model
/// (eval mode) and the loop's result; the weights are saved to `runDir/summac_conv.safetensors`.
let trainOnImages (settings: ConvTraining) (opts: RunOptions) (images: Consistency.Image[]) (labels: int[]) (runDir: string) : SummaCConv.ConvModel * TrainResult =
    if images.Length = 0 then invalidArg "images" "expected at least one labelled example, got none"
    if labels.Length <> images.Length then invalidArg "labels" (sprintf "expected one label per image, got %d images and %d labels" images.Length labels.Length)
    match labels |> Array.tryFind (fun l -> l <> 0 && l <> 1) with
    | Some l -> invalidArg "labels" (sprintf "expected labels 0 (inconsistent) or 1 (consistent), got %d" l)
    | None -> ()
    if settings.Epochs < 1 then invalidArg "settings" (sprintf "Epochs must be >= 1, got %d" settings.Epochs)
    let n = images.Length
    let b = settings.Train.BatchSize
    let perEpoch = (n + b - 1) / b
    let cfg = { settings.Train with Steps = settings.Epochs * perEpoch }
    let model = new SummaCConv.ConvModel(settings.Conv)
    let hist, mask = SummaCConv.batch settings.Conv images                                  // [N; R; F], [N; R]
    let targets = torch.tensor(labels |> Array.map int64)                                    // [N]
    let batchesOf (order: int[]) = order |> Array.chunkBySize b |> Seq.ofArray
    let task =
        { Model = model
          TrainBatches = fun seed epoch ->
            let rng = Random(HashCode.Combine(seed, epoch))
            let order = Array.init n id
            rng.Shuffle order
            batchesOf order
          ValidBatches = fun () -> batchesOf (Array.init n id)
          Loss = fun _ (idx: int[]) ->
            let at = torch.tensor(idx |> Array.map int64)                                    // [B]
            let logits = model.forward(hist.index_select(0L, at), mask.index_select(0L, at)) // [B; 2]
            let loss = crossEntropy 0.0 -100L logits (targets.index_select(0L, at))
            { TaskLoss = loss.Loss; Moe = []; Tokens = int64 idx.Length }
          Config =
            [ "summac_conv",
              box {| bins = (match settings.Conv.Bins with SummaCConv.Percentile -> "percentile" | SummaCConv.Even k -> sprintf "even%d" k)
                     labels = settings.Conv.Labels; rows = settings.Conv.Rows; epochs = settings.Epochs; examples = n |} ]
          Tokenizer = "" }
    let result = runWith opts cfg task runDir
    model.eval () |> ignore
    SummaCConv.save (Path.Combine(runDir, weightsName)) model
    model, result

/// Computes the NLI images of a labelled set with `scorer` at `zs`'s granularity, then `trainOnImages`.
let train (settings: ConvTraining) (opts: RunOptions) (zs: Consistency.SummaCConfig) (scorer: Consistency.IEntailmentScorer)
          (data: LabelledPair[]) (runDir: string) : SummaCConv.ConvModel * TrainResult =
    let images = Consistency.images zs scorer (data |> Array.map _.Document) (data |> Array.map _.Summary)
    trainOnImages settings opts images (data |> Array.map _.Label) runDir
