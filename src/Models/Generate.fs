/// Greedy and beam-search decoding for the encoder-decoder. The encoder runs once; each step feeds only
/// the newest token through the decoder and its key/value cache.
/// Axes: B sources, K beams per source, N rows decoded together (B for greedy, B * K for beams),
/// S source positions, V vocabulary.
module Moe.Generate

open System
open System.Collections.Generic
open System.Runtime.InteropServices
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Models

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
