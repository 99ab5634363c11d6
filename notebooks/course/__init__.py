"""Helpers shared by the course notebooks: settings, data, device, figures and exercise checks.

Every notebook starts with the same two cells::

    DATA_DIR = None   # a folder with <task>/{train,val,test}.jsonl; None: $SPARSE_FT_DATA, then the defaults
    QUICK = None      # None: $SPARSE_FT_QUICK ("1" = small and fast, what CI runs)
    ...
    settings = course.setup(data_dir=DATA_DIR, quick=QUICK, tasks=["cb"])

    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

``setup`` finds the data (or stops the notebook with the command that fetches it), picks the model
(the embedded MiniLM; in quick mode a 2-layer random BERT with MiniLM's tokenizer, unless
``SPARSE_FT_QUICK_MODEL=minilm``), quiets library chatter, applies ``SPARSE_FT_THREADS`` and the
projector-friendly figure style. The model helpers take a ``device`` so that the model and the batches
always live on the same device. The exercise checks live in ``course.nbNN`` (one module per notebook)
and print "correct", "not answered yet" or what is wrong; with ``course.STRICT = True`` (the solution
notebooks) anything but "correct" raises :class:`ExerciseFailed`.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DATA = NOTEBOOKS_DIR.parent.parent / "shared" / "data" / "tasks"  # ../../shared/data/tasks from notebooks/
FETCHED_DATA = NOTEBOOKS_DIR / "data" / "tasks"  # where the fetch-data hint below writes
TINY_MODEL_VERSION = "v1"
NOISE = ("IProgress not found", "Sparse CSR tensor support is in beta", "vmap over examples failed",
         "The figure layout has changed to tight")  # the last: library helpers calling tight_layout under our style

STRICT = os.environ.get("SPARSE_FT_STRICT_CHECKS") == "1"  # the solution notebooks set course.STRICT = True

# ------------------------------------------------------------------------------------------- settings


class DataNotFound(Exception):
    """The task data is missing. Shown in Jupyter as the instructions alone, without a traceback."""

    def _render_traceback_(self):  # IPython calls this instead of printing the traceback
        return ["DataNotFound: the notebook stopped here.", *str(self).splitlines()]


@dataclass
class Settings:
    data: Path | None
    quick: bool
    model: str  # "minilm", or the folder of the tiny quick-mode model
    threads: int

    @property
    def paper_table(self) -> Path | None:
        """``paper_table1.csv`` next to the task folder (``shared/data``), if it is there."""
        if self.data is None:
            return None
        path = self.data.parent / "paper_table1.csv"
        return path if path.is_file() else None


def _task_folder_ok(folder: Path, tasks) -> bool:
    return folder.is_dir() and all((folder / t / "train.jsonl").is_file() for t in tasks)


def find_data(data_dir: str | os.PathLike | None = None, tasks=("cb",)) -> Path:
    """The folder holding ``<task>/{train,val,test}.jsonl`` for every task in ``tasks``.

    Looks at ``data_dir`` (the DATA_DIR variable of a notebook's first cell), then ``$SPARSE_FT_DATA``,
    then ``../../shared/data/tasks`` and ``data/tasks`` relative to ``notebooks/``. Raises
    :class:`DataNotFound` with the command that fetches the data when none of them has it."""
    tasks = list(tasks)
    candidates = []
    if data_dir is not None:
        candidates.append(("DATA_DIR", Path(data_dir).expanduser()))
    elif os.environ.get("SPARSE_FT_DATA"):
        candidates.append(("$SPARSE_FT_DATA", Path(os.environ["SPARSE_FT_DATA"]).expanduser()))
    else:
        candidates += [("default", DEFAULT_DATA), ("default", FETCHED_DATA)]
    for _, folder in candidates:
        if _task_folder_ok(folder, tasks):
            return folder.resolve()
    looked = "\n".join(f"  {label:16s} {folder}" for label, folder in candidates)
    names = " ".join(tasks) or "cb"
    first = tasks[0] if tasks else "cb"
    raise DataNotFound(
        f"No task data for {', '.join(tasks) or 'the tasks'} (a folder with <task>/train.jsonl, val.jsonl, test.jsonl).\n"
        f"Looked in:\n{looked}\n"
        "Fetch it (needs the Hugging Face hub; one command per task):\n"
        + "".join(f"  sparse-ft fetch-data {t} --output {FETCHED_DATA}\n" for t in (tasks or [first]))
        + f"then run this notebook again (that folder is a default), or set DATA_DIR = \"/path/to/tasks\" in the\n"
        f"first cell, or export SPARSE_FT_DATA=/path/to/tasks before starting Jupyter. Tasks needed: {names}."
    )


def quick_from_env() -> bool:
    return os.environ.get("SPARSE_FT_QUICK") == "1"


def setup(data_dir=None, quick: bool | None = None, tasks=("cb",), verbose: bool = True) -> Settings:
    """Quick mode, data folder, model, threads, quiet libraries and the figure style, in one call."""
    quick = quick_from_env() if quick is None else bool(quick)
    for noise in NOISE:
        warnings.filterwarnings("ignore", message=noise)  # library chatter, not results
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if os.environ.get("SPARSE_FT_THREADS"):  # e.g. 1 on a machine shared with other jobs
        torch.set_num_threads(int(os.environ["SPARSE_FT_THREADS"]))
    data = find_data(data_dir, tasks) if tasks else _optional_data(data_dir)
    model = quick_model() if quick and os.environ.get("SPARSE_FT_QUICK_MODEL", "tiny") == "tiny" else "minilm"
    style()
    settings = Settings(data=data, quick=quick, model=model, threads=torch.get_num_threads())
    if verbose:
        shown = "embedded MiniLM (all-MiniLM-L6-v2)" if model == "minilm" else "tiny random BERT (quick mode)"
        where = os.path.relpath(data) if data is not None else "not needed"
        print(f"QUICK={quick} | model: {shown} | data: {where} | torch {torch.__version__}, "
              f"{settings.threads} thread(s)")
    return settings


def _optional_data(data_dir) -> Path | None:
    try:
        return find_data(data_dir, tasks=[])
    except DataNotFound:
        return None


def quick_model(directory: str | os.PathLike | None = None) -> str:
    """A saved 2-layer, 32-wide random-init BERT with MiniLM's tokenizer (about 1 M parameters, almost
    all in the word embeddings): quick mode's model, so that CI runs every notebook in seconds. Its
    numbers mean nothing; the normal mode uses MiniLM. Built once, in the temp folder."""
    folder = Path(directory) if directory else Path(tempfile.gettempdir()) / f"sparse-ft-course-tiny-bert-{TINY_MODEL_VERSION}"
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return str(folder)
    import torch
    from transformers import BertConfig, BertModel

    from sparse_ft.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=len(tokenizer), max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=False)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)
    except OSError:  # another process made it meanwhile
        pass
    return str(folder)


# --------------------------------------------------------------------------------- device helpers


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_on(spec, device: str, exclude=frozenset()):
    """``prepare(spec)`` with the run on ``device``: its batches *and* its model (θ0) live there, so every
    copy of ``run.model`` does too. ``exclude`` leaves training examples out (leave-one-out)."""
    from sparse_ft.experiments.run import prepare

    spec.device = str(device)
    run = prepare(spec, exclude=frozenset(exclude))
    run.model.to(run.device)
    return run


def build_method(run, name: str, sparsity: float | None = None, device: str | None = None, **options):
    """A fresh copy of the prepared model on ``device`` (default: the run's) with method ``name`` applied,
    selecting on the run's data."""
    from sparse_ft.methods import make_method_config

    model = copy.deepcopy(run.model).to(device or run.device)
    return make_method_config(name, sparsity, **options).build(model, run.context)


def tiny_task_model(task: str, vocab_size: int, device: str, seed: int = 0):
    """A 2-layer, 32-wide random BERT with a task head on ``device`` (eager attention: it has second
    derivatives), small enough for a dense Hessian."""
    import torch
    from transformers import BertConfig

    from sparse_ft.models import TaskModel, backbone_from_config
    from sparse_ft.tasks import get_task

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=vocab_size, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TaskModel(backbone_from_config(config), get_task(task), head_seed=seed)
    return model.to(device)


def devices_of(module) -> set[str]:
    """The device types of a module's parameters and buffers (one element when nothing was left behind)."""
    return {t.device.type for t in list(module.parameters()) + list(module.buffers())}


# ------------------------------------------------------------------------------------------ figures

FONT_SIZE = 12
STYLE = {
    "figure.dpi": 120,
    "savefig.dpi": 150,
    "font.size": FONT_SIZE,
    "axes.titlesize": 13,
    "axes.labelsize": FONT_SIZE,
    "xtick.labelsize": FONT_SIZE,
    "ytick.labelsize": FONT_SIZE,
    "legend.fontsize": FONT_SIZE,
    "figure.titlesize": 14,
    "lines.linewidth": 2.0,
    "lines.markersize": 7,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.constrained_layout.use": True,
}


def style() -> None:
    """Figures that project: fonts of at least 12 pt, 120 dpi on screen and 150 in files, a light grid."""
    import matplotlib
    import matplotlib.pyplot

    matplotlib.rcParams.update(STYLE)


def run_headless(fn, *args, **kwargs):
    """Call a plotting helper that switches matplotlib to Agg (the report's and theory's file writers),
    then restore the notebook's backend and the course style."""
    import matplotlib

    backend = matplotlib.get_backend()
    try:
        return fn(*args, **kwargs)
    finally:
        if matplotlib.get_backend() != backend:
            matplotlib.use(backend)
        style()


_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1),
               (1, 0.5), (1, -0.5), (-1, 0.5), (-1, -0.5), (0.5, 1), (-0.5, 1), (0.5, -1), (-0.5, -1)]


