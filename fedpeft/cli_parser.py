"""The argument parser of the ``fedpeft`` command (``fedpeft.cli`` runs what it parses).

Kept apart from the commands and free of heavy imports: ``fedpeft --help`` loads no torch, numpy or flwr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpeft.simulation.runner import ENGINES


def _scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", help="scenario TOML (default: the embedded quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set federation.rounds=5 (repeatable)")


def _own_version() -> str:
    from importlib import metadata

    return metadata.version("fedpeft")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``fedpeft`` command and all its subcommands."""
    p = argparse.ArgumentParser(prog="fedpeft", description="Federated parameter-efficient fine-tuning on Flower.")
    p.add_argument("-v", "--verbose", action="store_true", help="log every round and library detail")
    p.add_argument("--version", action="version", version=f"fedpeft {_own_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated scenario on this machine")
    _scenario_args(sim)
    sim.add_argument("--engine", choices=list(ENGINES), help="override run.engine")
    sim.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    sim.add_argument("-q", "--quiet", action="store_true",
                     help="no progress (spinner, per-client step lines, per-round lines); the summary still prints")
    cmp = sub.add_parser("compare-compression", help="run a scenario once per codec and compare bytes and accuracy")
    _scenario_args(cmp)
    cmp.add_argument("--codecs", help="comma-separated codec specs, e.g. none,fp16,int8,topk:0.1,compeft:0.1 "
                                      "(a codec's key=value options follow it: compeft:0.05,scale=std); "
                                      "default: compression.sweep")
    cmp.add_argument("--both-directions", action="store_true", help="apply each codec to the downlink too")
    cmp.add_argument("--resume", type=Path, metavar="SWEEP_DIR",
                     help="continue an interrupted sweep: finished codecs are kept, an interrupted run continues "
                          "from its checkpoint (the scenario and other options are not used)")
    cfg = sub.add_parser("config", help="print the resolved configuration (TOML) and exit")
    _scenario_args(cfg)
    cfg.add_argument("--reference", action="store_true", help="print the reference of every key (markdown)")
    doc = sub.add_parser("doctor", help="installed versions against the tested ranges, device, threads")
    doc.add_argument("--json", action="store_true", help="print the facts as JSON (what each run stores)")
    exp = sub.add_parser("export", help="fold a finished run's adapter into its base model (plain transformers)")
    exp.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run directory")
    exp.add_argument("--merge", action="store_true", required=True,
                     help="merge the LoRA / IA3 adapter into the base (RUN_DIR/adapter itself already loads with "
                          "peft; see docs/export.md)")
    exp.add_argument("--out", type=Path, metavar="DIR", help="where to write the model (default: RUN_DIR/merged)")
    _deploy_parsers(sub)
    _split_parser(sub)
    _audit_parser(sub)
    _frontier_parser(sub)
    return p


def _frontier_parser(sub: argparse._SubParsersAction) -> None:
    fr = sub.add_parser("frontier", help="privacy mode x epsilon x codec x adapter: accuracy, leakage verdict and "
                                         "bytes per cell (frontier.md/csv/png); resumable")
    _scenario_args(fr)
    fr.add_argument("--grid", action="append", default=[], metavar="AXIS=V1,V2",
                    help="one axis, e.g. --grid epsilon=1,3,8,inf (repeatable; replaces that axis of the default "
                         "grid mode=none,local,client,distributed epsilon=8,inf codec=none,compeft:0.1,int8-secure "
                         "adapter=lora). Adapters: lora, ffa (FFA-LoRA)")
    fr.add_argument("--mode-set", action="append", default=[], metavar="MODE:SECTION.KEY=VALUE",
                    help="a setting of one privacy mode's cells only, e.g. --mode-set local:train.lr=0.02 "
                         "(repeatable). Local DP-SGD cells take the DP-friendly batch 64 x 4 steps at lr 2e-2 "
                         "unless privacy.dp_defaults = false")
    fr.add_argument("--canaries", type=int, default=1000,
                    help="empirical epsilon audit canaries per local / client-level DP cell (0 = no audit)")
    fr.add_argument("--resume", type=Path, metavar="FRONTIER_DIR",
                    help="continue a killed sweep: run the cells not yet in its frontier.csv")


def _audit_parser(sub: argparse._SubParsersAction) -> None:
    aud = sub.add_parser("audit", help="attack what the server sees over a grid of settings; verdict per cell")
    _scenario_args(aud)
    aud.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                     help="one grid axis, e.g. --grid batch_size=1,4 --grid dp=none,local:0.1 (repeatable; "
                          "replaces that axis of audit.grid). Keys: batch_size, rank, targets, steps, optimizer, "
                          "round, rounds, codec, dp, observed")
    aud.add_argument("--attacks", help="comma-separated attacks (default: audit.attacks)")
    aud.add_argument("--resume", type=Path, metavar="AUDIT_DIR",
                     help="continue an interrupted grid audit: runs only the cells its cells.jsonl lacks, with its "
                          "own config and grid (the scenario and other options are not used)")
    aud.add_argument("--capture", action="store_true",
                     help="run the scenario itself (in-process) and attack the real updates the server decodes, "
                          "instead of the grid; writes audit.md/csv/png into the run directory")
    aud.add_argument("--epsilon-lower-bound", action="store_true",
                     help="empirical epsilon audit of the scenario's DP: canary clients through the server's own "
                          "client-level DP mechanism and/or canary records through the clients' DP-SGD, lower bound "
                          "at 95%% beside the accountant's epsilon")
    aud.add_argument("--canaries", type=int, default=0,
                     help="--epsilon-lower-bound: canaries per level (>= 20; default 131072 client canaries, about "
                          "a minute, and 16384 DP-SGD canary records, memory about canaries^2 x 4 bytes)")
    aud.add_argument("--rounds", type=_ints, metavar="R1,R2", help="--capture: rounds to attack (default: all)")
    aud.add_argument("--clients", type=_ints, metavar="P1,P2",
                     help="--capture: partition ids to attack (default: all)")


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _split_parser(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("split-server", help="serve the middle of a scenario's model to split-learning clients (gRPC)")
    _scenario_args(sp)
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=9200, help="port (0 = any free port; the address is printed)")
    sp.add_argument("--certs", type=Path, help="directory with ca.crt, server.crt, server.key: mutual TLS, every "
                                               "client needs a certificate from that CA (fedpeft client-cert)")
    sp.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback --host (anyone who "
                                                            "reaches the port is served; tests only)")
    sp.add_argument("--state-dir", type=Path, help="keep the server-side adapters here across restarts")
    sp.add_argument("--save-every", type=int, default=10, help="save the state every N backward steps")


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", metavar="HOST:PORT", help="SuperLink address (default: the stored connection)")
    p.add_argument("--ca", type=Path, help="CA certificate of the SuperLink (ca.crt from `fedpeft certs`)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (local tests only)")
    p.add_argument("--flwr-home", type=Path, help="where the connection is stored (default $FLWR_HOME or "
                                                  "~/.fedpeft/flwr)")


