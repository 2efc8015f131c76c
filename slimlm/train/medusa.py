"""Medusa heads on a frozen target: extra next-next-token predictors read from the target's final hidden state.

Head ``k`` (0-based) reads ``h_t``, the target's final (normed) hidden state after token ``x_t``, and predicts
``x_{t+k+2}``; the target's own lm_head predicts ``x_{t+1}``. Each head is one residual block
``h + SiLU(W h + b)`` followed by the target's output projection, which is not stored: the heads borrow it
from the target at every call, so a heads directory holds only ``K * (H*H + H)`` numbers (Medusa-1 with a
tied, frozen projection). ``W`` and ``b`` start at zero, so an untrained head says what the lm_head says.

Directory layout (:meth:`MedusaHeads.save_pretrained`)::

    heads/
      medusa_config.json        # format, num_heads, hidden_size, vocab_size, the target's path and fingerprint
      medusa_heads.safetensors  # blocks.{k}.linear.weight [H, H], blocks.{k}.linear.bias [H] (float32)
      training.json             # written by the trainer: how the heads were trained and how well they agree
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.model.causal_lm import CausalLM
from slimlm.train.medusa_files import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    HEADS_SUBDIR,
    WEIGHTS_FILE,
    MedusaMismatchError,
    check_fit,
    read_medusa_config,
    read_output_projection,
    resolve_heads_dir,
    target_fingerprint,
    write_heads_dir,
)

__all__ = [
    "CONFIG_FILE",
    "HEADS_SUBDIR",
    "WEIGHTS_FILE",
    "MedusaHeads",
    "MedusaMismatchError",
    "read_medusa_config",
    "resolve_heads_dir",
    "target_fingerprint",
]

logger = logging.getLogger(__name__)


class _Residual(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        # Zero, bias included (the Medusa code leaves the bias random): the head starts exactly as the lm_head.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.silu(self.linear(h))


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads for ``target`` (a :class:`CausalLM`, or a ``LoadedModel`` holding one).

    The target is referenced, not registered as a submodule: ``state_dict()``, ``parameters()``, ``.to()``
    and the optimizer see only the heads' own blocks. ``projection`` instead of ``target``: a ``[vocab, H]``
    output projection the heads keep themselves (a non-persistent buffer: moved by ``.to()``, never saved).
    """

    def __init__(
        self,
        target=None,
        num_heads: int = 4,
        *,
        target_path: str | Path | None = None,
        projection: torch.Tensor | None = None,
    ):
        super().__init__()
        if (target is None) == (projection is None):
            raise ValueError("give either the target (to borrow its output projection) or the projection itself")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, not {num_heads}")
        if target is not None:
            target, target_path = _unwrap(target, target_path)
            self.vocab_size, self.hidden_size = target.config.vocab_size, target.config.hidden_size
        else:
            self.vocab_size, self.hidden_size = projection.shape
        self.num_heads = num_heads
        self.blocks = nn.ModuleList(_Residual(self.hidden_size) for _ in range(num_heads))
        # object.__setattr__ keeps nn.Module from registering the target (and saving or training its weights).
        object.__setattr__(self, "target", target)
        self.register_buffer("projection", projection, persistent=False)
        path = Path(target_path).resolve() if target_path is not None else None
        self.target_info: dict[str, Any] = {
            "path": str(path) if path is not None else None,
            # Runs keep their model in RUN/model: "model" alone would name nothing.
            "name": None if path is None else path.name if path.name != "model" else f"{path.parent.name}/model",
        }
        if target is not None:
            self.target_info.update(
                fingerprint=target_fingerprint(target),
                architecture=target.config.architecture,
                num_layers=target.config.num_layers,
            )

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection ``[vocab, H]``: the target's (read at each call, so it follows its device)."""
        return self.target.output_weight if self.target is not None else self.projection

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        w = self.output_weight
        # Cast the few activations, not the vocab-sized weight (that would copy it at every decode step).
        return F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(w.dtype), w)

    def head_hidden(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head ``k``'s residual block applied to ``hidden`` ``[..., H]`` (before the output projection)."""
        return self.blocks[k](hidden)

    def head_logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., vocab]`` of head ``k`` (the token ``k + 2`` positions after each hidden state's)."""
        return self._project(self.head_hidden(k, hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[T, H]`` (or ``[..., H]``) -> logits ``[K, T, vocab]`` (``[K, ..., vocab]``)."""
        if hidden.shape[-1] != self.hidden_size:
            raise MedusaMismatchError(f"hidden states have size {hidden.shape[-1]}, the heads {self.hidden_size}")
        return self._project(torch.stack([block(hidden) for block in self.blocks]))

    # ----------------------------------------------------------------------------------------------- files

    def config_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_heads": self.num_heads,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "head_offsets": [k + 2 for k in range(self.num_heads)],
            "block": "h + silu(linear(h)), then the target's output projection (not stored)",
            "target": self.target_info,
        }

    def save_pretrained(self, directory: str | Path, extra_files: dict[str, Any] | None = None) -> Path:
        """Writes the heads directory atomically: a temporary sibling, renamed into place when complete.

        ``extra_files``: more JSON files to put in it (name -> data), e.g. ``training.json``.
        """
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.state_dict().items()}
        files = {CONFIG_FILE: self.config_dict(), **(extra_files or {})}
        return write_heads_dir(Path(directory).expanduser(), tensors, files)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, target=None, *, dtype: torch.dtype = torch.float32, check_fingerprint: bool = True
    ) -> MedusaHeads:
        """Heads saved by :meth:`save_pretrained` (or a ``slimlm train medusa`` run directory).

        With ``target``: they borrow its projection and move to its device; :class:`MedusaMismatchError`
        when they cannot run on it, a warning when they can but were trained on other weights (another
        fingerprint: a retrained or compressed target). Without: the projection is read, as ``dtype``, from
        the target directory the heads were trained on (the module is on the CPU then).
        """
        from safetensors.torch import load_file

        directory = resolve_heads_dir(directory)
        config = read_medusa_config(directory)
        trained_on = config.get("target") or {}
        num_heads = int(config["num_heads"])
        if target is None:
            projection = read_output_projection(trained_on.get("path"), directory).to(dtype)
            check_fit(directory, config, *projection.shape, "its recorded target", trained_on)
            heads = cls(projection=projection, num_heads=num_heads, target_path=trained_on.get("path"))
            current = None
        else:
            model, target_path = _unwrap(target, None)
            check_fit(directory, config, model.config.vocab_size, model.config.hidden_size, "this target", trained_on)
            heads = cls(model, num_heads, target_path=target_path)
            current = heads.target_info["fingerprint"]
        heads.target_info = trained_on or heads.target_info  # what they were trained on, not what they run on
        weights = load_file(str(directory / WEIGHTS_FILE))
        expected = {name: tuple(t.shape) for name, t in heads.state_dict().items()}
        got = {name: tuple(t.shape) for name, t in weights.items()}
        if got != expected:
            raise MedusaMismatchError(f"{directory / WEIGHTS_FILE} holds {got}, but {CONFIG_FILE} implies {expected}")
        heads.load_state_dict(weights)
        heads.to(heads.output_weight.device)
        if check_fingerprint and current is not None and trained_on.get("fingerprint") not in (None, current):
            logger.warning(
                "the Medusa heads in %s were trained on other weights (%s, fingerprint %s) than this target's; "
                "they will run, but expect lower acceptance",
                directory,
                trained_on.get("path"),
                trained_on.get("fingerprint"),
            )
        return heads.eval()


def _unwrap(target, target_path: str | Path | None) -> tuple[CausalLM, str | Path | None]:
    """(the CausalLM, its directory) of a CausalLM or a loader ``LoadedModel``."""
    if isinstance(target, CausalLM):
        return target, target_path
    model = getattr(target, "model", None)
    if isinstance(model, CausalLM):
        return model, target_path if target_path is not None else getattr(target, "path", None)
    raise TypeError(f"the target must be a CausalLM or a LoadedModel, not {type(target).__name__}")
