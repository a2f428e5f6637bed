"""One store test suite, run against file:// and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from fusechat_core.store import (
    _HOST,
    MANIFEST,
    STALE_TMP_S,
    VERIFY_SECONDS,
    ArtifactStore,
    DamagedArtifact,
    StoreError,
)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "file":
        return ArtifactStore(f"file://{tmp_path}/artifacts")
    request.getfixturevalue("s3_env")
    return ArtifactStore(f"s3://fusechat-test/{uuid.uuid4().hex}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_roundtrip_and_manifest_lists_sizes_and_hashes(store):
    blobs = {"a.bin": b"\x00\x01" * 1000, "sub/b.json": b'{"x": 1}', "empty": b""}
    with store.writer("stage/abc", meta={"k": 1}) as w:
        for rel, data in blobs.items():
            w.write_bytes(rel, data)
    man = store.manifest("stage/abc")
    assert man is not None and store.is_complete("stage/abc")
    assert {f.path: (f.size, f.sha256) for f in man.files} == {
        rel: (len(d), _sha(d)) for rel, d in blobs.items()}
    assert man.meta == {"k": 1}
    for rel, data in blobs.items():
        assert store.read_bytes("stage/abc", rel) == data
    # the digest changes with content and only with content
    with store.writer("stage/abd") as w:
        for rel, data in blobs.items():
            w.write_bytes(rel, data)
    assert store.manifest("stage/abd").digest == man.digest
    with store.writer("stage/abe") as w:
        for rel, data in blobs.items():
            w.write_bytes(rel, data + b"!")
    assert store.manifest("stage/abe").digest != man.digest


def test_streamed_and_uploaded_files_are_hashed(store, tmp_path):
    local = tmp_path / "big.bin"
    payload = bytes(range(256)) * 40000
    local.write_bytes(payload)
    with store.writer("s/x") as w:
        w.put_file("big.bin", local)
        with w.open("stream.bin") as fh:
            fh.write(b"abc")
            fh.write(b"def")
    files = {f.path: f for f in store.manifest("s/x").files}
    assert files["big.bin"].sha256 == _sha(payload) and files["big.bin"].size == len(payload)
    assert files["stream.bin"].sha256 == _sha(b"abcdef")
    assert store.read_bytes("s/x", "stream.bin") == b"abcdef"


def test_failed_write_leaves_no_manifest(store):
    with pytest.raises(RuntimeError):
        with store.writer("s/partial") as w:
            w.write_bytes("one", b"1")
            raise RuntimeError("node died")
    assert store.manifest("s/partial") is None
    assert not store.is_complete("s/partial")
    with pytest.raises(StoreError, match="missing or incomplete"):
        store.read_bytes("s/partial", "one")
    assert "s/partial" not in store.list()


def test_rewrite_hides_the_old_artifact_until_the_new_one_is_committed(store):
    with store.writer("s/r") as w:
        w.write_bytes("f", b"old")
    store.fs.pipe_file(store._path("s/r", "f"), b"rotten")  # damaged: the next writer redoes it
    with store.writer("s/r") as w:
        assert not store.is_complete("s/r"), "a reader must not see the artifact mid-rewrite"
        w.write_bytes("f", b"new")
    assert store.read_bytes("s/r", "f") == b"new"


def test_a_writer_that_waited_for_another_keeps_what_that_one_committed(store):
    """Two runs of one config write the same address: the second waits for the first's lease.
    What the first committed is kept (a downstream stage of the first run may be reading it),
    the second's bytes are dropped, and both get the one manifest."""
    import threading

    first_in, second_waiting = threading.Event(), threading.Event()
    got: dict = {}

    def second() -> None:
        second_waiting.set()
        with store.writer("s/twice", meta={"by": "second"}) as w:
            got["complete_inside"] = store.is_complete("s/twice")
            w.write_bytes("f", b"second")
            w.write_bytes("only-second", b"2")
            with w.open("streamed") as fh:
                fh.write(b"second")
        got["manifest"] = w.manifest

    with store.writer("s/twice", meta={"by": "first"}) as w:
        first_in.set()
        t = threading.Thread(target=second)
        t.start()
        second_waiting.wait(10)
        time.sleep(0.5)  # the second writer is now waiting for this one's lease
        w.write_bytes("f", b"first")
    t.join(60)
    assert not t.is_alive()
    committed = store.manifest("s/twice")
    assert got["complete_inside"], "the second writer hid the artifact the first had just committed"
    assert committed.meta == {"by": "first"} and got["manifest"] == committed
    assert [f.path for f in committed.files] == ["f"]
    assert store.read_bytes("s/twice", "f") == b"first"
    assert not store.fs.exists(store._path("s/twice", "only-second"))
    assert not store.fs.exists(store._path("s/twice", "streamed"))


