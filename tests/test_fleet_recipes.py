"""The fleet recipes in ``docs/fleet/`` stay true: they parse, every ``oauthmig`` command in
them is one the CLI accepts, each runner's ``--part I/N`` has N equal to the number of its
matrix jobs or pods (and I ranges over 1..N), and the waves run in the configured order."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from oauthmig.cli import cli
from oauthmig.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
FLEET = ROOT / "docs" / "fleet"
WAVES = ["canary", "ring1", "rest"]  # config.example.toml's [waves], the implied rest last


def _load(name: str) -> Any:
    return yaml.safe_load((FLEET / name).read_text())


def _commands(script: str, values: dict[str, str]) -> list[list[str]]:
    """The ``oauthmig`` invocations of a shell script, its variables replaced by ``values``."""
    for pattern, value in values.items():
        script = script.replace(pattern, value)
    found = []
    for line in script.splitlines():
        match = re.search(r"\boauthmig (.*?)(?:;|#|$)", line)
        if match:
            found.append(shlex.split(match.group(1).strip()))
    return found


def _accepted(args: list[str]) -> click.Context:
    """Parse ``args`` as the CLI would (options, types, choices), without running anything."""
    name, *rest = args
    command = cli.commands[name]
    return command.make_context(name, rest, parent=click.Context(cli, info_name="oauthmig"))


def _parts(commands: list[list[str]]) -> set[str]:
    return {c[c.index("--part") + 1] for c in commands if "--part" in c}


def test_the_example_config_has_the_waves_the_recipes_run() -> None:
    env = {"SHARD_EU_DATABASE_URL": "postgresql://oauth@db-eu:5432/sentry"}
    settings = load_settings(str(ROOT / "config.example.toml"), env, ROOT)
    assert [w.name for w in settings.waves] == ["canary", "rest"]
    assert settings.waves[-1].implied


def test_github_actions_matrix() -> None:
    workflow = _load("github-actions.yml")
    jobs = workflow["jobs"]
    assert list(jobs) == [*WAVES, "fleet"]
    for i, wave in enumerate(WAVES):
        job = jobs[wave]
        assert job.get("needs") == (WAVES[i - 1] if i else None)
        parts = job["strategy"]["matrix"]["part"]
        assert parts == list(range(1, len(parts) + 1))
        script = "\n".join(step.get("run", "") for step in job["steps"])
        for part in parts:
            commands = _commands(script, {"${{ matrix.part }}": str(part)})
            assert [c[0] for c in commands] == ["upgrade", "backfill", "upgrade"]
            assert _parts(commands) == {f"{part}/{len(parts)}"}
            for c in commands:
                assert c[c.index("--wave") + 1] == wave
                _accepted(c)
    (summary,) = _commands(jobs["fleet"]["steps"][-1]["run"], {})
    assert _accepted(summary).params["summary"]


def test_gitlab_parallel_matrix() -> None:
    pipeline = _load("gitlab-ci.yml")
    assert pipeline["stages"] == [*WAVES, "fleet"]
    template = pipeline[".oauthmig"]
    script = "\n".join(template["script"])
    for wave in WAVES:
        job = pipeline[wave]
        assert job["extends"] == ".oauthmig" and job["stage"] == wave
        variables = job["variables"]
        (matrix,) = job["parallel"]["matrix"]
        assert variables["WAVE"] == wave
        assert matrix["PART"] == [str(i) for i in range(1, int(variables["PARTS"]) + 1)]
        for part in matrix["PART"]:
            values = {"$WAVE": wave, "$PARTS": variables["PARTS"], "$PART": part}
            commands = _commands(script, values)
            assert [c[0] for c in commands] == ["upgrade", "backfill", "upgrade"]
            assert _parts(commands) == {f"{part}/{variables['PARTS']}"}
            for c in commands:
                _accepted(c)
    (summary,) = _commands("\n".join(pipeline["fleet"]["script"]), {})
    assert _accepted(summary).params["check"]


def test_kubernetes_indexed_job() -> None:
    job = _load("kubernetes-indexed-job.yaml")
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["template"]["spec"]["restartPolicy"] == (
        "Never"
    )
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["PARTS"]) == spec["completions"] == spec["parallelism"]
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
    assert rule["onExitCodes"]["containerName"] == container["name"]
    script = container["args"][0]
    assert 'part="$((JOB_COMPLETION_INDEX + 1))/$PARTS"' in script
    for index in range(spec["completions"]):  # JOB_COMPLETION_INDEX is 0-based
        part = f"{index + 1}/{env['PARTS']}"
        commands = _commands(script, {"$WAVE": env["WAVE"], '"$part"': part})
        assert [c[0] for c in commands] == ["upgrade", "backfill", "upgrade"]
        assert _parts(commands) == {part}
        for c in commands:
            _accepted(c)


@pytest.mark.parametrize("name", sorted(p.name for p in FLEET.glob("*.y*ml")))
def test_every_recipe_is_linked_from_the_readme(name: str) -> None:
    assert f"docs/fleet/{name}" in (ROOT / "README.md").read_text()
