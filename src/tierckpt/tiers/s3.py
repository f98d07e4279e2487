"""The durable tier on S3 or any S3-compatible server, through obstore.

Requests are retried by obstore itself (exponential backoff with jitter, bounded by
``max_retries`` and a retry timeout): throttling (``503 SlowDown``), other 5xx, connection
errors, and, for idempotent requests (GET, HEAD, LIST, plain PUT, multipart parts), timeouts,
resets and bodies cut off mid-way (a GET resumes where the body stopped). obstore does *not*
retry a reset or timeout of the two non-idempotent requests we send, the create-only PUT
(``If-None-Match: *``) and the bulk ``DeleteObjects`` POST; :class:`S3Tier` adds a small
bounded retry for exactly those (see :meth:`S3Tier._retry_transport`).

Writes of more than one part stream through a multipart upload (``part_size`` parts,
``max_concurrency`` in flight), so memory stays bounded; reads larger than one part are split
into ``part_size`` ranged GETs fetched in parallel, each request bounded by ``timeout_s``.

obstore is not fork-safe: a process forked after its parent used S3 gets a clear
:class:`DurableTierError` here instead of hanging; start such workers with ``spawn``.
"""

from __future__ import annotations

import bisect
import builtins
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from ..errors import ConfigError, DurableTierError, DurableUnavailableError
from .base import Buffer, KeyNotFoundError

if TYPE_CHECKING:
    from obstore import GetOptions, ObjectMeta
    from obstore.store import ClientConfig, RetryConfig, S3Config, S3Store

    from ..config import CheckpointConfig

__all__ = ["S3Tier"]

_T = TypeVar("_T")
_MIN_PART = 5 * 2**20
_STATUS = re.compile(r"status code: (\d{3})")
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_RETRIES = re.compile(r"after (\d+) retries")
_INSTALL_HINT = "The s3:// durable tier needs obstore: pip install tierckpt[s3]"


def _obstore() -> ModuleType:
    """Import obstore on first use, with an install hint when it is missing."""
    try:
        import obstore
        import obstore.exceptions
        import obstore.store
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return obstore


_runtime_pid: int | None = None


def _claim_runtime() -> None:
    """Fail fast instead of hanging in a child forked from a process that used obstore.

    obstore's tokio runtime does not survive ``fork()``: its threads are gone in the child
    and every request there blocks forever. Processes that talk to S3 must be started with
    the ``spawn`` or ``forkserver`` method, or fork before the parent first uses S3.
    """
    global _runtime_pid
    pid = os.getpid()
    if _runtime_pid is None:
        _runtime_pid = pid
    elif _runtime_pid != pid:
        raise DurableTierError(
            f"The S3 durable tier cannot be used in process {pid}: it was forked from process "
            f"{_runtime_pid}, which had already used S3, and obstore does not survive fork(). "
            "Start worker processes with multiprocessing's 'spawn' or 'forkserver' method."
        )


