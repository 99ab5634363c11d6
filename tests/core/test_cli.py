import json
import subprocess
import sys

import pytest

import sparse_ft
from sparse_ft.cli import main
from sparse_ft.experiments.results import RESULT_FILE

REQUIRED_FIELDS = {"task", "method", "sparsity", "seed", "model", "metrics", "score", "sparsity_report", "steps",
                   "wall_seconds", "train_seconds", "peak_memory_mb"}


def _train_args(task, model, data_dir, out, *extra):
    return ["train", "--task", task, "--method", "full", "--model", str(model), "--data-dir", str(data_dir),
            "--train-limit", "8", "--eval-limit", "8", "--max-steps", "3", "--batch-size", "4", "--eval-every", "3",
            "--quiet", "--output", str(out), *extra]


@pytest.mark.parametrize("task", ["cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc"])
def test_train_writes_result_for_every_task(task, tiny_model_dir, data_dir, tmp_path, capsys):
    assert main(_train_args(task, tiny_model_dir, data_dir, tmp_path)) == 0
    result = json.loads((tmp_path / RESULT_FILE).read_text())
    assert REQUIRED_FIELDS <= set(result)
    assert result["task"] == task and result["steps"] == 3
    assert set(result["score"]) == {"val", "test"}
    assert result["score"]["test"] == result["metrics"]["test"]["major"]
    assert result["data"] == {"train": 8, "val": 8, "test": 8}
    rep = result["sparsity_report"]
    assert {"backbone_params", "budget", "changed", "realized"} <= set(rep)
    assert 0 < rep["changed"] <= rep["budget"]
    assert 0 < result["train_seconds"] <= result["wall_seconds"]
    assert f"{task} full seed 0" in capsys.readouterr().out


def _one_line_error(capsys, code, pattern):
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert pattern in err and "Traceback" not in err


@pytest.mark.parametrize("extra,pattern", [
    (["--sparsity", "1.5"], "sparsity must be in (0.0, 1.0], got 1.5"),
    (["--sparsity", "0"], "sparsity must be in (0.0, 1.0]"),
    (["--sparsity", "nan"], "sparsity must be in (0.0, 1.0], got nan"),
    (["--lr", "nan"], "lr must be in (0.0, inf], got nan"),
    (["--max-steps", "0"], "max_steps must be in [1, inf], got 0"),
])
def test_bad_parameters_give_one_line(extra, pattern, tiny_model_dir, data_dir, tmp_path, capsys):
    args = _train_args("cb", tiny_model_dir, data_dir, tmp_path)
    if extra[0] == "--sparsity":
        args[args.index("full")] = "random"
    args += extra
    _one_line_error(capsys, main(args), pattern)


@pytest.mark.parametrize("flag,value,pattern", [
    ("--task", "imdb", "unknown task 'imdb'"),
    ("--method", "prefix", "unknown method 'prefix'"),
])
def test_unknown_task_or_method(flag, value, pattern, tiny_model_dir, data_dir, tmp_path, capsys):
    args = _train_args("cb", tiny_model_dir, data_dir, tmp_path)
    args[args.index(flag) + 1] = value
    _one_line_error(capsys, main(args), pattern)


def test_bad_data_gives_file_and_line(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "data" / "cb"
    folder.mkdir(parents=True)
    good = json.dumps({"premise": "a", "hypothesis": "b", "label": "neutral"})
    (folder / "train.jsonl").write_text(good + "\n" + good + "\n{broken\n")
    for split in ("val", "test"):
        (folder / f"{split}.jsonl").write_text(good + "\n")
    _one_line_error(capsys, main(_train_args("cb", tiny_model_dir, tmp_path / "data", tmp_path)),
                    "train.jsonl:3: malformed JSON")
    (folder / "train.jsonl").write_text(good.replace("neutral", "unsure") + "\n")
    _one_line_error(capsys, main(_train_args("cb", tiny_model_dir, tmp_path / "data", tmp_path)),
                    "train.jsonl:1: unknown label 'unsure'")
    _one_line_error(capsys, main(_train_args("cb", tiny_model_dir, tmp_path / "missing", tmp_path)),
                    "data folder")


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparse_ft.cli", "train", "--task", "cb", "--method", "full",
                           "--data-dir", str(tmp_path / "missing"), "--output", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"sparse-ft: error: data folder '{tmp_path / 'missing'}' does not exist; point --data-dir")
    assert "sparse-ft fetch-data" in line


