"""Issue #24: a rerun into a CLI run's folder replaces the previous run's files all at once or not at all."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from hyperinf_ext.app.tasks import output
from hyperinf_ext.app.tasks.output import staged_outputs


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def previous_run(folder: Path) -> dict[str, bytes]:
    folder.mkdir(exist_ok=True)
    (folder / "summary.json").write_text('{"run": 1}\n')
    (folder / "scores.csv").write_text("index,score\n0,1.0\n")
    (folder / "topk.safetensors").write_bytes(b"old top-k")
    (folder / "notes.txt").write_text("the user's own file\n")
    return snapshot(folder)


# ------------------------------------------------------------------------------ the helper


def test_failed_block_leaves_the_previous_run_untouched(tmp_path):
    before = previous_run(tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        with staged_outputs(tmp_path / "out") as stage:
            (stage / "summary.json").write_text('{"run": 2}\n')
            (stage / "scores.csv").write_text("half a file")
            raise OSError(28, "disk full")
    assert snapshot(tmp_path / "out") == before  # also: no staging folder left behind


def test_successful_block_replaces_the_run_and_drops_its_leftovers(tmp_path):
    out = tmp_path / "out"
    previous_run(out)
    with staged_outputs(out) as stage:
        assert stage.parent == out and not list(stage.iterdir())
        (stage / "summary.json").write_text('{"run": 2}\n')
        (stage / "selected.csv").write_text("index\n3\n")
        assert not (out / "selected.csv").exists()  # nothing reaches out before the block ends
    # topk.safetensors and scores.csv were the previous run's, not this one's; notes.txt is the user's
    assert snapshot(out) == {"notes.txt": b"the user's own file\n", "selected.csv": b"index\n3\n",
                             "summary.json": b'{"run": 2}\n'}


def test_a_first_run_keeps_the_users_files_of_output_names(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("mine\n")  # no summary.json: not a previous run of the CLI
    with staged_outputs(out) as stage:
        (stage / "summary.json").write_text("{}\n")
    assert snapshot(out) == {"scores.csv": b"mine\n", "summary.json": b"{}\n"}


def test_a_failed_move_puts_the_previous_run_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = previous_run(out)
    real_replace = os.replace
    calls = {"into_out": 0}

    def replace(src, dst):
        if Path(dst).parent == out:
            calls["into_out"] += 1
            if calls["into_out"] == 2:  # the second new file cannot be moved
                raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"):
        with staged_outputs(out) as stage:
            (stage / "scores.csv").write_text("new\n")
            (stage / "summary.json").write_text('{"run": 2}\n')
    monkeypatch.setattr(output.os, "replace", real_replace)
    assert snapshot(out) == before


# ------------------------------------------------------------------------------ the tasks, end to end

def test_convergence_rerun_is_all_or_nothing(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import hyperinf_ext.app.tasks.convergence as C

    out = tmp_path / "out"
    first = C.run_convergence([8], [20], 4, seed=0, out_dir=out, progress=False)
    before = snapshot(out)
    assert set(before) == {"convergence.png", "convergence.csv", "convergence.json"}

    real_plot = C.plot_convergence

    def failing_plot(path, *args, **kwargs):  # the CSV and JSON are written by now
        Path(path).write_bytes(b"partial")
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(C, "plot_convergence", failing_plot)
    with pytest.raises(PermissionError):
        C.run_convergence([8], [20], 5, seed=1, out_dir=out, progress=False)
    assert snapshot(out) == before

    monkeypatch.setattr(C, "plot_convergence", real_plot)
    second = C.run_convergence([8], [20], 5, seed=1, out_dir=out, progress=False)
    assert (second["png"], second["csv"], second["json"]) == (first["png"], first["csv"], first["json"])
    assert json.loads((out / "convergence.json").read_text())["settings"]["iterations"] == 5
    assert set(snapshot(out)) == set(before)


TOY = ["--n-train", "32", "--n-val", "16", "--epochs", "1", "--max-length", "32", "--no-progress", "--threads", "1"]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    from hyperinf_ext.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def test_detect_rerun_is_all_or_nothing(tmp_path, monkeypatch):
    """A failed rerun leaves the previous run byte for byte; a good one replaces it, --top-k file included."""
    for module in ("matplotlib", "transformers", "peft"):
        pytest.importorskip(module)
    import hyperinf_ext.app.tasks.mislabeled as mislabeled

    out = tmp_path / "out"
    command = ["detect-mislabeled", *TOY, "--methods", "tracin", "--out", str(out)]
    code, _, stderr = run_cli([*command, "--top-k", "2"])
    assert code == 0, stderr
    before = snapshot(out)
    assert set(before) == {"detection.png", "scores.csv", "summary.json", "topk.safetensors", "report.html"}

    real_write = mislabeled.write_json

    def failing_write(*args, **kwargs):  # the plot, scores.csv and topk.safetensors are staged by now
        raise PermissionError(13, "Permission denied", "summary.json")

    monkeypatch.setattr(mislabeled, "write_json", failing_write)
    code, _, stderr = run_cli([*command, "--seed", "1"])
    assert code == 2 and "Permission denied" in stderr
    assert snapshot(out) == before

    monkeypatch.setattr(mislabeled, "write_json", real_write)
    code, stdout, stderr = run_cli([*command, "--seed", "1"])
    assert code == 0, stderr
    assert set(snapshot(out)) == {"detection.png", "scores.csv", "summary.json", "report.html"}  # no stale top-k
    assert json.loads((out / "summary.json").read_text())["settings"]["seed"] == 1
    assert f"outputs: {out / 'detection.png'}, {out / 'scores.csv'}, {out / 'summary.json'}" in stdout
