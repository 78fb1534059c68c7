"""Routed inference: the selector picks group(s), only the chosen experts run, outputs land in global class space.

Hard routing (as TSTL): ``p(c|x) = softmax(expert_g(x))[local(c)]`` for ``c`` in the selector's top group ``g``,
0 elsewhere. Soft routing: ``p(c|x) = sum_{g in topk} w_g * softmax(expert_g(x))[local(c)]`` where ``w`` are the
selector's probabilities of the top-k groups renormalised to sum to 1 (so the output stays a distribution).
Each expert runs once on exactly the samples routed to it, never on the whole batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tstl.twostage.groups import ClassGroups

logger = logging.getLogger(__name__)

Expert = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RoutedOutput:
    """Result of routing one batch.

    Attributes:
        probs: ``[B, num_classes]`` global class probabilities.
        groups: ``[B, k]`` selected group ids, best first.
        expert_calls: Number of samples each expert processed (index = group id).
    """

    probs: torch.Tensor
    groups: torch.Tensor
    expert_calls: list[int] = field(default_factory=list)


def route(
    x: torch.Tensor,
    selector_logits: torch.Tensor,
    experts: Sequence[Expert],
    groups: ClassGroups,
    top_k: int = 1,
) -> RoutedOutput:
    """Route ``x`` through the experts chosen by ``selector_logits``.

    Args:
        x: Input batch ``[B, ...]``.
        selector_logits: ``[B, G]`` selector logits over groups.
        experts: ``experts[g]`` maps a sub-batch to ``[b, len(groups.groups[g])]`` logits.
        groups: The class partition.
        top_k: 1 = hard routing; >1 = soft routing over the top-k groups.
    """
    b, g_count = selector_logits.shape
    if g_count != groups.num_groups or len(experts) != groups.num_groups:
        raise ValueError(f"selector has {g_count} groups, {len(experts)} experts, group file {groups.num_groups}")
    top_k = min(top_k, g_count)
    sel = selector_logits.float().softmax(-1)
    weights, chosen = sel.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    probs = torch.zeros(b, groups.num_classes, dtype=torch.float32, device=selector_logits.device)
    calls = [0] * g_count
    for g in chosen.unique().tolist():
        rows, slot = (chosen == g).nonzero(as_tuple=True)
        out = experts[g](x[rows]).float().softmax(-1)
        cols = torch.tensor(groups.groups[g], device=probs.device)
        probs[rows.unsqueeze(1), cols.unsqueeze(0)] += weights[rows, slot].unsqueeze(1) * out
        calls[g] = int(rows.numel())
    return RoutedOutput(probs=probs, groups=chosen, expert_calls=calls)


@dataclass
class RoutingMetrics:
    """Accumulates selector accuracy, per-expert accuracy on their own groups and end-to-end top-1/top-5."""

    groups: ClassGroups
    n: int = 0
    selector_correct: int = 0
    top1: int = 0
    top5: int = 0
    expert_seen: list[int] = field(default_factory=list)
    expert_correct: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.expert_seen = [0] * self.groups.num_groups
        self.expert_correct = [0] * self.groups.num_groups

    def update(self, probs: torch.Tensor, selector_logits: torch.Tensor, labels: torch.Tensor,
               expert_logits_true_group: torch.Tensor | None = None) -> None:
        """Add one batch.

        Args:
            probs: ``[B, C]`` routed global probabilities.
            selector_logits: ``[B, G]``.
            labels: ``[B]`` global labels.
            expert_logits_true_group: optional ``[B]`` local predictions of each sample's *true* group's
                expert (oracle routing), for per-expert accuracy.
        """
        g_true, l_true = (torch.as_tensor(a) for a in self.groups.to_local(labels.cpu().numpy()))
        self.n += labels.numel()
        self.selector_correct += int((selector_logits.argmax(-1).cpu() == g_true).sum())
        top = probs.topk(min(5, probs.shape[1]), dim=-1).indices.cpu()
        self.top1 += int((top[:, 0] == labels.cpu()).sum())
        self.top5 += int((top == labels.cpu().unsqueeze(1)).any(1).sum())
        if expert_logits_true_group is not None:
            hit = expert_logits_true_group.cpu() == l_true
            for g in range(self.groups.num_groups):
                m = g_true == g
                self.expert_seen[g] += int(m.sum())
                self.expert_correct[g] += int(hit[m].sum())

    def summary(self) -> dict[str, float | list[float | None]]:
        """Accuracies in percent (per-expert entries are None when an expert saw no samples)."""
        pct = lambda a, b: 100.0 * a / b if b else float("nan")  # noqa: E731
        return {
            "selector_acc": pct(self.selector_correct, self.n),
            "top1": pct(self.top1, self.n),
            "top5": pct(self.top5, self.n),
            "expert_acc": [pct(c, s) if s else None for c, s in zip(self.expert_correct, self.expert_seen)],
        }
