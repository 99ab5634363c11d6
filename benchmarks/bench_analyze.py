"""What ``sparse-ft analyze`` costs per run, as a ratio to that run's training time (MiniLM, CPU).

Default: trains one run per method with the converged protocol (``--preset converge``: n training examples
until the mean loss is below 1e-3) and analyses it at A(S) (the subspace spectrum from two Lanczos starts,
‖∇L̂‖, ρ̂ at A(S) and θ0, the risks), timing both in this process; the ratio is analyze seconds / training
seconds (the whole ``execute``: data, model, selection, training, evaluation, saving). ``--runs ROOT``
instead reads the runs of a sweep that ``sparse-ft analyze`` has already measured (``analysis.json``'s
``seconds`` against ``result.json``'s ``wall_seconds``).

Run: ``python benchmarks/bench_analyze.py [--methods sam,lora,bitfit] [--n 32]`` or
``python benchmarks/bench_analyze.py --runs runs/cb-converge``. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import device_name, emit, load_average

from sparse_ft.experiments.analyze import AnalyzeSettings, analyze_run
from sparse_ft.experiments.results import ANALYSIS_FILE, RESULT_FILE
from sparse_ft.experiments.run import RunSpec, execute, quiet_libraries

PEFT_LR = 1e-3


def measure(method: str, n: int, data_dir: str, folder: Path, lanczos_steps: int) -> dict:
    spec = RunSpec(task="cb", method=method, sparsity=0.005 if method == "sam" else None, data_dir=data_dir,
                   preset="converge", train_limit=n, device="cpu",
                   train_overrides={} if method == "full" else {"lr": PEFT_LR})
    start = time.perf_counter()
    result = execute(spec, progress=False, log=lambda msg: None, output=folder)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    record = analyze_run(folder, AnalyzeSettings(lanczos_steps=lanczos_steps, device="cpu"))
    analyze_seconds = time.perf_counter() - start
    return {"method": method, "steps": result["steps"], "stop": result["stop"], "dim": record["dim"],
            "hvps": record["hvps"], "train_s": train_seconds, "analyze_s": analyze_seconds,
            "ratio": analyze_seconds / train_seconds}


def from_runs(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.rglob(ANALYSIS_FILE)):  # the subspace analyses
        record, result = json.loads(path.read_text()), json.loads((path.parent / RESULT_FILE).read_text())
        rows.append({"method": f"{record['method']}@{record['sparsity']:.4g}", "steps": result["steps"],
                     "stop": result.get("stop"), "dim": record["dim"], "hvps": record["hvps"],
                     "train_s": result["wall_seconds"], "analyze_s": record["seconds"],
                     "ratio": record["seconds"] / result["wall_seconds"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="sam,lora,bitfit")
    p.add_argument("--n", type=int, default=32, help="training examples (the converged protocol's n)")
    p.add_argument("--lanczos-steps", type=int, default=30)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"))
    p.add_argument("--runs", help="summarise an analysed sweep instead of training here")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    load_before = load_average()
    if args.runs:
        rows = from_runs(Path(args.runs))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [measure(m, args.n, args.data_dir, Path(tmp) / m, args.lanczos_steps)
                    for m in args.methods.split(",")]
    print(f"{'run':<14} {'steps':>5} {'stop':>10} {'dim':>11} {'HVPs':>5} {'train s':>8} {'analyze s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['method']:<14} {r['steps']:>5} {r['stop']!s:>10} {r['dim']:>11,} {r['hvps']:>5} "
              f"{r['train_s']:>8.1f} {r['analyze_s']:>9.1f} {r['ratio']:>6.2f}")
    ratios = [r["ratio"] for r in rows]
    emit({"benchmark": "analyze_cost", "device": device_name(torch.device("cpu")), "load_before": load_before,
          "load_after": load_average(), "rows": rows,
          "median_ratio": statistics.median(ratios) if ratios else None})


if __name__ == "__main__":
    main()
