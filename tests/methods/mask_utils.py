"""Helpers shared by the mask-method tests: data, contexts, θ snapshots, a manual AdamW loop."""

from __future__ import annotations

import pytest
import torch

from sparse_ft.methods import BuildContext
from tests.conftest import task_loader, tiny_task_model


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run several times faster on one thread (thread start-up dominates their small
    kernels, worse on a shared CPU); import this fixture into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tokenizer, seed: int = 0):
    return tiny_task_model("cb", seed=seed, vocab_size=len(tokenizer))


def cb_batches(tokenizer, data_dir, n: int = 8, batch_size: int = 4) -> list[dict]:
    return list(task_loader("cb", tokenizer, data_dir, n=n, batch_size=batch_size))


def context(batches, seed: int = 0, max_steps: int | None = None) -> BuildContext:
    return BuildContext(selection_batches=lambda: iter(batches), mask_seed=seed, max_steps=max_steps)


def theta0(model) -> dict[str, torch.Tensor]:
    """Copies of a plain model's backbone tensors (take them before building the method)."""
    return {name: p.detach().clone() for name, p in model.backbone.named_parameters()}


def theta(tuned) -> dict[str, torch.Tensor]:
    """The backbone tensors a tuned model uses now (evaluation mode), by their plain names."""
    return theta0(tuned.merge_into_dense())


def masks(indices: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Dense boolean masks of flat index sets, for every tensor in ``shapes`` (all False if not indexed)."""
    out = {}
    for name, shape in shapes.items():
        mask = torch.zeros(shape.numel(), dtype=torch.bool)
        if name in indices:
            mask[indices[name].cpu()] = True
        out[name] = mask.view(shape)
    return out


def adam_state_entries(optimizer: torch.optim.Optimizer, skip: set[int]) -> int:
    """Entries of AdamW's first-moment state over the parameters not in ``skip`` (ids)."""
    return sum(state["exp_avg"].numel() for p, state in optimizer.state.items() if id(p) not in skip)


ADAMW_IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def train_steps(tuned, batches, steps: int, lr: float = 1e-2, weight_decay: float = 0.1, adamw: str = "for-loop"):
    """The trainer's step in miniature: AdamW (``adamw``: one of torch's three implementations) on the
    method's groups, its regularizer, its projections."""
    def make():
        groups = tuned.param_groups(weight_decay)
        for group in groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return torch.optim.AdamW(groups, lr=lr, **ADAMW_IMPLEMENTATIONS[adamw])

    tuned.train()
    optimizer, changes = make(), []
    for step in range(1, steps + 1):
        batch = batches[(step - 1) % len(batches)]
        penalty = tuned.regularization()
        loss = tuned.loss(batch) + (0 if penalty is None else penalty)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if tuned.on_step_end(step):
            optimizer = make()
            changes.append(step)
    return optimizer, changes
