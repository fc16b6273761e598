"""Compression methods behind one interface; importing this package registers them all."""

from trainers.methods import (  # noqa: F401  (importing registers each method)
    control,
    ofb,
    spvit,
    two_stage,
    uvc,
    vit_slim,
)
from trainers.methods.base import (
    SearchMethod,
    get_method,
    list_methods,
    method_sections,
    register_method,
    section_of,
)

__all__ = ["SearchMethod", "get_method", "list_methods", "method_sections", "register_method",
           "section_of"]
