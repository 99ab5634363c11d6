import json
import os
import subprocess
import sys
import time

import pytest

from sparse_ft.errors import UserError
from sparse_ft.experiments import sweep as sweep_mod
from sparse_ft.experiments.report import build_table, to_markdown, write_report
from sparse_ft.experiments.results import ERROR_FILE, RESULT_FILE
from sparse_ft.experiments.sweep import SweepSpec, load_sweep_file, run_dir, run_sweep


def _sweep(tiny_model_dir, data_dir, seeds=(0, 1), **kw):
    return SweepSpec(tasks=["cb"], methods=["full"], seeds=list(seeds),
                     run={"model": str(tiny_model_dir), "data_dir": str(data_dir), "train_limit": 8, "eval_limit": 8},
                     train={"max_steps": 2, "batch_size": 4, "eval_every": 2}, **kw)


def test_sweep_runs_then_skips_finished_runs(tiny_model_dir, data_dir, tmp_path):
    sweep = _sweep(tiny_model_dir, data_dir)
    assert run_sweep(sweep, tmp_path, progress=False) == {"runs": 2, "skipped": 0, "done": 2, "failed": 0}
    first = run_dir(tmp_path, sweep.runs()[0]) / RESULT_FILE
    stamp = first.stat().st_mtime_ns
    assert run_sweep(sweep, tmp_path, progress=False) == {"runs": 2, "skipped": 2, "done": 0, "failed": 0}
    assert first.stat().st_mtime_ns == stamp


def test_failures_are_recorded_and_do_not_stop_the_others(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    real = sweep_mod.execute

    def flaky(spec, **kw):
        if spec.seed == 0:
            raise RuntimeError("out of memory (simulated)")
        return real(spec, **kw)

    monkeypatch.setattr(sweep_mod, "execute", flaky)
    sweep = _sweep(tiny_model_dir, data_dir)
    summary = run_sweep(sweep, tmp_path, progress=False)
    assert summary["failed"] == 1 and summary["done"] == 1
    error = json.loads((run_dir(tmp_path, sweep.runs()[0]) / ERROR_FILE).read_text())
    assert "out of memory (simulated)" in error["error"]
    assert (run_dir(tmp_path, sweep.runs()[1]) / RESULT_FILE).exists()


def test_interrupted_sweep_resumes_without_losing_finished_runs(tiny_model_dir, data_dir, tmp_path):
    cmd = [sys.executable, "-m", "sparse_ft.cli", "sweep", "--tasks", "cb", "--methods", "full",
           "--seeds", "0,1,2,3", "--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--train-limit", "8",
           "--eval-limit", "8", "--max-steps", "2", "--batch-size", "4", "--quiet", "--output", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.rglob(RESULT_FILE)):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in tmp_path.rglob(RESULT_FILE)}
    assert 1 <= len(finished) < 4, "the kill should land mid-sweep"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"{len(finished)} already done" in out
    assert len(list(tmp_path.rglob(RESULT_FILE))) == 4
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in finished.items())


