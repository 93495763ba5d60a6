"""The vision-language path of the app: image + text files, a VLM folder, the commands, the selection protocol.

Tiny random VLMs (tests/tiny_vlm.py: LLaVA and Idefics3, with processors saved as model folders) and
generated 8×8 PNGs; nothing is downloaded.  The float64 brute-force check of the gradients and scores
is tests/attributor/test_vlm_scores.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("PIL")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from tiny_vlm import KINDS, make_tiny_vlm, vlm_rows, write_images, write_rows  # noqa: E402

from hyperinf_ext.app.cli import main  # noqa: E402
from hyperinf_ext.app.data.dataset import DataError  # noqa: E402
from hyperinf_ext.app.data.vlm import VLMDataset, load_processor, load_vlm_file  # noqa: E402
from hyperinf_ext.app.models.family import is_causal, is_vlm_model, load_instruction  # noqa: E402
from hyperinf_ext.app.models.vlm import is_vlm, load_vlm_lora_model  # noqa: E402
from hyperinf_ext.capture import find_gradient_layers  # noqa: E402


class Cfg:
    def __init__(self, model):
        self.model, self.prompt_column, self.response_column = model, "prompt", "response"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm")
    folders = {k: make_tiny_vlm(d / k, k) for k in KINDS}
    images = write_images(d / "images", 8)
    train = write_rows(d / "train.jsonl", vlm_rows(images[:6], relative_to=d))
    query = write_rows(d / "query.jsonl", vlm_rows(images[6:], relative_to=d))
    return d, folders, train, query


def test_detection_and_loading(work):
    d, folders, train, _ = work
    for kind, folder in folders.items():
        assert is_vlm(folder) and is_vlm_model(Cfg(folder)) and is_causal(Cfg(folder))
        ds = load_instruction(train, Cfg(folder))
        assert isinstance(ds, VLMDataset) and len(ds) == 6 and ds.rows == list(range(1, 7))
        assert all(len(x) == 1 and Path(x[0]).is_absolute() for x in ds.images)
        sub = ds.subset([4, 1])
        assert sub.images == [ds.images[4], ds.images[1]] and sub.model_dir == ds.model_dir
    assert not is_vlm(d) and not is_vlm_model(Cfg("smollm2")) and not is_vlm_model(Cfg(None))


def test_images_list_and_messages(work):
    d, folders, _, _ = work
    imgs = sorted((d / "images").glob("*.png"))
    rows = [{"images": [imgs[0].name, str(imgs[1])], "prompt": "what colour is the square", "response": "red"},
            {"image": imgs[2].name, "messages": [{"role": "system", "content": "answer"},
                                                  {"role": "user", "content": "describe the picture"},
                                                  {"role": "assistant", "content": "a blue square"}]}]
    path = write_rows(d / "images" / "multi.jsonl", rows)
    ds = load_vlm_file(path, model_dir=str(folders["llava"]))
    assert ds.images[0] == [str(imgs[0].resolve()), str(imgs[1])] and ds.responses == ["red", "a blue square"]
    enc = ds.own_encoding(None, 64).encodings
    proc = load_processor(str(folders["llava"]))
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert enc[0]["input_ids"].count(image_id) == 8 and enc[0]["vision_rows"] == 2  # two images, 4 tokens each
    for e in enc:
        labelled = [t for t, y in zip(e["input_ids"], e["labels"]) if y != -100]
        assert image_id not in labelled and proc.tokenizer.decode(labelled).endswith("<|im_end|>")


@pytest.mark.parametrize("problem", ["missing", "broken", "none"])
def test_bad_images_are_one_line_errors_naming_file_line_and_image(work, problem):
    d, folders, _, _ = work
    imgs = sorted((d / "images").glob("*.png"))
    bad = d / "broken.png"
    bad.write_bytes(b"not a png")
    row = {"prompt": "what colour is the square", "response": "red"}
    if problem == "missing":
        row["image"] = "nowhere/gone.png"
    elif problem == "broken":
        row["image"] = str(bad)
    good = {"image": str(imgs[0]), "prompt": "what", "response": "red"}
    path = write_rows(d / f"bad_{problem}.jsonl", [good, row])
    with pytest.raises(DataError) as exc:
        load_instruction(path, Cfg(folders["llava"]))
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "line 2" in msg
    if problem == "missing":
        assert "gone.png" in msg and "not found" in msg
    elif problem == "broken":
        assert str(bad) in msg and "cannot read" in msg
    else:
        assert "no image" in msg
    # the command line reports it before loading any model: exit code 2, one line
    rc = main(["attribute", "--model", str(folders["llava"]), "--train", str(path), "--query", str(path),
               "--out", str(d / f"out_bad_{problem}"), "--no-progress"])
    assert rc == 2


def test_lora_targets_language_model_projector_vision(work):
    _, folders, _, _ = work
    model = load_vlm_lora_model(folders["llava"], rank=2)
    names = [l.name for l in find_gradient_layers(model)]
    assert names and all("language_model" in n and ("q_proj" in n or "v_proj" in n) for n in names)
    model = load_vlm_lora_model(folders["idefics3"], rank=2, projector=True, vision=True)
    names = [l.name for l in find_gradient_layers(model)]
    assert any("connector.modality_projection.proj" in n for n in names)
    assert any("vision_model" in n for n in names) and any("text_model" in n for n in names)


@pytest.mark.parametrize("kind", KINDS)
def test_attribute_command_on_a_vlm_folder(work, kind):
    d, folders, train, query = work
    out = d / f"attr_{kind}"
    rc = main(["attribute", "--model", str(folders[kind]), "--train", str(train), "--query", str(query),
               "--top-k", "2", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    records = [json.loads(x) for x in (out / "attribution.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["helpful"]) == 2 for r in records)
    scores = [h["score"] for r in records for h in r["helpful"] + r["harmful"]]
    assert all(torch.isfinite(torch.tensor(scores))) and len(set(scores)) > 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["causal_lm"] and summary["n_train"] == 6


def test_audit_command_on_a_vlm_folder(work):
    d, folders, train, _ = work
    out = d / "audit"
    rc = main(["audit", "--train", str(train), "--model", str(folders["llava"]), "--epochs", "1", "--out", str(out),
               "--no-progress"])
    assert rc == 0 and (out / "ranked.jsonl").is_file()


def test_selection_protocol_end_to_end_on_a_tiny_vlm(work, tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.vlm_selection import run_protocol

    d, folders, train, query = work
    records = run_protocol(folders["idefics3"], train, query, tmp_path, seeds=(0,), fraction=0.5, epochs=1)
    (r,) = records
    assert r["n_pool"] == 6 and r["n_selected"] == 3 and r["n_target"] == 2
    for k in ("selected_loss", "random_loss"):
        assert r[k] > 0 and torch.isfinite(torch.tensor(r[k]))
    table = (tmp_path / "VLM_SELECTION.md").read_text()
    assert "| 0 |" in table and "| mean |" in table
    assert json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])["seed"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_index_of_a_vlm_with_exact_rerank(work, kind):
    """index build / index query --exact-rerank on a VLM folder with a LoRA on the vision tower and two images
    per training row: the vision tower sees two rows per example, so the build captures one example per
    batch, and the re-rank's loader must batch the same way."""
    d, folders, _, query = work
    adapter = d / f"adapter_vision_{kind}"
    load_vlm_lora_model(folders[kind], rank=2, projector=True, vision=True).save_pretrained(str(adapter))
    rows = vlm_rows(write_images(d / "images2", 12), relative_to=d)
    two = [{**{k: v for k, v in r.items() if k != "image"}, "images": [r["image"], rows[i + 6]["image"]]}
           for i, r in enumerate(rows[:6])]
    train = write_rows(d / f"train_two_images_{kind}.jsonl", two)
    idx, out = d / f"index_{kind}", d / f"index_query_{kind}"
    assert main(["index", "build", "--model", str(folders[kind]), "--adapter", str(adapter), "--train", str(train),
                 "--proj-dim", "4", "--out", str(idx), "--no-progress", "--threads", "1"]) == 0
    assert main(["index", "query", str(idx), "--query", str(query), "--top-k", "2", "--exact-rerank", "6",
                 "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    records = [json.loads(x) for x in (out / "attribution.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["helpful"]) == 2 for r in records)
    assert json.loads((out / "summary.json").read_text())["scores"] == "exact (re-ranked)"
