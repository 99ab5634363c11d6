"""Data: the paper's splits from a local jiant folder, a task file's own files or the Hugging Face hub,
tokenized and batched.

Where a task's data comes from (DESIGN §3, §7), in order: a task file's ``[files]``; the data folder
(``--data-dir``, else ``$SPARSE_FT_DATA``) laid out as ``DIR/<task>/{train,val,test}.jsonl``, one JSON
object per line, ``test`` being the original dev set with labels; else the hub, with the same protocol:
a seeded 90/10 split of the official train set into train/val, and the official dev set as test.
:func:`require_task_data` checks all of that before any work starts; :func:`fetch_data` writes the
hub's tasks in the local layout (``sparse-ft fetch-data``).

Batches are padded to the longest sequence in the batch, optionally rounded up to a multiple or to the
next of a few bucket lengths (compiled steps: one compiled graph per length), never to a fixed length.
"""

from __future__ import annotations

import csv
import json
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .errors import UserError
from .tasks import MULTIPLE_CHOICE, SPAN, SPAN_KEYS, SPLITS, TASKS, HubSource, TaskSpec, get_task

DATA_ENV = "SPARSE_FT_DATA"
COPA_CONNECTIVES = {"cause": "because", "effect": "so"}
HUB_TIMEOUT_S = 5.0  # one probe of the hub before any work; no retries
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class DataWarning(UserWarning):
    """A data file holds something odd that was repaired (a WSC span index that misses its text)."""


# ----------------------------------------------------------------------------- where the data is
def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``--data-dir``, else ``$SPARSE_FT_DATA``, else None (meaning: the Hugging Face hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not chosen:
        return None
    path = Path(chosen)
    if not path.is_dir():
        raise UserError(f"data folder {str(path)!r} does not exist; {_fetch_hint([], str(path))}")
    return path


def _fetch_hint(names: Iterable[str], folder: str | None) -> str:
    target = folder or "DIR"
    listed = " ".join(names)
    return (f"point --data-dir or ${DATA_ENV} at a folder that has <task>/{{train,val,test}}.jsonl, or, where the "
            f"Hugging Face hub is reachable, run `sparse-ft fetch-data {listed + ' ' if listed else ''}--output "
            f"{target}` and then pass --data-dir {target}")


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for name in OFFLINE_ENVS)


def _hub_cached(hub: HubSource) -> bool:
    """Offline mode: whether ``datasets`` can build ``hub`` from its local cache (no network)."""
    import datasets

    try:
        datasets.load_dataset_builder(hub.path, hub.name)
    except Exception:  # noqa: BLE001 - any failure means: not usable offline
        return False
    return True


