"""Joining the Ray cluster that ``RAY_ADDRESS`` names, or starting one in this process.

``ray.init`` given an address where no cluster answers retries for ever (``host:port``: a
"Failed to get cluster ID from GCS server" line every 40 s) or ends in a traceback
(``auto``); a command should instead say in one line what is wrong and how to go on.
"""

from __future__ import annotations

import os
import socket

import ray

from colorize import errors

ANSWER_SECONDS = 5.0  # for a TCP connection to the address's head node


class NoCluster(ValueError):
    """``RAY_ADDRESS`` names a cluster that cannot be joined."""


def connect(*, log_to_driver: bool) -> bool:
    """Join the cluster at ``RAY_ADDRESS``, or start a Ray in this process where it is unset;
    True where this call started a Ray of its own, which will never grow. Nothing to do where
    Ray is already running here."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and address not in ("auto", "local"):
        _check_answers(address)
    try:
        ray.init(log_to_driver=log_to_driver)
    except ConnectionError as error:
        why = "no Ray is running on this machine" if address == "auto" else errors.one_line(error, with_type=False)
        raise NoCluster(f"RAY_ADDRESS={address}: {why}; {_HINT}") from None
    return not address


_HINT = "unset RAY_ADDRESS to start a Ray in this process, or set it to a running head node's HOST:6379"


def _check_answers(address: str) -> None:
    """Refuse ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``) where nothing takes a connection."""
    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise NoCluster(f"RAY_ADDRESS={address}: not HOST:PORT, ray://HOST:PORT or auto; {_HINT}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ANSWER_SECONDS).close()
    except OSError as error:
        why = f"no answer in {ANSWER_SECONDS:g} s" if isinstance(error, TimeoutError) else error.strerror or str(error)
        raise NoCluster(f"RAY_ADDRESS={address}: no Ray cluster answers there ({why}); {_HINT}") from None
