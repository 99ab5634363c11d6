"""The sparse-ft side of the theory instruments on a tiny tuned model."""

import pytest

from sparse_ft.experiments.measure import measure_subspace, tunable_coordinates
from sparse_ft.methods import make_method_config
from tests.conftest import task_loader, tiny_task_model
from tests.methods.mask_utils import context


def test_measure_subspace_with_and_without_the_cached_graph(tokenizer, data_dir):
    model = tiny_task_model("cb", vocab_size=len(tokenizer), hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    tuned = make_method_config("random", 0.01).build(model, context([]))
    batches = list(task_loader("cb", tokenizer, data_dir, n=8, batch_size=4))
    fixed = {"lanczos_steps": 12, "max_lanczos_steps": 12}  # no extension: the same Krylov spaces
    cached = measure_subspace(tuned, batches, 0.01, n_train=250, cache_graph=True, **fixed)
    plain = measure_subspace(tuned, batches, 0.01, n_train=250, cache_graph=False, **fixed)
    assert cached.dim == plain.dim == sum(p.numel() for n, p in tuned.named_parameters()
                                          if n in tunable_coordinates(tuned))
    assert cached.lambda_max == pytest.approx(plain.lambda_max, rel=1e-4)
    assert cached.lambda_min == pytest.approx(plain.lambda_min, rel=1e-4, abs=1e-6)
    assert cached.rho == pytest.approx(plain.rho, rel=1e-5) and cached.rho > 0
    assert cached.hvps == plain.hvps == 2 * 12 and cached.examples == 8  # two random starts
