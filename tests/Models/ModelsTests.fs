module Moe.Tests.ModelsTests

open System
open System.Collections.Generic
open Expecto
open FsCheck.FSharp
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Config
open Moe.Layers
open Moe.Attention
open Moe.Models
open Moe.Generate
open Moe.Tests.Support

type Tensor = torch.Tensor

/// A test that runs alone: live-tensor counts are global, so leak checks cannot share the process.
let sequencedCase (name: string) (body: unit -> unit) : Test = testSequenced (testCase name body)

/// Largest absolute difference between two tensors.
let maxAbsDiff (a: Tensor) (b: Tensor) : float =
    use d = (a - b).abs().max ()
    scalar d

let expectClose (tol: float) (a: Tensor) (b: Tensor) (what: string) =
    Expect.equal a.shape b.shape (what + ": shapes")
    let diff = maxAbsDiff a b
    Expect.isLessThan diff tol (sprintf "%s: max |difference| %g" what diff)

let randIds (vocabFrom: int64) (vocab: int64) (shape: int64[]) : Tensor =
    torch.randint(vocabFrom, vocab, shape, dtype = torch.ScalarType.Int64)

// ---------------------------------------------------------------- attention

/// softmax(q k^T / sqrt(Dh)) v one query head at a time, head h reading key/value head h / r, masked
/// keys set to -inf: the textbook formula, with no grouping tricks.
let referenceAttention (mask: Tensor option) (q: Tensor) (k: Tensor) (v: Tensor) : Tensor =
    let b, h, s, dh = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    let g, l = k.shape[1], k.shape[2]
    let r = h / g
    let full = match mask with Some m -> m.expand(b, 1L, s, l) | None -> torch.ones([| b; 1L; s; l |], dtype = torch.ScalarType.Bool)
    let heads =
        [| for head in 0L .. h - 1L ->
               let qh = q.select(1L, head)                                     // [B; S; Dh]
               let kh = k.select(1L, head / r)                                 // [B; L; Dh]
               let vh = v.select(1L, head / r)                                 // [B; L; Dh]
               let scores = qh.bmm(kh.transpose(1L, 2L)) |> Tensors.divScalar (Math.Sqrt(float dh))  // [B; S; L]
               let scores = Tensors.withScalar Double.NegativeInfinity (fun v -> scores.masked_fill(full.select(1L, 0L).logical_not (), v))
               let e = (scores - scores.amax([| -1L |], keepdim = true)).exp ()
               (e / e.sum(-1L, keepdim = true)).bmm vh |]                         // [B; S; Dh]
    torch.stack(heads, 1L)                                                     // [B; H; S; Dh]

type AttentionCase =
    { B: int; S: int; L: int; G: int; R: int; Dh: int; Seed: int; Causal: bool; Padded: bool }

let attentionCases =
    gen {
        let! b = Gen.choose (1, 2)
        let! s = Gen.choose (1, 4)
        let! extra = Gen.choose (0, 3)
        let! g = Gen.elements [ 1; 2 ]
        let! r = Gen.elements [ 1; 2; 3 ]
        let! dh = Gen.elements [ 1; 4; 8 ]
        let! seed = Gen.choose (0, 100000)
        let! causal = Gen.elements [ true; false ]
        let! padded = Gen.elements [ true; false ]
        return { B = b; S = s; L = s + extra; G = g; R = r; Dh = dh; Seed = seed; Causal = causal; Padded = padded }
    }

/// q, k, v and a mask for a case; padding leaves key 0 always valid so every query sees a key.
let makeAttention (c: AttentionCase) =
    torch.manual_seed (int64 c.Seed) |> ignore
    let q = torch.randn([| int64 c.B; int64 (c.G * c.R); int64 c.S; int64 c.Dh |])
    let k = torch.randn([| int64 c.B; int64 c.G; int64 c.L; int64 c.Dh |])
    let v = torch.randn([| int64 c.B; int64 c.G; int64 c.L; int64 c.Dh |])
    let causal = if c.Causal then Some(causalMask q.device (int64 c.S) (int64 c.L)) else None
    let padding =
        if c.Padded then
            let valid = torch.rand([| int64 c.B; int64 c.L |]).gt(torch.tensor 0.4f)
            valid.index_put_(torch.tensor true, [| torch.TensorIndex.Colon; torch.TensorIndex.Single 0L |]) |> ignore
            Some(keyPaddingMask valid)
        else None
    q, k, v, combineMasks causal padding

let attentionConfig g h impl = { AttentionConfig.defaults with ModelDim = 16; Heads = h; KvHeads = g; Impl = impl }

