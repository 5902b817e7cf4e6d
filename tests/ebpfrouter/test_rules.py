"""Rules: parsing errors name file and line; filter/validator semantics; reload on change."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ebpfrouter.rules import ConnectionFacts, RuleError, RuleSet, RuleWatcher, parse_rule_text


def facts(server: str = "10.244.1.5", client: str = "10.244.2.7", **labels: str) -> ConnectionFacts:
    return ConnectionFacts(server, 5201, client, 40000, pod_labels=labels)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_parse_cidr_with_comments_quotes_and_reverse() -> None:
    rule = parse_rule_text('# a rule\n\ntype=cidr\nfrom="10.244.1.0/24"  # server\n'
                           "to=10.244.2.0/24\nreverse=True\n", "r0")
    assert rule.kind == "cidr" and rule.reverse
    assert str(rule.from_net) == "10.244.1.0/24" and str(rule.to_net) == "10.244.2.0/24"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("type=cidr\nfrom=10.0.0.0/8\nto=10.0.0.0/33\n", 3, "not a CIDR"),
        ("type=cidr\nfrom=10.0.0.0/8\ncolor=red\n", 3, "unknown key 'color'"),
        ("type=cidr\nfrom=10.0.0.0/8\nfrom=10.0.0.0/8\n", 3, "duplicate key 'from'"),
        ("type=cidr\nfrom=10.0.0.0/8\n", None, "needs key"),
        ("from=10.0.0.0/8\n", None, "missing key 'type'"),
        ("type=nodeLabel\n", 1, "unknown type"),
        ("type=podLabel\nname=app\n", None, "needs key"),
        ("type=podLabel\nname=app\nvalue=x\nfrom=10.0.0.0/8\n", 4, "does not apply"),
        ("type=cidr\nfrom=10.0.0.0/8\nto=10.0.0.0/8\nreverse=maybe\n", 4, "true or false"),
        ("type=cidr\njust words\n", 2, "expected key=value"),
        ("type=cidr\nfrom=\n", 2, "empty value"),
        ("type=cidr\nfrom=10.0.0.0/8\nto=fd00::/8\n", 3, "mix"),
    ],
)
def test_parse_errors_name_file_and_line(text: str, line: int | None, message: str) -> None:
    with pytest.raises(RuleError, match=message) as info:
        parse_rule_text(text, "/etc/rules/r9")
    assert info.value.path == "/etc/rules/r9" and info.value.line == line
    prefix = f"/etc/rules/r9:{line}:" if line else "/etc/rules/r9:"
    assert str(info.value).startswith(prefix)


def test_no_rules_allows_everything(tmp_path: Path) -> None:
    assert RuleSet.load(tmp_path).allows(facts())
    assert RuleSet.load(tmp_path / "absent", missing_ok=True).allows(facts())
    with pytest.raises(RuleError, match="does not exist"):
        RuleSet.load(tmp_path / "absent")


def test_filters_then_validators(tmp_path: Path) -> None:
    write(tmp_path, "f1", "type=podLabel\nname=app\nvalue=iperf\n")
    write(tmp_path, "v1", "type=cidr\nfrom=10.244.1.0/24\nto=10.244.2.0/24\n")
    rules = RuleSet.load(tmp_path)
    assert len(rules.filters) == 1 and len(rules.validators) == 1
    assert rules.allows(facts(app="iperf"))
    assert not rules.allows(facts(app="redis"))  # filtered out
    assert not rules.allows(facts())  # no labels: filtered out
    # passes the filter but the validator wants the other direction
    assert not rules.allows(facts("10.244.2.7", "10.244.1.5", app="iperf"))


def test_reverse_and_any_validator(tmp_path: Path) -> None:
    write(tmp_path, "v1", "type=cidr\nfrom=10.244.1.0/24\nto=10.244.2.0/24\nreverse=true\n")
    rules = RuleSet.load(tmp_path)
    assert rules.allows(facts("10.244.1.5", "10.244.2.7"))
    assert rules.allows(facts("10.244.2.7", "10.244.1.5"))
    assert not rules.allows(facts("10.244.3.1", "10.244.1.5"))
    assert rules.allows(facts("::ffff:10.244.1.5", "10.244.2.7"))  # v4-mapped v6
    write(tmp_path, "v2", "type=cidr\nfrom=10.244.3.0/24\nto=10.0.0.0/8\n")
    assert RuleSet.load(tmp_path).allows(facts("10.244.3.1", "10.244.1.5"))


def test_container_label_filter(tmp_path: Path) -> None:
    write(tmp_path, "c", "type=containerLabel\nname=io.kubernetes.container.name\nvalue=srv\n")
    rules = RuleSet.load(tmp_path)
    hit = ConnectionFacts("10.0.0.1", 1, "10.0.0.2", 2,
                          container_labels={"io.kubernetes.container.name": "srv"})
    assert rules.allows(hit) and not rules.allows(facts())


def test_bad_file_in_dir_names_it(tmp_path: Path) -> None:
    write(tmp_path, "good", "type=podLabel\nname=a\nvalue=b\n")
    write(tmp_path, "bad", "type=cidr\nfrom=300.1.1.1/8\nto=10.0.0.0/8\n")
    with pytest.raises(RuleError, match=r"bad:2: from='300.1.1.1/8'"):
        RuleSet.load(tmp_path)
    (tmp_path / "bad").write_bytes(b"type=cidr\n\xff\xfe\n")
    with pytest.raises(RuleError, match="bad:2: not UTF-8"):
        RuleSet.load(tmp_path)


def test_hidden_and_directories_skipped(tmp_path: Path) -> None:
    write(tmp_path, ".hidden", "garbage")
    (tmp_path / "sub").mkdir()
    assert len(RuleSet.load(tmp_path)) == 0


def test_watcher_reload_and_keep_old_on_error(tmp_path: Path, caplog) -> None:
    changes: list[RuleSet] = []
    watcher = RuleWatcher(tmp_path, on_change=changes.append)
    assert len(watcher.rules) == 0 and not watcher.poll()
    write(tmp_path, "v", "type=cidr\nfrom=10.244.1.0/24\nto=10.244.2.0/24\n")
    assert watcher.poll() and len(watcher.rules) == 1 and len(changes) == 1
    assert not watcher.poll()
    write(tmp_path, "v", "type=cidr\nfrom=10.244.1.0/24\nto=banana\n")
    with caplog.at_level(logging.ERROR, logger="ebpfrouter.rules"):
        assert not watcher.poll()
    assert "keeping the previous 1 rule" in caplog.text and "to='banana'" in caplog.text
    assert len(watcher.rules) == 1 and watcher.last_error is not None
    write(tmp_path, "v", "type=cidr\nfrom=10.244.1.0/24\nto=10.244.3.0/24\n")
    assert watcher.poll() and watcher.last_error is None
    assert str(watcher.rules.validators[0].to_net) == "10.244.3.0/24"
    os.unlink(tmp_path / "v")
    assert watcher.poll() and len(watcher.rules) == 0


def test_watcher_configmap_symlink_swap(tmp_path: Path) -> None:
    """Kubernetes swaps `..data` to a new timestamped dir; visible names are links into it."""
    first = tmp_path / "..2026_01_01"
    first.mkdir()
    write(first, "r0", "type=podLabel\nname=app\nvalue=one\n")
    os.symlink(first.name, tmp_path / "..data")
    os.symlink("..data/r0", tmp_path / "r0")
    watcher = RuleWatcher(tmp_path)
    assert watcher.rules.filters[0].value == "one"
    second = tmp_path / "..2026_01_02"
    second.mkdir()
    write(second, "r0", "type=podLabel\nname=app\nvalue=two\n")
    os.symlink(second.name, tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert watcher.poll()
    assert watcher.rules.filters[0].value == "two"


def test_watcher_strict_initial(tmp_path: Path) -> None:
    write(tmp_path, "bad", "type=x\n")
    with pytest.raises(RuleError):
        RuleWatcher(tmp_path)
    assert len(RuleWatcher(tmp_path, strict=False).rules) == 0



def test_watcher_bad_initial_rules_bypass_nothing_until_fixed(tmp_path: Path, caplog) -> None:
    conn = ConnectionFacts("10.244.1.5", 80, "10.244.2.5", 4000)
    write(tmp_path, "ok", "type=cidr\nfrom=10.244.0.0/16\nto=10.244.0.0/16\n")
    write(tmp_path, "bad", "type=cidr\nfrom=10.244.1.0/99\nto=10.244.2.0/24\n")
    with caplog.at_level(logging.ERROR, logger="ebpfrouter.rules"):
        watcher = RuleWatcher(tmp_path, strict=False)
    assert "bad:2:" in caplog.text and "bypassing nothing" in caplog.text
    assert not watcher.rules.allows(conn)  # not "everything passes"
    assert not watcher.poll() and not watcher.rules.allows(conn)  # unchanged: still closed
    write(tmp_path, "bad", "type=cidr\nfrom=10.244.1.0/24\nto=10.244.3.0/24\n")
    assert watcher.poll() and watcher.last_error is None
    assert watcher.rules.allows(conn) and len(watcher.rules) == 2
    os.unlink(tmp_path / "bad")
    os.unlink(tmp_path / "ok")
    assert watcher.poll() and watcher.rules.allows(conn)  # no rules at all: everything passes

# -- pod metadata (the label source the rules read) ----------------------------------------


def test_static_pod_metadata_roundtrip_and_lookup(tmp_path: Path) -> None:
    from ebpfrouter.podmeta import PodInfo, PodMetadataSource, StaticPodMetadata, netns_inode_of

    mine = netns_inode_of(os.getpid())
    assert mine is not None and netns_inode_of(2**22 + 12345) is None
    meta = StaticPodMetadata([
        PodInfo("web", ip="10.244.1.2", node="node1", labels={"app": "web"}, netns_inode=mine),
        PodInfo("db", ip="10.244.2.2", node="node2", labels={"app": "db"}, netns_inode=1),
    ])
    assert isinstance(meta, PodMetadataSource)
    path = tmp_path / "pods.json"
    meta.write(path)
    loaded = StaticPodMetadata.from_file(path)
    assert loaded.pod_for_pid(os.getpid()).name == "web"  # same netns inode as this process
    assert loaded.pod_for_ip("10.244.2.2").labels == {"app": "db"}
    assert loaded.pod_for_ip("10.244.9.9") is None
    facts = ConnectionFacts("10.244.2.2", 80, "10.244.1.2", 4000,
                            pod_labels=loaded.pod_for_pid(os.getpid()).labels)
    write(tmp_path, "f", "type=podLabel\nname=app\nvalue=web\n")
    (tmp_path / "pods.json").unlink()
    assert RuleSet.load(tmp_path).allows(facts)


def test_static_pod_metadata_errors(tmp_path: Path) -> None:
    from ebpfrouter.podmeta import StaticPodMetadata

    bad = tmp_path / "pods.json"
    bad.write_text('{"pods": [{"name": "x", "pid": 3}]}')
    with pytest.raises(ValueError, match=r"pods.json.*unknown key.*pid"):
        StaticPodMetadata.from_file(bad)
    bad.write_text('{"pods": [{"name": "x", "labels": {"a": 1}}]}')
    with pytest.raises(ValueError, match="labels must map strings"):
        StaticPodMetadata.from_file(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="pods.json"):
        StaticPodMetadata.from_file(bad)
