/// Routing analysis of pretrained MoE LMs (Mixtral, Qwen2-MoE, OLMoE through `HfCausalLM.load`): each input's
/// tokens run through the model and every MoE layer's router choices are read from the toolkit's MoE layer
/// (`Llama.RouterTrace`): per token the chosen experts in rank order and their combine weights
/// (`moe routing --input-ids F --json`), and over a set of documents the statistics a from-scratch run writes
/// (`routing.jsonl`: per-layer expert load and router entropy, one record per document as "step";
/// `routing_by_label.json`: expert use per label when the data has labels), so `moe report`'s charts
/// (`Report.write`) draw them, plus `routes.html`: a few documents' tokens coloured by their top expert.
/// Each input runs alone (batch 1), so padding never enters the statistics.
/// Axes: T tokens of one input, K experts per token, E experts.
module Moe.MoeLmRouting

open System
open System.IO
open System.Text
open System.Text.Json.Nodes
open TorchSharp
open Moe.Tensors
open Moe.Models
open Moe.Data

/// One input: token ids, an optional label (topic, language), and its text where known.
type RoutingInput = { Ids: int[]; Label: string option; Text: string option }

/// One MoE layer's choices for one input's T tokens.
type LayerRoutes =
    { /// "layers.i", as the model's reports name it.
      Layer: string
      /// Per token, the chosen experts in rank order (highest router score first). // [T][K]
      Experts: int[][]
      /// Per token, the combine weight of each chosen expert. // [T][K]
      Weights: float[][]
      /// Per token, the router's distribution over all E experts. // [T][E]
      Probs: float[][] }

/// The loaded MoE LM with its tokenizer (None: ids only).
type RoutingModel =
    { Lm: HfCausalLM.HfCausalLM
      Tokenizer: HfTokenizer.HfTokenizer option }
    interface IDisposable with
        member m.Dispose() =
            (m.Lm :> IDisposable).Dispose()
            m.Tokenizer |> Option.iter (fun t -> (t :> IDisposable).Dispose())

/// Loads `dir` for routing analysis: refused unless it is an MoE LM (its layers have routers), naming the
/// model_type and the MoE families. The tokenizer is the folder's or `tokenizerDir`'s, checked against the
/// vocabulary (`CausalBaseline.tokenizerFor`).
let openModel (dir: string) (tokenizerDir: string option) : RoutingModel =
    let lm = CausalBaseline.loadCausal dir
    try
        // one token through the model: an MoE LM's layers report router traces (Qwen2-MoE's may skip some layers)
        let hasRouters =
            match lm.Decoder with
            | Some d ->
                use _ = torch.no_grad ()
                use _ = torch.NewDisposeScope()
                use one = torch.zeros([| 1L; 1L |], dtype = torch.ScalarType.Int64)
                not (d.Forward(one, null, null, Unchecked.defaultof<DecoderCache>, null).Routers.IsEmpty)
            | None -> false
        if not hasRouters then
            invalidArg "model" (sprintf "%s: model_type \"%s\" has no MoE layers to analyse (expected a Mixture-of-Experts LM: mixtral, qwen2_moe or olmoe)"
                (Path.Combine(dir, "config.json")) lm.ModelType)
        { Lm = lm; Tokenizer = CausalBaseline.tokenizerFor dir tokenizerDir lm.Model.VocabSize }
    with _ ->
        (lm :> IDisposable).Dispose()
        reraise ()

let private rows (t: Tensor) : float[][] =
    use c = t.detach().cpu().to_type(torch.ScalarType.Float64).contiguous ()
    let cols = int c.shape[1]
    c.data<float>().ToArray() |> Array.chunkBySize cols

/// Every MoE layer's routes for one input of T ids (checked against the vocabulary and the model's positions).
let route (m: RoutingModel) (ids: int[]) : LayerRoutes list =
    let decoder = m.Lm.Decoder.Value
    if ids.Length = 0 then invalidArg "ids" "expected at least one token id, got none"
    if ids.Length > m.Lm.MaxPositions then
        invalidArg "ids" (sprintf "the input has %d tokens, more than the model's %d positions (max_position_embeddings)" ids.Length m.Lm.MaxPositions)
    use _ = torch.no_grad ()
    use _ = torch.NewDisposeScope()
    use input = torch.tensor(ids |> Array.map int64).view(1L, int64 ids.Length) // [1; T]
    let out = decoder.Forward(input, null, null, Unchecked.defaultof<DecoderCache>, null)
    [ for i, trace in out.Routers ->
        let r = trace.Routing
        { Layer = sprintf "layers.%d" i
          Experts = rows r.Experts |> Array.map (Array.map int)
          Weights = rows r.Weights
          Probs = match r.Probs with Some p -> rows p | None -> [||] } ]

