"""S3-specific behaviour of :class:`S3Tier`: retries, timeouts, errors, multipart, ranges.

Faults are injected by a real proxy (:mod:`faultproxy`) in front of a real moto server, both
on 127.0.0.1; the tier under test talks HTTP to the proxy exactly as it would to S3.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Callable

import pytest

from faultproxy import FaultKind, FaultProxy
from fixtures_s3 import ACCESS_KEY, S3Server
from tierckpt.config import CheckpointConfig
from tierckpt.errors import ConfigError, DurableTierError, DurableUnavailableError
from tierckpt.tiers.base import KeyNotFoundError
from tierckpt.tiers.s3 import S3Tier

MiB = 2**20
PART = 5 * MiB


def proxied(proxy: FaultProxy, bucket: str, **kw: object) -> S3Tier:
    """A tier on ``bucket`` that talks through the fault proxy, with quick retries."""
    args: dict[str, object] = {
        "endpoint_url": proxy.url,
        "part_size": PART,
        "max_concurrency": 4,
        "max_retries": 3,
        "timeout_s": 5.0,
        "backoff_init_s": 0.01,
        "backoff_max_s": 0.05,
    }
    args.update(kw)
    return S3Tier(f"s3://{bucket}/ns", **args)  # type: ignore[arg-type]


def statuses(proxy: FaultProxy, method: str, path_contains: str | None = None) -> list[int | None]:
    return [s.status for s in proxy.seen(method, path_contains=path_contains)]


def settle(proxy: FaultProxy, n: int, timeout_s: float = 2.0) -> None:
    """Wait until the proxy has recorded ``n`` requests (records land as answers go out)."""
    deadline = time.monotonic() + timeout_s
    while len(proxy.requests) < n and time.monotonic() < deadline:
        time.sleep(0.01)


# -- retries ------------------------------------------------------------------------------

Op = Callable[[S3Tier], None]


def _op_write(t: S3Tier) -> None:
    assert t.write("k", [b"payload"]) == 7
    assert bytes(t.read("k")) == b"payload"


def _op_read(t: S3Tier) -> None:
    assert bytes(t.read("seed")) == b"seed-bytes"


def _op_list(t: S3Tier) -> None:
    assert t.list("") == {"seed": 10}


def _op_part(t: S3Tier) -> None:
    data = os.urandom(11 * MiB)
    assert t.write("big", [data]) == len(data)
    assert bytes(t.read("big")) == data


def _op_delete(t: S3Tier) -> None:
    t.delete("seed")
    assert t.list("") == {}


OPS: dict[str, tuple[Op, str, str | None]] = {
    # name: (operation, method of the request to fail, path fragment to match)
    "put": (_op_write, "PUT", None),
    "get": (_op_read, "GET", "/seed"),
    "list": (_op_list, "GET", "list-type"),
    "multipart-part": (_op_part, "PUT", "partNumber=2"),
    "multipart-complete": (_op_part, "POST", "uploadId="),
    "bulk-delete": (_op_delete, "POST", "?delete"),
}


@pytest.mark.parametrize("kind", ["slowdown", "error500", "reset"])
@pytest.mark.parametrize("op", list(OPS))
def test_transient_fault_is_retried(
    fault_proxy: FaultProxy, s3_bucket: str, op: str, kind: FaultKind
) -> None:
    fn, method, fragment = OPS[op]
    tier = proxied(fault_proxy, s3_bucket)
    tier.write("seed", [b"seed-bytes"])
    fault_proxy.reset_log()
    fault_proxy.fail_next(kind, method=method, path_contains=fragment)
    fn(tier)
    assert fault_proxy.pending_faults == 0
    got = statuses(fault_proxy, method, fragment)
    expected_first = {"slowdown": 503, "error500": 500, "reset": None}[kind]
    assert got[0] == expected_first
    assert got[1] is not None and got[1] < 300  # the retry went through


def test_slowdown_on_put_then_get(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    tier = proxied(fault_proxy, s3_bucket)
    fault_proxy.fail_next("slowdown", 2, method="PUT")
    tier.write("a/b", [b"x" * 100])
    fault_proxy.fail_next("slowdown", 2, method="GET")
    assert bytes(tier.read("a/b")) == b"x" * 100
    assert statuses(fault_proxy, "PUT") == [503, 503, 200]
    assert statuses(fault_proxy, "GET") == [503, 503, 206]


def test_truncated_get_body_resumes(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    tier = proxied(fault_proxy, s3_bucket)
    data = os.urandom(3 * MiB)
    tier.write("obj", [data])
    fault_proxy.reset_log()
    fault_proxy.fail_next("truncate", method="GET")
    assert bytes(tier.read("obj")) == data
    gets = fault_proxy.seen("GET")
    assert gets[0].status is None and gets[0].fault == "truncate"
    assert gets[1].range is not None and not gets[1].range.startswith("bytes=0-")  # resumed


def test_retries_exhausted_names_the_object(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    tier = proxied(fault_proxy, s3_bucket, max_retries=2)
    tier.write("ckpt/data", [b"d"])
    fault_proxy.reset_log()
    fault_proxy.fail_next("slowdown", 100, method="GET")
    with pytest.raises(DurableTierError) as info:
        tier.read("ckpt/data")
    msg = str(info.value)
    assert not isinstance(info.value, KeyNotFoundError)
    assert f"s3://{s3_bucket}/ns/ckpt/data" in msg
    assert "SlowDown" in msg and "after 2 retries" in msg and "s3_max_concurrency" in msg
    assert statuses(fault_proxy, "GET") == [503, 503, 503]  # 1 try + 2 retries

    fault_proxy.clear_faults()
    fault_proxy.fail_next("error500", 100, method="PUT")
    with pytest.raises(DurableTierError, match=f"s3://{s3_bucket}/ns/ckpt/other.*HTTP 500"):
        tier.write("ckpt/other", [b"x"])
    fault_proxy.clear_faults()
    assert "other" not in tier.list("ckpt")


def test_resets_exhausted_raise(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    tier = proxied(fault_proxy, s3_bucket, max_retries=1)
    fault_proxy.fail_next("reset", 100)
    for call in (lambda: tier.write("k", [b"1"]), lambda: tier.write("m", [b"1"])):
        with pytest.raises(DurableTierError, match=f"s3://{s3_bucket}/ns/") as info:
            call()
        assert "reachable" in str(info.value)
    assert len(fault_proxy.seen("PUT")) == 4  # 2 tries each


def test_slow_response_times_out_and_is_retried(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    tier = proxied(fault_proxy, s3_bucket, timeout_s=1.0)
    tier.write("k", [b"v" * 10])
    fault_proxy.reset_log()
    start = time.monotonic()
    fault_proxy.fail_next("slow", method="GET", delay_s=10)
    assert bytes(tier.read("k")) == b"v" * 10
    fault_proxy.fail_next("slow", method="PUT", delay_s=10)
    tier.write("k2", [b"w"])
    fault_proxy.fail_next("slow", method="PUT", delay_s=10)
    assert tier.write("k3", [b"z"]) == 1
    assert time.monotonic() - start < 8.0  # three 1 s timeouts, not three 10 s stalls
    settle(fault_proxy, 6)
    assert statuses(fault_proxy, "GET")[-2:] == [None, 206]
    assert statuses(fault_proxy, "PUT") == [None, 200, None, 200]


def test_unresponsive_store_raises_in_bounded_time(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    tier = proxied(fault_proxy, s3_bucket, timeout_s=0.4, max_retries=1)
    fault_proxy.fail_next("slow", 100, delay_s=30)
    start = time.monotonic()
    with pytest.raises(DurableTierError, match="s3_timeout_s=0.4"):
        tier.read("k")
    assert time.monotonic() - start < 3.0


# -- availability -------------------------------------------------------------------------


def test_check_available_ok(s3_server: S3Server, s3_bucket: str) -> None:
    S3Tier(f"s3://{s3_bucket}/x", endpoint_url=s3_server.endpoint_url).check_available()


def test_missing_bucket_is_unavailable(s3_server: S3Server) -> None:
    tier = S3Tier("s3://tierckpt-no-such-bucket/prefix", endpoint_url=s3_server.endpoint_url)
    start = time.monotonic()
    with pytest.raises(DurableUnavailableError) as info:
        tier.check_available()
    assert time.monotonic() - start < 3.0
    msg = str(info.value)
    assert "Unable to fetch region for S3 bucket tierckpt-no-such-bucket" in msg
    assert "does not exist or is not reachable" in msg and "AWS_ENDPOINT_URL" in msg
    # Reads against it are not "missing key": the whole location is gone.
    with pytest.raises(DurableUnavailableError):
        tier.read("k")
    with pytest.raises(DurableUnavailableError):
        tier.list("")


def test_refused_endpoint_is_unavailable(s3_bucket: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    tier = S3Tier(f"s3://{s3_bucket}/p", endpoint_url=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(DurableUnavailableError, match=f"127.0.0.1:{port}"):
        tier.check_available()
    assert time.monotonic() - start < 5.0


def test_silent_endpoint_is_unavailable_quickly(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    tier = proxied(fault_proxy, s3_bucket, timeout_s=1.0, max_retries=8)
    fault_proxy.fail_next("slow", 100, delay_s=30)
    start = time.monotonic()
    with pytest.raises(DurableUnavailableError, match="no answer"):
        tier.check_available()
    assert time.monotonic() - start < 6.0  # 2 tries of 1 s, not 9 tries of 60 s


# -- multipart, ranged reads ----------------------------------------------------------------


def test_small_write_is_one_put_large_is_multipart(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    tier = proxied(fault_proxy, s3_bucket)
    tier.write("small", [b"a", b"b"])
    assert [(s.method, s.status) for s in fault_proxy.requests] == [("PUT", 200)]
    fault_proxy.reset_log()
    data = os.urandom(12 * MiB)
    tier.write("large", (data[i : i + MiB] for i in range(0, len(data), MiB)))
    settle(fault_proxy, 5)
    assert len(fault_proxy.seen("POST", path_contains="?uploads")) == 1
    assert len(fault_proxy.seen("PUT", path_contains="partNumber=")) == 3  # 5 + 5 + 2 MiB
    assert statuses(fault_proxy, "POST", "uploadId=") == [200]
    fault_proxy.reset_log()
    assert bytes(tier.read("large")) == data
    ranges = sorted(s.range or "" for s in fault_proxy.seen("GET"))
    assert ranges == sorted(
        f"bytes={s}-{min(s + PART, len(data)) - 1}" for s in range(0, len(data), PART)
    )


def test_put_file_is_multipart(fault_proxy: FaultProxy, s3_bucket: str, tmp_path: object) -> None:
    tier = proxied(fault_proxy, s3_bucket)
    path = os.path.join(str(tmp_path), "f.bin")
    data = os.urandom(11 * MiB)
    with open(path, "wb") as f:
        f.write(data)
    fault_proxy.fail_next("reset", method="PUT", path_contains="partNumber=")
    assert tier.put_file("f", path) == len(data)
    settle(fault_proxy, 6)
    assert len(fault_proxy.seen("PUT", path_contains="partNumber=")) == 4  # 3 parts + 1 retry
    assert bytes(tier.read("f")) == data


@pytest.mark.parametrize("abort_fails", [False, True])
@pytest.mark.parametrize("part", [1, 3])
@pytest.mark.parametrize("how", ["write", "put_file"])
def test_a_failed_part_leaves_no_open_multipart_upload(
    fault_proxy: FaultProxy,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: object,
    part: int,
    how: str,
    abort_fails: bool,
) -> None:
    """A part that fails, early or while the upload finishes, leaves no open upload whose
    parts S3 would bill, also when obstore's own abort of it fails."""
    tier = proxied(fault_proxy, s3_bucket, max_retries=0)
    data = os.urandom(3 * PART)
    path = os.path.join(str(tmp_path), "f.bin")
    with open(path, "wb") as f:
        f.write(data)
    fault_proxy.fail_next("error500", method="PUT", path_contains=f"partNumber={part}&")
    if abort_fails:
        fault_proxy.fail_next("error500", method="DELETE", path_contains="uploadId=")
    with pytest.raises(DurableTierError, match="HTTP 500"):
        if how == "write":
            tier.write("k", [data[i : i + MiB] for i in range(0, len(data), MiB)])
        else:
            tier.put_file("k", path)
    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert "k" not in tier.list("")
    assert len(statuses(fault_proxy, "PUT", "partNumber=")) >= part


