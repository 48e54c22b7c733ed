"""The built-in tokenizer: a real byte-level BPE trained, deterministically, on English text made here.

The built-in models need a tokenizer that behaves like the real ones (byte-level BPE, special tokens,
a BOS the way each family adds it) without downloading anything. We generate a small English corpus
from sentence parts written for this project, train a byte-level BPE on it with the `tokenizers` library,
then add the special tokens of one model family:

* ``llama3``  -- Llama-3 header specials (``<|begin_of_text|>``, ``<|eot_id|>``, ...) after the BPE vocab,
  BOS added on encode;
* ``chatml``  -- Qwen's ChatML specials (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...) after
  the BPE vocab, no BOS, NFC normalisation as Qwen has;
* ``mistral`` -- ``<unk>``, ``<s>``, ``</s>``, ``[INST]``, ``[/INST]`` ... at the start of the vocab, as
  Mistral has them, BOS ``<s>`` added on encode.

Every family reserves the same number of special slots, so all of them have ``DEMO_VOCAB_SIZE`` tokens.
Building twice gives byte-identical ``tokenizer.json`` (tests check this).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

# Number of learned tokens (256 byte tokens + merges) and of special-token slots per family.
BPE_VOCAB_SIZE = 3056
SPECIAL_SLOTS = 16
DEMO_VOCAB_SIZE = BPE_VOCAB_SIZE + SPECIAL_SLOTS  # 3072

# How text is cut into words before BPE: English contractions; a run of letters with at most one leading
# symbol or space; single digits (so numbers tokenize digit by digit, which keeps arithmetic-looking text
# regular); runs of other symbols with any newlines after them; runs of newlines; spaces not followed by
# a word; any other whitespace.
SPLIT_PATTERN = (
    r"(?i:'(?:s|t|re|ve|m|ll|d))"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


@dataclasses.dataclass(frozen=True)
class SpecialToken:
    """One added token. ``special=False`` mirrors tokens such as Qwen's ``<tool_call>``: matched as one
    token, but kept by ``decode(skip_special_tokens=True)``."""

    content: str
    special: bool = True


@dataclasses.dataclass(frozen=True)
class TokenizerFamily:
    """The special tokens and conventions of one model family."""

    name: str
    tokens: tuple[SpecialToken, ...]  # exactly SPECIAL_SLOTS of them
    at_start: bool  # True: ids 0..SPECIAL_SLOTS-1 (Mistral); False: after the BPE vocab (Llama-3, Qwen)
    bos_token: str | None  # None: the family has no BOS (Qwen)
    eos_token: str  # the end of a chat turn, what the tokenizer calls eos
    pad_token: str | None
    unk_token: str | None
    generation_eos_tokens: tuple[str, ...]  # every token that ends generation (generation_config.json)
    add_bos_token: bool
    nfc: bool = False  # NFC-normalise text before splitting (Qwen does; transformers' Qwen2Tokenizer insists)

    def token_id(self, content: str) -> int:
        """The id of one of this family's added tokens."""
        for index, token in enumerate(self.tokens):
            if token.content == content:
                return index if self.at_start else BPE_VOCAB_SIZE + index
        raise KeyError(f"{content!r} is not a special token of the {self.name} tokenizer family")


def _padded(tokens: list[SpecialToken], filler: str, first_filler: int = 0) -> tuple[SpecialToken, ...]:
    """Fill the family's list up to SPECIAL_SLOTS with reserved tokens (as Llama-3 reserves its own)."""
    index = first_filler
    while len(tokens) < SPECIAL_SLOTS:
        tokens.append(SpecialToken(filler.format(index)))
        index += 1
    if len(tokens) != SPECIAL_SLOTS:
        raise AssertionError(f"{len(tokens)} special tokens do not fit in {SPECIAL_SLOTS} slots")
    return tuple(tokens)


