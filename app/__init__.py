"""The composition root of cqrskit: the ``cqrskit`` command line and the processes it starts.

The only package that imports across every layer. Settings are read here, once, and handed down;
everything below (``cqrskit.workers``, ``cqrskit.producers``, ``cqrskit.read_models``,
``cqrskit.infra``, ``cqrskit.domain``) receives what it needs as arguments.
"""
