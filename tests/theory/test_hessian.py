"""HessianOperator against torch.autograd.functional.hessian in float64 (MLP and a 2-layer BERT)."""

import numpy as np
import pytest
import torch

from tests.theory.helpers import bert_loss, make_bert, masked_positions, mlp_loss, reference_hessian
from theory.hessian import HessianOperator, hutchinson_diagonal

BACKENDS = ["double_backward", "forward_over_reverse", "auto"]


def random_masks(model, names, fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    masks = {}
    for name in names:
        mask = torch.rand(params[name].shape, generator=gen) < fraction
        mask.view(-1)[0] = True
        masks[name] = mask
    return masks


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_all_parameters_match_autograd(mlp, mlp_batches, backend):
    names = [n for n, _ in mlp.named_parameters()]
    ref = reference_hessian(mlp, mlp_loss, mlp_batches, names)
    op = HessianOperator(mlp, mlp_loss, mlp_batches, hvp_backend=backend)
    assert op.dim == ref.shape[0] == 66
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), ref @ v, rtol=1e-10, atol=1e-12)
    assert op.backend in ("double_backward", "forward_over_reverse")


def test_mlp_named_subset_is_a_block_in_the_given_order(mlp, mlp_batches):
    names = ["2.bias", "0.weight"]
    ref = reference_hessian(mlp, mlp_loss, mlp_batches, names)
    op = HessianOperator(mlp, mlp_loss, mlp_batches, names)
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_mlp_masked_operator_is_the_submatrix_of_the_full_hessian(mlp, mlp_batches, backend):
    masks = random_masks(mlp, ["2.weight", "0.bias", "0.weight"], 0.3, seed=3)
    full = reference_hessian(mlp, mlp_loss, mlp_batches, list(masks))
    pos = masked_positions(mlp, masks)
    op = HessianOperator(mlp, mlp_loss, mlp_batches, masks, hvp_backend=backend)
    assert op.dim == int(sum(m.sum() for m in masks.values()))
    torch.testing.assert_close(op.to_dense(), full[pos][:, pos], rtol=1e-10, atol=1e-12)
    # None in the dict = the whole tensor, same as an all-True mask
    whole = dict(masks, **{"0.bias": None})
    ones = dict(masks, **{"0.bias": torch.ones(7, dtype=torch.bool)})
    v = torch.randn(int(sum(m.sum() for m in ones.values())), dtype=torch.float64)
    torch.testing.assert_close(
        HessianOperator(mlp, mlp_loss, mlp_batches, whole, hvp_backend=backend).matvec(v),
        HessianOperator(mlp, mlp_loss, mlp_batches, ones, hvp_backend=backend).matvec(v),
    )
    # gather order: dict order, row-major inside each tensor
    expected = torch.cat(
        [p.detach()[masks[n]] for n, p in ((n, dict(mlp.named_parameters())[n]) for n in masks)]
    )
    torch.testing.assert_close(op.space.gather(), expected)


