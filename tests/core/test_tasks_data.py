import json

import pytest
import torch

from sparse_ft import data as data_mod
from sparse_ft.errors import UserError
from sparse_ft.tasks import TASKS, get_task


def test_registry_has_the_papers_tasks():
    assert {"cola", "sst", "mrpc", "stsb", "rte", "wnli", "cb", "copa", "wsc"} <= set(TASKS)
    with pytest.raises(UserError, match="unknown task"):
        get_task("imdb")


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
    with pytest.raises(UserError, match=r"train\.jsonl:2: malformed JSON"):
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
    with pytest.raises(UserError, match=r"val\.jsonl' is missing"):
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


def test_wsc_span_masks_cover_the_span_words(tokenizer, data_dir):
    task = get_task("wsc")
    featurizer = data_mod.Featurizer(task, tokenizer, 128)
    for ex in data_mod.read_jsonl(data_dir / "wsc" / "train.jsonl", task)[:30]:
        feats = featurizer(ex)
        for key, text in (("span1_mask", ex["target"]["span1_text"]), ("span2_mask", ex["target"]["span2_text"])):
            ids = [i for i, m in zip(feats["input_ids"], feats[key]) if m]
            assert tokenizer.decode(ids).replace(" ", "") == text.lower().replace(" ", "")


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
