"""XenStore from the host: a pyxs client over the lab's SSH connection,
xenstore-ls output, the XenBus state tracer and the split-driver layout check."""

from xenlab.xenstore.client import Transaction, Watch, WatchEvent, XenStore, XenStoreConnectionError, XenStoreRequestError, XenStoreTimeout
from xenlab.xenstore.paths import Perm

__all__ = [
    "Perm", "Transaction", "Watch", "WatchEvent", "XenStore", "XenStoreConnectionError", "XenStoreRequestError", "XenStoreTimeout",
]
