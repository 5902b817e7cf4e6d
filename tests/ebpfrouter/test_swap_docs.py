"""docs/swap.md shows the swap's transition tables as the code has them, and its sequence
diagrams use only transitions the tables have."""

from __future__ import annotations

import re
from pathlib import Path

from ebpfrouter.engine import EngineConfig
from ebpfrouter.engine.conn import Role
from ebpfrouter.engine.core import Core, Policy
from ebpfrouter.engine.gate import ProcessGate
from ebpfrouter.engine.swap import SwapProtocol, tables_markdown
from ebpfrouter.engine.transitions import Trigger

DOC = Path(__file__).resolve().parents[2] / "docs" / "swap.md"


def _protocol() -> SwapProtocol:
    config = EngineConfig("test")
    return SwapProtocol(Core(config, Policy(lambda ip: None)), ProcessGate(config))


def test_tables_in_the_doc_are_generated_from_the_code() -> None:
    text = DOC.read_text()
    begin, end = "<!-- transitions:begin -->\n", "<!-- transitions:end -->"
    assert begin in text and end in text
    shown = text[text.index(begin) + len(begin):text.index(end)]
    assert shown == tables_markdown(), (
        "docs/swap.md's transition tables are stale: regenerate them with "
        "python -c 'from ebpfrouter.engine.swap import tables_markdown as t; print(t(), end=\"\")'")


def test_every_message_of_the_sequence_diagrams_has_a_row() -> None:
    """`C -- msg --> S` is received by the server, `C <-- msg -- S` by the client."""
    text = DOC.read_text()
    diagrams = text[text.index("## 2. Sequence diagrams"):text.index("### The transition tables")]
    tables = _protocol().tables
    seen = 0
    for line in diagrams.splitlines():
        match = re.search(r"(<-+|-{2,}) (swap_\w+)(?:\((\w+))?", line)
        if match is None:
            continue
        arrow, name, stage = match.groups()
        receiver = Role.CLIENT if arrow.startswith("<") else Role.SERVER
        value = f"{name}({stage})" if stage else name
        trigger = Trigger(value)
        rows = [key for key in tables[receiver].rows if key[1] is trigger]
        assert rows, f"{line.strip()!r}: the {receiver.value} has no row for {value}"
        seen += 1
    assert seen == 10  # every arrow of both diagrams was read


def test_each_role_has_rows_only_for_states_it_can_reach() -> None:
    tables = _protocol().tables
    client_states = {s for s, _ in tables[Role.CLIENT].rows if s is not None}
    server_states = {s for s, _ in tables[Role.SERVER].rows if s is not None}
    assert "await_commit" not in {s.value for s in client_states}
    assert "connecting" not in {s.value for s in server_states}