/// The `--json` line of one input: `{"layers": [{"layer", "experts": [[..]], "weights": [[..]]}]}`.
let jsonLine (routes: LayerRoutes list) : string =
    let layers = JsonArray()
    for r in routes do
        let o = JsonObject()
        o["layer"] <- JsonValue.Create r.Layer
        o["experts"] <- Json.toNode r.Experts
        o["weights"] <- Json.toNode r.Weights
        layers.Add o
    let root = JsonObject()
    root["layers"] <- layers
    root.ToJsonString()

// ---------------------------------------------------------------- inputs

/// One `--input-ids` line: a JSON array of ids, or an object {"ids": [...], "label": "..."}.
let parseIdsLine (path: string) (line: int) (text: string) : RoutingInput =
    let fail () =
        invalidArg "input" (sprintf "%s line %d: expected a JSON array of token ids or {\"ids\": [...], \"label\": \"...\"}, got %s"
                                path line (if text.Length > 60 then text.Substring(0, 60) + "..." else text))
    let idsOf (node: JsonNode) =
        match node with
        | :? JsonArray as a -> a |> Seq.map (fun x -> try x.GetValue<int>() with _ -> fail ()) |> Array.ofSeq
        | _ -> fail ()
    let node = try JsonNode.Parse text with _ -> fail ()
    match node with
    | :? JsonArray -> { Ids = idsOf node; Label = None; Text = None }
    | :? JsonObject as o when o.ContainsKey "ids" ->
        { Ids = idsOf o["ids"]
          Label = (match o["label"] with null -> None | l -> Some(try l.GetValue<string>() with _ -> fail ()))
          Text = None }
    | _ -> fail ()

/// An `--input-ids` file's inputs (blank lines skipped).
let readIdsFile (path: string) : RoutingInput[] =
    if not (File.Exists path) then invalidArg "input" (sprintf "expected a file of JSON id arrays (one per line), but %s does not exist" path)
    File.ReadAllLines path
    |> Array.indexed
    |> Array.filter (fun (_, l) -> not (String.IsNullOrWhiteSpace l))
    |> Array.map (fun (i, l) -> parseIdsLine path (i + 1) l)

/// Documents of a data set (as `moe train --data` reads one file: JSONL, CSV, parquet, lines; `label` kept)
/// tokenized with the model's tokenizer and cut to the model's positions; at most `limit`. Refused without a
/// tokenizer, saying how to give ids instead.
let readDocuments (m: RoutingModel) (loader: DataConfig) (path: string) (limit: int) : RoutingInput[] * string list =
    let t =
        match m.Tokenizer with
        | Some t -> t
        | None ->
            invalidArg "data" (sprintf "%s has no tokenizer files (%s): to route text, name a tokenizer folder of the same vocabulary (--tokenizer DIR), or give token ids (--input-ids F: one JSON array, or {\"ids\": [...], \"label\": \"...\"}, per line)"
                           m.Lm.Folder HfTokenizer.lookedFor)
    if not (File.Exists path) then invalidArg "data" (sprintf "expected a data file, but %s does not exist" path)
    let reader = Data.read loader path
    let xs = reader.Examples |> Seq.truncate limit |> Array.ofSeq
    if xs.Length = 0 then invalidArg "data" (sprintf "%s holds no documents" path)
    let inputs =
        xs |> Array.map (fun e ->
            let ids = t.Encode(e.Document, true)
            { Ids = ids[.. min ids.Length m.Lm.MaxPositions - 1]; Label = e.Label; Text = Some e.Document })
    inputs, reader.Report.Notes

// ---------------------------------------------------------------- statistics and files

/// Per layer, over all inputs: assignments per expert and the mean router entropy (nats).
type LayerSummary = { Layer: string; Assignments: float[]; MeanEntropy: float; Tokens: int }

let private entropyOf (p: float[]) = p |> Array.sumBy (fun x -> if x > 0.0 then -x * log x else 0.0)

let private experts (r: LayerRoutes) = if r.Probs.Length > 0 then r.Probs[0].Length else (Array.concat r.Experts |> Array.max) + 1

/// Assignment counts [E] of one layer's routes.
let private counts (e: int) (r: LayerRoutes) : float[] =
    let c = Array.zeroCreate<float> e
    for tok in r.Experts do for x in tok do c[x] <- c[x] + 1.0
    c

/// What `analyse` wrote.
type RoutingAnalysis =
    { OutDir: string
      Documents: int
      Layers: LayerSummary list
      /// Files written: routing.jsonl, routes.jsonl, routes.html, report.html and, with labels, routing_by_label.json.
      Files: string list }

let private colourOf (e: int) = Plots.palette[e % Plots.palette.Length]

