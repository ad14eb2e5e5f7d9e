"""`ferry lab up|down` and `ferry hosts`."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from deploy.lab import lab
from deploy.lab.layout import read_spec
from services.cli.context import lab_layout, say


def lab_up(args: argparse.Namespace) -> int:
    layout = lab_layout()
    spec = lab.up(
        layout,
        args.hosts,
        say,
        allow_faults=args.allow_faults,
        segments=args.segments,
        subnet=args.subnet,
    )
    where = (
        f"{spec.segments} segments joined by a router, containers on {spec.subnet}"
        if spec.segmented
        else str(spec.subnet)
    )
    say(f"lab {layout.lab} is up: {', '.join(spec.hosts)} on {where}")
    return 0


def lab_down(args: argparse.Namespace) -> int:
    lab.down(lab_layout(), say)
    return 0


def hosts(args: argparse.Namespace) -> int:
    layout = lab_layout()
    spec = read_spec(layout)
    rows: list[dict[str, Any]] = []
    if spec is not None:
        health = asyncio.run(lab.host_health(spec))
        for host in spec.hosts:
            beat = health[host]
            rows.append(
                {
                    "name": host,
                    "address": spec.address(host),
                    "netns": layout.netns(host),
                    "runc_root": str(layout.runc_root(host)),
                    "state_dir": str(layout.state_dir(host)),
                    "health": "ok" if beat else "down",
                    "segment": spec.segment_of(host),
                    "workers": {w.role: w.pid for w in beat.workers} if beat else {},
                }
            )
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        say(f"lab {layout.lab} is not up")
        return 0
    print(f"{'HOST':<6} {'ADDRESS':<15} {'HEALTH':<7} STATE DIR")
    for row in rows:
        print(f"{row['name']:<6} {row['address']:<15} {row['health']:<7} {row['state_dir']}")
    return 0
