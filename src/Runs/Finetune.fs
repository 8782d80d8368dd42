/// Fine-tuning a pretrained encoder-decoder (any `HfSeq2Seq` family) on a summarization data set with the
/// toolkit's training loop, fully or with LoRA adapters (Hu et al. 2021) named as PEFT names them, and writing
/// the result in Hugging Face layout; and the toolkit's own from-scratch summarizer exported in that layout
/// (`exportRun`), which `HfSeq2Seq.load` reads back.
/// Axes: N rows, S source positions, T target positions, r LoRA rank, I/O a Linear's input/output width.
module Moe.Finetune

open System
open System.IO
open System.Text
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Moe.Tensors
open Moe.Config
open Moe.Models
open Moe.Data
open Moe.Train

type Tensor = torch.Tensor

// ---------------------------------------------------------------- LoRA with PEFT's words

/// A LoRA adapter set as PEFT's `LoraConfig` words it: each targeted Linear computes W x + b +
/// (lora_alpha / r) B A dropout(x) with A [r; I] and B [O; r] trained and W, b frozen (Hu et al. 2021 eq. 3).
type LoraSettings =
    { /// The rank of A and B.
      r: int
      /// The update is scaled by lora_alpha / r (Hu et al. 2021 sec. 4.1).
      lora_alpha: float
      /// Dropout on the adapter's input, in training only.
      lora_dropout: float
      /// Linear modules whose name equals one of these or ends with "." + one of these; empty = the family's
      /// default (PEFT's: ["q_proj"; "v_proj"] for BART and Pegasus, ["q"; "v"] for T5 and Switch).
      target_modules: string list }

module LoraSettings =
    /// PEFT's LoraConfig defaults (r 8, lora_alpha 8, no dropout) with the family's default targets.
    let defaults = { r = 8; lora_alpha = 8.0; lora_dropout = 0.0; target_modules = [] }

    /// PEFT's default target modules for a model_type (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
    let defaultTargets (modelType: string) : string list =
        match modelType with
        | "bart" | "pegasus" -> [ "q_proj"; "v_proj" ]
        | "t5" | "mt5" | "switch_transformers" -> [ "q"; "v" ]
        | other -> invalidArg "modelType" (sprintf "no default LoRA target_modules for model_type \"%s\"; name them (target_modules)" other)

    /// The targets to use: the given ones, else the family's default.
    let targetsFor (modelType: string) (s: LoraSettings) : string list =
        if s.target_modules.IsEmpty then defaultTargets modelType else s.target_modules

    /// Every problem with the settings.
    let validate (s: LoraSettings) : string list =
        [ if s.r < 1 then sprintf "r must be >= 1, got %d" s.r
          if not (s.lora_alpha > 0.0) || Double.IsInfinity s.lora_alpha then sprintf "lora_alpha must be finite and > 0, got %g" s.lora_alpha
          if not (s.lora_dropout >= 0.0 && s.lora_dropout < 1.0) then sprintf "lora_dropout must be in [0, 1), got %g" s.lora_dropout
          for t in s.target_modules do
              if String.IsNullOrWhiteSpace t then "target_modules must not hold blank names" ]

    /// lora_alpha / r.
    let scale (s: LoraSettings) : float = s.lora_alpha / float s.r

/// One Linear module wrapped with an adapter: its `lora_A` [r; I] and `lora_B` [O; r] are registered as child
/// modules of the Linear (so the base weights keep their names and the adapters get `<module>.lora_A.weight`),
/// and a forward hook adds the scaled low-rank update to the Linear's output.
type LoraAdapter =
    { /// The Linear's module name, e.g. `model.encoder.layers.0.self_attn.q_proj`.
      Module: string
      Linear: Modules.Linear
      A: Modules.Linear
      B: Modules.Linear
      Scale: float
      /// How many times the hook has run: a model that calls this Linear's `forward` directly bypasses hooks,
      /// which `checkAdaptersRun` catches.
      Calls: int ref }

/// Whether `name` ends one of PEFT's target module names: equal to it or ending with "." + it.
let private targeted (targets: string list) (name: string) =
    targets |> List.exists (fun t -> name = t || name.EndsWith("." + t))

/// A parameter name that belongs to a LoRA adapter.
let isAdapterName (name: string) = name.Contains ".lora_A." || name.Contains ".lora_B."

/// Wraps every Linear of `root` that `targets` name with a LoRA adapter (A kaiming-uniform with a = sqrt 5 as
/// PEFT initialises it, B zeros, so the model computes what it did), freezes every other parameter, and returns
/// the adapters in module order. The model's Linear modules must run through `call` (forward hooks).
/// `adapterDtype`: the adapters' dtype (None = the Linear's); with another dtype than the Linear's, the
/// adapter's input is cast to it and its update back to the output's dtype (PEFT's float32 adapters on a
/// bfloat16 base, `autocast_adapter_dtype`).
let applyLoraIn (adapterDtype: torch.ScalarType option) (s: LoraSettings) (targets: string list) (root: torch.nn.Module) : LoraAdapter list =
    Config.orFail "LoRA settings" (LoraSettings.validate s) s |> ignore
    let found =
        [ for struct (name, m) in root.named_modules () do
            match m with
            | :? Modules.Linear as l when targeted targets name -> name, l
            | _ -> () ]
    if found.IsEmpty then
        let linears = [ for struct (name, m) in root.named_modules () do if (m :? Modules.Linear) then name ]
        invalidArg "targets" (sprintf "LoRA target_modules %A match no Linear module; the model's Linear modules are e.g. %s"
                                  targets (linears |> List.truncate 8 |> String.concat ", "))
    for p in root.parameters () do p.requires_grad <- false
    let scale = LoraSettings.scale s
    [ for name, l in found do
        if l.named_children () |> Seq.exists (fun struct (n, _) -> n = "lora_A") then
            invalidOp (sprintf "%s already has a LoRA adapter" name)
        let outputs, inputs = l.weight.shape[0], l.weight.shape[1]
        let dtype = defaultArg adapterDtype l.weight.dtype
        let a = torch.nn.Linear(inputs, int64 s.r, hasBias = false, device = l.weight.device, dtype = dtype)
        let b = torch.nn.Linear(int64 s.r, outputs, hasBias = false, device = l.weight.device, dtype = dtype)
        do
            use _ = torch.no_grad ()
            torch.nn.init.kaiming_uniform_(a.weight, a = Math.Sqrt 5.0) |> ignore  // PEFT's reset_lora_parameters
            torch.nn.init.zeros_(b.weight) |> ignore
        l.register_module ("lora_A", a)
        l.register_module ("lora_B", b)
        let dropout = s.lora_dropout
        let calls = ref 0
        l.register_forward_hook (Func<torch.nn.Module<Tensor, Tensor>, Tensor, Tensor, Tensor>(fun m x y ->
            calls.Value <- calls.Value + 1
            let h = if m.training && dropout > 0.0 then torch.nn.functional.dropout(x, dropout, true) else x  // [..; I]
            if h.dtype = dtype then plus y (mulScalar scale (b.call (a.call h)))                              // [..; O]
            else
                use update = mulScalar scale (b.call (a.call (h.to_type dtype)))                              // [..; O]
                plus y (update.to_type y.dtype)))
        |> ignore
        { Module = name; Linear = l; A = a; B = b; Scale = scale; Calls = calls } ]

