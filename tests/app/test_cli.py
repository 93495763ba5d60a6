"""End-to-end tests of the ``hyperinf-ext`` command line at toy sizes (in-process via ``cli.main``)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from hyperinf_ext.app.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# one thread: on a shared 2-core machine several torch threads per process oversubscribe the CPU
# and small ops slow down several-fold
TOY = ["--n-train", "32", "--n-val", "16", "--epochs", "1", "--max-length", "32", "--no-progress", "--threads", "1"]
ALL_FIVE = "hyperinf,datainf,lissa,tracin,exact"


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """main(args) with stdout/stderr captured (usable from module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ detect-mislabeled


@pytest.fixture(scope="module")
def detect_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    # the same damping rule for every method, so hyperinf and exact must agree
    code, stdout, stderr = run_cli(["detect-mislabeled", *TOY, "--methods", ALL_FIVE, "--damping", "datainf", "--out", str(out)])
    return code, stdout, stderr, out


def test_detect_exit_code_and_table(detect_run):
    code, stdout, stderr, _ = detect_run
    assert code == 0, stderr
    assert stderr == ""  # --no-progress: no bars, no stage messages
    for method in ALL_FIVE.split(","):
        assert method in stdout
    assert "ROC-AUC" in stdout and "found@10%" in stdout and "validation accuracy" in stdout


def test_detect_outputs(detect_run):
    code, _, stderr, out = detect_run
    assert code == 0, stderr
    assert (out / "detection.png").read_bytes()[:8] == PNG_MAGIC

    rows = read_csv(out / "scores.csv")
    assert len(rows) == 32  # one row per training example
    assert [int(r["index"]) for r in rows] == list(range(32))
    cols = set(rows[0])
    assert {"index", "text", "label", "original_label", "flipped"} <= cols
    assert {f"score_{m}" for m in ALL_FIVE.split(",")} <= cols
    n_flipped = sum(int(r["flipped"]) for r in rows)
    assert n_flipped == round(0.2 * 32)
    assert all((r["label"] != r["original_label"]) == (r["flipped"] == "1") for r in rows)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["seed"] == 0 and summary["settings"]["epochs"] == 1
    assert summary["data"]["n_flipped"] == n_flipped
    assert 0.0 <= summary["finetune"]["val_accuracy"] <= 1.0
    assert summary["influence_fit"]["seconds"] > 0
    assert summary["query_gradient_seconds"] >= 0 and summary["warmup_seconds"] >= 0
    by_method = {m["method"]: m for m in summary["methods"]}
    assert set(by_method) == set(ALL_FIVE.split(","))
    for m in by_method.values():
        assert m["error"] is None
        assert 0.0 <= m["auc"] <= 1.0
        assert 0.0 <= m["found"]["10%"] <= m["found"]["20%"] <= 1.0
        assert m["seconds"] >= 0


def test_detect_hyperinf_agrees_with_exact(detect_run):
    """HyperINF's Schulz inverse and the Cholesky solve must rank the examples identically."""
    _, _, _, out = detect_run
    rows = read_csv(out / "scores.csv")
    h = [float(r["score_hyperinf"]) for r in rows]
    e = [float(r["score_exact"]) for r in rows]
    scale = max(abs(v) for v in e)
    assert max(abs(a - b) for a, b in zip(h, e)) <= 1e-6 * scale


def _row(stdout: str, method: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(method + " "))


def test_detect_table_marks_equal_estimators(detect_run):
    """At one damping for all, hyperinf and exact solve the same system: the table says so, once."""
    _, stdout, _, out = detect_run
    assert "= exact (same estimator and damping)" in _row(stdout, "hyperinf")
    for m in ("exact", "datainf", "lissa", "tracin"):
        assert "same estimator" not in _row(stdout, m)
    assert "datainf × 0.1" in _row(stdout, "hyperinf") and "datainf × 0.1" in _row(stdout, "exact")
    assert "none" in _row(stdout, "tracin")
    by_method = {m["method"]: m for m in json.loads((out / "summary.json").read_text())["methods"]}
    assert by_method["hyperinf"]["same_as"] == "exact" and by_method["datainf"]["same_as"] is None
    lo, hi = by_method["exact"]["damping_values"]
    assert 0 < lo <= hi


def test_detect_default_damping_each_method_at_its_own(tmp_path):
    """damping=auto (the main job): each method at its default, printed; hyperinf and exact share theirs."""
    code, stdout, stderr = run_cli(["detect-mislabeled", *TOY, "--methods", "hyperinf,exact,datainf,tracin",
                                    "--out", str(tmp_path)])
    assert code == 0, stderr
    assert "spectral × 1" in _row(stdout, "hyperinf") and "spectral × 1" in _row(stdout, "exact")
    assert "datainf × 0.1" in _row(stdout, "datainf") and "none" in _row(stdout, "tracin")
    assert "= exact (same estimator and damping)" in _row(stdout, "hyperinf")
    auc = {m["method"]: m["auc"] for m in json.loads((tmp_path / "summary.json").read_text())["methods"]}
    assert auc["hyperinf"] == pytest.approx(auc["exact"], abs=1e-9)


def test_detect_several_dampings_no_finetune(tmp_path):
    # numeric dampings: with 0 epochs LoRA B is still zero, so the A-layer gradients (and a
    # trace-based damping) vanish and a Cholesky solve would be reported as failed
    code, stdout, stderr = run_cli([
        "detect-mislabeled", "--n-train", "16", "--n-val", "8", "--epochs", "0", "--max-length", "24",
        "--no-progress", "--threads", "1", "--methods", "exact,tracin", "--damping", "0.001,0.01", "--out", str(tmp_path),
    ])
    assert code == 0, stderr
    cols = set(read_csv(tmp_path / "scores.csv")[0])
    # tracin ignores the damping: computed once
    assert {"score_exact@0.001", "score_exact@0.01", "score_tracin"} <= cols
    assert not any(c.startswith("score_tracin@") for c in cols)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["methods"]) == 3 and summary["finetune"]["history"] == []


