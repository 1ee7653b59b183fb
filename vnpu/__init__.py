"""vNPU templates, static partitioning, dynamic create-on-allocate, leak-free reconcile."""
