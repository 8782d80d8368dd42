/// Instruction tuning of a pretrained decoder-only LM (`HfCausalLM`: Llama, Qwen2, the MoE families) for
/// summarization with LoRA adapters named as PEFT names them: each example is a chat (system prompt, a user
/// message holding the document, the reference summary as the assistant's answer) rendered with the
/// checkpoint's chat template; the loss covers the assistant's tokens only (the prompt's labels are -100, as
/// TRL's completion-only collator sets them). The base stays frozen in float32 or bfloat16 (adapters in
/// float32, as PEFT's autocast_adapter_dtype keeps them), activation recomputation (gradient checkpointing)
/// re-runs each decoder layer in the backward pass instead of keeping its activations, and the result is
/// written merged in Hugging Face layout or as a PEFT adapter folder (task_type CAUSAL_LM).
/// The prompt defaults (`Prompt`) are defined here, in one place.
/// Axes: N rows, L positions (prompt and answer), D hidden size, V vocabulary.
module Moe.InstructTune

open System
open System.IO
open System.Text.Json.Nodes
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Models
open Moe.Data
open Moe.Train
open Moe.Finetune

type Tensor = torch.Tensor

// ---------------------------------------------------------------- prompts

/// The summarization chat's default wording.
module Prompt =
    /// The system message (None in `InstructConfig.SystemPrompt` leaves the system turn out).
    let defaultSystem = "You are a helpful assistant that summarizes news articles."
    /// The user message; `{document}` is replaced by the (truncated) document.
    let defaultUser = "Summarize the following article in one sentence.\n\n{document}"
    /// The placeholder `defaultUser` and user templates hold.
    let placeholder = "{document}"

    /// The user message for a document.
    let userMessage (template: string) (document: string) = template.Replace(placeholder, document)

    /// The chat's messages before the answer.
    let messages (system: string option) (user: string) (document: string) : (string * string) list =
        [ match system with
          | Some s -> "system", s
          | None -> ()
          "user", userMessage user document ]

// ---------------------------------------------------------------- configuration

/// A decoder-only fine-tuning run: the encoder-decoder run's settings (`FinetuneConfig`: MaxSourceTokens cuts
/// the document, MaxTargetTokens the answer) and the chat and memory settings.
type InstructConfig =
    { Finetune: FinetuneConfig
      /// The system message; None = no system turn.
      SystemPrompt: string option
      /// The user message, with `{document}` where the document goes.
      UserPrompt: string
      /// The frozen base's dtype: "float32" or "bfloat16".
      BaseDtype: string
      /// Activation recomputation: each decoder layer's activations are recomputed in the backward pass.
      Recompute: bool }

/// PEFT's module names of a Llama/Qwen2 decoder layer's Linear modules: the default targets here (every
/// projection, as instruction-tuning recipes adapt them; PEFT's own default would be q_proj and v_proj only).
let decoderTargets = [ "q_proj"; "k_proj"; "v_proj"; "o_proj"; "gate_proj"; "up_proj"; "down_proj" ]

module InstructConfig =
    let dtypes = [ "float32", torch.ScalarType.Float32; "bfloat16", torch.ScalarType.BFloat16 ]

    /// The encoder-decoder defaults with the decoder-only prompts, a float32 base and no recomputation.
    let defaults : InstructConfig =
        { Finetune = { FinetuneConfig.defaults with Name = "instruct" }
          SystemPrompt = Some Prompt.defaultSystem
          UserPrompt = Prompt.defaultUser
          BaseDtype = "float32"
          Recompute = false }

    /// Every problem with the config.
    let validate (cfg: InstructConfig) : string list =
        [ yield! FinetuneConfig.validate cfg.Finetune
          if not (cfg.UserPrompt.Contains Prompt.placeholder) then
              sprintf "UserPrompt must hold %s where the document goes, got \"%s\"" Prompt.placeholder cfg.UserPrompt
          if not (List.exists (fun (n, _) -> n = cfg.BaseDtype) dtypes) then
              sprintf "BaseDtype must be float32 or bfloat16, got \"%s\"" cfg.BaseDtype
          if cfg.Finetune.SourcePrefix.IsSome then "SourcePrefix does not apply to decoder-only models (the prompt is UserPrompt)" ]

    let dtypeOf (cfg: InstructConfig) = dtypes |> List.find (fun (n, _) -> n = cfg.BaseDtype) |> snd

