/// The generation benchmark (`moe bench generate`): a pretrained encoder-decoder (a checkpoint folder, or random
/// weights of bart-large's shape through Bart's own modules) timed on random source ids: the encoder's
/// milliseconds, the decoder's milliseconds per generated token and tokens/s at batch 1 and 8, greedy and beam
/// 6, with and without the key/value cache (`GenerationConfig.UseCache`), and peak resident memory; then the
/// issue's two ratios: a cached decoder step against recomputing the whole prefix at 64 generated tokens
/// (target >= 3x), and batch-1 greedy decoding against the memory-bandwidth floor, the decoder weights' bytes
/// read per token over a measured copy bandwidth (target within 2x).
/// Axes: B batch, S source positions, T decoder positions, D width, V vocabulary.
module Moe.Bench.GenerateBench

open System
open System.Diagnostics
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Generate
open Moe.Seq2Seq
open Moe.Bench.Measure

type Tensor = torch.Tensor

/// What one benchmark run does.
type GenerateBenchConfig =
    { /// Source positions of the random documents.
      SourceLength: int
      /// Tokens generated per output (EOS is switched off so every run generates exactly this many).
      NewTokens: int
      Batches: int list
      /// 1 is greedy search; more is beam search.
      Beams: int list
      /// Timed repetitions of each encoder and single-step timing; the median is reported.
      Reps: int
      /// The prefix length of the cached-step-vs-recompute comparison (the issue's 64).
      PrefixTokens: int
      /// Bytes of the copy that measures memory bandwidth (large enough to leave the caches).
      CopyBytes: int64
      Seed: int64 }

module GenerateBenchConfig =
    /// The issue's grid: batch 1 and 8, greedy and beam 6, 32 generated tokens from 256-token sources.
    let defaults =
        { SourceLength = 256; NewTokens = 32; Batches = [ 1; 8 ]; Beams = [ 1; 6 ]; Reps = 3; PrefixTokens = 64
          CopyBytes = 512L * 1024L * 1024L; Seed = 0L }

    let validate (c: GenerateBenchConfig) : string list =
        [ if c.SourceLength < 1 then sprintf "source length must be >= 1, got %d" c.SourceLength
          if c.NewTokens < 1 then sprintf "new tokens must be >= 1, got %d" c.NewTokens
          if c.Batches.IsEmpty || List.exists (fun b -> b < 1) c.Batches then sprintf "batches must be >= 1, got %A" c.Batches
          if c.Beams.IsEmpty || List.exists (fun b -> b < 1) c.Beams then sprintf "beams must be >= 1, got %A" c.Beams
          if c.Reps < 1 then sprintf "reps must be >= 1, got %d" c.Reps
          if c.PrefixTokens < 2 then sprintf "prefix tokens must be >= 2, got %d" c.PrefixTokens
          if c.CopyBytes < 1024L * 1024L then sprintf "copy bytes must be >= 1 MiB, got %d" c.CopyBytes ]

/// The model under test.
type Subject =
    { Name: string
      Model: ISeq2SeqModel
      Module: torch.nn.Module
      /// Bytes of the weights one decoder step reads: every decoder parameter except the embedding tables (a
      /// step reads one row of those), plus the output projection [V; D] and its bias.
      DecoderBytes: int64
      StartId: int
      PadId: int }

let private bytesOf (t: Tensor) = t.NumberOfElements * int64 t.ElementSize

/// The decoder bytes per token of a module with transformers' parameter names (see `Subject.DecoderBytes`).
let decoderBytes (m: torch.nn.Module) : int64 =
    let named = [ for struct (n, p) in m.named_parameters () -> n, (p :> Tensor) ]
    let buffers = [ for struct (n, b) in m.named_buffers () -> n, b ]
    let isTable (n: string) = n.Contains "embed_tokens" || n.Contains "embed_positions"
    let decoder = named |> List.filter (fun (n, _) -> n.Contains "decoder." && not (isTable n)) |> List.sumBy (snd >> bytesOf)
    let output =
        match named |> List.tryFind (fun (n, _) -> n = "lm_head.weight") with
        | Some(_, w) -> bytesOf w
        | None -> named |> List.filter (fun (n, _) -> n.EndsWith "shared.weight") |> List.sumBy (snd >> bytesOf)
    let bias = buffers @ named |> List.filter (fun (n, _) -> n = "final_logits_bias") |> List.sumBy (snd >> bytesOf)
    decoder + output + bias

