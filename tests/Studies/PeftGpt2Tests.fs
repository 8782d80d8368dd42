/// The PEFT-of-GPT-2 study (`scripts/peft_gpt2.fsx`): the wrapped GPT-2 equals the base with no soft prompt,
/// with the key/value cache and with left padding; prompt tuning, last-layer, last-blocks and LoRA train exactly
/// their own parameters; the data encoding counts only summary tokens; a smoke run on the tiny Hugging Face
/// GPT-2 writes its table, run folders, report page and figure.
/// Axes: B batch, S sequence, N virtual tokens, D width, V vocabulary.
module Moe.Tests.PeftGpt2Tests

open System
open System.IO
open Expecto
open TorchSharp
open Moe
open Moe.Gpt2
open Moe.PeftGpt2
open Moe.Tests.Support

/// The same float32 computation in another order (masked attention, split heads).
let private sameLogits = 1e-5

let private tinyBase () =
    Native.seedAll 5
    new Gpt2Model(Gpt2Config.tiny)

/// A stand-in tokenizer over the tiny vocabulary: one id per character.
let private encodeChars (text: string) = text.ToCharArray() |> Array.map (fun c -> int c % Gpt2Config.tiny.VocabSize)

let private ids (rows: int64[][]) = torch.tensor(Array.concat rows).view(int64 rows.Length, -1L)

/// Bit-identical tensors (same shape and every element equal).
let private same (a: torch.Tensor) (b: torch.Tensor) = a.shape = b.shape && a.eq(b).all().item<bool> ()

/// Base parameters by name, copied.
let private snapshot (m: Gpt2Model) = [ for struct (n, p) in m.named_parameters () -> n, p.detach().clone () ]

/// A few AdamW steps on the summary loss of fixed data through the trainable parameters only.
let private train (model: PeftGpt2Model) (steps: int) =
    let trainable = model.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.toArray
    use opt = new Train.SafeAdamW(trainable, 0.05)
    let batch = [| { Prompt = [| 1; 2; 3; 4 |]; Target = [| 5; 6; 0 |] }; { Prompt = [| 7; 8 |]; Target = [| 9; 0 |] } |]
    for _ in 1 .. steps do
        use _ = torch.NewDisposeScope()
        opt.zero_grad ()
        let x, y = collate 0 (torch.CPU) batch
        let loss = summaryLoss model x y
        loss.Loss.backward ()
        opt.step () |> ignore

let private unchanged (before: (string * torch.Tensor) list) (m: Gpt2Model) (except: string -> bool) =
    let now = dict [ for struct (n, p) in m.named_parameters () -> n, p :> torch.Tensor ]
    for n, t in before do
        if except n then Expect.isFalse (same t now[n]) (sprintf "%s trained" n)
        else Expect.isTrue (same t now[n]) (sprintf "%s bit-identical" n)

