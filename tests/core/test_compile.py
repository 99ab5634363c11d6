"""The trainer's ``compile`` option: configuration, length buckets, the optimizer it picks, a refusal
without a compiler, and (integration: torch.compile takes a minute on a small CPU) the same losses as
eager; the CUDA path end to end when a GPU is present."""

import argparse

import pytest
import torch

from sparse_ft import train as train_mod
from sparse_ft.cli import add_run_arguments, spec_from_args
from sparse_ft.data import Collator, length_buckets
from sparse_ft.errors import UserError
from sparse_ft.methods import BuildContext, make_method_config
from sparse_ft.train import TrainConfig, compiles, make_objective, make_optimizer, preset, train
from tests.conftest import tiny_task_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def tiny_tuned(method: str = "random"):
    model = tiny_task_model("cb", seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = make_method_config(method, 0.05) if method == "random" else make_method_config(method)
    return config.build(model, BuildContext())


def batches(n: int = 3, length: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 30000, (4, length), generator=generator),
             "attention_mask": torch.ones(4, length, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=generator)} for _ in range(n)]


def test_compile_choices_and_presets():
    assert preset("paper").compile == "cuda" and preset("cpu").compile == "off"
    assert compiles(preset("paper"), CUDA) and not compiles(preset("paper"), CPU)
    assert compiles(TrainConfig(compile="on"), CPU) and not compiles(TrainConfig(), CUDA)
    with pytest.raises(UserError, match="compile must be one of"):
        preset("cpu", compile="yes")


def test_cli_flag_sets_the_override():
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    base = ["--task", "cb", "--method", "lora"]
    assert spec_from_args(parser.parse_args([*base, "--compile"])).train_overrides["compile"] == "on"
    assert spec_from_args(parser.parse_args([*base, "--no-compile"])).train_overrides["compile"] == "off"
    assert "compile" not in spec_from_args(parser.parse_args(base)).train_overrides


def test_length_buckets_pad_to_few_lengths():
    assert length_buckets(256) == (32, 64, 128, 256) and length_buckets(100) == (32, 64, 100)
    collate = Collator(pad_token_id=0, buckets=length_buckets(128))
    features = [{"input_ids": [5] * n, "attention_mask": [1] * n, "labels": 0} for n in (3, 40)]
    assert collate(features)["input_ids"].shape == (2, 64)
    assert collate(features[:1])["input_ids"].shape == (1, 32)
    assert Collator(pad_token_id=0)(features)["input_ids"].shape == (2, 40)  # no buckets: longest


def test_optimizer_is_fused_only_when_compiling_on_cuda():
    tuned = tiny_tuned()
    eager = make_optimizer(tuned, TrainConfig(), CPU)
    compiled_cpu = make_optimizer(tuned, TrainConfig(compile="on"), CPU)
    assert not eager.defaults["fused"] and not compiled_cpu.defaults["fused"]


def test_compile_on_cpu_without_a_compiler_is_refused(monkeypatch):
    monkeypatch.setattr(train_mod.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        make_objective(tiny_tuned(), TrainConfig(compile="on"), CPU)


def _losses(method: str, compile_mode: str) -> list[float]:
    torch.manual_seed(0)
    config = TrainConfig(max_steps=4, eval_every=4, batch_size=4, bf16=False, check_every=1, min_steps=0,
                         lr=1e-2, compile=compile_mode)
    data = batches()
    return [entry["loss"] for entry in train(tiny_tuned(method), data, data, config, CPU, progress=False).losses]


@pytest.mark.integration
@pytest.mark.parametrize("method", ["random", "lora"])
def test_compiled_step_gives_the_eager_losses_on_cpu(method):
    eager, compiled = _losses(method, "off"), _losses(method, "on")
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


@pytest.mark.gpu
def test_cuda_step_eager_and_compiled_agree():
    data = [{k: v.pin_memory() for k, v in b.items()} for b in batches(length=32)]
    results = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        config = TrainConfig(max_steps=6, eval_every=6, batch_size=4, check_every=2, min_steps=0, lr=1e-3,
                             compile=mode)  # bf16 autocast on CUDA, as the paper preset
        tuned = tiny_tuned()
        outcome = train(tuned, data, data, config, CUDA, progress=False)
        results[mode] = [entry["loss"] for entry in outcome.losses]
        assert 0 < tuned.sparsity_report().changed <= tuned.sparsity_report().budget
    assert results["on"] == pytest.approx(results["off"], rel=2e-2, abs=2e-2)


def _bench_step(capsys, *argv: str) -> dict:
    """benchmarks/bench_step.py in-process on the tiny model; its last line of JSON."""
    import importlib
    import json
    import sys
    from pathlib import Path

    from sparse_ft.delta import SparseDelta

    threads, linear_grad = torch.get_num_threads(), SparseDelta.linear_grad  # the script sets both
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        importlib.import_module("bench_step").main(["--model-config", "tiny", "--batch-size", "2", "--length", "16",
                                                    "--rounds", "1", "--no-memory", "--methods", "lora,sam",
                                                    *argv])
    finally:
        sys.path.pop(0)
        torch.set_num_threads(threads)
        SparseDelta.linear_grad = linear_grad
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_step_benchmark_runs_and_reports_ratios_against_lora(capsys):
    report = _bench_step(capsys, "--threads", "1")
    assert report["device_type"] == "cpu" and report["ratios_vs_lora"]["lora"]["step"] == 1.0
    assert report["methods"]["sam"]["trainable"] > report["methods"]["lora"]["trainable"] > 0


@pytest.mark.gpu
def test_step_benchmark_on_cuda(capsys):
    report = _bench_step(capsys, "--device", "cuda", "--steps", "3")
    assert report["device_type"] == "cuda" and report["ratios_vs_lora"]["sam"]["step"] > 0
