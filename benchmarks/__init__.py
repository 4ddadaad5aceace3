"""Speed and memory measurements; each ``bench_*.py`` module has a ``main()`` that prints its
ratio against a baseline measured in the same run. ``python -m benchmarks [name ...]``."""
