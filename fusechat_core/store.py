"""The one artifact store: every stage's output lives here, under its address.

An artifact is a folder ``<root>/<address>/`` holding data files and, written
last, ``MANIFEST.json`` (file list, sizes, sha256). Readers trust nothing
without a manifest, so a writer killed at any moment leaves an artifact that
reads as missing and is recomputed. Writing first removes any old manifest, so
an artifact being rewritten is never mistaken for a complete one.

One writer per artifact: a writer holds a lease, ``<address>/.lease`` in the store
itself (see :class:`Lease`), renewed while it works; a second writer waits for it and
then fails with one line naming the holder, and a writer that lost its lease (it
expired, another writer took it over after a crash) can never commit: the lease is
checked before every file and before the manifest, and the manifest is written only
if absent (a local hard link; an S3 PUT with ``If-None-Match: *``).

Nothing read is trusted either (``check``, ``open``, ``fetch``):

- every read verifies the bytes against the manifest's sha256: ``open`` hashes while
  the caller reads (the rest of the file at close, if the caller skipped some), ``fetch``
  hashes each file as it copies it, or, on a local store whose folder it returns, once
  when it hands the folder out (a process does not hash the same unchanged file twice).
  A mismatch raises ``DamagedArtifact`` and forgets the artifact's verification, so the
  next completeness check re-hashes it, finds the damage and the artifact is recomputed;
- completeness (``check``/``is_complete``, what a Prefect cache hit rests on) is cheap
  and honest: the manifest must be well-formed and name only paths inside its artifact,
  every file must be there with its size, and every file must match the *verified
  marker* (``.verified.json``: the manifest's digest and each file's stat identity —
  size, mtime and ctime on a local store, size and ETag from one listing on S3 — taken
  when the file was last hashed: by its writer at commit, or by a re-hash). A file whose
  identity changed since is re-hashed then, so a rewritten or touched byte is found
  before any stage trusts it; damage that keeps a file's size, mtime and ctime (bit rot)
  is found by the reader's own hash, or by ``check(verify=True)``;
- ``state`` says ``damaged`` (committed, but a file is missing, short or wrong, or the
  manifest is malformed or names a path outside its artifact) apart from ``missing``.

The root is an fsspec URL: ``file://...`` (the default) or ``s3://bucket/prefix``
through s3fs. S3 credentials come only from the environment (``AWS_*``), the
endpoint from ``FUSECHAT_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``): nothing
secret is ever part of a URL, a config or a log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec

from fusechat_core import stopping
from fusechat_core.errors import s3_answer

log = logging.getLogger("fusechat.store")

MANIFEST = "MANIFEST.json"
LEASE = ".lease"
VERIFIED = ".verified.json"  # the verified marker: not part of the artifact, never in its manifest
_CHUNK = 8 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A writer's temporary file: ``<file>.tmp-<host>-<pid>-<thread>``.
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TMP = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-(?P<tid>\d+)$")
_FETCH_LOCKS: dict[str, threading.Lock] = {}  # a fetch's destination folder -> its lock (``fetch``)
_FETCH_LOCKS_LOCK = threading.Lock()
_UPLOADS_UNLISTED: set[str] = set()  # buckets where listing multipart uploads is refused (warned once)
STALE_TMP_S = 3600  # a temporary file nobody has written for this long belongs to a dead writer


class StoreError(RuntimeError):
    """A store operation failed; the message is one line naming what and where."""


class LeaseError(StoreError):
    """Another writer holds the artifact's lease, or this writer lost it."""


class DamagedArtifact(StoreError):
    """An artifact's bytes do not match its manifest; it is recomputed on the next run."""

    def __init__(self, address: str, reason: str):
        super().__init__(f"artifact {address!r} is damaged: {reason}; it is recomputed on the next run")
        self.address, self.reason = address, reason


# Bytes verified by this process: (path, size, mtime_ns, ctime_ns, sha256). A file that
# was hashed and has not changed since is not hashed again by the same process.
_VERIFIED_READS: set[tuple] = set()
_VERIFIED_LOCK = threading.Lock()
# Seconds this process spent hashing what it read (the benchmarks report the share).
VERIFY_SECONDS = [0.0]


def _stat_key(path: str | Path) -> tuple:
    st = os.stat(path)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _info_identity(scheme: str, info: dict[str, Any]) -> tuple:
    """A file's identity from fsspec's info: size and ETag on S3, size and time elsewhere."""
    if scheme == "s3":
        return (int(info.get("size", -1)), str(info.get("ETag", "")))
    return (int(info.get("size", -1)), str(info.get("created", info.get("mtime", ""))))


def cache_root() -> Path:
    """This node's local cache (``FUSECHAT_CACHE``): fetched artifacts by manifest digest, and
    the tokenizers ``models.cache_dir`` builds."""
    return Path(os.environ.get("FUSECHAT_CACHE", Path(tempfile.gettempdir()) / "fusechat-cache"))


def sha256_file(path: str | Path) -> str:
    """sha256 of a local file, read in chunks; the time goes to ``VERIFY_SECONDS``."""
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    VERIFY_SECONDS[0] += time.perf_counter() - t0
    return h.hexdigest()


def _verified_record(man: Manifest, ids: dict[str, tuple]) -> str:
    """What a verified marker holds (an artifact's ``.verified.json``, a fetched copy's
    ``.complete``): the manifest's digest and each file's identity when it matched."""
    return json.dumps({"digest": man.digest, "files": {k: list(v) for k, v in sorted(ids.items())}})


@contextlib.contextmanager
def _node_lock(dest: Path) -> Iterator[None]:
    """One process of this node at a time copies (or checks) the fetch-cache folder ``dest``."""
    import fcntl

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _copy_is_whole(dest: Path, done: Path, man: Manifest) -> bool:
    """Whether the fetched copy at ``dest`` is the artifact of ``man``, every file verified: by
    the stat identity ``.complete`` recorded when the copy was verified, else by hashing it."""
    try:
        record = json.loads(done.read_text())
    except ValueError:
        record = done.read_text()  # an older version's marker: the digest alone
    if not isinstance(record, dict):
        record = {"digest": record, "files": {}}
    if record.get("digest") != man.digest:
        return False
    seen = record.get("files") or {}
    for e in man.files:
        path = dest / e.path
        if not path.is_file():
            return False
        key = _stat_key(path)
        if seen.get(e.path) == list(key[1:]):
            with _VERIFIED_LOCK:
                _VERIFIED_READS.add(key + (e.sha256,))
            continue
        if not verify_local_file(path, e.sha256):
            return False
    return True


