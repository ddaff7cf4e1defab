"""Side-by-side benchmarks: pgkloset against pg_dump, restic, borg and pgBackRest.

Run with ``python -m bench.run [--quick|--full]`` (or ``make bench``). The
figures choose pgkloset's defaults; docs/BENCHMARKS.md explains them.
"""
