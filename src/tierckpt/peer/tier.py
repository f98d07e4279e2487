"""Reading from one peer node: a read-only tier over what that node reported holding.

The reader builds one :class:`PeerTier` per other node from the listings gathered in the
step agreement (never from a placement formula: nodes are replaced or dropped). Keys the
node did not report raise :class:`KeyNotFoundError` without touching the network; the
bytes read are verified by the fetcher like any tier's.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable

from .. import layout
from ..errors import PeerError
from ..manifest import checksum
from ..tiers.base import Buffer, KeyNotFoundError
from .transport import PeerClient

__all__ = ["PeerTier", "complete_files"]


def complete_files(listing: dict[str, int]) -> dict[str, int]:
    """The files of a node's step listing a reader may use: a data file only with its
    part's manifest beside it (a replica's manifest arrives after its verified data)."""
    out: dict[str, int] = {}
    for name, size in listing.items():
        if ".tmp-" in name or not layout.is_ours(name):
            continue
        if name.endswith(".data"):
            manifest = name[: -len(".data")] + ".manifest.json"
            if manifest not in listing:
                continue
        out[name] = size
    return out


class PeerTier:
    """The memory tier of another node of the job, read through its peer service."""

    name = "peer"

    def __init__(
        self,
        node_id: str,
        address: tuple[str, int],
        secret: bytes,
        holdings: dict[int, dict[str, int]],
        namespace: str,
        timeout_s: float,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.url = f"peer://{node_id}@{address[0]}:{address[1]}"
        self.namespace = namespace
        self.holdings = {step: complete_files(files) for step, files in holdings.items()}
        self._secret = secret
        self._timeout = timeout_s

    def holds(self, key: str) -> bool:
        step, name = self._split(key)
        return step is not None and name in self.holdings.get(step, {})

    def _split(self, key: str) -> tuple[int | None, str]:
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != self.namespace:
            return None, ""
        return layout.parse_step_dir(parts[1]), parts[2]

    def client(self) -> PeerClient:
        """A new client of this peer's service (the caller closes it)."""
        return PeerClient(self.address, self._secret, timeout_s=self._timeout)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> Buffer:
        if not self.holds(key):
            raise KeyNotFoundError(f"{self.url}: {key} is not held there")
        if length is None:
            step, name = self._split(key)
            assert step is not None
            length = self.holdings[step][name] - offset
        with self.client() as client:
            return client.read(key, offset, length)

    def fetch_into(
        self, key: str, blobs: list[tuple[int, int, memoryview | None]]
    ) -> list[tuple[Buffer | None, int, str] | Exception]:
        """Each blob as ``(bytes or None, length, xxh3-128)``: received straight into its
        target when one is given (zero-copy), else into a buffer; an exception per failure.
        The caller compares the checksum: a target that fails it is overwritten later."""
        if not self.holds(key):
            missing = KeyNotFoundError(f"{self.url}: {key} is not held there")
            return [missing] * len(blobs)
        out: list[tuple[Buffer | None, int, str] | Exception] = []
        try:
            with self.client() as client:
                loose = [(o, n) for o, n, into in blobs if into is None]
                bufs = iter(client.read_ranges(key, loose) if loose else [])
                for offset, length, into in blobs:
                    if into is None:
                        buf = next(bufs)
                        out.append(
                            buf if isinstance(buf, Exception) else (buf, len(buf), checksum(buf))
                        )
                        continue
                    try:
                        client.read_into(key, offset, into)
                        out.append((None, length, checksum(into)))
                    except (PeerError, KeyNotFoundError) as e:
                        out.append(e)
        except PeerError as e:
            out += [e] * (len(blobs) - len(out))
        return out

    def list(self, prefix: str) -> dict[str, int]:
        parts = prefix.rstrip("/").split("/")
        if len(parts) != 2 or parts[0] != self.namespace:
            return {}
        step = layout.parse_step_dir(parts[1])
        return dict(self.holdings.get(step, {})) if step is not None else {}

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        if prefix.rstrip("/") != self.namespace:
            return []
        return sorted(layout.step_dir("", s).lstrip("/") for s in self.holdings)

    def write(self, key: str, chunks: Iterable[Buffer]) -> int:
        raise PeerError(f"{self.url} is read-only for readers.")

    def put_file(self, key: str, path: str) -> int:
        raise PeerError(f"{self.url} is read-only for readers.")

    def delete(self, key: str) -> None:
        raise PeerError(f"{self.url} is read-only for readers.")