/// bart-large's config (facebook/bart-large, bart-large-xsum): d_model 1024, 12 + 12 layers of 16 heads, FFN
/// 4096, vocabulary 50265, 1024 positions.
let bartLargeConfig : Bart.BartConfig =
    { Layout = Bart.Layout.bart; VocabSize = 50265; DModel = 1024; EncoderLayers = 12; DecoderLayers = 12
      EncoderHeads = 16; DecoderHeads = 16; EncoderFfnDim = 4096; DecoderFfnDim = 4096; Activation = "gelu"
      Dropout = 0.1; AttentionDropout = 0.0; ActivationDropout = 0.0; EncoderLayerDrop = 0.0; DecoderLayerDrop = 0.0
      MaxPositions = 1024; ScaleEmbedding = false; PadTokenId = 1; DecoderStartTokenId = 2; InitStd = 0.02; Moe = None }

/// The shapes `--shape` names: bart-large, and a tiny one of the same layout for tests.
let shapes : (string * Bart.BartConfig) list =
    [ "bart-large", bartLargeConfig
      "tiny", { bartLargeConfig with VocabSize = 1000; DModel = 32; EncoderLayers = 2; DecoderLayers = 2; EncoderHeads = 4
                                     DecoderHeads = 4; EncoderFfnDim = 64; DecoderFfnDim = 64; MaxPositions = 512 } ]

/// The config of a shape's name, or what was expected.
let shapeOf (name: string) : Result<Bart.BartConfig, string> =
    match shapes |> List.tryFind (fst >> (=) name) with
    | Some(_, c) -> Ok c
    | None -> Error(sprintf "expected a shape among %s, got '%s'" (shapes |> List.map fst |> String.concat ", ") name)

/// A BART of `cfg`'s shape with random weights (transformers' initialisation), in evaluation mode.
let randomBart (name: string) (cfg: Bart.BartConfig) : Subject =
    let model = new Bart.BartForConditionalGeneration(cfg, "BartForConditionalGeneration")
    model.eval () |> ignore
    { Name = name; Model = model; Module = model; DecoderBytes = decoderBytes model
      StartId = cfg.DecoderStartTokenId; PadId = cfg.PadTokenId }

/// A checkpoint folder's model (`HfSeq2Seq.load`).
let ofFolder (dir: string) : Subject =
    let m = HfSeq2Seq.load dir
    { Name = dir; Model = m.Model; Module = m.Module; DecoderBytes = decoderBytes m.Module
      StartId = m.DecoderStartTokenId; PadId = m.PadTokenId }

/// One generation run of the grid.
type GenerationRow =
    { Batch: int
      Beams: int
      UseCache: bool
      Seconds: float
      /// Generated tokens per second: Batch x NewTokens / Seconds (beams count once, as outputs).
      TokensPerS: float
      /// (Seconds less the encoder's median at this batch) / NewTokens, in ms: the decoder's time per generated
      /// token (all beams and rows of the batch together).
      MsPerToken: float
      /// Extra peak resident memory of the run, MiB (None off Linux).
      PeakExtraMb: float option }

/// What one benchmark run measured.
type GenerateBenchReport =
    { Subject: string
      Parameters: int64
      DecoderMb: float
      Config: GenerateBenchConfig
      /// Median ms of one encoder pass at batch 1 and 8 (same batches as the grid).
      EncoderMs: (int * float) list
      /// Median ms of one decoder step at batch 1 with PrefixTokens - 1 positions in the cache.
      CachedStepMs: float
      /// Median ms of one decoder pass over the whole PrefixTokens-token prefix at batch 1 (no cache).
      RecomputeStepMs: float
      /// Measured copy bandwidth, GB/s (bytes read plus bytes written per second, as STREAM's copy counts).
      CopyGbPerS: float
      Rows: GenerationRow list
      /// The process's peak resident memory (VmHWM) at the end, MiB: the weights plus the largest run's extra.
      PeakRssMb: float option }

/// The floor of batch-1 greedy decoding: the decoder weights read once per token at the copy bandwidth, ms.
let floorMsPerToken (r: GenerateBenchReport) : float = float (int64 (r.DecoderMb * bytesPerMib)) / (r.CopyGbPerS * 1e9) * 1000.0

