"""minipt's benchmarks: ``python -m bench`` for tables and plots, ``pytest bench/ --benchmark-only`` for pytest-benchmark."""
