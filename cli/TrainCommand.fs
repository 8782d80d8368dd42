/// `moe train` and `moe generate`: a summarization run from a config file plus flag overrides, and
/// decoding with a trained run's checkpoint.
module Moe.TrainCommand

open System
open System.IO
open System.Runtime.InteropServices
open System.Threading
open Argu
open Moe
open Moe.Config
open Moe.Summarizer

type TrainArgs =
    | [<AltCommandLine("-c")>] Config of path: string
    | [<AltCommandLine("-s")>] Set of assignment: string
    | Name of name: string
    | Runs_Dir of path: string
    | Data of path: string
    | Train_File of path: string
    | Valid_File of path: string
    | Test_File of path: string
    | Format of format: string
    | Router of kind: string
    | Experts of count: int
    | K of picks: int
    | Steps of steps: int
    | Batch_Size of size: int
    | Lr of rate: float
    | Max_Train of examples: int
    | Device of device: string
    | Bf16
    | Resume
    | Resume_From of path: string
    | Overwrite
    | Keep_Checkpoints of count: int
    | Print_Config
    | Plain
    | Threads of count: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Config _ -> "a JSON config (a SummarizerConfig; fields left out keep the defaults; see --print-config)."
            | Set _ -> "override one field, e.g. --set Train.Steps=500 --set Model.ModelDim=128 (repeatable, applied after --config)."
            | Name _ -> "the run's name: it writes RUNS_DIR/NAME (default from the config, 'summarizer')."
            | Runs_Dir _ -> "folder for run folders (default runs)."
            | Data _ -> "a dataset: a folder with train*/validation*/test* files, an XSum release folder or split file (default: the built-in synthetic corpus)."
            | Train_File _ -> "the training split's file (with --valid-file and --test-file, instead of --data)."
            | Valid_File _ -> "the validation split's file."
            | Test_File _ -> "the test split's file."
            | Format _ -> sprintf "the data format, when the extension does not tell: %s." Data.Format.names
            | Router _ -> "dense|topk|hash: dense FFNs, token-choice top-k MoE layers, or hash-routed MoE layers (default: the config's model; without --config the main job's top-2 of 4 experts)."
            | Experts _ -> "experts per MoE layer (with --router topk|hash; alone it means --router topk; default 4)."
            | K _ -> "experts per token for --router topk (alone it means --router topk; default 2)."
            | Steps _ -> "optimizer steps (Train.Steps)."
            | Batch_Size _ -> "examples per micro-batch (Train.BatchSize)."
            | Lr _ -> "peak learning rate (Train.LearningRate)."
            | Max_Train _ -> "keep at most this many training examples (MaxTrain)."
            | Device _ -> "auto|cpu|cuda (Train.Device; default auto)."
            | Bf16 -> "bf16 mixed precision (Train.Bf16): bfloat16 matmuls, float32 master weights, norms, softmax and loss."
            | Resume -> "continue the run from its newest loadable checkpoint (same config); unusable ones are skipped, each with the reason."
            | Resume_From _ -> "continue the run from this checkpoint file (same config) instead of the newest."
            | Overwrite -> "replace the run already in the run folder (without it, or --resume, such a folder is refused)."
            | Keep_Checkpoints _ -> sprintf "checkpoints kept besides best.ckpt: last.ckpt and older step-N.ckpt files (default %d)." Train.RunOptions.Defaults.KeepCheckpoints
            | Print_Config -> "print the resolved config as JSON and exit (a starting point for --config)."
            | Plain -> "plain progress lines instead of a progress bar."
            | Threads _ -> "CPU threads libtorch uses (default: its own choice; 1 can be much faster on a busy machine)."

