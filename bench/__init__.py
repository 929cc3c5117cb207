"""Benchmarks of nova_fast (installed as ``nova_fast.bench``): the case lists, the runner behind
``nova-fast bench`` and the pytest-benchmark suites (``pytest bench/ --benchmark-only``)."""
