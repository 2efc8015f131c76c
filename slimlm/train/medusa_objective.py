"""Training Medusa heads by self-distillation on a frozen target, and measuring how often they agree with it.

The teacher of head ``k`` at position ``t`` is the target's own next-token distribution at ``t + k + 1``
(what the target would say about ``x_{t+k+2}``), not the corpus token: verification accepts a head's guess
exactly when it equals the target's choice, so matching the target maximises acceptance, and the soft
distribution carries more signal per position than one label. The corpus only supplies contexts.

Greedy verification accepts a guess only when it is the target's argmax, though, and the KL optimum is the
argmax of the *average* teacher distribution over the intermediate tokens the head cannot see, which need
not be the target's most frequent argmax: on near-ties (flat, undertrained targets) pure KL was measured to
lower top-1 agreement below the untrained heads'. ``greedy_weight`` mixes in cross-entropy to the target's
greedy token, which aims at top-1 agreement itself; the KL part keeps the rest of the distribution (the
top-k candidates of a tree) in shape. Measured in the tests' setting and on tiny targets, 0.5 beat 0 on
top-1 (and top-5) agreement of every head.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.model.causal_lm import CausalLM
from slimlm.train.autocast import autocast_context
from slimlm.train.data import Batch, eval_windows
from slimlm.train.medusa import MedusaHeads

__all__ = ["DEFAULT_GREEDY_WEIGHT", "MedusaLoss", "evaluate_medusa", "target_outputs"]

DEFAULT_GREEDY_WEIGHT = 0.5


@torch.no_grad()
def target_outputs(target: CausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target's final hidden states ``[B, L, H]`` and logits ``[B, L, vocab]``, in float32.

    The hidden states are caught with a hook on ``target.norm`` so that they come from ``forward_dense``
    itself (whatever it does before the projection), not from a copy of it. Autocast is switched off: the
    teacher stays float32 even when the heads train under bf16 autocast.
    """
    captured: list[torch.Tensor] = []
    handle = target.norm.register_forward_hook(lambda _module, _args, out: captured.append(out))
    try:
        with torch.autocast(input_ids.device.type, enabled=False):
            logits = target.forward_dense(input_ids)
    finally:
        handle.remove()
    return captured[-1], logits.float()


def _head_log_probs(heads: MedusaHeads, k: int, hidden: torch.Tensor) -> torch.Tensor | None:
    """Head ``k``'s log-probabilities at the positions whose teacher exists (``t < L - k - 1``), or None."""
    n = hidden.shape[1] - k - 1
    if n <= 0:
        return None
    return F.log_softmax(heads.head_logits(k, hidden[:, :n]).float(), dim=-1)


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over positions of KL(teacher at t+k+1 || head k at t); both are log-probabilities."""
    return F.kl_div(student, teacher[:, k + 1 :], log_target=True, reduction="sum")


class MedusaLoss:
    """Mean over heads of ``(1 - w) * KL(target || head) + w * CE(head, target's greedy token)``, ``w`` the
    ``greedy_weight`` (see the module docstring), per position.

    ``model`` is the :class:`MedusaHeads`; the frozen target lives here. The batch's labels are unused:
    the target supplies the teacher for every position.
    """

    def __init__(self, target: CausalLM, num_heads: int, greedy_weight: float = DEFAULT_GREEDY_WEIGHT):
        if not 0.0 <= greedy_weight <= 1.0:
            raise ValueError(f"greedy_weight must be in [0, 1], not {greedy_weight}")
        self.target = target
        self.num_heads = num_heads
        self.greedy_weight = greedy_weight
        # In checkpoints: a run never resumes with another head count or loss.
        self.name = f"medusa-kl-{num_heads}" + (f"-greedy{greedy_weight:g}" if greedy_weight else "")

    def parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss(self, model: MedusaHeads, batch: Batch) -> torch.Tensor:
        hidden, logits = target_outputs(self.target, batch.input_ids)
        teacher = F.log_softmax(logits, dim=-1)
        per_head = []
        for k in range(model.num_heads):
            student = _head_log_probs(model, k, hidden)
            if student is None:
                continue
            loss = _kl_sum(student, teacher, k) / student.shape[:2].numel()
            if self.greedy_weight:
                greedy = teacher[:, k + 1 :].argmax(-1)
                ce = F.nll_loss(student.flatten(0, 1), greedy.flatten())
                loss = (1 - self.greedy_weight) * loss + self.greedy_weight * ce
            per_head.append(loss)
        return torch.stack(per_head).mean()


@torch.no_grad()
def evaluate_medusa(
    heads: MedusaHeads,
    target: CausalLM,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int = 0,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    top_k: int = 5,
) -> dict:
    """Per-head agreement with the target on non-overlapping windows of ``tokens``.

    ``top1[k]``: how often head k's argmax at t equals the target's greedy token at t+k+1 (the acceptance
    proxy); ``top{top_k}[k]``: how often that token is among head k's ``top_k`` (what a candidate tree can
    use); ``kl[k]``: the training loss; ``accept_length``: 1 + the mean number of leading heads that all
    agree (tokens per target step of top-1 chain decoding, were every context the target's own).
    """
    num = heads.num_heads
    kl, top1, topn, count = [0.0] * num, [0] * num, [0] * num, [0] * num
    accepted, chains = 0, 0
    for batch in eval_windows(tokens, seq_len, batch_size, max_tokens):
        ids = batch.input_ids.to(device)
        hidden, logits = target_outputs(target, ids)
        greedy = logits.argmax(-1)
        teacher = F.log_softmax(logits, dim=-1)
        hits = []
        for k in range(num):
            with autocast_context(device, autocast_dtype):
                student = _head_log_probs(heads, k, hidden)
            if student is None:
                break
            want = greedy[:, k + 1 :]
            kl[k] += float(_kl_sum(student, teacher, k))
            hit = student.argmax(-1) == want
            hits.append(hit)
            top1[k] += int(hit.sum())
            topn[k] += int((student.topk(min(top_k, student.shape[-1]), dim=-1).indices == want[..., None]).sum())
            count[k] += want.numel()
        full = ids.shape[1] - num - 1  # positions where every head has a teacher
        if len(hits) == num and full > 0:
            lead = torch.stack([h[:, :full] for h in hits]).int().cumprod(0).sum(0)
            accepted += int(lead.sum())
            chains += lead.numel()
    kl = [s / max(c, 1) for s, c in zip(kl, count, strict=True)]
    return {
        "loss": sum(kl) / num,
        "kl": kl,
        "top1": [s / max(c, 1) for s, c in zip(top1, count, strict=True)],
        f"top{top_k}": [s / max(c, 1) for s, c in zip(topn, count, strict=True)],
        "accept_length": 1.0 + accepted / max(chains, 1),
        "tokens": count[0],
    }