_DIGESTS: dict[tuple, str] = {}  # stat identity -> sha256, this process


def remembered_sha256(path: str | Path) -> str:
    """A local file's sha256, hashed once while the file is unchanged (its ``_stat_key``):
    remembered in this process and in the node's cache (``cache_root``), so asking again (every
    ``status``, every run's start) costs a stat, not a read of gigabytes."""
    key = _stat_key(Path(path).resolve())
    if key in _DIGESTS:
        return _DIGESTS[key]
    note = cache_root() / "file-digests" / hashlib.sha256(key[0].encode()).hexdigest()[:32]
    try:
        found = json.loads(note.read_text())
        if tuple(found["key"]) == key:
            _DIGESTS[key] = found["sha256"]
            return found["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    _DIGESTS[key] = digest
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=note.parent, prefix=".new-")
        with open(fd, "w") as fh:
            json.dump({"key": list(key), "sha256": digest}, fh)
        Path(tmp).replace(note)
    except OSError as exc:  # a read-only cache: hashed again next time, nothing wrong with the digest
        log.debug("file digest of %s not remembered: %s", path, exc)
    return digest


def verify_local_file(path: str | Path, sha256: str) -> bool:
    """Whether a local file's bytes have this sha256 (remembered while the file is unchanged)."""
    key = _stat_key(path) + (sha256,)
    with _VERIFIED_LOCK:
        if key in _VERIFIED_READS:
            return True
    if sha256_file(path) != sha256 or _stat_key(path) + (sha256,) != key:
        return False
    with _VERIFIED_LOCK:
        _VERIFIED_READS.add(key)
    return True