type GenerateArgs =
    | [<AltCommandLine("-r")>] Run of path: string
    | [<AltCommandLine("-m")>] Model of path: string
    | [<AltCommandLine("-i")>] Input of path: string
    | Input_Ids of path: string
    | Json
    | Greedy
    | [<AltCommandLine("-s")>] Set of assignment: string
    | Batch_Size of size: int
    | [<AltCommandLine("-o")>] Output of path: string
    | Checkpoint of path: string
    | Beam of size: int
    | Max_Length of tokens: int
    | Min_Length of tokens: int
    | Length_Penalty of alpha: float
    | No_Repeat_Ngram of n: int
    | Device of device: string
    | Threads of count: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Run _ -> "a run folder written by moe train (runs/NAME)."
            | Model _ -> "instead of --run: a pretrained checkpoint folder in Hugging Face layout (config.json, weights, tokenizer files)."
            | Input _ -> "documents, one per line (with --run, default: the run's documents.txt, its test split)."
            | Input_Ids _ -> "with --model: source token ids, one JSON array per line, special tokens included, used as given."
            | Json -> "with --model: one JSON object per input line, {\"ids\": generated ids without the decoder start token, \"text\": ...}."
            | Greedy -> "with --model: plain greedy search (one beam, no length constraints, no forced tokens, no n-gram blocking; max_new_tokens from --set)."
            | Set _ -> "with --model: override a generation setting, e.g. --set Generate.MaxNewTokens=60 --set Generate.NumBeams=4 (repeatable)."
            | Batch_Size _ -> "with --model: sources decoded together (default 8)."
            | Output _ -> "where the summaries go, one per line (default: standard output)."
            | Checkpoint _ -> "a checkpoint file (default: the run's best.ckpt, else last.ckpt)."
            | Beam _ -> "beam size; 1 is greedy (default: the run's Generate.BeamSize)."
            | Max_Length _ -> "most tokens per summary."
            | Min_Length _ -> "no end of summary before this many tokens."
            | Length_Penalty _ -> "GNMT length penalty alpha (0 = none)."
            | No_Repeat_Ngram _ -> "no repeated n-gram of this size (0 = off)."
            | Device _ -> "auto|cpu|cuda (default auto)."
            | Threads _ -> "CPU threads libtorch uses (default: its own choice)."

let private device (text: string) : Native.DeviceChoice =
    match Native.parseDevice text with
    | Ok d -> d
    | Error msg -> invalidArg "--device" msg

let private setThreads (n: int option) =
    match n with
    | Some n when n < 1 -> invalidArg "--threads" (sprintf "expected at least 1 thread, got %d" n)
    | Some n -> TorchSharp.torch.set_num_threads n
    | None -> ()

