"""The :class:`S3Tier` itself: construction, availability, listing and deletion."""

from __future__ import annotations

import builtins
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ...errors import ConfigError
from .client import claim_runtime, make_store, obstore_module, profile_credentials
from .errors import first_line, is_transport_error, status_of
from .ranges import RangedReads
from .uploads import Uploads

if TYPE_CHECKING:
    from obstore.store import S3Store

    from ...config import CheckpointConfig

__all__ = ["S3Tier"]

_MIN_PART = 5 * 2**20


class S3Tier(Uploads, RangedReads):
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
        self._ob = obstore_module()
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
        self._provider = None if os.environ.get("AWS_ACCESS_KEY_ID") else profile_credentials()
        self._boto3: Any = None  # built on first discard_partial
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
        return make_store(
            self._ob,
            bucket=self.bucket,
            prefix=self.prefix,
            endpoint_url=self.endpoint_url,
            region=self.region,
            provider=self._provider,
            max_retries=max_retries,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            retry_timeout_s=retry_timeout_s,
            backoff_init_s=backoff_init_s,
            backoff_max_s=backoff_max_s,
        )

    def check_available(self, *, create: bool = True) -> None:
        """Fail fast with :class:`DurableUnavailableError` if the bucket is missing or unreachable.

        ``create`` is accepted for symmetry with the directory tier: a bucket is never created.

        One LIST request with a short timeout and one retry: a few seconds at most.
        """
        claim_runtime()
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
            if isinstance(e, exc.PermissionDeniedError | exc.UnauthenticatedError) or status_of(
                e
            ) in (401, 403):
                reason = "access denied: check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE)"
            elif "NoSuchBucket" in str(e):
                reason = "no such bucket"
            elif is_transport_error(e):
                reason = f"connection failed or no answer within {timeout:g}s"
            else:
                reason = first_line(e, 160)
            raise self._unavailable(reason) from e

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