@dataclass(frozen=True)
class Check:
    """What ``ArtifactStore.check`` found: ``done``, ``damaged`` (with why) or ``missing``."""

    state: str
    reason: str = ""
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return self.state == "done"


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    address: str
    files: tuple[FileEntry, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    @property
    def digest(self) -> str:
        """Content digest: changes iff some file's bytes change."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
        return h.hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(
            {
                "address": self.address,
                "digest": self.digest,
                "created": self.created,
                "files": [f.__dict__ for f in self.files],
                "meta": self.meta,
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and check a manifest: ValueError naming the fault when it is malformed or
        names a file outside its artifact (absolute, ``..``, the manifest itself)."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or not isinstance(raw.get("address"), str) \
                or not isinstance(raw.get("files"), list) or not isinstance(raw.get("meta", {}), dict):
            raise ValueError("not a manifest (address, files, meta)")
        files, seen = [], set()
        for f in raw["files"]:
            if not isinstance(f, dict) or set(f) != {"path", "size", "sha256"}:
                raise ValueError(f"file entry {str(f)[:80]!r} is not {{path, size, sha256}}")
            rel, size, sha = f["path"], f["size"], f["sha256"]
            parts = rel.split("/") if isinstance(rel, str) else [""]
            if any(p in ("", ".", "..") for p in parts) or "\\" in rel or rel in (MANIFEST, VERIFIED):
                raise ValueError(f"file {str(rel)[:80]!r} is not a path inside the artifact")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"file {rel!r}: size {size!r} is not a byte count")
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise ValueError(f"file {rel!r}: sha256 {str(sha)[:80]!r} is not a sha256")
            if rel in seen:
                raise ValueError(f"file {rel!r} is listed twice")
            seen.add(rel)
            files.append(FileEntry(rel, size, sha))
        created = raw.get("created", 0.0)
        return cls(
            address=raw["address"],
            files=tuple(files),
            meta=raw.get("meta", {}),
            created=created if isinstance(created, (int, float)) else 0.0,
        )


def human_size(n: int | None) -> str:
    """A byte count for people: ``954 B``, ``19.3 MB``; ``-`` when unknown."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def s3_storage_options() -> dict[str, Any]:
    """s3fs options from the environment; credentials stay in the environment."""
    endpoint = os.environ.get("FUSECHAT_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict[str, Any] = {}
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def _describe_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


class ArtifactStore:
    """Artifacts under one fsspec root. Thread-safe for distinct addresses."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if "://" not in url:
            url = "file://" + str(Path(url).resolve())
        self.url = url.rstrip("/")
        self.scheme = self.url.split("://", 1)[0]
        if self.scheme == "file":
            self.root = str(Path(self.url[len("file://"):]).expanduser().resolve())
            self.fs = fsspec.filesystem("file", auto_mkdir=True)
        elif self.scheme == "s3":
            from fusechat_core.config import s3_bucket_problem

            if problem := s3_bucket_problem(self.url):
                raise StoreError(problem)
            self.root = self.url[len("s3://"):]
            opts = {**s3_storage_options(), **(storage_options or {})}
            # No listing cache: another process (a worker, a rerun) may have
            # written since we last looked, and a stale listing would hide it.
            opts.setdefault("use_listings_cache", False)
            # A fresh client: credentials are read from the environment as it is now.
            opts.setdefault("skip_instance_cache", True)
            self.fs = fsspec.filesystem("s3", **opts)
        elif self.scheme == "memory":
            self.root = "/" + self.url[len("memory://"):].strip("/")
            self.fs = fsspec.filesystem("memory")
        else:
            raise StoreError(f"store {self.url}: unsupported scheme {self.scheme!r}")

    # -- paths -------------------------------------------------------------
    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0] if self.scheme == "s3" else self.root

    def _path(self, address: str, rel: str = "") -> str:
        address = address.strip("/")
        if not address or ".." in address.split("/") or ".." in rel.split("/"):
            raise StoreError(f"invalid artifact address {address!r}/{rel!r}")
        p = f"{self.root}/{address}"
        return f"{p}/{rel}" if rel else p

    def uri(self, address: str, rel: str = "") -> str:
        return f"{self.scheme}://{self._path(address, rel)}"

    def _wrap(self, what: str, address: str) -> contextlib.AbstractContextManager:
        store = self

        class _Ctx(contextlib.AbstractContextManager):
            def __exit__(self, typ, exc, tb):
                if exc is None or isinstance(exc, StoreError) or not isinstance(exc, Exception):
                    return False
                where = f"bucket {store.bucket!r}" if store.scheme == "s3" else store.root
                raise StoreError(
                    f"store {what} of {address!r} failed ({where}): {_describe_error(exc)}"
                ) from exc

        return _Ctx()

    # -- reading -----------------------------------------------------------
    def _read_manifest(self, address: str) -> tuple[Manifest | None, str]:
        """(manifest, "") or (None, why): "" when there is none, else what is wrong with it."""
        path = self._path(address, MANIFEST)
        with self._wrap("read", address):
            try:
                with self.fs.open(path, "rb") as fh:
                    text = fh.read()
            except FileNotFoundError:
                return None, ""
        try:
            man = Manifest.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            return None, f"malformed manifest: {str(exc)[:160] or type(exc).__name__}"
        if man.address.strip("/") != address.strip("/"):
            return None, f"its manifest is {man.address!r}'s"
        return man, ""

    def manifest(self, address: str) -> Manifest | None:
        """The artifact's manifest, or None when it is missing, unreadable or malformed."""
        return self._read_manifest(address)[0]

    def _identities(self, address: str, man: Manifest) -> dict[str, tuple]:
        """Each present file's stat identity (``_identity``); on S3 from one listing."""
        if self.scheme == "s3":  # one listing: sizes and ETags of every object of the artifact
            base = self._path(address)
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                found = {}
            wanted = {f"{base}/{e.path}" for e in man.files}
            return {p[len(base) + 1:]: _info_identity(self.scheme, info) for p, info in found.items() if p in wanted}
        ids = {entry.path: self._identity(address, entry.path) for entry in man.files}
        return {rel: ident for rel, ident in ids.items() if ident is not None}

    def _identity(self, address: str, rel: str) -> tuple | None:
        """One file's stat identity, (size, ...) whose change means its bytes may have; None
        when it is not there."""
        path = self._path(address, rel)
        try:
            if self.scheme == "file":
                st = os.stat(path)
                return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            return _info_identity(self.scheme, self.fs.info(path))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _marker(self, address: str) -> dict[str, Any]:
        try:
            with self.fs.open(self._path(address, VERIFIED), "rb") as fh:
                raw = json.loads(fh.read())
            return raw if isinstance(raw, dict) else {}
        except Exception:  # no marker, or an unreadable one: nothing is taken as verified
            return {}

    def _mark_verified(self, address: str, man: Manifest, ids: dict[str, tuple]) -> None:
        """Record that these files, with these identities, matched the manifest (best effort:
        a store we may not write to just re-hashes next time)."""
        text = _verified_record(man, ids)
        path = self._path(address, VERIFIED)
        with contextlib.suppress(Exception):
            if self.scheme == "file":
                tmp = f"{path}.tmp-{_HOST}-{os.getpid()}-{threading.get_ident()}"
                with open(tmp, "w") as fh:
                    fh.write(text)
                os.replace(tmp, path)
            else:
                with self.fs.open(path, "wb") as fh:
                    fh.write(text.encode())

    def _forget_verified(self, address: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.rm(self._path(address, VERIFIED))

    def check(self, address: str, *, verify: bool = False) -> Check:
        """``done``, ``damaged`` or ``missing`` (no manifest: never committed, or being written).

        ``done``: the manifest is well-formed and names only files inside the artifact, each
        is there with its size, and each matches the verified marker (see the module's
        docstring) or, where it does not, is re-hashed now and matches. ``verify=True``
        re-hashes every file whatever the marker says (``status --verify``).
        """
        with self._wrap("check", address):
            man, why = self._read_manifest(address)
            if man is None:
                return Check("damaged", why) if why else Check("missing")
            ids = self._identities(address, man)
            for entry in man.files:
                if entry.path not in ids:
                    return Check("damaged", f"{entry.path} is missing", man)
                if ids[entry.path][0] != entry.size:
                    return Check("damaged", f"{entry.path} has {ids[entry.path][0]} bytes, its manifest says "
                                            f"{entry.size}", man)
            marker = {} if verify else self._marker(address)
            seen = marker.get("files", {}) if marker.get("digest") == man.digest else {}
            stale = [e for e in man.files if not isinstance(seen, dict) or seen.get(e.path) != list(ids[e.path])]
            if not stale:
                return Check("done", "", man)
            for entry in stale:
                if self._sha256(self._path(address, entry.path)) != entry.sha256:
                    self._forget_verified(address)
                    return Check("damaged", f"{entry.path} does not match its manifest's sha256", man)
            # identities read after hashing: a file rewritten meanwhile is hashed again next time
            after = self._identities(address, man)
            if after == ids:
                self._mark_verified(address, man, ids)
            return Check("done", "", man)

    def is_complete(self, address: str, *, verify: bool = False) -> bool:
        """The artifact is committed and its files match its manifest (``check``)."""
        return self.check(address, verify=verify).ok

    def _sha256(self, path: str) -> str:
        if self.scheme == "file":
            return sha256_file(path)
        t0 = time.perf_counter()
        h = hashlib.sha256()
        with self.fs.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        VERIFY_SECONDS[0] += time.perf_counter() - t0
        return h.hexdigest()

    def damaged(self, address: str, reason: str) -> DamagedArtifact:
        """The error for damage a reader found; the artifact's verification is forgotten, so
        the next completeness check re-hashes it and it is recomputed."""
        self._forget_verified(address)
        return DamagedArtifact(address, reason)

    def require(self, address: str) -> Manifest:
        c = self.check(address)
        if c.state == "damaged":
            raise self.damaged(address, c.reason)
        if not c.ok or c.manifest is None:
            raise StoreError(f"artifact {address!r} is missing or incomplete in {self.url}")
        return c.manifest

    @contextlib.contextmanager
    def open(self, address: str, rel: str, mode: str = "rb") -> Iterator[IO]:
        """Open a file of a complete artifact for reading; its bytes are hashed as they are
        read (what the caller skipped, at the end) and checked against the manifest when the
        block ends: DamagedArtifact then, also when the block failed on the bad bytes."""
        man = self.require(address)
        entry = next((f for f in man.files if f.path == rel), None)
        if entry is None:
            raise StoreError(f"artifact {address!r} has no file {rel!r}")
        if mode != "rb":
            raise StoreError(f"artifact {address!r}: files are opened 'rb', not {mode!r}")
        with self._wrap("read", address):
            with self.fs.open(self._path(address, rel), "rb") as fh:
                reader = _VerifyingReader(fh)
                try:
                    yield reader  # type: ignore[misc]
                except Exception as exc:
                    if reader.sha256() != entry.sha256:
                        raise self.damaged(address, f"{rel} does not match its manifest's sha256") from exc
                    raise
                if reader.sha256() != entry.sha256:
                    raise self.damaged(address, f"{rel} does not match its manifest's sha256")

    def read_bytes(self, address: str, rel: str) -> bytes:
        with self.open(address, rel) as fh:
            return fh.read()

    def read_json(self, address: str, rel: str) -> Any:
        return json.loads(self.read_bytes(address, rel))

    def fetch(self, address: str, dest: str | Path | None = None) -> Path:
        """A local folder with the artifact's files (the folder itself for file://), every
        file verified against the manifest: hashed once when the folder is handed out (a
        file this process verified and has not changed since is not hashed again), or as it
        is copied. Readers then map or load the files as they are.

        Remote artifacts are copied into a local cache keyed by manifest digest,
        so a second fetch of the same content copies nothing (it re-verifies the copy), and
        a copy cut short copies only the files it had not finished.
        """
        man = self.require(address)
        in_place = self.scheme == "file" and dest is None  # the store's own folder, handed out as it is
        dest = Path(dest) if dest is not None else self.fetched_path(address, man)
        # one copy (or hash) at a time per folder in this process: the first shard tasks of a
        # run, started together, each copied the whole dataset split from S3 into one folder
        with _FETCH_LOCKS_LOCK:
            lock = _FETCH_LOCKS.setdefault(str(dest), threading.Lock())
        with lock:
            if in_place:
                for entry in man.files:
                    if not verify_local_file(dest / entry.path, entry.sha256):
                        raise self.damaged(address, f"{entry.path} does not match its manifest's sha256")
                return dest
            # and one per folder on the node: the 8 ranks of a training each fetched all 64 shards
            # of the pivot's representations and the source's alignments from S3 into one folder
            with _node_lock(dest):
                return self._fetch_into(address, man, dest)

    def _fetch_into(self, address: str, man: Manifest, dest: Path) -> Path:
        done = dest / ".complete"
        if done.exists() and _copy_is_whole(dest, done, man):
            return dest
        done.unlink(missing_ok=True)  # a copy damaged or cut short: what is missing is copied again
        dest.mkdir(parents=True, exist_ok=True)
        with self._wrap("fetch", address):
            for entry in man.files:
                target = dest / entry.path
                # a copy cut short (a preempted node) keeps the files it finished: a 7B target's
                # 28 GB are not fetched again for the one file it was writing
                if target.is_file() and target.stat().st_size == entry.size \
                        and verify_local_file(target, entry.sha256):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(f"{target}.tmp-{_HOST}-{os.getpid()}-{threading.get_ident()}")
                try:
                    with self.fs.open(self._path(address, entry.path), "rb") as src, open(tmp, "wb") as out:
                        reader = _VerifyingReader(src)
                        while chunk := reader.read(_CHUNK):
                            out.write(chunk)
                        if reader.sha256() != entry.sha256:
                            raise self.damaged(address, f"{entry.path} does not match its manifest's sha256")
                    os.replace(tmp, target)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                with _VERIFIED_LOCK:
                    _VERIFIED_READS.add(_stat_key(target) + (entry.sha256,))
        # the manifest and each file's stat identity as verified: another process of the node
        # (a training's other ranks) trusts a file unchanged since, instead of hashing GBs again
        done.write_text(_verified_record(man, {e.path: _stat_key(dest / e.path)[1:] for e in man.files}))
        return dest

    def fetched_path(self, address: str, man: Manifest | None = None) -> Path:
        """The local folder ``fetch`` hands out for the artifact: the store's own on file://,
        else its copy in the fetch cache (``FUSECHAT_CACHE``), keyed by manifest digest. For
        the processes of a node whose one process fetched it (training ranks), and for
        removing a copy nobody needs again; nothing is copied or verified here."""
        if self.scheme == "file":
            return Path(self._path(address))
        man = man or self.require(address)
        return cache_root() / man.digest[:24]

    def _found(self, path: str) -> str:
        """A path as fsspec's glob/find give it, as ``_path`` makes them: the local filesystem
        gives them without their leading slash."""
        return path if path.startswith("/") or self.scheme != "file" else "/" + path

    def list(self, prefix: str = "") -> list[str]:
        """Addresses of complete artifacts under a prefix (a stage name, say)."""
        base = self._path(prefix) if prefix else self.root
        with self._wrap("list", prefix or "/"):
            try:
                found = self.fs.glob(f"{base}/**/{MANIFEST}")
            except FileNotFoundError:
                return []
        root = self.root.rstrip("/") + "/"
        out = []
        for p in map(self._found, found):
            rel = p[len(root):] if p.startswith(root) else p.split(self.root.lstrip("/") + "/", 1)[-1]
            out.append(rel[: -len(MANIFEST) - 1])
        return sorted(out)

    # -- writing -----------------------------------------------------------
    def delete(self, address: str) -> None:
        """Remove an artifact: the manifest first, so it never reads as complete."""
        with self._wrap("delete", address):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._path(address, MANIFEST))
            with contextlib.suppress(FileNotFoundError):
                if self.fs.exists(self._path(address)):
                    self.fs.rm(self._path(address), recursive=True)

    def invalidate(self, address: str, *, what: str = "invalidate") -> None:
        """Drop only the manifest (and its verified marker): the artifact reads as missing,
        files stay for inspection."""
        with self._wrap(what, address):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._path(address, MANIFEST))
            self._forget_verified(address)

    def remove_leftovers(self, address: str) -> list[str]:
        """Remove what earlier writers of the address left under its folder, so that it then
        holds only what the next writer writes: a local store hands its folder to readers
        as it is (``fetch``), and a loader that lists a folder (a model's shards, its
        index) must not find a file an older write of the address left there (a 7B target
        once saved in 4 shards, then in 3, kept its old 4th). Kept: the lease (held by the
        caller), a sub-artifact's folder (one with a manifest or a lease of its own: a
        shard, an MT-Bench question, written by its own writer) and, on a local store, a
        live writer's temporary files (a process of this machine still alive, touched within
        ``STALE_TMP_S``). On S3, unfinished multipart uploads are aborted too (below).
        Returns the paths removed."""
        removed = self._abort_unfinished_uploads(address) if self.scheme == "s3" else []
        base = self._path(address).rstrip("/")
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return removed
        files = [p[len(base) + 1:] for p in map(self._found, found) if p.startswith(base + "/")]
        own = {LEASE, LEASE + ".takeover"}
        # a folder below the address with its own manifest or lease is another artifact
        subs = {rel.rsplit("/", 1)[0] for rel in files
                if "/" in rel and rel.rsplit("/", 1)[1] in (MANIFEST, LEASE)}
        for rel in files:
            m = _TMP.search(rel)
            if (rel[:m.start()] if m else rel) in own or any(rel.startswith(d + "/") for d in subs):
                continue
            path = f"{base}/{rel}"
            if m is not None and self.scheme == "file":
                with contextlib.suppress(FileNotFoundError):
                    live = (m["host"] != _HOST or _alive(int(m["pid"]))) \
                        and time.time() - os.stat(path).st_mtime <= STALE_TMP_S
                    if live:
                        continue
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
                removed.append(path)
        return removed

    def _abort_unfinished_uploads(self, address: str) -> list[str]:
        """S3's temporary files: a file over s3fs's block size (50 MiB: model shards, training
        checkpoints) goes up as a multipart upload, and a writer killed mid-file (a preempted
        node) leaves its parts behind, invisible to a listing and billed until aborted; at
        7B, up to a checkpoint's tens of GB per preemption. The caller holds this address's
        lease, so no live writer of it has an upload under it; a sub-artifact (an address
        below with its own lease or manifest) is its own writer's to clean, and is left."""
        bucket, key, _ = self.fs.split_path(self._path(address))
        prefix = key.rstrip("/") + "/"
        aborted: list[str] = []
        more: dict[str, str] = {}
        while True:
            try:
                page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **more)
            except Exception as exc:
                if not (isinstance(exc, PermissionError) or s3_answer(exc)[0] == "NotImplemented"):
                    raise
                # a policy without s3:ListBucketMultipartUploads, or a server without the call:
                # writing goes on, and the user learns what is left to a lifecycle rule
                if bucket not in _UPLOADS_UNLISTED:
                    _UPLOADS_UNLISTED.add(bucket)
                    log.warning("s3://%s: cannot list unfinished multipart uploads (%s): parts that killed "
                                "writers leave are not removed; a lifecycle rule with "
                                "AbortIncompleteMultipartUpload removes them", bucket, _describe_error(exc))
                return aborted
            for upload in page.get("Uploads", []):
                parts = upload["Key"][len(prefix):].split("/")[:-1]
                below = [prefix + "/".join(parts[:n]) for n in range(1, len(parts) + 1)]
                if any(self.fs.exists(f"{bucket}/{d}/{LEASE}") or self.fs.exists(f"{bucket}/{d}/{MANIFEST}")
                       for d in below):
                    continue
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                                UploadId=upload["UploadId"])
                aborted.append(f"s3://{bucket}/{upload['Key']}")
            if not page.get("IsTruncated") or "NextKeyMarker" not in page:
                return aborted
            more = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page.get("NextUploadIdMarker", "")}

    @contextlib.contextmanager
    def lease(self, address: str, *, wait: float | None = None) -> Iterator[Lease]:
        """Hold the write lease of ``address`` (and of every address under it) for the block.

        A writer that works long before it writes (training) holds it from the start, so a
        second writer waits instead of computing the same thing. Inside the block, this
        thread's ``writer`` calls on the address, or under it, use this lease. ``wait``:
        seconds to wait for another holder (default: ``FUSECHAT_LEASE_WAIT``, else the
        lease's lifetime and 15 s, time for a crashed holder's lease to expire).
        """
        held = _held_lease(self, address)
        if held is not None:
            yield held
            return
        lease = Lease(self, address)
        lease.acquire(wait)
        key = (self.url, address.strip("/"), threading.get_ident())
        _HELD[key] = lease
        try:
            yield lease
        finally:
            _HELD.pop(key, None)
            lease.release()

    @contextlib.contextmanager
    def writer(self, address: str, *, meta: dict[str, Any] | None = None,
               replace: bool = False) -> Iterator[ArtifactWriter]:
        """Write an artifact under its lease; the manifest is committed only if the block succeeds.
        What earlier writers of this address left under it is removed first (``remove_leftovers``).

        An artifact that is complete once the lease is held is kept, and the block's writes
        are discarded (``ArtifactWriter.kept``): another writer of the same address (the same
        inputs: addresses derive from them) committed it while this one computed, and readers
        may already be using it. Rewriting it would hide it from them until this writer
        commits, and put bytes under it that what they derived from it was not made from.
        Only a damaged or missing artifact is rewritten, unless ``replace``: the caller found
        the complete one stale (an MT-Bench question whose text changed at its location)."""
        stopping.check()
        with self.lease(address) as lease:
            kept = Check("missing") if replace else self.check(address)
            if not kept.ok:
                self.invalidate(address, what="write")
                with self._wrap("write", address):
                    self.remove_leftovers(address)
            w = ArtifactWriter(self, address, dict(meta or {}), lease, kept=kept.manifest if kept.ok else None)
            if w.kept is not None:
                log.info("artifact %s was committed by another writer while this one computed; it is kept "
                         "and this writer's files are discarded", address)
            yield w
            w.commit()

    def put_dir(self, address: str, local: str | Path, *, meta: dict[str, Any] | None = None,
                replace: bool = False) -> Manifest:
        """Upload a local folder as one artifact (``replace``: as in ``writer``)."""
        local = Path(local)
        with self.writer(address, meta=meta, replace=replace) as w:
            for p in sorted(local.rglob("*")):
                if p.is_file() and p.name not in (MANIFEST, VERIFIED):
                    w.put_file(p.relative_to(local).as_posix(), p)
        return w.manifest


