"""The command line's options and how click parses them: the global options (accepted
before and after the command name, merged into one :class:`AppState`), the options several
commands share (declared once here), and the parameter types the commands use."""

from __future__ import annotations

import logging
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from oauthmig.errors import UsageError

if TYPE_CHECKING:
    from oauthmig.config import Settings
    from oauthmig.output.consoles import Consoles
    from oauthmig.rollout import fleet

MAX_RUNTIME_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class AppState:
    """Global options, shared by every command."""

    config_path: str | None
    databases: tuple[str, ...]
    consoles: Consoles

    def settings(self) -> Settings:
        """Load the configuration and apply ``--database``."""
        from oauthmig.config import load_settings

        return load_settings(self.config_path).restrict(self.databases)

    def select(
        self,
        wave: str | None,
        part: str | None,
        *,
        gate: Callable[[Settings, fleet.Selection], None] | None = None,
    ) -> Settings | None:
        """The settings of ``-d``/``--wave``/``--part`` (after ``gate``, which may refuse the
        wave); ``None``, said in one line, when that selects no database (a part of fewer
        databases than parts is empty, not an error)."""
        if wave is None and part is None:
            return self.settings()
        from oauthmig.config import load_settings
        from oauthmig.rollout import fleet

        full = load_settings(self.config_path)
        selection = fleet.select(
            full, self.databases, wave, fleet.parse_part(part) if part is not None else None
        )
        if selection.settings is None:
            self.consoles.info(f"nothing to do: {selection.describe()} selects no database")
            return None
        if gate is not None:
            gate(full, selection)
        return selection.settings

    def command_prefix(self) -> str:
        """``oauthmig`` plus the ``--config`` in use, for commands printed as advice."""
        if self.config_path is None:
            return "oauthmig"
        return f"oauthmig --config {shlex.quote(self.config_path)}"


class FiniteRange(click.FloatRange):
    """A float range that also refuses ``nan`` and ``inf`` (they compare false to any bound)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return rv


FORMAT = click.Choice(["text", "json"])
FAIL_ON = click.Choice(["error", "warning", "never"])
MIN_SEVERITY = click.Choice(["error", "warning", "info"])
FORMAT_OPTION = click.option("--format", "fmt", type=FORMAT, default="text", show_default=True)
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def options(*decorators: Decorator) -> Decorator:
    """Several options as one decorator, listed in ``--help`` in the order given."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(decorators):
            f = option(f)
        return f

    return apply


def offline_options(sql_help: str, from_default: str) -> Decorator:
    """``--sql``, ``--from`` and ``--output-dir`` of upgrade and downgrade."""
    return options(
        click.option("--sql", "offline", is_flag=True, help=sql_help),
        click.option(
            "--from",
            "from_revision",
            metavar="REV",
            help=f"With --sql: the revision the databases are at (default: {from_default}).",
        ),
        click.option(
            "--output-dir",
            type=click.Path(file_okay=False),
            metavar="DIR",
            help="With --sql: write one script per database, DIR/<database>.sql, instead of "
            "stdout.",
        ),
    )


#: ``--wave`` and ``--part`` of upgrade, backfill and status: which share of the fleet.
FLEET_OPTIONS = options(
    click.option(
        "--wave",
        metavar="NAME",
        help="Only the databases of this [waves] entry; refused while a database of an earlier "
        "wave failed or has not reached the revision this run targets.",
    ),
    click.option(
        "--part",
        metavar="I/N",
        help="Only the I-th of N deterministic shares of the selected databases (1-based; the "
        "same on every host): N CI matrix jobs or Indexed Job pods split the fleet.",
    ),
)


def dry_run_option(help: str) -> Decorator:
    """``--dry-run``, with what it means for the command."""
    return click.option("--dry-run", is_flag=True, help=help)


def jobs_option(help: str, default: int = 1) -> Decorator:
    """``--jobs/-j``: how many databases (or job x database pairs) at once, 1 to 64."""
    return click.option(
        "--jobs", "-j", default=default, show_default=True, type=click.IntRange(1, 64), help=help
    )


def sleep_option(help: str) -> Decorator:
    """``--sleep``: seconds between batches, 0 to 3600."""
    return click.option(
        "--sleep", "sleep_seconds", type=FiniteRange(0, 3600), default=None, help=help
    )


def fail_on_option(help: str) -> Decorator:
    """``--fail-on``: the severity that makes the command exit 1."""
    return click.option("--fail-on", type=FAIL_ON, default="error", show_default=True, help=help)


