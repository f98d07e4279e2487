"""S3 fixtures: a moto server on loopback, fresh buckets, and a fault-injecting proxy.

``s3_server`` (session) starts moto's ``ThreadedMotoServer`` on 127.0.0.1 (a free port) and,
for the rest of the session, points the standard AWS environment at it: fake credentials,
``AWS_REGION`` / ``AWS_DEFAULT_REGION`` = us-east-1, ``AWS_ENDPOINT_URL`` = the server, no
profile, no instance metadata. Nothing reaches beyond loopback. The previous environment is
restored when the session ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from faultproxy import FaultProxy

REGION = "us-east-1"
ACCESS_KEY = "tierckpt-test-key"

# Every variable that could steer an AWS client elsewhere (or to real credentials).
_ENV_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AWS_ALLOW_HTTP",
    "AWS_BUCKET",
    "AWS_BUCKET_NAME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
)


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server."""

    endpoint_url: str
    host: str
    port: int
    region: str = REGION

    def client(self) -> Any:
        """A boto3 S3 client for this server (for set-up and inspection in tests)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)


def _free_bucket_name() -> str:
    return f"tierckpt-{uuid.uuid4().hex[:16]}"


def _wait_listening(host: str, port: int, timeout_s: float = 10.0) -> None:
    with socket.create_connection((host, port), timeout=timeout_s):
        pass


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 on 127.0.0.1, with the AWS environment pointed at it for the session."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    werkzeug = logging.getLogger("werkzeug")
    saved_level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        if host != "127.0.0.1":
            raise RuntimeError(f"moto bound {host}, not loopback")
        _wait_listening(host, port)
        endpoint = f"http://127.0.0.1:{port}"
        for k in _ENV_KEYS:
            os.environ.pop(k, None)
        os.environ.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY="tierckpt-test-secret",
            AWS_REGION=REGION,
            AWS_DEFAULT_REGION=REGION,
            AWS_ENDPOINT_URL=endpoint,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_CONFIG_FILE=os.devnull,
            NO_PROXY="127.0.0.1,localhost",
        )
        yield S3Server(endpoint_url=endpoint, host=host, port=port)
    finally:
        server.stop()
        inner = getattr(server, "_server", None)
        if inner is not None:
            inner.server_close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        werkzeug.setLevel(saved_level)


def empty_and_delete(client: Any, bucket: str) -> None:
    try:
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        for up in uploads:
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objs, "Quiet": True})
        client.delete_bucket(Bucket=bucket)
    except client.exceptions.NoSuchBucket:
        pass


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket on the moto server (emptied and removed afterwards)."""
    with bucket_on(s3_server) as name:
        yield name


@pytest.fixture
def fault_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` on 127.0.0.1 in front of the moto server (stopped afterwards)."""
    with proxy_to(s3_server) as proxy:
        yield proxy


# ------------------------------------------------ context managers for module-scoped fixtures


@contextlib.contextmanager
def bucket_on(server: S3Server) -> Iterator[str]:
    """A fresh bucket, emptied and removed afterwards (also when the test failed)."""
    client = server.client()
    name = _free_bucket_name()
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        empty_and_delete(client, name)


@contextlib.contextmanager
def shm_root() -> Iterator[str]:
    """A memory root ``/dev/shm/tierckpt-test-<uuid>``, removed afterwards whatever happened."""
    path = f"/dev/shm/tierckpt-test-{uuid.uuid4().hex}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def proxy_to(server: S3Server) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``server``, its faults cleared and it stopped after."""
    proxy = FaultProxy(server.endpoint_url).start()
    try:
        yield proxy
    finally:
        proxy.clear_faults()
        proxy.stop()
