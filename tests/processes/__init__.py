"""Library code with the processes it needs: worker pools (text packing), a lock held by another
process, a size-limited tmpfs mounted for a full disk. Every test here starts processes, so the folder
is slow (tests/conftest.py SLOW_FOLDERS)."""
