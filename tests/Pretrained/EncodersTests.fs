/// BERT/RoBERTa encoders and sequence classifiers (`Moe.Encoders`) against the outputs transformers 4.45.1
/// recorded for roberta-tiny (RobertaModel) and roberta-tiny-mnli (RobertaForSequenceClassification), and the
/// properties batching relies on: a right-padded batch equals each row alone, parameter names equal the
/// checkpoint's, a folder of the wrong architecture is refused naming what it holds.
module Moe.Tests.EncodersTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Moe
open Moe.Encoders
open Moe.Tests.Support
open Moe.Tests.T5Tests

let private ids1d (e: JsonElement) : int64[] = [| for x in e.EnumerateArray() -> x.GetInt64() |]

let private row (ids: int64[]) = torch.tensor(ids).reshape(1L, int64 ids.Length)

/// Largest |a - b| over all entries.
let private maxDiff (a: torch.Tensor) (b: torch.Tensor) : float =
    use d = (a - b).abs().max()
    Tensors.scalar d

/// A temporary folder removed after `body`.
let withTempDir (body: string -> unit) =
    let tmp = Path.Combine(Path.GetTempPath(), "moe-enc-" + Guid.NewGuid().ToString "N")
    try body tmp
    finally if Directory.Exists tmp then Directory.Delete(tmp, true)

/// A tiny BERT config (type ids 2, eps 1e-12, pad 0) for folders written with random weights.
let tinyBert =
    { Family = Bert; VocabSize = 40; HiddenSize = 16; NumLayers = 2; NumHeads = 2; IntermediateSize = 32
      Activation = "gelu"; HiddenDropout = 0.1; AttentionDropout = 0.1; MaxPositions = 32; TypeVocabSize = 2
      LayerNormEps = 1e-12; PadTokenId = 0; Labels = [| "no"; "yes"; "maybe" |]; ClassifierDropout = 0.1 }

/// Rows of a right-padded batch equal the rows run alone, on their real positions (hidden states) or as
/// logits; `run` gives what to compare for ids [N; T] and mask [N; T].
let private paddedEqualsAlone (pad: int64) (rows: int64[][]) (run: torch.Tensor -> torch.Tensor -> torch.Tensor) : float =
    let t = rows |> Array.map Array.length |> Array.max
    let ids = rows |> Array.collect (fun r -> Array.append r (Array.create (t - r.Length) pad))
    let mask = rows |> Array.collect (fun r -> Array.init t (fun j -> j < r.Length))
    let n = int64 rows.Length
    use batched = run (torch.tensor(ids).reshape(n, int64 t)) (torch.tensor(mask).reshape(n, int64 t))
    rows
    |> Array.mapi (fun i r ->
        use alone = run (row r) null
        let got = if batched.Dimensions = 3L then batched[int64 i].narrow(0L, 0L, int64 r.Length) else batched[int64 i]
        maxDiff got alone[0L])
    |> Array.max

