"""Accelerator topologies by name: chips, hosts, HBM, peak bf16 FLOP/s and the Cloud TPU names to create them.

Standard library only: the launch scripts (launch/*.py) load this file by path on a workstation that has
`gcloud` and Python but not JAX. Numbers are the vendors' public spec sheets.

Names:
  v4-N, v5p-N     N TensorCores as Cloud TPU counts them (2 per chip; one JAX device per chip): v5p-128 = 64 chips
  v5e-N, v6e-N    N chips (gcloud accelerator types v5litepod-N, v6e-N)
  KxNAME          K slices of NAME (multi-slice over the data-center network), e.g. 2xv5p-128
  h100xN, h200xN, a100-80gbxN, a100xN (40 GB), l4xN   N GPUs on one host
  cpu-N           N CPU devices (tests; memory limit unknown)
"""

from __future__ import annotations

import dataclasses
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    """Per-chip facts of one accelerator generation."""

    name: str
    hbm_bytes: int  # per JAX device
    peak_tflops: float  # dense bf16, per JAX device
    cores_per_chip_in_name: int = 1  # v4-8 / v5p-8 count TensorCores: 2 per chip
    chips_per_host: int = 4  # multi-host slices
    single_host_max: int = 4  # a slice of at most this many chips has one host
    runtime_version: str | None = None  # gcloud --version / --runtime-version for JAX
    accelerator_prefix: str | None = None  # gcloud --accelerator-type prefix
    max_chips: int = 1
    power_of_two: bool = False  # slice sizes are powers of two (v5e, v6e)


TPU = {
    "v4": Generation("v4", 32 * GIB, 275.0, 2, 4, 4, "tpu-ubuntu2204-base", "v4", 4096),
    "v5e": Generation("v5e", 16 * GIB, 197.0, 1, 4, 8, "v2-alpha-tpuv5-lite", "v5litepod", 256, True),
    "v5p": Generation("v5p", 95 * GIB, 459.0, 2, 4, 4, "v2-alpha-tpuv5", "v5p", 8960),
    "v6e": Generation("v6e", 32 * GIB, 918.0, 1, 4, 8, "v2-alpha-tpuv6e", "v6e", 256, True),
}
GPU = {
    "h100": Generation("h100", 80 * 10**9, 989.0, single_host_max=8, max_chips=8),
    "h200": Generation("h200", 141 * 10**9, 989.0, single_host_max=8, max_chips=8),
    "a100-80gb": Generation("a100-80gb", 80 * 10**9, 312.0, single_host_max=8, max_chips=8),
    "a100": Generation("a100", 40 * 10**9, 312.0, single_host_max=8, max_chips=8),
    "l4": Generation("l4", 24 * 10**9, 121.0, single_host_max=8, max_chips=8),
}
# JAX's device_kind (lower case) -> generation, most specific first ("TPU v5 lite" is a v5e, plain "TPU v5" a v5p).
_DEVICE_KINDS = (("tpu v4", TPU["v4"]), ("tpu v5 lite", TPU["v5e"]), ("tpu v5e", TPU["v5e"]), ("tpu v5p", TPU["v5p"]),
                 ("tpu v5", TPU["v5p"]), ("tpu v6", TPU["v6e"]), ("h100", GPU["h100"]), ("h200", GPU["h200"]),
                 ("a100", GPU["a100"]), ("l4", GPU["l4"]))


def generation_of(device_kind: str) -> Generation | None:
    """The generation of a JAX device (`device.device_kind`, e.g. "TPU v5 lite", "NVIDIA H200"); None if unknown."""
    kind = device_kind.lower()
    return next((g for key, g in _DEVICE_KINDS if key in kind), None)


# The slices the guide and the launch tests use (any valid N works).
COMMON = ("v4-8", "v4-32", "v4-128", "v5e-8", "v5e-16", "v5e-64", "v5e-256", "v5p-8", "v5p-32", "v5p-128",
          "2xv5p-128", "v6e-8", "v6e-64", "h100x8")


