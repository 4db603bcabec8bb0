# shellcheck shell=sh
# offloadfs.sh for /etc/profile.d: put the offloadfs mount (the directory of command shims) first on
# PATH while it is mounted, and take it off PATH while it is not.
#
# Sourced by /etc/profile in login shells (sh, dash, bash, ksh); POSIX sh, safe under set -eu.
# OFFLOADFS_MOUNT overrides the mount point (default /opt/offload). "Mounted" means the shell's
# own /proc/self/mounts lists a fuse.offloadfs filesystem there (the last mount on that point
# wins); the directory merely existing does not count, and the mount point is never entered or
# stat()ed, so a hung mount cannot hang a login. Only the exact spelling of the mount point is
# recognised in PATH (no symlink resolution). Every variable it uses is unset at the end.

_offloadfs_mnt=${OFFLOADFS_MOUNT:-/opt/offload}
while :; do
    case $_offloadfs_mnt in
        ?*/) _offloadfs_mnt=${_offloadfs_mnt%/} ;;
        *) break ;;
    esac
done

# The mount point as /proc/self/mounts spells it (space, tab, backslash as octal escapes).
_offloadfs_esc=$_offloadfs_mnt
case $_offloadfs_mnt in
    *"\\"* | *' '* | *'	'*)
        _offloadfs_esc=$(printf '%s\n' "$_offloadfs_mnt" |
            sed -e 's/\\/\\134/g' -e 's/ /\\040/g' -e 's/	/\\011/g') ;;
esac

_offloadfs_up=
if [ -r /proc/self/mounts ]; then
    while IFS=' ' read -r _offloadfs_src _offloadfs_dir _offloadfs_type _offloadfs_rest; do
        if [ "$_offloadfs_dir" = "$_offloadfs_esc" ]; then
            if [ "$_offloadfs_type" = fuse.offloadfs ]; then _offloadfs_up=1; else _offloadfs_up=; fi
        fi
    done < /proc/self/mounts
fi

if [ -n "${PATH+set}" ]; then
    # PATH without the mount point (empty entries, which mean ".", are kept).
    _offloadfs_rest=$PATH:
    _offloadfs_new=
    while [ -n "$_offloadfs_rest" ]; do
        _offloadfs_dir=${_offloadfs_rest%%:*}
        _offloadfs_rest=${_offloadfs_rest#*:}
        if [ "$_offloadfs_dir" != "$_offloadfs_mnt" ] && [ "$_offloadfs_dir" != "$_offloadfs_mnt/" ]; then
            _offloadfs_new=$_offloadfs_new:$_offloadfs_dir
        fi
    done
    _offloadfs_new=${_offloadfs_new#:}
    if [ -n "$_offloadfs_up" ]; then
        if [ -n "$_offloadfs_new" ]; then
            PATH=$_offloadfs_mnt:$_offloadfs_new
        else
            PATH=$_offloadfs_mnt
        fi
    else
        PATH=$_offloadfs_new
    fi
    export PATH
fi

unset _offloadfs_mnt _offloadfs_esc _offloadfs_up _offloadfs_src _offloadfs_dir _offloadfs_type \
    _offloadfs_rest _offloadfs_new
