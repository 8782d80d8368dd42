/// `moe finetune`: a pretrained encoder-decoder fine-tuned on a summarization data set (fully or with LoRA),
/// or a decoder-only LM instruction-tuned on it through its chat template (`InstructTune`, picked by
/// config.json's model_type), written in Hugging Face layout; `moe export-hf`: a from-scratch run folder in Hugging Face layout.
module Moe.FinetuneCommand

open System
open System.IO
open Argu
open Moe
open Moe.Finetune

type FinetuneArgs =
    | [<Mandatory>] Model of dir: string
    | [<Mandatory>] Data of path: string
    | Lora of rank: int
    | Full
    | Lora_Alpha of alpha: float
    | Lora_Dropout of p: float
    | Target_Modules of names: string list
    | Source_Prefix of prefix: string
    | Adapter_Only
    | [<AltCommandLine("-c")>] Config of path: string
    | [<AltCommandLine("-s")>] Set of assignment: string
    | Name of name: string
    | Runs_Dir of path: string
    | Overwrite
    | Resume
    | Plain
    | Print_Config
    | System_Prompt of text: string
    | No_System_Prompt
    | User_Prompt of text: string
    | Base_Dtype of dtype: string
    | Gradient_Checkpointing
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Model _ -> "a pretrained checkpoint folder in Hugging Face layout (config.json, weights, tokenizer files)."
            | Data _ -> "a dataset: a folder with train*/validation*/test* files, an XSum release, or one file (divided: validation, test, the rest training)."
            | Lora _ -> "LoRA with this rank r: only the adapters train (Hu et al. 2021)."
            | Full -> "full fine-tuning: every parameter trains (the default)."
            | Lora_Alpha _ -> "LoRA lora_alpha: the update is scaled by lora_alpha / r (default 8, PEFT's)."
            | Lora_Dropout _ -> "LoRA lora_dropout on the adapters' input (default 0)."
            | Target_Modules _ -> "LoRA target_modules (default PEFT's for the family: q_proj v_proj for BART/Pegasus, q v for T5/Switch; for decoder-only LMs all of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)."
            | Source_Prefix _ -> "text put before every document (default: config.json's task_specific_params.summarization.prefix, e.g. T5's \"summarize: \")."
            | Adapter_Only -> "with --lora: write hf/ as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) instead of merged weights."
            | Config _ -> "a JSON config (a FinetuneConfig; fields left out keep the defaults; see --print-config)."
            | Set _ -> "override one field, e.g. --set Train.Steps=500 --set MaxSourceTokens=256 (repeatable, after --config)."
            | Name _ -> "the run's name: it writes RUNS_DIR/NAME (default 'finetune')."
            | Runs_Dir _ -> "folder for run folders (default runs)."
            | Overwrite -> "replace the run already in the run folder."
            | Resume -> "continue the run from its newest loadable checkpoint (same config)."
            | Plain -> "plain progress lines instead of a progress bar."
            | Print_Config -> "print the resolved config as JSON and exit."
            | System_Prompt _ -> "decoder-only: the chat's system message (default: InstructTune.Prompt.defaultSystem)."
            | No_System_Prompt -> "decoder-only: no system message."
            | User_Prompt _ -> "decoder-only: the user message, with {document} where the document goes (default asks for a one-sentence summary)."
            | Base_Dtype _ -> "decoder-only: the frozen base's dtype, float32 (default) or bfloat16; adapters stay float32."
            | Gradient_Checkpointing -> "decoder-only: recompute each decoder layer's activations in the backward pass (less memory, one more forward)."

type ExportHfArgs =
    | [<MainCommand; ExactlyOnce; Last>] Paths of run_dir_and_out: string list
    | Overwrite
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Paths _ -> "RUN_DIR OUT: a from-scratch run folder (moe train) and the Hugging Face folder to write."
            | Overwrite -> "replace the weights and config of a non-empty OUT."

/// The config the flags describe: defaults, then --config, then --set, then the named flags.
let configOf (args: ParseResults<FinetuneArgs>) : FinetuneConfig =
    let cfg =
        match FinetuneConfig.load FinetuneConfig.defaults (args.TryGetResult Config) (args.GetResults Set) with
        | Ok c -> c
        | Error ps -> invalidArg "--config/--set" (String.concat "\n  - " ("invalid config:" :: ps))
    let cfg = { cfg with Model = args.GetResult Model; Data = args.GetResult Data }
    let cfg = match args.TryGetResult Name with Some n -> { cfg with Name = n } | None -> cfg
    let cfg = match args.TryGetResult Runs_Dir with Some d -> { cfg with RunsDir = d } | None -> cfg
    let cfg = match args.TryGetResult Source_Prefix with Some p -> { cfg with SourcePrefix = Some p } | None -> cfg
    let loraFlags = [ args.Contains Lora_Alpha; args.Contains Lora_Dropout; args.Contains Target_Modules; args.Contains Adapter_Only ]
    let cfg =
        match args.TryGetResult Lora, args.Contains Full with
        | Some _, true -> invalidArg "--lora" "give --lora R or --full, not both"
        | Some r, false ->
            let l = defaultArg cfg.Lora LoraSettings.defaults
            let l = { l with r = r }
            let l = match args.TryGetResult Lora_Alpha with Some a -> { l with lora_alpha = a } | None -> l
            let l = match args.TryGetResult Lora_Dropout with Some p -> { l with lora_dropout = p } | None -> l
            let l = match args.TryGetResult Target_Modules with Some ts -> { l with target_modules = ts } | None -> l
            { cfg with Lora = Some l; AdapterOnly = cfg.AdapterOnly || args.Contains Adapter_Only }
        | None, _ when List.contains true loraFlags && cfg.Lora.IsNone ->
            invalidArg "--lora" "--lora-alpha, --lora-dropout, --target-modules and --adapter-only need --lora R"
        | None, true -> { cfg with Lora = None; AdapterOnly = false }
        | None, false -> cfg
    match FinetuneConfig.validate cfg with
    | [] -> cfg
    | problems -> invalidArg "config" (String.concat "\n  - " ("invalid config:" :: problems))

