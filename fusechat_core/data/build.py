"""The dataset stage: FuseChat-Mixture from a list of sources (SPEC §1.1).

load → normalise → clean (``clean: vicuna``) → drop exact duplicates → sample
``count`` per source (seeded) → hold out a split → cut long conversations into
blocks that fit ``max_length`` under the pivot's tokenizer. Every skipped row
is counted under a reason; the counts go into ``stats.json`` and the log.

Only the pivot's tokenizer counts: the dataset is an input of every stage, so
making it depend on the sources would make adding a source recompute the whole
run. A source that needs more tokens than ``max_length`` for a block gets a cut
view of it at the representation stage (see ``fusechat_core.represent``).

A source that yields no usable row, or loses more than its ``max_skipped_fraction``
of rows as malformed, fails the stage (``DataError``, one line naming the source,
the count and the most common reason): a loader that does not fit its data must
not quietly take a fifth of the mixture with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusechat_core.config import DataConfig, DataSourceSpec, demo_name
from fusechat_core.data import loaders as _loaders  # noqa: F401  (fills LOADERS)
from fusechat_core.data import synthetic
from fusechat_core.data.clean import CLEANERS
from fusechat_core.data.conversation import (
    AUTO_FORMATS,
    GPT,
    HUMAN,
    LOADERS,
    MalformedRow,
    detect_format,
    normalise,
)
from fusechat_core.data.presets import sources_of
from fusechat_core.errors import is_transient
from fusechat_core.store import ArtifactStore, ArtifactWriter, remembered_sha256

log = logging.getLogger("fusechat.data")

TRAIN_FILE, HELDOUT_FILE, STATS_FILE = "train.parquet", "heldout.parquet", "stats.json"

TokenCounter = Callable[[str], int]


class DataError(ValueError):
    """A data source that cannot be read at all (not a single bad row)."""


@dataclass
class SourceStats:
    rows_read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> where its first row is
    repaired: Counter = field(default_factory=Counter)  # rows kept after a repair (normalise), by repair
    cleaned: Counter = field(default_factory=Counter)  # dropped by data.clean, by reason
    duplicates: int = 0
    sampled: int = 0
    asked: int | None = None
    heldout: int = 0
    blocks: int = 0
    split_conversations: int = 0
    too_long: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["skipped"] = dict(sorted(self.skipped.items()))
        d["first_skipped"] = dict(sorted(self.first_skipped.items()))
        d["repaired"] = dict(sorted(self.repaired.items()))
        d["skipped_total"] = sum(self.skipped.values())
        d["cleaned"] = dict(sorted(self.cleaned.items()))
        return d


def check_source(label: str, st: SourceStats, max_skipped_fraction: float) -> None:
    """Fail loudly on a source that yields nothing usable or loses too many rows."""
    skipped = sum(st.skipped.values())
    top = ""
    if st.skipped:
        reason, n = sorted(st.skipped.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        top = f"; most common reason: {reason} ({n} rows, the first: {st.first_skipped.get(reason, '?')})"
    if st.rows_read == 0:
        raise DataError(f"data source {label}: no rows read")
    if skipped == st.rows_read:
        raise DataError(f"data source {label}: no usable row, all {st.rows_read} rows skipped{top}")
    if skipped / st.rows_read > max_skipped_fraction:
        raise DataError(f"data source {label}: {skipped} of {st.rows_read} rows skipped "
                        f"({skipped / st.rows_read:.0%}, more than max_skipped_fraction "
                        f"{max_skipped_fraction:g}){top}")
    if st.kept == 0:
        cleaned = sorted(st.cleaned.items(), key=lambda kv: (-kv[1], kv[0]))
        why = f"; most common cleaning reason: {cleaned[0][0]} ({cleaned[0][1]} rows)" if cleaned else ""
        raise DataError(f"data source {label}: no usable row left of {st.rows_read} after cleaning "
                        f"and de-duplication{why}")


# -- reading raw rows ----------------------------------------------------------

_READ = (".json", ".jsonl", ".parquet")
# what a dataset folder holds besides its rows (the Hub's and ``datasets``' own files)
_NOT_ROWS = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}


def _split_files(path: Path, split: str) -> list[Path]:
    """The files of ``split`` in a dataset folder, by ``datasets``' own rule (the rule a Hub
    repository's files are read by: ``data/train-00000-of-00002.parquet``, ``test.jsonl``,
    ``train/…``; a folder that names no split is all ``train``): a local copy of a Hub dataset
    reads as the Hub would read it, and its test split never joins the training rows."""
    from datasets.data_files import DataFilesDict, get_data_patterns
    from datasets.exceptions import DataFilesNotFoundError

    try:
        found = {str(k): v for k, v in DataFilesDict.from_patterns(get_data_patterns(str(path)),
                                                                   base_path=str(path)).items()}
    except (DataFilesNotFoundError, FileNotFoundError):
        found = {}
    if split not in found:
        named = f"its files name the splits {', '.join(sorted(found))}" if found else "it holds no files"
        raise _field_error("split" if found else "path",
                           f"{path}: no files of split {split!r} ({named}); set split, or data_files")
    files = [Path(f) for f in found[split]]
    kept = sorted(f for f in files if f.suffix in _READ and f.name not in _NOT_ROWS)
    unread = [f for f in files if f.suffix not in _READ and f.name != "README.md"]
    named = ", ".join(str(f.relative_to(path)) for f in unread[:5])
    if not kept:
        raise _field_error("path", f"{path}: no {', '.join(_READ)} files of split {split!r}"
                           + (f" (not read: {named})" if unread else ""))
    if unread:
        log.warning("%s: %d files of split %r not read (only %s files are): %s", path, len(unread), split,
                    "/".join(_READ), named)
    return kept


def _field_error(field: str, message: str) -> DataError:
    """A DataError that says which field of the source it is about (preflight names it)."""
    err = DataError(message)
    err.field = field  # type: ignore[attr-defined]
    return err


def _local_files(path: Path, data_files: str | list[str] | None, split: str = "train") -> list[Path]:
    """The files a local source reads: the one file, the folder's files of ``split``, or those
    ``data_files`` matches. The one rule: the dataset stage and preflight both use it."""
    if data_files is None:
        return _split_files(path, split) if path.is_dir() else [path]
    if not path.is_dir():
        raise _field_error("data_files", f"{path}: data_files selects files inside a folder or hub "
                                         f"repository, not a file")
    files = []
    for pattern in [data_files] if isinstance(data_files, str) else data_files:
        matched = sorted(p for p in path.glob(pattern) if p.is_file())
        if not matched:
            raise _field_error("data_files", f"{path}: data_files {pattern!r} matches no file")
        files += [p for p in matched if p not in files]
    return files


# A source's rows come with where each is: ``chat.jsonl line 12``, ``data.parquet row 7``,
# ``split train index 3``: a skipped row's reason names the first place it was found.
Located = tuple[str, "dict | MalformedRow"]


def _iter_local(path: Path, data_files: str | list[str] | None = None, split: str = "train") -> Iterator[Located]:
    for f in _local_files(path, data_files, split):
        yield from _iter_file(f)


_BOM = b"\xef\xbb\xbf"
# a \uD800-\uDFFF escape: a surrogate, fine in a pair, not text when alone
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _iter_file(f: Path) -> Iterator[Located]:
    """Rows of one local file. A bad JSONL line is a skipped row with its reason
    (``invalid_utf8``, ``invalid_json``, ``too_deep``); a whole-JSON or Parquet file that
    cannot be read at all is a ``DataError`` naming the file."""
    if f.suffix == ".parquet":
        yield from ((f"{f.name} row {i}", row) for i, row in enumerate(_iter_parquet(f), 1))
        return
    if f.suffix == ".json" and _starts_an_array(f):
        raw = f.read_bytes()
        raw = raw[len(_BOM):] if raw.startswith(_BOM) else raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise DataError(f"{f}: not valid UTF-8 (line {line}, byte {exc.start})") from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{f}: not valid JSON (line {exc.lineno})") from None
        except RecursionError:
            raise DataError(f"{f}: JSON nested too deeply to read") from None
        escapes = _SURROGATE_ESCAPE.search(raw) is not None
        for i, row in enumerate(rows, 1):
            where = f"{f.name} item {i}"
            if not isinstance(row, dict):
                yield where, MalformedRow("row_not_an_object")
            elif escapes and not _is_text(row):
                yield where, MalformedRow("invalid_utf8")
            else:
                yield where, row
        return
    # Line by line, never the whole file (a multi-GB ShareGPT dump); a binary file splits at
    # b"\n" only, not at U+2028 and friends, which may sit inside a JSON string
    with open(f, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if n == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            if line.strip():
                yield f"{f.name} line {n}", _json_line(line)


def _starts_an_array(f: Path) -> bool:
    """Whether a .json file holds one JSON array (read whole) rather than JSON lines."""
    with open(f, "rb") as fh:
        head = fh.read(len(_BOM))
        if head != _BOM:
            fh.seek(0)
        while chunk := fh.read(1 << 16):
            if chunk := chunk.lstrip():
                return chunk.startswith(b"[")
    return False


def _json_line(line: bytes) -> dict | MalformedRow:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return MalformedRow("invalid_utf8")  # never kept as U+FFFD: that would be other text
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return MalformedRow("invalid_json")
    except RecursionError:
        return MalformedRow("too_deep")
    if not isinstance(row, dict):
        return MalformedRow("row_not_an_object")
    try:
        if _SURROGATE_ESCAPE.search(line) and not _is_text(row):
            return MalformedRow("invalid_utf8")
    except RecursionError:
        return MalformedRow("too_deep")
    return row


def _is_text(row: dict) -> bool:
    """Every string in the row encodes to UTF-8 (a lone \\udXXX escape decodes to a surrogate that does not)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iter_parquet(f: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{f}: not a readable Parquet file ({first})") from None


def _iter_hub(spec: DataSourceSpec) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, spec.subset, data_files=spec.data_files, split=spec.split,
                                   revision=spec.revision)
    except Exception as exc:  # datasets' own errors name the repo at best, never our source
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err = DataError(f"{spec.path}: cannot be loaded from the Hugging Face Hub "
                        f"({type(exc).__name__}: {first})".replace(": )", ")"))
        err.transient = is_transient(exc)  # a network error is still worth a retry
        raise err from exc
    yield from ((f"split {spec.split} index {i}", row) for i, row in enumerate(ds))


