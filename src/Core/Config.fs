/// Configuration records. Each has a `defaults` value; runs override fields with `{ defaults with ... }`,
/// and `validate` returns every problem at once.
module Moe.Config

// ---------------------------------------------------------------- routing

/// How router logits are computed from a hidden state h [D].
type Scorer =
    /// logits = h W_r (Switch, GShard, Mixtral).
    | LinearRouter
    /// logits_e = (h W_q) . m_e / sqrt(d_r): scaled dot product with learned expert embeddings m_e [d_r].
    | AttentionRouter of routerDim: int

/// The map from logits to a distribution over experts.
type Normaliser =
    | Softmax
    /// Martins & Astudillo 2016: Euclidean projection onto the simplex; exact zeros.
    | Sparsemax

/// Where top-k sits relative to the normaliser.
type TopKOrder =
    /// normalise over all E, then keep the k largest (Switch, Mixtral, GShard).
    | NormaliseThenTopK
    /// keep the k largest logits, then normalise over those k (Megatron-LM's default).
    | TopKThenNormalise

/// Hash routing schemes (Roller et al. 2021, "Hash Layers for Large Sparse Models").
type HashScheme =
    /// A fixed random map token id -> expert, from a seed.
    | RandomHash of seed: int
    /// Token ids binned by corpus frequency so each expert receives about the same number of tokens.
    | BalancedHash

/// Who chooses, and how.
type Selection =
    /// Each token picks its k experts. `renormalise` rescales the k kept weights to sum to 1
    /// ("top-k mask" in the literature); without it the weights are the raw probabilities ("naive top-k").
    | TokenChoiceTopK of order: TopKOrder * renormalise: bool
    /// Fedus et al. 2022 (Switch Transformer): k = 1, multiplicative jitter on the router input in training.
    | SwitchTop1
    /// Shazeer et al. 2017 eq. 3-5: trainable softplus noise on the logits in training, then top-k.
    | NoisyTopK
    /// Every expert, weighted by the normaliser's output (no top-k).
    | AllExperts
    /// Zhou et al. 2022: each expert takes its top-C tokens.
    | ExpertChoice
    /// No learned parameters: the expert is a function of the token id.
    | Hash of HashScheme

/// Per-expert capacity.
type Capacity =
    /// No limit: every assignment is kept (MegaBlocks' "dropless"). Expert choice: each expert may take all T tokens.
    | Dropless
    /// Token choice: C = max(MinCapacity, ceil(factor * T * K / E)); assignments past C are dropped
    /// (Switch eq. 3). Expert choice: C = min(T, max(MinCapacity, ceil(factor * T / E))), the factor being
    /// the average number of experts per token (Zhou et al. 2022, sec. 3.1).
    | Factor of float

/// Router settings.
type RouterConfig =
    { Experts: int
      /// Picks per token for token-choice routers (ignored by SwitchTop1, which is 1).
      K: int
      Scorer: Scorer
      Normaliser: Normaliser
      Selection: Selection
      Capacity: Capacity
      /// Lower bound on capacity, so tiny batches do not drop everything (Switch uses 4).
      MinCapacity: int
      /// Switch multiplicative jitter epsilon: input scaled by U(1 - eps, 1 + eps) in training (Fedus et al. 2022, sec. 2.4).
      Jitter: float
      /// Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): bias update rate u; None turns it off.
      /// The bias changes which experts are selected, never the combine weights.
      BiasUpdateRate: float option }

module RouterConfig =
    /// Token-choice top-2 over 8 experts with softmax then top-k, renormalised, dropless.
    let defaults =
        { Experts = 8
          K = 2
          Scorer = LinearRouter
          Normaliser = Softmax
          Selection = TokenChoiceTopK(NormaliseThenTopK, true)
          Capacity = Dropless
          MinCapacity = 4
          Jitter = 0.01
          BiasUpdateRate = None }

    /// Picks per token the selection actually makes (Switch: 1; all-experts and expert-choice: E).
    let picksPerToken (cfg: RouterConfig) =
        match cfg.Selection with
        | SwitchTop1 | Hash _ -> 1
        | AllExperts | ExpertChoice -> cfg.Experts
        | TokenChoiceTopK _ | NoisyTopK -> cfg.K

    /// Every problem with the config, empty when it is usable.
    let validate (cfg: RouterConfig) : string list =
        [ if cfg.Experts < 1 then sprintf "Experts must be >= 1, got %d" cfg.Experts
          match cfg.Selection with
          | TokenChoiceTopK _ | NoisyTopK when cfg.K < 1 || cfg.K > cfg.Experts ->
              sprintf "K must be in 1..Experts (%d), got %d" cfg.Experts cfg.K
          | _ -> ()
          match cfg.Capacity with
          | Factor f when not (f > 0.0) -> sprintf "capacity factor must be > 0, got %g" f
          | _ -> ()
          if cfg.MinCapacity < 0 then sprintf "MinCapacity must be >= 0, got %d" cfg.MinCapacity
          if cfg.Jitter < 0.0 || cfg.Jitter >= 1.0 then sprintf "Jitter must be in [0, 1), got %g" cfg.Jitter
          match cfg.Scorer with
          | AttentionRouter d when d < 1 -> sprintf "Attention router dimension must be >= 1, got %d" d
          | _ -> ()
          match cfg.BiasUpdateRate with
          | Some u when not (u >= 0.0) -> sprintf "BiasUpdateRate must be >= 0, got %g" u
          | _ -> ()
          match cfg.Selection, cfg.Normaliser with
          | ExpertChoice, Sparsemax -> "ExpertChoice uses softmax scores; Sparsemax is not supported with it"
          | _ -> ()
          match cfg.Selection, cfg.BiasUpdateRate with
          | (AllExperts | ExpertChoice | Hash _), Some _ ->
              sprintf "BiasUpdateRate steers token-choice selection (TokenChoiceTopK, SwitchTop1, NoisyTopK); %A selects nothing it could steer" cfg.Selection
          | _ -> () ]

