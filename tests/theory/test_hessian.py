"""HessianOperator against torch.autograd.functional.hessian in float64 (MLP and a 2-layer BERT)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.theory.helpers import (
    NoisyForward,
    RedrawOnEval,
    assert_untouched,
    bert_loss,
    make_bert,
    masked_positions,
    mlp_loss,
    random_eval_case,
    reference_hessian,
    snapshot,
    tied_case,
    tied_loss,
    tied_reference_hessian,
)
from theory.hessian import HessianOperator, hutchinson_diagonal
from theory.operators import DenseOperator
from theory.subspace import NondeterministicError

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


def test_hutchinson_diagonal_mlp_and_chunks(mlp, mlp_batches):
    op = HessianOperator(mlp, mlp_loss, mlp_batches, hvp_backend="double_backward")
    dense = op.to_dense()
    estimate = hutchinson_diagonal(op, samples=200, seed=0, chunk=50)
    assert estimate.shape == (66,) and estimate.dtype == op.dtype
    # error of the mean of 200 probes: well inside the off-diagonal mass of each row
    assert (estimate - torch.diagonal(dense)).abs().max() < 0.25 * dense.abs().sum(1).max()
    assert torch.corrcoef(torch.stack([estimate, torch.diagonal(dense)]))[0, 1] > 0.9
    # the probes do not depend on how many products are batched together
    torch.testing.assert_close(
        hutchinson_diagonal(op, samples=7, seed=3, chunk=3), hutchinson_diagonal(op, samples=7, seed=3)
    )


class Separable(torch.nn.Module):
    """L(w) = mean_b Σ_i log cosh(w_i x_bi): a diagonal, non-constant Hessian."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.5, 6, dtype=torch.float64))


def separable_loss(model, batch):
    return torch.log(torch.cosh(model.w * batch["x"])).sum(1).mean()


def test_hutchinson_is_exact_on_a_diagonal_hessian_with_one_sample():
    model = Separable()
    batch = {"x": torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    mask = torch.tensor([True, False, True, True, False, True])
    op = HessianOperator(model, separable_loss, [batch], {"w": mask}, hvp_backend="double_backward")
    exact = torch.diagonal(op.to_dense())
    for seed in range(3):
        torch.testing.assert_close(hutchinson_diagonal(op, samples=1, seed=seed), exact, rtol=1e-12, atol=0)
    # back to named tensors: estimates at the mask, zero elsewhere
    full = op.space.unflatten(hutchinson_diagonal(op, samples=1, seed=0))
    assert list(full) == ["w"] and full["w"].shape == (6,)
    torch.testing.assert_close(full["w"][mask], exact)
    assert torch.all(full["w"][~mask] == 0)


def test_hutchinson_draws_and_unbiasedness_on_a_dense_matrix():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    a = a + a.T
    op = DenseOperator(a)
    # the documented draws: row s of randint(0, 2, (S, dim)) * 2 - 1 from a CPU generator seeded with seed
    v = torch.randint(0, 2, (3, 8), generator=torch.Generator().manual_seed(5)).double() * 2 - 1
    torch.testing.assert_close(hutchinson_diagonal(op, samples=3, seed=5), (v * (v @ a)).mean(0))
    samples = 4000
    estimate = hutchinson_diagonal(op, samples=samples, seed=1)
    off = a - torch.diag(torch.diagonal(a))
    sd = (off.pow(2).sum(1) / samples).sqrt()  # standard deviation of each entry's mean
    assert torch.all((estimate - torch.diagonal(a)).abs() <= 4 * sd)
    with pytest.raises(ValueError, match="samples"):
        hutchinson_diagonal(op, samples=0, seed=0)


class PaddedBag(torch.nn.Module):
    """Mean of tanh(embeddings) -> linear; the padding row is nonzero and the padded token reaches the loss."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(6, 3, padding_idx=0)
        self.out = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.emb.weight[0] = torch.tensor([0.5, -1.0, 0.8])

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)).mean(1))


def bag_loss(model, batch):
    return F.cross_entropy(model(batch["ids"]), batch["y"])


def test_auto_backend_falls_back_to_double_backward_where_forward_mode_disagrees():
    torch.manual_seed(0)
    model = PaddedBag().double()
    batch = {
        "ids": torch.tensor([[0, 1, 2], [3, 0, 0], [4, 5, 0], [1, 0, 2]]),
        "y": torch.tensor([0, 1, 1, 0]),
    }
    names = ["emb.weight", "out.weight"]
    ref = reference_hessian(model, bag_loss, [batch], names)  # reverse mode: the padding row is zero
    forward = HessianOperator(model, bag_loss, [batch], names, hvp_backend="forward_over_reverse").to_dense()
    assert (forward - ref).norm() > 0.1 * ref.norm() and (forward - forward.T).norm() > 0.1 * ref.norm()
    op = HessianOperator(model, bag_loss, [batch], names, hvp_backend="auto")
    with pytest.warns(UserWarning, match="disagrees with double backward"):
        dense = op.to_dense()
    assert op.backend == "double_backward" and op.backend_gap > 1e-3
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-12)
    # where the backends agree, auto measures the gap and may keep either
    agree = HessianOperator(model, bag_loss, [batch], ["out.weight"], hvp_backend="auto")
    torch.testing.assert_close(agree.to_dense(), ref[18:, 18:], rtol=1e-10, atol=1e-12)
    assert agree.backend_gap <= 1e-8


@pytest.mark.parametrize("model_class", [RedrawOnEval, NoisyForward])
def test_a_random_eval_mode_function_is_refused(model_class):
    model, batch = random_eval_case(model_class)
    for call in (
        lambda op: op.matvec(torch.ones(op.dim, dtype=torch.float64)),
        lambda op: op.gradient(),
        lambda op: op.loss(),
    ):
        op = HessianOperator(model, mlp_loss, [batch])
        with pytest.raises(NondeterministicError, match="eval-mode loss is random"):
            call(op)
    assert issubclass(NondeterministicError, ValueError)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_tied_weights_hvp_matches_dense_and_model_is_untouched(backend):
    model, batch = tied_case()
    before = snapshot(model)
    op = HessianOperator(model, tied_loss, [batch], hvp_backend=backend)
    assert op.space.names == ["emb.weight", "shared.weight", "shared.bias"]
    torch.testing.assert_close(op.to_dense(), tied_reference_hessian(model, batch), rtol=1e-10, atol=1e-12)
    op.gradient()
    assert_untouched(model, before)
    assert model.alias is model.shared and model.dec.weight is model.emb.weight
    # any name of a tied tensor selects it; two names of one tensor are refused
    alias = HessianOperator(model, tied_loss, [batch], ["alias.bias", "dec.weight"], hvp_backend=backend)
    assert alias.space.names == ["shared.bias", "emb.weight"]
    with pytest.raises(ValueError, match="tied weights count once"):
        HessianOperator(model, tied_loss, [batch], ["shared.bias", "alias.bias"])
