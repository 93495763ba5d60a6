"""Saved factors, fit checkpoints and score files (hyperinf_ext/persistence/, cache.py).

A tiny float64 LoRA BERT (tests/persist_child.py).  A resumed or reloaded fit must give the
uninterrupted fit's factors and scores to 1e-12 relative (see RTOL) — or raise a ValueError/RuntimeError naming the file, layer or
directory.  Crashes are simulated in process (a hook raising at a named write step) and, in
test_kill_and_resume_subprocess, by killing a fitting subprocess.
"""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import persist_child as pc  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import hyperinf_ext  # noqa: E402
from hyperinf_ext import HyperINF, persistence  # noqa: E402
from hyperinf_ext.capture import classification_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# A resumed fit adds the same float64 per-batch GFIMs in the same order as the uninterrupted one, so the
# factors agree to rounding (a BLAS may round a GEMM differently with another thread count or alignment,
# as in the killed subprocess: ~n·ε ≈ 1e-14 relative); a batch counted twice or lost is off by ≥ 1/7.
# Scores are compared with the Cholesky method (stable: κ·ε), not Schulz, whose stopping iteration
# could flip on a rounding-level change.  Derivation: factors are float64 sums of m = 14·3 = 42 rows
# (7 batch GEMMs of 2 examples × rank 3), ≤ γ_{m+7}·max|F| ≈ 5e-15 apart for any summation order (max-norm;
# the diagonal dominates |g|ᵀ|g|); the damped factors have κ ≤ 7 (measured 5.0–6.5 on persist_child's
# model, d ≤ 17), so exact-method scores move by ≤ κ·(5e-15 + d·u ≈ 2e-15) ≈ 5e-14 of their scale.
# 1e-12 leaves 20×; a lost or doubled batch (≥ 1/7) is 1e11× above it.
RTOL = 1e-12


def test_imports_this_checkout():
    assert Path(hyperinf_ext.__file__).resolve().parent == ROOT / "hyperinf_ext"


@pytest.fixture(scope="module")
def model():
    return pc.tiny_model()


@pytest.fixture(scope="module")
def ref(model):
    """The uninterrupted fit (method hyperinf) and its exact-method scores."""
    attr = HyperINF(model, progress=False).fit(pc.train_batches())
    scores = attr.use("exact").scores(pc.query_batches())
    attr.use("hyperinf")
    return attr, scores


def close(a, b):
    return float((a - b).abs().max()) <= RTOL * float(b.abs().max())


def assert_same_fit(attr, ref):
    ref_attr, ref_scores = ref
    assert attr.batches_done == ref_attr.batches_done and attr.n_train == ref_attr.n_train
    for n, f in ref_attr.factors.items():
        assert close(attr.factors[n].gfim_sum, f.gfim_sum), n
        assert close(attr.factors[n].rank_sum, f.rank_sum), n
        assert attr.factors[n].count == f.count == pc.N_TRAIN, n
    assert close(attr.use("exact").scores(pc.query_batches()), ref_scores)


def dying(loader, at, exc=KeyboardInterrupt):
    for i, b in enumerate(loader):
        if i == at:
            raise exc("the loader died")
        yield b


def committed(ck):
    return json.loads((Path(ck) / "meta.json").read_text())


# --------------------------------------------------------------------------- checkpoint and resume


def test_checkpoint_layout_and_resume(model, ref, tmp_path):
    ck = tmp_path / "ck"
    attr = HyperINF(model, progress=False)
    with pytest.raises(KeyboardInterrupt):
        attr.fit(dying(pc.train_batches(), 5), checkpoint_dir=ck, checkpoint_every=2)
    meta = committed(ck)
    assert meta["batches_done"] == 4 and meta["complete"] is False and meta["data"]["batches"] == 4
    # one factors file, the one meta.json names; the cache's manifest has no temporary left over
    assert sorted(p.name for p in ck.glob("factors*")) == [meta["factors"]]
    assert not list(ck.rglob("*.tmp*"))
    resumed = HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck, checkpoint_every=2)
    assert committed(ck)["complete"] is True and committed(ck)["batches_done"] == 7
    assert_same_fit(resumed, ref)
    # the same attributor resumes too, and is usable again afterwards
    attr.fit(pc.train_batches(), checkpoint_dir=ck)
    assert_same_fit(attr, ref)