def _deploy_parsers(sub: argparse._SubParsersAction) -> None:
    link = sub.add_parser("superlink", help="run a Flower SuperLink (TLS + node auth) in the foreground")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    link.add_argument("--port", type=int, default=8000, help="the one HTTP port (Fleet, Control, ServerAppIo)")
    link.add_argument("--certs", type=Path, help="directory with ca.crt, server.crt, server.key")
    link.add_argument("--insecure", action="store_true", help="no TLS (needs --no-auth; local tests only)")
    link.add_argument("--no-auth", dest="auth", action="store_false", help="accept unregistered SuperNodes")
    link.add_argument("--database", type=Path, help="state file (runs, registered nodes) that survives restarts")
    link.add_argument("--flwr-home", type=Path)
    node = sub.add_parser("node", help="run a Flower SuperNode for this machine's data in the foreground")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT")
    node.add_argument("--data", type=Path, help="this node's own data file (all of it is trained on)")
    node.add_argument("--partition-id", type=int, help="train on this partition of the scenario data instead")
    node.add_argument("--num-partitions", type=int)
    node.add_argument("--rank", type=int, help="this node's LoRA rank (runs with adapter.rank_rule = 'node'; "
                                               "at most adapter.r)")
    node.add_argument("--state-dir", type=Path, help="keep this node's client state (personal tensors, error "
                                                     "feedback, SCAFFOLD, local DP) here, so that a resumed run "
                                                     "continues it (docs/deploy.md)")
    node.add_argument("--max-epsilon", type=float, help="this node's own privacy limit: it trains only under "
                                                        "record-level DP-SGD (privacy.mode local or both) and declines "
                                                        "any round that would take its epsilon above this, whatever "
                                                        "the server's run configuration says (docs/privacy.md)")
    node.add_argument("--ca", type=Path, help="CA certificate of the SuperLink")
    node.add_argument("--key", type=Path, help="node private key (from `fedpeft node-key`)")
    node.add_argument("--port", type=int, default=9094, help="local Runtime API port (one per node on a host)")
    node.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    node.add_argument("--warm", action="store_true", help="keep one ClientApp process (and the model) loaded")
    node.add_argument("--max-wait", type=float, help="give up after this many seconds without the SuperLink")
    node.add_argument("--poll-interval", type=float, default=0.5,
                      help="seconds between this node's requests for work while idle (default 0.5; Flower's own "
                           "is 3, which adds up to 3 s to every round; docs/performance.md)")
    node.add_argument("--flwr-home", type=Path)
    certs = sub.add_parser("certs", help="create a CA and a server certificate for the SuperLink")
    certs.add_argument("--host", required=True, help="the SuperLink's host name (also valid: localhost, 127.0.0.1)")
    certs.add_argument("--san", action="append", default=[], help="another host name or IP (repeatable)")
    certs.add_argument("--out", type=Path, required=True)
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    client = sub.add_parser("client-cert", help="sign a split client's certificate with the CA of `fedpeft certs`")
    client.add_argument("--ca-dir", type=Path, required=True, help="directory with ca.crt and ca.key")
    client.add_argument("--name", required=True, help="the client's identity (certificate common name)")
    client.add_argument("--out", type=Path, help="where to write NAME.crt and NAME.key (default: --ca-dir)")
    client.add_argument("--days", type=int, default=365)
    client.add_argument("--force", action="store_true", help="overwrite existing files")
    key = sub.add_parser("node-key", help="create a SuperNode key pair (EC P-384, OpenSSH format)")
    key.add_argument("--out", type=Path, required=True)
    key.add_argument("--name", default="node_key", help="file name of the private key (.pub beside it)")
    key.add_argument("--force", action="store_true")
    reg = sub.add_parser("register-node", help="allow a SuperNode's public key on the SuperLink")
    reg.add_argument("public_key", type=Path)
    reg.add_argument("--name", help="a name for the node")
    _connection_args(reg)
    run = sub.add_parser("run", help="submit a scenario to a SuperLink (real deployment)")
    _scenario_args(run)
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its checkpoint")
    run.add_argument("--wait", action="store_true", help="wait until the run finishes; exit 1 if it failed")
    _connection_args(run)
    st = sub.add_parser("status", help="list the SuperLink's runs")
    st.add_argument("run_id", nargs="?", type=int)
    _connection_args(st)
    logs = sub.add_parser("logs", help="print the ServerApp log of a run")
    logs.add_argument("run_id", type=int)
    _connection_args(logs)
