/// The run folder's JSONL logs (see the run folder format in the README).
module Moe.Train.RunFiles

open System
open System.IO
open System.Text
open System.Text.Json.Nodes
open TorchSharp
open Moe
open Moe.Tensors
open Moe.Config
open Moe.Routing
open Moe.Layers
open Moe.Models

let metricsName = "metrics.jsonl"
let routingName = "routing.jsonl"
let configName = "config.json"
let parametersName = "parameters.json"

let private compact = System.Text.Json.JsonSerializerOptions(WriteIndented = false)

/// One JSON object as one line.
let line (o: JsonObject) : string = o.ToJsonString compact

let private num (x: float) : JsonNode = if Double.IsNaN x || Double.IsInfinity x then null else JsonValue.Create x

/// `{"step", "split": "train", "loss", "task_loss", "aux": {...}, "lr", "tokens_per_s", "elapsed_s", ...}`.
/// `aux` holds each balancing loss unweighted, averaged over MoE layers and the logged steps.
let trainLine (step: int) (loss: float) (taskLoss: float) (aux: float[]) (lr: float) (tokensPerSecond: float)
              (elapsed: float) (gradNorm: float) (badSteps: int) (moeLayers: int) : string =
    let auxObj = JsonObject()
    for name, v in Array.zip [| "switch_aux"; "importance"; "load"; "z_loss" |] aux do auxObj[name] <- num v
    let o = JsonObject()
    o["step"] <- JsonValue.Create step
    o["split"] <- JsonValue.Create "train"
    o["loss"] <- num loss
    o["task_loss"] <- num taskLoss
    o["aux"] <- auxObj
    o["lr"] <- num lr
    o["tokens_per_s"] <- num tokensPerSecond
    o["elapsed_s"] <- num elapsed
    o["grad_norm"] <- num gradNorm
    o["bad_steps"] <- JsonValue.Create badSteps
    o["moe_layers"] <- JsonValue.Create moeLayers
    line o

/// `{"step", "split": "valid", "loss"}`.
let validLine (step: int) (loss: float) (best: float) : string =
    let o = JsonObject()
    o["step"] <- JsonValue.Create step
    o["split"] <- JsonValue.Create "valid"
    o["loss"] <- num loss
    o["best_loss"] <- num best
    line o

/// `{"step", "layer", "tokens_per_expert": [...], "dropped_fraction", "router_entropy"}`.
let routingLine (step: int) (layer: string) (tokensPerExpert: float[]) (dropped: float) (entropy: float) : string =
    let o = JsonObject()
    o["step"] <- JsonValue.Create step
    o["layer"] <- JsonValue.Create layer
    let a = JsonArray()
    for x in tokensPerExpert do a.Add(num x)
    o["tokens_per_expert"] <- a
    o["dropped_fraction"] <- num dropped
    o["router_entropy"] <- num entropy
    line o

/// Keeps only lines whose "step" is at most `step` (a resumed run rewrites what followed its checkpoint).
let truncateAfter (step: int) (path: string) : unit =
    if File.Exists path then
        let keep =
            File.ReadAllLines path
            |> Array.filter (fun l ->
                if String.IsNullOrWhiteSpace l then false
                else
                    match Json.parse l with
                    | Ok n when not (isNull n) && not (isNull n["step"]) -> n["step"].GetValue<int>() <= step
                    | _ -> false)
        Checkpoint.writeAtomic path (fun fs ->
            use w = new StreamWriter(fs, UTF8Encoding(false), leaveOpen = true)
            for l in keep do w.WriteLine l)

/// Writes `runDir/parameters.json` atomically: `{"total": N, "active": N, "trainable": N}`.
let writeParameters (runDir: string) (counts: RunParameters) : unit =
    let o = JsonObject()
    o["total"] <- JsonValue.Create counts.Total
    o["active"] <- JsonValue.Create counts.Active
    o["trainable"] <- JsonValue.Create counts.Trainable
    Checkpoint.writeAtomic (Path.Combine(runDir, parametersName)) (fun fs ->
        let bytes = UTF8Encoding(false).GetBytes(Json.format o)
        fs.Write(bytes, 0, bytes.Length))

/// Reads `runDir/parameters.json` as `writeParameters` writes it: None when the file is absent, an error
/// naming the file and the field when it is malformed (not JSON, a count missing or not a whole number >= 0).
let readParameters (runDir: string) : Result<RunParameters, string> option =
    let path = Path.Combine(runDir, parametersName)
    if not (File.Exists path) then None
    else
        let count (o: JsonObject) (name: string) =
            match o[name] with
            | :? JsonValue as v ->
                match v.TryGetValue<int64>() with
                | true, n when n >= 0L -> Ok n
                | _ -> Error(sprintf "%s: expected \"%s\" a whole number >= 0, got %s" path name (v.ToJsonString()))
            | _ -> Error(sprintf "%s: expected a number \"%s\", got none" path name)
        match Json.parse (File.ReadAllText path) with
        | Ok(:? JsonObject as o) ->
            match count o "total", count o "active", count o "trainable" with
            | Ok total, Ok active, Ok trainable -> Some(Ok { Total = total; Active = active; Trainable = trainable })
            | total, active, trainable ->
                let problems = [ total; active; trainable ] |> List.choose (function Error e -> Some e | Ok _ -> None)
                Some(Error(String.concat "; " problems))
        | Ok _ -> Some(Error(sprintf "%s: expected a JSON object {\"total\", \"active\", \"trainable\"}" path))
        | Error e -> Some(Error(sprintf "%s: %s" path e))
