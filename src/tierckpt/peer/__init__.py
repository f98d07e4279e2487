"""The peer tier: copies of each node's part in the memory tier of other nodes.

``transport`` (an authenticated TCP service over a node's memory root, and its client),
``secret`` and ``address`` (the per-job secret and the address to bind), ``placement``
(which nodes hold whose replicas), ``node`` (this process's service and its handlers),
``replicate`` (copying a rank's part after its commit) and ``tier`` (reading from peers).
"""
