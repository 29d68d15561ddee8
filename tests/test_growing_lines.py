"""launcher.orchestrate.GrowingLines: the progress bar's count of a growing JSONL, read on from the
last look, afresh when the file shrank."""

from __future__ import annotations

from launcher.orchestrate import GrowingLines


def test_counts_on_from_the_last_look_and_afresh_when_the_file_shrank(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    lines = GrowingLines(path)
    assert lines() == 0  # not there yet
    path.write_text("a\nb\n")
    assert lines() == 2
    with open(path, "a") as f:
        f.write("c\npartial")  # a line being written counts once it ends
    assert lines() == 3
    with open(path, "a") as f:
        f.write(" line\n")
    assert lines() == 4
    path.write_text("rewritten\n")  # shorter: rewritten (failures.jsonl) or a torn line cut off
    assert lines() == 1
    path.unlink()
    assert lines() == 0