let attentionTests =
    testList "attention" [
        propertyWith "handwritten GQA equals the per-head reference (MHA, GQA, MQA; causal and padding masks)" attentionCases (fun c ->
            use _ = torch.NewDisposeScope()
            let q, k, v, mask = makeAttention c
            expectClose Tol.f32Loose (groupedQueryAttention 0.0 mask q k v) (referenceAttention mask q k v) (sprintf "%A" c))

        propertyWith "with as many KV heads as query heads, handwritten equals the library's scaled_dot_product_attention" attentionCases (fun c ->
            use _ = torch.NewDisposeScope()
            let c = { c with G = c.G * c.R; R = 1 }
            let q, k, v, mask = makeAttention c
            expectClose Tol.f32Loose (groupedQueryAttention 0.0 mask q k v) (libraryAttention 0.0 mask q k v) (sprintf "%A" c))

        propertyWith "grouped heads: handwritten equals the library's attention on repeated KV heads" attentionCases (fun c ->
            use _ = torch.NewDisposeScope()
            let q, k, v, mask = makeAttention c
            expectClose Tol.f32Loose (groupedQueryAttention 0.0 mask q k v) (libraryAttention 0.0 mask q k v) (sprintf "%A" c))

        testCase "repeatKvHeads puts KV head h / r under query head h" <| fun () ->
            use _ = torch.NewDisposeScope()
            let k = (Tensors.arange 0L 2L torch.ScalarType.Float32 torch.CPU).view(1L, 2L, 1L, 1L)   // heads 0, 1
            Expect.sequenceEqual (toFloats (repeatKvHeads 3 k)) [| 0f; 0f; 0f; 1f; 1f; 1f |] "head order"

        testCase "modules with the same weights agree across implementations (masks included)" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 3L |> ignore
            use mine = new GroupedQueryAttention("a", attentionConfig 4 4 Handwritten)
            use lib = new GroupedQueryAttention("a", attentionConfig 4 4 Library)
            lib.load_state_dict(mine.state_dict ()) |> ignore
            let x = torch.randn([| 2L; 5L; 16L |])
            let memory = torch.randn([| 2L; 7L; 16L |])
            let valid = torch.tensor([| true; true; true; false; false; true; true; true; true; true |]).view(2L, 5L)
            let memValid = torch.tensor(Array.init 14 (fun i -> i % 7 < 5 || i >= 7)).view(2L, 7L)
            expectClose Tol.f32Loose (mine.SelfAttend(x, valid, true, null)) (lib.SelfAttend(x, valid, true, null)) "self"
            expectClose Tol.f32Loose (mine.CrossAttend(x, memory, memValid, null)) (lib.CrossAttend(x, memory, memValid, null)) "cross"

        testCase "multi-query attention: one KV head, output [B; S; D]" <| fun () ->
            use _ = torch.NewDisposeScope()
            use mqa = new GroupedQueryAttention("mqa", attentionConfig 1 4 Handwritten)
            Expect.sequenceEqual mqa.Wk.weight.shape [| 4L; 16L |] "K projection to one head of Dh = 4"
            let x = torch.randn([| 3L; 6L; 16L |])
            Expect.sequenceEqual (mqa.SelfAttend(x, null, true, null)).shape [| 3L; 6L; 16L |] "self shape"
            Expect.sequenceEqual (mqa.CrossAttend(x.narrow(1L, 0L, 2L), x, null, null)).shape [| 3L; 2L; 16L |] "cross shape"

        testCase "causal mask: perturbing later tokens leaves earlier outputs unchanged" <| fun () ->
            use _ = torch.NewDisposeScope()
            for impl in [ Handwritten; Library ] do
                torch.manual_seed 5L |> ignore
                use att = new GroupedQueryAttention("a", attentionConfig 2 4 impl)
                let x = torch.randn([| 2L; 6L; 16L |])
                let t = 3L
                let changed = x.clone ()
                Tensors.plus_ (changed.narrow(1L, t, 6L - t)) (torch.randn([| 2L; 6L - t; 16L |])) |> ignore
                let a = att.SelfAttend(x, null, true, null)
                let b = att.SelfAttend(changed, null, true, null)
                expectClose Tol.f32 (a.narrow(1L, 0L, t)) (b.narrow(1L, 0L, t)) (sprintf "%A: positions before %d" impl t)
                Expect.isGreaterThan (maxAbsDiff (a.narrow(1L, t, 6L - t)) (b.narrow(1L, t, 6L - t))) Tol.f32Loose "later positions do change"

        testCase "padding mask: changing padded keys leaves every output unchanged" <| fun () ->
            use _ = torch.NewDisposeScope()
            for impl in [ Handwritten; Library ] do
                torch.manual_seed 6L |> ignore
                use att = new GroupedQueryAttention("a", attentionConfig 2 4 impl)
                let memory = torch.randn([| 2L; 5L; 16L |])
                let valid = torch.tensor([| true; true; true; false; false; true; true; true; true; false |]).view(2L, 5L)
                let noisy = Tensors.plus memory (torch.randn([| 2L; 5L; 16L |]) * valid.logical_not().unsqueeze(2L).to_type(torch.ScalarType.Float32))
                let x = torch.randn([| 2L; 3L; 16L |])
                expectClose Tol.f32 (att.CrossAttend(x, memory, valid, null)) (att.CrossAttend(x, noisy, valid, null)) (sprintf "%A cross" impl)
                expectClose Tol.f32 (att.SelfAttend(memory, valid, false, null).mul(valid.unsqueeze(2L)))
                                    (att.SelfAttend(noisy, valid, false, null).mul(valid.unsqueeze(2L))) (sprintf "%A self, real positions" impl)

        testCase "attention dropout acts in training only" <| fun () ->
            use _ = torch.NewDisposeScope()
            use att = new GroupedQueryAttention("a", { attentionConfig 2 4 Handwritten with Dropout = 0.5 })
            let x = torch.randn([| 1L; 8L; 16L |])
            att.eval ()
            expectClose Tol.f32 (att.forward x) (att.forward x) "deterministic in eval"
            att.train ()
            Expect.isGreaterThan (maxAbsDiff (att.forward x) (att.forward x)) Tol.f32Loose "random in training"

        testCase "self-attention with a KV cache equals full causal attention; cache bytes = L * B * 2 * G * Dh * 4" <| fun () ->
            use _ = torch.NewDisposeScope()
            for impl in [ Handwritten; Library ] do
                torch.manual_seed 7L |> ignore
                let cfg = attentionConfig 2 4 impl
                use att = new GroupedQueryAttention("a", cfg)
                let x = torch.randn([| 2L; 5L; 16L |])
                let full = att.SelfAttend(x, null, true, null)
                use cache = new KvCache()
                let steps = [| for t in 0L .. 4L -> att.SelfAttend(x.narrow(1L, t, 1L), null, true, cache) |]
                expectClose Tol.f32Loose (torch.cat(steps, 1L)) full (sprintf "%A incremental" impl)
                Expect.equal cache.Length 5L "5 positions cached"
                Expect.equal cache.Bytes (5L * 2L * AttentionConfig.kvBytesPerToken cfg 4) "bytes"
                cache.Clear()
                Expect.equal cache.Bytes 0L "cleared"

        testCase "bad attention configs list every problem" <| fun () ->
            let problems = AttentionConfig.validate { ModelDim = 10; Heads = 4; KvHeads = 3; Dropout = 1.5; Impl = Library }
            Expect.equal problems.Length 3 (sprintf "D %% H, H %% G, dropout: %A" problems)
            Expect.throwsT<ArgumentException> (fun () -> new GroupedQueryAttention("a", { AttentionConfig.defaults with KvHeads = 3 }) |> ignore) "constructor refuses"
            use _ = torch.NewDisposeScope()
            let q = torch.randn([| 1L; 4L; 2L; 8L |])
            let k = torch.randn([| 1L; 3L; 2L; 8L |])
            let ex = Expect.throwsC (fun () -> groupedQueryAttention 0.0 None q k k |> ignore) id
            Expect.stringContains ex.Message "G (3) to divide the query heads H (4)" "names the problem"
    ]

// ---------------------------------------------------------------- models

