"""Token log-probabilities in the two OpenAI shapes.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
Completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`.
"""

from __future__ import annotations

import math

from worker.engine.protocol import TokenLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf; a token with zero probability gets this (as vLLM does)


class TokenTexts:
    """The text of single tokens, decoded once each (tokens repeat a lot across requests)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 1_000_000:
                self._cache[token_id] = text
        return text


def _finite(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenTexts) -> dict:
    content = []
    for entry in entries:
        text = token_text(entry.token_id)
        content.append({
            "token": text,
            "logprob": _finite(entry.logprob),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": (alt := token_text(token_id)), "logprob": _finite(logprob), "bytes": list(alt.encode("utf-8"))}
                for token_id, logprob in entry.top
            ],
        })
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """Builds the completions logprobs object of one choice; tracks text offsets across chunks."""

    def __init__(self, token_text: TokenTexts, start_offset: int = 0):
        self._token_text = token_text
        self._offset = start_offset

    def format(self, entries: list[TokenLogprob]) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for entry in entries:
            text = self._token_text(entry.token_id)
            tokens.append(text)
            token_logprobs.append(_finite(entry.logprob))
            top = {}
            for token_id, logprob in entry.top:
                top.setdefault(self._token_text(token_id), _finite(logprob))
            top_logprobs.append(top)
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
