"""The compiled part of offloadd (the rest is in setup.cfg): the job's spawn by vfork,
daemon/_spawn.c. Optional: where it cannot be built (no C compiler or Python headers), the
package installs without it and offloadd starts jobs by fork and a preexec_fn instead."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("offloadd._spawn", ["daemon/_spawn.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])])
