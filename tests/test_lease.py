"""One writer per artifact: the lease in the store (SeaweedFS S3 and a local folder).

A zombie (a writer frozen mid-artifact, as a run marked Crashed but still alive is) and a
retry race on one address: while the zombie's lease lives the retry is refused with one
line naming the holder; once it expires the retry takes over and commits; the zombie,
woken, can write nothing more and never commits. The committed artifact is the retry's,
byte for byte, and verifies clean.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fusechat_core.store import LEASE, MANIFEST, ArtifactStore, Lease, LeaseError, StoreError

REPO = Path(__file__).resolve().parents[1]
TTL = 2.0

ZOMBIE = r'''
import sys, time
from fusechat_core.store import ArtifactStore, StoreError
store = ArtifactStore(sys.argv[1])
try:
    with store.writer(sys.argv[2]) as w:
        w.write_bytes("a.bin", b"zombie a")
        print("holding", w.lease.holder, flush=True)
        sys.stdin.readline()  # frozen (SIGSTOP) while it waits here; then goes on
        w.write_bytes("b.bin", b"zombie b")
    print("committed", flush=True)
except StoreError as exc:
    print("refused:", exc, flush=True)
    sys.exit(3)
'''


def _race(tmp_path: Path, url: str) -> None:
    address = f"race/{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FUSECHAT_LEASE_TTL": str(TTL)}
    zombie = subprocess.Popen([sys.executable, "-c", ZOMBIE, url, address], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = zombie.stdout.readline()
        assert line.startswith("holding "), line + zombie.stdout.read()
        zombie_holder = line.split()[1]
        store = ArtifactStore(url)

        # a second writer while the zombie's lease lives: refused, one line naming the holder
        t0 = time.monotonic()
        with pytest.raises(LeaseError) as held:
            with store.lease(address, wait=0.5):
                pass
        assert zombie_holder in str(held.value) and "\n" not in str(held.value), held.value
        assert time.monotonic() - t0 < TTL + 5

        # the zombie freezes; its lease runs out; the retry takes over and commits
        os.kill(zombie.pid, signal.SIGSTOP)
        with store.writer(address) as w:
            w.write_bytes("a.bin", b"retry a")
            # the zombie wakes up mid-way and tries to go on: refused before writing anything
            os.kill(zombie.pid, signal.SIGCONT)
            out, _ = zombie.communicate("go\n", timeout=60)
            assert zombie.returncode == 3, out
            assert f"taken over by {w.lease.holder}" in out and "not writing" in out, out
            w.write_bytes("b.bin", b"retry b")
        committed = store.manifest(address)

        assert store.manifest(address) == committed
        assert store.read_bytes(address, "a.bin") == b"retry a"
        assert store.read_bytes(address, "b.bin") == b"retry b"
        assert store.is_complete(address, verify=True)
        # the retry released its lease: the next writer gets it at once
        with store.lease(address, wait=0):
            pass
    finally:
        if zombie.poll() is None:
            os.kill(zombie.pid, signal.SIGCONT)
            zombie.kill()
            zombie.wait()


def test_zombie_and_retry_race_on_one_address_on_s3(tmp_path, s3_env, monkeypatch):
    monkeypatch.setenv("FUSECHAT_LEASE_TTL", str(TTL))
    _race(tmp_path, f"s3://fusechat-test/lease-{uuid.uuid4().hex[:8]}")


def test_zombie_and_retry_race_on_one_address_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSECHAT_LEASE_TTL", str(TTL))
    _race(tmp_path, f"file://{tmp_path}/store")


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    """A local store, and one on a real S3 server (SeaweedFS)."""
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        return ArtifactStore(f"s3://fusechat-test/lease-{uuid.uuid4().hex[:8]}")
    return ArtifactStore(f"file://{tmp_path}/store")


def test_a_manifest_another_writer_committed_is_never_overwritten(store):
    """The last guard: the manifest is written only where none is (S3 If-None-Match: *)."""
    with store.writer("x") as first:
        first.write_bytes("f.bin", b"first")
    theirs = store.manifest("x").to_json()
    store.fs.pipe_file(store._path("x", "f.bin"), b"rotten")  # damaged: the second writer redoes it
    with pytest.raises(LeaseError, match="another writer committed it"):
        with store.writer("x") as second:
            second.write_bytes("f.bin", b"first")
            store.fs.pipe_file(store._path("x", MANIFEST), theirs.encode())  # the other writer's commit
    assert store.manifest("x").to_json() == theirs


def test_nested_writers_use_the_lease_held_above(tmp_path):
    """A long writer (training) holds its target's lease; its checkpoints under it need no other."""
    store = ArtifactStore(f"file://{tmp_path}/store")
    with store.lease("train/t1") as lease:
        with store.writer("train/t1/checkpoint-0000002") as w:
            assert w.lease is lease
            w.write_bytes("state.json", b"{}")
        assert (Path(store.root) / "train/t1/.lease").exists()
    assert store.is_complete("train/t1/checkpoint-0000002")
    assert not (Path(store.root) / "train/t1/.lease").exists()


