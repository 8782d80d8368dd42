/// LoRA experts (`Layers.LoraMoeLayer`, Hu et al. 2021): oracles against the base FFN and a hand-computed
/// adapter, frozen-base gradients, finite differences, parameter counts and registration, and a smoke run of
/// the comparison that `scripts/lora_experts.fsx` makes.
module Moe.Tests.LoraTests

open System
open System.IO
open Expecto
open TorchSharp
open Moe
open Moe.Config
open Moe.Layers
open Moe.Models
open Moe.Train
open Moe.Tests.Support

let private f32 = torch.ScalarType.Float32
let private f64 = torch.ScalarType.Float64
/// Central finite-difference step in float64 (error O(h^2) plus round-off O(eps / h) ~ 1e-10).
let private fdStep = 1e-6
/// float64 paths that differ only in summation order.
let private reorderTol = 1e-10

let private randn (seed: int) (shape: int64[]) (dtype: torch.ScalarType) : torch.Tensor =
    torch.randn (shape, dtype = dtype, generator = new torch.Generator(uint64 seed, torch.CPU))

let private expectClose (tol: float) (what: string) (actual: torch.Tensor) (expected: torch.Tensor) =
    Expect.sequenceEqual actual.shape expected.shape (what + ": shape")
    let scale = 1.0 + max (Tensors.scalar (actual.abs().max ())) (Tensors.scalar (expected.abs().max ()))
    let d = Tensors.scalar ((actual.to_type f64 - expected.to_type f64).abs().max ()) / scale
    Expect.isLessThanOrEqual d tol (sprintf "%s: relative difference %g > %g" what d tol)

let private moeConfig (e: int) (k: int) (d: int) (h: int) (act: Activation) : MoeConfig =
    { MoeConfig.defaults with ModelDim = d; ExpertHidden = h; Activation = act; Router = { RouterConfig.defaults with Experts = e; K = k } }

let private lora (r: int) (freeze: bool) : LoraConfig = { Rank = r; Alpha = 2.0 * float r; FreezeBase = freeze }

/// Fills every B (zero at initialisation) with normal noise, so the adapters change the output.
let private randomiseB (seed: int) (experts: LoraExpertFfn) =
    use _ = torch.no_grad ()
    for i, b in List.indexed [ experts.B1; experts.B2; experts.B3 ] do
        if not (isNull b) then b.copy_ (randn (seed + i) b.shape b.dtype) |> ignore

/// The base FFN by hand: act(x W1) W2, or (silu(x W1) * x W3) W2. x [T; D] -> [T; D].
let private baseFfn (experts: LoraExpertFfn) (x: torch.Tensor) : torch.Tensor =
    let h = activate experts.Activation (x.mm experts.W1)
    let h = if isNull experts.W3 then h else h * x.mm experts.W3
    h.mm experts.W2

let private finiteDifference = Support.finiteDifferenceInPlace fdStep

let private initialTests =
    [ for act in [ GELU; SwiGLU ] ->
        testCase (sprintf "a new LoRA MoE layer equals its base FFN (B = 0, weights sum to 1) (%A)" act) <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 5L |> ignore
            use layer = new LoraMoeLayer("moe", moeConfig 4 2 6 10 act, lora 3 false)
            use _ = torch.no_grad ()
            let x = randn 7 [| 2L; 5L; 6L |] f32
            let y = (layer.forward x).Output
            let expected = (baseFfn layer.Experts (x.reshape (-1L, 6L))).reshape (2L, 5L, 6L)
            expectClose Tol.f32Loose "LoRA MoE at initialisation vs base FFN" y expected ]