def _hub_probe(hub: HubSource, timeout: float) -> str | None:
    """One HEAD request for ``hub``'s dataset page, no retries: None when the hub answers, else why not."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/api/datasets/{hub.path}", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return f"the hub has no dataset {hub.path!r}"
        return None  # it answered: load_dataset reports anything else (gated, rate-limited) itself
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"the Hugging Face hub ({endpoint}) is unreachable ({reason})"
    return None


def hub_unavailable(sources: Iterable[HubSource], timeout: float = HUB_TIMEOUT_S) -> str | None:
    """None when the hub can serve every dataset in ``sources``, else one phrase saying why not.

    With ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) set, the network is not touched: each dataset
    must be in the local ``datasets`` cache. Otherwise one HEAD request per dataset id, ``timeout``
    seconds each and no retries, so an unreachable hub is reported in seconds rather than minutes."""
    unique = {(h.path, h.name): h for h in sources}
    if _offline():
        absent = [str(h) for h in unique.values() if not _hub_cached(h)]
        return f"HF_HUB_OFFLINE is set and {', '.join(absent)} is not in the local cache" if absent else None
    for path in dict.fromkeys(h.path for h in unique.values()):
        reason = _hub_probe(next(h for h in unique.values() if h.path == path), timeout)
        if reason:
            return reason
    return None


def require_task_data(tasks: Iterable[str | TaskSpec], data_dir: str | os.PathLike | None = None,
                      timeout: float = HUB_TIMEOUT_S) -> Path | str | None:
    """Check, before any work, that every split of every task can be read; return where they come from.

    ``tasks`` are task names, task file paths or specs; ``data_dir`` is ``--data-dir`` (None: then
    ``$SPARSE_FT_DATA``). Returns the data folder when some task reads from it (a Path), else ``"hub"``
    when some task comes from the hub, else None (every task is a task file with its own files). Raises one :class:`UserError`
    line listing every missing file (or why the hub cannot be used) and what to run:
    ``sparse-ft fetch-data TASK... --output DIR``, then ``--data-dir DIR`` or ``$SPARSE_FT_DATA``."""
    specs = [get_task(t) for t in tasks]
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    folder = Path(chosen) if chosen else None
    missing, absent_tasks, hub_tasks, folder_tasks = [], [], [], []
    for task in specs:
        if task.files is not None:
            missing += [f"{p} (from {task.source})" for p in task.files.values() if not p.is_file()]
        elif task.hub is not None and (folder is None or task.source is not None):
            hub_tasks.append(task)
        elif folder is None:
            missing.append(f"{task.name} (no files, no hub dataset)")
        else:
            folder_tasks.append(task)
            lacking = [s for s in SPLITS if not (folder / task.name / f"{s}.jsonl").is_file()]
            if lacking:
                absent_tasks.append(task.name)
                names = lacking[0] if len(lacking) == 1 else "{" + ",".join(lacking) + "}"
                missing.append(str(folder / task.name / f"{names}.jsonl"))
    if folder is not None and not folder.is_dir() and absent_tasks:
        raise UserError(f"data folder {str(folder)!r} does not exist; {_fetch_hint(absent_tasks, str(folder))}")
    if missing:
        hint = f"; {_fetch_hint(absent_tasks, str(folder))}" if absent_tasks else ""
        raise UserError(f"missing task data: {', '.join(missing)}{hint}")
    if hub_tasks:
        reason = hub_unavailable([t.hub for t in hub_tasks], timeout)
        if reason:
            names = [t.name for t in hub_tasks if t.source is None]  # registry tasks: fetch-data knows them
            where = f"no --data-dir or ${DATA_ENV} given, and " if folder is None else ""
            hint = f"{_fetch_hint(names, None)}, or" if names else "or"
            raise UserError(f"no data for {', '.join(t.name for t in hub_tasks)}: {where}{reason}; "
                            f"{hint} set HF_HUB_OFFLINE=1 to read a local hub cache")
    return folder if folder_tasks else "hub" if hub_tasks else None


def describe_data_source(task: TaskSpec, data_dir: str | os.PathLike | None = None) -> str:
    """Where ``task``'s data would come from, in a few words, without touching the network:
    its task file's files, the local folder (when all three splits are there) or the hub only."""
    if task.files is not None:
        return "files: " + ", ".join(str(p) for p in task.files.values())
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    hub = f"hub {task.hub}" if task.hub is not None else "no hub dataset"
    if task.source is not None or not chosen:
        return f"{hub} (no local folder: --data-dir or ${DATA_ENV})" if task.source is None else hub
    local = Path(chosen) / task.name
    if all((local / f"{s}.jsonl").is_file() for s in SPLITS):
        return f"local {local}"
    return f"not in {chosen}, {hub} only: `sparse-ft fetch-data {task.name} --output {chosen}` writes it there"


# ----------------------------------------------------------------------------- reading and checking
_EDGE_PUNCT = "\"'`.,;:!?()[]{}<>«»“”‘’"


def _norm_word(word: str) -> str:
    """A word as WSC span texts spell it: lower case, no punctuation at its edges, no possessive 's."""
    word = word.lower().strip(_EDGE_PUNCT)
    return re.sub(r"['’]s$", "", word)


