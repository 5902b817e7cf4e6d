"""A controllable target for swap tests: a plain program driven by lines on stdin.

It listens on argv[1] and answers each command with one line on stdout:
  accept                    -> fd of the accepted connection
  rcvtimeo FD SEC USEC      -> ok   (SO_RCVTIMEO)
  nonblock FD 0|1           -> ok   (O_NONBLOCK)
  inherit FD 0|1            -> ok   (1 clears FD_CLOEXEC)
  epoll N FD EVENTS DATA    -> ok   (EPOLL_CTL_ADD to its epoll set N with 64-bit DATA)
  epfds                     -> fds of its two epoll sets
  wait N                    -> data of the ready events of epoll set N (timeout 2 s)
  recv FD N                 -> hex of up to N bytes read, or an errno name
  send FD HEX               -> bytes written
  close FD                  -> ok
  dupto FD NEWFD            -> ok   (dup2)
  async FD                  -> ok   (O_ASYNC, SIGIO to this process, counted)
  sigio                     -> SIGIO count so far
"""

import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
SIGIO_COUNT = [0]


def on_sigio(signum, frame) -> None:
    SIGIO_COUNT[0] += 1
EVENT = struct.Struct("<IQ") if os.uname().machine == "x86_64" else struct.Struct("=I4xQ")


def main() -> None:
    lst = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    eps = [libc.epoll_create1(os.O_CLOEXEC), libc.epoll_create1(os.O_CLOEXEC)]
    conns: dict[int, socket.socket] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *a = line.split()
        try:
            out = run(cmd, a, lst, eps, conns)
        except OSError as e:
            out = errno.errorcode.get(e.errno or 0, str(e))
        print(out, flush=True)


def run(cmd, a, lst, eps, conns) -> str:
    if cmd == "accept":
        c, _ = lst.accept()
        conns[c.fileno()] = c
        return str(c.fileno())
    if cmd == "rcvtimeo":
        fd, sec, usec = map(int, a)
        conns[fd].setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))
        return "ok"
    if cmd == "nonblock":
        os.set_blocking(int(a[0]), a[1] == "0")
        return "ok"
    if cmd == "inherit":
        os.set_inheritable(int(a[0]), a[1] == "1")
        return "ok"
    if cmd == "epoll":
        n, fd, events, data = int(a[0]), int(a[1]), int(a[2], 0), int(a[3], 0)
        buf = ctypes.create_string_buffer(EVENT.pack(events, data))
        if libc.epoll_ctl(eps[n], 1, fd, buf) != 0:
            raise OSError(ctypes.get_errno(), "epoll_ctl")
        return "ok"
    if cmd == "epfds":
        return " ".join(map(str, eps))
    if cmd == "wait":
        buf = ctypes.create_string_buffer(EVENT.size * 8)
        n = libc.epoll_wait(eps[int(a[0])], buf, 8, 2000)
        if n < 0:
            raise OSError(ctypes.get_errno(), "epoll_wait")
        return " ".join(hex(EVENT.unpack_from(buf, i * EVENT.size)[1]) for i in range(n)) or "-"
    if cmd == "recv":
        return os.read(int(a[0]), int(a[1])).hex() or "eof"
    if cmd == "send":
        return str(os.write(int(a[0]), bytes.fromhex(a[1])))
    if cmd == "close":
        fd = int(a[0])
        if fd in conns:
            conns.pop(fd).close()
        else:
            os.close(fd)
        return "ok"
    if cmd == "async":
        fd = int(a[0])
        signal.signal(signal.SIGIO, on_sigio)
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        return "ok"
    if cmd == "sigio":
        return str(SIGIO_COUNT[0])
    if cmd == "dupto":
        os.dup2(int(a[0]), int(a[1]), inheritable=False)
        return "ok"
    return "unknown"


if __name__ == "__main__":
    main()
