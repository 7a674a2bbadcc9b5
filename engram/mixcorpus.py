"""The built-in `mix` corpus: generated documents that interleave lookup-able knowledge and rule-following
computation in a set ratio (`DataConfig.knowledge_share`), deterministic from `DataConfig.mix_seed`.

Why: the Engram paper (arXiv 2601.07372, §6) explains its U-curve as a division of labour: hashed n-gram
tables hold static, local patterns (named entities, facts), which frees experts and depth for composition.
This corpus turns that into a knob. Two kinds of paragraph:

- knowledge: a fixed table of `mix_entities` entities drawn once per seed. Names (two words) come from a
  syllable grammar; each entity has five attributes (home place, birth year, craft, mentor — another entity —
  and emblem); entities are mentioned with Zipf frequency (exponent ZIPF_EXPONENT) through varied templates
  that always name the entity before the value, so the entity's n-gram is the key and the value can only be
  predicted by remembering it;
- computation: fresh instances every paragraph, whose answer follows from a rule applied to the context and
  cannot be memorised: multi-digit addition with carries, closing the open brackets of a sequence (stack
  tracking), and reading back a variable set a few lines earlier. No instance occurs twice in the corpus.

Answer spans: each paragraph marks the characters of its answers — an attribute's value (KNOWLEDGE) or a
rule's result (COMPUTATION). The per-kind validation losses are taken over the tokens that overlap these spans;
the rest (templates, names, operands, separators) is context, counted only in the total loss.

The share is a share of characters: paragraphs are appended by a deficit rule (a knowledge paragraph whenever
the knowledge characters so far fall below `share` of all characters), so the corpus (and each document) is
within one paragraph of the requested share. Documents hold about DOC_CHARS characters; there are
max(2, round(n_bytes / DOC_CHARS)) of them.

Validation holds out documents, not facts: `generate` writes every training document first and then the
validation documents, whose knowledge paragraphs state only (entity, attribute) facts that some training
document stated. The split itself (which document names are validation) is the caller's (engram.data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIX_VERSION = 1  # bump when the generated text changes for the same settings; part of the corpus fingerprint
CONTEXT, KNOWLEDGE, COMPUTATION = 0, 1, 2  # token kinds (uint8 in the token cache)
KIND_NAMES = ("context", "knowledge", "computation")
DOC_CHARS = 2000
ZIPF_EXPONENT = 1.0
ATTRIBUTES = ("home", "born", "craft", "mentor", "emblem")
MAX_REDRAWS = 1000  # a fresh computation instance is found in a few draws; this bounds a pathological config

ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th",
          "sh", "gl", "tr")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
CODAS = ("", "", "", "n", "r", "l", "s", "th", "nd", "sk")
PLACE_SUFFIXES = ("holm", "mere", "wick", "dun", "ford", "gard", "stad", "by")
CRAFTS = ("pottery", "weaving", "masonry", "glassblowing", "carpentry", "brewing", "tanning", "smithing",
          "cartography", "bookbinding", "dyeing", "fletching", "beekeeping", "rope making", "shipbuilding",
          "clockmaking", "herbalism", "astronomy", "copying", "tailoring", "milling", "fishing", "vintnery",
          "lens grinding", "bell casting", "lute making", "salt panning", "falconry", "stonecarving", "minting",
          "quarrying", "printing")
COLOURS = ("red", "blue", "green", "golden", "silver", "black", "white", "grey", "amber", "violet", "copper",
           "scarlet")
ANIMALS = ("heron", "wolf", "otter", "stag", "raven", "salmon", "badger", "lynx", "hare", "falcon", "boar",
           "owl", "swan", "viper", "bear", "crane")
TEMPLATES = {  # "{n}" the entity's name, "{v}" the value: the name always comes first
    "home": ("{n} lives in {v}.", "{n} makes a home in {v}.", "{n} comes from {v}.", "The home of {n} is {v}.",
             "Ask for {n} in {v}."),
    "born": ("{n} was born in {v}.", "{n} dates from the year {v}.", "The birth year of {n} is {v}.",
             "{n} came into the world in {v}."),
    "craft": ("{n} works in {v}.", "{n} is known for {v}.", "The craft of {n} is {v}.",
              "{n} earns a living by {v}."),
    "mentor": ("{n} was taught by {v}.", "The mentor of {n} is {v}.", "{n} learned the trade from {v}.",
               "{n} studied under {v}."),
    "emblem": ("The emblem of {n} is the {v}.", "{n} carries the sign of the {v}.", "{n} flies the {v} banner.",
               "On the door of {n} hangs the {v}."),
}
BRACKETS = (("(", ")"), ("[", "]"), ("{", "}"), ("<", ">"))


@dataclass(frozen=True)
class Entity:
    name: str
    home: str
    born: str
    craft: str
    mentor: str  # another entity's name
    emblem: str


@dataclass(frozen=True)
class MixDocument:
    name: str
    text: str
    spans: tuple[tuple[int, int, int], ...]  # (start, end, kind) character ranges of answers, in order
    facts: frozenset[tuple[int, str]]  # (entity index, attribute) stated in this document
    instances: tuple[str, ...]  # canonical keys of its computation instances
    knowledge_chars: int  # characters of knowledge paragraphs
    computation_chars: int


def n_documents(n_bytes: int) -> int:
    return max(2, round(n_bytes / DOC_CHARS))


def document_names(n_bytes: int) -> list[str]:
    """The documents' names (the identity the caller splits on), in generation order."""
    n = n_documents(n_bytes)
    return [f"mix-{i:06d}" for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# The entity table


def _word(rng: np.random.Generator, n_syllables: int) -> str:
    parts = [ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))] + CODAS[rng.integers(len(CODAS))]
             for _ in range(n_syllables)]
    return "".join(parts).capitalize()


