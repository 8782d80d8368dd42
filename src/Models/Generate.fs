/// Greedy and beam-search decoding for the encoder-decoder. The encoder runs once; each step feeds only
/// the newest token through the decoder and its key/value cache.
/// Axes: B sources, K beams per source, N rows decoded together (B for greedy, B * K for beams),
/// S source positions, V vocabulary.
module Moe.Generate

open System
open System.Collections.Generic
open System.Runtime.InteropServices
open System.Text.Json
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Models
open Moe.Seq2Seq

/// Decoding settings.
type GenerateConfig =
    { /// Most tokens generated per output, EOS included.
      MaxLength: int
      /// EOS is forbidden until this many tokens have been generated.
      MinLength: int
      /// Hypotheses kept per source; 1 is greedy search.
      BeamSize: int
      /// GNMT length penalty alpha (Wu et al. 2016 eq. 14): a hypothesis' log-probability is divided by
      /// ((5 + |Y|) / 6)^alpha, |Y| counting EOS. 0 turns it off; larger favours longer outputs.
      LengthPenalty: float
      /// No n-gram of this many tokens appears twice in an output (Paulus et al. 2018); 0 turns it off.
      NoRepeatNgram: int
      /// The decoder's first input.
      BosId: int
      EosId: int }

module GenerateConfig =
    /// Beam 4, alpha 0.6 (in GNMT's tuned range), no n-gram blocking, up to 64 tokens.
    let defaults =
        { MaxLength = 64
          MinLength = 0
          BeamSize = 4
          LengthPenalty = 0.6
          NoRepeatNgram = 0
          BosId = 1
          EosId = 2 }

    /// Every problem with the settings for a model of this config, empty when usable.
    let validate (model: ModelConfig) (cfg: GenerateConfig) : string list =
        [ if cfg.MaxLength < 1 then sprintf "MaxLength must be >= 1, got %d" cfg.MaxLength
          elif cfg.MaxLength > model.MaxLength then
              sprintf "MaxLength (%d) must be <= the model's MaxLength (%d): each generated token but the last is a decoder position" cfg.MaxLength model.MaxLength
          if cfg.MinLength < 0 then sprintf "MinLength must be >= 0, got %d" cfg.MinLength
          elif cfg.MinLength >= cfg.MaxLength && cfg.MaxLength >= 1 then
              sprintf "MinLength (%d) must be < MaxLength (%d) so EOS can be generated" cfg.MinLength cfg.MaxLength
          if cfg.BeamSize < 1 then sprintf "BeamSize must be >= 1, got %d" cfg.BeamSize
          if not (cfg.LengthPenalty >= 0.0) then sprintf "LengthPenalty must be >= 0, got %g" cfg.LengthPenalty
          if cfg.NoRepeatNgram < 0 then sprintf "NoRepeatNgram must be >= 0, got %d" cfg.NoRepeatNgram
          if cfg.BosId < 0 || cfg.BosId >= model.VocabSize then sprintf "BosId must be in 0 .. %d, got %d" (model.VocabSize - 1) cfg.BosId
          if cfg.EosId < 0 || cfg.EosId >= model.VocabSize then sprintf "EosId must be in 0 .. %d, got %d" (model.VocabSize - 1) cfg.EosId ]

/// One generated output.
type Hypothesis =
    { /// Generated ids, without BOS and EOS.
      Tokens: int[]
      /// Sum of the tokens' log-probabilities, EOS included when finished.
      LogProb: float
      /// LogProb divided by the length penalty: what beam search ranks by.
      Score: float
      /// Whether it ended with EOS (false when cut at MaxLength).
      Finished: bool }

/// GNMT's length-penalty constants: lp(Y) = ((offset + |Y|) / (offset + 1))^alpha (Wu et al. 2016 eq. 14).
let gnmtLengthOffset = 5.0

/// lp(Y) for a hypothesis of `length` tokens (Wu et al. 2016 eq. 14).
let lengthPenalty (alpha: float) (length: int) : float =
    Math.Pow((gnmtLengthOffset + float length) / (gnmtLengthOffset + 1.0), alpha)

/// Tokens that would complete an n-gram already in `tokens` (the ids generated so far), so that no
/// n-gram repeats (Paulus et al. 2018). n = 0 bans nothing; n = 1 bans every token seen.
let bannedByNgram (n: int) (tokens: IReadOnlyList<int>) : int list =
    if n < 1 || tokens.Count < n - 1 then []
    else
        let len = tokens.Count
        [ for start in 0 .. len - n do
              // n-gram tokens[start .. start + n - 1]: its first n - 1 equal the last n - 1 generated?
              let mutable same = true
              let mutable j = 0
              while same && j < n - 1 do
                  if tokens[start + j] <> tokens[len - n + 1 + j] then same <- false
                  j <- j + 1
              if same then tokens[start + n - 1] ]
        |> List.distinct

/// Log-probabilities of the next token with EOS masked before MinLength and n-gram repeats masked.
/// logits [N; V] -> [N; V] float32; `histories` are the N rows' generated ids so far.
let private constrainedLogProbs (cfg: GenerateConfig) (logits: Tensor) (histories: IReadOnlyList<int>[]) : Tensor =
    let lp = logits.log_softmax(-1L, torch.ScalarType.Float32)               // [N; V]
    let generated = if histories.Length = 0 then 0 else histories[0].Count
    if generated < cfg.MinLength then
        withScalar Double.NegativeInfinity (fun negInf -> lp.index_put_(negInf, [| torch.TensorIndex.Colon; torch.TensorIndex.Single(int64 cfg.EosId) |])) |> ignore
    if cfg.NoRepeatNgram > 0 then
        let pairs = [| for row in 0 .. histories.Length - 1 do for t in bannedByNgram cfg.NoRepeatNgram histories[row] -> int64 row, int64 t |]
        if pairs.Length > 0 then
            use rows = torch.tensor(Array.map fst pairs, device = logits.device)
            use cols = torch.tensor(Array.map snd pairs, device = logits.device)
            withScalar Double.NegativeInfinity (fun negInf -> lp.index_put_(negInf, [| rows; cols |])) |> ignore
    lp

let private checkInputs (model: EncoderDecoder) (cfg: GenerateConfig) (src: Tensor) =
    orFail "generation config" (GenerateConfig.validate model.Config cfg) cfg |> ignore
    expectIndex "src" "[B; S]" 2 src
    if src.shape[0] < 1L then invalidArg "src" (sprintf "expected at least one source, got %s" (describe src))

