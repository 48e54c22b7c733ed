"""Token log-probabilities in the two OpenAI shapes.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
Completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`; with `echo`
the prompt's tokens come first, the first one with null logprob and top_logprobs (nothing precedes it).
Prompt logprobs (vLLM's `prompt_logprobs`): per prompt token null (the first) or
`{token_id: {"logprob", "rank", "decoded_token"}}` holding the prompt token and the k most likely.
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
        return self._format([entry.token_id for entry in entries], entries, None)

    def format_prompt(self, prompt_token_ids: list[int], entries: list[TokenLogprob | None], top_k: int) -> dict:
        """The echoed prompt's part: `entries` as the engine's prompt logprobs (None first), top k of each."""
        return self._format(prompt_token_ids, entries, top_k)

    def _format(self, token_ids: list[int], entries: list[TokenLogprob | None], top_k: int | None) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self._token_text(token_id)
            tokens.append(text)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                token_logprobs.append(_finite(entry.logprob))
                top = {}
                for alt_id, logprob in entry.top[:top_k]:
                    top.setdefault(self._token_text(alt_id), _finite(logprob))
                top_logprobs.append(top)
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def joined_completion_logprobs(first: dict, second: dict | None) -> dict:
    """Two completions logprobs objects one after the other (the echoed prompt's, then the output's)."""
    if second is None:
        return first
    return {key: first[key] + second[key] for key in first}


def vllm_prompt_logprobs(entries: list[TokenLogprob | None], top_k: int, token_text: TokenTexts) -> list:
    """vLLM's prompt_logprobs list: per prompt token None (the first) or {token_id: {logprob, rank,
    decoded_token}} with the prompt token first, then the `top_k` most likely (ranks 1..k)."""
    result: list[dict | None] = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        position = {str(entry.token_id): _vllm_logprob(entry.logprob, entry.rank, token_text(entry.token_id))}
        for rank, (token_id, logprob) in enumerate(entry.top[:top_k], start=1):
            position.setdefault(str(token_id), _vllm_logprob(logprob, rank, token_text(token_id)))
        result.append(position)
    return result


def _vllm_logprob(logprob: float, rank: int, text: str) -> dict:
    return {"logprob": _finite(logprob), "rank": rank, "decoded_token": text}