class Killed(BaseException):
    """Stands for a kill at a write step (in process, so the test stays fast)."""


# step → batches committed when the step is reached the 3rd time (checkpoint_every=1; the cache manifest is
# also written once when the fit opens the cache)
STEPS = {"factors_tmp": 2, "factors_written": 2, "meta_tmp": 2, "meta_committed": 3, "grads_batch_written": 2,
         "grads_manifest_tmp": 1}


@pytest.mark.parametrize("step", list(STEPS))
def test_crash_inside_a_commit_resumes_exactly(model, ref, tmp_path, monkeypatch, step):
    """Issue #10 3.1: a crash between writing the factors and the meta file must not count batches twice."""
    seen = []

    def crash(name):
        if name == step:
            seen.append(name)
            if len(seen) == 3:
                raise Killed(name)

    monkeypatch.setattr(persistence.files, "crash_point", crash)  # the writers' module
    ck = tmp_path / "ck"
    with pytest.raises(Killed):
        HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck, checkpoint_every=1)
    monkeypatch.undo()
    assert committed(ck)["batches_done"] == STEPS[step]  # the interrupted commit is not half there
    assert_same_fit(HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck, checkpoint_every=1), ref)


@pytest.mark.parametrize("every", [-1, 2.5, "3", True])
def test_checkpoint_every_is_checked(model, tmp_path, every):
    with pytest.raises(ValueError, match="checkpoint_every: expected a number of batches ≥ 0"):
        HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=tmp_path, checkpoint_every=every)


def test_checkpoint_every_0_commits_only_at_the_end(model, ref, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        HyperINF(model, progress=False).fit(dying(pc.train_batches(), 5), checkpoint_dir=tmp_path, checkpoint_every=0)
    assert not (tmp_path / "meta.json").exists()
    attr = HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=tmp_path, checkpoint_every=0)
    assert committed(tmp_path)["generation"] == 1
    assert_same_fit(attr, ref)


