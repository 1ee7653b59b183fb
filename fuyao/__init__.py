"""fuyao kernel: the contracts every component shares, and the npu-smi client.

This package must import none of the component packages (deviceplugin, scheduler_extender, vnpu, qos,
inference_router, kvcache, engine_sim): they depend on it, never the other way round.
"""

__version__ = "0.1.0"
