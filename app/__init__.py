"""The composition root of cqrskit: the ``cqrskit`` command line and the processes it starts, and
``App``, the one object an app declares (``from cqrskit.app import App``).

The only package that imports across every layer. Settings are read here, once, and handed down;
everything below (``cqrskit.workers``, ``cqrskit.producers``, ``cqrskit.read_models``,
``cqrskit.infra``, ``cqrskit.domain``) receives what it needs as arguments.
"""

from cqrskit.app.declaration import App

__all__ = ["App"]
