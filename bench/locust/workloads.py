"""Request generators for the fleet benchmarks: what each simulated user asks, deterministic for a seed.

A workload is an indexable, endless sequence of sessions: `workload.session(i)` is the same for the same
seed and index, whichever user asks for it and in whatever order, so two router settings see the same
traffic. A session is one conversation: an optional system prompt and one or more user turns. The
user sends turn 1, appends the model's real reply, sends turn 2 on top, and so on (see `run_session`);
single-request workloads are sessions of one turn. Trace sessions carry their full messages (or a
completion prompt) and an arrival time instead.

No I/O here: the Locust users (bench/locust/locustfile.py) do the HTTP.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field
from typing import Callable

WORDS = ("answer question system careful detail context history policy router worker cache prefix token model "
         "reply summary example explain describe compare list reason step result value fleet batch prompt "
         "memory kernel stream latency budget tree evict page share").split()


@dataclass
class Session:
    """One conversation, or one request when `user_turns` has one entry or `messages`/`prompt` is set."""

    id: str
    max_tokens: int
    system: str | None = None
    user_turns: list[str] = field(default_factory=list)
    messages: list[dict] | None = None  # a trace's full chat history: sent as is, nothing appended
    prompt: str | None = None  # a trace's completion prompt: sent to /v1/completions
    arrival_s: float | None = None  # a trace's arrival time, seconds from the start of the run
    tags: dict = field(default_factory=dict)  # what the generator chose (document, group, ...), for tests


def words(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def zipf_cdf(n: int, exponent: float) -> list[float]:
    """Cumulative popularity of ranks 0..n-1 with weight 1/(rank+1)^exponent (exponent 0: uniform)."""
    weights = [1.0 / (k + 1) ** exponent for k in range(n)]
    total = sum(weights)
    return list(itertools.accumulate(w / total for w in weights))


def zipf_pick(rng: random.Random, cdf: list[float]) -> int:
    return min(bisect.bisect_left(cdf, rng.random()), len(cdf) - 1)


class Workload:
    """Base: subclasses build session `index` from their own seeded random stream."""

    name = "?"

    def __init__(self, seed: int, max_tokens: int) -> None:
        self.seed = seed
        self.max_tokens = max_tokens

    def rng(self, *parts) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`: stable across runs and processes.
        return random.Random(":".join(str(p) for p in (self.name, self.seed, *parts)))

    def session(self, index: int) -> Session:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class MultiTurnChat(Workload):
    """Conversations over S shared system prompts; each grows turn by turn with the real reply appended."""

    name = "chat"

    def __init__(self, seed: int, max_tokens: int, system_prompts: int = 8, system_chars: int = 2000,
                 turns: int = 4, user_chars: int = 200) -> None:
        super().__init__(seed, max_tokens)
        self.turns, self.user_chars = turns, user_chars
        self.systems = [f"You are assistant number {i}. " + words(self.rng("system", i), system_chars)
                        for i in range(system_prompts)]

    def session(self, index: int) -> Session:
        rng = self.rng("session", index)
        system = rng.randrange(len(self.systems))
        turns = [f"(conversation {index}, turn {t}) {words(rng, self.user_chars)}?" for t in range(self.turns)]
        return Session(id=f"chat-{index}", max_tokens=self.max_tokens, system=self.systems[system],
                       user_turns=turns, tags={"system": system})

    def describe(self) -> str:
        return (f"multi-turn chat: {len(self.systems)} shared system prompts of ~{len(self.systems[0])} chars, "
                f"{self.turns} turns of ~{self.user_chars} chars, reply appended each turn")


class DocQA(Workload):
    """One question about one of D documents, the document picked with Zipf popularity.

    Size it so the documents together (D x doc_chars / ~4 chars per token) overflow one worker's KV but
    fit in the fleet's: then only a router that keeps each document on one worker hits the cache.
    """

    name = "docqa"

    def __init__(self, seed: int, max_tokens: int, documents: int = 48, doc_chars: int = 4000,
                 zipf: float = 0.8, question_chars: int = 120) -> None:
        super().__init__(seed, max_tokens)
        self.zipf, self.question_chars = zipf, question_chars
        self.documents = [f"Document {d}. " + words(self.rng("doc", d), doc_chars) for d in range(documents)]
        self.cdf = zipf_cdf(documents, zipf)

    def session(self, index: int) -> Session:
        rng = self.rng("question", index)
        doc = zipf_pick(rng, self.cdf)
        question = f"Question {index}: {words(rng, self.question_chars)}?"
        return Session(id=f"docqa-{index}", max_tokens=self.max_tokens,
                       system="Answer from the document below.\n\n" + self.documents[doc],
                       user_turns=[question], tags={"document": doc})

    def describe(self) -> str:
        return (f"doc-QA: {len(self.documents)} documents of ~{len(self.documents[0])} chars, Zipf {self.zipf}, "
                f"~{self.question_chars}-char questions")


class HotSystemPrompt(Workload):
    """Every request opens with the same system prompt: the case where one worker must not take it all."""

    name = "hot"

    def __init__(self, seed: int, max_tokens: int, system_chars: int = 4000, user_chars: int = 200) -> None:
        super().__init__(seed, max_tokens)
        self.user_chars = user_chars
        self.system = "You are the one assistant. " + words(self.rng("system"), system_chars)

    def session(self, index: int) -> Session:
        rng = self.rng("question", index)
        return Session(id=f"hot-{index}", max_tokens=self.max_tokens, system=self.system,
                       user_turns=[f"Request {index}: {words(rng, self.user_chars)}?"])

    def describe(self) -> str:
        return f"one hot system prompt of ~{len(self.system)} chars, ~{self.user_chars}-char questions"


class GeneratedSharedPrefix(Workload):
    """SGLang's generated-shared-prefix shape: G groups, P prompts per group; each prompt is its group's
    long prefix plus a short distinct question. Session i is prompt (i mod P) of group (i div P) mod G,
    so one pass over G x P sessions visits every prompt once, group by group."""

    name = "gsp"

    def __init__(self, seed: int, max_tokens: int, groups: int = 16, prompts_per_group: int = 16,
                 prefix_chars: int = 8000, question_chars: int = 160) -> None:
        super().__init__(seed, max_tokens)
        self.prompts_per_group, self.question_chars = prompts_per_group, question_chars
        self.prefixes = [f"Group {g} context. " + words(self.rng("prefix", g), prefix_chars) for g in range(groups)]

    def session(self, index: int) -> Session:
        group = (index // self.prompts_per_group) % len(self.prefixes)
        prompt = index % self.prompts_per_group
        rng = self.rng("question", group, prompt)
        return Session(id=f"gsp-{index}", max_tokens=self.max_tokens, system=self.prefixes[group],
                       user_turns=[f"Prompt {prompt} of group {group}: {words(rng, self.question_chars)}?"],
                       tags={"group": group, "prompt": prompt})

    def describe(self) -> str:
        return (f"generated shared prefix: {len(self.prefixes)} groups x {self.prompts_per_group} prompts, "
                f"~{len(self.prefixes[0])}-char prefixes, ~{self.question_chars}-char questions")


class TraceReplay(Workload):
    """Sessions read from a JSONL trace (bench/locust/trace.py), replayed in order; past the end it loops
    with arrival times shifted by the trace's span so open-loop replay keeps its shape."""

    name = "trace"

    def __init__(self, seed: int, max_tokens: int, path: str) -> None:
        from bench.locust.trace import read_trace

        super().__init__(seed, max_tokens)
        self.path = path
        self.records = read_trace(path)
        self.span_s = self.records[-1].arrival_s + 1.0

    def session(self, index: int) -> Session:
        loop, position = divmod(index, len(self.records))
        record = self.records[position]
        return Session(id=f"{record.session_id}" + (f"-loop{loop}" if loop else ""),
                       max_tokens=record.output_tokens, messages=record.messages, prompt=record.prompt,
                       arrival_s=record.arrival_s + loop * self.span_s, tags={"line": record.line})

    def describe(self) -> str:
        return f"trace replay: {len(self.records)} requests from {self.path} over {self.span_s - 1:.1f} s"


