"""A real S3-compatible server on loopback for tests: moto in server mode, free port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

BUCKET = "jaxhicache-l3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"moto server did not listen on port {port} within {timeout} s")


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if pytest dies without running the teardown."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class MotoServer:
    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            _wait_for_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def s3_spec(server: MotoServer, path: str = "fleet-a/") -> dict:
    """The tensorstore kvstore spec of ``server``'s bucket (credentials from the environment)."""
    return {
        "driver": "s3",
        "bucket": BUCKET,
        "path": path,
        "endpoint": server.endpoint,
        "aws_region": "us-east-1",
        "aws_credentials": {"type": "environment"},
    }
