"""Kubelet device plugin (gRPC v1beta1): discovers NPUs with npu-smi, advertises them, health checks,
topology-aware allocation."""
