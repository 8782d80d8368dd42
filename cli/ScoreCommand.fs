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

/// The command-line flag of a `ModelMetricsConfig` field, for error messages.
let flagOf (field: string) : string =
    match field with
    | "BertScoreModel" -> "--bertscore"
    | "BertScoreLayer" -> "--bertscore-layer"
    | "BertScoreIdf" -> "--bertscore-idf"
    | "BertScoreBaseline" -> "--bertscore-baseline"
    | "SummaCModel" -> "--summac"
    | "SummaCGranularity" -> "--summac-granularity"
    | "SummaCConv" -> "--summac-conv"
    | other -> other

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
    let metrics =
        { Metrics.ModelMetrics.defaults with
            BertScoreModel = args.TryGetResult Bertscore
            BertScoreLayer = args.TryGetResult Bertscore_Layer
            BertScoreIdf = args.Contains Bertscore_Idf
            BertScoreBaseline = args.TryGetResult Bertscore_Baseline
            SummaCModel = args.TryGetResult Summac
            SummaCGranularity = args.GetResult(Summac_Granularity, Metrics.ModelMetrics.defaults.SummaCGranularity)
            SummaCConv = args.TryGetResult Summac_Conv }
    if metrics.SummaCModel.IsSome && documents.IsNone then
        invalidArg "--summac" "SummaC scores predictions against their documents: give --documents"
    // Every folder and file is checked before anything is loaded; each problem is named (exit code 2).
    Metrics.ModelMetrics.check flagOf metrics
    let report = Metrics.ModelMetrics.apply metrics predictions references documents report
    report.BertScore |> Option.iter (fun b ->
        let run = b.Run
        if run.TruncatedCandidates + run.TruncatedReferences > 0 then
            eprintfn "bertscore: %d prediction(s) and %d reference(s) were longer than %d tokens and were cut (as bert_score cuts them)"
                run.TruncatedCandidates run.TruncatedReferences run.MaxLength)
    if args.Contains Json then printfn "%s" (Metrics.Scoring.toJsonWith (args.Contains Per_Example) report)
    else printf "%s" (Metrics.Scoring.formatTable report)
    0
