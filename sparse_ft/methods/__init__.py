"""The ten methods and full fine-tuning, one module each; importing this package registers every one.

The family's base classes live in :mod:`.base` (every method), :mod:`.masks` (the mask family) and
:mod:`.saving` (one file format for all); none of them imports a method. A new method is a module here
with a ``@register``-ed config, imported below: the contract tests then run over it.
"""

from .adapter import AdapterConfig
from .base import (
    METHODS,
    BuildContext,
    MethodConfig,
    SparsityReport,
    TunedModel,
    get_method,
    make_method_config,
)
from .bitfit import BitFitConfig
from .childpruning import ChildPruningConfig
from .diffpruning import DiffPruningConfig
from .full import FullConfig
from .lora import LoRAConfig
from .magnitude import MagnitudeConfig
from .mixout import MixoutConfig
from .random import RandomConfig
from .sam import SamConfig
from .saving import load_tuned, save_tuned

__all__ = ["METHODS", "AdapterConfig", "BitFitConfig", "BuildContext", "ChildPruningConfig", "DiffPruningConfig",
           "FullConfig", "LoRAConfig", "MagnitudeConfig", "MethodConfig", "MixoutConfig", "RandomConfig",
           "SamConfig", "SparsityReport", "TunedModel", "get_method", "load_tuned", "make_method_config",
           "save_tuned"]