def label_points(ax, xs, ys, labels, *, distance: float = 7.0, fontsize: float | None = None):
    """Annotate points with labels that overlap neither each other nor the points: each label, in order,
    takes the first of 16 directions around its point, at 1x to 6x the distance (in points), whose box is
    free and inside the axes, with a thin leader line beyond the first ring; if none is free, the one with
    the least overlap. Deterministic, no extra package. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    frame = (frame.x0, frame.y0, frame.x1, frame.y1)
    pad = 3.0 * fig.dpi / 72
    point_boxes = [(px - pad, py - pad, px + pad, py + pad)
                   for px, py in (ax.transData.transform((x, y)) for x, y in zip(xs, ys))]
    placed, annotations = [], []
    for x, y, label in zip(xs, ys, labels):
        best = None  # (cost, ring, direction, box)
        for ring in range(1, 7):
            for dx, dy in _DIRECTIONS:
                text = _annotate(ax, label, x, y, dx, dy, distance * ring, False, fontsize)
                box = _text_box(text, renderer)
                text.remove()
                corners = (box.x0, box.y0, box.x1, box.y1)
                cost = _area(corners) - _intersection(corners, frame)  # outside the axes
                cost += sum(_intersection(corners, other) for other in placed + point_boxes)
                if best is None or cost < best[0]:
                    best = (cost, ring, (dx, dy), corners)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, ring, (dx, dy), corners = best
        annotations.append(_annotate(ax, label, x, y, dx, dy, distance * ring, ring > 1, fontsize))
        placed.append(corners)
    return annotations


def _annotate(ax, label, x, y, dx, dy, offset, leader, fontsize):
    ha = "left" if dx > 0 else "right" if dx < 0 else "center"
    va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    extra = {"arrowprops": {"arrowstyle": "-", "color": "0.5", "lw": 0.8, "shrinkA": 0, "shrinkB": 4}} if leader else {}
    text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx * offset, dy * offset), ha=ha, va=va,
                       fontsize=fontsize or FONT_SIZE, **extra)
    text.set_in_layout(False)  # constrained layout must not move the axes after the labels are placed
    return text


def _text_box(annotation, renderer):
    """The box of an annotation's text alone (an Annotation's own extent includes its leader line)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def _area(a) -> float:
    return max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])


