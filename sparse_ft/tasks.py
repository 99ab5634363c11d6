"""Task registry: the paper's tasks, their fields, label spaces, input kinds and metrics (DESIGN §3).

Adding a task is one :class:`TaskSpec` entry in ``TASKS``, or a TOML task file that
:func:`get_task` accepts wherever a task name goes (DESIGN §7). Field names are those of the jiant
JSONL files; ``hub`` says where the same data lives on the Hugging Face hub and how its columns map
onto the jiant fields, so both sources produce identical examples.

A task file (``--task path/task.toml``)::

    name = "reviews"                      # letters, digits, _ . -
    kind = "classification"               # classification | regression | multiple_choice | span
    inputs = ["title", "body"]            # one or two input fields (span: the text field)
    label = "stars"                       # the label field (default "label")
    labels = ["bad", "good"]              # the label names; omitted for regression
    metric = "accuracy"                   # any metric a registry task uses
    choices = ["a", "b"]                  # multiple_choice only: the fields holding the choices

    [files]                               # relative to the task file; .jsonl or .csv
    train = "train.csv"
    val = "val.csv"
    test = "test.csv"

    # or, instead of [files], a hub dataset:
    # [hub]
    # name = "imdb"                       # the dataset id
    # config = "plain_text"               # optional
    # train = "train"                     # split names; without `val`, a seeded 90/10 split of train
    # test = "test"

Multiple choice: the first input is the context, an optional second one a word such as COPA's
"cause"/"effect" turned into a connective before each choice; the label is the choice's index (or its
name when ``labels`` names the choices). Span: each example holds ``span1_index``, ``span1_text``,
``span2_index`` and ``span2_text`` (word indices into the whitespace-split text) at the top level or
in a ``target`` object, as WSC does. A bad task file raises one :class:`UserError` line naming the
file and the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

CLASSIFICATION = "classification"  # one text or a text pair -> one of `labels`
REGRESSION = "regression"  # text pair -> a float (STS-B)
MULTIPLE_CHOICE = "multiple_choice"  # (premise, question, choices) -> index of the right choice (COPA)
SPAN = "span"  # text + two spans -> do they corefer (WSC)
KINDS = (CLASSIFICATION, REGRESSION, MULTIPLE_CHOICE, SPAN)
SPLITS = ("train", "val", "test")
DATA_FORMATS = (".jsonl", ".csv")
SPAN_KEYS = ("span1_index", "span2_index", "span1_text", "span2_text")
PAPER_HUB_SPLITS = {"train": "train", "test": "validation"}  # no val: the seeded 90/10 split of train


@dataclass(frozen=True)
class HubSource:
    """Where a task lives on the hub and how its columns map onto the jiant fields.

    ``path`` and ``name`` are ``datasets.load_dataset``'s first two arguments (dataset id, config).
    ``splits`` maps our split names onto the hub's; without ``val`` the val set is a seeded 90/10
    split of train (the paper's protocol, DESIGN §3)."""

    path: str
    name: str | None
    columns: dict[str, str] = field(default_factory=dict)  # hub column -> jiant field
    label_names: tuple | None = None  # hub integer label i -> jiant label label_names[i]
    splits: dict[str, str] = field(default_factory=lambda: dict(PAPER_HUB_SPLITS))

    def __str__(self) -> str:
        return self.path if self.name is None else f"{self.path}/{self.name}"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its input fields, label space, input kind, metric and where its data lives.

    ``fields`` are every field an example must hold besides the label (for multiple choice the choice
    fields too, listed again in ``choices``). Data comes from ``files`` (split -> absolute path of a
    .jsonl or .csv file; task files) when set, else from the data folder or ``hub``. ``source`` is the
    absolute path of the task file a spec was read from (None for registry tasks)."""

    name: str
    kind: str
    fields: tuple[str, ...]
    labels: tuple | None  # None for regression
    metric: str  # key of sparse_ft.metrics.MAJOR_METRICS
    hub: HubSource | None = None
    choices: tuple[str, ...] = ()  # multiple choice: the fields holding the choices
    label_field: str = "label"
    files: dict[str, Path] | None = None
    source: Path | None = None

    @property
    def ref(self) -> str:
        """What :func:`get_task` resolves back to this spec in any process: the registry name, or the
        task file's absolute path."""
        return self.name if self.source is None else str(self.source)

    @property
    def num_labels(self) -> int:
        if self.kind == REGRESSION:
            return 1
        if self.kind == MULTIPLE_CHOICE:
            return len(self.choices)
        return len(self.labels)

    def label_index(self, value, where: str):
        """Map a raw label to the model target: a class index, a float (regression) or a choice index.

        Labels compare exactly or as case-insensitive strings (a CSV's "True" is the label ``True``)."""
        if self.kind == REGRESSION:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise UserError(f"{where}: label {value!r} is not a number (task {self.name} is regression)") from None
        for i, allowed in enumerate(self.labels):
            if value == allowed or str(value).lower() == str(allowed).lower():
                return i
        raise UserError(f"{where}: unknown label {value!r} for task {self.name}; allowed: {list(self.labels)}")


_PAIR = {"sentence1": "text_a", "sentence2": "text_b"}
_NLI = {"sentence1": "premise", "sentence2": "hypothesis"}

# The seven tasks of the paper's Table 1, in its column order; the registry also knows sst and wnli (GLUE).
PAPER_TASKS = ["cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc"]

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", CLASSIFICATION, ("text",), ("0", "1"), "mcc",
                 HubSource("glue", "cola", {"sentence": "text"}, ("0", "1"))),
        TaskSpec("sst", CLASSIFICATION, ("text",), ("0", "1"), "accuracy",
                 HubSource("glue", "sst2", {"sentence": "text"}, ("0", "1"))),
        TaskSpec("mrpc", CLASSIFICATION, ("text_a", "text_b"), ("0", "1"), "acc_and_f1",
                 HubSource("glue", "mrpc", _PAIR, ("0", "1"))),
        TaskSpec("stsb", REGRESSION, ("text_a", "text_b"), None, "pearson_and_spearman",
                 HubSource("glue", "stsb", _PAIR)),
        TaskSpec("rte", CLASSIFICATION, ("premise", "hypothesis"), ("entailment", "not_entailment"), "accuracy",
                 HubSource("glue", "rte", _NLI, ("entailment", "not_entailment"))),
        TaskSpec("wnli", CLASSIFICATION, ("premise", "hypothesis"), ("0", "1"), "accuracy",
                 HubSource("glue", "wnli", _NLI, ("0", "1"))),
        TaskSpec("cb", CLASSIFICATION, ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
                 "acc_and_macro_f1", HubSource("super_glue", "cb", {}, ("entailment", "contradiction", "neutral"))),
        TaskSpec("copa", MULTIPLE_CHOICE, ("premise", "question", "choice1", "choice2"), (0, 1), "accuracy",
                 HubSource("super_glue", "copa", {}, (0, 1)), choices=("choice1", "choice2")),
        TaskSpec("wsc", SPAN, ("text", "target"), (False, True), "accuracy",
                 HubSource("super_glue", "wsc.fixed", {}, (False, True))),
    ]
}