def test_damaged_files_are_detected(store):
    with store.writer("s/d") as w:
        w.write_bytes("f", b"0123456789")
        w.write_bytes("g", b"abcdef")
    path = store._path("s/d", "f")
    with store.fs.open(path, "wb") as fh:  # truncated
        fh.write(b"01234")
    c = store.check("s/d")
    assert c.state == "damaged" and "f has 5 bytes" in c.reason and not store.is_complete("s/d")
    # same size, other bytes: the file's identity (mtime/ctime, or ETag) changed, so it is re-hashed
    with store.fs.open(path, "wb") as fh:
        fh.write(b"9876543210")
    c = store.check("s/d")
    assert c.state == "damaged" and "sha256" in c.reason
    assert store.check("s/d", verify=True).state == "damaged"
    with pytest.raises(DamagedArtifact, match="s/d"):
        store.read_bytes("s/d", "f")
    store.fs.rm(store._path("s/d", "g"))  # missing file
    assert store.check("s/d").state == "damaged"
    # rewritten: done again
    with store.writer("s/d") as w:
        w.write_bytes("f", b"0123456789")
    assert store.check("s/d").state == "done"


def test_unchanged_files_are_not_hashed_again_and_a_touched_one_is(store):
    with store.writer("s/t") as w:
        w.write_bytes("f", b"x" * 1000)
    before = VERIFY_SECONDS[0]
    for _ in range(3):
        assert store.is_complete("s/t")
    assert VERIFY_SECONDS[0] == before, "the writer's marker must spare a re-hash"
    with store.fs.open(store._path("s/t", "f"), "wb") as fh:  # same bytes: new mtime (an S3 ETag stays)
        fh.write(b"x" * 1000)
    assert store.is_complete("s/t") and (VERIFY_SECONDS[0] > before) == (store.scheme == "file")
    again = VERIFY_SECONDS[0]
    assert store.is_complete("s/t") and VERIFY_SECONDS[0] == again, "the re-hash is remembered"


