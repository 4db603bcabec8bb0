"""Unit tests for offloadfs.protocol: round trips, typed errors, limits, and fuzzing."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offloadfs import protocol
from offloadfs.protocol import (
    MAX_ARGV_BYTES,
    MAX_ENV_BYTES,
    MAX_HEADER,
    MAX_PAYLOAD,
    MAX_TEXT,
    DecodeError,
    FieldError,
    FrameError,
    KindError,
    Message,
    ProtocolError,
    TooLarge,
    VersionError,
    decode,
    encode,
    error_frames,
)

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# One valid example per kind, with every optional field set: kind -> (job, payload, fields).
EXAMPLES: dict[str, tuple[str | None, bytes | None, dict]] = {
    "hello": (None, None, {}),
    "welcome": (None, None, {"host": "fast-host", "commands": ["cc", "ffmpeg"], "slots": 8,
                             "tags": ["gpu"], "busy": 2, "queued": 0}),
    "submit": ("job-1", None, {
        "argv": [b"cc", b"-O2", b"caf\xe9.c", b""], "cwd": b"/home/u/src/\xff", "uid": 1000,
        "gid": 1000, "groups": [4, 24, 1000], "env": {b"LANG": b"C.UTF-8", b"X": b"\xfe"},
        "window": 4 * 1024 * 1024, "tags": ["gpu"],
        "data": {"size": 3, "name": "f", "raw": b"\x00\x01", "ok": True, "none": None,
                 "ratio": 0.5},
        "tty": {"fds": 7, "rows": 40, "cols": 100, "xpixel": 0, "ypixel": 0, "iflag": 0x500,
                "oflag": 5, "cflag": 0xbf, "lflag": 0x8a3b, "ispeed": 15, "ospeed": 15,
                "cc": bytes(32), "foreground": True}}),
    "queued": ("job-1", None, {"position": 3}),
    "started": ("job-1", None, {"host": "fast-host", "pid": 4242, "window": 65536}),
    "file": ("job-1", b"\x89PNG", {"name": b"sub/in.png", "mode": 0o644, "last": True}),
    "ready": (None, None, {"host": "h1", "commands": ["cat"], "slots": 2, "tags": ["gpu"]}),
    "stdin": ("job-1", b"input \x00\xff bytes", {}),
    "stdin-eof": ("job-1", None, {}),
    "stdout": ("job-1", b"output\n", {}),
    "stderr": ("job-1", b"warning\n", {}),
    "credit": ("job-1", None, {"n": 262144}),
    "close": ("job-1", None, {"stream": "stderr"}),
    "signal": ("job-1", None, {"signum": 15}),
    "cancel": ("job-1", None, {}),
    "tty": ("job-1", b"\x1b[1mbold\r\n", {}),
    "resize": ("job-1", None, {"rows": 50, "cols": 132, "xpixel": 0, "ypixel": 0}),
    "stopped": ("job-1", None, {"signal": 20}),
    "suspend": ("job-1", None, {}),
    "resume": ("job-1", None, {"foreground": False}),
    "exit": ("job-1", None, {"status": 1, "signal": 9, "rusage": {"maxrss": 1024, "utime": 0.25},
                             "timings": {"queued": 0.0, "run": 1.5}}),
    "error": ("job-1", None, {"kind": "field", "text": "bad field", "started": False}),
    "ping": (None, None, {"jobs": ["job-1", "job-2"]}),
    "status": (None, None, {}),
    "status-reply": (None, None, {"host": "fast-host", "slots": 4, "busy": 1, "queued": 2,
                                  "commands": ["cc"], "tags": [], "jobs": [{"job": "job-1"}],
                                  "done": 10, "failed": 1}),
}


def required_only(kind: str) -> dict:
    """The example fields of ``kind`` without its optional fields."""
    _, required, _ = protocol.SCHEMA[kind]
    return {k: v for k, v in EXAMPLES[kind][2].items() if k in required}


def header_of(kind: str, /, **changes) -> dict:
    """A valid wire header for ``kind``, with ``changes`` applied (a value of ... deletes)."""
    job, _, fields = EXAMPLES[kind]
    header = {"v": protocol.VERSION, "t": kind, **fields}
    if job is not None:
        header["job"] = job
    for name, value in changes.items():
        if value is ...:
            header.pop(name, None)
        else:
            header[name] = value
    return header


def frames_of(header: dict, payload: bytes | None = None) -> list:
    """Pack a header (and optional payload) into frames, bypassing encode's checks."""
    frame0 = msgpack.packb(header, use_bin_type=True)
    return [frame0] if payload is None else [frame0, payload]