let private layerTests =
    [ testCase "k = E = 1: the layer is the base FFN plus the adapter, computed by hand (float64)" <| fun () ->
        use _ = torch.NewDisposeScope()
        torch.manual_seed 9L |> ignore
        let cfg = lora 2 false
        use layer = new LoraMoeLayer("moe", moeConfig 1 1 5 7 GELU, cfg)
        layer.``to`` f64 |> ignore
        randomiseB 11 layer.Experts
        use _ = torch.no_grad ()
        let x = randn 12 [| 6L; 5L |] f64
        let ex = layer.Experts
        let s = LoraConfig.scale cfg
        let at (t: torch.Tensor) = t.select (0L, 0L)
        let w1 = Tensors.plus ex.W1 ((at ex.A1).mm (at ex.B1) |> Tensors.mulScalar s) // [D; H]
        let w2 = Tensors.plus ex.W2 ((at ex.A2).mm (at ex.B2) |> Tensors.mulScalar s) // [H; D]
        let expected = (activate GELU (x.mm w1)).mm w2
        expectClose reorderTol "one LoRA expert vs (W + s A B) by hand" (layer.forward x).Output expected
        Expect.isGreaterThan (Tensors.scalar ((expected - baseFfn ex x).abs().max ())) 1e-3 "the adapter changes the output"

      testCase "a frozen base gets no gradient; adapters and router do; the flag survives a dtype move" <| fun () ->
        use _ = torch.NewDisposeScope()
        torch.manual_seed 15L |> ignore
        use layer = new LoraMoeLayer("moe", moeConfig 3 2 4 6 SwiGLU, lora 2 true)
        randomiseB 16 layer.Experts
        let x = randn 17 [| 5L; 4L |] f32
        ((Tensors.square (layer.forward x).Output).sum ()).backward ()
        let ex = layer.Experts
        for name, w in [ "w1", ex.W1; "w2", ex.W2; "w3", ex.W3 ] do
            Expect.isFalse w.requires_grad (name + " is frozen")
            Expect.isTrue (isNull w.grad) (name + " has no gradient")
        for name, p in [ "a1", ex.A1; "b1", ex.B1; "a2", ex.A2; "b2", ex.B2; "a3", ex.A3; "b3", ex.B3; "router", layer.Router.Weight ] do
            Expect.isFalse (isNull p.grad) (name + " has a gradient")
            Expect.isGreaterThan (Tensors.scalar (p.grad.abs().sum ())) 0.0 (name + "'s gradient is not zero")
        layer.``to`` f64 |> ignore
        Expect.isFalse layer.Experts.W1.requires_grad "still frozen after .to float64"
        Expect.isTrue layer.Experts.A1.requires_grad "adapters still trainable after .to float64"

      testCase "gradients match central finite differences in float64 (trainable base, shared expert)" <| fun () ->
        use _ = torch.NewDisposeScope()
        torch.manual_seed 21L |> ignore
        use layer = new LoraMoeLayer("moe", { moeConfig 3 2 3 4 GELU with SharedExperts = 1 }, lora 2 false)
        layer.``to`` f64 |> ignore
        layer.eval ()
        randomiseB 22 layer.Experts
        let x = (randn 23 [| 3L; 3L |] f64).requires_grad_ true
        let readout = randn 24 [| 3L; 3L |] f64
        let loss () =
            let r = layer.forward x
            Tensors.plus ((r.Output * readout).sum ()) (Tensors.mulScalar 0.5 r.Moe.Value.Aux.SwitchAux)
        let wrt = x :: [ for p in layer.parameters () -> (p :> torch.Tensor) ]
        (loss ()).backward ()
        for t in wrt do
            let numeric = finiteDifference (fun () -> using (torch.no_grad ()) (fun _ -> Tensors.scalar (loss ()))) t
            let analytic = t.grad.contiguous().view(-1L).data<float>().ToArray()
            Array.iteri2 (fun i (a: float) n ->
                Expect.floatClose { absolute = Tol.finiteDiff; relative = Tol.finiteDiff } a n (sprintf "entry %d of a %A tensor" i t.shape)) analytic numeric

      testCase "named parameters: base, adapters, router and shared experts are registered" <| fun () ->
        use layer = new LoraMoeLayer("moe", { moeConfig 3 2 4 6 SwiGLU with SharedExperts = 1 }, lora 2 false)
        let names = layer.named_parameters () |> Seq.map (fun struct (n, _) -> n) |> Set.ofSeq
        let expected =
            set [ "router.weight"; "experts.w1"; "experts.w2"; "experts.w3"; "experts.a1"; "experts.b1"; "experts.a2"
                  "experts.b2"; "experts.a3"; "experts.b3"; "shared.W1.weight"; "shared.W2.weight"; "shared.W3.weight" ]
        Expect.equal (Set.map (fun (n: string) -> n.ToLowerInvariant()) names) (Set.map (fun (n: string) -> n.ToLowerInvariant()) expected) "parameter names"

      testCase "parameter counts: layer, sublayer active count, and a model's total, active and trainable" <| fun () ->
        let e, k, d, h, r = 4, 2, 8, 16, 3
        use layer = new LoraMoeLayer("moe", moeConfig e k d h GELU, lora r true)
        let baseCount = int64 (2 * d * h)
        let perExpert = int64 (r * (d + h) * 2)
        Expect.equal layer.Experts.BaseParameters baseCount "base W1 and W2"
        Expect.equal layer.Experts.AdapterParametersPerExpert perExpert "r (D + H) per adapted projection"
        Expect.equal (parameterCount layer) (int64 (d * e) + baseCount + int64 e * perExpert) "router + base + E adapters"
        Expect.equal (trainableParameterCount layer) (int64 (d * e) + int64 e * perExpert) "frozen base is not trainable"
        let ff = FeedForward.loraMoe (moeConfig e k d h GELU) (lora r true)
        Expect.equal ff.ActiveParameters (parameterCount ff.Module - int64 (e - k) * perExpert) "skipped experts' adapters are inactive"
        let cfg =
            { ModelConfig.defaults with
                VocabSize = 50; ModelDim = d; Heads = 2; KvHeads = 2; EncoderLayers = 2; DecoderLayers = 1
                Ffn = LoraMoe(moeConfig e k d h GELU, lora r true); MoeEvery = 2 }
        use model = new EncoderDecoder(cfg)
        let counts = model.ParameterCount()
        // MoeEvery = 2: only enc.1 is a LoRA MoE layer; enc.0 and dec.0 are dense FFNs of width H.
        Expect.equal (counts.Total - counts.Active) (int64 (e - k) * perExpert) "one LoRA layer's skipped adapters"
        Expect.equal (counts.Total - model.TrainableParameterCount()) baseCount "one frozen base"
        Expect.equal (model.Routers() |> Array.map fst) [| "enc.1" |] "routers by name"

      testCase "validate reports every LoRA problem, in the model config too" <| fun () ->
        let problems = LoraConfig.validate { Rank = 0; Alpha = -1.0; FreezeBase = false }
        Expect.equal problems.Length 2 "rank and alpha"
        let m = { ModelConfig.defaults with Ffn = LoraMoe(MoeConfig.defaults, { Rank = 0; Alpha = 1.0; FreezeBase = true }) }
        Expect.exists (ModelConfig.validate m) (fun p -> p.StartsWith "Lora: Rank") "prefixed by its section"
        Expect.throws (fun () -> new LoraMoeLayer("moe", MoeConfig.defaults, { Rank = 0; Alpha = 1.0; FreezeBase = true }) |> ignore) "bad rank rejected" ]

