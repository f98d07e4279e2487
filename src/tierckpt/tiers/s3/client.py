"""obstore: its lazy import, its fork-unsafe runtime, and building an ``S3Store`` client."""

from __future__ import annotations

import os
from datetime import timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ...errors import DurableTierError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config, S3Store

__all__ = [
    "StoreHolder",
    "boto3_client",
    "claim_runtime",
    "make_store",
    "obstore_module",
    "profile_credentials",
]

_INSTALL_HINT = "The s3:// durable tier needs obstore: pip install tierckpt[s3]"


def obstore_module() -> ModuleType:
    """Import obstore on first use, with an install hint when it is missing."""
    try:
        import obstore
        import obstore.exceptions
        import obstore.store
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return obstore


_runtime_pid: int | None = None


def claim_runtime() -> None:
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


class StoreHolder:
    """Holds the obstore client and hands it out only in the process that may use it."""

    _client: S3Store

    @property
    def _store(self) -> S3Store:
        """The obstore client; refuses to run in a child forked after obstore was used."""
        claim_runtime()
        return self._client


def make_store(
    ob: ModuleType,
    *,
    bucket: str,
    prefix: str,
    endpoint_url: str | None,
    region: str | None,
    provider: Any,
    max_retries: int,
    timeout_s: float,
    connect_timeout_s: float,
    retry_timeout_s: float,
    backoff_init_s: float,
    backoff_max_s: float,
) -> S3Store:
    """An obstore ``S3Store`` on ``bucket``/``prefix`` with these timeouts and retries."""
    client: ClientConfig = {
        "timeout": timedelta(seconds=timeout_s),
        "connect_timeout": timedelta(seconds=connect_timeout_s),
    }
    config: S3Config = {}
    if endpoint_url:
        # Both keys: obstore lets AWS_ENDPOINT_URL_S3 win over "endpoint" otherwise.
        config["endpoint"] = endpoint_url
        config["aws_endpoint_url_s3"] = endpoint_url
        config["virtual_hosted_style_request"] = False
        if endpoint_url.startswith("http://"):
            client["allow_http"] = True
    region = region or profile_region(provider)
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
    store: S3Store = ob.store.S3Store(
        bucket,
        prefix=prefix or None,
        config=config,
        client_options=client,
        retry_config=retry,
        credential_provider=provider,
    )
    return store


def boto3_client(
    *, endpoint_url: str | None, region: str | None, provider: Any, timeout_s: float, retries: int
) -> Any:
    """A boto3 S3 client on the same endpoint, or None when boto3 is not installed.

    Only for what obstore cannot do (listing and aborting multipart uploads). boto3 finds
    credentials through the same standard AWS chain (environment, profile, roles).
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    session = boto3.Session()
    region = region or profile_region(provider) or session.region_name or "us-east-1"
    config = Config(
        connect_timeout=min(timeout_s, 10.0),
        read_timeout=timeout_s,
        retries={"max_attempts": retries + 1, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def profile_credentials() -> Any:
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


def profile_region(provider: Any) -> str | None:
    """The region of a boto3 profile provider, if it names one."""
    config = getattr(provider, "config", None) or {}
    region = config.get("region")
    return str(region) if region else None
