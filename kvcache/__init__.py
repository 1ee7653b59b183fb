"""Global KV-cache index (event-fed) and shared block tier."""
