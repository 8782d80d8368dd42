/// The checkpoint-loading benchmark (`moe bench load`): a BART-shaped `model.safetensors` with random weights,
/// written by the benchmark itself one tensor at a time under the real checkpoint's tensor names and shapes,
/// is loaded by `HfCheckpoint.loadInto` into freshly allocated parameters of those shapes; it reports the
/// file's size, the load time, and the process's peak resident memory during the load against the file
/// size (the issue's bound: at most 1.5x). Axes: none.
module Moe.Bench.CheckpointLoad

open System
open System.Diagnostics
open System.IO
open System.Text.Json.Nodes
open TorchSharp
open Moe
open Moe.Tensors
open Moe.HfCheckpoint
open Moe.Bench.Measure

/// The sizes of a BartForConditionalGeneration checkpoint.
type BartShape =
    { Name: string
      DModel: int64
      EncoderLayers: int
      DecoderLayers: int
      FfnDim: int64
      VocabSize: int64
      /// Rows of each learned position table: max_position_embeddings + BART's offset of 2.
      PositionRows: int64 }

module BartShape =
    /// facebook/bart-large (and bart-large-xsum/-cnn): d_model 1024, 12 + 12 layers, ffn 4096, vocabulary
    /// 50265, max_position_embeddings 1024 (+2 offset rows); 406M parameters.
    let bartLarge =
        { Name = "bart-large"; DModel = 1024L; EncoderLayers = 12; DecoderLayers = 12; FfnDim = 4096L; VocabSize = 50265L; PositionRows = 1026L }
    /// The same layout at toy sizes, for tests.
    let tiny =
        { Name = "tiny"; DModel = 16L; EncoderLayers = 1; DecoderLayers = 1; FfnDim = 32L; VocabSize = 100L; PositionRows = 34L }
    let all = [ bartLarge; tiny ]

    let parse (name: string) : Result<BartShape, string> =
        match all |> List.tryFind (fun s -> s.Name = name) with
        | Some s -> Ok s
        | None -> Error(sprintf "expected a shape among %s, got '%s'" (all |> List.map (fun s -> s.Name) |> String.concat ", ") name)

/// The tensors of a BART checkpoint's `model.safetensors` as `transformers` saves it: the tied embeddings
/// (encoder/decoder `embed_tokens`, `lm_head`) stored once as `model.shared.weight`.
let bartTensors (s: BartShape) : (string * int64[]) list =
    let d = s.DModel
    let linear (prefix: string) (outDim: int64) (inDim: int64) = [ prefix + ".weight", [| outDim; inDim |]; prefix + ".bias", [| outDim |] ]
    let norm (prefix: string) = [ prefix + ".weight", [| d |]; prefix + ".bias", [| d |] ]
    let attention (prefix: string) = [ for p in [ "k_proj"; "v_proj"; "q_proj"; "out_proj" ] do yield! linear (prefix + "." + p) d d ]
    let layer (stack: string) (i: int) =
        let p = sprintf "model.%s.layers.%d" stack i
        [ yield! attention (p + ".self_attn")
          yield! norm (p + ".self_attn_layer_norm")
          if stack = "decoder" then
              yield! attention (p + ".encoder_attn")
              yield! norm (p + ".encoder_attn_layer_norm")
          yield! linear (p + ".fc1") s.FfnDim d
          yield! linear (p + ".fc2") d s.FfnDim
          yield! norm (p + ".final_layer_norm") ]
    let stack (name: string) (layers: int) =
        [ yield sprintf "model.%s.embed_positions.weight" name, [| s.PositionRows; d |]
          for i in 0 .. layers - 1 do yield! layer name i
          yield! norm (sprintf "model.%s.layernorm_embedding" name) ]
    [ yield "final_logits_bias", [| 1L; s.VocabSize |]
      yield "model.shared.weight", [| s.VocabSize; d |]
      yield! stack "encoder" s.EncoderLayers
      yield! stack "decoder" s.DecoderLayers ]

/// What one run measured.
type LoadBenchReport =
    { Shape: string
      Tensors: int
      Parameters: int64
      FileMb: float
      WriteS: float
      LoadS: float
      /// Resident memory just before the load (the runtime, libtorch, the untouched parameters), MiB.
      RssBeforeMb: float option
      /// The process's peak resident memory during the load (VmHWM after resetting it), MiB.
      PeakRssMb: float option
      /// Whether resetting the peak was seen to work: the high-water mark of a 256 MiB tensor freed before
      /// the reset is gone after it.
      PeakResetWorks: bool option
      /// Every tensor checked equal to the values written (regenerated from its seed).
      Verified: bool }

/// The issue's bound on peak resident memory during a load, as a multiple of the checkpoint file's size.
let maxPeakOverFile = 1.5

/// Random values for tensor `i` of the plan, reproducible from (seed, i): normal, scaled to 0.02 as BART's
/// initialisation (init_std), so the file holds weights of a plausible size.
let private values (seed: int) (i: int) (shape: int64[]) : torch.Tensor =
    use g = new torch.Generator(uint64 (seed * 100003 + i), torch.CPU)
    use x = torch.randn (shape, generator = g)
    mulScalar 0.02 x

