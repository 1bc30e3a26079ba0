"""The in-process engine keeps the state of the virtual nodes that hold some, and only theirs: a node whose
state is empty after its call costs no memory and no checkpoint files (10,000 virtual clients would otherwise
leave 10,000 contexts and 20,000 empty files per checkpoint behind), while a node with state keeps it across
calls and across a checkpoint."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.simulation.inprocess import SERVER_NODE_ID, InProcessGrid, node_id

app = ClientApp()


@app.train()
def count(msg: Message, context: Context) -> Message:
    """Even partitions count their calls in node state; odd ones keep nothing."""
    seen = int(context.state["calls"]["n"]) if "calls" in context.state else 0  # type: ignore[index, arg-type]
    if int(context.node_config["partition-id"]) % 2 == 0:
        context.state["calls"] = ConfigRecord({"n": seen + 1})
    return Message(RecordDict({"seen": ConfigRecord({"n": seen})}), reply_to=msg)


def _round(grid: InProcessGrid, nodes: list[int]) -> dict[int, int]:
    msgs = [grid.create_message(RecordDict(), "train", node, "1") for node in nodes]
    return {r.metadata.src_node_id: int(r.content["seen"]["n"])  # type: ignore[index, arg-type]
            for r in grid.send_and_receive(msgs)}


def test_only_nodes_with_state_are_kept_and_checkpointed(tmp_path: Path) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1  # as run_inprocess does
    grid = InProcessGrid(app, 6, {})
    nodes = [node_id(i) for i in range(6)]
    assert _round(grid, nodes) == {n: 0 for n in nodes}
    second = _round(grid, nodes)
    assert second == {n: (1 if i % 2 == 0 else 0) for i, n in enumerate(nodes)}  # even nodes remember
    grid.save_node_states(tmp_path / "nodes")
    assert sorted(p.name for p in (tmp_path / "nodes").iterdir()) == sorted(
        f"{node_id(i)}{ext}" for i in (0, 2, 4) for ext in (".json", ".npz"))  # no files for empty states

    resumed = InProcessGrid(app, 6, {})
    resumed.load_node_states(tmp_path / "nodes")
    assert _round(resumed, nodes) == {n: (2 if i % 2 == 0 else 0) for i, n in enumerate(nodes)}
