/// A small GPT-2 (Radford et al. 2019) pretrained here for a few minutes on web text, for the studies that
/// start from a pretrained GPT-2 when none can be downloaded: the real GPT-2 BPE vocabulary (50257 ids,
/// `encoder.json` + `vocab.bpe`), a narrow and shallow model, next-token prediction on documents packed into
/// fixed-length rows with `<|endoftext|>` between them (as OpenAI's WebText training did), and a folder in
/// Hugging Face's layout (config.json, model.safetensors, vocab.json, merges.txt, tokenizer_config.json,
/// generation_config.json) that `loadFolder` reads exactly as it reads a real `gpt2/` folder.
/// Axes: B batch, S sequence (SequenceLength), V vocabulary.
module Moe.SmallGpt2

open System
open System.IO
open System.Text
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Moe.Config
open Moe.Gpt2
open Moe.Train

type private Tensor = torch.Tensor

/// `<|endoftext|>`, GPT-2's only special token: document separator, BOS and EOS at once.
let EndOfText = "<|endoftext|>"

// ---------------------------------------------------------------- the Hugging Face folder

/// GPT-2's `config.json` as `transformers` 4.45 writes it for GPT2LMHeadModel (dropouts at the release's
/// 0.1: this toolkit's GPT-2 has no dropout, so they matter only to `transformers` training the folder).
let configJson (cfg: Gpt2Config) (eosId: int) : JsonNode =
    let o = JsonObject()
    let arch = JsonArray()
    arch.Add(JsonValue.Create "GPT2LMHeadModel")
    o["activation_function"] <- JsonValue.Create "gelu_new"
    o["architectures"] <- arch
    o["attn_pdrop"] <- JsonValue.Create 0.1
    o["bos_token_id"] <- JsonValue.Create eosId
    o["embd_pdrop"] <- JsonValue.Create 0.1
    o["eos_token_id"] <- JsonValue.Create eosId
    o["initializer_range"] <- JsonValue.Create InitializerRange
    o["layer_norm_epsilon"] <- JsonValue.Create cfg.LayerNormEpsilon
    o["model_type"] <- JsonValue.Create "gpt2"
    o["n_embd"] <- JsonValue.Create cfg.Embd
    o["n_head"] <- JsonValue.Create cfg.Heads
    o["n_inner"] <- null
    o["n_layer"] <- JsonValue.Create cfg.Layers
    o["n_positions"] <- JsonValue.Create cfg.Positions
    o["reorder_and_upcast_attn"] <- JsonValue.Create false
    o["resid_pdrop"] <- JsonValue.Create 0.1
    o["scale_attn_by_inverse_layer_idx"] <- JsonValue.Create false
    o["scale_attn_weights"] <- JsonValue.Create true
    o["tie_word_embeddings"] <- JsonValue.Create true
    o["torch_dtype"] <- JsonValue.Create "float32"
    o["use_cache"] <- JsonValue.Create true
    o["vocab_size"] <- JsonValue.Create cfg.VocabSize
    o :> JsonNode

/// Fields of a GPT-2 config.json that cannot change what the model computes at inference: dropouts (this
/// GPT-2 has none), initialisation, and the sequence-summary head of GPT2DoubleHeadsModel.
let private ignoredFields =
    [ "attn_pdrop"; "embd_pdrop"; "resid_pdrop"; "initializer_range"; "summary_activation"; "summary_first_dropout"
      "summary_proj_to_labels"; "summary_type"; "summary_use_proj"; "n_ctx" ]

