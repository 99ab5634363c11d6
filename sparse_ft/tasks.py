"""Task registry: the paper's tasks, their fields, label spaces, input kinds and metrics (DESIGN §3).

Adding a task is one :class:`TaskSpec` entry in ``TASKS``. Field names are those of the jiant JSONL
files; ``hub`` says where the same data lives on the Hugging Face hub and how its columns map onto
the jiant fields, so both sources produce identical examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError

CLASSIFICATION = "classification"  # one text or a text pair -> one of `labels`
REGRESSION = "regression"  # text pair -> a float (STS-B)
MULTIPLE_CHOICE = "multiple_choice"  # (premise, question, choices) -> index of the right choice (COPA)
SPAN = "span"  # text + two spans -> do they corefer (WSC)


@dataclass(frozen=True)
class HubSource:
    """Where a task lives on the hub and how its columns map onto the jiant fields."""

    path: str
    name: str
    columns: dict[str, str] = field(default_factory=dict)  # hub column -> jiant field
    label_names: tuple | None = None  # hub integer label i -> jiant label label_names[i]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    fields: tuple[str, ...]
    labels: tuple | None  # None for regression
    metric: str  # key of sparse_ft.metrics.MAJOR_METRICS
    hub: HubSource
    choices: tuple[str, ...] = ()  # multiple choice: the fields holding the choices

    @property
    def num_labels(self) -> int:
        if self.kind == REGRESSION:
            return 1
        if self.kind == MULTIPLE_CHOICE:
            return len(self.choices)
        return len(self.labels)

    def label_index(self, value, where: str):
        """Map a raw label to the model target: a class index, a float (regression) or a choice index."""
        if self.kind == REGRESSION:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise UserError(f"{where}: label {value!r} is not a number (task {self.name} is regression)")
        for i, allowed in enumerate(self.labels):
            if value == allowed or str(value).lower() == str(allowed).lower():
                return i
        raise UserError(f"{where}: unknown label {value!r} for task {self.name}; allowed: {list(self.labels)}")


_PAIR = {"sentence1": "text_a", "sentence2": "text_b"}
_NLI = {"sentence1": "premise", "sentence2": "hypothesis"}

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


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
