"""`tuo schemas`: the event contract's Avro schemas, their released versions and wire ids."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from operators.cli.shared import console, err
from schemas import evolution
from schemas.catalogue import SOURCE_DIR, VERSIONS_DIR, SchemaCatalogue

schemas_app = typer.Typer(help="The event contract: Avro schemas, versions and ids.", no_args_is_help=True)


SourceDir = Annotated[Path, typer.Option(help="Schema sources (named types).", hidden=True)]
VersionsDir = Annotated[Path, typer.Option(help="Released versions and catalogue.json.", hidden=True)]


@schemas_app.command("check")
def schemas_check(source_dir: SourceDir = SOURCE_DIR, versions_dir: VersionsDir = VERSIONS_DIR) -> None:
    """Prove every version of every schema FULL_TRANSITIVE compatible with all earlier
    versions, every enum has a default, and no source changed without a release."""
    problems = evolution.check(source_dir, versions_dir)
    if problems:
        for problem in problems:
            err.print(f"[red]✗[/] {problem}")
        raise typer.Exit(code=1)
    catalogue = SchemaCatalogue(versions_dir)
    total = sum(len(catalogue.versions(n)) for n in catalogue.names())
    console.print(
        f"[green]✓[/] {len(catalogue.names())} schemas, {total} versions: FULL_TRANSITIVE compatible, "
        "enums have defaults, sources match their latest release."
    )


@schemas_app.command("freeze")
def schemas_freeze(source_dir: SourceDir = SOURCE_DIR, versions_dir: VersionsDir = VERSIONS_DIR) -> None:
    """Release a new version (with a new, permanent id) of each schema whose source
    changed, if every version stays compatible; otherwise release nothing."""
    outcome = evolution.release(source_dir, versions_dir)
    if outcome.problems:
        for problem in outcome.problems:
            err.print(f"[red]✗[/] {problem}")
        err.print("Nothing released: fix the schemas above (add defaults, keep types) and try again.")
        raise typer.Exit(code=1)
    for line in outcome.released:
        console.print(f"released {line}")
    if not outcome.released:
        console.print("Nothing changed; no new versions.")


@schemas_app.command("list")
def schemas_list(versions_dir: VersionsDir = VERSIONS_DIR) -> None:
    """Every released schema version with its wire id."""
    table = Table("id", "subject", "version")
    for entry in SchemaCatalogue(versions_dir).entries():
        table.add_row(str(entry.schema_id), entry.subject, str(entry.version))
    console.print(table)
