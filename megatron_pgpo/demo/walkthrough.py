"""`megatron-pgpo walkthrough`: PGPO's algorithm core on a batch of synthetic rollouts, shown token by token.

What runs for real: the reward function (math-verify answer checking + format check) on the response strings,
group-normalised advantages, the k3 visual-dependency estimator, PGPO's token weights (Eqs. 4-8) through the
advantage-shaper registry, and the clipped policy loss. What is synthetic: the responses and the per-token
log-probs of the image and text-only passes (answer tokens are made image-dependent, reasoning and format tokens
not), since this walkthrough needs no model. `megatron-pgpo demo` trains a real (tiny) model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Sequence

import torch

from ..algorithms import ADVANTAGE_SHAPERS, POLICY_LOSSES, group_normalized_advantages, k3_divergence
from ..config import Config

# (question, ground truth, responses): a prompt per group; the image is "a red square" / "three circles".
DEMO_GROUPS = [
    (
        "What colour is the square?",
        "red",
        [
            "<think> The square in the image is red . </think> \\boxed{red}",
            "<think> I see a square , its colour is blue . </think> \\boxed{blue}",
            "<think> The shape is a square and it is red </think> The answer is \\boxed{red}",
            "The square is green \\boxed{green}",
        ],
    ),
    (
        "How many circles are there?",
        "3",
        [
            "<think> I count the circles : one , two , three . </think> \\boxed{3}",
            "<think> There are two circles . </think> \\boxed{2}",
            "<think> Counting circles gives 3 </think> \\boxed{3.0}",
            "<think> Maybe four circles . </think> \\boxed{4}",
        ],
    ),
]

# Tokens whose prediction needs the image (colours, counts, the boxed answer).
_IMAGE_WORDS = re.compile(r"^(red|blue|green|one|two|three|four|3|2|4|3\.0|\\boxed\{.*\})$")


@dataclass
class DemoBatch:
    tokens: List[List[str]]  # [B][T_i] whitespace tokens of each response
    group_ids: torch.Tensor  # [B]
    response_mask: torch.Tensor  # [B, T]
    logp_image: torch.Tensor  # [B, T] log-prob of each token with the image (old policy)
    logp_text: torch.Tensor  # [B, T] the same token in the text-only pass


def make_batch(responses: Sequence[Sequence[str]], seed: int = 0) -> DemoBatch:
    """Tokenise the responses by whitespace and draw synthetic log-probs: image words lose most of their
    probability without the image; every other token barely changes."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [r.split() for group in responses for r in group]
    group_ids = torch.tensor([g for g, group in enumerate(responses) for _ in group])
    max_len = max(len(t) for t in tokens)
    shape = (len(tokens), max_len)
    mask = torch.zeros(shape, dtype=torch.bool)
    logp_image = torch.zeros(shape)
    logp_text = torch.zeros(shape)
    for i, toks in enumerate(tokens):
        for t, tok in enumerate(toks):
            mask[i, t] = True
            base = -0.05 - 0.6 * torch.rand((), generator=gen).item()
            drop = (1.5 + 2.0 * torch.rand((), generator=gen).item()) if _IMAGE_WORDS.match(tok) else (
                0.02 * torch.rand((), generator=gen).item())
            logp_image[i, t], logp_text[i, t] = base, base - drop
    return DemoBatch(tokens, group_ids, mask, logp_image, logp_text)


