"""Unit tests for offloadd.policy (allowlist, identity, job environment) and offloadfs.environ."""
from __future__ import annotations

import pytest
from offloadd import policy
from offloadd.policy import HOST_PATH, Allowlist, Refused, base_env, check_identity, job_env

from offloadfs import environ
from offloadfs.environ import DEFAULT_PASS, matches, passing

COMMANDS = {"ls": "/bin/ls", "cc": "/usr/bin/gcc", "convert": "/usr/local/bin/convert"}


# --- Allowlist ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "bin/ls", "/bin/ls", ".", "..", "a/"])
def test_allowlist_names_must_be_plain(name):
    """Config entries whose name is empty, a path, '.' or '..' are rejected."""
    with pytest.raises(ValueError):
        Allowlist({name: "/bin/ls"})


@pytest.mark.parametrize("path", ["ls", "bin/ls", "./ls", "", "~/bin/ls"])
def test_allowlist_paths_must_be_absolute(path):
    """Config entries that do not map to an absolute path are rejected."""
    with pytest.raises(ValueError):
        Allowlist({"ls": path})


def test_allowlist_names_sorted():
    """names() lists the offered commands sorted."""
    assert Allowlist(COMMANDS).names() == ["cc", "convert", "ls"]
    assert Allowlist({}).names() == []


def test_allowlist_copies_config():
    """Changing the config dict afterwards does not change what is allowed."""
    commands = dict(COMMANDS)
    allow = Allowlist(commands)
    commands["sh"] = "/bin/sh"
    with pytest.raises(Refused):
        allow.resolve(b"sh")


@pytest.mark.parametrize("argv0,path", [(b"ls", "/bin/ls"), (b"cc", "/usr/bin/gcc"),
                                        (b"convert", "/usr/local/bin/convert")])
def test_resolve_name(argv0, path):
    """A plain allowlisted name resolves to its configured absolute path."""
    assert Allowlist(COMMANDS).resolve(argv0) == path


@pytest.mark.parametrize("argv0", [b"/bin/ls", b"/usr/bin/gcc"])
def test_resolve_allowlisted_path(argv0):
    """A path argv0 is allowed when it equals an allowlisted path exactly."""
    assert Allowlist(COMMANDS).resolve(argv0) == argv0.decode()


@pytest.mark.parametrize("argv0", [b"/usr/bin/ls", b"./ls", b"bin/ls", b"../bin/ls",
                                   b"/bin/../bin/ls", b"//bin/ls", b"/bin/ls/", b"/bin/sh",
                                   b"/usr/bin/cc"])
def test_resolve_other_path_refused(argv0):
    """A path that is not literally an allowlisted path is refused, even if it is the same file."""
    with pytest.raises(Refused) as info:
        Allowlist(COMMANDS).resolve(argv0)
    assert info.value.kind == "not-allowed"


@pytest.mark.parametrize("argv0", [b"rm", b"sh", b"gcc", b"LS", b"", b".", b"..", b"ls ",
                                   b"\xff\xfe"])
def test_resolve_unknown_name_refused(argv0):
    """Names not in the allowlist (including the target basename of an alias) are refused."""
    with pytest.raises(Refused) as info:
        Allowlist(COMMANDS).resolve(argv0)
    assert info.value.kind == "not-allowed"


def test_refused_text_names_the_command():
    """The refusal text names the command so the user sees what was refused."""
    with pytest.raises(Refused, match="rm"):
        Allowlist(COMMANDS).resolve(b"rm")


def test_refused_carries_kind_and_text():
    """Refused keeps its kind beside a plain exception message."""
    exc = Refused("root", "no root here")
    assert exc.kind == "root" and str(exc) == "no root here"
    assert isinstance(exc, Exception)


# --- check_identity ----------------------------------------------------------------------------

@pytest.mark.parametrize("uid,gid", [(0, 0), (0, 1000), (1000, 0)])
def test_root_refused_without_allow_root(uid, gid):
    """A job as root uid or root gid is refused with kind 'root' unless allow_root."""
    with pytest.raises(Refused) as info:
        check_identity(uid, gid, allow_root=False, daemon_uid=0)
    assert info.value.kind == "root"


@pytest.mark.parametrize("uid,gid", [(0, 0), (0, 1000), (1000, 0)])
def test_root_allowed_with_allow_root(uid, gid):
    """With allow_root, a root daemon runs jobs as root uid or gid."""
    check_identity(uid, gid, allow_root=True, daemon_uid=0)


def test_root_daemon_runs_any_user():
    """A root daemon may run jobs as any non-root user."""
    for uid in (1, 1000, 65534, 2**32 - 2):
        check_identity(uid, 100, allow_root=False, daemon_uid=0)


def test_non_root_daemon_runs_own_uid_only():
    """A non-root daemon runs jobs as its own uid and refuses others with kind 'identity'."""
    check_identity(1000, 1000, allow_root=False, daemon_uid=1000)
    check_identity(1000, 50, allow_root=False, daemon_uid=1000)
    with pytest.raises(Refused) as info:
        check_identity(1001, 1000, allow_root=False, daemon_uid=1000)
    assert info.value.kind == "identity"


