"""The peft-style API: any transformers model in, a p-sparse tuned model out, trained by ``transformers.Trainer``.

Example (MiniLM, the embedded model; any ``PreTrainedModel`` works the same way)::

    import sparse_ft as sft
    from transformers import AutoModelForSequenceClassification
    hf = AutoModelForSequenceClassification.from_pretrained(sft.resolve_model_path("minilm"), num_labels=2)
    model = sft.get_sparse_model(hf, sft.SamConfig(sparsity=0.005), data=batches)
    model.print_trainable_parameters()
    transformers.Trainer(model=model, args=args, train_dataset=train).train()
    model.save_pretrained("out")
    model = sft.SparseModel.from_pretrained(fresh_hf, "out")
    merged = model.merge_and_unload()          # a plain transformers model, same logits

:func:`get_sparse_model` presents the model as a task model (:class:`~sparse_ft.hf_model.HFTaskModel`: the
backbone's parameters are m, ``modules_to_save`` train absolutely beside them) and applies the method with
``config.build``, the code the ``sparse-ft`` CLI runs on its own task models: one implementation of every
method. :class:`SparseModel` wraps the resulting tuned model and forwards transformers' keyword arguments to
the model, returning its ``ModelOutput``; methods whose trainable set changes while training (DiffPruning's
projection, ChildPruning with ``reselect_every``) need :class:`SparseCallback` in the Trainer.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .errors import UserError
from .hf_model import HFTaskModel
from .methods.base import BuildContext, MethodConfig, TunedModel, is_no_decay
from .methods.saving import load_tuned, save_tuned

FORMAT = "sparse-ft/sparse-model/1"
CONFIG_FILE = "sparse_config.json"
WEIGHTS_FILE = "sparse_model.safetensors"


def get_sparse_model(model: nn.Module, config: MethodConfig, data: Iterable[dict] | Callable | None = None, *,
                     backbone: str | None = None, modules_to_save: list[str] | None = None, seed: int = 0,
                     max_steps: int | None = None) -> SparseModel:
    """Apply a method to a transformers model (in place) and wrap it for ``transformers.Trainer``.

    ``model``: a ``transformers.PreTrainedModel`` (encoder classifiers, causal LMs, ...); ``config``: one of the
    method configs (``sft.SamConfig(sparsity=0.005)``: p is the fraction of the m backbone parameters that may
    change); ``data``: training batches at θ0 for the gradient-scored methods (sam, childpruning): a list or a
    ``DataLoader`` of dicts of tensors that ``model`` accepts, with ``labels`` (a one-shot iterator is read
    once into a list), or a callable returning such an iterable; batches are moved to the model's device. They
    are also the training stream that ``SamConfig(rule="authors")`` cycles through.
    ``backbone``, ``modules_to_save``: the split (:class:`~sparse_ft.hf_model.HFTaskModel`; defaults from
    ``base_model_prefix``); ``seed``: every random choice of the method (random masks, LoRA and adapter
    initialisation, DESIGN §4's mask seed); ``max_steps``: the training run's length, which DiffPruning fits
    its burn-in into (or set ``DiffPruningConfig(burn_in_steps=...)``).

    Raises :class:`~sparse_ft.errors.UserError` (one line) for a model that is not a ``torch.nn.Module``, a
    config that is not a method config, a split the model lacks, a scored method without ``data``, or a method
    that cannot apply to the architecture (e.g. adapters on a decoder, BitFit without biases).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise UserError(f"get_sparse_model takes a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(config, MethodConfig):
        raise UserError(f"config must be a sparse-ft method config (e.g. sft.SamConfig()), got {type(config).__name__}")
    device = next(model.parameters()).device
    batches = _batches(data, device)
    context = BuildContext(selection_batches=batches, training_batches=batches, mask_seed=seed, device=device,
                           max_steps=max_steps)
    return SparseModel(config.build(HFTaskModel(model, backbone, modules_to_save), context))


def _batches(data, device: torch.device) -> Callable[[], Iterable[dict]] | None:
    """``data`` as BuildContext's ``selection_batches``: a callable giving the batches on ``device``."""
    if data is None:
        return None
    if not callable(data) and iter(data) is data:  # a one-shot iterator: keep what it yields
        data = list(data)
    source = data if callable(data) else (lambda: data)
    return lambda: ({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()} for batch in source())


_SPECIALISED: dict[type, type] = {}


def _specialised(model_class: type) -> type:
    """The subclass of :class:`SparseModel` whose ``forward`` carries ``model_class.forward``'s signature:
    ``Trainer`` reads the dataset columns it keeps (``remove_unused_columns``) and the label names from the
    class's ``forward``, as peft's ``update_forward_signature`` arranges for peft models."""
    if model_class not in _SPECIALISED:
        def forward(self, *args, **kwargs):
            return SparseModel.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(model_class.forward)
        forward.__doc__ = SparseModel.forward.__doc__
        _SPECIALISED[model_class] = type(f"Sparse{model_class.__name__}", (SparseModel,),
                                         {"forward": forward, "__module__": __name__, "__doc__": SparseModel.__doc__})
    return _SPECIALISED[model_class]


class SparseModel(nn.Module):
    """A transformers model tuned by a sparse-ft method, in peft's shape (source: huggingface/peft's
    ``PeftModel``; the methods: Fu et al., AAAI 2023, and each config's citation).

    ``SparseModel(tuned)`` wraps a :class:`~sparse_ft.methods.base.TunedModel` built on an
    :class:`~sparse_ft.hf_model.HFTaskModel` (what :func:`get_sparse_model` returns); the instance's class
    is a subclass named after the model's (``SparseRobertaForSequenceClassification``) whose ``forward`` has
    the model's signature. Its parameters are the tuned model's (the method's trainable tensors, the head,
    and the frozen rest of the backbone); attributes it lacks (``config``, ``generate``, ...) are the
    transformers model's. Raises :class:`~sparse_ft.errors.UserError` for a tuned model on another kind of
    task model.
    """

    def __new__(cls, tuned: TunedModel | None = None):
        specialise = cls is SparseModel and tuned is not None and isinstance(tuned.model, HFTaskModel)
        return super().__new__(_specialised(type(tuned.model.hf)) if specialise else cls)

    def __init__(self, tuned: TunedModel):
        super().__init__()
        if not isinstance(tuned.model, HFTaskModel):
            raise UserError(f"SparseModel wraps a tuned transformers model (get_sparse_model); this one is on a "
                            f"{type(tuned.model).__name__}")
        self.tuned = tuned
        self._step_hook = None  # the handle of bind_optimizer's hook
        self._steps = 0
        self.train(tuned.model.hf.training)  # the mode the transformers model was in

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "tuned" or "tuned" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.tuned.model.hf, name)

    def get_base_model(self) -> nn.Module:
        """The transformers model itself, with the method applied inside it (peft's ``get_base_model``)."""
        return self.tuned.model.hf

    # ------------------------------------------------------------------ training
    def forward(self, *args, **kwargs):
        """The transformers model's ``forward`` (its keyword arguments: ``input_ids``, ``attention_mask``,
        ``labels``, ...), returning its ``ModelOutput``. In training mode the method's penalty (DiffPruning's
        expected L0, a 0-d tensor in the loss's units) is added to ``.loss``. Raises
        :class:`~sparse_ft.errors.UserError` when a method that changes its trainable set trains without
        :meth:`bind_optimizer` (:class:`SparseCallback` in a Trainer)."""
        training = self.training and torch.is_grad_enabled()
        if training and self._step_hook is None and type(self.tuned).on_step_end is not TunedModel.on_step_end:
            raise UserError(f"{self.tuned.config.name} changes its trainable set while training: pass "
                            "callbacks=[sparse_ft.SparseCallback()] to transformers.Trainer, or call "
                            "model.bind_optimizer(optimizer) before your own loop")
        output = self.tuned.model.hf(*args, **kwargs)
        penalty = self.tuned.regularization() if training else None
        if penalty is not None:
            if not isinstance(output, dict) or output.get("loss") is None:
                raise UserError(f"{self.tuned.config.name} adds a penalty to the loss: call the model with labels "
                                "and return_dict=True")
            output["loss"] = output["loss"] + penalty
        return output

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Run the method's step hook (``TunedModel.on_step_end``) after every step of ``optimizer`` (a torch
        optimizer, or accelerate's wrapper of one); when the hook changes the trainable tensors (a projection),
        the optimizer's groups are pointed at the new ones in place (:func:`refresh_param_groups`). Steps are
        counted from 1 after this call."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if self._step_hook is not None:
            self._step_hook.remove()
        self._steps = 0

        def after_step(opt, args, kwargs):
            self._steps += 1
            if self.tuned.on_step_end(self._steps):
                refresh_param_groups(opt, self.named_parameters())

        self._step_hook = inner.register_step_post_hook(after_step)

    # ------------------------------------------------------------------ reporting
    def sparsity_report(self):
        """||θ − θ0||₀ against m with the budget (:class:`~sparse_ft.methods.base.SparsityReport`, counts of
        entries)."""
        return self.tuned.sparsity_report()

    def describe(self) -> str:
        """The trainable-parameter printout: method, trainable entries, budget, realised ||θ − θ0||₀ (exact
        comparison with θ0), then what counts in m, the head, tied and frozen tensors."""
        return f"{self.tuned.describe()}\n{self.tuned.model.describe_split()}"

    def print_trainable_parameters(self) -> None:
        """Print :meth:`describe` (peft's ``print_trainable_parameters``, with the budget and ||θ − θ0||₀)."""
        print(self.describe())

    # ------------------------------------------------------------------ save, load, merge
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory/sparse_model.safetensors`` (the tuned model in sparse-ft's one file format,
        :func:`~sparse_ft.methods.saving.save_tuned`: the method's tensors, the head, the method config and θ0's
        fingerprint: about k values + k indices + the head for a mask method) and ``directory/sparse_config.json``
        (base model name or path and class, the split, ties, the method config, the sparsity report)."""
        directory = Path(directory)
        hf = self.tuned.model.hf
        name = getattr(hf, "name_or_path", "") or ""
        save_tuned(self.tuned, directory / WEIGHTS_FILE, metadata={"base_model": name})
        record = {"format": FORMAT, "base_model_name_or_path": name, "base_model_class": type(hf).__name__,
                  **self.tuned.model.split(), "method": self.tuned.config.to_dict(),
                  "sparsity_report": self.sparsity_report().to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> SparseModel:
        """The tuned model saved in ``directory`` rebuilt on ``model``, a fresh transformers model of the same
        base at θ0 (changed in place; its head is overwritten by the saved one), in eval mode. Rebuilding needs
        no data (``config.rebuild``, then the saved state). Raises :class:`~sparse_ft.errors.UserError` (one
        line) for a folder without the files, a corrupt file, or another base model (θ0's fingerprint differs)."""
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise UserError(f"{directory}: no {CONFIG_FILE} here (not a SparseModel.save_pretrained folder)")
        saved = json.loads(path.read_text())
        provider = HFTaskModel(model, saved["backbone"], saved["modules_to_save"])
        return SparseModel(load_tuned(Path(directory) / WEIGHTS_FILE, provider)).eval()

    def merge_and_unload(self) -> nn.Module:
        """A plain transformers model (a new one; this SparseModel is unchanged) whose weights are what this
        model evaluates with: same logits in eval mode, ties restored, every parameter trainable. Sparse deltas,
        Mixout and full fine-tuning write θ into the weights, LoRA folds (α/r)·BA into them; adapters are
        nonlinear, so the merged model keeps them as submodules called from hooks (it works in memory, but
        ``save_pretrained``/``from_pretrained`` of it would drop them)."""
        return self.tuned.merge_into_dense().to_plain()


def refresh_param_groups(optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, nn.Parameter]]):
    """Point ``optimizer``'s groups at the parameters that train now, in place: tensors that no longer train
    leave their groups (and their state goes), new ones join the group with the smallest weight decay (biases,
    LayerNorm: :func:`~sparse_ft.methods.base.is_no_decay`) or the largest (the rest); group hyperparameters,
    the learning-rate schedule and the state of tensors that stay are kept."""
    trainable = [(n, p) for n, p in named_parameters if p.requires_grad]
    keep = {id(p) for _, p in trainable}
    held = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in keep:
                optimizer.state.pop(param, None)
        group["params"] = [p for p in group["params"] if id(p) in keep]
        held |= {id(p) for p in group["params"]}
    by_decay = sorted(optimizer.param_groups, key=lambda g: g.get("weight_decay", 0.0))
    for name, param in trainable:
        if id(param) not in held:
            (by_decay[0] if is_no_decay(name) else by_decay[-1])["params"].append(param)


class SparseCallback(TrainerCallback):
    """``transformers.Trainer`` callback for methods whose trainable set changes while training (DiffPruning's
    projection after its burn-in, ChildPruning's ``reselect_every``): binds the Trainer's optimizer to the
    :class:`SparseModel` (:meth:`SparseModel.bind_optimizer`) when training begins. Harmless for the other
    methods. Under Trainer, DiffPruning's gate logits train at the Trainer's learning rate (its
    ``alpha_lr_scale`` applies in sparse-ft's own loop). Raises :class:`~sparse_ft.errors.UserError` when the
    Trainer's model is not a SparseModel."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not isinstance(model, SparseModel):
            raise UserError(f"SparseCallback needs a sparse_ft.SparseModel in the Trainer, got {type(model).__name__}")
        model.bind_optimizer(optimizer)