def assert_decodes_or_protocol_error(frames: list) -> Message | None:
    """Decode ``frames``: a Message or a ProtocolError are fine, anything else fails."""
    try:
        msg = decode(frames)
    except ProtocolError:
        return None
    assert isinstance(msg, Message)
    # Whatever decode accepts, encode must accept, and re-encoding is then a fixed point
    # (compared as bytes, so NaN floats in plain maps do not spoil the comparison).
    frames = encode(msg.kind, msg.job, msg.payload, **msg.fields)
    again = decode(frames)
    assert (again.kind, again.job, again.payload) == (msg.kind, msg.job, msg.payload)
    assert encode(again.kind, again.job, again.payload, **again.fields) == frames
    return msg


# --- round trips -------------------------------------------------------------------------------

def test_every_kind_has_an_example():
    """Each kind in SCHEMA has a round-trip example here, so a new kind needs a test."""
    assert set(EXAMPLES) == set(protocol.SCHEMA)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_round_trip_all_fields(kind):
    """encode then decode gives back kind, job, payload and every field unchanged."""
    job, payload, fields = EXAMPLES[kind]
    msg = decode(encode(kind, job, payload, **fields))
    assert msg == Message(kind, job, fields, payload)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_round_trip_required_fields_only(kind):
    """A message with only its required fields round-trips and gains no optional fields."""
    job, payload, _ = EXAMPLES[kind]
    fields = required_only(kind)
    msg = decode(encode(kind, job, payload, **fields))
    assert msg == Message(kind, job, fields, payload)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_encode_frame_count(kind):
    """Stream kinds encode to two frames, all others to one."""
    job, payload, fields = EXAMPLES[kind]
    frames = encode(kind, job, payload, **fields)
    assert len(frames) == (2 if kind in protocol.PAYLOAD_KINDS else 1)
    assert all(isinstance(f, bytes) for f in frames)


def test_bytes_stay_bytes():
    """argv, cwd and env come back as bytes, including bytes that are not UTF-8."""
    job, _, fields = EXAMPLES["submit"]
    fields = dict(fields, argv=[b"\xff\xfe", b"caf\xc3\xa9"], cwd=b"/tmp/\xe9",
                  env={b"LANG\xff": b"\x80\x81"})
    msg = decode(encode("submit", job, None, **fields))
    assert msg["argv"] == [b"\xff\xfe", b"caf\xc3\xa9"]
    assert all(type(a) is bytes for a in msg["argv"])
    assert type(msg["cwd"]) is bytes and msg["cwd"] == b"/tmp/\xe9"
    assert msg["env"] == {b"LANG\xff": b"\x80\x81"}
    assert all(type(k) is bytes and type(v) is bytes for k, v in msg["env"].items())


def test_str_stay_str():
    """Text fields come back as str, non-ASCII included, never as bytes."""
    msg = decode(encode("welcome", None, None, host="hôte-ü", commands=["ç"], slots=1,
                        tags=["日本"]))
    assert msg["host"] == "hôte-ü" and type(msg["host"]) is str
    assert msg["commands"] == ["ç"] and type(msg["commands"][0]) is str
    assert msg["tags"] == ["日本"]
    err = decode(encode("error", "jöb", None, kind="field", text="ünïcode"))
    assert type(err.job) is str and err.job == "jöb"
    assert type(err["text"]) is str


def test_empty_payload_is_kept():
    """An empty stream payload decodes as b'', not as a missing payload."""
    msg = decode(encode("stdout", "j", b""))
    assert msg.payload == b""


def test_frames_may_be_buffers():
    """decode accepts bytearray and memoryview frames (as ZeroMQ hands them over), and keeps
    a payload as a view of its frame, not a copy."""
    frames = encode("stdout", "j", b"data")
    buffer = bytearray(frames[1])
    msg = decode([bytearray(frames[0]), memoryview(buffer)])
    assert msg.payload == b"data" and len(msg.payload) == 4
    buffer[0:1] = b"D"
    assert bytes(msg.payload) == b"Data"