// ---------------------------------------------------------------- experts and the MoE layer

/// Expert feed-forward activation.
type Activation =
    | ReLU
    | GELU
    /// Shazeer 2020: (silu(x W1) * x W3) W2.
    | SwiGLU

/// Weights of the balancing losses, applied once where the total loss is assembled (0 turns one off).
type LossWeights =
    { /// Switch Transformer eq. 4, alpha = 1e-2 in the paper.
      SwitchAux: float
      /// Shazeer et al. 2017 eq. 6 (w_importance).
      Importance: float
      /// Shazeer et al. 2017 eq. 10 (w_load).
      Load: float
      /// ST-MoE eq. 5, 1e-3 in the paper.
      ZLoss: float }

module LossWeights =
    let defaults = { SwitchAux = 1e-2; Importance = 0.0; Load = 0.0; ZLoss = 1e-3 }
    let none = { SwitchAux = 0.0; Importance = 0.0; Load = 0.0; ZLoss = 0.0 }

/// A sparse MoE layer replacing a Transformer FFN.
type MoeConfig =
    { ModelDim: int
      /// Hidden size of each expert FFN.
      ExpertHidden: int
      Activation: Activation
      Router: RouterConfig
      /// Always-on experts added to every token's output (DeepSeekMoE's shared experts); 0 for none.
      SharedExperts: int }

module MoeConfig =
    let defaults =
        { ModelDim = 64
          ExpertHidden = 128
          Activation = GELU
          Router = RouterConfig.defaults
          SharedExperts = 0 }

    let validate (cfg: MoeConfig) : string list =
        [ if cfg.ModelDim < 1 then sprintf "ModelDim must be >= 1, got %d" cfg.ModelDim
          if cfg.ExpertHidden < 1 then sprintf "ExpertHidden must be >= 1, got %d" cfg.ExpertHidden
          if cfg.SharedExperts < 0 then sprintf "SharedExperts must be >= 0, got %d" cfg.SharedExperts
          yield! RouterConfig.validate cfg.Router ]

/// Raises one ArgumentException listing every problem, or returns the config unchanged.
let orFail (what: string) (problems: string list) (cfg: 'a) : 'a =
    match problems with
    | [] -> cfg
    | ps -> invalidArg what (sprintf "invalid %s:\n  - %s" what (String.concat "\n  - " ps))

// ---------------------------------------------------------------- LoRA experts

/// Experts as low-rank adapters on one shared base FFN (Hu et al. 2021, "LoRA"): expert e's projection W
/// becomes W + (Alpha / Rank) A_e B_e with A_e [in; Rank], B_e [Rank; out], B_e initialised to zero.
type LoraConfig =
    { /// r, the adapters' inner width (Hu et al. 2021 sec. 4.1; r = 1..8 already adapt GPT-3, their Table 6).
      Rank: int
      /// alpha; the adapter is scaled by alpha / r so that changing r needs no new learning rate (sec. 4.1).
      Alpha: float
      /// Freeze the shared base FFN (requires_grad = false): only the adapters and the router train.
      FreezeBase: bool }

module LoraConfig =
    /// Rank 4, alpha 8 (scale 2), trainable base: experts start equal to the base FFN and grow apart.
    let defaults = { Rank = 4; Alpha = 8.0; FreezeBase = false }

    let validate (cfg: LoraConfig) : string list =
        [ if cfg.Rank < 1 then sprintf "Rank must be >= 1, got %d" cfg.Rank
          if not (cfg.Alpha > 0.0) || System.Double.IsInfinity cfg.Alpha then sprintf "Alpha must be finite and > 0, got %g" cfg.Alpha ]

    /// The adapter scale alpha / r (Hu et al. 2021 sec. 4.1).
    let scale (cfg: LoraConfig) : float = cfg.Alpha / float cfg.Rank