/// One document's tokens, coloured per MoE layer by their top expert, the experts and weights in a tooltip.
let private routesHtml (m: RoutingModel) (docs: (RoutingInput * LayerRoutes list)[]) : string =
    let sb = StringBuilder()
    let add (s: string) = sb.Append s |> ignore
    add "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Per-token routes</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}span.t{padding:1px 2px;margin:1px;border-radius:3px;color:#fff;display:inline-block}</style></head><body>"
    add (sprintf "<h1>Per-token routes: %s</h1><p>Each token is coloured by its top expert in that layer; hover for every chosen expert and its weight.</p>" (Plots.escape m.Lm.Folder))
    let e = match docs |> Array.tryPick (fun (_, rs) -> List.tryHead rs) with Some r -> experts r | None -> 0
    add "<p>"
    for x in 0 .. e - 1 do add (sprintf "<span class=\"t\" style=\"background:%s\">expert %d</span>" (colourOf x) x)
    add "</p>"
    for d, (input, routes) in Array.indexed docs do
        add (sprintf "<h2>document %d%s</h2>" (d + 1) (match input.Label with Some l -> sprintf " (%s)" (Plots.escape l) | None -> ""))
        for r in routes do
            add (sprintf "<h3>%s</h3><p>" r.Layer)
            for j, id in Array.indexed input.Ids do
                let token = match m.Tokenizer with Some t -> t.Decode([| id |], false) | None -> string id
                let chosen, weights = r.Experts[j], r.Weights[j]
                let tip = String.Join(", ", Array.map2 (fun (x: int) (w: float) -> sprintf "expert %d: %.3f" x w) chosen weights)
                add (sprintf "<span class=\"t\" style=\"background:%s\" title=\"%s\">%s</span>" (colourOf chosen[0]) (Plots.escape tip) (Plots.escape token))
            add "</p>"
    add "</body></html>"
    sb.ToString()

/// Routes every input through the model and writes into `outDir`: routes.jsonl (the `--json` line of each
/// input), routing.jsonl (per input, as step 1, 2, ..., and per layer: the share of assignments per expert and
/// the mean router entropy; the run folder format), routing_by_label.json when inputs carry labels,
/// routes.html (the first `shown` inputs' tokens coloured by expert) and report.html (`Report.write` over
/// the folder: the load and entropy charts of a from-scratch run). `say` gets a per-layer summary.
let analyse (say: string -> unit) (m: RoutingModel) (inputs: RoutingInput[]) (shown: int) (outDir: string) : RoutingAnalysis =
    if inputs.Length = 0 then invalidArg "inputs" "expected at least one input"
    Directory.CreateDirectory outDir |> ignore
    let routed = inputs |> Array.map (fun i -> i, route m i.Ids)
    let layers = (snd routed[0]) |> List.map (fun r -> r.Layer)
    let e = experts (List.head (snd routed[0]))
    let routingLines =
        [| for step, (_, routes) in Array.indexed routed do
             for r in routes do
                 let c = counts e r
                 let total = Array.sum c
                 let entropy = if r.Probs.Length = 0 then nan else r.Probs |> Array.averageBy entropyOf
                 yield Train.RunFiles.routingLine (step + 1) r.Layer (c |> Array.map (fun x -> x / total)) 0.0 entropy |]
    let file name = Path.Combine(outDir, name)
    File.WriteAllLines(file RunLog.FileNames.routing, routingLines)
    File.WriteAllLines(file "routes.jsonl", routed |> Array.map (snd >> jsonLine))
    let labels = inputs |> Array.choose (fun i -> i.Label) |> Array.distinct |> Array.sort
    let byLabel =
        if labels.Length = 0 then []
        else
            [ for layer in layers ->
                let table = labels |> Array.map (fun _ -> Array.zeroCreate<float> e)
                for input, routes in routed do
                    match input.Label with
                    | Some l ->
                        let li = Array.IndexOf(labels, l)
                        let c = counts e (routes |> List.find (fun r -> r.Layer = layer))
                        c |> Array.iteri (fun x v -> table[li][x] <- table[li][x] + v)
                    | None -> ()
                ({ Layer = layer; Labels = labels; Experts = e; Counts = table } : Summarizer.LabelCounts) ]
    if not byLabel.IsEmpty then File.WriteAllText(file RunLog.FileNames.routingByLabel, Summarizer.routingByLabelJson byLabel)
    File.WriteAllText(file "routes.html", routesHtml m (routed |> Array.truncate shown))
    let report = Report.write { Report.defaults with Title = sprintf "Routing of %s" (DirectoryInfo(m.Lm.Folder).Name) } (file "report.html") [ outDir ]
    let summaries =
        [ for layer in layers ->
            let rs = routed |> Array.map (fun (_, routes) -> routes |> List.find (fun r -> r.Layer = layer))
            let assignments = rs |> Array.map (counts e) |> Array.reduce (Array.map2 (+))
            let probs = rs |> Array.collect (fun r -> r.Probs)
            { Layer = layer; Assignments = assignments; Tokens = rs |> Array.sumBy (fun r -> r.Experts.Length)
              MeanEntropy = if probs.Length = 0 then nan else probs |> Array.averageBy entropyOf } ]
    say (sprintf "%d inputs, %d tokens, %d MoE layers of %d experts (uniform entropy %.3f nats)"
             inputs.Length (summaries.Head.Tokens) summaries.Length e (log (float e)))
    for s in summaries do
        let total = Array.sum s.Assignments
        say (sprintf "  %s: load CV %.3f, mean router entropy %.3f nats, shares %s" s.Layer (RunLog.loadCv s.Assignments) s.MeanEntropy
                 (String.Join(" ", s.Assignments |> Array.map (fun x -> sprintf "%.2f" (x / total)))))
    { OutDir = outDir
      Documents = inputs.Length
      Layers = summaries
      Files =
        [ RunLog.FileNames.routing; "routes.jsonl"; "routes.html"; Path.GetFileName report ]
        @ (if byLabel.IsEmpty then [] else [ RunLog.FileNames.routingByLabel ]) }

