"""Benchmark (issue 4): peak memory of ``audit-redirects`` over many applications.

For each backend (SQLite in a temporary directory, PostgreSQL in a scratch database) and each
application count (always 0 as a reference, then by default 10k and 100k),
``setup_legacy(apps=N, tokens=0)`` builds a legacy install (about 1.5 grants per application, a
quarter of the applications messy). Every measurement then runs in a **fresh subprocess**:

* ``service``: :func:`oauthmig.redirects.audit.audit` iterated to the end, every finding written
  by the JSON report writer (:func:`oauthmig.output.audit_writers.writer_for`) to a temporary file;
* ``traced``: the same in another subprocess under :mod:`tracemalloc` (its peak is the Python
  heap the audit allocated; tracemalloc slows the run and inflates RSS, hence separate runs);
* ``cli json`` / ``cli sarif``: the command itself, ``oauthmig --config CFG audit-redirects
  --format json|sarif --output FILE --fail-on never``, through :func:`oauthmig.cli.run`.

Peak memory is the subprocess's peak resident set (``VmHWM``) minus its peak after the imports
(baseline). ``VmHWM`` rather than ``getrusage().ru_maxrss``: on Linux a child's ``ru_maxrss``
starts at the parent's resident size at ``fork`` (the kernel folds the pre-``exec`` address
space into it), so after the parent has built 100k applications every child would report at
least the parent's 160 MB. ``VmHWM`` belongs to the address space ``exec`` created.

Constant memory means the 100k figures stay close to the 10k ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.bench.bench_common import ScratchDatabases

REPO = Path(__file__).resolve().parents[2]
MODES = ("service", "traced", "cli json", "cli sarif")
GROWTH_LIMIT_MB = 10.0  # 100k vs 10k: more than this is "grows with the number of apps"


def peak_rss_mb() -> float:
    """Peak resident set of this process (``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


# --------------------------------------------------------------------------- child side


def _child(mode: str, config: str, out: str) -> None:
    import tracemalloc

    import psycopg  # noqa: F401  (the dialect imports it on first connect: part of the baseline)

    from oauthmig.cli import run
    from oauthmig.config import load_settings
    from oauthmig.output.audit_writers import writer_for
    from oauthmig.redirects.audit import audit
    from oauthmig.rollout.revisions import history

    baseline = peak_rss_mb()
    traced: float | None = None
    findings: int | None = None
    t0 = time.perf_counter()
    if mode.startswith("cli "):
        argv = ["--quiet", "--config", config, "audit-redirects", "--format", mode[4:]]
        code = run([*argv, "--output", out, "--fail-on", "never"])
        if code != 0:
            raise SystemExit(f"audit-redirects exited {code}")
    else:
        settings = load_settings(config)
        revisions = history()
        if mode == "traced":
            tracemalloc.start()
        result = audit(settings, revisions=revisions)
        findings = 0
        with open(out, "w", encoding="utf-8") as f:
            writer = writer_for("json", f, application_table=settings.tables.application)
            writer.begin()
            for finding in result:
                writer.finding(finding)
                findings += 1
            writer.end(result.summary())
        if mode == "traced":
            traced = tracemalloc.get_traced_memory()[1] / 2**20
    seconds = time.perf_counter() - t0
    report = {
        "baseline_mb": baseline,
        "peak_mb": peak_rss_mb(),
        "traced_mb": traced,
        "seconds": seconds,
        "findings": findings,
    }
    print("\n" + json.dumps(report))


# --------------------------------------------------------------------------- parent side


@dataclass(frozen=True)
class Measurement:
    """One backend and application count: per mode, peak RSS growth over the baseline."""

    backend: str
    apps: int
    load: str
    findings: int
    output_mb: float
    seconds: float  # the service run
    baseline_mb: float  # the service run's RSS after imports
    growth_mb: dict[str, float]  # mode -> peak RSS minus baseline (MiB)
    traced_mb: float


def _run_child(mode: str, config: str, out: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "tests.bench.bench_audit", mode, config, str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def _install(backend: str, apps: int, work: Path, dbs: ScratchDatabases, seed: int) -> str:
    from oauthmig.demo.data import setup_legacy
    from tests.bench.bench_common import single_db_settings

    if backend == "sqlite":
        url = f"sqlite:///{work / f'audit-{apps}.sqlite3'}"
    else:
        url = dbs.create(f"a{apps}")
    setup_legacy(single_db_settings(url), apps=apps, tokens=0, seed=seed)
    config = work / f"{backend}-{apps}.toml"
    config.write_text(f'[databases.main]\nurl = "{url}"\n', encoding="utf-8")
    return str(config)


def _measure(backend: str, apps: int, config: str, work: Path) -> Measurement:
    from tests.bench.bench_common import load

    before = load()
    out = work / f"audit-{backend}-{apps}.out"
    runs: dict[str, dict[str, Any]] = {}
    output_mb = 0.0
    for mode in MODES:
        runs[mode] = _run_child(mode, config, out)
        if mode == "service":
            output_mb = out.stat().st_size / 2**20
            doc = json.loads(out.read_text(encoding="utf-8"))  # one valid JSON document
            if len(doc["findings"]) != runs[mode]["findings"]:
                raise AssertionError("findings written and counted differ")
            del doc
        elif mode == "cli json":
            doc = json.loads(out.read_text(encoding="utf-8"))
            if len(doc["findings"]) != runs["service"]["findings"]:
                raise AssertionError("the CLI and the service report different findings")
            del doc
        out.unlink(missing_ok=True)
    service = runs["service"]
    return Measurement(
        backend,
        apps,
        before,
        int(service["findings"]),
        output_mb,
        float(service["seconds"]),
        float(service["baseline_mb"]),
        {m: float(r["peak_mb"]) - float(r["baseline_mb"]) for m, r in runs.items()},
        float(runs["traced"]["traced_mb"]),
    )


def _print(ms: Sequence[Measurement]) -> None:
    growth = [m for m in MODES if m != "traced"]
    print(
        f"   {'backend':<10} {'apps':>8} {'findings':>8} {'JSON MB':>7} {'s':>5} {'base':>6}"
        + "".join(f" {'+' + m:>11}" for m in growth)
        + f" {'traced':>7}  load"
    )
    for m in ms:
        print(
            f"   {m.backend:<10} {m.apps:>8,} {m.findings:>8,} {m.output_mb:>7.1f} "
            f"{m.seconds:>5.1f} {m.baseline_mb:>6.1f}"
            + "".join(f" {m.growth_mb[g]:>11.1f}" for g in growth)
            + f" {m.traced_mb:>7.2f}  {m.load}"
        )


def main(*, apps: Sequence[int], backends: Sequence[str], seed: int) -> bool:
    """Measure every backend and size; True when memory does not grow with the app count."""
    from tests.bench.bench_common import machine, pass_fail, scratch_databases

    sizes = sorted({0, *apps})
    print(f"== audit: peak memory of audit-redirects, apps {', '.join(f'{a:,}' for a in sizes)}")
    print(f"   {machine()}")
    results: list[Measurement] = []
    with scratch_databases("au") as dbs, tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        for backend in backends:
            for n in sizes:
                t0 = time.perf_counter()
                config = _install(backend, n, work, dbs, seed)
                print(
                    f"   {backend}: {n:,} applications set up in {time.perf_counter() - t0:.1f} s"
                )
                results.append(_measure(backend, n, config, work))
                if backend == "sqlite":
                    for leftover in work.glob(f"audit-{n}.sqlite3*"):
                        leftover.unlink()
    _print(results)
    print(
        "   MiB. base: peak RSS (VmHWM) of the service subprocess after its imports; "
        "+mode: that subprocess's peak RSS minus its own base;\n"
        "   traced: tracemalloc peak during the audit; s: service run time"
    )
    ok = True
    for backend in backends:
        mine = sorted((m for m in results if m.backend == backend and m.apps), key=lambda m: m.apps)
        if len(mine) < 2:
            continue
        small, big = mine[0], mine[-1]
        grow = {f"+{k}": big.growth_mb[k] - small.growth_mb[k] for k in MODES if k != "traced"}
        grow["traced"] = big.traced_mb - small.traced_mb
        flat = all(g <= GROWTH_LIMIT_MB for g in grow.values())
        ok &= flat
        print(
            f"   {backend}: {small.apps:,} -> {big.apps:,} apps: "
            + ", ".join(f"{k} {v:+.1f}" for k, v in grow.items())
            + f" MiB (limit +{GROWTH_LIMIT_MB:.0f}): {pass_fail(flat)}"
        )
    return ok


def _entry(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_audit",
        description="one measurement in this fresh process (used by the audit benchmark)",
    )
    p.add_argument("mode", choices=MODES)
    p.add_argument("config")
    p.add_argument("out")
    args = p.parse_args(argv)
    _child(args.mode, args.config, args.out)


if __name__ == "__main__":
    _entry(sys.argv[1:])
