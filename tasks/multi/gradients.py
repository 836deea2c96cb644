"""How a joint step's per-task gradients become the one gradient the optimiser steps on.

A joint step (``multitask.step: joint``) runs one forward and backward per task. With
``multitask.gradient: sum`` the fit loop lets backward accumulate them: the gradient of
``sum_t w_t * L_t``. With ``pcgrad`` (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning")
each task's gradient on the *shared* parameters is projected off every other task's gradient it
conflicts with (negative dot product) before they are summed, so no task's step undoes another's
where they disagree; parameters only one task reaches (its head) keep that task's own gradient.

Unlike the paper, the other tasks are taken in the recipe's order rather than shuffled per step: with
two tasks the order makes no difference, and with more the step stays a pure function of its inputs.
"""

from __future__ import annotations

import torch

Grads = list[torch.Tensor | None]  # one entry per trainable parameter, None where the part did not reach it


def pcgrad(parts: list[Grads]) -> tuple[Grads, dict[str, torch.Tensor]]:
    """The PCGrad merge of ``parts`` (one gradient list per task, aligned on the same parameters). The parts
    are consumed: the merged gradients are written into (and may be) their tensors.

    Returns the merged gradients and, as 0-dim tensors (reading them is the caller's host sync),
    ``grad_cosine``: the mean cosine between the tasks' shared-parameter gradients before the surgery,
    and ``grad_conflict``: the fraction of ordered task pairs that conflicted and were projected.

    Every projection subtracts a multiple of an original gradient, so each task's projected gradient is
    ``sum_k A_ik g_k`` and the whole surgery runs on the tasks' Gram matrix ``g_i . g_k`` (T x T): the
    gradients themselves are read once for the dot products and once for the weighted sum, never
    copied into one flat vector (MiniLM's 22M-element copies per step made a step five times slower).
    """
    if not parts:
        raise ValueError("pcgrad: no gradients to merge")
    n, tasks = len(parts[0]), len(parts)
    if any(len(part) != n for part in parts):
        raise ValueError("pcgrad: every part must list the same parameters")
    reached = [sum(part[k] is not None for part in parts) for k in range(n)]
    shared = [k for k in range(n) if reached[k] > 1]
    merged: Grads = [_sum([part[k] for part in parts]) if reached[k] <= 1 else None for k in range(n)]
    if not shared:  # also one part alone: nothing to project
        zero = torch.zeros(())
        return merged, {"grad_cosine": zero, "grad_conflict": zero}
    device = next(part[k] for part in parts for k in shared if part[k] is not None).device
    gram = torch.zeros(tasks, tasks, dtype=torch.float64, device=device)
    for i in range(tasks):
        for j in range(i, tasks):
            # per tensor in its own dtype (no copies), summed over the tensors in float64
            dots = [torch.dot(parts[i][k].reshape(-1), parts[j][k].reshape(-1)).double() for k in shared
                    if parts[i][k] is not None and parts[j][k] is not None]
            gram[i, j] = gram[j, i] = torch.stack(dots).sum() if dots else 0.0
    coef = torch.eye(tasks, dtype=torch.float64, device=device)  # projected_i = sum_k coef[i, k] g_k
    conflicts = torch.zeros((), dtype=torch.float64, device=device)
    tiny = torch.finfo(torch.float64).tiny
    for i in range(tasks):
        for j in range(tasks):
            if i == j:
                continue
            dot = coef[i] @ gram[:, j]  # projected_i . g_j
            # min(dot, 0): project only when the two conflict; an all-zero gradient conflicts with nothing
            coef[i, j] -= torch.clamp(dot, max=0.0) / gram[j, j].clamp_min(tiny)
            conflicts = conflicts + (dot < 0).double()
    weights = coef.sum(0)  # merged = sum_i projected_i = sum_k weights[k] g_k
    for k in shared:
        terms = [(weights[t], parts[t][k]) for t in range(tasks) if parts[t][k] is not None]
        total = terms[0][1].mul_(terms[0][0].to(terms[0][1].dtype))  # in place: allocating costs twice the time
        for w, g in terms[1:]:
            total.addcmul_(g, w.to(g.dtype))
        merged[k] = total
    norms = gram.diagonal().sqrt().clamp_min(tiny)
    cosines = gram / norms[:, None] / norms[None, :]
    off_diagonal = ~torch.eye(tasks, dtype=torch.bool, device=device)  # a shared parameter means tasks >= 2
    return merged, {"grad_cosine": cosines[off_diagonal].mean().float(),
                    "grad_conflict": (conflicts / (tasks * (tasks - 1))).float()}


def _sum(grads: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [g for g in grads if g is not None]
    if not present:
        return None
    total = present[0]
    for g in present[1:]:
        total += g
    return total