# The metrics a task file may name, by kind: those the registry's tasks use, where they make sense.
KIND_METRICS = {
    CLASSIFICATION: ("accuracy", "mcc", "acc_and_f1", "acc_and_macro_f1"),
    SPAN: ("accuracy", "mcc", "acc_and_f1", "acc_and_macro_f1"),
    MULTIPLE_CHOICE: ("accuracy",),
    REGRESSION: ("pearson_and_spearman",),
}


def is_task_file(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names a task file rather than a registry task: a .toml name or an existing file."""
    text = str(ref)
    return text.lower().endswith(".toml") or (text not in TASKS and Path(text).is_file())


def get_task(ref: str | os.PathLike | TaskSpec) -> TaskSpec:
    """The task a name (``cb``), a task file path (``my/task.toml``) or a spec refers to.

    Raises :class:`UserError` for an unknown name or a bad task file (:func:`load_task_file`)."""
    if isinstance(ref, TaskSpec):
        return ref
    if str(ref) in TASKS:
        return TASKS[str(ref)]
    if is_task_file(ref):
        return load_task_file(ref)
    raise UserError(f"unknown task {str(ref)!r}; known tasks: {', '.join(TASKS)} (or a task file, path/to/task.toml)")


# ----------------------------------------------------------------------------- task files
TASK_FILE_KEYS = ("name", "kind", "inputs", "label", "labels", "metric", "choices", "files", "hub")
HUB_KEYS = ("name", "config", "train", "val", "test")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class _TaskFile:
    """Reads the keys of one parsed task file; every complaint names the file and the key."""

    def __init__(self, path: Path, raw: dict):
        self.path, self.raw = path, raw

    def fail(self, key: str, message: str) -> UserError:
        return UserError(f"task file {str(self.path)!r}: key {key!r} {message}")

    def string(self, key: str, default=None, *, table: dict | None = None, prefix: str = "") -> str | None:
        source = self.raw if table is None else table
        value = source.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(prefix + key, f"must be a non-empty string, got {value!r}")
        return value

    def required(self, key: str) -> str:
        value = self.string(key)
        if value is None:
            raise self.fail(key, "is missing")
        return value

    def names(self, key: str, count: tuple[int, int]) -> tuple[str, ...]:
        """A string or a list of strings, between count[0] and count[1] of them, all distinct."""
        value = self.raw.get(key)
        if value is None:
            raise self.fail(key, "is missing")
        items = [value] if isinstance(value, str) else value
        low, high = count
        if (not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items)
                or not low <= len(items) <= high or len(set(items)) != len(items)):
            want = f"{low}" if low == high else f"{low} to {high}"
            raise self.fail(key, f"must list {want} distinct field name(s), got {value!r}")
        return tuple(items)


def load_task_file(path: str | os.PathLike) -> TaskSpec:
    """A :class:`TaskSpec` from a TOML task file (keys in this module's docstring).

    Data file paths are resolved against the task file's folder and must exist. Raises
    :class:`UserError` naming the file and the offending key."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"task file {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"task file {str(path)!r}: not valid TOML ({exc})") from None
    spec = _TaskFile(path, raw)
    unknown = sorted(set(raw) - set(TASK_FILE_KEYS))
    if unknown:
        raise spec.fail(unknown[0], f"is not a task file key; keys: {', '.join(TASK_FILE_KEYS)}")

    name = spec.required("name")
    if not _NAME.fullmatch(name):
        raise spec.fail("name", f"must be letters, digits, '_', '.' or '-', got {name!r}")
    kind = spec.required("kind")
    if kind not in KINDS:
        raise spec.fail("kind", f"must be one of {', '.join(KINDS)}; got {kind!r}")
    inputs = spec.names("inputs", (1, 1) if kind == SPAN else (1, 2))
    label_field = spec.string("label", "label")
    if label_field in inputs:
        raise spec.fail("label", f"names the input field {label_field!r}")
    choices = spec.names("choices", (2, 64)) if kind == MULTIPLE_CHOICE else ()
    if kind != MULTIPLE_CHOICE and "choices" in raw:
        raise spec.fail("choices", "is for multiple_choice tasks only")
    labels = _task_file_labels(spec, kind, choices)
    metric = spec.required("metric")
    if metric not in KIND_METRICS[kind]:
        raise spec.fail("metric", f"must be one of {', '.join(KIND_METRICS[kind])} for a {kind} task; got {metric!r}")
    if metric == "acc_and_f1" and len(labels) != 2:
        raise spec.fail("metric", "acc_and_f1 needs exactly two labels (F1 of the second)")

    files, hub = _task_file_source(spec, labels)
    fields = (*inputs, "target") if kind == SPAN else (*inputs, *choices)
    return TaskSpec(name, kind, fields, labels, metric, hub, choices=choices, label_field=label_field,
                    files=files, source=path)


def _task_file_labels(spec: _TaskFile, kind: str, choices: tuple[str, ...]) -> tuple | None:
    labels = spec.raw.get("labels")
    if kind == REGRESSION:
        if labels is not None:
            raise spec.fail("labels", "must be omitted for a regression task")
        return None
    if labels is None:
        if kind == MULTIPLE_CHOICE:
            return tuple(range(len(choices)))
        if kind == SPAN:
            return (False, True)
        raise spec.fail("labels", "is missing (the label names of a classification task)")
    if (not isinstance(labels, list) or len(labels) < 2 or len({str(v).lower() for v in labels}) != len(labels)
            or not all(isinstance(v, (str, int, bool)) for v in labels)):
        raise spec.fail("labels", f"must list at least two distinct label names, got {labels!r}")
    if kind == MULTIPLE_CHOICE and len(labels) != len(choices):
        raise spec.fail("labels", f"must name each of the {len(choices)} choices, got {labels!r}")
    if kind == SPAN and len(labels) != 2:
        raise spec.fail("labels", f"must name two labels (no, yes), got {labels!r}")
    return tuple(labels)


def _task_file_source(spec: _TaskFile, labels: tuple | None) -> tuple[dict[str, Path] | None, HubSource | None]:
    files, hub = spec.raw.get("files"), spec.raw.get("hub")
    if (files is None) == (hub is None):
        raise spec.fail("files", "or 'hub' is needed, one of the two" if files is None
                        else "and 'hub' exclude each other; give one")
    if files is not None:
        if not isinstance(files, dict):
            raise spec.fail("files", "must be a table: [files] train = ..., val = ..., test = ...")
        extra = sorted(set(files) - set(SPLITS))
        if extra:
            raise spec.fail(f"files.{extra[0]}", f"is not a split; splits: {', '.join(SPLITS)}")
        resolved = {}
        for split in SPLITS:
            rel = spec.string(split, table=files, prefix="files.")
            if rel is None:
                raise spec.fail(f"files.{split}", "is missing")
            file = (spec.path.parent / rel).resolve()
            if file.suffix.lower() not in DATA_FORMATS:
                raise spec.fail(f"files.{split}", f"must be a .jsonl or .csv file, got {rel!r}")
            if not file.is_file():
                raise spec.fail(f"files.{split}", f"names {str(file)!r}, which does not exist")
            resolved[split] = file
        return resolved, None
    if not isinstance(hub, dict):
        raise spec.fail("hub", "must be a table: [hub] name = ..., config = ..., train = ..., test = ...")
    extra = sorted(set(hub) - set(HUB_KEYS))
    if extra:
        raise spec.fail(f"hub.{extra[0]}", f"is not a hub key; keys: {', '.join(HUB_KEYS)}")
    dataset = spec.string("name", table=hub, prefix="hub.")
    if dataset is None:
        raise spec.fail("hub.name", "is missing (the dataset id)")
    splits = {s: spec.string(s, PAPER_HUB_SPLITS.get(s), table=hub, prefix="hub.") for s in SPLITS}
    label_names = labels if labels and not all(isinstance(v, int) for v in labels) else None
    return None, HubSource(dataset, spec.string("config", table=hub, prefix="hub."), {}, label_names,
                           {s: v for s, v in splits.items() if v is not None})
