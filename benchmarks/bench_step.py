"""Training-step time and peak memory of the methods against LoRA (the trainer's own step).

One step = forward, backward, gradient clipping and the AdamW step, exactly
:func:`sparse_ft.train.train_step` with the trainer's optimizer and objective (bf16 autocast on CUDA;
``--compile`` = the trainer's compiled step: torch.compile, CUDA graphs and fused AdamW on CUDA), on a
batch of 16 × 128 random tokens. Methods:

* ``full``, ``bitfit``, ``lora`` (peft, r=8 on query and value): sparse-ft's own;
* ``sam``: the p-sparse delta with ⌊p·numel⌋ entries of *every* backbone tensor, embeddings included
  (p = 0.005). The mask is drawn at random by default (``--mask random``): a step costs the same for
  any mask of that size, and SAM's one-off scoring pass is not part of a step; ``--mask scored`` runs
  the real SAM selection on the benchmark batch;
* ``sam-definition``: the same delta computed by its definition, θ0 + scatter(I, v) out of place at
  every forward with the dense gradient of every tensor gathered at I (``SparseDelta.fast_paths`` off:
  sparse-ft's implementation before the SDDMM path, kept as the before/after comparison);
* ``masked-dense``: the authors' baseline, dense parameters with a dense 0/1 mask multiplied into the
  gradient and full AdamW state (same mask as ``sam``).

Time: all models live in one process and are timed interleaved, round by round in rotating order
(load from other processes hits all methods alike); the median over rounds is reported, with the
process CPU time. Memory: each method runs alone in fresh subprocesses (RSS is process-wide; median
of ``--memory-repeats``, as peak RSS varies by a few per cent from run to run): peak
RSS on CPU, ``torch.cuda.max_memory_allocated`` after a reset on GPU.

Targets (issue 5): CPU (MiniLM) sam step ≤ 1.0 × LoRA and peak RSS ≤ 1.1 × LoRA; GPU (roberta-base-like,
bf16) step ≤ 0.95 × LoRA and peak memory ≤ 1.2 × LoRA, eager and with ``--compile``.

Run: ``python benchmarks/bench_step.py [--rounds 5] [--threads 2]`` (CPU, MiniLM), or
``python benchmarks/bench_step.py --device cuda --model-config roberta-base-like [--compile]``.
``--profile`` adds a torch.profiler table of one sam and one LoRA step. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from common import (
    MODEL_CONFIGS,
    current_rss_mb,
    device_name,
    emit,
    load_average,
    optimizer_state_bytes,
    peak_rss_mb,
    random_batch,
    task_model,
)

from sparse_ft.delta import LINEAR_GRADS, SparseDelta
from sparse_ft.methods import BuildContext, make_method_config
from sparse_ft.methods.masks import SparseDeltaTuned
from sparse_ft.train import TrainConfig, make_objective, make_optimizer, train_step

METHODS = ("full", "bitfit", "lora", "sam", "sam-definition", "masked-dense")
TARGETS = {"cpu": {"step": 1.0, "memory": 1.1}, "cuda": {"step": 0.95, "memory": 1.2}}


def build(method: str, args, batch: dict | None = None):
    """The tuned model of ``method`` on a fresh task model (on ``args.device``)."""
    model = task_model(args.model_config).to(args.device)
    context = BuildContext(mask_seed=0, device=args.device,
                           selection_batches=(lambda: iter([batch])) if batch is not None else None)
    if method in ("full", "bitfit", "lora"):
        return make_method_config(method).build(model, context)
    sam = make_method_config("sam", args.sparsity)
    if args.mask == "scored" and method == "sam":
        return sam.build(model, context)
    indices, budget = make_method_config("random", args.sparsity).select(model, context)
    if method == "masked-dense":
        return masked_dense(model, indices, context)
    tuned = SparseDeltaTuned(model, sam, indices, budget)
    if method == "sam-definition":
        for delta in tuned._deltas.values():
            delta.fast_paths = False  # this model only: θ0 + scatter per forward, dense gradients gathered
    return tuned


def masked_dense(model, indices: dict, context):
    """Full fine-tuning whose gradients are multiplied by a dense 0/1 mask (the authors' code)."""
    tuned = make_method_config("full").build(model, context)
    for name, param in model.backbone.named_parameters():
        mask = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
        if name in indices:
            mask[indices[name].to(param.device)] = 1
        mask = mask.view_as(param)
        param.register_hook(lambda grad, m=mask: grad * m)
    return tuned


class Runner:
    """A tuned model with the trainer's optimizer and objective; ``run(n)`` takes n steps."""

    def __init__(self, method: str, args, batch: dict):
        self.tuned = build(method, args, batch).train()
        config = TrainConfig(compile="on" if args.compile else "off", bf16=True)
        self.optimizer = make_optimizer(self.tuned, config, args.device)
        self.objective = make_objective(self.tuned, config, args.device)
        self.batch, self.device = batch, args.device
        self.trainable = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])

    def run(self, steps: int) -> None:
        for _ in range(steps):
            train_step(self.optimizer, self.objective, self.batch, 1.0)

    def timed(self, steps: int) -> tuple[float, float]:
        """(wall, process CPU) seconds per step."""
        sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.run(steps)
        sync(self.device)
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(args) -> None:
    """One method alone in this process: peak memory of warmup + timed steps (one JSON line)."""
    before = current_rss_mb()
    runner = Runner(args.child, args, None)
    runner.batch = random_batch(runner.tuned.model, args.batch_size, args.length, args.device)
    if args.mask == "scored" and args.child == "sam":  # the scored mask needs the batch at build time
        runner = Runner(args.child, args, runner.batch)
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    runner.run(args.warmup + args.steps)
    sync(args.device)
    cuda_peak = torch.cuda.max_memory_allocated(args.device) / 2**20 if args.device.type == "cuda" else None
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_at_start_mb": before, "cuda_peak_mb": cuda_peak}))