WORKLOADS: dict[str, type[Workload]] = {w.name: w for w in (MultiTurnChat, DocQA, HotSystemPrompt,
                                                             GeneratedSharedPrefix, TraceReplay)}


class UnknownWorkload(ValueError):
    pass


def make_workload(name: str, seed: int, max_tokens: int, **options) -> Workload:
    """Options that the workload does not take are ignored (one flag set serves every workload)."""
    import inspect

    if name not in WORKLOADS:
        raise UnknownWorkload(f"unknown workload {name!r}: choose one of {', '.join(WORKLOADS)}")
    cls = WORKLOADS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "seed", "max_tokens"}
    return cls(seed, max_tokens, **{k: v for k, v in options.items() if k in accepted and v is not None})


def chat_requests(session: Session):
    """The message lists of the session's requests in order, as a generator that is sent each reply.

    Usage: gen = chat_requests(s); messages = next(gen); messages = gen.send(reply_text); ...
    The reply is appended as an assistant message before the next user turn, as chat clients do.
    """
    if session.messages is not None:
        yield list(session.messages)
        return
    messages = [{"role": "system", "content": session.system}] if session.system else []
    for text in session.user_turns:
        messages.append({"role": "user", "content": text})
        reply = yield list(messages)
        messages.append({"role": "assistant", "content": reply or ""})


def run_session(session: Session, send: Callable[[list[dict]], str | None]) -> int:
    """Send the session's chat turns through `send(messages) -> reply text, or None on failure`; a failed
    turn ends the session (its history would be wrong). Returns the number of turns sent."""
    turns = chat_requests(session)
    sent = 0
    try:
        messages = next(turns)
        while True:
            reply = send(messages)
            sent += 1
            if reply is None:
                return sent
            messages = turns.send(reply)
    except StopIteration:
        return sent
