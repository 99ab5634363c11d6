"""Data: the paper's splits from a local jiant folder or the Hugging Face hub, tokenized and batched.

Local layout (DESIGN §3): ``DIR/<task>/{train,val,test}.jsonl``, one JSON object per line; ``test`` is
the original dev set with labels. From the hub the same protocol is applied: a seeded 90/10 split of
the official train set into train/val, and the official dev set as test.

Batches are padded to the longest sequence in the batch, optionally rounded up to a multiple or to the
next of a few bucket lengths (compiled steps: one compiled graph per length), never to a fixed length.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .errors import UserError
from .tasks import MULTIPLE_CHOICE, SPAN, TaskSpec

SPLITS = ("train", "val", "test")
DATA_ENV = "SPARSE_FT_DATA"
COPA_CONNECTIVES = {"cause": "because", "effect": "so"}


# ----------------------------------------------------------------------------- loading
def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``--data-dir``, else ``$SPARSE_FT_DATA``, else None (meaning: the Hugging Face hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not chosen:
        return None
    path = Path(chosen)
    if not path.is_dir():
        raise UserError(f"data folder {str(path)!r} does not exist")
    return path


def read_jsonl(path: Path, task: TaskSpec) -> list[dict]:
    """Read and validate one jiant JSONL file; errors name the file and line."""
    if not path.is_file():
        raise UserError(f"task file {str(path)!r} is missing (expected DIR/<task>/{{train,val,test}}.jsonl)")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: malformed JSON ({exc.msg})") from None
            if not isinstance(example, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(example).__name__}")
            missing = [f for f in (*task.fields, "label") if f not in example]
            if missing:
                raise UserError(f"{where}: missing field(s) {missing} for task {task.name}")
            task.label_index(example["label"], where)  # validates the label
            examples.append(example)
    if not examples:
        raise UserError(f"task file {str(path)!r} holds no examples")
    return examples


def examples_from_hub(task: TaskSpec, rows) -> list[dict]:
    """Turn rows of a hub dataset (an iterable of dicts) into jiant-style examples."""
    hub = task.hub
    examples = []
    for row in rows:
        example = {hub.columns.get(key, key): value for key, value in row.items()}
        if task.kind == SPAN:
            example["target"] = {k: example.pop(k) for k in
                                 ("span1_index", "span2_index", "span1_text", "span2_text")}
        if hub.label_names is not None:
            example["label"] = hub.label_names[int(example["label"])]
        examples.append(example)
    return examples


def split_hub_dataset(task: TaskSpec, dataset_dict, seed: int) -> dict[str, list[dict]]:
    """The paper's protocol on a hub ``DatasetDict``: seeded 90/10 split of train, dev as test."""
    parts = dataset_dict["train"].train_test_split(test_size=0.1, seed=seed)
    return {
        "train": examples_from_hub(task, parts["train"]),
        "val": examples_from_hub(task, parts["test"]),
        "test": examples_from_hub(task, dataset_dict["validation"]),
    }


def load_splits(task: TaskSpec, data_dir=None, split_seed: int = 0) -> dict[str, list[dict]]:
    """All three splits of ``task`` as lists of jiant-style example dicts."""
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        task_dir = folder / task.name
        if not task_dir.is_dir():
            raise UserError(f"task folder {str(task_dir)!r} does not exist")
        return {split: read_jsonl(task_dir / f"{split}.jsonl", task) for split in SPLITS}
    import datasets  # imported lazily: only the hub path needs it

    try:
        dataset_dict = datasets.load_dataset(task.hub.path, task.hub.name)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear line
        raise UserError(f"could not load {task.hub.path}/{task.hub.name} from the hub "
                        f"({type(exc).__name__}); pass --data-dir or set ${DATA_ENV}") from None
    return split_hub_dataset(task, dataset_dict, split_seed)


