"""Shared fixtures: a tiny random-init BERT built from a config, with the MiniLM tokenizer; the gpu marker's skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sparse_ft import data as data_mod
from sparse_ft.models import TaskModel, backbone_from_config, load_tokenizer
from sparse_ft.tasks import REGRESSION, get_task

SHARED_DATA = Path(os.environ.get("SPARSE_FT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"))


def pytest_collection_modifyitems(config, items):
    """Skip every ``@pytest.mark.gpu`` test where no CUDA device is visible, with the reason in the summary
    (``-rs`` in pyproject's addopts prints it), so a test needs only the marker."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_cuda)


def tiny_config(vocab_size: int = 30522, **overrides):
    from transformers import BertConfig

    settings = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37,
                    "vocab_size": vocab_size, "max_position_embeddings": 512, "attn_implementation": "eager"}
    settings.update(overrides)
    return BertConfig(**settings)


def tiny_task_model(task_name: str = "cb", seed: int = 0, **overrides) -> TaskModel:
    """A 2-layer, 32-wide random-init BERT with the MiniLM vocabulary, plus the task head."""
    torch.manual_seed(seed)
    return TaskModel(backbone_from_config(tiny_config(**overrides)), get_task(task_name), head_seed=seed)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"task data not found at {SHARED_DATA}: set SPARSE_FT_DATA to the folder of <task>/*.jsonl")
    return SHARED_DATA


def task_loader(task_name: str, tokenizer, data_dir: Path, n: int = 8, batch_size: int = 4, max_length: int = 64,
                split: str = "train"):
    """A loader over the first ``n`` examples of a real task split."""
    task = get_task(task_name)
    examples = data_mod.read_jsonl(data_dir / task_name / f"{split}.jsonl", task)[:n]
    features = data_mod.featurize(examples, data_mod.Featurizer(task, tokenizer, max_length), split)
    collator = data_mod.Collator(tokenizer.pad_token_id, regression=task.kind == REGRESSION)
    return data_mod.make_loader(features, collator, batch_size, shuffle=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny random-init BERT with the MiniLM tokenizer: ``--model`` for fast CLI tests."""
    from transformers import BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(tiny_config(vocab_size=len(tokenizer)), add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