/// `applyLoraIn None`: adapters in each Linear's dtype.
let applyLora (s: LoraSettings) (targets: string list) (root: torch.nn.Module) : LoraAdapter list = applyLoraIn None s targets root

/// Runs the model's loss once on a two-token batch and fails, naming them, when some adapters' hooks did not
/// run: their Linear is called through `forward` (which skips hooks) and LoRA would silently do nothing.
let checkAdaptersRun (model: HfSeq2Seq.HfSeq2Seq) (adapters: LoraAdapter list) : unit =
    if not adapters.IsEmpty then
        for a in adapters do a.Calls.Value <- 0
        do
            use _ = torch.no_grad ()
            use _ = torch.NewDisposeScope()
            let device = adapters.Head.Linear.weight.device
            let ids = torch.tensor([| int64 model.DecoderStartTokenId; int64 model.PadTokenId |], ReadOnlySpan<int64> [| 1L; 2L |], device = device)
            let mask = torch.ones([| 1L; 2L |], dtype = torch.ScalarType.Bool, device = device)
            model.Loss ids mask ids |> ignore
        match adapters |> List.filter (fun a -> a.Calls.Value = 0) with
        | [] -> ()
        | silent ->
            invalidOp (sprintf "LoRA cannot attach to %d of %d targeted modules of %s (%s): the model calls them with `forward`, which skips forward hooks; its family must call these Linear modules with `call`"
                           silent.Length adapters.Length model.ModelType (silent |> List.truncate 4 |> List.map (fun a -> a.Module) |> String.concat ", "))

/// The state dict to export for a model carrying `adapters`: adapter tensors left out and each adapted weight
/// replaced by W + scale B A (the merged model computes what the adapted one does). New tensors are made in
/// the caller's dispose scope.
let mergedStateDict (adapters: LoraAdapter list) (state: (string * Tensor) list) : (string * Tensor) list =
    let byWeight = adapters |> List.map (fun a -> a.Module + ".weight", a) |> Map.ofList
    use _ = torch.no_grad ()
    [ for name, t in state do
        if not (isAdapterName name) then
            match byWeight.TryFind name with
            | Some a -> name, (plus t (mulScalar a.Scale (a.B.weight.mm a.A.weight))).detach ()  // [O; I]
            | None -> name, t ]

/// PEFT's file names and tensor names of an adapter folder.
let adapterConfigName = "adapter_config.json"
let adapterWeightsName = "adapter_model.safetensors"
let private peftPrefix = "base_model.model."

/// The adapters' tensors under PEFT's names: `base_model.model.<module>.lora_A.weight` [r; I] and `.lora_B.weight` [O; r].
let adapterState (adapters: LoraAdapter list) : (string * Tensor) list =
    [ for a in adapters do
        peftPrefix + a.Module + ".lora_A.weight", (a.A.weight :> Tensor)
        peftPrefix + a.Module + ".lora_B.weight", (a.B.weight :> Tensor) ]

let private writeText (path: string) (text: string) =
    Checkpoint.writeAtomic path (fun fs ->
        let bytes = UTF8Encoding(false).GetBytes(text)
        fs.Write(bytes, 0, bytes.Length))

let private indented (node: JsonNode) = node.ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n"

/// Writes a PEFT adapter folder: `adapter_config.json` (peft_type LORA, task_type `taskType` (PEFT's
/// "SEQ_2_SEQ_LM", "CAUSAL_LM"), r, lora_alpha, lora_dropout, target_modules, base_model_name_or_path, bias
/// "none", fan_in_fan_out false, and PEFT's switches this adapter leaves off: use_rslora, use_dora false,
/// modules_to_save, layers_to_transform null, rank_pattern, alpha_pattern empty) and
/// `adapter_model.safetensors` (`adapterState`).
let saveAdapterAs (taskType: string) (dir: string) (baseModel: string) (s: LoraSettings) (targets: string list) (adapters: LoraAdapter list) : unit =
    Directory.CreateDirectory dir |> ignore
    let o = JsonObject()
    o["peft_type"] <- JsonValue.Create "LORA"
    o["task_type"] <- JsonValue.Create taskType
    o["r"] <- JsonValue.Create s.r
    o["lora_alpha"] <- JsonValue.Create s.lora_alpha
    o["lora_dropout"] <- JsonValue.Create s.lora_dropout
    let ts = JsonArray()
    for t in targets do ts.Add(JsonValue.Create t)
    o["target_modules"] <- ts
    o["base_model_name_or_path"] <- JsonValue.Create baseModel
    o["bias"] <- JsonValue.Create "none"
    o["fan_in_fan_out"] <- JsonValue.Create false
    o["inference_mode"] <- JsonValue.Create true
    if taskType <> "SEQ_2_SEQ_LM" then
        for off in [ "use_rslora"; "use_dora" ] do o[off] <- JsonValue.Create false
        for none in [ "modules_to_save"; "layers_to_transform"; "layers_pattern" ] do o[none] <- null
        for empty in [ "rank_pattern"; "alpha_pattern" ] do o[empty] <- JsonObject()
        o["init_lora_weights"] <- JsonValue.Create true
    Safetensors.writeWithMetadata (Path.Combine(dir, adapterWeightsName)) [ "format", "pt" ] (adapterState adapters)
    writeText (Path.Combine(dir, adapterConfigName)) (indented o)

/// `saveAdapterAs "SEQ_2_SEQ_LM"`: an encoder-decoder's adapter folder.
let saveAdapter (dir: string) (baseModel: string) (s: LoraSettings) (targets: string list) (adapters: LoraAdapter list) : unit =
    saveAdapterAs "SEQ_2_SEQ_LM" dir baseModel s targets adapters

