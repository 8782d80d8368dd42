/// The decoder-only part of `moe bench generate --decoder SHAPE`: a Llama-3.2-1B-shaped checkpoint with random
/// bfloat16 weights is written as a real Hugging Face folder (`HfCheckpoint.saveFolder`), then loaded in
/// bfloat16 (`InstructTune.loadAs`) while the extra peak resident memory is measured against the weights'
/// bfloat16 size (the issue's bound: at most 1.2x); batch-1 greedy decoding (`Generate.runCausal`, cached) is
/// timed per token against the memory-bandwidth floor (weight bytes read per token over a measured copy
/// bandwidth; bound: within 2x); and one LoRA training step's extra peak memory is measured with and without
/// activation recomputation (`InstructTune.recomputedLoss`).
/// Axes: N rows (1), L positions, D hidden size, V vocabulary.
module Moe.Bench.CausalBench

open System
open System.Diagnostics
open System.IO
open System.Text.Json.Nodes
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Bench.Measure

type Tensor = torch.Tensor

/// What one run does.
type CausalBenchConfig =
    { /// "llama-3.2-1b" or "tiny".
      Shape: string
      /// Decoder layers (None = the shape's: 16 for llama-3.2-1b); fewer keeps every width and the vocabulary.
      Layers: int option
      /// Prompt positions of the decoding run, and tokens generated.
      PromptTokens: int
      NewTokens: int
      /// Positions of the LoRA training step's one row.
      TrainTokens: int
      /// LoRA rank of the training step (all seven projections).
      LoraRank: int
      /// Bytes of the bandwidth copy.
      CopyBytes: int64
      Seed: int }

module CausalBenchConfig =
    /// The full Llama-3.2-1B shape; decoding 32 tokens after a 32-token prompt; a 256-token training row.
    let defaults =
        { Shape = "llama-3.2-1b"; Layers = None; PromptTokens = 32; NewTokens = 32; TrainTokens = 256; LoraRank = 16
          CopyBytes = 512L * 1024L * 1024L; Seed = 0 }
    /// `--quick`: the 1B widths and vocabulary with 2 decoder layers, shorter runs.
    let quick = { defaults with Layers = Some 2; NewTokens = 16; TrainTokens = 128 }

    let validate (c: CausalBenchConfig) : string list =
        [ if c.Shape <> "llama-3.2-1b" && c.Shape <> "tiny" then sprintf "Shape must be llama-3.2-1b or tiny, got '%s'" c.Shape
          match c.Layers with
          | Some n when n < 1 -> sprintf "Layers must be >= 1, got %d" n
          | _ -> ()
          for name, v in [ "PromptTokens", c.PromptTokens; "NewTokens", c.NewTokens; "TrainTokens", c.TrainTokens; "LoraRank", c.LoraRank ] do
              if v < 2 then sprintf "%s must be >= 2, got %d" name v ]

/// config.json of meta-llama/Llama-3.2-1B (torch_dtype bfloat16, tied embeddings, llama3 rope scaling), or a
/// tiny one of the same layout; `layers` overrides num_hidden_layers.
let configJson (shape: string) (layers: int option) : JsonObject =
    let o = JsonObject()
    let set (k: string) (v: JsonNode) = o[k] <- v
    let n (x: int) : JsonNode = JsonValue.Create x
    let full = shape = "llama-3.2-1b"
    set "architectures" (JsonArray(JsonValue.Create "LlamaForCausalLM"))
    set "model_type" (JsonValue.Create "llama")
    set "vocab_size" (n (if full then 128256 else 1000))
    set "hidden_size" (n (if full then 2048 else 64))
    set "intermediate_size" (n (if full then 8192 else 256))
    set "num_hidden_layers" (n (defaultArg layers (if full then 16 else 2)))
    set "num_attention_heads" (n (if full then 32 else 4))
    set "num_key_value_heads" (n (if full then 8 else 2))
    set "head_dim" (n (if full then 64 else 16))
    set "max_position_embeddings" (n 131072)
    set "rms_norm_eps" (JsonValue.Create 1e-5)
    set "rope_theta" (JsonValue.Create 500000.0)
    let rope = JsonObject()
    rope["rope_type"] <- JsonValue.Create "llama3"
    rope["factor"] <- JsonValue.Create 32.0
    rope["low_freq_factor"] <- JsonValue.Create 1.0
    rope["high_freq_factor"] <- JsonValue.Create 4.0
    rope["original_max_position_embeddings"] <- n 8192
    set "rope_scaling" rope
    set "tie_word_embeddings" (JsonValue.Create true)
    set "bos_token_id" (n 1)
    set "eos_token_id" (n 2)
    set "torch_dtype" (JsonValue.Create "bfloat16")
    o

