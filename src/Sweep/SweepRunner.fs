/// The sweep for C#: `using Moe.Sweep;` then `SweepRunner.Load(grid, schema)`, `Run`, `Collect`,
/// `WriteResults` and `EmitSlurm` (the F# functions are in `Grid`, `Runner`, `Results` and `Slurm`).
namespace Moe.Sweep

open Moe.Sweep.Grid
open Moe.Sweep.Runner
open Moe.Sweep.Results
open Moe.Sweep.Slurm

/// The sweep runner for C#: load a grid, list, run, collect, emit Slurm files.
type SweepRunner =
    /// Reads, checks and expands a grid file; raises ArgumentException listing every problem.
    static member Load(gridPath: string, schema: Schema) : Plan = loadOrFail schema gridPath
    /// The dry-run listing.
    static member Describe(plan: Plan) : string = describePlan plan
    /// Runs every unfinished run (see `runAll`).
    static member Run(plan: Plan, options: SweepOptions) : Outcome[] = runAll options plan |> List.toArray
    /// Reads each run folder into a results row.
    static member Collect(plan: Plan) : ResultRow[] = collect plan |> List.toArray
    /// Writes the combined report page; returns the line results.md shows about it.
    static member WriteReport(plan: Plan) : string = writeReport plan
    /// Writes results.csv and results.md; returns their paths.
    static member WriteResults(plan: Plan, rows: ResultRow seq, reportNote: string) : string * string =
        writeResults plan (List.ofSeq rows) reportNote
    /// Writes the Slurm job array and per-run configs into `dir`.
    static member EmitSlurm(plan: Plan, dir: string, workDir: string, launcher: string) : SlurmFiles = emitSlurm plan dir workDir launcher
