"""``fedtwin consortium ...``: a local consortium (SuperLink + one SuperNode per site) on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="A local consortium on 127.0.0.1: CA and TLS, SuperNode keys, site/study configs; start, stop, inspect, run apps.",
    no_args_is_help=True,
)
console = Console()


@app.command("init")
def init(
    sites: int = typer.Option(2, "--sites", min=1, max=64, help="number of sites (one SuperNode each)"),
    out: Path = typer.Option(..., "--out", help="folder to create (must be new or empty)"),
    force: bool = typer.Option(False, "--force", help="replace an existing consortium in OUT (new keys and certificates)"),
    name: str = typer.Option("fedtwin-local", "--name", help="consortium name (also the flwr federation name)"),
    study_id: str = typer.Option("local-study", "--study-id"),
    spec: Path | None = typer.Option(None, "--spec", help="twin spec (default: specs/hypertension-bp.yaml); copied into OUT/specs"),
    rounds: int = typer.Option(3, "--rounds", min=1),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg or fedprox"),
    proximal_mu: float = typer.Option(0.0, "--proximal-mu", min=0.0, help="FedProx proximal term (fedprox only)"),
    min_sites: int | None = typer.Option(None, "--min-sites", min=1, help="minimum sites per round (default: min(sites, 2))"),
    epsilon: float = typer.Option(8.0, "--epsilon", help="each site's total DP epsilon"),
    delta: float = typer.Option(1e-5, "--delta"),
    server_name: list[str] = typer.Option([], "--server-name", help="extra DNS name/IP for the SuperLink certificate (repeatable)"),
    public_address: str | None = typer.Option(
        None, "--public-address", help="HOST:PORT sites use to reach the SuperLink across hosts (site configs; HOST added to the certificate)"
    ),
    secagg: bool = typer.Option(True, "--secagg/--no-secagg", help="SecAgg+ in study.toml (needs 2 sites or more)"),
    executor: str = typer.Option("fork", "--executor", help="fork (FedTwin fork executor) or flower (Flower's subprocess isolation)"),
    poll_interval: float = typer.Option(0.2, "--poll-interval", min=0.0, max=3.0, help="cap on Flower's 3 s polls of the SuperLink (0 = Flower's)"),
    preload: list[str] = typer.Option(
        [], "--preload", help="installed module the fork executors import once (e.g. torch, site_agent.client_app); repeatable"
    ),
) -> None:
    """Create a local consortium in OUT: CA + SuperLink certificate, SuperNode and signing keys, configs, ports."""
    from coordinator.consortium.consortium import init_consortium

    res = init_consortium(
        out, sites, force=force, name=name, study_id=study_id, spec=spec, rounds=rounds, strategy=strategy,
        proximal_mu=proximal_mu, min_sites=min_sites, epsilon=epsilon, delta=delta, server_names=tuple(server_name),
        public_address=public_address, secagg={"enabled": secagg and sites >= 2}, runtime={"executor": executor, "poll_interval": poll_interval, "preload": list(preload)},
    )
    m = res.manifest
    console.print(f"[bold green]created[/] consortium [bold]{m.consortium.name}[/] in {res.root} ({len(m.sites)} sites)", highlight=False)
    t = Table(show_header=True, title=None)
    t.add_column("what")
    t.add_column("where / value")
    t.add_row("SuperLink", f"127.0.0.1:{m.superlink.port} (Fleet + Control + Runtime API, TLS)")
    t.add_row("certificate SANs", ", ".join(m.superlink.server_names))
    for s in m.sites:
        t.add_row(s.name, f"{s.config} (Runtime API 127.0.0.1:{s.runtime_api_port})")
    t.add_row("study", "study.toml")
    t.add_row("keys", "pki/ (CA, SuperLink TLS), keys/supernode/ (EC P-384, OpenSSH), keys/signing/ (Ed25519), keys/superexec/")
    console.print(t)
    console.print(f"next: [bold]fedtwin consortium up {res.root}[/]", highlight=False)


@app.command("up")
def up_cmd(
    root: Path = typer.Argument(..., help="the consortium folder"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds to wait for everything to be ready"),
) -> None:
    """Start the SuperLink and the SuperNodes (TLS, SuperNode authentication); wait until all are online."""
    from coordinator.consortium.consortium import up

    with console.status("starting the SuperLink, registering the sites' keys, starting the SuperNodes..."):
        res = up(root, timeout=timeout)
    if res.restarted:
        console.print(f"the SuperLink of the last start was not running: stopped what was left of that start "
                      f"({', '.join(res.restarted)}) and started the consortium again; continue an interrupted study "
                      f"with `fedtwin coordinator launch --config STUDY --resume`", highlight=False)
    console.print(f"[bold green]up[/] in {res.seconds:.1f} s: {len(res.nodes)} SuperNode(s) online", highlight=False)
    _print_status(root)


@app.command("down")
def down_cmd(
    root: Path = typer.Argument(..., help="the consortium folder"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds between SIGTERM and SIGKILL"),
) -> None:
    """Stop every process of the consortium (SIGTERM to each process group, SIGKILL after the timeout)."""
    from coordinator.consortium.consortium import down

    res = down(root, timeout=timeout)
    if not res.stopped and not res.strays:
        console.print("nothing was running")
    for name, what in res.stopped:
        console.print(f"{name}: {what}", highlight=False)
    for pid, cmd in res.strays:
        console.print(f"also stopped (not a recorded process): {pid} {cmd[:100]}", highlight=False)


@app.command("status")
def status_cmd(
    root: Path = typer.Argument(..., help="the consortium folder"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """What is running: processes (pid, log), SuperNodes as the SuperLink sees them, runs (a FedTwin run whose
    every round halted shows as finished:no-round-completed, not Flower's finished:completed)."""
    if json_out:
        from dataclasses import asdict

        from coordinator.consortium.consortium import status

        st = asdict(status(root))
        st["root"] = str(st["root"])
        typer.echo(json.dumps(st, indent=2))
        return
    _print_status(root)


def _print_status(root: Path) -> None:
    from coordinator.consortium.consortium import status

    st = status(root)
    console.print(
        f"consortium {st.root}: SuperLink {st.address} "
        + ("[green]reachable[/]" if st.superlink_reachable else "[red]not reachable[/]")
        + f", federation [bold]{st.federation}[/]",
        highlight=False,
    )
    if not st.processes:
        console.print("no processes (run `fedtwin consortium up`)")
        return
    t = Table(title="processes")
    for col in ("name", "pid", "state", "up", "log"):
        t.add_column(col)
    for p in st.processes:
        t.add_row(p.name, str(p.pid), "[green]running[/]" if p.running else "[red]stopped[/]",
                  f"{p.uptime_s:.0f} s" if p.uptime_s is not None else "", p.log)
    console.print(t)
    if st.nodes:
        t = Table(title="SuperNodes (SuperLink's view)")
        for col in ("site", "node id", "status"):
            t.add_column(col)
        for n in st.nodes:
            t.add_row(n["site"], str(n["node_id"]), n["status"])
        console.print(t)
    if st.runs:
        from coordinator.consortium.run_outcome import TrainingOutcome

        t = Table(title="runs")
        t.add_column("run id", no_wrap=True)  # whole: it is what `flwr log` and the launch's lines name
        t.add_column("app", overflow="fold")
        t.add_column("status", no_wrap=True)
        t.add_column("training rounds")
        for r in st.runs[-10:]:
            rounds = "-" if r["rounds_completed"] is None else TrainingOutcome(r["rounds_completed"], r["rounds"], r["first_round"]).describe()
            t.add_row(str(r["run_id"]), r["fab_id"], r["state"], rounds)
        console.print(t)


@app.command("run")
def run_cmd(
    root: Path = typer.Argument(..., help="the consortium folder"),
    app_dir: Path = typer.Argument(..., help="Flower app folder (pyproject.toml with [tool.flwr.app])"),
    run_config: list[str] = typer.Option([], "--run-config", "-c", help="KEY=VALUE (TOML value), repeatable"),
    timeout: float = typer.Option(3600.0, "--timeout"),
) -> None:
    """Run a Flower app on the consortium (flwr run APP FEDERATION --stream) and report how it ended."""
    import tomllib

    from coordinator.consortium.consortium import run_app
    from fedtwin.federation.errors import ConsortiumError

    cfg: dict = {}
    for item in run_config:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConsortiumError(f"--run-config {item!r} is not KEY=VALUE", 'e.g. -c num-rounds=3 -c name="x"')
        try:
            cfg[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            cfg[key] = value
    res = run_app(root, app_dir, cfg, stream=True, timeout=timeout)
    typer.echo(res.output, nl=False)
    console.print(f"run {res.run_id}: flwr exit {res.returncode}, {res.status}:{res.sub_status} in {res.seconds:.1f} s", highlight=False)
    if not res.ok:
        raise typer.Exit(1)
