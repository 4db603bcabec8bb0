"""offloadd: the compute host side of offloadfs (daemon, broker)."""
