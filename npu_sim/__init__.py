"""Simulated Ascend NPU hardware: a fake ``npu-smi`` that prints the real formats from a JSON node state."""
