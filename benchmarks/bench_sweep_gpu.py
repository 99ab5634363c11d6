"""Sweep throughput on one GPU: runs per hour with ``--jobs-per-gpu K`` against ``--jobs-per-gpu 1``.

A small grid (one task, one method, N seeds; every run a full ``sparse-ft train``: data, model, mask
selection, training, evaluation, result.json) is run through :func:`sparse_ft.experiments.sweep.run_sweep` on GPU 0
alone (``CUDA_VISIBLE_DEVICES`` is narrowed to the first visible card), once with one job on the card
and once with K jobs sharing it, alternating ``--repeats`` times, each into a fresh results folder.
runs/hour = N / wall seconds × 3600; the ratio is the speed-up (target ≥ 2.5 for K = 4). A single
fine-tuning run of a base-size model at batch 16 leaves a modern GPU mostly idle (kernel launches and
host work dominate), which is what packing several runs on the card recovers.

``--model`` is any model sparse-ft loads (default: the embedded MiniLM); ``--model-config
roberta-base-like`` saves a random-init roberta-base-sized encoder (hidden 768, 12 layers, 12 heads,
intermediate 3072) with the MiniLM tokenizer to a temporary folder and sweeps that. Data: ``--data-dir``,
else ``$SPARSE_FT_DATA``, else ``../shared/data/tasks`` next to the checkout.

Without a GPU this prints that it needs one and exits 0 (last line: JSON with ``"skipped": true``).
Run: ``python benchmarks/bench_sweep_gpu.py [--jobs-per-gpu 4] [--runs 8] [--method sam]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, device_name, emit, load_average

TARGET = 2.5


def default_data_dir() -> str | None:
    for candidate in (os.environ.get("SPARSE_FT_DATA"), ROOT.parent / "shared" / "data" / "tasks"):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    return None


def save_roberta_base_like(folder: Path) -> str:
    """A random-init roberta-base-sized encoder with the MiniLM tokenizer (vocabulary 30522), saved."""
    from transformers import RobertaConfig, RobertaModel

    from sparse_ft.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=514, type_vocab_size=2,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sweep_once(args, model: str, data_dir: str, jobs_per_gpu: int, root: Path) -> dict:
    """One timed sweep of N runs into a fresh folder; returns wall seconds and per-run figures."""
    from sparse_ft.experiments.results import load_results
    from sparse_ft.experiments.sweep import SweepSpec, run_sweep

    sweep = SweepSpec(tasks=[args.task], methods=[args.method],
                      sparsities=[args.sparsity] if args.sparsity is not None else [None],
                      seeds=list(range(args.runs)),
                      run={"model": model, "data_dir": data_dir, "preset": args.preset, "device": "cuda",
                           "train_limit": args.train_limit, "eval_limit": args.eval_limit},
                      train={"max_steps": args.max_steps, "eval_every": args.max_steps, "batch_size": 16,
                             "compile": "on" if args.compile else "off"})
    start = time.perf_counter()
    counts = run_sweep(sweep, root, jobs_per_gpu=jobs_per_gpu, progress=False)
    wall = time.perf_counter() - start
    if counts["failed"] or counts["done"] != args.runs:
        raise SystemExit(f"the sweep with --jobs-per-gpu {jobs_per_gpu} did not finish cleanly: {counts}")
    results, _ = load_results(root)
    return {"wall_s": wall, "runs_per_hour": args.runs / wall * 3600,
            "train_s_median": statistics.median(r["train_seconds"] for r in results),
            "peak_mb_max": max(r["peak_memory_mb"] for r in results)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs-per-gpu", type=int, default=4)
    p.add_argument("--runs", type=int, default=8, help="runs per sweep (seeds 0..N-1)")
    p.add_argument("--repeats", type=int, default=1, help="alternating (1 job, K jobs) pairs; medians reported")
    p.add_argument("--task", default="cb")
    p.add_argument("--method", default="sam")
    p.add_argument("--sparsity", type=float, default=0.005)
    p.add_argument("--model", default="minilm")
    p.add_argument("--model-config", choices=("none", "roberta-base-like"), default="none")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--preset", default="paper", help="the training protocol (paper: bf16 autocast on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="compile each run's step (the paper preset's GPU default; its one-off compile time "
                        "dominates runs of a few hundred steps, so it is off here by default)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--eval-limit", type=int, default=64)
    args = p.parse_args(argv)
    load_start = load_average()
    # One card, fixed before CUDA is queried: the spawned workers inherit the same single-GPU view.
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if not torch.cuda.is_available():
        print("bench_sweep_gpu: needs a CUDA GPU (runs/hour with --jobs-per-gpu K vs 1 on one card); "
              "none is available here, nothing measured.")
        emit({"benchmark": "sweep_gpu", "skipped": True, "reason": "no CUDA device", "device": device_name(
            torch.device("cpu")), "load_average": {"start": load_start, "end": load_average()}})
        return
    data_dir = args.data_dir or default_data_dir()
    if data_dir is None:
        raise SystemExit("no task data: pass --data-dir or set $SPARSE_FT_DATA")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        model = save_roberta_base_like(tmp / "model") if args.model_config == "roberta-base-like" else args.model
        figures = {1: [], args.jobs_per_gpu: []}
        for repeat in range(args.repeats):
            for k in (1, args.jobs_per_gpu):
                figures[k].append(sweep_once(args, model, data_dir, k, tmp / f"k{k}-r{repeat}"))
                print(f"--jobs-per-gpu {k} (repeat {repeat}): {figures[k][-1]['runs_per_hour']:.1f} runs/hour, "
                      f"{figures[k][-1]['wall_s']:.1f} s for {args.runs} runs", file=sys.stderr)
    summary = {k: {"runs_per_hour": statistics.median(f["runs_per_hour"] for f in v),
                   "wall_s": statistics.median(f["wall_s"] for f in v),
                   "train_s_median": statistics.median(f["train_s_median"] for f in v),
                   "peak_mb_max": max(f["peak_mb_max"] for f in v), "repeats": v} for k, v in figures.items()}
    ratio = summary[args.jobs_per_gpu]["runs_per_hour"] / summary[1]["runs_per_hour"]
    name = device_name(torch.device("cuda"))
    print(f"{args.runs} runs of {args.task}/{args.method} ({args.model_config if args.model_config != 'none' else model},"
          f" {args.max_steps} steps, preset {args.preset}) on one {name}; load average {load_start} -> {load_average()}")
    print(f"{'jobs/GPU':>9s} {'runs/hour':>10s} {'wall s':>8s} {'train s/run':>12s} {'peak MB/run':>12s}")
    for k, s in summary.items():
        print(f"{k:9d} {s['runs_per_hour']:10.1f} {s['wall_s']:8.1f} {s['train_s_median']:12.1f} {s['peak_mb_max']:12.0f}")
    print(f"speed-up {ratio:.2f}x (target >= {TARGET}): {'met' if ratio >= TARGET else 'MISSED'}")
    emit({"benchmark": "sweep_gpu", "skipped": False, "device": name, "jobs_per_gpu": args.jobs_per_gpu,
          "runs": args.runs, "task": args.task, "method": args.method, "preset": args.preset, "compile": args.compile,
          "model": args.model_config if args.model_config != "none" else args.model, "max_steps": args.max_steps,
          "load_average": {"start": load_start, "end": load_average()},
          "results": {str(k): v for k, v in summary.items()}, "speedup": ratio,
          "target": {"limit": TARGET, "met": ratio >= TARGET}})


if __name__ == "__main__":
    main()
