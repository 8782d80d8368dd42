/// `moe bench summac`: SummaC-ZS pairs per second with a roberta-large-mnli-shaped classifier of random weights.
module Moe.SummaCBenchCommand

open System
open Argu
open Moe

type SummaCBenchArgs =
    | [<Mandatory>] Tokenizer of dir: string
    | Examples of count: int
    | Batch_Size of count: int
    | Seed of seed: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Tokenizer _ -> "a RoBERTa tokenizer folder (vocab.json + merges.txt or tokenizer.json), e.g. roberta-large-mnli or the shared roberta-tiny-mnli."
            | Examples _ -> "timed examples, 16 NLI pairs each (default 2)."
            | Batch_Size _ -> "pairs per forward pass (default 32)."
            | Seed _ -> "seed of the random weights (default 0)."

/// Runs the benchmark and prints its numbers.
let run (args: ParseResults<SummaCBenchArgs>) : int =
    let r =
        Bench.SummaCBench.run Bench.SummaCBench.robertaLargeMnli (args.GetResult Tokenizer)
            (args.GetResult(Examples, 2)) (args.GetResult(Batch_Size, 32)) (int64 (args.GetResult(Seed, 0)))
    printfn "SummaC-ZS with a random classifier of roberta-large-mnli's shape (%s), %d threads" r.Shape r.Threads
    printfn "%d NLI pairs (mean %.1f tokens) in %.2f s: %.2f pairs/s" r.Pairs r.MeanTokens r.Seconds r.PairsPerSecond
    0
