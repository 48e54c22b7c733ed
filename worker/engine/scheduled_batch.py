"""The scheduler's settings and its output: what one engine step runs (pure data, no logic beyond it).

`ScheduledBatch` is the contract between the scheduler and the executor side, which turns it into a
`ForwardBatch` (worker.engine.forward_batch) and the attention backend's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.engine.sequence import Sequence


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_running_requests: int = 256
    max_model_len: int = 4096
    policy: str = "fcfs"  # fcfs | priority | lpm (worker.engine.waiting_queue)
    priority_aging_s: float = 5.0
    new_token_ratio_init: float = 0.7
    new_token_ratio_min: float = 0.1
    new_token_ratio_decay: float = 0.002  # per step


@dataclass
class ScheduledBatch:
    """One step: `num_new_tokens[i]` tokens of `seqs[i]`, decodes first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_decodes: int = 0

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def sampling_rows(self) -> list[int]:
        """The rows that sample this step, in batch order (the order of the step's logits)."""
        return [i for i in range(len(self.seqs)) if self.samples(i)]

    def samples(self, i: int) -> bool:
        """Whether seqs[i] reaches its last token this step, so a new token is sampled for it."""
        seq = self.seqs[i]
        return seq.num_computed + self.num_new_tokens[i] == seq.num_tokens
