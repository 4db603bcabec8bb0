"""``--version`` on every program, from the one version the package metadata also reads."""

import importlib.metadata

import pytest
from offloadd import cli as offloadd_cli

from offloadfs import __version__, offld
from offloadfs import cli as offloadfs_cli


@pytest.mark.parametrize("parser, prog", [(offld.parser, "offld"),
                                          (offloadfs_cli.parser, "offloadfs"),
                                          (offloadd_cli.parser, "offloadd")])
def test_version_prints_the_program_and_the_package_version(parser, prog, capsys):
    """``PROG --version`` prints "PROG 0.1.0" and exits 0."""
    with pytest.raises(SystemExit) as done:
        parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"{prog} {__version__}\n"


def test_the_metadata_reads_the_same_version():
    """setup.cfg takes the version from offloadfs.__version__: one source."""
    assert importlib.metadata.version("offloadfs") == __version__


def test_a_commands_own_version_flag_goes_to_the_command():
    """``offld cat --version`` and ``offld -- cat --version`` offload ``cat --version``."""
    p = offld.parser()
    assert p.parse_args(["cat", "--version"]).command == ["cat", "--version"]
    assert p.parse_args(["--", "cat", "--version"]).command == ["--", "cat", "--version"]
