"""The default of every tunable that a component takes as an argument, written once.

``Settings`` (``CQRSKIT_*``) defaults its fields to these, and the components default their
parameters to the same names, so a component built without the composition root (in a test)
runs as a deployed one does. Change a default here, nowhere else.
"""

MAX_COMMAND_BYTES = 64 * 1024  # the largest command body accepted
CONFLICT_RETRIES = 30  # in-worker retries on version conflicts
GROUP_COMMIT_MAX = 64  # PostgreSQL: most commands one transaction decides
GROUP_COMMIT_LEADERS = 1  # PostgreSQL: group-commit transactions a process runs at once
GROUP_COMMIT_LINGER_MS = 0.0  # PostgreSQL: how long a batch may wait to fill up
COMMAND_THREADS = 64  # threads of a command worker process (they wait for their batch: group commit)
INDEXER_THREADS = 8  # threads of an indexer process
