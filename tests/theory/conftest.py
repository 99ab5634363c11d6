"""Fixtures shared by the theory tests (tiny float64 models and batches)."""

import pytest
import torch
from torch import nn

from tests.theory.helpers import make_bert


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.fixture
def mlp_batches():
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "x": torch.randn(n, 5, generator=gen, dtype=torch.float64),
            "y": torch.randint(0, 3, (n,), generator=gen),
        }
        for n in (4, 6, 3)
    ]


@pytest.fixture(scope="module")
def bert():
    return make_bert()


@pytest.fixture
def bert_batches():
    gen = torch.Generator().manual_seed(2)
    batches = []
    for n, length in ((3, 7), (2, 5)):
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, -2:] = 0
        batches.append(
            {
                "input_ids": torch.randint(1, 100, (n, length), generator=gen),
                "attention_mask": mask,
                "labels": torch.randint(0, 2, (n,), generator=gen),
            }
        )
    return batches
