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