def resolve_span_index(words: list[str], index, span_text, key: str, where: str) -> int:
    """The word index of ``span_text`` in ``words`` (the whitespace-split text), checking ``index``.

    Words compare case-insensitively, without edge punctuation or a possessive 's. When the words at
    ``index`` are not the span's, the nearest exact occurrence of the span is taken and a
    :class:`DataWarning` names ``where`` (file:line); with no occurrence, :class:`UserError`."""
    if isinstance(index, str) and re.fullmatch(r"\s*-?\d+\s*", index):
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int) or not isinstance(span_text, str) or not span_text.split():
        raise UserError(f"{where}: {key}_index {index!r} / {key}_text {span_text!r} is not a word index and a text")
    target = [_norm_word(w) for w in span_text.split()]
    n = len(target)

    def at(i: int) -> bool:
        return 0 <= i and i + n <= len(words) and [_norm_word(w) for w in words[i:i + n]] == target

    if at(index):
        return index
    found = repr(" ".join(words[index:index + n])) if 0 <= index < len(words) else "nothing (out of range)"
    occurrences = [i for i in range(len(words)) if at(i)]
    if not occurrences:
        raise UserError(f"{where}: {key}_text {span_text!r} occurs nowhere in the text "
                        f"({key}_index {index} points at {found})")
    best = min(occurrences, key=lambda i: (abs(i - index), i))
    warnings.warn(f"{where}: {key}_index {index} points at {found}, not {span_text!r}; "
                  f"using its nearest occurrence, word {best}", DataWarning, stacklevel=2)
    return best


def check_example(task: TaskSpec, example: dict, where: str) -> dict:
    """``example`` validated for ``task``: every field present, inputs are text, the label is known;
    for span tasks the span fields gathered into ``target`` (from the top level, as CSV and the hub
    hold them) and each span index checked against its text (:func:`resolve_span_index`).

    Returns the example, a corrected copy when a span index was repaired. Raises :class:`UserError`
    naming ``where`` (file:line)."""
    if task.kind == SPAN and "target" not in example and all(k in example for k in SPAN_KEYS):
        example = {**{k: v for k, v in example.items() if k not in SPAN_KEYS},
                   "target": {k: example[k] for k in SPAN_KEYS}}
    missing = [f for f in (*task.fields, task.label_field) if f not in example]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing} for task {task.name}")
    for name in task.fields:
        if name != "target" and not isinstance(example[name], str):
            raise UserError(f"{where}: field {name!r} must be text, got {example[name]!r}")
    task.label_index(example[task.label_field], where)  # validates the label
    if task.kind == SPAN:
        target = example["target"]
        if not isinstance(target, dict) or any(k not in target for k in SPAN_KEYS):
            raise UserError(f"{where}: 'target' must hold {list(SPAN_KEYS)}")
        words = example[task.fields[0]].split()
        fixed = {**target, **{f"{s}_index": resolve_span_index(words, target[f"{s}_index"], target[f"{s}_text"], s,
                                                                 where) for s in ("span1", "span2")}}
        if fixed != target:
            example = {**example, "target": fixed}
    return example


def _examples_or_fail(path: Path, examples: list[dict]) -> list[dict]:
    if not examples:
        raise UserError(f"task file {str(path)!r} holds no examples")
    return examples


def read_jsonl(path: Path, task: TaskSpec) -> list[dict]:
    """Read and check one JSONL file (one object per line); errors and warnings name the file and line."""
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
                raise UserError(f"{where}: malformed JSON ({exc.msg} column {exc.colno})") from None
            if not isinstance(example, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(example).__name__}")
            examples.append(check_example(task, example, where))
    return _examples_or_fail(path, examples)


def read_csv(path: Path, task: TaskSpec) -> list[dict]:
    """Read and check one CSV file with a header row (the csv module; quoted fields may span lines);
    errors name the file and the line a bad row starts on."""
    if not path.is_file():
        raise UserError(f"task file {str(path)!r} is missing")
    examples = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if not header:
                raise UserError(f"{path}:1: no header row")
            start = reader.line_num + 1
            for row in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise UserError(f"{where}: {len(row)} field(s), the header has {len(header)}")
                examples.append(check_example(task, dict(zip(header, row)), where))
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return _examples_or_fail(path, examples)


