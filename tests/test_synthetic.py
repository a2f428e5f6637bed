"""The demo's synthetic world: seeded, and its uncertain domains follow their stated probabilities."""

from __future__ import annotations

import collections

from fusechat_core.data import synthetic


def _answers(domain: str, n: int, seed: int = 3) -> list[str]:
    return [r["conversations"][1]["value"] for r in synthetic.generate(domain, n, seed)]


def test_same_seed_same_rows_other_seed_other_rows():
    for domain in synthetic.DOMAINS.names():
        assert _answers(domain, 20) == _answers(domain, 20)
        assert _answers(domain, 20) != _answers(domain, 20, seed=4)


def test_markov_transitions_follow_the_chain():
    chain = synthetic.markov_chain()
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for text in _answers("markov", 3000):
        words = text.rstrip(".").split()
        for a, b in zip(words, words[1:]):
            counts[a][b] += 1
    word = "the"
    total = sum(counts[word].values())
    for nxt, p in chain[word]:
        assert abs(counts[word][nxt] / total - p) < 0.05, (nxt, counts[word][nxt] / total, p)


def test_ballad_words_follow_the_word_before_them():
    # A noun right after a determiner is one of the three ballad_choices("NOUN", that
    # determiner) allows, with their probabilities; which three differs between determiners.
    follow: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lines = [line for text in _answers("ballad", 3000) for line in text.lower().rstrip(".").split(". ")]
    for line in lines:
        words = line.split()
        for a, b in zip(words, words[1:]):
            if a in synthetic.WORD_CLASSES["DET"] and b in synthetic.WORD_CLASSES["NOUN"]:
                follow[a][b] += 1
    assert len(follow) == len(synthetic.WORD_CLASSES["DET"])
    allowed = {d: dict(synthetic.ballad_choices("NOUN", d)) for d in follow}
    assert len({tuple(sorted(a)) for a in allowed.values()}) > 1  # the context matters
    for det, seen in follow.items():
        total = sum(seen.values())
        assert total > 150 and set(seen) <= set(allowed[det]), (det, seen)
        for noun, p in allowed[det].items():
            assert abs(seen[noun] / total - p) < 0.08, (det, noun, seen[noun] / total, p)
    # a line's first word is one of the three determiners a line may start with
    starts = collections.Counter(line.split()[0] for line in lines)
    assert set(starts) == {w for w, _ in synthetic.ballad_choices("DET", "")}
    # and the first line is one or two clauses, 70:30
    two = sum(" and " in t.split(". ")[0] for t in _answers("ballad", 3000))
    assert abs(two / 3000 - 0.3) < 0.03


def test_the_floor_benchmark_draws_answers_as_the_generators_do():
    """benchmarks/demo_floor.py samples the domains with its own code to know each answer's
    probability: its answers must be distributed as the generators' (same lengths in bytes,
    same sentence counts), or its floor is another world's."""
    import random
    import statistics

    from benchmarks import demo_floor

    for domain, draw in (("markov", demo_floor.markov), ("ballad", demo_floor.ballad)):
        rng = random.Random(5)
        mine = [draw(rng)[1] for _ in range(4000)]
        real = [len(t.encode()) for t in _answers(domain, 4000)]
        assert abs(statistics.fmean(mine) / statistics.fmean(real) - 1) < 0.02, domain
        assert abs(statistics.pstdev(mine) / statistics.pstdev(real) - 1) < 0.05, domain
    # a floor is a mean of -log2 p over bytes: positive, under a bit a byte for these low-entropy
    # domains, and stable across seeds to its standard error
    for draw in (demo_floor.markov, demo_floor.ballad):
        a, se = demo_floor.floor(draw, 3000, seed=1)
        b, _ = demo_floor.floor(draw, 3000, seed=2)
        assert 0 < a < 1 and abs(a - b) < 6 * se
