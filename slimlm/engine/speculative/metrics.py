"""Counters of speculative decoding, as ``Engine.stats.speculative`` and ``Engine.speculative_metrics()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SpeculativeStats:
    method: str = ""
    max_k: int = 0
    verify_steps: int = 0  # steps that verified at least one proposal
    plain_decode_steps: int = 0  # decode steps that proposed nothing (switched off, or nothing found)
    verified_seqs: int = 0  # sequence-steps with proposals
    planned_tokens: int = 0  # proposals asked for
    proposed_tokens: int = 0  # proposals made (prompt lookup may find fewer)
    accepted_tokens: int = 0
    emitted_tokens: int = 0  # tokens appended by verification (accepted + the target's own)
    propose_s: float = 0.0  # proposer time (draft forwards, lookups, heads)
    verify_s: float = 0.0  # acceptance and rejection sampling after the forward
    decode_step_s: float = 0.0  # wall time of decode-only steps (proposal + forward + acceptance) ...
    decode_steps: int = 0  # ... and their count
    current_k: int = 0
    predicted_speedup: float | None = None
    acceptance_ewma: float | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted_tokens / self.verified_seqs if self.verified_seqs else 0.0

    @property
    def mean_step_s(self) -> float:
        return self.decode_step_s / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
            mean_tokens_per_verify=self.emitted_tokens / self.verified_seqs if self.verified_seqs else 0.0,
            mean_decode_step_s=self.mean_step_s,
        )
        return d
