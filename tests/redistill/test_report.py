"""The shared pieces of every results page: Markdown tables, the timestamp format, the machine line, remarks."""

from datetime import datetime, timedelta, timezone

import pytest

from redistill.errors import UserError
from redistill.report import REMARKS_HEADING, machine, machine_line, md_table, remarks_section, timestamp


def test_timestamp_is_utc_to_the_second():
    when = datetime(2026, 11, 22, 4, 39, 45, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert timestamp(when) == "2026-11-22T02:39:45Z"
    assert len(timestamp()) == 20 and timestamp().endswith("Z")


def test_machine_line_from_a_record_an_older_record_and_a_stored_line():
    m = {"cores": 2, "cpu": "Xeon", "os": "Linux-6-x86_64", "gpu": None, "python": "3.11.7", "onnxruntime": "1.31.1"}
    assert machine_line(m) == "2 cores (Xeon), Linux-6-x86_64, no GPU, Python 3.11.7, onnxruntime 1.31.1"
    assert machine_line({**m, "gpu": "H200"}).startswith("2 cores (Xeon), Linux-6-x86_64, H200, ")
    old = {"cpu": "Xeon", "cores": 2, "platform": "Linux-6", "python": "3.11.7", "onnxruntime": "1.31.1"}
    assert machine_line(old) == "2 cores (Xeon), Linux-6, Python 3.11.7, onnxruntime 1.31.1"  # no GPU key: not claimed
    assert machine_line("2 cores (Xeon), Linux x86_64, no GPU") == "2 cores (Xeon), Linux x86_64, no GPU"
    here = machine(torch="2.x")
    assert here["torch"] == "2.x" and machine_line(here).endswith(", torch 2.x") and here["cores"] >= 1


def test_md_table():
    assert md_table(["a", "b"], [[1, "x"], ["y", 2.5]]) == ["| a | b |", "|---|---|", "| 1 | x |", "| y | 2.5 |"]
    assert md_table(["only"], []) == ["| only |", "|---|"]


def test_remarks_section(tmp_path):
    assert remarks_section(None) == []
    f = tmp_path / "r.md"
    f.write_text("\n- a remark\n\n")
    assert remarks_section(f) == ["", REMARKS_HEADING, "", "- a remark"]
    with pytest.raises(UserError, match="not found"):
        remarks_section(tmp_path / "missing.md")
