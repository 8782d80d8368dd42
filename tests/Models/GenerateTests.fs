/// transformers-exact generation (`Generate.run`) checked against plain references over a table model whose
/// next-token logits are a fixed function of the source and the decoder prefix.
module Moe.Tests.GenerateTests

open System
open System.IO
open Expecto
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Models
open Moe.Seq2Seq
open Moe.Generate
open Moe.Tests.Support

type Tensor = torch.Tensor

let vocab = 8
let startId, padId, eosId = 0, 1, 2

/// Logit of `token` after `prefix` (start token included) for a source whose real tokens are `source`:
/// a hash spread over [-4, 4) in steps of 1e-4 (ties are rare), EOS growing with the prefix length so
/// that outputs end at various lengths.
let tableLogit (source: int64[]) (prefix: int64[]) (token: int) : float32 =
    let mutable h = 2166136261u
    let mix (x: int64) = h <- (h ^^^ uint32 (x + 17L)) * 16777619u
    for s in source do mix s
    mix -1L
    for p in prefix do mix p
    mix (int64 token)
    let spread = float32 (h % 80000u) / 10000.0f - 4.0f
    if token = eosId then spread + 0.5f * float32 prefix.Length - 2.0f else spread

/// An ISeq2SeqModel over `tableLogit`: Encode keeps the ids (masked positions as -1), the cache keeps the
/// decoder ids given so far (as keys of a one-layer cache), Decode reads the whole prefix from it.
let tableModel () : ISeq2SeqModel =
    { new ISeq2SeqModel with
        member _.VocabSize = vocab
        member _.NewCache() = new DecoderCache(1)
        member _.Encode(inputIds, attentionMask) =
            use minusOne = Tensors.withInt64Scalar -1L (fun v -> torch.full_like(inputIds, v))
            { Memory = torch.where(attentionMask, inputIds, minusOne).to_type(torch.ScalarType.Float64).unsqueeze(2L)
              Moe = [] }
        member _.Decode(decoderIds, encoderStates, _, cache) =
            let n, t = int decoderIds.shape[0], int decoderIds.shape[1]
            let given = decoderIds.to_type(torch.ScalarType.Float64).view(int64 n, 1L, int64 t, 1L)   // [N; 1; T; 1]
            let prefixes =
                if isNull (box cache) then given
                else
                    cache.Layers[0].Self.Append(given, given)
                    cache.Layers[0].Self.Keys
            let all = toFloats prefixes |> Array.map int64
            let len = int prefixes.shape[2]
            let src = toFloats encoderStates
            let s = int encoderStates.shape[1]
            let logits =
                [| for row in 0 .. n - 1 do
                       let source = src[row * s .. (row + 1) * s - 1] |> Array.map int64 |> Array.filter (fun x -> x >= 0L)
                       let ids = all[row * len .. (row + 1) * len - 1]
                       for pos in len - t .. len - 1 do
                           for v in 0 .. vocab - 1 -> tableLogit source ids[.. pos] v |]
            { Logits = torch.tensor(logits).view(int64 n, int64 t, int64 vocab); Moe = [] } }

let baseConfig =
    { GenerationConfig.defaults with
        DecoderStartTokenId = Some startId; PadTokenId = Some padId; EosTokenId = [ eosId ]; MaxLength = 12 }

let sources = [| [| 3L; 4L; 5L |]; [| 6L; 7L |]; [| 5L |]; [| 4L; 4L; 6L; 7L |] |]

/// Right-padded ids [B; S] and mask [B; S] bool.
let batch (rows: int64[][]) : Tensor * Tensor =
    let s = rows |> Array.map Array.length |> Array.max
    let ids = rows |> Array.collect (fun r -> Array.append r (Array.create (s - r.Length) (int64 padId)))
    let mask = rows |> Array.collect (fun r -> Array.init s (fun i -> i < r.Length))
    torch.tensor(ids).view(int64 rows.Length, int64 s), torch.tensor(mask).view(int64 rows.Length, int64 s)

let generate cfg (rows: int64[][]) =
    let ids, mask = batch rows
    run cfg (tableModel ()) ids mask

/// log_softmax in double of the table's logits after `prefix`.
let logProbs (source: int64[]) (prefix: int64[]) : float[] =
    let logits = Array.init vocab (fun v -> float (tableLogit source prefix v))
    let m = Array.max logits
    let z = logits |> Array.sumBy (fun l -> exp (l - m))
    logits |> Array.map (fun l -> l - m - log z)

