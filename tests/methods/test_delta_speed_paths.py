"""The sparse delta's fast paths (in-place θ, SDDMM for Linear weights, per-id sums for embeddings)
against its definition θ = θ0 + scatter(I, v) computed out of place (``SparseDelta.fast_paths = False``):
same forward, same gradients, exact θ0 outside the mask, and the theory instruments' functional path."""

import pytest
import torch
from torch import nn

from sparse_ft import delta as delta_mod
from sparse_ft.delta import SparseDelta, _embedding_grad_at
from sparse_ft.errors import UserError
from sparse_ft.methods import make_method_config
from sparse_ft.methods.base import TunedModel
from sparse_ft.methods.masks import SparseDeltaTuned
from tests.conftest import tiny_task_model
from tests.methods.mask_utils import context, single_thread, theta0  # noqa: F401 (autouse fixture)

P = 0.05


def quiet_model(seed: int = 0):
    return tiny_task_model("cb", seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           pad_token_id=0)


def random_tuned(values_seed: int = 1):
    """A random-mask sparse delta on every tensor, values set to random numbers."""
    tuned = make_method_config("random", P).build(quiet_model(), context([]))
    generator = torch.Generator().manual_seed(values_seed)
    with torch.no_grad():
        for delta in tuned._deltas.values():
            delta.values.copy_(torch.randn(delta.values.shape, generator=generator) * 0.1)
    return tuned


def batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 400, (4, 12), generator=generator)  # a small id range: repeated ids
    ids[:, -3:] = 0  # padding (the embedding's padding_idx)
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (4,), generator=generator)}


def loss_and_grads(tuned, data, fast: bool, monkeypatch, **settings):
    monkeypatch.setattr(SparseDelta, "fast_paths", fast)
    for key, value in settings.items():
        monkeypatch.setattr(SparseDelta, key, value)
    tuned.zero_grad(set_to_none=True)
    loss = tuned.train().loss(data)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tuned.named_parameters() if p.grad is not None}


