"""Per-sample gradient norms (vmap) against a loop of single-example backward passes."""

import numpy as np
import pytest
import torch

from tests.theory.helpers import (
    NoisyForward,
    RedrawOnEval,
    assert_untouched,
    bert_loss,
    mlp_loss,
    random_eval_case,
    snapshot,
    tied_case,
    tied_loss,
)
from theory.lipschitz import per_sample_grad_norms
from theory.subspace import NondeterministicError


def loop_norms(model, loss_fn, batches, names, masks=None):
    """One backward pass per example on the model itself; norm over the (masked) entries of ``names``."""
    params = dict(model.named_parameters())
    out = []
    model.eval()
    for batch in batches:
        size = next(iter(batch.values())).shape[0]
        for i in range(size):
            model.zero_grad()
            loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()}).backward()
            grads = [params[n].grad[masks[n]] if masks else params[n].grad.reshape(-1) for n in names]
            out.append(float(torch.cat(grads).norm()))
    model.zero_grad()
    return np.array(out)


def test_mlp_vmap_matches_loop_with_masks(mlp, mlp_batches):
    gen = torch.Generator().manual_seed(0)
    masks = {"2.weight": torch.rand(3, 7, generator=gen) < 0.5, "0.bias": torch.rand(7, generator=gen) < 0.5}
    est = per_sample_grad_norms(mlp, mlp_loss, mlp_batches, masks, method="vmap", chunk_size=2)
    expected = loop_norms(mlp, mlp_loss, mlp_batches, list(masks), masks)
    assert est.method == "vmap" and est.norms.shape == (1, 13)
    np.testing.assert_allclose(est.norms[0], expected, rtol=1e-10)
    assert est.rho == pytest.approx(expected.max(), rel=1e-12)
    assert est.quantiles[1.0] == est.rho and est.quantiles[0.5] == pytest.approx(np.median(expected))
    loop = per_sample_grad_norms(mlp, mlp_loss, mlp_batches, masks, method="loop")
    np.testing.assert_allclose(loop.norms, est.norms, rtol=1e-10)


def test_checkpoints_leave_the_model_untouched(mlp, mlp_batches):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    moved = {k: v + 0.1 for k, v in before.items()}
    est = per_sample_grad_norms(mlp, mlp_loss, mlp_batches, checkpoints=[before, moved])
    assert est.norms.shape == (2, 13) and est.num_checkpoints == 2
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, before[k])
    mlp.load_state_dict(moved)
    np.testing.assert_allclose(
        est.norms[1], loop_norms(mlp, mlp_loss, mlp_batches, [n for n in before]), rtol=1e-10
    )
    assert est.rho == est.norms.max()
    text = str(est)
    assert "empirical estimate" in text and "13 examples x 2 checkpoint(s)" in text
    assert est.to_dict()["num_checkpoints"] == 2


def test_bert_falls_back_to_the_loop_and_matches(bert, bert_batches):
    names = ["classifier.weight", "bert.encoder.layer.1.output.dense.bias"]
    with pytest.warns(UserWarning, match="vmap"):
        est = per_sample_grad_norms(bert, bert_loss, bert_batches, names)
    assert est.method == "loop"
    np.testing.assert_allclose(est.norms[0], loop_norms(bert, bert_loss, bert_batches, names), rtol=1e-10)
    with pytest.raises(ValueError, match="method"):
        per_sample_grad_norms(bert, bert_loss, bert_batches, names, method="fast")


@pytest.mark.parametrize("model_class", [RedrawOnEval, NoisyForward])
def test_a_random_eval_mode_function_is_refused(model_class):
    model, batch = random_eval_case(model_class)
    with pytest.raises(NondeterministicError, match="eval-mode loss is random"):
        per_sample_grad_norms(model, mlp_loss, [batch], method="loop")


def test_tied_weights_match_the_loop_and_leave_the_model_untouched():
    model, batch = tied_case()
    before = snapshot(model)
    est = per_sample_grad_norms(model, tied_loss, [batch], method="vmap")
    assert_untouched(model, before)
    names = ["emb.weight", "shared.weight", "shared.bias"]
    np.testing.assert_allclose(est.norms[0], loop_norms(model, tied_loss, [batch], names), rtol=1e-10)
