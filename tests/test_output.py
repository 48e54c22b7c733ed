"""Incremental detokenization, stop strings and their combination for one choice (worker/engine/output.py).

The tokenizers are trained here on a small multilingual text, so these tests depend on nothing but
`tokenizers`: a byte-level BPE (GPT-2 / Llama 3 / Qwen style, where characters split over tokens) and a
Metaspace BPE (sentencepiece style, where decode drops the leading space of the first token).
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from worker.engine.output import ChoiceTextState, IncrementalDetokenizer, StopStringMatcher
from worker.sampling_params import SamplingParams

CORPUS = [
    "héllo wörld 日本語 🙂 the quick brown fox jumps over the lazy dog",
    "Ünïcödé façade naïve café — «quotes» and 中文字符 with emoji 🚀🎉 and more 日本語のテキスト",
    "hello world, hello there. The end is near; stop here STOP now.",
    "Mixing ASCII, ελληνικά, русский текст, and עברית in one line 🙂🙂",
]
SAMPLES = [
    "héllo wörld 日本語 🙂",
    "The end is near. STOP now, 中文 🚀 café",
    "naïve façade — ελληνικά русский 🎉🎉 done",
]


class TokenizerAdapter:
    """The duck-typed interface output.py needs, over a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoded_lengths: list[int] = []  # how many ids each decode call saw

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.decoded_lengths.append(len(ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids


@pytest.fixture(scope="module")
def byte_bpe() -> TokenizerAdapter:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return TokenizerAdapter(tokenizer)


@pytest.fixture(scope="module")
def metaspace_bpe() -> TokenizerAdapter:
    tokenizer = Tokenizer(models.BPE(byte_fallback=False, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return TokenizerAdapter(tokenizer)


def stream(detokenizer: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None) -> list[str]:
    """Feed ids one by one (or in random chunks), return all deltas including the final flush."""
    deltas = []
    i = 0
    while i < len(ids):
        size = rng.randint(1, 4) if rng else 1
        deltas.append(detokenizer.add(ids[i : i + size]))
        i += size
    deltas.append(detokenizer.flush())
    return deltas


# ---------------------------------------------------------------------- detokenizer
def test_multibyte_characters_are_split_over_tokens_in_this_tokenizer(byte_bpe):
    """Guard for the tests below: the byte-level tokenizer really splits some characters over tokens."""
    ids = byte_bpe.encode("🙂🚀 日本語")
    assert any("\ufffd" in byte_bpe.decode([i]) for i in ids)


@pytest.mark.parametrize("text", SAMPLES)
def test_deltas_concatenate_to_full_decode_and_never_show_broken_characters(byte_bpe, text):
    ids = byte_bpe.encode(text)
    detokenizer = IncrementalDetokenizer(byte_bpe, byte_bpe.encode("prompt: "))
    deltas = stream(detokenizer, ids)
    assert "".join(deltas) == byte_bpe.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert detokenizer.text == text


def test_random_token_sequences_concatenate_to_full_decode(byte_bpe):
    """Any ids, even byte soup that is not valid UTF-8, in chunks of any size, with any prompt."""
    rng = random.Random(1234)
    vocab = byte_bpe.tokenizer.get_vocab_size()
    for _ in range(300):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        skip = rng.random() < 0.5
        detokenizer = IncrementalDetokenizer(byte_bpe, prompt, skip_special_tokens=skip)
        deltas = stream(detokenizer, ids, rng)
        assert "".join(deltas) == byte_bpe.decode(ids, skip_special_tokens=skip)


def test_random_valid_text_streams_without_replacement_characters(byte_bpe):
    rng = random.Random(99)
    alphabet = list("abc xyz,.é日本語🙂🚀ßø")
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = byte_bpe.encode(text)
        deltas = stream(IncrementalDetokenizer(byte_bpe, []), ids, rng)
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas)


def test_incomplete_character_at_end_is_held_back_until_flush(byte_bpe):
    emoji_bytes = [i for i in byte_bpe.encode("🙂") if "\ufffd" in byte_bpe.decode([i])]
    detokenizer = IncrementalDetokenizer(byte_bpe, [])
    assert detokenizer.add(byte_bpe.encode("ok ")) == "ok "
    assert detokenizer.add(emoji_bytes[:1]) == ""  # the emoji is not complete yet
    assert detokenizer.flush() == byte_bpe.decode(emoji_bytes[:1])  # released as U+FFFD, like a full decode
    assert detokenizer.text == "ok " + byte_bpe.decode(emoji_bytes[:1])


def test_special_tokens_are_skipped_or_kept(byte_bpe):
    eos = byte_bpe.tokenizer.token_to_id("<eos>")
    ids = byte_bpe.encode("hello") + [eos]
    skipped = stream(IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=True), ids)
    kept = stream(IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=False), ids)
    assert "".join(skipped) == "hello"
    assert "".join(kept) == "hello<eos>"


def test_word_boundary_spaces_follow_the_prompt_context(metaspace_bpe):
    """Sentencepiece-style decode drops a leading space; a continuation of a prompt must keep it."""
    prompt = metaspace_bpe.encode("hello")
    output = metaspace_bpe.encode("hello world")[len(prompt) :]
    assert metaspace_bpe.decode(output).startswith("world")  # decoded alone, the space is gone
    deltas = stream(IncrementalDetokenizer(metaspace_bpe, prompt), output)
    assert "".join(deltas) == " world"
    assert "".join(stream(IncrementalDetokenizer(metaspace_bpe, []), output)) == metaspace_bpe.decode(output)


def test_decodes_only_a_small_window(byte_bpe):
    """Long outputs must not be re-decoded whole at every step."""
    ids = byte_bpe.encode("the quick brown fox jumps over the lazy dog " * 20)
    byte_bpe.decoded_lengths.clear()
    detokenizer = IncrementalDetokenizer(byte_bpe, byte_bpe.encode("a long prompt " * 10))
    stream(detokenizer, ids)
    assert len(ids) > 100
    assert max(byte_bpe.decoded_lengths) <= 8


# ---------------------------------------------------------------------- stop strings
def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], str | None]:
    emitted, matched = [], None
    for delta in deltas:
        text, stop = matcher.process(delta)
        emitted.append(text)
        if stop is not None:
            matched = stop
            break
    if matched is None:
        emitted.append(matcher.flush())
    return emitted, matched