/// Reads a GPT-2 `config.json`: n_embd, n_head, n_layer, n_positions, vocab_size, layer_norm_epsilon used;
/// settings this implementation does not compute (another activation, n_inner other than 4 n_embd, untied
/// embeddings, unscaled or reordered attention) refused by name.
let readConfig (path: string) : Gpt2Config =
    let r = HfConfig.ConfigReader.Open path
    let modelType = r.StringOr("model_type", "gpt2")
    if modelType <> "gpt2" then r.Unsupported("model_type", "gpt2")
    let d = Gpt2Config.defaults
    let cfg =
        { VocabSize = r.IntOr("vocab_size", d.VocabSize)
          Positions = r.IntOr("n_positions", d.Positions)
          Embd = r.IntOr("n_embd", d.Embd)
          Layers = r.IntOr("n_layer", d.Layers)
          Heads = r.IntOr("n_head", d.Heads)
          LayerNormEpsilon = r.FloatOr("layer_norm_epsilon", d.LayerNormEpsilon) }
    let activation = r.StringOr("activation_function", "gelu_new")
    if activation <> "gelu_new" then r.Unsupported("activation_function", "gelu_new")
    match r.Element "n_inner" with
    | Some e when e.ValueKind <> JsonValueKind.Null && r.Int "n_inner" <> 4 * cfg.Embd -> r.Unsupported("n_inner", "null or 4 n_embd")
    | _ -> ()
    if not (r.BoolOr("tie_word_embeddings", true)) then r.Unsupported("tie_word_embeddings", "true")
    if not (r.BoolOr("scale_attn_weights", true)) then r.Unsupported("scale_attn_weights", "true")
    if r.BoolOr("scale_attn_by_inverse_layer_idx", false) then r.Unsupported("scale_attn_by_inverse_layer_idx", "false")
    if r.BoolOr("reorder_and_upcast_attn", false) then r.Unsupported("reorder_and_upcast_attn", "false")
    r.Ignore HfConfig.bookkeepingFields
    r.Ignore ignoredFields
    r.Finish()
    orFail (sprintf "GPT-2 config %s" path) (Gpt2Config.validate cfg) cfg

/// Loads a GPT-2 checkpoint folder in Hugging Face's layout (a real `gpt2/` or one `saveFolder` wrote): the
/// config from config.json, the weights (GPT2Model or GPT2LMHeadModel names) through `HfCheckpoint.openWeights`.
/// Fails, naming the folder, unless the weights fill exactly the model's parameters.
let loadFolder (dir: string) : Gpt2Model =
    let configPath = Path.Combine(dir, "config.json")
    if not (File.Exists configPath) then invalidArg "dir" (sprintf "expected a GPT-2 checkpoint folder with config.json, got %s" dir)
    let cfg = readConfig configPath
    use weights = HfCheckpoint.openWeights dir
    let state = [ for n in weights.Names -> n, weights.Load(n, torch.ScalarType.Float32) ]
    let model = new Gpt2Model(cfg)
    let report =
        try loadState model state
        finally for _, t in state do t.Dispose()
    if not report.Missing.IsEmpty || not report.Unexpected.IsEmpty then
        model.Dispose()
        invalidArg "dir" (sprintf "GPT-2 checkpoint %s does not match its config.json: missing [%s]; unexpected [%s]"
                              dir (String.Join(", ", report.Missing)) (String.Join(", ", report.Unexpected)))
    model

/// The tokenizer of a GPT-2 folder (vocab.json + merges.txt or tokenizer.json, with tokenizer_config.json).
let loadTokenizer (dir: string) : HfTokenizer.HfTokenizer = HfTokenizer.fromFolder dir

let private writeText (path: string) (text: string) = File.WriteAllText(path, text, UTF8Encoding(false))

/// Writes GPT-2's slow-tokenizer files from the BPE release files: `encoder.json` as vocab.json, `vocab.bpe` as
/// merges.txt (the same formats), tokenizer_config.json as `transformers` writes GPT2Tokenizer's, and
/// generation_config.json (BOS = EOS = `<|endoftext|>`). Returns the `<|endoftext|>` id.
let writeTokenizer (bpeDir: string) (dir: string) : int =
    let encoder, merges = Path.Combine(bpeDir, "encoder.json"), Path.Combine(bpeDir, "vocab.bpe")
    for f in [ encoder; merges ] do
        if not (File.Exists f) then invalidArg "bpeDir" (sprintf "expected GPT-2's BPE files encoder.json and vocab.bpe in %s; %s is missing" bpeDir f)
    Directory.CreateDirectory dir |> ignore
    File.Copy(encoder, Path.Combine(dir, "vocab.json"), true)
    File.Copy(merges, Path.Combine(dir, "merges.txt"), true)
    let eos =
        use doc = JsonDocument.Parse(File.ReadAllText encoder)
        match doc.RootElement.TryGetProperty EndOfText with
        | true, v -> v.GetInt32()
        | _ -> invalidArg "bpeDir" (sprintf "%s has no %s entry; expected GPT-2's encoder.json" encoder EndOfText)
    let tok = JsonObject()
    tok["tokenizer_class"] <- JsonValue.Create "GPT2Tokenizer"
    tok["model_max_length"] <- JsonValue.Create 1024
    tok["add_prefix_space"] <- JsonValue.Create false
    tok["errors"] <- JsonValue.Create "replace"
    for role in [ "bos_token"; "eos_token"; "unk_token" ] do tok[role] <- JsonValue.Create EndOfText
    tok["clean_up_tokenization_spaces"] <- JsonValue.Create true
    let options = JsonSerializerOptions(WriteIndented = true)
    writeText (Path.Combine(dir, "tokenizer_config.json")) (tok.ToJsonString options + "\n")
    let gen = JsonObject()
    gen["bos_token_id"] <- JsonValue.Create eos
    gen["eos_token_id"] <- JsonValue.Create eos
    writeText (Path.Combine(dir, "generation_config.json")) (gen.ToJsonString options + "\n")
    eos