/// Reads a PEFT adapter folder's settings; fields this loader cannot honour are refused by name.
let readAdapterConfig (dir: string) : LoraSettings =
    let path = Path.Combine(dir, adapterConfigName)
    if not (File.Exists path) then failwithf "%s: not found (a PEFT adapter folder has %s and %s)" path adapterConfigName adapterWeightsName
    let r = HfConfig.ConfigReader.Open path
    let expectValue (name: string) (wanted: string) =
        match r.StringOption name with
        | Some v when v <> wanted -> r.Unsupported(name, wanted)
        | _ -> ()
    expectValue "peft_type" "LORA"
    expectValue "bias" "none"
    if r.BoolOr("fan_in_fan_out", false) then r.Unsupported("fan_in_fan_out", "false")
    let targets =
        match r.Element "target_modules" with
        | Some e when e.ValueKind = JsonValueKind.Array -> [ for x in e.EnumerateArray() -> x.GetString() ]
        | Some e when e.ValueKind = JsonValueKind.String -> [ e.GetString() ]
        | _ -> failwithf "%s: target_modules must be a list of module names" path
    let s = { r = r.Int "r"; lora_alpha = r.Float "lora_alpha"; lora_dropout = r.FloatOr("lora_dropout", 0.0); target_modules = targets }
    for off in [ "use_rslora"; "use_dora" ] do
        if r.BoolOr(off, false) then r.Unsupported(off, "false")
    for none in [ "modules_to_save"; "layers_to_transform"; "layers_pattern" ] do
        match r.Element none with
        | Some e when e.ValueKind <> JsonValueKind.Null -> r.Unsupported(none, "null")
        | _ -> ()
    for empty in [ "rank_pattern"; "alpha_pattern" ] do
        match r.Element empty with
        | Some e when e.ValueKind <> JsonValueKind.Null && not (e.ValueKind = JsonValueKind.Object && Seq.isEmpty (e.EnumerateObject())) ->
            r.Unsupported(empty, "{} (one rank and alpha for every module)")
        | _ -> ()
    match r.Element "init_lora_weights" with
    | Some e when e.ValueKind <> JsonValueKind.True && e.ValueKind <> JsonValueKind.False -> r.Unsupported("init_lora_weights", "true or false")
    | _ -> ()
    r.Ignore [ "task_type"; "base_model_name_or_path"; "inference_mode"; "revision"; "peft_version"; "auto_mapping" ]
    r.Finish()
    Config.orFail path (LoraSettings.validate s) s

/// Copies a PEFT adapter file's tensors into `adapters` (`adapterState` names), after checking that it holds
/// exactly those tensors with their shapes; errors name the file and the tensors.
let loadAdapterTensors (file: string) (adapters: LoraAdapter list) : unit =
    let wanted = adapterState adapters |> dict
    let stored = Safetensors.read file
    try
        let names = stored |> List.map fst |> set
        let missing = wanted.Keys |> Seq.filter (fun n -> not (names.Contains n)) |> Seq.toList
        if not missing.IsEmpty then failwithf "%s lacks %d adapter tensor(s): %s" file missing.Length (String.concat ", " missing)
        let extra = names |> Seq.filter (fun n -> not (wanted.ContainsKey n)) |> Seq.toList
        if not extra.IsEmpty then failwithf "%s has tensor(s) the targeted modules do not use: %s" file (String.concat ", " extra)
        use _ = torch.no_grad ()
        for name, t in stored do
            let target = wanted[name]
            if t.shape <> target.shape then
                failwithf "%s: %s: expected shape %A, got %A" file name target.shape t.shape
            target.copy_(t) |> ignore
    finally
        for _, t in stored do t.Dispose()

/// A pretrained model with the LoRA adapters of a PEFT adapter folder on top (evaluation mode), as PEFT's
/// `PeftModel.from_pretrained(base, adapterDir)` builds it.
let loadWithAdapter (baseDir: string) (adapterDir: string) : HfSeq2Seq.HfSeq2Seq * LoraAdapter list =
    let s = readAdapterConfig adapterDir
    let file = Path.Combine(adapterDir, adapterWeightsName)
    if not (File.Exists file) then failwithf "%s: not found" file
    let model = HfSeq2Seq.load baseDir
    try
        let adapters = applyLora s s.target_modules model.Module
        checkAdaptersRun model adapters
        loadAdapterTensors file adapters
        model.Module.eval ()
        model, adapters
    with _ ->
        (model :> IDisposable).Dispose()
        reraise ()

// ---------------------------------------------------------------- configuration

/// Families whose loss (transformers' forward with labels) already adds their router losses, weighted by their
/// config (Switch Transformers' router_z_loss_coef and router_aux_loss_coef).
let lossIncludesRouterLosses (modelType: string) = modelType = "switch_transformers"

/// A fine-tuning run.
type FinetuneConfig =
    { /// The run folder is `RunsDir/Name`.
      Name: string
      RunsDir: string
      /// The pretrained checkpoint folder (Hugging Face layout).
      Model: string
      /// A data file or folder (`Summarizer.splitFilesOf`): a folder with train/validation/test files, an XSum
      /// release, or one file that is divided (validation first, then test, the rest training).
      Data: string
      Loader: DataConfig
      /// Keep at most this many examples per split (None = all; for one divided file, 5% each for
      /// validation and test).
      MaxTrain: int option
      MaxValid: int option
      MaxTest: int option
      /// Put before every document (T5's "summarize: "); None = config.json's
      /// task_specific_params.summarization.prefix when present, else none.
      SourcePrefix: string option
      /// Sources and targets are cut to these many tokens, special tokens included.
      MaxSourceTokens: int
      MaxTargetTokens: int
      /// None = full fine-tuning; Some = LoRA adapters only.
      Lora: LoraSettings option
      /// With LoRA: write the PEFT adapter folder instead of merged weights.
      AdapterOnly: bool
      Train: TrainConfig }

