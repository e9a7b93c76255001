"""Every example command shown by ``--help`` and in README code blocks runs, against the
embedded-default demo databases, and exits with the code its documentation gives."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from oauthmig.cli import cli, run
from tests.cli_demo import cli_env, run_forked

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("examples")]  # one module fixture
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


def help_examples() -> list[str]:
    """Command lines shown in the description part of every ``--help`` text."""
    root = click.Context(cli, info_name="oauthmig")
    texts = [cli.get_help(root)]
    pending: list[tuple[click.Context, str, click.Command]] = [
        (root, name, command) for name, command in cli.commands.items()
    ]
    while pending:  # subcommands of groups too (``backfill pause``)
        parent, name, command = pending.pop(0)
        ctx = click.Context(command, info_name=name, parent=parent)
        texts.append(command.get_help(ctx))
        if isinstance(command, click.Group):
            pending.extend((ctx, n, c) for n, c in command.commands.items())
    found: list[str] = []
    for help_text in texts:
        description = help_text.split("\nOptions:")[0]
        for line in description.splitlines():
            if line.strip().startswith("oauthmig "):
                found.append(_strip_comment(line.strip()))
    return found


def readme_blocks() -> list[list[str]]:
    """Per README code block (not Python), the command lines it shows, in order."""
    text = (ROOT / "README.md").read_text()
    blocks: list[list[str]] = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            continue
        commands = []
        for line in body.splitlines():
            line = re.sub(r"^\s*(\$ |- run: )", "", line).strip()
            if line.startswith("oauthmig "):
                commands.append(_strip_comment(line))
        if commands:
            blocks.append(commands)
    return blocks


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line)


def documented_exit(command: str, outstanding: bool) -> int:
    """The exit code the docs give: 1 for findings at or above --fail-on (the demo data holds
    redirect URIs with errors on purpose, docs/rules.md) and for ``status --check`` and
    ``verify`` while work is outstanding; 0 otherwise."""
    if "audit-redirects" in command and "--baseline " in command:
        return 0  # nothing new since the baseline (see _baseline_premise)
    if "audit-redirects" in command and "--fail-on never" not in command:
        return 1
    if "check-redirect" in command and "*." in command:
        return 1  # RU004: a wildcard is an error
    if command.startswith("oauthmig status") and " --check" in command:
        return 1 if outstanding else 0
    if command.startswith("oauthmig verify"):
        return 1 if outstanding else 0  # rows still lack values before the backfills
    return 0


@pytest.fixture(scope="module")
def waiting_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder whose embedded-default databases hold demo data after the expand upgrade
    (0004 waits for both backfills)."""
    folder = tmp_path_factory.mktemp("examples")
    here = Path.cwd()
    os.chdir(folder)
    try:
        assert run(["-q", "demo", "--apps", "40", "--tokens", "300", "--setup-only"]) == 0
        assert run(["-q", "upgrade"]) == 0
    finally:
        os.chdir(here)
    yield folder


def _copy(state: Path, target: Path) -> Path:
    shutil.copytree(state, target)
    return target


def _baseline_premise(command: str, folder: Path) -> None:
    """``audit-redirects --baseline FILE`` presumes the baseline was written and committed
    earlier (the README's adoption path): write it in ``folder`` when it is not there yet."""
    found = re.search(r"--baseline (\S+)", command)
    if found is None or (folder / found.group(1)).exists():
        return
    here = Path.cwd()
    os.chdir(folder)
    try:
        written = ["-q", "audit-redirects", "--write-baseline", found.group(1)]
        assert run([*written, "--fail-on", "never"]) == 0
    finally:
        os.chdir(here)


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = cli_env(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_examples_are_found() -> None:
    examples = help_examples()
    assert len(examples) >= 20 and "oauthmig upgrade -d control --to 0002" in examples
    assert any("- run:" not in c for block in readme_blocks() for c in block)


def test_every_help_example_runs_with_its_documented_exit_code(
    waiting_state: Path, tmp_path: Path
) -> None:
    plain: list[tuple[str, Path]] = []
    shell: list[tuple[str, Path]] = []
    for i, command in enumerate(help_examples()):
        # `demo` builds its own databases: an empty folder, as a new user would have.
        if command.split()[1] == "demo":
            folder = tmp_path / f"{i}"
            folder.mkdir()
        else:
            folder = _copy(waiting_state, tmp_path / f"{i}")
        _baseline_premise(command, folder)
        (shell if re.search(r"[|>]", command) else plain).append((command, folder))
    results = run_forked(
        [(shlex.split(c)[1:], folder, None) for c, folder in plain], tmp_path / "streams"
    )
    problems = [
        f"{c}: exit {r.code} (expected {documented_exit(c, True)}): {r.err[-300:]!r}"
        for (c, _), r in zip(plain, results, strict=True)
        if r.code != documented_exit(c, True) or "Traceback" in r.err
    ]
    for command, folder in shell:
        done = _shell(command, folder)
        if done.returncode != documented_exit(command, True) or "Traceback" in done.stderr:
            problems.append(f"{command}: exit {done.returncode}: {done.stderr[-300:]!r}")
        elif "| jq" in command:
            assert done.stdout.strip(), command  # jq parsed a JSON document
        elif ">" in command:
            written = folder / command.split(">")[-1].strip()
            assert written.read_text().startswith("-- ===== database: "), command
    assert not problems, "\n".join(problems)


def test_every_readme_block_runs_in_order_with_its_documented_exit_code(
    waiting_state: Path, tmp_path: Path
) -> None:
    """Each README block is a sequence (the rollout, the CI pipeline): run it in order on its
    own copy of the demo, as the README shows it. Before each ``status --check`` a
    ``status --format json`` says whether work is outstanding at that point."""
    jobs: list[tuple[list[str], Path, dict[str, str] | None]] = []
    files: list[Path | None] = []
    shown: list[tuple[str, int]] = []  # (command, index of its job)
    for b, block in enumerate(readme_blocks()):
        folder = _copy(waiting_state, tmp_path / f"block{b}")
        for command in block:
            _baseline_premise(command, folder)
            words, target = command, None
            if ">" in command:
                words, name = command.split(">")
                target = folder / name.strip()
            if command.startswith("oauthmig status") and " --check" in command:
                jobs.append((["status", "--format", "json"], folder, None))
                files.append(None)
            shown.append((command, len(jobs)))
            jobs.append((shlex.split(words)[1:], folder, None))
            files.append(target)
    results = run_forked(jobs, tmp_path / "streams", workers=1, stdout_files=files)
    problems: list[str] = []
    for command, i in shown:
        checked = command.startswith("oauthmig status") and " --check" in command
        outstanding = checked and json.loads(results[i - 1].out)["outstanding"]
        expected = documented_exit(command, outstanding)
        if results[i].code != expected or "Traceback" in results[i].err:
            problems.append(
                f"{command}: exit {results[i].code} (expected {expected}): "
                f"{results[i].err[-300:]!r}"
            )
        elif ">" in command:
            written = Path(jobs[i][1]) / command.split(">")[-1].strip()
            assert written.read_text().startswith("-- ===== database: "), command
    assert not problems, "\n".join(problems)
