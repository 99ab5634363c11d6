import json
import warnings

import pytest
import torch

from sparse_ft import data as data_mod
from sparse_ft.errors import UserError
from sparse_ft.tasks import TASKS, get_task


def test_registry_has_the_papers_tasks():
    assert {"cola", "sst", "mrpc", "stsb", "rte", "wnli", "cb", "copa", "wsc"} <= set(TASKS)
    with pytest.raises(UserError, match="unknown task"):
        get_task("imdb")


@pytest.mark.filterwarnings("ignore::sparse_ft.data.DataWarning")  # wsc/test.jsonl:43, tested below
@pytest.mark.parametrize("task_name", ["cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc"])
def test_every_shared_task_loads(task_name, data_dir):
    splits = data_mod.load_splits(get_task(task_name), data_dir)
    assert all(len(splits[s]) > 0 for s in data_mod.SPLITS)


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_malformed_line_names_file_and_line(tmp_path):
    good = json.dumps({"text": "a", "label": "1"})
    _write(tmp_path / "cola" / "train.jsonl", [good, "{not json"])
    with pytest.raises(UserError, match=r"train\.jsonl:2: malformed JSON \(Expecting property name .* column 2\)"):
        data_mod.read_jsonl(tmp_path / "cola" / "train.jsonl", get_task("cola"))


def test_unknown_label_and_missing_field(tmp_path):
    path = tmp_path / "rte" / "train.jsonl"
    _write(path, [json.dumps({"premise": "a", "hypothesis": "b", "label": "maybe"})])
    with pytest.raises(UserError, match=r"train\.jsonl:1: unknown label 'maybe'"):
        data_mod.read_jsonl(path, get_task("rte"))
    _write(path, [json.dumps({"premise": "a", "label": "entailment"})])
    with pytest.raises(UserError, match=r"missing field\(s\) \['hypothesis'\]"):
        data_mod.read_jsonl(path, get_task("rte"))


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data_mod.load_splits(get_task("cb"), tmp_path / "nowhere")
    _write(tmp_path / "cb" / "train.jsonl", [json.dumps({"premise": "a", "hypothesis": "b", "label": "neutral"})])
    with pytest.raises(UserError, match=r"missing task data: .*cb/\{val,test\}\.jsonl; point --data-dir .* `sparse-ft fetch-data cb"):
        data_mod.load_splits(get_task("cb"), tmp_path)


def test_hub_field_mapping_and_split_protocol():
    datasets = pytest.importorskip("datasets")
    rte_rows = {"sentence1": [f"p{i}" for i in range(20)], "sentence2": [f"h{i}" for i in range(20)],
                "label": [i % 2 for i in range(20)], "idx": list(range(20))}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rte_rows),
                               "validation": datasets.Dataset.from_dict({k: v[:4] for k, v in rte_rows.items()})})
    splits = data_mod.split_hub_dataset(get_task("rte"), dd, seed=3)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (18, 2, 4)
    ex = splits["test"][1]
    assert ex["premise"] == "p1" and ex["hypothesis"] == "h1" and ex["label"] == "not_entailment"
    again = data_mod.split_hub_dataset(get_task("rte"), dd, seed=3)
    assert [e["idx"] for e in again["val"]] == [e["idx"] for e in splits["val"]]

    wsc = datasets.Dataset.from_dict({"text": ["Mark told Pete he was late ."], "span1_index": [0],
                                      "span2_index": [3], "span1_text": ["Mark"], "span2_text": ["he"],
                                      "label": [1], "idx": [0]})
    (example,) = data_mod.examples_from_hub(get_task("wsc"), wsc)
    assert example["target"] == {"span1_index": 0, "span2_index": 3, "span1_text": "Mark", "span2_text": "he"}
    assert example["label"] is True
    cb = datasets.Dataset.from_dict({"premise": ["a"], "hypothesis": ["b"], "label": [2], "idx": [0]})
    assert data_mod.examples_from_hub(get_task("cb"), cb)[0]["label"] == "neutral"


def test_copa_pairs_each_choice_with_a_connective(tokenizer):
    task = get_task("copa")
    ex = {"premise": "The man fell.", "question": "cause", "choice1": "He slipped.", "choice2": "He sang.",
          "label": 0}
    feats = data_mod.Featurizer(task, tokenizer, 64)(ex)
    assert len(feats["input_ids"]) == 2
    assert "because he slipped" in tokenizer.decode(feats["input_ids"][0])
    batch = data_mod.Collator(tokenizer.pad_token_id)([feats, feats])
    assert batch["input_ids"].shape[:2] == (2, 2)


def _pooled_text(tokenizer, feats, key):
    return tokenizer.decode([i for i, m in zip(feats["input_ids"], feats[key]) if m]).replace(" ", "")