def test_non_root_daemon_cannot_run_root_even_if_allowed():
    """allow_root does not let a non-root daemon run a job as root."""
    with pytest.raises(Refused) as info:
        check_identity(0, 0, allow_root=True, daemon_uid=1000)
    assert info.value.kind == "identity"


# --- job_env -----------------------------------------------------------------------------------

CALLER = {
    b"PATH": b"/home/evil/bin", b"LD_PRELOAD": b"/tmp/evil.so", b"LD_LIBRARY_PATH": b"/tmp",
    b"PYTHONPATH": b"/tmp/py", b"HOME": b"/home/caller", b"USER": b"mallory",
    b"LOGNAME": b"mallory", b"LANG": b"de_DE.UTF-8", b"LC_ALL": b"C", b"LC_CTYPE": b"C.\xff",
    b"TZ": b"UTC", b"FOO": b"bar", b"OFFLOAD_SLOT": b"99",
}
BASE = base_env("/home/svc", "svc")


def test_base_env():
    """The host base sets PATH to the host path and HOME, USER, LOGNAME from the host."""
    assert BASE == {"PATH": HOST_PATH, "HOME": "/home/svc", "USER": "svc", "LOGNAME": "svc"}


@pytest.mark.parametrize("patterns", [("*",), ("PATH", "LD_PRELOAD", "PYTHONPATH", "HOME",
                                                "USER", "LANG", "LC_*"),
                                      ("P*", "L*", "H*", "U*"), DEFAULT_PASS])
def test_caller_cannot_override_dangerous_variables(patterns):
    """PATH, LD_*, PYTHON*, HOME, USER never come from the caller, whatever the patterns."""
    env = job_env(CALLER, patterns, BASE)
    assert env[b"PATH"] == HOST_PATH.encode()
    assert env[b"HOME"] == b"/home/svc"
    assert env[b"USER"] == b"svc"
    assert env[b"LOGNAME"] == b"svc"
    assert b"LD_PRELOAD" not in env
    assert b"LD_LIBRARY_PATH" not in env
    assert b"PYTHONPATH" not in env


def test_locale_passes_with_default_patterns():
    """LANG and LC_* travel with the job under the default patterns, bytes unchanged."""
    env = job_env(CALLER, DEFAULT_PASS, BASE)
    assert env[b"LANG"] == b"de_DE.UTF-8"
    assert env[b"LC_ALL"] == b"C"
    assert env[b"LC_CTYPE"] == b"C.\xff"
    assert env[b"TZ"] == b"UTC"
    assert b"FOO" not in env


def test_star_passes_harmless_variables():
    """With '*', ordinary variables pass along with the locale."""
    env = job_env(CALLER, ("*",), BASE)
    assert env[b"FOO"] == b"bar" and env[b"LANG"] == b"de_DE.UTF-8"


def test_no_patterns_gives_base_only():
    """With no pass patterns the job gets exactly the host base."""
    assert job_env(CALLER, (), BASE) == {k.encode(): v.encode() for k, v in BASE.items()}


def test_caller_cannot_override_offload_variables():
    """OFFLOAD* variables set by the host (like OFFLOAD_SLOT) are not replaced by the caller's."""
    env = job_env(CALLER, ("*",), BASE | {"OFFLOAD_SLOT": "2"})
    assert env[b"OFFLOAD_SLOT"] == b"2"
    assert b"OFFLOAD_SLOT" not in job_env(CALLER, ("*",), BASE)


def test_job_env_all_bytes():
    """Every key and value of the job environment is bytes."""
    env = job_env(CALLER, ("*",), BASE)
    assert all(type(k) is bytes and type(v) is bytes for k, v in env.items())


def test_job_env_does_not_mutate_inputs():
    """job_env leaves the caller's environment and the base untouched."""
    caller, base = dict(CALLER), dict(BASE)
    job_env(caller, ("*",), base)
    assert caller == CALLER and base == BASE


def test_policy_reexports_environ():
    """offloadd.policy offers the same passing and DEFAULT_PASS as offloadfs.environ."""
    assert policy.passing is environ.passing
    assert policy.DEFAULT_PASS is environ.DEFAULT_PASS


# --- environ.passing ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", [b"PATH", b"LD_PRELOAD", b"LD_LIBRARY_PATH", b"LD_AUDIT",
                                  b"PYTHONPATH", b"PYTHONHOME", b"PYTHONSTARTUP", b"IFS", b"ENV",
                                  b"BASH_ENV", b"SHELLOPTS", b"HOME", b"USER", b"LOGNAME",
                                  b"SHELL", b"MAIL", b"TMPDIR", b"GCONV_PATH", b"HOSTALIASES",
                                  b"LOCPATH", b"MALLOC_CHECK_", b"NLSPATH", b"RESOLV_HOST_CONF",
                                  b"OFFLOAD", b"OFFLOAD_SLOT"])
