"""A synthetic chat world generated from a seed: no downloads, known answers.

Domains of different character, so that fusion has something to show:
``markov`` text whose next word is genuinely uncertain (a fixed Markov chain
with known transition probabilities), ``ballad`` lines from a stochastic
grammar whose words depend on the word before (known probabilities, other
words), and tasks with one right answer:
``arithmetic``, ``reverse`` (string transformation) and ``facts`` (lookups in
a generated fact table). The *world* (chain, grammar's word tables, fact table) is fixed by
``WORLD_SEED``; the run seed only picks which examples are drawn, so the
held-out split and training data come from the same world.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from functools import cache, lru_cache

from fusechat_core.registry import Registry

WORLD_SEED = 20240226
# A domain's version is bumped when its generator draws other rows: the addresses of the demo
# datasets and models that read it carry the version (plan.py), so a store made in the older
# world is not read as this one's; everything else, real data above all, keeps its addresses.
DOMAINS: Registry[Callable[[random.Random], tuple[str, str]]] = Registry("synthetic domain", addressed=True)

_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "su", "vi", "dor", "pa", "gen", "lu", "sha", "ko", "ber", "ni", "tal"]
_WORDS = ["the", "river", "stone", "light", "falls", "under", "old", "bright", "wind", "carries",
          "a", "song", "over", "quiet", "hills", "and", "morning", "rain", "returns", "slowly"]


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(int(hashlib.sha256(":".join([str(seed), *parts]).encode()).hexdigest()[:16], 16))


def _name(rng: random.Random, n: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


@lru_cache(maxsize=1)
def markov_chain() -> dict[str, list[tuple[str, float]]]:
    """Each word's successors: 3 words with fixed, unequal probabilities."""
    rng = _rng(WORLD_SEED, "markov")
    chain = {}
    for w in _WORDS:
        nxt = rng.sample(_WORDS, 3)
        chain[w] = list(zip(nxt, (0.6, 0.3, 0.1)))
    return chain


@lru_cache(maxsize=1)
def fact_table() -> dict[str, str]:
    """Country → capital, invented: no model knows it before training on it."""
    rng = _rng(WORLD_SEED, "facts")
    table: dict[str, str] = {}
    while len(table) < 60:
        table.setdefault(_name(rng, 3), _name(rng, 2))
    return table


@DOMAINS.register("markov")
def _markov(rng: random.Random) -> tuple[str, str]:
    chain = markov_chain()
    word = rng.choice(_WORDS)
    words = [word]
    for _ in range(rng.randint(12, 24)):
        nxt, probs = zip(*chain[words[-1]])
        words.append(rng.choices(nxt, probs)[0])
    return f"Continue the story: {word}", " ".join(words[1:]) + "."


# A stochastic grammar whose words depend on the word before them. Rules: nonterminal ->
# [(expansion, probability)]; a word class (DET, ADJ, NOUN, VERB, PREP) is filled by one of
# three of its words, with probabilities 0.6, 0.3 and 0.1, and WHICH three depends on the word
# before it (``ballad_choices``): tables for about 75 contexts that a model learns only from
# many lines, as it learns the Markov chain's. Its words are not the chain's, so the two
# uncertain domains are distinct skills; each is one token in every demo tokenizer, so the
# domain measures what a model knows, not how well two vocabularies line up (a word one
# tokenizer splits has no 1-to-1 partner, SPEC §1.3).
GRAMMAR: dict[str, list[tuple[tuple[str, ...], float]]] = {
    "LINE": [(("NP", "VP"), 0.7), (("NP", "VP", "and", "VP"), 0.3)],
    "NP": [(("DET", "NOUN"), 0.6), (("DET", "ADJ", "NOUN"), 0.4)],
    "VP": [(("VERB", "NP"), 0.5), (("VERB", "PREP", "NP"), 0.3), (("VERB",), 0.2)],
}
WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "DET": tuple("the a every one no this that".split()),
    "ADJ": tuple("cold dark old young red white black long small great wild".split()),
    "NOUN": tuple("ship sea star night king queen man woman child bird horse wolf fire stone river road".split()),
    "VERB": tuple("saw heard called found kept took gave held turned walked followed left met lost".split()),
    "PREP": tuple("near over under past with from".split()),
}
CHOICE_PROBS = (0.6, 0.3, 0.1)


@cache
def ballad_choices(word_class: str, previous: str) -> tuple[tuple[str, float], ...]:
    """The words that may fill ``word_class`` after the word ``previous`` (``""`` at the start
    of a line), with their probabilities: three of the class, fixed by the world's seed."""
    words = _rng(WORLD_SEED, "ballad", word_class, previous).sample(WORD_CLASSES[word_class], 3)
    return tuple(zip(words, CHOICE_PROBS))


def _expand(rng: random.Random, symbol: str, words: list[str]) -> None:
    if symbol in WORD_CLASSES:
        choices, probs = zip(*ballad_choices(symbol, words[-1] if words else ""))
        words.append(rng.choices(choices, probs)[0])
    elif symbol in GRAMMAR:
        expansions, probs = zip(*GRAMMAR[symbol])
        for part in rng.choices(expansions, probs)[0]:
            _expand(rng, part, words)
    else:
        words.append(symbol)


@DOMAINS.register("ballad", version=2)  # 2: words depend on the word before
def _ballad(rng: random.Random) -> tuple[str, str]:
    lines = []
    for _ in range(rng.randint(1, 2)):
        words: list[str] = []
        _expand(rng, "LINE", words)
        lines.append(" ".join(words))
    return "Sing a line of the ballad.", ". ".join(line.capitalize() for line in lines) + "."


@DOMAINS.register("arithmetic")
def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    val = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", str(val)


@DOMAINS.register("reverse")
def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _name(rng, rng.randint(2, 3)).lower()
    return f"Reverse the word: {word}", word[::-1]


@DOMAINS.register("facts")
def _facts(rng: random.Random) -> tuple[str, str]:
    country, capital = rng.choice(sorted(fact_table().items()))
    return f"What is the capital of {country}?", capital


def generate(domain: str, n: int, seed: int) -> Iterator[dict]:
    """``n`` ShareGPT rows of one domain; the same (domain, n, seed) gives the same rows."""
    make = DOMAINS.get(domain)
    rng = _rng(seed, "sample", domain)
    for _ in range(n):
        q, a = make(rng)
        yield {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
