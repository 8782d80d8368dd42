/// GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners") exactly as OpenAI's
/// release and Hugging Face's `GPT2Model` define it, with Hugging Face's parameter names and Conv1D layout
/// ([in; out], y = x W + b), so a `model.safetensors` from the GPT-2 release loads without renaming; plus
/// LoRA parameter-efficient fine-tuning (Hu et al. 2021) on chosen projections.
/// Axes: B batch, S sequence, D model width (n_embd), H heads, Dh = D / H, V vocabulary, P positions,
/// r LoRA rank.
module Moe.Gpt2

open System
open TorchSharp
open TorchSharp.Modules
open Moe.Tensors
open Moe.Config

type private Parameter = Modules.Parameter

/// The GPT-2 hyper-parameters, named as in Hugging Face's `GPT2Config`.
type Gpt2Config =
    { /// V, the byte-level BPE vocabulary (50257 in the release: 50000 merges + 256 bytes + <|endoftext|>).
      VocabSize: int
      /// P, the learned position table's length (n_positions, 1024 in the release).
      Positions: int
      /// D, the model width (n_embd; 768 for the 124M model).
      Embd: int
      /// n_layer transformer blocks (12 for the 124M model).
      Layers: int
      /// n_head attention heads; must divide Embd.
      Heads: int
      /// LayerNorm epsilon (layer_norm_epsilon, 1e-5 in the release).
      LayerNormEpsilon: float }

module Gpt2Config =
    /// The 124M GPT-2 of the release (Radford et al. 2019 Table 2, smallest row).
    let defaults =
        { VocabSize = 50257; Positions = 1024; Embd = 768; Layers = 12; Heads = 12; LayerNormEpsilon = 1e-5 }

    /// A few-thousand-parameter GPT-2 for tests: same structure, tiny sizes.
    let tiny = { defaults with VocabSize = 23; Positions = 16; Embd = 8; Layers = 2; Heads = 2 }

    let validate (cfg: Gpt2Config) : string list =
        [ if cfg.VocabSize < 1 then sprintf "VocabSize must be >= 1, got %d" cfg.VocabSize
          if cfg.Positions < 1 then sprintf "Positions must be >= 1, got %d" cfg.Positions
          if cfg.Embd < 1 then sprintf "Embd must be >= 1, got %d" cfg.Embd
          if cfg.Layers < 0 then sprintf "Layers must be >= 0, got %d" cfg.Layers
          if cfg.Heads < 1 then sprintf "Heads must be >= 1, got %d" cfg.Heads
          elif cfg.Embd % cfg.Heads <> 0 then sprintf "Heads (%d) must divide Embd (%d)" cfg.Heads cfg.Embd
          if not (cfg.LayerNormEpsilon > 0.0) then sprintf "LayerNormEpsilon must be > 0, got %g" cfg.LayerNormEpsilon ]

/// Standard deviation of GPT-2's weight initialisation (initializer_range in Hugging Face's GPT2Config).
let InitializerRange = 0.02

/// sqrt(2 / pi) and 0.044715 of the tanh approximation of GELU (Hendrycks & Gimpel 2016 sec. 2), which
/// GPT-2 uses ("gelu_new" in Hugging Face).
let private geluTanhScale = Math.Sqrt(2.0 / Math.PI)
let private geluCubic = 0.044715

/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). Any shape.
let geluNew (x: Tensor) : Tensor =
    use _ = torch.NewDisposeScope()
    let inner = plus x (mulScalar geluCubic (x * x * x)) |> mulScalar geluTanhScale
    let y = mulScalar 0.5 x * addScalar 1.0 (inner.tanh ())
    y.MoveToOuterDisposeScope()

