"""``fedtwin site approve|approvals|revoke``: the site's allow-list of studies it accepts.

A study is (twin spec hash, FedTwin code version); the site trains for it only once a person at
the site approved that pair (:mod:`site_agent.approval`, docs/site-approval.md). Register with
``app.command("approve")(approve)`` etc.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

_CONFIG_HELP = "the site config (sites/site_<k>.toml); its [approval] allow_list, else <site>.approvals.json beside the ledger"


def _site(config: Path):  # -> (SiteConfig, Path)
    from fedtwin.federation.config import load_site_config

    site = load_site_config(config)
    return site, site.allow_list_path()


def approve(
    config: Path = typer.Option(..., "--config", help=_CONFIG_HELP),
    spec: Path = typer.Option(..., "--spec", help="the study's twin spec (YAML or JSON) to approve, as reviewed"),
    code_version: str | None = typer.Option(None, "--code-version", help="FedTwin code version approved (default: this installation's)"),
    by: str | None = typer.Option(None, "--by", help="who approves (free text, recorded)"),
    note: str | None = typer.Option(None, "--note", help="why / reference, e.g. an ethics approval number (recorded)"),
) -> None:
    """Approve a study at this site: its twin spec's hash with a FedTwin code version (nothing else is accepted)."""
    from site_agent.approval import record_approval

    site, path = _site(config)
    a, new = record_approval(path, spec, code_version, approved_by=by, note=note)
    console = Console()
    if new:
        console.print(f"approved at site {site.site.name}:", highlight=False)
    else:
        when = a.approved_at + (f" by {a.approved_by}" if a.approved_by else "")
        console.print(f"already approved at site {site.site.name} ({escape(when)}); allow-list unchanged:", highlight=False)
    for key, value in (
        ("twin spec", f"{a.spec_name} v{a.spec_version} ({spec})"),
        ("spec hash", a.spec_hash),
        ("code version", a.code_version),
        ("allow-list", str(path)),
    ):
        console.print(f"  {key:<13}{escape(value)}", highlight=False, soft_wrap=True)


def approvals(
    config: Path = typer.Option(..., "--config", help=_CONFIG_HELP),
    json_out: bool = typer.Option(False, "--json", help="print the allow-list as JSON"),
) -> None:
    """List the studies (spec hash + code version) this site has approved."""
    from site_agent.approval import AllowList

    site, path = _site(config)
    allow = AllowList.load(path)
    if json_out:
        typer.echo(json.dumps({"site": site.site.name, "allow_list": str(path), "exists": allow.exists,
                               "approvals": [a.to_dict() for a in allow.approvals]}, indent=2))
        return
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # piped or captured: do not squeeze the table
    if not allow.approvals:
        state = "" if allow.exists else " (no file yet)"
        console.print(f"site {site.site.name}: allow-list {path}{state} is empty: no study is accepted", highlight=False)
        return
    t = Table(title=f"site {site.site.name}: approved studies ({path})", title_justify="left")
    for col in ("spec hash", "spec", "code version", "approved at (UTC)", "by", "note"):
        t.add_column(col, no_wrap=col in ("spec hash", "code version", "approved at (UTC)"))
    for a in allow.approvals:
        t.add_row(a.short_hash, escape(f"{a.spec_name} v{a.spec_version}"), escape(a.code_version),
                  a.approved_at.replace("T", " ").removesuffix("+00:00"), escape(a.approved_by or ""), escape(a.note or ""))
    console.print(t)
    console.print("(spec hash: the first 12 hex digits; --json shows the full hash)", highlight=False)


def revoke(
    config: Path = typer.Option(..., "--config", help=_CONFIG_HELP),
    spec_hash: str = typer.Option(..., "--spec-hash", help="the approved spec hash (full, or its first 12+ hex digits)"),
    code_version: str = typer.Option(..., "--code-version", help="the approved code version to revoke"),
) -> None:
    """Withdraw one approval: the site refuses that spec with that code version from now on."""
    from site_agent.approval import revoke as revoke_approval

    site, path = _site(config)
    a = revoke_approval(path, spec_hash, code_version)
    Console().print(
        f"revoked twin spec {a.spec_name} v{a.spec_version} (spec hash {a.spec_hash}) with FedTwin code version "
        f"{a.code_version} at site {site.site.name}; allow-list {path}", highlight=False,
    )
