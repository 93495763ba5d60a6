"""User files (issue #24 §5): the CSV/JSONL readers refuse what they would otherwise read silently wrong,
and every example keeps its file line, which the outputs use."""
from __future__ import annotations

import json

import pytest
import torch

from hyperinf_ext.app.data.dataset import DataError
from hyperinf_ext.app.data.files import load_text_file
from hyperinf_ext.app.data.instruction import load_instruction_file


def _csv(tmp_path, text: str, name: str = "d.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("loader", ["text", "instruction"])
def test_csv_structure_errors_name_file_and_line(tmp_path, loader):
    """A duplicate header column, a row with an extra field and one with a missing field are refused."""
    load = load_text_file if loader == "text" else load_instruction_file
    cols = "text,label" if loader == "text" else "prompt,response"
    cases = {
        "dup.csv": (f"{cols},{cols.split(',')[1]}\na,1,2\nb,0,1\n", r"dup\.csv: the header \(line 1\) names column '\w+' 2 times"),
        "extra.csv": (f"{cols}\na,1\nb,c,0\nd,0\n", r"extra\.csv: line 3 has 3 fields but the header has 2"),
        "missing.csv": (f"{cols}\na,1\nb\nd,0\n", r"missing\.csv: line 3 has 1 fields but the header has 2"),
    }
    for name, (content, message) in cases.items():
        with pytest.raises(DataError, match=message):
            load(_csv(tmp_path, content, name))


def test_labels_one_spelling_per_class_and_no_soft_labels(tmp_path):
    """'1' and '1.0' in one file are one class written two ways: refused, naming both lines; fractional
    (soft/regression) labels are refused naming the line; whole floats written one way are class ids."""
    with pytest.raises(DataError, match=r"mixed\.csv: column 'label' writes one class two ways: '1' \(line 2\) and "
                                        r"'1\.0' \(line 4\)"):
        load_text_file(_csv(tmp_path, "text,label\na,1\nb,0\nc,1.0\n", "mixed.csv"))
    with pytest.raises(DataError, match=r"soft\.csv: column 'label' holds '0\.7' \(line 3\), which is not a class id"):
        load_text_file(_csv(tmp_path, "text,label\na,1\nb,0.7\nc,0\n", "soft.csv"))
    soft_json = tmp_path / "soft.jsonl"
    soft_json.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a", "label": 0}, {"text": "b", "label": 0.25}]))
    with pytest.raises(DataError, match=r"soft\.jsonl: column 'label' holds 0\.25 \(line 2\)"):
        load_text_file(soft_json)
    ds = load_text_file(_csv(tmp_path, "text,label\na,1.0\nb,0.0\nc,1.0\n", "floats.csv"))
    assert ds.labels == [1, 0, 1] and ds.label_names == ["0", "1"]
    # the training loop refuses soft labels and a one-output (regression) head in the same way
    from hyperinf_ext.app.models.training import _check_labels
    with pytest.raises(DataError, match="not class ids"):
        _check_labels(torch.tensor([0.0, 0.7]), 2)
    with pytest.raises(DataError, match="regression head"):
        _check_labels(torch.tensor([0, 1]), 1)
    assert _check_labels(torch.tensor([0.0, 1.0]), 2).dtype == torch.long


def test_skipped_rows_are_reported_and_outputs_use_file_lines(tmp_path):
    """A row with empty text is skipped with a note naming its line; examples keep their file lines, and the
    attribute records name training examples and queries by those lines, not by position."""
    from hyperinf_ext.app.tasks.attribute import attribution_records
    from hyperinf_ext.attributor.topk import TopK

    train = load_text_file(_csv(tmp_path, "text,label\na,1\n  ,0\nb,0\nc,1\n", "train.csv"))
    assert train.texts == ["a", "b", "c"] and train.rows == [2, 4, 5]
    assert len(train.notes) == 1 and "skipped 1 row(s) with empty 'text' at line(s) 3" in train.notes[0]
    assert train.subset([2, 0]).rows == [5, 2]
    query = load_text_file(_csv(tmp_path, "text,label\n,1\nq,1\n", "query.csv"), min_classes=1)
    assert query.rows == [3]
    top = TopK(1, 1)
    top.update(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64), torch.arange(3))
    records = attribution_records(train, query, top.result(), causal=False)
    assert records[0]["query_line"] == 3
    assert records[0]["helpful"][0]["train_line"] == 4 and records[0]["helpful"][0]["text"] == "b"
    assert records[0]["harmful"][0]["train_line"] == 5 and records[0]["harmful"][0]["text"] == "c"
    lines = tmp_path / "i.jsonl"
    lines.write_text('{"prompt": "p", "response": "r"}\n\n{"prompt": "q", "response": "s"}\n')
    assert load_instruction_file(lines).rows == [1, 3]