def test_crash_hook_exits_at_the_named_step(tmp_path):
    code = ("import os, sys; os.environ['HYPERINF_EXT_TEST_CRASH_AT'] = 'x:2'; from hyperinf_ext import persistence as p; "
            "p.crash_point('y'); p.crash_point('x'); print('first', flush=True); p.crash_point('x'); print('second')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 77 and r.stdout == "first\n"


# --------------------------------------------------------------------------------- failed fits


def nan_at(index):
    def loss_fn(model, batch):
        loss = classification_loss(model, batch)
        return loss * float("nan") if int(batch["index"][0]) == index else loss
    return loss_fn


@pytest.mark.parametrize("cause", ["nan", "interrupt"])
def test_failed_fit_blocks_scoring_and_saving(model, ref, tmp_path, cause):
    """Issue #10 3.2: no TracIn-like scores on partial data, no all-zero GFIMs written."""
    if cause == "nan":
        attr = HyperINF(model, progress=False, loss_fn=nan_at(6))
        with pytest.raises(ValueError, match="NaN"):
            attr.fit(pc.train_batches())
    else:
        attr = HyperINF(model, progress=False)
        with pytest.raises(KeyboardInterrupt):
            attr.fit(dying(pc.train_batches(), 3))
    qb = pc.query_batches()
    for call in (lambda: attr.scores(qb), lambda: attr.mean_scores(qb), lambda: attr.save(tmp_path / "s"),
                 lambda: attr.use("datainf")):
        with pytest.raises(RuntimeError, match="fit did not complete: (ValueError|KeyboardInterrupt)") as e:
            call()
        assert "resume" not in str(e.value)  # no checkpoint to resume from
    assert not (tmp_path / "s").exists()
    attr.loss_fn = classification_loss
    assert_same_fit(attr.fit(pc.train_batches()), ref)  # a complete fit clears the failure


def test_failed_checkpointed_fit_says_how_to_resume(model, ref, tmp_path):
    ck = tmp_path / "ck"
    attr = HyperINF(model, progress=False, loss_fn=nan_at(8))
    with pytest.raises(ValueError, match="NaN"):
        attr.fit(pc.train_batches(), checkpoint_dir=ck, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="fit did not complete: ValueError.*to resume from its last checkpoint"):
        attr.mean_scores(pc.query_batches())
    assert committed(ck)["batches_done"] == 4  # the NaN batch (the 5th) was never committed
    attr.loss_fn = classification_loss
    assert_same_fit(attr.fit(pc.train_batches(), checkpoint_dir=ck), ref)


# ------------------------------------------------------------------------- shapes and values on load


@pytest.mark.parametrize("rank, hidden", [(5, 16), (3, 24)])
def test_load_and_resume_check_shapes_against_the_model(model, tmp_path, rank, hidden):
    """Issue #10 3.5 and section 4 (a rank-3 checkpoint resumed with a rank-5 model)."""
    attr = HyperINF(model, progress=False).fit(pc.train_batches())
    attr.save(tmp_path / "f")
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        HyperINF(model, progress=False).fit(dying(pc.train_batches(), 3), checkpoint_dir=ck, checkpoint_every=1)
    other = pc.tiny_model(rank=rank, hidden=hidden)
    shape = rf"saved GFIM shape \[16, 16\] with rank 3 .*\[3, 16\].*model's layer has gradient shape \[{rank}, "
    with pytest.raises(ValueError, match=r"layer '.*lora_A.*': " + shape):
        HyperINF.load(tmp_path / "f", other, progress=False)
    with pytest.raises(ValueError, match=shape):
        HyperINF(other, progress=False).fit(pc.train_batches(), checkpoint_dir=ck)


def test_load_refuses_other_layers(model, tmp_path):
    HyperINF(model, progress=False, cache="none").fit(pc.train_batches()).save(tmp_path / "f")
    attr = HyperINF(model, progress=False, layers=["value"])
    n_saved, n_model = len(HyperINF(model).layers), len(attr.layers)
    with pytest.raises(ValueError, match=rf"saved layers do not match the model's \({n_saved} saved, {n_model} in the "
                                         rf"model; model layers not saved: \[\]; saved layers not in the model: \['.*query"):
        attr._apply_state(persistence.read_state(tmp_path / "f"))


@pytest.mark.parametrize("key, value", [("method_state", float("nan")), ("gfim_sum", float("inf")),
                                        ("rank_sum", float("-inf"))])
def test_load_refuses_non_finite_tensors(model, tmp_path, key, value):
    """Issue #10 3.6."""
    HyperINF(model, progress=False, cache="none").fit(pc.train_batches()).save(tmp_path / "f")
    path = tmp_path / "f" / committed(tmp_path / "f")["factors"]
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith(key + "."))
    tensors[name][1, 0] = value
    save_file(tensors, str(path), metadata={"generation": str(committed(tmp_path / "f")["generation"])})
    with pytest.raises(ValueError, match=rf"{path.name}: tensor '{name}' contains NaN or Inf"):
        HyperINF.load(tmp_path / "f", model, progress=False)


def test_save_load_round_trip_reuses_inverses(model, ref, tmp_path):
    attr = ref[0]
    scores = attr.scores(pc.query_batches())
    attr.save(tmp_path / "f")
    attr.save(tmp_path / "f")  # a second save replaces the first: one factors file remains
    assert len(list((tmp_path / "f").glob("factors*"))) == 1 and committed(tmp_path / "f")["generation"] == 2
    loaded = HyperINF.load(tmp_path / "f", model, progress=False)
    for n in attr.factors:
        # the stored inverses, bit for bit: safetensors stores the float64 bytes, no arithmetic
        assert torch.equal(loaded.method.state[n], attr.method.state[n])
    assert close(loaded.scores(pc.query_batches(), train_loader=pc.train_batches()), scores)