let tinyConfig =
    { ModelConfig.defaults with
        VocabSize = 20
        ModelDim = 16
        Heads = 4
        KvHeads = 2
        EncoderLayers = 2
        DecoderLayers = 2
        Dropout = 0.0
        MaxLength = 24
        Ffn = Dense 32 }

/// A dense FFN that reports the tokens it saw as a fake routing report, to test the plumbing of reports,
/// token ids and padding without the MoE layer.
type ReportingFfn(inner: DenseFfn, seen: List<int64[]>) as this =
    inherit torch.nn.Module<Tensor, FfnResult>("ffn")
    let ffn = inner
    do this.RegisterComponents()
    member _.WithIds(x: Tensor, ids: Tensor) : FfnResult =
        seen.Add(toInt64s ids)
        let r = ffn.forward x
        let count = torch.tensor(float32 ids.shape[0])
        let zero = torch.tensor 0.0f
        { r with Moe = Some { Aux = { SwitchAux = count; Importance = zero; Load = zero; ZLoss = zero }
                              Stats = { TokensPerExpert = torch.ones(1L); DroppedFraction = zero; RouterEntropy = zero } } }
    override _.forward(x: Tensor) : FfnResult = ffn.forward x

let reportingFactory (cfg: ModelConfig) (seen: List<int64[]>) =
    Func<FfnSite, FeedForward>(fun site ->
        let dense = new DenseFfn("ffn", cfg.ModelDim, 32, GELU)
        if site.Layer % 2 = 1 then
            let m = new ReportingFfn(dense, seen)
            { FeedForward.dense m with WithTokenIds = Some(fun x ids -> m.WithIds(x, ids)); SkipPadding = true }
        else FeedForward.dense dense)

/// Cross-entropy of next-token logits [B; L; V] against targets [B; L].
let tokenLoss (logits: Tensor) (targets: Tensor) : Tensor =
    torch.nn.functional.cross_entropy(logits.reshape(-1L, logits.shape[2]), targets.reshape(-1L))

let genConfig = { GenerateConfig.defaults with MaxLength = 8; BosId = 1; EosId = 2; LengthPenalty = 0.0 }

/// Top-2 of 4 experts, hidden 24, dropless: routing of a token does not depend on its batch.
let moeConfig = { MoeConfig.defaults with ModelDim = 16; ExpertHidden = 24; Router = { RouterConfig.defaults with Experts = 4; K = 2 } }

/// A learning rate and step count at which AdamW memorises a 4-example batch well enough to decode it.
let overfitLearningRate = 1e-2
let overfitSteps = 40

/// Tiny models of each FFN kind memorise a tiny batch (reversal of 4 sources) and then decode it.
let overfitTests =
    testList "overfit" [
        for name, ffn, precision in [ "dense", Dense 64, Precision.Full
                                      "top-2 MoE", Moe { moeConfig with ModelDim = 32 }, Precision.Full
                                      "hash MoE", Moe { moeConfig with ModelDim = 32; Router = { moeConfig.Router with Selection = Hash(RandomHash 1) } }, Precision.Full
                                      "bf16 mixed-precision dense", Dense 64, Precision.BFloat16 ] ->
          sequencedCase (sprintf "a tiny %s model overfits a tiny batch in %d AdamW steps, then decodes it; no tensors leak per step" name overfitSteps) <| fun () ->
            torch.manual_seed 13L |> ignore
            use model = new EncoderDecoder({ tinyConfig with EncoderLayers = 1; DecoderLayers = 1; Ffn = ffn; ModelDim = 32 })
            model.Precision <- precision
            use src = randIds 3L 20L [| 4L; 6L |]
            let bos = Tensors.withInt64Scalar (int64 genConfig.BosId) (fun v -> torch.full([| 4L; 1L |], v, dtype = torch.ScalarType.Int64))
            let eos = Tensors.withInt64Scalar (int64 genConfig.EosId) (fun v -> torch.full([| 4L; 1L |], v, dtype = torch.ScalarType.Int64))
            use tgt = torch.cat([| bos; src.flip(1L); eos |], 1L)                     // BOS, reversed source, EOS
            use input = tgt.narrow(1L, 0L, 7L)
            use target = tgt.narrow(1L, 1L, 7L)
            use opt = new Train.SafeAdamW(model.parameters (), overfitLearningRate)
            let step () =
                use _ = torch.NewDisposeScope()
                opt.zero_grad ()
                let out = model.Forward(src, input)
                let loss = Tensors.plus (tokenLoss out.Logits target) (List.fold (fun (acc: Tensor) r -> Tensors.plus acc (weightedAux LossWeights.defaults r.Report.Aux)) (torch.tensor 0.0f) out.Moe)
                loss.backward ()
                opt.step () |> ignore
                scalar loss
            let first = step ()
            step () |> ignore                                                      // AdamW's moments exist from here on
            let live = liveTensors ()
            let mutable last = first
            for _ in 3 .. overfitSteps do last <- step ()
            Expect.isLessThan last (first * 0.1) (sprintf "loss %.3f -> %.3f" first last)
            Expect.isLessThanOrEqual (liveTensors ()) live "live tensors do not grow"
            let expected = src.flip(1L) |> toInt64s |> Array.map int |> Array.chunkBySize 6
            for k in [ 1; 3 ] do
                let out = generate { genConfig with BeamSize = k } model src null
                Expect.sequenceEqual (out |> Array.map (fun h -> h.Tokens)) expected (sprintf "beam %d reproduces the reversed sources" k)
    ]

/// A padded two-example batch (the first source has two padded positions) decoded by `model` twice: the
/// teacher-forced full forward's logits [2; 6; V], and the same 6 positions decoded one at a time with a KV
/// cache, concatenated [2; 6; V]; with the encoder output and the filled cache (dispose it).
let private fullAndCached (model: EncoderDecoder) : Tensor * Tensor * EncoderOutput * DecoderCache =
    let src = randIds 3L 20L [| 2L; 7L |]
    let srcValid = torch.tensor(Array.init 14 (fun i -> i < 5 || i >= 7)).view(2L, 7L)
    let tgt = randIds 3L 20L [| 2L; 6L |]
    let full = model.Forward(src, tgt, srcValid, null).Logits                  // [2; 6; V]
    let encoded = model.Encode(src, srcValid)
    let cache = model.NewCache()
    let steps = [| for t in 0L .. 5L -> model.Decode(encoded.Memory, srcValid, tgt.narrow(1L, t, 1L), null, cache).Logits |]
    full, torch.cat(steps, 1L), encoded, cache

