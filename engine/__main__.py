"""The command line: ``python -m engine info`` and ``python -m engine ablate``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from typing import Any

from engine import strategies
from engine._context import package_versions, usable_cpu_count
from engine.config import ParallelConfig, describe_env
from engine.errors import ConfigError


def _versions() -> dict[str, str | None]:
    return package_versions(
        (
            "engine",
            "numpy",
            "numba",
            "cloudpickle",
            "joblib",
            "dask",
            "calibrated_explanations",
        )
    )


def _info() -> dict[str, Any]:
    config = ParallelConfig.from_env()
    env = describe_env()
    return {
        "config": config.as_dict(),
        "environment": env,
        "forced_serial": env["enabled"] is False,
        "strategies": {
            name: (strategies.unavailable_reason(name) or "available")
            for name in strategies.strategy_names()
        },
        "usable_cpus": usable_cpu_count(),
        "versions": _versions(),
        "platform": platform.platform(),
    }


def _print_info(info: dict[str, Any]) -> None:
    env = info["environment"]
    print(f"CE_PARALLEL: {env['CE_PARALLEL']!r}")
    if info["forced_serial"]:
        print("  -> parallelism is OFF: every run is serial")
    print("resolved configuration:")
    for key, value in info["config"].items():
        print(f"  {key:<24} {value!r}")
    print("strategies:")
    for name, state in info["strategies"].items():
        print(f"  {name:<10} {state}")
    print(f"usable cpus: {info['usable_cpus']} (affinity and cgroup quota aware)")
    print("versions: " + ", ".join(f"{k}={v}" for k, v in info["versions"].items()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser(
        "info", help="show configuration, strategies, CPUs, versions"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    ablate = commands.add_parser(
        "ablate",
        help="run the BENCH.md workloads across strategies (ratios, JSON, plot)",
    )
    ablate.add_argument(
        "--quick", action="store_true", help="fewer rounds, smaller data"
    )
    ablate.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    ablate.add_argument("--plot", metavar="PATH", help="draw a PNG (needs matplotlib)")
    ablate.add_argument(
        "--workloads",
        default="W1,W2,W3,W4,W5,W6,W7",
        help="comma-separated workload ids (default: all)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            data = _info()
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                _print_info(data)
        elif args.command == "ablate":
            from engine import _ablate

            ids = [
                part.strip().upper()
                for part in args.workloads.split(",")
                if part.strip()
            ]
            return _ablate.run(
                workload_ids=ids,
                quick=args.quick,
                json_path=args.json,
                plot_path=args.plot,
            )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
