"""Loopback S3 servers for the benchmark: moto (always) and s3rver (when ``npx`` has it).

Each server runs as its own process group on 127.0.0.1 and is killed on :meth:`close`, at
exit, and on failure. Its CPU time (the process and its children) is sampled with psutil,
so a run can tell whether the server, not the client, was the bound.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

__all__ = ["Server", "delete_prefix", "empty_and_delete_bucket", "serving", "start_server"]

S3RVER = "s3rver@3.7.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the server did not listen on 127.0.0.1:{port} within {timeout_s}s")


@dataclass
class Server:
    """A running S3 server on loopback."""

    name: str
    endpoint_url: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes]
    data_dir: str | None = None
    _ps: Any = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """The AWS environment pointing every client (ranks included) at this server only."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process and its children so far."""
        if self._ps is None:
            self._ps = psutil.Process(self.proc.pid)
        total = 0.0
        with contextlib.suppress(psutil.Error):
            for p in [self._ps, *self._ps.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def start_server(name: str, data_root: str) -> Server:
    """Start ``moto`` or ``s3rver`` on a free loopback port."""
    port = _free_port()
    data_dir = None
    if name == "moto":
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        cmd = [exe, "-H", "127.0.0.1", "-p", str(port)]
        keys = ("tierckpt-bench", "tierckpt-bench-secret")
    elif name == "s3rver":
        npx = shutil.which("npx")
        if npx is None:
            raise RuntimeError("npx is not installed")
        data_dir = os.path.join(data_root, f"s3rver-{port}")
        os.makedirs(data_dir)
        cmd = [npx, "--yes", S3RVER, "-d", data_dir, "-a", "127.0.0.1", "-p", str(port), "-s"]
        cmd.append("--allow-mismatched-signatures")
        keys = ("S3RVER", "S3RVER")
    else:
        raise ValueError(f"unknown server {name!r}: moto or s3rver")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = Server(name, f"http://127.0.0.1:{port}", keys[0], keys[1], proc, data_dir)
    atexit.register(server.close)
    try:
        _wait_listening(port, proc, timeout_s=120.0)
    except BaseException:
        server.close()
        raise
    return server


def delete_prefix(client: Any, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix``; how many."""
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        for i in range(0, len(objs), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": objs[i : i + 1000]})
        n += len(objs)
    return n


def empty_and_delete_bucket(client: Any, bucket: str) -> None:
    """Abort uploads, delete every object, delete the bucket; a missing bucket is fine."""
    with contextlib.suppress(client.exceptions.NoSuchBucket):
        try:
            uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        except client.exceptions.ClientError:  # s3rver: NotImplemented
            uploads = []
        for up in uploads:
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        delete_prefix(client, bucket, "")
        client.delete_bucket(Bucket=bucket)


@contextlib.contextmanager
def serving(name: str, data_root: str, bucket: str) -> Iterator[tuple[Server, Any]]:
    """``(server, boto3 client)`` of a started server with ``bucket`` created, its endpoint
    and keys in ``os.environ``; on exit the bucket is emptied and deleted, the server
    stopped and the environment restored."""
    server = start_server(name, data_root)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    client = server.client()
    try:
        client.create_bucket(Bucket=bucket)
        yield server, client
    finally:
        try:
            empty_and_delete_bucket(client, bucket)
        finally:
            server.close()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