/// config.json's model_type of a checkpoint folder.
let modelTypeOf (dir: string) : string =
    let path = Path.Combine(dir, "config.json")
    if not (File.Exists path) then failwithf "%s: not found (a Hugging Face checkpoint folder has config.json)" path
    match (HfConfig.ConfigReader.Open path).StringOption "model_type" with
    | Some t -> t
    | None -> failwithf "%s: missing field \"model_type\"" path

/// Whether the folder holds a decoder-only LM `HfCausalLM.load` reads (by config.json's model_type).
let isDecoderOnly (dir: string) : bool = List.contains (modelTypeOf dir) HfCausalLM.supportedModelTypes

/// `HfCausalLM.load` with the model built in `dtype` (libtorch's default dtype set around the construction, so
/// the parameters are never made in float32 first: the resident memory stays near the weights' size in that
/// dtype); the checkpoint's tensors are converted as they are copied in.
let loadAs (dtype: torch.ScalarType) (dir: string) : HfCausalLM.HfCausalLM =
    if dtype = torch.ScalarType.Float32 then HfCausalLM.load dir
    else
        let previous = torch.get_default_dtype ()
        torch.set_default_dtype dtype
        try HfCausalLM.load dir
        finally torch.set_default_dtype previous

// ---------------------------------------------------------------- LoRA on a decoder-only LM

/// Checks that every target names at least one Linear module of `root` (equal to its name or ending with
/// "." + it) and fails naming the targets that match nothing and the model's Linear module names.
let checkTargets (targets: string list) (root: torch.nn.Module) : unit =
    let linears = [ for struct (name, m) in root.named_modules () do if (m :? Modules.Linear) then name ]
    let unmatched = targets |> List.filter (fun t -> not (linears |> List.exists (fun n -> n = t || n.EndsWith("." + t))))
    if not unmatched.IsEmpty then
        let leaves = linears |> List.map (fun n -> n.Substring(n.LastIndexOf '.' + 1)) |> List.distinct
        invalidArg "target_modules" (sprintf "LoRA target_modules %s match no Linear module of the model; its Linear modules are named %s"
                                         (String.Join(", ", unmatched)) (String.Join(", ", leaves)))

/// Runs the model once on a one-token batch and fails when some adapters' hooks did not run.
let checkAdaptersRun (lm: HfCausalLM.HfCausalLM) (adapters: LoraAdapter list) : unit =
    if not adapters.IsEmpty then
        for a in adapters do a.Calls.Value <- 0
        do
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let device = adapters.Head.Linear.weight.device
            let ids = torch.zeros([| 1L; 1L |], dtype = torch.ScalarType.Int64, device = device)
            lm.Model.Forward(ids, null, null, Unchecked.defaultof<DecoderCache>) |> ignore
        match adapters |> List.filter (fun a -> a.Calls.Value = 0) with
        | [] -> ()
        | silent ->
            invalidOp (sprintf "LoRA cannot attach to %d of %d targeted modules of %s (%s): the model does not call them through `call`"
                           silent.Length adapters.Length lm.ModelType (silent |> List.truncate 4 |> List.map (fun a -> a.Module) |> String.concat ", "))

/// Adds float32 LoRA adapters to the targeted Linear modules (every target must match; the base is frozen).
let attachLora (s: LoraSettings) (targets: string list) (lm: HfCausalLM.HfCausalLM) : LoraAdapter list =
    checkTargets targets lm.Module
    let adapters = applyLoraIn (Some torch.ScalarType.Float32) s targets lm.Module
    checkAdaptersRun lm adapters
    adapters

/// The base model of `baseDir` with the adapters of a PEFT adapter folder on top (evaluation mode), as PEFT's
/// `PeftModel.from_pretrained(base, adapterDir)` builds it.
let loadWithAdapter (baseDir: string) (adapterDir: string) : HfCausalLM.HfCausalLM * LoraAdapter list =
    let s = readAdapterConfig adapterDir
    let file = Path.Combine(adapterDir, adapterWeightsName)
    if not (File.Exists file) then failwithf "%s: not found" file
    let lm = HfCausalLM.load baseDir
    try
        let adapters = attachLora s s.target_modules lm
        loadAdapterTensors file adapters
        lm.Module.eval ()
        lm, adapters
    with _ ->
        (lm :> IDisposable).Dispose()
        reraise ()

// ---------------------------------------------------------------- activation recomputation