module FinetuneConfig =
    /// Small runs on CPU: 200 steps of batch 8 at 1e-4 (3e-4 is common for LoRA; set it with --set).
    let defaults : FinetuneConfig =
        { Name = "finetune"
          RunsDir = "runs"
          Model = ""
          Data = ""
          Loader = DataConfig.defaults
          MaxTrain = None
          MaxValid = None
          MaxTest = None
          SourcePrefix = None
          MaxSourceTokens = 512
          MaxTargetTokens = 64
          Lora = None
          AdapterOnly = false
          Train =
            { TrainConfig.defaults with
                Steps = 200
                BatchSize = 8
                LearningRate = 1e-4
                WarmupSteps = 20
                LogEvery = 10
                EvalEvery = 50
                CheckpointEvery = 50
                LabelSmoothing = 0.0 } }

    /// Every problem with the config, each prefixed by its section.
    let validate (cfg: FinetuneConfig) : string list =
        [ if String.IsNullOrWhiteSpace cfg.Name || cfg.Name.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0 then
              sprintf "Name must be a folder name, got \"%s\"" cfg.Name
          if not (Directory.Exists cfg.Model) then sprintf "Model: checkpoint folder %s does not exist" cfg.Model
          if not (File.Exists cfg.Data || Directory.Exists cfg.Data) then sprintf "Data: %s does not exist" cfg.Data
          for name, m in [ "MaxTrain", cfg.MaxTrain; "MaxValid", cfg.MaxValid; "MaxTest", cfg.MaxTest ] do
              match m with
              | Some n when n < 1 -> sprintf "%s must be >= 1 (or null for all), got %d" name n
              | _ -> ()
          if cfg.MaxSourceTokens < 2 then sprintf "MaxSourceTokens must be >= 2, got %d" cfg.MaxSourceTokens
          if cfg.MaxTargetTokens < 2 then sprintf "MaxTargetTokens must be >= 2, got %d" cfg.MaxTargetTokens
          match cfg.Lora with
          | Some l -> yield! LoraSettings.validate l |> List.map (fun p -> "Lora: " + p)
          | None -> if cfg.AdapterOnly then "AdapterOnly needs LoRA (Lora), but this is full fine-tuning"
          // The family's loss (transformers' forward with labels) has no label smoothing.
          if cfg.Train.LabelSmoothing <> 0.0 then
              sprintf "Train.LabelSmoothing must be 0 for fine-tuning (the checkpoint's own loss is used), got %g" cfg.Train.LabelSmoothing
          yield! TrainConfig.validate cfg.Train |> List.map (fun p -> "Train: " + p) ]

    /// Reads a config file (JSON; fields left out keep `over`'s values) and applies `KEY=VALUE` overrides.
    let load (over: FinetuneConfig) (file: string option) (assignments: string list) : Result<FinetuneConfig, string list> =
        let root =
            match file with
            | None -> Ok(Json.toNode over)
            | Some f when not (File.Exists f) -> Error [ sprintf "config file not found: %s" f ]
            | Some f -> Json.parse (File.ReadAllText f) |> Result.mapError (fun e -> [ sprintf "%s: %s" f e ])
        root
        |> Result.bind (fun n -> Json.applyAssignments n assignments)
        |> Result.bind (fun n -> Json.readOver over n)

/// config.json's task_specific_params.summarization.prefix, when the checkpoint has one.
let checkpointPrefix (modelDir: string) : string option =
    let path = Path.Combine(modelDir, "config.json")
    use doc = JsonDocument.Parse(File.ReadAllText path)
    match doc.RootElement.TryGetProperty "task_specific_params" with
    | true, ps when ps.ValueKind = JsonValueKind.Object ->
        match ps.TryGetProperty "summarization" with
        | true, s when s.ValueKind = JsonValueKind.Object ->
            match s.TryGetProperty "prefix" with
            | true, p when p.ValueKind = JsonValueKind.String -> Some(p.GetString())
            | _ -> None
        | _ -> None
    | _ -> None

// ---------------------------------------------------------------- data

/// One example's token ids: the prefixed document and the summary, each with the tokenizer's special tokens.
type Encoded = { Source: int[]; Target: int[] }

/// The splits, tokenized.
type Prepared =
    { Prefix: string
      Train: Encoded[]
      Valid: Encoded[]
      Test: Encoded[]
      /// The test examples' texts (lead-1, references).
      TestExamples: Example[]
      Notes: string list }

/// `text`'s ids with the tokenizer's special tokens, its own ids cut so the whole is at most `maxTokens`
/// (transformers' truncation=True: special tokens kept).
let encodeTruncated (tokenizer: HfTokenizer.HfTokenizer) (maxTokens: int) (text: string) : int[] =
    let prefix, inner, suffix = tokenizer.EncodeParts text
    let budget = maxTokens - prefix.Length - suffix.Length
    if budget < 0 then invalidArg "maxTokens" (sprintf "%d tokens cannot hold the %d special tokens the tokenizer adds" maxTokens (prefix.Length + suffix.Length))
    Array.concat [ prefix; inner.[.. min inner.Length budget - 1]; suffix ]

let private loaderFor (cfg: FinetuneConfig) (path: string) (split: string) : DataConfig =
    let format = match cfg.Loader.Format with Some f -> f | None -> detectFormat path
    if format = XsumRaw && cfg.Loader.Split.IsNone then { cfg.Loader with Split = Some split } else cfg.Loader

/// Reads the three splits. One file that is not an XSum release is divided: validation first, then test, the
/// rest training (each held-out part MaxValid/MaxTest examples, or 5% and at least one).
let readSplits (cfg: FinetuneConfig) : Example[] * Example[] * Example[] * string list =
    let files = Summarizer.splitFilesOf cfg.Data
    let read (path: string) (split: string) =
        let reader = Data.read (loaderFor cfg path split) path
        let xs = reader.Examples |> Seq.toArray
        xs, reader.Report.Notes |> List.map (fun n -> sprintf "%s (%s): %s" split path n)
    let cap (limit: int option) (xs: Example[]) = match limit with Some n -> Array.truncate n xs | None -> xs
    let oneFile = files.Train = files.Valid && files.Valid = files.Test
    let isXsum = (match cfg.Loader.Format with Some f -> f | None -> detectFormat files.Train) = XsumRaw
    let train, valid, test, notes =
        if oneFile && not isXsum then
            let all, notes = read files.Train "all"
            let held (limit: int option) = match limit with Some n -> n | None -> max 1 (all.Length / 20)
            let nv, nt = held cfg.MaxValid, held cfg.MaxTest
            if all.Length < nv + nt + 1 then
                invalidOp (sprintf "%s has %d examples, too few to hold out %d for validation and %d for test and train on the rest" cfg.Data all.Length nv nt)
            let valid, rest = Array.splitAt nv all
            let test, train = Array.splitAt nt rest
            cap cfg.MaxTrain train, valid, test,
            notes @ [ sprintf "one file divided: validation = examples 1-%d, test = the next %d, training = the rest" nv nt ]
        else
            let tr, n1 = read files.Train "train"
            let va, n2 = read files.Valid "validation"
            let te, n3 = read files.Test "test"
            cap cfg.MaxTrain tr, cap cfg.MaxValid va, cap cfg.MaxTest te, n1 @ n2 @ n3
    for name, xs in [ "train", train; "validation", valid; "test", test ] do
        if xs.Length = 0 then invalidOp (sprintf "the %s split has no examples; check the data path and loader settings" name)
    train, valid, test, notes

