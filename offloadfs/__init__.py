"""offloadfs: the VM side (filesystem of shims, agent, offld)."""

__version__ = "0.1.0"
