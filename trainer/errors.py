"""The one base class of every error a user must fix (bad config, data, checkpoint, shards, ...).

Each area defines its own subclass next to its code (``ConfigError`` in trainer/config.py,
``ShardError`` in trainer/targets/shards.py, ...) and keeps its historical builtin base too
(``ValueError``/``RuntimeError``), so existing ``except`` clauses keep working. A job's entry point
(``trainer.jobs.common.entry``) catches ``BadInput`` and prints one line, ``error (rank r): ...``,
then exits with code 2: the message names the key, file or shard, never a traceback.

Standard library only: cluster/ may import it.
"""
from __future__ import annotations


class BadInput(Exception):
    """Something the user must fix; the message names the key, file or shard."""


class StageError(BadInput, RuntimeError):
    """A stage cannot run as asked (a missing product of an earlier stage, a round out of range, ...)."""