/// Reads and tokenizes the splits: sources are prefix + document, targets the summaries.
let prepare (cfg: FinetuneConfig) (tokenizer: HfTokenizer.HfTokenizer) : Prepared =
    let train, valid, test, notes = readSplits cfg
    let prefix = match cfg.SourcePrefix with Some p -> p | None -> defaultArg (checkpointPrefix cfg.Model) ""
    let encode (xs: Example[]) =
        xs |> Array.map (fun e -> { Source = encodeTruncated tokenizer cfg.MaxSourceTokens (prefix + e.Document)
                                    Target = encodeTruncated tokenizer cfg.MaxTargetTokens e.Summary })
    { Prefix = prefix; Train = encode train; Valid = encode valid; Test = encode test; TestExamples = test; Notes = notes }

/// A batch as transformers' collator makes it: input ids [N; S] int64 padded with `pad`, attention mask
/// [N; S] bool, labels [N; T] int64 with padding set to -100.
let collate (pad: int) (rows: Encoded[]) : Tensor * Tensor * Tensor =
    let n = rows.Length
    let s = rows |> Array.map (fun r -> r.Source.Length) |> Array.max
    let t = rows |> Array.map (fun r -> r.Target.Length) |> Array.max
    let ids = Array.create (n * s) (int64 pad)
    let mask = Array.create (n * s) false
    let labels = Array.create (n * t) Bart.ignoreIndex
    rows |> Array.iteri (fun i r ->
        r.Source |> Array.iteri (fun j id -> ids[i * s + j] <- int64 id; mask[i * s + j] <- true)
        r.Target |> Array.iteri (fun j id -> labels[i * t + j] <- int64 id))
    let src, tgt = [| int64 n; int64 s |], [| int64 n; int64 t |]
    torch.tensor(ids, ReadOnlySpan<int64> src), torch.tensor(mask, ReadOnlySpan<int64> src), torch.tensor(labels, ReadOnlySpan<int64> tgt)

/// The fine-tuning task: batches are example indices (shuffled by (seed, epoch) for training, in order for
/// validation); the loss is the checkpoint family's own (transformers' forward with labels).
let task (cfg: FinetuneConfig) (model: HfSeq2Seq.HfSeq2Seq) (prepared: Prepared) (device: torch.Device) : TrainTask<int[]> =
    let batch = cfg.Train.BatchSize
    let lossOf (rows: Encoded[]) (indices: int[]) : LossParts =
        let ids, mask, labels = collate model.PadTokenId (indices |> Array.map (fun i -> rows[i]))
        let on (x: Tensor) = if x.device = device then x else x.``to`` device
        let loss, reports = model.Loss (on ids) (on mask) (on labels)
        { TaskLoss = loss; Moe = reports; Tokens = indices |> Array.sumBy (fun i -> int64 rows[i].Target.Length) }
    { Model = model.Module
      TrainBatches =
        fun seed epoch ->
            // A fixed function of (seed, epoch), not HashCode.Combine (seeded per process): a resumed run replays
            // the same order. The prime stride keeps epochs of nearby seeds apart.
            let rng = Random(seed * 7919 + epoch)
            let order = Array.init prepared.Train.Length id
            rng.Shuffle order
            order |> Array.chunkBySize batch |> Seq.ofArray
      ValidBatches = fun () -> Array.init prepared.Valid.Length id |> Array.chunkBySize batch |> Seq.ofArray
      Loss = fun phase indices -> lossOf (if phase = Training then prepared.Train else prepared.Valid) indices
      Config = [ "finetune", box cfg ]
      Tokenizer = "" }

/// The token-weighted mean loss over `rows` in evaluation mode (the trainer's validation loss).
let meanLoss (model: HfSeq2Seq.HfSeq2Seq) (rows: Encoded[]) (batchSize: int) (device: torch.Device) : float =
    let wasTraining = model.Module.training
    model.Module.eval ()
    try
        use _ = torch.no_grad ()
        let mutable sum, tokens = 0.0, 0L
        for chunk in Array.chunkBySize batchSize rows do
            use _ = torch.NewDisposeScope()
            let ids, mask, labels = collate model.PadTokenId chunk
            let loss, _ = model.Loss (ids.``to`` device) (mask.``to`` device) (labels.``to`` device)
            let n = chunk |> Array.sumBy (fun r -> int64 r.Target.Length)
            sum <- sum + scalar loss * float n
            tokens <- tokens + n
        sum / float (max tokens 1L)
    finally
        if wasTraining then model.Module.train ()

// ---------------------------------------------------------------- Hugging Face output

/// The generation fields transformers' `GenerationConfig.from_model_config` takes from config.json.
let private generationFields =
    [ "decoder_start_token_id"; "bos_token_id"; "eos_token_id"; "pad_token_id"; "forced_bos_token_id"; "forced_eos_token_id"
      "max_length"; "min_length"; "num_beams"; "length_penalty"; "early_stopping"; "no_repeat_ngram_size" ]

/// Writes `model` (with its adapters merged, if any) as a Hugging Face checkpoint folder: the source
/// checkpoint's config.json as is, model.safetensors (the family's state dict: tied copies once), the source's
/// generation_config.json (or one made from config.json's generation fields) and tokenizer files.
let saveMerged (overwrite: bool) (dir: string) (model: HfSeq2Seq.HfSeq2Seq) (adapters: LoraAdapter list) (tokenizer: HfTokenizer.HfTokenizer) : unit =
    let configPath = Path.Combine(model.Folder, "config.json")
    let config = JsonNode.Parse(File.ReadAllText configPath)
    do
        use _ = torch.NewDisposeScope()
        let state = mergedStateDict adapters (model.StateDict()) |> List.map (fun (n, t) -> n, t.detach().cpu ())
        HfCheckpoint.saveFolderWith overwrite dir config state None
    // saveFolder re-serialises the JSON; the source's own text is kept byte for byte (number formats, order).
    writeText (Path.Combine(dir, "config.json")) (File.ReadAllText configPath)
    let copied = HfCheckpoint.copyTokenizerFiles model.Folder dir
    if not (List.contains "generation_config.json" copied) then
        let g = JsonObject()
        match config with
        | :? JsonObject as o ->
            for f in generationFields do
                match o[f] with
                | null -> ()
                | v -> g[f] <- v.DeepClone()
        | _ -> ()
        writeText (Path.Combine(dir, "generation_config.json")) (indented g)
    HfTokenizer.save dir tokenizer

// ---------------------------------------------------------------- the job

