/// Scoring a corpus: every example's ROUGE-1/2/L/Lsum, sentence BLEU and document statistics, their means
/// with bootstrap intervals, corpus BLEU, and the JSON and text forms `moe score` prints; `Scorer` is the C# facade.
///
/// Legend: N examples.
namespace Moe.Metrics

open System
open System.IO
open System.Text
open System.Text.Json

/// Settings for scoring a corpus.
type ScoreOptions =
    { /// Porter-stem tokens longer than 3 characters for ROUGE (rouge-score `use_stemmer`).
      Stem: bool
      /// Corpus BLEU settings; sentence BLEU uses the same with effective order.
      Bleu: Bleu.BleuConfig
      Bootstrap: Bootstrap.BootstrapConfig }

/// A corpus mean with its bootstrap interval.
type Estimate = { Mean: float; Low: float; Mid: float; High: float }

/// Estimates of precision, recall and F1.
type PrfEstimate = { Precision: Estimate; Recall: Estimate; F1: Estimate }

/// Everything scored for one example.
type ExampleScores =
    { Rouge: Rouge.RougeScores
      /// Sentence BLEU in [0, 100].
      SentenceBleu: float
      /// Present when documents were given.
      Document: Abstractiveness.DocumentStats option
      /// Present when SummaC was computed (`withSummaC`).
      SummaC: SummaC.SummaCExample option }

/// Corpus means of the document statistics.
type DocumentReport =
    { Compression: Estimate
      Extractiveness: Estimate
      /// n = 1 .. 4 [4].
      NovelNgrams: Estimate[]
      Coverage: Estimate
      Density: Estimate }

/// BERTScore of a corpus (`BertScorer.score`): the per-pair scores with their settings, and the corpus means with
/// bootstrap intervals (resampled with the report's settings, so with the same index sets as its other columns).
type BertScoreReport = { Run: BertScorer.BertScoreRun; Estimate: PrfEstimate }
/// SummaC over a corpus: corpus means with bootstrap intervals, and how they were computed.
type SummaCReport =
    { Run: SummaC.SummaCRun
      Zs: Estimate
      /// Present when convolution weights were given.
      Conv: Estimate option }

/// The scores of a whole corpus.
type ScoreReport =
    { N: int
      /// The options the report was computed with.
      Options: ScoreOptions
      Rouge1: PrfEstimate
      Rouge2: PrfEstimate
      RougeL: PrfEstimate
      RougeLsum: PrfEstimate
      /// Corpus BLEU (not a mean of sentence BLEU).
      Bleu: Bleu.BleuScore
      /// Mean sentence BLEU with its interval.
      SentenceBleu: Estimate
      Document: DocumentReport option
      Examples: ExampleScores[]
      /// BERTScore, when a model was given (`withBertScore`).
      BertScore: BertScoreReport option
      /// Present when SummaC was computed (`withSummaC`).
      SummaC: SummaCReport option }

/// Model-based metrics a run computes on its test predictions (the main job's `Eval` section, `moe summarize
/// --bertscore/--summac`, `moe score`): each is off until its checkpoint folder is given.
type ModelMetricsConfig =
    { /// A BERT or RoBERTa folder (e.g. roberta-large) for BERTScore; None: BERTScore is not computed.
      BertScoreModel: string option
      /// BERTScore's layer; None: bert_score's `model2layers` default for the model.
      BertScoreLayer: int option
      /// Weight BERTScore's tokens by idf over the references (bert_score `idf=True`).
      BertScoreIdf: bool
      /// A bert_score baseline file to rescale BERTScore with.
      BertScoreBaseline: string option
      /// A sequence classifier folder with entailment and contradiction labels (e.g. roberta-large-mnli) for
      /// SummaC; None: SummaC is not computed.
      SummaCModel: string option
      /// summac's granularity: sentence, paragraph, 2sents, document, mixed, or DOC-SUMMARY.
      SummaCGranularity: string
      /// SummaC-Conv weights (summac's .bin or a toolkit .safetensors); None: SummaC-ZS only.
      SummaCConv: string option }

