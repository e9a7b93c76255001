"""Benchmarks behind ``make bench`` (``python -m tests.bench``); not collected by pytest.

* ``backfill`` (issue 3): the ``token-families`` backfill over 1M legacy tokens on PostgreSQL
  against one set-based UPDATE doing the same work on an identical copy;
* ``rules`` (issue 4): throughput of :func:`oauthmig.redirects.rules.check_uri`;
* ``audit`` (issue 4): peak memory of ``audit-redirects`` over 100k applications.

Every benchmark creates its own uniquely named PostgreSQL databases (or SQLite files in a
temporary directory) and drops them at the end, even on failure. Results go to
``docs/benchmarks.md`` by hand.
"""
