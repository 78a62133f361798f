"""Running tests on several processes without hangs, port races or lost tracebacks.

* :func:`spawn` starts ``fn(rank, world, store, *args)`` on ``world`` processes; the workers
  meet through a file store in the test's temporary folder (:func:`init`), so no port is
  chosen at all, and every collective has a timeout. The join has a deadline too: a worker
  still running then is killed and the test fails saying so. A worker's exception reaches the
  test with the rank's own traceback (``torch.multiprocessing``'s ``ProcessRaisedException``).
  What each rank writes to stderr (gloo's C++ messages included) is kept: a rank that dies
  without a traceback fails the test with it, and it is passed on to the test's own stderr. A
  rank killed by SIGABRT while tearing down (gloo, rarely, under load) has the whole run started
  again once, with a warning of what it said.
* :func:`torchrun` runs a script as ``torchrun --standalone`` does (the rendezvous binds a free
  port itself), with a deadline, and fails with what the ranks said on stderr.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A collective that waits longer than this has lost a peer: fail rather than hang.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
# The whole multi-process run (CI machines are slow and busy: generous, but finite).
JOIN_TIMEOUT_S = 600


def init(rank: int, world: int, store: str) -> None:
    """Join the gloo process group that :func:`spawn` set up (a file store: no ports)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )


# Set in a worker by spawn: the file that says this rank has reached its teardown (finish).
_TEARDOWN_MARK: str | None = None


