"""Tools run as a user runs them (tools/*.py, make targets) and process trees: every test here starts
processes, so the folder is slow (tests/conftest.py SLOW_FOLDERS)."""
