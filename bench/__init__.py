"""Benchmarks: train.py against its peers (compare.py, peers.py), memory views side by side, a profile.

Scripts run from the repository root (`make bench`); a package only so the import rules cover it.
"""
