"""The names a recipe's ``method`` can take, fed from below: each method module (and the expert-training
job) registers its class with :func:`register`; look-ups go through :func:`get_method`.

A registered class has ``name`` (the recipe's ``method``), ``defaults`` (its own ``params`` with their
default values, which also fix their types), ``check_recipe(recipe)`` (its own checks, raising
RecipeError) and ``produces_set`` (False for jobs such as expert training, which write no condensed set
and need no ipc). Nothing else of ours is imported here.
"""

from __future__ import annotations

from typing import Any, TypeVar

from builders.errors import RecipeError

_REGISTRY: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: make ``cls`` buildable as recipe ``method: {cls.name}``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute 'name' to be registered")
    known = _REGISTRY.get(name)
    if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
        raise TypeError(f"method name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def get_method(name: Any) -> type:
    """The class registered as ``name``; RecipeError lists the buildable names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise RecipeError(f"method: unknown {name!r}; buildable methods: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """Every registered name, sorted."""
    return sorted(_REGISTRY)
