/// Natural language inference with a sequence classifier checkpoint (e.g. roberta-large-mnli, SummaC's "mnli"
/// card): premise-hypothesis pairs tokenized as `transformers`' `tokenizer(premises, hypotheses, truncation=True,
/// max_length=500)` (summac's `build_image`), run through `Encoders.SequenceClassifier` in length-sorted padded
/// batches, softmax over the labels of config.json's `id2label`.
///
/// On truncation: summac passes `truncation=True` together with the deprecated `truncation_strategy="only_first"`;
/// `transformers` (4.45.1 `_get_padding_truncation_strategies`) lets `truncation=True` win, so the strategy it
/// really applies is longest-first, which `HfTokenizer.EncodePair` implements. Pairs longer than the limit are cut
/// and counted (`TruncatedPairs`).
///
/// Legend: N pairs, T tokens, C labels.
module Moe.Metrics.Nli

open System
open System.IO
open TorchSharp
open Moe
open Moe.Tensors

/// How pairs are encoded and batched.
type NliSettings =
    { /// Tokens per pair, special tokens included (summac's `max_input_length`, 500); capped at the model's
      /// positions.
      MaxTokens: int
      /// Pairs per forward pass.
      BatchSize: int }

/// summac's limit of 500 tokens, batches of 32 pairs.
let defaults = { MaxTokens = 500; BatchSize = 32 }

/// Every problem with the settings, all at once.
let validate (s: NliSettings) : string list =
    [ if s.MaxTokens < 4 then sprintf "MaxTokens must be >= 4 (room for the special tokens of a pair), got %d" s.MaxTokens
      if s.BatchSize < 1 then sprintf "BatchSize must be >= 1, got %d" s.BatchSize ]

/// A sequence classifier and its tokenizer as an NLI model (`load` reads them from a folder). Construction checks
/// that the labels name entailment and contradiction (`Consistency.labelIds`); the model is put in eval mode.
type CheckpointNli(name: string, classifier: Encoders.SequenceClassifier, tokenizer: HfTokenizer.HfTokenizer, settings: NliSettings) =
    do
        match validate settings with
        | [] -> ()
        | problems -> invalidArg "settings" (String.concat "; " problems)
    do Consistency.labelIds name classifier.Labels |> ignore
    do classifier.eval () |> ignore
    let limit = min settings.MaxTokens (Encoders.maxTokens classifier.Config)
    let padId = classifier.Config.PadTokenId
    // BERT's second segment has token type 1 (after the first separator); RoBERTa has one type.
    let twoSegments = classifier.Config.TypeVocabSize > 1
    let mutable truncated = 0
    let mutable scored = 0

    /// The token ids of one pair (truncated longest-first to the limit) and whether it was cut.
    member _.Encode(premise: string, hypothesis: string) : int[] * bool =
        let full = tokenizer.EncodePair(premise, hypothesis, true)
        if full.Length <= limit then full, false
        else tokenizer.EncodePair(premise, hypothesis, true, limit), true

    /// Logits [N][C] of the pairs, in order (float32 as the model computes them).
    member this.Logits(pairs: Consistency.NliPair[]) : float32[][] =
        let encoded = pairs |> Array.map (fun p -> this.Encode(p.Premise, p.Hypothesis))
        truncated <- truncated + (encoded |> Array.filter snd |> Array.length)
        scored <- scored + pairs.Length
        let out = Array.zeroCreate pairs.Length
        let order = Array.init pairs.Length id |> Array.sortBy (fun i -> -(fst encoded[i]).Length)
        for chunk in Array.chunkBySize settings.BatchSize order do
            use _ = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let width = chunk |> Array.map (fun i -> (fst encoded[i]).Length) |> Array.max
            let ids = Array.create (chunk.Length * width) (int64 padId)
            let mask = Array.create (chunk.Length * width) false
            let types = Array.zeroCreate (chunk.Length * width)
            chunk |> Array.iteri (fun r i ->
                let row = fst encoded[i]
                let firstSep = row |> Array.tryFindIndex (fun id -> id <> row[0] && tokenizer.SpecialIds.Contains id)
                row |> Array.iteri (fun j id ->
                    ids[r * width + j] <- int64 id
                    mask[r * width + j] <- true
                    match firstSep with
                    | Some s when twoSegments && j > s -> types[r * width + j] <- 1L
                    | _ -> ()))
            let shape = ReadOnlySpan<int64>([| int64 chunk.Length; int64 width |])
            let idsT = torch.tensor(ids, shape)                                    // [B; T]
            let maskT = torch.tensor(mask, shape)                                  // [B; T]
            let typesT = if twoSegments then torch.tensor(types, shape) else null  // [B; T]
            let logits = classifier.Logits(idsT, maskT, typesT).contiguous ()      // [B; C]
            let flat = toFloats logits
            let c = int logits.shape[1]
            chunk |> Array.iteri (fun r i -> out[i] <- flat[r * c .. r * c + c - 1])
        out

    /// Pairs cut to the token limit so far.
    member _.TruncatedPairs = truncated
    /// Pairs scored so far.
    member _.ScoredPairs = scored
    /// The token limit in use: `MaxTokens` capped at the model's positions.
    member _.MaxTokens = limit
    member _.Classifier = classifier

    interface Consistency.INliModel with
        member _.Name = name
        member _.Labels = Array.copy classifier.Labels
        /// softmax over the labels, in float32 as summac computes it.
        member this.Probabilities pairs =
            this.Logits pairs
            |> Array.map (fun row ->
                use _ = torch.NewDisposeScope()
                use t = torch.tensor(row)
                toFloats (torch.nn.functional.softmax(t, 0L)) |> Array.map float)

    interface IDisposable with
        member _.Dispose() =
            classifier.Dispose()
            (tokenizer :> IDisposable).Dispose()

/// Loads a sequence classifier folder (config.json, weights, tokenizer files) as an NLI model; label problems are
/// reported against its config.json.
let load (settings: NliSettings) (dir: string) : CheckpointNli =
    // The loader's plain `failwith`s (no such folder, a folder without a classifier architecture) are bad input.
    let classifier =
        try Encoders.loadClassifier dir
        with e when e.GetType() = typeof<Exception> -> invalidArg "dir" e.Message
    try
        Consistency.labelIds (Path.Combine(dir, "config.json")) classifier.Labels |> ignore
        new CheckpointNli(dir, classifier, HfTokenizer.fromFolder dir, settings)
    with _ ->
        classifier.Dispose()
        reraise ()