def measure_memory(method: str, args) -> dict:
    """One fresh subprocess running ``method`` alone; its peak memory."""
    command = [sys.executable, __file__, "--child", method, *args.passthrough]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"memory run of {method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile(runners: dict, methods: list[str], device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for method in methods:
        runners[method].run(1)
        sync(device)
        with torch_profile(activities=activities) as prof:
            runners[method].run(1)
            sync(device)
        print(f"\n--- profile of one {method} step ---")
        print(prof.key_averages().table(sort_by=key, row_limit=18))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-config", default="minilm", choices=MODEL_CONFIGS)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.005)
    p.add_argument("--mask", choices=("random", "scored"), default="random")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 1 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1, 5 with --compile)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="the trainer's compiled step")
    p.add_argument("--linear-grad", choices=LINEAR_GRADS, default="auto",
                   help="how the k gradient entries of a Linear weight are formed (SparseDelta.linear_grad)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help="fresh subprocesses per method, median (default 3 on CPU; 1 on CUDA, whose peak is exact)")
    p.add_argument("--profile", action="store_true", help="print a profile of one sam and one lora step")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])
                        if a not in ("--no-memory", "--profile")]
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    args.steps = args.steps or (20 if args.device.type == "cuda" else 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.compile else 1)
    args.memory_repeats = args.memory_repeats or (1 if args.device.type == "cuda" else 3)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    SparseDelta.linear_grad = args.linear_grad
    if args.child:
        child(args)
        return
    load_start = load_average()
    probe = task_model(args.model_config)
    batch = random_batch(probe, args.batch_size, args.length, args.device)
    del probe
    runners = {m: Runner(m, args, batch) for m in args.methods}
    for m in args.methods:
        runners[m].run(args.warmup)
    walls = {m: [] for m in args.methods}
    cpus = {m: [] for m in args.methods}
    for r in range(args.rounds):
        order = args.methods[r % len(args.methods):] + args.methods[: r % len(args.methods)]
        for m in order:
            wall, cpu = runners[m].timed(args.steps)
            walls[m].append(wall)
            cpus[m].append(cpu)
    if args.profile:
        profile(runners, [m for m in ("sam", "lora") if m in runners], args.device)
    results = {}
    for m in args.methods:
        results[m] = {"step_s": statistics.median(walls[m]), "step_s_rounds": [round(x, 5) for x in walls[m]],
                      "cpu_s": statistics.median(cpus[m]), "trainable": runners[m].trainable,
                      "optimizer_state_mb": optimizer_state_bytes(runners[m].optimizer) / 2**20}
    del runners
    if not args.no_memory:  # peak RSS varies by a few % from run to run (allocator state): median of repeats
        key = "cuda_peak_mb" if args.device.type == "cuda" else "peak_rss_mb"
        peaks = {m: [] for m in args.methods}
        for _ in range(args.memory_repeats):
            for m in args.methods:
                mem = measure_memory(m, args)
                peaks[m].append(mem[key])
                results[m]["rss_at_start_mb"] = mem["rss_at_start_mb"]
        for m in args.methods:
            results[m]["peak_mb"] = statistics.median(peaks[m])
            results[m]["peak_mb_runs"] = [round(x, 1) for x in peaks[m]]
    base = results.get("lora")
    ratios = {}
    for m, r in results.items():
        if base is None:
            break
        ratios[m] = {"step": r["step_s"] / base["step_s"]}
        if "peak_mb" in r:
            ratios[m]["memory"] = r["peak_mb"] / base["peak_mb"]
    memory_kind = "peak CUDA MB" if args.device.type == "cuda" else "peak RSS MB"
    print(f"{args.model_config}, batch {args.batch_size}x{args.length}, {device_name(args.device)}, "
          f"threads {torch.get_num_threads()}, compile {args.compile}, sam p={args.sparsity} per tensor "
          f"({args.mask} mask), load average {load_start} -> {load_average()}")
    print(f"{'method':13s} {'trainable':>11s} {'opt state MB':>12s} {'step s':>8s} {'cpu s':>8s} "
          f"{'x LoRA':>7s} {memory_kind:>13s} {'x LoRA':>7s}")
    for m, r in results.items():
        ratio = ratios.get(m, {})
        print(f"{m:13s} {r['trainable']:11,d} {r['optimizer_state_mb']:12.2f} {r['step_s']:8.3f} {r['cpu_s']:8.3f} "
              f"{ratio.get('step', float('nan')):7.3f} {r.get('peak_mb', float('nan')):13.1f} "
              f"{ratio.get('memory', float('nan')):7.3f}")
    target = TARGETS["cuda" if args.device.type == "cuda" else "cpu"]
    verdict = {}
    if "sam" in ratios:
        verdict = {f"sam_{k}_vs_lora": {"limit": limit, "value": ratios["sam"].get(k),
                                        "met": None if k not in ratios["sam"] else ratios["sam"][k] <= limit}
                   for k, limit in target.items()}
        print("targets: " + "; ".join(
            f"{k} not measured" if v["met"] is None else
            f"{k} {v['value']:.3f} <= {v['limit']}: {'met' if v['met'] else 'MISSED'}" for k, v in verdict.items()))
    emit({"benchmark": "step", "device": device_name(args.device), "device_type": args.device.type,
          "model_config": args.model_config, "batch": [args.batch_size, args.length], "sparsity": args.sparsity,
          "mask": args.mask, "threads": torch.get_num_threads(), "compile": args.compile,
          "linear_grad": args.linear_grad, "rounds": args.rounds, "steps_per_round": args.steps,
          "load_average": {"start": load_start, "end": load_average()}, "torch": torch.__version__,
          "methods": results, "ratios_vs_lora": ratios, "targets": verdict})


if __name__ == "__main__":
    main()