/// Runs `body` with the model in evaluation mode and autograd off, restoring its mode afterwards.
let private inference (model: EncoderDecoder) (body: unit -> 'a) : 'a =
    let wasTraining = model.training
    model.eval ()
    try
        use _ = torch.no_grad ()
        body ()
    finally
        if wasTraining then model.train ()

/// Greedy search: at each step every source takes its most probable allowed token, until EOS or MaxLength.
/// src [B; S] int64, srcValid [B; S] bool (null = all real). One hypothesis per source.
let greedy (cfg: GenerateConfig) (model: EncoderDecoder) (src: Tensor) (srcValid: Tensor) : Hypothesis[] =
    checkInputs model cfg src
    inference model (fun () ->
        use _ = torch.NewDisposeScope()
        let b = int src.shape[0]
        let encoded = model.Encode(src, srcValid)
        use cache = model.NewCache()
        let histories = Array.init b (fun _ -> List<int>())
        let logProbs = Array.zeroCreate<float> b
        let finished = Array.zeroCreate<bool> b
        let mutable next = Array.create b (int64 cfg.BosId)
        let mutable step = 0
        while step < cfg.MaxLength && not (Array.forall id finished) do
            use _ = torch.NewDisposeScope()
            use input = torch.tensor(next, device = src.device).view(int64 b, 1L)   // [B; 1]
            let out = model.Decode(encoded.Memory, srcValid, input, null, cache)
            let lp = constrainedLogProbs cfg (out.Logits.select(1L, -1L)) (histories |> Array.map (fun h -> h :> IReadOnlyList<int>))  // [B; V]
            let struct (values, indices) = lp.max(1L, false)                       // [B], [B]
            let values, indices = toFloats values, toInt64s indices
            for row in 0 .. b - 1 do
                if not finished[row] then
                    logProbs[row] <- logProbs[row] + float values[row]
                    if int indices[row] = cfg.EosId then finished[row] <- true
                    else histories[row].Add(int indices[row])
            next <- indices
            step <- step + 1
        [| for row in 0 .. b - 1 ->
               let length = histories[row].Count + (if finished[row] then 1 else 0)
               { Tokens = histories[row].ToArray()
                 LogProb = logProbs[row]
                 Score = logProbs[row] / lengthPenalty cfg.LengthPenalty length
                 Finished = finished[row] } |])

/// Beam search (Wu et al. 2016 sec. 7; scores with the GNMT length penalty): each source keeps its
/// BeamSize best partial outputs; a candidate ending in EOS among the step's top BeamSize becomes a
/// finished hypothesis. A source stops once it has BeamSize finished hypotheses and its best running
/// beam, penalised at the current length, scores no higher than the worst of them (the usual heuristic);
/// beams still running at MaxLength count as unfinished hypotheses.
/// src [B; S] int64, srcValid [B; S] bool (null = all real). Returns each source's hypotheses, best first.
let beamSearchNBest (cfg: GenerateConfig) (model: EncoderDecoder) (src: Tensor) (srcValid: Tensor) : Hypothesis[][] =
    checkInputs model cfg src
    inference model (fun () ->
        use _ = torch.NewDisposeScope()
        let b, k = int src.shape[0], cfg.BeamSize
        let n = b * k
        let v = int64 model.Config.VocabSize
        let encoded = model.Encode(src, srcValid)
        // Row r = source r / K, beam r % K.
        use sourceOfRow = (arange 0L (int64 b) torch.ScalarType.Int64 src.device).repeat_interleave(int64 k)  // [N]
        let memory = encoded.Memory.index_select(0L, sourceOfRow)             // [N; S; D]
        let memoryValid = if isNull srcValid then null else srcValid.index_select(0L, sourceOfRow)  // [N; S]
        use cache = model.NewCache()
        let mutable histories = Array.init n (fun _ -> List<int>())
        // Only beam 0 of each source is live at the start, so the first step does not pick K copies.
        let mutable scores = Array.init n (fun r -> if r % k = 0 then 0.0 else Double.NegativeInfinity)
        let hypotheses = Array.init b (fun _ -> List<Hypothesis>())
        let isDone = Array.zeroCreate<bool> b
        let worstKept (src: int) =
            hypotheses[src] |> Seq.map (fun h -> h.Score) |> Seq.sortDescending |> Seq.item (k - 1)
        let mutable next = Array.create n (int64 cfg.BosId)
        let mutable step = 0
        while step < cfg.MaxLength && not (Array.forall id isDone) do
            use _ = torch.NewDisposeScope()
            use input = torch.tensor(next, device = src.device).view(int64 n, 1L)   // [N; 1]
            let out = model.Decode(memory, memoryValid, input, null, cache)
            let lp = constrainedLogProbs cfg (out.Logits.select(1L, -1L)) (histories |> Array.map (fun h -> h :> IReadOnlyList<int>))  // [N; V]
            use running = torch.tensor(scores |> Array.map float32, device = src.device).unsqueeze(1L)  // [N; 1]
            let candidates = (plus lp running).view(int64 b, int64 k * v)             // [B; K*V]
            let picks = min (2 * k) (int (int64 k * v))
            let struct (topScores, topIndices) = candidates.topk(picks, 1, true, true)  // [B; 2K]
            let topScores, topIndices = toFloats topScores, toInt64s topIndices
            let nextRows = Array.zeroCreate<int64> n
            let nextTokens = Array.create n (int64 cfg.EosId)
            let nextScores = Array.create n Double.NegativeInfinity
            for s in 0 .. b - 1 do
                // Idle rows of a finished source or of dead beams point at the source's first row.
                for slot in 0 .. k - 1 do nextRows[s * k + slot] <- int64 (s * k)
                if not isDone[s] then
                    let mutable slot = 0
                    let mutable j = 0
                    while slot < k && j < picks do
                        let score = float topScores[s * picks + j]
                        let index = topIndices[s * picks + j]
                        let row = s * k + int (index / v)
                        let token = int (index % v)
                        if not (Double.IsNegativeInfinity score) then
                            if token = cfg.EosId then
                                if j < k then
                                    let length = histories[row].Count + 1
                                    hypotheses[s].Add
                                        { Tokens = histories[row].ToArray(); LogProb = score
                                          Score = score / lengthPenalty cfg.LengthPenalty length; Finished = true }
                            else
                                nextRows[s * k + slot] <- int64 row
                                nextTokens[s * k + slot] <- int64 token
                                nextScores[s * k + slot] <- score
                                slot <- slot + 1
                        j <- j + 1
                    let bestRunning = nextScores[s * k]
                    if Double.IsNegativeInfinity bestRunning then isDone[s] <- true
                    elif hypotheses[s].Count >= k then
                        let attainable = bestRunning / lengthPenalty cfg.LengthPenalty (step + 1)
                        if attainable <= worstKept s then isDone[s] <- true
            histories <- Array.init n (fun r ->
                let h = List<int>(histories[int nextRows[r]])
                h.Add(int nextTokens[r])
                h)
            scores <- nextScores
            next <- nextTokens
            use rows = torch.tensor(nextRows, device = src.device)
            cache.Reorder(rows, false)
            step <- step + 1
        for s in 0 .. b - 1 do
            if not isDone[s] then
                for slot in 0 .. k - 1 do
                    let r = s * k + slot
                    if not (Double.IsNegativeInfinity scores[r]) then
                        hypotheses[s].Add
                            { Tokens = histories[r].ToArray(); LogProb = scores[r]
                              Score = scores[r] / lengthPenalty cfg.LengthPenalty histories[r].Count; Finished = false }
        hypotheses |> Array.map (fun hs -> hs |> Seq.sortByDescending (fun h -> h.Score) |> Seq.truncate k |> Array.ofSeq))

/// Beam search's best hypothesis per source (see `beamSearchNBest`).
let beamSearch (cfg: GenerateConfig) (model: EncoderDecoder) (src: Tensor) (srcValid: Tensor) : Hypothesis[] =
    beamSearchNBest cfg model src srcValid |> Array.map Array.head

/// Greedy search when BeamSize = 1, beam search otherwise: one hypothesis per source.
let generate (cfg: GenerateConfig) (model: EncoderDecoder) (src: Tensor) (srcValid: Tensor) : Hypothesis[] =
    if cfg.BeamSize = 1 then greedy cfg model src srcValid else beamSearch cfg model src srcValid

/// The same entry points as static methods, for C#.
[<AbstractClass; Sealed>]
type Generation =
    /// Decoding settings; omitted arguments take `GenerateConfig.defaults`' values.
    static member Config(bosId: int, eosId: int,
                         [<Optional; DefaultParameterValue(64)>] maxLength: int,
                         [<Optional; DefaultParameterValue(4)>] beamSize: int,
                         [<Optional; DefaultParameterValue(0.6)>] lengthPenalty: float,
                         [<Optional; DefaultParameterValue(0)>] noRepeatNgram: int,
                         [<Optional; DefaultParameterValue(0)>] minLength: int) : GenerateConfig =
        { MaxLength = maxLength; MinLength = minLength; BeamSize = beamSize; LengthPenalty = lengthPenalty
          NoRepeatNgram = noRepeatNgram; BosId = bosId; EosId = eosId }
    /// Greedy search; srcValid may be null.
    static member Greedy(model: EncoderDecoder, src: Tensor, srcValid: Tensor, cfg: GenerateConfig) = greedy cfg model src srcValid
    /// Beam search's best hypothesis per source; srcValid may be null.
    static member BeamSearch(model: EncoderDecoder, src: Tensor, srcValid: Tensor, cfg: GenerateConfig) = beamSearch cfg model src srcValid
    /// Every source's hypotheses, best first; srcValid may be null.
    static member BeamSearchNBest(model: EncoderDecoder, src: Tensor, srcValid: Tensor, cfg: GenerateConfig) = beamSearchNBest cfg model src srcValid
    /// Greedy when BeamSize = 1, beam search otherwise.
    static member Generate(model: EncoderDecoder, src: Tensor, srcValid: Tensor, cfg: GenerateConfig) = generate cfg model src srcValid

// ================================================================ transformers' generate

// What follows is Hugging Face transformers' `generate` (v4.45.1) for encoder-decoders, over any
// `Seq2Seq.ISeq2SeqModel`: its generation config, its logits processors in its order, greedy search,
// sampling, and beam search as `BeamSearchScorer`/`BeamHypotheses` do it. The search above (`GenerateConfig`,
// GNMT length penalty) stays the toolkit's own summarizer's, whose scores the main job reports.
// Lengths follow transformers: a decoder sequence starts with the decoder start token, and `max_length`
// / `min_length` count it, so at most max_length - 1 tokens are generated.

/// transformers' `early_stopping`: when beam search stops for an input.
[<RequireQualifiedAccess>]
type EarlyStopping =
    /// `true`: as soon as num_beams hypotheses are finished.
    | Eager
    /// `false`: when the best running beam, scored at the current length, cannot beat the worst kept hypothesis.
    | Heuristic
    /// `"never"`: only when no running beam can beat it at any length (canonical beam search).
    | Never

/// transformers' `GenerationConfig` fields that encoder-decoder generation honours, with its defaults.
type GenerationConfig =
    { /// Longest decoder sequence, the decoder start token included (`max_length`, 20).
      MaxLength: int
      /// When set, overrides MaxLength with this many generated tokens (`max_new_tokens`).
      MaxNewTokens: int option
      /// EOS is masked while the decoder sequence (start token included) is shorter (`min_length`, 0).
      MinLength: int
      /// When set, EOS is masked until this many tokens have been generated (`min_new_tokens`).
      MinNewTokens: int option
      /// Beams; 1 is greedy search or sampling (`num_beams`, 1).
      NumBeams: int
      /// Beam scores are sum_logprobs / length^LengthPenalty, length counting the generated tokens and EOS
      /// but not the decoder start token (`length_penalty`, 1.0).
      LengthPenalty: float
      /// `early_stopping` (false).
      EarlyStopping: EarlyStopping
      /// No n-gram of this size repeats in the decoder sequence, start token included (`no_repeat_ngram_size`, 0 = off).
      NoRepeatNgramSize: int
      /// The first generated token is forced to this id (`forced_bos_token_id`).
      ForcedBosTokenId: int option
      /// The token generated at max_length - 1 is forced to one of these ids (`forced_eos_token_id`; empty = off).
      ForcedEosTokenId: int list
      /// The decoder's first input (`decoder_start_token_id`; BosTokenId when unset).
      DecoderStartTokenId: int option
      BosTokenId: int option
      /// Generation stops at any of these (`eos_token_id`, one id or several).
      EosTokenId: int list
      /// Fills finished rows (`pad_token_id`; the first EOS id when unset, as transformers does).
      PadTokenId: int option
      /// Logits of tokens already in the decoder sequence: positive ones divided, negative ones multiplied
      /// by this (`repetition_penalty`, 1.0 = off; Keskar et al. 2019).
      RepetitionPenalty: float
      /// Multinomial sampling instead of argmax (`do_sample`, false); needs NumBeams = 1 here.
      DoSample: bool
      /// Sampling: logits divided by this (`temperature`, 1.0).
      Temperature: float
      /// Sampling: only the k most probable tokens, ties kept (`top_k`, 50; 0 = off).
      TopK: int
      /// Sampling: the smallest set of most probable tokens whose probability exceeds top_p (`top_p`, 1.0 = off).
      TopP: float
      /// Outputs per input (`num_return_sequences`, 1): the best beams, or independent samples.
      NumReturnSequences: int
      /// Key/value caches (`use_cache`, true); false recomputes the whole prefix each step (same results, slower).
      UseCache: bool
      /// The toolkit's, not transformers': seeds the sampling generator. Draws cannot equal PyTorch's
      /// `torch.multinomial` draws, so sampled outputs repeat run to run here but differ from transformers'.
      Seed: int64 }

module GenerationConfig =
    /// transformers' `GenerationConfig()` defaults.
    let defaults =
        { MaxLength = 20; MaxNewTokens = None; MinLength = 0; MinNewTokens = None; NumBeams = 1
          LengthPenalty = 1.0; EarlyStopping = EarlyStopping.Heuristic; NoRepeatNgramSize = 0
          ForcedBosTokenId = None; ForcedEosTokenId = []; DecoderStartTokenId = None; BosTokenId = None
          EosTokenId = []; PadTokenId = None; RepetitionPenalty = 1.0; DoSample = false; Temperature = 1.0
          TopK = 50; TopP = 1.0; NumReturnSequences = 1; UseCache = true; Seed = 0L }

    /// The decoder sequence's longest length, start token included (max_new_tokens + 1 when set).
    let effectiveMaxLength (cfg: GenerationConfig) = match cfg.MaxNewTokens with Some n -> n + 1 | None -> cfg.MaxLength

    /// EOS is masked while the decoder sequence is shorter than this (min_new_tokens + 1 when set).
    let effectiveMinLength (cfg: GenerationConfig) = match cfg.MinNewTokens with Some n -> n + 1 | None -> cfg.MinLength

    /// Every problem with the settings for a model of `vocabSize` tokens, empty when usable.
    let validate (vocabSize: int) (cfg: GenerationConfig) : string list =
        let inVocab name (id: int) =
            [ if id < 0 || id >= vocabSize then sprintf "%s must be in 0 .. %d, got %d" name (vocabSize - 1) id ]
        [ match cfg.MaxNewTokens with
          | Some n when n < 1 -> sprintf "max_new_tokens must be >= 1, got %d" n
          | Some _ -> ()
          | None -> if cfg.MaxLength < 2 then sprintf "max_length must be >= 2 (it counts the decoder start token), got %d" cfg.MaxLength
          if cfg.MinLength < 0 then sprintf "min_length must be >= 0, got %d" cfg.MinLength
          match cfg.MinNewTokens with Some n when n < 0 -> sprintf "min_new_tokens must be >= 0, got %d" n | _ -> ()
          if cfg.NumBeams < 1 then sprintf "num_beams must be >= 1, got %d" cfg.NumBeams
          if Double.IsNaN cfg.LengthPenalty || Double.IsInfinity cfg.LengthPenalty then sprintf "length_penalty must be finite, got %g" cfg.LengthPenalty
          if cfg.NoRepeatNgramSize < 0 then sprintf "no_repeat_ngram_size must be >= 0, got %d" cfg.NoRepeatNgramSize
          yield! cfg.ForcedBosTokenId |> Option.map (inVocab "forced_bos_token_id") |> Option.defaultValue []
          for id in cfg.ForcedEosTokenId do yield! inVocab "forced_eos_token_id" id
          yield! cfg.DecoderStartTokenId |> Option.map (inVocab "decoder_start_token_id") |> Option.defaultValue []
          yield! cfg.BosTokenId |> Option.map (inVocab "bos_token_id") |> Option.defaultValue []
          if cfg.DecoderStartTokenId.IsNone && cfg.BosTokenId.IsNone then
              "decoder_start_token_id or bos_token_id has to be defined for encoder-decoder generation"
          for id in cfg.EosTokenId do yield! inVocab "eos_token_id" id
          yield! cfg.PadTokenId |> Option.map (inVocab "pad_token_id") |> Option.defaultValue []
          if not (cfg.RepetitionPenalty > 0.0) then sprintf "repetition_penalty must be > 0, got %g" cfg.RepetitionPenalty
          // transformers checks the sampling settings only when it samples
          if cfg.DoSample && not (cfg.Temperature > 0.0) then sprintf "temperature must be > 0 when sampling, got %g" cfg.Temperature
          if cfg.DoSample && cfg.TopK < 0 then sprintf "top_k must be >= 0, got %d" cfg.TopK
          if cfg.DoSample && not (cfg.TopP >= 0.0 && cfg.TopP <= 1.0) then sprintf "top_p must be in [0, 1], got %g" cfg.TopP
          if cfg.DoSample && cfg.NumBeams > 1 then
              "do_sample with num_beams > 1 (beam sampling) is not implemented: use num_beams = 1 or do_sample = false"
          if cfg.NumReturnSequences < 1 then sprintf "num_return_sequences must be >= 1, got %d" cfg.NumReturnSequences
          elif cfg.NumBeams = 1 && not cfg.DoSample && cfg.NumReturnSequences > 1 then
              "greedy search (num_beams = 1, do_sample = false) does not support num_return_sequences > 1"
          elif cfg.NumBeams > 1 && cfg.NumReturnSequences > cfg.NumBeams then
              sprintf "num_return_sequences (%d) must be <= num_beams (%d)" cfg.NumReturnSequences cfg.NumBeams ]

    /// Plain greedy search with `cfg`'s token ids and lengths: one beam, no sampling, no min length, no
    /// forced tokens, no n-gram blocking, no repetition penalty; stops at EOS or max_length / max_new_tokens.
    let greedyOf (cfg: GenerationConfig) : GenerationConfig =
        { cfg with
            NumBeams = 1; DoSample = false; NumReturnSequences = 1; MinLength = 0; MinNewTokens = None
            ForcedBosTokenId = None; ForcedEosTokenId = []; NoRepeatNgramSize = 0; RepetitionPenalty = 1.0 }

    // ------------------------------------------------------------ names, values, files

    /// One settable field: transformers' name, the toolkit's name, and how a text value sets it.
    type private Field =
        { Hf: string
          Name: string
          Set: string -> GenerationConfig -> GenerationConfig }

    let private parseInt (name: string) (text: string) =
        match Int32.TryParse(text.Trim(), Globalization.NumberStyles.Integer, Globalization.CultureInfo.InvariantCulture) with
        | true, v -> v
        | _ -> failwithf "%s: expected an integer, got \"%s\"" name text
    let private parseFloat (name: string) (text: string) =
        match Double.TryParse(text.Trim(), Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
        | true, v -> v
        | _ -> failwithf "%s: expected a number, got \"%s\"" name text
    let private parseBool (name: string) (text: string) =
        match text.Trim().ToLowerInvariant() with
        | "true" -> true
        | "false" -> false
        | _ -> failwithf "%s: expected true or false, got \"%s\"" name text
    let private isNone (text: string) = (let t = text.Trim().ToLowerInvariant() in t = "none" || t = "null" || t = "")
    let private parseIntOption name text = if isNone text then None else Some (parseInt name text)
    /// "2", "[2, 3]" or "2,3"; "none" for empty.
    let private parseIntList name (text: string) =
        if isNone text || text.Trim() = "[]" then []
        else text.Trim().TrimStart('[').TrimEnd(']').Split(',') |> Array.map (parseInt name) |> List.ofArray
    /// true | false | "never" (quotes optional).
    let parseEarlyStopping (name: string) (text: string) =
        match text.Trim().Trim('"').ToLowerInvariant() with
        | "true" -> EarlyStopping.Eager
        | "false" -> EarlyStopping.Heuristic
        | "never" -> EarlyStopping.Never
        | _ -> failwithf "%s: expected true, false or \"never\", got \"%s\"" name text

    let private fields : Field list =
        let f hf name set = { Hf = hf; Name = name; Set = set }
        [ f "max_length" "MaxLength" (fun v c -> { c with MaxLength = parseInt "max_length" v })
          f "max_new_tokens" "MaxNewTokens" (fun v c -> { c with MaxNewTokens = parseIntOption "max_new_tokens" v })
          f "min_length" "MinLength" (fun v c -> { c with MinLength = parseInt "min_length" v })
          f "min_new_tokens" "MinNewTokens" (fun v c -> { c with MinNewTokens = parseIntOption "min_new_tokens" v })
          f "num_beams" "NumBeams" (fun v c -> { c with NumBeams = parseInt "num_beams" v })
          f "length_penalty" "LengthPenalty" (fun v c -> { c with LengthPenalty = parseFloat "length_penalty" v })
          f "early_stopping" "EarlyStopping" (fun v c -> { c with EarlyStopping = parseEarlyStopping "early_stopping" v })
          f "no_repeat_ngram_size" "NoRepeatNgramSize" (fun v c -> { c with NoRepeatNgramSize = parseInt "no_repeat_ngram_size" v })
          f "forced_bos_token_id" "ForcedBosTokenId" (fun v c -> { c with ForcedBosTokenId = parseIntOption "forced_bos_token_id" v })
          f "forced_eos_token_id" "ForcedEosTokenId" (fun v c -> { c with ForcedEosTokenId = parseIntList "forced_eos_token_id" v })
          f "decoder_start_token_id" "DecoderStartTokenId" (fun v c -> { c with DecoderStartTokenId = parseIntOption "decoder_start_token_id" v })
          f "bos_token_id" "BosTokenId" (fun v c -> { c with BosTokenId = parseIntOption "bos_token_id" v })
          f "eos_token_id" "EosTokenId" (fun v c -> { c with EosTokenId = parseIntList "eos_token_id" v })
          f "pad_token_id" "PadTokenId" (fun v c -> { c with PadTokenId = parseIntOption "pad_token_id" v })
          f "repetition_penalty" "RepetitionPenalty" (fun v c -> { c with RepetitionPenalty = parseFloat "repetition_penalty" v })
          f "do_sample" "DoSample" (fun v c -> { c with DoSample = parseBool "do_sample" v })
          f "temperature" "Temperature" (fun v c -> { c with Temperature = parseFloat "temperature" v })
          f "top_k" "TopK" (fun v c -> { c with TopK = parseInt "top_k" v })
          f "top_p" "TopP" (fun v c -> { c with TopP = parseFloat "top_p" v })
          f "num_return_sequences" "NumReturnSequences" (fun v c -> { c with NumReturnSequences = parseInt "num_return_sequences" v })
          f "use_cache" "UseCache" (fun v c -> { c with UseCache = parseBool "use_cache" v })
          f "seed" "Seed" (fun v c -> { c with Seed = int64 (parseInt "seed" v) }) ]

    /// The names `set` accepts: the toolkit's (NumBeams) and transformers' (num_beams).
    let fieldNames : string list = fields |> List.collect (fun f -> [ f.Name; f.Hf ])

    /// Applies one "Name=value" assignment (`NumBeams=4`, `num_beams=4`, `Generate.NumBeams=4`,
    /// `EarlyStopping=never`, `EosTokenId=[1,2]`, `ForcedBosTokenId=none`).
    let set (assignment: string) (cfg: GenerationConfig) : GenerationConfig =
        let eq = assignment.IndexOf '='
        if eq <= 0 then failwithf "generation setting \"%s\": expected Name=value" assignment
        let name = assignment.Substring(0, eq).Trim()
        let name = if name.StartsWith "Generate." then name.Substring "Generate.".Length else name
        match fields |> List.tryFind (fun f -> f.Name = name || f.Hf = name) with
        | Some f -> f.Set (assignment.Substring(eq + 1)) cfg
        | None -> failwithf "generation setting \"%s\": unknown name \"%s\" (known: %s)" assignment name (String.Join(", ", fields |> List.map (fun f -> f.Name)))

    /// Applies assignments in order, then validates nothing (call `validate` with the model's vocabulary).
    let setAll (assignments: string seq) (cfg: GenerationConfig) : GenerationConfig =
        assignments |> Seq.fold (fun c a -> set a c) cfg

    /// Generation fields of transformers' `GenerationConfig` this engine does not implement, with the value
    /// that leaves them off: a file that sets any of them otherwise is refused.
    let private unsupportedAtDefault : (string * (JsonElement -> bool)) list =
        let isNull (v: JsonElement) = v.ValueKind = JsonValueKind.Null
        let isNumber (x: float) (v: JsonElement) = v.ValueKind = JsonValueKind.Number && v.GetDouble() = x
        let isFalse (v: JsonElement) = v.ValueKind = JsonValueKind.False || isNull v
        let isEmptyOrNull (v: JsonElement) = isNull v || (v.ValueKind = JsonValueKind.Array && v.GetArrayLength() = 0)
        [ "num_beam_groups", isNumber 1.0; "diversity_penalty", isNumber 0.0; "encoder_repetition_penalty", isNumber 1.0
          "encoder_no_repeat_ngram_size", isNumber 0.0; "bad_words_ids", isNull; "force_words_ids", isNull
          "constraints", isNull; "typical_p", isNumber 1.0; "epsilon_cutoff", isNumber 0.0; "eta_cutoff", isNumber 0.0
          "min_p", isNull; "penalty_alpha", isNull; "renormalize_logits", isFalse; "remove_invalid_values", isFalse
          "exponential_decay_length_penalty", isNull; "suppress_tokens", isEmptyOrNull
          "begin_suppress_tokens", isEmptyOrNull; "forced_decoder_ids", isEmptyOrNull; "sequence_bias", isNull
          "guidance_scale", (fun v -> isNull v || isNumber 1.0 v); "max_time", isNull; "stop_strings", isNull
          "dola_layers", isNull; "watermarking_config", isNull; "low_memory", isFalse; "token_healing", isFalse ]

    /// Fields that never change what is generated (outputs requested, bookkeeping).
    let private bookkeeping =
        [ "transformers_version"; "_from_model_config"; "output_attentions"; "output_hidden_states"; "output_scores"
          "output_logits"; "return_dict_in_generate"; "cache_implementation"; "cache_config"; "return_legacy_cache"
          "num_assistant_tokens"; "num_assistant_tokens_schedule"; "assistant_confidence_threshold"
          "prompt_lookup_num_tokens"; "max_matching_ngram_size"; "is_assistant"; "trust_remote_code" ]

    /// Reads the fields `fields` knows from `reader` (JSON values: numbers, booleans, ids or id lists, null),
    /// leaving the others to the caller. Unsupported generation fields set to a non-default value are refused.
    let private readKnown (reader: HfConfig.ConfigReader) (cfg: GenerationConfig) : GenerationConfig =
        let mutable cfg = cfg
        for f in fields do
            if f.Hf <> "seed" then
                match reader.Element f.Hf with
                | None ->
                    // null: an optional field unset (as transformers' None); a plain field keeps its default
                    if reader.Root.TryGetProperty(f.Hf) |> fst then
                        cfg <- (try f.Set "none" cfg with _ -> cfg)
                | Some v ->
                    let text =
                        match v.ValueKind with
                        | JsonValueKind.String -> v.GetString()
                        | _ -> v.GetRawText()
                    cfg <- (try f.Set text cfg with e -> failwithf "%s: field \"%s\": %s" reader.Path f.Hf e.Message)
        for name, isDefault in unsupportedAtDefault do
            match reader.Root.TryGetProperty name with
            | true, v when not (isDefault v) ->
                failwithf "%s: field \"%s\" = %s is not supported by the toolkit's generation (it would change the output)" reader.Path name (v.GetRawText())
            | _ -> ()
        reader.Ignore(unsupportedAtDefault |> List.map fst)
        cfg

    /// Reads `generation_config.json`: every field is used, known to be inert, or refused by name.
    let ofGenerationConfigFile (path: string) : GenerationConfig =
        let reader = HfConfig.ConfigReader.Open path
        let cfg = readKnown reader defaults
        reader.Ignore bookkeeping
        reader.Finish()
        cfg

    /// transformers' `GenerationConfig.from_model_config`: the generation fields of a model's `config.json`
    /// (older checkpoints such as facebook/bart-large-xsum keep num_beams, max_length, min_length,
    /// no_repeat_ngram_size, length_penalty, early_stopping and forced BOS/EOS there). Fields the family's
    /// config class defaults when a file omits them (BartConfig: forced_eos_token_id 2, ...) are filled as
    /// that class does; BART's legacy `force_bos_token_to_be_generated` sets forced_bos_token_id to bos_token_id.
    /// Model fields are left to the family's parser. `task_specific_params` are not used: transformers'
    /// `generate` ignores them (only its pipelines apply them); see `withTaskParams`.
    let ofModelConfigFile (path: string) : GenerationConfig =
        let reader = HfConfig.ConfigReader.Open path
        let familyDefaults =
            match reader.StringOption "model_type" with
            | Some "bart" ->
                { defaults with BosTokenId = Some 0; PadTokenId = Some 1; EosTokenId = [ 2 ]; DecoderStartTokenId = Some 2; ForcedEosTokenId = [ 2 ] }
            | Some "pegasus" -> { defaults with PadTokenId = Some 0; EosTokenId = [ 1 ]; DecoderStartTokenId = Some 0; ForcedEosTokenId = [ 1 ] }
            | Some "t5" -> { defaults with PadTokenId = Some 0; EosTokenId = [ 1 ] }
            | Some "switch_transformers" -> { defaults with PadTokenId = Some 0; EosTokenId = [ 1 ]; DecoderStartTokenId = Some 0 }
            | _ -> defaults
        let cfg = readKnown reader familyDefaults
        match cfg.ForcedBosTokenId, reader.Element "force_bos_token_to_be_generated" with
        | None, Some v when v.ValueKind = JsonValueKind.True -> { cfg with ForcedBosTokenId = cfg.BosTokenId }
        | _ -> cfg

    /// A checkpoint folder's generation defaults as transformers loads them: `generation_config.json` when
    /// present, else the generation fields of `config.json` (`from_model_config`).
    let load (folder: string) : GenerationConfig =
        let file = IO.Path.Combine(folder, "generation_config.json")
        if IO.File.Exists file then ofGenerationConfigFile file
        else ofModelConfigFile (IO.Path.Combine(folder, "config.json"))

    /// What transformers' pipelines do for a task ("summarization", "translation_en_to_de", ...): the
    /// settings under `task_specific_params[task]` of `config.json` (t5-small keeps num_beams 4,
    /// length_penalty 2.0, min_length 30, max_length 200, no_repeat_ngram_size 3 there) applied over `cfg`.
    /// Its `prefix` is a text setting for the tokenizer and is returned apart. Fails naming the file when the
    /// task is absent.
    let withTaskParams (configJson: string) (task: string) (cfg: GenerationConfig) : GenerationConfig * string option =
        let reader = HfConfig.ConfigReader.Open configJson
        let task' =
            match reader.Element "task_specific_params" with
            | Some ps when ps.ValueKind = JsonValueKind.Object ->
                match ps.TryGetProperty task with
                | true, t when t.ValueKind = JsonValueKind.Object -> t
                | _ -> failwithf "%s: task_specific_params has no task \"%s\"" configJson task
            | _ -> failwithf "%s: no task_specific_params (asked for task \"%s\")" configJson task
        let inner = HfConfig.ConfigReader(sprintf "%s (task_specific_params.%s)" configJson task, task'.Clone())
        let prefix = inner.StringOption "prefix"
        let cfg = readKnown inner cfg
        inner.Finish()
        cfg, prefix

/// One input's outputs.
type GenerationResult =
    { /// NumReturnSequences outputs (best first for beam search): the generated ids without the decoder start
      /// token, ending with EOS when finished (beam search appends the first EOS id, as transformers' finalize does).
      Sequences: int[][]
      /// Beam search's sequence scores (transformers' `sequences_scores`: sum of the processed log-probs over
      /// length^length_penalty); None for greedy search and sampling, which have none.
      Scores: float[] option
      /// Whether each output ended with EOS (false when cut at max_length).
      Finished: bool[] }

/// The settings `run` decodes with, the defaults transformers fills in resolved.
type private Resolved =
    { Cfg: GenerationConfig
      MaxLength: int
      MinLength: int
      Start: int64
      Pad: int64
      Eos: int64[]
      /// Tokens before the first generated one in every row: 1 (the decoder start token) for an
      /// encoder-decoder, the (left-padded) prompt's length for a decoder-only LM.
      PromptLength: int }

let private resolve (cfg: GenerationConfig) : Resolved =
    let eos = cfg.EosTokenId |> List.map int64 |> Array.ofList
    { Cfg = cfg
      MaxLength = GenerationConfig.effectiveMaxLength cfg
      MinLength = GenerationConfig.effectiveMinLength cfg
      Start = int64 (match cfg.DecoderStartTokenId with Some id -> id | None -> cfg.BosTokenId.Value)
      Pad = (match cfg.PadTokenId with Some p -> int64 p | None -> if eos.Length > 0 then eos[0] else 0L)
      Eos = eos
      PromptLength = 1 }

/// Tokens that would repeat an n-gram of `row` (transformers' `_get_ngrams` / `_get_generated_ngrams`):
/// those that followed an earlier occurrence of the row's last n - 1 tokens.
let ngramBans (n: int) (row: int64[]) : int64 list =
    let len = row.Length
    if n < 1 || len + 1 < n then []
    else
        [ for start in 0 .. len - n do
              let mutable same = true
              let mutable j = 0
              while same && j < n - 1 do
                  if row[start + j] <> row[len - n + 1 + j] then same <- false
                  j <- j + 1
              if same then row[start + n - 1] ]

/// Sets `scores`[rows, cols] to -inf in place.
let private maskPairs (scores: Tensor) (pairs: (int64 * int64)[]) =
    if pairs.Length > 0 then
        use rows = torch.tensor(Array.map fst pairs, device = scores.device)
        use cols = torch.tensor(Array.map snd pairs, device = scores.device)
        withScalar Double.NegativeInfinity (fun negInf -> scores.index_put_(negInf, [| rows; cols |])) |> ignore

/// Every row -inf except `ids`, which get 0 (transformers' forced BOS/EOS).
let private forceTokens (scores: Tensor) (ids: int64[]) : Tensor =
    let forced = withScalar Double.NegativeInfinity (fun negInf -> torch.full_like(scores, negInf))
    use cols = torch.tensor(ids, device = scores.device)
    withScalar 0.0 (fun zero -> forced.index_put_(zero, [| torch.TensorIndex.Colon; torch.TensorIndex.Tensor cols |])) |> ignore
    forced

/// transformers' `_get_logits_processor` for these settings, in its order: repetition penalty, no-repeat
/// n-gram, min length, min new tokens, forced BOS, forced EOS; then, when sampling, temperature, top-k,
/// top-p. `ids` are the N decoder sequences so far (start token included, all of one length L);
/// scores [N; V] float32 (logits for greedy and sampling, log-probs for beam search) -> [N; V].
let private processScores (r: Resolved) (ids: int64[][]) (scores: Tensor) : Tensor =
    let cfg = r.Cfg
    let n, len = ids.Length, ids[0].Length
    let mutable scores = scores
    if cfg.RepetitionPenalty <> 1.0 then
        use idsT = torch.tensor(Array.concat ids, device = scores.device).view(int64 n, int64 len)  // [N; L]
        use seen = scores.gather(1L, idsT)                                                         // [N; L]
        use negative = withScalar 0.0 (fun zero -> seen.lt zero)
        use multiplied = mulScalar cfg.RepetitionPenalty seen
        use divided = divScalar cfg.RepetitionPenalty seen
        use penalised = torch.where(negative, multiplied, divided)
        scores <- scores.scatter(1L, idsT, penalised)
    if cfg.NoRepeatNgramSize > 0 then
        let pairs = [| for row in 0 .. n - 1 do for t in ngramBans cfg.NoRepeatNgramSize ids[row] -> int64 row, t |]
        if pairs.Length > 0 then
            scores <- scores.clone()
            maskPairs scores pairs
    let eosMasked = (r.MinLength > 0 && len < r.MinLength) || (match cfg.MinNewTokens with Some m -> m > 0 && len - r.PromptLength < m | None -> false)
    if eosMasked && r.Eos.Length > 0 then
        scores <- scores.clone()
        maskPairs scores [| for row in 0 .. n - 1 do for e in r.Eos -> int64 row, e |]
    match cfg.ForcedBosTokenId with
    | Some bos when len = 1 -> scores <- forceTokens scores [| int64 bos |]
    | _ -> ()
    if not cfg.ForcedEosTokenId.IsEmpty && len = r.MaxLength - 1 then
        scores <- forceTokens scores (cfg.ForcedEosTokenId |> List.map int64 |> Array.ofList)
    if cfg.DoSample then
        if cfg.Temperature <> 1.0 then scores <- divScalar cfg.Temperature scores
        if cfg.TopK <> 0 then
            let k = min cfg.TopK (int scores.shape[1])
            let struct (top, _) = scores.topk(k, 1, true, true)                                     // [N; k]
            use kth = top.narrow(1L, int64 (k - 1), 1L)                                             // [N; 1]
            use remove = scores.lt kth
            scores <- withScalar Double.NegativeInfinity (fun negInf -> scores.masked_fill(remove, negInf))
        if cfg.TopP < 1.0 then
            let struct (sorted, order) = scores.sort(-1L, false)                                    // ascending
            use cumulative = sorted.softmax(-1L).cumsum(-1L)                                        // [N; V]
            use sortedRemove = withScalar (1.0 - cfg.TopP) (fun s -> cumulative.le s)
            // min_tokens_to_keep = 1: the most probable token always stays
            use keepLast = withScalar 0.0 (fun zero -> sortedRemove.narrow(1L, sortedRemove.shape[1] - 1L, 1L).fill_(zero))
            use remove = sortedRemove.scatter(1L, order, sortedRemove)
            scores <- withScalar Double.NegativeInfinity (fun negInf -> scores.masked_fill(remove, negInf))
    scores

/// The encoder's states and the decoder's key/value cache for one `run`.
type private Decoding(model: ISeq2SeqModel, states: Tensor, mask: Tensor, useCache: bool) =
    let cache = if useCache then model.NewCache() else Unchecked.defaultof<DecoderCache>
    /// Next-token logits [N; V] float32 for the N sequences `ids` (start token included).
    member _.Next(ids: int64[][]) : Tensor =
        let n = int64 ids.Length
        use input =
            if useCache then torch.tensor(ids |> Array.map Array.last, device = states.device).view(n, 1L)   // [N; 1]
            else torch.tensor(Array.concat ids, device = states.device).view(n, int64 ids[0].Length)          // [N; L]
        let out = model.Decode(input, states, mask, cache)
        out.Logits.select(1L, -1L).to_type(torch.ScalarType.Float32)                                       // [N; V]
    /// Keeps rows `rows` (beam search's reordering; cross-attention caches are per source and stay).
    member _.Reorder(rows: int64[]) =
        if useCache then
            use r = torch.tensor(rows, device = states.device)
            cache.Reorder(r, false)
    interface IDisposable with
        member _.Dispose() = if useCache then (cache :> IDisposable).Dispose()

/// Rows whose last token is one of the EOS ids.
let private endsWith (eos: int64[]) (row: int64[]) = Array.contains (Array.last row) eos

/// Greedy search (argmax) or multinomial sampling, as transformers' `_sample`: finished rows are filled
/// with the pad id; stops when every row has produced EOS or the sequences reach max_length.
/// `next ids` gives the next-token logits [N; V] of the rows `ids`; `initial` holds every row's prompt.
let private greedyOrSample (r: Resolved) (next: int64[][] -> Tensor) (initial: int64[][]) (device: torch.Device) : int64[][] =
    let generator = if r.Cfg.DoSample then new torch.Generator(uint64 r.Cfg.Seed, device) else null
    try
        let rows = initial.Length
        let mutable ids = initial
        let unfinished = Array.create rows true
        while Array.exists id unfinished && ids[0].Length < r.MaxLength do
            use _ = torch.NewDisposeScope()
            let logits = next ids                                                             // [N; V]
            let scores = processScores r ids logits                                           // [N; V]
            let picked =
                if r.Cfg.DoSample then
                    use probs = scores.softmax(-1L)
                    use drawn = torch.multinomial(probs, 1L, false, generator)                // [N; 1]
                    toInt64s drawn
                else
                    use best = scores.argmax(-1L)                                             // [N]
                    toInt64s best
            ids <- Array.init rows (fun row -> Array.append ids[row] [| (if unfinished[row] then picked[row] else r.Pad) |])
            for row in 0 .. rows - 1 do
                if unfinished[row] && endsWith r.Eos ids[row] then unfinished[row] <- false
        ids
    finally
        if not (isNull generator) then generator.Dispose()

/// One input's n-best list, as transformers' `BeamHypotheses`: at most `beams` entries (score, ids,
/// finished), in the order added, the worst replaced as better ones arrive.
type private Hypotheses(beams: int, lengthPenalty: float, earlyStopping: EarlyStopping, maxLength: int, promptLength: int) =
    let entries = List<float * int64[] * bool>()
    let mutable worst = 1e9
    member _.Count = entries.Count
    member _.Entries = entries
    /// Adds a hypothesis whose log-probabilities sum to `sumLogprobs` over `generatedLength` tokens.
    member _.Add(ids: int64[], sumLogprobs: float, generatedLength: int, finished: bool) =
        let score = sumLogprobs / Math.Pow(float generatedLength, lengthPenalty)
        if entries.Count < beams || score > worst then
            entries.Add((score, ids, finished))
            if entries.Count > beams then
                // Python's sorted((score, index)): the lowest score, the earliest added among equals, goes
                let ranked = entries |> Seq.mapi (fun i (s, _, _) -> s, i) |> Seq.sort |> Array.ofSeq
                entries.RemoveAt(snd ranked[0])
                worst <- fst ranked[1]
            else
                worst <- min score worst
    /// `BeamHypotheses.is_done` (the decoder prompt: the start token, or a decoder-only LM's prompt).
    member _.IsDone(bestSumLogprobs: float, curLen: int) =
        if entries.Count < beams then false
        else
            match earlyStopping with
            | EarlyStopping.Eager -> true
            | EarlyStopping.Heuristic -> worst >= bestSumLogprobs / Math.Pow(float (curLen - promptLength), lengthPenalty)
            | EarlyStopping.Never ->
                let length = if lengthPenalty > 0.0 then maxLength - promptLength else curLen - promptLength
                worst >= bestSumLogprobs / Math.Pow(float length, lengthPenalty)

/// transformers' initial score of beams 1 .. K-1 (`beam_scores[:, 1:] = -1e9`): only beam 0 is live at
/// the first step, and with a small vocabulary the others can still fill 2K candidates.
let private inactiveBeamScore = -1e9f

/// Beam search as transformers' `_beam_search` with `BeamSearchScorer`: per input, the 2K (K per EOS id
/// more when several) best continuations of all beams by summed processed log-probs; an EOS among the top K
/// closes a hypothesis, the first K others continue. Returns each input's best `NumReturnSequences`.
/// `next` and `reorder` as `Decoding.Next` and `Decoding.Reorder`; `initial` holds each row's prompt (K rows
/// per input).
let private beamSearchHf (r: Resolved) (next: int64[][] -> Tensor) (reorder: int64[] -> unit) (initial: int64[][]) : GenerationResult[] =
    let k = r.Cfg.NumBeams
    let n = initial.Length
    let inputs = n / k
    let keep = max 2 (1 + r.Eos.Length) * k
    let hyps = Array.init inputs (fun _ -> Hypotheses(k, r.Cfg.LengthPenalty, r.Cfg.EarlyStopping, r.MaxLength, r.PromptLength))
    let isDone = Array.create inputs false
    let mutable ids = initial
    let mutable beamScores = Array.init n (fun row -> if row % k = 0 then 0.0f else inactiveBeamScore)
    let mutable running = true
    while running do
        use _ = torch.NewDisposeScope()
        let logits = next ids                                                                  // [N; V]
        let v = logits.shape[1]
        let logProbs = logits.log_softmax(-1L)                                                 // [N; V]
        let processed = processScores r ids logProbs                                           // [N; V]
        use beamT = torch.tensor(beamScores, device = logits.device).unsqueeze(1L)             // [N; 1]
        let total = (plus processed beamT).view(int64 inputs, int64 k * v)                     // [B; K*V]
        let struct (topScores, topIndices) = total.topk(keep, 1, true, true)                   // [B; 2K]
        let topScores, topIndices = toFloats topScores, toInt64s topIndices
        let curLen = ids[0].Length + 1
        let nextRows = Array.zeroCreate<int64> n
        let nextTokens = Array.zeroCreate<int64> n
        let nextScores = Array.zeroCreate<float32> n
        for b in 0 .. inputs - 1 do
            if isDone[b] then
                // transformers pads a finished input's beams; they point at its own first row here (the
                // cross-attention cache stays per input), which changes nothing that is returned
                for slot in 0 .. k - 1 do
                    nextRows[b * k + slot] <- int64 (b * k)
                    nextTokens[b * k + slot] <- r.Pad
                    nextScores[b * k + slot] <- 0.0f
            else
                let mutable slot = 0
                let mutable rank = 0
                while slot < k && rank < keep do
                    let score = topScores[b * keep + rank]
                    let index = topIndices[b * keep + rank]
                    let row = b * k + int (index / v)
                    let token = index % v
                    if Array.contains token r.Eos then
                        if rank < k then hyps[b].Add(ids[row], float score, curLen - r.PromptLength, true)
                    else
                        nextRows[b * k + slot] <- int64 row
                        nextTokens[b * k + slot] <- token
                        nextScores[b * k + slot] <- score
                        slot <- slot + 1
                    rank <- rank + 1
                if slot < k then
                    failwithf "beam search: input %d has fewer than %d continuations that are not EOS among its %d best" b k keep
                isDone[b] <- hyps[b].IsDone(float topScores[b * keep], curLen)
        ids <- Array.init n (fun row -> Array.append ids[int nextRows[row]] [| nextTokens[row] |])
        beamScores <- nextScores
        reorder nextRows
        running <- not (Array.forall id isDone) && ids[0].Length < r.MaxLength
    // finalize: inputs still running add their beams as unfinished hypotheses
    for b in 0 .. inputs - 1 do
        if not isDone[b] then
            for slot in 0 .. k - 1 do
                let row = b * k + slot
                hyps[b].Add(ids[row], float beamScores[row], ids[row].Length - r.PromptLength, false)
    [| for b in 0 .. inputs - 1 ->
           // Python's stable sort by score, best popped from the end: among equal scores the later-added wins
           let ranked = hyps[b].Entries |> Seq.sortBy (fun (s, _, _) -> s) |> Array.ofSeq |> Array.rev
           let best = ranked |> Array.truncate r.Cfg.NumReturnSequences
           { Sequences =
               best |> Array.map (fun (_, row, finished) ->
                   let generated = row[r.PromptLength..] |> Array.map int
                   if finished then Array.append generated [| int r.Eos[0] |] else generated)
             Scores = Some (best |> Array.map (fun (s, _, _) -> s))
             Finished = best |> Array.map (fun (_, _, f) -> f) } |]

/// Greedy or sampled rows (`expand` consecutive rows per input) as results: the tokens after the prompt, cut
/// after the first EOS.
let private sampledResults (r: Resolved) (expand: int) (ids: int64[][]) : GenerationResult[] =
    [| for i in 0 .. ids.Length / expand - 1 ->
           let rows = ids[i * expand .. (i + 1) * expand - 1]
           let trimmed =
               rows |> Array.map (fun row ->
                   let generated = row[r.PromptLength ..]
                   match generated |> Array.tryFindIndex (fun t -> Array.contains t r.Eos) with
                   | Some at -> generated[.. at], true
                   | None -> generated, false)
           { Sequences = trimmed |> Array.map (fst >> Array.map int)
             Scores = None
             Finished = trimmed |> Array.map snd } |]

/// transformers' `generate` for an encoder-decoder: greedy search (NumBeams 1), sampling (DoSample), or beam
/// search, with the logits processors its config selects. inputIds [B; S] int64; attentionMask [B; S] bool or
/// integer (1 = real token; null = all real). The encoder runs once; each step feeds the newest token
/// through the decoder's key/value cache (or, with UseCache false, the whole prefix). Run the model in
/// evaluation mode. One result per input.
let run (cfg: GenerationConfig) (model: ISeq2SeqModel) (inputIds: Tensor) (attentionMask: Tensor) : GenerationResult[] =
    let cfg = orFail "generation config" (GenerationConfig.validate model.VocabSize cfg) cfg
    expectIndex "inputIds" "[B; S]" 2 inputIds
    if inputIds.shape[0] < 1L then invalidArg "inputIds" (sprintf "expected at least one input, got %s" (describe inputIds))
    if not (isNull attentionMask) && attentionMask.shape <> inputIds.shape then
        invalidArg "attentionMask" (sprintf "expected [B; S] like inputIds %s, got %s" (describe inputIds) (describe attentionMask))
    let r = resolve cfg
    use _ = torch.no_grad ()
    use _ = torch.NewDisposeScope()
    let b = int inputIds.shape[0]
    let mask =
        if isNull attentionMask then torch.ones(inputIds.shape, torch.ScalarType.Bool, device = inputIds.device)
        elif attentionMask.dtype = torch.ScalarType.Bool then attentionMask
        else withScalar 0.0 (fun zero -> attentionMask.ne zero)
    let encoded = model.Encode(inputIds, mask)
    // Every output row decodes against its input's states (transformers' `_expand_inputs_for_generation`).
    let expand = if cfg.NumBeams > 1 then cfg.NumBeams else cfg.NumReturnSequences
    use sourceOfRow = (arange 0L (int64 b) torch.ScalarType.Int64 inputIds.device).repeat_interleave(int64 expand)  // [N]
    let states = if expand = 1 then encoded.Memory else encoded.Memory.index_select(0L, sourceOfRow)             // [N; S; D]
    let rowMask = if expand = 1 then mask else mask.index_select(0L, sourceOfRow)                                // [N; S]
    use decoding = new Decoding(model, states, rowMask, cfg.UseCache)
    let starts = Array.init (b * expand) (fun _ -> [| r.Start |])
    if cfg.NumBeams > 1 then beamSearchHf r decoding.Next decoding.Reorder starts
    else
        greedyOrSample r decoding.Next starts inputIds.device |> sampledResults r expand

// ---------------------------------------------------------------- decoder-only LMs

/// A decoder-only LM's key/value cache and attention mask for one `runCausal`: the prompt's mask [N; S] bool,
/// extended by one real position per generated token (transformers appends ones, also after EOS).
type private CausalDecoding(model: CausalLM.ICausalLM, promptMask: Tensor, useCache: bool) =
    let cache = if useCache then model.NewCache() else Unchecked.defaultof<DecoderCache>
    let mutable cached = 0
    /// Next-token logits [N; V] float32 for the N rows `ids` (prompt included, all of one length L).
    member _.Next(ids: int64[][]) : Tensor =
        let n, len = int64 ids.Length, ids[0].Length
        let s = int promptMask.shape[1]
        use mask =
            if len = s then promptMask.alias ()
            else
                use extra = torch.ones([| n; int64 (len - s) |], dtype = torch.ScalarType.Bool, device = promptMask.device)
                torch.cat([| promptMask; extra |], 1L)                                              // [N; L]
        use positions = CausalLM.positionIds mask                                                   // [N; L]
        let first = if useCache then cached else 0
        use input = torch.tensor(ids |> Array.collect (fun row -> row[first ..]), device = promptMask.device).view(n, int64 (len - first))
        use newPositions = positions.narrow(1L, int64 first, int64 (len - first))                   // [N; L - first]
        let out = model.Forward(input, mask, newPositions, cache)
        if useCache then cached <- len
        out.Logits.select(1L, -1L).to_type(torch.ScalarType.Float32)                               // [N; V]
    /// Keeps rows `rows` (beam search's reordering) of the cache.
    member _.Reorder(rows: int64[]) =
        if useCache then
            use r = torch.tensor(rows, device = promptMask.device)
            cache.Reorder(r, false)
    interface IDisposable with
        member _.Dispose() = if useCache then (cache :> IDisposable).Dispose()

/// transformers' `generate` for a decoder-only LM: greedy search, sampling or beam search with the same logits
/// processors as `run`, on left-padded prompts. inputIds [B; S] int64 (padding on the left); attentionMask
/// [B; S] bool or integer (1 = real token; null = all real). Position ids come from the attention mask
/// (`CausalLM.positionIds`), the prompt runs once and each step feeds the newest token through the
/// key/value cache (or, with UseCache false, the whole sequence). max_length counts the prompt; max_new_tokens
/// the generated tokens only. Every EOS id stops a row. Returns, per input, the generated tokens only.
/// Run the model in evaluation mode.
let runCausal (cfg: GenerationConfig) (model: CausalLM.ICausalLM) (inputIds: Tensor) (attentionMask: Tensor) : GenerationResult[] =
    // a decoder-only LM has no decoder start token: the check that one is set does not apply
    let cfg = orFail "generation config" (GenerationConfig.validate model.VocabSize { cfg with DecoderStartTokenId = Some 0 }) cfg
    expectIndex "inputIds" "[B; S]" 2 inputIds
    if inputIds.shape[0] < 1L || inputIds.shape[1] < 1L then
        invalidArg "inputIds" (sprintf "expected at least one prompt of at least one token, got %s" (describe inputIds))
    if not (isNull attentionMask) && attentionMask.shape <> inputIds.shape then
        invalidArg "attentionMask" (sprintf "expected [B; S] like inputIds %s, got %s" (describe inputIds) (describe attentionMask))
    let s = int inputIds.shape[1]
    let resolved = resolve { cfg with DecoderStartTokenId = Some 0 }
    let r =
        { resolved with
            Start = -1L
            PromptLength = s
            MaxLength = (match cfg.MaxNewTokens with Some m -> s + m | None -> cfg.MaxLength)
            MinLength = cfg.MinLength }
    if r.MaxLength <= s then
        invalidArg "cfg" (sprintf "max_length %d leaves no room after the prompt of %d tokens (set MaxNewTokens)" r.MaxLength s)
    use _ = torch.no_grad ()
    use _ = torch.NewDisposeScope()
    let b = int inputIds.shape[0]
    let mask =
        if isNull attentionMask then torch.ones(inputIds.shape, torch.ScalarType.Bool, device = inputIds.device)
        elif attentionMask.dtype = torch.ScalarType.Bool then attentionMask
        else withScalar 0.0 (fun zero -> attentionMask.ne zero)
    let expand = if cfg.NumBeams > 1 then cfg.NumBeams else cfg.NumReturnSequences
    let prompts = toInt64s (inputIds.cpu ()) |> Array.chunkBySize s                              // B x [S]
    let rows = Array.init (b * expand) (fun row -> prompts[row / expand])
    use sourceOfRow = (arange 0L (int64 b) torch.ScalarType.Int64 inputIds.device).repeat_interleave(int64 expand)  // [N]
    let rowMask = if expand = 1 then mask else mask.index_select(0L, sourceOfRow)                // [N; S]
    use decoding = new CausalDecoding(model, rowMask, cfg.UseCache)
    if cfg.NumBeams > 1 then beamSearchHf r decoding.Next decoding.Reorder rows
    else greedyOrSample r decoding.Next rows inputIds.device |> sampledResults r expand
