"""Task files: a TOML file wherever a task name goes (DESIGN §7), with its own .csv/.jsonl files or a hub
dataset; every bad key is one UserError line naming the file and the key."""

import json
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
import torch

from sparse_ft import data as data_mod
from sparse_ft.errors import UserError
from sparse_ft.metrics import compute_metrics
from sparse_ft.models import TaskModel, backbone_from_config
from sparse_ft.tasks import CLASSIFICATION, MULTIPLE_CHOICE, REGRESSION, SPAN, get_task
from tests.conftest import tiny_config

REVIEWS = """name = "reviews"
kind = "classification"
inputs = ["title", "body"]
label = "stars"
labels = ["bad", "ok", "good"]
metric = "acc_and_macro_f1"

[files]
train = "data/train.csv"
val = "data/val.csv"
test = "data/test.jsonl"
"""


def _csv(path, header, rows):
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _reviews(tmp_path, toml=REVIEWS):
    rows = [["Great", "Loved it, truly.", "good"], ["Meh", 'It was "fine"\non the whole', "ok"],
            ["Awful", "Never again", "bad"], ["Fine", "Does the job", "OK"]]
    _csv(tmp_path / "data" / "train.csv", ["title", "body", "stars"], rows)
    _csv(tmp_path / "data" / "val.csv", ["title", "body", "stars"], rows[:2])
    (tmp_path / "data" / "test.jsonl").write_text(
        "\n".join(json.dumps({"title": t, "body": b, "stars": s}) for t, b, s in rows[:3]) + "\n")
    path = tmp_path / "task.toml"
    path.write_text(toml)
    return path


def test_csv_task_file_round_trip(tmp_path, tokenizer):
    path = _reviews(tmp_path)
    task = get_task(str(path))
    assert (task.name, task.kind, task.labels, task.num_labels) == ("reviews", CLASSIFICATION, ("bad", "ok", "good"), 3)
    assert task.files == {"train": tmp_path / "data" / "train.csv", "val": tmp_path / "data" / "val.csv",
                          "test": tmp_path / "data" / "test.jsonl"}
    assert task.ref == str(path) and get_task(task.ref) == task and get_task(path) == task
    assert data_mod.require_task_data([str(path)]) is None  # its own files: no folder, no hub

    splits = data_mod.load_splits(str(path), data_dir=tmp_path / "ignored-for-task-files")
    assert [len(splits[s]) for s in data_mod.SPLITS] == [4, 2, 3]
    assert splits["train"][1]["body"] == 'It was "fine"\non the whole'  # quoted field over two lines

    featurizer = data_mod.Featurizer(task, tokenizer, 64)
    features = data_mod.featurize(splits["train"], featurizer, "train")
    assert [f["labels"] for f in features] == [2, 1, 0, 1]  # "OK" is the label "ok"
    assert tokenizer.decode(features[0]["input_ids"]).startswith("[CLS] great [SEP] loved it")
    batch = data_mod.Collator(tokenizer.pad_token_id)(features)
    torch.manual_seed(0)
    model = TaskModel(backbone_from_config(tiny_config(vocab_size=len(tokenizer))), task)
    assert model(batch).shape == (4, 3)
    assert compute_metrics(task, [2, 1, 0, 1], batch["labels"].numpy())["major"] == 100.0


def _spawned_get_task(ref):
    from sparse_ft.tasks import get_task as resolve

    return resolve(ref)


def test_task_file_resolves_again_by_path_in_a_worker_process(tmp_path):
    task = get_task(str(_reviews(tmp_path)))
    assert pickle.loads(pickle.dumps(task)) == task
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        assert pool.submit(_spawned_get_task, task.ref).result(timeout=120) == task


