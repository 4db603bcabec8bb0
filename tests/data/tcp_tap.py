"""A TCP relay that records every byte it forwards: ``tcp_tap.py TARGET_PORT CAPTURE_FILE``.

Listens on an ephemeral loopback port (printed on stdout as ``PORT``), relays each connection
to 127.0.0.1:TARGET_PORT and appends both directions to CAPTURE_FILE. Tests use it to see what
an eavesdropper on the network would see. Runs until killed.
"""
import selectors
import socket
import sys


def main() -> None:
    """Relay and record until killed."""
    target, capture = int(sys.argv[1]), open(sys.argv[2], "ab", buffering=0)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", target))
                sel.register(client, selectors.EVENT_READ, upstream)
                sel.register(upstream, selectors.EVENT_READ, client)
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
                        sel.unregister(s)
                        s.close()
                continue
            capture.write(data)
            key.data.sendall(data)


if __name__ == "__main__":
    main()
