/// The gating-strategy study on a pretrained Switch Transformer (`scripts/gating_switch.fsx`, `Moe.GatingSwitch`):
/// the checkpoint's cell and the attention router started from it compute transformers' recorded outputs for
/// switch-tiny, every cell trains, top-k costs fewer FLOPs than dense mixing, and a smoke run of the grid writes
/// its table, figure and report page with the sparsemax cells' measured active experts.
module Moe.Tests.GatingSwitchTests

open System
open System.IO
open Expecto
open TorchSharp
open Moe
open Moe.Config
open Moe.Experiments
open Moe.GatingSwitch
open Moe.Tests.Support
open Moe.Tests.T5Tests

/// Router logits of the factored attention router against the linear one's.
let private factorTol = 1e-5

let private cellNamed (name: string) = Cell.all |> List.find (fun c -> Cell.name 1 c = name)

/// switch-tiny with the cell's router, and the recorded sample's inputs.
let private tinyWith (shared: string) (cell: Cell) =
    let dir = modelDir shared "switch-tiny"
    let model = Switch.fromFolder dir
    configure 1 cell model
    let s = (sample dir).GetProperty "src0_alone"
    model, s, ids2d (s.GetProperty "input_ids"), mask2d (s.GetProperty "attention_mask"), ids2d (s.GetProperty "labels")

