/// The benchmarks' C# entry points.
namespace Moe.Bench

open System
open TorchSharp
open Moe
open Moe.Bench.Layer
open Moe.Bench.TrainStep

/// C# entry points: `MoeBenchmark.Run(MoeBenchmark.Defaults, torch.CPU, Console.Error.WriteLine)`.
type MoeBenchmark =
    /// The issue's grid (`BenchConfig.defaults`); change fields with `with` in F# or a copy in C#.
    static member Defaults : BenchConfig = BenchConfig.defaults
    /// The two-minute subset (`BenchConfig.quick`).
    static member Quick : BenchConfig = BenchConfig.quick
    /// Runs the grid for the shipped layer; `progress` receives one line per phase.
    static member Run(cfg: BenchConfig, device: torch.Device, progress: Action<string>) : BenchReport =
        run cfg device progress.Invoke
    /// The per-phase profile of the shipped layer at one shape.
    static member Profile(cfg: BenchConfig, device: torch.Device, shape: LayerShape) : LayerProfile = profileLayer cfg device shape
    /// The training-step benchmark's defaults (the default summarizer).
    static member TrainStepDefaults : TrainStepConfig = TrainStepConfig.defaults
    /// Times training steps of the summarizer (`trainStep`).
    static member TrainStep(cfg: TrainStepConfig, progress: Action<string>) : TrainStepReport = trainStep cfg progress.Invoke
    /// The JSON report (`toJson`).
    static member ToJson(report: BenchReport) : string = toJson report
    /// The plain-text table (`toTable`).
    static member ToTable(report: BenchReport) : string = toTable report
    /// The Markdown table (`toMarkdown`).
    static member ToMarkdown(report: BenchReport) : string = toMarkdown report