class ArtifactWriter:
    """Files of one artifact being written; ``commit`` writes the manifest last."""

    def __init__(self, store: ArtifactStore, address: str, meta: dict[str, Any], lease: Lease | None = None,
                 kept: Manifest | None = None):
        self.store = store
        self.address = address
        self.meta = meta
        self.lease = lease
        # the complete artifact another writer committed first (``ArtifactStore.writer``):
        # what this writer is given is hashed and dropped, and ``commit`` returns that manifest
        self.kept = kept
        self._files: dict[str, FileEntry] = {}
        self._written: dict[str, tuple | None] = {}
        self.manifest: Manifest | None = None

    def _may_write(self) -> None:
        """Nothing more is written once the run is stopping or the lease is lost."""
        stopping.check()
        if self.lease is not None:
            self.lease.check()

    def _record(self, rel: str, size: int, sha: str) -> None:
        if rel in (MANIFEST, VERIFIED):
            raise StoreError(f"{rel} is reserved")
        self._files[rel] = FileEntry(rel, size, sha)
        if self.kept is None:
            # what this writer put there: at commit, a file that is no longer it was replaced
            self._written[rel] = self.store._identity(self.address, rel)
        _failpoint(rel)

    @contextlib.contextmanager
    def _sink(self, path: str) -> Iterator[IO[bytes]]:
        """Where one file's bytes go. On a local store, a temporary file renamed over the
        path once whole: a reader that has the old file open or memory-mapped keeps the
        old bytes, where truncating it in place would kill that reader (SIGBUS). An S3
        PUT is whole or absent already; but s3fs closes a file on any exit, an error's
        too, and closing completes the upload with what was written so far, so on an
        error the upload is aborted instead: nothing partial lands under the name."""
        if self.kept is not None:
            yield _Discard()
            return
        if self.store.scheme == "s3":
            fh = self.store.fs.open(path, "wb")
            try:
                yield fh
            except BaseException as exc:
                try:
                    fh.discard()  # aborts the multipart upload, if one was begun
                except Exception as why:  # the error raised stays the one to report
                    exc.add_note(f"its unfinished upload was not aborted ({_describe_error(why)}); "
                                 f"the next writer of {self.address!r} aborts it")
                fh.closed = True  # so that nothing closes (and commits) it later
                raise
            fh.close()
            return
        if self.store.scheme != "file":
            with self.store.fs.open(path, "wb") as fh:
                yield fh
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{_HOST}-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as fh:
                yield fh
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._may_write()
        path = self.store._path(self.address, rel)
        with self.store._wrap("write", self.address):
            with self._sink(path) as fh:
                fh.write(data)
        self._record(rel, len(data), hashlib.sha256(data).hexdigest())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def put_file(self, rel: str, local: str | Path) -> None:
        self._may_write()
        h = hashlib.sha256()
        size = 0
        path = self.store._path(self.address, rel)
        with self.store._wrap("write", self.address):
            with open(local, "rb") as src, self._sink(path) as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
        self._record(rel, size, h.hexdigest())

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[IO[bytes]]:
        """A file to stream into (hashed as it is written)."""
        self._may_write()
        buf = _HashingWriter()
        path = self.store._path(self.address, rel)
        with self.store._wrap("write", self.address):
            with self._sink(path) as fh:
                buf.target = fh
                yield buf  # type: ignore[misc]
        self._record(rel, buf.size, buf.hash.hexdigest())

    def commit(self) -> Manifest:
        if self.kept is not None:
            self._may_write()
            self.manifest = self.kept
            return self.kept
        man = Manifest(self.address, tuple(sorted(self._files.values(), key=lambda f: f.path)),
                       self.meta, time.time())
        path = self.store._path(self.address, MANIFEST)
        self._may_write()  # the lease, checked right before the manifest
        # A writer that lost its lease while a file was in flight (frozen, then woken after a
        # takeover) can still put that file in place, over this writer's: not committed over.
        ids = self.store._identities(self.address, man)
        replaced = sorted(rel for rel, written in self._written.items() if ids.get(rel) != written)
        if replaced:
            raise LeaseError(f"artifact {self.address!r}: {replaced[0]} was replaced after this writer wrote it "
                             f"(another writer of the address); not committing")
        taken = False
        with self.store._wrap("commit", self.address):
            if self.store.scheme == "file":
                # a hard link appears whole and only where nothing is: a reader sees no
                # manifest or a whole one, and a manifest another writer committed stays
                tmp = f"{path}.tmp-{_HOST}-{os.getpid()}-{threading.get_ident()}"
                try:
                    with open(tmp, "w") as fh:
                        fh.write(man.to_json())
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.link(tmp, path)
                except FileExistsError:
                    taken = True
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            elif self.store.scheme == "s3":
                # an S3 PUT is atomic, and with If-None-Match: * it succeeds only where no manifest is
                taken = _put_if(self.store, path, man.to_json().encode(), IfNoneMatch="*") is None
            else:
                if self.store.fs.exists(path):
                    taken = True
                else:
                    self.store.fs.pipe_file(path, man.to_json().encode())
        if taken:
            raise LeaseError(f"artifact {self.address!r}: another writer committed it while this one wrote; "
                             f"not committing over it")
        # Verified as written: the files were hashed on their way in, and are still what this
        # writer put there (else a later check hashes them again).
        ids = self.store._identities(self.address, man)
        if ids == self._written and set(ids) == {f.path for f in man.files}:
            self.store._mark_verified(self.address, man, ids)
        self.manifest = man
        return man


