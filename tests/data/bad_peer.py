"""A hostile peer: sends COUNT malformed messages to ENDPOINT, then closes.

    python bad_peer.py tcp://127.0.0.1:PORT COUNT SEED
"""
import os
import random
import sys

import msgpack
import zmq

endpoint, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
SHAPES = [
    lambda: os.urandom(rnd.randint(0, 4096)),
    lambda: msgpack.packb(rnd.randint(-9, 9**9)),
    lambda: msgpack.packb({"v": 999, "t": "submit"}),
    lambda: msgpack.packb({"v": 1, "t": "submit", "job": "x", "argv": "x" * 10**5}),
    lambda: msgpack.packb({"v": 1, "t": "submit", "job": "j", "argv": [b"sh"], "cwd": b"/",
                           "uid": -1, "gid": 0, "groups": [], "env": {}, "window": 1}),
    lambda: msgpack.packb({"v": 1, "t": "stdin", "job": "nope"}),
    lambda: msgpack.packb({"v": 1, "t": "credit", "job": "nope", "n": True}),
    lambda: msgpack.packb({"v": 1, "t": "exit", "job": "nope", "status": 0}),
    lambda: msgpack.packb(["submit", None, {}]),
    lambda: b"\xc1" * 64,
    lambda: msgpack.packb({"v": 1, "t": b"\xff" * 9}),
    lambda: msgpack.packb({"v": 1, "t": "hello"}, use_bin_type=False) + b"trailing",
    lambda: msgpack.ExtType(5, b"x") and msgpack.packb(msgpack.ExtType(5, b"xyz")),
]
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.linger = 0
sock.connect(endpoint)
for _ in range(count):
    sock.send_multipart([rnd.choice(SHAPES)() for _ in range(rnd.randint(1, 4))])
sock.close()
ctx.term()
