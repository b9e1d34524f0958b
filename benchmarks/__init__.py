"""The benchmark (``python benchmarks/run.py``): a package so its parts import each other by one name."""