/// What a fine-tuning run produced.
type FinetuneResult =
    { RunDir: string
      Train: TrainResult
      /// The validation loss of the pretrained model, and of the fine-tuned one (best checkpoint).
      ValidLossBefore: float
      ValidLossAfter: float
      /// The Hugging Face folder written (`RunDir/hf`): a checkpoint, or a PEFT adapter folder with AdapterOnly.
      HfFolder: string
      /// Trainable parameters (all of them, or the adapters').
      Trainable: int64
      Total: int64
      Notes: string list }

/// The Hugging Face folder inside a fine-tuning run folder.
let hfFolderName = "hf"

/// Fine-tunes `cfg.Model` on `cfg.Data` into `RunsDir/Name` (holding the folder's lock; an existing run is
/// refused unless `opts.Overwrite`, continued with `resume`) with `Train.Loop`, then writes `hf/` from the
/// best-validation checkpoint: the merged (or fully tuned) checkpoint, or with AdapterOnly the PEFT adapter
/// folder plus the tokenizer files.
let runWith (opts: RunOptions) (resume: bool) (cfg: FinetuneConfig) : FinetuneResult =
    Config.orFail "fine-tuning config" (FinetuneConfig.validate cfg) cfg |> ignore
    let say (text: string) = if opts.Progress <> Silent then (if isNull opts.Output then Console.Out else opts.Output).WriteLine text
    let resume = resume || opts.ResumeFrom.IsSome
    let runDir = Path.Combine(cfg.RunsDir, cfg.Name)
    use _lock = RunFolder.acquire (sprintf "fine-tuning run %s" cfg.Name) runDir
    if not resume then RunFolder.startFresh opts.Overwrite runDir
    let opts = { opts with Overwrite = false }
    use tokenizer = HfTokenizer.fromFolder cfg.Model
    use model = HfSeq2Seq.load cfg.Model
    HfTokenizer.checkAgainst model.Model.VocabSize tokenizer
    // The adapters' initial draws come from the run's seed, so a resumed run rebuilds the same model.
    Native.seedAll cfg.Train.Seed
    let targets = cfg.Lora |> Option.map (LoraSettings.targetsFor model.ModelType)
    let adapters =
        match cfg.Lora, targets with
        | Some l, Some ts ->
            let adapters = applyLora l ts model.Module
            checkAdaptersRun model adapters
            adapters
        | _ -> []
    // transformers' Switch loss already holds its router losses, weighted by its config; the trainer must not
    // add them again.
    let cfg =
        if lossIncludesRouterLosses model.ModelType && cfg.Train.LossWeights <> LossWeights.none then
            say (sprintf "%s: the model's loss already includes its weighted router losses; Train.LossWeights set to zero" model.ModelType)
            { cfg with Train = { cfg.Train with LossWeights = LossWeights.none } }
        else cfg
    let prepared = prepare cfg tokenizer
    say (sprintf "data: %d train, %d validation, %d test examples; source prefix %s" prepared.Train.Length prepared.Valid.Length
             prepared.Test.Length (if prepared.Prefix = "" then "(none)" else sprintf "\"%s\"" prepared.Prefix))
    for n in prepared.Notes do say ("  " + n)
    let total = model.Module.parameters () |> Seq.sumBy (fun p -> p.NumberOfElements)
    let trainable = model.Module.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.sumBy (fun p -> p.NumberOfElements)
    say (sprintf "model: %s (%s), %d parameters, %d trainable (%s)" cfg.Model model.ModelType total trainable
             (match cfg.Lora, targets with
              | Some l, Some ts -> sprintf "LoRA r %d, lora_alpha %g on %d modules %A" l.r l.lora_alpha adapters.Length ts
              | _ -> "full fine-tuning"))
    RunFiles.writeParameters runDir { Total = total; Active = total; Trainable = trainable }
    let device = Native.resolveDevice cfg.Train.Device
    model.Module.``to`` device |> ignore
    let before = meanLoss model prepared.Valid cfg.Train.BatchSize device
    say (sprintf "validation loss before fine-tuning: %.4f" before)
    let t = task cfg model prepared device
    let trained = if resume then Train.Loop.resumeWith opts cfg.Train t runDir else Train.Loop.runWith opts cfg.Train t runDir
    let ckpt = defaultArg trained.BestCheckpoint trained.LastCheckpoint
    Checkpoint.loadModel ckpt model.Module
    model.Module.eval ()
    let after = meanLoss model prepared.Valid cfg.Train.BatchSize device
    say (sprintf "validation loss after fine-tuning: %.4f (%s)" after (Path.GetFileName ckpt))
    let hf = Path.Combine(runDir, hfFolderName)
    if Directory.Exists hf then Directory.Delete(hf, true)
    match cfg.Lora, targets with
    | Some l, Some ts when cfg.AdapterOnly ->
        saveAdapter hf (Path.GetFullPath cfg.Model) l ts adapters
        HfCheckpoint.copyTokenizerFiles cfg.Model hf |> ignore
        HfTokenizer.save hf tokenizer
    | _ -> saveMerged false hf model adapters tokenizer
    say (sprintf "wrote %s (%s)" hf (if cfg.AdapterOnly then "PEFT adapter folder" else "Hugging Face checkpoint"))
    { RunDir = runDir; Train = trained; ValidLossBefore = before; ValidLossAfter = after; HfFolder = hf
      Trainable = trainable; Total = total; Notes = prepared.Notes }

/// `runWith` with default options, from scratch.
let run (cfg: FinetuneConfig) : FinetuneResult = runWith RunOptions.Defaults false cfg

// ---------------------------------------------------------------- the toolkit's own summarizer, exported

/// The toolkit's tokenizer file in an exported folder (`Tokenizers.save`: the base encoder and the vocabulary).
let moeTokenizerFileName = "moe_tokenizer.json"

/// The tokenizer of a folder `exportRun` wrote.
let loadExportedTokenizer (dir: string) : Tokenizers.Tokenizer =
    let path = Path.Combine(dir, moeTokenizerFileName)
    if not (File.Exists path) then failwithf "%s: not found (a folder exported with `moe export-hf` has it)" path
    Tokenizers.load path

/// generation_config.json for the run's decoding settings in transformers' words. GNMT's length penalty,
/// which the toolkit's beam search uses, has no transformers equivalent and is left out (the model card says so).
let private generationConfigOf (g: Generate.GenerateConfig) (pad: int) : JsonObject =
    let o = JsonObject()
    o["decoder_start_token_id"] <- JsonValue.Create g.BosId
    o["bos_token_id"] <- JsonValue.Create g.BosId
    o["eos_token_id"] <- JsonValue.Create g.EosId
    o["pad_token_id"] <- JsonValue.Create pad
    o["num_beams"] <- JsonValue.Create g.BeamSize
    o["max_new_tokens"] <- JsonValue.Create g.MaxLength
    if g.MinLength > 0 then o["min_new_tokens"] <- JsonValue.Create g.MinLength
    if g.NoRepeatNgram > 0 then o["no_repeat_ngram_size"] <- JsonValue.Create g.NoRepeatNgram
    o