let private smoke =
    testCase "smoke: the comparison's library path trains, measures and reports every variant" <| fun () ->
        let dir = Path.Combine(Path.GetTempPath(), "moe-lora-tests", Guid.NewGuid().ToString("N"))
        try
            let settings = LoraExperiment.Settings.smoke (Path.Combine(dir, "runs"))
            let rows = LoraExperiment.run { RunOptions.Defaults with Progress = Silent } settings
            Expect.equal (rows |> List.map (fun r -> r.Variant)) [ "full"; "lora-r2-frozen"; "lora-r2-trainable" ] "variants in order"
            let full, frozen, trainable = rows[0], rows[1], rows[2]
            Expect.equal full.TrainableParameters full.TotalParameters "full experts: all trainable"
            Expect.isLessThan frozen.TotalParameters full.TotalParameters "LoRA experts are smaller"
            Expect.isLessThan frozen.TrainableParameters frozen.TotalParameters "frozen base not trainable"
            Expect.equal trainable.TrainableParameters trainable.TotalParameters "trainable base"
            for r in rows do
                Expect.isTrue (r.TokensPerSecond > 0.0) (r.Variant + ": speed measured")
                Expect.isTrue (r.Rouge1 >= 0.0 && r.Rouge1 <= 100.0) (r.Variant + ": ROUGE-1 read")
                Expect.isLessThan r.ActiveParameters r.TotalParameters (r.Variant + ": fewer active than total")
            // parameters.json and the probe cover LoRA experts as they do full experts.
            for r in rows do
                Expect.equal (RunFiles.readParameters r.RunDir)
                    (Some(Ok { Total = r.TotalParameters; Active = r.ActiveParameters; Trainable = r.TrainableParameters }))
                    (r.Variant + ": parameters.json")
            let probes = Analysis.probe frozen.RunDir
            Expect.equal (probes |> List.map (fun p -> p.Layer)) [ "enc.0"; "dec.0" ] "every LoRA-MoE layer probed"
            for p in probes do
                Expect.isGreaterThan p.Tokens 0L (p.Layer + ": tokens routed")
                Expect.floatClose Accuracy.high p.MeanActive (float settings.K) (p.Layer + ": top-k keeps k experts per token")
            let reports = LoraExperiment.writeReports false (Path.Combine(dir, "reports")) "lora_experts" rows
            let text = File.ReadAllText reports.Markdown
            for r in rows do Expect.stringContains text ("| " + r.Variant + " |") "the table lists every variant"
            Expect.isTrue (File.Exists reports.Report) "HTML report written"
            Expect.equal (Path.GetFileName reports.Figure.Html) "lora_experts-figure.html" "figure page name"
            let page = File.ReadAllText reports.Figure.Html
            for name in [ "LoRA experts vs full experts: quality per trainable parameter"; "\"name\":\"full experts\""
                          "\"name\":\"LoRA experts, frozen base\""; "\"name\":\"LoRA experts, trainable base\""; "r=2"; "trainable parameters (log scale)" ] do
                Expect.stringContains page name "the figure's title, traces and labels"
        finally
            try Directory.Delete(dir, true) with _ -> ()

/// Sequenced: the smoke run seeds libtorch's global generator.
let tests = testSequenced <| testList "Lora" (initialTests @ layerTests @ [ smoke ])