/// Whether writing "5" to /proc/self/clear_refs resets VmHWM here: a 256 MiB tensor is filled and freed
/// (with the heap trimmed), then the mark must fall after a reset. None where /proc offers no such reset.
let private peakResetWorks () : bool option =
    if not (canMeasurePeakRss ()) then None
    else
        let bigMb = 256.0
        (use big = torch.ones ([| int64 (bigMb * bytesPerMib / 4.0) |]) in ignore big)
        let before = peakRssMb ()
        peakExtraMb ignore |> ignore
        let after = peakRssMb ()
        match before, after with
        | Some b, Some a -> Some(a < b - bigMb / 2.0)
        | _ -> None

/// Writes the random checkpoint for `shape` into `folder` (config.json + model.safetensors), loads it into
/// a `ParameterTree` of the same names, measures, checks every value, and deletes the folder.
let run (shape: BartShape) (folder: string) (seed: int) (progress: string -> unit) : LoadBenchReport =
    if Directory.Exists folder && not (Seq.isEmpty (Directory.EnumerateFileSystemEntries folder)) then
        invalidArg "folder" (sprintf "%s is not empty; the benchmark writes its checkpoint into an empty or new folder and deletes it" folder)
    let tensors = bartTensors shape
    let index = tensors |> List.mapi (fun i (n, _) -> n, i) |> dict
    Directory.CreateDirectory folder |> ignore
    try
        let config = JsonObject()
        config["model_type"] <- JsonValue.Create "bart"
        config["d_model"] <- JsonValue.Create shape.DModel
        config["vocab_size"] <- JsonValue.Create shape.VocabSize
        File.WriteAllText(Path.Combine(folder, "config.json"), config.ToJsonString())
        let path = Path.Combine(folder, "model.safetensors")
        progress (sprintf "writing %s (%d tensors, %d parameters)" path tensors.Length (tensors |> List.sumBy (snd >> Array.fold (*) 1L)))
        let sw = Stopwatch.StartNew()
        let plan : Safetensors.Planned list = [ for n, s in tensors -> { Name = n; Dtype = torch.ScalarType.Float32; Shape = s } ]
        Safetensors.writePlanned path [ "format", "pt" ] plan (fun p -> values seed index[p.Name] p.Shape)
        let writeS = sw.Elapsed.TotalSeconds
        let fileMb = float (FileInfo(path).Length) / bytesPerMib
        let resetWorks = peakResetWorks ()
        use weights = openWeights folder
        use model = ParameterTree.Of weights
        progress (sprintf "loading %.0f MiB into fresh parameters" fileMb)
        sw.Restart()
        let loaded = ref None
        let load () = loaded.Value <- Some(loadInto weights model LoadOptions.Strict)
        let extra = if canMeasurePeakRss () then peakExtraMb load else (load (); None)
        let loadS = sw.Elapsed.TotalSeconds
        let report = loaded.Value.Value
        let peak = if extra.IsSome then peakRssMb () else None
        let own = dict [ for struct (n, p) in model.named_parameters () -> n, (p :> torch.Tensor) ]
        let verified =
            tensors
            |> List.forall (fun (n, s) ->
                use expected = values seed index[n] s
                (use _ = torch.NewDisposeScope() in own[n].eq(expected).all().item<bool> ()))
        { Shape = shape.Name
          Tensors = report.Loaded.Length
          Parameters = tensors |> List.sumBy (snd >> Array.fold (*) 1L)
          FileMb = fileMb
          WriteS = writeS
          LoadS = loadS
          RssBeforeMb = Option.map2 (fun p e -> p - e) peak extra
          PeakRssMb = peak
          PeakResetWorks = resetWorks
          Verified = verified }
    finally
        try Directory.Delete(folder, true) with _ -> ()

/// The report as text: sizes, times, peak memory and its ratio to the file against the bound.
let table (r: LoadBenchReport) : string =
    let mb = Option.map (sprintf "%.0f MiB") >> Option.defaultValue "not measured here (needs Linux /proc)"
    [ sprintf "checkpoint load, %s shape: %d tensors, %d parameters (random, float32)" r.Shape r.Tensors r.Parameters
      sprintf "model.safetensors: %.1f MiB, written in %.1f s" r.FileMb r.WriteS
      sprintf "load (HfCheckpoint.loadInto into fresh parameters): %.2f s, %.0f MiB/s" r.LoadS (r.FileMb / r.LoadS)
      sprintf "resident memory before the load: %s" (mb r.RssBeforeMb)
      sprintf "peak resident memory during the load: %s" (mb r.PeakRssMb)
      (match r.PeakRssMb with
       | Some p -> sprintf "peak / file size: %.2fx (bound %.1fx: %s)" (p / r.FileMb) maxPeakOverFile (if p / r.FileMb <= maxPeakOverFile then "met" else "NOT met")
       | None -> "peak / file size: not measured")
      sprintf "peak reset (/proc/self/clear_refs) seen to work: %s" (match r.PeakResetWorks with Some true -> "yes" | Some false -> "NO (peaks read too high)" | None -> "not available")
      sprintf "loaded values equal the written ones: %s" (if r.Verified then "yes" else "NO") ]
    |> String.concat "\n"
    |> fun s -> s + "\n"
