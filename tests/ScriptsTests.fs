/// Tests of the experiment library behind `scripts/*.fsx`: known-answer mutual information, FLOPs, option
/// parsing, tables, and every experiment in smoke mode (so the scripts cannot rot).
module Moe.Tests.ScriptsTests

open System
open System.IO
open Expecto
open Moe
open Moe.Config
open Moe.Analysis
open Moe.Experiments
open Moe.Tests.Support

/// Information in nats summed over a few cells: exact up to float rounding.
let private informationTol = 1e-12

let private withDirs (body: ExperimentOptions -> unit) =
    let dir = Path.Combine(Path.GetTempPath(), "moe-scripts-tests", Guid.NewGuid().ToString("N"))
    Directory.CreateDirectory dir |> ignore
    // The PNG is checked once (balance_ablation); the other smoke runs skip the browser's start-up.
    try body { ExperimentOptions.defaults with Scale = Smoke; RunsDir = Path.Combine(dir, "runs"); ReportsDir = Path.Combine(dir, "reports"); Screenshot = false }
    finally (try Directory.Delete(dir, true) with _ -> ())

/// Every table cell is filled, every run folder exists, and the report and Markdown were written.
let private checkResult (experiment: string) (expectedRows: int) (r: ExperimentResult) =
    Expect.isNonEmpty r.Tables (experiment + ": tables")
    let rows = r.Tables |> List.sumBy (fun t -> t.Rows.Length)
    Expect.equal rows expectedRows (experiment + ": rows")
    for t in r.Tables do
        for row in t.Rows do
            Expect.equal row.Length t.Columns.Length (sprintf "%s: cells of %A" experiment row)
            Expect.all row (fun c -> c <> "") (sprintf "%s: no empty cell in %A" experiment row)
    Expect.isTrue (File.Exists r.Markdown) (experiment + ": markdown written")
    Expect.stringContains (File.ReadAllText r.Markdown) r.Tables.Head.Title (experiment + ": markdown has the table")
    Expect.equal (Path.GetFileName r.Markdown) (experiment + ".md") "markdown name"
    for d in r.RunDirs do Expect.isTrue (Directory.Exists d) (sprintf "run folder %s" d)
    Expect.equal (Path.GetFileName r.Report) (experiment + ".html") "report name"
    Expect.stringContains (File.ReadAllText r.Report) "<html" "report page"

/// The figure page exists under its name and carries `expected` (title, trace names, labels) in its chart.
let private checkFigure (experiment: string) (expected: string list) (r: ExperimentResult) =
    Expect.equal (Path.GetFileName r.Figure.Html) (experiment + "-figure.html") "figure name"
    let page = File.ReadAllText r.Figure.Html
    Expect.stringContains page "<div class=\"chart\" id=\"figure\">" (experiment + ": the figure's chart")
    for text in expected do Expect.stringContains page text (sprintf "%s: figure carries %s" experiment text)

let private traceName (name: string) = sprintf "\"name\":\"%s\"" name

/// With Chromium on PATH the PNG is written at the chart's size; without, it is skipped saying why.
let private checkPng (experiment: string) (r: ExperimentResult) =
    match Browser.find (), r.Figure.Png with
    | None, png -> Expect.equal png (Error Browser.notFound) "skipped: no Chromium"
    | Some _, Error why -> failtestf "%s: expected a PNG, got: %s" experiment why
    | Some _, Ok png ->
        Expect.equal (Path.GetFileName png) (experiment + ".png") "PNG name"
        match Browser.pngSize png with
        | Ok(w, h) ->
            Expect.isGreaterThan w 0 "width"
            Expect.isGreaterThan h 0 "height"
            // The experiment's chart is sized by its layout; the PNG has exactly that size.
            let layoutSize (name: string) = Text.RegularExpressions.Regex.Match(File.ReadAllText r.Figure.Html, sprintf "\"layout\":\\{\"%s\":(\\d+)" name)
            let width = layoutSize "width"
            if width.Success then Expect.equal w (int width.Groups[1].Value) "PNG width = chart width"
        | Error why -> failtestf "%s: %s" experiment why

