"""The extender's plugins, one job each: device fit, NUMA, business type, QoS colocation, prefill/decode
affinity. Each registers itself (``registry``) with its name, its args and its constructor; a filter rejects with a
reason, a scorer scores in [0, 1].

The imports below are the registrations, in the order filters run (the first that rejects a node gives its
reason): adding a plugin is its module plus one line here.
"""

from . import registry  # noqa: I001  (the registry first)
from .registry import REGISTRY, PluginArgs, register
from .device_fit import DeviceFitArgs, DeviceFitPlugin
from .numa import NumaArgs, NumaPlugin
from .business import BusinessTypeArgs, BusinessTypePlugin
from .colocation import ColocationPlugin, QosColocationArgs
from .pd_affinity import PdAffinityArgs, PdAffinityPlugin

__all__ = ["REGISTRY", "BusinessTypeArgs", "BusinessTypePlugin", "ColocationPlugin", "DeviceFitArgs", "DeviceFitPlugin",
           "NumaArgs", "NumaPlugin", "PdAffinityArgs", "PdAffinityPlugin", "PluginArgs", "QosColocationArgs",
           "register", "registry"]