/// The model card: what the model is, how it was trained and decoded, and the run's test scores.
let private modelCard (runDir: string) (loaded: Summarizer.Loaded) : string =
    let sb = StringBuilder()
    let line (s: string) = sb.AppendLine s |> ignore
    let m = loaded.Config.Model
    line "---"
    line "library_name: moe-fs"
    line "tags: [summarization, mixture-of-experts]"
    line "---"
    line ""
    line (sprintf "# %s" loaded.Config.Name)
    line ""
    line (sprintf "The toolkit's from-scratch encoder-decoder summarizer (model_type `%s`), exported from the run folder `%s` (checkpoint `%s`)."
              HfSeq2Seq.moeSummarizerType (Path.GetFileName(Path.GetFullPath runDir)) (Path.GetFileName loaded.Checkpoint))
    line ""
    line (sprintf "- %d encoder + %d decoder layers, width %d, %d heads, vocabulary %d" m.EncoderLayers m.DecoderLayers m.ModelDim m.Heads m.VocabSize)
    line (sprintf "- feed-forward: %s"
              (match m.Ffn with
               | Dense h -> sprintf "dense, hidden %d" h
               | Moe c -> sprintf "MoE, %d experts, %d per token (%A)" c.Router.Experts c.Router.K c.Router.Selection
               | LoraMoe (c, l) -> sprintf "LoRA-expert MoE, %d experts of rank %d" c.Router.Experts l.Rank))
    line (sprintf "- trained %d steps, batch %d, learning rate %g" loaded.Config.Train.Steps loaded.Config.Train.BatchSize loaded.Config.Train.LearningRate)
    line (sprintf "- decoded with beam %d, GNMT length penalty %g (transformers has no GNMT penalty: generation_config.json leaves it out), at most %d tokens"
              loaded.Config.Generate.BeamSize loaded.Config.Generate.LengthPenalty loaded.Config.Generate.MaxLength)
    line ""
    line "Load it with `./moe generate --model DIR` or `HfSeq2Seq.load DIR` (weights) and `Finetune.loadExportedTokenizer DIR` (tokenizer)."
    line ""
    line "## Test scores"
    line ""
    let scoresPath = Path.Combine(runDir, "test_scores.json")
    if File.Exists scoresPath then
        let root = JsonNode.Parse(File.ReadAllText scoresPath)
        let number (node: JsonNode) : float = node.GetValue<float>()
        let f1 (who: string) (metric: string) = 100.0 * number (root.[who].[metric].["f1"])
        line "| system | ROUGE-1 F1 | ROUGE-2 F1 | ROUGE-L F1 | BLEU |"
        line "|---|---|---|---|---|"
        for who, label in [ "model", "this model"; "lead1", "lead-1" ] do
            line (sprintf "| %s | %.1f | %.1f | %.1f | %.1f |" label (f1 who "rouge1") (f1 who "rouge2") (f1 who "rougeL") (number (root[who]["bleu"])))
        line ""
        line (sprintf "n = %d test examples (the run's `test_scores.json`)." (int (number (root["model"]["n"]))))
    else
        line "The run has no test_scores.json (it was cancelled before decoding the test split)."
    sb.ToString()

/// Writes the from-scratch summarizer of `runDir` (best checkpoint, else last) as a Hugging Face folder:
/// config.json (model_type "moe_summarizer", the model config under `moe_config`, special token ids),
/// model.safetensors (parameters and buffers named as the toolkit's modules name them), generation_config.json
/// from the run's decoding settings, the toolkit's tokenizer file and a README.md model card with the run's test
/// scores. `HfSeq2Seq.load OUT` reads it back. Refuses a non-empty `outDir` unless `overwrite`.
let exportRun (overwrite: bool) (runDir: string) (outDir: string) : unit =
    if not (Directory.Exists runDir) then invalidArg "runDir" (sprintf "run folder %s does not exist" runDir)
    use loaded = Summarizer.load runDir None Native.Cpu
    let specials = Tokenizers.specials
    let config = JsonObject()
    config["model_type"] <- JsonValue.Create HfSeq2Seq.moeSummarizerType
    config["is_encoder_decoder"] <- JsonValue.Create true
    config["vocab_size"] <- JsonValue.Create loaded.Config.Model.VocabSize
    config["pad_token_id"] <- JsonValue.Create specials.Pad
    config["bos_token_id"] <- JsonValue.Create specials.Bos
    config["eos_token_id"] <- JsonValue.Create specials.Eos
    config["decoder_start_token_id"] <- JsonValue.Create specials.Bos
    config[HfSeq2Seq.moeConfigField] <- Json.toNode loaded.Config.Model
    let state =
        [ for struct (n, p) in loaded.Model.named_parameters () -> n, (p :> Tensor)
          for struct (n, b) in loaded.Model.named_buffers (include_nonpersistent = false) -> n, b ]
    HfCheckpoint.saveFolderWith overwrite outDir config state None
    writeText (Path.Combine(outDir, "generation_config.json")) (indented (generationConfigOf loaded.Config.Generate specials.Pad))
    Tokenizers.save (Path.Combine(outDir, moeTokenizerFileName)) loaded.Tokenizer
    writeText (Path.Combine(outDir, "README.md")) (modelCard runDir loaded)

// ---------------------------------------------------------------- test-split scores (scripts/finetune_t5.fsx)

/// Summaries of the test split from a Hugging Face folder (a fine-tuned `hf/`), decoded with its generation
/// config (and config.json's summarization task settings when it has them), `overrides` applied last.
let summarizeTest (hfDir: string) (prepared: Prepared) (batchSize: int) (overrides: string list) : string[] =
    use model = HfSeq2Seq.load hfDir
    use tokenizer = HfTokenizer.fromFolder hfDir
    let configPath = Path.Combine(hfDir, "config.json")
    let gen = Generate.GenerationConfig.load hfDir
    let gen = if (checkpointPrefix hfDir).IsSome then fst (Generate.GenerationConfig.withTaskParams configPath "summarization" gen) else gen
    let gen = Generate.GenerationConfig.setAll overrides gen
    [| for chunk in Array.chunkBySize batchSize prepared.Test do
        use _ = torch.NewDisposeScope()
        let ids, mask, _ = collate model.PadTokenId chunk
        for r in Generate.run gen model.Model ids mask do
            yield tokenizer.Decode(r.Sequences[0], true) |]

