"""The extender's plugins, one job each: device fit, NUMA, business type, QoS colocation, prefill/decode
affinity. Each filters with a reason and scores in [0, 1]."""

from .business import BusinessTypePlugin
from .colocation import ColocationPlugin
from .device_fit import DeviceFitPlugin
from .numa import NumaPlugin
from .pd_affinity import PdAffinityPlugin

__all__ = ["BusinessTypePlugin", "ColocationPlugin", "DeviceFitPlugin", "NumaPlugin", "PdAffinityPlugin"]