def test_unknown_fields_are_dropped():
    """Fields not in the schema are ignored (forward compatible) and not exposed."""
    msg = decode(frames_of(header_of("queued", future="x", more=[1, 2])))
    assert msg.fields == {"position": 3}
    assert msg.get("future") is None


def test_message_accessors():
    """Message[name] returns a field, .get falls back to the default, [] on missing raises."""
    msg = decode(encode("queued", "j", None, position=2))
    assert msg["position"] == 2
    assert msg.get("position") == 2
    assert msg.get("nope", 7) == 7
    with pytest.raises(KeyError):
        msg["nope"]


def test_optional_none_values_allowed():
    """Optional fields declared nullable accept None (exit signal, data)."""
    assert decode(encode("exit", "j", None, status=0, signal=None))["signal"] is None
    job, _, fields = EXAMPLES["submit"]
    assert decode(encode("submit", job, None, **dict(fields, data=None)))["data"] is None


def test_job_optional_on_error():
    """An error reply may go without a job id."""
    msg = decode(encode("error", None, None, kind="decode", text="x"))
    assert msg.job is None


# --- frame errors ------------------------------------------------------------------------------

def test_zero_frames():
    """No frames at all is a FrameError."""
    with pytest.raises(FrameError):
        decode([])


def test_three_frames():
    """Three frames is a FrameError, even if the first two are valid."""
    frames = encode("stdout", "j", b"x")
    with pytest.raises(FrameError):
        decode(frames + [b"extra"])


@pytest.mark.parametrize("kind", sorted(set(EXAMPLES) - protocol.PAYLOAD_KINDS))
def test_payload_on_non_stream_kind(kind):
    """A payload frame on a kind that takes none is a FrameError."""
    with pytest.raises(FrameError):
        decode(frames_of(header_of(kind), b"payload"))
    job, _, fields = EXAMPLES[kind]
    with pytest.raises(FrameError):
        encode(kind, job, b"payload", **fields)


@pytest.mark.parametrize("kind", sorted(protocol.PAYLOAD_KINDS))
def test_missing_payload_on_stream_kind(kind):
    """stdin, stdout and stderr without a payload frame are FrameErrors."""
    with pytest.raises(FrameError):
        decode(frames_of(header_of(kind)))
    with pytest.raises(FrameError):
        encode(kind, "j")


# --- decode errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("frame0", [
    b"",                                   # nothing
    b"\xc1",                               # the one never-used msgpack byte
    b"\xde\xad\xbe\xef",                   # map16 with a length the frame does not hold
    b"\x93\x01\x02",                       # truncated array
    b"not msgpack at all \x00\xff",        # text followed by garbage
    msgpack.packb({"v": 1, "t": "hello"}) + b"\x00",   # trailing data
], ids=["empty", "c1", "deadbeef", "truncated", "text", "trailing"])
def test_garbage_is_decode_error(frame0):
    """Frame 0 that is not exactly one msgpack value is a DecodeError."""
    with pytest.raises(DecodeError):
        decode([frame0])


@pytest.mark.parametrize("value", [5, [1, 2], "hello", b"hello", None, 1.5, True],
                         ids=["int", "list", "str", "bin", "nil", "float", "bool"])
def test_non_map_is_decode_error(value):
    """A msgpack value other than a map in frame 0 is a DecodeError."""
    with pytest.raises(DecodeError):
        decode([msgpack.packb(value, use_bin_type=True)])


def test_invalid_utf8_in_str_is_decode_error():
    """A msgpack str holding invalid UTF-8 is a DecodeError, not a UnicodeDecodeError."""
    frame0 = b"\x82\xa1v\x01\xa1t\xa2\xff\xfe"      # {"v": 1, "t": <str b"\xff\xfe">}
    with pytest.raises(DecodeError):
        decode([frame0])


def test_invalid_utf8_in_key_is_decode_error():
    """A map key that is a str holding invalid UTF-8 is a DecodeError."""
    frame0 = b"\x83\xa1v\x01\xa1t\xa5hello\xa1\xff\x01"
    with pytest.raises(DecodeError):
        decode([frame0])


@pytest.mark.parametrize("code", [0, 5, 127, -2, -128])
def test_ext_types_are_decode_error(code):
    """msgpack extension types anywhere in the header are DecodeErrors."""
    ext = b"\xd4" + code.to_bytes(1, "big", signed=True) + b"\x00"     # fixext1
    prefix = b"\x83\xa1v\x01\xa1t\xa5hello\xa1x"                       # {"v":1,"t":"hello","x":
    for frame0 in (prefix + ext, prefix + b"\x91" + ext, ext):
        with pytest.raises(DecodeError):
            decode([frame0])