@pytest.mark.parametrize("split", data_mod.SPLITS)
def test_wsc_span_masks_cover_exactly_the_span_words(split, tokenizer, data_dir):
    """Every example of every split pools exactly its span texts (no neighbouring punctuation, no
    possessive 's, the right word when an index misses its text)."""
    task = get_task("wsc")
    featurizer = data_mod.Featurizer(task, tokenizer, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data_mod.DataWarning)
        examples = data_mod.read_jsonl(data_dir / "wsc" / f"{split}.jsonl", task)
    for ex in examples:
        feats = featurizer(ex)
        for key in ("span1", "span2"):
            text = ex["target"][f"{key}_text"]
            assert _pooled_text(tokenizer, feats, f"{key}_mask") == "".join(text.lower().split()), (ex, key)


def test_wsc_index_that_misses_its_text_is_repaired_with_a_warning_naming_file_and_line(tokenizer, data_dir):
    """test.jsonl:43 has span2_index 30 ('use') for span2_text 'it' (word 31): before the check the
    featurizer pooled 'use'."""
    task = get_task("wsc")
    path = data_dir / "wsc" / "test.jsonl"
    raw = json.loads(path.read_text().splitlines()[42])
    assert raw["target"]["span2_index"] == 30 and raw["text"].split()[30:32] == ["use", "it"]
    with pytest.warns(data_mod.DataWarning, match=r"wsc/test\.jsonl:43: span2_index 30 points at 'use', not 'it'") as record:
        examples = data_mod.read_jsonl(path, task)
    assert len(record) == 1  # the only example whose index misses its text
    assert examples[42]["target"]["span2_index"] == 31 and examples[42]["target"]["span1_index"] == 22
    with pytest.warns(data_mod.DataWarning, match="example 43"):  # the raw example, straight to the featurizer
        feats = data_mod.Featurizer(task, tokenizer, 256)(raw, "wsc/test example 43")
    assert _pooled_text(tokenizer, feats, "span2_mask") == "it"


def _wsc_line(text, span2_index, span2_text="he", **extra):
    target = {"span1_index": 0, "span1_text": "Mark", "span2_index": span2_index, "span2_text": span2_text}
    return json.dumps({"text": text, "target": target, "label": True, **extra})


def test_wsc_synthetic_nearest_occurrence_and_no_occurrence(tmp_path, tokenizer):
    task = get_task("wsc")
    text = "Mark told Pete he was late because he overslept ."
    path = tmp_path / "wsc" / "train.jsonl"
    _write(path, [_wsc_line(text, 3), _wsc_line(text, 6), _wsc_line(text, 1), _wsc_line(text, 99)])
    with pytest.warns(data_mod.DataWarning) as record:
        examples = data_mod.read_jsonl(path, task)
    assert [e["target"]["span2_index"] for e in examples] == [3, 7, 3, 7]  # nearest; ties: the earlier
    assert [str(w.message).split(": ")[0] for w in record] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert "points at nothing (out of range)" in str(record[2].message)
    _write(path, [_wsc_line(text, 3), _wsc_line(text, 3, span2_text="she")])
    with pytest.raises(UserError, match=rf"{path}:2: span2_text 'she' occurs nowhere in the text"):
        data_mod.read_jsonl(path, task)
    feats = data_mod.Featurizer(task, tokenizer, 64)(json.loads(_wsc_line('Mark said "he did."', 2)))
    assert _pooled_text(tokenizer, feats, "span2_mask") == "he"  # not the quote around it


def test_collator_pads_to_longest_in_batch_and_to_multiple(tokenizer):
    task = get_task("cola")
    f = data_mod.Featurizer(task, tokenizer, 64)
    feats = [f({"text": "short", "label": "1"}), f({"text": "a somewhat longer sentence here", "label": "0"})]
    batch = data_mod.Collator(tokenizer.pad_token_id)(feats)
    assert batch["input_ids"].shape == (2, len(feats[1]["input_ids"]))
    assert batch["attention_mask"][0].sum() == len(feats[0]["input_ids"])
    assert batch["labels"].tolist() == [1, 0]
    padded = data_mod.Collator(tokenizer.pad_token_id, pad_multiple=16)(feats)
    assert padded["input_ids"].shape[1] == 16
    reg = data_mod.Collator(tokenizer.pad_token_id, regression=True)(feats)
    assert reg["labels"].dtype == torch.float32


def test_seeded_order_with_one_example_left_out_keeps_the_others_order():
    full = data_mod.SeededOrder(20, seed=7)
    loo = data_mod.SeededOrder(20, seed=7, exclude=frozenset({5}))
    for _ in range(3):  # every epoch
        a, b = list(full), list(loo)
        assert b == [i for i in a if i != 5] and len(loo) == 19
    assert list(data_mod.SeededOrder(20, seed=8)) != list(data_mod.SeededOrder(20, seed=7))


