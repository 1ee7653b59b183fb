"""Preset node descriptions for the fake npu-smi (JSON files beside this module)."""
