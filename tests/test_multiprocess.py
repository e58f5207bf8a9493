"""Multi-process training: two processes of 4 CPU devices each (jax.distributed, gloo
collectives) run the same 3 tiny steps on one (1, 4, 2) mesh of 8 devices as one process of 8
devices, and must end with the same rollouts, rewards and evaluation, and the same losses and
parameters up to float rounding.

Each process samples, grades and packs only the rows its devices hold (brpo/rows.py, brpo/run/multihost.py), and
both write one checkpoint directory. This is the layout of a TPU pod slice or several GPU hosts.
"""

from __future__ import annotations

import socket

import run_helpers as rh


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, tiny_warmstart_dir, uninterrupted):
  workdir = str(tmp_path / "two_processes")
  port = free_port()
  procs = [rh.start(workdir, tiny_warmstart_dir, "--distributed=on", devices=4,
                    env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                         "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
           for i in range(2)]
  errs = [rh.finish(p) for p in procs]
  assert "process 0 of 2; 4 local devices of 8" in errs[0]
  assert "process 1 of 2; 4 local devices of 8" in errs[1]
  # Every sampled token, reward and accuracy is identical; losses, gradient norms and parameters
  # differ by rounding only (gloo's cross-process all-reduce sums in another order: ~1e-6).
  rh.assert_same_run(uninterrupted, workdir, rtol=1e-4)


def test_two_processes_roll_out_in_chunks(tmp_path, tiny_warmstart_dir):
  """--rollout_batch and --compact_every with rows split over two processes: 16 rows in chunks of
  8 (4 from each process's block), the running rows of a chunk compacted to 4 (one per fsdp
  device) once most have stopped; the same run as one process with the same flags."""
  extra = ("--prompts_per_batch=8", "--rollout_batch=8", "--compact_every=4",
           "--compact_min_rows=4", "--steps=2", "--eval_size=4")
  one = str(tmp_path / "one_process")
  rh.finish(rh.start(one, tiny_warmstart_dir, *extra))
  workdir = str(tmp_path / "two_processes")
  port = free_port()
  procs = [rh.start(workdir, tiny_warmstart_dir, "--distributed=on", *extra, devices=4,
                    env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                         "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
           for i in range(2)]
  for p in procs:
    rh.finish(p)
  rh.assert_same_run(one, workdir, steps=2, rtol=1e-4)
