"""The run folder's one metrics reader: damaged, huge and special files are read in bounded memory, never raised."""

import json
import os

import pytest

from maecli.errors import UserError
from maecli.rundir import MAX_LINE, read_json_object, read_metrics, trim_metrics


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_damaged_rows_are_skipped_and_counted(tmp_path):
    good = [json.dumps({"step": i, "loss": 1 / i}).encode() for i in range(1, 4)]
    damaged = [
        b'{"step": null, "loss": 1}',
        b'{"step": 1e400}',
        b"\xff\xfe not utf-8",
        b'{"step": 1' + b"0" * 400 + b', "loss": 2}',
        b'{"step": true}',
        b"[1, 2]",
        b"x" * (MAX_LINE + 10),
    ]
    write_lines(tmp_path / "metrics.jsonl", good[:2] + damaged + [b'{"step": 9, "loss": 1e308, "lr": NaN}', b""])
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 10, "lo')  # a run killed mid-write
    m = read_metrics(tmp_path)
    assert [r["step"] for r in m.rows] == [1, 2, 9]
    assert m.rows[-1] == {"step": 9}  # beyond 1e300 and NaN are dropped from the row, the row stays
    assert m.bad == len(damaged) + 1


def test_rows_are_thinned_in_bounded_memory_keeping_the_last(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [json.dumps({"step": i, "loss": 1.0}).encode() for i in range(1, 5001)])
    m = read_metrics(tmp_path / "metrics.jsonl", max_rows=100)
    assert 100 <= len(m.rows) < 200 and m.thinned
    assert m.rows[0]["step"] == 1 and m.rows[-1]["step"] == 5000
    steps = [r["step"] for r in m.rows]
    assert steps == sorted(steps)
    tail = read_metrics(tmp_path, tail_bytes=100)
    assert tail.rows[-1]["step"] == 5000 and len(tail.rows) <= 4 and tail.bad == 0


def test_special_files_are_refused_not_opened(tmp_path):
    os.mkfifo(tmp_path / "metrics.jsonl")
    with pytest.raises(UserError, match="not a regular file"):
        read_metrics(tmp_path)  # opening a FIFO would wait for a writer forever
    with pytest.raises(UserError, match="not a regular file"):
        read_json_object(tmp_path / "metrics.jsonl")
    assert read_metrics(tmp_path / "missing.jsonl").rows == []
    assert read_json_object(tmp_path / "missing.json") is None
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(UserError, match="not a JSON object"):
        read_json_object(tmp_path / "config.json")


def test_trim_keeps_rows_up_to_the_step_and_drops_damage(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [b'{"step": 1}', b'{"step": null}', b'{"step": 5}', b'{"step": 6}'])
    trim_metrics(tmp_path, 5)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"step": 1}\n{"step": 5}\n'
