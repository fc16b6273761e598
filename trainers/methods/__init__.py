"""Compression methods behind one interface; importing this package registers them all."""

from trainers.methods import ofb  # noqa: F401  (registers "ofb")
from trainers.methods.base import SearchMethod, get_method, list_methods, register_method

__all__ = ["SearchMethod", "get_method", "list_methods", "register_method"]
