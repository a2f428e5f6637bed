"""Vocabulary mapping with the real Mistral v1 / v3 SentencePiece and tekken BPE vocabularies.

Canonical strings are checked against the vocabularies' own native readers
(sentencepiece, mistral-common's Tekkenizer), not against our normalisation
rules; MinED against a brute-force scan of the whole pivot vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusechat_core.align.vocab import EXACT, MINED, UNMAPPED, Vocabulary, build_vocab_map, tokenizer_family, vocabulary
from fusechat_core.models import load_tokenizer


def _data_file(name: str) -> str:
    import mistral_common

    return str(Path(mistral_common.__file__).parent / "data" / name)


@pytest.fixture(scope="module")
def vocabs() -> dict[str, Vocabulary]:
    return {n: vocabulary(load_tokenizer(f"builtin:{n}")) for n in ("mistral-v1", "mistral-v3", "tekken")}


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def test_families_read_from_the_decoder():
    assert tokenizer_family(load_tokenizer("builtin:mistral-v1")) == "sentencepiece"
    assert tokenizer_family(load_tokenizer("builtin:tekken")) == "byte_level"


def test_sentencepiece_canonical_bytes_match_sentencepiece_itself(vocabs):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=_data_file("tokenizer.model.v1"))
    v = vocabs["mistral-v1"]
    assert len(v) == sp.get_piece_size() == 32000
    for i in range(3, 32000):
        piece = sp.id_to_piece(i)
        want = bytes([int(piece[3:5], 16)]) if sp.is_byte(i) else piece.replace("\u2581", " ").encode()
        assert _raw(v.strings[i]) == want, (i, piece)
        assert bool(v.byte_fallback[i]) == sp.is_byte(i)
    assert v.strings[13] == "\n"  # <0x0A>
    assert v.special[:3].all() and not v.special[3:].any()


def test_tekken_canonical_bytes_match_tekkenizer(vocabs):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tk = Tekkenizer.from_file(_data_file("tekken_240718.json"))
    v = vocabs["tekken"]
    assert len(v) == tk.n_words
    first = tk.num_special_tokens
    bad = [i for i in range(first, tk.n_words) if _raw(v.strings[i]) != tk.id_to_byte_piece(i)]
    assert not bad, f"{len(bad)} tokens differ, e.g. id {bad[0]}"
    assert v.special[:first].all() and not v.special[first:].any()


@pytest.mark.parametrize("name", ["mistral-v1", "tekken"])
def test_canonical_strings_spell_the_text(vocabs, name):
    """Concatenated canonical tokens give back the text, byte for byte (partial UTF-8 included)."""
    text = "def f(x):\n\treturn x ** 2  # 3.14159, 1e-9\n\n日本語 😀 café   end"
    tok = load_tokenizer(f"builtin:{name}")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    joined = b"".join(_raw(vocabs[name].strings[i]) for i in ids)
    # SentencePiece prepends one space to the text (its "▁" on the first word)
    assert joined.removeprefix(b" ") == text.encode()


def test_same_tokenizer_maps_to_itself_as_identity(vocabs):
    vm = build_vocab_map(vocabs["mistral-v1"], vocabs["mistral-v1"])
    assert vm.is_identity and vm.stats["identity"]
    assert np.array_equal(vm.ids, np.arange(32000))


def test_v3_ordinary_tokens_map_exactly_onto_v1(vocabs):
    tok3, tok1 = load_tokenizer("builtin:mistral-v3"), load_tokenizer("builtin:mistral-v1")
    vm = build_vocab_map(vocabs["mistral-v3"], vocabs["mistral-v1"])
    added3 = set(tok3.added_tokens_decoder)
    for i in range(len(vm.ids)):
        if i in added3 and tok3.convert_ids_to_tokens(i) not in ("<unk>", "<s>", "</s>"):
            assert vm.kind[i] == UNMAPPED and vm.ids[i] == -1  # control tokens have no pivot counterpart
        else:
            assert vm.kind[i] == EXACT
            assert tok1.convert_ids_to_tokens(int(vm.ids[i])) == tok3.convert_ids_to_tokens(i)
    assert not vm.is_identity  # v3's ids are shifted by its control tokens
    assert vm.stats["unmapped"] == len(added3) - 3


def test_word_start_markers_and_byte_tokens_match_across_families(vocabs):
    tekken, v1 = load_tokenizer("builtin:tekken"), load_tokenizer("builtin:mistral-v1")
    vm = build_vocab_map(vocabs["tekken"], vocabs["mistral-v1"], mapping="exact")
    t_id = {t: i for t, i in tekken.get_vocab().items()}
    p_id = v1.get_vocab()
    assert vm.ids[t_id["ĠHello"]] == p_id["▁Hello"]
    assert vm.ids[t_id["Ċ"]] == p_id["<0x0A>"]  # a newline is a byte token in SentencePiece
    assert vm.ids[t_id["Ġ"]] == p_id["▁"]
    assert vm.ids[t_id["<s>"]] == p_id["<s>"] and vm.kind[t_id["<s>"]] == EXACT
    assert vm.ids[t_id["[INST]"]] == -1  # special, no counterpart
    assert not (vm.kind == MINED).any()


def _lev(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _vocab(strings: list[str], special: list[int] = ()) -> Vocabulary:
    sp = np.zeros(len(strings), bool)
    sp[list(special)] = True
    return Vocabulary(list(strings), sp, np.zeros(len(strings), bool), "sentencepiece")


def test_mined_hand_example_with_tie_break_on_lowest_pivot_id():
    pivot = _vocab(["<s>", " cap", " cat", "dog", "ca"], special=[0])
    source = _vocab(["<s>", " cot", " ca", "dig", "c", "[CTRL]", "zzzzzzzz"], special=[0, 5])
    vm = build_vocab_map(source, pivot)
    # " cot": cap 2, cat 1 -> cat.  " ca": cap 1, cat 1 (tie) -> lowest id, cap (1).
    # "dig": dog 1.  "c": ca 1, " cap"/" cat" 3 -> ca.  "zzzzzzzz": far from all, still the nearest.
    assert vm.ids.tolist()[:5] == [0, 2, 1, 3, 4]
    assert vm.kind.tolist()[:5] == [EXACT, MINED, MINED, MINED, MINED]
    assert vm.distance.tolist()[:5] == [0, 1, 1, 1, 1]
    assert vm.ids[5] == -1 and vm.kind[5] == UNMAPPED  # a control token is never matched by distance
    dists = [_lev("zzzzzzzz", p) for p in pivot.strings[1:]]
    assert vm.distance[6] == min(dists) and vm.ids[6] == 1 + dists.index(min(dists))
    assert build_vocab_map(source, pivot, mapping="exact").kind.tolist() == [EXACT] + [UNMAPPED] * 6
    # normalised threshold: " cot"/" cat" is 1/4 = 0.25, "c"/"ca" is 1/2
    th = build_vocab_map(source, pivot, threshold=0.3)
    assert th.ids[1] == 2 and th.ids[4] == -1


def test_mined_equals_brute_force_on_real_vocabularies(vocabs):
    """The radius-pruned search returns the full scan's minimum and its lowest id."""
    from rapidfuzz.distance import Levenshtein

    pivot, tekken = vocabs["mistral-v1"], vocabs["tekken"]
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(np.arange(1000, len(tekken)), size=60, replace=False).tolist())
    sub = Vocabulary([tekken.strings[i] for i in picked], np.zeros(60, bool), np.zeros(60, bool), "byte_level")
    vm = build_vocab_map(sub, pivot)
    choices = {}
    for i in range(len(pivot)):  # ordinary tokens, the ordinary representative of each string
        if not pivot.special[i]:
            s = pivot.strings[i]
            if s not in choices or (pivot.byte_fallback[choices[s]] and not pivot.byte_fallback[i]):
                choices[s] = i
    ids = sorted(choices.values())
    strings = [pivot.strings[i] for i in ids]
    for k, q in enumerate(sub.strings):
        d = np.array([Levenshtein.distance(q, c) for c in strings])
        best = int(d.min())
        assert vm.distance[k] == best, q
        assert vm.ids[k] == ids[int(np.flatnonzero(d == best)[0])], q
        if best == 0:
            assert vm.kind[k] == EXACT
    assert _lev(sub.strings[0], pivot.strings[int(vm.ids[0])]) == vm.distance[0]