let tests =
    testList "Scripts" [
        testList "mutualInformation" [
            test "independent label and expert: 0" {
                let mi = mutualInformation [| [| 1.0; 2.0; 3.0 |]; [| 2.0; 4.0; 6.0 |] |]
                Expect.floatClose { absolute = informationTol; relative = 0.0 } mi 0.0 "proportional rows"
            }
            test "each expert serves one label: H(label)" {
                let mi = mutualInformation [| [| 5.0; 0.0 |]; [| 0.0; 5.0 |] |]
                Expect.floatClose { absolute = informationTol; relative = informationTol } mi (log 2.0) "log 2 nats"
                let skew = mutualInformation [| [| 1.0; 0.0; 0.0 |]; [| 0.0; 3.0; 0.0 |]; [| 0.0; 0.0; 4.0 |] |]
                Expect.floatClose { absolute = informationTol; relative = informationTol } skew (entropy [| 1.0; 3.0; 4.0 |]) "H of 1:3:4"
            }
            test "a hand-computed 2x2 table" {
                // p = [[0.4, 0.1], [0.1, 0.4]]: I = 2 (0.4 log 1.6 + 0.1 log 0.4).
                let mi = mutualInformation [| [| 4.0; 1.0 |]; [| 1.0; 4.0 |] |]
                Expect.floatClose { absolute = informationTol; relative = informationTol } mi (2.0 * (0.4 * log 1.6 + 0.1 * log 0.4)) "closed form"
            }
            test "one label or one expert: 0" {
                Expect.floatClose { absolute = informationTol; relative = 0.0 } (mutualInformation [| [| 3.0; 1.0 |] |]) 0.0 "one row"
                Expect.floatClose { absolute = informationTol; relative = 0.0 } (mutualInformation [| [| 3.0 |]; [| 1.0 |] |]) 0.0 "one column"
            }
            test "bad tables are refused by name" {
                Expect.throwsT<ArgumentException> (fun () -> mutualInformation [||] |> ignore) "empty"
                Expect.throwsT<ArgumentException> (fun () -> mutualInformation [| [| 1.0; 2.0 |]; [| 1.0 |] |] |> ignore) "ragged"
                Expect.throwsT<ArgumentException> (fun () -> mutualInformation [| [| 1.0; -2.0 |] |] |> ignore) "negative"
                Expect.throwsT<ArgumentException> (fun () -> mutualInformation [| [| 0.0; 0.0 |] |] |> ignore) "zeros"
            }
        ]
        testList "flops" [
            test "an MoE layer costs its router plus k dense FFNs" {
                let m = { MoeConfig.defaults with ModelDim = 16; ExpertHidden = 32; Activation = GELU }
                let dense = denseFfnFlops 16 32 GELU
                Expect.equal dense (2.0 * 16.0 * 32.0 * 2.0) "2 D H per matrix"
                Expect.equal (moeFlops m 2.0) (2.0 * 16.0 * float m.Router.Experts + 2.0 * dense) "router + 2 experts"
                Expect.equal (denseFfnFlops 16 32 SwiGLU) (1.5 * dense) "SwiGLU has 3 matrices"
                let hash = { m with Router = { m.Router with Selection = Hash BalancedHash } }
                Expect.equal (moeFlops hash 1.0) dense "hash routing has no router cost"
            }
            test "an MoE layer of LoRA experts costs its router, the shared base input and k output projections plus adapters" {
                let m = { MoeConfig.defaults with ModelDim = 16; ExpertHidden = 32; Activation = GELU }
                let lora = { Rank = 4; Alpha = 8.0; FreezeBase = true }
                let router = 2.0 * 16.0 * float m.Router.Experts
                let adapters = 2.0 * 2.0 * 4.0 * (16.0 + 32.0) // two adapted projections, 2 r (D + H) each
                Expect.equal (loraMoeFlops m lora 2.0) (router + 2.0 * 16.0 * 32.0 + 2.0 * (2.0 * 32.0 * 16.0 + adapters)) "hand count"
                let swiglu = { m with Activation = SwiGLU }
                Expect.equal (loraMoeFlops swiglu lora 1.0 - loraMoeFlops m lora 1.0) (2.0 * 16.0 * 32.0 + 2.0 * 4.0 * (16.0 + 32.0))
                    "SwiGLU adds the shared W3 once per token and its adapters per expert"
                let loraJob = Summarizer.SummarizerConfig.defaults |> Summarizer.SummarizerConfig.topK 4 2 |> Summarizer.SummarizerConfig.loraExperts lora
                let routed = loraJob |> withRouter (fun r -> { r with K = 1 })
                match routed.Model.Ffn with
                | Models.LoraMoe (mm, l) -> Expect.equal (mm.Router.K, l) (1, lora) "withRouter keeps LoRA experts"
                | other -> failtestf "expected LoRA experts, got %A" other
                Expect.equal (ffnFlops routed 1.0) (loraMoeFlops (moeOf routed) lora 1.0) "ffnFlops of a LoRA-MoE config"
            }
            test "configured experts per token follow the selection" {
                let r = RouterConfig.defaults
                Expect.equal (configuredActiveExperts r) (float r.K) "top-k"
                Expect.equal (configuredActiveExperts { r with Selection = SwitchTop1 }) 1.0 "switch"
                Expect.equal (configuredActiveExperts { r with Selection = AllExperts }) (float r.Experts) "all"
                Expect.equal (configuredActiveExperts { r with Selection = ExpertChoice; Capacity = Factor 2.0 }) 2.0 "expert choice"
            }
        ]
        testList "options" [
            test "flags and a data path" {
                let o = ExperimentOptions.parseOrFail [| "--smoke" |]
                Expect.equal o.Scale Smoke "smoke"
                Expect.equal (ExperimentOptions.parseOrFail [||]).Scale Quick "quick by default"
                Expect.equal (ExperimentOptions.parseOrFail [| "--full" |]).Scale Full "full"
                let here = Directory.GetCurrentDirectory()
                Expect.equal (ExperimentOptions.parseOrFail [| here |]).DataPath (Some here) "data path"
            }
            test "every problem is listed" {
                match ExperimentOptions.parse [| "--smoke"; "--full"; "--fast"; "/no/such/path"; "/nor/this" |] with
                | Ok o -> failtestf "expected errors, got %A" o
                | Error ps ->
                    Expect.equal ps.Length 5 (sprintf "unknown flag, exclusive flags, two paths, two missing: %A" ps)
                    Expect.exists ps (fun p -> p.Contains "--fast") "names the unknown flag"
            }
        ]
        test "token kinds" {
            Expect.equal (List.map tokenKind [ " 42"; ","; " Paris"; "the"; " "; "x1" ]) [ "number"; "punctuation"; "capitalised"; "word"; "space"; "other" ] "kinds"
        }
        testList "tables" [
            test "text and markdown carry every cell" {
                let t = { Title = "T"; Columns = [| "a"; "b|c" |]; Rows = [| [| "1"; "22" |]; [| "333"; Table.num 2 nan |] |] }
                let text = Table.text t
                Expect.stringContains text "333" "text"
                Expect.stringContains text "n/a" "NaN as n/a"
                let md = Table.markdown t
                Expect.stringContains md "| a | b\\|c |" "escaped header"
                Expect.stringContains md "| 333 | n/a |" "row"
                Expect.throwsT<ArgumentException> (fun () -> Table.text { t with Rows = [| [| "x" |] |] } |> ignore) "ragged row"
            }
        ]
        testSequenced <| testList "smoke" [
            test "balance_ablation (and the main job's figure from one of its runs)" {
                withDirs (fun o ->
                    let r = balanceAblation { o with Screenshot = true }
                    checkResult "balance_ablation" 4 r
                    checkFigure "balance_ablation" [ "Expert load over training"; traceName "hash"; traceName "hash+balance"; traceName "topk"; traceName "topk+balance" ] r
                    checkPng "balance_ablation" r
                    let topk = r.RunDirs |> List.find (fun d -> Path.GetFileName d = "topk")
                    let main = runFigure false o.ReportsDir "train_topk" topk
                    Expect.equal (Path.GetFileName main.Html) "train_topk-figure.html" "main-job figure name"
                    let page = File.ReadAllText main.Html
                    for text in [ "Share of tokens per expert over training, topk run, layer enc.0"; traceName "expert 0"; traceName "uniform 1/E" ] do
                        Expect.stringContains page text "the main-job figure: expert shares of the first MoE layer"
                    Expect.throwsT<ArgumentException> (fun () -> runFigure false o.ReportsDir "x" o.ReportsDir |> ignore) "no routing log")
            }
            test "gating_strategies" {
                withDirs (fun o ->
                    let r = gatingStrategies o
                    checkResult "gating_strategies" 17 r
                    checkFigure "gating_strategies" [ "Gating strategies, best ROUGE-1 first"; "FFN FLOPs per token"; "load CV at the last step"; "dense-equal-compute"; "switch-top1-jitter" ] r)
            }
            test "attention_gqa" {
                withDirs (fun o ->
                    let r = attentionGqa o
                    checkResult "attention_gqa" 6 r
                    checkFigure "attention_gqa" [ "KV cache bytes per target token"; "decode ms per step"; "gqa-here-kv1"; "library-kv4" ] r)
            }
            test "flops_topk_vs_sparsemax" {
                withDirs (fun o ->
                    let r = flopsTopkVsSparsemax o
                    checkResult "flops_topk_vs_sparsemax" 6 r
                    checkFigure "flops_topk_vs_sparsemax" [ traceName "top-k of 4"; traceName "sparsemax of E"; "\"k=2\""; "\"E=8\""; "FLOPs per token, forward (analytic)" ] r)
            }
            test "upcycling" {
                withDirs (fun o ->
                    let r = upcycling o
                    checkResult "upcycling" 4 r
                    Expect.equal (r.RunDirs |> List.map Path.GetFileName) [ "dense"; "dense-continued"; "upcycled"; "moe-scratch" ] "the four runs"
                    checkFigure "upcycling" [ "Validation loss over cumulative steps"; traceName "dense"; traceName "dense-continued"; traceName "upcycled"; traceName "moe-scratch" ] r)
            }
            test "expert_specialisation" {
                withDirs (fun o ->
                    let r = expertSpecialisation o
                    // Two runs x two MoE layers in each table.
                    checkResult "expert_specialisation" 8 r
                    checkFigure "expert_specialisation" [ "Expert use by topic, topk"; "I(topic; expert) = " ] r)
            }
        ]
    ]