def finish() -> None:
    """Tear down only once every rank is done: a rank that destroys the group while a peer's
    collective is still in flight makes gloo abort the peer (SIGABRT). Call it with no DDP model
    left alive: DDP's reducer holds the group, and freeing it at exit destroys the group while
    holding the GIL a gloo thread waits for (a hang seen once in about ten runs)."""
    if _TEARDOWN_MARK is not None:
        open(_TEARDOWN_MARK, "w").close()  # (from here on, a SIGABRT is a teardown abort: see spawn)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _logged(rank: int, fn, logs: str, *args) -> None:
    """A worker: ``fn(rank, *args)`` with this rank's stderr (file descriptor 2, so gloo's C++
    messages too) written to ``logs/rank{rank}.log``."""
    global _TEARDOWN_MARK
    _TEARDOWN_MARK = os.path.join(logs, f"rank{rank}.teardown")
    sys.stderr.flush()
    log = os.open(os.path.join(logs, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 2)
    os.close(log)
    fn(rank, *args)
    open(_TEARDOWN_MARK, "w").close()  # (returned: what is left is the interpreter's exit)


class _TeardownAbort(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def spawn(fn, world: int, tmp_path, *args, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Run ``fn(rank, world, store, *args)`` on ``world`` processes and join them all, or fail.

    A rank killed by SIGABRT after it reached :func:`finish` (gloo aborting while the group is
    torn down, rarely: seen in ``test_ddp_checkpoint_rank0_saves_all_load``) is not the test's
    failure: it is warned about with what the ranks said, and the whole run is started once more
    (workers write their results under fixed names: the second run's replace the first's). A
    second such abort, or any other failure, fails the test."""
    try:
        _spawn_once(fn, world, tmp_path, args, timeout, attempt=0)
    except _TeardownAbort as e:
        warnings.warn(f"{fn.__name__}: {e.message}; running it again.", stacklevel=2)
        try:
            _spawn_once(fn, world, tmp_path, args, timeout, attempt=1)
        except _TeardownAbort as again:
            raise AssertionError(f"{fn.__name__}, run a second time: {again.message}") from None


def _spawn_once(fn, world: int, tmp_path, args: tuple, timeout: float, attempt: int) -> None:
    base = os.path.join(str(tmp_path), f"spawn-{os.getpid()}-{fn.__name__}-{attempt}")
    store, logs = base + "-store", base + "-logs"
    if os.path.exists(store):
        os.remove(store)  # a file store must start empty
    os.makedirs(logs, exist_ok=True)
    for name in os.listdir(logs):
        os.remove(os.path.join(logs, name))
    context = mp.start_processes(
        _logged, args=(fn, logs, world, store, *args), nprocs=world, join=False, start_method="spawn"
    )
    try:
        # join() returns True once all are done, False when some still run, raises on a failure
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                raise AssertionError(
                    f"ranks {alive} of {fn.__name__} still ran after {timeout} s: killed\n" + _said(logs, world)
                )
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        aborted = _aborted_in_teardown(context, logs, e)
        if aborted is not None:
            raise _TeardownAbort(
                f"rank {aborted} was killed by SIGABRT while tearing down. The ranks said:\n" + _said(logs, world)
            ) from None
        if isinstance(e, mp.ProcessRaisedException):
            raise  # (with the rank's own traceback; what the ranks wrote follows on stderr)
        raise AssertionError(f"rank {e.error_index} of {fn.__name__} died: {e}\n{_said(logs, world)}") from None
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join()
        _pass_on(logs, world)
    if os.path.exists(store):
        os.remove(store)


def _aborted_in_teardown(context, logs: str, failure: mp.ProcessException) -> int | None:
    """The rank that gloo aborted (SIGABRT) after it had reached :func:`finish`, if that is why
    the run failed: the rank reported, or, when the rank reported raised an exception in its own
    teardown (its peer gone), another that died so."""

    def tearing_down(rank: int) -> bool:
        return os.path.exists(os.path.join(logs, f"rank{rank}.teardown"))

    if isinstance(failure, mp.ProcessExitedException):
        rank = failure.error_index
        return rank if failure.signal_name == "SIGABRT" and tearing_down(rank) else None
    if not tearing_down(failure.error_index):
        return None
    for rank, p in enumerate(context.processes):
        p.join(timeout=10)
        if p.exitcode == -signal.SIGABRT and tearing_down(rank):
            return rank
    return None


def _said(logs: str, world: int) -> str:
    """What the ranks wrote to stderr, rank by rank (a long one as :func:`diagnosis` shortens it)."""
    parts = []
    for rank, text in enumerate(_logs(logs, world)):
        shown = text if len(text) <= 3000 else diagnosis(text)
        parts.append(f"--- rank {rank}:\n{shown.rstrip() or '(nothing)'}")
    return "\n".join(parts)


def _logs(logs: str, world: int) -> list[str]:
    texts = []
    for rank in range(world):
        path = os.path.join(logs, f"rank{rank}.log")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                texts.append(f.read())
        else:
            texts.append("")
    return texts


def _pass_on(logs: str, world: int) -> None:
    """The ranks' stderr onto the test's own (pytest shows it with a failure, as before)."""
    for rank, text in enumerate(_logs(logs, world)):
        if text:
            sys.stderr.write(f"[rank {rank}]\n{text}")


def torchrun(
    script: str, *args: str, nproc: int = 2, cwd=None, timeout: float = JOIN_TIMEOUT_S, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc script args``; fails with the ranks' errors.

    A rank killed by SIGABRT (seen once in CI under heavy load, gloo tearing down, with the
    rank's own message cut off) is run again once, with a warning that carries what it said."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args]

    def run():
        # its own session, so a deadline kills the ranks with the launcher (not only the launcher)
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            raise AssertionError(f"{script} did not finish in {timeout} s:\n{diagnosis(err or '')}") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    done = run()
    if done.returncode != 0 and "Signal 6 (SIGABRT)" in done.stderr:
        warnings.warn(f"{script}: a rank aborted; running it again. It said:\n{diagnosis(done.stderr)}", stacklevel=2)
        done = run()
    assert done.returncode == 0, diagnosis(done.stderr)
    return done


def diagnosis(stderr: str) -> str:
    """What a failed multi-process run said: the lines that name an error (the launcher's report
    at the end of stderr hides the rank's own message), then the tail."""
    marks = ("what()", "Error", "error", "terminate", "Abort", "Exception", "Traceback")
    named = [line for line in stderr.splitlines() if any(m in line for m in marks)]
    return "\n".join(named[:40]) + "\n...\n" + stderr[-3000:]


def abort_at_teardown(rank: int, world: int, store: str, out_dir: str) -> None:
    """A worker for the test of :func:`spawn`'s retry (here, so that its ranks import little):
    rank 1 of the first run says something, as gloo does, and aborts once it has torn down; the
    run after it ends normally. Each rank saves ``{"first": whether it was the first run}``."""
    init(rank, world, store)
    first = not os.path.exists(os.path.join(out_dir, "aborted"))
    dist.barrier()  # (both ranks have looked before rank 1 leaves its mark)
    finish()
    torch.save({"first": first}, os.path.join(out_dir, f"rank{rank}.pt"))
    if first and rank == 1:
        open(os.path.join(out_dir, "aborted"), "w").close()
        print(
            "terminate called after throwing an instance of 'gloo::IoException' (a stand-in)",
            file=sys.stderr,
            flush=True,
        )
        os.abort()
