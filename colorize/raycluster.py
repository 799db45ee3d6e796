"""Joining the Ray cluster that ``RAY_ADDRESS`` names, or starting one in this process.

``ray.init`` given an address where no cluster answers retries for ever (``host:port``: a
"Failed to get cluster ID from GCS server" line every 40 s) or ends in a traceback
(``auto``); a command should instead say in one line what is wrong and how to go on.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

import ray
from ray._private import services

from colorize import errors

ANSWER_SECONDS = 5.0  # for a TCP connection to the address's head node, and its first reply
# Ray's GCS and client server speak gRPC, over HTTP/2: given the client's preface and an empty
# SETTINGS frame, a gRPC server's first frame is its SETTINGS. ray.init against any other
# server that takes connections (an HTTP port) retried for ever, like one where none does.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4  # the frame type, in the 4th byte of a frame header


def quiet_ray_data() -> None:
    """In this process, no Ray Data notices of each dataset's plan and end, nor that its
    progress bars are off: a run's own lines say how far it is (a training run printed five
    such lines an epoch beside its one). Its warnings and errors still show."""
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled. To enable, ..."
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)


class NoCluster(ValueError):
    """The cluster ``RAY_ADDRESS`` names cannot be joined, or a Ray could not start here."""


def connect(*, log_to_driver: bool, through_client: bool = False) -> bool:
    """Join the cluster at ``RAY_ADDRESS``, or where it is unset the one a ``ray start`` on this
    machine left, or else start a Ray in this process; True where this call started a Ray of
    its own, which will never grow. Nothing to do where Ray is already running here.

    A ``ray://`` address (Ray Client) is refused unless ``through_client``: Ray Data's
    streaming executor needs a driver on the cluster, and ``run`` and ``evaluate`` failed
    there in a traceback ("'Worker' object has no attribute 'core_worker'").
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address.startswith("ray://") and not through_client:
        raise NoCluster(f"RAY_ADDRESS={address}: a Ray Client address, through which this command's Ray Data "
                        "pipeline cannot run; on a cluster node set RAY_ADDRESS to the head's HOST:6379 (or auto), "
                        "or send the command with `colorize submit`")
    if address.startswith(("http://", "https://")):  # the form Ray's own job CLI takes
        raise NoCluster(f"RAY_ADDRESS={address}: a job server's URL, to which jobs are sent, not a cluster to join; "
                        f"send the command there with `colorize submit --address {address} -- ...`, or {_HINT}")
    if address and address not in ("auto", "local"):
        _check_answers(address)
    # Where RAY_ADDRESS is unset, ray.init joins the cluster that a `ray start` on this machine
    # recorded (a shell on a head node): only where there is none does it start a Ray here.
    recorded = None if address else services.canonicalize_bootstrap_address(None)
    name = (f"RAY_ADDRESS={address}" if address else f"the Ray that a `ray start` on this machine recorded ({recorded})"
            if recorded else "a Ray in this process")
    if recorded is not None:  # a head since gone (killed, out of memory) left its address: ray.init retried for ever
        _check_answers(recorded, name=name, hint="start it again, or set RAY_ADDRESS=local to start a Ray in this process")
    starts_here = address == "local" or (not address and recorded is None)
    try:
        ray.init(log_to_driver=log_to_driver)
    except SystemExit as exit_:  # ray.init's own SIGTERM handler, while it starts: sys.exit(15), no word said
        if exit_.code != signal.SIGTERM:
            raise
        errors.stop_on_sigterm()  # not Ray's, for the rest of this command
        raise KeyboardInterrupt from None
    except ConnectionError as error:
        why = "no Ray is running on this machine" if address == "auto" else errors.one_line(error, with_type=False)
        raise NoCluster(f"{name}: {why}; {_HINT}") from None
    except RuntimeError as error:  # a version mismatch with the cluster, over several lines
        where = "Ray could not start in this process" if starts_here else name
        raise NoCluster(f"{where}: {' '.join(str(error).split())}") from None
    except Exception as error:
        if not str(error).startswith(_STARTUP_TIMED_OUT):  # a bare Exception: Ray says nothing more specific
            raise
        raise NoCluster(f"Ray could not start in this process: {errors.one_line(error, with_type=False).rstrip('.')} "
                        "(a loaded machine); run it again") from None
    errors.stop_on_sigterm()  # again: ray.init replaced it
    return starts_here


_STARTUP_TIMED_OUT = "The current node timed out during startup"  # ray.init's bare Exception on a loaded machine
_HINT = "unset RAY_ADDRESS to start a Ray in this process, or set it to a running head node's HOST:6379"


def _check_answers(address: str, *, name: str | None = None, hint: str = "") -> None:
    """Refuse ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``) where nothing takes a connection;
    the message calls it ``name`` (``RAY_ADDRESS=...``) and ends in ``hint``."""
    name, hint = name or f"RAY_ADDRESS={address}", hint or _HINT
    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise NoCluster(f"{name}: not HOST:PORT, ray://HOST:PORT or auto; {hint}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=ANSWER_SECONDS) as connection:
            if os.environ.get("RAY_USE_TLS", "0") in ("0", "") and not _speaks_grpc(connection):
                raise NoCluster(f"{name}: something answers there, but not Ray: it does not speak gRPC "
                                f"(the dashboard's port, 8265, is for `colorize submit`); {hint}")
    except OSError as error:
        why = f"no answer in {ANSWER_SECONDS:g} s" if isinstance(error, TimeoutError) else error.strerror or str(error)
        raise NoCluster(f"{name}: no Ray cluster answers there ({why}); {hint}") from None


def _speaks_grpc(connection: socket.socket) -> bool:
    """Whether the server at the other end answers HTTP/2's preface with its settings, as gRPC
    does (under TLS its first bytes are a handshake instead: not for this check)."""
    connection.sendall(HTTP2_PREFACE)
    reply = connection.recv(9)
    return len(reply) == 9 and reply[3] == HTTP2_SETTINGS


def is_ray_port(host: str, port: int) -> bool:
    """Whether a gRPC server, such as a Ray head's GCS (port 6379), answers at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=ANSWER_SECONDS) as connection:
            return _speaks_grpc(connection)
    except OSError:
        return False
