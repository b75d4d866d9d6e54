"""Command line: `python -m memengine demo [--quick]`, `python -m memengine info [--json]`,
`python -m memengine plan --budget 24GiB ...`. Nothing in the package imports this module."""

import argparse


class _OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags get one line naming the flag (not the usage block): `prog: error: argument --x: ...`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    parser = _OneLineErrorParser(prog="python -m memengine", description="memengine tools")
    commands = parser.add_subparsers(dest="command", required=True)
    from memengine.cli import demo

    demo.add_arguments(
        commands.add_parser(
            "demo",
            help="memory, speed and accuracy vs plain PyTorch, measured here",
        )
    )
    info = commands.add_parser("info", help="versions, build, CPU features and the backend of each op")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    from memengine.cli import plan

    plan.add_arguments(commands.add_parser("plan", help="plan recomputation for a GPT-style model on meta"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        raise SystemExit(demo.run(args))
    if args.command == "plan":
        raise SystemExit(plan.run(args))
    if args.command == "info":
        from memengine.cli import info as info_module

        info_module.main(as_json=args.json)