def iter_rows(spec: DataSourceSpec, seed: int) -> Iterator[Located]:
    """The source's raw rows, each with where it is (``Located``); a source that cannot be
    read fails in one line naming it."""
    try:
        yield from _iter_source(spec, seed)
    except DataError as exc:
        err = DataError(f"data source {spec.label}: {exc}")
        if isinstance(getattr(exc, "transient", None), bool):
            err.transient = exc.transient
        raise err from exc.__cause__  # a Hub error's own traceback stays in the log


def _iter_source(spec: DataSourceSpec, seed: int) -> Iterator[Located]:
    domain = demo_name(spec.path)
    if domain is not None:
        yield from ((f"row {i}", row) for i, row in enumerate(synthetic.generate(domain, spec.count or 1000, seed)))
    elif spec.local:
        yield from _iter_local(Path(spec.path), spec.data_files, spec.split)
    else:
        yield from _iter_hub(spec)


# -- what a local source's files were: their bytes --------------------------------

def local_source_files(spec: DataSourceSpec) -> list[list] | None:
    """Each file a local source reads (its path under the source's, its size, its sha256), as
    the dataset records them: the address holds the source's path only, and a run whose files
    changed since refuses to start (``data.changed_local_sources``). None for a Hub or demo
    source, or one whose files cannot be listed (the stage says why)."""
    if not spec.local:
        return None
    path = Path(spec.path)
    try:
        files = _local_files(path, spec.data_files, spec.split)
    except (DataError, OSError):
        return None
    return [[str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size, remembered_sha256(f)]
            for f in files]


