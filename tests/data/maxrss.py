"""Run a command; write its peak RSS in KB to the file named by argv[1]; exit with its status.

Used by tests to bound the memory of a client process (ru_maxrss of the reaped child).
"""
import os
import sys

out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execvp(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