let private orFailWith (flag: string) (r: Result<'a, string list>) : 'a =
    match r with
    | Ok x -> x
    | Error ps -> invalidArg flag (String.concat "\n  - " ("invalid config:" :: ps))

/// The config the flags describe: defaults, then --config, then --set, then the named flags.
let configOf (args: ParseResults<TrainArgs>) : SummarizerConfig =
    let cfg = SummarizerConfig.load SummarizerConfig.mainJob (args.TryGetResult Config) (args.GetResults TrainArgs.Set) |> orFailWith "--config/--set"
    let cfg = match args.TryGetResult Name with Some n -> { cfg with Name = n } | None -> cfg
    let cfg = match args.TryGetResult Runs_Dir with Some d -> { cfg with RunsDir = d } | None -> cfg
    let cfg =
        match args.TryGetResult Data, args.TryGetResult Train_File, args.TryGetResult Valid_File, args.TryGetResult Test_File with
        | Some _, Some _, _, _ | Some _, _, Some _, _ | Some _, _, _, Some _ ->
            invalidArg "--data" "give --data or --train-file/--valid-file/--test-file, not both"
        | Some path, None, None, None -> { cfg with Source = Files(splitFilesOf path) }
        | None, Some tr, Some va, Some te -> { cfg with Source = Files { Train = tr; Valid = va; Test = te } }
        | None, None, None, None -> cfg
        | None, _, _, _ -> invalidArg "--train-file" "expected all three of --train-file, --valid-file and --test-file"
    let cfg =
        match args.TryGetResult Format with
        | Some f ->
            match Data.Format.parse f with
            | Ok fmt -> { cfg with Loader = { cfg.Loader with Format = Some fmt } }
            | Error msg -> invalidArg "--format" msg
        | None -> cfg
    let experts = defaultArg (args.TryGetResult Experts) SummarizerConfig.mainJobExperts
    // --experts or --k alone re-sizes the top-k model rather than being ignored.
    let router =
        match args.TryGetResult Router, args.Contains Experts || args.Contains K with
        | Some r, _ -> Some(r.Trim().ToLowerInvariant())
        | None, true -> Some "topk"
        | None, false -> None
    let cfg =
        match router with
        | None -> cfg
        | Some("hash" | "dense" as r) when args.Contains K -> invalidArg "--k" (sprintf "--k applies to --router topk, not %s" r)
        | Some "dense" when args.Contains Experts -> invalidArg "--experts" "--experts applies to --router topk|hash, not dense"
        | Some "dense" ->
            match cfg.Model.Ffn with
            | Models.Moe m | Models.LoraMoe (m, _) -> { cfg with Model = { cfg.Model with Ffn = Models.Dense m.ExpertHidden } }
            | Models.Dense _ -> cfg
        | Some "topk" -> SummarizerConfig.topK experts (defaultArg (args.TryGetResult K) SummarizerConfig.mainJobK) cfg
        | Some "hash" -> SummarizerConfig.hash experts cfg
        | Some other -> invalidArg "--router" (sprintf "expected dense|topk|hash, got '%s'" other)
    let train = cfg.Train
    let train = match args.TryGetResult Steps with Some s -> { train with Steps = s } | None -> train
    let train = match args.TryGetResult TrainArgs.Batch_Size with Some b -> { train with BatchSize = b } | None -> train
    let train = match args.TryGetResult Lr with Some l -> { train with LearningRate = l } | None -> train
    let train = match args.TryGetResult TrainArgs.Device with Some d -> { train with Device = device d } | None -> train
    let train = if args.Contains Bf16 then { train with Bf16 = true } else train
    let cfg = { cfg with Train = train }
    let cfg = match args.TryGetResult Max_Train with Some n -> { cfg with MaxTrain = Some n } | None -> cfg
    match SummarizerConfig.validate cfg with
    | [] -> cfg
    | problems -> invalidArg "config" (String.concat "\n  - " ("invalid config:" :: problems))

/// SIGUSR1's number: 10 on Linux, 30 on macOS and the BSDs (.NET registers raw numbers cast to PosixSignal).
let private sigusr1 : int option =
    if OperatingSystem.IsLinux() then Some 10
    elif OperatingSystem.IsMacOS() || OperatingSystem.IsFreeBSD() then Some 30
    else None

/// The signals that stop training at the next step boundary with a checkpoint: (name, number, .NET signal).
let stopSignals : (string * int * PosixSignal) list =
    [ yield "SIGINT", 2, PosixSignal.SIGINT
      yield "SIGTERM", 15, PosixSignal.SIGTERM
      match sigusr1 with
      | Some n -> yield "SIGUSR1", n, enum<PosixSignal> n
      | None -> () ]

/// Runs `moe train`. SIGINT (Ctrl+C), SIGTERM and SIGUSR1 stop training after the current step with a checkpoint;
/// the command then exits with 128 + the signal's number (130, 143, 138 on Linux) and `--resume` continues. A
/// second signal ends the process at once (the checkpoints already written stay loadable).
let train (args: ParseResults<TrainArgs>) : int =
    let cfg = configOf args
    if args.Contains Print_Config then
        printfn "%s" (Json.serialize cfg)
        0
    else
        Native.initialise ()
        setThreads (args.TryGetResult TrainArgs.Threads)
        let keep = defaultArg (args.TryGetResult Keep_Checkpoints) Train.RunOptions.Defaults.KeepCheckpoints
        if keep < 1 then invalidArg "--keep-checkpoints" (sprintf "expected at least 1, got %d" keep)
        if args.Contains Overwrite && (args.Contains Resume || args.Contains Resume_From) then
            invalidArg "--overwrite" "--overwrite starts the run again; it cannot be combined with --resume or --resume-from"
        use cancel = new CancellationTokenSource()
        let mutable received : (string * int) option = None
        let registrations =
            [ for name, number, signal in stopSignals ->
                PosixSignalRegistration.Create(signal, fun context ->
                    lock cancel (fun () ->
                        match received with
                        | None ->
                            received <- Some(name, number)
                            context.Cancel <- true
                            eprintfn "\n%s: stopping after this step with a checkpoint (a second signal ends the process now)..." name
                            cancel.Cancel()
                        | Some _ -> ())) ]
        try
            let opts =
                { Train.RunOptions.Defaults with
                    Progress = (if args.Contains Plain then Train.Lines else Train.Auto)
                    Cancel = cancel.Token
                    Overwrite = args.Contains Overwrite
                    KeepCheckpoints = keep
                    ResumeFrom = args.TryGetResult Resume_From }
            let r = runWith opts (args.Contains Resume) cfg
            let signalled = lock cancel (fun () -> received)
            match r.Scores, signalled with
            | None, _ ->
                printfn "stopped at step %d with a checkpoint; continue with: ./moe train <same flags> --resume" r.Train.Steps
                match signalled with
                | Some(_, number) -> 128 + number
                | None -> 128 + 2
            | Some _, _ ->
                printfn "run folder: %s" r.RunDir
                0
        finally
            for r in registrations do r.Dispose()

/// Runs `moe generate`.
let generate (args: ParseResults<GenerateArgs>) : int =
    Native.initialise ()
    setThreads (args.TryGetResult GenerateArgs.Threads)
    let runDir =
        match args.TryGetResult Run with
        | Some d -> d
        | None -> invalidArg "--run" "expected --run DIR (a trained run) or --model DIR (a pretrained checkpoint folder)"
    for flag, given in [ "--input-ids", args.Contains Input_Ids; "--json", args.Contains Json; "--greedy", args.Contains Greedy
                         "--set", args.Contains Set; "--batch-size", args.Contains Batch_Size ] do
        if given then invalidArg flag (sprintf "%s applies to --model, not --run" flag)
    if not (Directory.Exists runDir) then invalidArg "--run" (sprintf "expected a run folder, but %s does not exist" runDir)
    use loaded = load runDir (args.TryGetResult Checkpoint) (device (defaultArg (args.TryGetResult GenerateArgs.Device) "auto"))
    let g = loaded.Config.Generate
    let g =
        { g with
            BeamSize = defaultArg (args.TryGetResult Beam) g.BeamSize
            MaxLength = defaultArg (args.TryGetResult Max_Length) g.MaxLength
            MinLength = defaultArg (args.TryGetResult Min_Length) g.MinLength
            LengthPenalty = defaultArg (args.TryGetResult Length_Penalty) g.LengthPenalty
            NoRepeatNgram = defaultArg (args.TryGetResult No_Repeat_Ngram) g.NoRepeatNgram }
    match Generate.GenerateConfig.validate loaded.Config.Model g with
    | [] -> ()
    | ps -> invalidArg "generation options" (String.concat "; " ps)
    let input = defaultArg (args.TryGetResult Input) (Path.Combine(runDir, "documents.txt"))
    if not (File.Exists input) then invalidArg "--input" (sprintf "expected a documents file (one per line), but %s does not exist" input)
    let documents = Metrics.Basics.readLines input
    eprintfn "summarizing %d documents from %s with %s" documents.Length input loaded.Checkpoint
    let summaries = summarizeTexts loaded (Some g) documents
    match args.TryGetResult Output with
    | Some path ->
        File.WriteAllLines(path, summaries |> Array.map oneLine)
        eprintfn "wrote %s" path
    | None -> for s in summaries do printfn "%s" (oneLine s)
    0
