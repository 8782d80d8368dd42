/// GPT-2 on the decoder-only path (`Moe.Gpt2Causal` through `HfCausalLM.load`) against the outputs
/// transformers 4.45.1 recorded for gpt2-tiny-hf (GPT2LMHeadModel), and the properties generation relies on:
/// cached = uncached, a left-padded batch equals each sequence alone, names equal the checkpoint's, the
/// config read field by field.
module Moe.Tests.Gpt2CausalTests

open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Moe
open Moe.Models
open Moe.Generate
open Moe.Tests.Support
open Moe.Tests.T5Tests

let private name = "gpt2-tiny-hf"
let private noCache = Unchecked.defaultof<DecoderCache>

/// The sample's input ids [1; S], its forward entry and its greedy entry.
let private recorded (dir: string) =
    let s = sample dir
    let alone = s.GetProperty "seq_doc0_alone"
    ids2d (alone.GetProperty "input_ids"), alone, s.GetProperty "seq_doc0_greedy"

/// The greedy settings recorded with the sample.
let private greedyOf (g: JsonElement) : GenerationConfig =
    let s = g.GetProperty "settings"
    GenerationConfig.greedyOf
        { GenerationConfig.defaults with
            MaxNewTokens = Some((s.GetProperty "max_new_tokens").GetInt32())
            EosTokenId = [ (s.GetProperty "eos_token_id").GetInt32() ]
            PadTokenId = Some((s.GetProperty "pad_token_id").GetInt32())
            BosTokenId = Some((s.GetProperty "bos_token_id").GetInt32()) }

/// A copy of the checkpoint folder with config.json edited.
let private withConfig (dir: string) (edit: Nodes.JsonNode -> unit) (body: string -> unit) =
    let tmp = Directory.CreateTempSubdirectory("moe-gpt2-")
    try
        let node = Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
        edit node
        File.WriteAllText(Path.Combine(tmp.FullName, "config.json"), node.ToJsonString())
        File.Copy(Path.Combine(dir, "model.safetensors"), Path.Combine(tmp.FullName, "model.safetensors"))
        body tmp.FullName
    finally tmp.Delete true