/// Copy bandwidth in GB/s: median of `reps` copies of `bytes` between two float32 tensors.
let copyBandwidth (bytes: int64) (reps: int) : float =
    use src = torch.ones([| bytes / 4L |])
    use dst = torch.empty([| bytes / 4L |])
    dst.copy_ src |> ignore
    let ms = interleaved (stopwatchClock ()) 1 (max reps 3) [| fun () -> dst.copy_ src |> ignore |]
    float (2L * bytes) / (median ms[0] / 1000.0) / 1e9

let private randomIds (g: torch.Generator) (vocab: int) (b: int) (s: int) : Tensor =
    // ids 4 .. V-1: no special token in the sources
    torch.randint(4L, int64 vocab, [| int64 b; int64 s |], dtype = torch.ScalarType.Int64, generator = g)

/// Runs the benchmark on `subject`; `progress` gets a line per measurement.
let run (cfg: GenerateBenchConfig) (subject: Subject) (progress: string -> unit) : GenerateBenchReport =
    Config.orFail "generate bench config" (GenerateBenchConfig.validate cfg) cfg |> ignore
    use _ = torch.no_grad ()
    let model = subject.Model
    use g = new torch.Generator(uint64 cfg.Seed)
    let clock = stopwatchClock ()
    let parameters = [ for p in subject.Module.parameters () -> p.NumberOfElements ] |> List.sum
    progress (sprintf "%s: %d parameters, decoder reads %.0f MiB per token" subject.Name parameters (float subject.DecoderBytes / bytesPerMib))
    let copy = copyBandwidth cfg.CopyBytes cfg.Reps
    progress (sprintf "copy bandwidth: %.1f GB/s" copy)
    // encoder
    let encoderMs =
        [ for b in cfg.Batches ->
              use ids = randomIds g model.VocabSize b cfg.SourceLength
              use mask = torch.ones(ids.shape, torch.ScalarType.Bool)
              let ms = interleaved clock 1 cfg.Reps [| fun () -> (use _ = torch.NewDisposeScope() in model.Encode(ids, mask) |> ignore) |]
              let m = median ms[0]
              progress (sprintf "encoder, batch %d x %d positions: %.1f ms" b cfg.SourceLength m)
              b, m ]
    // one decoder step at PrefixTokens: cached (the newest token against PrefixTokens - 1 cached positions)
    // against recomputing the whole prefix
    let cachedMs, recomputeMs =
        use scope = torch.NewDisposeScope()
        use src = randomIds g model.VocabSize 1 cfg.SourceLength
        use mask = torch.ones(src.shape, torch.ScalarType.Bool)
        let states = model.Encode(src, mask).Memory
        use prefix = randomIds g model.VocabSize 1 cfg.PrefixTokens
        let head = prefix.narrow(1L, 0L, int64 cfg.PrefixTokens - 1L)
        let last = prefix.narrow(1L, int64 cfg.PrefixTokens - 1L, 1L)
        let cachedStep () =
            use cache = model.NewCache()
            (use _ = torch.NewDisposeScope() in model.Decode(head, states, mask, cache) |> ignore)
            let sw = Stopwatch.StartNew()
            (use _ = torch.NewDisposeScope() in model.Decode(last, states, mask, cache) |> ignore)
            sw.Elapsed.TotalMilliseconds
        let recompute () =
            let sw = Stopwatch.StartNew()
            (use _ = torch.NewDisposeScope() in model.Decode(prefix, states, mask, null) |> ignore)
            sw.Elapsed.TotalMilliseconds
        cachedStep () |> ignore
        recompute () |> ignore
        let c = median (Array.init cfg.Reps (fun _ -> cachedStep ()))
        let r = median (Array.init cfg.Reps (fun _ -> recompute ()))
        progress (sprintf "decoder step at %d tokens: cached %.1f ms, recomputing the prefix %.1f ms (%.1fx)" cfg.PrefixTokens c r (r / c))
        c, r
    // the generation grid
    let gen (b: int) (beams: int) (useCache: bool) =
        { GenerationConfig.defaults with
            MaxNewTokens = Some cfg.NewTokens; NumBeams = beams; UseCache = useCache; EarlyStopping = EarlyStopping.Eager
            DecoderStartTokenId = Some subject.StartId; PadTokenId = Some subject.PadId; EosTokenId = [] }
    let rows =
        [ for b in cfg.Batches do
            for beams in cfg.Beams do
                for useCache in [ true; false ] do
                    use src = randomIds g model.VocabSize b cfg.SourceLength
                    use mask = torch.ones(src.shape, torch.ScalarType.Bool)
                    let c = gen b beams useCache
                    let sw = Stopwatch()
                    let go () =
                        sw.Restart()
                        Generate.run c model src mask |> ignore
                        sw.Stop()
                    let extra = if canMeasurePeakRss () then peakExtraMb go else (go (); None)
                    let s = sw.Elapsed.TotalSeconds
                    let encoder = encoderMs |> List.find (fst >> (=) b) |> snd
                    let row =
                        { Batch = b; Beams = beams; UseCache = useCache; Seconds = s
                          TokensPerS = float (b * cfg.NewTokens) / s
                          MsPerToken = max 0.0 (1000.0 * s - encoder) / float cfg.NewTokens
                          PeakExtraMb = extra }
                    progress (sprintf "batch %d, %s, %s: %.2f s, %.1f tokens/s" b (if beams = 1 then "greedy" else sprintf "beam %d" beams)
                                  (if useCache then "cache" else "no cache") s row.TokensPerS)
                    yield row ]
    { Subject = subject.Name
      Parameters = parameters
      DecoderMb = float subject.DecoderBytes / bytesPerMib
      Config = cfg
      EncoderMs = encoderMs
      CachedStepMs = cachedMs
      RecomputeStepMs = recomputeMs
      CopyGbPerS = copy
      Rows = rows
      PeakRssMb = peakRssMb () }

