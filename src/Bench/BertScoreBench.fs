/// BERTScore throughput on this machine: a roberta-large-shaped folder with random weights (written in Hugging
/// Face layout, then loaded through the same path as a user's `roberta-large`), scored on generated pairs of
/// summary length. The weights are random, so the scores mean nothing; the time is what a real roberta-large
/// costs at bert_score's layer 17 (bert_score cuts the model there, so the folder holds layers 0 .. 16 only).
/// The tokenizer is a small byte-level BPE written for the generated words (one token a word), so the token
/// counts are those of real summaries; tokenization is timed with the rest.
///
/// Legend: N pairs, L tokens a text.
module Moe.Bench.BertScoreBench

open System
open System.Diagnostics
open System.IO
open System.Text.Json.Nodes
open TorchSharp
open Moe
open Moe.Metrics

/// What to run.
type BertScoreBenchConfig =
    { /// Pairs scored in the timed run.
      Pairs: int
      /// The encoder layer (bert_score's 17 for roberta-large); the folder holds this many layers.
      Layer: int
      /// bert_score's batch_size.
      BatchSize: int
      /// Words per candidate and per reference are drawn from [MinWords, MaxWords] (XSum summaries: ~20-30).
      MinWords: int
      MaxWords: int
      UseIdf: bool
      Seed: int }

module BertScoreBenchConfig =
    /// A short default run: 16 pairs of 15-35 words at layer 17, bert_score's batch size.
    let defaults = { Pairs = 16; Layer = 17; BatchSize = 64; MinWords = 15; MaxWords = 35; UseIdf = false; Seed = 0 }

    /// Every problem with a config, all at once.
    let validate (cfg: BertScoreBenchConfig) : string list =
        [ if cfg.Pairs < 1 then sprintf "pairs must be >= 1, got %d" cfg.Pairs
          if cfg.Layer < 0 || cfg.Layer > Encoders.robertaLargeShape.NumLayers then
              sprintf "layer must be in 0 .. %d, got %d" Encoders.robertaLargeShape.NumLayers cfg.Layer
          if cfg.BatchSize < 1 then sprintf "batch size must be >= 1, got %d" cfg.BatchSize
          if cfg.MinWords < 1 || cfg.MaxWords < cfg.MinWords || cfg.MaxWords > 400 then
              sprintf "words per text must satisfy 1 <= min <= max <= 400, got %d .. %d" cfg.MinWords cfg.MaxWords ]

/// What was measured.
type BertScoreBenchReport =
    { Config: BertScoreBenchConfig
      /// Seconds to write the random folder and to load it (encoder and tokenizer).
      WriteSeconds: float
      LoadSeconds: float
      /// Seconds of the timed `BertScorer.score` call over all pairs (after one untimed warm-up call).
      ScoreSeconds: float
      PairsPerSecond: float
      /// Mean tokens a text, special tokens included.
      MeanTokens: float
      Threads: int }

/// The words of the generated texts (each one BPE token).
let private words =
    ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
     + "you were her she there been one all we their has would when if so no will more can out up about who said "
     + "new time year people first government minister police club match season court report health school city")
        .Split(' ', StringSplitOptions.RemoveEmptyEntries)

/// A byte-level BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) in which every word of `words`,
/// after a space, is one token: RoBERTa's specials, the letters and "Ġ", and the merges that build "Ġword".
let private writeTokenizer (dir: string) =
    let vocab = Collections.Generic.List<string>([ "<s>"; "<pad>"; "</s>"; "<unk>" ])
    let merges = Collections.Generic.List<string>()
    let add (t: string) = if not (vocab.Contains t) then vocab.Add t
    add "Ġ"
    for c in 'a' .. 'z' do add (string c)
    for w in words do
        let mutable piece = "Ġ"
        for c in w do
            let next = piece + string c
            if not (vocab.Contains next) then
                merges.Add(sprintf "%s %c" piece c)
                add next
            piece <- next
    add "<mask>"
    let v = JsonObject()
    vocab |> Seq.iteri (fun i t -> v[t] <- JsonValue.Create i)
    File.WriteAllText(Path.Combine(dir, "vocab.json"), v.ToJsonString())
    File.WriteAllLines(Path.Combine(dir, "merges.txt"), Seq.append [ "#version: 0.2" ] merges)
    File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), """{"tokenizer_class": "RobertaTokenizer", "model_max_length": 512}""")

/// Writes the folder under `root` (named roberta-large, so the default layer is bert_score's 17), scores the
/// generated pairs, and removes the folder. `progress` gets one line per phase.
let run (cfg: BertScoreBenchConfig) (root: string) (progress: string -> unit) : BertScoreBenchReport =
    match BertScoreBenchConfig.validate cfg with
    | [] -> ()
    | problems -> invalidArg "cfg" (String.concat "; " problems)
    let dir = Path.Combine(root, "roberta-large")
    if Directory.Exists dir then invalidArg "root" (sprintf "%s already exists; refusing to write the benchmark's folder over it" dir)
    try
        let clock = Stopwatch.StartNew()
        progress (sprintf "writing a roberta-large-shaped folder with random weights (%d layers) to %s" cfg.Layer dir)
        torch.manual_seed (int64 cfg.Seed) |> ignore
        Encoders.writeRandomFolder dir { Encoders.robertaLargeShape with NumLayers = cfg.Layer } "RobertaModel"
        writeTokenizer dir
        let written = clock.Elapsed.TotalSeconds
        clock.Restart()
        use model = new BertScorer.BertScoreModel(dir, None)
        let loaded = clock.Elapsed.TotalSeconds
        progress (sprintf "written in %.1f s, loaded in %.1f s (layer %d: %s)" written loaded model.Layer model.LayerSource)
        let rng = Random cfg.Seed
        let text () = String.Join(" ", Array.init (rng.Next(cfg.MinWords, cfg.MaxWords + 1)) (fun _ -> words[rng.Next words.Length]))
        let cands = Array.init cfg.Pairs (fun _ -> text ())
        let refs = Array.init cfg.Pairs (fun _ -> text ())
        let settings = { BertScorer.defaults with Layer = Some cfg.Layer; UseIdf = cfg.UseIdf; BatchSize = cfg.BatchSize }
        let warm = min 2 cfg.Pairs
        BertScorer.score settings model cands[.. warm - 1] refs[.. warm - 1] |> ignore
        progress (sprintf "scoring %d pairs" cfg.Pairs)
        clock.Restart()
        BertScorer.score settings model cands refs |> ignore
        let seconds = clock.Elapsed.TotalSeconds
        let tokens = Array.append cands refs |> Array.map (fun t -> float (model.Encode t).Ids.Length)
        { Config = cfg; WriteSeconds = written; LoadSeconds = loaded; ScoreSeconds = seconds
          PairsPerSecond = float cfg.Pairs / seconds; MeanTokens = Array.average tokens; Threads = torch.get_num_threads () }
    finally
        if Directory.Exists dir then Directory.Delete(dir, true)

/// The report as a few lines of text.
let table (r: BertScoreBenchReport) : string =
    String.concat "\n"
        [ sprintf "BERTScore, roberta-large shape (random weights), layer %d, idf %s, batch size %d, %d threads"
              r.Config.Layer (if r.Config.UseIdf then "on" else "off") r.Config.BatchSize r.Threads
          sprintf "pairs: %d (mean %.1f tokens a text)   scored in %.2f s: %.2f pairs/s" r.Config.Pairs r.MeanTokens r.ScoreSeconds r.PairsPerSecond
          sprintf "folder written in %.1f s, loaded in %.1f s" r.WriteSeconds r.LoadSeconds ]
        + "\n"
