"""offloadd.nfs: the host's userspace NFSv4 client, a FUSE filesystem over libnfs 4.0 or 5 (ctypes).

Run as ``python -m offloadd.nfs SERVER[:PORT] EXPORT MOUNTPOINT`` (daemon/mounts.py does, for
``[mounts] client = "userspace"``). Which libnfs, its limits and how each is worked around:
docs/nfs-client.md. Layout, each module using only those above it:

- ``binding.py``: which libnfs (Abi) and its ctypes binding (structs, prototypes, limits, errno)
- ``logs.py``: the logger, throttled warnings, how paths and requests are shown
- ``creds.py``: AUTH_SYS credentials: root's and the FUSE caller's (uid, gid, groups)
- ``rpc.py``: RawWriter, NFSv4 WRITE/COMMIT built by hand (RPC record, AUTH_SYS, XDR)
- ``context.py``: Context, one libnfs context (setup, calls, errors, pipelined writes)
- ``pool.py``: Server, the pools of contexts; Handle, an open file and its context
- ``retry.py``: once_more_if_broken, the one retry rule (broken context: recover, try again)
- ``ops.py``: NfsFuse, the FUSE operations, and the lease keepalive thread
- ``main.py``: the command line, the mount and its exit status (``__main__.py`` runs it)
"""
