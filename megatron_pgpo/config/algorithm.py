"""Config sections for the RL algorithm: advantages (GRPO/PGPO), DAPO sampling, loss, KL penalty."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from .base import Section, require, require_positive


@dataclass
class PGPOConfig(Section):
    PATH: ClassVar[str] = "algorithm.pgpo"

    tau: float = 0.4
    """Gate threshold of Eq. 6 in [0, 1]: tokens with normalised dependency below it are suppressed, above boosted."""
    beta: float = 2.0
    """Boost strength of Eq. 6 (>= 0): the most image-dependent token gets weight 1 + beta before Eq. 7."""
    eps: float = 1e-6
    """Stabiliser of Eqs. 5-7 and the degenerate-response threshold."""
    estimator: Literal["k3", "exact"] = "k3"
    """Visual-dependency estimator: k3 at the sampled token (paper) or the exact full-vocabulary KL."""
    s_max: float = 1e4
    """Scores are clamped to [0, s_max] (NaN -> 0) before Eq. 4; sanitised tokens are counted in metrics."""
    kl_chunk_tokens: int = 1024
    """Tokens per chunk of the exact vocab-parallel KL (bounds its extra memory)."""

    def validate(self) -> None:
        require(0.0 <= self.tau <= 1.0, f"algorithm.pgpo.tau must be in [0, 1], got {self.tau}")
        require_positive("algorithm.pgpo.beta", self.beta, allow_zero=True)
        require_positive("algorithm.pgpo.eps", self.eps)
        require_positive("algorithm.pgpo.s_max", self.s_max)
        require_positive("algorithm.pgpo.kl_chunk_tokens", self.kl_chunk_tokens)


@dataclass
class DAPOConfig(Section):
    PATH: ClassVar[str] = "algorithm.dapo"

    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal and sample more prompts until the batch is full."""
    max_sampling_rounds: int = 3
    """Bound on dynamic-sampling rounds per step; after it the step trains on what it has."""
    filter_metric: Literal["reward", "accuracy"] = "reward"
    """What must vary within a group for dynamic sampling to keep it: the total reward (accuracy and format), or
    the answer accuracy alone (DAPO's paper and verl's filter_groups.metric=acc: a group whose answers are all
    right or all wrong is dropped even when the format varies). The example recipes use accuracy."""
    overlong_filter: bool = False
    """Mask out responses cut at max_new_tokens (no reward or penalty for an unfinished answer)."""
    overlong_buffer: int = 0
    """Soft overlong penalty: the last this-many tokens before max_new_tokens are penalised linearly; 0 disables."""
    overlong_penalty_factor: float = 1.0
    """Largest soft overlong penalty (subtracted from the reward at max_new_tokens)."""

    def validate(self) -> None:
        require_positive("algorithm.dapo.max_sampling_rounds", self.max_sampling_rounds)
        require_positive("algorithm.dapo.overlong_buffer", self.overlong_buffer, allow_zero=True)
        require_positive("algorithm.dapo.overlong_penalty_factor", self.overlong_penalty_factor, allow_zero=True)