let modelTests =
    testList "models" [
        testCase "named_parameters: blocks registered, the tied embedding once, untied head when asked" <| fun () ->
            use model = new EncoderDecoder(tinyConfig)
            let keys = model.named_parameters () |> Seq.map (fun struct (k, _) -> k) |> Array.ofSeq
            for k in [ "embed.weight"; "enc.0.attn.wq.weight"; "enc.1.ffn.w1.weight"; "enc.1.ffnNorm.weight"
                       "dec.1.cross.wk.weight"; "dec.0.crossNorm.bias"; "dec.1.ffn.w2.weight"; "encNorm.weight"; "decNorm.bias" ] do
                Expect.contains keys k (sprintf "has %s" k)
            Expect.isFalse (keys |> Array.exists (fun k -> k.Contains "lmHead" || k.Contains "Pos")) "tied, sinusoidal: no head or position table"
            Expect.isFalse (keys |> Array.exists (fun k -> k.StartsWith "enc." && k.Contains "cross")) "encoder blocks have no cross-attention"
            Expect.equal (Array.distinct keys).Length keys.Length "no duplicate keys"
            let sumNamed = model.named_parameters () |> Seq.sumBy (fun struct (_, p) -> p.NumberOfElements)
            Expect.equal (model.ParameterCount().Total) sumNamed "total = named parameters"
            use untied = new EncoderDecoder({ tinyConfig with TiedEmbeddings = false; Positional = Learned })
            let keys = untied.named_parameters () |> Seq.map (fun struct (k, _) -> k) |> Set.ofSeq
            for k in [ "lmHead.weight"; "encPos.table.weight"; "decPos.table.weight" ] do
                Expect.contains keys k (sprintf "untied / learned has %s" k)
            Expect.equal (untied.ParameterCount().Total - model.ParameterCount().Total)
                         (int64 (tinyConfig.VocabSize * tinyConfig.ModelDim + 2 * tinyConfig.MaxLength * tinyConfig.ModelDim)) "head V*D + two position tables"

        testCase "dense model: active parameters = total; a known tiny count" <| fun () ->
            let cfg = { tinyConfig with EncoderLayers = 1; DecoderLayers = 1; KvHeads = 1 }
            use model = new EncoderDecoder(cfg)
            let d, v, f, dh = 16L, 20L, 32L, 4L
            let attn = d * d + 2L * d * dh + d * d                           // q, k, v (one KV head), o
            let norm = 2L * d
            let ffn = 2L * d * f
            let expected = v * d + (attn + ffn + 2L * norm) + (2L * attn + ffn + 3L * norm) + 2L * norm
            Expect.equal (model.ParameterCount()) { Total = expected; Active = expected } "counts"

        testCase "bad model config gives every problem at once" <| fun () ->
            let bad =
                { tinyConfig with
                    VocabSize = 1; ModelDim = 15; Heads = 4; KvHeads = 3; DecoderLayers = 0; MaxLength = 1
                    Dropout = -0.1; AttentionDropout = 1.0
                    Ffn = Moe { MoeConfig.defaults with ModelDim = 64; ExpertHidden = 0 }
                    MoeEvery = 0 }
            let problems = ModelConfig.validate bad
            let expected =
                [ "VocabSize"; "Heads (4) must divide ModelDim (15)"; "KvHeads (3) must divide Heads (4)"; "Dropout must be in [0, 1), got -0.1"; "AttentionDropout must be in [0, 1), got 1"; "DecoderLayers"
                  "MaxLength"; "even ModelDim"; "Moe: ExpertHidden"; "Moe.ModelDim (64) must equal ModelDim (15)"; "MoeEvery" ]
            for e in expected do
                Expect.isTrue (problems |> List.exists (fun p -> p.Contains e)) (sprintf "mentions %s in %A" e problems)
            Expect.equal problems.Length expected.Length (sprintf "one message each: %A" problems)
            let ex = Expect.throwsC (fun () -> new EncoderDecoder(bad) |> ignore) id
            for e in expected do Expect.stringContains ex.Message e "the exception lists them all"
            Expect.isEmpty (ModelConfig.validate ModelConfig.defaults) "defaults are valid"

        testCase "bad inputs are named" <| fun () ->
            use _ = torch.NewDisposeScope()
            use model = new EncoderDecoder(tinyConfig)
            let ex = Expect.throwsC (fun () -> model.Forward(torch.tensor([| 1L; 25L |]).view(1L, 2L), torch.tensor([| 1L |]).view(1L, 1L)) |> ignore) id
            Expect.stringContains ex.Message "expected src token ids in 0 .. 19, got ids in 1 .. 25" "range"
            let ex = Expect.throwsC (fun () -> model.Forward(torch.ones([| 1L; 30L |], dtype = torch.ScalarType.Int64), torch.ones([| 1L; 1L |], dtype = torch.ScalarType.Int64)) |> ignore) id
            Expect.stringContains ex.Message "MaxLength 24" "too long"
            let ex = Expect.throwsC (fun () -> model.Forward(torch.ones([| 1L; 3L |], dtype = torch.ScalarType.Int64), torch.ones([| 1L; 1L |], dtype = torch.ScalarType.Int64), torch.ones([| 1L; 2L |], dtype = torch.ScalarType.Bool), null) |> ignore) id
            Expect.stringContains ex.Message "expected srcValid [1; 3] bool" "mask shape"

        testCase "incremental decoding with the cache gives the full forward's logits (both attention impls, padded source)" <| fun () ->
            use _ = torch.NewDisposeScope()
            for impl in [ Handwritten; Library ] do
                torch.manual_seed 11L |> ignore
                use model = new EncoderDecoder({ tinyConfig with Attention = impl; Positional = Learned })
                model.eval ()
                use _ = torch.no_grad ()
                let full, stepwise, _, cache = fullAndCached model
                use cache = cache
                expectClose Tol.f32Loose stepwise full (sprintf "%A: step-by-step logits" impl)
                let cfg = model.Config
                let perToken = AttentionConfig.kvBytesPerToken (ModelConfig.attention cfg) 4
                Expect.equal cache.SelfAttentionBytes (int64 cfg.DecoderLayers * 2L * 6L * perToken) "self cache bytes"
                Expect.equal cache.Bytes (cache.SelfAttentionBytes + int64 cfg.DecoderLayers * 2L * 7L * perToken) "plus cross cache"

        testCase "fewer KV heads, smaller cache: bytes scale with G" <| fun () ->
            use _ = torch.NewDisposeScope()
            let bytesWith g =
                use model = new EncoderDecoder({ tinyConfig with KvHeads = g })
                model.eval ()
                use _ = torch.no_grad ()
                let encoded = model.Encode(randIds 3L 20L [| 1L; 5L |], null)
                use cache = model.NewCache()
                for t in 0 .. 3 do model.Decode(encoded.Memory, null, randIds 3L 20L [| 1L; 1L |], null, cache) |> ignore
                cache.Bytes
            Expect.equal (bytesWith 4) (4L * bytesWith 1) "MHA cache = 4 x MQA cache"
            Expect.equal (bytesWith 2) (2L * bytesWith 1) "GQA-2 cache = 2 x MQA cache"

        testCase "source padding does not change the logits" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 12L |> ignore
            use model = new EncoderDecoder(tinyConfig)
            model.eval ()
            let src = randIds 3L 20L [| 1L; 5L |]
            let padded = torch.cat([| src; torch.zeros([| 1L; 3L |], dtype = torch.ScalarType.Int64) |], 1L)
            let valid = torch.tensor(Array.init 8 (fun i -> i < 5)).view(1L, 8L)
            let tgt = randIds 3L 20L [| 1L; 4L |]
            expectClose Tol.f32Loose (model.Forward(padded, tgt, valid, null).Logits) (model.Forward(src, tgt).Logits) "padded = unpadded"

        testCase "MoE reports come back in layer order with token ids, pads skipped" <| fun () ->
            use _ = torch.NewDisposeScope()
            let seen = List<int64[]>()
            let cfg = { tinyConfig with EncoderLayers = 4; DecoderLayers = 2 }
            use model = new EncoderDecoder(cfg, reportingFactory cfg seen)
            let src = torch.tensor([| 3L; 4L; 5L; 0L; 6L; 7L; 8L; 9L |]).view(2L, 4L)
            let srcValid = torch.tensor([| true; true; true; false; true; true; true; true |]).view(2L, 4L)
            let tgt = torch.tensor([| 1L; 10L; 1L; 11L |]).view(2L, 2L)
            let out = model.Forward(src, tgt, srcValid, null)
            Expect.equal (out.Moe |> List.map (fun r -> r.Layer)) [ "enc.1"; "enc.3"; "dec.1" ] "names and order"
            Expect.equal (out.Moe |> List.map (fun r -> scalar r.Report.Aux.SwitchAux)) [ 7.0; 7.0; 4.0 ] "tokens each layer saw"
            Expect.sequenceEqual seen[0] [| 3L; 4L; 5L; 6L; 7L; 8L; 9L |] "source ids, pad dropped"
            Expect.sequenceEqual seen[2] [| 1L; 10L; 1L; 11L |] "target ids"

        overfitTests

        testCase "MoE every other layer: reports named enc.1, enc.3, dec.1; active parameters skip E - k experts" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 15L |> ignore
            let cfg = { tinyConfig with EncoderLayers = 4; DecoderLayers = 2; Ffn = Moe moeConfig; MoeEvery = 2 }
            use model = new EncoderDecoder(cfg)
            let out = model.Forward(randIds 3L 20L [| 2L; 5L |], randIds 3L 20L [| 2L; 3L |])
            Expect.equal (out.Moe |> List.map (fun r -> r.Layer)) [ "enc.1"; "enc.3"; "dec.1" ] "MoE layers in order"
            for r in out.Moe do
                Expect.sequenceEqual r.Report.Stats.TokensPerExpert.shape [| 4L |] "[E]"
                Expect.floatClose Accuracy.medium (scalar (r.Report.Stats.TokensPerExpert.sum ())) 1.0 "fractions sum to 1"
            let keys = model.named_parameters () |> Seq.map (fun struct (k, _) -> k) |> Set.ofSeq
            Expect.contains keys "enc.1.ffn.experts.w1" "expert weights registered"
            Expect.contains keys "enc.0.ffn.w1.weight" "dense layer between MoE layers"
            let counts = model.ParameterCount()
            let perExpert = 2L * 16L * 24L                                          // W1 [D; H] and W2 [H; D]
            Expect.equal (counts.Total - counts.Active) (3L * (4L - 2L) * perExpert) "three MoE layers, two idle experts each"

        testCase "MoE model: the cached decoder gives the full forward's logits (dropless routing is per token)" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 16L |> ignore
            use model = new EncoderDecoder({ tinyConfig with Ffn = Moe moeConfig })
            model.eval ()
            let src = randIds 3L 20L [| 2L; 5L |]
            let tgt = randIds 3L 20L [| 2L; 4L |]
            let full = model.Forward(src, tgt).Logits
            let encoded = model.Encode(src, null)
            use cache = model.NewCache()
            let steps = [| for t in 0L .. 3L -> model.Decode(encoded.Memory, null, tgt.narrow(1L, t, 1L), null, cache).Logits |]
            expectClose Tol.f32Loose (torch.cat(steps, 1L)) full "step-by-step logits"

        testCase "hash-routed model: each layer routes the real tokens' ids, pads skipped" <| fun () ->
            use _ = torch.NewDisposeScope()
            let seed = 3
            let hashed = { moeConfig with Router = { moeConfig.Router with Selection = Hash(RandomHash seed) } }
            use model = new EncoderDecoder({ tinyConfig with Ffn = Moe hashed })
            let src = torch.tensor([| 3L; 4L; 5L; 0L; 0L; 6L; 7L; 8L; 9L; 10L |]).view(2L, 5L)
            let srcValid = src.ne(torch.tensor 0L)
            let expected =
                let ids = src.masked_select srcValid
                let counts = torch.bincount(Routing.randomHash seed 4 ids, minlength = 4L).to_type(torch.ScalarType.Float32)
                counts / counts.sum ()
            let out = model.Forward(src, randIds 3L 20L [| 2L; 3L |], srcValid, null)
            for r in out.Moe |> List.filter (fun r -> r.Layer.StartsWith "enc") do
                expectClose Tol.f32 r.Report.Stats.TokensPerExpert expected (r.Layer + ": tokens per expert = hash of the real ids")

        testCase "C# facade: ModelApi.Config's defaults are ModelConfig.defaults; WithMoe; MoeLayers by name" <| fun () ->
            Expect.equal (ModelApi.Config(512)) ModelConfig.defaults "same defaults"
            let cfg = ModelApi.Config(20, modelDim = 16, kvHeads = 2, encoderLayers = 2, decoderLayers = 2, attention = "Library", positional = "learned")
            Expect.equal cfg { ModelConfig.defaults with VocabSize = 20; ModelDim = 16; KvHeads = 2; Attention = Library; Positional = Learned } "overrides"
            Expect.throwsT<ArgumentException> (fun () -> ModelApi.Config(20, attention = "flash") |> ignore) "unknown attention named"
            let moeCfg = ModelApi.WithMoe(cfg, { moeConfig with ModelDim = 99 }, 2)
            Expect.isEmpty (ModelApi.Validate moeCfg) "ModelDim synchronised"
            use model = new EncoderDecoder(moeCfg)
            Expect.equal (model.MoeLayers() |> Array.map fst) [| "enc.1"; "dec.1" |] "MoE layers by name"
            use gpt = new DecoderOnly(moeCfg)
            Expect.equal (gpt.MoeLayers() |> Array.map fst) [| "dec.1" |] "decoder-only MoE layers"
            Expect.equal (Generation.Config(1, 2)) { GenerateConfig.defaults with BosId = 1; EosId = 2 } "generation defaults"

        testCase "decoder-only: causal, and the cached forward equals the full one" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 14L |> ignore
            use model = new DecoderOnly(tinyConfig)
            model.eval ()
            let ids = randIds 0L 20L [| 2L; 6L |]
            let full = model.Forward(ids).Logits
            let changed = ids.clone ()
            changed.index_put_(torch.tensor 19L, [| torch.TensorIndex.Colon; torch.TensorIndex.Single 5L |]) |> ignore
            expectClose Tol.f32 (model.Forward(changed).Logits.narrow(1L, 0L, 5L)) (full.narrow(1L, 0L, 5L)) "future token unseen"
            use cache = model.NewCache()
            let first = model.Forward(ids.narrow(1L, 0L, 4L), null, cache).Logits
            let rest = model.Forward(ids.narrow(1L, 4L, 2L), null, cache).Logits
            expectClose Tol.f32Loose (torch.cat([| first; rest |], 1L)) full "prefix then two tokens"
            Expect.isFalse (model.named_parameters () |> Seq.exists (fun struct (k, _) -> k.Contains "cross")) "no cross-attention"
    ]

