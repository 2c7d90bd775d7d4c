"""Make a CurveZMQ keypair for a daemon or a trainer.

    python -m protocol.keygen DIR [--name NAME]

Writes DIR/NAME.key (public: copy it to the other side) and DIR/NAME.key_secret (keep it, mode 0600).
The daemon authorises a trainer by finding the trainer's NAME.key in its authorised-keys directory.
"""
from __future__ import annotations

import argparse
import sys

from .security import generate_keypair


def build_parser(prog: str = "python -m protocol.keygen") -> argparse.ArgumentParser:
    """The keygen argument parser (also `analysis-daemon keygen`; the CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write NAME.key and NAME.key_secret")
    parser.add_argument("--name", default="client", help="file name stem (default: client)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m protocol.keygen") -> int:
    """Entry point of `python -m protocol.keygen` and `analysis-daemon keygen`."""
    args = build_parser(prog).parse_args(argv)
    try:
        public, secret = generate_keypair(args.directory, args.name)
    except OSError as exc:
        print(f"Error: cannot write keys to {args.directory}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
