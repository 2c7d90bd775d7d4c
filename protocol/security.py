"""CurveZMQ keys and socket configuration: who may send snapshots, encrypted, across hosts.

The daemon (server) holds a secret key and a directory of authorised client public keys; a client
(trainer) holds its own keypair and the server's public key. Keys are ZeroMQ's text certificates
(`NAME.key` public, `NAME.key_secret` secret), made by `python -m protocol.keygen DIR --name NAME`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def generate_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (mode 0600) into `directory`; returns (public_path, secret_path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = (Path(p) for p in zmq.auth.create_certificates(directory, name))
    os.chmod(secret, 0o600)
    return public, secret


def _load(path: str | os.PathLike, *, need_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CurveZMQ key {path}: {exc}; make one with: python -m protocol.keygen DIR --name NAME") from None
    if need_secret and not secret:
        raise ValueError(f"{path} holds no secret key; pass the NAME.key_secret file, not NAME.key")
    return public, secret


@dataclass
class CurveServer:
    """Server side: our secret key plus a directory whose *.key public keys are the only clients allowed."""

    secret_key_file: Path
    authorized_dir: Path
    _auth: ThreadAuthenticator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.secret_key_file, self.authorized_dir = Path(self.secret_key_file), Path(self.authorized_dir)
        self.public, self.secret = _load(self.secret_key_file, need_secret=True)
        if not self.authorized_dir.is_dir():
            raise ValueError(f"authorised client key directory {self.authorized_dir} does not exist")

    def apply(self, ctx: zmq.Context, socket: zmq.Socket) -> None:
        """Start the authenticator on `ctx` (once) and make `socket` a CURVE server."""
        if self._auth is None:
            self._auth = ThreadAuthenticator(ctx, log=None)
            self._auth.start()
            # Loads every public key in the directory now; a client whose key is not there is refused.
            self._auth.configure_curve(domain="*", location=str(self.authorized_dir))
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def stop(self) -> None:
        """Stop the authenticator thread (call before closing the context)."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


@dataclass
class CurveClient:
    """Client side: our keypair (from NAME.key_secret) and the server's public key file."""

    secret_key_file: Path
    server_public_file: Path

    def __post_init__(self) -> None:
        self.public, self.secret = _load(self.secret_key_file, need_secret=True)
        self.server_public, _ = _load(self.server_public_file, need_secret=False)

    def apply(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE client of that server."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_serverkey = self.server_public
