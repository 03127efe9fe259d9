"""Input validation for the fused ops: every check runs before any kernel does.

Three checks, each called from one place: the scalar options (``check_head_options``, by
``options.HeadOptions.checked``), the tensors' types, shapes, dtypes and devices
(``check_linear_inputs``, by ``api.py``, before the autograd Function; traceable, so it runs
at trace time under ``torch.compile``), and their values (``check_linear_values``, by the
custom ops' implementations in ``library.py``, where the data is).

Errors name the argument and what was expected. Value checks (target range, cu_seqlens
monotonicity) need one host synchronisation on CUDA; they are batched into a single one, and a
caller whose inputs are known good (its own packer built them) can skip them with
``check_values=False``: then no call on the Triton path waits for the GPU, and a bad value gives
wrong numbers, never an out-of-bounds access (targets are only compared, indices are clamped).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)


def _require_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_head_options(ignore_index: int, temperature: float, softcap: float | None, average: bool, impl: str,
                       check_values: bool) -> None:
    """Scalar options shared by linear_logprobs and linear_spin_loss."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be None or a float, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    if not isinstance(average, bool):
        raise TypeError(f"average must be a bool, got {type(average).__name__}")
    from .backends import known_impls  # here: the registry's modules import the options, which import this

    if impl not in known_impls():
        raise ValueError(f"impl must be one of {known_impls()} (spin_kernels.ops.available_backends), got {impl!r}")
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values must be a bool, got {type(check_values).__name__}")


REDUCTIONS = ("sum", "mean", "none")


def check_flag(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_reduction(reduction: str | None, average: bool) -> None:
    """``linear_logprobs``'s reduction: None (then ``average`` decides) or one of REDUCTIONS,
    "mean" being the only one ``average=True`` agrees with."""
    if reduction is None:
        return
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} (or None: 'mean' if average else 'sum'), "
                         f"got {reduction!r}")
    if average is True and reduction != "mean":
        raise ValueError(f"average=True means reduction='mean'; got reduction={reduction!r} with it")


def check_pairs(pairs: str) -> None:
    """The SPIN ops' pair layout: "interleaved" or "halves" (``layout.pair_order``)."""
    from .layout import PAIR_LAYOUTS

    if pairs not in PAIR_LAYOUTS:
        raise ValueError(f"pairs must be one of {PAIR_LAYOUTS} (interleaved: sequence 2p real, 2p+1 synthetic; "
                         f"halves: real responses first, then the synthetic ones in the same pair order, as TRL "
                         f"and Liger concatenate chosen and rejected), got {pairs!r}")


