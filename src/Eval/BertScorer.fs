/// BERTScore (Zhang et al. 2020) on a pretrained BERT or RoBERTa folder, computed exactly as bert_score 0.3.13's
/// `score()` does (utils.py: sent_encode, get_idf_dict, get_bert_embedding, greedy_cos_idf,
/// bert_cos_score_idf): the encoder cut at bert_score's layer for the model (`model2layers`), texts stripped and
/// encoded with special tokens (RoBERTa with add_prefix_space, as bert_score's slow tokenizer path) and cut at
/// the model's maximum length, idf from the references with add-one smoothing (bert_score's `get_idf_dict`) or
/// weight 1 with the separator and class tokens at 0, greedy cosine matching in float32 per batch of pairs,
/// optional rescaling with a bert_score baseline file. The encoder also serves `BertScore.IContextualEmbedder`,
/// so the reference aggregation in `ModelBased.fs` can be run on it.
///
/// Legend: N pairs, B texts or pairs in a batch, L tokens, D hidden width.
module Moe.Metrics.BertScorer

open System
open System.Collections.Generic
open System.IO
open System.Text.Json.Nodes
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Encoders

/// bert_score's `model2layers` (utils.py, v0.3.13) for the BERT and RoBERTa checkpoints: the layer whose
/// BERTScore correlated best with WMT16 human judgements, by checkpoint name.
let model2layers : (string * int) list =
    [ "bert-base-uncased", 9; "bert-large-uncased", 18; "bert-base-cased-finetuned-mrpc", 9
      "bert-base-multilingual-cased", 9; "bert-base-chinese", 8; "roberta-base", 10; "roberta-large", 17
      "roberta-large-mnli", 19; "roberta-base-openai-detector", 7; "roberta-large-openai-detector", 15
      "distilroberta-base", 5; "vinai/bertweet-base", 9; "SpanBERT/spanbert-base-cased", 8
      "SpanBERT/spanbert-large-cased", 17; "ProsusAI/finbert", 10; "dbmdz/bert-base-turkish-cased", 10
      "princeton-nlp/unsup-simcse-bert-base-uncased", 10; "princeton-nlp/unsup-simcse-bert-large-uncased", 18
      "princeton-nlp/unsup-simcse-roberta-base", 8; "princeton-nlp/unsup-simcse-roberta-large", 13
      "princeton-nlp/sup-simcse-bert-base-uncased", 10; "princeton-nlp/sup-simcse-bert-large-uncased", 18
      "princeton-nlp/sup-simcse-roberta-base", 10; "princeton-nlp/sup-simcse-roberta-large", 16 ]
    @ [ for l, h, layer in [ 2, 128, 1; 2, 256, 1; 2, 512, 1; 2, 768, 2; 4, 128, 3; 4, 256, 3; 4, 512, 3; 4, 768, 3
                             6, 128, 5; 6, 256, 5; 6, 512, 5; 6, 768, 5; 8, 128, 7; 8, 256, 7; 8, 512, 6; 8, 768, 7
                             10, 128, 8; 10, 256, 8; 10, 512, 9; 10, 768, 8; 12, 128, 10; 12, 256, 11; 12, 512, 10; 12, 768, 9 ] ->
            sprintf "google/bert_uncased_L-%d_H-%d_A-%d" l h (h / 64), layer ]

/// The layer used for a model folder, and how it was chosen (for the report). `requested` wins; else the folder's
/// name (its last one or two path segments, or config.json's `_name_or_path`) is looked up in `model2layers`, and
/// the table's layer is bounded by the checkpoint's layer count (a reduced copy of roberta-large uses its last
/// layer). Layer 0 is the embeddings' output. Fails for a layer outside 0 .. numLayers or an unknown name.
let chooseLayer (dir: string) (nameOrPath: string option) (numLayers: int) (requested: int option) : int * string =
    match requested with
    | Some l when l < 0 || l > numLayers ->
        invalidArg "layer" (sprintf "BERTScore layer %d is outside 0 .. %d (the embeddings, then %s's %d layers)" l numLayers dir numLayers)
    | Some l -> l, "requested"
    | None ->
        let full = Path.GetFullPath dir |> fun p -> p.TrimEnd('/', '\\')
        let last = Path.GetFileName full
        let lastTwo = sprintf "%s/%s" (Path.GetFileName(Path.GetDirectoryName full)) last
        let candidates = [ yield lastTwo; yield last; match nameOrPath with Some n -> yield n.TrimEnd('/') | None -> () ]
        match candidates |> List.tryPick (fun c -> model2layers |> List.tryFind (fun (n, _) -> n = c)) with
        | Some(name, layer) when layer <= numLayers -> layer, sprintf "bert_score's model2layers for %s" name
        | Some(name, layer) ->
            numLayers, sprintf "bert_score's model2layers says %d for %s; this checkpoint has %d layers, so its last" layer name numLayers
        | None ->
            invalidArg "layer" (sprintf "%s: no default BERTScore layer for this model (looked up %s in bert_score's model2layers, e.g. roberta-large 17, roberta-base 10, bert-base-uncased 9); pass the layer (--bertscore-layer N, 0 .. %d)" dir (String.Join(", ", candidates |> List.distinct)) numLayers)

