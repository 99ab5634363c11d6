"""Fixtures shared by the method tests."""

import pytest

from tests.conftest import task_loader, tiny_task_model


@pytest.fixture
def setup(tokenizer, data_dir):
    """A tiny CB model and train/val loaders of 8 real CB examples each."""
    model = tiny_task_model("cb", vocab_size=len(tokenizer))
    loaders = {split: task_loader("cb", tokenizer, data_dir, n=8, batch_size=4, split=split)
               for split in ("train", "val")}
    return model, loaders