def check_linear_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    bias: Tensor | None,
    ref_logps: Tensor | None = None,
    spin: bool = False,
) -> None:
    """Types, shapes, dtypes and devices of the packed head inputs (docs/spin-math.md); no
    synchronisation.

    hidden [N, H] floating; weight [V, H] floating; targets [N] int32/int64; cu_seqlens [S+1]
    int32/int64; bias [V] or None; with ``spin`` (the SPIN ops) ref_logps as
    ``check_ref_logps`` says.
    """
    hidden = _require_tensor("hidden", hidden)
    weight = _require_tensor("weight", weight)
    targets = _require_tensor("targets", targets)
    cu_seqlens = _require_tensor("cu_seqlens", cu_seqlens)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"hidden must be float16/bfloat16/float32/float64, got {hidden.dtype}")
    if weight.dtype not in _FLOATS:
        raise TypeError(f"weight must be float16/bfloat16/float32/float64, got {weight.dtype}")
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[1] = {h}, got shape {tuple(weight.shape)}")
    if v == 0:
        raise ValueError("weight must have at least one row (V >= 1), got V = 0")
    if targets.dtype not in _INTS:
        raise TypeError(f"targets must be an int32/int64 tensor, got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be 1-D of length N = hidden.shape[0] = {n}, got shape {tuple(targets.shape)}")
    if cu_seqlens.dtype not in _INTS:
        raise TypeError(f"cu_seqlens must be an int32/int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S+1] with S >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.shape[0] == 1 and n != 0:
        raise ValueError(f"cu_seqlens describes no sequence (shape [1]) but hidden has N = {n} rows")
    for name, t in (("weight", weight), ("targets", targets), ("cu_seqlens", cu_seqlens)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move them to one device")
    if bias is not None:
        bias = _require_tensor("bias", bias)
        if bias.dtype not in _FLOATS:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
        if bias.shape != (v,):
            raise ValueError(f"bias must have shape [V] = [{v}], got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if spin:
        check_ref_logps(ref_logps, cu_seqlens, hidden.device)


def check_linear_values(hidden: Tensor, weight: Tensor, targets: Tensor, cu_seqlens: Tensor, ignore_index: int,
                        ref_logps: Tensor | None = None) -> None:
    """The values of inputs that passed ``check_linear_inputs``, in one host synchronisation:
    targets in [0, V) or ignore_index; 0 = cu[0] <= ... <= cu[S] = N; hidden finite in the
    counted rows (target != ignore_index); ref_logps (the SPIN ops, else None) finite."""
    n, v = hidden.shape[0], weight.shape[0]
    spin = ref_logps is not None
    cu = cu_seqlens.long()
    counted = targets != ignore_index
    bad_target = (counted & ((targets < 0) | (targets >= v))).any()
    bad_start = cu[0] != 0
    bad_end = cu[-1] != n
    no = torch.zeros((), dtype=torch.bool, device=cu.device)
    bad_order = (cu[1:] < cu[:-1]).any() if cu.numel() > 1 else no
    # A row sum is NaN/inf iff the row holds a NaN/inf (float64 sums of finite fp32/bf16 values
    # cannot overflow), and costs an [N] vector instead of an [N, H] mask.
    nonfinite_rows = ~torch.isfinite(hidden.detach().sum(dim=1, dtype=torch.float64))
    bad_hidden = (counted & nonfinite_rows).any()
    bad_ref = ~torch.isfinite(ref_logps).all() if spin and ref_logps.numel() else no
    flags = torch.stack([bad_target, bad_start, bad_end, bad_order, bad_hidden, bad_ref]).tolist()
    if flags[0]:
        bad = targets[counted & ((targets < 0) | (targets >= v))][:5].tolist()
        raise ValueError(f"targets must be in [0, V={v}) or ignore_index={ignore_index}; found {bad}")
    if flags[1]:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu[0])}")
    if flags[2]:
        raise ValueError(f"cu_seqlens must end at N = hidden.shape[0] = {n}, got cu_seqlens[-1] = {int(cu[-1])}")
    if flags[3]:
        raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0)")
    if flags[4]:
        rows = torch.nonzero(counted & nonfinite_rows).flatten()[:5].tolist()
        raise ValueError(f"hidden holds NaN/inf in counted rows (rows with a target), e.g. rows {rows}; the model's "
                         f"activations overflowed or its weights are not finite")
    if flags[5]:
        bad = torch.nonzero(~torch.isfinite(ref_logps)).flatten()[:5].tolist()
        raise ValueError(f"ref_logps must be finite, got NaN/inf at sequences {bad}")


def check_ref_logps(ref_logps: Tensor, cu_seqlens: Tensor, device: torch.device) -> None:
    """SPIN ops: an even number of sequences S = 2P and ref_logps [S] floating on the device."""
    s = cu_seqlens.shape[0] - 1
    if s % 2:
        raise ValueError(
            f"cu_seqlens must describe an even number of sequences (real, synthetic pairs), got S = {s}")
    ref_logps = _require_tensor("ref_logps", ref_logps)
    if not ref_logps.is_floating_point():
        raise TypeError(f"ref_logps must be a floating tensor, got {ref_logps.dtype}")
    if ref_logps.shape != (s,):
        raise ValueError(f"ref_logps must have shape [S] = [{s}], got {tuple(ref_logps.shape)}")
    if ref_logps.device != device:
        raise ValueError(f"ref_logps is on {ref_logps.device} but hidden is on {device}")
