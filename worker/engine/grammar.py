"""Grammar-constrained decoding: per-step token masks from xgrammar, applied to the constrained rows only.

Library choice: `bench/grammar_bench.py` measured mask time per step at batch 64 over a 152k vocabulary
on this project's 2-core CPU box: xgrammar 2.7 ms mean (1.7 ms p50), llguidance 14.5 ms (7.3 ms p50)
(bench/reports/grammar_bench.json).

Where the state lives. A row's grammar state (an xgrammar GrammarMatcher) is derived data: it is the
grammar advanced by the row's output tokens. `GrammarMasks` keeps one matcher per sequence in a
bounded LRU and, at each step, first feeds the matcher the output tokens it has not seen, then fills the
row's bitmask. A row is known by its sequence's output list (one per choice of one request, never
replaced): requests may share one SamplingParams object, so the params cannot name a row. So the state advances with each accepted token on the engine side, where tokens are
sampled; a preempted or recomputed sequence keeps its outputs and its matcher; an evicted matcher is
rebuilt by replaying the outputs. Under overlap scheduling the engine samples a step with grammar rows
(`SamplingParams.needs_output_tokens`) only after the previous step is read back, with this step's
placeholders taken off for the call (worker/engine/launched_step.py), so the outputs are real tokens here.

Compiled grammars are cached by (kind, spec). `check(structured)` compiles without a tokenizer: the HTTP
frontend calls it to answer an invalid schema or regex with a 400 before the request reaches the engine.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict

import numpy as np
import torch

from worker.sampling_params import StructuredOutput

log = logging.getLogger(__name__)

MAX_MATCHERS = 4096  # live (request, choice) states kept; more are rebuilt from their outputs on demand
MAX_COMPILED = 128
# threads that fill a step's masks together: half the cores (xgrammar's own default), at most 8
FILL_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


class InvalidGrammar(ValueError):
    """The schema, regex, choice list or grammar cannot be compiled (the message says why)."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError:  # an install without the `structured` extra: the request is refused, not crashed
        raise InvalidGrammar("structured outputs need the xgrammar package on this worker: "
                             "pip install 'radixfleet[structured]' (scripts/setup.sh installs it)") from None
    return xgrammar


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of `choices`."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _grammar(xgr, structured: StructuredOutput):
    """The xgrammar Grammar of a constraint (no tokenizer needed)."""
    kind, spec = structured.kind, structured.spec
    if kind == "json_schema":
        return xgr.Grammar.from_json_schema(spec, any_whitespace=False, strict_mode=True)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(choice_ebnf(json.loads(spec)))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(spec)
    raise InvalidGrammar(f"unknown structured output kind {kind!r}")


_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _error_text(error: Exception) -> str:
    """xgrammar's message without its "[time] file.cc:line:" prefix."""
    return _SOURCE_PREFIX.sub("", str(error).strip())


def check(structured: StructuredOutput) -> None:
    """Raise InvalidGrammar when the constraint cannot be compiled."""
    try:
        _grammar(_xgrammar(), structured)
    except InvalidGrammar:
        raise
    except Exception as error:  # xgrammar raises RuntimeError / ValueError with its parser's message
        raise InvalidGrammar(_error_text(error)) from None


class _Entry:
    __slots__ = ("outputs", "params", "matcher", "consumed", "broken")

    def __init__(self, outputs: list[int], params, matcher):
        self.outputs = outputs  # held so that id(outputs), the key, cannot be reused while the entry lives
        self.params = params
        self.matcher = matcher
        self.consumed = 0
        self.broken = False


