"""Output directories (issue #24, item 2): every writer refuses another kind of artefact, replaces its own
kind atomically, a failed rerun leaves the previous result loadable, and OS errors become ValueErrors
naming the path (hyperinf_ext/persistence/kinds.py holds the one check).

A tiny float64 LoRA BERT (tests/persist_child.py), one process.  Values reloaded after a failed rerun
must be bit-identical to those before it: nothing is recomputed, the same files are read back.
"""
import json
import os
import re

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import persist_child as pc  # noqa: E402

from hyperinf_ext import HyperINF, persistence  # noqa: E402
from hyperinf_ext.persistence import kinds  # noqa: E402

WORDS = {"factors": "saved factors", "checkpoint": "a fit checkpoint", "store": "a score store",
         "cli": "a CLI run's outputs"}


@pytest.fixture(scope="module")
def fitted():
    return HyperINF(pc.tiny_model(), progress=False, distributed=False).fit(pc.train_batches())


def _make(kind: str, directory, attr) -> None:
    if kind == "factors":
        attr.save(directory)
    elif kind == "checkpoint":
        HyperINF(pc.tiny_model(), progress=False, distributed=False, cache="none").fit(
            pc.train_batches(), checkpoint_dir=directory)
    elif kind == "store":
        attr.scores(pc.query_batches(), out=directory)
    else:  # what a CLI task leaves (its report files)
        directory.mkdir()
        (directory / "summary.json").write_text(json.dumps({"task": "attribute", "outputs": {}}))
        (directory / "report.md").write_text("# report\n")


def _write(kind: str, directory, attr) -> None:
    if kind == "cli":
        from hyperinf_ext.app.tasks.output import prepare_output_dir

        prepare_output_dir(directory)
    else:
        _make(kind, directory, attr)


def _snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in directory.rglob("*") if p.is_file() and p.name != "lock"}


@pytest.mark.parametrize("writer", ["factors", "checkpoint", "store", "cli"])
def test_each_writer_refuses_another_kind_and_leaves_it_untouched(fitted, tmp_path, writer):
    if writer == "cli":
        pytest.importorskip("hyperinf_ext.app.tasks.output")
    for held in WORDS:
        if held == writer or held == "cli" and writer == "cli":
            continue
        d = tmp_path / f"{held}-for-{writer}"
        _make(held, d, fitted)
        before = _snapshot(d)
        with pytest.raises(ValueError, match=re.escape(str(d)) + ".*holds " + re.escape(WORDS[held])):
            _write(writer, d, fitted)
        assert _snapshot(d) == before, f"{writer} changed the {held} it refused"
    # the loaders name what they found instead
    made = {held: tmp_path / f"{held}-for-{writer}" for held in WORDS if held != writer}
    for held, d in made.items():
        if held != "store":
            with pytest.raises(ValueError, match=re.escape(str(d)) + ": holds " + re.escape(WORDS[held])
                               + ".*not a score store"):
                HyperINF.load_scores(d)
        if held in ("store", "cli"):
            with pytest.raises(ValueError, match=re.escape(str(d)) + ": holds " + re.escape(WORDS[held])
                               + ".*not saved HyperINF factors"):
                HyperINF.load(d, pc.tiny_model())


def test_own_kind_is_replaced_with_only_the_new_result_left(fitted, tmp_path):
    store = tmp_path / "store"
    first = fitted.scores(pc.query_batches(), out=store).clone()
    fewer = [{k: v[:2] for k, v in pc.query_batches()[0].items()}]
    second = fitted.scores(fewer, out=store)
    assert second.shape[0] < first.shape[0]
    assert torch.equal(HyperINF.load_scores(store), second)
    assert sorted(p.name for p in store.iterdir()) == sorted(["meta.json", persistence.WRITE_LOCK, json.loads(
        (store / "meta.json").read_text())["scores"]])  # the old generation and no temporaries left
    assert json.loads((store / "meta.json").read_text())["kind"] == kinds.SCORE_STORE

    saved = tmp_path / "factors"
    fitted.save(saved)
    fitted.use("exact").save(saved)
    assert json.loads((saved / "meta.json").read_text())["kind"] == kinds.FACTORS
    assert HyperINF.load(saved, pc.tiny_model()).config.method == "exact"
    assert len(list(saved.glob("factors-*.safetensors"))) == 1
    fitted.use("hyperinf")

    # manifests written before the "kind" key existed are still told apart by their format and files
    meta = json.loads((store / "meta.json").read_text())
    del meta["kind"]
    (store / "meta.json").write_text(json.dumps(meta))
    assert kinds.kind_of(store) == kinds.SCORE_STORE and torch.equal(HyperINF.load_scores(store), second)
    meta = json.loads((saved / "meta.json").read_text())
    del meta["kind"]
    (saved / "meta.json").write_text(json.dumps(meta))
    assert kinds.kind_of(saved) == kinds.FACTORS