FAMILIES: dict[str, TokenizerFamily] = {
    "llama3": TokenizerFamily(
        name="llama3",
        # The order of Llama-3.1's first specials; the reserved ones fill the gaps as they do there.
        tokens=_padded(
            [
                SpecialToken("<|begin_of_text|>"),
                SpecialToken("<|end_of_text|>"),
                SpecialToken("<|reserved_special_token_0|>"),
                SpecialToken("<|reserved_special_token_1|>"),
                SpecialToken("<|finetune_right_pad_id|>"),
                SpecialToken("<|reserved_special_token_2|>"),
                SpecialToken("<|start_header_id|>"),
                SpecialToken("<|end_header_id|>"),
                SpecialToken("<|eom_id|>"),
                SpecialToken("<|eot_id|>"),
                SpecialToken("<|python_tag|>"),
            ],
            "<|reserved_special_token_{}|>",
            first_filler=3,
        ),
        at_start=False,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token=None,
        generation_eos_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        add_bos_token=True,
    ),
    "chatml": TokenizerFamily(
        name="chatml",
        tokens=_padded(
            [
                SpecialToken("<|endoftext|>"),
                SpecialToken("<|im_start|>"),
                SpecialToken("<|im_end|>"),
                # Matched as single tokens but not "special" (kept when decoding), as in Qwen2.5 / Qwen3.
                SpecialToken("<tool_call>", special=False),
                SpecialToken("</tool_call>", special=False),
                SpecialToken("<tool_response>", special=False),
                SpecialToken("</tool_response>", special=False),
                SpecialToken("<think>", special=False),
                SpecialToken("</think>", special=False),
            ],
            "<|extra_{}|>",
        ),
        at_start=False,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        generation_eos_tokens=("<|im_end|>", "<|endoftext|>"),
        add_bos_token=False,
        nfc=True,
    ),
    "mistral": TokenizerFamily(
        name="mistral",
        tokens=_padded(
            [
                SpecialToken("<unk>"),
                SpecialToken("<s>"),
                SpecialToken("</s>"),
                SpecialToken("[INST]"),
                SpecialToken("[/INST]"),
                SpecialToken("[TOOL_CALLS]"),
                SpecialToken("[AVAILABLE_TOOLS]"),
                SpecialToken("[/AVAILABLE_TOOLS]"),
                SpecialToken("[TOOL_RESULTS]"),
                SpecialToken("[/TOOL_RESULTS]"),
            ],
            "[control_{}]",
        ),
        at_start=True,
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        unk_token="<unk>",
        generation_eos_tokens=("</s>",),
        add_bos_token=True,
    ),
}


