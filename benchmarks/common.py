"""Helpers shared by the step, optimizer-state, sweep and replica benchmarks (not bench_hvp/bench_lanczos).

Every benchmark prints a small table and, as its last line, one JSON object with the device name, the
load average before and after (the machine may be shared) and its raw figures and ratios.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_x.py` from a checkout
    sys.path.insert(0, str(ROOT))

MODEL_CONFIGS = ("minilm", "roberta-base-like", "tiny")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its logical CPU count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def peak_rss_mb() -> float:
    """Peak resident set size of this process: VmHWM, the high-water mark of its own address space.

    Not ``getrusage().ru_maxrss``: Linux folds the RSS of the address space an ``exec`` replaces (the
    parent's, right after fork) into it, so a fresh subprocess would report its parent's size."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def task_model(model_config: str, task: str = "cb", seed: int = 0):
    """A TaskModel: the pretrained MiniLM (CPU target), a random-init roberta-base-sized encoder (GPU
    target: hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 50265), or a tiny random BERT."""
    from sparse_ft.models import TaskModel, backbone_from_config, build_task_model
    from sparse_ft.tasks import get_task

    quiet()
    torch.manual_seed(seed)
    if model_config == "minilm":
        return build_task_model(get_task(task), "minilm", head_seed=seed)
    if model_config == "roberta-base-like":
        from transformers import RobertaConfig

        config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    elif model_config == "tiny":
        from transformers import BertConfig

        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                            vocab_size=30522, max_position_embeddings=512)
    else:
        raise SystemExit(f"unknown --model-config {model_config!r}; choose from {MODEL_CONFIGS}")
    return TaskModel(backbone_from_config(config), get_task(task), head_seed=seed)


def random_batch(model, batch_size: int, length: int, device: torch.device, seed: int = 0) -> dict:
    """Random token ids (no padding, so every batch has the full length) and labels of a 3-way task."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.backbone.config.vocab_size
    batch = {"input_ids": torch.randint(5, vocab, (batch_size, length), generator=generator),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
             "token_type_ids": torch.zeros(batch_size, length, dtype=torch.long),
             "labels": torch.randint(0, 3, (batch_size,), generator=generator)}
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim() > 0)


def emit(payload: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(payload, sort_keys=False))
