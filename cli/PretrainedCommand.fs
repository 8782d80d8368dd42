/// `moe summarize` (a pretrained checkpoint summarizing a data set into a run folder), `moe generate --model`
/// (generation from documents or source ids with a checkpoint's own generation config) and `moe bench generate`
/// (encoder and decoder speed, the key/value cache, the memory-bandwidth floor). The work is `Moe.Baseline`'s
/// and `Moe.Bench.GenerateBench`'s; this file only reads the flags.
module Moe.PretrainedCommand

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open Argu
open Moe
open Moe.TrainCommand

type SummarizeArgs =
    | [<Mandatory; AltCommandLine("-m")>] Model of path: string
    | [<Mandatory>] Data of path: string
    | Format of format: string
    | Split of name: string
    | Limit of examples: int
    | Batch_Size of size: int
    | Name of name: string
    | Runs_Dir of path: string
    | Overwrite
    | [<AltCommandLine("-s")>] Set of assignment: string
    | Source_Prefix of text: string
    | Threads of count: int
    | System_Prompt of text: string
    | User_Prompt of text: string
    | Bertscore of model_dir: string
    | Bertscore_Layer of layer: int
    | Bertscore_Idf
    | Bertscore_Baseline of csv: string
    | Summac of nli_dir: string
    | Summac_Granularity of granularity: string
    | Summac_Conv of weights: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Model _ -> "a pretrained checkpoint folder in Hugging Face layout (config.json, weights, tokenizer files)."
            | Data _ -> "a dataset as moe train --data takes it: a folder with train*/validation*/test* files, an XSum release folder or split file, one JSONL/CSV/parquet file."
            | Format _ -> sprintf "the data format, when the extension does not tell: %s." Data.Format.names
            | Split _ -> "train|validation|test (default test)."
            | Limit _ -> "summarize the split's first N examples."
            | Batch_Size _ -> "documents decoded together, sorted by length (default 8)."
            | Name _ -> "the run's name: it writes RUNS_DIR/NAME (default baseline-<checkpoint folder name>)."
            | Runs_Dir _ -> "folder for run folders (default runs)."
            | Overwrite -> "replace the run already in the run folder (without it such a folder is refused)."
            | Set _ -> "override a generation setting over the checkpoint's generation config, e.g. --set Generate.NumBeams=4 --set Generate.MaxLength=60 (repeatable; transformers' names also work)."
            | Source_Prefix _ -> "text put before every document (default: the checkpoint's task_specific_params summarization prefix, e.g. T5's \"summarize: \", else none)."
            | Threads _ -> "CPU threads libtorch uses (default: its own choice)."
            | System_Prompt _ -> "decoder-only models: the system message (default none: the chat template's own default, if any)."
            | User_Prompt _ -> sprintf "decoder-only models: the user message, {document} standing for the document (default %A)." CausalBaseline.SummaryPrompt.defaults.User
            | Bertscore _ -> "also BERTScore of the summaries with this BERT or RoBERTa folder (e.g. roberta-large), into test_scores.json and the table (default: not computed)."
            | Bertscore_Layer _ -> "BERTScore's layer (default: bert_score's model2layers for the model, e.g. 17 for roberta-large)."
            | Bertscore_Idf -> "weight BERTScore's tokens by idf over the references (bert_score idf=True)."
            | Bertscore_Baseline _ -> "rescale BERTScore with this bert_score baseline file (LAYER,P,R,F rows)."
            | Summac _ -> "also SummaC-ZS of each summary against its document with this NLI classifier folder (e.g. roberta-large-mnli) (default: not computed)."
            | Summac_Granularity _ -> "SummaC chunking: sentence (default), paragraph, 2sents, document, mixed, or DOC-SUMMARY."
            | Summac_Conv _ -> "SummaC-Conv too, with these convolution weights (summac's .bin or a toolkit .safetensors)."