/// Writes the shape's checkpoint folder with random bfloat16 weights (normal, std 0.02; norms 1) under the
/// names transformers saves; returns the weights' bytes.
let writeRandomFolder (dir: string) (config: JsonObject) : int64 =
    let cfg =
        let path = Path.Combine(Path.GetTempPath(), sprintf "moe-causal-bench-config-%d.json" Environment.ProcessId)
        File.WriteAllText(path, config.ToJsonString())
        try Llama.DecoderConfig.parseLlama path finally File.Delete path
    use g = new torch.Generator(1UL)
    use scope = torch.NewDisposeScope()
    let d, f, v = int64 cfg.HiddenSize, int64 cfg.IntermediateSize, int64 cfg.VocabSize
    let q, kv = int64 (cfg.NumHeads * cfg.HeadDim), int64 (cfg.NumKvHeads * cfg.HeadDim)
    let random (shape: int64[]) =
        use x = torch.randn(shape, generator = g)
        (mulScalar 0.02 x).to_type torch.ScalarType.BFloat16
    let ones (k: int64) = torch.ones([| k |], dtype = torch.ScalarType.BFloat16)
    let state =
        [ "model.embed_tokens.weight", random [| v; d |]
          for i in 0 .. cfg.NumLayers - 1 do
              let p = sprintf "model.layers.%d." i
              p + "self_attn.q_proj.weight", random [| q; d |]
              p + "self_attn.k_proj.weight", random [| kv; d |]
              p + "self_attn.v_proj.weight", random [| kv; d |]
              p + "self_attn.o_proj.weight", random [| d; q |]
              p + "mlp.gate_proj.weight", random [| f; d |]
              p + "mlp.up_proj.weight", random [| f; d |]
              p + "mlp.down_proj.weight", random [| d; f |]
              p + "input_layernorm.weight", ones d
              p + "post_attention_layernorm.weight", ones d
          "model.norm.weight", ones d ]
    HfCheckpoint.saveFolder dir config state None
    state |> List.sumBy (fun (_, t) -> t.NumberOfElements * int64 t.ElementSize)

/// What one run measured.
type CausalBenchReport =
    { Shape: string
      Layers: int
      Parameters: int64
      /// The weights' bfloat16 bytes, MiB.
      WeightsMb: float
      /// Extra peak resident memory while loading, MiB (None off Linux), and the seconds it took.
      LoadPeakMb: float option
      LoadSeconds: float
      /// Weight bytes one greedy step reads (everything but the embedding lookup; the tied head reads V x D), MiB.
      BytesPerTokenMb: float
      CopyGbPerS: float
      /// ms per generated token at batch 1 (greedy, cached), prefill excluded.
      MsPerToken: float
      /// Extra peak resident memory of one LoRA training step, MiB, without and with recomputation.
      TrainPeakMb: float option
      TrainPeakRecomputeMb: float option
      TrainTokens: int
      LoraRank: int }

/// The floor: bytes per token at the copy bandwidth, ms.
let floorMs (r: CausalBenchReport) = r.BytesPerTokenMb * bytesPerMib / (r.CopyGbPerS * 1e9) * 1000.0

/// The issue's bounds.
let maxLoadRatio = 1.2
let maxOverFloor = 2.0

