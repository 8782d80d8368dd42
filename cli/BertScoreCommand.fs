/// BERTScore in the CLI: the options `moe score --bertscore` adds, and `moe bench bertscore`.
module Moe.BertScoreCommand

open System
open System.IO
open Argu
open Moe
open Moe.Metrics

/// The report with BERTScore of the predictions against the references added, from the model folder `dir` with
/// the given layer (None: bert_score's default for the model), idf and baseline file. The number of texts cut at
/// the model's length is printed to stderr when any was.
let addBertScore (dir: string) (layer: int option) (useIdf: bool) (baseline: string option)
                 (predictions: string[]) (references: string[]) (report: ScoreReport) : ScoreReport =
    let settings = { BertScorer.defaults with Layer = layer; UseIdf = useIdf; BaselineFile = baseline }
    let run = BertScorer.scoreFolder settings dir predictions references
    if run.TruncatedCandidates + run.TruncatedReferences > 0 then
        eprintfn "bertscore: %d prediction(s) and %d reference(s) were longer than %d tokens and were cut (as bert_score cuts them)"
            run.TruncatedCandidates run.TruncatedReferences run.MaxLength
    Scoring.withBertScore run report

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
