"""The worker's tokenizer: a Hugging Face checkpoint's tokenizer without transformers.

`Tokenizer.from_folder(path)` reads tokenizer.json (through the `tokenizers` library), tokenizer_config.json
(special tokens, chat template, BOS/EOS settings) and generation_config.json (the ids that end generation),
and behaves as transformers' tokenizer of that checkpoint does:

* `encode` adds BOS/EOS as the checkpoint's tokenizer would (tokenizer.json's post-processor, or, when
  tokenizer_config.json sets add_bos_token / add_eos_token, a template built from those flags, as
  transformers 5 rebuilds it);
* `decode` ignores ids the tokenizer does not know (a model vocab can be larger than its tokenizer);
* `apply_chat_template` renders the Jinja chat template in the same sandboxed environment as transformers
  (trim_blocks, lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII and
  accepts indent / separators / sort_keys). Any failure becomes a `ChatTemplateError`, a ValueError that the
  frontend answers with HTTP 400.

A rendered chat already holds its special tokens (the template writes BOS when the family has one), so encode
it with ``add_special_tokens=False``, exactly as transformers' apply_chat_template does.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors

_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The chat template is missing, malformed, or refused the messages (the message says which)."""


class Tokenizer:
    """Encode, decode and chat-template for one checkpoint. Build it with `Tokenizer.from_folder`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None],
        chat_template: str | None = None,
        generation_eos_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
        model_max_length: int | None = None,
        name: str = "tokenizer",
    ):
        self._backend = backend
        self._special_tokens = {key: value for key, value in special_tokens.items() if value is not None}
        self.chat_template = chat_template
        self._generation_eos = [int(i) for i in generation_eos_token_ids]
        self._clean_up_spaces = clean_up_tokenization_spaces
        self.model_max_length = model_max_length
        self.name = name
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers` object (grammar libraries read the vocabulary and its byte encoding from it)."""
        return self._backend

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """Load the tokenizer of a Hugging Face checkpoint folder (tokenizer.json required)."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json; radixfleet needs the fast-tokenizer file of the checkpoint "
                "(save it once with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
            )
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json")
        special_tokens = {key: _token_text(config.get(key)) for key in _NAMED_SPECIAL_TOKENS}
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            if key in special_tokens and special_tokens[key] is None:
                special_tokens[key] = _token_text(value)

        if "add_bos_token" in config or "add_eos_token" in config:
            _set_bos_eos_template(backend, special_tokens, bool(config.get("add_bos_token")),
                                  bool(config.get("add_eos_token")))

        generation = _read_json(folder / "generation_config.json")
        if not generation:  # transformers falls back to the model config
            generation = _read_json(folder / "config.json")
        eos_ids = generation.get("eos_token_id")
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)

        is_bpe = type(backend.model).__name__ == "BPE"
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=_find_chat_template(folder, config),
            generation_eos_token_ids=eos_ids,
            # transformers 5 skips this clean-up for BPE models, where it would corrupt text.
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces")) and not is_bpe,
            model_max_length=config.get("model_max_length"),
            name=folder.name,
        )

    # ------------------------------------------------------------------------------------------ tokens
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as this checkpoint adds them."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_long(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`encode` for long texts, run from a thread: the Rust tokenizer's batch entry point releases the
        GIL (its single-text one does not), so the event loop keeps running while this works."""
        if not isinstance(text, str):
            raise TypeError(f"encode_long() takes a str, got {type(text).__name__}")
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids outside the tokenizer (negative, or beyond it in a larger model vocab) decode to
        nothing, as unused ids of real checkpoints do."""
        if isinstance(ids, int):
            ids = [ids]
        known = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        text = self._backend.decode(known, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def convert_ids_to_tokens(self, ids: Sequence[int] | int) -> list[str | None] | str | None:
        """Token strings (byte-level form, e.g. 'Ġthe') of `ids`; None for ids the tokenizer does not know.
        A single int gives a single result, as in transformers."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids) if 0 <= ids < self.vocab_size else None
        return [self._backend.id_to_token(int(i)) if 0 <= int(i) < self.vocab_size else None for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ------------------------------------------------------------------------------------------ special ids
    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (bos_token, eos_token, pad_token, ...) that are set, as strings."""
        return dict(self._special_tokens)

    def _named_id(self, key: str) -> int | None:
        token = self._special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS (for chat models, the end of a turn)."""
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: generation_config.json's eos ids, then the tokenizer's EOS."""
        ids = list(dict.fromkeys(self._generation_eos))
        if self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.append(self.eos_token_id)
        return ids

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens and of every added token marked special, sorted."""
        ids = {self._named_id(key) for key in self._special_tokens}
        ids.update(index for index, token in self._backend.get_added_tokens_decoder().items() if token.special)
        return sorted(i for i in ids if i is not None)

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the checkpoint's chat template (or `chat_template`, given per request), as
        transformers' ``apply_chat_template(messages, tokenize=False, ...)`` does. Extra keyword arguments are
        passed to the template (e.g. ``enable_thinking=False``) and override the special-token variables."""
        template_text = chat_template if chat_template is not None else self.chat_template
        if template_text is None:
            raise ChatTemplateError(
                f"the model {self.name!r} has no chat template (tokenizer_config.json has no 'chat_template' and "
                "there is no chat_template.jinja); use the completions endpoint with a plain prompt, or add a "
                "chat template to the checkpoint"
            )
        context = {**self.special_tokens_map, **_plain(kwargs, "template argument")}
        context["messages"] = _checked_messages(messages)
        context["tools"] = _checked_tools(tools)
        context.setdefault("documents", None)
        context["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            template = _compile(template_text)
            return template.render(**context)
        except ChatTemplateError:
            raise
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(f"the chat template is not valid Jinja (line {error.lineno}): {error.message}") from None
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template rejected the messages: {error}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            raise ChatTemplateError(f"the chat template failed on these messages: {type(error).__name__}: {error}") from None


# ---------------------------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken-like dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _find_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The default chat template, in transformers' order: chat_template.jinja (how transformers 5 saves it)
    wins over tokenizer_config.json's `chat_template` (a string, or a list of named templates, of which
    "default")."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    return None


def _set_bos_eos_template(backend: tokenizers.Tokenizer, special_tokens: Mapping[str, str | None],
                          add_bos: bool, add_eos: bool) -> None:
    """Replace the post-processor by one that adds BOS / EOS per the tokenizer_config flags (what
    transformers 5 does when those flags are given explicitly)."""
    bos = special_tokens.get("bos_token") if add_bos else None
    eos = special_tokens.get("eos_token") if add_eos else None
    bos_id = backend.token_to_id(bos) if bos else None
    eos_id = backend.token_to_id(eos) if eos else None
    bos = bos if bos_id is not None else None
    eos = eos if eos_id is not None else None
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    special = [(token, token_id) for token, token_id in ((bos, bos_id), (eos, eos_id)) if token]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _clean_up_tokenization(text: str) -> str:
    """Remove the spaces that word-piece decoders put before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _plain(value: Any, what: str) -> Any:
    """A copy of `value` made of JSON types only (what a sandboxed template may safely see)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item, what) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, what) for item in value]
    raise ChatTemplateError(f"{what} contains a {type(value).__name__}; only JSON values can go to a chat template")


def _checked_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{index}] must be an object with 'role' and 'content'")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{index}] has no 'role' string")
        # As transformers does: keys whose value is None are dropped (OpenAI clients send content=None).
        checked.append(_plain({key: value for key, value in message.items() if value is not None},
                              f"messages[{index}]"))
    return checked


def _checked_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(tool, Mapping) for tool in tools):
        raise ChatTemplateError("tools must be a list of JSON-schema objects")
    return _plain(list(tools), "tools")


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (used by some templates to mark assistant text for
    training masks) and renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` for templates, refusing underscore attributes (no route to Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for key in attributes:
            _SafeNamespace._check(key)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, key: str, value: Any) -> None:
        _SafeNamespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key: Any) -> None:
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set the attribute {key!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which chat templates must not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _SafeNamespace
    return environment.from_string(template)