/// Corpus scoring and its printed forms, opened with `Moe.Metrics`.
[<AutoOpen>]
module Scoring =
    /// No stemming, sacreBLEU's corpus defaults, rouge-score's bootstrap defaults with seed 0.
    let defaultOptions = { Stem = false; Bleu = Bleu.corpusDefaults; Bootstrap = Bootstrap.defaults }

    /// Scores N predictions against N references (and N documents when given): per-example ROUGE-1/2/L/Lsum,
    /// sentence BLEU and document statistics, their corpus means with bootstrap intervals, and corpus BLEU.
    /// An empty prediction is scored (0), never skipped. Raises `ArgumentException` for mismatched lengths or N = 0.
    let scoreCorpus (opts: ScoreOptions) (predictions: string[]) (references: string[]) (documents: string[] option) : ScoreReport =
        let n = predictions.Length
        if n = 0 then invalidArg "predictions" "expected at least one prediction, got none"
        if references.Length <> n then
            invalidArg "references" (sprintf "expected one reference per prediction, got %d predictions and %d references" n references.Length)
        match documents with
        | Some d when d.Length <> n ->
            invalidArg "documents" (sprintf "expected one document per prediction, got %d predictions and %d documents" n d.Length)
        | _ -> ()
        let sentenceCfg = { opts.Bleu with EffectiveOrder = true }
        let stats = Array.map2 (fun p r -> Bleu.segmentStatistics opts.Bleu p [| r |]) predictions references
        let examples =
            Array.init n (fun i ->
                { Rouge = Rouge.scoreAll opts.Stem references[i] predictions[i]
                  SentenceBleu = (Bleu.fromStatistics sentenceCfg stats[i]).Score
                  Document = documents |> Option.map (fun d -> Abstractiveness.score predictions[i] d[i])
                  SummaC = None })
        // Every per-example measure becomes one column [N]; all columns are resampled together.
        let columns = ResizeArray<float[]>()
        let add (f: ExampleScores -> float) =
            columns.Add(examples |> Array.map f)
            columns.Count - 1
        let addPrf (pick: Rouge.RougeScores -> Prf) =
            add (fun e -> (pick e.Rouge).Precision), add (fun e -> (pick e.Rouge).Recall), add (fun e -> (pick e.Rouge).F1)
        let rouge1, rouge2, rougeL, rougeLsum = addPrf _.Rouge1, addPrf _.Rouge2, addPrf _.RougeL, addPrf _.RougeLsum
        let sentenceBleu = add _.SentenceBleu
        let docIndices =
            documents
            |> Option.map (fun _ ->
                let doc (f: Abstractiveness.DocumentStats -> float) = add (fun e -> f e.Document.Value)
                let compression = doc _.Compression
                let extractiveness = doc _.Extractiveness
                let novel = Array.init Abstractiveness.novelNgramOrders (fun k -> doc (fun s -> s.NovelNgrams[k]))
                compression, extractiveness, novel, doc _.Coverage, doc _.Density)
        let intervals = Bootstrap.intervals opts.Bootstrap (columns.ToArray())
        let estimate k =
            let iv = intervals[k]
            { Mean = Array.average columns[k]; Low = iv.Low; Mid = iv.Mid; High = iv.High }
        let prf (p, r, f) = { Precision = estimate p; Recall = estimate r; F1 = estimate f }
        { N = n
          Options = opts
          Rouge1 = prf rouge1
          Rouge2 = prf rouge2
          RougeL = prf rougeL
          RougeLsum = prf rougeLsum
          Bleu = stats |> Bleu.sumStatistics opts.Bleu.MaxOrder |> Bleu.fromStatistics opts.Bleu
          SentenceBleu = estimate sentenceBleu
          Document =
            docIndices
            |> Option.map (fun (compression, extractiveness, novel, coverage, density) ->
                { Compression = estimate compression
                  Extractiveness = estimate extractiveness
                  NovelNgrams = novel |> Array.map estimate
                  Coverage = estimate coverage
                  Density = estimate density })
          Examples = examples
          BertScore = None
          SummaC = None }

    /// The report with BERTScore added: its per-pair scores (one per example, in order) and their means with
    /// bootstrap intervals drawn with the report's bootstrap settings.
    let withBertScore (run: BertScorer.BertScoreRun) (report: ScoreReport) : ScoreReport =
        if run.Scores.Length <> report.N then
            invalidArg "run" (sprintf "expected BERTScore of the report's %d examples, got %d scores" report.N run.Scores.Length)
        let columns = [| run.Scores |> Array.map _.Precision; run.Scores |> Array.map _.Recall; run.Scores |> Array.map _.F1 |]
        let iv = Bootstrap.intervals report.Options.Bootstrap columns
        let estimate k = { Mean = Array.average columns[k]; Low = iv[k].Low; Mid = iv[k].Mid; High = iv[k].High }
        { report with BertScore = Some { Run = run; Estimate = { Precision = estimate 0; Recall = estimate 1; F1 = estimate 2 } } }

    /// BERTScore's JSON object: precision, recall, f1 (corpus means), their intervals, and what it was computed with.
    let private writeBertScore (w: Utf8JsonWriter) (b: BertScoreReport) =
        w.WriteStartObject("bertscore")
        w.WriteNumber("precision", b.Estimate.Precision.Mean)
        w.WriteNumber("recall", b.Estimate.Recall.Mean)
        w.WriteNumber("f1", b.Estimate.F1.Mean)
        w.WriteStartObject("intervals")
        for name, e in [ "precision", b.Estimate.Precision; "recall", b.Estimate.Recall; "f1", b.Estimate.F1 ] do
            w.WriteStartObject(name)
            w.WriteNumber("low", e.Low)
            w.WriteNumber("mid", e.Mid)
            w.WriteNumber("high", e.High)
            w.WriteEndObject()
        w.WriteEndObject()
        let r = b.Run
        w.WriteString("model", r.Model)
        w.WriteNumber("layer", r.Layer)
        w.WriteString("layer_source", r.LayerSource)
        w.WriteBoolean("idf", r.UseIdf)
        match r.Baseline with
        | Some(file, _) -> w.WriteString("baseline", file)
        | None -> w.WriteNull("baseline")
        w.WriteNumber("max_length", r.MaxLength)
        w.WriteNumber("truncated_candidates", r.TruncatedCandidates)
        w.WriteNumber("truncated_references", r.TruncatedReferences)
        w.WriteEndObject()

    /// Each example's scores as a JSON array (`moe score --json --per-example`): ROUGE F1s, sentence BLEU and,
    /// when computed, BERTScore's precision, recall and f1 and SummaC's scores, in input order.
    let private writeExamples (w: Utf8JsonWriter) (report: ScoreReport) =
        w.WriteStartArray()
        report.Examples |> Array.iteri (fun i e ->
            w.WriteStartObject()
            w.WriteNumber("index", i)
            for name, p in [ "rouge1", e.Rouge.Rouge1; "rouge2", e.Rouge.Rouge2; "rougeL", e.Rouge.RougeL; "rougeLsum", e.Rouge.RougeLsum ] do
                w.WriteNumber(name, p.F1)
            w.WriteNumber("sentence_bleu", e.SentenceBleu)
            match report.BertScore with
            | Some b ->
                let s = b.Run.Scores[i]
                w.WriteStartObject("bertscore")
                w.WriteNumber("precision", s.Precision)
                w.WriteNumber("recall", s.Recall)
                w.WriteNumber("f1", s.F1)
                w.WriteEndObject()
            | None -> ()
            e.SummaC |> Option.iter (fun s ->
                w.WriteNumber("summac_zs", s.Zs)
                s.Conv |> Option.iter (fun c -> w.WriteNumber("summac_conv", c)))
            w.WriteEndObject())
        w.WriteEndArray()

    /// The report with SummaC's per-example scores and their corpus means with bootstrap intervals (the report's
    /// bootstrap settings; with the same seed and N the resamples are the ones the other metrics drew).
    let withSummaC (run: SummaC.SummaCRun) (report: ScoreReport) : ScoreReport =
        if run.Examples.Length <> report.N then
            invalidArg "run" (sprintf "expected SummaC scores for the report's %d examples, got %d" report.N run.Examples.Length)
        let zs = run.Examples |> Array.map _.Zs
        let conv = if run.Examples |> Array.forall (fun e -> e.Conv.IsSome) then Some(run.Examples |> Array.map (fun e -> e.Conv.Value)) else None
        let columns = Array.append [| zs |] (Option.toArray conv)
        let intervals = Bootstrap.intervals report.Options.Bootstrap columns
        let estimate k = { Mean = Array.average columns[k]; Low = intervals[k].Low; Mid = intervals[k].Mid; High = intervals[k].High }
        { report with
            SummaC = Some { Run = run; Zs = estimate 0; Conv = conv |> Option.map (fun _ -> estimate 1) }
            Examples = Array.map2 (fun (e: ExampleScores) s -> { e with SummaC = Some s }) report.Examples run.Examples }

    /// "summac_zs" and "summac_conv" (corpus means) and "summac_counts" (pairs, truncated pairs, summaries without a
    /// chunk, document chunks not scored) when SummaC was computed.
    let private writeSummaC (w: Utf8JsonWriter) (report: ScoreReport) =
        match report.SummaC with
        | None -> ()
        | Some s ->
            w.WriteNumber("summac_zs", s.Zs.Mean)
            s.Conv |> Option.iter (fun c -> w.WriteNumber("summac_conv", c.Mean))
            w.WriteStartObject("summac_counts")
            w.WriteNumber("pairs", s.Run.Pairs)
            w.WriteNumber("truncated_pairs", s.Run.TruncatedPairs)
            w.WriteNumber("summaries_without_chunks", s.Run.SummariesWithoutChunks)
            w.WriteNumber("dropped_document_chunks", s.Run.DroppedDocumentChunks)
            w.WriteEndObject()

    /// The report as the JSON object `moe score --json` prints and runs store in test_scores.json:
    /// {"n", "rouge1"/"rouge2"/"rougeL"/"rougeLsum": {"precision", "recall", "f1"}, "bleu"} and, with documents,
    /// "compression", "extractiveness" and "novel_ngrams": {"1" .. "4"}. ROUGE are fractions in [0, 1]: the exact
    /// mean of the per-example scores (rouge-score's `BootstrapAggregator` reports the median of resampled means
    /// as "mid", which differs from this mean by resampling noise; the report keeps it as `Mid`). BLEU is corpus
    /// BLEU in [0, 100]. With BERTScore: "bertscore"; with SummaC: "summac_zs", "summac_conv" and "summac_counts";
    /// with `perExample`, each example's scores follow under "examples" (`writeExamples`).
    let toJsonWith (perExample: bool) (report: ScoreReport) : string =
        use stream = new MemoryStream()
        let w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = false))
        w.WriteStartObject()
        w.WriteNumber("n", report.N)
        let prf (name: string) (e: PrfEstimate) =
            w.WriteStartObject(name)
            w.WriteNumber("precision", e.Precision.Mean)
            w.WriteNumber("recall", e.Recall.Mean)
            w.WriteNumber("f1", e.F1.Mean)
            w.WriteEndObject()
        prf "rouge1" report.Rouge1
        prf "rouge2" report.Rouge2
        prf "rougeL" report.RougeL
        prf "rougeLsum" report.RougeLsum
        w.WriteNumber("bleu", report.Bleu.Score)
        match report.Document with
        | None -> ()
        | Some d ->
            w.WriteNumber("compression", d.Compression.Mean)
            w.WriteNumber("extractiveness", d.Extractiveness.Mean)
            w.WriteStartObject("novel_ngrams")
            d.NovelNgrams |> Array.iteri (fun k e -> w.WriteNumber(string (k + 1), e.Mean))
            w.WriteEndObject()
        report.BertScore |> Option.iter (writeBertScore w)
        writeSummaC w report
        if perExample then
            w.WritePropertyName("examples")
            writeExamples w report
        w.WriteEndObject()
        w.Flush()
        w.Dispose()
        Encoding.UTF8.GetString(stream.ToArray())

    /// The report's JSON object without the per-example scores (`toJsonWith false`).
    let toJson (report: ScoreReport) : string = toJsonWith false report

    /// A plain-text table of the report: each metric's mean and bootstrap interval (ROUGE and document statistics
    /// as fractions, BLEU in [0, 100]).
    let formatTable (report: ScoreReport) : string =
        let sb = StringBuilder()
        let line (fmt: string) = sb.AppendLine fmt |> ignore
        let boot = report.Options.Bootstrap
        line (sprintf "examples: %d   stemming: %s   intervals: %g%% bootstrap (%d resamples, seed %d)"
                report.N (if report.Options.Stem then "on" else "off") (100.0 * boot.Confidence) boot.Samples boot.Seed)
        line ""
        line (sprintf "%-12s %-9s %8s   %-19s" "metric" "measure" "mean" "interval")
        let row (metric: string) (measure: string) (e: Estimate) =
            line (sprintf "%-12s %-9s %8.4f   [%.4f, %.4f]" metric measure e.Mean e.Low e.High)
        for name, e in [ "rouge1", report.Rouge1; "rouge2", report.Rouge2; "rougeL", report.RougeL; "rougeLsum", report.RougeLsum ] do
            row name "precision" e.Precision
            row name "recall" e.Recall
            row name "f1" e.F1
        let b = report.Bleu
        line (sprintf "%-12s %-9s %8.2f   %s (BP %.3f, hyp %d, ref %d)" "bleu" "corpus" b.Score
                (b.Precisions |> Array.map (sprintf "%.1f") |> String.concat "/") b.BrevityPenalty b.Statistics.HypothesisLength b.Statistics.ReferenceLength)
        line (sprintf "%-12s %-9s %8.2f   [%.2f, %.2f]" "bleu" "sentence" report.SentenceBleu.Mean report.SentenceBleu.Low report.SentenceBleu.High)
        match report.Document with
        | None -> ()
        | Some d ->
            row "compression" "mean" d.Compression
            row "extractive" "mean" d.Extractiveness
            d.NovelNgrams |> Array.iteri (fun k e -> row (sprintf "novel-%dgram" (k + 1)) "mean" e)
            row "coverage" "mean" d.Coverage
            line (sprintf "%-12s %-9s %8.3f   [%.3f, %.3f]" "density" "mean" d.Density.Mean d.Density.Low d.Density.High)
        match report.BertScore with
        | None -> ()
        | Some b ->
            row "bertscore" "precision" b.Estimate.Precision
            row "bertscore" "recall" b.Estimate.Recall
            row "bertscore" "f1" b.Estimate.F1
            let r = b.Run
            line (sprintf "bertscore: %s, layer %d (%s), idf %s, %s; %d candidate(s) and %d reference(s) cut at %d tokens"
                    r.Model r.Layer r.LayerSource (if r.UseIdf then "on" else "off")
                    (match r.Baseline with Some(f, _) -> "rescaled with " + f | None -> "not rescaled")
                    r.TruncatedCandidates r.TruncatedReferences r.MaxLength)
        match report.SummaC with
        | None -> ()
        | Some s ->
            row "summac-zs" "mean" s.Zs
            s.Conv |> Option.iter (row "summac-conv" "mean")
            line ""
            line (sprintf "SummaC: NLI %s, granularity %s%s; %d pairs, %d cut to %d tokens, %d summaries without a chunk over the minimum length (scored 0), %d document chunks past the limit not scored"
                    s.Run.Model s.Run.Granularity (match s.Run.ConvWeights with Some f -> ", convolution " + f | None -> "")
                    s.Run.Pairs s.Run.TruncatedPairs s.Run.MaxTokens s.Run.SummariesWithoutChunks s.Run.DroppedDocumentChunks)
        sb.ToString()


