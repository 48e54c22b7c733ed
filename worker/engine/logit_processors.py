"""Per-request logit changes beyond penalties: logit_bias, allowed_token_ids, bad words (vLLM's names).

Each function changes float32 logits [B, V] in place for the rows that ask for it. The sampler calls
`apply_logit_processors` only when some row of the step uses one (`SamplingParams.uses_logit_processors`),
so requests that use none pay nothing.
"""

from __future__ import annotations

import torch

from worker.engine.sampling_filters import device_tensor


def apply_logit_bias(logits: torch.Tensor, rows: list[int], states: list) -> None:
    """Add each row's `logit_bias[token]` to that token's logit (ids past the vocabulary are ignored)."""
    vocab = logits.shape[1]
    row_ids, col_ids, values = [], [], []
    for row in rows:
        for token, bias in states[row].params.logit_bias.items():
            if token < vocab:
                row_ids.append(row)
                col_ids.append(token)
                values.append(float(bias))
    if row_ids:
        device = logits.device
        logits.index_put_((device_tensor(row_ids, torch.long, device), device_tensor(col_ids, torch.long, device)),
                          device_tensor(values, torch.float32, device), accumulate=True)


def apply_allowed_tokens(logits: torch.Tensor, rows: list[int], states: list) -> None:
    """Only the row's `allowed_token_ids` keep their logits; every other token gets -inf."""
    vocab = logits.shape[1]
    keep = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for j, row in enumerate(rows):
        ids = [t for t in states[row].params.allowed_token_ids if t < vocab]
        keep[j, ids] = True
    index = device_tensor(rows, torch.long, logits.device)
    keep = keep.to(logits.device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill(~keep, float("-inf")))


def banned_next_tokens(bad_words: list[list[int]], output_token_ids: list[int]) -> set[int]:
    """The tokens that would complete a bad word now: a word's last token, when the output ends with the
    rest of the word (a one-token word is always banned)."""
    banned = set()
    for word in bad_words:
        prefix = word[:-1]
        if not prefix or output_token_ids[-len(prefix):] == prefix:
            banned.add(word[-1])
    return banned


def apply_bad_words(logits: torch.Tensor, rows: list[int], states: list) -> None:
    vocab = logits.shape[1]
    row_ids, col_ids = [], []
    for row in rows:
        state = states[row]
        for token in sorted(banned_next_tokens(state.params.bad_words_token_ids, state.output_token_ids)):
            if token < vocab:
                row_ids.append(row)
                col_ids.append(token)
    if row_ids:
        device = logits.device
        logits[device_tensor(row_ids, torch.long, device), device_tensor(col_ids, torch.long, device)] = float("-inf")


def apply_logit_processors(logits: torch.Tensor, rows: list[int], states: list, grammars=None) -> None:
    """Every processor the given rows ask for, in vLLM's order: bias, whitelist, bad words, then the grammar
    mask (`grammars`: worker.engine.grammar.GrammarMasks; a structured output without it is refused)."""
    def using(name: str) -> list[int]:
        return [i for i in rows if getattr(states[i].params, name)]

    if bias_rows := using("logit_bias"):
        apply_logit_bias(logits, bias_rows, states)
    if allowed_rows := using("allowed_token_ids"):
        apply_allowed_tokens(logits, allowed_rows, states)
    if bad_rows := using("bad_words_token_ids"):
        apply_bad_words(logits, bad_rows, states)
    if grammar_rows := using("structured_output"):
        if grammars is None:
            raise ValueError("structured output needs a sampler built with grammars")
        grammars.apply(logits, grammar_rows, states)