def test_timestamp_ext_is_decode_error():
    """The timestamp extension (type -1) is rejected like every other extension type."""
    ts = msgpack.Timestamp(1, 0)
    for header in ({"v": 1, "t": "hello", "x": ts},
                   {"v": 1, "t": "hello", "x": [ts]},
                   {"v": 1, "t": "hello", "x": {"y": ts}},
                   {"v": 1, "t": "submit", "job": "j", "data": {"when": ts}}):
        with pytest.raises(DecodeError):
            decode([msgpack.packb(header)])


def test_non_string_map_key_is_decode_error():
    """Map keys must be str or bytes; an integer key is a DecodeError."""
    with pytest.raises(DecodeError):
        decode([msgpack.packb({"v": 1, "t": "hello", 5: 1})])


def test_deep_nesting_is_decode_error():
    """Absurdly deep nesting is refused as a DecodeError, not a RecursionError."""
    frame0 = b"\x83\xa1v\x01\xa1t\xa5hello\xa1x" + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(DecodeError):
        decode([frame0])


# --- version and kind errors -------------------------------------------------------------------

@pytest.mark.parametrize("v", [..., 999, 0, "1", b"1", None, True, 1.0, [1]],
                         ids=["missing", "999", "0", "str", "bytes", "nil", "bool", "float",
                              "list"])
def test_bad_version(v):
    """Anything but the integer VERSION in v is a VersionError."""
    with pytest.raises(VersionError):
        decode(frames_of(header_of("hello", v=v)))


def test_version_checked_before_kind():
    """A foreign version is reported as such even when the kind is unknown too."""
    with pytest.raises(VersionError):
        decode(frames_of({"v": 2, "t": "future-kind"}))


def test_encode_rejects_version_override():
    """encode refuses to send a header with another version."""
    with pytest.raises(VersionError):
        encode("hello", v=2)


@pytest.mark.parametrize("t", ["nope", b"hello", ..., None, 1, "", "HELLO", ["hello"]],
                         ids=["unknown", "bytes", "missing", "nil", "int", "empty", "case",
                              "list"])
def test_bad_kind(t):
    """An unknown, missing or non-str message kind is a KindError."""
    with pytest.raises(KindError):
        decode(frames_of(header_of("hello", t=t)))


def test_encode_unknown_kind():
    """encode refuses an unknown kind with KindError."""
    with pytest.raises(KindError):
        encode("launch-missiles")


# --- field errors ------------------------------------------------------------------------------

FIELD_ERRORS = [
    ("submit", {"job": ...}),                         # missing job id
    ("queued", {"job": ...}),
    ("stdout", {"job": ...}),
    ("submit", {"job": ""}),                          # empty job id
    ("submit", {"job": "x" * (protocol.JOB_ID_MAX + 1)}),
    ("submit", {"job": b"job-1"}),                    # job id as bytes
    ("submit", {"job": 7}),
    ("submit", {"argv": ...}),                        # missing required field
    ("submit", {"uid": "1000"}),                      # wrong types
    ("submit", {"uid": 1.0}),
    ("submit", {"cwd": "/tmp"}),
    ("submit", {"argv": ["ls"]}),
    ("submit", {"argv": b"ls"}),
    ("submit", {"env": {"LANG": b"C"}}),
    ("submit", {"env": {b"LANG": "C"}}),
    ("submit", {"env": [b"LANG=C"]}),
    ("submit", {"groups": [b"1"]}),
    ("submit", {"groups": 5}),
    ("submit", {"tags": "gpu"}),
    ("submit", {"uid": True}),                        # bool where int expected
    ("submit", {"gid": False}),
    ("submit", {"window": True}),
    ("submit", {"groups": [True]}),
    ("queued", {"position": True}),
    ("exit", {"status": False}),
    ("submit", {"uid": -1}),                          # out of range
    ("submit", {"gid": -5}),
    ("submit", {"uid": 2**32}),
    ("submit", {"window": 0}),
    ("queued", {"position": -1}),
    ("signal", {"signum": 0}),
    ("signal", {"signum": 65}),
    ("exit", {"status": 256}),
    ("exit", {"status": -1}),
    ("exit", {"signal": 0}),
    ("credit", {"n": -1}),
    ("submit", {"argv": []}),                         # empty argv
    ("submit", {"argv": [b""]}),                      # empty command name
    ("submit", {"argv": [b"ls", b"a\x00b"]}),         # NUL in argv
    ("submit", {"argv": [b"l\x00s"]}),
    ("submit", {"cwd": b"tmp"}),                      # relative cwd
    ("submit", {"cwd": b""}),
    ("submit", {"cwd": b"/tmp/\x00x"}),
    ("submit", {"env": {b"A=B": b"c"}}),              # '=' in env name
    ("submit", {"env": {b"": b"c"}}),
    ("submit", {"env": {b"A\x00": b"c"}}),
    ("submit", {"env": {b"A": b"c\x00"}}),
    ("submit", {"data": {"nested": [1]}}),            # nested value in a plain map
    ("submit", {"data": {"nested": {"a": 1}}}),
    ("submit", {"data": {b"key": 1}}),
    ("exit", {"rusage": [1, 2]}),
    ("close", {"stream": "stdin"}),                   # stream not stdout/stderr
    ("close", {"stream": b"stdout"}),
    ("close", {"stream": None}),
    ("close", {"stream": ...}),
    ("error", {"text": 5}),
    ("error", {"kind": "x" * 65}),
    ("ping", {"jobs": ["x" * (protocol.JOB_ID_MAX + 1)]}),
    ("welcome", {"host": "h" * 256}),
    ("status-reply", {"jobs": [{"a": [1]}]}),
]