def test_read_ranges(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    tier = proxied(fault_proxy, s3_bucket)
    data = os.urandom(12 * MiB)
    tier.write("blob", [data])
    ranges = [
        (10, 100),  # near the next one: one request for both
        (5000, 7),
        (0, 0),  # empty
        (3 * MiB, 1000),  # far away: a request of its own
        (20, 50),  # overlaps the first
        (PART - 3, 10),  # straddles a part boundary of the covering spans
        (12 * MiB - 5, 5),  # the last bytes
    ]
    fault_proxy.reset_log()
    got = tier.read_ranges("blob", ranges)
    assert [bytes(g) for g in got] == [data[o : o + n] for o, n in ranges]
    gets = fault_proxy.seen("GET")
    assert len(gets) < len(ranges)  # near ranges were coalesced
    # A plan that covers the whole object: part-sized requests, not one 12 MiB GET.
    fault_proxy.reset_log()
    whole = [(o, MiB) for o in range(0, 12 * MiB, MiB)]
    assert b"".join(bytes(g) for g in tier.read_ranges("blob", whole)) == data
    assert len(fault_proxy.seen("GET")) == 3
    with pytest.raises(KeyNotFoundError, match="shorter than expected"):
        tier.read_ranges("blob", [(0, 10), (12 * MiB - 5, 10)])
    with pytest.raises(KeyNotFoundError, match="nope"):
        tier.read_ranges("nope", [(0, 10)])
    with pytest.raises(ValueError):
        tier.read_ranges("blob", [(-1, 10)])
    assert tier.read_ranges("blob", []) == []


def test_overwrite_during_a_long_read_is_detected(
    fault_proxy: FaultProxy, s3_bucket: str, s3_server: S3Server
) -> None:
    tier = proxied(fault_proxy, s3_bucket, timeout_s=5.0)
    tier.write("obj", [os.urandom(11 * MiB)])
    fault_proxy.reset_log()
    # Request 1 is the first piece; stall the others while the object is replaced.
    fault_proxy.fail_at([2, 3], "slow", delay_s=2.0)
    result: list[BaseException | None] = []

    def read() -> None:
        try:
            tier.read("obj")
            result.append(None)
        except BaseException as e:
            result.append(e)

    client = s3_server.client()
    reader = threading.Thread(target=read)
    reader.start()
    settle(fault_proxy, 1, timeout_s=10)  # moto has answered the first piece
    client.put_object(Bucket=s3_bucket, Key="ns/obj", Body=b"new")
    reader.join(timeout=20)
    assert isinstance(result[0], DurableTierError)
    assert "overwritten while it was being read" in str(result[0])


# -- configuration ------------------------------------------------------------------------


def test_endpoint_from_environment(s3_server: S3Server, s3_bucket: str) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    tier = S3Tier(f"s3://{s3_bucket}/env")
    assert tier.endpoint_url == s3_server.endpoint_url
    tier.write("k", [b"v"])
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="env/k")["Body"].read()
    assert body == b"v"