class GrammarMasks:
    """Token masks of constrained rows for one engine (one tokenizer, one vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._compiler = None  # built on first use: tokenizer info takes ~1 s for a 150k vocabulary
        self._compiled: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._matchers: OrderedDict[int, _Entry] = OrderedDict()  # id(sequence's output list) -> its state
        self._batch = None  # xgrammar's BatchGrammarMatcher (a thread pool), built when two rows first need masks

    # ------------------------------------------------------------------ compilation
    def _tokenizer_info(self, xgr):
        backend = self._tokenizer.backend
        encoded = [""] * self.vocab_size
        for token, token_id in backend.get_vocab(with_added_tokens=True).items():
            if token_id < self.vocab_size:
                encoded[token_id] = token
        metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        return xgr.TokenizerInfo(encoded, metadata["vocab_type"], vocab_size=self.vocab_size,
                                 stop_token_ids=self._eos, add_prefix_space=metadata["add_prefix_space"])

    def compiled(self, structured: StructuredOutput):
        grammar = self._compiled.get(structured)
        if grammar is not None:
            self._compiled.move_to_end(structured)
            return grammar
        xgr = _xgrammar()
        if self._compiler is None:
            self._compiler = xgr.GrammarCompiler(self._tokenizer_info(xgr), max_threads=1)
        try:
            grammar = self._compiler.compile_grammar(_grammar(xgr, structured))
        except InvalidGrammar:
            raise
        except Exception as error:
            raise InvalidGrammar(_error_text(error)) from None
        self._compiled[structured] = grammar
        if len(self._compiled) > MAX_COMPILED:
            self._compiled.popitem(last=False)
        return grammar

    # ------------------------------------------------------------------ state
    def _entry(self, state) -> _Entry:
        outputs = state.output_token_ids
        key = id(outputs)
        entry = self._matchers.get(key)
        if (entry is not None and entry.outputs is outputs and entry.params is state.params
                and entry.consumed <= len(outputs)):
            self._matchers.move_to_end(key)
            return entry
        matcher = _xgrammar().GrammarMatcher(self.compiled(state.params.structured_output))
        entry = _Entry(outputs, state.params, matcher)
        self._matchers[key] = entry
        if len(self._matchers) > MAX_MATCHERS:
            self._matchers.popitem(last=False)
        return entry

    def _advance(self, entry: _Entry, output_token_ids: list[int]) -> None:
        while entry.consumed < len(output_token_ids) and not entry.broken:
            token = output_token_ids[entry.consumed]
            if token < 0 or entry.matcher.is_terminated():
                break
            if not entry.matcher.accept_token(token):
                # only possible when the mask was not applied to this token (e.g. a sim executor's vocab)
                log.warning("grammar rejected token %d; the rest of this output is unconstrained", token)
                entry.broken = True
            entry.consumed += 1

    # ------------------------------------------------------------------ masks
    def apply(self, logits: torch.Tensor, rows: list[int], states: list) -> None:
        """Set to -inf, in place, the logits of tokens each constrained row's grammar does not allow next."""
        width = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(rows), width), -1, dtype=torch.int32)
        masked, fill_matchers, fill_rows = [], [], []
        for j, row in enumerate(rows):
            state = states[row]
            entry = self._entry(state)
            self._advance(entry, state.output_token_ids)
            if entry.broken:
                continue
            if entry.matcher.is_terminated():
                # the grammar is complete and took its stop token, yet the row goes on (ignore_eos): all it
                # allows now is ending again (xgrammar refuses to fill a mask for a terminated matcher)
                bitmask[j] = 0
                for eos in self._eos:
                    bitmask[j, eos // 32] |= _bit(eos % 32)
            else:
                fill_matchers.append(entry.matcher)
                fill_rows.append(j)
            masked.append(j)
        if not masked:
            return
        self._fill(bitmask, fill_matchers, fill_rows)
        allowed = unpack_bitmask(bitmask[masked], logits.shape[1], logits.device)
        index = torch.tensor([rows[j] for j in masked], dtype=torch.long, device=logits.device)
        sub = logits.index_select(0, index)
        sub.masked_fill_(~allowed, float("-inf"))
        logits.index_copy_(0, index, sub)

    def _fill(self, bitmask: torch.Tensor, matchers: list, rows: list[int]) -> None:
        """Fill the rows' masks: one row directly, several on xgrammar's thread pool (at batch 64 over a 152k
        vocabulary the masks are most of a constrained step's host time; filled one after another they cost
        ~17 ms a step on the H200 machine, bench/reports/grammar_engine_bench_h200.json)."""
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, rows[0])
        elif matchers:
            if self._batch is None:
                self._batch = _xgrammar().BatchGrammarMatcher(max_threads=FILL_THREADS)
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)

    def forget(self) -> None:
        self._matchers.clear()


def _bit(position: int) -> int:
    """The int32 value with only bit `position` set (bit 31 is the sign bit)."""
    return (1 << position) - (1 << 32 if position == 31 else 0)


_BIT_POSITIONS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """int32 bitmask [R, ceil(V/32)] (bit i of word w: token 32w+i allowed) -> bool [R, vocab_size] on device.

    On the CPU numpy's unpackbits does it in one C pass (about 20x faster than the shift-and-mask below at
    batch 64 x 152k); on CUDA the bitmask is uploaded (pinned, non-blocking) and unpacked on the device.
    """
    rows, width = bitmask.shape
    if device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        allowed = torch.from_numpy(bits).view(torch.bool)
    else:
        bitmask = bitmask.pin_memory().to(device, non_blocking=True)
        positions = _BIT_POSITIONS.get(device)
        if positions is None:
            positions = _BIT_POSITIONS[device] = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((bitmask.unsqueeze(-1) >> positions) & 1).bool().view(rows, width * 32)
    if allowed.shape[1] < vocab_size:  # logits wider than the grammar's vocabulary: the extra ids are padding
        pad = torch.zeros(rows, vocab_size - allowed.shape[1], dtype=torch.bool, device=allowed.device)
        allowed = torch.cat([allowed, pad], dim=1)
    return allowed[:, :vocab_size]