@pytest.mark.parametrize("kind,changes", FIELD_ERRORS,
                         ids=[f"{k}-{next(iter(c))}-{i}" for i, (k, c) in
                              enumerate(FIELD_ERRORS)])
def test_field_errors(kind, changes):
    """Missing, mistyped or out-of-range fields are FieldErrors, on decode and on encode."""
    job, payload, _ = EXAMPLES[kind]
    header = header_of(kind, **changes)
    with pytest.raises(FieldError):
        decode(frames_of(header, payload))
    fields = {k: v for k, v in header.items() if k not in ("v", "t", "job")}
    with pytest.raises(FieldError):
        encode(kind, header.get("job"), payload, **fields)


def test_field_error_names_the_field():
    """A FieldError's text names the offending field."""
    with pytest.raises(FieldError, match="'uid'"):
        decode(frames_of(header_of("submit", uid=-1)))


def test_bounds_inclusive():
    """Range limits are inclusive: uid 0 and 2**32-1, signum 1 and 64, status 255 pass."""
    job, _, fields = EXAMPLES["submit"]
    for uid in (0, 2**32 - 1):
        assert decode(encode("submit", job, None, **dict(fields, uid=uid)))["uid"] == uid
    for signum in (1, 64):
        assert decode(encode("signal", "j", None, signum=signum))["signum"] == signum
    assert decode(encode("exit", "j", None, status=255))["status"] == 255
    long_id = "x" * protocol.JOB_ID_MAX
    assert decode(encode("cancel", long_id)).job == long_id


# --- size limits -------------------------------------------------------------------------------

def hello_of_size(size: int) -> bytes:
    """A valid hello header frame of exactly ``size`` bytes (padded by an unknown field)."""
    base = len(msgpack.packb({"v": 1, "t": "hello", "pad": b""}, use_bin_type=True))
    # An empty pad is a bin8 (2 bytes); a big one is a bin32 (5 bytes), hence the 3.
    frame = msgpack.packb({"v": 1, "t": "hello", "pad": b"x" * (size - base - 3)},
                          use_bin_type=True)
    assert len(frame) == size
    return frame


def test_header_at_limit_passes():
    """A header frame of exactly MAX_HEADER bytes is accepted."""
    assert decode([hello_of_size(MAX_HEADER)]).kind == "hello"


def test_header_over_limit():
    """A header frame over MAX_HEADER bytes is TooLarge, even if garbage."""
    with pytest.raises(TooLarge):
        decode([hello_of_size(MAX_HEADER + 1)])
    with pytest.raises(TooLarge):
        decode([b"\xc1" * (MAX_HEADER + 1)])