/// Hugging Face's Conv1D: a linear map stored as weight [in; out] and bias [out], y = x W + b, plus an
/// optional LoRA adapter (Hu et al. 2021 eq. 3): y = x W + b + (alpha / r) (x A) B with A [in; r] and
/// B [r; out], B zero at first so the adapter starts as the identity change. Parameters `weight`, `bias`,
/// and after `AddLora` `lora_A`, `lora_B`.
type Conv1D(name: string, inputs: int, outputs: int) as this =
    inherit torch.nn.Module<Tensor, Tensor>(name)
    // Mutable and named like their keys so Module.to can replace them.
    let mutable weight = new Parameter(torch.randn [| int64 inputs; int64 outputs |] |> mulScalar_ InitializerRange) // [in; out]
    let mutable bias = new Parameter(torch.zeros [| int64 outputs |]) // [out]
    let mutable lora_A : Parameter = null // [in; r]
    let mutable lora_B : Parameter = null // [r; out]
    let mutable scale = 0.0
    let mutable merged = false
    do
        this.register_parameter ("weight", weight)
        this.register_parameter ("bias", bias)

    member _.Inputs = inputs
    member _.Outputs = outputs
    /// W [in; out].
    member _.Weight : Tensor = weight
    /// b [out].
    member _.Bias : Tensor = bias
    /// A [in; r]; null without an adapter.
    member _.LoraA : Tensor = lora_A
    /// B [r; out]; null without an adapter.
    member _.LoraB : Tensor = lora_B
    /// alpha / r of the adapter (0 without one).
    member _.LoraScale = scale
    member _.HasLora = not (isNull lora_A)
    /// Whether the adapter has been folded into W by `Merge` (and is no longer applied separately).
    member _.Merged = merged

    /// Adds a LoRA adapter of rank r and scale alpha / r: A drawn like PEFT's (kaiming-uniform, a = sqrt 5,
    /// i.e. U(-1/sqrt in, 1/sqrt in)), B = 0. Fails if this projection already has one.
    member _.AddLora(lora: LoraConfig) =
        let lora = orFail "LoRA config" (LoraConfig.validate lora) lora
        if not (isNull lora_A) then invalidOp (sprintf "%s already has a LoRA adapter" name)
        let r = int64 lora.Rank
        let bound = 1.0 / Math.Sqrt(float inputs)
        use _ = torch.no_grad ()
        let a = torch.empty([| int64 inputs; r |], dtype = weight.dtype, device = weight.device)
        torch.nn.init.uniform_ (a, -bound, bound) |> ignore
        lora_A <- new Parameter(a)
        lora_B <- new Parameter(torch.zeros ([| r; int64 outputs |], dtype = weight.dtype, device = weight.device))
        scale <- LoraConfig.scale lora
        this.register_parameter ("lora_A", lora_A)
        this.register_parameter ("lora_B", lora_B)

    /// Folds the adapter into the base weight for inference: W <- W + (alpha / r) A B. Later forwards use W
    /// alone. Fails without an adapter or when already merged.
    member _.Merge() =
        if isNull lora_A then invalidOp (sprintf "%s has no LoRA adapter to merge" name)
        if merged then invalidOp (sprintf "%s: adapter already merged" name)
        use _ = torch.no_grad ()
        use delta = lora_A.mm lora_B |> mulScalar scale // [in; out]
        plus_ weight delta |> ignore
        merged <- true

    /// x [.., in] -> [.., out].
    override _.forward(x: Tensor) : Tensor =
        expect (name + " input") (sprintf "[..; %d] floating point" inputs)
            (fun t -> t.Dimensions >= 1L && t.shape[t.shape.Length - 1] = int64 inputs && isFloating t) x
        use scope = torch.NewDisposeScope()
        let y = torch.addmm(bias, x.reshape(-1L, int64 inputs), weight, 1.0f, 1.0f) // [N; out]
        let y =
            if isNull lora_A || merged then y
            else plus y (x.reshape(-1L, int64 inputs).mm(lora_A).mm (lora_B) |> mulScalar scale) // [N; out]
        let shape = Array.append x.shape.[.. x.shape.Length - 2] [| int64 outputs |]
        y.reshape(shape).MoveToOuterDisposeScope()

