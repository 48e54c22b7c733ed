"""Worker options that make it behave like the servers clients were written for (vLLM's flag names).

    --strict-fields               refuse request fields this server does not implement (default: accept,
                                  log and list them in the X-Ignored-Fields response header)
    --tool-call-parser NAME       auto (from the chat template) | none | hermes | llama3_json | mistral
    --reasoning-parser NAME       qwen3 | deepseek_r1: <think> text goes to reasoning_content
    --generation-config MODE      auto: the checkpoint's generation_config.json sampling values are the
                                  defaults of requests that leave them out (as vLLM does); vllm: ignore it
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from worker.server.reasoning import REASONING_PARSERS, make_reasoning_parser
from worker.server.tool_parsers import TOOL_CALL_PARSER_CHOICES, make_tool_parser

log = logging.getLogger("radixfleet.worker")

# generation_config.json keys that become request defaults, as vLLM takes them
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class DropInOptions:
    strict_fields: bool = False
    tool_call_parser: str = "auto"
    reasoning_parser: str | None = None
    generation_config: str = "auto"


def add_drop_in_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags above; returns their actions (so `radixfleet up` can pass them on to its workers)."""
    group = parser.add_argument_group("OpenAI / vLLM compatibility")
    return [
        group.add_argument("--strict-fields", action=argparse.BooleanOptionalAction, default=False,
                           help="answer 400 to request fields this server does not implement (default: ignore "
                                "them, log a warning and list them in the X-Ignored-Fields response header)"),
        group.add_argument("--tool-call-parser", default="auto", choices=TOOL_CALL_PARSER_CHOICES,
                           help="how tool calls are read from the model's text (auto: from the chat template)"),
        group.add_argument("--reasoning-parser", default=None, choices=tuple(REASONING_PARSERS),
                           help="split <think> reasoning into reasoning_content (default: off)"),
        group.add_argument("--generation-config", default="auto", choices=("auto", "vllm"),
                           help="auto: generation_config.json's sampling values are request defaults; vllm: "
                                "ignore it"),
    ]


def drop_in_options_from_args(args: argparse.Namespace) -> DropInOptions:
    return DropInOptions(args.strict_fields, args.tool_call_parser, args.reasoning_parser, args.generation_config)


def sampling_defaults(model_path: str | Path | None, mode: str) -> dict:
    """The request defaults from the checkpoint's generation_config.json (empty for mode 'vllm')."""
    if mode != "auto" or model_path is None:
        return {}
    path = Path(model_path) / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as error:
        log.warning("ignoring %s: %s", path, error)
        return {}
    defaults = {key: config[key] for key in GENERATION_CONFIG_KEYS if isinstance(config.get(key), (int, float))
                and not isinstance(config.get(key), bool)}
    if defaults:
        log.info("sampling defaults from %s: %s (--generation-config vllm ignores them)", path, defaults)
    return defaults


def configure(ctx, options: DropInOptions, model_path: str | Path | None) -> None:
    """Apply the options to a ServerContext."""
    ctx.strict_fields = options.strict_fields
    ctx.tool_parser = make_tool_parser(options.tool_call_parser, getattr(ctx.tokenizer, "chat_template", None))
    ctx.reasoning_parser = make_reasoning_parser(options.reasoning_parser)
    ctx.sampling_defaults = sampling_defaults(model_path, options.generation_config)
