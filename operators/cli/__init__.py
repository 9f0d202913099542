"""The ``tuo`` command line: the local stack, the bus's services, status, and the demo.

One module per command group; this root only gathers them, in the order `tuo --help` lists them.
"""

from __future__ import annotations

import typer

from operators.cli import database, lag, run, status
from operators.cli.access import access_app
from operators.cli.accounts import offices_app, tokens_app, users_app
from operators.cli.agencies import agencies_app
from operators.cli.audit import audit_app
from operators.cli.dlq import dlq_app
from operators.cli.informants import informants_app
from operators.cli.proxies import proxies_app
from operators.cli.receipts import receipts_app
from operators.cli.replay import replay_app
from operators.cli.schemas import schemas_app
from operators.cli.stack import stack_app
from operators.cli.subscriptions import subscriptions_app
from operators.cli.webhooks import webhooks_app

__all__ = ["app", "main"]

app = typer.Typer(help="Tell Us Once: tell the state about a life event once.", no_args_is_help=True)
app.command("migrate")(database.migrate_command)
app.command("seed")(database.seed_command)
app.command("run")(run.run_command)
app.command("status")(status.status_command)
app.command("demo")(run.demo_command)
app.command("lag")(lag.lag_command)
app.add_typer(stack_app, name="stack")
app.add_typer(subscriptions_app, name="subscriptions")
app.add_typer(audit_app, name="audit")
app.add_typer(schemas_app, name="schemas")
app.add_typer(offices_app, name="offices")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(receipts_app, name="receipts")
app.add_typer(agencies_app, name="agencies")
app.add_typer(proxies_app, name="proxies")
app.add_typer(access_app, name="access")
app.add_typer(replay_app, name="replay")
app.add_typer(dlq_app, name="dlq")
app.add_typer(informants_app, name="informants")
app.add_typer(webhooks_app, name="webhooks")


def main() -> None:
    app()
