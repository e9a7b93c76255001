"""Files that ship inside the package: the Alembic revisions, the rules reference and the JSON
Schemas of the ``--format json`` documents.

In the repository they live at the top level (``revisions/``, ``docs/rules.md``,
``docs/schemas/``); a built wheel or sdist carries them as ``oauthmig/revisions`` and
``oauthmig/docs`` (see ``pyproject.toml``). An installed copy uses the packaged files; a source
checkout (editable install) the top-level ones. Nothing here depends on the working directory.
"""

from __future__ import annotations

from pathlib import Path

from oauthmig.errors import InstallationError

__all__ = ["json_schema", "packaged_path", "revisions_dir", "rules_doc", "schemas_dir"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def packaged_path(installed: str, source: str) -> Path:
    """``oauthmig/<installed>`` in an installed copy, else ``<checkout>/<source>``.

    Returns the installed location when neither exists (callers check the files they need).
    """
    packaged = _PACKAGE_DIR / installed
    if packaged.exists():
        return packaged
    checkout = _PACKAGE_DIR.parent / source
    # Only a source checkout has pyproject.toml beside the package: in site-packages a
    # top-level "revisions" folder would belong to some other distribution.
    if (_PACKAGE_DIR.parent / "pyproject.toml").is_file() and checkout.exists():
        return checkout
    return packaged


def revisions_dir() -> Path:
    """The Alembic script location; raises InstallationError if it is incomplete."""
    folder = packaged_path("revisions", "revisions")
    for needed in ("env.py", "script.py.mako", "versions"):
        if not (folder / needed).exists():
            raise InstallationError(
                f"oauthmig is installed without its revisions ({folder / needed} is missing); "
                "reinstall it from a wheel or sdist built from the repository"
            )
    return folder


def rules_doc() -> Path:
    """The redirect-rules reference (``rules.md``); raises InstallationError if missing."""
    path = packaged_path("docs", "docs") / "rules.md"
    if not path.is_file():
        raise InstallationError(
            f"oauthmig is installed without its rules reference ({path} is missing); reinstall it"
        )
    return path


def schemas_dir() -> Path:
    """The folder of JSON Schemas (draft 2020-12), ``<command>.schema.json`` for every
    ``--format json`` document (``upgrade-sql``/``downgrade-sql`` for ``--sql``, and
    ``interrupted``)."""
    return packaged_path("docs", "docs") / "schemas"


def json_schema(document: str) -> Path:
    """The JSON Schema of one document (``status``, ``upgrade-sql``, ...); raises
    InstallationError if it is missing."""
    path = schemas_dir() / f"{document}.schema.json"
    if not path.is_file():
        raise InstallationError(
            f"oauthmig is installed without the JSON Schema {path.name} ({path} is missing); "
            "reinstall it"
        )
    return path