/// BERTScore settings.
type BertScoreSettings =
    { /// The encoder layer; None = `chooseLayer`'s default for the folder.
      Layer: int option
      /// Weight tokens by idf over the references (bert_score `idf=True`).
      UseIdf: bool
      /// A bert_score baseline file (`rescale_baseline/<lang>/<model>.tsv`, comma-separated LAYER,P,R,F) to rescale
      /// with, as bert_score's `baseline_path` with `rescale_with_baseline=True`.
      BaselineFile: string option
      /// Texts per encoder batch and pairs per matching batch (bert_score's `batch_size`, 64).
      BatchSize: int }

/// bert_score's defaults: the model's layer, no idf, no rescaling, batches of 64.
let defaults = { Layer = None; UseIdf = false; BaselineFile = None; BatchSize = 64 }

/// Reads the baseline row of `layer` from a bert_score baseline file: a header `LAYER,P,R,F`, then row k for
/// layer k (bert_score takes `iloc[num_layers]`). Errors name the file and line.
let readBaseline (file: string) (layer: int) : Prf =
    if not (File.Exists file) then raise (FileNotFoundException(sprintf "BERTScore baseline file not found: %s" file, file))
    let lines = File.ReadAllLines file |> Array.filter (fun l -> l.Trim() <> "")
    let header = if lines.Length = 0 then "" else lines[0].Trim()
    if header.Replace(" ", "") <> "LAYER,P,R,F" then
        raise (InvalidDataException(sprintf "%s:1: expected bert_score's baseline header \"LAYER,P,R,F\", got \"%s\"" file header))
    if lines.Length < layer + 2 then
        raise (InvalidDataException(sprintf "%s: has baselines for layers 0 .. %d, not layer %d" file (lines.Length - 2) layer))
    let line = lines[layer + 1]
    let number (text: string) =
        match Double.TryParse(text.Trim(), Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
        | true, v -> v
        | _ -> raise (InvalidDataException(sprintf "%s:%d: expected a number, got \"%s\"" file (layer + 2) text))
    match line.Split ',' with
    | [| l; p; r; f |] ->
        if int (number l) <> layer then raise (InvalidDataException(sprintf "%s:%d: expected the row of layer %d, got layer %s" file (layer + 2) layer l))
        { Precision = float (float32 (number p)); Recall = float (float32 (number r)); F1 = float (float32 (number f)) }
    | _ -> raise (InvalidDataException(sprintf "%s:%d: expected 4 comma-separated values LAYER,P,R,F, got \"%s\"" file (layer + 2) line))

/// RoBERTa's tokenizer as bert_score runs it: `tokenizer.encode(..., add_prefix_space=True)`, i.e. the folder's
/// tokenizer.json (or the one built from vocab.json + merges.txt) with its ByteLevel pre-tokenizer and
/// RobertaProcessing set to add a prefix space. Built once (the vocabulary is large).
let private robertaWithPrefixSpace (dir: string) : HfTokenizer.HfTokenizer =
    let settings = { HfTokenizer.readSettings dir with AddPrefixSpace = Some true }
    let file name = Path.Combine(dir, name)
    let doc, source =
        if File.Exists(file "tokenizer.json") then
            match JsonNode.Parse(File.ReadAllText(file "tokenizer.json")) with
            | :? JsonObject as o -> o, file "tokenizer.json"
            | _ -> failwithf "%s: expected a JSON object" (file "tokenizer.json")
        elif File.Exists(file "vocab.json") && File.Exists(file "merges.txt") then
            HfTokenizer.bpeDocument (file "vocab.json") (file "merges.txt") settings, file "vocab.json"
        else failwithf "no RoBERTa tokenizer files in %s: looked for tokenizer.json, vocab.json + merges.txt" dir
    let typeOf (key: string) =
        match doc[key] with
        | :? JsonObject as o when not (isNull o["type"]) -> Some(o["type"].GetValue<string>())
        | _ -> None
    if typeOf "pre_tokenizer" <> Some "ByteLevel" then
        failwithf "%s: expected a byte-level BPE tokenizer for RoBERTa (a ByteLevel pre-tokenizer), got %s" source (string doc["pre_tokenizer"])
    doc["pre_tokenizer"]["add_prefix_space"] <- JsonValue.Create true
    if typeOf "post_processor" = Some "RobertaProcessing" then doc["post_processor"]["add_prefix_space"] <- JsonValue.Create true
    new HfTokenizer.HfTokenizer(source, doc, settings)

/// One text as BERTScore sees it: ids with special tokens, and whether it was cut to fit.
type EncodedText = { Ids: int[]; Truncated: bool }

/// A BERT or RoBERTa folder loaded for BERTScore: the encoder, its tokenizer as bert_score runs it, the layer, and
/// the longest sequence encoded (the tokenizer's model_max_length bounded by the model's positions).
type BertScoreModel(dir: string, requestedLayer: int option) =
    // the folder and the layer are checked before anything is loaded
    do checkEncoderFolder dir
    let layer, layerSource =
        let configFile = Path.Combine(dir, "config.json")
        let nameOrPath = (HfConfig.ConfigReader.Open configFile).StringOption "_name_or_path"
        chooseLayer dir nameOrPath (EncoderConfig.parse configFile).NumLayers requestedLayer
    let encoder = loadEncoder dir
    let cfg = encoder.Config
    let tokenizer =
        let t = match cfg.Family with Roberta -> robertaWithPrefixSpace dir | Bert -> WordPiece.fromFolder dir
        HfTokenizer.checkAgainst cfg.VocabSize t
        t
    let roleId (name: string) (id: int option) =
        match id with
        | Some i -> i
        | None -> failwithf "%s: the tokenizer has no %s, which BERTScore needs" dir name
    let clsId = roleId "cls_token" (tokenizer.Settings.Specials.TryFind "cls_token" |> Option.bind tokenizer.TokenToId)
    let sepId = roleId "sep_token" (tokenizer.Settings.Specials.TryFind "sep_token" |> Option.bind tokenizer.TokenToId)
    let padId = roleId "pad_token" tokenizer.PadId
    let maxLength =
        match tokenizer.ModelMaxLength with
        | Some m -> min m (maxTokens cfg)
        | None -> maxTokens cfg

    member _.Folder = dir
    member _.Encoder = encoder
    member _.Tokenizer = tokenizer
    member _.Layer = layer
    /// How the layer was chosen, for the report.
    member _.LayerSource = layerSource
    /// Longest sequence encoded, special tokens included; longer texts are cut (and counted).
    member _.MaxLength = maxLength
    /// The class and separator ids (`<s>`/`</s>` or [CLS]/[SEP]), weighted 0 without idf.
    member _.ClsId = clsId
    member _.SepId = sepId
    member _.Name = sprintf "%s (layer %d)" (Path.GetFileName(Path.GetFullPath(dir).TrimEnd('/', '\\'))) layer

    /// bert_score's `sent_encode`: the stripped text with special tokens, its own ids cut to fit `MaxLength`.
    /// Fails on a text that is empty after stripping (bert_score warns and scores it 0).
    member _.Encode(text: string) : EncodedText =
        let s = text.Trim()
        if s = "" then invalidArg "text" "expected a non-empty text; BERTScore of an empty text is undefined (bert_score only warns and sets it to 0)"
        let prefix, inner, suffix = tokenizer.EncodeParts s
        let budget = maxLength - prefix.Length - suffix.Length
        if inner.Length <= budget then { Ids = Array.concat [ prefix; inner; suffix ]; Truncated = false }
        else { Ids = Array.concat [ prefix; inner[.. budget - 1]; suffix ]; Truncated = true }

    /// Each text's embeddings at `Layer`, each row divided by its norm: [L; D] float32 per text. Texts are run
    /// longest first in batches of `batchSize`, each padded to its longest (length-bucketed batching; rows do not
    /// depend on their batch, see `EncodersTests`).
    member _.Embed(texts: EncodedText[], batchSize: int) : torch.Tensor[] =
        if batchSize < 1 then invalidArg "batchSize" (sprintf "expected a batch size >= 1, got %d" batchSize)
        let order = [| 0 .. texts.Length - 1 |] |> Array.sortBy (fun i -> -texts[i].Ids.Length, i)
        let result : torch.Tensor[] = Array.zeroCreate texts.Length
        use _ = torch.no_grad ()
        for chunk in Array.chunkBySize batchSize order do
            use scope = torch.NewDisposeScope()
            let t = texts[chunk[0]].Ids.Length
            let ids = Array.create (chunk.Length * t) (int64 padId)
            let mask = Array.zeroCreate (chunk.Length * t)
            chunk |> Array.iteri (fun r i -> texts[i].Ids |> Array.iteri (fun j id -> ids[r * t + j] <- int64 id; mask[r * t + j] <- true))
            let shape = [| int64 chunk.Length; int64 t |]
            let hidden = encoder.Hidden(torch.tensor(ids, ReadOnlySpan<int64> shape), torch.tensor(mask, ReadOnlySpan<int64> shape), null, layer) // [B; T; D]
            let unit = hidden.div((square hidden).sum(-1L, true).sqrt())                                                                                             // [B; T; D]
            chunk |> Array.iteri (fun r i -> result[i] <- unit[int64 r].narrow(0L, 0L, int64 texts[i].Ids.Length).contiguous().MoveToOuterDisposeScope())
        result

    interface BertScore.IContextualEmbedder with
        member this.Name = this.Name
        member this.Embed(texts: string[]) =
            let encoded = texts |> Array.map this.Encode
            let vectors = this.Embed(encoded, defaults.BatchSize)
            Array.map2 (fun (e: EncodedText) (v: torch.Tensor) ->
                use v = v
                let d = int v.shape[1]
                let flat = toFloats v
                { BertScore.Tokens = e.Ids |> Array.map tokenizer.IdToToken
                  BertScore.Vectors = Array.init e.Ids.Length (fun i -> flat[i * d .. i * d + d - 1]) }) encoded vectors

    interface IDisposable with
        member _.Dispose() =
            encoder.Dispose()
            (tokenizer :> IDisposable).Dispose()

/// BERTScore of a corpus with what it was computed with.
type BertScoreRun =
    { /// Per pair, in input order; rescaled when `Baseline` is set.
      Scores: Prf[]
      /// The model folder.
      Model: string
      Layer: int
      LayerSource: string
      UseIdf: bool
      /// The baseline file and row used for rescaling.
      Baseline: (string * Prf) option
      /// Longest sequence encoded (special tokens included).
      MaxLength: int
      /// Candidates and references cut at `MaxLength`.
      TruncatedCandidates: int
      TruncatedReferences: int }

/// The idf weight of every token of a text: bert_score's idf over the references' token sets (`BertScore.idf`),
/// or, without idf, 1 with the class and separator tokens at 0.
let private weightsOf (model: BertScoreModel) (idf: (string -> float) option) (e: EncodedText) : float32[] =
    e.Ids |> Array.map (fun id ->
        match idf with
        | Some w -> float32 (w (string id))
        | None -> if id = model.ClsId || id = model.SepId then 0.0f else 1.0f)

/// P, R, F of pairs [B] from unit embeddings and weights, as bert_score's `greedy_cos_idf` on one batch: each side
/// padded to the batch's longest, similarities masked to 0 at padding (so a row shorter than the batch's longest
/// floors its maxima at 0, as in bert_score), weights normalised per text.
let private greedyBatch (hyps: (torch.Tensor * float32[])[]) (refs: (torch.Tensor * float32[])[]) : (float * float * float)[] =
    use _ = torch.NewDisposeScope()
    let pad (side: (torch.Tensor * float32[])[]) =
        let l = side |> Array.map (fun (e, _) -> e.shape[0]) |> Array.max
        let d = (fst side[0]).shape[1]
        let emb = torch.zeros([| int64 side.Length; l; d |])                                       // [B; L; D]
        let mask = torch.zeros([| int64 side.Length; l |])                                         // [B; L]
        let weight = torch.zeros([| int64 side.Length; l |])                                       // [B; L]
        side |> Array.iteri (fun b (e, w) ->
            let n = e.shape[0]
            emb[int64 b].narrow(0L, 0L, n).copy_ e |> ignore
            withScalar 1.0 (fun one -> mask[int64 b].narrow(0L, 0L, n).fill_ one) |> ignore
            let total = Array.sum w
            if total = 0.0f then invalidOp "every token of a text has weight 0 (each appears in every reference, so its idf is 0); BERTScore with idf needs references that differ"
            weight[int64 b].narrow(0L, 0L, n).copy_(torch.tensor(w |> Array.map (fun x -> x / total))) |> ignore)
        emb, mask, weight
    let he, hm, hw = pad hyps
    let re, rm, rw = pad refs
    let sim = he.bmm(re.transpose(1L, 2L)).mul(hm.unsqueeze(2L).bmm(rm.unsqueeze 1L))              // [B; Lh; Lr]
    let struct (wordPrecision, _) = sim.max(2L, false)                                             // [B; Lh]
    let struct (wordRecall, _) = sim.max(1L, false)                                                // [B; Lr]
    let p = (wordPrecision.mul hw).sum(1L)                                                         // [B]
    let r = (wordRecall.mul rw).sum(1L)                                                            // [B]
    let pv, rv = toFloats p, toFloats r
    Array.init hyps.Length (fun b ->
        let pb, rb = pv[b], rv[b]
        let f = 2.0f * pb * rb / (pb + rb)
        float pb, float rb, (if Single.IsNaN f then 0.0 else float f))

/// BERTScore of each candidate against its reference [N] with `model`, exactly as bert_score's `score()` with
/// the settings' idf, batch size and baseline file (the settings' layer must be the model's, which chose it).
let score (settings: BertScoreSettings) (model: BertScoreModel) (candidates: string[]) (references: string[]) : BertScoreRun =
    if candidates.Length <> references.Length then
        invalidArg "references" (sprintf "expected one reference per candidate, got %d candidates and %d references" candidates.Length references.Length)
    if candidates.Length = 0 then invalidArg "candidates" "expected at least one candidate, got none"
    let encodeAll (what: string) (texts: string[]) =
        texts |> Array.mapi (fun i t ->
            try model.Encode t
            with :? ArgumentException as e -> invalidArg what (sprintf "%s %d: %s" what (i + 1) e.Message))
    let cands = encodeAll "candidate" candidates
    let refs = encodeAll "reference" references
    let idf = if settings.UseIdf then Some(BertScore.idf (refs |> Array.map (fun e -> e.Ids |> Array.map string))) else None
    // every distinct text embedded once (bert_score's dedup_and_sort)
    let distinct = Dictionary<string, int>(StringComparer.Ordinal)
    let texts = ResizeArray<EncodedText>()
    let slot (raw: string) (e: EncodedText) =
        let key = raw.Trim()
        match distinct.TryGetValue key with
        | true, k -> k
        | _ ->
            distinct[key] <- texts.Count
            texts.Add e
            texts.Count - 1
    let candSlots = Array.map2 slot candidates cands
    let refSlots = Array.map2 slot references refs
    let embeddings = model.Embed(texts.ToArray(), settings.BatchSize)
    try
        let side (slots: int[]) (encoded: EncodedText[]) (i: int) = embeddings[slots[i]], weightsOf model idf encoded[i]
        let raw =
            [| for chunk in Array.chunkBySize settings.BatchSize [| 0 .. candidates.Length - 1 |] do
                 let hyps = chunk |> Array.map (side candSlots cands)
                 let rs = chunk |> Array.map (side refSlots refs)
                 yield! greedyBatch hyps rs |]
        let baseline = settings.BaselineFile |> Option.map (fun f -> f, readBaseline f model.Layer)
        let rescale (b: float) (x: float) = float (float32 ((x - b) / (1.0 - b)))
        { Scores =
            raw |> Array.map (fun (p, r, f) ->
                match baseline with
                | None -> { Precision = p; Recall = r; F1 = f }
                | Some(_, b) -> { Precision = rescale b.Precision p; Recall = rescale b.Recall r; F1 = rescale b.F1 f })
          Model = model.Folder
          Layer = model.Layer
          LayerSource = model.LayerSource
          UseIdf = settings.UseIdf
          Baseline = baseline
          MaxLength = model.MaxLength
          TruncatedCandidates = cands |> Array.filter _.Truncated |> Array.length
          TruncatedReferences = refs |> Array.filter _.Truncated |> Array.length }
    finally
        for e in embeddings do e.Dispose()

/// Loads `dir` (layer from the settings) and scores: `BertScoreModel` then `score`.
/// A folder that is not a BERT/RoBERTa encoder (or has no such folder, or no tokenizer) raises `ArgumentException`
/// naming it: bad input, as `moe score` reports it.
let scoreFolder (settings: BertScoreSettings) (dir: string) (candidates: string[]) (references: string[]) : BertScoreRun =
    // The loaders' plain `failwith`s (no such folder, another architecture, no tokenizer files) are bad input.
    use model =
        try new BertScoreModel(dir, settings.Layer)
        with e when e.GetType() = typeof<Exception> -> invalidArg "dir" e.Message
    score settings model candidates references
