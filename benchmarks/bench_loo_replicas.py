"""Leave-one-out retraining: K replicas trained as one vmapped batch against K trainings one by one.

Both sides run the trainer's protocol (AdamW, clipping, schedule, a final evaluation) for the same steps
on the same K tuned models (sam at p per tensor, masks selected on random data), batch B × L random tokens
per replica. The ratio is sequential time / batched time: above 1 the batch wins. Interleaved rounds,
median; last line JSON.

    python benchmarks/bench_loo_replicas.py --model-config tiny
    python benchmarks/bench_loo_replicas.py --model-config minilm --replicas 4 --steps 2
    python benchmarks/bench_loo_replicas.py --device cuda --model-config roberta-base-like --replicas 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from types import SimpleNamespace

import torch
from common import MODEL_CONFIGS, device_name, emit, load_average, random_batch, task_model


class FixedBatches:
    """A loader stand-in: the same list of batches every epoch, with the collator's pad id."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.collate_fn = SimpleNamespace(pad_token_id=0)

    def __iter__(self):
        return iter(self.batches)


def build_replicas(args, device):
    from sparse_ft.methods import BuildContext, make_method_config

    pristine = task_model(args.model_config)
    selection = [random_batch(pristine, args.batch_size, args.length, device, seed=100)]
    config = make_method_config(args.method, args.sparsity)
    replicas = []
    for _ in range(args.replicas):
        model = copy.deepcopy(pristine).to(device)
        context = BuildContext(selection_batches=lambda: iter(selection), mask_seed=0, device=device,
                               max_steps=args.steps)
        replicas.append(config.build(model, context))
    loaders = [FixedBatches([random_batch(pristine, args.batch_size, args.length, device, seed=r * 10 + s)
                             for s in range(args.steps)]) for r in range(args.replicas)]
    val = FixedBatches([random_batch(pristine, args.batch_size, args.length, device, seed=999)])
    return replicas, loaders, val


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-config", choices=MODEL_CONFIGS, default="tiny")
    parser.add_argument("--method", default="sam")
    parser.add_argument("--sparsity", type=float, default=0.005)
    parser.add_argument("--replicas", type=int, default=4, help="K")
    parser.add_argument("--steps", type=int, default=3, help="training steps per replica")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sparse_ft.replicas import train_replicas
    from sparse_ft.train import TrainConfig, train

    device = torch.device(args.device)
    start_load = load_average()
    config = TrainConfig(batch_size=args.batch_size, max_steps=args.steps, eval_every=10**9, min_steps=0,
                         patience=10**9, check_every=args.steps, max_length=args.length)
    replicas, loaders, val = build_replicas(args, device)

    def sequential():
        for tuned, loader in zip(copy.deepcopy(replicas), loaders):
            train(tuned, loader, val, config, device, progress=False)

    def batched():
        train_replicas(copy.deepcopy(replicas), loaders, val, config, device, progress=False)

    batched()  # warm-up of both paths
    sequential()
    times = {"sequential": [], "batched": []}
    peak = {}
    for _ in range(args.rounds):
        for name, fn in (("sequential", sequential), ("batched", batched)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(timed(fn, device))
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
    median = {name: statistics.median(values) for name, values in times.items()}
    speedup = median["sequential"] / median["batched"]
    header = (f"{args.model_config}, {args.method} p={args.sparsity}, K={args.replicas} replicas x {args.steps} steps, "
              f"batch {args.batch_size}x{args.length}, {device_name(device)}, threads {torch.get_num_threads()}")
    print(header)
    print(f"{'mode':<12}{'seconds':>10}{'per replica-step s':>20}{'peak MB':>10}")
    for name in ("sequential", "batched"):
        per = median[name] / (args.replicas * args.steps)
        print(f"{name:<12}{median[name]:>10.3f}{per:>20.4f}{peak.get(name, float('nan')):>10.0f}")
    print(f"speed-up of the batch: {speedup:.3f}x ({'batched wins' if speedup > 1 else 'sequential wins'})")
    emit({"benchmark": "loo_replicas", "device": device_name(device), "device_type": device.type,
          "model_config": args.model_config, "method": args.method, "sparsity": args.sparsity,
          "replicas": args.replicas, "steps": args.steps, "batch": [args.batch_size, args.length],
          "threads": torch.get_num_threads(), "rounds": args.rounds, "torch": torch.__version__,
          "load_average": {"start": start_load, "end": load_average()},
          "seconds": times, "median_seconds": median, "peak_memory_mb": peak or None,
          "speedup_batched_vs_sequential": speedup})


if __name__ == "__main__":
    main()
