"""Turning a deep copy of a parametrised module back into a plain one (the merge of every method that
parametrises backbone tensors with :mod:`torch.nn.utils.parametrize`: the sparse delta, Mixout).

Not ``parametrize.remove_parametrizations``: a deep copy of a parametrised module shares the class that
``parametrize`` generated for the original, and removing the copy's parametrisation deletes that class's
properties, breaking the original too; it would also move the tensor to the end of the parameter order.
"""

from __future__ import annotations

from torch import nn


def unparametrize_copy(module: nn.Module, order: list[str] | None = None) -> None:
    """Replace each parametrised tensor of ``module`` (a deep copy) by a plain Parameter holding its
    current value, with the ``requires_grad`` of the tensor it parametrised.

    ``order``: the parameter names in the order the module had before it was parametrised (names it
    lacks go last); None keeps the plain parameters first, then the formerly parametrised ones.
    Evaluate the copy in the mode whose values you want (a stochastic parametrisation gives its
    evaluation value in ``eval()``).
    """
    lists = module.parametrizations
    values = {name: nn.Parameter(getattr(module, name).detach().clone(),
                                 requires_grad=lists[name].original.requires_grad) for name in lists}
    plain = dict(module._parameters)
    del module._modules["parametrizations"]
    module.__class__ = module.__class__.__bases__[0]  # the class parametrize derived from
    known = {**plain, **values}
    names = [n for n in (order or []) if n in known] + [n for n in known if n not in (order or [])]
    module._parameters = {n: known[n] for n in names}
