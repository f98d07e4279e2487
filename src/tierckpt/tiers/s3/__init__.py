"""The durable tier on S3 or any S3-compatible server, through obstore.

Requests are retried by obstore itself (exponential backoff with jitter, bounded by
``max_retries`` and a retry timeout): throttling (``503 SlowDown``), other 5xx, connection
errors, and, for idempotent requests (GET, HEAD, LIST, plain PUT, multipart parts), timeouts,
resets and bodies cut off mid-way (a GET resumes where the body stopped). obstore does *not*
retry a reset or timeout of the non-idempotent bulk ``DeleteObjects`` POST; :class:`S3Tier`
adds a small bounded retry for deletes (see ``errors.ErrorHandling._retry_transport``).

Writes of more than one part stream through a multipart upload (``part_size`` parts,
``max_concurrency`` in flight), so memory stays bounded; reads larger than one part are split
into ``part_size`` ranged GETs fetched in parallel, each request bounded by ``timeout_s``.

obstore is not fork-safe: a process forked after its parent used S3 gets a clear
:class:`DurableTierError` here instead of hanging; start such workers with ``spawn``.

Modules: ``client`` (obstore import, fork guard, store construction, profile credentials),
``errors`` (error translation, key checks, the extra transport retry), ``uploads`` (PUT and
multipart writes), ``ranges`` (ranged and coalesced reads), ``tier`` (:class:`S3Tier`).
"""

from .tier import S3Tier

__all__ = ["S3Tier"]
