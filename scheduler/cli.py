"""The ``cohort`` command line: ``run`` a coordinator, ``snapshot`` and ``load`` weights, make ``keys``,
run a ``cluster`` of coordinators on Ray."""

from __future__ import annotations

import argparse
import logging
import sys

from core.errors import CohortError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cohort", description="Run many models of one architecture on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start a coordinator and its workers")
    run_parser.add_argument("--config", required=True, help="TOML config file")
    run_parser.add_argument("--address", help="override coordinator.address")
    run_parser.add_argument("--restore-run", metavar="RUN_ID",
                            help="start every model from the host copies a killed coordinator of this config left on "
                                 "this machine (its run id: stats()['run_id'], or the cohort-<RUN_ID>-* names in "
                                 "/dev/shm); sets coordinator.restore_run")
    run_parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    for name, text in (("snapshot", "write every model of a running coordinator to DIR/<group>/<index>.safetensors"),
                       ("load", "set every model of a running coordinator from DIR/<group>/<index>.safetensors")):
        weights_parser = sub.add_parser(name, help=text)
        weights_parser.add_argument("directory", help="DIR")
        weights_parser.add_argument("--address", help="coordinator address (default: $COHORT_ADDRESS, else the default)")
        weights_parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up (default 600)")
    keys_parser = sub.add_parser("keys", help="make CURVE certificates for a coordinator reachable from other machines")
    keys_parser.add_argument("directory", help="where to write them (created, mode 0700)")
    keys_parser.add_argument("--clients", type=int, default=1, help="client key pairs to make")
    cluster_parser = sub.add_parser("cluster", help="run one coordinator per GPU of a Ray cluster (needs cohort[ray])")
    from scheduler.cluster.launcher import add_arguments  # imports no Ray

    add_arguments(cluster_parser)
    args = parser.parse_args(argv)
    if args.command == "cluster":
        from scheduler.cluster.launcher import cluster_command

        return cluster_command(args)
    if args.command == "keys":
        return make_keys_command(args.directory, args.clients)
    if args.command in ("snapshot", "load"):
        from scheduler.weights_cli import load_command, snapshot_command

        command = snapshot_command if args.command == "snapshot" else load_command
        try:
            return command(args.directory, args.address, args.timeout)
        except CohortError as exc:
            print(f"cohort {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s cohort %(levelname)s %(message)s", stream=sys.stderr)
    from scheduler.config import load_config, override_coordinator
    from scheduler.serve import run

    try:
        config = load_config(args.config)
        overrides = {"address": args.address, "restore_run": args.restore_run}
        config = override_coordinator(config, **{k: v for k, v in overrides.items() if v is not None})
        return run(config)
    except CohortError as exc:
        print(f"cohort: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def make_keys_command(directory: str, clients: int) -> int:
    from scheduler.security import make_keys

    made = make_keys(directory, clients)
    print(f"""CURVE certificates in {directory}:
  coordinator config:  curve_secret_key = "{made['server_secret']}"
                       curve_allowed_keys = "{made['allowed']}"
  each client:         COHORT_CURVE_SERVER_KEY={made['server_public']}
                       COHORT_CURVE_CLIENT_CERT={made['client_0_secret']}  (client-N.key_secret for client N)""")
    return 0
