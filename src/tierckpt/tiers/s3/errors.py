"""obstore errors mapped to tierckpt's, and the small retry obstore does not do itself."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

from ...errors import DurableTierError, DurableUnavailableError
from ..base import KeyNotFoundError
from .client import StoreHolder, obstore_module

__all__ = ["ErrorHandling", "first_line", "is_transport_error", "status_of"]

_T = TypeVar("_T")
_STATUS = re.compile(r"status code: (\d{3})")
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_RETRIES = re.compile(r"after (\d+) retries")


def first_line(e: BaseException, limit: int = 240) -> str:
    """The first line of an error's text, cut to ``limit`` characters."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def status_of(e: BaseException) -> int | None:
    """The HTTP status an obstore error reports, if any."""
    m = _STATUS.search(str(e))
    return int(m.group(1)) if m else None


def is_transport_error(e: BaseException) -> bool:
    """A connection error, reset or timeout (no HTTP status came back)."""
    if not isinstance(e, obstore_module().exceptions.GenericError):
        return False
    text = first_line(e, 10_000)
    return "non-2xx status code" not in text and (
        "HTTP error" in text or "error sending request" in text or "timed out" in text.lower()
    )


class ErrorHandling(StoreHolder):
    """Key checks, error messages and retries of :class:`~tierckpt.tiers.s3.S3Tier`."""

    _ob: ModuleType
    name: str
    url: str
    bucket: str
    endpoint_url: str | None
    timeout_s: float
    max_retries: int
    retry_timeout_s: float
    backoff_init_s: float
    backoff_max_s: float

    # -- messages ---------------------------------------------------------------------------

    def _unavailable(self, reason: str) -> DurableUnavailableError:
        where = self.endpoint_url or "AWS"
        return DurableUnavailableError(
            f"Unable to fetch region for S3 bucket {self.bucket}: the bucket does not exist or "
            f"is not reachable at {where} ({reason}); check the name, credentials, "
            "AWS_ENDPOINT_URL and AWS_REGION."
        )

    def _object(self, key: str | None) -> str:
        if not key:
            return self.url + "/"
        return f"{self.url}/{key}"

    def _short(self, key: str, have: int, want: int) -> KeyNotFoundError:
        return KeyNotFoundError(
            f"{key} in the {self.name} tier ({self.url}) is shorter than expected "
            f"({have} < {want} bytes)"
        )

    def _missing(self, key: str) -> KeyNotFoundError:
        return KeyNotFoundError(f"{key} not found in the {self.name} tier ({self.url})")

    # -- errors -----------------------------------------------------------------------------

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
        status = status_of(e)
        code = _S3_CODE.search(text)
        retries = _RETRIES.search(text)
        after = f" after {retries.group(1)} retries" if retries else ""
        if status is not None:
            what = f"HTTP {status}" + (f" {code.group(1)}" if code else "")
        else:
            what = first_line(e).split(" - ")[-1]
        if isinstance(e, exc.PermissionDeniedError | exc.UnauthenticatedError) or status in (
            401,
            403,
        ):
            hint = "check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket policy"
        elif status == 503 or (code and code.group(1) == "SlowDown"):
            hint = "the store is throttling: lower s3_max_concurrency or raise s3_max_retries"
        elif status is not None and status >= 500:
            hint = "the S3 service is failing; retry later or raise s3_max_retries"
        elif is_transport_error(e):
            hint = (
                f"check that {self.endpoint_url or 'the AWS endpoint'} is reachable "
                f"(AWS_ENDPOINT_URL, network) and s3_timeout_s={self.timeout_s:g} is enough"
            )
        else:
            hint = "check the endpoint, credentials and bucket"
        return DurableTierError(
            f"S3 {op} of {self._object(key)} failed{after}: {what}; {hint}. ({first_line(e)})"
        )

    def _call(self, op: str, key: str | None, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except Exception as e:
            err = self._translate(e, op, key)
            if err is e:
                raise
            raise err from e

    # -- retries ----------------------------------------------------------------------------

    def _sleep_backoff(self, attempt: int) -> None:
        cap = min(self.backoff_max_s, self.backoff_init_s * 2**attempt)
        time.sleep(random.uniform(self.backoff_init_s, max(self.backoff_init_s, cap)))

    def _retry_transport(self, fn: Callable[[], _T]) -> _T:
        """Bounded retry of a connection error / reset / timeout for the requests obstore
        will not retry because they are not idempotent (the bulk DELETE POST).
        HTTP errors are left alone: obstore already retried the retryable ones."""
        deadline = time.monotonic() + self.retry_timeout_s
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:
                if (
                    not is_transport_error(e)
                    or attempt >= self.max_retries
                    or time.monotonic() >= deadline
                ):
                    raise
                attempt += 1
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