let tests =
    testList "GatingSwitch" [
        test "the grid: eight cells named by router, normaliser and selection; the checkpoint's cell first" {
            Expect.equal (Cell.all |> List.map (Cell.name 1))
                [ "linear-softmax-top1"; "linear-softmax-all"; "linear-sparsemax-top1"; "linear-sparsemax-all"
                  "attention-softmax-top1"; "attention-softmax-all"; "attention-sparsemax-top1"; "attention-sparsemax-all" ] "names"
            Expect.equal (Cell.all |> List.filter (Cell.isCheckpoint 1) |> List.map (Cell.name 1)) [ "linear-softmax-top1" ] "one checkpoint cell at k = 1"
            Expect.isEmpty (Cell.all |> List.filter (Cell.isCheckpoint 2)) "no cell is the checkpoint's at k = 2"
        }
        test "options: smoke, quick by default, full with a model; problems all at once" {
            let dir = Path.Combine(Path.GetTempPath(), "moe-gating-options", Guid.NewGuid().ToString("N"))
            Directory.CreateDirectory(Path.Combine(dir, "models", "switch-tiny")) |> ignore
            File.WriteAllText(Path.Combine(dir, "models", "switch-tiny", "config.json"), "{}")
            Directory.CreateDirectory(Path.Combine(dir, "data", "xsum-test-docs")) |> ignore
            File.WriteAllText(Path.Combine(dir, "data", GatingSwitchOptions.defaultData), "")
            try
                Expect.equal (GatingSwitchOptions.parseOrFail dir [| "--smoke" |]).Scale Smoke "smoke"
                let q = GatingSwitchOptions.parseOrFail dir [||]
                Expect.equal (q.Scale, q.TopK, q.Model) (Quick, 1, Path.Combine(dir, "models", "switch-tiny")) "quick on switch-tiny, top-1"
                let f = GatingSwitchOptions.parseOrFail dir [| "--full"; "--model"; Path.Combine(dir, "models", "switch-tiny"); "--top-k"; "2" |]
                Expect.equal (f.Scale, f.TopK) (Full, 2) "full, top-2"
                match GatingSwitchOptions.parse dir [| "--smoke"; "--full"; "--top-k"; "0"; "--fast"; "--model"; "/no/such/model" |] with
                | Ok o -> failtestf "expected errors, got %A" o
                | Error ps ->
                    Expect.equal ps.Length 4 (sprintf "exclusive flags, bad k, unknown flag, missing model: %A" ps)
                    Expect.exists ps (fun p -> p.Contains "/no/such/model") "names the missing model"
            finally Directory.Delete(dir, true)
        }
        test "FLOPs per token: top-k below dense mixing for each router and normaliser" {
            let path = Path.Combine(Path.GetTempPath(), sprintf "moe-gating-%s.json" (Guid.NewGuid().ToString("N")))
            File.WriteAllText(path, """{"model_type": "switch_transformers", "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}""")
            let sw = try Switch.SwitchConfig.parse path finally File.Delete path
            let expert = Analysis.denseFfnFlops sw.T5.DModel sw.T5.DFf ReLU
            for router in [ Linear; Attention ] do
                for norm in [ Softmax; Sparsemax ] do
                    let cost (topK: bool) =
                        let c = { Router = router; Normaliser = norm; TopK = topK }
                        Analysis.moeFlops (moeOf sw 1 c) (Analysis.configuredActiveExperts (routerOf sw 1 c))
                    Expect.isLessThan (cost true) (cost false) (sprintf "%A %A: top-1 < all experts" router norm)
                    Expect.floatClose Accuracy.high (cost false - cost true) (float (sw.NumExperts - 1) * expert) "seven more experts per token (switch-base-8's shape)"
        }
        scopedShared "the checkpoint's cell and the attention router factored from it compute transformers' outputs" (fun shared ->
            for name in [ "linear-softmax-top1"; "attention-softmax-top1" ] do
                let model, s, ids, mask, labels = tinyWith shared (cellNamed name)
                use _ = model
                use _ = torch.no_grad ()
                let out = model.Forward(ids, mask, labels)
                let err = sliceError out.Logits (floats3d (s.GetProperty "logits_slice_first8"))
                Expect.isLessThan err logitsTol (sprintf "%s: logits within %g of transformers' (max error %g)" name logitsTol err)
                Expect.floatClose { absolute = logitsTol; relative = 0.0 } (float (out.Loss.item<float32> ())) ((s.GetProperty "loss").GetDouble()) (name + ": loss")
            // the factorisation on its own: the attention router scores as the linear one
            use linear = Switch.fromFolder (modelDir shared "switch-tiny")
            use attention = Switch.fromFolder (modelDir shared "switch-tiny")
            configure 1 (cellNamed "attention-sparsemax-all") attention
            use h = torch.randn ([| 16L; int64 linear.SwitchConfig.T5.DModel |])
            for (_, a), (_, l) in Array.zip (attention.MoeLayers()) (linear.MoeLayers()) do
                Expect.equal a.Router.Config.Scorer (AttentionRouter(attentionDim linear.SwitchConfig)) "attention router"
                let err = (a.Router.Logits h - l.Router.Logits h).abs().max().item<float32> () |> float
                Expect.isLessThan err factorTol (sprintf "attention logits = linear logits (max error %g)" err))
        scopedShared "every cell trains: finite loss, gradients reach every router" (fun shared ->
            for cell in Cell.all do
                let model, _, ids, mask, labels = tinyWith shared cell
                use _ = model
                model.train ()
                let out = model.Forward(ids, mask, labels)
                let loss = float (out.Loss.item<float32> ())
                Expect.isTrue (Double.IsFinite loss) (sprintf "%s: finite loss, got %g" (Cell.name 1 cell) loss)
                out.Loss.backward ()
                for place, layer in model.MoeLayers() do
                    Expect.equal layer.Router.Config.Normaliser cell.Normaliser "the cell's normaliser"
                    let grad = layer.Router.parameters () |> Seq.sumBy (fun p -> if isNull p.grad then 0.0 else float (p.grad.abs().sum().item<float32> ()))
                    Expect.isGreaterThan grad 0.0 (sprintf "%s %s: the router receives gradients" (Cell.name 1 cell) place))
        testSequenced <| testWithShared "smoke: the grid on switch-tiny writes its table, figure and report page" (fun shared ->
            let dir = Path.Combine(Path.GetTempPath(), "moe-gating-smoke", Guid.NewGuid().ToString("N"))
            try
                let o =
                    { GatingSwitchOptions.parseOrFail (Path.GetDirectoryName shared) [| "--smoke" |] with
                        RunsDir = Path.Combine(dir, "runs"); ReportsDir = Path.Combine(dir, "reports"); Screenshot = false }
                let r = GatingSwitch.run o
                Expect.equal r.BaseModel "switch-tiny" "base model named"
                Expect.equal (r.Cells |> List.map (fun c -> c.Name)) (Cell.all |> List.map (Cell.name 1)) "every cell ran"
                let table = List.exactlyOne r.Experiment.Tables
                Expect.equal table.Rows.Length 8 "one row per cell"
                Expect.stringContains table.Title "switch-tiny" "the table names the base model"
                for path in [ r.Experiment.Report; r.Experiment.Markdown; r.Experiment.Figure.Html ] do
                    Expect.isTrue (File.Exists path) (sprintf "%s written" path)
                Expect.stringContains (File.ReadAllText r.Experiment.Markdown) "MoE FLOPs/token (measured)" "the table in Markdown"
                for c in r.Cells do
                    let active = c.Routing.ActivePerToken
                    Expect.isGreaterThan c.Routing.Tokens 0L (c.Name + ": tokens measured")
                    Expect.isTrue (Double.IsFinite c.ValidLossAfter && Double.IsFinite c.TrainSeconds) (c.Name + ": validation loss and time")
                    if c.Cell.TopK then Expect.isLessThanOrEqual active 1.0 (sprintf "%s: at most one expert per token, got %g" c.Name active)
                    elif c.Cell.Normaliser = Softmax then Expect.floatClose Accuracy.high active 8.0 (c.Name + ": softmax mixes all 8")
                    else
                        Expect.isTrue (active >= 1.0 && active <= 8.0) (sprintf "%s: sparsemax's measured experts in [1, 8], got %g" c.Name active)
                        Expect.isLessThanOrEqual c.FlopsMeasured c.FlopsAnalytic (c.Name + ": measured FLOPs at most the analytic (all experts)")
            finally
                if Directory.Exists dir then Directory.Delete(dir, true))
    ]
