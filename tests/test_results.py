"""results.json's one reader: a record, or UnreadableResults saying why; the collector and resume go through it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mgrq_runner.analysis.runs import load_run
from mgrq_runner.results import UnreadableResults, read_results
from mgrq_runner.resume import previous_results


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe not text", r"is not UTF-8 text \(byte 0"),
        (b'{"status": "done"', r"is not valid JSON \(Expecting ',' delimiter, line 1 column 18\)"),
        (b'["a", "list"]', "holds a JSON list, not an object"),
        (None, "does not exist"),
        ("directory", "is a directory, not a file"),
        ("fifo", "is a named pipe, not a file"),
        ("link", "is a symbolic link"),
    ],
)
def test_unreadable_records_say_why_and_cost_nothing_else(tmp_path: Path, content: bytes | str | None, reason: str):
    path = tmp_path / "results.json"
    if content == "directory":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "link":  # to a good record: a run's own results.json is never a link, so it is not followed
        (tmp_path / "elsewhere.json").write_text('{"status": "done", "config": {}}')
        path.symlink_to(tmp_path / "elsewhere.json")
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableResults, match=reason):
        read_results(path)
    assert previous_results(tmp_path) is None
    row = load_run(tmp_path)
    assert row.status == "failed" and re.search(reason, str(row.error))
    assert str(path) in str(row.error) and "Fix: " in str(row.error)


def test_a_record_reads_from_its_file_or_its_run_dir(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('{"status": "done", "top1": 90.3}', encoding="utf-8")
    assert read_results(tmp_path) == read_results(tmp_path / "results.json") == {"status": "done", "top1": 90.3}