# ------------------------------------------------------------------------------------ data fingerprint


def test_finished_checkpoint_refuses_other_data(model, ref, tmp_path):
    """Issue #10 3.7: other data, a shorter or a longer loader never returns the old factors."""
    ck = tmp_path / "ck"
    HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck, checkpoint_every=3)
    generation = committed(ck)["generation"]
    flipped = pc.make_data(pc.N_TRAIN, 1)
    flipped["labels"][9] = 1 - flipped["labels"][9]
    longer = pc.train_batches() + pc.batches(pc.make_data(2, 9))
    for loader, msg in [(pc.batches(flipped), "first 7 batches differ from the data this checkpoint was fitted on"),
                        (pc.train_batches()[:6], "the loader yielded 6 batches, but this checkpoint has already consumed 7"),
                        (longer, "holds a finished fit of 7 batches, but the loader yields more")]:
        with pytest.raises(ValueError, match=msg):
            HyperINF(model, progress=False).fit(loader, checkpoint_dir=ck)
        assert committed(ck)["generation"] == generation  # the checkpoint is untouched
    # the same data reuses the checkpoint
    assert_same_fit(HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck), ref)


def test_unfinished_checkpoint_refuses_other_data(model, tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        HyperINF(model, progress=False).fit(dying(pc.train_batches(), 4), checkpoint_dir=ck, checkpoint_every=2)
    other = pc.batches(pc.make_data(pc.N_TRAIN, 7))
    with pytest.raises(ValueError, match="first 4 batches differ"):
        HyperINF(model, progress=False).fit(other, checkpoint_dir=ck)
    reordered = pc.train_batches()
    reordered[0], reordered[1] = reordered[1], reordered[0]
    with pytest.raises(ValueError, match="first 4 batches differ"):
        HyperINF(model, progress=False).fit(reordered, checkpoint_dir=ck)


def test_resume_refuses_other_fit_settings(model, tmp_path):
    ck = tmp_path / "ck"
    HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck)
    with pytest.raises(ValueError, match="fitted with other settings .*dtype: 'float64' saved, 'float32' now"):
        HyperINF(model, progress=False, dtype=torch.float32).fit(pc.train_batches(), checkpoint_dir=ck)
    HyperINF(model, progress=False, cache="none").fit(pc.train_batches()).save(tmp_path / "f")
    with pytest.raises(ValueError, match=r"f: holds saved factors \(HyperINF.save\), not a fit checkpoint"):
        HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=tmp_path / "f")