def test_regression_multiple_choice_and_span_task_files(tmp_path, tokenizer):
    _csv(tmp_path / "sim.csv", ["a", "b", "score"], [["x y", "x z", "3.5"], ["p", "q", "0"]])
    (tmp_path / "sim.toml").write_text('name = "sim"\nkind = "regression"\ninputs = ["a", "b"]\nlabel = "score"\n'
                                       'metric = "pearson_and_spearman"\n[files]\ntrain = "sim.csv"\nval = "sim.csv"\n'
                                       'test = "sim.csv"\n')
    sim = get_task(str(tmp_path / "sim.toml"))
    assert sim.kind == REGRESSION and sim.labels is None
    feats = data_mod.featurize(data_mod.load_splits(sim)["train"], data_mod.Featurizer(sim, tokenizer, 32))
    assert [f["labels"] for f in feats] == [3.5, 0.0]

    _csv(tmp_path / "mc.csv", ["goal", "sol1", "sol2", "label"], [["Open a jar", "Twist the lid", "Eat it", "0"]])
    (tmp_path / "mc.toml").write_text('name = "piqa-mini"\nkind = "multiple_choice"\ninputs = "goal"\n'
                                      'choices = ["sol1", "sol2"]\nmetric = "accuracy"\n'
                                      '[files]\ntrain = "mc.csv"\nval = "mc.csv"\ntest = "mc.csv"\n')
    mc = get_task(str(tmp_path / "mc.toml"))
    assert mc.kind == MULTIPLE_CHOICE and mc.num_labels == 2
    (feat,) = data_mod.featurize(data_mod.load_splits(mc)["train"], data_mod.Featurizer(mc, tokenizer, 32))
    assert feat["labels"] == 0 and len(feat["input_ids"]) == 2
    assert tokenizer.decode(feat["input_ids"][0]) == "[CLS] open a jar [SEP] twist the lid [SEP]"

    rows = [["Mark told Pete he was late .", "0", "Mark", "3", "he", "True"],
            ["Mark told Pete he was late .", "2", "Pete", "1", "he", "false"]]
    _csv(tmp_path / "coref.csv", ["sentence", "span1_index", "span1_text", "span2_index", "span2_text", "label"], rows)
    (tmp_path / "coref.toml").write_text('name = "coref"\nkind = "span"\ninputs = ["sentence"]\nmetric = "accuracy"\n'
                                         '[files]\ntrain = "coref.csv"\nval = "coref.csv"\ntest = "coref.csv"\n')
    coref = get_task(str(tmp_path / "coref.toml"))
    with pytest.warns(data_mod.DataWarning, match=r"coref\.csv:3: span2_index 1 points at 'told', not 'he'"):
        examples = data_mod.load_splits(coref)["train"]
    assert examples[1]["target"] == {"span1_index": 2, "span2_index": 3, "span1_text": "Pete", "span2_text": "he"}
    feats = data_mod.featurize(examples, data_mod.Featurizer(coref, tokenizer, 32))
    assert [f["labels"] for f in feats] == [1, 0] and sum(feats[0]["span2_mask"]) == 1


def test_hub_task_file_uses_the_named_splits(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = {"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}
    fake = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                 "test": datasets.Dataset.from_dict({k: v[:5] for k, v in rows.items()})})
    asked = []
    monkeypatch.setattr(data_mod, "load_hub_dataset", lambda hub: asked.append(str(hub)) or fake)
    monkeypatch.setattr(data_mod, "hub_unavailable", lambda sources, timeout=None: None)
    (tmp_path / "t.toml").write_text('name = "imdb-mini"\nkind = "classification"\ninputs = "text"\n'
                                     'labels = ["neg", "pos"]\nmetric = "acc_and_f1"\n'
                                     '[hub]\nname = "imdb"\nconfig = "plain_text"\ntest = "test"\n')
    task = get_task(tmp_path / "t.toml")
    assert data_mod.require_task_data([task], data_dir=tmp_path) == "hub"  # a task file's hub ignores the folder
    splits = data_mod.load_splits(task, data_dir=tmp_path)
    assert asked == ["imdb/plain_text"]
    assert [len(splits[s]) for s in data_mod.SPLITS] == [18, 2, 5]
    assert splits["test"][1] == {"text": "t1", "label": "pos"}


def _bad(tmp_path, text):
    (tmp_path / "d.csv").write_text("text,label\na,x\n")
    path = tmp_path / "task.toml"
    path.write_text(text)
    return path


GOOD = {"name": '"mine"', "kind": '"classification"', "inputs": '["text"]', "labels": '["x", "y"]',
        "metric": '"accuracy"'}
FILES = '[files]\ntrain = "d.csv"\nval = "d.csv"\ntest = "d.csv"\n'


def _toml(tail=FILES, **keys):
    settings = {**GOOD, **keys}
    return "".join(f"{k} = {v}\n" for k, v in settings.items() if v is not None) + tail