def test_stop_string_split_over_three_deltas():
    emitted, stop = feed_all(StopStringMatcher(["STOP"]), ["go S", "T", "OP and more"])
    assert stop == "STOP"
    assert "".join(emitted) == "go "
    assert emitted[0] == "go "  # "S" was held back: it might start "STOP"
    assert emitted[1] == ""


def test_stop_string_included_in_output_when_asked():
    emitted, stop = feed_all(StopStringMatcher(["STOP"], include_stop_str_in_output=True), ["go S", "T", "OP and more"])
    assert stop == "STOP"
    assert "".join(emitted) == "go STOP"


def test_held_back_text_is_released_when_it_cannot_be_a_stop_string():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.process("a ST") == ("a ", None)
    assert matcher.process("ART S") == ("START ", None)  # "ST" turned out not to be "STOP"; "S" still might
    assert matcher.flush() == "S"


def test_flush_releases_held_back_text_at_end_of_stream():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.process("result </en") == ("result ", None)
    assert matcher.flush() == "</en"
    assert matcher.matched is None


def test_stop_string_that_is_a_prefix_of_another():
    # The shorter one is complete first, so it wins, whatever the order in the list.
    for stops in (["foo", "foobar"], ["foobar", "foo"]):
        emitted, stop = feed_all(StopStringMatcher(stops), ["x f", "oob", "ar"])
        assert (stop, "".join(emitted)) == ("foo", "x ")
    # Both complete at the same point: the one starting first (the longer) wins.
    emitted, stop = feed_all(StopStringMatcher(["bar", "foobar"], include_stop_str_in_output=False), ["xfoobar!"])
    assert (stop, "".join(emitted)) == ("foobar", "x")