def assert_close_grads(fast, reference):
    assert fast.keys() == reference.keys()
    scale = max(g.abs().max().item() for g in reference.values())
    for name, g in reference.items():
        torch.testing.assert_close(fast[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("linear_grad, chunk", [("kernel", 256), ("sampled", 256), ("sampled", 5), ("dense", 256)])
def test_fast_paths_match_the_definition(linear_grad, chunk, monkeypatch):
    monkeypatch.setattr(delta_mod, "SDDMM_CHUNK", chunk)  # 5: the SDDMM runs over several token chunks
    tuned, data = random_tuned(), batch()
    ref_loss, ref = loss_and_grads(tuned, data, False, monkeypatch)
    loss, fast = loss_and_grads(tuned, data, True, monkeypatch, linear_grad=linear_grad)
    assert torch.equal(loss, ref_loss)  # θ is bit-identical on both paths
    assert_close_grads(fast, ref)
    assert any("word_embeddings" in n for n in fast) and any("dense.parametrizations.weight" in n for n in fast)


@pytest.mark.parametrize("linear_grad", ["kernel", "sampled", "dense"])
def test_fast_paths_keep_float64_precision(linear_grad, monkeypatch):
    """A float64 model's gradients are formed in float64 on every path (the float32 kernel steps aside)."""
    tuned, data = random_tuned().double(), batch()
    _, ref = loss_and_grads(tuned, data, False, monkeypatch)
    _, fast = loss_and_grads(tuned, data, True, monkeypatch, linear_grad=linear_grad)
    scale = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():
        assert fast[name].dtype == torch.float64
        torch.testing.assert_close(fast[name], g, rtol=1e-10, atol=1e-12 * scale, msg=name)


def test_fast_paths_under_bf16_autocast(monkeypatch):
    tuned, data = random_tuned(), batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = loss_and_grads(tuned, data, False, monkeypatch)
        loss, fast = loss_and_grads(tuned, data, True, monkeypatch)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-3)
    scale = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():
        assert fast[name].dtype == g.dtype == torch.float32
        torch.testing.assert_close(fast[name], g, rtol=5e-2, atol=5e-2 * scale, msg=name)


def test_embedding_gradient_at_the_mask_equals_the_dense_one():
    generator = torch.Generator().manual_seed(0)
    vocab, width = 50, 6
    ids = torch.randint(0, vocab, (3, 20), generator=generator)
    gy = torch.randn(3, 20, width, generator=generator)
    indices = torch.randperm(vocab * width, generator=generator)[:120].sort().values
    for padding_idx in (None, int(ids[0, 0])):
        table = torch.zeros(vocab, width, requires_grad=True)
        torch.nn.functional.embedding(ids, table, padding_idx).backward(gy)
        expected = table.grad.reshape(-1)[indices]
        torch.testing.assert_close(_embedding_grad_at(ids, gy, indices, width, padding_idx), expected)


def test_stored_tensor_holds_theta_and_theta0_stays_exact_outside(monkeypatch):
    model = quiet_model()
    before = theta0(model)
    tuned = make_method_config("random", P).build(model, context([]))
    optimizer = torch.optim.AdamW(tuned.param_groups(0.1), lr=0.05)
    for step in range(2):
        tuned.loss(batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    dense = tuned.merge_into_dense()  # right after a step: the copy must see the new values
    for name, delta in tuned._deltas.items():
        expected = before[name].reshape(-1).index_add(0, delta.indices, delta.values.detach())
        assert torch.equal(dict(dense.backbone.named_parameters())[name].reshape(-1), expected), name
        assert torch.equal(tuned.theta0(name), before[name])
        module, attr = name.rpartition(".")[0], name.rpartition(".")[2]
        stored = tuned.model.backbone.get_submodule(module).parametrizations[attr].original
        assert not stored.requires_grad and stored.grad is None
    assert type(dense.backbone.embeddings.word_embeddings) is nn.Embedding  # no fast forward left over
    tuned.set_indices({})  # un-parametrised: every tensor is θ0 again, bit for bit
    assert all(torch.equal(p, before[n]) for n, p in tuned.model.backbone.named_parameters())


def test_values_changed_in_place_reach_the_next_forward():
    tuned, data = random_tuned(), batch()
    tuned.eval()
    with torch.no_grad():
        first = tuned(data)
        for delta in tuned._deltas.values():
            delta.values.mul_(-1.0)
        second = tuned(data)
        reference = tuned.merge_into_dense().eval()(data)
    assert not torch.equal(first, second) and torch.equal(second, reference)


def test_functional_call_uses_the_definition_and_agrees():
    """theory/ swaps tensors in with functional_call: the out-of-place definition serves it, and its
    gradient and Hessian-vector products are those of the module's own (fast) backward."""
    from theory.hessian import HessianOperator

    tuned, data = random_tuned(), batch()
    names = [n for n, p in tuned.named_parameters() if p.requires_grad and not n.startswith("model.head.")]
    tuned.eval()
    tuned.zero_grad(set_to_none=True)
    tuned.loss(data).backward()
    fast = torch.cat([dict(tuned.named_parameters())[n].grad.reshape(-1) for n in names])
    op = HessianOperator(tuned, lambda m, b: m.loss(b), [data], params=names)
    torch.testing.assert_close(op.gradient(), fast, rtol=1e-4, atol=1e-6)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(op.matvec(v)).all()


def test_merge_into_dense_is_declared_by_every_tuned_model():
    assert "merge_into_dense" in TunedModel.__abstractmethods__

    class Incomplete(TunedModel):
        def sparsity_report(self):
            return None

    with pytest.raises(TypeError, match="merge_into_dense"):
        Incomplete(quiet_model(), make_method_config("full"))
    full = make_method_config("full").build(quiet_model(), context([]))
    data = batch()
    with torch.no_grad():
        assert torch.equal(full.merge_into_dense().eval()(data), full.eval()(data))


def test_merged_parameter_order_is_the_pretrained_one():
    model = quiet_model()
    order = [n for n, _ in model.named_parameters()]
    tuned = make_method_config("random", P).build(model, context([]))
    assert isinstance(tuned, SparseDeltaTuned)
    assert [n for n, _ in tuned.merge_into_dense().named_parameters()] == order


def test_indices_are_kept_sorted_with_their_values_and_must_be_distinct():
    theta0_ = torch.arange(12.0).view(3, 4)
    indices, values = torch.tensor([7, 2, 10]), torch.tensor([0.5, -1.0, 2.0])
    delta = SparseDelta(theta0_, indices, values)
    assert delta.indices.tolist() == [2, 7, 10] and delta.values.tolist() == [-1.0, 0.5, 2.0]
    stored = theta0_.clone()
    expected = theta0_.reshape(-1).index_add(0, indices, values).view(3, 4)
    assert torch.equal(delta(stored), expected) and torch.equal(stored, expected)  # stored holds θ
    delta.restore(stored)
    assert torch.equal(stored, theta0_)
    with pytest.raises(UserError, match="distinct"):
        SparseDelta(theta0_, torch.tensor([1, 1]))


@pytest.mark.parametrize("shape", [(64, 32), (48, 600), (50, 32)])  # parallel path, too wide, ragged tokens
def test_transpose_for_the_sddmm_equals_the_plain_one(shape):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the parallel path only runs on several threads
    try:
        a = torch.randn(shape)
        assert torch.equal(delta_mod._transposed(a), a.t().contiguous())
    finally:
        torch.set_num_threads(threads)