/// Beam search written plainly from BeamSearchScorer's rules (no logits processors): per step the 2K best
/// (beam, token) by summed log-prob; EOS among the top K closes a hypothesis scored sum / length^alpha
/// (length: generated tokens with EOS); the first K others continue; the n-best keeps the K best; an input
/// is done by `early_stopping`'s rule; at max_length open beams are added unfinished.
let referenceBeam (k: int) (alpha: float) (early: EarlyStopping) (maxLength: int) (source: int64[]) =
    let mutable beams = [ for i in 0 .. k - 1 -> [| int64 startId |], (if i = 0 then 0.0 else -1e9) ]
    let kept = ResizeArray<float * int64[] * bool>()
    let add (ids: int64[]) (sum: float) (length: int) finished =
        kept.Add((sum / Math.Pow(float length, alpha), ids, finished))
        // keep the best K; among equal scores the earliest added goes first
        if kept.Count > k then
            let worst = kept |> Seq.mapi (fun i (s, _, _) -> s, i) |> Seq.min |> snd
            kept.RemoveAt worst
    let worstKept () = kept |> Seq.map (fun (s, _, _) -> s) |> Seq.min
    let mutable fin = false
    let mutable len = 1
    while not fin do
        let candidates =
            [ for (bi, (ids, score)) in List.indexed beams do
                  let lp = logProbs source ids
                  for t in 0 .. vocab - 1 -> score + lp[t], bi, t ]
            |> List.sortByDescending (fun (s, _, _) -> s) |> List.truncate (2 * k)
        let next = ResizeArray()
        candidates |> List.iteri (fun rank (s, bi, t) ->
            let ids = fst beams[bi]
            if next.Count < k then
                if t = eosId then (if rank < k then add ids s (ids.Length) true)
                else next.Add(Array.append ids [| int64 t |], s))
        let best, _, _ = candidates.Head
        let isDone =
            kept.Count >= k &&
            (match early with
             | EarlyStopping.Eager -> true
             | EarlyStopping.Heuristic -> worstKept () >= best / Math.Pow(float len, alpha)
             | EarlyStopping.Never -> worstKept () >= best / Math.Pow(float (if alpha > 0.0 then maxLength - 1 else len), alpha))
        beams <- List.ofSeq next
        len <- len + 1
        if isDone then fin <- true
        elif len >= maxLength then
            for ids, s in beams do add ids s (ids.Length - 1) false
            fin <- true
    kept |> Seq.sortByDescending (fun (s, _, _) -> s) |> Seq.map (fun (s, ids, f) ->
        (if f then Array.append (Array.map int ids[1..]) [| eosId |] else Array.map int ids[1..]), s, f) |> Array.ofSeq

let scoreTol = { absolute = 1e-4; relative = 1e-5 }

/// Every n-gram of `ids` occurs once.
let ngramsDistinct (n: int) (ids: int[]) =
    let grams = [ for i in 0 .. ids.Length - n -> ids[i .. i + n - 1] |> List.ofArray ]
    List.length grams = (grams |> List.distinct |> List.length)