/// One decoder layer as a custom autograd function: the forward runs without keeping activations (only the
/// layer's input and the RNG state are saved); the backward re-runs the layer with the same RNG state (same
/// dropout masks on CPU) and backpropagates through it, accumulating the parameters' gradients as it goes, as
/// PyTorch's reentrant `torch.utils.checkpoint` does. vars: the input x [N; L; D] and the layer as a function.
type LayerRecompute() =
    inherit torch.autograd.SingleTensorFunction<LayerRecompute>()
    override _.Name = "LayerRecompute"
    override _.forward(ctx, vars) =
        let x = vars[0] :?> Tensor
        let run = vars[1] :?> (Tensor -> Tensor)
        ctx.save_for_backward(Collections.Generic.List<Tensor>([ x ]))
        ctx.save_data("run", box run)
        use state = torch.get_rng_state () // uint8; the context keeps data, not tensors, besides the saved input
        ctx.save_data("rng", box (state.data<byte>().ToArray()))
        run x
    override _.backward(ctx, gradOutput) =
        let x = ctx.get_saved_variables().[0]
        let run = ctx.get_data "run" :?> (Tensor -> Tensor)
        use rng = torch.tensor(ctx.get_data "rng" :?> byte[])
        use current = torch.get_rng_state ()
        torch.set_rng_state rng
        let gradInput =
            try
                use _ = torch.enable_grad ()
                use input = x.detach().requires_grad_(true)
                use y = run input
                y.backward(Collections.Generic.List<Tensor>([ gradOutput ]), false, false, null)
                input.grad.detach ()
            finally
                torch.set_rng_state current
        // one entry per forward argument: the input's gradient, none for the layer function
        Collections.Generic.List<Tensor>([ gradInput; null ])

/// transformers' loss of a dense decoder-only LM (cross-entropy of the shifted labels, -100 ignored) with each
/// decoder layer recomputed in the backward pass (`LayerRecompute`). The MoE families are refused: their router
/// losses would need the recomputed routing. ids, labels [N; L] int64; mask [N; L] bool.
let recomputedLoss (m: Llama.DecoderOnlyLM) (ids: Tensor) (mask: Tensor) (labels: Tensor) : Tensor =
    match m.Layers |> List.tryFind (fun l -> l.FeedForward.Name <> "mlp") with
    | Some l -> invalidOp (sprintf "activation recomputation covers dense decoder layers only; %s has a %s sublayer (an MoE)" m.Config.Architecture l.FeedForward.Name)
    | None -> ()
    let cfg = m.Config
    let t = ids.shape[1]
    if t > int64 cfg.MaxPositions then
        invalidArg "ids" (sprintf "the sequence has %d positions, more than the model's %d (max_position_embeddings)" t cfg.MaxPositions)
    use scope = torch.NewDisposeScope()
    let positions = CausalLM.positionIds mask // [N; L]
    use invFreq = Llama.inverseFrequencies cfg
    // The layers' backward re-runs them after this returns: what they read lives in the caller's scope.
    let cos, sin = Llama.rotaryCosSin invFreq positions // [N; L; Dh]
    let attnMask = Llama.decoderMask t mask // [N; 1; L; L]
    for tensor in [ cos; sin; attnMask ] do tensor.MoveToOuterDisposeScope() |> ignore
    let embedded = m.Model.EmbedTokens.forward ids // [N; L; D]
    // A frozen embedding gives an input without a graph; the layers' function must still run its backward.
    let mutable x = if embedded.requires_grad then embedded else embedded.detach().requires_grad_(true)
    for layer in m.Layers do
        let run (h: Tensor) = fst (layer.Forward(h, cos, sin, attnMask, null))
        x <- LayerRecompute.apply(x, box run)
    let hidden = m.Model.Norm.forward x
    let head = m.named_children () |> Seq.tryPick (fun struct (n, c) -> if n = "lm_head" then Some(c :?> Modules.Linear) else None)
    let logits =
        (match head with
         | Some h -> linearLayerCast h hidden
         | None -> linearCast (m.Model.EmbedTokens.weight :> Tensor) hidden).to_type torch.ScalarType.Float32 // [N; L; V]
    let v = int64 cfg.VocabSize
    let shifted = logits.narrow(1L, 0L, t - 1L).reshape(-1L, v)
    let targets = labels.narrow(1L, 1L, t - 1L).reshape(-1L)
    torch.nn.functional.cross_entropy(shifted, targets, ignore_index = Llama.ignoreIndex).MoveToOuterDisposeScope()

// ---------------------------------------------------------------- data

/// One example: the whole chat's ids and how many of them are the prompt (system, user, the generation prompt).
type Encoded = { Ids: int[]; PromptLength: int }