/// Runs the benchmark in a temporary folder (deleted after); `progress` gets a line per measurement.
let run (cfg: CausalBenchConfig) (progress: string -> unit) : CausalBenchReport =
    Config.orFail "decoder bench config" (CausalBenchConfig.validate cfg) cfg |> ignore
    let dir = Path.Combine(Path.GetTempPath(), sprintf "moe-causal-bench-%d" Environment.ProcessId)
    if Directory.Exists dir then Directory.Delete(dir, true)
    try
        let config = configJson cfg.Shape cfg.Layers
        let layers = config["num_hidden_layers"].GetValue<int>()
        let sw = Stopwatch.StartNew()
        let bytes = writeRandomFolder dir config
        progress (sprintf "wrote %s: %.0f MiB of bfloat16 weights (%.1f s)" dir (float bytes / bytesPerMib) sw.Elapsed.TotalSeconds)
        let mutable lm = Unchecked.defaultof<HfCausalLM.HfCausalLM>
        let sw = Stopwatch.StartNew()
        let loadPeak = peakExtraMb (fun () -> lm <- InstructTune.loadAs torch.ScalarType.BFloat16 dir)
        let loadSeconds = sw.Elapsed.TotalSeconds
        use lm = lm
        let parameters = lm.Module.parameters () |> Seq.sumBy (fun p -> p.NumberOfElements)
        progress (sprintf "loaded in bfloat16: %d parameters, extra peak resident %s (%.1f s)" parameters
                      (match loadPeak with Some m -> sprintf "%.0f MiB = %.2fx the weights" m (m * bytesPerMib / float bytes) | None -> "n/a") loadSeconds)
        // every weight is read once per step except the embedding table (one row), which the tied head reads whole
        let perToken = bytes
        let copy = GenerateBench.copyBandwidth cfg.CopyBytes 5
        progress (sprintf "copy bandwidth %.1f GB/s" copy)
        use g = new torch.Generator(uint64 cfg.Seed)
        let msPerToken =
            use _ = torch.no_grad ()
            use ids = torch.randint(3L, int64 lm.Model.VocabSize, [| 1L; int64 cfg.PromptTokens |], dtype = torch.ScalarType.Int64, generator = g)
            use mask = torch.ones(ids.shape, torch.ScalarType.Bool)
            let timed (n: int) =
                let gen = { Generate.GenerationConfig.defaults with MaxNewTokens = Some n; EosTokenId = []; PadTokenId = Some 0 }
                let sw = Stopwatch.StartNew()
                (use _ = torch.NewDisposeScope() in Generate.runCausal gen lm.Model ids mask |> ignore)
                sw.Elapsed.TotalMilliseconds
            timed 2 |> ignore // warm-up
            let one = median [| for _ in 1 .. 3 -> timed 1 |]
            let many = median [| for _ in 1 .. 3 -> timed cfg.NewTokens |]
            (many - one) / float (cfg.NewTokens - 1)
        let floor = float perToken / (copy * 1e9) * 1000.0
        progress (sprintf "batch-1 greedy: %.1f ms/token; floor %.1f ms/token (%.0f MiB at %.1f GB/s): %.2fx" msPerToken floor
                      (float perToken / bytesPerMib) copy (msPerToken / floor))
        // one LoRA step, with and without recomputation
        let adapters = InstructTune.attachLora { Finetune.LoraSettings.defaults with r = cfg.LoraRank; lora_alpha = float (2 * cfg.LoraRank) } InstructTune.decoderTargets lm
        lm.Module.train ()
        use ids = torch.randint(3L, int64 lm.Model.VocabSize, [| 1L; int64 cfg.TrainTokens |], dtype = torch.ScalarType.Int64, generator = g)
        use mask = torch.ones(ids.shape, torch.ScalarType.Bool)
        let step (recompute: bool) () =
            use _ = torch.NewDisposeScope()
            for a in adapters do
                for p in [ a.A.weight; a.B.weight ] do
                    if not (isNull p.grad) then p.grad.zero_ () |> ignore
            let loss, _ = InstructTune.batchLoss lm recompute ids mask ids
            loss.backward ()
        step false () // gradients allocated once, outside the measurements
        let plain = peakExtraMb (step false)
        let recomputed = peakExtraMb (step true)
        let show = function Some m -> sprintf "%.0f MiB" m | None -> "n/a"
        progress (sprintf "LoRA r %d step on %d tokens: extra peak %s plain, %s with activation recomputation" cfg.LoraRank cfg.TrainTokens (show plain) (show recomputed))
        { Shape = cfg.Shape; Layers = layers; Parameters = parameters; WeightsMb = float bytes / bytesPerMib
          LoadPeakMb = loadPeak; LoadSeconds = loadSeconds; BytesPerTokenMb = float perToken / bytesPerMib; CopyGbPerS = copy
          MsPerToken = msPerToken; TrainPeakMb = plain; TrainPeakRecomputeMb = recomputed; TrainTokens = cfg.TrainTokens; LoraRank = cfg.LoraRank }
    finally
        if Directory.Exists dir then Directory.Delete(dir, true)

/// The report as the README's table rows, with the bounds.
let table (r: CausalBenchReport) : string =
    let mb = function Some m -> sprintf "%.0f MiB" m | None -> "n/a"
    let ratio = r.LoadPeakMb |> Option.map (fun m -> m / r.WeightsMb)
    String.Join("\n",
        [ sprintf "| measure (%s, %d layers, %d parameters, bfloat16) | value | bound |" r.Shape r.Layers r.Parameters
          "|---|---|---|"
          sprintf "| load: extra peak resident / bfloat16 weights (%.0f MiB) | %s%s | <= %.1fx |" r.WeightsMb (mb r.LoadPeakMb)
              (match ratio with Some x -> sprintf " = %.2fx" x | None -> "") maxLoadRatio
          sprintf "| batch-1 greedy ms/token vs floor (%.0f MiB / %.1f GB/s = %.1f ms) | %.1f ms = %.2fx | <= %.1fx |"
              r.BytesPerTokenMb r.CopyGbPerS (floorMs r) r.MsPerToken (r.MsPerToken / floorMs r) maxOverFloor
          sprintf "| LoRA r %d step, %d tokens: extra peak resident, plain / recomputed | %s / %s | reported |" r.LoraRank r.TrainTokens
              (mb r.TrainPeakMb) (mb r.TrainPeakRecomputeMb) ])