# Global options, accepted before and after the subcommand name (``oauthmig -d x status`` and
# ``oauthmig status -d x``). Values given after the name are stored in ``ctx.meta``.
_META_LATE = "oauthmig.late_globals"
_META_STATE = "oauthmig.state"
META_JSON = "oauthmig.json_output"
_CONFIG_HELP = (
    "Config file (default: $OAUTHMIG_CONFIG, ./oauthmig.toml, or the embedded "
    "SQLite default under ./.oauthmig/)."
)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value not in (None, False, ()):
        assert param.name is not None
        ctx.meta.setdefault(_META_LATE, {})[param.name] = value
    return value


#: The global options: (declarations, attributes), declared once for the group and again on
#: every subcommand (where they are stored for :func:`build_state`, not passed).
_GLOBAL_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--config", "config_path"), {"type": click.Path(dir_okay=False), "help": _CONFIG_HELP}),
    (
        ("--database", "-d", "databases"),
        {"multiple": True, "metavar": "NAME", "help": "Only act on this database (repeatable)."},
    ),
    (("--verbose", "-v"), {"is_flag": True, "help": "More detail."}),
    (("--quiet", "-q"), {"is_flag": True, "help": "Only errors and requested output."}),
)


def global_options(*, late: bool = True) -> list[click.Parameter]:
    """The global options as parameters: of the group (``late=False``), or of a subcommand."""
    extra: dict[str, Any] = {"expose_value": False, "callback": _remember} if late else {}
    return [click.Option(list(decls), **attrs, **extra) for decls, attrs in _GLOBAL_OPTIONS]


def invoke_command(ctx: click.Context, invoke: Callable[[click.Context], Any]) -> Any:
    """Run a subcommand with the global options applied, the project's ``UsageError`` turned
    into a click usage error (one line naming ``oauthmig CMD --help``)."""
    build_state(ctx)
    ctx.meta[META_JSON] = ctx.params.get("fmt")
    ctx.meta["command"] = ctx.info_name
    try:
        return invoke(ctx)
    except UsageError as exc:
        raise click.UsageError(exc.message, ctx) from None


class Command(click.Command):
    """A subcommand that accepts the global options too, and turns the project's
    ``UsageError`` into a click usage error (one line naming ``oauthmig CMD --help``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(global_options())

    def invoke(self, ctx: click.Context) -> Any:
        return invoke_command(ctx, super().invoke)


class Group(click.Group):
    command_class = Command


def build_state(ctx: click.Context) -> AppState:
    """Merge the global options given before and after the subcommand into one AppState."""
    root = ctx.find_root()
    late: dict[str, Any] = ctx.meta.get(_META_LATE, {})
    config_path = late.get("config_path", root.params.get("config_path"))
    databases = tuple(root.params.get("databases", ())) + tuple(late.get("databases", ()))
    verbose = bool(root.params.get("verbose") or late.get("verbose"))
    quiet = bool(root.params.get("quiet") or late.get("quiet"))
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other", ctx)
    if verbose:
        # Alembic reports each revision it runs ("Running upgrade 0001 -> 0002") at INFO.
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s: %(message)s")
    from oauthmig.output.consoles import Consoles
    from oauthmig.redact import scrub_log_records

    scrub_log_records()  # library log lines (psycopg, SQLAlchemy's pool) can quote driver errors
    state = AppState(config_path, databases, Consoles.create(quiet=quiet, verbose=verbose))
    ctx.meta[_META_STATE] = state
    return state


def state_of(ctx: click.Context) -> AppState:
    """The invocation's :class:`AppState` (built once)."""
    state: AppState = ctx.meta.get(_META_STATE) or build_state(ctx)
    return state


class BackfillGroup(click.Group):
    """``backfill [JOB]...`` runs jobs; ``backfill pause|resume|cancel [JOB]...`` are its
    subcommands. The first word decides: a subcommand name, or else the run with job names
    (job names never collide with the subcommands), options before and after them."""

    command_class = Command

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(global_options())

    def _first_word(self, ctx: click.Context, args: list[str]) -> str | None:
        parser = self.make_parser(ctx)
        parser.allow_interspersed_args = False
        try:
            _, rest, _ = parser.parse_args(args=list(args))
        except click.UsageError:
            return None  # parsed again below, where the error is reported
        return rest[0] if rest else None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if self._first_word(ctx, args) in self.commands:
            return super().parse_args(ctx, args)
        ctx.allow_interspersed_args = True
        ctx.allow_extra_args = True
        rest = click.Command.parse_args(self, ctx, args)
        ctx.params["job_names"] = tuple(rest)
        ctx.args = []
        return []

    def invoke(self, ctx: click.Context) -> Any:
        return invoke_command(ctx, super().invoke)


def given_options(ctx: click.Context, names: dict[str, str]) -> list[str]:
    """The options of ``names`` given on the command line (not defaults)."""
    return [
        flag
        for name, flag in names.items()
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    ]
