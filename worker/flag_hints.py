"""The "did you mean" of every radixfleet command line (worker, router, up, bench): one rule for all."""

from __future__ import annotations

import difflib


def did_you_mean(flag: str, known: list[str], otherwise: str) -> str:
    """'; did you mean --closest?' when a known flag is close to `flag`, else '; ' + otherwise."""
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; {otherwise}"