# ------------------------------------------------------------------------------ select-data


def test_select_data_with_evaluate(tmp_path):
    code, stdout, stderr = run_cli(["select-data", *TOY, "--fraction", "0.25", "--evaluate", "--out", str(tmp_path)])
    assert code == 0, stderr
    rows = read_csv(tmp_path / "selected.csv")
    assert len(rows) == 8  # 0.25 of 32
    assert list(rows[0]) == ["index", "text", "label", "score"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)  # most helpful (most negative) first
    assert len({r["index"] for r in rows}) == 8

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["selection"]["n_selected"] == 8
    assert summary["selection"]["rule"] == "class-balanced"  # the default rule (bench/SELECTION.md)
    ev = summary["evaluation"]
    for name in ("selected", "random"):
        assert 0.0 <= ev[name]["val_accuracy"] <= 1.0
    assert "random subset" in stdout and "selected" in stdout


@pytest.mark.parametrize("rule", ["class-balanced", "query-round-robin", "drop-harmful", "top"])
def test_select_data_rules(tmp_path, rule):
    code, stdout, stderr = run_cli(["select-data", *TOY, "--fraction", "0.5", "--rule", rule, "--out", str(tmp_path)])
    assert code == 0, stderr
    rows = read_csv(tmp_path / "selected.csv")
    assert len(rows) == 16 and len({r["index"] for r in rows}) == 16
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["selection"]["rule"] == rule and f"rule {rule}" in stdout
    if rule == "class-balanced":
        from hyperinf_ext.app.data import load_rotten_tomatoes, split_dataset
        train, _ = split_dataset(load_rotten_tomatoes(), 32, 16, seed=0)
        kept = [train.labels[int(r["index"])] for r in rows]
        got = {c: kept.count(c) for c in set(train.labels)}
        # the quotas of class_quotas: k·count/n rounded down or up (an equal remainder goes by score)
        exact = {c: 16 * train.labels.count(c) / 32 for c in set(train.labels)}
        assert sum(got.values()) == 16 and all(math.floor(e) <= got[c] <= math.ceil(e) for c, e in exact.items())


def test_select_data_unknown_rule(tmp_path):
    code, _, stderr = run_cli(["select-data", *TOY, "--rule", "best", "--out", str(tmp_path)])
    assert code == 2 and "--rule: unknown selection rule 'best'" in stderr


def test_select_data_from_saved_adapter(tmp_path):
    """--adapter: the saved adapter is used as is (0 epochs by default) and scored."""
    import torch

    from hyperinf_ext.app.models.training import load_lora_model

    model = load_lora_model(seed=1)
    with torch.no_grad():  # a fresh LoRA has B = 0; make it look trained
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli([
        "select-data", "--adapter", str(tmp_path / "adapter"), "--n-train", "16", "--n-val", "8",
        "--max-length", "24", "--no-progress", "--threads", "1", "--fraction", "0.5", "--out", str(out),
    ])
    assert code == 0, stderr
    assert "0 epoch(s)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["epochs"] == 0 and summary["settings"]["adapter"] == str(tmp_path / "adapter")
    assert len(read_csv(out / "selected.csv")) == 8


# ------------------------------------------------------------------------------ convergence