def test_payload_limit():
    """A payload of MAX_PAYLOAD bytes passes; one byte more is TooLarge."""
    assert len(decode(encode("stdout", "j", b"x" * MAX_PAYLOAD)).payload) == MAX_PAYLOAD
    with pytest.raises(TooLarge):
        decode(frames_of(header_of("stdout"), b"x" * (MAX_PAYLOAD + 1)))
    with pytest.raises(TooLarge):
        encode("stdin", "j", b"x" * (MAX_PAYLOAD + 1))


def test_argv_total_limit():
    """argv totalling MAX_ARGV_BYTES passes; one byte more over several args is TooLarge."""
    job, _, fields = EXAMPLES["submit"]
    half = MAX_ARGV_BYTES // 2
    ok = [b"a" * half, b"b" * (MAX_ARGV_BYTES - half)]
    assert decode(encode("submit", job, None, **dict(fields, argv=ok)))["argv"] == ok
    too_big = [b"a" * half, b"b" * (MAX_ARGV_BYTES - half + 1)]
    with pytest.raises(TooLarge):
        decode(frames_of(header_of("submit", argv=too_big)))
    with pytest.raises(TooLarge):
        encode("submit", job, None, **dict(fields, argv=too_big))


def test_env_total_limit():
    """An environment over MAX_ENV_BYTES in total is TooLarge."""
    third = MAX_ENV_BYTES // 3
    env = {b"A": b"x" * third, b"B": b"x" * third, b"C": b"x" * third}
    with pytest.raises(TooLarge):
        decode(frames_of(header_of("submit", env=env)))


# --- error_frames ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kind", [
    (ProtocolError, "protocol"), (FrameError, "frame"), (DecodeError, "decode"),
    (VersionError, "version"), (KindError, "kind"), (FieldError, "field"),
    (TooLarge, "too-large"),
])
def test_error_frames_kind(cls, kind):
    """error_frames encodes the exception's kind and text into a decodable error reply."""
    assert issubclass(cls, ProtocolError)
    frames = error_frames(cls("what went wrong"))
    assert len(frames) == 1
    msg = decode(frames)
    assert msg.kind == "error" and msg.job is None
    assert msg.fields == {"kind": kind, "text": "what went wrong"}


def test_error_frames_with_job():
    """error_frames carries the job id when given one."""
    assert decode(error_frames(FieldError("x"), "job-9")).job == "job-9"


def test_error_frames_truncates_long_text():
    """A text longer than MAX_TEXT is cut to MAX_TEXT so the reply still encodes."""
    msg = decode(error_frames(DecodeError("é" * (MAX_TEXT + 10))))
    assert msg["text"] == "é" * MAX_TEXT


def test_error_frames_from_real_failure():
    """The error caught from a bad frame turns into a reply of the matching kind."""
    with pytest.raises(ProtocolError) as info:
        decode([b"\xc1"])
    assert decode(error_frames(info.value))["kind"] == "decode"


# --- fuzzing -----------------------------------------------------------------------------------

@FUZZ
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_fuzz_random_frames(frames):
    """Arbitrary byte frames decode to a Message or raise ProtocolError, nothing else."""
    msg = assert_decodes_or_protocol_error(frames)
    if len(frames) > protocol.MAX_FRAMES:
        assert msg is None


MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = (st.none() | st.booleans() | MSGPACK_INT | st.floats() | st.text(max_size=20)
           | st.binary(max_size=20))
VALUES = st.recursive(
    SCALARS,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8),
                                        children, max_size=5)),
    max_leaves=20)
ALL_FIELDS = sorted({"job"} | {name for _, req, opt in protocol.SCHEMA.values()
                               for name in (*req, *opt)})
HEADERS = st.builds(
    lambda v, t, rest: {**rest, "v": v, "t": t},
    st.just(1), st.sampled_from(sorted(protocol.SCHEMA)),
    st.dictionaries(st.sampled_from(ALL_FIELDS), VALUES, max_size=6))


@FUZZ
@given(VALUES | HEADERS | st.dictionaries(MSGPACK_INT, VALUES, min_size=1, max_size=3),
       st.none() | st.binary(max_size=16))