def test_stop_matching_does_not_depend_on_how_text_is_split():
    rng = random.Random(7)
    stops = ["ab", "bca", "cc", "abcab"]
    for _ in range(300):
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 20)))
        include = rng.random() < 0.5
        whole, whole_stop = feed_all(StopStringMatcher(stops, include), [text])
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        split, split_stop = feed_all(StopStringMatcher(stops, include), pieces)
        assert ("".join(split), split_stop) == ("".join(whole), whole_stop)
        # Check against a direct definition: the first position at which any stop string is complete.
        ends = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if ends:
            end, start, s = min(ends)
            assert whole_stop == s
            assert "".join(whole) == text[: end if include else start]
        else:
            assert whole_stop is None and "".join(whole) == text


def test_unicode_stop_strings():
    emitted, stop = feed_all(StopStringMatcher(["日本", "🙂"]), ["héllo ", "wörld 日", "本語"])
    assert (stop, "".join(emitted)) == ("日本", "héllo wörld ")


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.process("anything") == ("anything", None)
    assert matcher.flush() == ""


def test_text_after_a_match_is_ignored():
    matcher = StopStringMatcher(["x"])
    assert matcher.process("ax") == ("a", "x")
    assert matcher.process("more") == ("", None)
    assert matcher.flush() == ""


# ---------------------------------------------------------------------- one choice
def feed_tokens(state: ChoiceTextState, ids: list[int]) -> tuple[str, str | None]:
    text = []
    for token in ids:
        delta, stop = state.feed([token])
        text.append(delta)
        if stop is not None:
            return "".join(text), stop
    tail, stop = state.flush()
    return "".join(text) + tail, stop


def test_choice_stops_on_a_string_spanning_three_tokens(byte_bpe):
    text = "The end is near. END now"
    ids = [byte_bpe.encode(ch)[0] for ch in text]  # one token per character: "END" spans three tokens
    state = ChoiceTextState(byte_bpe, [], SamplingParams(stop=["END"], max_tokens=None))
    out, stop = feed_tokens(state, ids)
    assert (out, stop) == ("The end is near. ", "END")
    assert state.stop_str == "END" and state.finished
    assert state.text == "The end is near. "
    assert state.feed(byte_bpe.encode("more")) == ("", None)  # a finished choice emits nothing more


def test_choice_respects_min_tokens(byte_bpe):
    ids = [byte_bpe.encode(ch)[0] for ch in "ab.cd.ef"]
    # With min_tokens=4, the "." completed by token 3 does not count; the one completed by token 6 does.
    state = ChoiceTextState(byte_bpe, [], SamplingParams(stop=["."], min_tokens=4, max_tokens=16))
    assert feed_tokens(state, ids) == ("ab.cd", ".")
    # The min_tokens-th token itself may complete a stop string (as in vLLM).
    state = ChoiceTextState(byte_bpe, [], SamplingParams(stop=["."], min_tokens=3, max_tokens=16))
    assert feed_tokens(state, ids) == ("ab", ".")
    # Same when all tokens arrive in one event.
    state = ChoiceTextState(byte_bpe, [], SamplingParams(stop=["."], min_tokens=4, max_tokens=16))
    assert state.feed(ids) == ("ab.cd", ".")


def test_choice_min_tokens_still_catches_a_stop_string_started_before_it(byte_bpe):
    ids = [byte_bpe.encode(ch)[0] for ch in "xxENDyy"]
    state = ChoiceTextState(byte_bpe, [], SamplingParams(stop=["END"], min_tokens=4, max_tokens=16))
    assert feed_tokens(state, ids) == ("xx", "END")


def test_choice_drops_the_stop_token_text_unless_asked(byte_bpe):
    eos = byte_bpe.tokenizer.token_to_id("<eos>")
    ids = byte_bpe.encode("done") + [eos]
    for include, expected in ((False, "done"), (True, "done<eos>")):
        params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
        state = ChoiceTextState(byte_bpe, [], params)
        text, stop = state.feed(ids, stop_token_id=eos)
        tail, _ = state.flush()
        assert (text + tail, stop) == (expected, None)


def test_choice_streams_unicode_and_flushes_the_rest(byte_bpe):
    text = "日本語 🙂 and é"
    ids = byte_bpe.encode(text)
    state = ChoiceTextState(byte_bpe, byte_bpe.encode("Q: "), SamplingParams(stop=["and é!"]))
    out, stop = feed_tokens(state, ids)
    assert (out, stop) == (text, None)  # "and é" was held back (it may start the stop string) until flush
    assert state.text == text