# ----------------------------------------------------------------------------- data up front: require_task_data
def test_require_task_data_finds_the_local_folder(data_dir):
    assert data_mod.require_task_data(["cb", "rte", "wsc"], data_dir) == data_dir


def test_require_task_data_lists_every_missing_file_and_what_to_run(tmp_path, monkeypatch):
    monkeypatch.delenv(data_mod.DATA_ENV, raising=False)
    with pytest.raises(UserError) as info:
        data_mod.require_task_data(["cb", "rte"], tmp_path / "nowhere")
    message = str(info.value)
    assert message == (f"data folder '{tmp_path / 'nowhere'}' does not exist; point --data-dir or $SPARSE_FT_DATA "
                       f"at a folder that has <task>/{{train,val,test}}.jsonl, or, where the Hugging Face hub is "
                       f"reachable, run `sparse-ft fetch-data cb rte --output {tmp_path / 'nowhere'}` and then pass "
                       f"--data-dir {tmp_path / 'nowhere'}")
    _write(tmp_path / "cb" / "train.jsonl", [json.dumps({"premise": "a", "hypothesis": "b", "label": "neutral"})])
    monkeypatch.setenv(data_mod.DATA_ENV, str(tmp_path))  # $SPARSE_FT_DATA when no --data-dir
    with pytest.raises(UserError) as info:
        data_mod.require_task_data(["cb", "rte"])
    message = str(info.value)
    assert message.startswith(f"missing task data: {tmp_path}/cb/{{val,test}}.jsonl, "
                              f"{tmp_path}/rte/{{train,val,test}}.jsonl; point --data-dir or $SPARSE_FT_DATA")
    assert "\n" not in message and f"`sparse-ft fetch-data cb rte --output {tmp_path}`" in message


def _no_hub_call(*args, **kwargs):
    raise AssertionError("the hub must not be contacted")


def test_without_data_and_hub_one_line_in_seconds_before_any_loading(monkeypatch):
    """Before the check: minutes of hub retries, then ``ValueError: not enough values to unpack``."""
    import time

    monkeypatch.delenv(data_mod.DATA_ENV, raising=False)
    for name in data_mod.OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(data_mod, "load_hub_dataset", _no_hub_call)
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        data_mod.load_splits(get_task("cb"))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert message.startswith("no data for cb: no --data-dir or $SPARSE_FT_DATA given, and the Hugging Face hub "
                              "(http://127.0.0.1:9) is unreachable")
    assert "run `sparse-ft fetch-data cb --output DIR`" in message and "pass --data-dir DIR" in message
    assert "\n" not in message


def test_offline_mode_never_touches_the_network(monkeypatch):
    monkeypatch.delenv(data_mod.DATA_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data_mod, "_hub_probe", _no_hub_call)
    cached = {"glue/rte"}
    monkeypatch.setattr(data_mod, "_hub_cached", lambda hub: str(hub) in cached)
    assert data_mod.require_task_data(["rte"]) == "hub"
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and super_glue/cb is not in the local cache"):
        data_mod.require_task_data(["rte", "cb"])


def test_reachable_hub_is_probed_once_per_dataset(monkeypatch):
    monkeypatch.delenv(data_mod.DATA_ENV, raising=False)
    for name in data_mod.OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    probed = []
    monkeypatch.setattr(data_mod, "_hub_probe", lambda hub, timeout: probed.append(hub.path))
    assert data_mod.require_task_data(["cola", "rte", "cb", "copa"]) == "hub"
    assert probed == ["glue", "super_glue"]


# ----------------------------------------------------------------------------- fetch_data: the hub in the local layout
HUB_COLUMNS = {  # each dataset's columns as the hub holds them
    "cola": ("sentence",), "sst": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
    "cb": ("premise", "hypothesis"), "copa": ("premise", "choice1", "choice2", "question"),
    "wsc": ("text", "span1_index", "span2_index", "span1_text", "span2_text"),
}


def _hub_fixture(task_name: str, n: int):
    """A DatasetDict with the hub's columns and label encoding (ClassLabel ints, STS-B floats)."""
    datasets = pytest.importorskip("datasets")
    task = get_task(task_name)
    values = {"sentence": "s", "sentence1": "a", "sentence2": "b", "premise": "p", "hypothesis": "h",
              "choice1": "c1", "choice2": "c2", "question": "cause", "text": "Mark told Pete he was late .",
              "span1_index": 0, "span2_index": 3, "span1_text": "Mark", "span2_text": "he"}

    def rows(count, offset):
        columns = {c: [values[c] if not isinstance(values[c], str) or c.endswith("_text") or c in ("question", "text")
                       else f"{values[c]}{offset + i}" for i in range(count)] for c in HUB_COLUMNS[task_name]}
        labels = [(offset + i) * 0.25 for i in range(count)] if task.labels is None else \
            [(offset + i) % task.num_labels for i in range(count)]
        return datasets.Dataset.from_dict({**columns, "label": labels, "idx": list(range(count))})

    return datasets.DatasetDict({"train": rows(n, 0), "validation": rows(4, 1000), "test": rows(3, 2000)})