let private setThreads (n: int option) =
    match n with
    | Some n when n < 1 -> invalidArg "--threads" (sprintf "expected at least 1 thread, got %d" n)
    | Some n -> TorchSharp.torch.set_num_threads n
    | None -> ()

type BenchGenerateArgs =
    | [<AltCommandLine("-m")>] Model of path: string
    | Shape of name: string
    | Source_Length of positions: int
    | Tokens of count: int
    | Batches of sizes: int list
    | Beams of counts: int list
    | Reps of count: int
    | Threads of count: int
    | Decoder of shape: string
    | Decoder_Layers of count: int
    | Quick
    interface IArgParserTemplate with
        member a.Usage =
            let d = Bench.GenerateBench.GenerateBenchConfig.defaults
            match a with
            | Model _ -> "a pretrained checkpoint folder to time."
            | Shape _ -> sprintf "instead of --model, random weights of this shape through Bart's modules: %s (default bart-large)." (Bench.GenerateBench.shapes |> List.map fst |> String.concat "|")
            | Source_Length _ -> sprintf "source positions of the random documents (default %d)." d.SourceLength
            | Tokens _ -> sprintf "tokens generated per output, EOS off (default %d)." d.NewTokens
            | Batches _ -> "batch sizes (default 1 8)."
            | Beams _ -> "beam counts, 1 = greedy (default 1 6)."
            | Reps _ -> sprintf "timed repetitions of the encoder and single-step timings; medians reported (default %d)." d.Reps
            | Threads _ -> "CPU threads libtorch uses (default: its own choice)."
            | Decoder _ -> "instead: the decoder-only benchmark on a random-weight checkpoint of this shape (llama-3.2-1b|tiny): bfloat16 load memory, batch-1 greedy ms/token against the bandwidth floor, a LoRA step's memory with and without activation recomputation."
            | Decoder_Layers _ -> "with --decoder: this many decoder layers (widths and vocabulary kept)."
            | Quick -> "with --decoder: 2 decoder layers and shorter runs (about a minute)."

/// Runs `moe summarize`.
let summarize (args: ParseResults<SummarizeArgs>) : int =
    Native.initialise ()
    setThreads (args.TryGetResult SummarizeArgs.Threads)
    let model, data = args.GetResult SummarizeArgs.Model, args.GetResult SummarizeArgs.Data
    let d = Baseline.BaselineConfig.defaults model data
    let loader =
        match args.TryGetResult SummarizeArgs.Format with
        | Some f ->
            match Data.Format.parse f with
            | Ok fmt -> { d.Loader with Format = Some fmt }
            | Error msg -> invalidArg "--format" msg
        | None -> d.Loader
    let cfg =
        { d with
            Loader = loader
            Split = args.GetResult(SummarizeArgs.Split, d.Split)
            Limit = args.TryGetResult SummarizeArgs.Limit
            BatchSize = args.GetResult(SummarizeArgs.Batch_Size, d.BatchSize)
            Name = args.GetResult(SummarizeArgs.Name, d.Name)
            RunsDir = args.GetResult(SummarizeArgs.Runs_Dir, d.RunsDir)
            Overwrite = args.Contains SummarizeArgs.Overwrite
            Settings = args.GetResults SummarizeArgs.Set
            SourcePrefix = args.TryGetResult SummarizeArgs.Source_Prefix
            Eval =
                { d.Eval with
                    BertScoreModel = args.TryGetResult SummarizeArgs.Bertscore
                    BertScoreLayer = args.TryGetResult SummarizeArgs.Bertscore_Layer
                    BertScoreIdf = args.Contains SummarizeArgs.Bertscore_Idf
                    BertScoreBaseline = args.TryGetResult SummarizeArgs.Bertscore_Baseline
                    SummaCModel = args.TryGetResult SummarizeArgs.Summac
                    SummaCGranularity = args.GetResult(SummarizeArgs.Summac_Granularity, d.Eval.SummaCGranularity)
                    SummaCConv = args.TryGetResult SummarizeArgs.Summac_Conv } }
    // the metric folders are checked (named by their flags) before the checkpoint is loaded
    Metrics.ModelMetrics.check ScoreCommand.flagOf cfg.Eval
    match Baseline.BaselineConfig.validate cfg with
    | [] -> ()
    | problems -> invalidArg "config" (String.concat "\n  - " ("invalid arguments:" :: problems))
    let say (line: string) = eprintfn "%s" line
    let r =
        match CausalBaseline.kindOf model with
        | CausalBaseline.DecoderOnly ->
            if args.Contains Source_Prefix then invalidArg "--source-prefix" "applies to encoder-decoders; for a decoder-only model use --user-prompt"
            let d = CausalBaseline.SummaryPrompt.defaults
            let prompt = { d with System = args.TryGetResult System_Prompt; User = args.GetResult(User_Prompt, d.User) }
            CausalBaseline.summarize say prompt cfg
        | CausalBaseline.EncoderDecoder ->
            for flag, given in [ "--system-prompt", args.Contains System_Prompt; "--user-prompt", args.Contains User_Prompt ] do
                if given then invalidArg flag (sprintf "%s applies to decoder-only models (%s)" flag (String.Join(", ", HfCausalLM.supportedModelTypes)))
            Baseline.summarize say cfg
    printfn "run folder: %s" r.RunDir
    0