/// Saves `model` as a GPT2LMHeadModel folder: config.json and model.safetensors with `transformer.` names and
/// no lm_head.weight (tied to wte, as `save_pretrained` leaves it out), then the tokenizer files from `bpeDir`.
/// Replaces an earlier save in `dir`. Adapters must be merged first (`Gpt2.merge`).
let saveFolder (bpeDir: string) (dir: string) (model: Gpt2Model) : unit =
    if model.Projections |> List.exists (fun (_, c) -> c.HasLora && not c.Merged) then
        invalidArg "model" "expected a GPT-2 without unmerged LoRA adapters (call Gpt2.merge first): a GPT-2 folder has no adapter tensors"
    let eos = writeTokenizer bpeDir dir
    let state =
        [ for n, t in stateDict model do
            if not (n.EndsWith ".lora_A" || n.EndsWith ".lora_B") then yield "transformer." + n, t.detach().cpu () ]
    try HfCheckpoint.saveFolderWith true dir (configJson model.Config eos) state None
    finally for _, t in state do t.Dispose()

// ---------------------------------------------------------------- pretraining

/// What `pretrain` trains.
type PretrainSettings =
    { /// Sizes; VocabSize must equal the BPE vocabulary's (50257 for GPT-2's).
      Model: Gpt2Config
      /// Tokens per training row (<= Positions).
      SequenceLength: int
      /// Web-text documents read (None: all).
      MaxDocuments: int option
      /// Rows held out for the validation loss (the last rows of the packed stream).
      ValidRows: int
      /// The toolkit's training settings (AdamW, warmup and cosine decay, clipping, validation cadence).
      Train: TrainConfig }

module PretrainSettings =
    /// Width 64, 2 layers, 2 heads, 256 positions, GPT-2's vocabulary, 300 steps of 8 rows of 128 tokens (300k
    /// tokens, a quarter of the C4 sample): a few minutes on 2 CPU cores. The 50257-way output layer is most
    /// of the cost at this width.
    let quick =
        { Model = { Gpt2Config.defaults with Positions = 256; Embd = 64; Layers = 2; Heads = 2 }
          SequenceLength = 128
          MaxDocuments = None
          ValidRows = 16
          Train =
            { TrainConfig.defaults with
                Steps = 300; BatchSize = 8; LearningRate = 2e-3; WarmupSteps = 30; WeightDecay = 0.1
                LogEvery = 10; EvalEvery = 100; CheckpointEvery = 300; Device = Native.Cpu } }

    /// Seconds: width 16, one layer, rows of 16 tokens from 20 documents, 3 steps.
    let smoke =
        { Model = { Gpt2Config.defaults with Positions = 64; Embd = 16; Layers = 1; Heads = 2 }
          SequenceLength = 16
          MaxDocuments = Some 20
          ValidRows = 2
          Train =
            { quick.Train with
                Steps = 3; BatchSize = 4; WarmupSteps = 1; LogEvery = 1; EvalEvery = 3; CheckpointEvery = 3 } }

    let validate (s: PretrainSettings) : string list =
        [ yield! Gpt2Config.validate s.Model
          if s.SequenceLength < 2 || s.SequenceLength > s.Model.Positions then
              sprintf "SequenceLength must be in [2, Positions = %d], got %d" s.Model.Positions s.SequenceLength
          if s.ValidRows < 1 then sprintf "ValidRows must be >= 1, got %d" s.ValidRows
          yield! TrainConfig.validate s.Train ]

/// What `pretrain` produced.
type PretrainResult =
    { /// The Hugging Face folder.
      Folder: string
      /// The training run (metrics.jsonl, checkpoints).
      RunDir: string
      Data: WebText.WebTextReport
      TrainRows: int
      TrainTokens: int64
      BestValidLoss: float option
      Seconds: float }

