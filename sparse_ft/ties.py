"""Tied weights across the backbone's border, kept one tensor while a method parametrises the backbone.

Causal and masked language models tie their output projection to the input embedding: in
``GPT2LMHeadModel``, ``lm_head.weight is transformer.wte.weight``, one |V|×d tensor used twice. The
methods parametrise backbone tensors in place (a sparse delta θ = θ0 + scatter(I, v), Mixout's mix), so
the Parameter both modules held is no longer what the backbone uses: a second module still holding it would
read θ0 or a stale θ and pass no gradient to the method's values, and a functional call that substitutes
the backbone tensor (SAM's and the Fisher's gradients) would substitute it at one use only.

:func:`make_views` therefore turns each such tie into a *view*: the outside module keeps no parameter of
its own and reads the backbone's tensor through a property at every access, so both uses see the same θ
with its gradient, and the tensor is counted once, in the backbone's m. :func:`restore_ties` turns the views
of a (merged) copy back into ordinary ties, one Parameter held by both modules, as ``transformers`` builds them.

Example::

    ties = find_ties(gpt2_lm, inside="transformer")   # {"lm_head.weight": "transformer.wte.weight"}
    make_views(gpt2_lm, ties)                        # lm_head.weight now reads transformer.wte.weight
"""

from __future__ import annotations

from torch import nn

_VIEW_CLASSES: dict[tuple[type, str], type] = {}


def find_ties(model: nn.Module, inside: str) -> dict[str, str]:
    """``{outside name: inside name}`` for every Parameter that ``model`` holds both under the submodule
    ``inside`` (dotted path; ``""`` is the whole model, which has no outside) and outside it, e.g.
    ``{"lm_head.weight": "transformer.wte.weight"}``; detected by identity, not by config flags. Views that
    :func:`make_views` made already count as ties (so a model wrapped twice reports them again)."""
    if not inside:
        return {}
    held: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        held.setdefault(id(param), []).append(name)
    ties = {}
    for names in held.values():
        within = [n for n in names if n.startswith(inside + ".")]
        if within:
            ties.update({n: within[0] for n in names if not n.startswith(inside + ".")})
    paths = {id(module): path for path, module in model.named_modules()}
    for path, module in model.named_modules():
        for attr, (source, source_attr) in module.__dict__.get("_tie_sources", {}).items():
            ties[_join(path, attr)] = _join(paths[id(source)], source_attr)
    return ties


def _join(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _view_class(cls: type, attr: str) -> type:
    """``cls`` with ``attr`` a read-only property that returns the source module's tensor."""
    key = (cls, attr)
    if key not in _VIEW_CLASSES:
        def read(module):
            source, source_attr = module._tie_sources[attr]
            return getattr(source, source_attr)

        _VIEW_CLASSES[key] = type(cls.__name__, (cls,), {attr: property(read)})
    return _VIEW_CLASSES[key]


def make_views(model: nn.Module, ties: dict[str, str]) -> None:
    """Make every outside name of ``ties`` (see :func:`find_ties`) a view of its inside tensor: the
    Parameter is removed from the outside module, whose class gains a property reading the inside module's
    attribute (whatever the backbone holds there now: a plain Parameter, or a parametrised θ)."""
    for outside, inside in ties.items():
        module, attr = _owner(model, outside)
        if attr not in module._parameters:  # a view already
            continue
        del module._parameters[attr]
        sources = module.__dict__.setdefault("_tie_sources", {})
        sources[attr] = _owner(model, inside)
        module.__dict__.setdefault("_untied_class", type(module))
        module.__class__ = _view_class(type(module), attr)


def restore_ties(model: nn.Module, ties: dict[str, str]) -> None:
    """Undo :func:`make_views` on ``model`` (typically a merged copy whose backbone holds plain tensors
    again): each outside module holds the inside module's Parameter itself, the tie ``transformers`` makes."""
    for outside in ties:
        module = _owner(model, outside)[0]
        if "_untied_class" not in module.__dict__:
            continue
        module.__class__ = module.__dict__.pop("_untied_class")
        sources = module.__dict__.pop("_tie_sources")
        for name, (source, source_attr) in sources.items():
            module.register_parameter(name, getattr(source, source_attr))