// ---------------------------------------------------------------- the script

/// The script's smoke inputs: the first `perLanguage` documents of each language of the shared MLSUM sample
/// (label = language) tokenized with `tokenizerDir` (a GPT-2-style tokenizer), the ids folded into the tiny
/// checkpoint's vocabulary (id mod V) because the tiny random MoE checkpoints ship no tokenizer; with a real
/// checkpoint and its tokenizer no folding happens (`readDocuments`).
let smokeInputs (sharedData: string) (tokenizerDir: string) (vocab: int) (perLanguage: int) (maxTokens: int) : RoutingInput[] =
    use t = HfTokenizer.fromFolder tokenizerDir
    [| for lang in [ "de"; "es"; "fr" ] do
         let path = Path.Combine(sharedData, "mlsum-sample", sprintf "%s_test.jsonl" lang)
         let reader = Data.read { DataConfig.defaults with DocumentColumn = Some "text" } path
         for e in reader.Examples |> Seq.truncate perLanguage do
             let ids = t.Encode(e.Document, false) |> Array.truncate maxTokens |> Array.map (fun id -> id % vocab)
             yield { Ids = ids; Label = Some lang; Text = Some e.Document } |]

/// `scripts/moe_lm_routing.fsx`: `--model DIR (--data F | --input-ids F) [--tokenizer DIR] [--out DIR]
/// [--limit N] [--show N]`, or `--smoke` (qwen2-moe-tiny on 2 MLSUM documents of 3 languages, ids from
/// qwen2-tiny's tokenizer folded into its vocabulary). Returns the analysis.
let runScript (say: string -> unit) (sharedData: string) (args: string[]) : RoutingAnalysis =
    let rec go (acc: Map<string, string>) (rest: string list) =
        match rest with
        | [] -> acc
        | "--smoke" :: tail -> go (acc.Add("smoke", "")) tail
        | flag :: value :: tail when flag.StartsWith "--" -> go (acc.Add(flag.Substring 2, value)) tail
        | other :: _ -> invalidArg "args" (sprintf "unexpected argument %s (expected --model DIR (--data F | --input-ids F) [--tokenizer DIR] [--out DIR] [--limit N] [--show N], or --smoke)" other)
    let a = go Map.empty (List.ofArray args)
    let get k d = a.TryFind k |> Option.defaultValue d
    let models = Path.GetFullPath(Path.Combine(sharedData, "..", "models"))
    if a.ContainsKey "smoke" then
        use m = openModel (Path.Combine(models, "qwen2-moe-tiny")) None
        let inputs = smokeInputs sharedData (Path.Combine(models, "qwen2-tiny")) m.Lm.Model.VocabSize 2 48
        analyse say m inputs 2 (get "out" (Path.Combine(Path.GetTempPath(), "moe-lm-routing-smoke")))
    else
        let model = match a.TryFind "model" with Some d -> d | None -> invalidArg "args" "expected --model DIR (or --smoke)"
        use m = openModel model (a.TryFind "tokenizer")
        let inputs =
            match a.TryFind "data", a.TryFind "input-ids" with
            | Some d, None -> fst (readDocuments m DataConfig.defaults d (int (get "limit" "100")))
            | None, Some f -> readIdsFile f
            | _ -> invalidArg "args" "expected --data F or --input-ids F"
        analyse say m inputs (int (get "show" "3")) (get "out" (Path.Combine("runs", "routing-" + DirectoryInfo(model).Name)))
