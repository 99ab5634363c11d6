"""`sparse-ft export RUN_DIR --format transformers|peft --output DIR` on saved runs of the tiny BERT: the
folders load with transformers' and peft's own classes and give the run's logits at A(S)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from sparse_ft.cli import main
from sparse_ft.experiments.run import RunSpec, execute
from sparse_ft.experiments.saved import load_run


def saved_run(method: str, model_dir, data_dir, out, **options):
    spec = RunSpec(task="cb", method=method, sparsity=0.05 if method == "sam" else None, model=str(model_dir),
                   data_dir=str(data_dir), train_limit=8, eval_limit=4, device="cpu", method_options=options,
                   train_overrides={"max_steps": 2, "eval_every": 2, "batch_size": 4, "max_length": 32})
    execute(spec, progress=False, log=lambda m: None, output=out)
    return out


def probe(tokenizer) -> dict:
    return dict(tokenizer(["a premise", "another one, longer"], padding=True, return_tensors="pt"))


@pytest.mark.parametrize(("method", "fmt"), [("sam", "transformers"), ("lora", "peft")])
def test_export_writes_a_folder_that_transformers_or_peft_loads(method, fmt, tiny_model_dir, data_dir, tmp_path, capsys):
    run = saved_run(method, tiny_model_dir, data_dir, tmp_path / "run")
    assert main(["export", str(run), "--format", fmt, "--output", str(tmp_path / "out")]) == 0
    assert str(tmp_path / "out") in capsys.readouterr().out
    if fmt == "transformers":
        tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
        model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    else:
        from peft import PeftModel

        tokenizer = tf.AutoTokenizer.from_pretrained(tiny_model_dir)
        base = tf.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
        model = PeftModel.from_pretrained(base, tmp_path / "out")
    batch = probe(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, load_run(run)(batch), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_it_cannot_map_in_one_line(tiny_model_dir, data_dir, tmp_path, capsys):
    run = saved_run("sam", tiny_model_dir, data_dir, tmp_path / "run")
    assert main(["export", str(run), "--format", "peft", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "LoRA models only" in err and err.count("\n") == 1
