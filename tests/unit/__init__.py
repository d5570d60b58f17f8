"""Unit tests: no processes, no sockets, no GPU.

A package, so that its modules do not clash with same-named modules of tests/system.
"""
