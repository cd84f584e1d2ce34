"""The domU guest: its kernel and userland."""
