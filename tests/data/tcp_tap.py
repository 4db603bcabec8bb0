"""A TCP relay that records every byte it forwards:
``tcp_tap.py TARGET_PORT CAPTURE_FILE [HOLD]``.

Listens on an ephemeral loopback port (printed on stdout as ``PORT``), relays each connection
to 127.0.0.1:TARGET_PORT and appends both directions to CAPTURE_FILE. Tests use it to see what
an eavesdropper on the network would see. With HOLD (seconds), what the target sends on a new
connection is held that long: a host slow to answer its first hello. Runs until killed.
"""
import selectors
import socket
import sys
import time


def main() -> None:
    """Relay and record until killed."""
    target, capture = int(sys.argv[1]), open(sys.argv[2], "ab", buffering=0)
    hold = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    held = []   # (when to start reading it, upstream, client)
    while True:
        now = time.monotonic()
        for item in [h for h in held if h[0] <= now]:
            held.remove(item)
            if item[1].fileno() >= 0:
                sel.register(item[1], selectors.EVENT_READ, item[2])
        wait = min((h[0] for h in held), default=now + 3600) - now
        for key, _ in sel.select(max(wait, 0)):
            if key.fileobj is listener:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", target))
                sel.register(client, selectors.EVENT_READ, upstream)
                held.append((time.monotonic() + hold, upstream, client))
                continue
            if key.fileobj.fileno() < 0:
                continue        # its partner closed it earlier in this round
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (key.fileobj, key.data):
                    if s.fileno() >= 0:
                        try:
                            sel.unregister(s)
                        except KeyError:
                            pass        # an upstream still held
                        s.close()
                continue
            capture.write(data)
            key.data.sendall(data)


if __name__ == "__main__":
    main()