[<Tests>]
let tests =
    testList "Gpt2Causal" [
        scopedShared "gpt2-tiny-hf through HfCausalLM.load: logits and loss equal transformers'" (fun shared ->
            let dir = modelDir shared name
            use lm = HfCausalLM.load dir
            Expect.equal lm.ModelType "gpt2" "model_type"
            Expect.isNone lm.Decoder "GPT-2 is not on the Llama stack"
            Expect.equal lm.EosTokenIds [ 50256 ] "config.json's eos_token_id"
            let ids, alone, _ = recorded dir
            use _ = torch.no_grad ()
            let out = lm.Model.Forward(ids, null, null, noCache)
            let err = sliceError out.Logits (floats3d (alone.GetProperty "logits_slice_first8"))
            Expect.isLessThan err logitsTol (sprintf "logits[.., :8] within %g (max error %g)" logitsTol err)
            let loss, moe = lm.Loss ids null ids
            Expect.floatClose { absolute = logitsTol; relative = 0.0 } (Tensors.scalar loss) ((alone.GetProperty "loss").GetDouble()) "loss"
            Expect.isEmpty moe "no MoE reports")
        scopedShared "gpt2-tiny-hf: greedy ids equal transformers', with and without the cache" (fun shared ->
            let dir = modelDir shared name
            use lm = HfCausalLM.load dir
            let ids, _, g = recorded dir
            let expected = [| for x in (g.GetProperty "ids").EnumerateArray() -> x.GetInt32() |][int ids.shape[1] ..]
            let cfg = greedyOf g
            Expect.equal (runCausal cfg lm.Model ids null).[0].Sequences[0] expected "cached greedy"
            Expect.equal (runCausal { cfg with UseCache = false } lm.Model ids null).[0].Sequences[0] expected "uncached greedy")
        scopedShared "gpt2-tiny-hf: the cache fed in pieces gives one full pass's logits" (fun shared ->
            let dir = modelDir shared name
            use model = Gpt2Causal.fromFolder dir
            let ids, _, _ = recorded dir
            use _ = torch.no_grad ()
            let t = ids.shape[1]
            let full = model.Forward(ids, null, null, noCache, null).Logits
            use cache = model.NewCache()
            let stepped =
                [ yield model.Forward(ids.narrow(1L, 0L, t - 3L), null, null, cache, null).Logits
                  for i in t - 3L .. t - 1L do yield model.Forward(ids.narrow(1L, i, 1L), null, null, cache, null).Logits ]
            let err = Tensors.scalar ((torch.cat (List.toArray stepped, 1L) - full).abs().max ())
            Expect.isLessThan err logitsTol (sprintf "cached = uncached (max error %g)" err)
            Expect.equal cache.Length t "the cache holds every position")
        scopedShared "gpt2-tiny-hf: a left-padded batch equals each row alone (logits, greedy and beam ids)" (fun shared ->
            let dir = modelDir shared name
            use model = Gpt2Causal.fromFolder dir
            let ids, _, g = recorded dir
            use _ = torch.no_grad ()
            let t, pad = ids.shape[1], 7L
            let shortIds = ids.narrow(1L, 0L, t - pad)
            let padded = torch.cat ([| torch.tensor(Array.create (int pad) 50256L).view(1L, pad); shortIds |], 1L)
            let batch = torch.cat ([| ids; padded |], 0L) // [2; T]
            let mask = torch.tensor([| for row in 0L .. 1L do for i in 0L .. t - 1L -> row = 0L || i >= pad |]).view(2L, t)
            let together = model.Forward(batch, mask, null, noCache, null).Logits
            let aloneLong = model.Forward(ids, null, null, noCache, null).Logits
            let aloneShort = model.Forward(shortIds, null, null, noCache, null).Logits
            let errLong = Tensors.scalar ((together[0L].unsqueeze 0L - aloneLong).abs().max ())
            let errShort = Tensors.scalar ((together[1L].narrow(0L, pad, t - pad).unsqueeze 0L - aloneShort).abs().max ())
            Expect.isLessThan (max errLong errShort) logitsTol (sprintf "batch = alone (max error %g, %g)" errLong errShort)
            for cfg in [ { greedyOf g with MaxNewTokens = Some 6 }; { greedyOf g with MaxNewTokens = Some 5; NumBeams = 3 } ] do
                let batched = runCausal cfg model batch mask
                let single = [ runCausal cfg model ids null; runCausal cfg model shortIds null ]
                Expect.equal [ for r in batched -> r.Sequences[0] ] [ for r in single -> r[0].Sequences[0] ]
                    (sprintf "left-padded = alone with %d beam(s)" cfg.NumBeams))
        scopedShared "gpt2-tiny-hf: Gpt2Causal and the toolkit's Gpt2Model give the same logits; names are the checkpoint's" (fun shared ->
            let dir = modelDir shared name
            use model = Gpt2Causal.fromFolder dir
            use plain = Gpt2.loadHeads 4 (Path.Combine(dir, "model.safetensors"))
            let ids, _, _ = recorded dir
            use _ = torch.no_grad ()
            let err = Tensors.scalar ((model.Forward(ids, null, null, noCache, null).Logits - plain.forward ids).abs().max ())
            Expect.isLessThan err 1e-5 (sprintf "same logits (max error %g)" err)
            use weights = HfCheckpoint.openWeights dir
            Expect.equal (model.StateDict() |> List.map fst |> set) (set weights.Names) "the state dict's names equal the checkpoint's")
        scopedShared "gpt2-tiny-hf: a checkpoint saved from GPT2Model (no transformer. prefix) loads to the same logits" (fun shared ->
            let dir = modelDir shared name
            use model = Gpt2Causal.fromFolder dir
            let tmp = Directory.CreateTempSubdirectory("moe-gpt2-")
            try
                File.Copy(Path.Combine(dir, "config.json"), Path.Combine(tmp.FullName, "config.json"))
                let state = [ for n, t in model.StateDict() -> n.Substring "transformer.".Length, t ]
                Safetensors.write (Path.Combine(tmp.FullName, "model.safetensors")) state
                use other = Gpt2Causal.fromFolder tmp.FullName
                let ids, _, _ = recorded dir
                use _ = torch.no_grad ()
                let err = Tensors.scalar ((model.Forward(ids, null, null, noCache, null).Logits - other.Forward(ids, null, null, noCache, null).Logits).abs().max ())
                Expect.equal err 0.0 "identical logits"
            finally tmp.Delete true)
        scopedShared "gpt2-tiny-hf: config.json fields are used, ignored or refused by name" (fun shared ->
            let dir = modelDir shared name
            let refused (field: string) (value: string) =
                withConfig dir (fun n -> n[field] <- Nodes.JsonNode.Parse value) (fun tmp ->
                    let e = Expect.throwsC (fun () -> (HfCausalLM.load tmp).Module.Dispose()) id
                    Expect.stringContains e.Message field (sprintf "%s=%s refused naming the field" field value)
                    Expect.stringContains e.Message "config.json" "names the file")
            refused "n_inner" "100"
            refused "activation_function" "\"gelu_10\""
            refused "add_cross_attention_layers" "true"
            withConfig dir (fun n -> n["n_inner"] <- Nodes.JsonNode.Parse "256"; n["reorder_and_upcast_attn"] <- Nodes.JsonNode.Parse "true") (fun tmp ->
                use lm = HfCausalLM.load tmp
                Expect.equal lm.ModelType "gpt2" "n_inner = 4 n_embd and reorder_and_upcast_attn are accepted"))
        scopedShared "gpt2-tiny-hf: a sequence longer than n_positions is refused naming the limit" (fun shared ->
            let dir = modelDir shared name
            use lm = HfCausalLM.load dir
            Expect.equal lm.MaxPositions 128 "config.json's n_positions"
            let ids = torch.zeros([| 1L; 129L |], dtype = torch.ScalarType.Int64)
            let e = Expect.throwsC (fun () -> lm.Model.Forward(ids, null, null, noCache) |> ignore) id
            Expect.stringContains e.Message "n_positions" "names the limit"
            Expect.stringContains e.Message "129" "names the length")
    ]