/// The issue's target for the cached step against recomputing the prefix.
let minCacheSpeedup = 3.0
/// The issue's bound on batch-1 greedy decoding against the memory-bandwidth floor.
let maxOverFloor = 2.0

/// The report as a Markdown table plus the two ratios against their targets.
let table (r: GenerateBenchReport) : string =
    let floor = floorMsPerToken r
    let mem = function Some mb -> sprintf "%.0f" mb | None -> "-"
    [ yield sprintf "%s: %d parameters; %d source positions, %d generated tokens (EOS off); decoder weights %.1f MiB per token"
              r.Subject r.Parameters r.Config.SourceLength r.Config.NewTokens r.DecoderMb
      for b, ms in r.EncoderMs do yield sprintf "encoder, batch %d: %.1f ms" b ms
      yield ""
      yield "| batch | search | kv cache | s | decoder ms/token | tokens/s | peak extra MiB |"
      yield "|---|---|---|---|---|---|---|"
      for x in r.Rows do
          yield sprintf "| %d | %s | %s | %.2f | %.1f | %.1f | %s |" x.Batch (if x.Beams = 1 then "greedy" else sprintf "beam %d" x.Beams)
                    (if x.UseCache then "yes" else "no") x.Seconds x.MsPerToken x.TokensPerS (mem x.PeakExtraMb)
      yield ""
      let speedup = r.RecomputeStepMs / r.CachedStepMs
      yield sprintf "decoder step at %d tokens, batch 1: cached %.1f ms, recomputing the prefix %.1f ms: %.1fx (target >= %.0fx: %s)"
                r.Config.PrefixTokens r.CachedStepMs r.RecomputeStepMs speedup minCacheSpeedup (if speedup >= minCacheSpeedup then "met" else "NOT met")
      yield sprintf "process peak resident memory: %s" (match r.PeakRssMb with Some mb -> sprintf "%.0f MiB" mb | None -> "not measured here (needs Linux /proc)")
      yield sprintf "copy bandwidth %.1f GB/s; floor = %.1f MiB / bandwidth = %.1f ms per token" r.CopyGbPerS r.DecoderMb floor
      match r.Rows |> List.tryFind (fun x -> x.Batch = 1 && x.Beams = 1 && x.UseCache) with
      | Some x ->
          let over = x.MsPerToken / floor
          yield sprintf "batch-1 greedy (cache): %.1f ms per token = %.2fx the floor (target <= %.0fx: %s)" x.MsPerToken over maxOverFloor
                    (if over <= maxOverFloor then "met" else "NOT met")
      | None -> yield "batch-1 greedy with the cache was not in the grid" ]
    |> String.concat "\n"
