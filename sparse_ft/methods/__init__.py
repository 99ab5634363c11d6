"""One module per method; importing this package registers every one of them in ``METHODS``."""

import importlib
import pkgutil

from .base import (
    METHODS,
    BuildContext,
    MethodConfig,
    SparsityReport,
    TunedModel,
    get_method,
    make_method_config,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "BuildContext", "MethodConfig", "SparsityReport", "TunedModel", "get_method",
           "make_method_config"]
