/// The SummaC-ZS benchmark (`moe bench summac`): NLI pairs per second of SummaC-ZS with a classifier of
/// roberta-large-mnli's shape (24 layers, D 1024, 16 heads, F 4096, 3 labels) and random weights, built in memory,
/// over a fixed news-like document of sentence chunks and a two-sentence summary per example, tokenized by the given
/// RoBERTa tokenizer folder. Reports pairs per second and the mean tokens per pair. Axes: none.
module Moe.Bench.SummaCBench

open System
open System.Diagnostics
open TorchSharp
open Moe
open Moe.Metrics

/// What the benchmark measured.
type SummaCBenchResult =
    { /// NLI pairs in the timed run.
      Pairs: int
      /// Mean tokens per pair (special tokens included).
      MeanTokens: float
      Seconds: float
      PairsPerSecond: float
      /// libtorch intra-op threads.
      Threads: int
      Shape: string }

/// The fixed document (8 sentences) and summary (2 sentences) of every example.
let private document =
    String.Join(" ",
        [ "The city council approved a new budget on Tuesday after weeks of heated debate among its members."
          "The plan raises spending on public transport by twelve percent and freezes most other departments."
          "Supporters said the investment would cut traffic and help residents who cannot afford a car."
          "Opponents argued that the council had ignored warnings about rising maintenance costs for old bridges."
          "The mayor, who had threatened a veto, signed the budget within an hour of the final vote."
          "Local businesses welcomed the decision but asked for clearer timelines for the promised bus routes."
          "A group of residents plans to challenge part of the plan in court later this month."
          "The budget takes effect in January and will be reviewed again in the autumn." ])

let private summary =
    "The council passed a budget that raises transport spending by twelve percent. The mayor signed it despite threatening a veto."

/// roberta-large-mnli's shape with MNLI's labels.
let robertaLargeMnli : Encoders.EncoderConfig =
    { Encoders.robertaLargeShape with Labels = [| "CONTRADICTION"; "NEUTRAL"; "ENTAILMENT" |] }

/// Times SummaC-ZS over `examples` examples (16 NLI pairs each) after one untimed example, with a random
/// `cfg`-shaped classifier and the tokenizer of `tokenizerDir`.
let run (cfg: Encoders.EncoderConfig) (tokenizerDir: string) (examples: int) (batchSize: int) (seed: int64) : SummaCBenchResult =
    if examples < 1 then invalidArg "examples" (sprintf "expected at least 1 example, got %d" examples)
    torch.manual_seed seed |> ignore
    let classifier = new Encoders.SequenceClassifier(cfg)
    classifier.eval () |> ignore
    let tokenizer = HfTokenizer.fromFolder tokenizerDir
    HfTokenizer.checkAgainst cfg.VocabSize tokenizer
    use nli = new Nli.CheckpointNli(sprintf "random %d-layer D %d" cfg.NumLayers cfg.HiddenSize, classifier, tokenizer, { Nli.defaults with BatchSize = batchSize })
    let zs = Consistency.defaults
    SummaC.run zs None nli [| document |] [| summary |] |> ignore
    let docs = Array.create examples document
    let sums = Array.create examples summary
    let tokens =
        let premises = Consistency.chunks zs Consistency.Sentence document
        let hyps = Consistency.chunks zs Consistency.Sentence summary
        [| for p in premises do for h in hyps -> float (fst (nli.Encode(p, h))).Length |] |> Array.average
    let clock = Stopwatch.StartNew()
    let result = SummaC.run zs None nli docs sums
    let seconds = clock.Elapsed.TotalSeconds
    { Pairs = result.Pairs
      MeanTokens = tokens
      Seconds = seconds
      PairsPerSecond = float result.Pairs / seconds
      Threads = torch.get_num_threads ()
      Shape = sprintf "%d layers, D %d, %d heads, F %d, %d labels" cfg.NumLayers cfg.HiddenSize cfg.NumHeads cfg.IntermediateSize cfg.Labels.Length }
