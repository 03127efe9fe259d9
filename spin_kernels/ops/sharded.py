"""Sharded (DTensor) head weights: gathered for the op, gradients reduce-scattered back.

An FSDP2 ``fully_shard`` lm_head weight is a DTensor (``Shard(0)`` on a 1-D mesh); a tensor-
parallel one may be ``Shard(0)``, ``Shard(1)`` or ``Replicate``. The kernels need the whole
``[V, H]`` matrix, so the ops' autograd Functions (``autograd.py``), told by a ``Sharding``:

* all-gather the weight (and bias) into plain tensors for the forward call only;
* keep for the backward what they would keep unsharded, except the weight and bias: their
  DTensors (this rank's shard) are saved, and ``linear_logprobs``'s backward, which recomputes
  the logits, gathers them again;
* hand back gradients as DTensors with the arguments' placements: each rank's gradient of the
  full weight is its partial contribution, averaged over the mesh and redistributed (a
  reduce-scatter for ``Shard``, an all-reduce for ``Replicate``), like FSDP2's own gradients, so
  an optimizer step on the sharded model is unchanged. This happens in the backward, after the
  upstream gradient is applied: ranks may scale their losses differently (e.g. by their share of
  the pairs), and the average must be of the scaled contributions.

The average is the data-parallel convention (FSDP2's default ``ReduceOp.AVG``, DDP's): with each
rank's loss on its own rows it is the gradient of the mean of the ranks' losses; on rows
replicated on every rank (a ``Replicate`` ``hidden``) it is the exact gradient.

Supported: 1-D meshes; ``weight`` Shard(0) / Shard(1) / Replicate; ``bias`` Shard(0) / Replicate;
``hidden`` Replicate (its local copy is used, its gradient comes back ``Replicate``); ``targets``,
``cu_seqlens``, ``ref_logps`` plain (each rank's own). Anything else is refused with a TypeError
naming the argument and its placement, before any collective. Gathers are collectives: every
rank of the mesh must make the same calls in the same order (forward and backward).

``gathered`` (spin_kernels.distributed) offers the same gather / reduce-scatter to code that is
not one of the ops: ``GatherFull`` (a differentiable gather) and ``regather_in_backward`` (saved
gathered copies swapped for markers, gathered again on unpack).

``torch.distributed.tensor`` is never imported here (it costs seconds): nothing can be a DTensor
before someone else imported it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

_ALLOWED = {
    "weight": "Shard(0), Shard(1) or Replicate",
    "bias": "Shard(0) or Replicate",
    "hidden": "Replicate",
}


def _dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(x: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel parameter)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(x, cls)


def _placement_ok(name: str, placement) -> bool:
    from torch.distributed.tensor import Replicate, Shard

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
    """The device mesh of DTensor ``x``, after checking that its layout is one the ops handle.

    Args:
        name: the argument's name, for the error ("weight", "bias", "hidden", "params[0]").
        x: a DTensor.
        mesh: the mesh other DTensor arguments live on, which ``x`` must share (None: no constraint).

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


def _full(x: Tensor) -> Tensor:
    """The whole tensor of DTensor ``x`` as a plain tensor (an all-gather), without autograd."""
    with torch.no_grad():
        return x.full_tensor()


def _mesh_average(grad: Tensor, mesh, placements) -> Tensor:
    """This rank's contribution to the gradient of a full tensor -> the average over the mesh as a
    DTensor with ``placements`` (reduce-scatter for Shard, all-reduce for Replicate)."""
    from torch.distributed.tensor import DTensor, Partial

    # Divided first, then summed: a Partial (sum) DTensor, redistributed.
    part = DTensor.from_local(grad.contiguous() / mesh.size(), mesh, [Partial()], run_check=False)
    return part.redistribute(mesh, placements)


