"""The peer tier: copies of each node's part in the memory tier of other nodes.

``transport`` (an authenticated TCP service over a node's memory root, and its client),
``secret`` and ``address`` (the per-job secret and the address to bind), ``placement``
(which nodes hold whose replicas), ``node`` (this process's service and its handlers),
``publish`` (the coordinator's commit push), ``replicate`` (copying a rank's part after its
commit), ``view`` and ``tier`` (the agreement's holdings, reading from peers), ``refill``
(a replacement node copies what it read back) and ``inventory`` (what a node holds).
"""

from ._files import default_allow
from .address import bind_host
from .secret import job_secret
from .transport import PeerClient, PeerService, close_services, get_service

__all__ = [
    "PeerClient",
    "PeerService",
    "bind_host",
    "close_services",
    "default_allow",
    "get_service",
    "job_secret",
]
