"""A burst of prompts over one uncached prefix computes it once: the first prefills it, the others wait
until it is cached and compute only their own suffix (worker/engine/shared_prefill.py)."""

from __future__ import annotations

import random

from test_scheduler import make_scheduler, make_seq, outputs_of, run_to_completion, step

from worker.engine.shared_prefill import BLOCK_TOKENS, MIN_SHARED_TOKENS, PrefillsInFlight

_RNG = random.Random(1)
DOC = [_RNG.randrange(10, 1000) for _ in range(1200)]


def questions(n: int, length: int = 20, doc=DOC) -> list[list[int]]:
    rng = random.Random(2)
    return [doc + [rng.randrange(10, 1000) for _ in range(length)] for _ in range(n)]


def prefill_tokens(sched, seqs) -> int:
    total = []
    run_to_completion(sched, seqs, on_batch=lambda b: total.append(b.num_tokens - b.num_decodes))
    return sum(total)


def test_burst_over_one_document_prefills_it_once():
    sched = make_scheduler(num_pages=2048, page_size=16, budget=8192)
    for i, p in enumerate(questions(4)):
        sched.add(make_seq(f"r{i}", p))
    first = sched.schedule()
    assert [s.request_id for s in first.seqs] == ["r0"]  # the other three wait for the document
    computed = prefill_tokens(make_scheduler(num_pages=2048, page_size=16, budget=8192),
                              [make_seq(f"r{i}", p) for i, p in enumerate(questions(4))])
    # the document once; each later prompt at most its suffix plus what is not worth waiting for
    assert computed <= len(DOC) + 4 * (20 + MIN_SHARED_TOKENS + BLOCK_TOKENS)
    assert computed < 2 * len(DOC)


def test_outputs_are_those_of_the_unshared_schedule():
    prompts = questions(6) + questions(2, doc=DOC[:700])
    shared = run_to_completion(make_scheduler(num_pages=2048, page_size=16, budget=4096),
                               [make_seq(f"r{i}", p) for i, p in enumerate(prompts)])
    alone = {}
    for i, p in enumerate(prompts):  # each prompt on a fresh scheduler: nothing shared, nothing deferred
        alone.update(outputs_of(run_to_completion(make_scheduler(num_pages=2048, page_size=16, budget=4096),
                                                  [make_seq(f"r{i}", p)])))
    assert outputs_of(shared) == alone


def test_short_shared_prefixes_and_cached_documents_do_not_wait():
    short_doc = DOC[:MIN_SHARED_TOKENS - BLOCK_TOKENS]
    sched = make_scheduler(num_pages=2048, page_size=16, budget=8192)
    for i, p in enumerate(questions(3, doc=short_doc)):
        sched.add(make_seq(f"s{i}", p))
    assert len(sched.schedule().seqs) == 3  # sharing less than MIN_SHARED_TOKENS: admitted together

    sched = make_scheduler(num_pages=2048, page_size=16, budget=8192)
    run_to_completion(sched, [make_seq("warm", questions(1)[0])])  # the document is now cached
    for i, p in enumerate(questions(3)):
        sched.add(make_seq(f"c{i}", p))
    assert len(sched.schedule().seqs) == 3  # nothing left to share: no one waits


def test_waiting_ends_once_the_prefix_is_cached():
    sched = make_scheduler(num_pages=2048, page_size=16, budget=512)  # the document takes three chunks
    seqs = [make_seq(f"r{i}", p) for i, p in enumerate(questions(2))]
    for s in seqs:
        sched.add(s)
    admitted_at = {}
    for n in range(1, 12):
        batch, _, _ = step(sched)
        for s in batch.seqs:
            admitted_at.setdefault(s.request_id, n)
    assert admitted_at["r0"] == 1 and 1 < admitted_at["r1"] <= 4
    # it starts from the cached document, less at most what is not worth waiting for
    assert seqs[1].num_cached_tokens >= len(DOC) - MIN_SHARED_TOKENS - BLOCK_TOKENS


def test_common_prefix_length_is_block_aligned():
    a, b = make_seq("a", DOC), make_seq("b", DOC[:300] + [1] * 500)
    in_flight = PrefillsInFlight([])
    in_flight.add(a)
    assert in_flight.shared_tokens(b) == (300 // BLOCK_TOKENS) * BLOCK_TOKENS
    assert in_flight.shared_tokens(make_seq("c", [7] * 400)) == 0
