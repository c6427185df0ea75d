"""Run a function or a script as N local gloo processes and collect what each rank produced.

Why this exists: the runtime is only proven when real processes exchange real bytes, and a test or demo
that starts processes must survive two facts measured on this kind of machine (../shared/FACTS.md):
starting ranks is slow (~4 s for 4), and gloo occasionally aborts (SIGABRT) at interpreter exit *after*
`destroy_process_group` has returned. So success is judged by a result file each rank writes once its
work and the process-group teardown are done, not by the exit code alone; a rank that wrote no result,
or wrote an error, is a failure whatever its exit code. A crash after a written result is reported in
`LaunchResult.exit_crashes`, never hidden.

Two ways in, same result files:

* `run_local(fn, nprocs, *args)`: `fn` (a picklable, module-level function) runs on every rank inside
  `rank_session()`; its return value is that rank's result. Processes are started with "spawn".
* `run_local("path/to/script.py", nprocs, *args)`: the script runs under
  `python -m torch.distributed.run` (torchrun); it opens `with rank_session() as session:` itself and sets
  `session.result`.

Only 127.0.0.1 is used, on a port that was free when chosen.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autoshard.errors import AutoshardError

__all__ = ["LaunchError", "LaunchResult", "RankSession", "free_port", "rank_session", "run_local"]

RESULT_DIR_ENV = "AUTOSHARD_RESULT_DIR"
_GRACE_S = 10.0  # how long peers of a failed spawned rank may take to fail by themselves


class LaunchError(AutoshardError, RuntimeError):
    """A rank failed: it raised, or ended without writing its result. The message holds its traceback
    or the tail of its output."""


@dataclass
class LaunchResult:
    """What the ranks produced: `results[r]` is rank r's result (its function's return value or the
    script's `session.result`)."""

    results: list[Any]
    seconds: float
    returncodes: list[int | None]
    exit_crashes: list[int] = field(default_factory=list)  # ranks that aborted after writing their result
    output: str = ""  # torchrun's combined stdout/stderr (script mode only)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- inside a rank ---------------------------------------------------------------------------------


@dataclass
class RankSession:
    """One rank's view: its rank and world size, and the `result` it will report to the launcher."""

    rank: int
    world_size: int
    result: Any = None


@contextlib.contextmanager
def rank_session(backend: str = "gloo", *, init: bool = True) -> Iterator[RankSession]:
    """Initialise the default process group from the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
    yield, then tear it down and write this rank's result file.

    One thread per rank: the machine's cores are shared by all ranks, and oversubscription makes gloo
    ranks slower than one rank alone. Teardown runs `gc.collect()` first (DTensors and meshes holding the
    group are freed while it still exists, which made the exit-time abort rarer) and a barrier (no rank
    destroys the group while another still sends). The result file is written last, so its presence means
    the rank's work *and* its teardown finished. An exception is written as the rank's error and re-raised.
    With `init=False` the script starts the group itself (as `autoshard.compile` does under torchrun).
    """
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    session = RankSession(rank, world)
    try:
        if init:
            dist.init_process_group(backend, rank=rank, world_size=world)
        yield session
        gc.collect()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        _write_result(rank, {"ok": False, "error": traceback.format_exc()})
        raise
    _write_result(rank, {"ok": True, "result": session.result})


def _write_result(rank: int, payload: dict[str, Any]) -> None:
    directory = os.environ.get(RESULT_DIR_ENV)
    if not directory:
        return  # run by hand (plain torchrun): nobody collects results
    path = Path(directory) / f"rank{rank}.pkl"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(payload))
    tmp.replace(path)  # atomic: the launcher never reads half a file


def _spawned(rank: int, world: int, port: int, result_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **{RESULT_DIR_ENV: result_dir},
    )
    with rank_session() as session:
        session.result = fn(*args)


# ---- the launcher ----------------------------------------------------------------------------------


def run_local(
    target: Callable[..., Any] | str | os.PathLike[str],
    nprocs: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """Run `target` on `nprocs` local gloo ranks and return every rank's result.

    `target` is a module-level function (run as `fn(*args)` on each rank, spawned) or the path of a
    script (run under torchrun with `args` as its command-line arguments). Raises LaunchError naming
    the failed ranks with their tracebacks or output if any rank raised, wrote no result, or the whole
    run exceeded `timeout` seconds.
    """
    if nprocs < 1:
        raise LaunchError(f"expected nprocs >= 1, found {nprocs}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autoshard-launch-") as result_dir:
        if callable(target):
            returncodes, output = _run_spawned(target, nprocs, args, result_dir, timeout)
        else:
            returncodes, output = _run_torchrun(Path(target), nprocs, args, result_dir, timeout, env)
        payloads = [_read_result(Path(result_dir) / f"rank{r}.pkl") for r in range(nprocs)]
    return _judge(payloads, returncodes, output, time.perf_counter() - start)


def _run_spawned(
    fn: Callable[..., Any], nprocs: int, args: Sequence[Any], result_dir: str, timeout: float
) -> tuple[list[int | None], str]:
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_spawned, args=(r, nprocs, port, result_dir, fn, tuple(args))) for r in range(nprocs)]
    for p in procs:
        p.start()
    # Poll rather than join in order: when one rank dies, its peers may block in a collective for gloo's
    # whole timeout (minutes), so they get a short grace period and are then stopped (ours, by process id).
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + _GRACE_S)
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    return [p.exitcode for p in procs], ""


def _run_torchrun(
    script: Path, nprocs: int, args: Sequence[Any], result_dir: str, timeout: float, env: dict[str, str] | None
) -> tuple[list[int | None], str]:
    if not script.is_file():
        raise LaunchError(f"expected a script or a function to launch, found no file at {script}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nprocs),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(script), *map(str, args),
    ]  # fmt: skip
    full_env = {**os.environ, **(env or {}), RESULT_DIR_ENV: result_dir, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") + (e.stderr or "") if isinstance(e.stdout, str) else ""
        raise LaunchError(f"torchrun of {script} ran past {timeout:.0f} s; output tail:\n{out[-4000:]}") from e
    # torchrun reports one exit code for the job; attribute it to every rank (per-rank detail is in the output)
    return [proc.returncode] * nprocs, proc.stdout + proc.stderr


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        return pickle.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def _judge(
    payloads: list[dict[str, Any] | None], returncodes: list[int | None], output: str, seconds: float
) -> LaunchResult:
    failures = []
    for rank, (payload, code) in enumerate(zip(payloads, returncodes, strict=True)):
        if payload is None:
            failures.append(f"rank {rank}: exited with code {code} and wrote no result")
        elif not payload["ok"]:
            failures.append(f"rank {rank} raised:\n{payload['error']}")
    if failures:
        tail = f"\n--- launcher output (tail) ---\n{output[-4000:]}" if output else ""
        raise LaunchError("\n".join(failures) + tail)
    crashes = [r for r, code in enumerate(returncodes) if code not in (0, None)]
    if crashes:  # work and teardown finished (the result file says so), then the interpreter died
        warnings.warn(
            f"ranks {crashes} wrote their results, then exited with codes {[returncodes[r] for r in crashes]} "
            "(gloo's occasional abort at interpreter exit is -6/134); their results are used",
            RuntimeWarning,
            stacklevel=3,
        )
    return LaunchResult(
        results=[p["result"] for p in payloads if p is not None],
        seconds=seconds,
        returncodes=returncodes,
        exit_crashes=crashes,
        output=output,
    )
