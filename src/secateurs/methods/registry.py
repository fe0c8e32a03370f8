"""The method registry (its own module so recipes can register without import cycles)."""
from ..registry import Registry

METHODS: Registry = Registry("method")