# How the files of a local folder without data_files are chosen: 2, those of the source's
# split by ``datasets``' rule (1: every .json/.jsonl/.parquet file, a test split included).
# Only datasets read from such a folder carry it, so only they are made again.
FOLDER_READER_VERSION = 2


def reader_versions(specs: Iterable[DataSourceSpec], clean: str | None) -> dict[str, dict[str, int]]:
    """The versions (past the first) of the code that turns these sources into rows, by kind:
    the synthetic domain of a ``demo:`` source, the loader of any other (for ``format: auto``,
    every loader it may choose), the cleaner, the choice of a local folder's files. The dataset's address carries them
    (``RunPlan.dataset``): a change to one of them moves only the datasets it reads."""
    specs = list(specs)
    demo = [name for s in specs if (name := demo_name(s.path)) is not None]
    formats = [f for s in specs if demo_name(s.path) is None
               for f in (AUTO_FORMATS if s.format == "auto" else (s.format,))]
    out = {"domain": synthetic.DOMAINS.versions(demo), "loader": LOADERS.versions(formats),
           "cleaner": CLEANERS.versions([clean] if clean else [])}
    if any(s.local and s.data_files is None and Path(s.path).is_dir() for s in specs):
        out["folder"] = {"files of a split": FOLDER_READER_VERSION}
    return out



