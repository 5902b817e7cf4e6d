"""What the engine asks the daemon before it swaps: the rules, and whether a server is ready.

`SwapPolicy.allow` applies the rule files (label filters with the pod's metadata, then cidr
validators); `SwapPolicy.server_ready` holds an accepted connection back until its app has
read from it once. Node scoping answers the engine's other questions (`peer_of`, `shared`).
"""

from __future__ import annotations

import time

from injector.inspect import queue_sizes, tcp_info

from .engine import Conn, Role
from .engine.events import FourTuple
from .podmeta import PodMetadataSource
from .rules import ConnectionFacts, RuleWatcher
from .scoping import NodeScope
from .socktable import SocketTable
from .wiring import Wiring


class SwapPolicy:
    """The rules and the read-first wait; `rules` and `pods` are set at start (the cluster,
    if any, is the scope's)."""

    def __init__(self, wiring: Wiring, scope: NodeScope, sockets: SocketTable,
                 read_first_wait: float) -> None:
        self.wiring = wiring
        self.scope = scope
        self.sockets = sockets
        self.read_first_wait = read_first_wait
        self.rules: RuleWatcher | None = None
        self.pods: PodMetadataSource | None = None

    def allow(self, role: Role, pid: int, conn: FourTuple) -> bool:
        """Rules: label filters (pod metadata of `pid`), then cidr validators."""
        if self.pods is not None:
            pod = self.pods.pod_for_pid(pid)
        elif self.scope.cluster is not None:  # by cgroup, else by the local end's pod IP
            local = conn.server_addr if role is Role.SERVER else conn.client_addr
            pod = self.scope.cluster.pod_for(pid, local)
        else:
            pod = None
        facts = ConnectionFacts(conn.server_addr, conn.server_port, conn.client_addr,
                                conn.client_port,
                                pod_labels=dict(pod.labels) if pod else {},
                                container_labels=dict(pod.container_labels) if pod else {})
        assert self.rules is not None
        ok = self.rules.rules.allows(facts)
        if not ok:
            self.wiring.counters["ruled_out"] += 1
        return ok

    def listener_mode(self, addr: str, port: int) -> str | None:
        """A rule's `swap=` for our listener at `addr` ("eager"/"late"; None: learn it)."""
        return self.rules.rules.swap_mode(addr) if self.rules is not None else None

    def server_ready(self, conn: Conn) -> bool:
        """Whether an accepted connection may be swapped: its app has read from it once.

        After a swap `getpeername()` names host addresses. Apps that check the peer's address
        right after reading its first message (Open MPI's TCP transport drops a connection
        whose source is not an address the peer published) must do so before the swap, so
        the server side waits until TCP_INFO shows a byte consumed, or until the connection
        is `read_first_wait` old (a server whose client never writes is swapped then).
        """
        wait = self.read_first_wait
        started = self.scope.traced_since(conn.pid or 0, conn.fd or 0)
        if wait <= 0 or started is None or time.monotonic_ns() - started >= wait * 1e9:
            return True
        sock = self.sockets.get(conn.overlay_sock) if conn.overlay_sock is not None else None
        if sock is None:
            return True  # the swap's own steps will find out
        try:
            unread, _ = queue_sizes(sock)
            return tcp_info(sock).bytes_received > unread
        except OSError:
            return True
