"""The `xsam` console script: the composition root of the product.

Each subcommand lives in its own module with ``configure(parser)`` and ``run(args) -> int``;
a module is imported only when its command runs, so `xsam submit` works where torch and ray
are not installed and `xsam --help` starts instantly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command → (module under cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve_cmd", "run the API (+ a local Ray instance and an agent, unless --no-agent)"),
    "agent": ("agent_cmd", "run an agent: claim jobs from a server and run them on Ray"),
    "train": ("train_cmd", "train one config locally, with no service"),
    "submit": ("jobs_cmd", "submit a job config to the service"),
    "list": ("jobs_cmd", "list jobs"),
    "status": ("jobs_cmd", "show one job"),
    "watch": ("jobs_cmd", "follow a job with a live progress bar until it ends"),
    "metrics": ("jobs_cmd", "print a job's metrics (table or --csv)"),
    "cancel": ("jobs_cmd", "cancel a job"),
    "export": ("export_cmd", "export a job's or a study's series to TensorBoard or CSV"),
    "logs": ("logs_cmd", "print a job's log lines (every rank's output); -f follows it"),
    "study": ("study_cmd", "studies (arms × grid × seeds): submit, list, status, compare, cancel"),
    "token": ("token_cmd", "create API tokens"),
}


def _module(command: str):
    return importlib.import_module(f"cli.{COMMANDS[command][0]}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xsam", description="XSAM training service")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported to add its arguments.
        if name == chosen:
            _module(name).configure(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