/// One `--input-ids` line: a JSON array of integers.
let private idsOfLine (path: string) (line: int) (text: string) : int[] =
    let fail () = invalidArg "--input-ids" (sprintf "%s line %d: expected a JSON array of token ids, got %s" path line (if text.Length > 60 then text.Substring(0, 60) + "..." else text))
    try
        use doc = JsonDocument.Parse text
        if doc.RootElement.ValueKind <> JsonValueKind.Array then fail ()
        [| for e in doc.RootElement.EnumerateArray() ->
               match e.ValueKind, e.TryGetInt32() with
               | JsonValueKind.Number, (true, v) -> v
               | _ -> fail () |]
    with :? JsonException -> fail ()

/// An input file's lines; a last empty line (the file ends with a newline) is not an input.
let private inputLines (path: string) : string[] =
    let lines = Metrics.Basics.readLines path
    if lines.Length > 0 && lines[lines.Length - 1] = "" then lines[.. lines.Length - 2] else lines

/// Non-ASCII text written as itself rather than \uXXXX escapes (the output is UTF-8).
let private relaxed = JsonSerializerOptions(Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping)

/// The JSON line `moe generate --json` prints for one input.
let jsonLine (g: Baseline.Generated) : string =
    let o = JsonObject()
    o["ids"] <- JsonArray([| for id in g.Ids -> JsonValue.Create id :> JsonNode |])
    match g.Text with
    | Some t -> o["text"] <- JsonValue.Create t
    | None -> ()
    o.ToJsonString(relaxed)

