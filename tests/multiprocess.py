"""Running tests on several processes without hangs, port races or lost tracebacks.

* :func:`spawn` starts ``fn(rank, world, store, *args)`` on ``world`` processes; the workers
  meet through a file store in the test's temporary folder (:func:`init`), so no port is
  chosen at all, and every collective has a timeout. The join has a deadline too: a worker
  still running then is killed and the test fails saying so. A worker's exception reaches the
  test with the rank's own traceback (``torch.multiprocessing``'s ``ProcessRaisedException``).
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
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)  # fmt: skip


def finish() -> None:
    """Tear down only once every rank is done: a rank that destroys the group while a peer's
    collective is still in flight makes gloo abort the peer (SIGABRT). Call it with no DDP model
    left alive: DDP's reducer holds the group, and freeing it at exit destroys the group while
    holding the GIL a gloo thread waits for (a hang seen once in about ten runs)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn, world: int, tmp_path, *args, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Run ``fn(rank, world, store, *args)`` on ``world`` processes and join them all, or fail."""
    store = os.path.join(str(tmp_path), f"store-{os.getpid()}-{id(fn)}")
    if os.path.exists(store):
        os.remove(store)  # a file store must start empty
    context = mp.start_processes(fn, args=(world, store, *args), nprocs=world, join=False, start_method="spawn")
    try:
        # join() returns True once all are done, False when some still run, raises on a failure
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                raise AssertionError(f"ranks {alive} of {fn.__name__} still ran after {timeout} s: killed")
    except mp.ProcessExitedException as e:
        raise AssertionError(f"rank {e.error_index} of {fn.__name__} died: {e}") from None
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join()
    if os.path.exists(store):
        os.remove(store)


def torchrun(script: str, *args: str, nproc: int = 2, cwd=None, timeout: float = JOIN_TIMEOUT_S,
             env: dict | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """``torchrun --standalone --nproc_per_node nproc script args``; fails with the ranks' errors.

    A rank killed by SIGABRT (seen once in CI under heavy load, gloo tearing down, with the
    rank's own message cut off) is run again once, with a warning that carries what it said."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args]

    def run():
        # its own session, so a deadline kills the ranks with the launcher (not only the launcher)
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip
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
        warnings.warn(f"{script}: a rank aborted; running it again. It said:\n{diagnosis(done.stderr)}")
        done = run()
    assert done.returncode == 0, diagnosis(done.stderr)
    return done


def diagnosis(stderr: str) -> str:
    """What a failed multi-process run said: the lines that name an error (the launcher's report
    at the end of stderr hides the rank's own message), then the tail."""
    marks = ("what()", "Error", "error", "terminate", "Abort", "Exception", "Traceback")
    named = [line for line in stderr.splitlines() if any(m in line for m in marks)]
    return "\n".join(named[:40]) + "\n...\n" + stderr[-3000:]