def test_damage_the_cheap_check_cannot_see_is_found_by_the_reader(store, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": list(range(5000)), "y": [str(i) for i in range(5000)]}), local)
    with store.writer("s/rot") as w:
        w.put_file("t.parquet", local)
        w.write_bytes("b", b"0123456789")
    # random access (footer first) still checks every byte
    with store.open("s/rot", "t.parquet") as fh:
        assert pq.read_table(fh).num_rows == 5000
    # bit rot: the bytes change but the stat identity recorded says nothing changed
    path = store._path("s/rot", "b")
    with store.fs.open(path, "wb") as fh:
        fh.write(b"0123456780")
    man = store.manifest("s/rot")
    store._mark_verified("s/rot", man, store._identities("s/rot", man))
    assert store.is_complete("s/rot")
    with pytest.raises(DamagedArtifact, match="b does not match"):
        store.read_bytes("s/rot", "b")
    with pytest.raises(DamagedArtifact):
        store.fetch("s/rot", tmp_path / "fetched" if store.scheme != "file" else None)
    # the reader's finding sticks: the next cheap check re-hashes and says damaged
    assert store.check("s/rot").state == "damaged"
    assert store.check("s/rot", verify=True).state == "damaged"


def test_malformed_or_escaping_manifests_are_damage_and_get_rewritten(store):
    with store.writer("s/m") as w:
        w.write_bytes("f", b"x")
    good = store.manifest("s/m")
    raw = json.loads(good.to_json())
    escape = "../../../../etc/passwd"  # outside-path: refused
    cases = {
        b'{"files": [': "malformed manifest",  # a torn write
        json.dumps({**raw, "files": [{"path": escape, "size": 1, "sha256": "0" * 64}]}).encode():
            "not a path inside",
        json.dumps({**raw, "files": [{"path": "/etc/passwd", "size": 1, "sha256": "0" * 64}]}).encode():
            "not a path inside",
        json.dumps({**raw, "files": [{"path": "f", "size": "1", "sha256": "0" * 64}]}).encode(): "byte count",
        json.dumps({**raw, "address": "s/other"}).encode(): "'s/other'",
    }
    for text, why in cases.items():
        with store.fs.open(store._path("s/m", MANIFEST), "wb") as fh:
            fh.write(text)
        c = store.check("s/m")
        assert c.state == "damaged" and why in c.reason, (text, c)
        assert store.manifest("s/m") is None and not store.is_complete("s/m")
        with pytest.raises(DamagedArtifact):
            store.read_bytes("s/m", "f")
    with store.writer("s/m") as w:  # the next run rewrites it
        w.write_bytes("f", b"x")
    assert store.check("s/m").state == "done" and store.read_bytes("s/m", "f") == b"x"


def test_a_killed_writers_temporary_files_are_removed_when_the_address_is_written_again(tmp_path):
    import subprocess

    store = ArtifactStore(f"file://{tmp_path}/store")
    folder = Path(store._path("s/tmp"))
    (folder / "sub").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = _HOST
    stale = [folder / f"data.bin.tmp-{host}-{dead.pid}-1", folder / "sub" / f"MANIFEST.json.tmp-{host}-{dead.pid}-7"]
    old = folder / "x.tmp-otherhost-12345-1"
    live = folder / f"y.tmp-{host}-{os.getpid()}-99"  # a writer that is still running
    elsewhere = folder / "z.tmp-otherhost-12345-2"  # another machine's, recently written
    for p in (*stale, old, live, elsewhere):
        p.write_bytes(b"half")
    os.utime(old, (time.time() - STALE_TMP_S - 60,) * 2)
    with store.writer("s/tmp") as w:
        w.write_bytes("data.bin", b"whole")
    assert not any(p.exists() for p in (*stale, old))
    assert live.exists() and elsewhere.exists()
    assert store.read_bytes("s/tmp", "data.bin") == b"whole"


def test_list_fetch_delete(store, tmp_path):
    for addr in ("dataset/1", "represent/p-1/shard-00000-of-00002", "represent/p-1/shard-00001-of-00002"):
        with store.writer(addr) as w:
            w.write_json("meta.json", {"addr": addr})
    with pytest.raises(RuntimeError):
        with store.writer("represent/p-2") as w:
            w.write_bytes("x", b"x")
            raise RuntimeError
    assert store.list() == ["dataset/1", "represent/p-1/shard-00000-of-00002",
                            "represent/p-1/shard-00001-of-00002"]
    assert store.list("represent") == ["represent/p-1/shard-00000-of-00002",
                                       "represent/p-1/shard-00001-of-00002"]
    local = store.fetch("dataset/1", tmp_path / "fetched" if store.scheme != "file" else None)
    assert json.loads((local / "meta.json").read_text()) == {"addr": "dataset/1"}
    store.delete("dataset/1")
    assert not store.is_complete("dataset/1") and store.list("dataset") == []


def test_addresses_cannot_escape_the_root(store):
    with pytest.raises(StoreError, match="invalid artifact address"):
        store.manifest("../outside")
    with pytest.raises(StoreError, match="invalid artifact address"):
        with store.writer("ok/a") as w:
            w.write_bytes("../../x", b"")  # outside-path: refused


def test_bad_s3_credentials_fail_with_one_line_naming_the_bucket(s3_env, monkeypatch):
    url = f"s3://fusechat-test/{uuid.uuid4().hex}"
    good = ArtifactStore(url)
    with good.writer("s/keep") as w:
        w.write_bytes("f", b"precious")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    bad = ArtifactStore(url)
    with pytest.raises(StoreError) as err:
        with bad.writer("s/new") as w:
            w.write_bytes("f", b"x")
    msg = str(err.value)
    assert "fusechat-test" in msg and "\n" not in msg
    assert "not-the-secret-123" not in msg and s3_env.env()["AWS_SECRET_ACCESS_KEY"] not in msg
    with pytest.raises(StoreError):
        with bad.writer("s/keep") as w:  # a failed rewrite must not damage what is stored
            w.write_bytes("f", b"clobber")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.env()["AWS_SECRET_ACCESS_KEY"])
    again = ArtifactStore(url)
    assert again.manifest("s/new") is None
    assert again.is_complete("s/keep") and again.read_bytes("s/keep", "f") == b"precious"



