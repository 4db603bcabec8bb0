"""The compiled parts (the rest is in setup.cfg), both optional: where they cannot be built (no
C compiler, no Python headers or static libc) the package installs without them.

- daemon/_spawn.c, the extension offloadd._spawn: the job's spawn by vfork (without it
  offloadd starts jobs by fork and a preexec_fn);
- offloadfs/_shim.c, the program offloadfs/_shim: what the mount serves as every shim file
  (without it the mount serves the sh script of offloadfs/shim.py). Linked statically: it
  starts in about half the time of a dynamic one, and needs nothing of the VM's libraries.
"""
import logging
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SHIM_SOURCE = "offloadfs/_shim.c"
SHIM_PROGRAM = "_shim"
log = logging.getLogger("offloadfs.setup")


class BuildExt(build_ext):
    """build_ext, then the shim program into the offloadfs package (in place for an editable
    install, in build_lib for a wheel)."""

    def run(self):
        """The extensions, then the shim program."""
        super().run()
        self.build_shim()

    def build_shim(self):
        """Compile and link offloadfs/_shim (statically where libc.a exists, else dynamically);
        on failure say so and go on, as an optional extension does."""
        if self.inplace:
            out = self.get_finalized_command("build_py").get_package_dir("offloadfs")
        else:
            out = os.path.join(self.build_lib, "offloadfs")
        try:
            objects = self.compiler.compile([SHIM_SOURCE], output_dir=self.build_temp,
                                            extra_postargs=["-O2", "-Wall"])
            for flags in (["-static", "-s"], ["-s"]):
                try:
                    self.compiler.link_executable(objects, SHIM_PROGRAM, output_dir=out,
                                                  extra_postargs=flags)
                    return
                except Exception as exc:   # noqa: BLE001 (distutils' LinkError, any version)
                    failure = exc
            raise failure
        except Exception as exc:   # noqa: BLE001 (CompileError, DistutilsExecError, ...)
            log.warning("offloadfs: the shim program was not built (%s); the mount will "
                        "serve sh scripts", exc)


setup(ext_modules=[Extension("offloadd._spawn", ["daemon/_spawn.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])],
      cmdclass={"build_ext": BuildExt})