/// The documents' tokens, each document followed by `<|endoftext|>`, cut into rows of `length` tokens (the
/// last partial row dropped).
let packRows (encode: string -> int[]) (eos: int) (length: int) (documents: string[]) : int[][] =
    let stream = ResizeArray<int>()
    for d in documents do
        stream.AddRange(encode d)
        stream.Add eos
    [| for i in 0 .. stream.Count / length - 1 -> stream.GetRange(i * length, length).ToArray() |]

let private shuffled (seed: int) (epoch: int) (n: int) : int[] =
    // Random(int) repeats across processes (HashCode.Combine would not).
    let rng = Random(seed * 1000003 + epoch)
    let a = Array.init n id
    rng.Shuffle a
    a

/// Pretrains a GPT-2 of `settings.Model`'s sizes from scratch on the web text at `webText` (C4 JSON Lines),
/// tokenized with GPT-2's BPE from `bpeDir`, by next-token prediction (Radford et al. 2018 eq. 1) with the
/// toolkit's trainer (run folder `runDir`), and saves the best-validation weights in `folder` (`saveFolder`).
let pretrain (options: RunOptions) (settings: PretrainSettings) (webText: string) (bpeDir: string) (runDir: string) (folder: string) : PretrainResult =
    let settings = orFail "small GPT-2 pretraining settings" (PretrainSettings.validate settings) settings
    let data = WebText.load { WebText.WebTextConfig.defaults with MaxDocuments = settings.MaxDocuments } webText
    let eos = writeTokenizer bpeDir folder
    let tokenizer = loadTokenizer folder
    if tokenizer.VocabSize <> settings.Model.VocabSize then
        invalidArg "settings" (sprintf "expected Model.VocabSize = %d (the BPE vocabulary in %s), got %d" tokenizer.VocabSize bpeDir settings.Model.VocabSize)
    let rows = packRows (fun d -> tokenizer.Encode(d, false)) eos settings.SequenceLength data.Documents
    if rows.Length <= settings.ValidRows then
        invalidArg "webText" (sprintf "%s gives %d rows of %d tokens; expected more than the %d validation rows" webText rows.Length settings.SequenceLength settings.ValidRows)
    let train, valid = rows[.. rows.Length - settings.ValidRows - 1], rows[rows.Length - settings.ValidRows ..]
    Native.seedAll settings.Train.Seed
    use model = new Gpt2Model(settings.Model)
    let batch (source: int[][]) (indices: int[]) : Tensor =
        let device = (model.parameters () |> Seq.head).device
        torch.tensor(indices |> Array.collect (fun i -> source[i] |> Array.map int64), device = device).view(int64 indices.Length, int64 settings.SequenceLength)
    let loss (source: int[][]) (indices: int[]) : LossParts =
        use ids = batch source indices
        { TaskLoss = nextTokenLoss model ids; Moe = []; Tokens = int64 (indices.Length * (settings.SequenceLength - 1)) }
    let task =
        { Model = model
          TrainBatches = fun seed epoch -> shuffled seed epoch train.Length |> Array.chunkBySize settings.Train.BatchSize |> Seq.ofArray
          ValidBatches = fun () -> Array.init valid.Length id |> Array.chunkBySize settings.Train.BatchSize |> Seq.ofArray
          Loss = fun phase indices -> loss (if phase = Training then train else valid) indices
          Config = [ "model", box settings.Model; "data", box {| WebText = webText; SequenceLength = settings.SequenceLength; Rows = rows.Length |} ]
          Tokenizer = "" }
    Directory.CreateDirectory runDir |> ignore
    let result = Loop.runWith { options with Overwrite = true } settings.Train task runDir
    result.BestCheckpoint |> Option.iter (fun path -> Checkpoint.loadModel path model)
    model.cpu () |> ignore
    saveFolder bpeDir folder model
    { Folder = Path.GetFullPath folder
      RunDir = Path.GetFullPath runDir
      Data = data.Report
      TrainRows = train.Length
      TrainTokens = int64 train.Length * int64 settings.SequenceLength
      BestValidLoss = result.BestValidLoss
      Seconds = result.ElapsedSeconds }

/// `folder` when it already holds a GPT-2 (config.json and weights), else `pretrain` into it: studies share
/// one pretrained base instead of paying for it in every run.
let ensure (options: RunOptions) (settings: PretrainSettings) (webText: string) (bpeDir: string) (runDir: string) (folder: string) : string =
    let hasWeights = HfCheckpoint.weightFileNames |> List.exists (fun n -> File.Exists(Path.Combine(folder, n)))
    if File.Exists(Path.Combine(folder, "config.json")) && hasWeights then Path.GetFullPath folder
    else (pretrain options settings webText bpeDir runDir folder).Folder