def run_demo(cfg: Config, console=None) -> dict:
    """Run the walkthrough; prints with rich and returns the numbers (for tests)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..rewards import RewardScorer

    console = console or Console()
    algo = cfg.algorithm
    console.rule("[bold]megatron-pgpo walkthrough: PGPO on a batch of synthetic rollouts")
    console.print(
        f"advantage shaper [bold]{algo.advantage}[/] (tau={algo.pgpo.tau}, beta={algo.pgpo.beta}), loss "
        f"[bold]{algo.loss}[/] (clip {algo.clip_low}/{algo.clip_high}, {algo.aggregation}); rewards "
        f"{cfg.reward.accuracy_weight} x accuracy + {cfg.reward.format_weight} x format"
    )
    batch = make_batch([g[2] for g in DEMO_GROUPS], seed=cfg.trainer.seed)
    responses = [r for g in DEMO_GROUPS for r in g[2]]
    answers = [g[1] for g in DEMO_GROUPS for _ in g[2]]
    with RewardScorer(
        accuracy_weight=cfg.reward.accuracy_weight,
        format_weight=cfg.reward.format_weight,
        timeout_s=cfg.reward.timeout_s,
        num_workers=cfg.reward.num_workers,
        max_answer_chars=cfg.reward.max_answer_chars,
    ) as scorer:
        results = scorer.score_batch(responses, answers)
    rewards = torch.tensor([r.score for r in results])
    seq_adv = group_normalized_advantages(rewards, batch.group_ids, eps=algo.adv_eps, scale_by_std=algo.scale_by_std)
    scores = k3_divergence(batch.logp_image, batch.logp_text)
    shaper = ADVANTAGE_SHAPERS.get(algo.advantage)
    token_adv = shaper(seq_adv, batch.response_mask, scores=scores, tau=algo.pgpo.tau, beta=algo.pgpo.beta,
                       eps=algo.pgpo.eps, s_max=algo.pgpo.s_max)
    grpo_adv = ADVANTAGE_SHAPERS.get("grpo")(seq_adv, batch.response_mask)

    table = Table(title="rewards and group advantages", show_lines=False)
    for col in ("group", "answer", "gold", "acc", "fmt", "reward", "A (GRPO)"):
        table.add_column(col, justify="right" if col in ("acc", "fmt", "reward", "A (GRPO)") else "left")
    for i, res in enumerate(results):
        table.add_row(str(int(batch.group_ids[i])), str(res.answer), answers[i], f"{res.accuracy:.0f}",
                      f"{res.format:.0f}", f"{res.score:.2f}", f"{seq_adv[i]:+.3f}")
    console.print(table)

    console.print("\n[bold]Per-token PGPO advantages[/] (colour = weight w~: [blue]suppressed < 1[/], "
                  "[red]boosted > 1[/]; each response's weights sum to its length, so its mean advantage is A)")
    for i, toks in enumerate(batch.tokens):
        line = Text(f"A={seq_adv[i]:+.2f} | ")
        for t, tok in enumerate(toks):
            w = float(token_adv[i, t] / seq_adv[i]) if seq_adv[i] != 0 else 1.0
            style = "bold red" if w > 1.05 else ("blue" if w < 0.95 else "")
            line.append(f"{tok}", style=style)
            line.append(f"({w:.2f}) ", style="dim")
        console.print(line)

    # One clipped-loss evaluation: a policy that moved a little since sampling.
    gen = torch.Generator().manual_seed(cfg.trainer.seed + 1)
    logp_new = batch.logp_image + 0.3 * torch.randn(batch.logp_image.shape, generator=gen)
    loss_fn = POLICY_LOSSES.get(algo.loss)
    out = {}
    for name, adv in (("grpo", grpo_adv), (algo.advantage, token_adv)):
        loss, metrics = loss_fn(logp_new, batch.logp_image, adv, batch.response_mask, clip_low=algo.clip_low,
                                clip_high=algo.clip_high, aggregation=algo.aggregation)
        out[name] = (float(loss), {k: float(v) for k, v in metrics.items()})
    console.print()
    for name, (loss, metrics) in out.items():
        console.print(f"clipped loss with {name:>4} advantages: {loss:+.4f}  clip fraction "
                      f"{metrics['clip_fraction']:.3f}  approx KL {metrics['approx_kl']:.4f}")
    lengths = batch.response_mask.sum(-1)
    console.print(f"\ncheck: weights sum to response lengths: max |sum w~ - |o|| = "
                  f"{float((token_adv.sum(-1) - seq_adv * lengths).abs().max()):.2e}")
    return {"rewards": rewards, "seq_advantages": seq_adv, "token_advantages": token_adv, "scores": scores,
            "losses": out, "batch": batch}