def test_rewriting_a_file_keeps_the_bytes_a_reader_has_mapped(tmp_path):
    import mmap

    store = ArtifactStore(f"file://{tmp_path}/store")
    with store.writer("stage/a", meta={}) as w:
        w.write_bytes("data.bin", b"x" * 8192)
        w.write_bytes("other.bin", b"o")
    path = Path(store.root) / "stage" / "a" / "data.bin"
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    os.unlink(path.parent / "other.bin")
    # the artifact is redone (one of its files is gone) while a reader holds the old file mapped:
    # written in place, the truncation would make the next read of the mapping a SIGBUS
    inode = path.stat().st_ino
    with store.writer("stage/a", meta={}) as w:
        w.write_bytes("data.bin", b"y" * 10)
    assert path.stat().st_ino != inode, "rewritten in place"  # checked first: touching a truncated mapping kills
    assert mapped[:4] == b"xxxx" and len(mapped) == 8192
    assert store.read_bytes("stage/a", "data.bin") == b"y" * 10
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


_KILLED_MID_FILE = r'''
import sys, time
from fusechat_core.store import ArtifactStore
with ArtifactStore(sys.argv[1]).writer("ckpt/a") as w:
    with w.open("model/weights.bin") as fh:
        fh.write(b"\x01" * (55 << 20))  # over s3fs's 50 MiB block: a multipart upload, one part up
        print("uploading", flush=True)
        time.sleep(600)  # killed here, as a preempted node would be
'''


def test_a_writer_killed_mid_file_leaves_no_multipart_upload_behind_on_s3(s3_env):
    """A file over s3fs's block size goes up in parts; a writer SIGKILLed mid-file leaves an
    unfinished upload that no listing shows and S3 bills until it is aborted (at 7B, a
    training checkpoint's tens of GB per preemption). The next writer of the address aborts
    it, and only it: a sub-artifact's upload (its own lease) and another address's stay."""
    import subprocess
    import sys

    from fusechat_core.store import Lease

    url = f"s3://fusechat-test/{uuid.uuid4().hex}"
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_MID_FILE, url], cwd=repo, text=True,
                             env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "uploading"
    finally:
        child.kill()
        child.wait()
    store = ArtifactStore(url)
    bucket, root, _ = store.fs.split_path(store.root)

    def uploads() -> set[str]:
        page = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root + "/")
        return {u["Key"][len(root) + 1:] for u in page.get("Uploads", [])}

    sub = Lease(store, "ckpt/a/step-2")  # a live writer of a sub-artifact, uploading
    sub.acquire(wait=0)
    for rel in ("ckpt/a/step-2/state.bin", "ckpt/b/weights.bin"):
        key = store.fs.split_path(store._path(rel))[1]
        store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    assert uploads() == {"ckpt/a/model/weights.bin", "ckpt/a/step-2/state.bin", "ckpt/b/weights.bin"}
    assert not store.fs.exists(store._path("ckpt/a/model/weights.bin"))  # invisible but for the upload list

    with store.writer("ckpt/a") as w:  # the rerun: takes the dead writer's lease over at once
        w.write_bytes("model/weights.bin", b"rewritten")
    sub.release()
    assert uploads() == {"ckpt/a/step-2/state.bin", "ckpt/b/weights.bin"}
    assert store.is_complete("ckpt/a", verify=True) and store.read_bytes("ckpt/a", "model/weights.bin") == b"rewritten"