/// The decoder-only run the flags describe: `configOf`'s settings plus the chat and memory flags.
let instructConfigOf (args: ParseResults<FinetuneArgs>) (cfg: FinetuneConfig) : InstructTune.InstructConfig =
    let d = InstructTune.InstructConfig.defaults
    let cfg =
        { d with
            Finetune = { cfg with Name = (match args.TryGetResult Name with Some n -> n | None when cfg.Name = FinetuneConfig.defaults.Name -> d.Finetune.Name | None -> cfg.Name) }
            SystemPrompt =
                match args.TryGetResult System_Prompt, args.Contains No_System_Prompt with
                | Some _, true -> invalidArg "--system-prompt" "give --system-prompt or --no-system-prompt, not both"
                | Some p, false -> Some p
                | None, true -> None
                | None, false -> d.SystemPrompt
            UserPrompt = defaultArg (args.TryGetResult User_Prompt) d.UserPrompt
            BaseDtype = defaultArg (args.TryGetResult Base_Dtype) d.BaseDtype
            Recompute = args.Contains Gradient_Checkpointing }
    match InstructTune.InstructConfig.validate cfg with
    | [] -> cfg
    | problems -> invalidArg "config" (String.concat "\n  - " ("invalid config:" :: problems))

/// Starts libtorch and reads the run flags (--plain, --overwrite, --resume) into RunOptions.
let private runOptionsOf (args: ParseResults<FinetuneArgs>) : Train.RunOptions =
    Native.initialise ()
    if args.Contains FinetuneArgs.Overwrite && args.Contains Resume then
        invalidArg "--overwrite" "--overwrite starts the run again; it cannot be combined with --resume"
    { Train.RunOptions.Defaults with
        Progress = (if args.Contains Plain then Train.Lines else Train.Auto)
        Overwrite = args.Contains FinetuneArgs.Overwrite }

/// Runs `moe finetune` on a decoder-only checkpoint.
let private instruct (args: ParseResults<FinetuneArgs>) (cfg: FinetuneConfig) : int =
    let cfg = instructConfigOf args cfg
    if args.Contains Print_Config then
        printfn "%s" (Json.serialize cfg)
        0
    else
        let opts = runOptionsOf args
        let r = InstructTune.runWith opts (args.Contains Resume) cfg
        printfn "validation loss %.4f -> %.4f; run folder %s; Hugging Face folder %s" r.ValidLossBefore r.ValidLossAfter r.RunDir r.HfFolder
        0

/// Runs `moe finetune`.
let finetune (args: ParseResults<FinetuneArgs>) : int =
    let cfg = configOf args
    let decoderFlags = [ args.Contains System_Prompt; args.Contains No_System_Prompt; args.Contains User_Prompt; args.Contains Base_Dtype; args.Contains Gradient_Checkpointing ]
    if InstructTune.isDecoderOnly cfg.Model then instruct args cfg
    elif List.contains true decoderFlags then
        invalidArg "--system-prompt" "--system-prompt, --no-system-prompt, --user-prompt, --base-dtype and --gradient-checkpointing apply to decoder-only checkpoints only"
    elif args.Contains Print_Config then
        printfn "%s" (Json.serialize cfg)
        0
    else
        let opts = runOptionsOf args
        let r = runWith opts (args.Contains Resume) cfg
        printfn "validation loss %.4f -> %.4f; run folder %s; Hugging Face folder %s" r.ValidLossBefore r.ValidLossAfter r.RunDir r.HfFolder
        0

/// Runs `moe export-hf`.
let exportHf (args: ParseResults<ExportHfArgs>) : int =
    match args.GetResult Paths with
    | [ runDir; out ] ->
        InputErrors.rejectUnknownFlags<ExportHfArgs> [ runDir; out ]
        Native.initialise ()
        exportRun (args.Contains ExportHfArgs.Overwrite) runDir out
        printfn "wrote %s (model_type %s); load it with --model %s" out HfSeq2Seq.moeSummarizerType out
        0
    | other -> invalidArg "RUN_DIR OUT" (sprintf "expected a run folder and an output folder, got %d path(s)" other.Length)
