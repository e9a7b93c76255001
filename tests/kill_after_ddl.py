"""Run the oauthmig CLI and SIGKILL its own process right after its N-th DDL statement returns.

Usage: ``python -m tests.kill_after_ddl N oauthmig-args...``. A real, unclean death (no
``finally``, no rollback, no unlock) at a chosen point; on PostgreSQL finalize statements run in
autocommit, so statement N is committed when the process dies.
"""

from __future__ import annotations

import os
import signal
import sys

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import DBAPICursor

DDL_PREFIXES = ("ALTER ", "CREATE ", "DROP ", "DO ")


def is_ddl(statement: str) -> bool:
    """Whether a statement changes the schema (what the fault test counts)."""
    return statement.lstrip().upper().startswith(DDL_PREFIXES)


def main() -> None:
    """Count DDL statements; die by SIGKILL after the N-th."""
    limit = int(sys.argv[1])
    seen = 0

    def after(_conn: Connection, _cursor: DBAPICursor, statement: str, *_args: object) -> None:
        nonlocal seen
        if is_ddl(statement):
            seen += 1
            if seen == limit:
                os.kill(os.getpid(), signal.SIGKILL)

    event.listen(Engine, "after_cursor_execute", after)
    from oauthmig.cli import main as cli_main

    cli_main(sys.argv[2:])


if __name__ == "__main__":
    main()
