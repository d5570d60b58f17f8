"""CURVE security for the client socket: the coordinator's side, the client's side, and keys.

A coordinator bound to anything but loopback or ``ipc://`` must use CURVE (config keys
``curve_secret_key`` and ``curve_allowed_keys``); clients then need the server's public
certificate and a key pair of their own whose public half the coordinator allows.
Certificates are ZeroMQ's own format (``zmq.auth.create_certificates``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER_KEY_ENV = "COHORT_CURVE_SERVER_KEY"
CLIENT_CERT_ENV = "COHORT_CURVE_CLIENT_CERT"


def make_keys(directory: str | os.PathLike[str], clients: int = 1) -> dict[str, Path]:
    """Write a server key pair and ``clients`` client key pairs under ``directory``.

    ``server.key_secret`` is the coordinator's ``curve_secret_key``; ``allowed/`` holds the
    clients' public certificates (its ``curve_allowed_keys``); each client gets
    ``client-N.key_secret`` and needs ``server.key`` too.
    """
    root = Path(directory)
    allowed = root / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    server_public, server_secret = zmq.auth.create_certificates(root, "server")
    made = {"server_public": Path(server_public), "server_secret": Path(server_secret), "allowed": allowed}
    for n in range(clients):
        public, secret = zmq.auth.create_certificates(root, f"client-{n}")
        Path(public).rename(allowed / Path(public).name)
        made[f"client_{n}_secret"] = Path(secret)
    return made


class CurveServer:
    """The coordinator's side: an authenticator thread that admits only the allowed keys."""

    def __init__(self, context: zmq.Context[Any], secret_cert: str, allowed_dir: str) -> None:
        self.public, self.secret = zmq.auth.load_certificate(secret_cert)
        if self.secret is None:
            raise ValueError(f"{secret_cert} holds no secret key")
        self.auth = ThreadAuthenticator(context)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=allowed_dir)

    def apply(self, socket: zmq.Socket[Any]) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def stop(self) -> None:
        self.auth.stop()


@dataclass(frozen=True)
class CurveClient:
    """The client's side: the server's public key and this client's key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_cert: str | os.PathLike[str], client_secret_cert: str | os.PathLike[str]) -> CurveClient:
        server_public, _ = zmq.auth.load_certificate(server_cert)
        public, secret = zmq.auth.load_certificate(client_secret_cert)
        if secret is None:
            raise ValueError(f"{client_secret_cert} holds no secret key: pass the client's .key_secret file")
        return cls(server_public, public, secret)

    @classmethod
    def from_env(cls) -> CurveClient | None:
        server, client = os.environ.get(SERVER_KEY_ENV), os.environ.get(CLIENT_CERT_ENV)
        return cls.from_files(server, client) if server and client else None

    def apply(self, socket: zmq.Socket[Any]) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