def test_resume_refuses_another_model(model, tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        HyperINF(model, progress=False).fit(dying(pc.train_batches(), 3), checkpoint_dir=ck, checkpoint_every=1)
    other = pc.tiny_model(seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="fitted with another model"):
        HyperINF(other, progress=False).fit(pc.train_batches(), checkpoint_dir=ck)


def test_fingerprint_covers_values_shapes_and_order():
    def fp(batches):
        f = persistence.DataFingerprint()
        for b in batches:
            f.update(b)
        return f.digest

    b = pc.train_batches()
    base = fp(b)
    assert fp(pc.train_batches()) == base
    assert fp(b[::-1]) != base
    assert fp([{**x, "input_ids": x["input_ids"][:, :7]} for x in b]) != base
    assert fp([{**x, "labels": x["labels"].int()} for x in b]) != base
    # a value in the middle of a large tensor inside a tuple, a list, a nested dict or a numpy array (their
    # repr elides it, or they had no byte form): batches that differ anywhere hash apart
    big = torch.arange(5000, dtype=torch.float32)
    other = big.clone()
    other[2500] += 1.0
    for wrap in (lambda t: (t, torch.ones(2)), lambda t: {"inputs": [t]}, lambda t: {"inputs": {"pixel": t}},
                 lambda t: {"x": t.numpy()}, lambda t: {"x": t.numpy().astype(object)}):
        assert fp([wrap(big)]) == fp([wrap(big.clone())]) and fp([wrap(big)]) != fp([wrap(other)])
    # mappings of tensors and plain values hash as before (a checkpoint of an earlier version resumes)
    import hashlib
    x = b[0]
    h = hashlib.blake2b(digest_size=16)
    for key, value in sorted(x.items(), key=lambda kv: str(kv[0])):
        h.update(repr(key).encode())
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert fp([x]) == hashlib.blake2b(h.digest(), digest_size=16).hexdigest()


# -------------------------------------------------------------------------------------------- lock


def test_a_checkpoint_dir_in_use_is_refused(model, ref, tmp_path):
    """Issue #10 3.8: the second fit on a directory in use raises; the lock goes with its holder."""
    ck = tmp_path / "ck"
    with persistence.Checkpoint(ck):
        with pytest.raises(persistence.CheckpointBusyError, match=f"checkpoint_dir {ck}: in use by another fit"):
            HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck)
    assert not (ck / "meta.json").exists()
    assert_same_fit(HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck), ref)


def test_lock_held_by_another_process(model, tmp_path):
    ck = tmp_path / "ck"
    code = ("import sys, time; from hyperinf_ext import persistence as p\n"
            "with p.Checkpoint(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ck)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(persistence.CheckpointBusyError, match="in use by another fit"):
            HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck)
    finally:
        holder.kill()  # a killed holder's lock is released by the OS
        holder.wait()
    HyperINF(model, progress=False).fit(pc.train_batches()[:1], checkpoint_dir=ck)


# ------------------------------------------------------------------------------------- corrupt files


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_meta(fn):
    def edit(d):
        meta = committed(d)
        fn(meta)
        (d / "meta.json").write_text(json.dumps(meta))
    return edit


CORRUPTIONS = {
    "truncated factors": (lambda d: _truncate(d / committed(d)["factors"]), r"factors-000001\.safetensors: not a readable safetensors file"),
    "empty factors": (lambda d: (d / committed(d)["factors"]).write_bytes(b""), r"factors-000001\.safetensors: not a readable safetensors file"),
    "missing factors": (lambda d: (d / committed(d)["factors"]).unlink(), r"factors-000001\.safetensors: missing"),
    "garbage meta": (lambda d: (d / "meta.json").write_text("{'n_train': 1,"), r"meta\.json: HyperINF metadata is not valid JSON"),
    "empty meta": (lambda d: (d / "meta.json").write_text(""), r"meta\.json: HyperINF metadata is not valid JSON"),
    "meta a list": (lambda d: (d / "meta.json").write_text("[]"), r"meta\.json: HyperINF metadata must be a JSON object"),
    "missing key": (_edit_meta(lambda m: m.pop("n_train")), r"meta\.json: missing key 'n_train'"),
    "layer missing rank": (_edit_meta(lambda m: m["layers"][2].pop("rank")), r"meta\.json: layers\[2\]: missing key 'rank'"),
    "damping NaN": (_edit_meta(lambda m: m["layers"][1].update(damping=float("nan"))), r"meta\.json: layers\[1\]: 'damping' must be finite and ≥ 0, got nan"),
    "wrong type": (_edit_meta(lambda m: m.update(batches_done="7")), r"meta\.json: 'batches_done' must be int"),
    "unknown format": (_edit_meta(lambda m: m.update(format=9)), r"meta\.json: unsupported factor format 9"),
    "invalid config": (_edit_meta(lambda m: m["config"].update(colour="red")), r"meta\.json: invalid 'config'"),
    "rank in meta": (_edit_meta(lambda m: m["layers"][0].update(rank=4)), r"tensor 'rank_sum\..*' has shape \(3, 3\), but meta\.json states r=4"),
    "generation": (_edit_meta(lambda m: m.update(generation=2)), r"generation '1' does not match meta\.json's 2"),
    "no meta": (lambda d: (d / "meta.json").unlink(), r"no saved HyperINF factors \(meta\.json missing\)"),
}


