/// Routing analysis of pretrained MoE LMs (`Moe.MoeLmRouting`, what `moe routing` and
/// scripts/moe_lm_routing.fsx run): per-token router choices equal transformers' recorded ones for the three
/// tiny MoE checkpoints, weights as each family combines them, the script's smoke writes a run folder the
/// report reads, and the refusals (a dense model, text without a tokenizer, a bad ids line, too many tokens).
module Moe.Tests.MoeLmRoutingTests

open System
open System.IO
open System.Text.Json
open Expecto
open Moe
open Moe.Tests.Support

let private models (shared: string) = Path.GetFullPath(Path.Combine(shared, "..", "models"))

let private message (f: unit -> unit) : string =
    try f (); failwith "expected an error"
    with e when e.Message <> "expected an error" -> e.Message

/// The recorded input ids and layer 0's selected experts [T][K].
let private recorded (dir: string) : int[] * int[][] =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
    let s = doc.RootElement
    let ids = [| for e in (s.GetProperty("seq0_alone").GetProperty("input_ids")[0]).EnumerateArray() -> e.GetInt32() |]
    let chosen = [| for t in (s.GetProperty("seq0_router_layer0").GetProperty("selected_experts")[0]).EnumerateArray() -> [| for x in t.EnumerateArray() -> x.GetInt32() |] |]
    ids, chosen

let tests =
    testSequenced <| testList "MoeLmRouting" [
        testWithShared "routing --input-ids --json: mixtral, qwen2-moe and olmoe tiny choose transformers' experts in order, with each family's weights" <| fun shared ->
            for name, renormalised in [ "mixtral-tiny", true; "qwen2-moe-tiny", false; "olmoe-tiny", false ] do
                use m = MoeLmRouting.openModel (Path.Combine(models shared, name)) None
                let ids, expected = recorded (Path.Combine(models shared, name))
                let line = MoeLmRouting.jsonLine (MoeLmRouting.route m ids)
                use doc = JsonDocument.Parse line
                let layers = [ for l in doc.RootElement.GetProperty("layers").EnumerateArray() -> l ]
                Expect.equal (layers.Head.GetProperty("layer").GetString()) "layers.0" (sprintf "%s: layer names" name)
                let experts = [| for t in layers.Head.GetProperty("experts").EnumerateArray() -> [| for x in t.EnumerateArray() -> x.GetInt32() |] |]
                Expect.equal experts expected (sprintf "%s: layer 0's experts equal transformers' (torch.topk order)" name)
                let routes = (MoeLmRouting.route m ids).Head
                for j in 0 .. ids.Length - 1 do
                    let w = routes.Weights[j]
                    let p = routes.Experts[j] |> Array.map (fun e -> routes.Probs[j][e])
                    Expect.isTrue (Array.forall2 (fun a b -> a >= b) w[.. w.Length - 2] w[1 ..]) (sprintf "%s: weights in rank order" name)
                    if renormalised then Expect.floatClose Accuracy.medium (Array.sum w) 1.0 (sprintf "%s: top-k weights renormalised" name)
                    else Array.iter2 (fun a b -> Expect.floatClose Accuracy.medium a b (sprintf "%s: weights are the router's probabilities" name)) w p

        testWithShared "routing refusals: a dense model, text without a tokenizer, a bad ids line, more tokens than positions" <| fun shared ->
            for dense in [ "qwen2-tiny"; "gpt2-tiny-hf" ] do
                let m = message (fun () -> (MoeLmRouting.openModel (Path.Combine(models shared, dense)) None :> IDisposable).Dispose())
                Expect.stringContains m "no MoE layers" (sprintf "%s refused" dense)
                Expect.stringContains m "mixtral, qwen2_moe or olmoe" "names what was expected"
            use m = MoeLmRouting.openModel (Path.Combine(models shared, "olmoe-tiny")) None
            let msg = message (fun () -> MoeLmRouting.readDocuments m Data.DataConfig.defaults (Path.Combine(shared, "xsum-test-docs", "test.llm_decoding.jsonl")) 1 |> ignore)
            Expect.stringContains msg "no tokenizer files" "text without a tokenizer is refused"
            Expect.stringContains msg "--tokenizer DIR" "says how to give a tokenizer"
            Expect.stringContains msg "--input-ids" "or ids"
            let msg = message (fun () -> MoeLmRouting.parseIdsLine "ids.txt" 3 "[1, \"a\"]" |> ignore)
            Expect.stringContains msg "ids.txt line 3" "a bad line is refused naming file and line"
            let labelled = MoeLmRouting.parseIdsLine "ids.txt" 1 """{"ids": [1, 2], "label": "de"}"""
            Expect.equal (labelled.Ids, labelled.Label) ([| 1; 2 |], Some "de") "an object line carries a label"
            let msg = message (fun () -> MoeLmRouting.route m (Array.zeroCreate (m.Lm.MaxPositions + 1)) |> ignore)
            Expect.stringContains msg "max_position_embeddings" "too many tokens refused naming the limit"

        testWithShared "scripts/moe_lm_routing.fsx --smoke: qwen2-moe-tiny's routing statistics, by-language use and coloured routes, read by the report" <| fun shared ->
            let out = Path.Combine(Path.GetTempPath(), "moe-lm-routing-tests", Guid.NewGuid().ToString("N"))
            try
                let lines = ResizeArray<string>()
                let r = MoeLmRouting.runScript lines.Add shared [| "--smoke"; "--out"; out |]
                Expect.equal r.Documents 6 "2 documents of each of 3 languages"
                for f in r.Files do Expect.isTrue (File.Exists(Path.Combine(out, f))) (sprintf "%s written" f)
                let run = RunLog.load out
                Expect.equal (run.Routing |> Array.map (fun x -> x.Layer) |> Array.distinct) [| for l in r.Layers -> l.Layer |] "routing.jsonl has every MoE layer"
                Expect.equal run.Routing.Length (6 * r.Layers.Length) "one record per document and layer"
                Expect.isTrue (run.Routing |> Array.forall (fun x -> abs (Array.sum x.TokensPerExpert - 1.0) < 1e-9 && x.RouterEntropy > 0.0)) "shares sum to 1, entropy positive"
                let byLabel = run.ByLabel.Value
                Expect.equal byLabel[0].Labels [| "de"; "es"; "fr" |] "expert use by language"
                let picks = r.Layers.Head.Assignments |> Array.sum
                Expect.equal (byLabel[0].Counts |> Array.sumBy Array.sum) picks "the by-label counts add up to every assignment"
                Expect.stringContains (File.ReadAllText(Path.Combine(out, "routes.html"))) "expert 0" "routes.html has the expert legend"
                Expect.isTrue (lines |> Seq.exists (fun l -> l.Contains "load CV")) "a per-layer summary"
            finally if Directory.Exists out then Directory.Delete(out, true)
    ]