/// What `moe generate --model` prints for its flags: one line per input (text, or with --json a JSON object).
let generateOutput (args: ParseResults<GenerateArgs>) : string[] =
    let dir = args.GetResult GenerateArgs.Model
    for flag, given in [ "--run", args.Contains Run; "--checkpoint", args.Contains Checkpoint; "--beam", args.Contains Beam
                         "--max-length", args.Contains Max_Length; "--min-length", args.Contains Min_Length
                         "--length-penalty", args.Contains Length_Penalty; "--no-repeat-ngram", args.Contains No_Repeat_Ngram ] do
        if given then invalidArg flag (sprintf "%s applies to --run; with --model use --set Generate.X=value (e.g. Generate.NumBeams=4)" flag)
    let sources =
        match args.TryGetResult Input, args.TryGetResult Input_Ids with
        | Some _, Some _ -> invalidArg "--input" "give --input or --input-ids, not both"
        | None, None -> invalidArg "--input" "expected --input F (documents, one per line) or --input-ids F (JSON id arrays, one per line)"
        | Some path, None ->
            if not (File.Exists path) then invalidArg "--input" (sprintf "expected a documents file (one per line), but %s does not exist" path)
            Baseline.Documents(inputLines path)
        | None, Some path ->
            if not (File.Exists path) then invalidArg "--input-ids" (sprintf "expected a file of JSON id arrays (one per line), but %s does not exist" path)
            Baseline.SourceIds(inputLines path |> Array.mapi (fun i l -> idsOfLine path (i + 1) l))
    let outs =
        CausalBaseline.generateFolder dir (args.GetResults GenerateArgs.Set) (args.Contains Greedy) (args.GetResult(GenerateArgs.Batch_Size, 8)) sources
    if args.Contains GenerateArgs.Json then outs |> Array.map jsonLine
    else outs |> Array.map (fun g -> match g.Text with Some t -> Summarizer.oneLine t | None -> String.Join(" ", g.Ids))

/// Runs `moe generate --model`.
let generate (args: ParseResults<GenerateArgs>) : int =
    Native.initialise ()
    setThreads (args.TryGetResult GenerateArgs.Threads)
    let lines = generateOutput args
    match args.TryGetResult Output with
    | Some path ->
        File.WriteAllLines(path, lines)
        eprintfn "wrote %s" path
    | None -> for l in lines do printfn "%s" l
    0

/// Runs `moe bench generate`.
let benchGenerate (args: ParseResults<BenchGenerateArgs>) : int =
    Native.initialise ()
    setThreads (args.TryGetResult BenchGenerateArgs.Threads)
    match args.TryGetResult Decoder with
    | Some shape ->
        let d = if args.Contains Quick then Bench.CausalBench.CausalBenchConfig.quick else Bench.CausalBench.CausalBenchConfig.defaults
        let cfg = { d with Shape = shape; Layers = (match args.TryGetResult Decoder_Layers with Some n -> Some n | None -> d.Layers) }
        match Bench.CausalBench.CausalBenchConfig.validate cfg with
        | [] -> ()
        | problems -> invalidArg "--decoder" (String.concat "; " problems)
        let report = Bench.CausalBench.run cfg (fun line -> eprintfn "%s" line)
        printfn "%s" (Bench.CausalBench.table report)
        0
    | None ->
    if args.Contains Quick || args.Contains Decoder_Layers then invalidArg "--quick" "--quick and --decoder-layers apply with --decoder"
    let d = Bench.GenerateBench.GenerateBenchConfig.defaults
    let cfg =
        { d with
            SourceLength = args.GetResult(Source_Length, d.SourceLength)
            NewTokens = args.GetResult(Tokens, d.NewTokens)
            Batches = args.GetResult(Batches, d.Batches)
            Beams = args.GetResult(Beams, d.Beams)
            Reps = args.GetResult(Reps, d.Reps) }
    match Bench.GenerateBench.GenerateBenchConfig.validate cfg with
    | [] -> ()
    | problems -> invalidArg "arguments" (String.concat "; " problems)
    let subject =
        match args.TryGetResult BenchGenerateArgs.Model, args.TryGetResult Shape with
        | Some _, Some _ -> invalidArg "--model" "give --model or --shape, not both"
        | Some dir, None -> Bench.GenerateBench.ofFolder dir
        | None, shape ->
            let name = defaultArg shape "bart-large"
            match Bench.GenerateBench.shapeOf name with
            | Ok c -> Bench.GenerateBench.randomBart (sprintf "%s shape, random weights" name) c
            | Error e -> invalidArg "--shape" e
    use _ = subject.Module
    let report = Bench.GenerateBench.run cfg subject (fun line -> eprintfn "%s" line)
    printfn "%s" (Bench.GenerateBench.table report)
    0