def test_fuzz_msgpack_structures(value, payload):
    """Any msgpack-able structure in frame 0 decodes or raises ProtocolError, nothing else."""
    frame0 = msgpack.packb(value, use_bin_type=True)
    assert_decodes_or_protocol_error([frame0] if payload is None else [frame0, payload])


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_headers(data):
    """A valid header with one field replaced or deleted decodes or raises ProtocolError."""
    kind = data.draw(st.sampled_from(sorted(EXAMPLES)))
    job, payload, _ = EXAMPLES[kind]
    header = header_of(kind)
    name = data.draw(st.sampled_from(sorted(header)) | st.sampled_from(ALL_FIELDS))
    value = data.draw(st.just(...) | VALUES)
    frames = frames_of(header_of(kind, **{name: value}), payload)
    msg = assert_decodes_or_protocol_error(frames)
    if msg is not None and value is not ... and name in protocol.SCHEMA[kind][1]:
        assert msg[name] == value


# --- the data descriptor -----------------------------------------------------------------------

GOOD_DATA = [
    None, {}, {"mode": "stage"}, {"mode": "stage", "bytes": 0},
    {"mode": "stage", "bytes": protocol.MAX_STAGE_BYTES},
    {"mode": "nfs", "server": "nas:2049", "export": "/srv"},
    {"mode": "nfs", "server": "[fe80::1%eth0]:2049", "export": "/", "path": "a/b",
     "nonce": "n"},
    {"mode": "nfs", "server": "10.0.0.1:1", "export": "/x", "path": "", "nonce": ""},
    {"other": 1},                                     # no mode: no descriptor to check
]
BAD_DATA = [
    {"mode": "ftp"}, {"mode": b"stage"}, {"mode": ""},
    {"mode": "stage", "bytes": -1}, {"mode": "stage", "bytes": protocol.MAX_STAGE_BYTES + 1},
    {"mode": "stage", "bytes": 1.0}, {"mode": "stage", "bytes": True},
    {"mode": "stage", "bytes": "1"}, {"mode": "stage", "bytes": None},
    {"mode": "nfs", "export": "/srv"},                # no server
    {"mode": "nfs", "server": "nas", "export": "/srv"},          # no port
    {"mode": "nfs", "server": "nas:123456", "export": "/srv"},   # port of 6 digits
    {"mode": "nfs", "server": "-o:1", "export": "/srv"},         # an option to mount(8)
    {"mode": "nfs", "server": "nas:2049 ", "export": "/srv"},
    {"mode": "nfs", "server": b"nas:2049", "export": "/srv"},
    {"mode": "nfs", "server": "nas:2049"},            # no export
    {"mode": "nfs", "server": "nas:2049", "export": "srv"},      # relative export
    {"mode": "nfs", "server": "nas:2049", "export": b"/srv"},
    {"mode": "nfs", "server": "nas:2049", "export": "/srv", "path": b"a"},
    {"mode": "nfs", "server": "nas:2049", "export": "/srv", "nonce": None},
]


@pytest.mark.parametrize("data", GOOD_DATA, ids=range(len(GOOD_DATA)))
def test_check_data_accepts(data):
    """Descriptors the daemon takes pass check_data."""
    assert protocol.check_data(data) is None


@pytest.mark.parametrize("data", BAD_DATA, ids=range(len(BAD_DATA)))
def test_check_data_refuses(data):
    """A descriptor of an unknown mode or with a mistyped field is a FieldError (kind field)
    naming the descriptor."""
    with pytest.raises(FieldError, match="bad data descriptor") as info:
        protocol.check_data(data)
    assert info.value.kind == "field"


def test_check_data_modes_are_the_constants():
    """check_data knows exactly the modes of DATA_MODES."""
    assert protocol.DATA_MODES == (protocol.DATA_STAGE, protocol.DATA_NFS) == ("stage", "nfs")


# --- error kinds and roles ---------------------------------------------------------------------

def test_error_subclass_kind_keyword():
    """A ProtocolError subclass names its kind as a class keyword; one without keeps its
    parent's."""
    class Odd(FieldError):
        """No kind of its own."""
    assert Odd("x").kind == "field" and isinstance(Odd("x"), ProtocolError)


@pytest.mark.parametrize("fields,running,expected", [
    ({"started": False}, False, False), ({"started": True}, False, True),
    ({}, False, True), ({"started": False}, True, True),
])
def test_may_have_run(fields, running, expected):
    """An error's started field says whether its job may have run; absent, it may have; a
    job seen running may have run whatever the error says."""
    msg = decode(encode("error", "j", None, kind="stage", text="t", **fields))
    assert protocol.may_have_run(msg, running) is expected


