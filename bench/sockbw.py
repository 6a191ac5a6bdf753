#!/usr/bin/env python3
"""What the loopback socket itself carries: one sender, one receiver, 1 MiB writes,
over TCP on 127.0.0.1 and over a Unix socket. Prints MiB/s per transport as JSON."""
import json
import os
import socket
import sys
import tempfile
import threading
import time

CHUNK = 1 << 20
SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0


def measure(family, addr):
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind(addr)
    srv.listen(1)
    bound = srv.getsockname()
    received = [0]

    def sink():
        conn, _ = srv.accept()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = conn.recv_into(view)
            if n == 0:
                break
            received[0] += n
        conn.close()

    t = threading.Thread(target=sink)
    t.start()
    cli = socket.socket(family, socket.SOCK_STREAM)
    cli.connect(bound)
    data = b"\xa5" * CHUNK
    start = time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        cli.sendall(data)
    cli.close()
    t.join()
    elapsed = time.perf_counter() - start
    srv.close()
    return received[0] / elapsed / (1 << 20)


def main():
    out = {"tcp": measure(socket.AF_INET, ("127.0.0.1", 0))}
    with tempfile.TemporaryDirectory() as d:
        out["unix"] = measure(socket.AF_UNIX, os.path.join(d, "s"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
