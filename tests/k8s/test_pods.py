"""KubePodMetadata with the real kubernetes client against the API server stand-in."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import pytest
from apiserver_standin import StandInApiServer, make_pod, wait_for
from kubernetes import client

from ebpfrouter.k8s.apiclient import api_client_for_host
from ebpfrouter.k8s.pods import KubePodMetadata, NodeNameMissing, node_name_from_env
from ebpfrouter.k8s.watcher import Backoff
from ebpfrouter.podmeta import PodMetadataSource

NODE = "node-a"
CID = "8e2b4f6a1c3d5e7f9a0b2c4d6e8f0a1b3c5d7e9f1a2b4c6d8e0f2a4b6c8d0e1f"


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.4)


@pytest.fixture
def source(core_api: client.CoreV1Api, tmp_path: Path):
    src = KubePodMetadata(core_api, NODE, proc=str(tmp_path), request_timeout=2.0,
                          backoff=fast_backoff())
    yield src
    src.stop()
    assert not any(t.name.startswith("k8s-watch") for t in threading.enumerate())


def labels_of(src: KubePodMetadata, ip: str) -> Mapping[str, str] | None:
    pod = src.pod_for_ip(ip)
    return None if pod is None else dict(pod.labels)


def test_is_a_pod_metadata_source(source: KubePodMetadata) -> None:
    assert isinstance(source, PodMetadataSource)


def test_lists_only_this_nodes_pods(standin: StandInApiServer, source: KubePodMetadata) -> None:
    standin.put("pods", make_pod("web", NODE, "10.244.1.5", {"app": "web"}, namespace="shop"))
    standin.put("pods", make_pod("db", "node-b", "10.244.2.7", {"app": "db"}))
    standin.put("pods", make_pod("agent", NODE, "192.168.0.10", host_network=True))
    standin.put("pods", make_pod("v6", NODE, "fd00:10:244:1::0005"))
    source.start()
    assert source.wait_synced(5), source.last_error
    assert {p.name for p in source.pods()} == {"web", "agent", "v6"}
    web = source.pod_for_ip("10.244.1.5")
    assert web is not None and (web.name, web.namespace, web.node) == ("web", "shop", NODE)
    assert web.uid == standin.get("pods", "web", "shop")["metadata"]["uid"]
    assert source.pod_for_ip("10.244.2.7") is None  # other node
    assert source.pod_for_ip("192.168.0.10") is None  # host network: the node's address
    assert source.pod_for_ip("fd00:10:244:1::5").name == "v6"  # canonical form
    assert source.pod_for_ip("not an ip") is None
    # the request really used the field selector on spec.nodeName
    assert any("fieldSelector=spec.nodeName%3Dnode-a" in r for r in standin.requests)


def test_label_changes_apply_while_running(standin: StandInApiServer,
                                           source: KubePodMetadata) -> None:
    standin.put("pods", make_pod("web", NODE, "10.244.1.5"))
    source.start()
    assert source.wait_synced(5)
    assert labels_of(source, "10.244.1.5") == {}
    standin.put("pods", make_pod("web", NODE, "10.244.1.5", {"app": "web"}))
    assert wait_for(lambda: labels_of(source, "10.244.1.5") == {"app": "web"})
    standin.put("pods", make_pod("web", NODE, "10.244.1.5", {"app": "web", "tier": "front"}))
    assert wait_for(lambda: labels_of(source, "10.244.1.5") == {"app": "web", "tier": "front"})
    standin.put("pods", make_pod("web", NODE, "10.244.1.5", {"app": "shop"}))
    assert wait_for(lambda: labels_of(source, "10.244.1.5") == {"app": "shop"})
    standin.put("pods", make_pod("web", NODE, "10.244.1.5", {}))
    assert wait_for(lambda: labels_of(source, "10.244.1.5") == {})
    assert source.watcher.lists == 1  # all of it through the watch, no re-list


def test_pods_added_deleted_and_finished(standin: StandInApiServer,
                                         source: KubePodMetadata) -> None:
    source.start()
    assert source.wait_synced(5)
    standin.put("pods", make_pod("job", NODE, "10.244.1.9", {"app": "job"}))
    assert wait_for(lambda: source.pod_for_ip("10.244.1.9") is not None)
    standin.put("pods", make_pod("job", NODE, "10.244.1.9", {"app": "job"}, phase="Succeeded"))
    assert wait_for(lambda: source.pod_for_ip("10.244.1.9") is None)
    standin.delete("pods", "job")
    assert wait_for(lambda: source.pods() == [])


def test_watch_expiry_relists_without_losing_updates(standin: StandInApiServer,
                                                     source: KubePodMetadata) -> None:
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "1"}))
    standin.put("pods", make_pod("b", NODE, "10.244.1.3", {"v": "1"}))
    source.start()
    assert source.wait_synced(5) and standin.wait_watching()
    standin.expire_watches()  # open watch gets ERROR 410, history is compacted
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "2"}))
    standin.delete("pods", "b")
    standin.put("pods", make_pod("c", NODE, "10.244.1.4", {"v": "1"}))
    assert wait_for(lambda: source.watcher.lists >= 2)
    assert wait_for(lambda: labels_of(source, "10.244.1.2") == {"v": "2"})
    assert wait_for(lambda: sorted(p.name for p in source.pods()) == ["a", "c"])
    # and the new watch carries on
    standin.put("pods", make_pod("c", NODE, "10.244.1.4", {"v": "3"}))
    assert wait_for(lambda: labels_of(source, "10.244.1.4") == {"v": "3"})


def test_rewatch_from_a_compacted_version_gets_410_then_relists(
        standin: StandInApiServer, source: KubePodMetadata) -> None:
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "1"}))
    source.start()
    assert source.wait_synced(5)
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "2"}))
    assert wait_for(lambda: labels_of(source, "10.244.1.2") == {"v": "2"})
    assert standin.wait_watching()
    standin.compact()
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "3"}))
    standin.compact()  # the change above is gone from history too
    standin.drop_watches(bookmark=False)  # re-watch from the client's version: too old
    assert wait_for(lambda: source.watcher.lists >= 2)
    assert wait_for(lambda: labels_of(source, "10.244.1.2") == {"v": "3"})


def test_stream_end_resumes_without_relist(standin: StandInApiServer,
                                           source: KubePodMetadata) -> None:
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "1"}))
    source.start()
    assert source.wait_synced(5) and standin.wait_watching()
    watches_before = sum("watch=true" in r for r in standin.requests)
    standin.drop_watches()
    assert wait_for(lambda: sum("watch=true" in r for r in standin.requests) > watches_before)
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "2"}))
    assert wait_for(lambda: labels_of(source, "10.244.1.2") == {"v": "2"})
    assert source.watcher.lists == 1


def test_bookmarks_keep_a_quiet_watch_resumable(standin: StandInApiServer,
                                                source: KubePodMetadata) -> None:
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "1"}))
    source.start()
    assert source.wait_synced(5) and standin.wait_watching()
    for i in range(5):  # busy elsewhere: nothing this watch would see
        standin.put("pods", make_pod("other", "node-b", "10.244.2.2", {"n": str(i)}))
    standin.compact()
    standin.drop_watches()  # ends with a BOOKMARK at the current version
    assert wait_for(lambda: sum("watch=true" in r for r in standin.requests) >= 2)
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "2"}))
    assert wait_for(lambda: labels_of(source, "10.244.1.2") == {"v": "2"})
    assert source.watcher.lists == 1  # resumed from the bookmark, no 410, no re-list
    assert any("allowWatchBookmarks=true" in r for r in standin.requests)


def test_api_errors_back_off_and_recover(standin: StandInApiServer,
                                         source: KubePodMetadata) -> None:
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "1"}))
    standin.fail_next(3)
    source.start()
    assert source.wait_synced(5), source.last_error
    assert source.watcher.backoff.failures == 0 and source.last_error is None
    assert labels_of(source, "10.244.1.2") == {"v": "1"}
    assert sum("/api/v1/pods" in r and "watch" not in r for r in standin.requests) == 4


def test_unreachable_api_at_start_then_recovers(tmp_path: Path) -> None:
    standin = StandInApiServer().start()
    port = standin.port
    standin.stop()  # nothing listens on the port now
    api_client = api_client_for_host(f"http://127.0.0.1:{port}")
    src = KubePodMetadata(client.CoreV1Api(api_client), NODE, proc=str(tmp_path),
                          request_timeout=1.0, backoff=fast_backoff())
    try:
        src.start()
        assert not src.wait_synced(0.5)
        assert src.last_error and "unreachable" in src.last_error
        assert f"127.0.0.1', port={port}" in src.last_error or str(port) in src.last_error
        assert src.pod_for_ip("10.244.1.2") is None  # reads work, and know nothing
        assert src.watcher.backoff.failures >= 2  # it retried, backing off
        standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "1"}))
        standin.start()
        assert src.wait_synced(5), src.last_error
        assert labels_of(src, "10.244.1.2") == {"v": "1"}
    finally:
        src.stop()
        standin.stop()
        api_client.close()


def test_api_outage_while_running(standin: StandInApiServer, source: KubePodMetadata) -> None:
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "1"}))
    standin.put("pods", make_pod("b", NODE, "10.244.1.3", {"v": "1"}))
    source.start()
    assert source.wait_synced(5)
    standin.stop()
    assert wait_for(lambda: source.last_error is not None)
    # the cache keeps serving what it knew
    assert labels_of(source, "10.244.1.2") == {"v": "1"}
    standin.put("pods", make_pod("a", NODE, "10.244.1.2", {"v": "2"}))
    standin.delete("pods", "b")
    standin.start()
    assert wait_for(lambda: labels_of(source, "10.244.1.2") == {"v": "2"})
    assert wait_for(lambda: source.pod_for_ip("10.244.1.3") is None)
    assert wait_for(lambda: source.last_error is None)


class StubContainerLabels:
    """A stand-in ContainerLabelSource: fixed labels by container ID."""

    def __init__(self, labels: dict[str, dict[str, str]]) -> None:
        self.labels = labels

    def labels_for(self, container_id: str) -> Mapping[str, str]:
        return self.labels.get(container_id, {})


def write_cgroup(proc: Path, pid: int, text: str) -> None:
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "cgroup").write_text(text)


def test_pod_for_pid_through_cgroups(standin: StandInApiServer, core_api: client.CoreV1Api,
                                     tmp_path: Path) -> None:
    uid = "3f1c9a52-7d4e-4b8a-9c21-5e6f7a8b9c0d"
    static_hash = "6f4a2cc1bf0e4a9c8d7e5b3a2c1d0e9f"
    standin.put("pods", make_pod("web", NODE, "10.244.1.5", {"app": "web"}, uid=uid))
    standin.put("pods", make_pod("etcd-node-a", NODE, "192.168.0.10", {"component": "etcd"},
                                 host_network=True,
                                 annotations={"kubernetes.io/config.mirror": static_hash}))
    suid = uid.replace("-", "_")
    write_cgroup(tmp_path, 100, "0::/kubepods.slice/kubepods-burstable.slice/"
                 f"kubepods-burstable-pod{suid}.slice/cri-containerd-{CID}.scope\n")
    write_cgroup(tmp_path, 200, f"0::/kubepods.slice/kubepods-burstable.slice/"
                 f"kubepods-burstable-pod{static_hash}.slice/cri-containerd-{'1' * 64}.scope\n")
    write_cgroup(tmp_path, 300, "0::/system.slice/sshd.service\n")
    write_cgroup(tmp_path, 400, "0::/kubepods.slice/kubepods-pod0a1b2c3d_4e5f_4a6b_8c7d_"
                 f"9e0f1a2b3c4d.slice/cri-containerd-{CID}.scope\n")  # pod not on this node
    src = KubePodMetadata(core_api, NODE, proc=str(tmp_path), request_timeout=2.0,
                          containers=StubContainerLabels({CID: {"role": "frontend"}}))
    with src:
        assert src.wait_synced(5)
        web = src.pod_for_pid(100)
        assert web is not None and web.name == "web" and web.labels == {"app": "web"}
        assert web.container_labels == {"role": "frontend"}
        etcd = src.pod_for_pid(200)
        assert etcd is not None and etcd.name == "etcd-node-a" and etcd.container_labels == {}
        assert src.pod_for_pid(300) is None
        assert src.pod_for_pid(400) is None
        assert src.pod_for_pid(999) is None  # no such process
        standin.put("pods", make_pod("web", NODE, "10.244.1.5", {"app": "web2"}, uid=uid))
        assert wait_for(lambda: src.pod_for_pid(100).labels == {"app": "web2"})


def test_node_name_from_downward_api_env() -> None:
    assert node_name_from_env({"NODE_NAME": "node-a"}) == "node-a"
    with pytest.raises(NodeNameMissing, match="NODE_NAME"):
        node_name_from_env({})
