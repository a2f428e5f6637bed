"""The demo's uncertain domains: how good can a model be? (issue 18)

``markov`` and ``ballad`` are drawn from known probabilities (``fusechat_core/data/
synthetic.py``), so the best any model can do on them, its expected bits per UTF-8 byte of
the answer, is the generator's entropy: the mean of ``-log2 p(answer)`` over answers it draws,
divided by their mean length in bytes. Each answer's probability is that of the choices that
made it (both domains are unambiguous: the answer determines the choices). This script draws
the answers with its own sampler of the world's tables (``markov_chain()``, ``GRAMMAR``,
``ballad_choices``) and
the generators' lengths (12-24 Markov steps, 1 or 2 ballad lines, uniform), a second
implementation of the generators' structure, and prints each floor with its Monte Carlo
standard error.

A model's held-out BPB on the domain (``report.json``) compares directly: a gap to the expert
exists only while the baseline is above the floor by more than the expert is.

    python benchmarks/demo_floor.py [--samples 20000]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusechat_core.data.synthetic import _WORDS, GRAMMAR, WORD_CLASSES, ballad_choices, markov_chain  # noqa: E402

MARKOV_STEPS = (12, 24)  # synthetic._markov: rng.randint(12, 24) words after the prompt's
BALLAD_LINES = (1, 2)  # synthetic._ballad: rng.randint(1, 2) lines


def _choose(rng: random.Random, options: list[tuple]) -> tuple[object, float]:
    values, probs = zip(*options)
    k = rng.choices(range(len(values)), probs)[0]
    return values[k], -math.log2(probs[k])


def markov(rng: random.Random) -> tuple[float, int]:
    chain = markov_chain()
    words = [rng.choice(_WORDS)]  # the prompt's word: given, not predicted
    n = rng.randint(*MARKOV_STEPS)
    bits = math.log2(MARKOV_STEPS[1] - MARKOV_STEPS[0] + 1)  # where the story ends
    for _ in range(n):
        word, b = _choose(rng, chain[words[-1]])
        words.append(word)
        bits += b
    return bits, len((" ".join(words[1:]) + ".").encode())


def _expand(rng: random.Random, symbol: str, words: list[str]) -> float:
    if symbol in WORD_CLASSES:  # a word of the class, among the three its predecessor allows
        word, bits = _choose(rng, list(ballad_choices(symbol, words[-1] if words else "")))
        words.append(word)
        return bits
    if symbol not in GRAMMAR:
        words.append(symbol)
        return 0.0
    expansion, bits = _choose(rng, GRAMMAR[symbol])
    return bits + sum(_expand(rng, part, words) for part in expansion)


def ballad(rng: random.Random) -> tuple[float, int]:
    n = rng.randint(*BALLAD_LINES)
    bits = math.log2(BALLAD_LINES[1] - BALLAD_LINES[0] + 1)
    lines = []
    for _ in range(n):
        words: list[str] = []
        bits += _expand(rng, "LINE", words)
        lines.append(" ".join(words))
    return bits, len((". ".join(line.capitalize() for line in lines) + ".").encode())


def floor(draw, samples: int, seed: int) -> tuple[float, float]:
    """Bits per byte (ratio of means) and its standard error (delta method)."""
    rng = random.Random(seed)
    bits, size = zip(*(draw(rng) for _ in range(samples)))
    mb, ms = statistics.fmean(bits), statistics.fmean(size)
    ratio = mb / ms
    resid = [b - ratio * s for b, s in zip(bits, size)]
    return ratio, statistics.pstdev(resid) / (ms * math.sqrt(samples))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, draw in (("markov", markov), ("ballad", ballad)):
        bpb, se = floor(draw, args.samples, args.seed)
        print(f"{name}_floor_bpb: {bpb:.4f}")
        print(f"{name}_floor_bpb_stderr: {se:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
