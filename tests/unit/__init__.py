"""Unit tests, one module per library module: fast, in-process."""