def family(name: str) -> TokenizerFamily:
    """Look up a tokenizer family by name, with an error that lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown tokenizer family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


# ---------------------------------------------------------------------------------------------------------
# The training corpus: sentences assembled from parts written for this project.
# ---------------------------------------------------------------------------------------------------------

_PEOPLE = """
I|you|we|they|he|she|it|someone|everyone|nobody|the teacher|the doctor|the engineer|the farmer|the pilot|the
student|the child|the old man|the young woman|my friend|your brother|her sister|his mother|our father|their
neighbor|the manager|the driver|the writer|the painter|the scientist|the nurse|the baker|the captain|Alice|Bob
|Carol|David|Emma|Frank|Grace|Henry|Irene|Jack|Karen|Louis|Maria|Nathan|Olivia|Peter|Quinn|Rachel|Samuel|Teresa
|Victor|Wendy|Xavier|Yusuf|Zoe|Ahmed|Priya|Chen|Mateo|Sofia|Kenji|Amara|Lars|Ingrid|Tomas|the committee|the
team|the company|the council|the students|the children|the workers|the visitors|the players|the researchers
""".replace("\n", "").split("|")

_TOPICS = """
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July August
September October November December one two three four five six seven eight nine ten eleven twelve twenty
thirty forty fifty hundred thousand million billion first second third fourth fifth half quarter dozen
science physics chemistry biology mathematics geometry algebra statistics probability economics history
geography philosophy psychology medicine engineering architecture literature grammar vocabulary pronoun
planet galaxy universe atom molecule electron energy gravity temperature pressure velocity acceleration
function variable parameter argument integer string boolean array dictionary pointer compiler interpreter
database algorithm software hardware processor keyboard monitor internet website browser password account
customer invoice payment delivery package warehouse shipment contract meeting schedule calendar deadline
budget profit revenue salary employee employer interview resume application department university lecture
professor homework exam grade lesson classroom notebook pencil eraser backpack uniform holiday vacation
journey adventure mystery history kingdom empire emperor queen king prince princess soldier battle victory
breakfast lunch dinner sandwich soup salad cheese butter sugar salt pepper chicken potato tomato carrot onion
garlic rice pasta noodle cookie chocolate strawberry banana lemon grape melon peach cherry juice milk water
doctor dentist lawyer judge farmer fisherman carpenter plumber electrician mechanic pilot sailor astronaut
elephant giraffe tiger lion monkey rabbit turtle dolphin whale shark eagle owl penguin butterfly spider
mountain volcano glacier canyon meadow prairie jungle swamp beach coast cliff cave waterfall pond stream
happiness sadness anger fear surprise courage patience kindness honesty wisdom freedom justice knowledge
hello hi hey thanks thank please yes okay sorry goodbye welcome sure great maybe hmm wow oops cheers
assistant user system tool message reply prompt chat conversation summary translate explain describe list
""".split()
_VERBS = """
see saw seen seeing sees make made making makes take took taken taking takes give gave given giving gives
find found finding finds think thought thinking thinks know knew known knowing knows want wanted wanting
wants use used using uses work worked working works call called calling calls try tried trying tries ask
asked asking asks need needed needing needs feel felt feeling feels become became becoming becomes leave
left leaving leaves put putting puts mean meant meaning means keep kept keeping keeps let letting lets
begin began begun beginning begins seem seemed seeming seems help helped helping helps talk talked
talking talks turn turned turning turns start started starting starts show showed shown showing shows
hear heard hearing hears play played playing plays run ran running runs move moved moving moves like
liked liking likes live lived living lives believe believed believing believes hold held holding holds
bring brought bringing brings happen happened happening happens write wrote written writing writes provide
provided providing provides sit sat sitting sits stand stood standing stands lose lost losing loses pay
paid paying pays meet met meeting meets include included including includes continue continued continuing
continues set setting sets learn learned learning learns change changed changing changes lead led leading
leads understand understood understanding understands watch watched watching watches follow followed
following follows stop stopped stopping stops create created creating creates speak spoke spoken speaking
speaks read reading reads allow allowed allowing allows add added adding adds spend spent spending spends
grow grew grown growing grows open opened opening opens walk walked walking walks win won winning wins
offer offered offering offers remember remembered remembering remembers love loved loving loves consider
considered considering considers appear appeared appearing appears buy bought buying buys wait waited
waiting waits serve served serving serves die died dying dies send sent sending sends expect expected
expecting expects build built building builds stay stayed staying stays fall fell fallen falling falls
cut cutting cuts reach reached reaching reaches kill killed killing kills remain remained remaining
remains suggest suggested suggesting suggests raise raised raising raises pass passed passing passes
sell sold selling sells require required requiring requires report reported reporting reports decide
decided deciding decides pull pulled pulling pulls explain explained explaining explains carry carried
carrying carries develop developed developing develops drive drove driven driving drives break broke
broken breaking breaks receive received receiving receives agree agreed agreeing agrees support supported
supporting supports hit hitting hits produce produced producing produces eat ate eaten eating eats cover
covered covering covers catch caught catching catches draw drew drawn drawing draws choose chose chosen
choosing chooses compute computed computing computes measure measured measuring measures cook cooked
cooking cooks travel traveled traveling travels sing sang sung singing sings fix fixed fixing fixes
""".split()

_NOUNS = """
time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
foot boy age policy music market sense nation plan college interest death experience effect class control
care field development role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference value building action model season society tax
director position player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data picture
practice piece land product doctor wall patient worker news test movie north love support technology step
baby computer type attention film tree source organization hair window evidence population site energy
garden river mountain ocean island forest bridge train station airport kitchen bread coffee tea apple
orange garden letter message email server network memory cache request token model engine queue batch
weather rain snow wind summer winter spring autumn morning evening library museum hospital market shop
village valley desert lake harbor castle tower clock engine machine bicycle horse dog cat bird fish
question answer example number answer language sentence paragraph chapter page story poem song dance
""".split()

_ADJECTIVES = """
good new first last long great little own other old right big high different small large next early
young important few public bad same able late hard major better economic strong possible whole free
military true federal international full special easy clear recent certain personal open red difficult
available likely short single medical current wrong private past foreign fine common poor natural
significant similar hot dead central happy serious ready simple left physical general environmental
financial blue democratic dark various entire close legal religious cold final main green nice huge
popular traditional cultural quiet bright warm gentle quick slow careful curious brave calm proud kind
clever tired hungry busy empty heavy light narrow wide deep shallow sharp soft loud rare fresh ancient
modern tiny enormous wooden golden silver yellow purple white black brown grey pink friendly honest
""".split()

_ADVERBS = """
quickly slowly carefully quietly happily easily clearly really almost always never often sometimes
usually already still again soon today yesterday tomorrow together finally certainly probably perhaps
suddenly simply nearly early later here there everywhere recently exactly truly rarely gently loudly
""".split()

_PLACES = """
in the park|at the station|near the river|by the old bridge|in the kitchen|on the mountain|at school|in
the library|at the market|in the garden|on the train|under the tree|behind the house|across the street|in
London|in Paris|in Tokyo|in Cairo|in Lima|in Oslo|in Nairobi|in Toronto|in Mumbai|in Sydney|at home|at
work|downtown|upstairs|in the north|in the south|by the sea|in the village|inside the museum
""".replace("\n", " ").split("|")

_CONNECTIVES = """
because|although|while|after|before|when|if|so|but|and|or|since|until|unless|even though|as soon as
""".replace("\n", " ").split("|")

_OPENERS = """
However,|Meanwhile,|In fact,|For example,|Of course,|Later that day,|At first,|In the end,|Honestly,|As a
result,|On the other hand,|Surprisingly,|Fortunately,|Unfortunately,|Then|Yesterday|Today|Last week|Every
morning|Hello,|Hi,|Please,|Thanks,|Yes,|No,|Okay,|Sorry,|Once upon a time,|To be fair,|In short,|First,|Second,|Finally,|Note:|Update:|Question:|Answer:
""".replace("\n", " ").split("|")

_CONTRACTIONS = """
don't|can't|won't|isn't|aren't|wasn't|didn't|doesn't|I'm|you're|we're|they're|it's|that's|there's|I've
|we've|they'd|she'll|he'll|let's|I'd|you'll|what's|who's|couldn't|shouldn't|wouldn't|haven't
""".replace("\n", "").split("|")

_DETERMINERS = "the a an this that these those my your his her our their every some any each no one two".split()


def _number(rng: random.Random) -> str:
    """A number as it appears in ordinary text: counts, years, prices, decimals, times, percentages."""
    kind = rng.randrange(8)
    if kind == 0:
        return str(rng.randrange(0, 100))
    if kind == 1:
        return str(rng.randrange(1900, 2040))
    if kind == 2:
        return f"${rng.randrange(1, 1000)}.{rng.randrange(0, 100):02d}"
    if kind == 3:
        return f"{rng.randrange(0, 100)}.{rng.randrange(0, 1000)}"
    if kind == 4:
        return f"{rng.randrange(0, 24):02d}:{rng.randrange(0, 60):02d}"
    if kind == 5:
        return f"{rng.randrange(0, 101)}%"
    if kind == 6:
        return f"{rng.randrange(1, 1000):,}"
    return f"{rng.randrange(1000, 10_000_000):,}"


def _clause(rng: random.Random) -> str:
    person = rng.choice(_PEOPLE).strip() or "we"
    parts = [person]
    if rng.random() < 0.3:
        parts.append(rng.choice(_ADVERBS))
    parts.append(rng.choice(_VERBS))
    parts.append(rng.choice(_DETERMINERS))
    if rng.random() < 0.6:
        parts.append(rng.choice(_ADJECTIVES))
    parts.append(rng.choice(_NOUNS) if rng.random() < 0.6 else rng.choice(_TOPICS))
    if rng.random() < 0.5:
        parts.append(rng.choice(_PLACES).strip())
    if rng.random() < 0.25:
        unit = rng.choice(("days", "hours", "minutes", "people", "dollars", "miles", "years", "points", "pages"))
        parts.append(f"{rng.choice(('for', 'with', 'after', 'about'))} {_number(rng)} {unit}")
    return " ".join(parts)


def _sentence(rng: random.Random) -> str:
    text = _clause(rng)
    if rng.random() < 0.4:
        text += f" {rng.choice(_CONNECTIVES).strip()} {_clause(rng)}"
    if rng.random() < 0.2:
        text = f"{rng.choice(_CONTRACTIONS).strip()} {text}"
    if rng.random() < 0.35:
        text = f"{rng.choice(_OPENERS).strip()} {text}"
    text = text[0].upper() + text[1:]
    style = rng.random()
    if style < 0.1:
        return f'"{text}," said {rng.choice(_PEOPLE).strip() or "Ann"}.'
    if style < 0.2:
        return f"{text}?"
    if style < 0.25:
        return f"{text}!"
    if style < 0.3:
        return f"{text} ({_number(rng)})."
    if style < 0.35:
        return f"{text}; {_clause(rng)}."
    if style < 0.4:
        return f"{text} - {_clause(rng)}..."
    return f"{text}."


def _paragraph(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.1:  # a list
        items = [f"{i + 1}. {_clause(rng)}" for i in range(rng.randrange(2, 6))]
        return "\n".join(items)
    if kind < 0.15:  # key: value lines
        lines = [f"{rng.choice(_NOUNS)}: {_number(rng)}" for _ in range(rng.randrange(2, 5))]
        return "\n".join(lines)
    if kind < 0.2:  # a tiny program
        name = rng.choice(_NOUNS)
        return f"def {name}_count(items):\n    return len([x for x in items if x > {_number(rng)}])"
    return " ".join(_sentence(rng) for _ in range(rng.randrange(2, 7)))


def corpus(num_paragraphs: int = 3000, seed: int = 20240601) -> list[str]:
    """The training text: a fixed, seeded mix of prose, lists, numbers and a little code."""
    rng = random.Random(seed)
    texts = [_paragraph(rng) for _ in range(num_paragraphs)]
    # Every word list verbatim as well, so that all the words we wrote get a chance to become tokens.
    for words in (_PEOPLE, _VERBS, _NOUNS, _TOPICS, _ADJECTIVES, _ADVERBS, _PLACES, _OPENERS, _CONTRACTIONS):
        texts.append(" ".join(w.strip() for w in words if w.strip()))
    return texts


# ---------------------------------------------------------------------------------------------------------
# Training and assembly.
# ---------------------------------------------------------------------------------------------------------


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Train the byte-level BPE once per process; returns (vocab sorted by id, merges in order)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    state = json.loads(tokenizer.to_str())["model"]
    vocab = tuple(sorted(state["vocab"].items(), key=lambda item: item[1]))
    merges = tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"])
    if len(vocab) != BPE_VOCAB_SIZE:
        raise AssertionError(
            f"the demo corpus only supports {len(vocab)} BPE tokens, {BPE_VOCAB_SIZE} were asked for"
        )
    return vocab, merges


def build_tokenizer(family_name: str) -> Tokenizer:
    """The demo tokenizer of one family, as a `tokenizers.Tokenizer` (see the module docstring)."""
    fam = family(family_name)
    vocab, merges = _trained_bpe()
    offset = SPECIAL_SLOTS if fam.at_start else 0
    vocab_map = {token: index + offset for token, index in vocab}
    for token in fam.tokens:
        # Placing the added tokens in the model vocab pins their ids (the added vocabulary reuses them).
        vocab_map[token.content] = fam.token_id(token.content)
    tokenizer = Tokenizer(models.BPE(vocab=vocab_map, merges=list(merges), fuse_unk=False, byte_fallback=False))
    if fam.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(
        [AddedToken(t.content, special=t.special, normalized=False, single_word=False, lstrip=False, rstrip=False)
         for t in fam.tokens]
    )
    if fam.bos_token is not None and fam.add_bos_token:
        bos = (fam.bos_token, fam.token_id(fam.bos_token))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos_token}:0 $A:0",
            pair=f"{fam.bos_token}:0 $A:0 {fam.bos_token}:1 $B:1",
            special_tokens=[bos],
        )
    else:
        # Same as Qwen: byte-level offsets only, nothing added around the text.
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if tokenizer.get_vocab_size(with_added_tokens=True) != DEMO_VOCAB_SIZE:
        raise AssertionError("demo tokenizer size does not match DEMO_VOCAB_SIZE")
    return tokenizer


@functools.lru_cache(maxsize=None)
def tokenizer_json(family_name: str) -> str:
    """The `tokenizer.json` text of one family (deterministic: same bytes on every build)."""
    return build_tokenizer(family_name).to_str(pretty=True)
