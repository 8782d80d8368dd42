/// Routers and balancing losses: pure functions from router logits (or token ids) to a sparse routing
/// record. Routing math runs in float32 whatever the model's dtype.
/// Axes: T tokens, E experts, K picks per token, C capacity per expert.
module Moe.Routing

open TorchSharp
open Moe.Tensors
open Moe.Config

/// Per-batch routing statistics (detached).
type RoutingStats =
    { /// Fraction of kept assignments that went to each expert. // [E] float32
      TokensPerExpert: Tensor
      /// Fraction of the T*K proposed assignments dropped by capacity (0 when dropless).
      DroppedFraction: Tensor
      /// Mean over tokens of the entropy (nats) of the router distribution. // scalar
      RouterEntropy: Tensor }

/// Who goes where. Token-choice routers fill K slots per token; expert-choice uses K = E slots,
/// slot e of token t being kept when expert e chose t. Dispatch uses only kept slots.
type Routing =
    { /// Expert of each (token, slot). // [T; K] int64
      Experts: Tensor
      /// Combine weight of each (token, slot); 0 where not kept. // [T; K] float32
      Weights: Tensor
      /// Whether the slot survived capacity (always true when dropless). // [T; K] bool
      Kept: Tensor
      /// Router distribution over experts, for the balancing losses; None for hash routing. // [T; E] float32
      Probs: Tensor option
      /// Raw router logits, for the z-loss; None for hash routing. // [T; E] float32
      Logits: Tensor option
      Stats: RoutingStats }

/// Unweighted balancing losses of one MoE layer (scalars; zero-valued where a router has none).
type AuxLosses =
    { SwitchAux: Tensor
      Importance: Tensor
      Load: Tensor
      ZLoss: Tensor }
