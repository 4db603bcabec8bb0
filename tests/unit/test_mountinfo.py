"""Finding offloadfs mounts in mountinfo, to refuse commands that would offload again."""
import os

from offloadfs import mountinfo

SAMPLE = """\
22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
40 22 0:35 / /opt/offload rw,nosuid,nodev,relatime - fuse.offloadfs offloadfs rw,user_id=0
41 22 0:36 / /mnt/with\\040space rw - fuse.offloadfs offloadfs rw
42 22 0:37 / /mnt/other rw - fuse.sshfs host: rw
"""


def test_parse_finds_mount_points_and_types():
    """Every line gives its mount point (unescaped) and filesystem type."""
    assert mountinfo.parse(SAMPLE) == [("/", "ext4"), ("/opt/offload", "fuse.offloadfs"),
                                       ("/mnt/with space", "fuse.offloadfs"),
                                       ("/mnt/other", "fuse.sshfs")]


def test_only_offloadfs_mounts_count(tmp_path):
    """Other FUSE filesystems are not ours."""
    info = tmp_path / "mountinfo"
    info.write_text(SAMPLE)
    assert mountinfo.offloadfs_mounts(str(info)) == ["/opt/offload", "/mnt/with space"]


def test_paths_inside_a_mount_are_detected(tmp_path):
    """A command path in or below a mount resolves into offloadfs; a sibling prefix does not."""
    info = tmp_path / "mountinfo"
    info.write_text(SAMPLE)
    assert mountinfo.resolves_into_offloadfs("/opt/offload/convert", str(info))
    assert mountinfo.resolves_into_offloadfs("/mnt/with space/x", str(info))
    assert not mountinfo.resolves_into_offloadfs("/opt/offloader/convert", str(info))
    assert not mountinfo.resolves_into_offloadfs("/usr/bin/convert", str(info))


def test_symlink_into_a_mount_is_detected(tmp_path):
    """A command reached through a symlink into a mount is caught after resolving it."""
    info = tmp_path / "mountinfo"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "link").symlink_to(mnt / "convert")
    info.write_text(f"40 22 0:35 / {mnt} rw - fuse.offloadfs offloadfs rw\n")
    assert mountinfo.resolves_into_offloadfs(str(tmp_path / "link"), str(info))


def test_device_of_a_mount_point(tmp_path):
    """The device number comes from the major:minor field of the last mount at that point."""
    info = tmp_path / "mountinfo"
    info.write_text(SAMPLE + "43 22 0:41 / /opt/offload rw - fuse.offloadfs offloadfs rw\n")
    assert mountinfo.device("/opt/offload", str(info)) == os.makedev(0, 41)
    assert mountinfo.device("/nowhere", str(info)) is None


def test_owner_is_the_user_id_of_the_visible_mount(tmp_path):
    """umount's check: who mounted it (user_id=), None where the options do not say."""
    info = tmp_path / "mountinfo"
    info.write_text(SAMPLE + "43 40 0:38 / /opt/offload rw shared:5 - fuse.offloadfs o "
                    "rw,user_id=1000,group_id=1000\n")
    assert mountinfo.owner("/opt/offload", str(info)) == 1000
    assert mountinfo.owner("/mnt/with space", str(info)) is None
    assert mountinfo.owner("/nowhere", str(info)) is None


def test_the_owners_of_the_offloadfs_mounts_seen(tmp_path):
    """One read gives each visible offloadfs mount with the uid that mounted it: a mount
    over another at the same point is the one seen, whatever its type."""
    info = tmp_path / "mountinfo"
    info.write_text(SAMPLE + "43 40 0:38 / /opt/offload rw shared:5 - fuse.offloadfs o "
                    "rw,user_id=1000,group_id=1000\n"
                    "44 41 0:39 / /mnt/with\\040space rw - tmpfs tmpfs rw\nshort line\n")
    assert mountinfo.offloadfs_owners(str(info)) == {"/opt/offload": 1000}
    assert mountinfo.offloadfs_owners(str(tmp_path / "none")) == {}
