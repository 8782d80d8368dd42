/// Pretrained decoder-only LMs (GPT-2, Llama, Qwen2, Mixtral, Qwen2-MoE, OLMoE) for `moe generate --model` and
/// `moe summarize --model`: a checkpoint folder opened with its tokenizer and generation config, prompts
/// left-padded in batches (`Generate.runCausal`), and zero-shot summarization where each document is put in a
/// chat-template conversation (instruct models) or a plain prompt, scored into a run folder as the
/// encoder-decoder baseline is (`Baseline.writeScored`).
/// Axes: B batch (prompts decoded together), S prompt positions.
module Moe.CausalBaseline

open System
open System.Diagnostics
open System.IO
open System.Text.Json.Nodes
open TorchSharp
open Moe.Config
open Moe.Data
open Moe.Generate
open Moe.Baseline
open Moe.Train

/// Runs `f`, turning the plain exceptions (`failwith`) that checkpoint, config and tokenizer readers raise for
/// a bad folder into ArgumentException, which the CLI reports as bad input (exit code 2) with the same message.
let asBadInput (f: unit -> 'a) : 'a =
    try f ()
    with e when e.GetType() = typeof<Exception> -> raise (ArgumentException(e.Message, e))

/// `HfCausalLM.load` with its refusals as bad input (`asBadInput`).
let loadCausal (dir: string) : HfCausalLM.HfCausalLM = asBadInput (fun () -> HfCausalLM.load dir)

// ---------------------------------------------------------------- which kind of checkpoint

/// What a checkpoint folder's config.json describes.
type CheckpointKind =
    | EncoderDecoder
    | DecoderOnly

/// The kind of checkpoint in `dir` from config.json's model_type; an unknown or missing one is refused
/// naming the file and every model_type either kind loads.
let kindOf (dir: string) : CheckpointKind =
    asBadInput <| fun () ->
    let path = Path.Combine(dir, "config.json")
    if not (File.Exists path) then failwithf "%s: no config.json (expected a Hugging Face checkpoint folder)" dir
    let known = String.Join(", ", HfSeq2Seq.supportedModelTypes @ HfCausalLM.supportedModelTypes)
    match (HfConfig.ConfigReader.Open path).StringOption "model_type" with
    | Some t when List.contains t HfCausalLM.supportedModelTypes -> DecoderOnly
    | Some t when List.contains t HfSeq2Seq.supportedModelTypes -> EncoderDecoder
    | Some t -> failwithf "%s: model_type \"%s\" is neither an encoder-decoder nor a decoder-only LM this toolkit loads (supported: %s)" path t known
    | None -> failwithf "%s: missing field \"model_type\" (expected one of %s)" path known

// ---------------------------------------------------------------- a decoder-only folder for generation

/// A decoder-only checkpoint folder opened for generation.
type CausalPretrained =
    { Lm: HfCausalLM.HfCausalLM
      /// The tokenizer (the folder's, or the one named); None without tokenizer files (then only ids go in).
      Tokenizer: HfTokenizer.HfTokenizer option
      /// The folder's generation config with the overrides applied.
      Generation: GenerationConfig }
    interface IDisposable with
        member p.Dispose() =
            (p.Lm :> IDisposable).Dispose()
            p.Tokenizer |> Option.iter (fun t -> (t :> IDisposable).Dispose())

/// The tokenizer of `dir`, or of `tokenizerDir` when given, checked against a model of `vocabSize` ids; None
/// when `dir` has no tokenizer files and none is named. A named folder without tokenizer files is refused.
let tokenizerFor (dir: string) (tokenizerDir: string option) (vocabSize: int) : HfTokenizer.HfTokenizer option =
    asBadInput <| fun () ->
    let checkedOf (folder: string) =
        let t = HfTokenizer.fromFolder folder
        try HfTokenizer.checkAgainst vocabSize t; Some t
        with _ -> (t :> IDisposable).Dispose(); reraise ()
    match tokenizerDir with
    | Some folder when not (hasTokenizer folder) ->
        failwithf "tokenizer folder %s has no tokenizer files (expected %s)" folder HfTokenizer.lookedFor
    | Some folder -> checkedOf folder
    | None when hasTokenizer dir -> checkedOf dir
    | None -> None

/// Opens the decoder-only checkpoint in `dir`: the model (`HfCausalLM.load`), its tokenizer (or
/// `tokenizerDir`'s) checked against the vocabulary, its generation config (`GenerationConfig.load`) with the
/// `Generate.X=...` assignments applied.
let openCausal (dir: string) (tokenizerDir: string option) (assignments: string list) : CausalPretrained =
    let lm = loadCausal dir
    try
        let tokenizer = tokenizerFor dir tokenizerDir lm.Model.VocabSize
        let gen = GenerationConfig.load dir |> GenerationConfig.setAll assignments
        orFail "generation config" (GenerationConfig.validate lm.Model.VocabSize { gen with DecoderStartTokenId = Some 0 }) gen |> ignore
        { Lm = lm; Tokenizer = tokenizer; Generation = gen }
    with _ ->
        (lm :> IDisposable).Dispose()
        reraise ()

/// A text's prompt ids as the tokenizer gives them with its special tokens (Llama-3 adds BOS; GPT-2 and Qwen2
/// add none), as `tokenizer(text)` does. Refused without a tokenizer.
let promptIds (p: CausalPretrained) (text: string) : int[] =
    match p.Tokenizer with
    | Some t -> t.Encode(text, true)
    | None ->
        invalidArg "text" (sprintf "%s has no tokenizer files (%s): give token ids (--input-ids) instead of text, or name a tokenizer folder"
                       p.Lm.Folder HfTokenizer.lookedFor)

/// The id left padding uses (masked out, so any id serves): pad_token_id, else the first EOS id, else 0.
let private padId (p: CausalPretrained) : int64 =
    match p.Generation.PadTokenId, p.Lm.PadTokenId, p.Generation.EosTokenId with
    | Some id, _, _ | None, Some id, _ -> int64 id
    | None, None, eos :: _ -> int64 eos
    | _ -> 0L

/// Checks prompts: non-empty, ids inside the vocabulary, and room for the new tokens within the model's positions.
let checkPrompts (p: CausalPretrained) (cfg: GenerationConfig) (prompts: int[][]) : unit =
    let vocab = p.Lm.Model.VocabSize
    let limit = p.Lm.MaxPositions
    let field = if p.Lm.ModelType = "gpt2" then "n_positions" else "max_position_embeddings"
    prompts |> Array.iteri (fun i row ->
        if row.Length = 0 then invalidArg "sources" (sprintf "input %d is empty" (i + 1))
        match row |> Array.tryFind (fun id -> id < 0 || id >= vocab) with
        | Some id -> invalidArg "sources" (sprintf "input %d: id %d is outside the vocabulary 0 .. %d" (i + 1) id (vocab - 1))
        | None -> ()
        let total = match cfg.MaxNewTokens with Some m -> row.Length + m | None -> max row.Length cfg.MaxLength
        if row.Length > limit then
            invalidArg "sources" (sprintf "input %d has %d tokens, more than the model's %d positions (%s in %s)" (i + 1) row.Length limit field p.Lm.Folder)
        elif total > limit then
            invalidArg "sources" (sprintf "input %d: %d prompt tokens plus the new ones need %d positions, more than the model's %d (%s); lower Generate.MaxNewTokens"
                                      (i + 1) row.Length total limit field))

/// Generates for every prompt with `cfg`, `batchSize` at a time: prompts sorted by length (longest first),
/// left-padded under an attention mask as transformers' decoder-only generation expects. `progress` is told
/// after each batch. Results (the new tokens only, and their text with special tokens skipped) in the
/// prompts' order.
let generatePrompts (cfg: GenerationConfig) (batchSize: int) (progress: Progress -> unit) (p: CausalPretrained) (prompts: int[][]) : Generated[] =
    if batchSize < 1 then invalidArg "batchSize" (sprintf "expected at least 1, got %d" batchSize)
    checkPrompts p cfg prompts
    let order = prompts |> Array.mapi (fun i row -> i, row.Length) |> Array.sortBy (fun (i, n) -> -n, i) |> Array.map fst
    let results = Array.zeroCreate<Generated> prompts.Length
    let clock = Stopwatch.StartNew()
    let mutable generated = 0
    let mutable finished = 0
    let pad = padId p
    for batch in order |> Array.chunkBySize batchSize do
        let rows = batch |> Array.map (fun i -> prompts[i])
        let width = rows |> Array.map Array.length |> Array.max
        let flatIds = Array.create (rows.Length * width) pad
        let flatMask = Array.zeroCreate<bool> (rows.Length * width)
        rows |> Array.iteri (fun r row ->
            let offset = width - row.Length
            row |> Array.iteri (fun j id -> flatIds[r * width + offset + j] <- int64 id; flatMask[r * width + offset + j] <- true))
        let shape = [| int64 rows.Length; int64 width |]
        use input = torch.tensor(flatIds, ReadOnlySpan<int64> shape)   // [B; S]
        use mask = torch.tensor(flatMask, ReadOnlySpan<int64> shape)   // [B; S]
        let outs = runCausal cfg p.Lm.Model input mask
        for k, i in Array.indexed batch do
            let best = outs[k].Sequences[0]
            generated <- generated + best.Length
            results[i] <- { Ids = best; Text = p.Tokenizer |> Option.map (fun t -> t.Decode(best, true)) }
        finished <- finished + batch.Length
        progress { Done = finished; Total = prompts.Length; GeneratedTokens = generated; Seconds = clock.Elapsed.TotalSeconds }
    results

/// `generatePrompts` over documents (tokenized with `promptIds`) or id arrays used as given.
let generateSources (cfg: GenerationConfig) (batchSize: int) (p: CausalPretrained) (sources: Sources) : Generated[] =
    let prompts =
        match sources with
        | Documents docs -> docs |> Array.map (promptIds p)
        | SourceIds rows -> rows
    generatePrompts cfg batchSize ignore p prompts

/// What `moe generate --model DIR` runs: the checkpoint in `dir` opened by kind (`kindOf`: encoder-decoder
/// through `Baseline.openFolder`, decoder-only through `openCausal`), its generation config with the
/// `Generate.X=...` assignments (greedy search when `greedy`), every source generated `batchSize` at a time.
let generateFolder (dir: string) (assignments: string list) (greedy: bool) (batchSize: int) (sources: Sources) : Generated[] =
    let settle (cfg: GenerationConfig) = if greedy then GenerationConfig.greedyOf cfg else cfg
    match kindOf dir with
    | DecoderOnly ->
        use p = openCausal dir None assignments
        generateSources (settle p.Generation) batchSize p sources
    | EncoderDecoder ->
        use p = openFolder dir None None assignments
        generateWith (settle p.Generation) batchSize ignore p sources

// ---------------------------------------------------------------- summarization prompts

/// The conversation a document is summarized in.
type SummaryPrompt =
    { /// The system message; None leaves it out (the template may add its own default, as Qwen2.5's does).
      System: string option
      /// The user message; `{document}` is replaced by the document.
      User: string }

module SummaryPrompt =
    /// The marker in `User` that the document replaces.
    let documentMarker = "{document}"

    /// No system message; the user asks for a one-sentence summary of the document that follows.
    let defaults =
        { System = None
          User = "Summarize the following document in one sentence.\n\n" + documentMarker }

    let validate (p: SummaryPrompt) : string list =
        [ if not (p.User.Contains documentMarker) then
              sprintf "the user prompt must contain %s where the document goes, got \"%s\"" documentMarker p.User ]

    /// What follows the user message in a plain prompt (no chat template).
    let plainSuffix = "\n\nSummary:"

/// How a folder's prompts are built: its chat template, or plain text when it has none.
type PromptStyle =
    | Template of ChatTemplate.ChatTemplate
    | Plain

/// The folder's chat template (tokenizer_config.json's chat_template or chat_template.jinja), or Plain when it
/// has none. A template that cannot be parsed is refused by `ChatTemplate` naming the file and the construct.
let promptStyleOf (dir: string) : PromptStyle =
    let config = Path.Combine(dir, "tokenizer_config.json")
    let hasTemplate =
        File.Exists(Path.Combine(dir, "chat_template.jinja"))
        || (File.Exists config && (JsonNode.Parse(File.ReadAllText config) :?> JsonObject).ContainsKey "chat_template")
    if hasTemplate then Template(ChatTemplate.fromFolder dir) else Plain

/// Says how prompts are built, for the output.
let describeStyle (style: PromptStyle) : string =
    match style with
    | Template t -> sprintf "chat template of %s (add_generation_prompt=True)" t.Source
    | Plain -> sprintf "no chat template: plain prompt (system message, user message, then %A)" SummaryPrompt.plainSuffix

/// The prompt text for one document: the chat template's rendering of [system?; user] with the generation
/// prompt, or the plain text.
let promptText (style: PromptStyle) (prompt: SummaryPrompt) (document: string) : string =
    let user = prompt.User.Replace(SummaryPrompt.documentMarker, document)
    match style with
    | Template t ->
        let messages = [ match prompt.System with Some s -> yield "system", s | None -> ()
                         yield "user", user ]
        ChatTemplate.render t messages ChatTemplate.defaults
    | Plain ->
        (match prompt.System with Some s -> s + "\n\n" | None -> "") + user + SummaryPrompt.plainSuffix

/// A document's prompt ids, the document cut (by its own tokens) so that the prompt leaves `room` positions for
/// the summary: a template writes its special tokens itself (no special tokens added); a plain prompt gets the
/// tokenizer's. Returns the ids and whether the document was cut.
let summaryPromptIds (p: CausalPretrained) (style: PromptStyle) (prompt: SummaryPrompt) (room: int) (document: string) : int[] * bool =
    let t =
        match p.Tokenizer with
        | Some t -> t
        | None -> invalidArg "model" (sprintf "%s has no tokenizer files (%s): summarizing text needs one" p.Lm.Folder HfTokenizer.lookedFor)
    let encode (doc: string) =
        let text = promptText style prompt doc
        match style with
        | Template _ -> t.Encode(text, false)
        | Plain -> t.Encode(text, true)
    let budget = p.Lm.MaxPositions - room
    let full = encode document
    if full.Length <= budget then full, false
    else
        let docIds = t.Encode(document, false)
        let overhead = full.Length - docIds.Length
        let rec shrink (keep: int) =
            if keep <= 0 then
                invalidArg "document" (sprintf "the prompt without the document takes %d tokens, leaving no room within %d positions for %d new tokens" overhead p.Lm.MaxPositions room)
            let ids = encode (t.Decode(docIds[.. keep - 1], false))
            if ids.Length <= budget then ids else shrink (keep - max 1 (ids.Length - budget))
        shrink (budget - overhead), true

// ---------------------------------------------------------------- zero-shot summarization into a run folder

/// New tokens per summary when neither the generation config nor the settings give max_new_tokens.
let defaultSummaryTokens = 60

/// The file in the run folder that says what produced it.
let private recordJson (cfg: BaselineConfig) (p: CausalPretrained) (style: PromptStyle) (prompt: SummaryPrompt) (gen: GenerationConfig) (result: BaselineResult) (cut: int) : string =
    let o = JsonObject()
    o["what"] <- JsonValue.Create "zero-shot summarization with a pretrained decoder-only LM (moe summarize)"
    o["model"] <- JsonValue.Create(Path.GetFullPath cfg.Model)
    o["model_type"] <- JsonValue.Create p.Lm.ModelType
    o["tokenizer"] <- JsonValue.Create(p.Tokenizer |> Option.map (fun t -> t.Source) |> Option.defaultValue "")
    o["prompt_style"] <- JsonValue.Create(describeStyle style)
    o["system_prompt"] <- (match prompt.System with Some s -> JsonValue.Create s :> JsonNode | None -> null)
    o["user_prompt"] <- JsonValue.Create prompt.User
    o["documents_cut"] <- JsonValue.Create cut
    o["data"] <- JsonValue.Create(Path.GetFullPath cfg.Data)
    o["split"] <- JsonValue.Create cfg.Split
    o["limit"] <- (match cfg.Limit with Some n -> JsonValue.Create n :> JsonNode | None -> null)
    o["batch_size"] <- JsonValue.Create cfg.BatchSize
    o["settings"] <- JsonArray([| for s in cfg.Settings -> JsonValue.Create s :> JsonNode |])
    o["generation"] <- Json.toNode gen
    o["documents"] <- JsonValue.Create result.Documents
    o["generated_tokens"] <- JsonValue.Create result.GeneratedTokens
    o["seconds"] <- JsonValue.Create result.Seconds
    o["finished_utc"] <- JsonValue.Create(DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", Globalization.CultureInfo.InvariantCulture))
    Json.format o

/// Summarizes `cfg.Split` of `cfg.Data` with the decoder-only checkpoint `cfg.Model` into RunsDir/Name, as
/// `Baseline.summarize` does for encoder-decoders (same files, same scores, same table): each document goes
/// into `prompt`'s user message, rendered with the folder's chat template (add_generation_prompt=True) or as a
/// plain prompt when it has none (said in the output), cut to leave room for the summary. The generation
/// config is the folder's with the settings applied (max_new_tokens `defaultSummaryTokens` unless set). The
/// summary is the generated text up to its first line break.
let summarize (say: string -> unit) (prompt: SummaryPrompt) (cfg: BaselineConfig) : BaselineResult =
    orFail "baseline config" (BaselineConfig.validate cfg) cfg |> ignore
    orFail "summary prompt" (SummaryPrompt.validate prompt) prompt |> ignore
    let runDir = Path.Combine(cfg.RunsDir, cfg.Name)
    use _lock = RunFolder.acquire (sprintf "moe summarize --model %s --name %s" cfg.Model cfg.Name) runDir
    RunFolder.startFresh cfg.Overwrite runDir
    let xs, notes = examples cfg
    use p = openCausal cfg.Model None cfg.Settings
    let style = asBadInput (fun () -> promptStyleOf cfg.Model)
    let gen =
        match p.Generation.MaxNewTokens with
        | Some _ -> p.Generation
        | None -> { p.Generation with MaxNewTokens = Some defaultSummaryTokens }
    say (sprintf "model: %s (%s); %d %s documents from %s; %s, batches of %d, at most %d new tokens"
             cfg.Model p.Lm.ModelType xs.Length cfg.Split cfg.Data
             (if gen.NumBeams > 1 then sprintf "beam %d" gen.NumBeams elif gen.DoSample then "sampling" else "greedy")
             cfg.BatchSize gen.MaxNewTokens.Value)
    say (sprintf "prompt: %s" (describeStyle style))
    for n in notes do say ("  " + n)
    let prompted = xs |> Array.map (fun e -> summaryPromptIds p style prompt gen.MaxNewTokens.Value e.Document)
    let cut = prompted |> Array.filter snd |> Array.length
    if cut > 0 then say (sprintf "  %d of %d documents cut to fit %d positions" cut xs.Length p.Lm.MaxPositions)
    let clock = Stopwatch.StartNew()
    let mutable last = { Done = 0; Total = xs.Length; GeneratedTokens = 0; Seconds = 0.0 }
    let outs =
        generatePrompts gen cfg.BatchSize (fun pr -> last <- pr; say (Progress.describe pr)) p (prompted |> Array.map fst)
        |> Array.map (fun g -> { g with Text = g.Text |> Option.map (fun t -> t.Trim().Split('\n')[0]) })
    let seconds = clock.Elapsed.TotalSeconds
    let scores = writeScored say cfg runDir xs outs
    let result =
        { RunDir = runDir; Scores = scores; Documents = xs.Length; GeneratedTokens = last.GeneratedTokens
          Seconds = seconds; Notes = notes }
    Summarizer.writeText (Path.Combine(runDir, recordName)) (recordJson cfg p style prompt gen result cut)
    say (Summarizer.comparisonTable scores)
    result