def test_a_file_whose_writing_fails_leaves_nothing_under_its_name_on_s3(s3_env):
    """s3fs closes a file on any exit, and closing completes its upload: a writer failing
    mid-file (a read error, a stop) put a truncated object under the name, finishing a
    multipart upload of up to 50 MiB more first. Now the upload is aborted: nothing lands,
    in parts or whole, and the error is the one raised."""
    from fusechat_core.store import StoreError

    store = ArtifactStore(f"s3://fusechat-test/{uuid.uuid4().hex}")
    bucket, root, _ = store.fs.split_path(store.root)
    for size in (10, 55 << 20):  # a plain PUT; a multipart upload with one part up
        with pytest.raises(StoreError, match="OSError: disk gone"):
            with store.writer("half/a") as w:
                with w.open("weights.bin") as fh:
                    fh.write(b"\x02" * size)
                    raise OSError("disk gone")
        assert not store.fs.exists(store._path("half/a", "weights.bin")), size
        assert store.manifest("half/a") is None
        page = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=root + "/")
        assert not page.get("Uploads"), page.get("Uploads")
    with store.writer("half/a") as w:  # and the store goes on as before
        with w.open("weights.bin") as fh:
            fh.write(b"whole")
    assert store.read_bytes("half/a", "weights.bin") == b"whole" and store.is_complete("half/a", verify=True)


def test_replace_rewrites_a_complete_artifact_its_caller_found_stale(store):
    with store.writer("s/stale", meta={"v": 1}) as w:
        w.write_bytes("f", b"old answer")
    with store.writer("s/stale", meta={"v": 2}, replace=True) as w:
        assert not store.is_complete("s/stale"), "a reader must not see the artifact mid-rewrite"
        w.write_bytes("f", b"new answer")
    assert store.read_bytes("s/stale", "f") == b"new answer" and store.manifest("s/stale").meta == {"v": 2}
    assert w.manifest == store.manifest("s/stale")


def test_a_rewrite_leaves_no_file_of_the_older_write_beside_its_own(store, tmp_path):
    """A 7B target saved in 4 shards, damaged, then saved in 3: a loader listing the folder
    (a local store hands it out as it is) must not find the old 4th shard; a sub-artifact
    under the address (a shard, an MT-Bench question, with its own manifest) stays."""
    with store.writer("t/model/q-1") as w:
        w.write_bytes("answer.json", b"{}")
    with store.writer("t/model") as w:
        for i in range(4):
            w.write_bytes(f"model-{i}-of-4.safetensors", b"old %d" % i)
        w.write_bytes("nested/extra.bin", b"old")
    with store.fs.open(store._path("t/model", "model-0-of-4.safetensors"), "wb") as fh:
        fh.write(b"rot")  # damage: the artifact is written again
    assert store.check("t/model").state == "damaged"
    with store.writer("t/model") as w:
        for i in range(3):
            w.write_bytes(f"model-{i}-of-3.safetensors", b"new %d" % i)
    folder = store.fetch("t/model", tmp_path / "copy") if store.scheme == "s3" else store.fetch("t/model")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    own = [n for n in names if not n.startswith("q-1/") and n not in (MANIFEST, ".verified.json", ".complete")]
    assert own == [f"model-{i}-of-3.safetensors" for i in range(3)]
    if store.scheme == "s3":  # nothing left in the bucket either
        left = [p.rsplit("/t/model/", 1)[1] for p in store.fs.find(store._path("t/model"))]
        assert sorted(n for n in left if not n.startswith("q-1/") and n not in (MANIFEST, ".verified.json")) == own
    assert store.is_complete("t/model/q-1") and store.read_bytes("t/model/q-1", "answer.json") == b"{}"