def test_batches_are_weighted_by_size(mlp, mlp_batches):
    merged = {k: torch.cat([b[k] for b in mlp_batches]) for k in mlp_batches[0]}
    v = torch.randn(66, dtype=torch.float64)
    split = HessianOperator(mlp, mlp_loss, mlp_batches, hvp_backend="double_backward")
    whole = HessianOperator(mlp, mlp_loss, [merged], hvp_backend="double_backward")
    torch.testing.assert_close(split.matvec(v), whole.matvec(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split.gradient(), whole.gradient(), rtol=1e-10, atol=1e-12)
    assert split.loss() == pytest.approx(whole.loss(), rel=1e-12)


def test_gradient_loss_dtype_and_views(mlp, mlp_batches):
    masks = random_masks(mlp, ["0.weight"], 0.4, seed=4)
    op = HessianOperator(mlp, mlp_loss, mlp_batches, masks, hvp_backend="double_backward")
    merged = {k: torch.cat([b[k] for b in mlp_batches]) for k in mlp_batches[0]}
    mlp.zero_grad()
    mlp_loss(mlp, merged).backward()
    torch.testing.assert_close(op.gradient(), mlp[0].weight.grad[masks["0.weight"]])
    assert op.loss() == pytest.approx(float(mlp_loss(mlp, merged).detach()), rel=1e-12)
    v32 = torch.randn(op.dim)
    assert op.matvec(v32).dtype == torch.float32
    lin = op.as_linear_operator()
    x = np.random.default_rng(0).standard_normal(op.dim)
    np.testing.assert_allclose(lin.matvec(x), op.matvec(torch.from_numpy(x)).numpy(), rtol=1e-12)
    check = op.check_determinism(rtol=1e-12)
    assert check.passed and check.gap <= 1e-12


def test_cache_graph_reuses_the_first_order_graph(mlp, mlp_batches):
    plain = HessianOperator(mlp, mlp_loss, mlp_batches, hvp_backend="double_backward")
    cached = HessianOperator(mlp, mlp_loss, mlp_batches, cache_graph=True)
    assert cached.backend == "double_backward"
    for seed in range(3):
        v = torch.randn(66, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(cached.matvec(v), plain.matvec(v), rtol=1e-12, atol=1e-14)
    assert len(cached._graphs) == len(mlp_batches)
    cached.clear_cache()
    assert not cached._graphs
    with pytest.raises(ValueError, match="double_backward"):
        HessianOperator(mlp, mlp_loss, mlp_batches, hvp_backend="forward_over_reverse", cache_graph=True)


def test_eval_mode_during_use_and_restored():
    torch.manual_seed(0)
    net = (
        torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(6, 2)
        )
        .double()
        .train()
    )
    gen = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(5, 4, generator=gen, dtype=torch.float64), "y": torch.tensor([0, 1, 1, 0, 1])}
    op = HessianOperator(net, mlp_loss, [batch], hvp_backend="double_backward")
    assert op.check_determinism(rtol=1e-12).passed
    assert net.training and net[1].training
    ref = reference_hessian(net, mlp_loss, [batch], [n for n, _ in net.named_parameters()])
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_input_checks(mlp, mlp_batches):
    op = HessianOperator(mlp, mlp_loss, mlp_batches)
    with pytest.raises(ValueError, match="length 66"):
        op.matvec(torch.zeros(65, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_dim=10"):
        op.to_dense(max_dim=10)
    with pytest.raises(KeyError, match="nope"):
        HessianOperator(mlp, mlp_loss, mlp_batches, ["nope"])
    with pytest.raises(ValueError, match="bool tensor of shape"):
        HessianOperator(mlp, mlp_loss, mlp_batches, {"0.bias": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="select no entry"):
        HessianOperator(mlp, mlp_loss, mlp_batches, {"0.bias": torch.zeros(7, dtype=torch.bool)})
    with pytest.raises(ValueError, match="hvp_backend"):
        HessianOperator(mlp, mlp_loss, mlp_batches, hvp_backend="fast")
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(mlp, mlp_loss, [])
    with pytest.raises(TypeError, match="batch_size_fn"):
        HessianOperator(mlp, mlp_loss, [{"x": "text"}])


BERT_SMALL = [
    "classifier.bias",
    "bert.encoder.layer.1.attention.self.query.bias",
    "bert.encoder.layer.0.output.LayerNorm.weight",
]


def test_bert_named_parameters(bert, bert_batches):
    ref = reference_hessian(bert, bert_loss, bert_batches, BERT_SMALL)
    op = HessianOperator(bert, bert_loss, bert_batches, BERT_SMALL, hvp_backend="double_backward")
    dense = op.to_dense()
    torch.testing.assert_close(dense, ref, rtol=1e-9, atol=1e-12)
    # forward-over-reverse on a batch of random directions (vmap over tangents)
    fr = HessianOperator(bert, bert_loss, bert_batches, BERT_SMALL, hvp_backend="forward_over_reverse")
    V = torch.randn(op.dim, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fr.matmat(V), dense @ V, rtol=1e-9, atol=1e-12)
    assert fr.num_matvecs == 6


def test_bert_requires_grad_subset(bert_batches):
    model = make_bert()
    for name, p in model.named_parameters():
        p.requires_grad_(name in ("classifier.bias", "bert.pooler.dense.bias"))
    ref = reference_hessian(model, bert_loss, bert_batches, ["bert.pooler.dense.bias", "classifier.bias"])
    op = HessianOperator(model, bert_loss, bert_batches, hvp_backend="double_backward")
    assert op.space.names == ["bert.pooler.dense.bias", "classifier.bias"]
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-9, atol=1e-12)


def test_bert_masked_is_submatrix_and_backends_agree(bert, bert_batches):
    names = ["classifier.weight", "bert.encoder.layer.0.attention.self.value.bias"]
    masks = random_masks(bert, names, 0.5, seed=5)
    full = reference_hessian(bert, bert_loss, bert_batches, names)
    pos = masked_positions(bert, masks)
    op = HessianOperator(bert, bert_loss, bert_batches, masks, hvp_backend="double_backward")
    torch.testing.assert_close(op.to_dense(), full[pos][:, pos], rtol=1e-9, atol=1e-12)
    fr = HessianOperator(bert, bert_loss, bert_batches, masks, hvp_backend="forward_over_reverse")
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fr.matvec(v), full[pos][:, pos] @ v, rtol=1e-9, atol=1e-12)


def test_fused_attention_error_names_the_fix(bert_batches):
    model = make_bert("sdpa")
    op = HessianOperator(model, bert_loss, bert_batches, ["classifier.bias"], hvp_backend="double_backward")
    try:
        op.matvec(torch.ones(2, dtype=torch.float64))
    except RuntimeError as err:
        assert "attn_implementation='eager'" in str(err)


def test_hutchinson_diagonal_is_unbiased(mlp, mlp_batches):
    op = HessianOperator(mlp, mlp_loss, mlp_batches, hvp_backend="double_backward")
    exact = torch.diagonal(op.to_dense())
    estimate = hutchinson_diagonal(op, num_probes=200, seed=0)
    assert estimate.shape == (66,)
    # error of the mean of 200 probes: well inside the off-diagonal mass of each row
    assert (estimate - exact).abs().max() < 0.25 * op.to_dense().abs().sum(1).max()
    assert torch.corrcoef(torch.stack([estimate, exact]))[0, 1] > 0.9
