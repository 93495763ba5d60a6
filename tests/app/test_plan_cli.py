"""``--plan`` and ``--max-memory`` on the commands that fit (issue #23 item 3), on a tiny random Llama.

``--plan`` prints the plan, writes OUT/plan.json and stops before any training or fitting (training is made
to fail here to prove it); ``--max-memory`` below the predicted peak refuses the run in one line naming
the limit, the predicted peak and the options; runs from an index are refused (they fit nothing).
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext.app.cli import main  # noqa: E402
from tiny_llm import make_tiny_adapter, make_tiny_llama, sentiment_rows, write_instructions  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-cli")
    folder = make_tiny_llama(root / "model")
    make_tiny_adapter(folder, root / "adapter")
    train = write_instructions(root / "train.jsonl", sentiment_rows(20, seed=1))
    target = write_instructions(root / "target.jsonl", sentiment_rows(3, seed=2))
    return folder, root / "adapter", train, target


@pytest.fixture
def no_training(monkeypatch):
    from hyperinf_ext.app.models import training
    from hyperinf_ext.attributor.hyperinf import HyperINF

    def refuse(*args, **kwargs):
        raise AssertionError("--plan trained or fitted")

    monkeypatch.setattr(training, "finetune", refuse)
    monkeypatch.setattr(HyperINF, "fit", refuse)


@pytest.mark.parametrize("command", ["audit", "select", "attribute", "index build"])
def test_plan_prints_writes_and_stops(llm, tmp_path, capsys, no_training, command):
    folder, adapter, train, target = llm
    out = tmp_path / "out"
    argv = {"audit": ["audit", "--train", str(train), "--target", str(target), "--epochs", "2"],
            "select": ["select", "--pool", str(train), "--target", str(target), "--fraction", "0.5"],
            "attribute": ["attribute", "--adapter", str(adapter), "--train", str(train), "--query", str(target)],
            "index build": ["index", "build", "--adapter", str(adapter), "--train", str(train)]}[command]
    assert main([*argv, "--model", str(folder), "--plan", "--fit-batch-size", "4", "--out", str(out), *FAST]) == 0, \
        capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "predicted peak" in printed and f"the whole {command}" in printed and str(out / "plan.json") in printed
    summary = json.loads((out / "plan.json").read_text())
    plan = summary["plan"]
    assert plan["n_train"] == 20 and plan["n_batches"] == 5  # --fit-batch-size 4
    assert plan["peak_bytes"] == plan["baseline_bytes"] + plan["phases"][plan["peak_phase"]]
    assert summary["total_seconds"] == pytest.approx(sum(summary["seconds"].values()))
    assert (summary["seconds"]["finetune"] > 0) == (command in ("audit", "select"))  # no adapter: they fine-tune
    assert plan["n_queries"] == {"audit": 3, "select": 3, "attribute": 3, "index build": 0}[command]
    assert plan["mean"] == (command in ("audit", "select"))
    assert not (out / "adapter").exists() and not (out / "meta.json").exists()


def test_max_memory_refuses_with_the_options(llm, tmp_path, capsys, no_training):
    folder, adapter, train, target = llm
    code = main(["audit", "--model", str(folder), "--adapter", str(adapter), "--train", str(train), "--max-memory",
                 "1K", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--max-memory 1.00 KiB: the plan predicts a peak of" in err and "--plan shows the details" in err


def test_plan_refusals(llm, tmp_path, capsys):
    folder, adapter, train, target = llm
    cases = [
        (["audit", "--index", str(tmp_path), "--plan"], "--plan: not with --index"),
        (["attribute", "--index", str(tmp_path), "--query", str(target), "--max-memory", "1G"],
         "--max-memory: not with --index"),
        (["audit", "--model", str(folder), "--train", str(train), "--max-memory", "lots"], "expected a size"),
        (["audit", "--model", str(folder), "--train", str(train), "--fit-batch-size", "0"],
         "--fit-batch-size must be >= 1"),
    ]
    for argv, message in cases:
        code = main([*argv, "--out", str(tmp_path / "o"), *FAST])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
