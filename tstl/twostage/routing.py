"""Routed inference: the selector picks group(s), only the chosen experts run, outputs land in
global class space.

Hard routing (as TSTL): ``p(c|x) = softmax(expert_g(x))[local(c)]`` for ``c`` in the selector's top
group ``g``, 0 elsewhere. Soft routing:
``p(c|x) = sum_{g in topk} w_g * softmax(expert_g(x))[local(c)]`` where ``w`` are the selector's
probabilities of the top-k groups renormalised to sum to 1 (so the output stays a distribution).
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
        probs: ``[B, num_classes]`` global class probabilities (the weighted sum over the
            chosen experts).
        groups: ``[B, k]`` selected group ids, best first.
        weights: ``[B, k]`` the selector's probabilities of those groups, renormalised to sum to 1.
        slot_probs: ``[B, k, num_classes]`` each chosen expert's softmax placed in global class
            space; ``slot_probs[:, 0]`` is the hard-routing output whatever ``k`` is.
        expert_calls: Number of samples each expert processed (index = group id).
    """

    probs: torch.Tensor
    groups: torch.Tensor
    weights: torch.Tensor
    slot_probs: torch.Tensor
    expert_calls: list[int] = field(default_factory=list)


def expert_columns(groups: ClassGroups, group: int, width: int,
                   device: torch.device) -> torch.Tensor:
    """Global classes of an expert's outputs: its group's classes (our experts), or every class for
    an expert with a head over all classes (TSTL's released experts, whose chosen expert may name a
    class outside its group)."""
    if width == len(groups.groups[group]):
        return torch.tensor(groups.groups[group], device=device)
    if width == groups.num_classes:
        return torch.arange(width, device=device)
    raise ValueError(f"expert {group} has {width} outputs; expected {len(groups.groups[group])} "
                     f"(its group) or {groups.num_classes} (all classes)")


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
        experts: ``experts[g]`` maps a sub-batch to ``[b, len(groups.groups[g])]`` logits over its
            group (in group order) or to ``[b, num_classes]`` logits over every class.
        groups: The class partition.
        top_k: 1 = hard routing; >1 = soft routing over the top-k groups.
    """
    b, g_count = selector_logits.shape
    if g_count != groups.num_groups or len(experts) != groups.num_groups:
        raise ValueError(f"selector has {g_count} groups, {len(experts)} experts, group file "
                         f"{groups.num_groups}")
    top_k = min(top_k, g_count)
    sel = selector_logits.float().softmax(-1)
    weights, chosen = sel.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    slot_probs = torch.zeros(b, top_k, groups.num_classes, dtype=torch.float32,
                             device=selector_logits.device)
    calls = [0] * g_count
    for g in chosen.unique().tolist():
        rows, slot = (chosen == g).nonzero(as_tuple=True)
        out = experts[g](x[rows]).float().softmax(-1)
        cols = expert_columns(groups, g, out.shape[1], slot_probs.device)
        slot_probs[rows.unsqueeze(1), slot.unsqueeze(1), cols.unsqueeze(0)] = out
        calls[g] = int(rows.numel())
    probs = (weights.unsqueeze(-1) * slot_probs).sum(1)
    return RoutedOutput(probs=probs, groups=chosen, weights=weights, slot_probs=slot_probs,
                        expert_calls=calls)