@pytest.mark.parametrize("body,pattern", [
    ('tasks = ["cb"]\nmethods = ["full"]\nlearning_rate = 1\n', r"sweep.toml:3: unknown key 'learning_rate'"),
    ('tasks = ["cb"]\n\nmethods = ["full", "prefix"]\n', r"sweep.toml:3: unknown method 'prefix'"),
    ('tasks = ["imdb"]\nmethods = ["full"]\n', r"sweep.toml:1: unknown task 'imdb'"),
    ('tasks = ["cb"]\nmethods = ["full"]\nsparsities = [0.01, 2.0]\n', r"sweep.toml:3: sparsity must be in \(0.0, 1.0\]"),
    ('tasks = ["cb"]\nmethods = ["full"]\nmax_steps = 0\n', r"sweep.toml:3: max_steps must be in \[1, inf\]"),
])
def test_bad_sweep_file_is_rejected_with_its_line(body, pattern, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(body)
    with pytest.raises(UserError, match=pattern):
        load_sweep_file(path)


def test_sweep_file_expands_the_grid(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('tasks = ["cb", "rte"]\nmethods = ["full"]\nseeds = [0, 1, 2]\nmax_steps = 5\n')
    sweep = load_sweep_file(path)
    assert len(sweep.runs()) == 6 and sweep.train == {"max_steps": 5}


def test_parallel_jobs(tiny_model_dir, data_dir, tmp_path):
    summary = run_sweep(_sweep(tiny_model_dir, data_dir), tmp_path, jobs=2, progress=False)
    assert summary["done"] == 2


@pytest.mark.integration
def test_ray_executor_with_a_local_instance(tiny_model_dir, data_dir, tmp_path):
    pytest.importorskip("ray")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    try:
        summary = run_sweep(_sweep(tiny_model_dir, data_dir), tmp_path, executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert summary["done"] == 2
    assert len(list(tmp_path.rglob(RESULT_FILE))) == 2


def _fake(method, task, seed, score, sparsity=0.005):
    return {"method": method, "task": task, "seed": seed, "sparsity": sparsity, "score": {"test": score}}


def test_table_means_stds_ranks_and_avg():
    results = [_fake("full", "cb", s, v) for s, v in enumerate([60.0, 70.0])]
    results += [_fake("sam", "cb", s, v) for s, v in enumerate([80.0, 80.0])]
    results += [_fake("lora", "cb", s, v) for s, v in enumerate([50.0, 52.0])]
    results += [_fake("bitfit", "cb", 0, 40.0)]
    table = build_table(results)
    assert table.mean_std("full", "cb") == pytest.approx((65.0, 7.0710678))
    assert table.ranks("cb") == {"sam": 1, "full": 2, "lora": 3, "bitfit": 4}
    assert table.mean_std("sam", "avg") == pytest.approx((80.0, 0.0))
    md = to_markdown(table)
    assert "80.00 ± 0.00 [1]" in md and "| bitfit | 40.00 | 40.00 |" in md  # one seed: no std; 4th: no rank


def test_report_skips_and_reports_corrupt_results(tmp_path):
    good = tmp_path / "runs" / "a" / RESULT_FILE
    good.parent.mkdir(parents=True)
    good.write_text(json.dumps(_fake("sam", "cb", 0, 70.0)))
    bad = tmp_path / "runs" / "b" / RESULT_FILE
    bad.parent.mkdir(parents=True)
    bad.write_text('{"method": "sam", "task": "cb", "sco')
    lines = write_report(tmp_path / "runs", tmp_path / "out")
    assert any("unreadable result" in line and str(bad) in line for line in lines)
    assert "| sam | 70.00 [1] |" in (tmp_path / "out" / "table1.md").read_text()


def test_a_csv_task_file_trains_through_a_parallel_sweep(tiny_model_dir, tmp_path):
    """A task file where a task name goes: the sweep's spawned workers resolve it by its path, the run folder
    is named after the task, and the report groups by that name."""
    from tests.core.test_task_files import _reviews

    task_file = _reviews(tmp_path / "reviews")
    sweep = SweepSpec(tasks=[str(task_file)], methods=["bitfit", "full"], seeds=[0],
                      run={"model": str(tiny_model_dir), "device": "cpu"},
                      train={"max_steps": 2, "eval_every": 2, "batch_size": 2, "max_length": 32})
    summary = run_sweep(sweep, tmp_path / "out", jobs=2, progress=False)
    assert summary["done"] == 2 and summary["failed"] == 0
    results = sorted((tmp_path / "out").rglob(RESULT_FILE))
    assert [p.relative_to(tmp_path / "out").parts[0] for p in results] == ["reviews", "reviews"]
    assert {json.loads(p.read_text())["task"] for p in results} == {"reviews"}
    assert "| REVIEWS |" in to_markdown(build_table([json.loads(p.read_text()) for p in results]))
