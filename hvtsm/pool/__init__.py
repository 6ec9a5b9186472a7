"""The warm pool: pre-booted guests keyed by runtime and trust level (see warm.py)."""
