"""The host's [mounts] options: what reaches mount(8), and what is refused."""

import pytest
from offloadd import config, mounts

from offloadfs.settings import ConfigError


def serve_config(tmp_path, text: str) -> config.ServeConfig:
    """A checked ServeConfig from a [mounts] table."""
    path = tmp_path / "offloadd.toml"
    path.write_text("[mounts]\n" + text)
    return config.ServeConfig.from_file(str(path)).check()


def test_default_options_are_a_hard_mount():
    """Without options: NFSv4 on the descriptor's port, hard, timeo=50."""
    argv = mounts.kernel_mount_command("10.0.0.5:2049", "/home", "/mnt/x",
                                       mounts.DEFAULT_MOUNT_OPTIONS)
    assert argv == ["mount", "-t", "nfs4", "-o", "vers=4,port=2049,hard,timeo=50",
                    "10.0.0.5:/home", "/mnt/x"]


def test_options_for_a_slow_link_reach_mount(tmp_path):
    """[mounts] options replaces the defaults after vers and port."""
    cfg = serve_config(tmp_path, 'options = "hard,timeo=600,retrans=3,rsize=65536"\n')
    argv = mounts.kernel_mount_command("[fd00::5]:20490", "/srv", "/m", cfg.mount_options)
    assert argv[4] == "vers=4,port=20490,hard,timeo=600,retrans=3,rsize=65536"
    assert argv[5] == "[fd00::5]:/srv"


@pytest.mark.parametrize("bad", ["", "hard,,timeo=5", "hard, timeo=5", "vers=3", "hard,port=1",
                                 "nfsvers=4.1"])
def test_bad_options_are_one_line_errors(tmp_path, bad):
    """Empty items, spaces, and the options set per export are refused at start."""
    with pytest.raises(ConfigError, match=r"\[mounts\] options"):
        serve_config(tmp_path, f'options = "{bad}"\n')