# -- one writer per artifact ---------------------------------------------------------
_HELD: dict[tuple[str, str, int], Lease] = {}


def _held_lease(store: ArtifactStore, address: str) -> Lease | None:
    """The lease this thread holds on ``address`` or on an address above it, if any."""
    parts = address.strip("/").split("/")
    me = threading.get_ident()
    for n in range(len(parts), 0, -1):
        lease = _HELD.get((store.url, "/".join(parts[:n]), me))
        if lease is not None:
            return lease
    return None


def _precondition_failed(exc: BaseException) -> bool:
    """An S3 conditional request refused (HTTP 412). Read from the answer's code and status,
    not the message: an address's hex digits may well spell "412"."""
    code, status = s3_answer(exc)
    return code == "PreconditionFailed" or status == 412


def _conditional_conflict(exc: BaseException) -> bool:
    """S3's 409 ConditionalRequestConflict: another conditional write to the key raced this
    one and S3 decided neither; AWS's PutObject documentation says to retry."""
    code, status = s3_answer(exc)
    return code == "ConditionalRequestConflict" or status == 409


_HONOURS_CONDITIONS: set[tuple[str, str]] = set()  # (endpoint, bucket) found to honour them
_HONOURS_LOCK = threading.Lock()


def _require_conditional_writes(store: ArtifactStore) -> None:
    """Once per process and bucket, before the first conditional write: the server must refuse a
    PUT whose condition fails (``If-None-Match: *`` over an object, ``If-Match`` another ETag).
    One that ignores conditions (some S3-compatible servers; AWS honours both since 2024)
    accepts every lease and every manifest: two writers of one address would both hold it,
    silently. Fails in one line instead, before anything is written."""
    endpoint = str(store.fs.client_kwargs.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "aws")
    bucket = store.bucket
    with _HONOURS_LOCK:
        if (endpoint, bucket) in _HONOURS_CONDITIONS:
            return
        _, prefix, _ = store.fs.split_path(store.root)
        key = "/".join(p for p in (prefix, "_fusechat-probe", uuid.uuid4().hex) if p)
        ignored = []
        with store._wrap("check conditional writes of", "_fusechat-probe"):
            etag = store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")["ETag"]
            try:
                for header, condition in (("If-None-Match: *", {"IfNoneMatch": "*"}),
                                          ("If-Match", {"IfMatch": '"not-' + etag.strip('"') + '"'})):
                    try:
                        store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"2", **condition)
                        ignored.append(header)
                    except Exception as exc:
                        if not _precondition_failed(exc):
                            raise
            finally:
                store.fs.call_s3("delete_object", Bucket=bucket, Key=key)
        if ignored:
            raise StoreError(f"s3://{bucket} ({endpoint}): the S3 server ignores {' and '.join(ignored)} on PUT, so "
                             f"leases cannot keep one writer per artifact; use a server that honours conditional "
                             f"writes (AWS S3, SeaweedFS, MinIO)")
        _HONOURS_CONDITIONS.add((endpoint, bucket))