@pytest.fixture
def fake_hub(monkeypatch):
    """The hub replaced by fixtures: every task's data from ``_hub_fixture``, the probe always answers."""
    by_hub = {str(t.hub): name for name, t in TASKS.items()}
    loaded = []

    def load(hub):
        loaded.append(str(hub))
        return _hub_fixture(by_hub[str(hub)], 20)

    monkeypatch.setattr(data_mod, "load_hub_dataset", load)
    monkeypatch.setattr(data_mod, "hub_unavailable", lambda sources, timeout=None: None)
    return loaded


def test_fetch_data_writes_the_local_layout_with_the_papers_protocol(tmp_path, fake_hub, data_dir):
    written = data_mod.fetch_data(None, tmp_path, seed=3)  # None: every registry task
    assert set(written) == set(TASKS) and fake_hub == [str(t.hub) for t in TASKS.values()]
    for name, task in TASKS.items():
        assert written[name] == tmp_path / name
        expected = data_mod.split_hub_dataset(task, _hub_fixture(name, 20), seed=3)
        loaded = data_mod.load_splits(task, tmp_path)  # what a run reads back
        assert [len(loaded[s]) for s in data_mod.SPLITS] == [18, 2, 4]
        assert loaded == expected
        local = data_dir / name / "train.jsonl"
        if local.is_file():  # the same field names and label types as the jiant files
            ours, theirs = loaded["train"][0], json.loads(local.read_text().splitlines()[0])
            assert set(ours) == set(theirs), name
            assert type(ours["label"]) is type(theirs["label"]), name
            if name == "wsc":
                assert set(ours["target"]) == set(theirs["target"])
    other = data_mod.fetch_data(["cb"], tmp_path / "other", seed=4)["cb"]
    assert data_mod.load_splits(get_task("cb"), tmp_path / "other")["val"] != \
        data_mod.load_splits(get_task("cb"), tmp_path)["val"]  # the seed chooses the 90/10 split
    assert other == tmp_path / "other" / "cb"


def test_fetch_data_refuses_before_writing_anything(tmp_path, fake_hub, monkeypatch):
    data_mod.fetch_data(["cb"], tmp_path)
    with pytest.raises(UserError, match=r"cb/train\.jsonl already exists \(and 2 more\); pass --overwrite"):
        data_mod.fetch_data(["rte", "cb"], tmp_path)
    assert not (tmp_path / "rte").exists()
    data_mod.fetch_data(["cb"], tmp_path, overwrite=True)
    with pytest.raises(UserError, match="unknown task 'imdb'"):
        data_mod.fetch_data(["imdb"], tmp_path)
    monkeypatch.setattr(data_mod, "hub_unavailable", lambda sources, timeout=None: "the hub is unreachable (test)")
    with pytest.raises(UserError, match=r"^cannot fetch rte: the hub is unreachable \(test\)$"):
        data_mod.fetch_data(["rte"], tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_fetch_data_command(tmp_path, fake_hub, capsys):
    from sparse_ft.cli import main

    assert main(["fetch-data", "cb", "wsc", "--output", str(tmp_path), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert f"cb: 18 train, 2 val, 4 test -> {tmp_path / 'cb'}" in out
    assert (tmp_path / "wsc" / "test.jsonl").is_file()
    assert main(["fetch-data", "cb", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-ft: error: ") and "already exists" in err and err.count("\n") == 1
    assert main(["fetch-data", "nope", "--output", str(tmp_path)]) == 2


def test_task_listing_says_where_each_tasks_data_comes_from(data_dir, capsys, monkeypatch):
    from sparse_ft.cli import main

    assert main(["tasks", "--data-dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]  # after the header line: two lines per task
    source = {lines[i].split()[0]: lines[i + 1].strip() for i in range(0, len(lines), 2)}
    assert set(source) == set(TASKS)
    assert source["cb"] == f"data: local {data_dir / 'cb'}"
    for hub_only in ("sst", "wnli"):  # on the hub, not in the shared folder
        assert source[hub_only].startswith(f"data: not in {data_dir}, hub glue/")
        assert f"sparse-ft fetch-data {hub_only} --output {data_dir}" in source[hub_only]
    monkeypatch.delenv(data_mod.DATA_ENV, raising=False)
    assert main(["tasks"]) == 0
    assert "data: hub super_glue/wsc.fixed (no local folder: --data-dir or $SPARSE_FT_DATA)" in capsys.readouterr().out