// ---------------------------------------------------------------- generation


/// Untied, so that an untrained model does not just echo its input embedding and outputs vary.
let generationConfig = { tinyConfig with TiedEmbeddings = false }

/// Sum of log p(tokens, then EOS if finished | src) under teacher forcing.
let teacherForcedLogProb (model: EncoderDecoder) (src: Tensor) (h: Hypothesis) : float =
    use _ = torch.NewDisposeScope()
    use _ = torch.no_grad ()
    let outputs = Array.append (Array.map int64 h.Tokens) (if h.Finished then [| int64 genConfig.EosId |] else [||])
    let input = torch.tensor(Array.append [| int64 genConfig.BosId |] outputs.[.. outputs.Length - 2]).view(1L, -1L)
    let lp = model.Forward(src, input).Logits.log_softmax(-1L)                  // [1; L; V]
    let picked = lp.gather(2L, torch.tensor(outputs).view(1L, -1L, 1L))
    scalar (picked.sum ())

/// An untied model whose logits are the same `preference` vector at every step, whatever the input.
let constantModel (preference: float32[]) =
    let model = new EncoderDecoder({ tinyConfig with TiedEmbeddings = false })
    use _ = torch.no_grad ()
    model.DecoderNorm.weight.zero_ () |> ignore
    model.DecoderNorm.bias.zero_().index_put_(torch.tensor 1.0f, [| torch.TensorIndex.Single 0L |]) |> ignore
    model.OutputProjection.weight.zero_().select(1L, 0L).copy_(torch.tensor preference) |> ignore
    model