def conversation_key(conv: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(conv, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _seeded(seed: int, *parts: str) -> random.Random:
    return random.Random(int(hashlib.sha256(":".join([str(seed), *parts]).encode()).hexdigest()[:16], 16))


# -- splitting long conversations ---------------------------------------------

def split_blocks(conv: list[dict[str, str]], max_length: int, count: TokenCounter,
                 overhead: int) -> tuple[list[list[dict[str, str]]], int]:
    """Cut a conversation at exchange boundaries into blocks of at most ``max_length`` tokens.

    Returns (blocks, exchanges dropped because one alone is longer than max_length).
    """
    exchanges = [conv[i:i + 2] for i in range(0, len(conv), 2)]
    blocks: list[list[dict[str, str]]] = []
    current: list[dict[str, str]] = []
    used = 0
    dropped = 0
    for ex in exchanges:
        n = sum(count(t["value"]) + overhead for t in ex)
        if n > max_length:
            dropped += 1
            if current:
                blocks.append(current)
            current, used = [], 0
            continue
        if used + n > max_length and current:
            blocks.append(current)
            current, used = [], 0
        current = current + ex
        used += n
    if current:
        blocks.append(current)
    return blocks, dropped


def token_counter(tokenizers: Iterable[Any]) -> TokenCounter:
    """Length under the given tokenizers (the stage gives the pivot's only): the longest."""
    toks = list(tokenizers)

    def count(text: str) -> int:
        if not toks:
            return len(text.encode()) // 3 + 1  # no tokenizer: a conservative bytes estimate
        return max(len(t(text, add_special_tokens=False)["input_ids"]) for t in toks)

    return count


# -- the stage -----------------------------------------------------------------

@dataclass
class Mixture:
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    stats: dict[str, Any]


def _add_training_blocks(train: list[dict[str, Any]], st: SourceStats, label: str, i: int,
                         conv: list[dict[str, str]], cfg: DataConfig, count: TokenCounter) -> None:
    """Conversation ``i`` of source ``label`` as training rows: one per block of at most
    ``max_length`` pivot tokens (``split_blocks``)."""
    blocks, dropped = split_blocks(conv, cfg.max_length, count, cfg.template_overhead)
    st.too_long += dropped
    st.split_conversations += len(blocks) > 1
    for b, block in enumerate(blocks):
        train.append({"id": f"{label}-{i:06d}-{b}", "source": label, "conversations": block})
        st.blocks += 1


def build_mixture(cfg: DataConfig, seed: int, count: TokenCounter,
                  progress: Callable[[str], None] | None = None) -> Mixture:
    seen: set[str] = set()
    clean = CLEANERS.get(cfg.clean) if cfg.clean else None
    per_source: dict[str, SourceStats] = {}
    train: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    for spec in sources_of(cfg):
        label = spec.label
        if label in per_source:
            raise DataError(f"data.sources: two sources named {label!r}; give them distinct names")
        st = per_source[label] = SourceStats(asked=spec.count)
        if spec.format != "auto" and spec.format not in LOADERS:
            raise DataError(f"data source {label}: format {spec.format!r} unknown "
                            f"(known: auto, {', '.join(LOADERS.names())})")
        convs: list[list[dict[str, str]]] = []
        for where, row in iter_rows(spec, seed):
            st.rows_read += 1
            try:
                if isinstance(row, MalformedRow):
                    raise row
                fmt = spec.format if spec.format != "auto" else detect_format(row)
                fixes: Counter = Counter()
                conv = normalise(LOADERS.get(fmt)(row), fixes)
                st.repaired.update(fixes)  # only rows kept: a repaired row may still be malformed
            except MalformedRow as bad:
                st.skipped[bad.reason] += 1
                st.first_skipped.setdefault(bad.reason, where)
                continue
            dropped = clean(conv) if clean else None
            if dropped is not None:
                st.cleaned[dropped] += 1
                continue
            key = conversation_key(conv)
            if cfg.dedupe and key in seen:
                st.duplicates += 1
                continue
            seen.add(key)
            convs.append(conv)
        st.kept = len(convs)
        for reason, n in sorted(st.skipped.items()):
            log.warning("data source %s: skipped %d malformed rows (%s; the first: %s)", label, n, reason,
                        st.first_skipped[reason])
        for repair, n in sorted(st.repaired.items()):
            log.info("data source %s: repaired %d rows (%s)", label, n, repair)
        for reason, n in sorted(st.cleaned.items()):
            log.info("data source %s: cleaning dropped %d conversations (%s)", label, n, reason)
        check_source(label, st, spec.max_skipped_fraction)
        rng = _seeded(seed, "sample", label)
        if spec.count is not None and spec.count < len(convs):
            idx = sorted(rng.sample(range(len(convs)), spec.count))
            convs = [convs[i] for i in idx]
        st.sampled = len(convs)
        n_held = int(round(len(convs) * cfg.heldout_fraction))
        held_idx = set(_seeded(seed, "heldout", label).sample(range(len(convs)), n_held)) if n_held else set()
        st.heldout = len(held_idx)
        for i, conv in enumerate(convs):
            if i in held_idx:
                heldout.append({"id": f"{label}-{i:06d}", "source": label, "conversations": conv})
            else:
                _add_training_blocks(train, st, label, i, conv, cfg, count)
        if progress:
            progress(f"{label}: {st.rows_read} rows read, {st.sampled} sampled, "
                     f"{sum(st.skipped.values())} malformed skipped, {sum(st.cleaned.values())} cleaned out")
        if spec.count is not None and st.kept < spec.count:
            log.warning("data source %s: asked for %d conversations, only %d usable", label, spec.count, st.kept)
    if cfg.heldout_max is not None and len(heldout) > cfg.heldout_max:
        # The conversations over the cap were sampled into the mixture like the rest: they
        # train, where they would otherwise be in neither split.
        keep = set(_seeded(seed, "heldout-cap").sample(range(len(heldout)), cfg.heldout_max))
        for j, h in enumerate(heldout):
            if j not in keep:
                st = per_source[h["source"]]
                st.heldout -= 1
                _add_training_blocks(train, st, h["source"], int(h["id"].rsplit("-", 1)[1]), h["conversations"],
                                     cfg, count)
        heldout = [h for j, h in enumerate(heldout) if j in keep]
    for label, st in per_source.items():
        _check_lengths(label, st, cfg.max_length)
    # A fixed, seeded order: training reads rows in this order, so it is part of the result.
    _seeded(seed, "shuffle").shuffle(train)
    stats = {
        "train": len(train),
        "heldout": len(heldout),
        "skipped_total": sum(sum(s.skipped.values()) for s in per_source.values()),
        "cleaned_total": sum(sum(s.cleaned.values()) for s in per_source.values()),
        "duplicates_total": sum(s.duplicates for s in per_source.values()),
        "sources": {k: v.as_dict() for k, v in per_source.items()},
    }
    if not train:
        raise DataError("the mixture has no training block: every conversation was held out")
    return Mixture(train, heldout, stats)


def _check_lengths(label: str, st: SourceStats, max_length: int) -> None:
    """Say what ``data.max_length`` cost a source; fail one it left without a training block
    (a source of long answers under a short ``max_length`` read as a success before)."""
    if st.too_long:
        log.warning("data source %s: %d exchanges (a user turn and its answer) longer than data.max_length "
                    "(%d pivot tokens) left out of training; %d conversations split into blocks", label,
                    st.too_long, max_length, st.split_conversations)
    if st.blocks == 0 and st.too_long:
        raise DataError(f"data source {label}: no training block: all {st.too_long} exchanges of its "
                        f"{st.sampled - st.heldout} training conversations are longer than data.max_length "
                        f"({max_length} pivot tokens)")


def write_mixture(writer: ArtifactWriter, mix: Mixture) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in ((TRAIN_FILE, mix.train), (HELDOUT_FILE, mix.heldout)):
            local = Path(tmp) / name
            _to_dataset(rows).to_parquet(str(local), batch_size=ROW_GROUP_ROWS)
            writer.put_file(name, local)
    writer.write_json(STATS_FILE, mix.stats)


def _to_dataset(rows: list[dict[str, Any]]):
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
    })
    if not rows:  # from_list cannot infer columns from nothing: an empty split is still a valid file
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    return datasets.Dataset.from_list(rows, features=features)