def test_never_pass(name):
    """Variables on the never-pass list are dropped even when named or matched by '*'."""
    env = {name: b"x"}
    assert passing(env, ("*",)) == {}
    assert passing(env, (name.decode(),)) == {}


def test_passing_default_patterns():
    """The default patterns pass the locale, TZ and terminal size, and nothing else."""
    env = {b"LANG": b"C", b"LANGUAGE": b"en", b"LC_TIME": b"C", b"TZ": b"UTC",
           b"TERM": b"xterm", b"COLUMNS": b"80", b"LINES": b"24", b"NO_COLOR": b"1",
           b"OMP_NUM_THREADS": b"4", b"MAGICK_THREAD_LIMIT": b"2",
           b"SECRET_TOKEN": b"s", b"EDITOR": b"vi", b"LCX": b"1", b"lang": b"C"}
    out = passing(env, DEFAULT_PASS)
    assert set(out) == {b"LANG", b"LANGUAGE", b"LC_TIME", b"TZ", b"TERM", b"COLUMNS",
                        b"LINES", b"NO_COLOR", b"OMP_NUM_THREADS", b"MAGICK_THREAD_LIMIT"}
    assert all(out[k] == env[k] for k in out)


def test_passing_case_sensitive():
    """Patterns match case-sensitively: 'LANG' does not pass 'lang' and '*' keeps 'path'."""
    assert passing({b"lang": b"C"}, ("LANG",)) == {}
    assert passing({b"path": b"/x"}, ("*",)) == {b"path": b"/x"}


def test_passing_empty_patterns():
    """With no patterns nothing passes."""
    assert passing({b"LANG": b"C"}, ()) == {}


def test_passing_non_utf8_names():
    """Names that are not UTF-8 are matched without error and kept as the same bytes."""
    env = {b"X\xff": b"\xfe", b"LC_\xff": b"v"}
    assert passing(env, ("*",)) == env
    assert passing(env, ("LC_*",)) == {b"LC_\xff": b"v"}


def test_matches():
    """matches() is true when any glob pattern matches the whole name."""
    assert matches("LC_ALL", ("FOO", "LC_*"))
    assert not matches("XLC_ALL", ("LC_*",))
    assert not matches("LANG", ())
    assert matches("LANG", ("L?NG",))


# --- what a keyed VM may claim -----------------------------------------------------------------

@pytest.mark.parametrize("text, ranges", [
    ("1000-60000", ((1000, 60000),)),
    ("0", ((0, 0),)),
    ("1000-2000, 65534", ((1000, 2000), (65534, 65534))),
])
def test_parse_ranges(text, ranges):
    """uid and gid ranges as the config writes them."""
    assert policy.parse_ranges(text) == ranges


@pytest.mark.parametrize("text", ["", "a-b", "10-1", "1-", "-5", "1,,2", "1-2-3"])
def test_parse_ranges_refuses_nonsense(text):
    """A range that means nothing is an error, never an empty or open range."""
    with pytest.raises(ValueError):
        policy.parse_ranges(text)


RULE = policy.VmRule(uids=((1000, 2000),), gids=((100, 100), (1000, 2000)),
                     exports=("10.0.0.5:/srv/vm1*",))


@pytest.mark.parametrize("uid, gid, groups, export, refused", [
    (1500, 1500, [100], "10.0.0.5:/srv/vm1", None),
    (1500, 1500, [], "10.0.0.5:/srv/vm1/sub", None),
    (1500, 1500, [], None, None),
    (999, 1500, [], None, "uid 999"),
    (0, 1500, [], None, "uid 0"),
    (1500, 0, [], None, "group 0"),
    (1500, 1500, [27], None, "group 27"),
    (1500, 1500, [], "10.0.0.6:/srv/vm1", "export 10.0.0.6:/srv/vm1"),
])
def test_check_claim_with_a_rule(uid, gid, groups, export, refused):
    """A rule bounds the uid, the gid and every supplementary group, and the exports."""
    if refused is None:
        policy.check_claim("vm1", RULE, uid, gid, groups, export)
        return
    with pytest.raises(policy.Refused) as err:
        policy.check_claim("vm1", RULE, uid, gid, groups, export)
    assert refused in str(err.value) and err.value.kind == "identity"


def test_check_claim_without_a_rule_allows_any_uid_but_root():
    """No [security.vms.NAME]: any uid, group and export, but never uid 0."""
    policy.check_claim("vm1", None, 12345, 0, [0], "any:/where")
    with pytest.raises(policy.Refused, match="may not run jobs as root"):
        policy.check_claim("vm1", None, 0, 100, [], None)
    policy.check_claim("vm1", policy.VmRule(uids=((0, 0),)), 0, 0, [], None)


def test_check_identity_refuses_a_root_group():
    """A supplementary group 0 is root's too: refused unless root is allowed."""
    with pytest.raises(policy.Refused):
        policy.check_identity(1000, 1000, False, 0, [5, 0])
    policy.check_identity(1000, 1000, True, 0, [5, 0])
