"""Optimizer state and trainable storage of the sparse delta against the budget ⌊mp⌋ (MiniLM).

For each p, a mask of ⌊p·numel⌋ entries of every backbone tensor (random: the storage does not depend
on which entries) is set on one MiniLM task model (:meth:`SparseDeltaTuned.set_indices`), the trainer's
AdamW takes one step, and we count

* ``state``: bytes of AdamW's tensors (exp_avg, exp_avg_sq) for the backbone's trainable tensors (the
  head, trained by every method, is reported apart);
* ``storage``: bytes the delta holds per tensor: values (trainable), indices (int64) and θ0 at the
  indices, the three k-vectors of :class:`~sparse_ft.delta.SparseDelta`;

then fit bytes = a·k + b over the sweep (k = Σ⌊p·numel⌋). Growth is linear in k with no term in m:
a = 8 bytes of state (two fp32 moments) and 16 bytes of storage per entry, b = 0. LoRA (r=8, query and
value) and full fine-tuning are measured the same way for reference; full keeps 8 bytes of state for
every one of the m entries.

Run: ``python benchmarks/bench_optimizer_state.py [--model-config minilm]``. Last line: JSON.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import (
    MODEL_CONFIGS,
    device_name,
    emit,
    load_average,
    optimizer_state_bytes,
    random_batch,
    task_model,
)

from sparse_ft.methods import BuildContext, make_method_config
from sparse_ft.methods.base import backbone_size
from sparse_ft.methods.masks import SparseDeltaTuned, scope_budget, select_top_k
from sparse_ft.train import TrainConfig, make_objective, make_optimizer, train_step

SPARSITIES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def one_step(tuned, batch) -> torch.optim.Optimizer:
    """The trainer's optimizer after one step (AdamW creates its state lazily)."""
    config = TrainConfig(bf16=False)
    optimizer = make_optimizer(tuned, config, torch.device("cpu"))
    train_step(optimizer, make_objective(tuned, config, torch.device("cpu")), batch, 1.0)
    return optimizer


def state_split(tuned, optimizer) -> tuple[int, int]:
    """(backbone, head) bytes of optimizer state."""
    head = {id(p) for p in tuned.model.head.parameters()}
    sizes = {"backbone": 0, "head": 0}
    for param, state in optimizer.state.items():
        part = "head" if id(param) in head else "backbone"
        sizes[part] += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return sizes["backbone"], sizes["head"]


def delta_storage(tuned: SparseDeltaTuned) -> int:
    return sum(t.numel() * t.element_size() for d in tuned._deltas.values()
               for t in (d.values, d.indices, d.theta0_at))


def fit(ks: list[int], ys: list[int]) -> dict:
    slope, intercept = np.polyfit(np.asarray(ks, float), np.asarray(ys, float), 1)
    pred = slope * np.asarray(ks, float) + intercept
    ss_res = float(((np.asarray(ys) - pred) ** 2).sum())
    ss_tot = float(((np.asarray(ys) - np.mean(ys)) ** 2).sum())
    return {"bytes_per_entry": float(slope), "intercept_bytes": round(float(intercept), 3) + 0.0,
            "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-config", default="minilm", choices=MODEL_CONFIGS)
    p.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    args = p.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    load_start = load_average()
    model = task_model(args.model_config)
    m = backbone_size(model)
    batch = random_batch(model, 2, 16, torch.device("cpu"))
    scores = make_method_config("random", sparsities[0]).score(model, BuildContext(mask_seed=0))  # plain names
    tuned = SparseDeltaTuned(model, make_method_config("sam", sparsities[0]), {}, 0)
    rows = []
    for sparsity in sparsities:
        indices = select_top_k(scores, sparsity)
        budget = scope_budget([s.numel() for s in scores.values()], sparsity, "per_tensor")
        tuned.config.sparsity, tuned.budget = sparsity, budget
        tuned.set_indices(indices)
        optimizer = one_step(tuned, batch)
        backbone, head = state_split(tuned, optimizer)
        rows.append({"sparsity": sparsity, "k": budget, "trainable": tuned.trainable_param_count(),
                     "state_bytes": backbone, "head_state_bytes": head, "storage_bytes": delta_storage(tuned)})
        del optimizer
    references = {}
    for method in ("lora", "full"):
        ref = make_method_config(method).build(task_model(args.model_config), BuildContext())
        optimizer = one_step(ref, batch)
        backbone, head = state_split(ref, optimizer)
        references[method] = {"trainable": ref.trainable_param_count(), "state_bytes": backbone,
                              "head_state_bytes": head, "total_state_bytes": optimizer_state_bytes(optimizer)}
        del ref, optimizer
    state_fit = fit([r["k"] for r in rows], [r["state_bytes"] for r in rows])
    storage_fit = fit([r["k"] for r in rows], [r["storage_bytes"] for r in rows])
    print(f"{args.model_config}: m = {m:,} backbone parameters; sam mask of ⌊p·numel⌋ entries per tensor; "
          f"{device_name(torch.device('cpu'))}; load average {load_start} -> {load_average()}")
    print(f"{'p':>8s} {'k = budget':>12s} {'state MB':>10s} {'state B/k':>10s} {'storage MB':>11s} "
          f"{'storage B/k':>12s} {'state / full':>13s}")
    for r in rows:
        print(f"{r['sparsity']:8.4f} {r['k']:12,d} {r['state_bytes'] / 2**20:10.3f} {r['state_bytes'] / r['k']:10.2f} "
              f"{r['storage_bytes'] / 2**20:11.3f} {r['storage_bytes'] / r['k']:12.2f} "
              f"{r['state_bytes'] / references['full']['state_bytes']:13.5f}")
    for method, ref in references.items():
        print(f"{method:>8s} {ref['trainable']:12,d} {ref['state_bytes'] / 2**20:10.3f} "
              f"{ref['state_bytes'] / ref['trainable']:10.2f}   (trainable backbone entries; head apart: "
              f"{ref['head_state_bytes'] / 2**20:.3f} MB state)")
    print(f"fit: state = {state_fit['bytes_per_entry']:.3f}·k + {state_fit['intercept_bytes']:.1f} B "
          f"(R² {state_fit['r2']:.6f}); storage = {storage_fit['bytes_per_entry']:.3f}·k + "
          f"{storage_fit['intercept_bytes']:.1f} B (R² {storage_fit['r2']:.6f})")
    emit({"benchmark": "optimizer_state", "device": device_name(torch.device("cpu")), "model_config": args.model_config,
          "backbone_params": m, "load_average": {"start": load_start, "end": load_average()},
          "sweep": rows, "fit_state": state_fit, "fit_storage": storage_fit, "references": references})


if __name__ == "__main__":
    main()
