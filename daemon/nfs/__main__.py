"""``python -m offloadd.nfs``: see main.py."""
import sys

from offloadfs.settings import ConfigError

try:
    from .main import main
except ConfigError as exc:   # fusebinding.FuseUnavailable: no FUSE binding or libfuse
    print(f"offloadd: the userspace NFS client: {exc}", file=sys.stderr)
    sys.exit(1)

sys.exit(main())
