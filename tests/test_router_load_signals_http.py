"""The load signals and the measured characters per token, end to end through the router (stand-ins)."""

from __future__ import annotations

import json

import pytest

from test_router_integration import fleet_factory, http, loop  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(60)

PROMPT = "Summarize the quarterly figures for every region and explain the margins. " * 27  # 2000 chars


@pytest.mark.parametrize("stream", [False, True])
def test_answers_teach_the_router_chars_per_token_and_leave_no_load_behind(fleet_factory, stream):  # noqa: F811
    # One /load poll at start and none after: what is learned comes from the answers themselves.
    fleet = fleet_factory(1, admin_key="adm", policy="cache_aware", health_interval_s=60)
    client = fleet.client()
    for i in range(3):
        text = PROMPT + f" question {i}"
        if stream:
            events = client.completions.create(model="m", prompt=text, max_tokens=4, stream=True,
                                               stream_options={"include_usage": True})
            assert [e for e in events]
        else:
            assert client.completions.create(model="m", prompt=text, max_tokens=4).usage.prompt_tokens > 500
    status, _, body = http("GET", fleet.base + "/workers", headers={"Authorization": "Bearer adm"})
    assert status == 200
    (view,) = json.loads(body)["workers"]
    # The stand-in counts one token per 4 characters: what the router measured from its usage.
    assert view["chars_per_token_measured"] is True
    assert view["chars_per_token"] == pytest.approx(4.0, rel=0.01)
    assert (view["in_flight"], view["outstanding_tokens"], view["prefilling"], view["decoding"]) == (0, 0, 0, 0)
    assert view["tree_tokens"] > 0 and view["estimated_cached_tokens"] == view["tree_tokens"]