@pytest.mark.parametrize("key,text,why", [
    ("colour", _toml(colour='"red"'), "is not a task file key"),
    ("name", _toml(name=None), "is missing"),
    ("name", _toml(name='"my task/1"'), "must be letters"),
    ("kind", _toml(kind='"ranking"'), "must be one of classification, regression"),
    ("inputs", _toml(inputs="[]"), "must list 1 to 2 distinct field name"),
    ("inputs", _toml(inputs='["a", "b", "c"]'), "must list 1 to 2"),
    ("inputs", _toml(inputs=None), "is missing"),
    ("inputs", _toml(kind='"span"', inputs='["a", "b"]', labels=None), "must list 1 distinct"),
    ("label", _toml(label='"text"'), "names the input field"),
    ("label", _toml(label="3"), "must be a non-empty string"),
    ("labels", _toml(labels=None), "is missing"),
    ("labels", _toml(labels='["x"]'), "at least two distinct"),
    ("labels", _toml(labels='["x", "X"]'), "at least two distinct"),
    ("labels", _toml(kind='"regression"', metric='"pearson_and_spearman"'), "must be omitted"),
    ("metric", _toml(metric='"bleu"'), "must be one of accuracy, mcc"),
    ("metric", _toml(kind='"regression"', labels=None), "must be one of pearson_and_spearman"),
    ("metric", _toml(labels='["x", "y", "z"]', metric='"acc_and_f1"'), "needs exactly two labels"),
    ("choices", _toml(choices='["a", "b"]'), "is for multiple_choice tasks only"),
    ("choices", _toml(kind='"multiple_choice"', labels=None), "is missing"),
    ("files", _toml(tail=""), "or 'hub' is needed"),
    ("files", _toml(tail='hub = {name = "imdb"}\n' + FILES), "exclude each other"),
    ("files", _toml(tail='files = "d.csv"\n'), "must be a table"),
    ("files.val", _toml(tail='[files]\ntrain = "d.csv"\ntest = "d.csv"\n'), "is missing"),
    ("files.dev", _toml(tail=FILES + 'dev = "d.csv"\n'), "is not a split"),
    ("files.test", _toml(tail='[files]\ntrain = "d.csv"\nval = "d.csv"\ntest = "d.tsv"\n'), "must be a .jsonl or .csv"),
    ("files.train", _toml(tail='[files]\ntrain = "gone.csv"\nval = "d.csv"\ntest = "d.csv"\n'), "does not exist"),
    ("hub.name", _toml(tail='[hub]\nconfig = "x"\n'), "is missing"),
    ("hub.revision", _toml(tail='[hub]\nname = "imdb"\nrevision = "main"\n'), "is not a hub key"),
])
def test_each_bad_key_is_one_line_naming_file_and_key(tmp_path, key, text, why):
    path = _bad(tmp_path, text)
    with pytest.raises(UserError) as info:
        get_task(str(path))
    message = str(info.value)
    assert message.startswith(f"task file {str(path)!r}: key {key!r} ") and why in message, message
    assert "\n" not in message


def test_good_baseline_of_the_bad_key_table_loads(tmp_path):
    assert get_task(str(_bad(tmp_path, _toml()))).name == "mine"


def test_unreadable_task_files(tmp_path):
    with pytest.raises(UserError, match=r"task file '.*nowhere\.toml' does not exist"):
        get_task(str(tmp_path / "nowhere.toml"))
    with pytest.raises(UserError, match="not valid TOML"):
        get_task(str(_bad(tmp_path, "name = ")))
    with pytest.raises(UserError, match=r"unknown task 'imdb'.*or a task file"):
        get_task("imdb")


@pytest.mark.parametrize("content,message", [
    ("text,label\na,x\nb,y,extra\n", r"d\.csv:3: 3 field\(s\), the header has 2"),
    ("text,label\na,x\n\"two\nlines\",x\nc,maybe\n", r"d\.csv:5: unknown label 'maybe'"),
    ("words,label\na,x\n", r"d\.csv:2: missing field\(s\) \['text'\]"),
    ("text,label\n", r"d\.csv' holds no examples"),
    ("", r"d\.csv:1: no header row"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, content, message):
    path = _bad(tmp_path, _toml())
    task = get_task(str(path))
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(UserError, match=message):
        data_mod.read_csv(tmp_path / "d.csv", task)


def test_span_kind_defaults_and_registry_kinds():
    assert get_task("wsc").kind == SPAN and get_task("wsc").ref == "wsc"