def read_examples(path: Path, task: TaskSpec) -> list[dict]:
    """The checked examples of one .jsonl or .csv file."""
    return read_csv(path, task) if Path(path).suffix.lower() == ".csv" else read_jsonl(Path(path), task)


def load_hub_dataset(hub: HubSource):
    """``datasets.load_dataset(hub.path, hub.name)``: every split of a hub dataset, as a mapping from
    split name to a ``datasets.Dataset``. The one place sparse-ft calls the hub (tests replace it)."""
    import datasets  # imported lazily: only the hub path needs it

    try:
        return datasets.load_dataset(hub.path, hub.name)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"could not load {hub} from the hub ({type(exc).__name__}{': ' + first if first else ''}); "
                        f"pass --data-dir or set ${DATA_ENV}") from None


def examples_from_hub(task: TaskSpec, rows) -> list[dict]:
    """Turn rows of a hub dataset (an iterable of dicts) into jiant-style examples (unchecked)."""
    hub = task.hub
    examples = []
    for row in rows:
        example = {hub.columns.get(key, key): value for key, value in row.items()}
        if task.kind == SPAN and all(k in example for k in SPAN_KEYS):
            example["target"] = {k: example.pop(k) for k in SPAN_KEYS}
        label = example.get(task.label_field)
        if hub.label_names is not None and isinstance(label, int) and not isinstance(label, bool):
            example[task.label_field] = hub.label_names[label]
        examples.append(example)
    return examples


def split_hub_dataset(task: TaskSpec, dataset_dict, seed: int) -> dict[str, list[dict]]:
    """The paper's protocol on a hub ``DatasetDict``: the hub splits ``task.hub.splits`` names; without a
    val split, a seeded 90/10 split of train (train/val), dev as test. Examples are unchecked."""
    names = task.hub.splits
    for split, hub_split in names.items():
        if hub_split not in dataset_dict:
            raise UserError(f"{task.hub} has no split {hub_split!r} (for {split}); it has {', '.join(dataset_dict)}")
    if "val" in names:
        parts = {"train": dataset_dict[names["train"]], "test": dataset_dict[names["val"]]}
    else:
        parts = dataset_dict[names["train"]].train_test_split(test_size=0.1, seed=seed)
    return {
        "train": examples_from_hub(task, parts["train"]),
        "val": examples_from_hub(task, parts["test"]),
        "test": examples_from_hub(task, dataset_dict[names["test"]]),
    }


def load_splits(task: TaskSpec | str, data_dir=None, split_seed: int = 0) -> dict[str, list[dict]]:
    """All three splits of ``task`` as lists of checked jiant-style example dicts, from the task's own
    files, the data folder or the hub (in that order; :func:`require_task_data` checks first)."""
    task = get_task(task)
    source = require_task_data([task], data_dir)
    if task.files is not None:
        return {split: read_examples(task.files[split], task) for split in SPLITS}
    if source != "hub":
        return {split: read_jsonl(source / task.name / f"{split}.jsonl", task) for split in SPLITS}
    splits = split_hub_dataset(task, load_hub_dataset(task.hub), split_seed)
    return {split: _examples_or_fail(Path(f"{task.hub} {split}"),
                                     [check_example(task, ex, f"{task.hub} ({split}) example {i + 1}")
                                      for i, ex in enumerate(examples)])
            for split, examples in splits.items()}


