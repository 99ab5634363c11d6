"""One module per method; importing this package registers every one of them in ``METHODS``."""

import importlib
import pkgutil
import sys

from .base import (
    METHODS,
    BuildContext,
    MethodConfig,
    SparsityReport,
    TunedModel,
    get_method,
    make_method_config,
)


def import_method_modules() -> None:
    """Import every method module (each registers itself in ``METHODS``); idempotent."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


# The mask methods subclass classes of sparse_ft.delta, which imports .base and so runs this file
# before its own body when it is imported first: then the modules wait until delta is complete.
deferred = "sparse_ft.delta" in sys.modules
if not deferred:
    import_method_modules()

__all__ = ["METHODS", "BuildContext", "MethodConfig", "SparsityReport", "TunedModel", "get_method",
           "make_method_config"]