@dataclass
class KLConfig(Section):
    PATH: ClassVar[str] = "algorithm.kl"

    coef: float = 0.0
    """Coefficient of the KL-to-reference penalty in the loss (GRPO as published: 0.04; verl's use_kl_loss). The
    reference is a frozen copy of model.hf_path, sharded like the policy, whose log-probs the scoring pass adds;
    0 disables it, its pass and its memory. Logged as actor/kl_ref."""
    estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator at the sampled token, as verl's kl_loss_type: k1 the log-ratio, k2 half its square,
    k3 the unbiased non-negative estimator GRPO uses."""

    def validate(self) -> None:
        require_positive("algorithm.kl.coef", self.coef, allow_zero=True)


@dataclass
class PAPOConfig(Section):
    PATH: ClassVar[str] = "algorithm.papo"

    coef: float = 0.01
    """PAPO's implicit perception loss weight gamma (algorithm.loss=papo): the clamped k3 of the policy on the
    image vs on the masked image is maximised with it (the paper: 0.01 with DAPO, 0.02 with GRPO)."""
    clamp: float = 10.0
    """The per-token perception KL is clamped to [-clamp, clamp] (PAPO's code: 10)."""
    mask_ratio: float = 0.6
    """Probability that each 14-px image patch is blacked out in the masked view."""

    def validate(self) -> None:
        require_positive("algorithm.papo.coef", self.coef, allow_zero=True)
        require_positive("algorithm.papo.clamp", self.clamp)
        require(0.0 < self.mask_ratio < 1.0, f"algorithm.papo.mask_ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass
class VPPOConfig(Section):
    PATH: ClassVar[str] = "algorithm.vppo"

    top_fraction: float = 0.4
    """VPPO (algorithm.advantage=vppo): the share of each response's tokens, by masked-image dependency, whose
    gradient is kept (the others get advantage 0)."""
    beta_min: float = 0.9
    """Smallest trajectory scale: a response's advantage is scaled into [beta_min, beta_min + (1 - beta_min) /
    mean] by its normalised mean dependency."""
    score_clamp: float = 10.0
    """Token dependency scores are clamped to [0, score_clamp] (VPPO's code: 10)."""
    mask_ratio: float = 0.5
    """Probability that each 14-px image patch is blacked out in the masked view."""

    def validate(self) -> None:
        require(0.0 < self.top_fraction <= 1.0, f"algorithm.vppo.top_fraction must be in (0, 1], got {self.top_fraction}")
        require(0.0 <= self.beta_min <= 1.0, f"algorithm.vppo.beta_min must be in [0, 1], got {self.beta_min}")
        require_positive("algorithm.vppo.score_clamp", self.score_clamp)
        require(0.0 < self.mask_ratio < 1.0, f"algorithm.vppo.mask_ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass
class AlgorithmConfig(Section):
    PATH: ClassVar[str] = "algorithm"

    advantage: str = "pgpo"
    """Advantage shaper from the registry: `pgpo` (per-token visual-dependency weights), its ablations
    `pgpo_suppression_only` / `pgpo_boosting_only` / `pgpo_no_normalization`, `vppo`, or `grpo` (broadcast; GRPO
    and DAPO). docs/algorithms.md has each one's equations."""
    loss: str = "clipped"
    """Policy loss from the registry: `clipped` (the PPO/DAPO clipped surrogate) or `papo` (plus PAPO's implicit
    perception loss)."""
    aggregation: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """Loss aggregation: token mean over the global batch (DAPO) or mean of per-response token means (GRPO)."""
    clip_low: float = 0.2
    """Lower clip: the ratio is clipped at 1 - clip_low."""
    clip_high: float = 0.28
    """Upper clip: 1 + clip_high (DAPO's clip-higher; set equal to clip_low for PPO/GRPO)."""
    scale_by_std: bool = True
    """Divide group-centred rewards by the group's sample std (GRPO/DAPO); false keeps only the centring."""
    adv_eps: float = 1e-6
    """Added to the group std before dividing."""
    monitor_visual_dependency: bool = False
    """Run the text-only pass and log the vd/* statistics (and S in the sample files) even when the advantage
    shaper does not use S (grpo); off, GRPO/DAPO skip that pass. PGPO always runs it."""
    pgpo: PGPOConfig = field(default_factory=PGPOConfig)
    """PGPO's visual-dependency reshaping (used when advantage=pgpo)."""
    dapo: DAPOConfig = field(default_factory=DAPOConfig)
    """DAPO's sampling and length handling."""
    kl: KLConfig = field(default_factory=KLConfig)
    """Optional KL penalty to a frozen reference model."""
    papo: PAPOConfig = field(default_factory=PAPOConfig)
    """PAPO's implicit perception loss (used when loss=papo)."""
    vppo: VPPOConfig = field(default_factory=VPPOConfig)
    """VPPO's token filtering and trajectory scaling (used when advantage=vppo)."""
    entropy_penalty: float = 0.0
    """Entropy penalty of PAPO (0.03) and VPPO (0.06): the loss adds entropy_penalty x the token mean of -log pi
    at the sampled tokens (which lowers the entropy; 0: off)."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss subtracts entropy_coef x the aggregated per-token entropy of the current policy, as
    verl's entropy_coeff (0: off, the entropy is then not computed in the update)."""

    def validate(self) -> None:
        from ..algorithms import ADVANTAGE_SHAPERS, POLICY_LOSSES  # registries are the source of valid names

        from ..algorithms import second_view

        require_positive("algorithm.entropy_coef", self.entropy_coef, allow_zero=True)
        require_positive("algorithm.entropy_penalty", self.entropy_penalty, allow_zero=True)
        require(
            self.advantage in ADVANTAGE_SHAPERS,
            f"algorithm.advantage={self.advantage!r} is not registered; valid: {', '.join(ADVANTAGE_SHAPERS.names())}",
        )
        require(
            self.loss in POLICY_LOSSES,
            f"algorithm.loss={self.loss!r} is not registered; valid: {', '.join(POLICY_LOSSES.names())}",
        )
        try:
            second_view(ADVANTAGE_SHAPERS.get(self.advantage), POLICY_LOSSES.get(self.loss))
        except ValueError as exc:
            require(False, f"algorithm.advantage={self.advantage} with algorithm.loss={self.loss}: {exc}")
        require(0.0 <= self.clip_low < 1.0, f"algorithm.clip_low must be in [0, 1), got {self.clip_low}")
        require_positive("algorithm.clip_high", self.clip_high, allow_zero=True)
        require_positive("algorithm.adv_eps", self.adv_eps)