@pytest.fixture(scope="module")
def saved_bytes(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    HyperINF(model, progress=False, cache="none").fit(pc.train_batches()).save(d)
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_saved_files_raise_naming_the_file(model, saved_bytes, tmp_path, case):
    """Issue #10 section 4: no raw JSONDecodeError/KeyError/SafetensorError, and the file is named."""
    for name, data in saved_bytes.items():
        (tmp_path / name).write_bytes(data)
    corrupt, msg = CORRUPTIONS[case]
    corrupt(tmp_path)
    with pytest.raises(ValueError, match=msg) as e:
        HyperINF.load(tmp_path, model, progress=False)
    assert str(tmp_path) in str(e.value)


def test_missing_tensor_is_named(model, saved_bytes, tmp_path):
    for name, data in saved_bytes.items():
        (tmp_path / name).write_bytes(data)
    path = tmp_path / committed(tmp_path)["factors"]
    tensors = load_file(str(path))
    victim = sorted(k for k in tensors if k.startswith("gfim_sum."))[1]
    del tensors[victim]
    save_file(tensors, str(path), metadata={"generation": "1"})
    with pytest.raises(ValueError, match=rf"{path.name}: missing tensor '{victim}'"):
        HyperINF.load(tmp_path, model, progress=False)


def test_format_1_directories_still_load(model, ref, tmp_path):
    attr, scores = ref
    attr.save(tmp_path)
    meta = committed(tmp_path)
    (tmp_path / meta.pop("factors")).rename(tmp_path / "factors.safetensors")
    for k in ("generation", "complete", "data"):
        meta.pop(k)
    meta["format"] = 1
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    loaded = HyperINF.load(tmp_path, model, progress=False).use("exact")
    assert close(loaded.scores(pc.query_batches(), train_loader=pc.train_batches()), scores)


def test_unfinished_checkpoint_is_not_loadable(model, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        HyperINF(model, progress=False).fit(dying(pc.train_batches(), 3), checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(ValueError, match=r"an unfinished fit checkpoint \(3 batches\)"):
        HyperINF.load(tmp_path, model, progress=False)


def test_gradient_cache_manifest_and_batches(model, ref, tmp_path):
    """Section 4: an empty grads/manifest.json (the old non-atomic write, killed) is named, not a JSONDecodeError."""
    ck = tmp_path / "ck"
    attr = HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck)
    assert json.loads((ck / "grads" / "manifest.json").read_text()) == {"batches": 7}
    assert not list((ck / "grads").glob("*.tmp*"))
    batch3 = ck / "grads" / "batch_0000003.safetensors"
    _truncate(batch3)
    with pytest.raises(ValueError, match=rf"{batch3.name}: not a readable safetensors file \(cached gradients of batch 3"):
        attr.scores(pc.query_batches())
    (ck / "grads" / "manifest.json").write_text("")
    with pytest.raises(ValueError, match=r"grads/manifest\.json: gradient-cache manifest is not valid JSON"):
        HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck)
    (ck / "grads" / "manifest.json").write_text('{"batches": -1}')
    with pytest.raises(ValueError, match=r"manifest\.json: 'batches' must be a count ≥ 0, got -1"):
        HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck)


def test_lost_gradient_cache_needs_the_train_loader(model, ref, tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        HyperINF(model, progress=False).fit(dying(pc.train_batches(), 3), checkpoint_dir=ck, checkpoint_every=1)
    for p in (ck / "grads").iterdir():
        p.unlink()
    attr = HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck)
    with pytest.raises(ValueError, match="train_loader: required"):
        attr.scores(pc.query_batches())
    assert close(attr.use("exact").scores(pc.query_batches(), train_loader=pc.train_batches()), ref[1])


