"""XLA:TPU from a CPU host: the compile-only devices of a named TPU topology, the HBM that XLA:TPU
gives one device's program, and a compile refused for memory as one line instead of a traceback.

  devices = tpu_aot.devices("v4-8")       # 4 compile-only TPU v4 devices (megacore), 1 host
  mesh = models.sharding.make_mesh((1, -1, 1), devices=devices)
  hbm = tpu_aot.available_hbm(devices)    # bytes per device, XLA:TPU's own limit
  compiled = tpu_aot.compile(jax.jit(f).lower(*abstract_args), limit=hbm - resident)
  # -> raises DoesNotFit: "does not fit: needs 41.56 of 33.02 GB" when XLA:TPU refuses it

No TPU is needed: libtpu (`pip install "libtpu==0.0.42.*"`, the libtpu that jax[tpu]==0.10.2
pins; or the project's [tpu] extra) holds XLA:TPU's compiler and the topologies' compile-only
devices (`jax.experimental.topologies`), while JAX itself keeps running on the CPU
(JAX_PLATFORMS=cpu). Multi-host topologies give devices of several processes, as
`jax.distributed` does on a pod; the compile is the one each host would run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

GB = 1e9
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}  # XLA prints binary units


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: libtpu's topology name, its chip config (megacore: the two TensorCores of a v4
  or v5p chip are one device), the chips of one host, and the chip's HBM as sold (for the docs;
  the figures use XLA's own limit, `available_hbm`)."""
  topology_name: str
  chip_config: str
  chips_per_host: tuple[int, int, int]
  chip_hbm: str


# Cloud TPU names -> slices. The number in a name counts TensorCores for v4/v5p/tpu7x and chips
# for v5e/v6e; tpu7x chips hold two devices each. v5e-8 and v6e-8 are one 8-chip host; larger
# v5e/v6e slices and every v4/v5p/tpu7x slice have 4 chips per host.
TOPOLOGIES = {
    "v4-8": Topology("v4:2x2x1", "megacore", (2, 2, 1), "32 GiB"),
    "v4-32": Topology("v4:2x2x4", "megacore", (2, 2, 1), "32 GiB"),
    "v5e-8": Topology("v5e:2x4", "default", (2, 4, 1), "16 GiB"),
    "v5e-16": Topology("v5e:4x4", "default", (2, 2, 1), "16 GiB"),
    "v5e-64": Topology("v5e:8x8", "default", (2, 2, 1), "16 GiB"),
    "v5p-8": Topology("v5:2x2x1", "megacore", (2, 2, 1), "95 GiB"),
    "v5p-64": Topology("v5:2x4x4", "megacore", (2, 2, 1), "95 GiB"),
    "v6e-8": Topology("v6e:2x4", "default", (2, 4, 1), "32 GiB"),
    "v6e-16": Topology("v6e:4x4", "default", (2, 2, 1), "32 GiB"),
    "tpu7x-8": Topology("tpu7x:2x2x1", "default", (2, 2, 1), "192 GiB (2 devices)"),
}


class LibtpuMissing(RuntimeError):
  pass


class DoesNotFit(Exception):
  """XLA:TPU refused a compile for memory: `needs` of `available` bytes per device."""

  def __init__(self, needs: float, available: float, what: str = ""):
    super().__init__(needs, available, what)
    self.needs, self.available, self.what = needs, available, what

  def __str__(self):
    what = f"{self.what} " if self.what else ""
    return (f"does not fit: {what}needs {self.needs / GB:.2f} of {self.available / GB:.2f} GB "
            "per device")


def topology(name: str) -> Topology:
  """A name of TOPOLOGIES, or libtpu's own topology name (e.g. "v5e:2x2", "v4:2x2x2"): megacore
  for v4/v5 (v5p), up to 2x2x1 chips per host."""
  if name in TOPOLOGIES:
    return TOPOLOGIES[name]
  m = re.fullmatch(r"(v4|v5|v5e|v6e|tpu7x):(\d+(?:x\d+){1,2})", name)
  if not m:
    raise ValueError(f"--target=tpu:{name}: unknown TPU topology (known: "
                     f"{', '.join(TOPOLOGIES)}, or libtpu's names such as v5e:2x2 or v4:2x2x2)")
  dims = [int(d) for d in m.group(2).split("x")] + [1]
  per_host = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))
  chip = "megacore" if m.group(1) in ("v4", "v5") else "default"
  return Topology(name, chip, per_host, "")


def libtpu_path() -> str:
  """The libtpu.so that XLA:TPU's compiler comes from (TPU_LIBRARY_PATH, else the installed
  libtpu package); raises LibtpuMissing with the install line."""
  path = os.environ.get("TPU_LIBRARY_PATH", "")
  if path and os.path.isfile(path):
    return path
  if importlib.util.find_spec("libtpu") is not None:
    import libtpu
    return libtpu.get_library_path()
  raise LibtpuMissing("XLA:TPU's compiler (libtpu) is not installed: pip install "
                      "\"libtpu==0.0.42.*\" (the libtpu of jax[tpu]==0.10.2), or pip install -e "
                      "'.[tpu]'; no TPU is needed")


def devices(name: str) -> list:
  """The compile-only devices of topology `name` (all of the slice's hosts), in libtpu's order."""
  topo = topology(name)
  path = libtpu_path()
  # No TPU here: no metadata server to ask, one host's names, and libtpu's one-process lock off
  # (pytest workers and other runs load it beside each other; compile-only devices share nothing).
  for key, value in (("TPU_LIBRARY_PATH", path), ("TPU_SKIP_MDS_QUERY", "1"),
                     ("TPU_ACCELERATOR_TYPE", name if name in TOPOLOGIES else "v4-8"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(
      platform="tpu", topology_name=topo.topology_name, chip_config_name=topo.chip_config,
      chips_per_host_bounds=topo.chips_per_host, num_slices=1).devices)


_REFUSALS = (
    re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"),
    re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
)


def refusal(message: str) -> DoesNotFit | None:
  """DoesNotFit from XLA:TPU's out-of-memory message, None for any other error."""
  for pattern in _REFUSALS:
    m = pattern.search(message)
    if m:
      return DoesNotFit(float(m.group(1)) * _UNITS[m.group(2)],
                        float(m.group(3)) * _UNITS[m.group(4)])
  return None


def compile(lowered, limit: float | None = None, what: str = ""):  # noqa: A001
  """lowered.compile(), with XLA:TPU's HBM limited to `limit` bytes per device (floored to a MiB;
  None: the device's own); raises DoesNotFit (naming `what`) when XLA:TPU refuses it for memory."""
  import jax
  options = {} if limit is None else {"xla_tpu_max_hbm_size_mib": max(int(limit // 2 ** 20), 1)}
  try:
    return lowered.compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    r = refusal(str(e))
    if r is None:
      raise
    r.what = what
    raise r from None


def available_hbm(devices_: list) -> float:
  """Bytes of HBM XLA:TPU lets one device's program use: read from its refusal of a program
  whose output (1 TiB) fits no TPU."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.asarray(devices_[:1]), ("x",))
  probe = jax.jit(lambda: jnp.zeros((2 ** 40,), jnp.int8),
                  out_shardings=NamedSharding(mesh, PartitionSpec()))
  try:
    probe.lower().compile()
  except jax.errors.JaxRuntimeError as e:
    r = refusal(str(e))
    if r is not None:
      return r.available
    raise
  raise RuntimeError("XLA:TPU compiled a 1 TiB output: cannot read its HBM limit")
