"""Request fields this server does not act on: accepted and reported, as vLLM does, or refused.

Clients written for vLLM, SGLang or an OpenAI feature we lack send fields we do not implement
(`documents`, `cache_salt`, sglang-router's `bootstrap_*`, ...). By default such a field is accepted
and ignored: the worker logs a warning naming it and the response carries an `X-Ignored-Fields`
header listing every ignored field, so a client can tell its setting had no effect. `--strict-fields`
restores a 400 ("Unrecognized request argument supplied") for them.

Fields OpenAI defines that do not change what is generated here (`user`, `metadata`, `store`, ...)
are accepted silently in both modes.
"""

from __future__ import annotations

import logging

from worker.server.errors import bad_request

log = logging.getLogger("radixfleet.worker")

IGNORED_FIELDS_HEADER = "X-Ignored-Fields"

# OpenAI fields that do not affect generation on this server: accepted without a warning.
NO_EFFECT_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "reasoning_effort",
    "verbosity", "modalities",
})

# vLLM / SGLang extensions we know of but do not implement (listed for the docs and the tests; any other
# unknown field is treated the same way).
KNOWN_UNIMPLEMENTED_FIELDS = frozenset({
    "use_beam_search", "length_penalty", "spaces_between_special_tokens", "documents", "mm_processor_kwargs",
    "guided_decoding_backend", "guided_whitespace_pattern", "structural_tag", "logits_processors",
    "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs",
    "media_io_kwargs", "include_reasoning", "prompt_embeds", "lora_request",
    "bootstrap_host", "bootstrap_port", "bootstrap_room", "lora_path", "return_hidden_states",
    "audio", "prediction", "web_search_options", "functions", "function_call",
})


def unknown_fields(body: dict, allowed: set[str] | frozenset[str], strict: bool) -> list[str]:
    """The fields of `body` outside `allowed` and NO_EFFECT_FIELDS, in body order.

    strict: the first one is refused with a 400. Otherwise they are logged and returned, for the
    response's X-Ignored-Fields header.
    """
    ignored = [name for name in body if name not in allowed and name not in NO_EFFECT_FIELDS]
    if ignored and strict:
        raise bad_request(ignored[0], f"Unrecognized request argument supplied: {ignored[0]}")
    if ignored:
        log.warning("The following fields were present in the request but ignored: %s", ", ".join(ignored))
    return ignored


def ignored_fields_header(ignored: list[str]) -> dict[str, str]:
    return {IGNORED_FIELDS_HEADER: ", ".join(ignored)} if ignored else {}
