"""A Ray address checked before Ray is asked: its form (exit 2) and whether anything answers there
(exit 1), each in one line, within a stated time. Ray's own `ray.init` raises a traceback for a
malformed address and, for a closed port, retries for minutes.

    check("127.0.0.1:6379")          # -> ("127.0.0.1", 6379); a SpecError for "garbage", "[::1]:x", "http://x"
    reachable("127.0.0.1:6379")      # a QuantrayError if nothing answers within CONNECT_TIMEOUT_S
"""

from __future__ import annotations

import os
import re
import socket

from ..errors import QuantrayError, SpecError

__all__ = ["check", "reachable", "CONNECT_TIMEOUT_S"]

# How long a connect may take before the address is called unreachable; QUANTRAY_CONNECT_TIMEOUT_S changes it.
CONNECT_TIMEOUT_S = 5.0
_WORDS = ("auto", "local")  # Ray's own: the cluster this machine runs (auto), a new local one (local)
_FORM = re.compile(r"^(?:(?P<scheme>[a-z][a-z0-9+.-]*)://)?(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9_.-]+))"
                   r":(?P<port>[^:/]*)$")
_EXPECTED = ("expected HOST:PORT (a head's GCS, e.g. 127.0.0.1:6379), ray://HOST:PORT (Ray Client, e.g. "
             "ray://127.0.0.1:10001), auto or local")


def check(address: str, where: str = "--address") -> tuple[str, int] | None:
    """(host, port) of `address`, or None for Ray's words auto and local; a SpecError naming `where`."""
    if address in _WORDS:
        return None
    match = _FORM.match(address)
    if not match:
        raise SpecError(f"{where} {address!r}: not a Ray address; {_EXPECTED}")
    if match["scheme"] not in (None, "ray"):
        raise SpecError(f"{where} {address!r}: Ray does not speak {match['scheme']}://; {_EXPECTED}")
    port = match["port"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SpecError(f"{where} {address!r}: port {port!r} is not a number from 1 to 65535; {_EXPECTED}")
    return match["ipv6"] or match["host"], int(port)


def reachable(address: str, where: str = "--address") -> None:
    """Nothing more than a TCP connect to the address's port, bounded by CONNECT_TIMEOUT_S: a
    QuantrayError (exit 1) naming what was tried and how to start a head."""
    parsed = check(address, where)
    if parsed is None:
        return
    host, port = parsed
    timeout = float(os.environ.get("QUANTRAY_CONNECT_TIMEOUT_S", CONNECT_TIMEOUT_S))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.timeout:
        why = f"no answer within {timeout:g} s"
    except OSError as e:
        why = e.strerror or type(e).__name__
    flag = "--ray-client-server-port" if address.startswith("ray://") else "--port"
    raise QuantrayError(f"{where} {address}: cannot reach a Ray cluster at {host}:{port} ({why}); start a head "
                        f"there (`ray start --head {flag}={port}`), start a local one (`quantray up`), or leave "
                        "--address out to start one for this run")