/// Causal multi-head self-attention with GPT-2's fused projection: c_attn [D; 3D] gives q, k, v; softmax(q k^T
/// / sqrt Dh) over earlier and current positions only; c_proj [D; D] mixes the heads (Vaswani et al. 2017).
type Attention(name: string, embd: int, heads: int) as this =
    inherit torch.nn.Module<Tensor, Tensor>(name)
    let c_attn = new Conv1D("c_attn", embd, 3 * embd)
    let c_proj = new Conv1D("c_proj", embd, embd)
    let dh = int64 (embd / heads)
    do this.RegisterComponents()
    member _.CAttn = c_attn
    member _.CProj = c_proj
    /// x [B; S; D] -> [B; S; D].
    override _.forward(x: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let b, s = x.shape[0], x.shape[1]
        let qkv = c_attn.forward x // [B; S; 3D]
        let split (t: Tensor) = t.reshape(b, s, int64 heads, dh).transpose (1L, 2L) // [B; H; S; Dh]
        let parts = qkv.chunk (3L, 2L) // q, k, v: 3 x [B; S; D]
        let q, k, v = split parts[0], split parts[1], split parts[2]
        let scores = q.matmul (k.transpose (-2L, -1L)) |> divScalar (Math.Sqrt(float dh)) // [B; H; S; S]
        let future = torch.ones([| s; s |], dtype = torch.ScalarType.Bool, device = x.device).triu (1L) // [S; S]
        let scores = withScalar Double.NegativeInfinity (fun ninf -> scores.masked_fill (future, ninf))
        let att = scores.softmax (-1L) // [B; H; S; S]
        let y = att.matmul(v).transpose(1L, 2L).reshape (b, s, int64 embd) // [B; S; D]
        (c_proj.forward y).MoveToOuterDisposeScope()

/// The position-wise MLP: c_proj(gelu_new(c_fc x)), c_fc [D; 4D], c_proj [4D; D] (Radford et al. 2018).
type Mlp(name: string, embd: int) as this =
    inherit torch.nn.Module<Tensor, Tensor>(name)
    /// Hidden width 4 D, as in GPT-2 (n_inner = None in Hugging Face's config).
    let hidden = 4 * embd
    let c_fc = new Conv1D("c_fc", embd, hidden)
    let c_proj = new Conv1D("c_proj", hidden, embd)
    do this.RegisterComponents()
    member _.CFc = c_fc
    member _.CProj = c_proj
    /// x [B; S; D] -> [B; S; D].
    override _.forward(x: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        (c_proj.forward (geluNew (c_fc.forward x))).MoveToOuterDisposeScope()

/// A pre-LN block (Radford et al. 2019 sec. 2.3): x + attn(ln_1 x), then + mlp(ln_2 x).
type Block(name: string, cfg: Gpt2Config) as this =
    inherit torch.nn.Module<Tensor, Tensor>(name)
    let ln_1 = torch.nn.LayerNorm(int64 cfg.Embd, cfg.LayerNormEpsilon)
    let attn = new Attention("attn", cfg.Embd, cfg.Heads)
    let ln_2 = torch.nn.LayerNorm(int64 cfg.Embd, cfg.LayerNormEpsilon)
    let mlp = new Mlp("mlp", cfg.Embd)
    do this.RegisterComponents()
    member _.Attn = attn
    member _.Mlp = mlp
    /// ln_1, before the attention.
    member _.Ln1 = ln_1
    /// ln_2, before the MLP.
    member _.Ln2 = ln_2
    /// x [B; S; D] -> [B; S; D].
    override _.forward(x: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let x = plus x (attn.forward (ln_1.forward x))
        (plus x (mlp.forward (ln_2.forward x))).MoveToOuterDisposeScope()

/// GPT-2: token embedding wte [V; D] + position embedding wpe [P; D], n_layer blocks `h`, final ln_f, and
/// logits x wte^T (the output layer tied to wte). Parameter names equal Hugging Face's GPT2Model state dict.
type Gpt2Model(cfg: Gpt2Config) as this =
    inherit torch.nn.Module<Tensor, Tensor>("gpt2")
    let cfg = orFail "GPT-2 config" (Gpt2Config.validate cfg) cfg
    let wte = torch.nn.Embedding(int64 cfg.VocabSize, int64 cfg.Embd)
    let wpe = torch.nn.Embedding(int64 cfg.Positions, int64 cfg.Embd)
    let h = torch.nn.ModuleList<Block>([| for i in 0 .. cfg.Layers - 1 -> new Block(string i, cfg) |])
    let ln_f = torch.nn.LayerNorm(int64 cfg.Embd, cfg.LayerNormEpsilon)
    do
        use _ = torch.no_grad ()
        // Hugging Face's _init_weights: embeddings N(0, initializer_range).
        torch.nn.init.normal_ (wte.weight, 0.0, InitializerRange) |> ignore
        torch.nn.init.normal_ (wpe.weight, 0.0, InitializerRange) |> ignore
        this.RegisterComponents()

    member _.Config = cfg
    member _.Blocks : Block list = [ for b in h -> b ]
    /// wte, the token embedding [V; D] (also the output layer).
    member _.Wte = wte
    /// wpe, the position embedding [P; D].
    member _.Wpe = wpe
    /// ln_f, the final LayerNorm.
    member _.LnF = ln_f
    /// Every Conv1D projection with its Hugging Face name (`h.0.attn.c_attn`, ...).
    member _.Projections : (string * Conv1D) list =
        [ for i, b in Seq.indexed h do
            yield sprintf "h.%d.attn.c_attn" i, b.Attn.CAttn
            yield sprintf "h.%d.attn.c_proj" i, b.Attn.CProj
            yield sprintf "h.%d.mlp.c_fc" i, b.Mlp.CFc
            yield sprintf "h.%d.mlp.c_proj" i, b.Mlp.CProj ]

    /// ids [B; S] int64 with S <= Positions and every id < VocabSize -> logits [B; S; V].
    override _.forward(ids: Tensor) : Tensor =
        expectIndex "ids" "[B; S]" 2 ids
        if ids.shape[1] < 1L || ids.shape[1] > int64 cfg.Positions then
            invalidArg "ids" (sprintf "expected ids [B; S] with 1 <= S <= %d (n_positions), got %s" cfg.Positions (describe ids))
        use scope = torch.NewDisposeScope()
        if ids.numel () > 0L then
            let lo, hi = scalar (ids.min ()), scalar (ids.max ())
            if lo < 0.0 || hi >= float cfg.VocabSize then
                invalidArg "ids" (sprintf "expected token ids in [0, %d), got values in [%g, %g]" cfg.VocabSize lo hi)
        let pos = arange 0L ids.shape[1] torch.ScalarType.Int64 ids.device // [S]
        let mutable x = plus (wte.forward ids) (wpe.forward pos) // [B; S; D]
        for b in h do x <- b.forward x
        let x = ln_f.forward x // [B; S; D]
        (x.matmul (wte.weight.t ())).MoveToOuterDisposeScope() // [B; S; V]

/// What `loadReport` found: checkpoint names the model lacks, model names the checkpoint lacks, and names
/// skipped on purpose (causal-mask buffers `h.N.attn.bias`/`masked_bias`, and `lm_head.weight`, tied to wte).
type LoadReport = { Missing: string list; Unexpected: string list; Ignored: string list }

/// The prefix of GPT2LMHeadModel checkpoints in front of GPT2Model names.
let private transformerPrefix = "transformer."

/// A state-dict name without GPT2LMHeadModel's `transformer.` prefix (GPT2Model names).
let private stripTransformerPrefix (name: string) : string =
    if name.StartsWith transformerPrefix then name.Substring transformerPrefix.Length else name

let private isIgnored (name: string) =
    name = "lm_head.weight"
    || (name.StartsWith "h." && (name.EndsWith ".attn.bias" || name.EndsWith ".attn.masked_bias"))

/// Infers the config from a state dict's shapes: V and D from wte [V; D], P from wpe [P; D], n_layer from the
/// `h.N.` names; heads and epsilon are not in the shapes and are given.
let inferConfig (heads: int) (state: (string * Tensor) list) : Gpt2Config =
    let find key =
        match state |> List.tryFind (fun (n, _) -> n = key) with
        | Some(_, t) when t.Dimensions = 2L -> t
        | Some(_, t) -> invalidArg "state" (sprintf "expected %s [rows; D], got %s" key (describe t))
        | None -> invalidArg "state" (sprintf "expected a GPT-2 state dict with %s; names: %s" key (String.Join(", ", List.map fst state |> List.truncate 10)))
    let wte, wpe = find "wte.weight", find "wpe.weight"
    let layers =
        state
        |> List.choose (fun (n, _) ->
            let parts = n.Split '.'
            if parts.Length > 2 && parts[0] = "h" then (match Int32.TryParse parts[1] with | true, i -> Some(i + 1) | _ -> None) else None)
        |> List.fold max 0
    { Gpt2Config.defaults with
        VocabSize = int wte.shape[0]; Embd = int wte.shape[1]; Positions = int wpe.shape[0]; Layers = layers; Heads = heads }

/// Copies a state dict (GPT2Model names, or GPT2LMHeadModel's with `transformer.`) into `model` and reports
/// missing, unexpected and ignored names. Shape mismatches fail naming the tensor. Missing parameters keep
/// their current values.
let loadState (model: Gpt2Model) (state: (string * Tensor) list) : LoadReport =
    let state = state |> List.map (fun (n, t) -> stripTransformerPrefix n, t)
    let own = dict [ for struct (n, p) in model.named_parameters () -> n, p ]
    use _ = torch.no_grad ()
    let mutable unexpected, ignored, seen = [], [], Set.empty
    for name, t in state do
        match own.TryGetValue name with
        | true, p ->
            if not (Seq.forall2 (=) p.shape t.shape) || p.shape.Length <> t.shape.Length then
                invalidArg "state" (sprintf "tensor %s: expected shape %A, got %s" name p.shape (describe t))
            p.copy_ t |> ignore
            seen <- seen.Add name
        | _ when isIgnored name -> ignored <- name :: ignored
        | _ -> unexpected <- name :: unexpected
    { Missing = [ for KeyValue(n, _) in own do if not (seen.Contains n) then n ]
      Unexpected = List.rev unexpected
      Ignored = List.rev ignored }

/// Builds a GPT-2 from a safetensors file (e.g. `model.safetensors` of the GPT-2 release), inferring the
/// sizes from the shapes (`inferConfig`), and reports missing/unexpected names without failing.
let loadWithReport (heads: int) (path: string) : Gpt2Model * LoadReport =
    let state = Safetensors.read path |> List.map (fun (n, t) -> stripTransformerPrefix n, t)
    let model = new Gpt2Model(inferConfig heads state)
    let report = loadState model state
    model, report

/// Heads of the released GPT-2 checkpoints' smallest model; the file does not record it.
let DefaultHeads = Gpt2Config.defaults.Heads

/// Builds a GPT-2 from a safetensors file with `heads` attention heads, failing (with every missing and
/// unexpected tensor name, and the file) unless the file fills exactly the model's parameters.
let loadHeads (heads: int) (path: string) : Gpt2Model =
    let model, report = loadWithReport heads path
    if not report.Missing.IsEmpty || not report.Unexpected.IsEmpty then
        model.Dispose()
        invalidArg "path" (sprintf "GPT-2 checkpoint %s does not match the model: missing [%s]; unexpected [%s]"
                               path (String.Join(", ", report.Missing)) (String.Join(", ", report.Unexpected)))
    model

/// `loadHeads` with 12 heads (GPT-2 124M).
let load (path: string) : Gpt2Model = loadHeads DefaultHeads path

/// The model's parameters as a state dict with Hugging Face's names: unmerged adapters are included
/// (`h.0.attn.c_attn.lora_A`, ...); merged ones are left out, their update being in the weights.
let stateDict (model: Gpt2Model) : (string * Tensor) list =
    let merged = set [ for n, c in model.Projections do if c.Merged then n ]
    let isMergedAdapter (n: string) =
        (n.EndsWith ".lora_A" || n.EndsWith ".lora_B") && merged.Contains(n.Substring(0, n.LastIndexOf '.'))
    [ for struct (n, p) in model.named_parameters () do if not (isMergedAdapter n) then yield n, (p :> Tensor) ]

/// Writes `stateDict model` to a safetensors file: after `merge` (or without adapters) a plain GPT-2
/// checkpoint that `load` and Hugging Face read.
let save (path: string) (model: Gpt2Model) : unit = Safetensors.write path (stateDict model)

// ---------------------------------------------------------------- LoRA (Hu et al. 2021)

/// Which projections get adapters, as in PEFT's `target_modules`: a projection is adapted when its name
/// (`h.0.attn.c_attn`) equals a target or ends with "." + target. "c_attn" (the default, the query/key/value
/// projection that Hu et al. 2021 sec. 7.1 adapt), "c_proj" (both output projections), "attn.c_proj",
/// "mlp.c_fc", "mlp.c_proj".
type Gpt2LoraConfig =
    { /// Rank and alpha; FreezeBase is ignored here (the base is always frozen, as in PEFT).
      Lora: LoraConfig
      Targets: string list }

module Gpt2LoraConfig =
    /// Rank 8, alpha 16 on c_attn: the PEFT defaults commonly used for GPT-2.
    let defaults = { Lora = { Rank = 8; Alpha = 16.0; FreezeBase = true }; Targets = [ "c_attn" ] }

let private matches (target: string) (name: string) = name = target || name.EndsWith("." + target)

/// Adds LoRA adapters (rank r, scale alpha / r, B = 0, so the model's output is unchanged) to the targeted
/// projections and freezes every other parameter (requires_grad = false); returns the adapted projections'
/// names. Fails if a target matches nothing. Dropout 0.
let applyLora (cfg: Gpt2LoraConfig) (model: Gpt2Model) : string list =
    let lora = orFail "LoRA config" (LoraConfig.validate cfg.Lora) cfg.Lora
    if cfg.Targets.IsEmpty then invalidArg "cfg" "expected at least one LoRA target (e.g. c_attn)"
    let projections = model.Projections
    for t in cfg.Targets do
        if not (projections |> List.exists (fun (n, _) -> matches t n)) then
            invalidArg "cfg" (sprintf "LoRA target %s matches no projection (expected c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj or mlp.c_fc)" t)
    for struct (_, p) in model.named_parameters () do p.requires_grad <- false
    [ for n, c in projections do
        if cfg.Targets |> List.exists (fun t -> matches t n) then
            c.AddLora lora
            yield n ]

/// Folds every adapter into its base weight (W <- W + (alpha / r) A B) for inference without extra matmuls.
let merge (model: Gpt2Model) : unit =
    for _, c in model.Projections do
        if c.HasLora && not c.Merged then c.Merge()

/// Parameters with requires_grad (the adapters after `applyLora`).
let trainableParameters (model: Gpt2Model) : int64 =
    model.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.sumBy (fun p -> p.NumberOfElements)

/// All parameters, adapters included.
let totalParameters (model: Gpt2Model) : int64 = model.parameters () |> Seq.sumBy (fun p -> p.NumberOfElements)

/// Mean next-token cross-entropy of ids [B; S]: position t predicts token t + 1 (Radford et al. 2018 eq. 1).
let nextTokenLoss (model: Gpt2Model) (ids: Tensor) : Tensor =
    expectIndex "ids" "[B; S] with S >= 2" 2 ids
    if ids.shape[1] < 2L then invalidArg "ids" (sprintf "expected ids [B; S] with S >= 2, got %s" (describe ids))
    use scope = torch.NewDisposeScope()
    let s = ids.shape[1]
    let logits = model.forward (ids.narrow (1L, 0L, s - 1L)) // [B; S-1; V]
    let targets = ids.narrow (1L, 1L, s - 1L) // [B; S-1]
    let loss = torch.nn.functional.cross_entropy (logits.reshape (-1L, logits.shape[2]), targets.reshape (-1L))
    loss.MoveToOuterDisposeScope()
