"""The extender's plugin registry, after kube-scheduler's ``registry.go``: each plugin registers its name, its args
(a config section whose field defaults are the only place its defaults live) and its constructor. The config file's
``plugins:`` section, the framework's plugin list (in registration order: the order filters run and reasons are
given) and the chart's values schema all come from here.

Adding a plugin is one new module in ``plugins/`` that ends with its registration, plus one import line in
``plugins/__init__.py`` (docs/architecture.md has a worked example)::

    class GpuAffinityArgs(PluginArgs):
        weight: float = Field(default=1.0, ge=0)

    @register("gpu-affinity", GpuAffinityArgs)
    class GpuAffinityPlugin:
        def __init__(self, args: GpuAffinityArgs = GpuAffinityArgs()): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ConfigDict, Field, create_model

from fuyao.config_files import ConfigSection

from ..framework import Plugin


class PluginArgs(ConfigSection):
    """Base of a plugin's args (its section under ``plugins:``): ``weight`` of its score in the weighted average
    (0: it does not score; its filter still runs)."""

    model_config = ConfigDict(allow_inf_nan=False)  # an infinite weight made every score NaN (sent as null: 0)

    weight: float = Field(default=1.0, ge=0)


A = TypeVar("A", bound=PluginArgs)
P = TypeVar("P", bound=Callable[[Any], Plugin])


@dataclass(frozen=True)
class Registration:
    name: str
    """The plugin's name: in reasons (``device-fit: ...``), metrics and ``/explain``; its config key is the same
    in camelCase (``deviceFit``)."""
    args: type[PluginArgs]
    new: Callable[[Any], Plugin]

    @property
    def field(self) -> str:
        """The attribute of the ``plugins`` config section (snake_case; the file says it in camelCase)."""
        return self.name.replace("-", "_")


REGISTRY: dict[str, Registration] = {}
"""Every registered plugin by name, in registration order."""


def register(name: str, args: type[A]) -> Callable[[P], P]:
    """Class (or factory) decorator: ``new(args)`` makes the plugin from its args."""

    def add(new: P) -> P:
        if name in REGISTRY:
            raise ValueError(f"extender plugin {name!r} is registered twice")
        REGISTRY[name] = Registration(name, args, new)
        return new

    return add


def settings_model() -> type[ConfigSection]:
    """The ``plugins:`` section of the config: one field per registered plugin, of its args type."""
    fields: dict[str, Any] = {r.field: (r.args, r.args()) for r in REGISTRY.values()}
    return create_model("PluginSettings", __base__=ConfigSection, **fields)


def args_of(settings: ConfigSection, name: str) -> PluginArgs:
    """One plugin's args from the ``plugins`` config section."""
    found: PluginArgs = getattr(settings, REGISTRY[name].field)
    return found


def build(settings: ConfigSection) -> list[tuple[Plugin, float]]:
    """Every registered plugin made from its args, with its weight, in registration order."""
    made = []
    for registration in REGISTRY.values():
        args = args_of(settings, registration.name)
        made.append((registration.new(args), args.weight))
    return made