/// The chat template and tokenizer of a checkpoint folder; a folder without tokenizer files or without a chat
/// template is refused, naming what is missing.
let openChat (dir: string) : HfTokenizer.HfTokenizer * ChatTemplate.ChatTemplate =
    let tokenizer =
        try HfTokenizer.fromFolder dir
        with e ->
            failwithf "%s has no usable tokenizer (%s): decoder-only fine-tuning renders each example with the checkpoint's tokenizer and chat template, so a checkpoint without tokenizer files (as llama-tiny-hf) cannot be fine-tuned on text; add its tokenizer files. (%s)"
                dir HfTokenizer.lookedFor e.Message
    try tokenizer, ChatTemplate.fromFolder dir
    with e ->
        (tokenizer :> IDisposable).Dispose()
        failwithf "%s has no usable chat template (tokenizer_config.json's chat_template): %s" dir e.Message

/// An example's ids: the prompt as `apply_chat_template(..., add_generation_prompt=True)` gives it (the document
/// cut to `maxDocumentTokens` tokens), then the rest of the chat with the summary as the assistant's message
/// (cut to `maxAnswerTokens`). The template must render the prompt as a prefix of the whole chat.
let encodeExample (tokenizer: HfTokenizer.HfTokenizer) (template: ChatTemplate.ChatTemplate) (cfg: InstructConfig) (e: Example) : Encoded =
    let docIds = tokenizer.Encode(e.Document, false)
    let document =
        if docIds.Length <= cfg.Finetune.MaxSourceTokens then e.Document
        else tokenizer.Decode(docIds[.. cfg.Finetune.MaxSourceTokens - 1], false)
    let messages = Prompt.messages cfg.SystemPrompt cfg.UserPrompt document
    let prompt = ChatTemplate.applyChatTemplate tokenizer template messages ChatTemplate.defaults
    let whole =
        ChatTemplate.applyChatTemplate tokenizer template (messages @ [ "assistant", e.Summary ])
            { ChatTemplate.defaults with AddGenerationPrompt = false }
    if whole.Length <= prompt.Length || whole[.. prompt.Length - 1] <> prompt then
        invalidOp (sprintf "%s: the chat template does not render the generation prompt as a prefix of the chat with the answer, so the answer's tokens cannot be told apart"
                       template.Source)
    let answer = whole[prompt.Length ..]
    { Ids = Array.append prompt (Array.truncate cfg.Finetune.MaxTargetTokens answer); PromptLength = prompt.Length }

/// A batch: ids [N; L] int64 right-padded with `pad`, attention mask [N; L] bool, labels [N; L] int64 equal to
/// the ids on the answer's positions and -100 on the prompt's and the padding.
let collate (pad: int) (rows: Encoded[]) : Tensor * Tensor * Tensor =
    let n = rows.Length
    let l = rows |> Array.map (fun r -> r.Ids.Length) |> Array.max
    let ids = Array.create (n * l) (int64 pad)
    let mask = Array.create (n * l) false
    let labels = Array.create (n * l) Llama.ignoreIndex
    rows |> Array.iteri (fun i r ->
        r.Ids |> Array.iteri (fun j id ->
            ids[i * l + j] <- int64 id
            mask[i * l + j] <- true
            if j >= r.PromptLength then labels[i * l + j] <- int64 id))
    let shape = [| int64 n; int64 l |]
    torch.tensor(ids, ReadOnlySpan<int64> shape), torch.tensor(mask, ReadOnlySpan<int64> shape), torch.tensor(labels, ReadOnlySpan<int64> shape)

/// The answer tokens the loss counts (the first position is never a target).
let private answerTokens (r: Encoded) = int64 (r.Ids.Length - max r.PromptLength 1)

/// The splits, encoded.
type Prepared = { Train: Encoded[]; Valid: Encoded[]; Test: Encoded[]; TestExamples: Example[]; Notes: string list }

/// Reads the splits (`Finetune.readSplits`) and encodes them.
let prepare (cfg: InstructConfig) (tokenizer: HfTokenizer.HfTokenizer) (template: ChatTemplate.ChatTemplate) : Prepared =
    let train, valid, test, notes = readSplits cfg.Finetune
    let encode = Array.map (encodeExample tokenizer template cfg)
    { Train = encode train; Valid = encode valid; Test = encode test; TestExamples = test; Notes = notes }

// ---------------------------------------------------------------- training