let tests =
    testList "Generate" [
        testCase "greedy takes the argmax of the table at every step and stops at EOS" <| fun () ->
            let results = generate baseConfig sources
            for i, source in Array.indexed sources do
                let out = results[i].Sequences[0]
                let mutable prefix = [| int64 startId |]
                for t in out do
                    let logits = Array.init vocab (fun v -> tableLogit source prefix v)
                    Expect.equal t (Array.findIndex ((=) (Array.max logits)) logits) (sprintf "input %d step %d" i prefix.Length)
                    prefix <- Array.append prefix [| int64 t |]
                Expect.equal results[i].Finished[0] (Array.last out = eosId) "finished iff ends with EOS"
                Expect.isTrue (out.Length <= baseConfig.MaxLength - 1) "max_length counts the start token"
                Expect.isNone results[i].Scores "greedy has no sequence scores"

        testCase "beam search equals a plain BeamSearchScorer for early_stopping true/false/never and length_penalty 0/1/2" <| fun () ->
            for early in [ EarlyStopping.Eager; EarlyStopping.Heuristic; EarlyStopping.Never ] do
                for alpha in [ 0.0; 1.0; 2.0 ] do
                    for k in [ 2; 3 ] do
                        let cfg = { baseConfig with NumBeams = k; LengthPenalty = alpha; EarlyStopping = early; NumReturnSequences = k }
                        let results = generate cfg sources
                        for i, source in Array.indexed sources do
                            let expected = referenceBeam k alpha early cfg.MaxLength source
                            let what = sprintf "%A alpha %g beams %d input %d" early alpha k i
                            Expect.equal results[i].Sequences (expected |> Array.map (fun (ids, _, _) -> ids)) (what + ": ids")
                            Expect.equal results[i].Finished (expected |> Array.map (fun (_, _, f) -> f)) (what + ": finished")
                            Array.iter2 (fun a (_, e, _) -> Expect.floatClose scoreTol a e (what + ": score")) results[i].Scores.Value expected

        testCase "cached decoding equals recomputing the prefix (greedy, beams, sampling)" <| fun () ->
            for cfg in [ baseConfig; { baseConfig with NumBeams = 3; NoRepeatNgramSize = 2 }
                         { baseConfig with DoSample = true; Seed = 5L; TopK = 4; NumReturnSequences = 2 } ] do
                let cached = generate cfg sources
                let uncached = generate { cfg with UseCache = false } sources
                for i in 0 .. sources.Length - 1 do
                    Expect.equal uncached[i].Sequences cached[i].Sequences "ids"
                    Expect.equal uncached[i].Scores cached[i].Scores "scores"

        testCase "a padded batch gives each input's result alone" <| fun () ->
            for cfg in [ baseConfig; { baseConfig with NumBeams = 3; MinLength = 4 } ] do
                let together = generate cfg sources
                for i, source in Array.indexed sources do
                    let alone = generate cfg [| source |]
                    Expect.equal together[i] alone[0] (sprintf "input %d" i)

        testCase "no_repeat_ngram_size: no n-gram of the decoder sequence repeats" <| fun () ->
            for n in [ 1; 2; 3 ] do
                for beams in [ 1; 3 ] do
                    let cfg = { baseConfig with NoRepeatNgramSize = n; NumBeams = beams; EosTokenId = [ 7 ]; MaxLength = 10 }
                    for r in generate cfg sources do
                        for ids in r.Sequences do
                            let full = Array.append [| startId |] ids
                            Expect.isTrue (ngramsDistinct n full) (sprintf "n %d beams %d: %A" n beams full)

        testCase "min_length and min_new_tokens hold; max_new_tokens sets the length" <| fun () ->
            for cfg in [ { baseConfig with MinLength = 7 }; { baseConfig with MinNewTokens = Some 6; NumBeams = 2 } ] do
                for r in generate cfg sources do
                    for ids in r.Sequences do
                        Expect.isFalse (ids[.. 5] |> Array.contains eosId) (sprintf "no EOS among the first 6: %A" ids)
            let cfg = { baseConfig with EosTokenId = [ 7 ]; NoRepeatNgramSize = 0; MaxNewTokens = Some 5; MaxLength = 50 }
            for r in generate cfg sources do
                Expect.isTrue (r.Sequences[0].Length <= 5) "at most max_new_tokens"

        testCase "forced BOS is the first token, forced EOS the token at max_length - 1" <| fun () ->
            for beams in [ 1; 3 ] do
                let cfg = { baseConfig with ForcedBosTokenId = Some 6; ForcedEosTokenId = [ eosId ]; NumBeams = beams; EosTokenId = [ eosId ]; MinLength = 30; MaxLength = 9 }
                for r in generate cfg sources do
                    let ids = r.Sequences[0]
                    Expect.equal ids[0] 6 "forced BOS"
                    Expect.equal ids.Length 8 "max_length 9 = start + 8 tokens"
                    Expect.equal (Array.last ids) eosId "forced EOS at the last position, over min_length"
                    Expect.isTrue r.Finished[0] "finished"

        testCase "several EOS ids: generation stops at either" <| fun () ->
            let one = generate baseConfig sources
            let two = generate { baseConfig with EosTokenId = [ eosId; 5 ] } sources
            for i in 0 .. sources.Length - 1 do
                let ids = two[i].Sequences[0]
                let stop = ids |> Array.tryFindIndex (fun t -> t = eosId || t = 5)
                Expect.equal stop (if two[i].Finished[0] then Some (ids.Length - 1) else None) "stops at the first EOS"
                Expect.equal ids (one[i].Sequences[0][.. ids.Length - 1]) "same path until then"

        testCase "repetition penalty divides positive logits and multiplies negative ones, start token included" <| fun () ->
            let cfg = { baseConfig with RepetitionPenalty = 1.7; EosTokenId = [ 7 ]; MaxNewTokens = Some 6 }
            for i, r in Array.indexed (generate cfg sources) do
                let mutable prefix = [| int64 startId |]
                for t in r.Sequences[0] do
                    let logits =
                        Array.init vocab (fun v ->
                            let l = tableLogit sources[i] prefix v
                            if Array.contains (int64 v) prefix then (if l < 0.0f then l * float32 1.7 else l / float32 1.7) else l)
                    Expect.equal t (Array.findIndex ((=) (Array.max logits)) logits) (sprintf "input %d step %d" i prefix.Length)
                    prefix <- Array.append prefix [| int64 t |]

        testCase "top-k and top-p keep exactly the expected sets" <| fun () ->
            // with sampling, every drawn token must lie in the kept set of its step
            for topK, topP in [ 3, 1.0; 0, 0.5; 2, 0.3; 8, 0.9 ] do
                let cfg = { baseConfig with DoSample = true; TopK = topK; TopP = topP; Temperature = 0.7; NumReturnSequences = 3; Seed = 11L }
                for i, r in Array.indexed (generate cfg sources) do
                    for ids in r.Sequences do
                        let mutable prefix = [| int64 startId |]
                        for t in ids do
                            let scaled = Array.init vocab (fun v -> tableLogit sources[i] prefix v / float32 0.7)
                            let order = [| 0 .. vocab - 1 |] |> Array.sortByDescending (fun v -> scaled[v])
                            let keptK = if topK = 0 then order else order |> Array.filter (fun v -> scaled[v] >= scaled[order[topK - 1]])
                            let m = keptK |> Array.map (fun v -> float scaled[v]) |> Array.max
                            let z = keptK |> Array.sumBy (fun v -> exp (float scaled[v] - m))
                            // top-p: drop the least probable while the mass dropped stays <= 1 - p
                            let mutable dropped = 0.0
                            let kept = ResizeArray(keptK)
                            for v in Array.rev keptK do
                                let p = exp (float scaled[v] - m) / z
                                if kept.Count > 1 && dropped + p <= 1.0 - topP + 1e-6 then
                                    dropped <- dropped + p
                                    kept.Remove v |> ignore
                            Expect.contains kept t (sprintf "top_k %d top_p %g: %d drawn outside %A" topK topP t (List.ofSeq kept))
                            prefix <- Array.append prefix [| int64 t |]

        testCase "seeded sampling repeats, and another seed draws differently" <| fun () ->
            let cfg = { baseConfig with DoSample = true; TopK = 0; NumReturnSequences = 4; EosTokenId = [ 7 ] }
            let a = generate cfg sources
            let b = generate cfg sources
            let c = generate { cfg with Seed = 99L } sources
            Expect.equal a b "same seed"
            Expect.notEqual (a |> Array.map (fun r -> r.Sequences)) (c |> Array.map (fun r -> r.Sequences)) "another seed"

        testCase "config: generation_config.json, config.json fallback, overrides, validation" <| fun () ->
            let dir = Path.Combine(Path.GetTempPath(), sprintf "moe-gen-%s" (Guid.NewGuid().ToString "N"))
            Directory.CreateDirectory dir |> ignore
            try
                File.WriteAllText(Path.Combine(dir, "config.json"),
                    """{"model_type": "bart", "num_beams": 6, "max_length": 62, "min_length": 11, "no_repeat_ngram_size": 3,
                        "length_penalty": 1.0, "early_stopping": true, "d_model": 16, "force_bos_token_to_be_generated": true, "bos_token_id": 0}""")
                let fromModel = GenerationConfig.load dir
                Expect.equal (fromModel.NumBeams, fromModel.MaxLength, fromModel.MinLength, fromModel.NoRepeatNgramSize) (6, 62, 11, 3) "config.json fields"
                Expect.equal fromModel.EarlyStopping EarlyStopping.Eager "early_stopping"
                Expect.equal (fromModel.ForcedBosTokenId, fromModel.ForcedEosTokenId, fromModel.DecoderStartTokenId) (Some 0, [ 2 ], Some 2) "BartConfig's defaults"
                File.WriteAllText(Path.Combine(dir, "generation_config.json"),
                    """{"decoder_start_token_id": 0, "eos_token_id": [1, 5], "pad_token_id": 0, "early_stopping": "never", "num_beams": 4, "transformers_version": "4.45.1"}""")
                let fromFile = GenerationConfig.load dir
                Expect.equal (fromFile.EosTokenId, fromFile.EarlyStopping, fromFile.NumBeams, fromFile.MaxLength) ([ 1; 5 ], EarlyStopping.Never, 4, 20) "generation_config.json wins, defaults elsewhere"
                let set = GenerationConfig.setAll [ "Generate.NumBeams=2"; "length_penalty=0.5"; "EarlyStopping=false"; "ForcedBosTokenId=none"; "EosTokenId=[2,3]" ] fromFile
                Expect.equal (set.NumBeams, set.LengthPenalty, set.EarlyStopping, set.EosTokenId) (2, 0.5, EarlyStopping.Heuristic, [ 2; 3 ]) "overrides"
                Expect.throws (fun () -> GenerationConfig.set "NumBeans=2" set |> ignore) "unknown name"
                Expect.throws (fun () -> GenerationConfig.set "NumBeams=two" set |> ignore) "bad value"
                File.WriteAllText(Path.Combine(dir, "generation_config.json"), """{"num_beam_groups": 2, "decoder_start_token_id": 0}""")
                Expect.throws (fun () -> GenerationConfig.load dir |> ignore) "unsupported field refused"
                File.WriteAllText(Path.Combine(dir, "config.json"),
                    """{"model_type": "t5", "decoder_start_token_id": 0, "task_specific_params": {"summarization":
                        {"early_stopping": true, "length_penalty": 2.0, "max_length": 200, "min_length": 30, "num_beams": 4, "prefix": "summarize: "}}}""")
                let t5 = GenerationConfig.ofModelConfigFile (Path.Combine(dir, "config.json"))
                Expect.equal (t5.NumBeams, t5.MaxLength, t5.EosTokenId, t5.PadTokenId) (1, 20, [ 1 ], Some 0) "generate ignores task_specific_params"
                let summarize, prefix = GenerationConfig.withTaskParams (Path.Combine(dir, "config.json")) "summarization" t5
                Expect.equal (summarize.NumBeams, summarize.LengthPenalty, summarize.MinLength, summarize.MaxLength, summarize.EarlyStopping, prefix)
                    (4, 2.0, 30, 200, EarlyStopping.Eager, Some "summarize: ") "the summarization pipeline's settings"
                Expect.throws (fun () -> GenerationConfig.withTaskParams (Path.Combine(dir, "config.json")) "translation" t5 |> ignore) "absent task"
                let problems = GenerationConfig.validate vocab { baseConfig with NumBeams = 0; TopP = 2.0; DoSample = true; NumReturnSequences = 0 }
                Expect.equal problems.Length 3 (sprintf "every problem at once: %A" problems)
            finally
                Directory.Delete(dir, true)

        testSequenced (testCase "no tensor outlives a run (greedy, beams, sampling, with and without cache)" (fun () ->
            let configs =
                [ baseConfig; { baseConfig with NumBeams = 3; NoRepeatNgramSize = 2; RepetitionPenalty = 1.3; ForcedBosTokenId = Some 5 }
                  { baseConfig with DoSample = true; TopK = 3; TopP = 0.8; NumReturnSequences = 2 }
                  { baseConfig with NumBeams = 2; UseCache = false } ]
            let ids, mask = batch sources
            let model = tableModel ()
            run baseConfig model ids mask |> ignore
            let before = liveTensors ()
            for cfg in configs do run cfg model ids mask |> ignore
            Expect.isLessThanOrEqual (liveTensors ()) before "live tensors do not grow"
            ids.Dispose()
            mask.Dispose()))

        testCase "the toolkit's own EncoderDecoder through Seq2Seq.ofModel: greedy equals Generate.greedy, cached equals uncached" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 31L |> ignore
            use model = new EncoderDecoder(ModelsTests.generationConfig)
            model.eval ()
            let src = ModelsTests.randIds 3L 20L [| 3L; 5L |]
            let own = greedy { ModelsTests.genConfig with BeamSize = 1; MaxLength = 6 } model src null
            let cfg = { GenerationConfig.defaults with DecoderStartTokenId = Some 1; EosTokenId = [ 2 ]; MaxNewTokens = Some 6 }
            let hf = run cfg (ofModel model) src null
            for i in 0 .. 2 do
                let expected = Array.append own[i].Tokens (if own[i].Finished then [| 2 |] else [||])
                Expect.equal hf[i].Sequences[0] expected (sprintf "source %d" i)
            for c in [ cfg; { cfg with NumBeams = 3; LengthPenalty = 0.6 } ] do
                let cached = run c (ofModel model) src null
                let uncached = run { c with UseCache = false } (ofModel model) src null
                for i in 0 .. 2 do
                    Expect.equal uncached[i].Sequences cached[i].Sequences (sprintf "beams %d source %d" c.NumBeams i)
    ]
