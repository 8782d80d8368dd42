/// The command line: the only place that reads argv and the environment.
module Moe.Cli

open System
open Argu
open Moe

type InfoArgs =
    | Device of string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Device _ -> "auto|cpu|cuda (default auto)."

[<RequireSubcommand>]
type Command =
    | [<CliPrefix(CliPrefix.None)>] Info of ParseResults<InfoArgs>
    | [<CliPrefix(CliPrefix.None)>] Score of ParseResults<ScoreCommand.ScoreArgs>
    | [<CliPrefix(CliPrefix.None)>] Human_Eval of ParseResults<HumanEvalCommand.HumanEvalArgs>
    | [<CliPrefix(CliPrefix.None)>] Data of ParseResults<DataCommand.DataArgs>
    | [<CliPrefix(CliPrefix.None)>] Report of ParseResults<ReportCommand.ReportArgs>
    | [<CliPrefix(CliPrefix.None)>] Train of ParseResults<TrainCommand.TrainArgs>
    | [<CliPrefix(CliPrefix.None)>] Generate of ParseResults<TrainCommand.GenerateArgs>
    | [<CliPrefix(CliPrefix.None)>] Summarize of ParseResults<PretrainedCommand.SummarizeArgs>
    | [<CliPrefix(CliPrefix.None)>] Sweep of ParseResults<SweepCommand.SweepArgs>
    | [<CliPrefix(CliPrefix.None)>] Bench of ParseResults<BenchCommand.BenchArgs>
    | [<CliPrefix(CliPrefix.None)>] Finetune of ParseResults<FinetuneCommand.FinetuneArgs>
    | [<CliPrefix(CliPrefix.None)>] Export_Hf of ParseResults<FinetuneCommand.ExportHfArgs>
    | [<CliPrefix(CliPrefix.None)>] Routing of ParseResults<RoutingCommand.RoutingArgs>
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Info _ -> "print the libtorch runtime, threads and the device that --device resolves to."
            | Score _ -> "ROUGE, BLEU and document statistics of predictions against references."
            | Human_Eval _ -> "draw human rating sheets from system outputs, or summarize filled sheets."
            | Data _ -> "inspect datasets: counts, lengths and problems."
            | Report _ -> "write one HTML page comparing run folders: configs, metrics, charts, samples."
            | Train _ -> "train a summarizer (dense, top-k or hash MoE) and score it on the test split against lead-1."
            | Generate _ -> "summarize documents with a trained run's checkpoint (--run), or generate with a pretrained checkpoint folder (--model)."
            | Summarize _ -> "summarize a data set with a pretrained checkpoint folder (BART, Pegasus, T5; decoder-only LMs through their chat template) into a run folder scored like moe train's."
            | Sweep _ -> "expand a grid file into runs and run them (skipping finished, resuming interrupted), or list, emit for Slurm, collect."
            | Finetune _ -> "fine-tune a pretrained encoder-decoder (BART, Pegasus, T5, Switch) on a summarization data set, fully or with LoRA; writes the run folder and hf/ in Hugging Face layout."
            | Export_Hf _ -> "write a from-scratch run folder in Hugging Face layout (model_type moe_summarizer, safetensors, tokenizer, model card); --model OUT loads it back."
            | Routing _ -> "a pretrained MoE LM's routing: per-token experts and weights (--input-ids F --json), or expert load, router entropy, expert use by label and coloured per-token routes of documents (--data F), charted as a from-scratch run."
            | Bench _ -> "benchmarks: moe-layer (MoE layer against its dense floor and the naive loop), train-step (training step: speed, kernel time, memory), data (tokenization and token cache), load (checkpoint loading: time and peak memory), generate (pretrained generation: encoder, decoder per token, key/value cache, memory-bandwidth floor)."

let private deviceOf (text: string option) =
    match Native.parseDevice (defaultArg text "auto") with
    | Ok choice -> Native.resolveDevice choice
    | Error msg -> invalidArg "--device" msg

let private info (args: ParseResults<InfoArgs>) =
    Native.initialise ()
    printfn "%s" (Native.describeRuntime ())
    printfn "device: %O" (deviceOf (args.TryGetResult InfoArgs.Device))
    0

[<EntryPoint>]
let main argv =
    let parser = ArgumentParser.Create<Command>(programName = "moe")
    try
        let results = parser.ParseCommandLine(argv, raiseOnUsage = true)
        InputErrors.guard (fun () ->
            Native.startup ()
            match results.GetSubCommand() with
            | Info a -> info a
            | Score a -> ScoreCommand.run a
            | Human_Eval a -> HumanEvalCommand.run a
            | Data a -> DataCommand.run a
            | Report a -> ReportCommand.run a
            | Train a -> TrainCommand.train a
            | Generate a when a.Contains TrainCommand.GenerateArgs.Model -> PretrainedCommand.generate a
            | Generate a -> TrainCommand.generate a
            | Summarize a -> PretrainedCommand.summarize a
            | Sweep a -> SweepCommand.run a
            | Bench a -> BenchCommand.run a
            | Finetune a -> FinetuneCommand.finetune a
            | Export_Hf a -> FinetuneCommand.exportHf a
            | Routing a -> RoutingCommand.run a)
    with :? ArguParseException as e ->
        eprintfn "%s" e.Message
        if e.ErrorCode = ErrorCode.HelpText then 0 else InputErrors.BadInput
