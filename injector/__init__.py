"""injector: process surgery on running, unmodified programs.

Seize and freeze every thread of a process, run system calls inside it, hand it a socket
from another network namespace and put that socket at a given fd number — keeping fd flags,
socket options and epoll registrations — then thaw it as if nothing happened.

    from injector import freeze, replace_fd
    with freeze(pid) as proc:
        proc.syscall("getpid")
    old = replace_fd(pid, fd, new_socket)
"""

from injector.errors import FreezeTimeout, InjectorError, RemoteSyscallError, TargetGoneError
from injector.freeze import FrozenProcess, freeze
from injector.inspect import StaleFdError, copy_socket, pidfd_getfd, queue_sizes
from injector.swap import SwapError, replace_fd

__all__ = [
    "FreezeTimeout", "FrozenProcess", "InjectorError", "RemoteSyscallError", "StaleFdError",
    "SwapError", "TargetGoneError", "copy_socket", "freeze", "pidfd_getfd", "queue_sizes",
    "replace_fd",
]
