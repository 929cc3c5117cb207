"""pytest-benchmark set-up for the suites in bench/ (``pytest bench/ --benchmark-only``).

Not part of the default test run (pytest.ini's testpaths is tests/). Each result is grouped by
``case.id`` (``benchmark.group``), so ``--benchmark-autosave`` then ``--benchmark-compare`` lines up
the same op and size across commits. ``--bench-quick`` keeps only the cases marked ``quick`` (the
short default run of ``nova-fast bench``); cases that cannot run here skip with their reason.

``run_bench_case(case, impl, rounds=None)`` is the shared body of a suite's test: it builds the
case's inputs once per session, skips with the reason when the implementation cannot run here, and
records sizes and the case's metrics in ``extra_info``.
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", default=False,
                     help="only the cases marked quick (what `nova-fast bench` runs by default on a CPU)")


@pytest.fixture(scope="session")
def bench_case_setup():
    """case -> {impl label: callable}, built once per session (setup can be expensive)."""
    built: dict[str, dict] = {}
    failed: dict[str, str] = {}

    def get(case):
        if case.id in failed:
            pytest.skip(failed[case.id])
        if case.id not in built:
            try:
                built[case.id] = case.setup()
            except Exception as exc:  # noqa: BLE001 -- every impl of the case skips with this reason
                failed[case.id] = f"{case.id} setup failed: {type(exc).__name__}: {exc}"
                pytest.skip(failed[case.id])
        return built[case.id]

    return get


@pytest.fixture
def run_bench_case(benchmark, bench_case_setup, request):
    def run(case, impl: str, rounds: int | None = None):
        if not case.quick and request.config.getoption("--bench-quick"):
            pytest.skip(f"{case.id} is not a quick case (--bench-quick)")
        impls = bench_case_setup(case)
        fn = impls.get(impl)
        if fn is None:
            pytest.skip(f"{impl} is not an implementation of {case.id} here (has: {', '.join(impls)})")
        if isinstance(fn, BaseException):
            pytest.skip(f"{impl} unavailable: {fn}")
        benchmark.group = case.id
        benchmark.extra_info.update({"baseline": case.baseline, **case.sizes})
        if case.metrics is not None:
            benchmark.extra_info.update(case.metrics())
        if rounds is None:
            result = benchmark(fn)
        else:
            result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        extra = getattr(fn, "extra_metrics", None)
        if callable(extra):
            benchmark.extra_info.update(extra())
        return result

    return run
