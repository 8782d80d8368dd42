/// `moe bench bertscore` (`moe score --bertscore` is `ScoreCommand` over `Metrics.ModelMetrics`).
module Moe.BertScoreCommand

open System
open System.IO
open Argu
open Moe
open Moe.Metrics

type BenchBertScoreArgs =
    | Pairs of count: int
    | Layer of layer: int
    | Batch_Size of count: int
    | Idf
    | Seed of seed: int
    | Folder of path: string
    | Threads of count: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Pairs _ -> sprintf "pairs scored (default %d: a short run)." Bench.BertScoreBench.BertScoreBenchConfig.defaults.Pairs
            | Layer _ -> "encoder layer, also the layers written (default 17, bert_score's for roberta-large)."
            | Batch_Size _ -> "bert_score's batch_size (default 64)."
            | Idf -> "weight tokens by idf over the references."
            | Seed _ -> "seed of the weights and texts (default 0)."
            | Folder _ -> "where the random roberta-large folder is written, then deleted (default: the system's temp folder)."
            | Threads _ -> "libtorch intra-op threads (default: libtorch's choice)."

/// `moe bench bertscore`: pairs per second with roberta-large-shaped random weights.
let bench (args: ParseResults<BenchBertScoreArgs>) : int =
    Native.initialise ()
    args.TryGetResult Threads |> Option.iter (fun n -> TorchSharp.torch.set_num_threads n)
    let d = Bench.BertScoreBench.BertScoreBenchConfig.defaults
    let cfg =
        { d with
            Pairs = args.GetResult(Pairs, d.Pairs)
            Layer = args.GetResult(Layer, d.Layer)
            BatchSize = args.GetResult(Batch_Size, d.BatchSize)
            UseIdf = args.Contains Idf
            Seed = args.GetResult(Seed, d.Seed) }
    let root = args.GetResult(Folder, Path.Combine(Path.GetTempPath(), sprintf "moe-bench-bertscore-%d" Environment.ProcessId))
    let report = Bench.BertScoreBench.run cfg root (fun line -> eprintfn "%s" line)
    printf "%s" (Bench.BertScoreBench.table report)
    0
