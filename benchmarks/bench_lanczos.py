"""Certified extreme eigenvalues of the masked-subspace Hessian of MiniLM at θ0: Lanczos vs power iteration.

Setup: all-MiniLM-L6-v2 (eager attention) + a fresh 3-way head at θ0, float32; the first 16 CB training
examples (premise/hypothesis pairs, MiniLM tokenizer, ≤ 128 tokens; entailment/contradiction/neutral →
0/1/2); the subspace is a random per-tensor mask with ⌊0.005·numel⌋ entries of every tensor (``--head``:
the whole random-init head too, which at θ0 puts near-degenerate ± clusters at both ends of the spectrum).
The operator keeps the first-order graph (``cache_graph=True``), so each product after the first is one
backward pass.

Goal: λmax and λmin each certified by a Ritz residual ≤ 1e-3·|λmax| in at most 15 products. Lanczos
(``stop_when_converged``) is compared with PyHessian-style power iteration (λmax, then λmax·I − H) under the
same residual certificate, in products and seconds; the products PyHessian's own relative-change rule
would have used in phase 1 are read off the same iterates.
Run: ``python benchmarks/bench_lanczos.py [--steps 15] [--power-iters 30]``; prints a table, then JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from bench_hvp import classification_loss, device_name, load_minilm, random_masks

from theory.hessian import HessianOperator
from theory.lanczos import lanczos, power_iteration_extremes

CB = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "cb" / "train.jsonl"
LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


def cb_batch(path_model: str, data: Path, count: int, max_length: int) -> dict:
    from transformers import AutoTokenizer

    with open(data) as handle:
        rows = [json.loads(line) for line in itertools.islice(handle, count)]
    tokenizer = AutoTokenizer.from_pretrained(path_model)
    enc = tokenizer(
        [r["premise"] for r in rows],
        [r["hypothesis"] for r in rows],
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([LABELS[r["label"]] for r in rows]),
    }


def pyhessian_stop(history: list[tuple[float, float]], rtol: float) -> tuple[int, float, float]:
    """Products, estimate and residual where |μ_t − μ_{t−1}| ≤ rtol·|μ_t| first holds (else the last)."""
    for t in range(1, len(history)):
        if abs(history[t][0] - history[t - 1][0]) <= rtol * abs(history[t][0]):
            return t + 1, history[t][0], history[t][1]
    return len(history), history[-1][0], history[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--power-iters", type=int, default=30, help="cap per power-iteration phase")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=CB)
    parser.add_argument("--head", action="store_true", help="tune the whole classifier head too")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"CB data not found at {args.data} (pass --data)")
    torch.set_num_threads(args.threads)

    model, path = load_minilm()
    batch = cb_batch(path, args.data, 16, 128)
    masks = random_masks(model, whole=("classifier.",) if args.head else ())

    op = HessianOperator(model, classification_loss, [batch], masks, cache_graph=True)
    start = time.perf_counter()
    lz = lanczos(op, args.steps, seed=0, rtol=args.rtol, stop_when_converged=True)
    lz_seconds = time.perf_counter() - start  # includes building the first-order graph

    op.clear_cache()
    power_op = HessianOperator(model, classification_loss, [batch], masks, cache_graph=True)
    start = time.perf_counter()
    # the same absolute certificate as Lanczos: rtol·|λmax| with λmax from the Lanczos run
    pw = power_iteration_extremes(power_op, max_iters=args.power_iters, seed=0, atol=lz.tol)
    pw_seconds = time.perf_counter() - start
    py_hvps, py_mu, py_res = pyhessian_stop(pw.history[0], args.rtol)

    head = " + whole head" if args.head else ""
    print(
        f"MiniLM at theta0, k = {op.dim} (p = 0.005 per tensor{head}), 16 CB examples x "
        f"{batch['input_ids'].shape[1]} tokens, tolerance {args.rtol:g}*|lambda_max|"
    )
    print(
        f"{'method':34s} {'HVPs':>5s} {'seconds':>8s} {'lambda_max':>12s} {'res_max':>9s} "
        f"{'lambda_min':>12s} {'res_min':>9s} certified"
    )
    print(
        f"{'Lanczos (stop when certified)':34s} {lz.num_matvecs:5d} {lz_seconds:8.1f} {lz.lambda_max:12.5g} "
        f"{lz.residual_max:9.2e} {lz.lambda_min:12.5g} {lz.residual_min:9.2e} "
        f"max={lz.converged_max} min={lz.converged_min}"
    )
    print(
        f"{'power iteration (residual rule)':34s} {pw.num_matvecs:5d} {pw_seconds:8.1f} "
        f"{pw.lambda_max:12.5g} "
        f"{pw.residual_max:9.2e} {pw.lambda_min:12.5g} {pw.residual_min:9.2e} "
        f"max={pw.converged_max} min={pw.converged_min}"
    )
    print(f"{'  PyHessian rule, phase 1 only':34s} {py_hvps:5d} {'':8s} {py_mu:12.5g} {py_res:9.2e}")
    print(
        json.dumps(
            {
                "benchmark": "bench_lanczos",
                "device": device_name(),
                "torch": torch.__version__,
                "threads": args.threads,
                "load_average_1min": os.getloadavg()[0],
                "k": op.dim,
                "whole_head": args.head,
                "tokens": list(batch["input_ids"].shape),
                "tolerance": lz.tol,
                "lanczos": {
                    "hvps": lz.num_matvecs,
                    "seconds": lz_seconds,
                    "lambda_max": lz.lambda_max,
                    "lambda_min": lz.lambda_min,
                    "residual_max": lz.residual_max,
                    "residual_min": lz.residual_min,
                    "certified_max": lz.converged_max,
                    "certified_min": lz.converged_min,
                    "ritz_values": lz.ritz_values.tolist(),
                    "residuals": lz.residuals.tolist(),
                },
                "power_iteration": {
                    "hvps": pw.num_matvecs,
                    "seconds": pw_seconds,
                    "max_iters_per_phase": args.power_iters,
                    "lambda_max": pw.lambda_max,
                    "lambda_min": pw.lambda_min,
                    "residual_max": pw.residual_max,
                    "residual_min": pw.residual_min,
                    "certified_max": pw.converged_max,
                    "certified_min": pw.converged_min,
                    "pyhessian_rule_phase1": {"hvps": py_hvps, "lambda": py_mu, "residual": py_res},
                },
                "goal_met": lz.converged and lz.num_matvecs <= 15,
                "hvp_ratio_power_to_lanczos": pw.num_matvecs / lz.num_matvecs,
                "seconds_ratio_power_to_lanczos": pw_seconds / lz_seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