def _intersection(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def labels_overlap(annotations) -> bool:
    """Whether the texts of any two annotations intersect (for tests)."""
    renderer = annotations[0].figure.canvas.get_renderer()
    boxes = [_text_box(a, renderer) for a in annotations]
    return any(_overlap((p.x0, p.y0, p.x1, p.y1), (q.x0, q.y0, q.x1, q.y1))
               for i, p in enumerate(boxes) for q in boxes[i + 1:])


def plot_ranks(analysis, ax=None, title: str | None = None):
    """Figure 2 in the course style: each method's mean performance rank against its mean stability rank
    (± std over tasks), labels placed without overlap. ``analysis`` is a ``theory.ranks.RankAnalysis``."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 5.2))
    x, xerr = analysis.mean_ranks("stability")
    y, yerr = analysis.mean_ranks("performance")
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, lw=1, elinewidth=0.8, alpha=0.9,
                ecolor="lightsteelblue", color="tab:blue")
    n = len(analysis.methods) + 1
    ax.set_xlim(0, n)
    ax.set_ylim(0, n)
    ax.plot([0, n], [0, n], color="gray", lw=0.8, ls=":", label="equal ranks")
    ax.set_xlabel("mean stability rank (1 = smallest std)")
    ax.set_ylabel("mean performance rank (1 = best)")
    rho, pvalue = analysis.method_level
    ax.set_title(title or f"Spearman ρ = {rho:.2f} (p = {pvalue:.2g}), {len(analysis.tasks)} task(s)")
    label_points(ax, x, y, analysis.methods)
    return ax


# ----------------------------------------------------------------------------------- exercise checks


class ExerciseFailed(AssertionError):
    """A check failed (or had no answer) in strict mode, i.e. in a solution notebook."""


def _report(exercise, ok: bool | None, message: str = "") -> None:
    """Print the verdict (and raise in strict mode). Returns None, so that a check cell shows no Out[]."""
    label = f"Exercise {exercise}"
    if ok is None:
        text = f"{label}: not answered yet (replace the None in the cell above, then run this cell again)"
    elif ok:
        text = f"{label}: correct" + (f" ({message})" if message else "")
    else:
        text = f"{label}: not yet: {message}"
    print(text)
    if STRICT and not ok:
        raise ExerciseFailed(text)


def unanswered(answer) -> bool:
    return answer is None or answer is Ellipsis


def check_number(exercise, answer, expected: float, *, rtol: float = 1e-3, atol: float = 1e-9,
                 what: str = "your answer", hint: str = "") -> None:
    """A number within ``rtol``/``atol`` of ``expected`` (inf matches inf). Says too high / too low."""
    if unanswered(answer):
        return _report(exercise, None)
    try:
        value = float(answer)
    except (TypeError, ValueError):
        return _report(exercise, False, f"expected a number, got {type(answer).__name__} {answer!r}")
    if math.isinf(expected) or math.isinf(value):
        ok = value == expected
    else:
        ok = math.isclose(value, expected, rel_tol=rtol, abs_tol=atol)
    if ok:
        return _report(exercise, True)
    direction = "too high" if value > expected else "too low"
    return _report(exercise, False, f"{what} = {value:.6g} is {direction}" + (f". Hint: {hint}" if hint else ""))


def check_equal(exercise, answer, expected, *, normalize=lambda v: v, what: str = "your answer",
                hint: str = "", show: bool = True) -> None:
    """``normalize(answer) == normalize(expected)``; ``show`` prints the normalised answer when wrong."""
    if unanswered(answer):
        return _report(exercise, None)
    try:
        got = normalize(answer)
    except Exception as err:  # noqa: BLE001 (the answer has the wrong shape: report it, never raise)
        return _report(exercise, False, f"could not read {what} ({type(err).__name__}: {err})")
    if got == normalize(expected):
        return _report(exercise, True)
    shown = f" ({got!r})" if show else ""
    return _report(exercise, False, f"{what}{shown} is not it" + (f". Hint: {hint}" if hint else ""))


def check_function(exercise, fn, cases, *, what: str = "your function", hint: str = "",
                   compare=lambda got, want: got == want) -> None:
    """Calls ``fn(*args)`` for each ``(args, expected)`` in ``cases`` and compares."""
    if unanswered(fn):
        return _report(exercise, None)
    if not callable(fn):
        return _report(exercise, False, f"expected a function, got {type(fn).__name__}")
    for number, (args, want) in enumerate(cases, 1):
        try:
            got = fn(*args)
        except Exception as err:  # noqa: BLE001
            return _report(exercise, False, f"{what} raised {type(err).__name__}: {err} on test case {number}")
        if got is None:
            return _report(exercise, None)
        try:
            same = compare(got, want)
        except Exception as err:  # noqa: BLE001
            return _report(exercise, False, f"{what} returned {got!r} on test case {number}, which could not "
                           f"be compared ({type(err).__name__}: {err})")
        if not same:
            return _report(exercise, False, f"{what} returned {got!r} on test case {number}, expected something "
                           "else" + (f". Hint: {hint}" if hint else ""))
    return _report(exercise, True, f"{len(cases)} test cases")