def test_a_sigkilled_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """A run SIGKILLed mid-artifact (no cleanup) leaves its lease behind; a rerun on the same
    machine takes it over at once rather than waiting out the lifetime, while a live holder
    with the same lifetime still refuses it."""
    url = f"file://{tmp_path / 'store'}"
    address = "killed/a"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FUSECHAT_LEASE_TTL": "300"}
    holder = subprocess.Popen([sys.executable, "-c", ZOMBIE, url, address], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = holder.stdout.readline()
        assert line.startswith("holding "), line + holder.stdout.read()
        store = ArtifactStore(url)
        with pytest.raises(LeaseError, match=line.split()[1]):  # alive: its 300 s lease stands
            with store.lease(address, wait=0.5):
                pass
        holder.kill()
        holder.wait()
        t0 = time.monotonic()
        with store.writer(address) as w:
            w.write_bytes("a.bin", b"rerun")
        assert time.monotonic() - t0 < 10  # not the 300 s lifetime
        assert store.read_bytes(address, "a.bin") == b"rerun" and store.is_complete(address, verify=True)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@pytest.mark.parametrize("pid_ns", ["pid:[1]", None])
def test_a_holder_in_another_pid_namespace_under_this_host_name_is_not_taken_for_dead(tmp_path, pid_ns):
    """Pods with hostNetwork share the node's host name, each with its own PIDs: another pod's
    live holder's PID is not in ours. Its lease stands until it expires; so does a record that
    does not say its namespace (an older version's)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID that exists in no process here
    store = ArtifactStore(f"file://{tmp_path}/store")
    path = Path(store._path("x", LEASE))
    path.parent.mkdir(parents=True)
    record = {"holder": "other-pod", "host": socket.gethostname(), "pid": gone.pid, "renewed": time.time(),
              "expires": time.time() + 300}
    if pid_ns is not None:
        record["pid_ns"] = pid_ns
    path.write_text(json.dumps(record))
    with pytest.raises(LeaseError, match="being written by other-pod"):
        Lease(store, "x").acquire(wait=0.5)
    # the same record from this namespace is a dead holder's: taken over at once
    path.write_text(json.dumps({**record, "pid_ns": os.readlink("/proc/self/ns/pid")}))
    lease = Lease(store, "x")
    lease.acquire(wait=0.5)
    lease.release()


def _resend_first_put(store: ArtifactStore, suffix: str) -> list[int]:
    """Make botocore send every PutObject to a key ending in ``suffix`` twice: its own retry
    hook asks for a retry after the first attempt, exactly as when that attempt's answer is
    lost (a timeout, a dropped connection) though S3 stored the object. Returns the attempt
    numbers seen, to show the resend happened."""
    seen: list[int] = []

    def again(attempts, request_dict, **kwargs):
        if request_dict["url"].endswith(suffix):
            seen.append(attempts)
            if attempts == 1:
                return 0  # retry at once
        return None

    store.fs.connect()
    store.fs.s3.meta.events.register("needs-retry.s3.PutObject", again)
    return seen


def test_a_resent_conditional_write_that_had_landed_is_ours(s3_env, monkeypatch):
    """S3 writes under a condition (a lease where none is, a renewal over our own record, a
    manifest where none is); when the SDK resends such a request after its answer was lost,
    the resend fails its own condition (412). Before, a writer then waited out its own lease
    as if another held it, gave up its lease on a renewal, or refused to commit a finished
    artifact ("another writer committed it"): on real S3, one lost answer failed a training
    task at its very end. Now the object being this very body makes the write ours, while
    another writer's object still wins."""
    monkeypatch.setenv("FUSECHAT_LEASE_TTL", "30")
    store = ArtifactStore(f"s3://fusechat-test/resend-{uuid.uuid4().hex[:8]}")
    leases = _resend_first_put(store, "/.lease")
    manifests = _resend_first_put(store, "/" + MANIFEST)

    t0 = time.monotonic()
    with store.writer("t/a") as w:  # acquire: create-if-absent, resent
        assert leases == [1, 2] and time.monotonic() - t0 < 10  # not the 30 s lifetime
        record, version = w.lease.read()
        assert record["holder"] == w.lease.holder and version == w.lease.token
        # the lease is really held: another writer is refused, naming this one
        with pytest.raises(LeaseError, match=w.lease.holder):
            Lease(ArtifactStore(store.url), "t/a").acquire(wait=0.5)
        w.lease.renew()  # renewal over our own record (If-Match), resent
        assert leases == [1, 2, 1, 2] and w.lease.lost is None
        assert w.lease.read()[1] == w.lease.token
        w.lease.check()
        w.write_bytes("f.bin", b"trained")
    assert manifests == [1, 2]  # the commit was resent too, and committed
    assert store.is_complete("t/a", verify=True) and store.read_bytes("t/a", "f.bin") == b"trained"

    # another writer's object is still another writer's: a record someone else wrote over
    # ours loses us the lease at the next renewal, and a manifest already there is not ours
    with store.lease("t/b") as lease:
        theirs = json.dumps({"holder": "elsewhere:1:feedface", "expires": time.time() + 30}).encode()
        store.fs.pipe_file(store._path("t/b", ".lease"), theirs)
        lease.renew()
        assert lease.lost == "its lease was taken over by elsewhere:1:feedface"
    theirs = store.manifest("t/a").to_json().encode()
    with pytest.raises(LeaseError, match="another writer committed it"):
        with store.writer("t/c") as late:
            late.write_bytes("f.bin", b"late")
            store.fs.pipe_file(store._path("t/c", MANIFEST), theirs)  # the other writer's commit
    # resent: our commit of t/a, the other writer's plain PUT, our refused commit
    assert manifests == [1, 2] * 3 and store.fs.cat_file(store._path("t/c", MANIFEST)) == theirs


def test_a_412_is_read_from_the_answer_not_from_digits_in_the_message():
    """Addresses are hex: an unrelated S3 error naming one must not read as 'another writer'.
    The answers are botocore's own errors, wrapped as s3fs wraps them."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from fusechat_core.store import _conditional_conflict, _precondition_failed

    def answer(code: str, status: int, message: str) -> BaseException:
        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": message},
                                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"))

    denied = answer("AccessDenied", 403, "Access Denied to s3://b/dataset/4127a0c9e1f0/MANIFEST.json")
    assert "412" in str(denied) and not _precondition_failed(denied) and not _conditional_conflict(denied)
    refused = answer("PreconditionFailed", 412, "At least one of the pre-conditions you specified did not hold")
    assert _precondition_failed(refused) and not _conditional_conflict(refused)
    # AWS's 409 on racing conditional writes is retried, not taken for another writer's object
    # (SeaweedFS never answers 409, so only its reading is checked here)
    raced = answer("ConditionalRequestConflict", 409, "A conflicting operation occurred")
    assert _conditional_conflict(raced) and not _precondition_failed(raced)


def test_a_lease_file_without_a_record_holds_a_lifetime_from_when_it_was_written(tmp_path, monkeypatch):
    """A lease file that is not a record (an older version's writer between creating the
    file and writing its record; a torn write) is not free for the first reader to take:
    it holds until a lifetime after it was written."""
    monkeypatch.setenv("FUSECHAT_LEASE_TTL", str(TTL))
    store = ArtifactStore(f"file://{tmp_path}/store")
    path = Path(store._path("x", LEASE))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    with pytest.raises(LeaseError, match="'x' is being written"):
        Lease(store, "x").acquire(wait=TTL / 2)
    old = time.time() - 3 * TTL
    os.utime(path, (old, old))
    lease = Lease(store, "x")
    lease.acquire(wait=TTL / 2)
    try:
        assert lease.read()[0]["holder"] == lease.holder
        assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # the new record went in whole
    finally:
        lease.release()


def test_a_file_replaced_after_it_was_written_is_not_committed_over(store):
    """A writer that lost its lease mid-file (frozen, its lease taken over) can still put that
    file in place when it wakes, over the new holder's. The new holder's commit must not
    vouch for bytes it did not write."""
    with pytest.raises(LeaseError, match=r"'x': f.bin was replaced after this writer wrote it"):
        with store.writer("x") as w:
            w.write_bytes("f.bin", b"the holder's bytes")
            w.write_bytes("g.bin", b"untouched")
            time.sleep(0.01)  # a later mtime, as a later write has
            store.fs.pipe_file(store._path("x", "f.bin"), b"the zombie's bytes")  # the woken zombie's file
    assert store.manifest("x") is None and not store.is_complete("x")
    # the next writer redoes the artifact cleanly
    with store.writer("x") as w:
        w.write_bytes("f.bin", b"the holder's bytes")
    assert store.is_complete("x", verify=True) and store.read_bytes("x", "f.bin") == b"the holder's bytes"


def test_a_server_that_ignores_conditional_writes_is_refused_before_anything_is_written(s3_env):
    """Some S3-compatible servers ignore If-None-Match / If-Match on PUT: every writer would
    get every lease. Shown here by SeaweedFS receiving the PUTs without their conditions
    (dropped before signing, as a server ignoring them would read them)."""
    from fusechat_core import store as store_module

    url = f"s3://fusechat-test/unconditional-{uuid.uuid4().hex[:8]}"
    store = ArtifactStore(url)
    store.fs.connect()

    def drop_conditions(request, **kwargs):
        for header in ("If-None-Match", "If-Match"):
            if header in request.headers:
                del request.headers[header]

    store.fs.s3.meta.events.register("before-sign.s3.PutObject", drop_conditions)
    store_module._HONOURS_CONDITIONS.clear()  # checked again, by this client
    with pytest.raises(StoreError, match=r"the S3 server ignores If-None-Match: \* and If-Match on PUT, so "
                                         r"leases cannot keep one writer per artifact"):
        with store.writer("x") as w:
            w.write_bytes("f.bin", b"never")
    bucket, prefix, _ = store.fs.split_path(store.root)
    listed = store.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix + "/")
    assert [o["Key"] for o in listed.get("Contents", [])] == []  # no lease, no file, no probe left behind
    # the same server, conditions intact: accepted, and checked once per process and bucket
    store_module._HONOURS_CONDITIONS.clear()
    honest = ArtifactStore(url)
    with honest.writer("x") as w:
        w.write_bytes("f.bin", b"kept")
    assert honest.is_complete("x") and len(store_module._HONOURS_CONDITIONS) == 1
