"""Sharded (DTensor) head weights for the fused ops: gathered around the call, gradients reduce-scattered.

An FSDP2 ``fully_shard`` lm_head weight is a DTensor (``Shard(0)`` on a 1-D mesh); a tensor-
parallel one may be ``Shard(0)``, ``Shard(1)`` or ``Replicate``. The kernels need the whole
``[V, H]`` matrix, so:

* forward: the weight (and bias) is all-gathered into a plain tensor for the duration of the call;
* backward: each rank's gradient of the full weight is a partial contribution; it is averaged over
  the mesh and redistributed to the weight's own placements (a reduce-scatter for ``Shard``, an
  all-reduce for ``Replicate``), arriving in ``weight.grad`` as a DTensor like FSDP2's own gradients,
  so an optimizer step on the sharded model is unchanged;
* an op that saves the weight for its backward (``linear_logprobs`` recomputes the logits there)
  does not keep the gathered copy alive in between: ``regather_in_backward`` swaps it for a
  marker and all-gathers again when the backward unpacks it.

The average is the data-parallel convention (FSDP2's default ``ReduceOp.AVG``, DDP's): with the
loss of each rank computed on its own rows it is the gradient of the mean of the ranks' losses; on
rows replicated on every rank (a ``Replicate`` ``hidden``) it is the exact gradient.

Supported: 1-D meshes; ``weight`` Shard(0) / Shard(1) / Replicate; ``bias`` Shard(0) / Replicate;
``hidden`` Replicate (its local copy is used; its gradient comes back ``Replicate``). Anything else
is refused with a TypeError naming the argument and its placement. Gathers are collectives: every
rank of the mesh must make the same calls in the same order (forward and backward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

try:  # torch.distributed is optional in some builds; without it nothing can be a DTensor
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - a torch without distributed support
    DTensor = None

_ALLOWED = {
    "weight": "Shard(0), Shard(1) or Replicate",
    "bias": "Shard(0) or Replicate",
    "hidden": "Replicate",
}


def is_dtensor(x: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel parameter)."""
    return DTensor is not None and isinstance(x, DTensor)


def _placement_ok(name: str, placement) -> bool:
    if isinstance(placement, Replicate):
        return True
    if isinstance(placement, Shard):
        if name == "weight":
            return placement.dim in (0, 1)
        if name == "bias":
            return placement.dim == 0
        return name != "hidden"  # any other tensor (spin_kernels.distributed.gathered): any dimension
    return False


def check_dtensor(name: str, x: Tensor, mesh=None):
    """The device mesh of DTensor ``x``, after checking that the fused ops handle its layout.

    Args:
        name: the argument's name, for the error ("weight", "bias", "hidden").
        x: a DTensor.
        mesh: the mesh another argument lives on, which ``x`` must share (None: no constraint).

    Raises:
        TypeError: a mesh that is not 1-D, a placement the ops do not handle (Partial, a Shard of
            another dimension), or a mesh different from ``mesh``.
    """
    xmesh = x.device_mesh
    if xmesh.ndim != 1:
        raise TypeError(f"{name} is a DTensor on a {xmesh.ndim}-D device mesh (placements {tuple(x.placements)}); "
                        f"the fused ops handle 1-D meshes (FSDP2 fully_shard without HSDP, or one "
                        f"tensor-parallel dimension)")
    placement = x.placements[0]
    if not _placement_ok(name, placement):
        raise TypeError(f"{name} is a DTensor with placement {placement!r}; the fused ops handle {name} as a "
                        f"plain tensor or a DTensor with placement {_ALLOWED.get(name, 'Shard or Replicate')}")
    if mesh is not None and xmesh != mesh:
        raise TypeError(f"{name} is a DTensor on device mesh {xmesh} but the other DTensor arguments are on "
                        f"{mesh}; they must share one mesh")
    return xmesh


class GatherFull(torch.autograd.Function):
    """DTensor -> the full plain tensor; backward: mesh-average, redistributed to its placements."""

    @staticmethod
    def forward(ctx, x):
        ctx.mesh, ctx.placements = x.device_mesh, x.placements
        return x.full_tensor()

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None
        # Each rank holds its own contribution to the gradient of the full tensor: a Partial
        # (sum) DTensor once divided by the mesh size, whose redistribution to the parameter's
        # placements is the reduce-scatter (Shard) or all-reduce (Replicate) of the average.
        part = DTensor.from_local(grad.contiguous() / ctx.mesh.size(), ctx.mesh, [Partial()], run_check=False)
        return part.redistribute(ctx.mesh, ctx.placements)


def gather_full(x: Tensor | None, name: str = "weight", mesh=None) -> Tensor | None:
    """``x`` as a full plain tensor (itself if it is not a DTensor), differentiable as described above.

    Args:
        x: a DTensor (checked with ``check_dtensor``), a plain tensor or None.
        name, mesh: as in ``check_dtensor``.
    """
    if not is_dtensor(x):
        return x
    check_dtensor(name, x, mesh)
    if name == "hidden":
        # Replicate: every rank holds the same rows; the gradient of the local copy is that of
        # the DTensor (to_local's backward labels it Replicate again).
        return x.to_local()
    if torch.is_grad_enabled() and x.requires_grad:
        return GatherFull.apply(x)
    with torch.no_grad():
        return x.full_tensor()


class _Regather:
    """What a saved gathered weight is packed into: its DTensor source, gathered again on unpack."""

    __slots__ = ("source",)

    def __init__(self, source: Tensor):
        self.source = source.detach()


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


@contextmanager
def regather_in_backward(pairs: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """While active, autograd saves each gathered tensor ``full`` of ``(full, source)`` as a marker
    and all-gathers ``source`` again when the backward needs it, so the full copy lives only during
    the forward call and during its backward, not in between.

    Tensors that autograd saves which are not one of the ``full`` tensors (views, casts, other
    inputs) are saved as usual.
    """
    pairs = [(full, source) for full, source in pairs if full is not None and is_dtensor(source)]
    if not pairs:
        yield
        return

    def pack(t: Tensor):
        for full, source in pairs:
            if _same_tensor(t, full):
                return _Regather(source)
        return t

    def unpack(saved):
        if isinstance(saved, _Regather):
            with torch.no_grad():
                return saved.source.full_tensor()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