@dataclass(frozen=True)
class Sharding:
    """Which of an op call's head tensors are DTensors, on which 1-D mesh (``of`` returns None
    when none is: the ops' unsharded path is then untouched)."""

    mesh: object
    weight: tuple | None  # the weight's placements, or None when it is a plain tensor
    bias: tuple | None
    hidden: bool  # hidden is a Replicate DTensor

    @staticmethod
    def of(hidden: Tensor, weight: Tensor, bias: Tensor | None, **plain: Tensor | None) -> Sharding | None:
        """The sharding of ``hidden`` / ``weight`` / ``bias``, checked; None if none is a DTensor.

        Args:
            **plain: the op's other tensor arguments by name (targets, cu_seqlens, ref_logps): each
                rank's own values, which must not be DTensors.

        Raises:
            TypeError: a DTensor among ``plain``, or what ``check_dtensor`` refuses.
        """
        cls = _dtensor_class()
        if cls is None or not any(isinstance(t, cls) for t in (hidden, weight, bias, *plain.values())):
            return None
        if torch.compiler.is_compiling():
            raise NotImplementedError("DTensor arguments to the fused ops are handled in eager mode only; gather "
                                      "the lm_head outside the compiled region (spin_kernels.distributed.gathered)")
        for name, t in plain.items():
            if isinstance(t, cls):
                raise TypeError(f"{name} must be a plain torch.Tensor (this rank's values), got a DTensor with "
                                f"placements {tuple(t.placements)!r}; only weight, bias and a Replicate hidden may "
                                "be DTensors")
        mesh = None
        for name, t in (("weight", weight), ("bias", bias), ("hidden", hidden)):
            if isinstance(t, cls):
                mesh = check_dtensor(name, t, mesh)
        return Sharding(mesh, weight.placements if isinstance(weight, cls) else None,
                        bias.placements if isinstance(bias, cls) else None, isinstance(hidden, cls))

    def full(self, hidden: Tensor | None, weight: Tensor, bias: Tensor | None) -> tuple[Tensor | None, Tensor,
                                                                                           Tensor | None]:
        """Plain tensors for the kernels: weight / bias gathered, hidden's local copy (None stays None)."""
        if self.hidden and hidden is not None:
            hidden = hidden.to_local()
        return (hidden, _full(weight) if self.weight else weight,
                _full(bias) if self.bias is not None and bias is not None else bias)

    def grads(self, dh: Tensor | None, dw: Tensor | None, db: Tensor | None) -> tuple:
        """Gradients of the plain tensors -> gradients of the arguments (DTensors where they were)."""
        from torch.distributed.tensor import DTensor, Replicate

        if self.hidden and dh is not None:
            dh = DTensor.from_local(dh, self.mesh, [Replicate()], run_check=False)
        if self.weight and dw is not None:
            dw = _mesh_average(dw, self.mesh, self.weight)
        if self.bias and db is not None:
            db = _mesh_average(db, self.mesh, self.bias)
        return dh, dw, db


# -- for code that is not one of the ops (spin_kernels.distributed.gathered) ---------------------


class GatherFull(torch.autograd.Function):
    """DTensor -> the full plain tensor; backward: the mesh average, redistributed to its placements."""

    @staticmethod
    def forward(ctx, x):
        ctx.mesh, ctx.placements = x.device_mesh, x.placements
        return x.full_tensor()

    @staticmethod
    def backward(ctx, grad):
        return None if grad is None else _mesh_average(grad, ctx.mesh, ctx.placements)


def gather_full(x: Tensor | None, name: str = "weight", mesh=None) -> Tensor | None:
    """``x`` as a full plain tensor (itself if it is not a DTensor), differentiable through ``GatherFull``.

    Args:
        x: a DTensor (checked with ``check_dtensor``), a plain tensor or None.
        name, mesh: as in ``check_dtensor``.
    """
    if not is_dtensor(x):
        return x
    check_dtensor(name, x, mesh)
    if torch.is_grad_enabled() and x.requires_grad:
        return GatherFull.apply(x)
    return _full(x)


class _Regather:
    """What a saved gathered tensor is packed into: its DTensor source, gathered again on unpack."""

    __slots__ = ("source",)

    def __init__(self, source: Tensor):
        self.source = source.detach()


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


@contextmanager
def regather_in_backward(pairs: list[tuple[Tensor | None, Tensor | None]]) -> Iterator[None]:
    """While active, autograd saves each gathered tensor ``full`` of ``(full, source)`` as a marker
    and all-gathers ``source`` again when the backward needs it, so the full copy lives only during
    the forward call and during the backward, not in between.

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
        return _full(saved.source) if isinstance(saved, _Regather) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