/// The padding id: config.json's pad_token_id, else the tokenizer's, else 0 (padding is masked and unlabelled).
let padId (lm: HfCausalLM.HfCausalLM) (tokenizer: HfTokenizer.HfTokenizer option) : int =
    match lm.PadTokenId, tokenizer |> Option.bind (fun t -> t.PadId) with
    | Some p, _ | None, Some p -> p
    | None, None -> 0

/// The training loss of a batch: the family's own loss, or with `recompute` the recomputed one (same value).
let batchLoss (lm: HfCausalLM.HfCausalLM) (recompute: bool) (ids: Tensor) (mask: Tensor) (labels: Tensor) : Tensor * LayerReport list =
    if recompute && lm.Module.training then
        match lm.Decoder with
        | Some decoder -> recomputedLoss decoder ids mask labels, []
        | None -> invalidOp (sprintf "activation recomputation is built for the Llama-layout decoders (llama, qwen2), not model_type %s" lm.ModelType)
    else lm.Loss ids mask labels

/// The fine-tuning task (as `Finetune.task`: shuffled by (seed, epoch), validation in order).
let task (cfg: InstructConfig) (lm: HfCausalLM.HfCausalLM) (pad: int) (prepared: Prepared) (device: torch.Device) : TrainTask<int[]> =
    let batch = cfg.Finetune.Train.BatchSize
    let lossOf (rows: Encoded[]) (indices: int[]) : LossParts =
        let ids, mask, labels = collate pad (indices |> Array.map (fun i -> rows[i]))
        let on (x: Tensor) = if x.device = device then x else x.``to`` device
        let loss, reports = batchLoss lm cfg.Recompute (on ids) (on mask) (on labels)
        { TaskLoss = loss; Moe = reports; Tokens = indices |> Array.sumBy (fun i -> answerTokens rows[i]) }
    { Model = lm.Module
      TrainBatches =
        fun seed epoch ->
            let rng = Random(seed * 7919 + epoch)
            let order = Array.init prepared.Train.Length id
            rng.Shuffle order
            order |> Array.chunkBySize batch |> Seq.ofArray
      ValidBatches = fun () -> Array.init prepared.Valid.Length id |> Array.chunkBySize batch |> Seq.ofArray
      Loss = fun phase indices -> lossOf (if phase = Training then prepared.Train else prepared.Valid) indices
      Config = [ "instruct", box cfg ]
      Tokenizer = "" }

/// The answer-token-weighted mean loss over `rows` in evaluation mode.
let meanLoss (lm: HfCausalLM.HfCausalLM) (pad: int) (rows: Encoded[]) (batchSize: int) (device: torch.Device) : float =
    let wasTraining = lm.Module.training
    lm.Module.eval ()
    try
        use _ = torch.no_grad ()
        let mutable sum, tokens = 0.0, 0L
        for chunk in Array.chunkBySize batchSize rows do
            use _ = torch.NewDisposeScope()
            let ids, mask, labels = collate pad chunk
            let loss, _ = lm.Loss (ids.``to`` device) (mask.``to`` device) (labels.``to`` device)
            let n = chunk |> Array.sumBy answerTokens
            sum <- sum + scalar loss * float n
            tokens <- tokens + n
        sum / float (max tokens 1L)
    finally
        if wasTraining then lm.Module.train ()

// ---------------------------------------------------------------- Hugging Face output

/// Writes the model with its adapters merged (W + scale B A, in the base's dtype) as a Hugging Face folder:
/// the source's config.json byte for byte, model.safetensors, and the source's tokenizer and generation files.
/// `HfCausalLM.load` reads it back.
let saveMerged (overwrite: bool) (dir: string) (lm: HfCausalLM.HfCausalLM) (adapters: LoraAdapter list) : unit =
    let configPath = Path.Combine(lm.Folder, "config.json")
    do
        use _ = torch.NewDisposeScope()
        let original = lm.StateDict ()
        let dtypes = original |> List.map (fun (n, t) -> n, t.dtype) |> Map.ofList
        let state =
            mergedStateDict adapters original
            |> List.map (fun (n, t) -> n, t.detach().to_type(dtypes[n]).cpu ())
        HfCheckpoint.saveFolderWith overwrite dir (JsonNode.Parse(File.ReadAllText configPath)) state None
    File.Copy(configPath, Path.Combine(dir, "config.json"), true)
    HfCheckpoint.copyTokenizerFiles lm.Folder dir |> ignore