def test_prefix_mapping_puts_a_whole_word_on_the_pivot_piece_that_starts_it(vocabs):
    from fusechat_core.align.vocab import PREFIX

    v1_tok, tekken_tok = load_tokenizer("builtin:mistral-v1"), load_tokenizer("builtin:tekken")
    pivot, source = vocabs["mistral-v1"], vocabs["tekken"]
    vm = build_vocab_map(source, pivot, mapping="prefix", pivot_tokenizer=v1_tok)
    exact = build_vocab_map(source, pivot, mapping="exact")
    # exact matches are the same under both; prefix only replaces (some) MinED choices
    assert np.array_equal(vm.kind == EXACT, exact.kind == EXACT)
    assert np.array_equal(vm.ids[exact.kind == EXACT], exact.ids[exact.kind == EXACT])
    ordinary = np.array([s is not None and not source.special[i] for i, s in enumerate(source.strings)])
    assert set(np.unique(vm.kind[ordinary & (exact.kind != EXACT)])) <= {PREFIX, MINED}
    # MinED's choice, by brute force over the pivot's ordinary tokens (lowest id on ties)
    from rapidfuzz.distance import Levenshtein

    plain = [(i, t) for i, t in enumerate(pivot.strings) if t is not None and not pivot.special[i]]

    def nearest(text: str) -> int:
        return min(plain, key=lambda it: (Levenshtein.distance(text, it[1]), it[0]))[0]

    # by hand: Mistral v1 spells " lantern" as ▁lan + tern and " sings" as ▁s + ings
    for word, first in ((" lantern", "▁lan"), (" sings", "▁s"), (" maiden", "▁maid")):
        sid = tekken_tok.convert_tokens_to_ids("Ġ" + word[1:])
        assert vm.kind[sid] == PREFIX and vm.ids[sid] == v1_tok.convert_tokens_to_ids(first), word
        # MinED picks a whole other word (" later", " sing", " made")
        assert nearest(source.strings[sid]) != vm.ids[sid]
    # every prefix choice is the pivot tokenizer's own first token of that text, mid-word too
    picked = np.flatnonzero(vm.kind == PREFIX)
    sample = picked[np.linspace(0, len(picked) - 1, 300).astype(int)]
    for sid in sample:
        text = source.strings[sid]
        ids = v1_tok("\n" + text, add_special_tokens=False)["input_ids"]
        assert ids[:2] == v1_tok("\n", add_special_tokens=False)["input_ids"][:2]  # '▁', <0x0A>
        assert ids[2] == vm.ids[sid], (text, ids)
    assert vm.stats["prefix"] == len(picked) and vm.stats["prefix"] > 0.5 * len(source)