let hasRepeatedNgram (n: int) (tokens: int[]) =
    let grams = tokens |> Array.windowed n
    grams.Length <> (Array.distinct grams).Length

// ---------------------------------------------------------------- bf16 mixed precision

let private bf16 = torch.ScalarType.BFloat16

/// bfloat16 keeps 8 significant bits (rounding error up to 2^-9 relative). A logit of these tiny models
/// passes through about ten bf16 matmuls with O(1) activations; measured max |logit error| 0.01 (dense) to
/// 0.023 (MoE) against float32 with logits up to 4.5, so this bound leaves 4x room.
let bf16LogitTol = 0.1

/// Normwise relative gradient error ||g_bf16 - g_f32|| / ||g_f32|| per parameter; measured 0.004 to 0.018.
let bf16GradRelTol = 0.08

/// A dense FFN that records the dtype of every input it sees, to check what the blocks feed their sublayers.
type DtypeRecordingFfn(inner: DenseFfn, seen: List<torch.ScalarType>) as this =
    inherit torch.nn.Module<Tensor, FfnResult>("ffn")
    let ffn = inner
    do this.RegisterComponents()
    override _.forward(x: Tensor) : FfnResult =
        seen.Add x.dtype
        ffn.forward x

/// The float32 gradients of every parameter after one backward pass of the teacher-forced loss.
let gradientsAt (model: EncoderDecoder) (precision: Precision) (src: Tensor) (tgt: Tensor) (target: Tensor) : Tensor * (string * Tensor)[] =
    model.Precision <- precision
    model.zero_grad ()
    let out = model.Forward(src, tgt)
    use loss = tokenLoss out.Logits target
    loss.backward ()
    let grads = [| for struct (name, p) in model.named_parameters () -> name, p.grad.detach().clone() |]
    out.Logits.detach (), grads