def _put_if(store: ArtifactStore, path: str, body: bytes, **condition: str) -> str | None:
    """PUT ``body`` at ``path`` under an S3 condition (``IfNoneMatch="*"`` or ``IfMatch=etag``):
    its ETag, or None when the condition failed because another writer's object is there.

    A 412 is not always another writer's: botocore and s3fs resend a request whose answer was
    lost (a timeout, a dropped connection), and when the first send had landed the resent one
    fails its own condition. The object then holds this very body, byte for byte (a lease
    record carries its writer and time, a manifest its creation time), so the write is ours. A 409 is
    retried as AWS says, a few times, then raised."""
    _require_conditional_writes(store)
    bucket, key, _ = store.fs.split_path(path)
    for attempt in range(5):
        try:
            return store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)["ETag"]
        except Exception as exc:
            if _conditional_conflict(exc) and attempt < 4:
                time.sleep(0.1 * 2 ** attempt)
                continue
            if not _precondition_failed(exc):
                raise
            break
    try:
        etag = store.fs.info(path)["ETag"]  # read before the body: a later writer changes both
        return etag if store.fs.cat_file(path) == body else None
    except FileNotFoundError:
        return None


def _holder_gone(record: dict[str, Any]) -> bool:
    """A lease whose holder ran on this host in a process that no longer exists (a run
    SIGKILLed by a preemption drill or the OOM killer) holds nothing: a rerun on the same
    machine takes it over at once instead of waiting out its lifetime. Assumes processes
    that share a host name share a PID namespace (true for a machine, a VM and a
    Kubernetes pod's containers restarted in place). A PID that exists again, reused by
    another process, only makes the rerun wait for the expiry.

    Same host name is not same PID namespace: pods with ``hostNetwork`` (usual for GPU pods
    using RDMA) share the node's name, each with its own PIDs, where another pod's live
    holder's PID is simply not there. So the holder's PID namespace must be ours too (a
    record without one, from an older version, waits for its expiry)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    if _PID_NAMESPACE is None or record.get("pid_ns") != _PID_NAMESPACE:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, but not ours to signal
        return False
    return False


def _pid_namespace() -> str | None:
    """This process's PID namespace (``pid:[4026531836]``), or None where /proc does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_PID_NAMESPACE = _pid_namespace()


