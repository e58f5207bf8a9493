"""A small pool of killable worker processes with a hard per-task deadline.

Why our own and not a library: `multiprocessing.Pool` and `concurrent.futures` cannot kill one
stuck task. pebble's ProcessPool can, but its workers share one locked channel, it stops a late
worker with SIGTERM and waits up to 3 s before SIGKILL (a worker stuck in one C-level big-integer
operation never runs its SIGTERM handler), and a worker that dies right after taking a task can
break the whole pool. Here each worker has its own pipe and one task at a time; the parent waits
on the pipes and the process sentinels together, and SIGKILLs and replaces a worker whose task
outlives the deadline or that dies. A task's clock starts when its worker is ready (imports done),
so start-up time never counts against a task.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

# Address space a worker may grow by beyond what it has at start (the bound turns a runaway
# big-integer computation into a MemoryError instead of an out-of-memory machine).
DEFAULT_WORKER_MEMORY_BYTES = 2 << 30
# A worker gets this long to import and say "ready" once it has a task; the task's clock starts
# only then.
_STARTUP_TIMEOUT_S = 120.0
# This many workers in a row dying before "ready" means the environment is broken (e.g. a main
# module without `if __name__ == "__main__":` that the workers re-run), not a task.
_MAX_STARTUP_FAILURES = 3
_READY = "ready"  # A worker's first message: set-up done.


def _limit_memory(memory_bytes: int | None) -> None:
  """Caps this process's address space at its current size plus `memory_bytes` (Linux)."""
  if not memory_bytes:
    return
  try:
    import resource  # pylint: disable=g-import-not-at-top
    with open("/proc/self/statm") as f:
      current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (current + memory_bytes, current + memory_bytes))
  except (ImportError, OSError, ValueError, IndexError):
    pass