let precisionTests =
    testList "bf16" [
        testCase "bf16 forward (dense, top-4-of-4 MoE, LoRA-MoE): float32 logits close to float32's; parameters and gradients stay float32 and close" <| fun () ->
            // K = E keeps routing free of discrete choices, so bf16 rounding cannot flip an expert pick
            let allExperts = { moeConfig with Router = { moeConfig.Router with K = 4 } }
            for name, ffn in [ "dense", Dense 32; "MoE", Moe allExperts; "LoRA-MoE", LoraMoe(allExperts, LoraConfig.defaults) ] do
                use _ = torch.NewDisposeScope()
                torch.manual_seed 31L |> ignore
                use model = new EncoderDecoder({ tinyConfig with Ffn = ffn })
                model.eval ()
                let src = randIds 3L 20L [| 2L; 7L |]
                let tgt = randIds 3L 20L [| 2L; 6L |]
                let target = randIds 3L 20L [| 2L; 6L |]
                let reference, referenceGrads = gradientsAt model Precision.Full src tgt target
                let mixed, mixedGrads = gradientsAt model Precision.BFloat16 src tgt target
                Expect.equal mixed.dtype torch.ScalarType.Float32 (name + ": logits handed to the loss are float32")
                let err = maxAbsDiff mixed reference
                Expect.isGreaterThan err 0.0 (name + ": the matmuls did run in bfloat16")
                expectClose bf16LogitTol mixed reference (name + ": bf16 logits")
                for struct (pname, p) in model.named_parameters () do
                    Expect.equal p.dtype torch.ScalarType.Float32 (sprintf "%s: %s stays float32" name pname)
                for (pname, g), (_, r) in Array.zip mixedGrads referenceGrads do
                    Expect.equal g.dtype torch.ScalarType.Float32 (sprintf "%s: %s gradient is float32" name pname)
                    let rel = scalar ((g - r).norm ()) / max (scalar (r.norm ())) 1e-12
                    Expect.isLessThan rel bf16GradRelTol (sprintf "%s: %s gradient relative error %g" name pname rel)

        testCase "bf16: every sublayer gets bfloat16 inputs; Full leaves them float32" <| fun () ->
            use _ = torch.NewDisposeScope()
            let seen = List<torch.ScalarType>()
            let factory = Func<FfnSite, FeedForward>(fun _ -> FeedForward.dense (new DtypeRecordingFfn(new DenseFfn("ffn", tinyConfig.ModelDim, 32, GELU), seen)))
            use model = new EncoderDecoder(tinyConfig, factory)
            let src = randIds 3L 20L [| 2L; 5L |]
            let tgt = randIds 3L 20L [| 2L; 4L |]
            model.Forward(src, tgt) |> ignore
            Expect.sequenceEqual seen (Array.create 4 torch.ScalarType.Float32) "Full: float32 inputs in all 4 blocks"
            seen.Clear()
            (model :> IMixedPrecision).Precision <- Precision.BFloat16
            Expect.isTrue (model.EncoderBlocks |> Seq.forall (fun b -> b.Precision = Precision.BFloat16)) "the setter reaches every block"
            model.Forward(src, tgt) |> ignore
            Expect.sequenceEqual seen (Array.create 4 bf16) "BFloat16: bfloat16 inputs in all 4 blocks"

        testCase "bf16 KV cache: keys in bfloat16 (half the bytes); incremental decoding equals the full bf16 forward" <| fun () ->
            use _ = torch.NewDisposeScope()
            for impl in [ Handwritten; Library ] do
                torch.manual_seed 11L |> ignore
                use model = new EncoderDecoder({ tinyConfig with Attention = impl })
                model.Precision <- Precision.BFloat16
                model.eval ()
                use _ = torch.no_grad ()
                let full, stepwise, encoded, cache = fullAndCached model
                use cache = cache
                Expect.equal encoded.Memory.dtype torch.ScalarType.Float32 (sprintf "%A: the encoder's normed output is float32" impl)
                expectClose bf16LogitTol stepwise full (sprintf "%A: step-by-step logits" impl)
                Expect.equal cache.Layers[0].Self.Keys.dtype bf16 "self-attention cache in bfloat16"
                Expect.equal cache.Layers[0].Cross.Values.dtype bf16 "cross-attention cache in bfloat16"
                let perToken = AttentionConfig.kvBytesPerToken (ModelConfig.attention model.Config) 2
                Expect.equal cache.SelfAttentionBytes (int64 model.Config.DecoderLayers * 2L * 6L * perToken) "2 bytes per cached number"

        testCase "bf16 generation: greedy equals beam 1 and matches teacher forcing in the same precision" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 21L |> ignore
            use model = new EncoderDecoder(generationConfig)
            model.Precision <- Precision.BFloat16
            let src = randIds 3L 20L [| 3L; 5L |]
            let cfg = { genConfig with BeamSize = 1 }
            let g = greedy cfg model src null
            let b = beamSearch cfg model src null
            for i in 0 .. 2 do
                Expect.isNonEmpty g[i].Tokens (sprintf "source %d decodes" i)
                Expect.sequenceEqual b[i].Tokens g[i].Tokens (sprintf "source %d: beam 1 = greedy" i)
                Expect.floatClose { absolute = bf16LogitTol; relative = bf16LogitTol }
                    g[i].LogProb (teacherForcedLogProb model (src.narrow(0L, int64 i, 1L)) g[i]) "greedy = teacher forcing"

        testCase "decoder-only bf16: float32 logits close to float32's" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 41L |> ignore
            use model = new DecoderOnly(tinyConfig)
            model.eval ()
            use _ = torch.no_grad ()
            let ids = randIds 3L 20L [| 2L; 6L |]
            let reference = model.Forward(ids).Logits
            model.Precision <- Precision.BFloat16
            let mixed = model.Forward(ids).Logits
            Expect.equal mixed.dtype torch.ScalarType.Float32 "float32 logits"
            expectClose bf16LogitTol mixed reference "bf16 logits"
    ]

