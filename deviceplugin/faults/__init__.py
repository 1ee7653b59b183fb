"""NPU faults: the fault table (code → level → action), the recovery decisions (reset when free, isolate after
too many resets) and the isolation record. Decisions are pure functions; the health monitor does the I/O."""
