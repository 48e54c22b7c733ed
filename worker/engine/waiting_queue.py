"""The scheduler's waiting queue, one class per admission policy, chosen by name (`--policy`).

Each queue holds the waiting sequences and, once per step, gives them in the order the scheduler should
try to admit them (it admits head-of-line: it stops at the first that does not fit).

* `fcfs`: arrival order.
* `priority`: lower `priority` value first; every `priority_aging_s` seconds waited is worth one level,
  so nothing starves; arrival order breaks ties.
* `lpm`: longest cached prefix first (more reuse, less prefill), looked up read-only among the oldest
  `LPM_WINDOW` waiting sequences; arrival order breaks ties and orders the rest.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from worker.engine.sequence import Sequence

# `lpm` looks at most this many waiting sequences per step (prefix matching is not free).
LPM_WINDOW = 128


class WaitingQueue:
    """Waiting sequences in arrival order (`fcfs`). Subclasses change `in_policy_order`."""

    name = "fcfs"

    def __init__(self) -> None:
        self._seqs: list[Sequence] = []

    def append(self, seq: Sequence) -> None:
        self._seqs.append(seq)

    def remove(self, seq: Sequence) -> None:
        self._seqs.remove(seq)

    def __contains__(self, seq: object) -> bool:
        return seq in self._seqs

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)

    def in_policy_order(self) -> list[Sequence]:
        """The waiting sequences, best candidate for admission first (a copy: admission removes from it)."""
        self._seqs.sort(key=lambda s: s.arrival_order)
        return list(self._seqs)


class PriorityQueue(WaitingQueue):
    name = "priority"

    def __init__(self, aging_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.aging_s = aging_s
        self.clock = clock

    def in_policy_order(self) -> list[Sequence]:
        now = self.clock()

        def effective(s: Sequence) -> tuple[float, int]:
            # every `aging_s` seconds waited is worth one priority level, so nothing starves
            return (s.params.priority - (now - s.arrival_time) / self.aging_s, s.arrival_order)

        self._seqs.sort(key=effective)
        return list(self._seqs)


class LongestPrefixQueue(WaitingQueue):
    name = "lpm"

    def __init__(self, cached_prefix_length: Callable[[Sequence], int], window: int = LPM_WINDOW) -> None:
        super().__init__()
        # must not change the cache: it is asked for every waiting sequence in the window, every step
        self.cached_prefix_length = cached_prefix_length
        self.window = window

    def in_policy_order(self) -> list[Sequence]:
        self._seqs.sort(key=lambda s: s.arrival_order)
        window = self._seqs[: self.window]
        matched = {id(s): self.cached_prefix_length(s) for s in window}
        window.sort(key=lambda s: (-matched[id(s)], s.arrival_order))
        self._seqs[: self.window] = window
        return list(self._seqs)


# name -> builder(priority_aging_s, clock, cached_prefix_length)
_QUEUES: dict[str, Callable[[float, Callable[[], float], Callable[[Sequence], int]], WaitingQueue]] = {
    "fcfs": lambda aging_s, clock, prefix_length: WaitingQueue(),
    "priority": lambda aging_s, clock, prefix_length: PriorityQueue(aging_s, clock),
    "lpm": lambda aging_s, clock, prefix_length: LongestPrefixQueue(prefix_length),
}
POLICIES = tuple(_QUEUES)


def make_waiting_queue(
    policy: str,
    priority_aging_s: float,
    clock: Callable[[], float],
    cached_prefix_length: Callable[[Sequence], int],
) -> WaitingQueue:
    """The waiting queue for scheduling policy `policy` (one of POLICIES)."""
    try:
        build = _QUEUES[policy]
    except KeyError:  # validated in EngineConfig; keep the failure loud if someone bypasses it
        raise ValueError(f"unknown scheduling policy {policy!r}; choose one of {', '.join(POLICIES)}") from None
    return build(priority_aging_s, clock, cached_prefix_length)