/// The model's and lead-1's ROUGE/BLEU on the test split (Porter stemming, as rouge-score's use_stemmer).
let scoreTest (predictions: string[]) (examples: Example[]) : Summarizer.TestScores =
    let opts = { Metrics.Scoring.defaultOptions with Stem = true }
    let refs = examples |> Array.map (fun e -> e.Summary)
    let docs = examples |> Array.map (fun e -> e.Document)
    { Model = Metrics.Scoring.scoreCorpus opts predictions refs (Some docs)
      Lead1 = Metrics.Scoring.scoreCorpus opts (docs |> Array.map Summarizer.lead1) refs (Some docs) }

/// The from-scratch runs in `runsDir` that have test scores: (run name, ROUGE-1, ROUGE-2, ROUGE-L F1 x100).
let fromScratchScores (runsDir: string) : (string * float * float * float) list =
    if not (Directory.Exists runsDir) then []
    else
        [ for d in Directory.GetDirectories runsDir |> Array.sort do
            let path = Path.Combine(d, "test_scores.json")
            if File.Exists path && not (Directory.Exists(Path.Combine(d, hfFolderName))) then
                let root = JsonNode.Parse(File.ReadAllText path)
                let f1 (metric: string) = 100.0 * root.["model"].[metric].["f1"].GetValue<float>()
                Path.GetFileName d, f1 "rouge1", f1 "rouge2", f1 "rougeL" ]

/// What `scripts/finetune_t5.fsx` runs.
type ScriptOptions =
    { /// The checkpoint folder and the data path.
      Model: string
      Data: string
      /// LoRA rank (None = full fine-tuning).
      Lora: int option
      Steps: int
      RunsDir: string
      /// The smoke settings: a few dozen examples, a few steps, short outputs.
      Smoke: bool }

module ScriptOptions =
    /// The tiny checkpoint the smoke run fine-tunes (in the shared folder's models/).
    let smokeModel = "t5-tiny"
    /// The XSum documents the smoke run reads (in the shared folder's data/).
    let smokeData = Path.Combine("xsum-test-docs", "test.h2o_helm.jsonl")

    /// `--smoke` | `--model DIR --data PATH`, with `--lora R`, `--steps N`, `--runs-dir D`; `shared` is the
    /// shared folder holding models/ and data/ (for --smoke).
    let parse (shared: string) (args: string[]) : Result<ScriptOptions, string> =
        let rec go (o: ScriptOptions) (rest: string list) =
            match rest with
            | [] -> Ok o
            | "--smoke" :: r ->
                go { o with Smoke = true; Model = Path.Combine(shared, "models", smokeModel); Data = Path.Combine(shared, "data", smokeData)
                            Steps = 12 } r
            | "--model" :: v :: r -> go { o with Model = v } r
            | "--data" :: v :: r -> go { o with Data = v } r
            | "--runs-dir" :: v :: r -> go { o with RunsDir = v } r
            | ("--lora" | "--steps" as flag) :: v :: r ->
                match Int32.TryParse v with
                | true, n when n >= 1 -> go (if flag = "--lora" then { o with Lora = Some n } else { o with Steps = n }) r
                | _ -> Error(sprintf "%s expects a whole number >= 1, got '%s'" flag v)
            | other :: _ -> Error(sprintf "unknown argument '%s' (expected --smoke | --model DIR --data PATH [--lora R] [--steps N] [--runs-dir D])" other)
        match go { Model = ""; Data = ""; Lora = None; Steps = FinetuneConfig.defaults.Train.Steps; RunsDir = "runs"; Smoke = false } (List.ofArray args) with
        | Ok o when o.Model = "" || o.Data = "" -> Error "expected --smoke, or --model DIR and --data PATH"
        | r -> r

/// The script's run: fine-tunes, prints the validation loss before and after, decodes the test split with the
/// exported folder and prints the table against lead-1 and the from-scratch runs in `RunsDir`.
let runScript (opts: RunOptions) (o: ScriptOptions) : FinetuneResult * Summarizer.TestScores =
    let out = if isNull opts.Output then Console.Out else opts.Output
    let d = FinetuneConfig.defaults
    let cfg =
        { d with
            Name = (if o.Smoke then "finetune-smoke" else sprintf "finetune-%s" (Path.GetFileName(Path.GetFullPath(o.Model).TrimEnd('/'))))
            RunsDir = o.RunsDir
            Model = o.Model
            Data = o.Data
            Lora = o.Lora |> Option.map (fun r -> { LoraSettings.defaults with r = r; lora_alpha = float (2 * r) })
            MaxTrain = (if o.Smoke then Some 32 else None)
            MaxValid = (if o.Smoke then Some 8 else None)
            MaxTest = (if o.Smoke then Some 8 else None)
            MaxSourceTokens = (if o.Smoke then 128 else d.MaxSourceTokens)
            MaxTargetTokens = (if o.Smoke then 32 else d.MaxTargetTokens)
            Train =
                { d.Train with
                    Steps = o.Steps
                    BatchSize = (if o.Smoke then 4 else d.Train.BatchSize)
                    LearningRate = (if o.Smoke then 1e-3 else d.Train.LearningRate)
                    WarmupSteps = min d.Train.WarmupSteps (o.Steps / 10)
                    EvalEvery = (if o.Smoke then 0 else d.Train.EvalEvery)
                    CheckpointEvery = (if o.Smoke then 0 else d.Train.CheckpointEvery) } }
    let result = runWith { opts with Overwrite = true } false cfg
    use tokenizer = HfTokenizer.fromFolder o.Model
    let prepared = prepare cfg tokenizer
    let predictions = summarizeTest result.HfFolder prepared cfg.Train.BatchSize (if o.Smoke then [ "max_new_tokens=16" ] else [])
    let scores = scoreTest predictions prepared.TestExamples
    out.WriteLine(sprintf "validation loss: %.4f before, %.4f after fine-tuning (%d steps)" result.ValidLossBefore result.ValidLossAfter result.Train.Steps)
    out.WriteLine(Summarizer.comparisonTable scores)
    match fromScratchScores o.RunsDir with
    | [] -> out.WriteLine(sprintf "(no from-scratch runs with test scores in %s to compare with)" o.RunsDir)
    | runs ->
        out.WriteLine(sprintf "%-24s %8s %8s %8s" "from-scratch run" "ROUGE-1" "ROUGE-2" "ROUGE-L")
        for name, r1, r2, rl in runs do out.WriteLine(sprintf "%-24s %8.1f %8.1f %8.1f" name r1 r2 rl)
    result, scores