def test_scores_files(tmp_path):
    s = torch.randn(3, 4, dtype=torch.float64)
    path = tmp_path / "s.safetensors"
    HyperINF.save_scores(path, s, run="a")
    assert torch.equal(HyperINF.load_scores(path), s)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    with pytest.raises(ValueError, match="metadata: values must be strings \\('seed' is int\\)"):
        HyperINF.save_scores(path, s, seed=3)
    with pytest.raises(ValueError, match="scores: expected a tensor, got list"):
        HyperINF.save_scores(path, [1.0])
    _truncate(path)
    with pytest.raises(ValueError, match=r"s\.safetensors: not a readable safetensors file \(scores"):
        HyperINF.load_scores(path)
    save_file({"other": s}, str(path))
    with pytest.raises(ValueError, match=r"s\.safetensors: no tensor named 'scores'"):
        HyperINF.load_scores(path)
    with pytest.raises(ValueError, match=r"missing\.safetensors: missing \(scores\)"):
        HyperINF.load_scores(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------ fault injection


def run_child(ck, every, crash=None, kill_after=None, delay=0.0):
    """Run persist_child's checkpointed fit; crash at a write step, or SIGKILL it ``delay`` s after it
    announced batch ``kill_after``.  Returns (return code, batches announced)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(persistence.CRASH_ENV, None)
    if crash:
        env[persistence.CRASH_ENV] = crash
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "persist_child.py"), str(ck), str(every)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in p.stdout:
            seen.append(line.strip())
            if kill_after is not None and line.strip() == f"batch {kill_after}":
                if delay:
                    import time
                    time.sleep(delay)
                p.send_signal(signal.SIGKILL)
                break
        p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, seen, p.stderr.read()


def test_kill_and_resume_subprocess(model, ref, tmp_path):
    """Section 5: a fit killed inside each commit step (and once by SIGKILL mid-batch), resumed each time
    by the next run, ends with exactly the uninterrupted factors and scores."""
    ck = tmp_path / "ck"
    for crash, expect_done in [("factors_written:3", 2), ("meta_tmp:2", 3), ("grads_manifest_tmp:2", 3),
                               ("grads_batch_written:2", 4)]:
        rc, _, err = run_child(ck, 1, crash=crash)
        assert rc == 77, err
        assert committed(ck)["batches_done"] == expect_done, crash
        leftovers = {p.name for p in ck.rglob("*.tmp*")}
        assert bool(leftovers) == crash.startswith(("meta_tmp", "grads_manifest_tmp")), leftovers
    rc, seen, err = run_child(ck, 1, kill_after=5, delay=random.uniform(0.0, 0.05))
    assert rc in (-signal.SIGKILL, 0), err
    assert_same_fit(HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck), ref)
    assert not list(ck.rglob("*.tmp*")) and len(list(ck.glob("factors-*"))) == 1  # a commit cleans up


@pytest.mark.slow
def test_random_kills_and_resume_subprocess(model, ref, tmp_path):
    """Section 5, longer: 12 runs of SIGKILLs at random batches and delays on fresh and partly
    resumed checkpoints; every resume equals the uninterrupted fit."""
    rng = random.Random(10)
    for trial in range(12):
        ck = tmp_path / f"ck{trial}"
        for _ in range(rng.randint(1, 3)):
            rc, _, err = run_child(ck, rng.choice([1, 2, 3]), kill_after=rng.randrange(pc.N_TRAIN // pc.BATCH),
                                   delay=rng.uniform(0.0, 0.2))
            assert rc in (-signal.SIGKILL, 0), err
        assert_same_fit(HyperINF(model, progress=False).fit(pc.train_batches(), checkpoint_dir=ck), ref)