def test_tasks_and_methods_listings(capsys):
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("The paper's seven tasks (cola, stsb, mrpc, rte, cb, copa, wsc)")
    assert [line.split()[0] for line in lines if line.endswith("(extra)")] == ["sst", "wnli"]
    assert main(["methods"]) == 0
    assert "full" in capsys.readouterr().out


@pytest.mark.integration
def test_minilm_cli_run(data_dir, tmp_path, capsys):
    args = ["train", "--task", "cb", "--method", "full", "--data-dir", str(data_dir), "--train-limit", "32",
            "--eval-limit", "16", "--max-steps", "4", "--quiet", "--output", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / RESULT_FILE).read_text())
    assert result["model"] == "minilm"
    assert result["sparsity_report"]["backbone_params"] == 22_565_376  # all-MiniLM-L6-v2 without its pooler


def test_bounds_command(capsys, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bounds", "--rho", "1.0", "--lambda-min", "0.5", "--sparsity", "0.25", "--n", "100",
                 "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    theorem1 = payload["bounds"][0]
    assert theorem1["value"] == pytest.approx(2 * 1.0 / ((0.5 + 2 * 0.75) * 100))
    assert "Theorem 1" in capsys.readouterr().out
    assert main(["bounds", "--rho", "1.0", "--lambda-min", "-3", "--sparsity", "0.25", "--n", "100"]) == 0
    assert "VACUOUS" in capsys.readouterr().out
    _one_line_error(capsys, main(["bounds", "--rho", "1", "--lambda-min", "0", "--sparsity", "2", "--n", "5"]),
                    "p must lie in (0, 1]")


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_help_lists_only_what_applies_and_describes_every_flag(capsys):
    spectrum = _help("spectrum", capsys)
    assert "--run" in spectrum and "--max-lanczos-steps" in spectrum
    for training_only in ("--lr", "--max-steps", "--eval-every", "--compile", "--eval-limit"):
        assert training_only not in spectrum
    from sparse_ft.cli import build_parser

    bounds = build_parser()._subparsers._group_actions[0].choices["bounds"]
    undocumented = [a.dest for a in bounds._actions if a.dest != "help" and not a.help]
    assert undocumented == []
    assert "2 rho^2" in _help("bounds", capsys)


def test_methods_listing_shows_effective_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ratio=0.9" in out and "apply_to='linear'" in out  # mixout's r and its resolved 'auto'
    assert "p fixed by the method" in out and "p = 0.005" in out


def test_bounds_holds_on_a_ridge_like_case_and_says_why_when_vacuous(capsys, tmp_path):
    """The README's two examples: a case where the assumptions hold (a bound), and a vacuous one (null + reason)."""
    out = tmp_path / "b.json"
    assert main(["bounds", "--rho", "0.5", "--lambda-min", "0.1", "--sparsity", "0.01", "--n", "200",
                 "--risk", "0.2", "--json", str(out)]) == 0
    theorem1, theorem2 = json.loads(out.read_text())["bounds"]
    assert theorem1["value"] == pytest.approx(2 * 0.25 / ((0.1 + 2 * 0.99) * 200))
    assert theorem2["value"] > 0.2 and not theorem1["vacuous"]
    assert main(["bounds", "--rho", "2", "--lambda-min", "-4.25", "--sparsity", "0.005", "--n", "224",
                 "--json", str(out)]) == 0
    raw = out.read_text()
    assert "Infinity" not in raw
    vacuous = json.loads(raw)["bounds"][0]
    assert vacuous["value"] is None and vacuous["failed_assumption"] == "relaxed_strong_convexity"


def test_spectrum_default_is_certified_on_a_small_subspace(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["spectrum", "--task", "cb", "--method", "bitfit", "--model", str(tiny_model_dir), "--data-dir",
                 str(data_dir), "--examples", "8", "--device", "cpu", "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["converged"] and m["starts_agree"] and m["point"] == "theta0"
    assert "certified" in capsys.readouterr().out


def test_a_local_model_folder_that_does_not_exist_is_named(tiny_model_dir, data_dir, tmp_path, capsys):
    args = _train_args("cb", tiny_model_dir, data_dir, tmp_path)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    _one_line_error(capsys, main(args), f"model folder '{tmp_path / 'no-such-model'}' does not exist")


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"sparse-ft {sparse_ft.__version__}"
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "(default: 30)" in capsys.readouterr().out  # --lanczos-steps: what a run costs is predictable


def test_a_closed_pipe_ends_quietly():
    """`sparse-ft tasks | head -1`: the reader goes away before the listing is written."""
    proc = subprocess.Popen([sys.executable, "-m", "sparse_ft.cli", "tasks"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
