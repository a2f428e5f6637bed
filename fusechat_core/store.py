"""The one artifact store: every stage's output lives here, under its address.

An artifact is a folder ``<root>/<address>/`` holding data files and, written
last, ``MANIFEST.json`` (file list, sizes, sha256). Readers trust nothing
without a manifest, so a writer killed at any moment leaves an artifact that
reads as missing and is recomputed. Writing first removes any old manifest, so
an artifact being rewritten is never mistaken for a complete one.

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
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec

MANIFEST = "MANIFEST.json"
_CHUNK = 8 << 20


class StoreError(RuntimeError):
    """A store operation failed; the message is one line naming what and where."""


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
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls(
            address=raw["address"],
            files=tuple(FileEntry(**f) for f in raw["files"]),
            meta=raw.get("meta", {}),
            created=raw.get("created", 0.0),
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
                if exc is None or isinstance(exc, (StoreError, KeyboardInterrupt)):
                    return False
                where = f"bucket {store.bucket!r}" if store.scheme == "s3" else store.root
                raise StoreError(
                    f"store {what} of {address!r} failed ({where}): {_describe_error(exc)}"
                ) from exc

        return _Ctx()

    # -- reading -----------------------------------------------------------
    def manifest(self, address: str) -> Manifest | None:
        """The artifact's manifest, or None when it is missing or unreadable."""
        path = self._path(address, MANIFEST)
        with self._wrap("read", address):
            try:
                with self.fs.open(path, "rb") as fh:
                    text = fh.read().decode()
            except FileNotFoundError:
                return None
        try:
            return Manifest.from_json(text)
        except (ValueError, KeyError, TypeError):
            return None

    def is_complete(self, address: str, *, verify: bool = False) -> bool:
        """A manifest exists and every file it lists is there with its size.

        ``verify=True`` also re-hashes every file (costly; used by ``status``).
        """
        man = self.manifest(address)
        if man is None:
            return False
        with self._wrap("check", address):
            for entry in man.files:
                path = self._path(address, entry.path)
                try:
                    size = self.fs.size(path)
                except FileNotFoundError:
                    return False
                if size != entry.size:
                    return False
                if verify and self._sha256(path) != entry.sha256:
                    return False
        return True

    def _sha256(self, path: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def require(self, address: str) -> Manifest:
        man = self.manifest(address)
        if man is None or not self.is_complete(address):
            raise StoreError(f"artifact {address!r} is missing or incomplete in {self.url}")
        return man

    @contextlib.contextmanager
    def open(self, address: str, rel: str, mode: str = "rb") -> Iterator[IO]:
        """Open a file of a complete artifact for reading."""
        man = self.require(address)
        if rel not in {f.path for f in man.files}:
            raise StoreError(f"artifact {address!r} has no file {rel!r}")
        with self._wrap("read", address):
            with self.fs.open(self._path(address, rel), mode) as fh:
                yield fh

    def read_bytes(self, address: str, rel: str) -> bytes:
        with self.open(address, rel) as fh:
            return fh.read()

    def read_json(self, address: str, rel: str) -> Any:
        return json.loads(self.read_bytes(address, rel))

    def fetch(self, address: str, dest: str | Path | None = None) -> Path:
        """A local folder with the artifact's files (the folder itself for file://).

        Remote artifacts are copied into a local cache keyed by manifest digest,
        so a second fetch of the same content copies nothing.
        """
        man = self.require(address)
        if self.scheme == "file" and dest is None:
            return Path(self._path(address))
        if dest is None:
            cache = Path(os.environ.get("FUSECHAT_CACHE", Path(tempfile.gettempdir()) / "fusechat-cache"))
            dest = cache / man.digest[:24]
        dest = Path(dest)
        done = dest / ".complete"
        if done.exists() and done.read_text() == man.digest:
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        with self._wrap("fetch", address):
            for entry in man.files:
                target = dest / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get(self._path(address, entry.path), str(target))
        done.write_text(man.digest)
        return dest

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
        for p in found:
            p = p if p.startswith("/") or self.scheme != "file" else "/" + p
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
        """Drop only the manifest: the artifact reads as missing, files stay for inspection."""
        with self._wrap(what, address):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._path(address, MANIFEST))

    @contextlib.contextmanager
    def writer(self, address: str, *, meta: dict[str, Any] | None = None) -> Iterator[ArtifactWriter]:
        """Write an artifact; the manifest is committed only if the block succeeds."""
        self.invalidate(address, what="write")
        w = ArtifactWriter(self, address, dict(meta or {}))
        yield w
        w.commit()

    def put_dir(self, address: str, local: str | Path, *, meta: dict[str, Any] | None = None) -> Manifest:
        """Upload a local folder as one artifact."""
        local = Path(local)
        with self.writer(address, meta=meta) as w:
            for p in sorted(local.rglob("*")):
                if p.is_file() and p.name != MANIFEST:
                    w.put_file(p.relative_to(local).as_posix(), p)
        return w.manifest


class ArtifactWriter:
    """Files of one artifact being written; ``commit`` writes the manifest last."""

    def __init__(self, store: ArtifactStore, address: str, meta: dict[str, Any]):
        self.store = store
        self.address = address
        self.meta = meta
        self._files: dict[str, FileEntry] = {}
        self.manifest: Manifest | None = None

    def _record(self, rel: str, size: int, sha: str) -> None:
        if rel == MANIFEST:
            raise StoreError(f"{MANIFEST} is reserved")
        self._files[rel] = FileEntry(rel, size, sha)
        _failpoint(rel)

    @contextlib.contextmanager
    def _sink(self, path: str) -> Iterator[IO[bytes]]:
        """Where one file's bytes go. On a local store, a temporary file renamed over the
        path once whole: a reader that has the old file open or memory-mapped keeps the
        old bytes, where truncating it in place would kill that reader (SIGBUS). An S3
        PUT is whole or absent already."""
        if self.store.scheme != "file":
            with self.store.fs.open(path, "wb") as fh:
                yield fh
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as fh:
                yield fh
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.store._path(self.address, rel)
        with self.store._wrap("write", self.address):
            with self._sink(path) as fh:
                fh.write(data)
        self._record(rel, len(data), hashlib.sha256(data).hexdigest())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def put_file(self, rel: str, local: str | Path) -> None:
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
        buf = _HashingWriter()
        path = self.store._path(self.address, rel)
        with self.store._wrap("write", self.address):
            with self._sink(path) as fh:
                buf.target = fh
                yield buf  # type: ignore[misc]
        self._record(rel, buf.size, buf.hash.hexdigest())

    def commit(self) -> Manifest:
        man = Manifest(self.address, tuple(sorted(self._files.values(), key=lambda f: f.path)),
                       self.meta, time.time())
        path = self.store._path(self.address, MANIFEST)
        with self.store._wrap("commit", self.address):
            if self.store.scheme == "file":
                # rename is atomic on a local filesystem: a reader sees no manifest or a whole one
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "w") as fh:
                    fh.write(man.to_json())
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            else:
                # an S3 PUT is atomic: the object appears whole or not at all
                with self.store.fs.open(path, "wb") as fh:
                    fh.write(man.to_json().encode())
        self.manifest = man
        return man


def _failpoint(rel: str) -> None:
    """Preemption drill: ``FUSECHAT_KILL_AFTER_FILE=name`` SIGKILLs this process right
    after a file of that name is written, before its artifact's manifest exists,
    exactly as a preempted node would die: no cleanup, no exception handlers."""
    target = os.environ.get("FUSECHAT_KILL_AFTER_FILE")
    if target and (rel == target or rel.endswith("/" + target)):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


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

