"""Small real apps for the eager-swap tests, run in testbed pods (`python eager_apps.py ...`).

    server asyncio|threaded PORT     echo server; each connection first gets one JSON line
                                     with the addresses its socket shows (getsockname and
                                     getpeername as the app sees them), then an echo
    client HOST PORT NBYTES blocking|nonblocking
                                     connects, writes at once (no pause after connect()),
                                     reads the server's line, streams NBYTES and checks the
                                     echo; prints one JSON line with both sides' views and
                                     the sha256 of what came back
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import selectors
import socket
import sys
import threading


def _views(sock: socket.socket) -> dict[str, list]:
    return {"sockname": list(sock.getsockname()[:2]), "peername": list(sock.getpeername()[:2])}


def _pattern(n: int) -> bytes:
    block = hashlib.sha256(b"eager").digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


async def _serve_asyncio(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        hello = await reader.readline()
        writer.write(json.dumps({"hello": hello.decode().strip(), **_views(sock)}).encode()
                     + b"\n")
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def _serve_threaded(port: int) -> None:
    lst = socket.create_server(("0.0.0.0", port), backlog=64)
    print("listening", flush=True)

    def handle(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            hello = f.readline()
            conn.sendall(json.dumps({"hello": hello.decode().strip(), **_views(conn)}).encode()
                         + b"\n")
            while data := f.read1(65536):
                conn.sendall(data)

    def acceptor() -> None:  # several threads accept on one listener
        while True:
            conn, _ = lst.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threads = [threading.Thread(target=acceptor, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _client(host: str, port: int, nbytes: int, mode: str) -> None:
    if mode == "blocking":
        sock = socket.create_connection((host, port), timeout=30)
    else:  # EINPROGRESS, then wait for writability and read SO_ERROR, as event loops do
        sock = socket.socket()
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        assert err in (0, 115), err
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_WRITE)
        assert sel.select(30), "connect did not complete"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        sel.close()
        sock.setblocking(True)
        sock.settimeout(30)
    first = _views(sock)
    sock.sendall(b"hello from the client\n")
    f = sock.makefile("rb")
    server_view = json.loads(f.readline())
    data = _pattern(nbytes)
    sent = threading.Thread(target=sock.sendall, args=(data,))
    sent.start()
    got = hashlib.sha256()
    left = nbytes
    while left:
        chunk = f.read1(min(left, 1 << 20))
        assert chunk, "EOF before the whole echo"
        got.update(chunk)
        left -= len(chunk)
    sent.join()
    print(json.dumps({"first": first, "last": _views(sock), "server": server_view,
                      "ok": got.hexdigest() == hashlib.sha256(data).hexdigest()}), flush=True)
    sock.close()


def main(argv: list[str]) -> None:
    if argv[0] == "server":
        if argv[1] == "asyncio":
            asyncio.run(_serve_asyncio(int(argv[2])))
        else:
            _serve_threaded(int(argv[2]))
    else:
        _client(argv[1], int(argv[2]), int(argv[3]), argv[4])


if __name__ == "__main__":
    main(sys.argv[1:])