def test_a_row_with_quoted_newlines_is_named_by_its_first_line(tmp_path):
    """csv's line_num points at a row's last physical line; outputs name a multi-line row by its first."""
    ds = load_text_file(_csv(tmp_path, 'text,label\na,1\n"two\nlines, and\nthree",0\nb,1\n', "multi.csv"))
    assert ds.rows == [2, 3, 6]


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085"])
def test_jsonl_rows_holding_unicode_line_separators_stay_whole(tmp_path, sep):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps(ensure_ascii=False) writes them
    so), which str.splitlines splits at: a JSON-lines file splits at "\n" only, CRLF files included, and the
    rows keep their lines and their text as written."""
    from hyperinf_ext.app.data.user_rows import read_user_rows

    rows = [{"text": f"a{sep}b", "label": "pos"}, {"text": "plain", "label": "neg"}, {"text": f"c{sep}d", "label": "pos"}]
    raw = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    for name, content in (("lf.jsonl", raw), ("crlf.jsonl", raw.replace("\n", "\r\n"))):
        path = tmp_path / name
        path.write_bytes(content.encode("utf-8"))
        ds = load_text_file(path)
        assert ds.texts == [r["text"] for r in rows] and ds.rows == [1, 2, 3]
        user = read_user_rows(path)
        assert [json.loads(user.raw[i]) for i in (1, 2, 3)] == rows  # the line as written, for the outputs
        (tmp_path / f"i-{name}").write_bytes(content.replace('"text"', '"prompt"').replace('"label"', '"response"')
                                              .encode("utf-8"))
        assert load_instruction_file(tmp_path / f"i-{name}").rows == [1, 2, 3]


def test_settings_list_only_the_columns_the_run_reads(tmp_path):
    """Reports and summaries show the settings: a causal LM's run reads prompt/response, a classifier's
    text/label, the embedded data neither; the others are not shown (nor part of a checkpoint's identity)."""
    import json as _json
    from pathlib import Path

    from hyperinf_ext.app.tasks.attribute import AttributeConfig
    from hyperinf_ext.app.tasks.index_task import IndexBuildConfig
    from hyperinf_ext.app.tasks.pipeline_config import PipelineConfig
    from hyperinf_ext.app.tasks.user_run import UserConfig

    folder = tmp_path / "causal-model"
    folder.mkdir()
    (folder / "config.json").write_text(_json.dumps({"architectures": ["LlamaForCausalLM"]}))
    instruction, classifier, neither = ["prompt_column", "response_column"], ["text_column", "label_column"], []
    cases = [(PipelineConfig(), neither), (PipelineConfig(model="smollm2"), neither),
             (PipelineConfig(data=Path("x.csv")), classifier), (PipelineConfig(data=Path("x.jsonl"), model="smollm2"),
                                                                 instruction),
             (UserConfig(), classifier), (UserConfig(model="smollm2"), instruction), (UserConfig(model=folder),
                                                                                      instruction),
             (AttributeConfig(), classifier), (AttributeConfig(model="smollm2"), instruction),
             (IndexBuildConfig(model="smollm2"), instruction), (IndexBuildConfig(), classifier)]
    for cfg, shown in cases:
        assert [k for k in cfg.settings() if k.endswith("_column")] == shown, (type(cfg).__name__, cfg.model, cfg.data)


def test_a_classifier_no_better_than_its_majority_class_gets_a_note(tmp_path):
    """unlearned_note: at or below the most common class's share of the evaluation examples (the target, else
    the training file) the run says its scores describe a model that has not learned; above it, or for a
    causal LM (exact-match accuracy of free answers), nothing."""
    from hyperinf_ext.app.tasks.user_run import UserData, unlearned_note

    train = load_text_file(_csv(tmp_path, "text,label\na,x\nb,y\nc,y\nd,y\n"), "text", "label")
    target = load_text_file(_csv(tmp_path, "text,label\na,x\nb,y\n", "t.csv"), "text", "label")
    data = UserData(train, None, target, None, causal=False)
    note = unlearned_note(data, 0.5, epochs=3)
    assert note.startswith("the model is no better on the target examples than always answering their most "
                           "common class (accuracy 0.500, that class alone 0.500)") and "more --epochs" in note
    assert unlearned_note(data, 0.51, epochs=3) is None
    alone = UserData(train, None, None, None, causal=False)  # the training file: 3 of 4 are y
    assert "training examples" in unlearned_note(alone, 0.75, epochs=0) and "(--epochs N)" in unlearned_note(alone, 0.75, 0)
    assert unlearned_note(alone, 0.76, epochs=0) is None
    assert unlearned_note(UserData(train, None, target, None, causal=True), 0.0, epochs=3) is None
