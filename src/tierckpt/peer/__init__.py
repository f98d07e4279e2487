"""The peer tier's transport: an authenticated TCP service over a node's memory root."""

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
