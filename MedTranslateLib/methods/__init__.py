"""Translation methods: one module per method, named as in the papers' README.

``available_methods()`` lists the registered names; ``build_method(name, config_dict)`` builds one
from its YAML config; ``get_method_class(name)`` gives the class (``.Config`` is its dataclass).
"""

from . import autoencoder, bbdm, c2fmit, cyclegan, dfbk, dgpg, pix2pix, resshift, rlbcd  # noqa: F401  (importing a method module registers it)
from .base import (
    Capabilities,
    TrainingStage,
    Translation,
    TranslationMethod,
    available_methods,
    build_method,
    capabilities_of,
    get_method_class,
    register,
)

__all__ = ["Capabilities", "TrainingStage", "Translation", "TranslationMethod", "available_methods", "build_method", "capabilities_of", "get_method_class",
           "register"]
