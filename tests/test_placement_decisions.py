"""cache_aware decides exactly as recorded on a fixed request sequence (tests/placement_replay.py).

The recording was made before the hot path was made cheaper (bench/reports/router_cpu_placement.md):
an optimisation that changes any decision fails here. A change meant to alter decisions regenerates
the recording (`python -m tests.placement_replay --write`) and says why in its commit.
"""

import json
from collections import Counter

from tests.placement_replay import RECORDED, replay


def test_the_replay_covers_every_rule():
    reasons = Counter(reason for _, reason, _ in json.loads(RECORDED.read_text())["decisions"])
    assert {"cache_hit", "load_over_cache", "cache_miss", "imbalance", "session", "warm"} <= set(reasons)


def test_every_decision_matches_the_recording():
    recorded = json.loads(RECORDED.read_text())
    decisions = replay(seed=recorded["seed"], requests=recorded["requests"])
    first_difference = next((i for i, (got, want) in enumerate(zip(decisions, recorded["decisions"]))
                             if got != want), None)
    assert first_difference is None, (
        f"decision {first_difference} differs: got {decisions[first_difference]}, "
        f"recorded {recorded['decisions'][first_difference]}")
    assert len(decisions) == len(recorded["decisions"])
