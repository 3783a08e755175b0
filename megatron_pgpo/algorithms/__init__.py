"""Pure RL math: advantages, PGPO token weights, visual dependency, policy losses. Imports only torch.

Importing this package fills the registries (``ADVANTAGE_SHAPERS``: grpo, pgpo and its ablations, vppo;
``POLICY_LOSSES``: clipped, papo).
"""
from . import advantages, dapo, losses, perception, pgpo, visual_dependency  # noqa: F401  (registers the entries)
from .advantages import dapo_keep_groups, group_normalized_advantages, grpo_token_advantages
from .losses import aggregate_loss, clipped_policy_loss, reference_kl
from .pgpo import pgpo_advantages, pgpo_token_weights
from .registry import ADVANTAGE_SHAPERS, POLICY_LOSSES, Registry, second_view
from .visual_dependency import full_vocab_kl, k3_divergence, sanitize_scores

__all__ = [
    "ADVANTAGE_SHAPERS",
    "POLICY_LOSSES",
    "Registry",
    "aggregate_loss",
    "clipped_policy_loss",
    "dapo_keep_groups",
    "full_vocab_kl",
    "group_normalized_advantages",
    "grpo_token_advantages",
    "k3_divergence",
    "pgpo_advantages",
    "pgpo_token_weights",
    "reference_kl",
    "sanitize_scores",
    "second_view",
]