def test_a_fetch_cut_short_copies_only_what_it_had_not_finished(s3_env, tmp_path):
    """A preempted node's copy of a remote artifact (a 7B target: 28 GB) keeps the files it
    finished; the next fetch copies the others again, and a local file that does not match
    its manifest (half written, damaged) is copied again."""
    store = ArtifactStore(f"s3://fusechat-test/{uuid.uuid4().hex}")
    files = {"model-1.safetensors": b"\x01" * 4096, "model-2.safetensors": b"\x02" * 4096, "config.json": b"{}"}
    with store.writer("train/t") as w:
        for rel, data in files.items():
            w.write_bytes(rel, data)
    dest = tmp_path / "copy"
    store.fetch("train/t", dest)
    (dest / ".complete").unlink()  # cut short: not marked complete
    kept = (dest / "model-1.safetensors").stat().st_ino
    (dest / "model-2.safetensors").write_bytes(b"\x02" * 100)  # the file being written when it died
    (dest / "config.json").unlink()
    assert store.fetch("train/t", dest) == dest
    assert (dest / "model-1.safetensors").stat().st_ino == kept  # finished: not copied again
    assert {rel: (dest / rel).read_bytes() for rel in files} == files
    assert (dest / ".complete").exists()


def test_tasks_fetching_one_artifact_at_once_copy_it_once(s3_env, tmp_path, monkeypatch):
    """The first shard tasks of a run start together and each fetch the dataset split: one of
    them copies it from S3, the others find the copy (each copied all of it before)."""
    import threading

    monkeypatch.setenv("FUSECHAT_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(f"s3://fusechat-test/{uuid.uuid4().hex}")
    with store.writer("dataset/x") as w:
        w.write_bytes("train.parquet", os.urandom(1 << 20))
    opened = []
    real = store.fs.open

    def counting(path, mode="rb", **kw):
        if "train.parquet" in str(path) and "r" in mode:
            opened.append(path)
        return real(path, mode, **kw)

    monkeypatch.setattr(store.fs, "open", counting)
    got, start = [], threading.Barrier(4)

    def task():
        start.wait(timeout=10)
        got.append(store.fetch("dataset/x"))

    threads = [threading.Thread(target=task) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 4 and len(opened) == 1


FETCH_IN_A_PROCESS = """
import json, sys
from fusechat_core import store as S
st = S.ArtifactStore(sys.argv[1])
opened, hashed = [], []
real_open, real_sha = st.fs.open, S.sha256_file
st.fs.open = lambda path, mode="rb", **kw: (opened.append(path) if "shard-" in str(path) else None) or \\
    real_open(path, mode, **kw)
S.sha256_file = lambda path: hashed.append(str(path)) or real_sha(path)
sys.stdin.readline()  # every process started: fetch at once
print(json.dumps({"dest": str(st.fetch("train/t")), "opened": len(opened), "hashed": len(hashed)}))
"""


def test_processes_of_a_node_fetching_one_artifact_copy_it_once_and_hash_it_once(s3_env, tmp_path, monkeypatch):
    """A training's ranks (one process each) all fetched the pivot's 64 representation shards
    and the source's aligned shards: each copied them from S3 into the one cache folder, or
    found the copy and hashed all of it again. One copies and verifies; the others wait for it
    and trust each file the copy recorded as verified (unchanged since: same size and times)."""
    import subprocess
    import sys

    monkeypatch.setenv("FUSECHAT_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(f"s3://fusechat-test/{uuid.uuid4().hex}")
    with store.writer("train/t") as w:
        for i in range(3):
            w.write_bytes(f"shard-{i}.bin", os.urandom(1 << 20))
    procs = [subprocess.Popen([sys.executable, "-c", FETCH_IN_A_PROCESS, store.url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
             for _ in range(3)]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    got = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert len({g["dest"] for g in got}) == 1
    assert sorted(g["opened"] for g in got) == [0, 0, 3], got  # one copied the three files
    assert [g["hashed"] for g in got] == [0, 0, 0], got  # verified as copied, trusted by the others
    # a file changed in the copy since is hashed, found wrong, and copied again
    dest = Path(got[0]["dest"])
    (dest / "shard-1.bin").write_bytes(b"not what the manifest says")
    assert store.fetch("train/t") == dest and (dest / "shard-1.bin").stat().st_size == 1 << 20