/// Configuring, checking and running the model-based metrics (BERTScore, SummaC) of a score report.
module ModelMetrics =
    open Moe

    /// Off: no model folder, so neither BERTScore nor SummaC is computed (and the output says so).
    let defaults : ModelMetricsConfig =
        { BertScoreModel = None; BertScoreLayer = None; BertScoreIdf = false; BertScoreBaseline = None
          SummaCModel = None; SummaCGranularity = "sentence"; SummaCConv = None }

    /// The loaders' plain `failwith`s (no such folder, another architecture) as a problem naming the folder.
    let private problemOf (check: unit -> unit) : string option =
        try check (); None
        with e when e.GetType() = typeof<Exception> || (e :? ArgumentException) || (e :? IOException) ->
            Some(match e with :? ArgumentException as a when not (isNull a.ParamName) -> a.Message.Replace(sprintf " (Parameter '%s')" a.ParamName, "") | _ -> e.Message)

    /// Every problem with the settings, read from the folders' config.json files only (nothing is loaded), so a run
    /// can refuse them before it trains: a folder without a BERT/RoBERTa encoder or sequence classifier, a BERTScore
    /// layer that cannot be chosen, an NLI model without entailment/contradiction labels, a bad granularity, a
    /// missing file, and settings given without the model they belong to. `nameOf` names a field for the user
    /// (`Eval.BertScoreModel` in a config, `--bertscore` on a command line).
    let problems (nameOf: string -> string) (cfg: ModelMetricsConfig) : string list =
        [ match cfg.BertScoreModel with
          | Some dir ->
              match problemOf (fun () -> Encoders.checkEncoderFolder dir) with
              | Some p -> sprintf "%s: %s" (nameOf "BertScoreModel") p
              | None ->
                  let configFile = Path.Combine(dir, "config.json")
                  let choose () =
                      let nameOrPath = (HfConfig.ConfigReader.Open configFile).StringOption "_name_or_path"
                      BertScorer.chooseLayer dir nameOrPath (Encoders.EncoderConfig.parse configFile).NumLayers cfg.BertScoreLayer |> ignore
                  match problemOf choose with
                  | Some p -> sprintf "%s: %s" (nameOf "BertScoreLayer") p
                  | None -> ()
          | None ->
              for field, given in [ "BertScoreLayer", cfg.BertScoreLayer.IsSome; "BertScoreIdf", cfg.BertScoreIdf; "BertScoreBaseline", cfg.BertScoreBaseline.IsSome ] do
                  if given then sprintf "%s is set but %s is not: give the BERTScore model folder" (nameOf field) (nameOf "BertScoreModel")
          match cfg.BertScoreBaseline with
          | Some f when not (File.Exists f) -> sprintf "%s: file not found: %s" (nameOf "BertScoreBaseline") f
          | _ -> ()
          match cfg.SummaCModel with
          | Some dir ->
              let check () =
                  Encoders.checkArchitecture dir Encoders.classifierArchitectures "a sequence classifier (e.g. roberta-large-mnli)"
                  let configFile = Path.Combine(dir, "config.json")
                  Consistency.labelIds configFile (Encoders.EncoderConfig.parse configFile).Labels |> ignore
              match problemOf check with
              | Some p -> sprintf "%s: %s" (nameOf "SummaCModel") p
              | None -> ()
          | None ->
              if cfg.SummaCConv.IsSome then sprintf "%s is set but %s is not: give the NLI model folder" (nameOf "SummaCConv") (nameOf "SummaCModel")
          match Consistency.Granularity.parse cfg.SummaCGranularity with
          | Error e -> sprintf "%s: %s" (nameOf "SummaCGranularity") e
          | Ok _ -> ()
          match cfg.SummaCConv with
          | Some f when not (File.Exists f) -> sprintf "%s: file not found: %s" (nameOf "SummaCConv") f
          | _ -> () ]

    /// `problems` with the fields' own names (`BertScoreModel`), as a config section's `validate`.
    let validate (cfg: ModelMetricsConfig) : string list = problems id cfg

    /// Raises `ArgumentException` listing every problem (`problems nameOf`).
    let check (nameOf: string -> string) (cfg: ModelMetricsConfig) : unit =
        match problems nameOf cfg with
        | [] -> ()
        | ps -> invalidArg "cfg" (String.concat "; " ps)

    /// BERTScore of the predictions against the references with `cfg`'s model (`BertScorer.scoreFolder`).
    let bertScore (cfg: ModelMetricsConfig) (dir: string) (predictions: string[]) (references: string[]) : BertScorer.BertScoreRun =
        let settings = { BertScorer.defaults with Layer = cfg.BertScoreLayer; UseIdf = cfg.BertScoreIdf; BaselineFile = cfg.BertScoreBaseline }
        BertScorer.scoreFolder settings dir predictions references

    /// SummaC-ZS (and -Conv with weights) of the predictions against their documents with `cfg`'s NLI model.
    let summaC (cfg: ModelMetricsConfig) (dir: string) (predictions: string[]) (documents: string[]) : SummaC.SummaCRun =
        let granularity =
            match Consistency.Granularity.parse cfg.SummaCGranularity with
            | Ok(d, s) -> { Consistency.defaults with DocumentGranularity = d; SummaryGranularity = s }
            | Error e -> invalidArg "SummaCGranularity" e
        use nli = Moe.Metrics.Nli.load Moe.Metrics.Nli.defaults dir
        let conv = cfg.SummaCConv |> Option.map (fun f -> SummaCConv.load SummaCConv.defaults f, f)
        try SummaC.run granularity conv nli documents predictions
        finally conv |> Option.iter (fun (m, _) -> m.Dispose())

    /// The report with BERTScore and SummaC added where `cfg` names their models (`withBertScore`, `withSummaC`:
    /// corpus means with bootstrap intervals). SummaC needs the documents. Bad input (a bad folder, an empty
    /// prediction) raises `ArgumentException`.
    let apply (cfg: ModelMetricsConfig) (predictions: string[]) (references: string[]) (documents: string[] option) (report: ScoreReport) : ScoreReport =
        let report =
            match cfg.BertScoreModel with
            | Some dir -> withBertScore (bertScore cfg dir predictions references) report
            | None -> report
        match cfg.SummaCModel, documents with
        | None, _ -> report
        | Some _, None -> invalidArg "documents" "SummaC scores predictions against their documents: give the documents"
        | Some dir, Some docs -> withSummaC (summaC cfg dir predictions docs) report

    /// .NET's " (Parameter 'name')" suffixes, which nested `invalidArg`s repeat.
    let private parameterSuffix = Text.RegularExpressions.Regex(@" \(Parameter '[^']*'\)")

    /// `apply` for a run that has already trained or decoded: a metric that fails on this input (e.g. an empty
    /// prediction, which BERTScore refuses) is left out, and the returned notes say why, so the run's other scores
    /// are still written. Also notes each metric that was not configured.
    let applyToRun (cfg: ModelMetricsConfig) (predictions: string[]) (references: string[]) (documents: string[]) (report: ScoreReport) : ScoreReport * string list =
        let attempt (name: string) (model: string option) (how: string) (add: string -> ScoreReport -> ScoreReport) (report: ScoreReport) =
            match model with
            | None -> report, [ sprintf "%s: not computed (no model configured: %s)" name how ]
            | Some dir ->
                try add dir report, []
                with
                | :? ArgumentException as e -> report, [ sprintf "%s: not computed: %s" name (parameterSuffix.Replace(e.Message, "")) ]
                | :? InvalidDataException as e -> report, [ sprintf "%s: not computed: %s" name e.Message ]
        let report, bertNotes =
            attempt "BERTScore" cfg.BertScoreModel "Eval.BertScoreModel, or --bertscore DIR"
                (fun dir r -> withBertScore (bertScore cfg dir predictions references) r) report
        let report, summacNotes =
            attempt "SummaC" cfg.SummaCModel "Eval.SummaCModel, or --summac DIR"
                (fun dir r -> withSummaC (summaC cfg dir predictions documents) r) report
        report, bertNotes @ summacNotes

    /// The model-based metrics' lines of a printed comparison: each computed one's mean with its interval.
    let describe (report: ScoreReport) : string list =
        [ match report.BertScore with
          | Some b ->
              let e = b.Estimate.F1
              sprintf "BERTScore F1 %.4f [%.4f, %.4f] (P %.4f, R %.4f; %s, layer %d, idf %s)"
                  e.Mean e.Low e.High b.Estimate.Precision.Mean b.Estimate.Recall.Mean b.Run.Model b.Run.Layer (if b.Run.UseIdf then "on" else "off")
          | None -> ()
          match report.SummaC with
          | Some s ->
              sprintf "SummaC-ZS %.4f [%.4f, %.4f]%s (%s, granularity %s)" s.Zs.Mean s.Zs.Low s.Zs.High
                  (match s.Conv with Some c -> sprintf ", SummaC-Conv %.4f [%.4f, %.4f]" c.Mean c.Low c.High | None -> "")
                  s.Run.Model s.Run.Granularity
          | None -> () ]

/// A C#-friendly facade over `scoreCorpus`, `toJson` and `formatTable`.
type Scorer =
    /// Scores in-memory lists; `documents` may be null.
    static member Score(predictions: string[], references: string[], documents: string[], stem: bool) : ScoreReport =
        scoreCorpus { defaultOptions with Stem = stem } predictions references (Option.ofObj documents)

    /// Scores with explicit options; `documents` may be null.
    static member Score(options: ScoreOptions, predictions: string[], references: string[], documents: string[]) : ScoreReport =
        scoreCorpus options predictions references (Option.ofObj documents)

    /// The JSON object of `moe score --json`.
    static member ToJson(report: ScoreReport) : string = toJson report

    /// The text table of `moe score`.
    static member ToTable(report: ScoreReport) : string = formatTable report