# Rows per Parquet row group of a split: a shard's task reads only the groups its rows are in.
ROW_GROUP_ROWS = 1024


def _split_file(store: ArtifactStore, address: str, split: str) -> Any:
    """The split's Parquet file, local: the store's own on file://, else copied once per node
    into the fetch cache (each of a run's shard tasks streamed all of it from S3 before: 64
    shards x 3 models read a 300 MB split 192 times), verified against the manifest."""
    import pyarrow.parquet as pq

    name = {"train": TRAIN_FILE, "heldout": HELDOUT_FILE}[split]
    return pq.ParquetFile(store.fetch(address) / name)


def split_size(store: ArtifactStore, address: str, split: str = "train") -> int:
    """How many rows a split of a built dataset artifact has (its file's footer alone)."""
    return _split_file(store, address, split).metadata.num_rows


def split_table(store: ArtifactStore, address: str, split: str = "train", columns: list[str] | None = None,
                rows: range | None = None) -> Any:
    """A split of a built dataset artifact as an Arrow table, in its stored order; ``rows``:
    only that span, read from the row groups it is in (a shard's). At 95k+ conversations,
    every shard's task held the whole split before slicing its own rows from it."""
    pf = _split_file(store, address, split)
    if rows is None:
        return pf.read(columns=columns)
    groups, first, at = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if at < rows.stop and at + n > rows.start and len(rows):
            groups.append(g)
            first = at if first is None else first
        at += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns) if columns else pf.schema_arrow.empty_table()
    return pf.read_row_groups(groups, columns=columns).slice(rows.start - first, len(rows))


def read_split(store: ArtifactStore, address: str, split: str = "train", rows: range | None = None
               ) -> list[dict[str, Any]]:
    """Rows of a built dataset artifact, in their stored order; ``rows``: only these (a span)."""
    return split_table(store, address, split, rows=rows).to_pylist()


__all__ = [
    "GPT", "HUMAN", "DataError", "Mixture", "build_mixture", "read_split", "split_blocks", "split_size", "split_table",
    "token_counter", "write_mixture", "sources_of",
]