/// What a run produced.
type InstructResult =
    { RunDir: string
      Train: TrainResult
      ValidLossBefore: float
      ValidLossAfter: float
      /// `RunDir/hf`: merged weights, or a PEFT adapter folder with AdapterOnly.
      HfFolder: string
      Trainable: int64
      Total: int64
      Notes: string list }

/// Fine-tunes a decoder-only checkpoint (as `Finetune.runWith` does an encoder-decoder): LoRA (or full
/// fine-tuning) with `Train.Loop` (early stopping on validation loss with Train.Patience and EvalEvery), then
/// `hf/` from the best checkpoint, merged or (AdapterOnly) as a PEFT adapter folder with the tokenizer files.
let runWith (opts: RunOptions) (resume: bool) (cfg: InstructConfig) : InstructResult =
    Config.orFail "instruction-tuning config" (InstructConfig.validate cfg) cfg |> ignore
    let f = cfg.Finetune
    let say (text: string) = if opts.Progress <> Silent then (if isNull opts.Output then Console.Out else opts.Output).WriteLine text
    let resume = resume || opts.ResumeFrom.IsSome
    let tokenizer, template = openChat f.Model
    use tokenizer = tokenizer
    let runDir = Path.Combine(f.RunsDir, f.Name)
    use _lock = RunFolder.acquire (sprintf "fine-tuning run %s" f.Name) runDir
    if not resume then RunFolder.startFresh opts.Overwrite runDir
    let opts = { opts with Overwrite = false }
    use lm = loadAs (InstructConfig.dtypeOf cfg) f.Model
    HfTokenizer.checkAgainst lm.Model.VocabSize tokenizer
    Native.seedAll f.Train.Seed
    let targets = f.Lora |> Option.map (fun l -> if l.target_modules.IsEmpty then decoderTargets else l.target_modules)
    let adapters =
        match f.Lora, targets with
        | Some l, Some ts -> attachLora l ts lm
        | _ -> []
    let prepared = prepare cfg tokenizer template
    say (sprintf "data: %d train, %d validation, %d test examples; prompts from %s" prepared.Train.Length prepared.Valid.Length
             prepared.Test.Length template.Source)
    for n in prepared.Notes do say ("  " + n)
    let total = lm.Module.parameters () |> Seq.sumBy (fun p -> p.NumberOfElements)
    let trainable = lm.Module.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.sumBy (fun p -> p.NumberOfElements)
    say (sprintf "model: %s (%s, base %s%s), %d parameters, %d trainable (%s)" f.Model lm.ModelType cfg.BaseDtype
             (if cfg.Recompute then ", activations recomputed" else "") total trainable
             (match f.Lora, targets with
              | Some l, Some ts -> sprintf "LoRA r %d, lora_alpha %g, lora_dropout %g on %d modules %s" l.r l.lora_alpha l.lora_dropout adapters.Length (String.Join(",", ts))
              | _ -> "full fine-tuning"))
    RunFiles.writeParameters runDir { Total = total; Active = total; Trainable = trainable }
    let device = Native.resolveDevice f.Train.Device
    lm.Module.``to`` device |> ignore
    let pad = padId lm (Some tokenizer)
    let before = meanLoss lm pad prepared.Valid f.Train.BatchSize device
    say (sprintf "validation loss before fine-tuning: %.4f" before)
    let t = task cfg lm pad prepared device
    let trained = if resume then Train.Loop.resumeWith opts f.Train t runDir else Train.Loop.runWith opts f.Train t runDir
    let ckpt = defaultArg trained.BestCheckpoint trained.LastCheckpoint
    Checkpoint.loadModel ckpt lm.Module
    lm.Module.eval ()
    let after = meanLoss lm pad prepared.Valid f.Train.BatchSize device
    say (sprintf "validation loss after fine-tuning: %.4f (%s)" after (Path.GetFileName ckpt))
    let hf = Path.Combine(runDir, hfFolderName)
    if Directory.Exists hf then Directory.Delete(hf, true)
    match f.Lora, targets with
    | Some l, Some ts when f.AdapterOnly ->
        saveAdapterAs "CAUSAL_LM" hf (Path.GetFullPath f.Model) l ts adapters
        HfCheckpoint.copyTokenizerFiles f.Model hf |> ignore
    | _ -> saveMerged false hf lm adapters
    say (sprintf "wrote %s (%s)" hf (if f.AdapterOnly then "PEFT adapter folder" else "Hugging Face checkpoint"))
    { RunDir = runDir; Train = trained; ValidLossBefore = before; ValidLossAfter = after; HfFolder = hf
      Trainable = trainable; Total = total; Notes = prepared.Notes }

