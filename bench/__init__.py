"""devrep benchmarks: ``make bench`` (``python -m bench [module ...]``). Never part of ``make test``."""
