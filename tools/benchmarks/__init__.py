"""The subcommands of tools/bench.py, one module each (timing.py and common.py are shared)."""
