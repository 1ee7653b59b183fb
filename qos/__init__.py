"""Node agent for LS/BE colocation: spare resources for best-effort pods, cgroup limits, eviction."""
