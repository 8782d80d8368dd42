/// `moe score`: ROUGE, BLEU and document statistics of a predictions file against a references file.
module Moe.ScoreCommand

open System
open System.IO
open Argu
open Moe

type ScoreArgs =
    | [<Mandatory; AltCommandLine("-p")>] Predictions of path: string
    | [<Mandatory; AltCommandLine("-r")>] References of path: string
    | [<AltCommandLine("-d")>] Documents of path: string
    | Stem
    | Json
    | Bootstrap_Samples of count: int
    | Seed of seed: int
    | Newline_Marker of marker: string
    | Bertscore of model_dir: string
    | Bertscore_Layer of layer: int
    | Bertscore_Baseline of csv: string
    | Bertscore_Idf
    | Summac of nli_dir: string
    | Summac_Granularity of granularity: string
    | Summac_Conv of weights: string
    | Per_Example
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Predictions _ -> "system summaries, one example per line (UTF-8)."
            | References _ -> "reference summaries, aligned with the predictions by line."
            | Documents _ -> "source documents, aligned by line; adds compression, extractiveness, novel n-grams, coverage and density."
            | Stem -> "Porter-stem tokens longer than 3 characters for ROUGE (rouge-score use_stemmer=True)."
            | Json -> "print one JSON object (the shape stored in test_scores.json) instead of the table."
            | Bootstrap_Samples _ -> "bootstrap resamples for the intervals (default 1000, as rouge-score)."
            | Seed _ -> "bootstrap seed (default 0)."
            | Newline_Marker _ -> "a marker that stands for a sentence break inside a line (e.g. <n>); it becomes a newline, so ROUGE-Lsum sees sentences."
            | Bertscore _ -> "also BERTScore with this BERT or RoBERTa checkpoint folder (e.g. roberta-large), computed as bert_score does."
            | Bertscore_Layer _ -> "BERTScore's layer (default: bert_score's model2layers for the model, e.g. 17 for roberta-large)."
            | Bertscore_Baseline _ -> "rescale BERTScore with this bert_score baseline file (LAYER,P,R,F rows, e.g. rescale_baseline/en/roberta-large.tsv)."
            | Bertscore_Idf -> "weight BERTScore's tokens by idf over the references (bert_score idf=True)."
            | Summac _ -> "SummaC-ZS of each prediction against its document (needs --documents) with this NLI classifier folder (e.g. roberta-large-mnli)."
            | Summac_Granularity _ -> "SummaC chunking: sentence (default), paragraph, 2sents, document, mixed, or DOC-SUMMARY such as paragraph-sentence."
            | Summac_Conv _ -> "SummaC-Conv too, with these convolution weights: summac's published .bin (percentile bins, entailment) or a .safetensors written by the toolkit."
            | Per_Example -> "with --json, also each example's scores (ROUGE F1, sentence BLEU, BERTScore P/R/F, SummaC) under \"examples\"."

/// Runs the command (bad input: `InputErrors.guard` in `Cli.main` reports it, exit code 2).
let run (args: ParseResults<ScoreArgs>) : int =
    let read path =
        let lines = Metrics.Basics.readLines path
        match args.TryGetResult Newline_Marker with
        | Some marker when marker <> "" -> lines |> Array.map (fun l -> l.Replace(marker, "\n"))
        | _ -> lines
    let predictionsPath = args.GetResult Predictions
    let referencesPath = args.GetResult References
    let documentsPath = args.TryGetResult Documents
    let predictions = read predictionsPath
    let references = read referencesPath
    let documents = documentsPath |> Option.map Metrics.Basics.readLines
    Metrics.Basics.expectAligned (
        [ predictionsPath, predictions; referencesPath, references ]
        @ (match documentsPath, documents with
           | Some p, Some d -> [ p, d ]
           | _ -> []))
    let options =
        { Metrics.Scoring.defaultOptions with
            Stem = args.Contains Stem
            Bootstrap =
                { Metrics.Bootstrap.defaults with
                    Samples = args.GetResult(Bootstrap_Samples, Metrics.Bootstrap.defaults.Samples)
                    Seed = args.GetResult(Seed, Metrics.Bootstrap.defaults.Seed) } }
    let report = Metrics.Scoring.scoreCorpus options predictions references documents
    let report =
        match args.TryGetResult Bertscore with
        | Some dir ->
            BertScoreCommand.addBertScore dir (args.TryGetResult Bertscore_Layer) (args.Contains Bertscore_Idf)
                (args.TryGetResult Bertscore_Baseline) predictions references report
        | None -> report
    let report =
        match args.TryGetResult Summac, documents with
        | None, _ -> report
        | Some _, None -> invalidArg "--summac" "SummaC scores predictions against their documents: give --documents"
        | Some nliDir, Some docs ->
            let cfg =
                match Metrics.Consistency.Granularity.parse (args.GetResult(Summac_Granularity, "sentence")) with
                | Ok (d, s) -> { Metrics.Consistency.defaults with DocumentGranularity = d; SummaryGranularity = s }
                | Error e -> invalidArg "--summac-granularity" e
            use nli = Metrics.Nli.load Metrics.Nli.defaults nliDir
            let conv = args.TryGetResult Summac_Conv |> Option.map (fun f -> Metrics.SummaCConv.load Metrics.SummaCConv.defaults f, f)
            let run = Metrics.SummaC.run cfg conv nli docs predictions
            conv |> Option.iter (fun (m, _) -> m.Dispose())
            Metrics.Scoring.withSummaC run report
    if args.Contains Json then printfn "%s" (Metrics.Scoring.toJsonWith (args.Contains Per_Example) report)
    else printf "%s" (Metrics.Scoring.formatTable report)
    0
