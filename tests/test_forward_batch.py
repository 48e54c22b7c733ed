"""worker.engine.forward_batch.build_forward_batch: the page tables, slots and positions of a mixed step."""

import random

from worker.engine.forward_batch import build_forward_batch
from worker.engine.scheduled_batch import ScheduledBatch
from worker.engine.sequence import Sequence
from worker.sampling_params import SamplingParams

PAGE = 4


def seq(rng, prompt_len: int, computed: int, spare_pages: int) -> Sequence:
    s = Sequence("r%d" % rng.random(), 0, [rng.randrange(3, 900) for _ in range(prompt_len)], SamplingParams(), 0.0)
    s.num_computed = computed
    s.pages = rng.sample(range(1, 10_000), -(-prompt_len // PAGE) + spare_pages)  # pages beyond the step's too
    return s


def test_page_tables_hold_each_rows_pages_for_its_context_then_zeros():
    rng = random.Random(5)
    batch = ScheduledBatch()
    decodes = [seq(rng, n, n - 1, rng.randint(0, 2)) for n in (5, 33, 8, 17)]
    for s in decodes:
        batch.add(s, 1)
    batch.num_decodes = len(decodes)
    prefills = [(seq(rng, 30, 8, 1), 13), (seq(rng, 3, 0, 0), 3)]
    for s, n in prefills:
        batch.add(s, n)
    fb, sampling_rows = build_forward_batch(batch, PAGE)
    lens = [s.num_tokens for s in decodes] + [8 + 13, 3]
    assert fb.seq_lens == lens
    width = max(-(-n // PAGE) for n in lens)
    assert tuple(fb.page_tables.shape) == (6, width)
    for row, s in enumerate(batch.seqs):
        n = -(-lens[row] // PAGE)
        assert fb.page_tables[row].tolist() == s.pages[:n] + [0] * (width - n)
    # slots: page * PAGE + offset of every new token
    expected_slots = [s.pages[(n - 1) // PAGE] * PAGE + (n - 1) % PAGE for s, n in zip(decodes, lens)]
    s, n = prefills[0]
    expected_slots += [s.pages[p // PAGE] * PAGE + p % PAGE for p in range(8, 21)]
    expected_slots += [prefills[1][0].pages[p // PAGE] * PAGE + p % PAGE for p in range(3)]
    assert fb.out_slots.tolist() == expected_slots
    assert sampling_rows == [0, 1, 2, 3, 5]  # the 13-token chunk does not reach its prompt's end