def test_explicit_endpoint_overrides_environment(
    fault_proxy: FaultProxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    tier = S3Tier(f"s3://{s3_bucket}/p", endpoint_url=fault_proxy.url, max_retries=0)
    tier.write("k", [b"v"])
    assert [s.method for s in fault_proxy.requests] == ["PUT"]
    assert all(s.access_key == ACCESS_KEY for s in fault_proxy.requests)


def test_credentials_from_profile_file(
    fault_proxy: FaultProxy, s3_bucket: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = os.path.join(str(tmp_path), "credentials")
    with open(creds, "w") as f:
        f.write("[default]\naws_access_key_id = PROFILEKEY\naws_secret_access_key = s\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", creds)
    proxied(fault_proxy, s3_bucket).write("k", [b"v"])
    assert [s.access_key for s in fault_proxy.requests] == ["PROFILEKEY"]


def test_from_config(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    config = CheckpointConfig(
        namespace="job",
        world_size=1,
        durable_base_path=f"s3://{s3_bucket}/ckpt/",
        s3_endpoint_url=fault_proxy.url,
        s3_region="eu-west-1",
        s3_part_size=PART,
        s3_max_concurrency=3,
        s3_max_retries=4,
        s3_timeout_s=7.0,
    )
    tier = S3Tier.from_config(config)
    assert tier.url == f"s3://{s3_bucket}/ckpt"
    assert (tier.part_size, tier.max_concurrency, tier.max_retries, tier.timeout_s) == (
        PART,
        3,
        4,
        7.0,
    )
    assert tier.region == "eu-west-1" and tier.endpoint_url == fault_proxy.url
    tier.write("k", [b"v"])
    assert fault_proxy.seen("PUT", path_contains=f"/{s3_bucket}/ckpt/k")
    with pytest.raises(ConfigError, match="s3://"):
        S3Tier.from_config(CheckpointConfig(namespace="job", world_size=1))


@pytest.mark.parametrize(
    ("url", "kw"),
    [
        ("file:///tmp/x", {}),
        ("s3:///no-bucket", {}),
        ("s3://b/p", {"part_size": MiB}),
        ("s3://b/p", {"max_concurrency": 0}),
        ("s3://b/p", {"timeout_s": 0}),
    ],
)
def test_bad_arguments(url: str, kw: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        S3Tier(url, **kw)  # type: ignore[arg-type]


def test_pickle_round_trip(s3_server: S3Server, s3_bucket: str) -> None:
    tier = S3Tier(f"s3://{s3_bucket}/p", endpoint_url=s3_server.endpoint_url, part_size=PART)
    tier.write("k", [b"v"])
    clone = pickle.loads(pickle.dumps(tier))
    assert (clone.url, clone.part_size, clone.endpoint_url) == (tier.url, PART, tier.endpoint_url)
    assert bytes(clone.read("k")) == b"v"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_fails_fast_instead_of_hanging(s3_server: S3Server, s3_bucket: str) -> None:
    tier = S3Tier(f"s3://{s3_bucket}/p", endpoint_url=s3_server.endpoint_url, max_retries=0)
    tier.write("k", [b"v"])  # obstore's runtime now runs in this process
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what reading did, then leave at once
        try:
            tier.read("k")
            msg = b"read worked"
        except DurableTierError as e:
            msg = str(e).encode()[:4000]
        except BaseException as e:
            msg = repr(e).encode()[:4000]
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.02)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    assert "forked from process" in out and "'spawn'" in out, out
    assert bytes(tier.read("k")) == b"v"  # the parent is unaffected


def test_missing_obstore_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(ImportError, match=r"pip install tierckpt\[s3\]"):
        S3Tier("s3://bucket/prefix")


def test_fault_proxy_stops_cleanly(s3_server: S3Server) -> None:
    before = {t.ident for t in threading.enumerate()}
    proxy = FaultProxy(s3_server.endpoint_url).start()
    proxy.fail_next("slow", delay_s=30)
    stalled = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    idle = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        stalled.sendall(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        deadline = time.monotonic() + 5
        while proxy.pending_faults and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler is now stalling
        # Both connections accepted: one still in the listen backlog would get a RST from
        # the kernel when the listener closes, not the proxy's orderly drop.
        while len(proxy._conns) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(proxy._conns) == 2
        start = time.monotonic()
        proxy.stop()
        assert time.monotonic() - start < 3.0
        assert stalled.recv(1024) == b""  # dropped, never answered
        assert idle.recv(1024) == b""
    finally:
        stalled.close()
        idle.close()
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert left == []
    assert [s.status for s in proxy.requests] == [None]
    with pytest.raises(ValueError, match="127.0.0.1"):
        FaultProxy("http://10.0.0.1:80")