def test_roles():
    """The broker sends as a client to hosts and as a host to clients; same roles never talk."""
    c, h, b = protocol.CLIENT, protocol.HOST, protocol.BROKER
    assert protocol.may_send(c, "submit", h) and protocol.may_send(b, "submit", h)
    assert not protocol.may_send(h, "submit") and not protocol.may_send(b, "submit", b)
    assert protocol.may_send(b, "started", c) and not protocol.may_send(b, "started", h)
    assert protocol.may_send(h, "ready", b) and not protocol.may_send(h, "ready", c)
    assert not protocol.may_send(c, "no-such-kind")
    assert "hello" not in protocol.sent_by(b, h) and "error" in protocol.sent_by(b, h)
    assert "ready" in protocol.accepted_by(b, h) and "ready" not in protocol.accepted_by(b, c)
    assert protocol.accepted_by(h, b) < protocol.accepted_by(h)
    assert "welcome" not in protocol.accepted_by(b)


def test_dispatch_check():
    """dispatch_check names the kinds missing from a handler table and those it may never
    receive."""
    h = protocol.HOST
    handled = set(protocol.accepted_by(h))
    assert protocol.dispatch_check(h, handled) == (frozenset(), frozenset())
    missing, extra = protocol.dispatch_check(h, handled - {"ping"} | {"exit"})
    assert (missing, extra) == ({"ping"}, {"exit"})
    assert protocol.dispatch_check(h, {k: None for k in handled}, protocol.BROKER)[1] == \
        {"hello", "status"}


# --- a relay's decode and pack (the broker passing on what a host sends) ----------------------

RELAY_READS = {"exit": ("status", "signal", "timings"), "started": ()}


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_pack_makes_the_bytes_of_encode(kind):
    """pack (no check: the fields were checked when decoded) gives encode's frames."""
    job, payload, fields = EXAMPLES[kind]
    assert protocol.pack(kind, job, payload, fields) == encode(kind, job, payload, **fields)


def test_a_relays_decode_checks_what_it_reads_and_keeps_the_rest_to_pass_on():
    """With reads, a field the relay reads is checked as the schema says; one it does not read
    is left to the receiver, and the whole header goes on under the relay's new job id."""
    frames = [msgpack.packb({"v": 1, "t": "exit", "job": "w-1", "status": 0,
                             "rusage": {"nested": [1]}, "later": "x"})]
    with pytest.raises(FieldError):
        decode(frames)                                  # the receiver refuses the rusage
    msg = decode(frames, RELAY_READS)
    assert (msg.kind, msg.job, msg.fields) == ("exit", "w-1", {"status": 0})
    passed = decode(protocol.pack(msg.kind, "c-7", msg.payload, msg.header), RELAY_READS)
    assert passed.job == "c-7" and passed.header["rusage"] == {"nested": [1]}
    bad = [msgpack.packb({"v": 1, "t": "exit", "job": "w-1", "status": 300})]
    with pytest.raises(FieldError, match="status"):
        decode(bad, RELAY_READS)
    with pytest.raises(FieldError, match="status"):
        decode([msgpack.packb({"v": 1, "t": "exit", "job": "w-1"})], RELAY_READS)


@pytest.mark.parametrize("header, error", [
    ({"v": 2, "t": "started", "job": "j"}, VersionError),
    ({"v": 1, "t": "nosuch", "job": "j"}, KindError),
    ({"v": 1, "t": "started"}, FieldError),
    ({"v": 1, "t": "started", "job": "x" * 65}, FieldError),
    ({"v": 1, "t": "started", "job": "j", "host": msgpack.Timestamp(1, 0)}, DecodeError),
])
def test_a_relays_decode_still_checks_the_envelope(header, error):
    """Version, kind, job id and extension types are checked whatever the relay reads."""
    with pytest.raises(error):
        decode([msgpack.packb(header)], RELAY_READS)


def test_a_relays_decode_refuses_a_payload_where_none_goes():
    """Frames and payloads are checked as always."""
    with pytest.raises(FrameError):
        decode([msgpack.packb({"v": 1, "t": "started", "job": "j"}), b"x"], RELAY_READS)


def test_a_header_with_a_0xff_byte_but_no_timestamp_decodes():
    """The byte that marks a timestamp's type may stand in plain values (255, bytes)."""
    msg = decode(encode("exit", "j", None, status=255, rusage={"b": b"\xff\xff"}))
    assert msg["status"] == 255 and msg["rusage"] == {"b": b"\xff\xff"}
