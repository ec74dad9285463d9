"""The `loraswap` command: one module per command group, mounted here.

serve.py        serve, demo prepare
adapters.py     adapters ...      (admin API)
aliases.py      aliases ...       (admin API)
tenants.py      tenants ...       (admin API)
experiments.py  experiments ...   (admin API; feedback also as a tenant)
options.py      what the admin commands share: option types, client session
render.py       tables and summaries of the server's records
"""

from __future__ import annotations

import typer

from server.cli import adapters, aliases, experiments, serve, tenants

app = typer.Typer(help="Multi-LoRA inference server on vLLM.", no_args_is_help=True)
app.command("serve")(serve.serve)
app.add_typer(serve.demo_app, name="demo")
app.add_typer(adapters.app, name="adapters", help="Manage adapters on a running server.")
app.add_typer(aliases.app, name="aliases", help="Manage A/B aliases on a running server.")
app.add_typer(
    tenants.app, name="tenants", help="Manage tenants, quotas and API keys on a running server."
)
app.add_typer(
    experiments.app,
    name="experiments",
    help="A/B experiments: feedback on responses, reports of aliases.",
)


def main() -> None:
    app()


__all__ = ["app", "main"]
