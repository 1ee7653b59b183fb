"""HTTP scheduler extender for kube-scheduler and Volcano: NPU fit, NUMA, business type, QoS, prefill/decode."""