let tests =
    testSequenced <| testList "PeftGpt2" [
        test "with a zero-length prompt and the tied head the outputs equal the base model's" {
            use b = tinyBase ()
            use m = new PeftGpt2Model(b, 0, false)
            use _ = torch.no_grad ()
            use x = ids [| [| 3L; 1L; 4L; 1L; 5L; 9L |]; [| 2L; 6L; 5L; 3L; 5L; 8L |] |]
            use expected = b.forward x
            use got = m.Forward x
            Expect.isTrue (got.allclose(expected, sameLogits, sameLogits)) "the same logits"
        }
        test "the key/value cache and left padding give the logits of one full pass, soft prompt included" {
            use b = tinyBase ()
            use m = prepare encodeChars (PromptTuning(3, Some "ab")) b
            use _ = torch.no_grad ()
            let row = [| 3L; 1L; 4L; 1L; 5L |]
            use x = ids [| row |]
            use full = m.Forward x // [1; 5; V]
            let lm = m :> CausalLM.ICausalLM
            use cache = lm.NewCache()
            use first = ids [| row[.. 2] |]
            let a = lm.Forward(first, null, null, cache)
            use mask5 = torch.ones([| 1L; 5L |], dtype = torch.ScalarType.Bool)
            let stepLogits =
                [ for j in 3 .. 4 ->
                    use next = ids [| [| row[j] |] |]
                    use mask = mask5.narrow(1L, 0L, int64 j + 1L)
                    (lm.Forward(next, mask, null, cache)).Logits ]
            use cached = torch.cat(Array.ofList (a.Logits :: stepLogits), 1L)
            Expect.isTrue (cached.allclose(full, sameLogits, sameLogits)) "cached decoding = one pass"
            // the same row left-padded by two in a batch
            use padded = ids [| Array.append [| 0L; 0L |] row |]
            use valid = torch.tensor([| false; false; true; true; true; true; true |]).view(1L, -1L)
            use h = m.Hidden(padded, valid, Unchecked.defaultof<Models.DecoderCache>)
            use logits = m.Logits h
            Expect.isTrue ((logits.narrow(1L, 2L, 5L)).allclose(full, sameLogits, sameLogits)) "left padding changes nothing"
        }
        test "prompt tuning: the soft prompt starts as the init text's token embeddings, repeated or cut to N" {
            Expect.equal (initTokenIds 5 [| 7; 8 |]) [| 7; 8; 7; 8; 7 |] "repeated to N"
            Expect.equal (initTokenIds 2 [| 7; 8; 9 |]) [| 7; 8 |] "cut to N"
            use b = tinyBase ()
            use m = prepare encodeChars (PromptTuning(4, Some "[S]")) b
            let expected = initTokenIds 4 (encodeChars "[S]")
            for i in 0 .. 3 do
                Expect.isTrue (same (m.Prompt[int64 i]) (m.TokenEmbeddings[int64 expected[i]])) (sprintf "virtual token %d = embedding of id %d" i expected[i])
            Expect.equal (trainableParameters m) (4L * int64 Gpt2Config.tiny.Embd) "only N x D trainable"
            Expect.equal (addedParameters m) (4L * int64 Gpt2Config.tiny.Embd) "N x D added"
        }
        test "prompt tuning: only the soft prompt receives gradients; the base is bit-identical after steps" {
            use b = tinyBase ()
            let before = snapshot b
            use m = prepare encodeChars (PromptTuning(3, None)) b
            let prompt0 = m.Prompt.detach().clone ()
            train m 3
            Expect.isFalse (same m.Prompt prompt0) "the soft prompt trained"
            for struct (n, p) in b.named_parameters () do Expect.isNull p.grad (sprintf "%s has no gradient" n)
            unchanged before b (fun _ -> false)
        }
        test "last layer: the untied head starts equal to the tied embeddings and only it changes" {
            use b = tinyBase ()
            let before = snapshot b
            use m = prepare encodeChars LastLayer b
            Expect.isTrue (same m.Head m.TokenEmbeddings) "untied head = wte at first"
            Expect.equal (trainableParameters m) (int64 (Gpt2Config.tiny.VocabSize * Gpt2Config.tiny.Embd)) "V x D trainable"
            let head0 = m.Head.detach().clone ()
            train m 3
            Expect.isFalse (same m.Head head0) "the head trained"
            unchanged before b (fun _ -> false)
            Expect.isFalse (same m.Head m.TokenEmbeddings) "head and wte now differ"
        }
        test "last N blocks train those blocks and ln_f; LoRA trains its adapters only" {
            use b = tinyBase ()
            let before = snapshot b
            use m = prepare encodeChars (LastBlocks 1) b
            train m 2
            unchanged before b (fun n -> n.StartsWith "h.1." || n.StartsWith "ln_f.")
            Expect.equal (addedParameters m) 0L "nothing added"
            use b2 = tinyBase ()
            let before2 = snapshot b2
            use l = prepare encodeChars (Lora { Lora = { Rank = 2; Alpha = 4.0; FreezeBase = true }; Targets = [ "c_attn" ] }) b2
            let d = int64 Gpt2Config.tiny.Embd
            Expect.equal (trainableParameters l) (2L * (2L * (d + 3L * d))) "A [D; r] + B [r; 3D] per layer"
            train l 2
            unchanged before2 b2 (fun _ -> false)
            throwsWith (fun () -> prepare encodeChars (LastBlocks 3) (tinyBase ()) |> ignore) [ "1 <= N <= 2" ] "more blocks than the model has"
        }
        test "encoding: article cut, separator, summary cut, EOS; labels only on the summary and EOS" {
            let e : Data.Example = { Id = "1"; Document = "abcdef"; Summary = "xy\nz"; Label = None }
            let enc = encode (fun s -> s.ToCharArray() |> Array.map int) 0 "|" 4 2 e
            Expect.equal enc.Prompt [| int 'a'; int 'b'; int 'c'; int 'd'; int '|' |] "article cut to 4, then the separator"
            Expect.equal enc.Target [| int ' '; int 'x'; 0 |] "' ' + summary cut to 2, then EOS"
            let x, y = collate 0 torch.CPU [| enc; { Prompt = [| 1 |]; Target = [| 2; 0 |] } |]
            use x = x
            use y = y
            Expect.equal (Tensors.toInt64s y) [| -100L; -100L; -100L; -100L; -100L; 32L; 120L; 0L; -100L; 2L; 0L; -100L; -100L; -100L; -100L; -100L |] "labels"
            Expect.equal (Tensors.toInt64s (x.select(0L, 1L))) [| 1L; 2L; 0L; 0L; 0L; 0L; 0L; 0L |] "right padding"
        }
        test "options: defaults from the shared folder, --model needs a config.json, unknown flags listed" {
            let dir = Path.Combine(Path.GetTempPath(), "moe-peft-options", Guid.NewGuid().ToString("N"))
            match PeftOptions.parse dir [| "--smoke"; "--model"; dir; "--bogus" |] with
            | Ok _ -> failtest "expected errors"
            | Error ps ->
                let text = String.Join("\n", ps)
                for part in [ "--bogus"; "config.json"; "cnndm-test-1000" ] do Expect.stringContains text part (sprintf "names %s" part)
        }
        testWithShared "smoke: every method on the tiny Hugging Face GPT-2 writes the table, run folders, report page and figure" <| fun data ->
            let dir = Path.Combine(Path.GetTempPath(), "moe-peft-smoke", Guid.NewGuid().ToString("N"))
            try
                let opts =
                    { PeftOptions.parseOrFail data [| "--smoke"; "--model"; Path.Combine(data, "..", "models", "gpt2-tiny-hf") |] with
                        RunsDir = Path.Combine(dir, "runs"); ReportsDir = Path.Combine(dir, "reports"); Screenshot = false }
                let r = run opts
                let t = r.Tables.Head
                Expect.equal t.Rows.Length 5 "five methods"
                Expect.stringContains t.Title "gpt2-tiny-hf" "the table names the base model"
                for row in t.Rows do Expect.equal row.Length t.Columns.Length "cells"
                for d in r.RunDirs do
                    let run = RunLog.load d
                    Expect.isSome run.Scores (d + ": test scores")
                    Expect.isNonEmpty run.Metrics (d + ": loss curves")
                Expect.stringContains (File.ReadAllText r.Report) "prompt tuning" "the report page shows the runs"
                Expect.stringContains (File.ReadAllText r.Markdown) "ROUGE-L" "the table"
                Expect.stringContains (File.ReadAllText r.Figure.Html) "trainable parameters" "the figure"
            finally (try Directory.Delete(dir, true) with _ -> ())
    ]
