"""--output writes what the path names: files atomically, devices and FIFOs in place."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from oauthmig.errors import UsageError
from oauthmig.output.files import output_file
from tests.helpers import invoke, seed_legacy, write_config
from tests.helpers.databases import DatabaseFactory, create_legacy, routed_config


@pytest.fixture
def cfg(make_database: DatabaseFactory, tmp_path: Path) -> str:
    from oauthmig.config import settings_from_mapping

    data = routed_config(make_database("control"), make_database("shard"))
    settings = settings_from_mapping(data, {}, "test")
    create_legacy(settings)
    seed_legacy(settings, rows=6)
    return write_config(tmp_path / "oauthmig.toml", data)


def _audit(capsys: pytest.CaptureFixture[str], cfg: str, output: str, fmt: str = "json") -> int:
    result = invoke(capsys, "--config", cfg, "audit-redirects", "--format", fmt, "-o", output)
    assert "wrote the" in result.out, result.err
    return result.code


def test_regular_file_is_replaced_atomically_keeping_its_mode(
    cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "r.json"
    report.write_text("old")
    os.chmod(report, 0o640)
    old_inode = report.stat().st_ino
    assert _audit(capsys, cfg, str(report)) in (0, 1)
    assert "findings" in json.loads(report.read_text())
    assert stat.S_IMODE(report.stat().st_mode) == 0o640
    assert report.stat().st_ino != old_inode  # renamed over, not rewritten in place
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == []


def test_symlink_target_is_written_and_the_link_kept(
    cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "reports").mkdir()
    target = tmp_path / "reports" / "real.csv"
    target.write_text("old")
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    assert _audit(capsys, cfg, str(link), "csv") in (0, 1)
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text().startswith("database,")
    # the temporary file was made beside the target, not beside the link
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_dangling_symlink_creates_its_target(
    cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "out.json"
    link.symlink_to(tmp_path / "made.json")
    assert _audit(capsys, cfg, str(link)) in (0, 1)
    assert link.is_symlink() and json.loads((tmp_path / "made.json").read_text())


def test_dev_null_stays_a_device(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = os.stat("/dev/null")
    assert _audit(capsys, cfg, "/dev/null", "sarif") in (0, 1)
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino


def test_fifo_is_written_directly_to_its_reader(
    cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []

    def read() -> None:
        with open(fifo, encoding="utf-8") as fh:
            received.append(fh.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert _audit(capsys, cfg, str(fifo)) in (0, 1)
    reader.join(30)
    assert not reader.is_alive()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert "summary" in json.loads(received[0])


@pytest.mark.parametrize("name", ["dir", ""])
def test_directory_and_empty_name_are_refused(
    cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(
        capsys,
        "--config",
        cfg,
        "audit-redirects",
        "-o",
        str(target) if name else "",
    )
    assert result.code == 2
    assert result.out == ""
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "Traceback" not in result.err
    assert ("is a directory" if name else "file name is empty") in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list(target.iterdir()) == []


def test_missing_parent_is_a_one_line_error(
    cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = invoke(capsys, "--config", cfg, "audit-redirects", "-o", str(tmp_path / "no/r.json"))
    assert result.code == 2
    assert result.err.startswith("error: --output ") and "No such file" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    report = tmp_path / "r.txt"
    report.write_text("old")
    with pytest.raises(RuntimeError), output_file(report) as fh:
        fh.write("half")
        raise RuntimeError("boom")
    assert report.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_socket_is_refused(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "s"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        with pytest.raises(UsageError, match="not a regular file"), output_file(path):
            pass
    finally:
        sock.close()
