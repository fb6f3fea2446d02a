"""Example apps built only on cqrskit's public API: ``shop`` (the default app) and ``hotel``."""
