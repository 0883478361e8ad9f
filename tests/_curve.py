"""A broker with CURVE on a loopback TCP control endpoint, and a ``--curve-keys``
file, as the CURVE tests of the command line, the relay and the bridge make them."""

from __future__ import annotations

from pathlib import Path

from shmcast.broker import Broker, BrokerConfig


def curve_broker(namespace: str, server_secret: str, *clients: str) -> Broker:
    """A started broker of ``namespace`` whose control endpoint (TCP, 127.0.0.1, a
    free port) takes only CURVE clients with the public keys ``clients``."""
    return Broker(
        BrokerConfig(
            namespace=namespace,
            control="tcp://127.0.0.1:0",
            curve_secret_key=server_secret,
            curve_clients=clients,
        )
    ).start()


def curve_file(path: Path, server: str, public: str | None, secret: str | None) -> str:
    """A ``--curve-keys`` file (0600) at ``path``: the broker's public key, and this
    client's pair unless it is left out."""
    lines = [f'curve_server_key = "{server}"']
    if public is not None and secret is not None:
        lines += [f'curve_public_key = "{public}"', f'curve_secret_key = "{secret}"']
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return str(path)