// ---------------------------------------------------------------- test-split scores (scripts/instruct_tune_qwen.fsx)

/// Greedy summaries of the test split from the run's `hf/` (merged weights, or the adapter folder over the base
/// `baseDir`): each prompt is the chat up to the generation prompt, left-padded, decoded with the folder's
/// generation config and `overrides` (e.g. "max_new_tokens=16").
let summarizeTest (hfDir: string) (baseDir: string) (cfg: InstructConfig) (examples: Example[]) (batchSize: int) (overrides: string list) : string[] =
    let tokenizer, template = openChat baseDir
    use tokenizer = tokenizer
    let lm =
        if File.Exists(Path.Combine(hfDir, adapterConfigName)) then fst (loadWithAdapter baseDir hfDir)
        else HfCausalLM.load hfDir
    use lm = lm
    lm.Module.eval ()
    let gen = Generate.GenerationConfig.load (if File.Exists(Path.Combine(hfDir, "generation_config.json")) then hfDir else baseDir)
    let gen = Generate.GenerationConfig.setAll overrides { gen with DoSample = false; NumBeams = 1 }
    let pad = padId lm (Some tokenizer)
    [| for chunk in Array.chunkBySize batchSize examples do
        use _ = torch.NewDisposeScope()
        let prompts = chunk |> Array.map (fun e -> let x = encodeExample tokenizer template cfg e in x.Ids[.. x.PromptLength - 1])
        let width = prompts |> Array.map Array.length |> Array.max
        let ids = Array.create (prompts.Length * width) (int64 pad)
        let mask = Array.create (prompts.Length * width) false
        prompts |> Array.iteri (fun i p ->
            let offset = width - p.Length // left padding
            p |> Array.iteri (fun j id -> ids[i * width + offset + j] <- int64 id; mask[i * width + offset + j] <- true))
        let shape = [| int64 prompts.Length; int64 width |]
        use idsT = torch.tensor(ids, ReadOnlySpan<int64> shape)
        use maskT = torch.tensor(mask, ReadOnlySpan<int64> shape)
        use _ = torch.no_grad ()
        for r in Generate.runCausal gen lm.Model idsT maskT do
            yield tokenizer.Decode(r.Sequences[0], true).Trim() |]

/// The baseline runs (folders with `Baseline.recordName`) under `runsDir`, as table rows of their model scores.
let baselineRunRows (runsDir: string) : Baseline.ScoreRow list =
    if not (Directory.Exists runsDir) then []
    else
        [ for dir in Directory.GetDirectories runsDir |> Array.sort do
              let scores = Path.Combine(dir, RunLog.FileNames.testScores)
              if File.Exists scores && File.Exists(Path.Combine(dir, Baseline.recordName)) then
                  match RunLog.readTestScores scores |> Array.tryFind (fun s -> s.System = "model") with
                  | Some s ->
                      let f1 (name: string) = s.Rouge.TryFind name |> Option.map (fun r -> r.F1) |> Option.defaultValue nan
                      yield { Baseline.ScoreRow.System = "baseline: " + DirectoryInfo(dir).Name; N = s.N; Rouge1 = f1 "rouge1"
                              Rouge2 = f1 "rouge2"; RougeL = f1 "rougeL"; Bleu = s.Scalars.TryFind "bleu" }
                  | None -> () ]

/// What `scripts/instruct_tune_qwen.fsx` runs.
type ScriptOptions =
    { Model: string
      Data: string
      /// LoRA rank (lora_alpha = 2 r).
      Lora: int
      Steps: int
      RunsDir: string
      BaseDtype: string
      Recompute: bool
      /// The smoke settings: qwen2-tiny, a few shared XSum documents, a few steps, short outputs.
      Smoke: bool }

