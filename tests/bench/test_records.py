"""bench/records.py: the studies' JSON-lines records — a torn last line after a kill, malformed lines, and a
lane's copy folded back (merge) without duplicates or a half-written file."""
from __future__ import annotations

import json
import os

import pytest

from bench import records
from bench.lds import LdsConfig, run
from bench.records import append, load, main, merge
from tests.bench.test_lds import LABELS, Interrupted, LinearExperiment

A, B, C, D = ({"kind": "subset", "subset": j, "val_loss": [0.1 * j, 1.5]} for j in range(4))


def _write(path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))


def test_load_reads_in_order_and_ignores_blank_lines(tmp_path):
    assert load(tmp_path / "missing.jsonl") == []
    p = tmp_path / "r.jsonl"
    _write(p, json.dumps(A) + "\n\n  \n" + json.dumps(B) + "\n")
    assert load(p) == [A, B]


def test_load_leaves_out_a_torn_last_line_with_a_warning(tmp_path, capsys):
    p = tmp_path / "r.jsonl"
    _write(p, json.dumps(A) + "\n" + json.dumps(B) + "\n" + json.dumps(C)[:17])
    assert load(p) == [A, B]
    assert "unfinished last line" in capsys.readouterr().err
    # a complete last record without its newline is a record (a file written by hand, say)
    _write(p, json.dumps(A) + "\n" + json.dumps(B))
    assert load(p) == [A, B]


@pytest.mark.parametrize("bad, what", [("{not json", "not a JSON record"), ("[1, 2]", "a record must be a JSON object")])
def test_load_names_file_and_line_of_a_malformed_record(tmp_path, bad, what):
    p = tmp_path / "r.jsonl"
    _write(p, json.dumps(A) + "\n" + bad + "\n" + json.dumps(B) + "\n")
    with pytest.raises(ValueError, match=rf"r\.jsonl:2: {what}"):
        load(p)


def test_append_cuts_off_a_torn_tail_before_writing(tmp_path, capsys):
    p = tmp_path / "sub" / "r.jsonl"
    append(p, A)  # creates the folder
    with p.open("ab") as fh:
        fh.write(json.dumps(B).encode()[:9])  # a kill during the write
    append(p, C)
    assert "cut off an unfinished last line" in capsys.readouterr().err
    assert p.read_text() == json.dumps(A) + "\n" + json.dumps(C) + "\n"
    _write(p, '{"kind": "su')  # a file holding only a torn line
    append(p, D)
    assert load(p) == [D]


def test_append_of_a_record_json_cannot_hold_leaves_the_file_unchanged(tmp_path):
    p = tmp_path / "r.jsonl"
    append(p, A)
    before = p.read_bytes()
    with pytest.raises(TypeError):
        append(p, {"kind": "subset", "members": {1, 2}})
    assert p.read_bytes() == before


def test_merge_appends_only_what_the_destination_lacks(tmp_path):
    dst, lane = tmp_path / "runs.jsonl", tmp_path / "lane.jsonl"
    for r in (A, B):
        append(dst, r)
    lane.write_bytes(dst.read_bytes())  # the lane started from a copy ...
    append(lane, {k: C[k] for k in reversed(list(C))})  # ... and added C (its keys in another order) and D
    append(lane, D)
    append(dst, {"kind": "subset", "subset": 9, "val_loss": [0.0]})  # the main lane went on meanwhile
    assert merge(lane, dst) == 2
    assert load(dst) == [A, B, {"kind": "subset", "subset": 9, "val_loss": [0.0]}, C, D]
    before = dst.read_bytes()
    assert merge(lane, dst) == 0 and dst.read_bytes() == before  # idempotent
    fresh = tmp_path / "new" / "runs.jsonl"
    assert merge(lane, fresh) == 4 and load(fresh) == [A, B, C, D]
    with pytest.raises(FileNotFoundError, match="no records file"):
        merge(tmp_path / "absent.jsonl", dst)


def test_an_interrupted_merge_leaves_the_destination_as_it_was(tmp_path, monkeypatch):
    dst, lane = tmp_path / "runs.jsonl", tmp_path / "lane.jsonl"
    append(dst, A)
    append(lane, B)
    before = dst.read_bytes()

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(records.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        merge(lane, dst)
    assert dst.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["lane.jsonl", "runs.jsonl"]  # no temporary file left behind


def test_merge_command(tmp_path, capsys):
    dst, lane = tmp_path / "runs.jsonl", tmp_path / "lane.jsonl"
    append(dst, A)
    append(lane, A)
    append(lane, B)
    assert main(["merge", str(lane), str(dst)]) == 0
    assert "1 new record from" in capsys.readouterr().out and load(dst) == [A, B]
    assert main(["merge", str(tmp_path / "absent.jsonl"), str(dst)]) == 2
    assert "no records file" in capsys.readouterr().err


def test_a_study_resumes_after_a_kill_during_a_write(tmp_path):
    """The LDS runner (bench.lds.run) killed while writing a record: the next run drops the torn line,
    measures that model again and ends with the records of an uninterrupted run."""
    cfg = LdsConfig(seed=0, n_train=40, n_val=12, epochs=0)
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    run(LinearExperiment(), cfg, whole, 6, LABELS, log=lambda s: None)
    with pytest.raises(Interrupted):
        run(LinearExperiment(stop_after=3), cfg, parts, 6, LABELS, log=lambda s: None)
    with parts.open("ab") as fh:  # the fourth record, torn by the kill
        fh.write(json.dumps(load(whole)[3]).encode()[:40])
    resumed = LinearExperiment()
    run(resumed, cfg, parts, 6, LABELS, log=lambda s: None)
    assert resumed.calls == 3  # subsets 3, 4, 5: the torn one measured again
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert strip(load(parts)) == strip(load(whole))
