"""`ferry`: exit 0 success, 1 a runtime failure, 2 bad input (one line on stderr).

Which bus it talks to is a context (services/cli/context.py). Subcommands beyond the
product's own, like `ferry lab`, come from plugins (services/cli/plugins.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from schemas.v1.migrations import FAULT_EXAMPLES
from services.cli import (
    agent_commands,
    bootstrap_commands,
    cert_commands,
    container_commands,
    fleet_commands,
    host_commands,
    identity_commands,
    image_commands,
    migrate_commands,
    plugins,
    reconcile_commands,
    recover_commands,
    trace_commands,
    volume_commands,
)
from services.cli.errors import exit_code, one_line
from services.cli.parsing import Parser, positive_int
from services.errors import FerryError

__all__ = ["Parser", "build_parser", "main", "positive_int"]

Command = Callable[[argparse.Namespace], int]


def build_parser() -> Parser:
    parser = Parser(prog="ferry", description="Move running containers between hosts.")
    parser.add_argument(
        "--context",
        metavar="NAME|FILE",
        help="the bus to talk to: a context's name or file (default: $FERRY_CONTEXT, else"
        " $FERRY_LAB as a name, else $FERRY_NATS_URL, else ~/.config/ferry/context.json)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    plugins.register_commands(sub)  # `ferry lab`, from deploy/lab/commands.py

    hosts = sub.add_parser("hosts", help="the hosts that joined the bus, and their health")
    hosts.add_argument("--json", action="store_true")
    hosts.set_defaults(run=host_commands.hosts)
    host_commands.add_subcommands(hosts)  # `ferry hosts declare-dead`

    container = sub.add_parser("container", help="run or remove a container")
    c_sub = container.add_subparsers(dest="container_command", required=True, parser_class=Parser)
    run = c_sub.add_parser(
        "run", help="start CMD on a host, on a root filesystem directory or an image"
    )
    run.add_argument("--host", help="the host (default: where the fleet's scheduler says, and why)")
    run.add_argument("--name", required=True)
    run.add_argument("--zone", help="constraint: run only in this zone")
    run.add_argument(
        "--host-label", action="append", default=[], metavar="KEY=VALUE",
        help="constraint: run only on hosts with this label (repeat: all of them)",
    )  # fmt: skip
    run.add_argument(
        "--anti-affinity", metavar="GROUP[:host|:zone]",
        help="constraint: never two containers of GROUP on one host (default) or in one zone",
    )  # fmt: skip
    run.add_argument(
        "--pin", action="store_true",
        help="constraint: stay on the host it starts on (never moved by the scheduler)",
    )  # fmt: skip
    root = run.add_mutually_exclusive_group(required=True)
    root.add_argument("--rootfs", help="directory holding the root filesystem (one layer)")
    root.add_argument(
        "--image", help="an image from `ferry image build` or `ferry image import`; its run"
        " config (Entrypoint, Cmd, Env, User, WorkingDir, Labels) applies as in Docker",
    )  # fmt: skip
    run.add_argument("--memory", type=positive_int, help="memory limit in MiB")
    run.add_argument("--cpus", type=float, help="CPU quota, in CPUs (0.5: half of one)")
    run.add_argument("--user", help="UID[:GID] or NAME[:GROUP] (names from the image's /etc)")
    run.add_argument("--env", "-e", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("--env-file", action="append", default=[], metavar="FILE")
    run.add_argument("--workdir", "-w", help="the process's working directory (absolute)")
    run.add_argument("--hostname", help="the container's host name (default: its name)")
    run.add_argument("--label", "-l", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--cap-add", action="append", default=[], metavar="CAP")
    run.add_argument("--cap-drop", action="append", default=[], metavar="CAP")
    run.add_argument("--shm-size", type=int, default=64, metavar="MIB", help="/dev/shm's size")
    run.add_argument("--entrypoint", help="replace the image's Entrypoint ('' clears it)")
    run.add_argument(
        "--restart", choices=["no", "always", "on-failure"], default="no",
        help="after its host reboots: start it again from its files (always, on-failure)"
        " or leave it stopped (no)",
    )  # fmt: skip
    run.add_argument(
        "--volume", "-v", action="append", default=[], metavar="NAME:/PATH[:ro]",
        help="a named volume of the host, made (from what the image has at PATH) if it is"
        " new; it moves with the container",
    )  # fmt: skip
    run.add_argument("--json", action="store_true")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    run.set_defaults(run=container_commands.container_run)
    rm = c_sub.add_parser("rm", help="stop and remove a container everywhere")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(run=container_commands.container_rm)
    logs = c_sub.add_parser("logs", help="a container's stdout and stderr, before and after moves")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    logs.add_argument("--timestamps", "-t", action="store_true", help="when each line was read")
    logs.set_defaults(run=container_commands.container_logs)
    inspect = c_sub.add_parser("inspect", help="a container's placement and spec, as JSON")
    inspect.add_argument("name", metavar="NAME")
    inspect.set_defaults(run=container_commands.container_inspect)

    volume = sub.add_parser("volume", help="named volumes: a container's data, moved with it")
    v_sub = volume.add_subparsers(dest="volume_command", required=True, parser_class=Parser)
    v_ls = v_sub.add_parser("ls", help="every host's volumes, their size and who uses them")
    v_ls.add_argument("--json", action="store_true")
    v_ls.set_defaults(run=volume_commands.volume_ls)
    v_rm = v_sub.add_parser("rm", help="remove a volume and its data (refused while in use)")
    v_rm.add_argument("name", metavar="NAME")
    v_rm.add_argument("--json", action="store_true")
    v_rm.set_defaults(run=volume_commands.volume_rm)

    image = sub.add_parser("image", help="images: named stacks of read-only layers")
    i_sub = image.add_subparsers(dest="image_command", required=True, parser_class=Parser)
    build = i_sub.add_parser("build", help="pack DIR into a layer and name the stack an image")
    build.add_argument("dir", metavar="DIR", help="directory holding the layer's files")
    build.add_argument("--name", required=True, help="the image's name")
    build.add_argument("--base", metavar="IMAGE", help="put the layer on top of this image's")
    build.add_argument("--json", action="store_true")
    build.set_defaults(run=image_commands.image_build)
    imp = i_sub.add_parser(
        "import",
        help="bring in an OCI image layout or an OCI/Docker archive (skopeo, podman save,"
        " buildah push, docker save): layers checked and converted, its run config kept",
    )
    imp.add_argument("path", metavar="PATH", help="an image layout directory or an archive")
    imp.add_argument("--name", required=True, help="the image's name in Ferry")
    imp.add_argument(
        "--ref", help="which image of several: its tag (a layout's ref.name, an archive's tag)"
    )
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(run=image_commands.image_import)
    rm_image = i_sub.add_parser(
        "rm", help="remove an image no container uses; layers nothing else names leave the store"
    )
    rm_image.add_argument("name", metavar="NAME")
    rm_image.add_argument("--json", action="store_true")
    rm_image.set_defaults(run=image_commands.image_rm)
    ls = i_sub.add_parser("ls", help="images, their layers and which hosts hold them")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=image_commands.image_ls)
    pull = i_sub.add_parser("pull", help="fetch, verify and unpack an image's layers on hosts")
    pull.add_argument("name", metavar="NAME")
    pull.add_argument("--host", help="only this host (default: every live host)")
    pull.add_argument("--json", action="store_true")
    pull.set_defaults(run=image_commands.image_pull)

    migrate = sub.add_parser("migrate", help="move a running container to another host")
    migrate.add_argument("name", metavar="NAME")
    migrate.add_argument(
        "--to", metavar="HOST",
        help="the destination (default: where the fleet's scheduler says; the record says why)",
    )  # fmt: skip
    migrate.add_argument(
        "--strategy",
        choices=["stop-and-copy", "post-copy", "pre-copy", "auto"],
        default="auto",
        help="auto (default) picks the best one both hosts support; the record says why",
    )
    migrate.add_argument(
        "--downtime-budget",
        type=positive_int,
        default=None,
        metavar="MS",
        help="longest freeze the workload tolerates: a move whose forecast freeze is longer is"
        " refused (auto picks a strategy that fits). Without it the forecast is only recorded",
    )
    migrate.add_argument(
        "--bandwidth-limit",
        type=float,
        metavar="MIB_S",
        help="cap Ferry's own file and image transfers at this many MiB/s",
    )
    migrate.add_argument("--compress", action="store_true", help="compress file transfers")
    migrate.add_argument(
        "--whole-files", action="store_true",
        help="after the freeze, send each changed file whole, not its changed blocks",
    )  # fmt: skip
    migrate.add_argument(
        "--inject-fault",
        metavar="FAULT",
        help="test only (lab started with --allow-faults): make a real fault happen, e.g. "
        + ", ".join(FAULT_EXAMPLES),
    )
    migrate.add_argument(
        "--dry-run", action="store_true", help="pre-flight only: would it work, and if not, why"
    )
    migrate.add_argument("--json", action="store_true")
    migrate.set_defaults(run=migrate_commands.migrate)

    cancelling = sub.add_parser("cancel", help="stop a migration before its commit and roll back")
    cancelling.add_argument("id", metavar="ID")
    cancelling.add_argument("--reason", default="cancelled by operator")
    cancelling.add_argument("--json", action="store_true")
    cancelling.set_defaults(run=migrate_commands.cancel)

    status = sub.add_parser("status", help="a migration's record, or all of them")
    status.add_argument("id", nargs="?", metavar="ID")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=migrate_commands.status)

    traced = sub.add_parser("trace", help="a migration's spans as a waterfall, or failed moves")
    traced.add_argument("id", nargs="?", metavar="ID")
    traced.add_argument("--failed", action="store_true", help="list recent failed migrations")
    traced.add_argument("--json", action="store_true")
    traced.set_defaults(run=trace_commands.trace)

    boot = sub.add_parser(
        "bootstrap", help="create the bus's buckets and streams (once; workers never do)"
    )
    boot.add_argument(
        "--host",
        action="append",
        default=[],
        help="a host whose command consumers to create (repeat; again later to add hosts)",
    )
    boot.add_argument(
        "--replicas", type=positive_int, default=3, help="copies of each stream (default 3)"
    )
    boot.add_argument("--json", action="store_true")
    boot.set_defaults(run=bootstrap_commands.bootstrap)

    identity_commands.register(sub)  # `ferry identities`
    cert_commands.register(sub)  # `ferry certs`

    rec = sub.add_parser(
        "reconcile",
        help="after a lost store: rebuild placements and end migrations from the hosts' ledgers",
    )
    rec.add_argument("--apply", action="store_true", help="write it (default: only show it)")
    rec.add_argument("--json", action="store_true")
    rec.set_defaults(run=reconcile_commands.reconcile_command)

    recover_commands.register(sub)  # `ferry recover`
    agent_commands.register(sub)  # `ferry agent`, what systemd runs on each host
    fleet_commands.register(sub)  # `ferry cordon|uncordon`, `ferry controller`

    listing = sub.add_parser("containers", help="every container and its state")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=container_commands.containers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args.run
    try:
        return command(args)
    except FerryError as exc:
        print(one_line(exc), file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