def _byte_view(chunk: Buffer) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer (obstore takes uint8 only)."""
    view = memoryview(chunk)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _parts(chunks: Iterable[Buffer], part_size: int) -> Iterator[bytearray]:
    """Re-cut ``chunks`` into fresh ``part_size`` buffers (the last one shorter).

    Copying into new buffers keeps the upload correct when a caller reuses one buffer
    between yields: obstore keeps a reference to each item until its part is sent.
    """
    part = bytearray(part_size)
    filled = 0
    for chunk in chunks:
        view = _byte_view(chunk)
        while view:
            take = min(part_size - filled, len(view))
            part[filled : filled + take] = view[:take]
            filled += take
            view = view[take:]
            if filled == part_size:
                yield part
                part = bytearray(part_size)
                filled = 0
    if filled:
        del part[filled:]
        yield part


def _first_line(e: BaseException, limit: int = 240) -> str:
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _status(e: BaseException) -> int | None:
    m = _STATUS.search(str(e))
    return int(m.group(1)) if m else None


def _is_transport_error(e: BaseException) -> bool:
    """A connection error, reset or timeout (no HTTP status came back)."""
    if not isinstance(e, _obstore().exceptions.GenericError):
        return False
    text = _first_line(e, 10_000)
    return "non-2xx status code" not in text and (
        "HTTP error" in text or "error sending request" in text or "timed out" in text.lower()
    )


class S3Tier:
    """Blobs as objects under ``s3://bucket/prefix``; keys are relative to the prefix.

    Credentials and region come from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
    web identity, ECS / EC2 instance roles), or, when no keys are in the environment but a
    profile is configured (``AWS_PROFILE`` or ``~/.aws/credentials``), from boto3's chain.
    ``endpoint_url`` overrides ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; with an endpoint,
    path-style addressing is used and ``http://`` is allowed.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "durable",
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = 32 * 2**20,
        max_concurrency: int = 8,
        max_retries: int = 8,
        timeout_s: float = 60.0,
        retry_timeout_s: float | None = None,
        backoff_init_s: float = 0.1,
        backoff_max_s: float = 15.0,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(
                f"Invalid S3 tier base path {url!r}: expected s3://<bucket>/<prefix>, "
                "e.g. s3://my-bucket/checkpoints."
            )
        if part_size < _MIN_PART:
            raise ConfigError(f"part_size={part_size}: S3 parts must be >= 5 MiB.")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ConfigError("max_concurrency must be >= 1, max_retries >= 0, timeout_s > 0.")
        self._args: dict[str, Any] = {
            "url": url,
            "name": name,
            "endpoint_url": endpoint_url,
            "region": region,
            "part_size": part_size,
            "max_concurrency": max_concurrency,
            "max_retries": max_retries,
            "timeout_s": timeout_s,
            "retry_timeout_s": retry_timeout_s,
            "backoff_init_s": backoff_init_s,
            "backoff_max_s": backoff_max_s,
        }
        self._ob = _obstore()
        self.name = name
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        self.region = region
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = float(timeout_s)
        # obstore advises < 5 min: retried requests are not re-signed.
        self.retry_timeout_s = (
            float(retry_timeout_s)
            if retry_timeout_s is not None
            else min(300.0, max(30.0, (max_retries + 1) * self.timeout_s))
        )
        self.backoff_init_s = backoff_init_s
        self.backoff_max_s = backoff_max_s
        self._provider = None if os.environ.get("AWS_ACCESS_KEY_ID") else _profile_credentials()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._client = self._make_store(
            max_retries=max_retries,
            timeout_s=self.timeout_s,
            connect_timeout_s=min(self.timeout_s, 10.0),
            retry_timeout_s=self.retry_timeout_s,
            backoff_init_s=backoff_init_s,
            backoff_max_s=backoff_max_s,
        )

    @classmethod
    def from_config(cls, config: CheckpointConfig) -> S3Tier:
        """The durable tier described by ``config`` (its ``durable_base_path`` and ``s3_*``)."""
        url = config.durable_base_path
        if not url or not url.startswith("s3://"):
            raise ConfigError(
                f"durable_base_path={url!r} is not an s3:// URL; S3Tier needs s3://bucket/prefix."
            )
        return cls(
            url,
            endpoint_url=config.s3_endpoint_url,
            region=config.s3_region,
            part_size=config.s3_part_size,
            max_concurrency=config.s3_max_concurrency,
            max_retries=config.s3_max_retries,
            timeout_s=config.s3_timeout_s,
        )

    def __repr__(self) -> str:
        where = f" via {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Tier({self.url!r}{where}, name={self.name!r})"

    def __getstate__(self) -> dict[str, Any]:
        return dict(self._args)

    def __setstate__(self, state: dict[str, Any]) -> None:
        args = dict(state)
        self.__init__(args.pop("url"), **args)  # type: ignore[misc]

    @property
    def _store(self) -> S3Store:
        """The obstore client; refuses to run in a child forked after obstore was used."""
        _claim_runtime()
        return self._client

    def close(self) -> None:
        """Stop the threads used for parallel ranged reads (they are restarted on demand)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # -- set-up -----------------------------------------------------------------------------

    def _make_store(
        self,
        *,
        max_retries: int,
        timeout_s: float,
        connect_timeout_s: float,
        retry_timeout_s: float,
        backoff_init_s: float,
        backoff_max_s: float,
    ) -> S3Store:
        client: ClientConfig = {
            "timeout": timedelta(seconds=timeout_s),
            "connect_timeout": timedelta(seconds=connect_timeout_s),
        }
        config: S3Config = {}
        if self.endpoint_url:
            # Both keys: obstore lets AWS_ENDPOINT_URL_S3 win over "endpoint" otherwise.
            config["endpoint"] = self.endpoint_url
            config["aws_endpoint_url_s3"] = self.endpoint_url
            config["virtual_hosted_style_request"] = False
            if self.endpoint_url.startswith("http://"):
                client["allow_http"] = True
        provider = self._provider
        region = self.region or _profile_region(provider)
        if region:
            config["region"] = region
        retry: RetryConfig = {
            "max_retries": max_retries,
            "retry_timeout": timedelta(seconds=retry_timeout_s),
            "backoff": {
                "init_backoff": timedelta(seconds=backoff_init_s),
                "max_backoff": timedelta(seconds=backoff_max_s),
                "base": 2,
            },
        }
        store: S3Store = self._ob.store.S3Store(
            self.bucket,
            prefix=self.prefix or None,
            config=config,
            client_options=client,
            retry_config=retry,
            credential_provider=provider,
        )
        return store

    def check_available(self) -> None:
        """Fail fast with :class:`DurableUnavailableError` if the bucket is missing or unreachable.

        One LIST request with a short timeout and one retry: a few seconds at most.
        """
        _claim_runtime()
        timeout = min(self.timeout_s, 5.0)
        probe = self._make_store(
            max_retries=min(self.max_retries, 1),
            timeout_s=timeout,
            connect_timeout_s=min(timeout, 2.0),
            retry_timeout_s=2 * timeout + 1.0,
            backoff_init_s=0.05,
            backoff_max_s=0.5,
        )
        try:
            stream = self._ob.list(probe, None, chunk_size=1)
            next(iter(stream), None)
        except Exception as e:
            exc = self._ob.exceptions
            if isinstance(e, exc.PermissionDeniedError | exc.UnauthenticatedError) or _status(
                e
            ) in (401, 403):
                reason = "access denied: check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE)"
            elif "NoSuchBucket" in str(e):
                reason = "no such bucket"
            elif _is_transport_error(e):
                reason = f"connection failed or no answer within {timeout:g}s"
            else:
                reason = _first_line(e, 160)
            raise self._unavailable(reason) from e

    def _unavailable(self, reason: str) -> DurableUnavailableError:
        where = self.endpoint_url or "AWS"
        return DurableUnavailableError(
            f"Unable to fetch region for S3 bucket {self.bucket}: the bucket does not exist or "
            f"is not reachable at {where} ({reason}); check the name, credentials, "
            "AWS_ENDPOINT_URL and AWS_REGION."
        )

    # -- errors -----------------------------------------------------------------------------

    def _object(self, key: str | None) -> str:
        if not key:
            return self.url + "/"
        return f"{self.url}/{key}"

    def _translate(self, e: Exception, op: str, key: str | None) -> Exception:
        """Map an obstore error to the tierckpt hierarchy (others pass through unchanged)."""
        exc = self._ob.exceptions
        text = str(e)
        if "NoSuchBucket" in text:
            return self._unavailable("no such bucket")
        if isinstance(e, FileNotFoundError):
            return self._missing(key or "")
        if not isinstance(e, exc.BaseError):
            return e
        status = _status(e)
        code = _S3_CODE.search(text)
        retries = _RETRIES.search(text)
        after = f" after {retries.group(1)} retries" if retries else ""
        if status is not None:
            what = f"HTTP {status}" + (f" {code.group(1)}" if code else "")
        else:
            what = _first_line(e).split(" - ")[-1]
        if isinstance(e, exc.PermissionDeniedError | exc.UnauthenticatedError) or status in (
            401,
            403,
        ):
            hint = "check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket policy"
        elif status == 503 or (code and code.group(1) == "SlowDown"):
            hint = "the store is throttling: lower s3_max_concurrency or raise s3_max_retries"
        elif status is not None and status >= 500:
            hint = "the S3 service is failing; retry later or raise s3_max_retries"
        elif _is_transport_error(e):
            hint = (
                f"check that {self.endpoint_url or 'the AWS endpoint'} is reachable "
                f"(AWS_ENDPOINT_URL, network) and s3_timeout_s={self.timeout_s:g} is enough"
            )
        else:
            hint = "check the endpoint, credentials and bucket"
        return DurableTierError(
            f"S3 {op} of {self._object(key)} failed{after}: {what}; {hint}. ({_first_line(e)})"
        )

    def _call(self, op: str, key: str | None, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except Exception as e:
            err = self._translate(e, op, key)
            if err is e:
                raise
            raise err from e

    def _sleep_backoff(self, attempt: int) -> None:
        cap = min(self.backoff_max_s, self.backoff_init_s * 2**attempt)
        time.sleep(random.uniform(self.backoff_init_s, max(self.backoff_init_s, cap)))

    def _retry_transport(
        self, fn: Callable[[], _T], on_retry: Callable[[], None] | None = None
    ) -> _T:
        """Bounded retry of a connection error / reset / timeout for the requests obstore
        will not retry because they are not idempotent (create-only PUT, bulk DELETE POST).
        HTTP errors are left alone: obstore already retried the retryable ones."""
        deadline = time.monotonic() + self.retry_timeout_s
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:
                if (
                    not _is_transport_error(e)
                    or attempt >= self.max_retries
                    or time.monotonic() >= deadline
                ):
                    raise
                attempt += 1
                if on_retry is not None:
                    on_retry()
                self._sleep_backoff(attempt)

    # -- keys -------------------------------------------------------------------------------

    @staticmethod
    def _check_key(key: str) -> str:
        if (
            not key
            or key.startswith("/")
            or key.endswith("/")
            or any(seg in ("", ".", "..") for seg in key.split("/"))
        ):
            raise ValueError(f"invalid key {key!r}")
        return key

    @classmethod
    def _check_prefix(cls, prefix: str) -> str:
        prefix = prefix.rstrip("/")
        return cls._check_key(prefix) if prefix else ""

    # -- writes -----------------------------------------------------------------------------

    def write(self, key: str, chunks: Iterable[Buffer]) -> int:
        """Store the concatenated chunks: one PUT up to ``part_size``, else a multipart upload."""
        self._check_key(key)
        parts = _parts(chunks, self.part_size)
        first = next(parts, bytearray())
        second = next(parts, None)
        if second is None:
            return self._put_one(key, first)
        head = [first, second]
        del first, second
        total = [0]
        raised: list[BaseException] = []

        def stream() -> Iterator[bytearray]:
            try:
                while head:
                    part = head.pop(0)  # no reference kept once obstore has it
                    total[0] += len(part)
                    yield part
                for part in parts:
                    total[0] += len(part)
                    yield part
            except Exception as e:  # from ``chunks``: re-raised to the caller unchanged
                raised.append(e)
                raise

        # Any failure, including an exception from ``chunks``, aborts the multipart upload:
        # readers never see a partial object (and an earlier version stays in place).
        try:
            self._ob.put(
                self._store,
                key,
                stream(),
                use_multipart=True,
                chunk_size=self.part_size,
                max_concurrency=self.max_concurrency,
            )
        except Exception as e:
            if raised and e is raised[0]:
                raise
            err = self._translate(e, "multipart PUT", key)
            if err is e:
                raise
            raise err from e
        return total[0]

    def _put_one(self, key: str, data: bytearray) -> int:
        self._call("PUT", key, lambda: self._ob.put(self._store, key, data, use_multipart=False))
        return len(data)

    def put_file(self, key: str, path: str) -> int:
        """Upload a local file; obstore reads it part by part (multipart above ``part_size``)."""
        self._check_key(key)
        size = os.stat(path).st_size
        self._call(
            "PUT",
            key,
            lambda: self._ob.put(
                self._store,
                key,
                Path(path),
                chunk_size=self.part_size,
                max_concurrency=self.max_concurrency,
            ),
        )
        return size

    def write_if_absent(self, key: str, data: Buffer) -> bool:
        """Create-only PUT (``If-None-Match: *``); False if ``key`` already exists."""
        self._check_key(key)
        payload = bytes(_byte_view(data))
        exc = self._ob.exceptions
        ambiguous = [False]

        def create() -> None:
            self._ob.put(self._store, key, payload, mode="create", use_multipart=False)

        def mark() -> None:
            ambiguous[0] = True

        try:
            self._retry_transport(create, on_retry=mark)
        except (exc.AlreadyExistsError, exc.PreconditionError):
            if ambiguous[0]:
                # An attempt whose answer was lost may have created the object before this
                # retry saw it: it is ours if it holds exactly our bytes.
                try:
                    return bytes(self.read(key)) == payload
                except KeyNotFoundError:
                    return False
            return False
        except exc.NotSupportedError:
            return self._write_if_absent_fallback(key, payload)
        except Exception as e:
            if _status(e) == 501:  # the server ignores / rejects If-None-Match on PUT
                return self._write_if_absent_fallback(key, payload)
            err = self._translate(e, "conditional PUT", key)
            if err is e:
                raise
            raise err from e
        return True

    def _write_if_absent_fallback(self, key: str, payload: bytes) -> bool:
        # HEAD then PUT: racy. Two writers may both see the key absent and both write; the
        # last one wins. Only used on servers without conditional PUT support.
        if self._head(key) is not None:
            return False
        self._call("PUT", key, lambda: self._ob.put(self._store, key, payload))
        return True

    # -- reads ------------------------------------------------------------------------------

    def _head(self, key: str) -> ObjectMeta | None:
        try:
            meta: ObjectMeta = self._call("HEAD", key, lambda: self._ob.head(self._store, key))
        except KeyNotFoundError:
            return None
        return meta

    def _short(self, key: str, have: int, want: int) -> KeyNotFoundError:
        return KeyNotFoundError(
            f"{key} in the {self.name} tier ({self.url}) is shorter than expected "
            f"({have} < {want} bytes)"
        )

    def _missing(self, key: str) -> KeyNotFoundError:
        return KeyNotFoundError(f"{key} not found in the {self.name} tier ({self.url})")

    def _get_piece(
        self, key: str, start: int, end: int, etag: str | None
    ) -> tuple[memoryview, int, str | None]:
        """Bytes ``[start, end)`` (fewer if the object ends first), its size and ETag.

        With ``etag``, the GET carries ``If-Match`` so every piece of one read comes from
        the same version of the object.
        """
        exc = self._ob.exceptions
        options: GetOptions = {"range": (start, end)}
        if etag:
            options["if_match"] = etag

        def fetch() -> tuple[memoryview, int, str | None]:
            result = self._ob.get(self._store, key, options=options)
            data = memoryview(result.bytes())
            meta = result.meta
            return data, int(meta["size"]), meta.get("e_tag")

        try:
            return self._call("GET", key, fetch)
        except DurableTierError as e:
            if isinstance(e.__cause__, exc.PreconditionError):
                raise DurableTierError(
                    f"{self._object(key)} was overwritten while it was being read; read it again."
                ) from e
            raise

    def _pool_for_reads(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.max_concurrency, thread_name_prefix="tierckpt-s3"
                )
            return self._pool

    def _fetch(
        self,
        key: str,
        pieces: Sequence[tuple[int, int]],
        etag: str | None,
        into: tuple[memoryview, int] | None = None,
    ) -> list[memoryview]:
        """Every piece, exactly (else :class:`KeyNotFoundError`), ``max_concurrency`` at a time.

        With ``into=(view, base)``, the thread that fetched a piece copies it to
        ``view[start - base:]`` and drops it, so at most ``max_concurrency`` pieces are held
        at once; the list returned is then of empty views.
        """

        def one(piece: tuple[int, int]) -> memoryview:
            s, e = piece
            try:
                data, size, _ = self._get_piece(key, s, e, etag)
            except DurableTierError as err:
                if _status(err.__cause__ or err) == 416:  # starts past the end
                    raise self._short(key, s, e) from err
                raise
            if len(data) != e - s:
                raise self._short(key, size, e)
            if into is not None:
                view, base = into
                view[s - base : e - base] = data
                return memoryview(b"")
            return data

        if len(pieces) <= 1:
            return [one(p) for p in pieces]
        futures = [self._pool_for_reads().submit(one, p) for p in pieces]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.part_size, end)) for s in range(start, end, self.part_size)]

    def read(self, key: str, offset: int = 0, length: int | None = None) -> Buffer:
        """Bytes ``[offset, offset+length)`` of ``key`` (to the end when ``length`` is None).

        Up to ``part_size`` bytes come from one ranged GET; the rest of a longer read is
        fetched as ``part_size`` ranged GETs in parallel (``max_concurrency``), pinned with
        ``If-Match`` to the version the first answer came from. Returns a new ``bytearray``.
        """
        self._check_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length} for {key}")
        if length == 0:
            if self._head(key) is None:
                raise self._missing(key)
            return bytearray()
        first_end = offset + (self.part_size if length is None else min(length, self.part_size))
        try:
            first, size, etag = self._get_piece(key, offset, first_end, None)
        except DurableTierError as e:
            if _status(e.__cause__ or e) != 416:
                raise
            # 416: the range starts at or past the end of the object.
            meta = self._head(key)
            if meta is None:
                raise self._missing(key) from e
            if length is None and offset == meta["size"]:
                return bytearray()
            raise self._short(key, meta["size"], offset + (length or 1)) from e
        end = size if length is None else offset + length
        if end > size:
            raise self._short(key, size, end)
        first_want = min(first_end, end) - offset
        if len(first) < first_want:
            raise self._short(key, offset + len(first), offset + first_want)
        out = bytearray(end - offset)  # writable, like DirectoryTier's (torch.frombuffer)
        view = memoryview(out)
        view[:first_want] = first[:first_want]
        del first
        self._fetch(key, self._pieces(first_end, end), etag, into=(view, offset))
        return out

    def read_ranges(
        self, key: str, ranges: Sequence[tuple[int, int]], *, coalesce: int = 2**20
    ) -> list[Buffer]:
        """The bytes of each ``(offset, length)`` range of ``key``, in the order given.

        Ranges less than ``coalesce`` bytes apart share one request, as in
        ``obstore.get_ranges``; unlike it, no request exceeds ``part_size`` (obstore merges
        adjacent ranges without limit, so a plan covering a whole file would become one huge
        GET under one timeout) and requests run ``max_concurrency`` at a time. A range within
        one request is returned as a read-only, zero-copy ``memoryview`` of its answer; one
        that spans requests as a ``bytearray``.
        """
        self._check_key(key)
        for off, n in ranges:
            if off < 0 or n < 0:
                raise ValueError(f"invalid range offset={off} length={n} for {key}")
        wanted = sorted({(off, off + n) for off, n in ranges if n > 0})
        if not wanted:
            if self._head(key) is None:
                raise self._missing(key)
            return [b"" for _ in ranges]
        spans: list[list[int]] = []
        for s, e in wanted:
            if spans and s - spans[-1][1] <= coalesce:
                spans[-1][1] = max(spans[-1][1], e)
            else:
                spans.append([s, e])
        pieces = [p for s, e in spans for p in self._pieces(s, e)]
        # The first piece alone: its ETag pins the others to the same version.
        try:
            first, _, etag = self._get_piece(key, *pieces[0], None)
        except DurableTierError as e:
            if _status(e.__cause__ or e) == 416:
                raise self._short(key, pieces[0][0], pieces[0][1]) from e
            raise
        if len(first) != pieces[0][1] - pieces[0][0]:
            raise self._short(key, pieces[0][0] + len(first), pieces[0][1])
        got = [first, *self._fetch(key, pieces[1:], etag)]
        starts = [p[0] for p in pieces]
        out: list[Buffer] = []
        for off, n in ranges:
            if n == 0:
                out.append(b"")
                continue
            i = bisect.bisect_right(starts, off) - 1
            ps, pe = pieces[i]
            if off + n <= pe:
                out.append(got[i][off - ps : off - ps + n])
                continue
            buf = bytearray(n)
            pos = off
            while pos < off + n:
                ps, pe = pieces[i]
                take = min(pe, off + n) - pos
                buf[pos - off : pos - off + take] = got[i][pos - ps : pos - ps + take]
                pos += take
                i += 1
            out.append(buf)
        return out

    # -- listing and deletion ---------------------------------------------------------------

    def list(self, prefix: str) -> dict[str, int]:
        """Every key under ``prefix/`` (relative to it) with its size."""
        prefix = self._check_prefix(prefix)
        cut = len(prefix) + 1 if prefix else 0

        def run() -> dict[str, int]:
            out: dict[str, int] = {}
            for batch in self._ob.list(self._store, prefix or None, chunk_size=1000):
                for meta in batch:
                    path = meta["path"]
                    if not path.endswith("/"):
                        out[path[cut:]] = int(meta["size"])
            return out

        return self._call("LIST", prefix, run)

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """Names of the common prefixes directly under ``prefix/``."""
        prefix = self._check_prefix(prefix)
        result = self._call(
            "LIST", prefix, lambda: self._ob.list_with_delimiter(self._store, prefix or None)
        )
        return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in result["common_prefixes"]})

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        self._check_key(key)
        self._call(
            "DELETE", key, lambda: self._retry_transport(lambda: self._ob.delete(self._store, key))
        )

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix/`` (bulk deletes of up to 1000 keys)."""
        prefix = self._check_prefix(prefix)
        keys = [f"{prefix}/{k}" if prefix else k for k in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            self._delete_batch(prefix, keys[i : i + 1000])

    def _delete_batch(self, prefix: str, batch: builtins.list[str]) -> None:
        self._call(
            "DELETE",
            prefix,
            lambda: self._retry_transport(lambda: self._ob.delete(self._store, batch)),
        )


def _profile_credentials() -> Any:
    """boto3's credential chain when a profile is configured (obstore reads no profiles)."""
    home = os.path.expanduser("~")
    files = [
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", os.path.join(home, ".aws", "credentials")),
        os.environ.get("AWS_CONFIG_FILE", os.path.join(home, ".aws", "config")),
    ]
    if not os.environ.get("AWS_PROFILE") and not any(os.path.isfile(f) for f in files):
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None
    try:
        return Boto3CredentialProvider(boto3.Session())
    except Exception:  # no credentials in the profile: fall back to obstore's own chain
        return None


def _profile_region(provider: Any) -> str | None:
    config = getattr(provider, "config", None) or {}
    region = config.get("region")
    return str(region) if region else None