def lease_ttl() -> float:
    """Seconds a lease lasts without renewal (``FUSECHAT_LEASE_TTL``, default 60); renewed every quarter."""
    return float(os.environ.get("FUSECHAT_LEASE_TTL", "60"))


class Lease:
    """The write lease of one address: ``<address>/.lease``, a JSON record (holder, host,
    pid, expiry) in the store itself, so it works wherever the store does.

    Acquired only where none is (create-if-absent: ``O_EXCL`` locally, ``If-None-Match: *``
    on S3), or over an expired one (a crashed holder's): on S3 a PUT with ``If-Match`` the
    expired record's ETag, so of two writers taking it over only one succeeds; locally under
    a ``.lease.takeover`` file created with ``O_EXCL``, re-reading the record under it.
    Renewed by a thread every quarter lifetime: on S3 with ``If-Match`` the ETag it last
    wrote, so a renewal after a takeover fails and the writer knows it has lost the lease.
    Expiry is wall-clock time: writers' clocks must agree to well within a lifetime.
    """

    def __init__(self, store: ArtifactStore, address: str):
        self.store, self.address = store, address.strip("/")
        self.path = store._path(address, LEASE)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl = lease_ttl()
        self.expires = 0.0
        self.token: str | None = None  # the S3 ETag of our record; locally the holder id
        self.lost: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record ------------------------------------------------------------------
    def _record(self) -> bytes:
        now = time.time()
        self.expires = now + self.ttl
        return json.dumps({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_ns": _PID_NAMESPACE, "renewed": now, "expires": self.expires}).encode()

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The current record and its version (S3 ETag, read before the body), or (None, None)."""
        try:
            if self.store.scheme == "s3":
                etag = self.store.fs.info(self.path)["ETag"]
                raw = self.store.fs.cat_file(self.path)
            else:
                etag = None
                with self.store.fs.open(self.path, "rb") as fh:
                    raw = fh.read()
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(raw)
            if isinstance(record, dict):
                return record, etag
        except ValueError:
            pass
        # Not a record: torn by a crash, or written by an older version in two steps
        # (create, then write). It holds a lifetime from when it was written, like a record:
        # a writer between those steps must not lose its lease to whoever reads it first.
        with contextlib.suppress(FileNotFoundError, KeyError, TypeError, ValueError):
            info = self.store.fs.info(self.path)
            written = info.get("mtime") or info.get("LastModified")
            written = written.timestamp() if hasattr(written, "timestamp") else float(written)
            return {"expires": written + self.ttl}, etag
        return {}, etag

    def _create(self, over: str | None = None) -> bool:
        """Write our record where none is (``over`` None) or over the expired version ``over``."""
        body = self._record()
        if self.store.scheme == "s3":
            token = _put_if(self.store, self.path, body, **({"IfMatch": over} if over else {"IfNoneMatch": "*"}))
            if token is None:
                return False
            self.token = token
            return True
        if self.store.scheme != "file":
            if self.store.fs.exists(self.path) and over is None:
                return False
            self.store.fs.pipe_file(self.path, body)
            self.token = self.holder
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Written whole first, then put in place: a hard link only where nothing is (a new
        # lease), a rename over the expired record (a takeover, under the takeover guard).
        # A reader sees no record or a whole one, never an empty file it could take for expired.
        tmp = f"{self.path}.tmp-{_HOST}-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(body)
            if over is None:
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.token = self.holder
        return True

    @contextlib.contextmanager
    def _takeover_guard(self) -> Iterator[bool]:
        """Locally, one taker at a time (a guard file older than a lifetime is a dead taker's)."""
        if self.store.scheme != "file":
            yield True
            return
        guard = self.path + ".takeover"
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.path.getmtime(guard) > self.ttl:
                    os.unlink(guard)
            yield False
            return
        os.close(fd)
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(guard)

    # -- acquire, renew, check, release ------------------------------------------------
    def acquire(self, wait: float | None = None) -> None:
        if wait is None:
            wait = float(os.environ.get("FUSECHAT_LEASE_WAIT", self.ttl + 15))
        deadline = time.monotonic() + wait
        record: dict[str, Any] | None = None
        with self.store._wrap("lease", self.address):
            while True:
                stopping.check()
                if self._create():
                    break
                with self._takeover_guard() as mine:
                    record, version = self.read()
                    if mine and record is not None and (float(record.get("expires", 0)) < time.time()
                                                        or _holder_gone(record)):
                        if self._create(over=version or "local"):
                            break
                if time.monotonic() >= deadline:
                    raise LeaseError(self._held_message(record, wait))
                time.sleep(min(1.0, self.ttl / 8))
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.address}", daemon=True)
        self._thread.start()

    def _held_message(self, record: dict[str, Any] | None, waited: float) -> str:
        if not record:
            return f"artifact {self.address!r} is being written by another writer (waited {waited:.0f} s)"
        left = float(record.get("expires", 0)) - time.time()
        return (f"artifact {self.address!r} is being written by {record.get('holder')} "
                f"(lease expires in {left:.0f} s; waited {waited:.0f} s)")

    def _renew_loop(self) -> None:
        while not self._done.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception as exc:  # a store hiccup: retried at the next beat until the lease runs out
                if time.time() >= self.expires:
                    self.lost = f"could not renew its lease before it expired ({_describe_error(exc)})"
            if self.lost:
                return

    def renew(self) -> None:
        if time.time() >= self.expires:
            self.lost = "its lease expired before it was renewed"
            return
        if self.store.scheme == "s3":
            token = _put_if(self.store, self.path, self._record(), IfMatch=self.token)
            if token is None:
                self.lost = f"its lease was taken over by {(self.read()[0] or {}).get('holder')}"
            else:
                self.token = token
            return
        record, _ = self.read()
        if not record or record.get("holder") != self.holder:
            self.lost = f"its lease was taken over by {(record or {}).get('holder')}"
            return
        self._create(over="local")

    def check(self) -> None:
        """Raise :class:`LeaseError` unless this writer still holds the lease (read from the store)."""
        if self.lost is None or "taken over" not in self.lost:
            with self.store._wrap("lease check", self.address):
                record, version = self.read()
                ours = version == self.token if self.store.scheme == "s3" else (record or {}).get("holder") == \
                    self.holder
                if not ours:
                    holder = (record or {}).get("holder")
                    self.lost = f"its lease was taken over by {holder}" if holder else \
                        "its lease was taken over (and since released)"
        if self.lost is None and time.time() >= self.expires:
            self.lost = "its lease expired before it was renewed"
        if self.lost is not None:
            raise LeaseError(f"artifact {self.address!r}: writer {self.holder} {self.lost}; not writing")

    def release(self) -> None:
        """Stop renewing and remove the record if it is still ours."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.lost is not None:
            return
        # Best effort, and nothing is lost when it fails: a record left behind expires within
        # a lifetime, and a rerun on this host takes it over at once (its process is gone).
        # Raising here would turn a committed artifact into a failed task.
        with contextlib.suppress(Exception):
            if self.store.scheme == "s3":
                if self.store.fs.info(self.path)["ETag"] == self.token:
                    self.store.fs.rm(self.path)
            else:
                record, _ = self.read()
                if record and record.get("holder") == self.holder:
                    self.store.fs.rm(self.path)


def _failpoint(rel: str) -> None:
    """Preemption drill: ``FUSECHAT_KILL_AFTER_FILE=name`` SIGKILLs this process right
    after a file of that name is written, before its artifact's manifest exists,
    exactly as a preempted node would die: no cleanup, no exception handlers."""
    target = os.environ.get("FUSECHAT_KILL_AFTER_FILE")
    if target and (rel == target or rel.endswith("/" + target)):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _VerifyingReader(io.RawIOBase):
    """A file being read, hashed as it goes: bytes read in order from the start are hashed
    once; ``sha256`` hashes whatever the reader skipped or did not reach (after seeks)."""

    def __init__(self, fh: IO[bytes]):
        self._fh = fh
        self._hash = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in the hash
        self._pos = 0
        self._seconds = 0.0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._fh.seek(offset, whence)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        data = self._fh.read() if n is None or n < 0 else self._fh.read(n)
        if self._pos == self._hashed and data:
            t0 = time.perf_counter()
            self._hash.update(data)
            self._seconds += time.perf_counter() - t0
            self._hashed += len(data)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def sha256(self) -> str:
        """The whole file's sha256 (reads the part not read yet)."""
        t0 = time.perf_counter()
        self._fh.seek(self._hashed)
        while chunk := self._fh.read(_CHUNK):
            self._hash.update(chunk)
            self._hashed += len(chunk)
        self._fh.seek(self._pos)
        VERIFY_SECONDS[0] += self._seconds + time.perf_counter() - t0
        self._seconds = 0.0
        return self._hash.hexdigest()


class _HashingWriter(io.RawIOBase):
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.target: IO[bytes] | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        assert self.target is not None
        self.hash.update(b)
        self.size += len(b)
        self.target.write(b)
        return len(b)


class _Discard(io.RawIOBase):
    """Where a writer's bytes go when the artifact it writes is kept as another writer left it."""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        return len(b)
