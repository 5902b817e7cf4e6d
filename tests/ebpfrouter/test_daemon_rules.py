"""Rules at start-up on the testbed (root): a bad rules directory bypasses nothing until fixed."""

from __future__ import annotations

import time

import pytest
import test_daemon as td  # the daemon tests' testbed, routers and helpers
from test_daemon import PORT, Stream, counters, stream_server, wait_for, wait_listener_announced

bed = td.bed  # fixtures, shared by name
_shared_holder = td._shared_holder
routers = td.routers


def one_stream(bed, routers, port: int, swapped: bool) -> tuple[str, int]:
    """One n2p0 → n1p0 connection; the address its client fd ends up connected to."""
    server, client = bed.pod("n1p0"), bed.pod("n2p0")
    with stream_server(bed, server.name, port):
        wait_listener_announced(routers, "node1", port)
        stream = Stream(bed, client.name, server.ip, port)
        if swapped:
            wait_for(lambda: (p := stream.peer()) and p[0] == bed.node("node1").underlay_ip,
                     10, "swapped socket")
        else:
            wait_for(stream.peer, 5, "connection")
            time.sleep(1.5)  # time enough for a swap that must not happen
        peer = stream.peer()
        assert stream.result()["ok"]
    return peer


@pytest.mark.root
def test_bad_rules_at_start_bypass_nothing_until_they_load(bed, routers):
    rule = routers.workdir / "rules" / "pods"
    rule.write_text("type=cidr\nfrom=10.244.0.0/16\nto=10.244.0.0/99\nreverse=true\n")
    routers.start()
    for node in ("node1", "node2"):
        status = routers.status(node)
        assert "pods:3:" in status["rules_error"] and status["rules_loaded"] is False, status
    # the daemon serves, but this cross-node connection stays on the overlay
    assert one_stream(bed, routers, PORT + 11, swapped=False) == (bed.pod("n1p0").ip, PORT + 11)
    assert counters(routers, "node2")["bypassed"] == 0
    assert counters(routers, "node2")["ruled_out"] >= 1
    # fixed while running: the RuleWatcher loads it and the next connection is bypassed
    rule.write_text("type=cidr\nfrom=10.244.0.0/16\nto=10.244.0.0/16\nreverse=true\n")
    wait_for(lambda: all(routers.status(n)["rules_loaded"] for n in ("node1", "node2")), 10,
             "rules reloaded")
    assert routers.status("node1")["rules_error"] is None
    peer = one_stream(bed, routers, PORT + 12, swapped=True)
    assert peer[0] == bed.node("node1").underlay_ip
    assert counters(routers, "node2")["bypassed_client"] == 1