def _worker_main(conn: multiprocessing.connection.Connection, memory_bytes: int | None,
                 setup: Callable[..., Callable[[Any], Any]], setup_args: tuple) -> None:
  """Runs `setup(*setup_args)`, says "ready", then answers tasks until None or the parent leaves."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us.
  _limit_memory(memory_bytes)
  handle = setup(*setup_args)
  try:
    conn.send(_READY)
    while (task := conn.recv()) is not None:
      try:
        reply = ("ok", handle(task))
      except Exception as e:  # pylint: disable=broad-except
        reply = ("error", f"{type(e).__name__}: {e}"[:200])
      conn.send(reply)
  except (EOFError, OSError, ValueError):
    return


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: multiprocessing.connection.Connection
  ready: bool = False
  task: int | None = None  # Index of the task in flight, None when idle.
  deadline: float = 0.0


class KillablePool:
  """Worker processes that each run `setup(*setup_args)` once, then one task at a time.

  `run(tasks)` returns one (status, value) per task: ("ok", what the handler returned),
  ("error", message) when the handler raised, ("timeout", None) when the task outlived `timeout_s`
  (its worker is SIGKILLed and replaced) or ("crash", None) when its worker died on it. Counts go
  to `stats` (workers_started, timeouts, crashes, startup_timeouts, startup_crashes). Workers
  start on first need or `start()`; `close()` kills them all. Not thread-safe.
  """

  def __init__(self, num_workers: int, timeout_s: float,
               setup: Callable[..., Callable[[Any], Any]], setup_args: tuple = (), *,
               start_method: str = "forkserver", preload: Sequence[str] = (),
               memory_bytes: int | None = DEFAULT_WORKER_MEMORY_BYTES,
               stats: collections.Counter | None = None, name: str = "brpo-pool"):
    if start_method not in ("forkserver", "spawn"):
      raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    self.num_workers, self.timeout_s = max(1, num_workers), float(timeout_s)
    self.setup, self.setup_args, self.memory_bytes = setup, tuple(setup_args), memory_bytes
    self.start_method, self.preload, self.name = start_method, list(preload), name
    self.stats = collections.Counter() if stats is None else stats
    self._workers: list[_Worker] = []
    self._context = None
    self._startup_failures = 0
    self._owner_pid = os.getpid()

  def start(self) -> None:
    if os.getpid() != self._owner_pid:
      raise RuntimeError("a pool cannot be used in a process forked from its creator")
    if self._context is None:
      self._context = multiprocessing.get_context(self.start_method)
      if self.start_method == "forkserver":
        self._context.set_forkserver_preload(["__main__", *self.preload])
    while len(self._workers) < self.num_workers:
      self._workers.append(self._new_worker())

  def close(self) -> None:
    """Stops and reaps every worker; the pool may be used again (workers restart)."""
    workers, self._workers = self._workers, []
    if os.getpid() != self._owner_pid:
      return  # A forked copy of this object: the workers belong to the parent, leave them be.
    for worker in workers:
      if worker.task is None:
        with contextlib.suppress(Exception):
          worker.conn.send(None)
    deadline = time.monotonic() + 1.0
    for worker in workers:
      with contextlib.suppress(Exception):
        worker.process.join(max(0.0, deadline - time.monotonic()))
      self._kill(worker)

  def pids(self) -> list[int]:
    return [w.process.pid for w in self._workers]

  def _new_worker(self) -> _Worker:
    parent_conn, child_conn = self._context.Pipe(duplex=True)
    process = self._context.Process(
        target=_worker_main, name=self.name, daemon=True,
        args=(child_conn, self.memory_bytes, self.setup, self.setup_args))
    process.start()
    child_conn.close()
    self.stats["workers_started"] += 1
    return _Worker(process=process, conn=parent_conn)

  @staticmethod
  def _kill(worker: _Worker) -> None:
    with contextlib.suppress(Exception):
      if worker.process.is_alive():
        worker.process.kill()
      worker.process.join(5.0)
    for close in (worker.process.close, worker.conn.close):
      with contextlib.suppress(Exception):
        close()

  def _replace(self, worker: _Worker) -> None:
    """Kills a worker and starts another in its slot; a worker that never got ready is counted."""
    self._kill(worker)
    if not worker.ready:
      self._startup_failures += 1
      if self._startup_failures >= _MAX_STARTUP_FAILURES:
        self.close()
        self._startup_failures = 0
        raise RuntimeError(
            f"{_MAX_STARTUP_FAILURES} {self.name} workers in a row died before they were ready; "
            "is the main module guarded by `if __name__ == \"__main__\":`?")
    self._workers[self._workers.index(worker)] = self._new_worker()

  def run(self, tasks: Sequence[Any]) -> list[tuple[str, Any]]:
    """Runs every task (each picklable) in the workers; see the class docstring."""
    results: list[Any] = [None] * len(tasks)
    queue = collections.deque(range(len(tasks)))
    try:
      self.start()
      while queue or any(w.task is not None for w in self._workers):
        for worker in list(self._workers):
          if worker.task is None and queue:
            self._dispatch(worker, queue, tasks)
        busy = [w for w in self._workers if w.task is not None]
        if not busy:
          continue
        wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        ready = multiprocessing.connection.wait(
            [w.conn for w in busy] + [w.process.sentinel for w in busy], wait_s)
        for worker in busy:
          if worker.conn in ready or worker.process.sentinel in ready:
            self._collect(worker, queue, results)
          if worker.task is not None and time.monotonic() >= worker.deadline:
            self._fail(worker, queue, results, "timeout")
    except BaseException:
      self.close()  # Interrupted mid-batch (e.g. KeyboardInterrupt): in-flight replies are stale.
      raise
    return results

  def _arm(self, worker: _Worker) -> None:
    """Starts the clock of the task in flight; its own clock waits for "ready"."""
    worker.deadline = time.monotonic() + (self.timeout_s if worker.ready else _STARTUP_TIMEOUT_S)

  def _dispatch(self, worker: _Worker, queue: collections.deque, tasks: Sequence[Any]) -> None:
    index = queue.popleft()
    try:
      worker.conn.send(tasks[index])
    except (OSError, ValueError):
      queue.appendleft(index)  # The worker died while idle; the task never started.
      self._replace(worker)
      return
    worker.task = index
    self._arm(worker)

  def _collect(self, worker: _Worker, queue: collections.deque, results: list) -> None:
    """Reads what a worker sent; if it died without answering, fails its task."""
    dead = False
    try:
      while worker.task is not None and worker.conn.poll():
        message = worker.conn.recv()
        if message == _READY:
          worker.ready, self._startup_failures = True, 0
          self._arm(worker)
        else:
          results[worker.task], worker.task = message, None
    except Exception:  # pylint: disable=broad-except
      dead = True  # EOF, or a garbled reply from a worker dying mid-send.
    if worker.task is not None and (dead or not worker.process.is_alive()):
      self._fail(worker, queue, results, "crash")

  def _fail(self, worker: _Worker, queue: collections.deque, results: list, reason: str) -> None:
    """The worker hung or died on its task: the task fails, the worker is replaced.

    A worker that never got ready had not started the task, so that goes back in line.
    """
    count = {"timeout": "timeouts", "crash": "crashes"}[reason]
    if worker.ready:
      self.stats[count] += 1
      results[worker.task] = (reason, None)
    else:
      self.stats["startup_" + count] += 1
      queue.appendleft(worker.task)
    worker.task = None
    self._replace(worker)