class TopologyError(ValueError):
    """A topology name that cannot be read, or a slice size that does not exist."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """One slice (or several identical slices) of accelerators."""

    name: str
    kind: str  # "tpu", "gpu" or "cpu"
    generation: Generation
    chips: int  # JAX devices in total (all slices)
    hosts: int  # VMs in total (all slices)
    slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return self.chips // self.slices

    @property
    def hosts_per_slice(self) -> int:
        return self.hosts // self.slices

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s of all devices together."""
        return self.generation.peak_tflops * 1e12 * self.chips

    @property
    def accelerator_type(self) -> str | None:
        """gcloud --accelerator-type of one slice (e.g. v5litepod-16, v5p-128)."""
        g = self.generation
        if g.accelerator_prefix is None:
            return None
        return f"{g.accelerator_prefix}-{self.chips_per_slice * g.cores_per_chip_in_name}"

    @property
    def runtime_version(self) -> str | None:
        return self.generation.runtime_version

    def describe(self) -> str:
        slices = f"{self.slices} slices, " if self.slices > 1 else ""
        hbm = f"{self.hbm_bytes / GIB:.0f} GiB" if self.hbm_bytes else "unknown memory"
        return (f"{self.name}: {slices}{self.chips} {'devices' if self.kind == 'cpu' else 'chips'}, "
                f"{self.hosts} host{'s' if self.hosts > 1 else ''}, {hbm} each")


_TPU_NAME = re.compile(r"^(?:(\d+)x)?(v4|v5e|v5litepod|v5p|v6e)-(\d+)$")
_GPU_NAME = re.compile(r"^(h100|h200|a100-80gb|a100|l4)x(\d+)$")


def parse_topology(name: str) -> Topology:
    """A Topology from a name (module docstring), e.g. 'v5p-128', 'v5e-16', '2xv5p-128', 'h100x8', 'cpu-8'."""
    spec = name.strip().lower()
    m = _TPU_NAME.match(spec)
    if m:
        slices = int(m.group(1) or 1)
        gen = TPU["v5e" if m.group(2) == "v5litepod" else m.group(2)]
        n = int(m.group(3))
        if n % gen.cores_per_chip_in_name or n < gen.cores_per_chip_in_name:
            raise TopologyError(f"{name}: {gen.name} slices count {gen.cores_per_chip_in_name} cores per chip; "
                                f"use a multiple of {gen.cores_per_chip_in_name}")
        chips = n // gen.cores_per_chip_in_name
        if chips > gen.max_chips or slices < 1:
            raise TopologyError(f"{name}: a {gen.name} slice has at most {gen.max_chips} chips")
        if gen.power_of_two and chips & (chips - 1):
            raise TopologyError(f"{name}: {gen.name} slices have a power-of-two number of chips (1, 4, 8, ..., "
                                f"{gen.max_chips})")
        if chips > gen.single_host_max and chips % gen.chips_per_host:
            raise TopologyError(f"{name}: multi-host {gen.name} slices come in multiples of {gen.chips_per_host} chips")
        hosts = 1 if chips <= gen.single_host_max else chips // gen.chips_per_host
        canonical = f"{gen.name}-{n}" if slices == 1 else f"{slices}x{gen.name}-{n}"
        return Topology(canonical, "tpu", gen, chips * slices, hosts * slices, slices)
    m = _GPU_NAME.match(spec)
    if m:
        gen, n = GPU[m.group(1)], int(m.group(2))
        if not 1 <= n <= gen.max_chips:
            raise TopologyError(f"{name}: 1 to {gen.max_chips} GPUs per host")
        return Topology(f"{gen.name}x{n}", "gpu", gen, n, 1)
    m = re.match(r"^cpu-(\d+)$", spec)
    if m:
        return Topology(spec, "cpu", Generation("cpu", 0, 0.0), int(m.group(1)), 1)
    raise TopologyError(f"unknown topology {name!r}; examples: {', '.join(COMMON)} (see boomerang_jax/infra/topology.py)")
