"""Tunable numbers of tierckpt, in one place (config fields are the user-facing ones)."""

from __future__ import annotations

__all__ = [
    "ALIGN",
    "COMMIT_POLL_FIRST_S",
    "COMMIT_POLL_MAX_S",
    "EXIT_WAIT_S",
    "HASH_CHUNK",
    "HASH_WHILE_STAGING",
    "MAX_LOAD_FALLBACKS",
    "ORPHANS_POOLED",
    "READ_THREADS",
    "SPLIT_MIN_BYTES",
    "STREAM_CHUNK",
    "STREAM_IDLE_FACTOR",
    "TOUCH_CHUNK",
]

# -- layout of data files --
ALIGN = 64
"""Byte alignment of each blob in a data file."""

# -- copies and checksums --
HASH_CHUNK = 4 << 20
"""Bytes copied then hashed at a time, so each chunk is hashed while it is in cache."""
USAGE_WALKS = 4
"""Walks of the memory root a budget check makes at most until two see the same files."""
READ_HASH_CHUNK = 1 << 20
"""The same for a load's ``preadv`` out of the memory tier: 1 MiB pieces read and verify
1 GiB in 1-14 % less time than 4 MiB ones here (4 runs), while a save's copy is as fast or
faster at 4 MiB (``python -m benchmarks.hash_chunk``, results/issue9-hash-chunk)."""
HASH_WHILE_STAGING = False
"""Whether ``async_save`` checksums each chunk as it stages it (in cache) instead of in a
second pass over the staged bytes in the background. Off: measured here (2 ranks, 0.5 GiB,
benchmarks/README.md) it made the blocking copy 0-30 % longer and the time to crash-safe no
shorter (DCP's planning and collectives dominate what follows the copy). New and spare
buffers, filled with write(), are always hashed as they are written."""

# -- loads --
READ_THREADS = 8
"""Reader threads of a rank at most (fewer where its share of the node's CPUs is smaller)."""
SPLIT_MIN_BYTES = 64 << 20
"""A file is split among reader threads in runs of blobs no smaller than this."""
MAX_LOAD_FALLBACKS = 3
"""How many unloadable saves ``tierckpt.load`` skips before it gives up."""

# -- staging pool --
TOUCH_CHUNK = 8 << 20
"""Bytes of a spare buffer allocated and written at a time in the background (then as long
idle); a save that needs the spare waits at most one chunk for it."""
ORPHANS_POOLED = 4
"""Staging files of dead writers kept (per namespace) as pooled buffers; the rest are deleted."""
DIR_TRIES = 8
"""Times a file is put into a step directory made for it, when a concurrent sweep keeps
removing that directory (found empty) first."""

# -- durable drains --
COMMIT_POLL_FIRST_S = 0.02
"""First delay between checks for every rank's durable part (it grows 1.5x per check)."""
COMMIT_POLL_MAX_S = 1.0
"""Longest delay between those checks."""
STORE_POLL_FIRST_S = 0.005
"""Within a job: first delay between checks of the job store's drain keys (grows 1.5x)."""
STORE_POLL_MAX_S = 0.02
"""Longest delay between those checks."""
COMMIT_TIER_CHECK_S = 5.0
"""Within a job: how often the durable tier is still listed while the store is silent (for
parts uploaded by a process that does not signal)."""
EXIT_WAIT_S = 60.0
"""Default of ``durable_exit_wait_s``: how long interpreter exit waits for drains."""
STREAM_CHUNK = 8 << 20
"""Bytes a staged upload reads and hands to the durable tier at a time (it waits until
staging is this far ahead, or done)."""
STREAM_IDLE_FACTOR = 3
"""A staged upload whose save makes no progress for this many ``collective_timeout_s`` is
cancelled (its save was abandoned between staging and writing); the drain then uploads
the file whole if the save goes on after all."""