def _unique_words(rng: np.random.Generator, n: int, syllables: tuple[int, int], suffixes: tuple[str, ...] = ("",),
                  taken: set[str] | None = None) -> list[str]:
    taken = set() if taken is None else taken
    out: list[str] = []
    while len(out) < n:
        word = _word(rng, int(rng.integers(syllables[0], syllables[1] + 1)))
        word += suffixes[rng.integers(len(suffixes))]
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def entity_table(n_entities: int, seed: int) -> tuple[Entity, ...]:
    """The seed's entities: unique two-word names, a home among n_entities // 20 (>= 8) places, a birth year
    in 1400-1999, a craft, a mentor (another entity) and an emblem (colour and animal)."""
    if n_entities < 2:
        raise ValueError(f"mix_entities: expected at least 2 (a mentor is another entity), got {n_entities}")
    rng = np.random.default_rng([seed, 0])
    taken: set[str] = set()
    places = _unique_words(rng, max(8, n_entities // 20), (2, 2), PLACE_SUFFIXES, taken)
    names: list[str] = []
    seen_names: set[str] = set()
    while len(names) < n_entities:
        name = f"{_word(rng, int(rng.integers(2, 4)))} {_word(rng, int(rng.integers(2, 4)))}"
        if name not in seen_names:
            seen_names.add(name)
            names.append(name)
    entities = []
    for i, name in enumerate(names):
        mentor = int(rng.integers(n_entities - 1))
        mentor += mentor >= i  # never oneself
        entities.append(Entity(
            name=name, home=places[rng.integers(len(places))], born=str(int(rng.integers(1400, 2000))),
            craft=CRAFTS[rng.integers(len(CRAFTS))], mentor=names[mentor],
            emblem=f"{COLOURS[rng.integers(len(COLOURS))]} {ANIMALS[rng.integers(len(ANIMALS))]}"))
    return tuple(entities)


# ---------------------------------------------------------------------------------------------------------------
# Paragraphs: (text, answer spans relative to the text)


class _Paragraph:
    """Builds one paragraph's text while recording the character ranges of its answers."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n = 0
        self.spans: list[tuple[int, int, int]] = []

    def add(self, text: str, kind: int = CONTEXT) -> None:
        if kind != CONTEXT:
            self.spans.append((self.n, self.n + len(text), kind))
        self.parts.append(text)
        self.n += len(text)

    def text(self) -> str:
        return "".join(self.parts)


def _knowledge(rng: np.random.Generator, entities: tuple[Entity, ...], zipf_cdf: np.ndarray,
               allowed: dict[int, tuple[str, ...]] | None) -> tuple[_Paragraph, set[tuple[int, str]]]:
    """2-4 facts about one Zipf-drawn entity; with `allowed`, only the (entity, attribute) facts it lists."""
    while True:
        e = int(np.searchsorted(zipf_cdf, rng.random(), side="right"))
        attrs = ATTRIBUTES if allowed is None else allowed.get(e, ())
        if attrs:
            break
    n_facts = min(len(attrs), int(rng.integers(2, 5)))
    chosen = [attrs[i] for i in rng.permutation(len(attrs))[:n_facts]]
    para, facts = _Paragraph(), set()
    for j, attr in enumerate(chosen):
        template = TEMPLATES[attr][rng.integers(len(TEMPLATES[attr]))]
        before, after = template.split("{v}")
        para.add(("" if j == 0 else " ") + before.format(n=entities[e].name))
        para.add(getattr(entities[e], attr), KNOWLEDGE)
        para.add(after)
        facts.add((e, attr))
    para.add("\n\n")
    return para, facts


def _addition(rng: np.random.Generator) -> tuple[_Paragraph, str]:
    a, b = (int(rng.integers(10 ** (d - 1), 10 ** d)) for d in rng.integers(3, 6, size=2))
    para = _Paragraph()
    para.add(f"Add: {a} + {b} = ")
    para.add(str(a + b), COMPUTATION)
    para.add(".\n\n")
    return para, f"add:{a}+{b}"


def _brackets(rng: np.random.Generator) -> tuple[_Paragraph, str]:
    """A random walk of opening and closing brackets (always valid) that ends with 2-6 still open; the answer
    closes them in stack order."""
    stack: list[int] = []
    seq: list[str] = []
    n_steps = int(rng.integers(6, 15))
    for _ in range(n_steps):
        if stack and rng.random() < 0.4:
            seq.append(BRACKETS[stack.pop()][1])
        else:
            kind = int(rng.integers(len(BRACKETS)))
            stack.append(kind)
            seq.append(BRACKETS[kind][0])
    while len(stack) < 2:
        kind = int(rng.integers(len(BRACKETS)))
        stack.append(kind)
        seq.append(BRACKETS[kind][0])
    para = _Paragraph()
    para.add("Close: " + " ".join(seq) + " ->")
    para.add(" " + " ".join(BRACKETS[k][1] for k in reversed(stack)), COMPUTATION)
    para.add("\n\n")
    return para, "close:" + "".join(seq)


def _lookup(rng: np.random.Generator) -> tuple[_Paragraph, str]:
    """3-6 assignments of distinct one- or two-letter variables, then a read-back of one of them."""
    n_vars = int(rng.integers(3, 7))
    letters = "abcdefghijklmnopqrstuvwxyz"
    names: list[str] = []
    while len(names) < n_vars:
        name = "".join(letters[i] for i in rng.integers(26, size=int(rng.integers(1, 3))))
        if name not in names:
            names.append(name)
    values = [int(v) for v in rng.integers(0, 100, size=n_vars)]
    q = int(rng.integers(n_vars))
    para = _Paragraph()
    para.add("".join(f"set {n} = {v}\n" for n, v in zip(names, values)) + f"get {names[q]} =")
    para.add(f" {values[q]}", COMPUTATION)
    para.add("\n\n")
    return para, "get:" + ",".join(f"{n}={v}" for n, v in zip(names, values)) + f"?{names[q]}"


_COMPUTATIONS = (_addition, _brackets, _lookup)


def _computation(rng: np.random.Generator, used: set[str]) -> tuple[_Paragraph, str]:
    """A fresh instance of a randomly chosen task: redrawn until its key is new to the corpus."""
    task = _COMPUTATIONS[rng.integers(len(_COMPUTATIONS))]
    for _ in range(MAX_REDRAWS):
        para, key = task(rng)
        if key not in used:
            used.add(key)
            return para, key
    raise ValueError("knowledge_share/max_bytes: the corpus is too large for distinct computation instances")


# ---------------------------------------------------------------------------------------------------------------
# Documents


def generate(share: float, n_entities: int, n_bytes: int, seed: int, is_val: np.ndarray) -> list[MixDocument]:
    """The corpus's documents, named as `document_names(n_bytes)`, in that order; `is_val` marks validation
    documents (written after every training document, stating only facts that training stated)."""
    if not 0 <= share <= 1:
        raise ValueError(f"knowledge_share: expected a number in [0, 1], got {share!r}")
    names = document_names(n_bytes)
    if len(is_val) != len(names):
        raise ValueError(f"is_val: expected {len(names)} flags, got {len(is_val)}")
    entities = entity_table(n_entities, seed)
    ranks = np.arange(1, n_entities + 1, dtype=float)
    zipf_cdf = np.cumsum(ranks ** -ZIPF_EXPONENT)
    zipf_cdf /= zipf_cdf[-1]
    used: set[str] = set()
    seen: dict[int, set[str]] = {}
    totals = [0, 0]  # knowledge, computation characters so far (both splits: one share for the corpus)
    docs: dict[int, MixDocument] = {}
    order = [i for i in range(len(names)) if not is_val[i]] + [i for i in range(len(names)) if is_val[i]]
    allowed = None
    for pos, i in enumerate(order):
        if is_val[i] and allowed is None:  # the first validation document: training is complete
            allowed = {e: tuple(a for a in ATTRIBUTES if a in attrs) for e, attrs in seen.items()}
        rng = np.random.default_rng([seed, 1, i])
        parts, spans, facts, instances, n, chars = [], [], set(), [], 0, [0, 0]
        while n < DOC_CHARS:
            knowledge = share > 0 and (share == 1 or totals[0] < share * (totals[0] + totals[1]))
            if knowledge:
                para, new_facts = _knowledge(rng, entities, zipf_cdf, allowed)
                facts |= new_facts
            else:
                para, key = _computation(rng, used)
                instances.append(key)
            text = para.text()
            parts.append(text)
            spans.extend((n + s, n + e, k) for s, e, k in para.spans)
            n += len(text)
            totals[0 if knowledge else 1] += len(text)
            chars[0 if knowledge else 1] += len(text)
        if not is_val[i]:
            for e, attr in facts:
                seen.setdefault(e, set()).add(attr)
        docs[i] = MixDocument(name=names[i], text="".join(parts), spans=tuple(spans), facts=frozenset(facts),
                              instances=tuple(instances), knowledge_chars=chars[0], computation_chars=chars[1])
    return [docs[i] for i in range(len(names))]


def token_kinds(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """(n_tokens,) uint8 kind of each token: the kind of an answer span it overlaps, else CONTEXT.

    `offsets` are the tokens' character ranges in the document (the tokenizer's offsets); both lists are in
    order, so one merge pass suffices.
    """
    kinds = np.zeros(len(offsets), dtype=np.uint8)
    j = 0
    for t, (start, end) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and spans[j][0] < end and start < spans[j][1]:
            kinds[t] = spans[j][2]
    return kinds