let generateTests =
    testList "generation" [
        testCase "bannedByNgram bans completions of seen n-grams" <| fun () ->
            Expect.equal (bannedByNgram 2 (List [ 5; 6; 5 ])) [ 6 ] "5 6 seen, last 5"
            Expect.equal (bannedByNgram 3 (List [ 5; 6; 7; 5; 6 ])) [ 7 ] "5 6 7 seen"
            Expect.equal (bannedByNgram 1 (List [ 4; 4; 9 ])) [ 4; 9 ] "unigrams"
            Expect.isEmpty (bannedByNgram 3 (List [ 5 ])) "too short"
            Expect.isEmpty (bannedByNgram 0 (List [ 5; 5 ])) "off"

        testCase "GNMT length penalty" <| fun () ->
            Expect.floatClose Accuracy.high (lengthPenalty 0.0 7) 1.0 "alpha 0"
            Expect.floatClose Accuracy.high (lengthPenalty 1.0 7) 2.0 "(5 + 7) / 6"

        testCase "beam size 1 equals greedy, and both scores equal teacher-forced log-probabilities" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 21L |> ignore
            use model = new EncoderDecoder(generationConfig)
            let src = randIds 3L 20L [| 3L; 5L |]
            for alpha in [ 0.0; 0.6 ] do
                let cfg = { genConfig with LengthPenalty = alpha; BeamSize = 1 }
                let g = greedy cfg model src null
                let b = beamSearch cfg model src null
                for i in 0 .. 2 do
                    Expect.sequenceEqual b[i].Tokens g[i].Tokens (sprintf "alpha %g source %d tokens" alpha i)
                    Expect.equal b[i].Finished g[i].Finished "finished alike"
                    Expect.floatClose { absolute = Tol.f32Loose; relative = Tol.f32Loose } b[i].LogProb g[i].LogProb "log-prob"
                    Expect.floatClose { absolute = Tol.f32Loose; relative = Tol.f32Loose }
                        g[i].LogProb (teacherForcedLogProb model (src.narrow(0L, int64 i, 1L)) g[i]) "greedy = teacher forcing"

        testCase "beam search: hypotheses sorted by score, log-probs match teacher forcing, training mode restored" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 22L |> ignore
            use model = new EncoderDecoder({ generationConfig with Dropout = 0.1 })
            model.train ()
            let src = randIds 3L 20L [| 2L; 5L |]
            let cfg = { genConfig with BeamSize = 3; LengthPenalty = 0.6 }
            let nbest = beamSearchNBest cfg model src null
            Expect.isTrue model.training "training mode restored"
            model.eval ()
            for i in 0 .. 1 do
                let scores = nbest[i] |> Array.map (fun h -> h.Score)
                Expect.isNonEmpty scores "has hypotheses"
                Expect.sequenceEqual scores (Array.sortDescending scores) "best first"
                for h in nbest[i] do
                    Expect.floatClose { absolute = Tol.f32Loose; relative = Tol.f32Loose }
                        h.LogProb (teacherForcedLogProb model (src.narrow(0L, int64 i, 1L)) h) "beam log-prob = teacher forcing (cache reordered right)"
                    let length = h.Tokens.Length + (if h.Finished then 1 else 0)
                    Expect.floatClose Accuracy.high h.Score (h.LogProb / lengthPenalty 0.6 length) "score = log-prob / lp"

        testCase "a padded batch decodes like each source alone" <| fun () ->
            use _ = torch.NewDisposeScope()
            torch.manual_seed 24L |> ignore
            use model = new EncoderDecoder(generationConfig)
            let short = randIds 3L 20L [| 1L; 3L |]
            let long = randIds 3L 20L [| 1L; 6L |]
            let batch = torch.cat([| torch.cat([| short; torch.zeros([| 1L; 3L |], dtype = torch.ScalarType.Int64) |], 1L); long |], 0L)
            let valid = torch.tensor(Array.init 12 (fun i -> i < 3 || i >= 6)).view(2L, 6L)
            for k in [ 1; 3 ] do
                let cfg = { genConfig with BeamSize = k; LengthPenalty = 0.6 }
                let together = generate cfg model batch valid
                let alone = [| generate cfg model short null; generate cfg model long null |] |> Array.map Array.head
                for i in 0 .. 1 do
                    Expect.sequenceEqual together[i].Tokens alone[i].Tokens (sprintf "beam %d source %d" k i)
                    Expect.floatClose { absolute = Tol.f32Loose; relative = Tol.f32Loose } together[i].Score alone[i].Score "same score"

        testCase "no-repeat n-gram blocks repeats that greedy and beam would make" <| fun () ->
            use _ = torch.NewDisposeScope()
            let preference = Array.init 20 (fun v -> if v = 7 then 5.0f elif v = 2 then -5.0f else float32 (v % 5))
            use model = constantModel preference
            let src = randIds 3L 20L [| 1L; 4L |]
            let plain = greedy genConfig model src null
            Expect.sequenceEqual plain[0].Tokens (Array.create 8 7) "without blocking: 7 7 7 ..."
            for n in [ 2; 3 ] do
                for k in [ 1; 3 ] do
                    let out = generate { genConfig with NoRepeatNgram = n; BeamSize = k } model src null
                    Expect.isFalse (hasRepeatedNgram n out[0].Tokens) (sprintf "n %d beam %d: %A" n k out[0].Tokens)
                    Expect.equal out[0].Tokens.Length 8 "still runs to MaxLength"

        testCase "min length holds EOS back" <| fun () ->
            use _ = torch.NewDisposeScope()
            let preference = Array.init 20 (fun v -> if v = 2 then 5.0f else float32 (v % 3))
            use model = constantModel preference
            let src = randIds 3L 20L [| 2L; 4L |]
            for k in [ 1; 2 ] do
                let free = generate { genConfig with BeamSize = k } model src null
                Expect.isEmpty free[0].Tokens "EOS first"
                let held = generate { genConfig with BeamSize = k; MinLength = 3 } model src null
                for h in held do
                    Expect.equal h.Tokens.Length 3 (sprintf "beam %d: three tokens, then EOS" k)
                    Expect.isTrue h.Finished "ended by EOS"

        testCase "bad generation settings list every problem" <| fun () ->
            let problems = GenerateConfig.validate tinyConfig { genConfig with MaxLength = 50; BeamSize = 0; EosId = 20; NoRepeatNgram = -1 }
            Expect.equal problems.Length 4 (sprintf "%A" problems)
            use model = new EncoderDecoder(generationConfig)
            use src = randIds 3L 20L [| 1L; 3L |]
            Expect.throwsT<ArgumentException> (fun () -> greedy { genConfig with BeamSize = 0 } model src null |> ignore) "refused"

        sequencedCase "generation leaks no tensors" <| fun () ->
            torch.manual_seed 23L |> ignore
            use model = new EncoderDecoder(generationConfig)
            use src = randIds 3L 20L [| 2L; 5L |]
            beamSearch { genConfig with BeamSize = 2 } model src null |> ignore
            let live = liveTensors ()
            beamSearch { genConfig with BeamSize = 2 } model src null |> ignore
            greedy genConfig model src null |> ignore
            Expect.isLessThanOrEqual (liveTensors ()) live "live tensors do not grow"
    ]

let tests = testList "Models" [ attentionTests; modelTests; generateTests; precisionTests ]