let tests =
    testList "Moe.Encoders" [
        scopedShared "roberta-tiny: last hidden state equals transformers' on doc0" (fun shared ->
            let dir = modelDir shared "roberta-tiny"
            use model = loadEncoder dir
            let s = (sample dir).GetProperty "doc0_alone"
            use _ = torch.no_grad ()
            let out = model.Forward(ids2d (s.GetProperty "input_ids"), null, null)
            Expect.equal out.HiddenStates.Length 5 "embeddings + 4 layers"
            let err = sliceError out.LastHiddenState (floats3d (s.GetProperty "last_hidden_state_slice_first8"))
            Expect.isLessThan err logitsTol (sprintf "last_hidden_state[.., :8] within %g (max error %g)" logitsTol err)
            Expect.isTrue model.HasPooler "RobertaModel's checkpoint stores the pooler"
            let names = set [ for struct (n, _) in model.named_parameters () -> n ]
            Expect.equal names (storedNames (Path.Combine(dir, "model.safetensors"))) "parameter names are the checkpoint's")

        scopedShared "roberta-tiny: a right-padded batch equals each row alone; positions skip padding" (fun shared ->
            use model = loadEncoder (modelDir shared "roberta-tiny")
            let doc = ids1d ((sample (modelDir shared "roberta-tiny")).GetProperty("doc0_alone").GetProperty("input_ids")[0])
            let short = Array.append doc[.. 30] [| 2L |]
            use _ = torch.no_grad ()
            let err = paddedEqualsAlone 1L [| short; doc[.. 60]; short[.. 5] |] (fun ids mask -> (model.Forward(ids, mask, null)).LastHiddenState)
            Expect.isLessThan err Tol.f32Loose (sprintf "padded rows equal rows alone (max error %g)" err)
            use positions = robertaPositionIds 1 (torch.tensor([| 0L; 5L; 1L; 1L |]).reshape(1L, 4L))
            Expect.equal (Tensors.toInt64s positions) [| 2L; 3L; 1L; 1L |] "real tokens count from padding_idx + 1, padding keeps padding_idx")

        scopedShared "roberta-tiny-mnli: logits equal transformers', labels in id2label order, padding" (fun shared ->
            let dir = modelDir shared "roberta-tiny-mnli"
            use model = loadClassifier dir
            Expect.equal model.Labels [| "CONTRADICTION"; "NEUTRAL"; "ENTAILMENT" |] "labels from id2label"
            let s = (sample dir).GetProperty "pair0_alone"
            let ids = ids1d (s.GetProperty "input_ids")
            use _ = torch.no_grad ()
            use logits = model.Logits(row ids, null, null)
            let want = [| for x in (s.GetProperty "logits").EnumerateArray() -> x.GetDouble() |]
            let got = Tensors.toFloats logits |> Array.map float
            let err = Array.map2 (fun (a: float) b -> abs (a - b)) got want |> Array.max
            Expect.isLessThan err logitsTol (sprintf "logits within %g (max error %g)" logitsTol err)
            let err = paddedEqualsAlone 1L [| ids; Array.append ids[.. 20] [| 2L |] |] (fun i m -> model.Logits(i, m, null))
            Expect.isLessThan err Tol.f32Loose (sprintf "padded logits equal logits alone (max error %g)" err)
            let names = set [ for struct (n, _) in model.named_parameters () -> n ]
            Expect.equal names (storedNames (Path.Combine(dir, "model.safetensors"))) "parameter names are the checkpoint's")

        scopedShared "a folder without the expected architecture is refused naming what it holds" (fun shared ->
            let err = errorOf (fun () -> (loadClassifier (modelDir shared "roberta-tiny")).Dispose())
            Expect.stringContains err "RobertaModel" "names the folder's architecture"
            Expect.stringContains err "RobertaForSequenceClassification" "names the expected one"
            let err = errorOf (fun () -> (loadEncoder (modelDir shared "bart-tiny")).Dispose())
            Expect.stringContains err "\"bart\"" "names the folder's model_type"
            let err = errorOf (fun () -> (loadEncoder (Path.Combine(shared, "no-such-model"))).Dispose())
            Expect.stringContains err "no such model folder" "names the missing folder")

        testSequenced <| testCase "BERT: written and loaded back by name, pooler + classifier, token types, padding" (fun () ->
            withTempDir (fun dir ->
                use _ = torch.NewDisposeScope()
                torch.manual_seed 13L |> ignore
                writeRandomFolder dir tinyBert "BertForSequenceClassification"
                use model = loadClassifier dir
                Expect.equal model.Labels tinyBert.Labels "labels read back in order"
                let names = set [ for struct (n, _) in model.named_parameters () -> n ]
                Expect.contains names "bert.pooler.dense.weight" "BERT's classifier reads the pooler"
                Expect.contains names "classifier.weight" "one linear classifier"
                Expect.contains names "bert.encoder.layer.1.attention.self.query.weight" "transformers' layer names"
                use _ = torch.no_grad ()
                let a = [| 2L; 7L; 9L; 3L; 11L; 3L |]
                let err = paddedEqualsAlone 0L [| a; a[.. 3] |] (fun i m -> model.Logits(i, m, null))
                Expect.isLessThan err Tol.f32Loose (sprintf "padded logits equal logits alone (max error %g)" err)
                use types = torch.tensor([| 0L; 0L; 0L; 1L; 1L; 1L |]).reshape(1L, 6L)
                use withTypes = model.Logits(row a, null, types)
                use without = model.Logits(row a, null, null)
                Expect.isGreaterThan (maxDiff withTypes without) 1e-6 "token types change the output"
                // the bare encoder reads the classifier's checkpoint under its `bert.` prefix
                use encoder = loadEncoder dir
                Expect.isTrue encoder.HasPooler "the checkpoint's pooler is kept"
                use viaEncoder = encoder.Forward(row a, null, null).LastHiddenState
                use viaClassifier = model.Encoder.Forward(row a, null, null).LastHiddenState
                Expect.isLessThan (maxDiff viaEncoder viaClassifier) 1e-7 "same weights either way"
                let tooLong = Array.create 33 5L
                let err = errorOf (fun () -> model.Logits(row tooLong, null, null).Dispose())
                Expect.stringContains err "at most 32 positions" "names the position limit"))

        testCase "config.json: unknown fields and non-absolute positions are refused by name" (fun () ->
            withTempDir (fun dir ->
                Directory.CreateDirectory dir |> ignore
                let path = Path.Combine(dir, "config.json")
                let cfg = configJson tinyBert "BertModel"
                cfg["position_embedding_type"] <- Nodes.JsonValue.Create "relative_key"
                File.WriteAllText(path, cfg.ToJsonString())
                Expect.stringContains (errorOf (fun () -> EncoderConfig.parse path |> ignore)) "position_embedding_type" "refused"
                let cfg = configJson tinyBert "BertModel"
                cfg["rope_theta"] <- Nodes.JsonValue.Create 10000.0
                File.WriteAllText(path, cfg.ToJsonString())
                Expect.stringContains (errorOf (fun () -> EncoderConfig.parse path |> ignore)) "rope_theta" "an unknown field is named"
                let parsed = (File.WriteAllText(path, (configJson tinyBert "BertModel").ToJsonString()); EncoderConfig.parse path)
                Expect.equal parsed tinyBert "configJson and parse round-trip"))
    ]