def test_a_failed_rerun_leaves_the_previous_result_loadable(fitted, tmp_path, monkeypatch):
    store = tmp_path / "store"
    fitted.scores(pc.query_batches(), out=store)
    before = HyperINF.load_scores(store).clone()

    def dying():  # a second pass over the training set that fails after its first batch
        batches = pc.train_batches()
        yield batches[0]
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        fitted.scores(pc.query_batches(), dying(), out=store)
    assert torch.equal(HyperINF.load_scores(store), before)
    assert not list(store.glob("*.partial")), "the failed run's unfinished file was left behind"

    saved = tmp_path / "factors"
    fitted.save(saved)
    ref = HyperINF.load(saved, pc.tiny_model()).factors

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persistence.state, "save_tensors_atomic", broken)
    with pytest.raises(OSError):
        fitted.save(saved)
    monkeypatch.undo()
    again = HyperINF.load(saved, pc.tiny_model()).factors
    assert all(torch.equal(again[n].gfim_sum, ref[n].gfim_sum) for n in ref)


def test_a_second_writer_is_refused_while_the_first_writes(fitted, tmp_path, monkeypatch):
    """Two writers of one directory at once mixed one's manifest with the other's factors (both took the same
    generation) or removed the other's unfinished score file at commit; the second is refused now, in
    one line, and the first finishes as if alone.  The second writer runs *inside* the first (from its
    training loader, from its factor write), so the overlap is certain; flock conflicts between two
    descriptors of one process as between two processes."""
    store = tmp_path / "store"
    first = fitted.scores(pc.query_batches(), out=store).clone()
    refusals = []

    def loader_that_starts_another_run():
        for b in pc.train_batches():
            if not refusals:
                with pytest.raises(persistence.DirectoryBusyError) as e:
                    fitted.scores(pc.query_batches(), out=store)
                refusals.append(str(e.value))
            yield b

    again = fitted.scores(pc.query_batches(), loader_that_starts_another_run(), out=store)
    assert re.fullmatch(f"out {re.escape(str(store))}: another run is writing a score store there .*", refusals[0])
    assert torch.equal(again, first) and torch.equal(HyperINF.load_scores(store), first)
    assert not list(store.glob("*.partial"))

    saved = tmp_path / "factors"
    fitted.save(saved)
    ref = HyperINF.load(saved, pc.tiny_model()).factors
    real = persistence.state.save_tensors_atomic

    def write_and_meanwhile_save(*args, **kwargs):
        with pytest.raises(persistence.DirectoryBusyError,
                           match=f"factors directory {re.escape(str(saved))}: another process is writing it"):
            fitted.save(saved)
        return real(*args, **kwargs)

    monkeypatch.setattr(persistence.state, "save_tensors_atomic", write_and_meanwhile_save)
    fitted.save(saved)
    monkeypatch.undo()
    back = HyperINF.load(saved, pc.tiny_model()).factors
    assert all(torch.equal(back[n].gfim_sum, ref[n].gfim_sum) for n in ref)
    assert len(list(saved.glob("factors-*.safetensors"))) == 1

    # the lock goes with the writer, also a failed one: the next run of this process is not refused
    def dying():
        yield pc.train_batches()[0]
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        fitted.scores(pc.query_batches(), dying(), out=store)
    assert torch.equal(fitted.scores(pc.query_batches(), out=store), first)
    fd = persistence.hold_lock(store / persistence.WRITE_LOCK, "held")
    assert fd is not None  # free again
    try:
        with pytest.raises(persistence.DirectoryBusyError, match="another run is writing"):
            fitted.scores(pc.query_batches(), out=store)
    finally:
        os.close(fd)
    assert torch.equal(HyperINF.load_scores(store), first)


def test_os_errors_become_value_errors_naming_the_path(fitted, tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    s = torch.zeros(2, 3, dtype=torch.float64)
    cases = [
        (lambda: fitted.scores(pc.query_batches(), out=a_file), "a_file: exists and is a file, not a directory"),
        (lambda: fitted.scores(pc.query_batches(), out=a_file / "sub"), "a_file/sub: cannot create the directory"),
        (lambda: fitted.save(a_file), "a_file: exists and is a file, not a directory"),
        (lambda: HyperINF.save_scores(tmp_path, s), "is a directory; save_scores writes one file"),
        (lambda: HyperINF.save_scores(a_file / "s.safetensors", s), "its parent .*a_file is a file"),
        (lambda: HyperINF.save_scores(a_file, s), "a_file: exists and is not a score file"),
        (lambda: HyperINF.load_scores(tmp_path / "nowhere"), "nowhere: missing"),
    ]
    store = tmp_path / "store"
    fitted.scores(pc.query_batches(), out=store)
    name = json.loads((store / "meta.json").read_text())["scores"]
    cases.append((lambda: (store / name).unlink() or HyperINF.load_scores(store), f"{name}: missing"))
    meta_less = tmp_path / "keyless"
    fitted.scores(pc.query_batches(), out=meta_less)
    meta = json.loads((meta_less / "meta.json").read_text())
    del meta["n_train"]
    (meta_less / "meta.json").write_text(json.dumps(meta))
    cases.append((lambda: HyperINF.load_scores(meta_less), "meta.json: missing key 'n_train'"))
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()

    # an unwritable place (simulated: root writes anywhere) is named, not a raw PermissionError
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(kinds.tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=r"out .*new: the directory is not writable \(Permission denied\)"):
        fitted.scores(pc.query_batches(), out=tmp_path / "new")
    monkeypatch.undo()
    monkeypatch.setattr(persistence.state, "save_tensors_atomic", refuse)
    with pytest.raises(ValueError, match=r"s\.safetensors: cannot write the score file \(Permission denied\)"):
        HyperINF.save_scores(tmp_path / "s.safetensors", s)
    assert a_file.read_text() == "x"
