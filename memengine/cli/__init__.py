"""Command line: `python -m memengine info [--json]`, `python -m memengine plan --budget 24GiB ...`.
Nothing in the package imports this module."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m memengine", description="memengine tools")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, build, CPU features and the backend of each op")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    from memengine.cli import plan

    plan.add_arguments(commands.add_parser("plan", help="plan recomputation for a GPT-style model on meta"))
    args = parser.parse_args(argv)
    if args.command == "plan":
        raise SystemExit(plan.run(args))
    if args.command == "info":
        from memengine.cli import info as info_module

        info_module.main(as_json=args.json)