def test_convergence_toy(tmp_path):
    pytest.importorskip("hyperinf_ext.app.tasks.convergence")
    code, stdout, stderr = run_cli([
        "convergence", "--sizes", "16", "--samples", "50", "--iterations", "10", "--no-progress", "--threads", "1",
        "--out", str(tmp_path),
    ])
    assert code == 0, stderr
    assert stdout.strip()
    assert (tmp_path / "convergence.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "convergence.csv").is_file() or (tmp_path / "convergence.json").is_file()


# ------------------------------------------------------------------------------ errors


def assert_one_line_error(code: int, stdout: str, stderr: str, *fragments: str) -> None:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hyperinf-ext: error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_error_missing_data_file(tmp_path):
    result = run_cli(["detect-mislabeled", *TOY, "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path)])
    assert_one_line_error(*result, "nope.csv", "not found")


def test_error_unknown_column(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(60)))
    result = run_cli(["detect-mislabeled", *TOY, "--data", str(data), "--out", str(tmp_path)])
    assert_one_line_error(*result, "column 'text' not found", "sentence")


def test_error_model_not_a_model_folder(tmp_path):
    folder = tmp_path / "empty_model"
    folder.mkdir()
    result = run_cli(["select-data", *TOY, "--model", str(folder), "--out", str(tmp_path)])
    assert_one_line_error(*result, "not a model folder")


def test_error_adapter_not_an_adapter(tmp_path):
    result = run_cli(["detect-mislabeled", *TOY, "--adapter", str(tmp_path), "--out", str(tmp_path)])
    assert_one_line_error(*result, "adapter")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["detect-mislabeled", "--flip-rate", "1.5"], "--flip-rate"),
        (["detect-mislabeled", "--flip-rate", "-0.1"], "--flip-rate"),
        (["detect-mislabeled", "--methods", "hyperinf,magic"], "--methods: unknown method 'magic'"),
        (["select-data", "--method", "magic"], "--method: unknown method 'magic'"),
        (["detect-mislabeled", "--damping", "huge"], "--damping: unknown rule 'huge'"),
        (["detect-mislabeled", "--damping", "-1"], "--damping"),
        (["detect-mislabeled", "--damping", "spectral:x"], "--damping: 'spectral:x'"),
        (["select-data", "--damping", "0"], "--damping: a numeric damping must be > 0"),
        (["select-data", "--fraction", "0"], "--fraction"),
        (["detect-mislabeled", "--n-train", "100000"], "not enough rows"),
        (["convergence", "--iterations", "0"], "--iterations"),
        (["detect-mislabeled", "--device", "tpu"], "--device"),
    ],
)
def test_error_bad_values(tmp_path, args, fragment):
    result = run_cli([*args, "--no-progress", "--out", str(tmp_path)])
    assert_one_line_error(*result, fragment)


