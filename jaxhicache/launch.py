"""Start a multi-process (multi-controller JAX) run: ``python -m jaxhicache.launch``.

Local development, N processes on this machine with fake CPU devices and gloo
collectives (a free coordinator port on 127.0.0.1 is picked)::

    python -m jaxhicache.launch --processes 2 --devices-per-process 2 -- \\
        python my_server.py --pp 4

Real multi-host runs start one process per host the same way, naming the
coordinator (process 0's ``HOST:PORT``) and this process's id; the launcher
then starts only that process::

    python -m jaxhicache.launch --coordinator 10.0.0.1:6000 --num-processes 4 \\
        --process-id 2 -- python my_server.py --pp 4

The program calls :func:`jaxhicache.distributed.initialize` first thing; it reads
``JAXHICACHE_COORDINATOR``, ``JAXHICACHE_NUM_PROCESSES``,
``JAXHICACHE_PROCESS_ID`` (and ``JAXHICACHE_LOCAL_DEVICES``,
``JAXHICACHE_HEARTBEAT_TIMEOUT_S``) that the launcher sets (or a scheduler sets
directly, without the launcher).

When a process exits with an error, the launcher waits ``--grace-s`` seconds for
the others to fail on their own (their next collective errors out, or the
coordination service's heartbeat timeout ends them), then kills what is left and
exits with the first failing code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from jaxhicache.distributed import DistributedConfig

__all__ = ["free_port", "launch_local", "main"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (another process may take it).

    Args:
      host: the address to bind to while asking the system for a port.

    Returns:
      The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_local(
    command: Sequence[str],
    processes: int,
    devices_per_process: int | None = None,
    *,
    heartbeat_timeout_s: int = 10,
    grace_s: float = 30.0,
    env: dict[str, str] | None = None,
    cpu: bool = True,
    log_dir: str | os.PathLike | None = None,
) -> list[int]:
    """Runs ``command`` as ``processes`` cooperating processes on this machine and
    waits for all of them.

    The coordinator is a free port on 127.0.0.1; each process gets its
    :class:`~jaxhicache.distributed.DistributedConfig` in its environment. Once one
    process fails, the others get ``grace_s`` seconds to end, then are killed.

    Args:
      command: the program and its arguments, the same for every process.
      processes: how many processes to start.
      devices_per_process: fake CPU devices each (``None``: JAX's default).
      heartbeat_timeout_s: a process that stops answering this long fails the others.
      grace_s: seconds the others get after the first failure.
      env: the base environment of the processes (default: this process's).
      cpu: run on CPU (``JAX_PLATFORMS=cpu``, gloo collectives); ``False``: real
        accelerators.
      log_dir: an existing directory; each process's stdout and stderr go to
        ``log_dir/p{i}.log`` (default: this process's).

    Returns:
      The exit codes in process order (negative: killed by that signal).

    Raises:
      ValueError: an empty ``command``, or a count or timeout the config refuses.
    """
    if not command:
        raise ValueError("no command to launch")
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(processes):
        cfg = DistributedConfig(
            coordinator, processes, pid, devices_per_process, heartbeat_timeout_s
        )
        child_env = dict(os.environ if env is None else env)
        child_env.update(cfg.env())
        if cpu:
            child_env["JAX_PLATFORMS"] = "cpu"
        out = None
        if log_dir is not None:
            out = open(os.path.join(log_dir, f"p{pid}.log"), "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                list(command), env=child_env, stdout=out, stderr=subprocess.STDOUT if out else None
            )
        )
        if out is not None:
            out.close()  # the child holds its own descriptor
    return _wait_all(procs, grace_s)


def _wait_all(procs: list[subprocess.Popen], grace_s: float) -> list[int]:
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        done = [c for c in codes if c is not None]
        if len(done) == len(codes):
            return done
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxhicache.launch``: starts the processes of one multi-controller job.

    Without ``--coordinator`` it starts ``--processes`` local processes
    (:func:`launch_local`); with it, only this host's process (``--process-id``).
    A usage error is printed, not raised.

    Args:
      argv: the arguments, the command after ``--`` (default ``sys.argv[1:]``).

    Returns:
      2 for a usage error. With ``--coordinator``: the process's own exit code.
      Locally: 0 when every process succeeded, else the first failing process's
      code (``128 + n`` when killed by signal ``n``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    else:
        command = []
    p = argparse.ArgumentParser(
        prog="python -m jaxhicache.launch",
        description="Start a multi-controller JAX run (see the module docstring).",
        epilog="The command follows '--'.",
    )
    p.add_argument("--processes", type=int, default=None, help="local processes to start")
    p.add_argument("--devices-per-process", type=int, default=None, help="fake CPU devices each")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host)")
    p.add_argument("--num-processes", type=int, default=None, help="all processes (multi-host)")
    p.add_argument("--process-id", type=int, default=None, help="this process (multi-host)")
    p.add_argument("--heartbeat-timeout-s", type=int, default=10)
    p.add_argument("--grace-s", type=float, default=30.0)
    p.add_argument("--gpu", action="store_true", help="real accelerators, not fake CPU devices")
    args = p.parse_args(argv)
    try:
        if not command:
            raise ValueError("give the command to run after '--'")
        if args.coordinator is not None:
            if args.num_processes is None or args.process_id is None:
                raise ValueError("--coordinator needs --num-processes and --process-id")
            cfg = DistributedConfig(
                args.coordinator,
                args.num_processes,
                args.process_id,
                args.devices_per_process,
                args.heartbeat_timeout_s,
            )
            env = dict(os.environ)
            env.update(cfg.env())
            if not args.gpu:
                env["JAX_PLATFORMS"] = "cpu"
            return subprocess.call(command, env=env)
        if args.processes is None or args.processes < 1:
            raise ValueError(f"--processes must be an int >= 1, got {args.processes!r}")
        codes = launch_local(
            command,
            args.processes,
            args.devices_per_process,
            heartbeat_timeout_s=args.heartbeat_timeout_s,
            grace_s=args.grace_s,
            cpu=not args.gpu,
        )
    except ValueError as e:
        print(f"jaxhicache.launch: {e}", file=sys.stderr)
        return 2
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    for i, c in bad:
        print(f"jaxhicache.launch: process {i} exited with {c}", file=sys.stderr)
    if not bad:
        return 0
    code = bad[0][1]
    return code if code > 0 else 128 - code  # killed by a signal: 128 + its number


if __name__ == "__main__":
    sys.exit(main())
