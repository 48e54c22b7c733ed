"""How much KV admission keeps back for the decode growth of the running batch.

Each running sequence may still generate up to its remaining output budget (clipped at `CLIP_TOKENS`);
admission reserves `ratio` of that. The ratio starts at `new_token_ratio_init`, decays by
`new_token_ratio_decay` per decode-only step (the batch is stable: trust the estimate a bit more) down to
`new_token_ratio_min`, and jumps back up after a preemption (memory was tighter than estimated), as
SGLang's scheduler does. So preemptions stay rare without leaving much of the pool idle.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from worker.engine.sequence import Sequence

# A running sequence's decode growth is counted up to this many tokens when reserving room for it.
CLIP_TOKENS = 4096


class DecodeReserve:
    def __init__(
        self, init: float, minimum: float, decay: float, max_model_len: int, pages_for: Callable[[int], int]
    ):
        self.init = init
        self.minimum = minimum
        self.decay = decay
        self.max_model_len = max_model_len
        self._pages_for = pages_for
        self.ratio = init

    def pages(self, seqs: Iterable[Sequence]) -> int:
        """Pages to keep free for the expected decode growth of `seqs`."""
        tokens = sum(min(s.remaining_output_budget(self.max_model_len), CLIP_TOKENS) for s in seqs)
        return self._pages_for(math.ceil(tokens * self.ratio))

    def after_decode_only_step(self) -> None:
        self.ratio = max(self.minimum, self.ratio - self.decay)

    def after_preemption(self) -> None:
        self.ratio = min(1.0, max(self.ratio, self.init) + 0.1)
