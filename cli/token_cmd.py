"""`xsam token create|list|revoke`: manage API tokens through the REST API (admin token)."""

from __future__ import annotations

import argparse
import sys

from cli.terminal_text import iso_time
from service.contract import Role


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a token and print its secret (shown once)")
    create.add_argument("--name", required=True, help="the owner name jobs submitted with it carry")
    create.add_argument("--role", choices=[r.value for r in Role], default=Role.USER.value)
    listing = sub.add_parser("list", help="list tokens (never their secrets)")
    revoke = sub.add_parser("revoke", help="revoke a token by id (immediate)")
    revoke.add_argument("token_id", type=int)
    for p in (create, listing, revoke):
        p.add_argument(
            "--server", default=None, help="API URL (default $XSAM_SERVER or http://127.0.0.1:8000)"
        )


def run(args: argparse.Namespace) -> int:
    from service.client import ApiError, LocalSecretRefused, XsamClient, default_server_and_token

    try:
        server, token = default_server_and_token(args.server)
    except LocalSecretRefused as exc:
        print(f"xsam token: {exc}", file=sys.stderr)
        return 2
    if not token:
        print(
            "xsam token: no admin token: set XSAM_TOKEN, or run `xsam serve` once so that it "
            "writes <data_dir>/admin.token",
            file=sys.stderr,
        )
        return 2
    try:
        with XsamClient(server, token) as api:
            if args.token_command == "create":
                created = api.create_token(args.name, args.role)
                print(created.token)
                print(
                    f"token {created.id} ({created.role}) for {created.name}",
                    file=sys.stderr,
                )
            elif args.token_command == "list":
                for t in api.list_tokens():
                    state = "revoked" if t.revoked_at else "active"
                    print(f"{t.id}\t{t.name}\t{t.role}\t{state}\t{iso_time(t.created_at)}")
            else:
                api.revoke_token(args.token_id)
                print(f"token {args.token_id} revoked", file=sys.stderr)
    except ApiError as exc:
        print(f"xsam token: {exc.detail} ({exc.code})", file=sys.stderr)
        return 1
    return 0