# ----------------------------------------------------------------------------- featurizing
def _word_char_spans(text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each whitespace-separated word: WSC span indices count these words."""
    spans, pos = [], 0
    for word in text.split():
        start = text.index(word, pos)
        spans.append((start, start + len(word)))
        pos = start + len(word)
    return spans


def _span_token_mask(offsets, word_spans, index: int, span_text: str) -> list[int]:
    n_words = len(span_text.split())
    index = min(index, len(word_spans) - 1)
    start = word_spans[index][0]
    end = word_spans[min(index + n_words, len(word_spans)) - 1][1]
    mask = [int(e > s and s < end and e > start) for s, e in offsets]
    if not any(mask):  # the span was truncated away: fall back to the first token
        mask[0] = 1
    return mask


@dataclass
class Featurizer:
    """Turns one example into model inputs for its task kind (DESIGN §2)."""

    task: TaskSpec
    tokenizer: object
    max_length: int

    def __call__(self, example: dict, where: str = "") -> dict:
        task, tok = self.task, self.tokenizer
        label = task.label_index(example["label"], where or task.name)
        if task.kind == MULTIPLE_CHOICE:
            connective = COPA_CONNECTIVES.get(example["question"], example["question"])
            firsts = [example["premise"]] * len(task.choices)
            seconds = [f"{connective} {example[c][:1].lower()}{example[c][1:]}" for c in task.choices]
            enc = tok(firsts, seconds, truncation=True, max_length=self.max_length)
            return {**{k: enc[k] for k in enc}, "labels": label}
        if task.kind == SPAN:
            text, target = example["text"], example["target"]
            enc = tok(text, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
            offsets = enc.pop("offset_mapping")
            words = _word_char_spans(text)
            feats = {k: enc[k] for k in enc}
            feats["span1_mask"] = _span_token_mask(offsets, words, target["span1_index"], target["span1_text"])
            feats["span2_mask"] = _span_token_mask(offsets, words, target["span2_index"], target["span2_text"])
            return {**feats, "labels": label}
        texts = [example[f] for f in task.fields]
        enc = tok(*texts, truncation=True, max_length=self.max_length)
        return {**{k: enc[k] for k in enc}, "labels": label}


# ----------------------------------------------------------------------------- batching
def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def length_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Padded lengths for compiled steps: powers of two from ``smallest``, and ``max_length``."""
    buckets, length = [], smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


@dataclass
class Collator:
    """Pads a list of features to the longest sequence in the batch, rounded up to ``pad_multiple`` or
    to the smallest of ``buckets`` that holds it (the longest sequence if none does)."""

    pad_token_id: int
    regression: bool = False
    pad_multiple: int | None = None
    buckets: tuple[int, ...] | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        first = features[0]["input_ids"]
        nested = bool(first) and isinstance(first[0], list)  # multiple choice: [choices][tokens]
        seqs = [f["input_ids"] for f in features]
        longest = max(len(s) for f in seqs for s in (f if nested else [f]))
        length = _round_up(longest, self.pad_multiple)
        if self.buckets:
            length = min((b for b in self.buckets if b >= length), default=length)
        batch = {}
        for key in features[0]:
            if key == "labels":
                dtype = torch.float32 if self.regression else torch.long
                batch[key] = torch.tensor([f[key] for f in features], dtype=dtype)
                continue
            pad = self.pad_token_id if key == "input_ids" else 0
            rows = [f[key] for f in features]
            if nested:
                padded = [[r + [pad] * (length - len(r)) for r in row] for row in rows]
            else:
                padded = [r + [pad] * (length - len(r)) for r in rows]
            batch[key] = torch.tensor(padded, dtype=torch.long)
        return batch


def featurize(examples: list[dict], featurizer: Featurizer, split: str = "") -> list[dict]:
    return [featurizer(ex, f"{featurizer.task.name}/{split} example {i + 1}") for i, ex in enumerate(examples)]


class SeededOrder(torch.utils.data.Sampler):
    """Epoch e visits the examples in the order of a permutation of all n, seeded by (seed, e),
    skipping the ``exclude``d ones. Leaving one example out therefore keeps the order of the others:
    the data order that leave-one-out stability needs (A(Sⁱ) sees S's order with i removed)."""

    def __init__(self, n: int, seed: int, exclude: frozenset[int] = frozenset()):
        self.n, self.seed, self.exclude = n, seed, frozenset(exclude)
        self.epoch = 0

    def __len__(self) -> int:
        return self.n - len(self.exclude)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self.epoch += 1
        return (i for i in torch.randperm(self.n, generator=generator).tolist() if i not in self.exclude)


def make_loader(features: list[dict], collator: Collator, batch_size: int, *, shuffle: bool,
                seed: int = 0, pin_memory: bool = False, exclude: frozenset[int] = frozenset()) -> DataLoader:
    """A DataLoader over featurized examples: in the seeded order of :class:`SeededOrder` when
    ``shuffle``, else in file order; ``exclude``d examples are never visited."""
    if shuffle:
        sampler = SeededOrder(len(features), seed, exclude)
    else:
        sampler = [i for i in range(len(features)) if i not in exclude]
    return DataLoader(features, batch_size=batch_size, sampler=sampler, collate_fn=collator, pin_memory=pin_memory)
