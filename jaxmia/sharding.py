"""The inversion batch sharded over a device mesh: N devices run N times the clones.

Clones are independent (the per-clone step is vmapped), so the flattened identities x clones
axis is split over a one-axis mesh named ``"data"`` (``NamedSharding(mesh, P("data"))``) and the
recognizer's parameters are replicated (``P()``). The jitted programs take their input shardings
from the arrays, so XLA partitions the vmapped step with no communication inside a step; only the
host's every-``check_every``-steps "is any clone still running" reduces across devices. A step
equals one device's to float32 rounding (a device's convolutions may block their sums
differently); over many steps a few clones whose max-pool windows nearly tie can take another
path (measured: after 20 steps at 64x64, 121 of 129 clones within 1 ulp, 8 within 1.5e-3).

On CPU, one JAX device runs a step's convolutions with few threads; splitting the host into one
device per core (``use_all_cores``, before JAX starts its backend) and sharding over them keeps
more cores busy. ``jaxmia invert`` does that when ``inversion.shard`` is on. Measured on the
2-core CPU (``benchmarks/results/inversion.md``, one program per batch): 1.72-1.88x at 64x64x1,
batch 128; 1.23-1.28x at 128x128x3, batch 64.

Multi-host: call ``jax.distributed.initialize()`` (coordinator address, process count and id from
the cluster's environment, or as arguments; ``initialize`` here, or ``jaxmia invert
--distributed``) in every process before any other JAX call; then
``jax.devices()`` lists every host's devices, ``clone_mesh`` spans them, each process computes
the same full batch of seeds and keys (they are deterministic functions of the config), places
only its own shards (``shard_clones``), and ``to_host`` gathers the results to every process.
Tested with two processes on one machine as two hosts (CPU, which needs
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` before initialising).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import xla_bridge
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmia.errors import JaxmiaError

AXIS = "data"


def use_all_cores(count: int | None = None) -> int:
    """Splits the host CPU into ``count`` JAX devices (default: one per core); returns the count.

    Only possible before JAX has started its backends; afterwards (or when ``XLA_FLAGS`` already
    forces a host device count, the user's choice) nothing changes and the current CPU device
    count is returned. Accelerator backends are unaffected.
    """
    count = count or os.cpu_count() or 1
    forced = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if forced or xla_bridge.backends_are_initialized():
        return len(jax.devices("cpu"))
    jax.config.update("jax_num_cpu_devices", count)
    return count


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-process JAX run (``jax.distributed.initialize``), before any computation.

    Without arguments the cluster's environment says where the coordinator is and which process
    this is (Slurm, Open MPI, Cloud TPU); otherwise give all three. CPU hosts exchange over gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise JaxmiaError(
            "--coordinator, --num-processes and --process-id: expected all three or none "
            "(none: from the cluster's environment)"
        )
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
        jax.devices()  # every process's backend joins here, or this fails after JAX's timeout
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JaxmiaError(
            f"--distributed: could not join the multi-process run ({first}); expected a "
            "Slurm, Open MPI or Cloud TPU environment, or --coordinator HOST:PORT "
            "--num-processes N --process-id I in every process"
        ) from None


def is_main() -> bool:
    """True in the process that writes outputs (process 0; the only one outside multi-host)."""
    return jax.process_index() == 0


def agree(value: Any) -> Any:
    """Process 0's ``value`` (a NumPy-able tree) in every process: decisions every process must
    share, such as which chunks are already done. The value itself outside multi-host."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(value)


def clone_mesh(
    clones: int | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh | None:
    """A one-axis ``"data"`` mesh over ``devices`` (default: every device JAX sees, all hosts).

    Returns None for a single device, or fewer ``clones`` than devices (padding would cost more
    than sharding gains): nothing to shard.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < 2 or (clones is not None and clones < len(devices)):
        return None
    return Mesh(np.asarray(devices), (AXIS,))


def padded_size(n: int, mesh: Mesh) -> int:
    """``n`` rounded up to a multiple of the mesh's device count."""
    d = mesh.devices.size
    return -(-n // d) * d


def shard_clones(mesh: Mesh, tree: Any) -> Any:
    """Every leaf's leading (clones) axis padded to a multiple of the devices and split over them.

    Padding repeats the last clone (the caller drops the padded results); keys travel as their
    raw data. Every process must pass the same full values (multi-host).
    """
    sharding = NamedSharding(mesh, P(AXIS))

    def place(a):
        key = jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
        v = jax.random.key_data(a) if key else a
        n = v.shape[0]
        size = padded_size(n, mesh)
        if size > n:
            v = jnp.concatenate([v, jnp.repeat(v[-1:], size - n, 0)])
        v = _global(v, sharding)
        return jax.random.wrap_key_data(v, impl=jax.random.key_impl(a)) if key else v

    return jax.tree.map(place, tree)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Every leaf copied whole to every device of the mesh (the recognizer's parameters)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: _global(a, sharding), tree)


def _global(a: Any, sharding: NamedSharding) -> jax.Array:
    """``a`` laid out as ``sharding`` across every process's devices.

    A host value (the same on every process) becomes each device's slice of it; an array that
    already spans processes is resharded on the devices.
    """
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return jax.device_put(a, sharding)
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree: Any) -> Any:
    """NumPy copies of (possibly sharded, possibly multi-host) arrays, whole on every process."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