def test_error_cuda_unavailable(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda would start a real run")
    result = run_cli(["detect-mislabeled", "--device", "cuda", "--no-progress", "--out", str(tmp_path)])
    assert_one_line_error(*result, "CUDA is not available")


def test_threads_restored_after_main(tmp_path):
    import torch

    before = torch.get_num_threads()
    code, _, _ = run_cli(["detect-mislabeled", "--threads", "1", "--flip-rate", "2", "--out", str(tmp_path)])
    assert code == 2 and torch.get_num_threads() == before
    code, _, stderr = run_cli(["convergence", "--threads", "0", "--out", str(tmp_path)])
    assert_one_line_error(code, "", stderr, "--threads")


def test_argparse_errors_exit_2():
    code, _, stderr = run_cli(["detect-mislabeled", "--n-train", "many"])
    assert code == 2 and "invalid int value" in stderr
    code, _, _ = run_cli(["no-such-command"])
    assert code == 2


def test_help_in_process():
    code, stdout, _ = run_cli(["detect-mislabeled", "--help"])
    assert code == 0 and "--flip-rate" in stdout and "--methods" in stdout


def test_python_m_help():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "hyperinf_ext", "--help"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("detect-mislabeled", "select-data", "convergence"):
        assert command in proc.stdout


# ------------------------------------------------------------------------------ output folder and extras

COMMANDS = [["detect-mislabeled", *TOY], ["select-data", *TOY],
            ["convergence", "--sizes", "16", "--samples", "50", "--iterations", "5", "--no-progress", "--threads", "1"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_error_out_is_an_existing_file(tmp_path, command):
    existing = tmp_path / "results.csv"
    existing.write_text("keep me\n")
    result = run_cli([*command, "--out", str(existing)])
    assert_one_line_error(*result, "--out", "results.csv", "exists and is not a folder")
    assert existing.read_text() == "keep me\n"
    result = run_cli([*command, "--out", str(existing / "sub")])  # a folder below a file
    assert_one_line_error(*result, "--out", "cannot create the folder")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_error_out_holds_another_artefact_before_any_work(tmp_path, monkeypatch, command):
    """Issue #24: saved factors, a checkpoint or a score store in --out is refused, named, and untouched."""
    import hyperinf_ext.app.models.training as training
    from hyperinf_ext.app.tasks.output import prepare_output_dir

    def no_work(*args, **kwargs):
        raise AssertionError("fine-tuning started before --out was checked")

    monkeypatch.setattr(training, "finetune", no_work)
    held = {"factors": ("hyperinf-ext/factors", "saved factors"),
            "checkpoint": ("hyperinf-ext/checkpoint", "a fit checkpoint"),
            "store": ("hyperinf-ext/score-store", "a score store")}
    for name, (kind, words) in held.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"kind": kind}))
        result = run_cli([*command, "--out", str(folder)])
        assert_one_line_error(*result, "--out", str(folder), f"holds {words}")
        assert sorted(p.name for p in folder.iterdir()) == ["meta.json"]
    legacy = tmp_path / "legacy"  # factors saved before manifests named their kind
    legacy.mkdir()
    (legacy / "factors-000001.safetensors").write_bytes(b"")
    assert_one_line_error(*run_cli([*command, "--out", str(legacy)]), "--out", "holds saved factors")
    previous = tmp_path / "previous"  # a CLI run's own folder is reused
    previous.mkdir()
    (previous / "summary.json").write_text("{}")
    assert prepare_output_dir(previous) == previous


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_error_out_not_writable_before_any_work(tmp_path, monkeypatch, command):
    import hyperinf_ext.app.tasks.output as output
    import hyperinf_ext.app.models.training as training

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def no_work(*args, **kwargs):
        raise AssertionError("fine-tuning started before --out was checked")

    # root may write anywhere, so the refusal of a read-only folder is simulated at the write probe
    monkeypatch.setattr(output.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(training, "finetune", no_work)
    result = run_cli([*command, "--out", str(tmp_path)])
    assert_one_line_error(*result, "--out", "not writable", "Permission denied")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_error_out_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = run_cli([*COMMANDS[0], "--out", str(folder)])
    finally:
        folder.chmod(0o755)
    assert_one_line_error(*result, "--out", "not writable")


def test_error_three_classes_against_two_label_model(tmp_path):
    from hyperinf_ext.app.data import default_model_path

    model = tmp_path / "two_label_model"
    shutil.copytree(default_model_path(), model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx*"))
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "neg", "1": "pos"})
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "three.csv"
    data.write_text("text,label\n" + "".join(f"review number {i} of the set,{i % 3}\n" for i in range(60)))
    result = run_cli(["detect-mislabeled", *TOY, "--data", str(data), "--model", str(model), "--out", str(tmp_path)])
    assert_one_line_error(*result, "classification head has 2 labels but 3 are needed")


@pytest.mark.parametrize("command, module", [(COMMANDS[2], "matplotlib"), (COMMANDS[0], "peft"),
                                             (COMMANDS[1], "transformers")])
def test_error_missing_extra_names_it(tmp_path, monkeypatch, command, module):
    monkeypatch.setitem(sys.modules, module, None)  # import and find_spec both see it as missing
    code, _, stderr = run_cli([*command, "--out", str(tmp_path)])
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert module in lines[0] and "pip install 'hyperinf-ext[app]'" in lines[0]
    assert not any(tmp_path.iterdir())  # refused before any output


def test_error_missing_module_at_run_time_names_the_extra(tmp_path, monkeypatch):
    import hyperinf_ext.app.tasks.convergence as convergence

    def missing(**kwargs):
        raise ModuleNotFoundError("No module named 'peft'", name="peft")

    monkeypatch.setattr(convergence, "run_convergence", missing)
    code, _, stderr = run_cli([*COMMANDS[2], "--out", str(tmp_path)])
    assert code == 1 and stderr.strip().splitlines() == [
        "hyperinf-ext: error: No module named 'peft' (pip install 'hyperinf-ext[app]')"]


def test_every_command_has_one_max_length_default():
    """A LoRA fine-tuned by one command and given to another (--adapter) is scored on the tokens it was
    trained on: 64 for a classifier, 128 for a causal LM, whatever the command; a given value wins."""
    from hyperinf_ext.app.cli import _max_length
    from hyperinf_ext.app.cli.args import build_parser

    parser = build_parser()
    needs = {"audit": ["--train", "t.csv"], "select": ["--pool", "p.csv", "--target", "t.csv", "--count", "2"],
             "attribute": ["--train", "t.csv", "--query", "q.csv"], "index build": ["--train", "t.csv"],
             "detect-mislabeled": [], "select-data": []}
    for command, extra in needs.items():
        for model, want in (("minilm", 64), ("smollm2", 128)):
            args = parser.parse_args([*command.split(), *extra, "--model", model])
            assert _max_length(args) == want, (command, model)
        args = parser.parse_args([*command.split(), *extra, "--model", "smollm2", "--max-length", "40"])
        assert _max_length(args) == 40, command