module ScriptOptions =
    /// The tiny checkpoint with a chat template the smoke run tunes (in the shared folder's models/).
    let smokeModel = "qwen2-tiny"

    /// `--smoke` | `--model DIR --data PATH`, with `--lora R` (default 8), `--steps N`, `--runs-dir D`,
    /// `--base-dtype float32|bfloat16`, `--gradient-checkpointing`; `shared` holds models/ and data/.
    let parse (shared: string) (args: string[]) : Result<ScriptOptions, string> =
        let rec go (o: ScriptOptions) (rest: string list) =
            match rest with
            | [] -> Ok o
            | "--smoke" :: r ->
                go { o with Smoke = true; Model = Path.Combine(shared, "models", smokeModel)
                            Data = Path.Combine(shared, "data", Finetune.ScriptOptions.smokeData); Steps = 4; Lora = 4 } r
            | "--model" :: v :: r -> go { o with Model = v } r
            | "--data" :: v :: r -> go { o with Data = v } r
            | "--runs-dir" :: v :: r -> go { o with RunsDir = v } r
            | "--base-dtype" :: v :: r -> go { o with BaseDtype = v } r
            | "--gradient-checkpointing" :: r -> go { o with Recompute = true } r
            | ("--lora" | "--steps" as flag) :: v :: r ->
                match Int32.TryParse v with
                | true, n when n >= 1 -> go (if flag = "--lora" then { o with Lora = n } else { o with Steps = n }) r
                | _ -> Error(sprintf "%s expects a whole number >= 1, got '%s'" flag v)
            | other :: _ ->
                Error(sprintf "unknown argument '%s' (expected --smoke | --model DIR --data PATH [--lora R] [--steps N] [--runs-dir D] [--base-dtype float32|bfloat16] [--gradient-checkpointing])" other)
        let start = { Model = ""; Data = ""; Lora = 8; Steps = FinetuneConfig.defaults.Train.Steps; RunsDir = "runs"; BaseDtype = "float32"; Recompute = false; Smoke = false }
        match go start (List.ofArray args) with
        | Ok o when o.Model = "" || o.Data = "" -> Error "expected --smoke, or --model DIR and --data PATH"
        | r -> r

/// The script's run: LoRA-tunes the checkpoint, decodes the test split greedily with `hf/`, and returns the run,
/// the scores and the table (the tuned model, lead-1 on the same documents, and the from-scratch and baseline
/// runs found in RunsDir, each on its own test set) that it also prints.
let runScript (opts: RunOptions) (o: ScriptOptions) : InstructResult * Summarizer.TestScores * string =
    let out = if isNull opts.Output then Console.Out else opts.Output
    let d = InstructConfig.defaults
    let name = if o.Smoke then "instruct-smoke" else sprintf "instruct-%s" (Path.GetFileName(Path.GetFullPath(o.Model).TrimEnd('/')))
    let cfg =
        { d with
            BaseDtype = o.BaseDtype
            Recompute = o.Recompute
            Finetune =
                { d.Finetune with
                    Name = name
                    RunsDir = o.RunsDir
                    Model = o.Model
                    Data = o.Data
                    Lora = Some { LoraSettings.defaults with r = o.Lora; lora_alpha = float (2 * o.Lora); target_modules = decoderTargets }
                    MaxTrain = (if o.Smoke then Some 8 else None)
                    MaxValid = (if o.Smoke then Some 2 else None)
                    MaxTest = (if o.Smoke then Some 2 else None)
                    MaxSourceTokens = (if o.Smoke then 24 else d.Finetune.MaxSourceTokens)
                    MaxTargetTokens = (if o.Smoke then 16 else d.Finetune.MaxTargetTokens)
                    Train =
                        { d.Finetune.Train with
                            Steps = o.Steps
                            BatchSize = (if o.Smoke then 2 else d.Finetune.Train.BatchSize)
                            LearningRate = (if o.Smoke then 3e-2 else 2e-4)
                            WarmupSteps = min d.Finetune.Train.WarmupSteps (o.Steps / 10)
                            EvalEvery = (if o.Smoke then 0 else d.Finetune.Train.EvalEvery)
                            Patience = (if o.Smoke then 0 else 3)
                            CheckpointEvery = (if o.Smoke then 0 else d.Finetune.Train.CheckpointEvery) } } }
    let result = runWith { opts with Overwrite = true } false cfg
    let _, _, test, _ = readSplits cfg.Finetune
    let predictions = summarizeTest result.HfFolder o.Model cfg test cfg.Finetune.Train.BatchSize [ (if o.Smoke then "max_new_tokens=8" else "max_new_tokens=64") ]
    let scores = scoreTest predictions test
    let label = sprintf "%s + LoRA r %d" (DirectoryInfo(Path.GetFullPath o.Model).Name) o.Lora
    let table = Baseline.scoreTable (Baseline.baselineRows label scores @ baselineRunRows o.RunsDir @ Baseline.fromScratchRows o.RunsDir)
    out.WriteLine(sprintf "validation loss: %.4f before, %.4f after instruction tuning (%d steps)" result.ValidLossBefore result.ValidLossAfter result.Train.Steps)
    out.WriteLine table
    result, scores, table
