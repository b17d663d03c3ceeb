"""Device mesh, logical-axis rules and the shardings derived from them.

Parameters carry t5x's logical axis names; the rules below map them onto a
(`data`, `model`) mesh. Shardings come from abstract (eval_shape) variables, so
nothing is materialised before it is placed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"

LogicalRules = Sequence[tuple[str, Any]]


def use_mesh(mesh: Mesh):
    """Context that makes `mesh` current: jax.set_mesh (`with mesh:` is deprecated in jax)."""
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Shape of the device mesh. -1 on one axis takes the remaining devices.

    fsdp: also shard the `embed` axis of parameters over `data` (for large models).
    """

    data: int = -1
    model: int = 1
    fsdp: bool = False

    def __post_init__(self):
        from dro_jax import checks

        checks.boolean("MeshConfig.fsdp", self.fsdp)


def create_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, model = config.data, config.model
    if data == -1 and model == -1:
        raise ValueError("mesh: at most one of data/model may be -1")
    for name, size in (("data", data), ("model", model)):
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh: {name} must be a positive integer or -1, got {size!r}")
    if data == -1:
        if n % model:
            raise ValueError(f"mesh: model={model} does not divide the {n} devices")
        data = n // model
    if model == -1:
        if n % data:
            raise ValueError(f"mesh: data={data} does not divide the {n} devices")
        model = n // data
    if data * model > n or (data * model < n and jax.process_count() > 1):
        raise ValueError(f"mesh: data={data} x model={model} (MESH_DATA x MESH_MODEL) does not match the {n} devices "
                         "here; -1 for one of them takes the rest")
    # Fewer devices than available (single process): use the first data*model of them.
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def logical_axis_rules(config: MeshConfig = MeshConfig()) -> LogicalRules:
    """t5x-style logical -> mesh axis rules."""
    return (
        ("batch", DATA_AXIS),
        ("embed", DATA_AXIS if config.fsdp else None),
        ("mlp", MODEL_AXIS),
        ("heads", MODEL_AXIS),
        ("kv", None),
        ("vocab", MODEL_AXIS),
        ("length", None),
        ("relpos_buckets", None),
        ("layers", None),
        ("value_head", None),
    )


def partition_specs(boxed_tree: Any) -> Any:
    """PartitionSpecs of logical axis names for a tree of boxed (or abstract) variables."""
    return nn.get_partition_spec(boxed_tree)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for a tree of boxed variables (leaves without names are replicated)."""
    return nn.logical_to_mesh_sharding(partition_specs(boxed_tree), mesh, rules)


def mesh_partition_specs(boxed_tree: Any, rules: LogicalRules) -> Any:
    """Mesh-axis PartitionSpecs (what the rules say each parameter gets)."""
    return nn.logical_to_mesh(partition_specs(boxed_tree), rules)


def check_divisible(boxed_tree: Any, mesh: Mesh, rules: LogicalRules) -> None:
    """ValueError naming the mesh macro, the logical axis and the parameter when a mesh axis does
    not divide the dimension it shards (JAX's own message names neither)."""
    macro = {DATA_AXIS: "MESH_DATA (with MeshConfig.fsdp)", MODEL_AXIS: "MESH_MODEL"}
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    for path, box in jax.tree_util.tree_leaves_with_path(boxed_tree, is_leaf=is_box):
        if not is_box(box):
            continue
        spec = nn.logical_to_mesh(P(*box.names), rules)
        for dim, (size, name, axes) in enumerate(zip(box.value.shape, box.names, spec)):
            for axis in (axes,) if isinstance(axes, str) else (axes or ()):
                if size % mesh.shape[axis]:
                    raise ValueError(
                        f"{macro.get(axis, axis)}={mesh.shape[axis]} does not divide the '{name}' dimension "
                        f"({size}) of parameter {'/'.join(str(getattr(k, 'key', k)) for k in path)}: use a "
                        "mesh size that divides num_heads, d_ff and vocab_size (and d_model with fsdp)")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data`, everything else replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each host's local batch shard into one global array per feature."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