def fetch_data(tasks: Iterable[str | TaskSpec] | None, output_dir: str | os.PathLike, seed: int = 0,
               overwrite: bool = False, log=None) -> dict[str, Path]:
    """Write tasks from the hub in the local layout ``output_dir/<task>/{train,val,test}.jsonl``.

    ``tasks``: names, task file paths or specs with a hub source (None or empty: every registry task,
    the paper's nine). The paper's protocol (:func:`split_hub_dataset`, ``seed`` seeds the 90/10 split of
    train; dev is test) and the local files' field names (:func:`examples_from_hub`); the rows are written
    as the hub holds them (a WSC span index that misses its text is repaired when read, with a warning).
    Every task and the hub are checked before anything is written; files are written atomically. Returns
    task name -> its folder. Raises :class:`UserError` (one line) for an unknown task, a task without a hub
    source, existing files (unless ``overwrite``) or an unreachable hub."""
    specs = [get_task(t) for t in (tasks or TASKS)]
    no_hub = [t.name for t in specs if t.hub is None]
    if no_hub:
        raise UserError(f"task(s) {', '.join(no_hub)} have no hub dataset to fetch")
    root = Path(output_dir)
    existing = [str(root / t.name / f"{s}.jsonl") for t in specs for s in SPLITS
                if (root / t.name / f"{s}.jsonl").exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}"
                        "; pass --overwrite to replace")
    reason = hub_unavailable([t.hub for t in specs])
    if reason:
        raise UserError(f"cannot fetch {', '.join(t.name for t in specs)}: {reason}")
    written = {}
    for task in specs:
        splits = split_hub_dataset(task, load_hub_dataset(task.hub), seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # repaired when read; the file keeps the hub's row
            for split, examples in splits.items():
                for i, example in enumerate(examples):
                    check_example(task, example, f"{task.hub} ({split}) example {i + 1}")
        folder = root / task.name
        folder.mkdir(parents=True, exist_ok=True)
        for split, examples in splits.items():
            _write_jsonl_atomic(folder / f"{split}.jsonl", examples)
        written[task.name] = folder
        if log:
            log(f"{task.name}: {', '.join(f'{len(splits[s])} {s}' for s in SPLITS)} -> {folder}")
    return written


def _write_jsonl_atomic(path: Path, examples: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- featurizing
def _word_char_spans(text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each whitespace-separated word: WSC span indices count these words."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def _span_char_range(text: str, word_spans, index: int, span_text: str) -> tuple[int, int]:
    """Characters of the span: its words, narrowed to the span text itself when it occurs inside them
    (``him`` in ``him,"``; ``Emma`` in ``Emma's``)."""
    n_words = len(span_text.split())
    start = word_spans[index][0]
    end = word_spans[min(index + n_words, len(word_spans)) - 1][1]
    pattern = r"\s+".join(re.escape(w) for w in span_text.split())
    match = re.search(pattern, text[start:end], flags=re.IGNORECASE)
    return (start + match.start(), start + match.end()) if match else (start, end)


def _span_token_mask(offsets, char_range: tuple[int, int]) -> list[int]:
    start, end = char_range
    mask = [int(e > s and s < end and e > start) for s, e in offsets]
    if not any(mask):  # the span was truncated away: fall back to the first token
        mask[0] = 1
    return mask


@dataclass
class Featurizer:
    """Turns one example into model inputs for its task kind (DESIGN §2): token ids (and the tokenizer's
    other outputs) of the input fields, ``labels`` the model target; multiple choice: one sequence per
    choice; span: ``span1_mask``/``span2_mask`` over the tokens of each span."""

    task: TaskSpec
    tokenizer: object
    max_length: int

    def __call__(self, example: dict, where: str = "") -> dict:
        task, tok = self.task, self.tokenizer
        where = where or task.name
        label = task.label_index(example[task.label_field], where)
        if task.kind == MULTIPLE_CHOICE:
            context, *question = [f for f in task.fields if f not in task.choices]
            connective = COPA_CONNECTIVES.get(example[question[0]], example[question[0]]) if question else None
            firsts = [example[context]] * len(task.choices)
            seconds = [f"{connective} {example[c][:1].lower()}{example[c][1:]}" if connective else example[c]
                       for c in task.choices]
            enc = tok(firsts, seconds, truncation=True, max_length=self.max_length)
            return {**{k: enc[k] for k in enc}, "labels": label}
        if task.kind == SPAN:
            example = check_example(task, example, where)  # a no-op for loaded examples
            text, target = example[task.fields[0]], example["target"]
            enc = tok(text, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
            offsets = enc.pop("offset_mapping")
            words = _word_char_spans(text)
            feats = {k: enc[k] for k in enc}
            for s in ("span1", "span2"):
                char_range = _span_char_range(text, words, int(target[f"{s}_index"]), target[f"{s}_text"])
                feats[f"{s}_mask"] = _span_token_mask(offsets, char_range)
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
