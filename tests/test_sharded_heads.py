"""Sharded lm_heads with 2 processes (gloo, CPU): DTensor weights straight into the ops,
spin_kernels.distributed.gathered, and the TRL SPINTrainer on an FSDP2 model, against one process
doing the same work.

One spawn of 2 ranks runs every scenario (imports dominate the cost); rank 0 writes what it
measured to a JSON file and the tests below assert on it:
* ``gathered`` around ``linear_spin_loss`` / ``linear_logprobs`` with an FSDP2 ``fully_shard``
  lm_head (V = 97: uneven shards), each rank on its own rows, fp32 and float64: the loss and the
  ``hidden`` gradient equal the unsharded call on that rank's rows, the sharded weight gradient
  (a DTensor with the weight's placement) equals the mean over ranks of the unsharded gradients
  (FSDP2's reduction), and an SGD step on the sharded head equals the one-process step; the
  logprobs backward gathers the weight again instead of keeping it; Shard(1) / Replicate
  (tensor-parallel layouts) too; Partial placements, 2-D meshes and ZeRO-3 parameters are refused;
* the same DTensors passed straight to ``linear_spin_loss``, ``linear_logprobs`` (per sequence,
  and per token with the entropy, both differentiated) and ``LinearSPINLoss``: the same equalities; ``packed_spin_loss`` on an FSDP2 model whose lm_head is
  its own unit, each rank its own micro-batch, then an SGD step: the loss, every gradient and the
  weights equal one process stepping on the mean gradient; a DTensor ``hidden`` other than
  Replicate, DTensor targets, Partial weights and mixed meshes are refused naming the argument,
  and so is the inner model of apply_fsdp2's layout called outside its root;
* TRL: ``SPINTrainer`` on a model sharded with ``fully_shard`` before the trainer sees it
  (``presharded``; accelerate does not run FSDP on CPU), 2 SGD steps of 2 pairs per rank, equals
  the one-process trainer on 4 pairs per step: losses, gradient norms, final weights. Two layouts:
  the lm_head its own FSDP unit (a DTensor when the loss reads it: gathered) with a live sharded
  reference model, and the lm_head tied to the embeddings in the root unit (unsharded by FSDP
  itself after the root's forward) with precomputed reference log-probs; and, without FSDP, the
  model in accelerate's DDP with gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spin_kernels.distributed.env import shutdown
from cases import free_port

WORLD = 2
V, H = 97, 32
TRL_LAYOUTS = {"lm_head-unit": {"tie": False, "reference": "live", "fsdp": True},
               "tied-root": {"tie": True, "reference": "column", "fsdp": True},
               # no FSDP: accelerate's own CPU data parallelism wraps the model in DDP, through which
               # the packed forward runs (gradient checkpointing on, TRL's default)
               "ddp": {"tie": False, "reference": "live", "fsdp": False, "gradient_checkpointing": True}}
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}  # relative to the largest entry


# -- ops under gathered --------------------------------------------------------------------------
def _rank_rows(rank: int, dtype):
    """This rank's packed rows: its own number of pairs and lengths, some prompt rows ignored."""
    g = torch.Generator().manual_seed(100 + rank)
    lengths = torch.randint(3, 9, (2 * (rank + 2),), generator=g)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    n = int(cu[-1])
    targets = torch.randint(0, V, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.3] = -100
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype)
    ref = (-torch.rand(lengths.numel(), generator=g, dtype=torch.float64) * 30).to(dtype)
    seq_weights = torch.randn(lengths.numel(), generator=g, dtype=torch.float64)
    return hidden, targets, cu, ref, seq_weights


def _loss(op, hidden, weight, bias, rows):
    from spin_kernels import linear_logprobs, linear_spin_loss

    _, targets, cu, ref, seq_weights = rows
    if op == "spin":
        return linear_spin_loss(hidden, weight, targets, cu, ref, bias=bias, beta=0.5, impl="torch")[0]
    if op == "tokens":  # per-token log-probs and entropy (RL trainers), both differentiated
        logps, entropy = linear_logprobs(hidden, weight, targets, bias=bias, reduction="none", return_entropy=True,
                                         impl="torch")
        row_weights = torch.linspace(-1.0, 1.0, targets.shape[0], dtype=hidden.dtype)
        return (logps * row_weights).sum() + 0.3 * entropy.sum()
    return (linear_logprobs(hidden, weight, targets, cu, bias=bias, impl="torch") * seq_weights.to(hidden.dtype)).sum()


def _unsharded(op, w0, b0, dtype, scales=(1.0,) * WORLD):
    """Per rank: loss and hidden gradient; the mean of the ranks' weight/bias gradients (of
    ``scales[r]`` times rank r's loss)."""
    out = {"loss": [], "dh": [], "dw": 0, "db": 0}
    for r in range(WORLD):
        rows = _rank_rows(r, dtype)
        hidden = rows[0].clone().requires_grad_(True)
        w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        loss = _loss(op, hidden, w, b, rows)
        (loss * scales[r]).backward()
        out["loss"].append(loss.detach())
        out["dh"].append(hidden.grad)
        out["dw"] = out["dw"] + w.grad / WORLD
        out["db"] = out["db"] + b.grad / WORLD
    return out


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@contextlib.contextmanager
def _full_tensor_calls():
    """Records the shape of every DTensor.full_tensor call (a gather) made inside the block."""
    from torch.distributed.tensor import DTensor

    seen: list[tuple[int, ...]] = []
    original = DTensor.full_tensor

    def recording(self, *a, **k):
        seen.append(tuple(self.shape))
        return original(self, *a, **k)

    DTensor.full_tensor = recording
    try:
        yield seen
    finally:
        DTensor.full_tensor = original


def _gathered_ops(rank: int) -> dict:
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from spin_kernels.distributed import gathered

    report = {}
    for dtype in (torch.float64, torch.float32):
        for op in ("spin", "logprobs"):
            torch.manual_seed(0)
            head = nn.Linear(H, V, bias=True).to(dtype)
            w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
            want = _unsharded(op, w0, b0, dtype)
            fully_shard(head)
            rows = _rank_rows(rank, dtype)
            hidden = rows[0].clone().requires_grad_(True)
            with _full_tensor_calls() as seen:
                with gathered(head.weight, head.bias) as (w, b):
                    assert not isinstance(w, DTensor) and w.shape == (V, H)
                    loss = _loss(op, hidden, w, b, rows)
                forward_gathers = len(seen)
                loss.backward()
                backward_gathers = len(seen) - forward_gathers
            dw, db = head.weight.grad, head.bias.grad
            key = f"{op}-{str(dtype)[6:]}"
            report[key] = {
                "loss": _rel(loss.detach(), want["loss"][rank]),
                "dh": _rel(hidden.grad, want["dh"][rank]),
                "dw": _rel(dw.full_tensor(), want["dw"]),
                "db": _rel(db.full_tensor(), want["db"]),
                "grad_placements": [str(dw.placements), str(db.placements)],
                "local_rows": dw.to_local().shape[0],
                "forward_gathers": forward_gathers, "backward_gathers": backward_gathers,
            }
            # One SGD step on the sharded head equals the step with the mean gradient.
            torch.optim.SGD(head.parameters(), lr=0.5).step()
            report[key]["step"] = max(_rel(head.weight.full_tensor(), w0 - 0.5 * want["dw"]),
                                      _rel(head.bias.full_tensor(), b0 - 0.5 * want["db"]))
            report[key]["moved"] = float((head.weight.full_tensor() - w0).abs().max())
    report["layouts"] = _tensor_parallel_layouts(rank)
    report["refused"] = _refused()
    return report


def _tensor_parallel_layouts(rank: int) -> dict:
    """Shard(1) and Replicate weights (distribute_tensor): same check of the weight gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from spin_kernels.distributed import gathered

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    w0, b0 = torch.randn(V, H, dtype=torch.float64) * 0.2, torch.randn(V, dtype=torch.float64) * 0.1
    want = _unsharded("spin", w0, b0, torch.float64)
    out = {}
    for name, placement in (("shard1", Shard(1)), ("replicate", Replicate())):
        w = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [placement]))
        b = torch.nn.Parameter(distribute_tensor(b0.clone(), mesh, [Replicate()]))
        rows = _rank_rows(rank, torch.float64)
        hidden = rows[0].clone().requires_grad_(True)
        with gathered(w, b) as (fw, fb):
            loss = _loss("spin", hidden, fw, fb, rows)
        loss.backward()
        out[name] = {"dw": _rel(w.grad.full_tensor(), want["dw"]), "db": _rel(b.grad.full_tensor(), want["db"]),
                     "placement": str(w.grad.placements)}
    return out


def _refused() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    from spin_kernels.distributed import gathered

    mesh = init_device_mesh("cpu", (WORLD,))
    mesh2d = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("a", "b"))
    cases = {
        "partial": DTensor.from_local(torch.zeros(V, H), mesh, [Partial()]),
        "2d": DTensor.from_local(torch.zeros(V, H), mesh2d, [Partial(), Partial()]),
    }
    zero3 = torch.nn.Parameter(torch.zeros(0))
    zero3.ds_id = 7  # what DeepSpeed ZeRO-3 attaches to its partitioned parameters
    cases["zero3"] = zero3
    out = {}
    for name, t in cases.items():
        try:
            with gathered(t):
                pass
            out[name] = "accepted"
        except TypeError as exc:
            out[name] = str(exc)
    return out


# -- DTensors straight into the ops ----------------------------------------------------------------
def _direct_ops(rank: int) -> dict:
    """The FSDP2-sharded head's DTensors passed to each op as they are (no gathered block)."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from spin_kernels import LinearSPINLoss

    report = {}
    # "scaled": each rank weights its loss differently (as a trainer weighting ranks by their share
    # of the pairs does): the mesh average must be of the scaled contributions.
    for dtype in (torch.float64, torch.float32):
        for op in ("spin", "logprobs", "tokens", "module", "scaled"):
            scales = (1.0, 3.0) if op == "scaled" else (1.0, 1.0)
            torch.manual_seed(0)
            head = nn.Linear(H, V, bias=True).to(dtype)
            w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
            want = _unsharded(op if op in ("logprobs", "tokens") else "spin", w0, b0, dtype, scales)
            fully_shard(head)
            assert isinstance(head.weight, DTensor)
            rows = _rank_rows(rank, dtype)
            hidden = rows[0].clone().requires_grad_(True)
            with _full_tensor_calls() as seen:
                if op == "module":
                    _, targets, cu, ref, _ = rows
                    loss = LinearSPINLoss(beta=0.5, impl="torch")(hidden, head.weight, targets, cu, ref, head.bias)[0]
                else:
                    loss = _loss("spin" if op == "scaled" else op, hidden, head.weight, head.bias, rows)
                forward_gathers = len(seen)
                (loss * scales[rank]).backward()
                backward_gathers = len(seen) - forward_gathers
            dw, db = head.weight.grad, head.bias.grad
            torch.optim.SGD(head.parameters(), lr=0.5).step()
            report[f"{op}-{str(dtype)[6:]}"] = {
                "loss": _rel(loss.detach(), want["loss"][rank]), "dh": _rel(hidden.grad, want["dh"][rank]),
                "dw": _rel(dw.full_tensor(), want["dw"]), "db": _rel(db.full_tensor(), want["db"]),
                "grad_placements": [str(dw.placements), str(db.placements)],
                "step": max(_rel(head.weight.full_tensor(), w0 - 0.5 * want["dw"]),
                            _rel(head.bias.full_tensor(), b0 - 0.5 * want["db"])),
                "forward_gathers": forward_gathers, "backward_gathers": backward_gathers,
            }
    report["model"] = _sharded_model_step(rank)
    report["refused"] = _direct_refused(rank)
    return report


def _sharded_model_step(rank: int) -> dict:
    """packed_spin_loss on an FSDP2 model whose lm_head is its own unit (a DTensor when the loss
    reads it), each rank its own micro-batch, then one SGD step: equals one process stepping on the
    mean of the ranks' gradients. The model called through apply_fsdp2's inner module is refused."""
    from cases import fsdp_micro_batches, fsdp_tiny_model
    from torch.distributed.fsdp import fully_shard

    from spin_kernels.distributed import apply_fsdp2
    from spin_kernels.models import packed_spin_loss

    lr = 0.5
    batches = fsdp_micro_batches()[:WORLD]
    ref = fsdp_tiny_model(0)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    mean_grads, losses = {}, []
    for b in batches:
        ref.zero_grad(set_to_none=True)
        loss, _ = packed_spin_loss(ref, b, impl="torch")
        loss.backward()
        losses.append(float(loss))
        for n, p in ref.named_parameters():
            mean_grads[n] = mean_grads.get(n, 0) + p.grad / WORLD

    model = fsdp_tiny_model(0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)
    fully_shard(model)
    with _full_tensor_calls() as seen:
        loss, _ = packed_spin_loss(model, batches[rank], impl="torch")
        loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=lr).step()
    weights = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    out = {"loss": abs(float(loss) - losses[rank]) / abs(losses[rank]),
           "grads": max(_rel(grads[n], mean_grads[n]) for n in mean_grads),
           "weights": max(_rel(weights[n], start[n] - lr * mean_grads[n]) for n in start),
           "moved": max(float((weights[n] - start[n]).abs().max()) for n in start),
           "head_gathered": seen.count(tuple(model.lm_head.weight.shape))}
    # apply_fsdp2's layout: the embeddings belong to the ModelRunner root; the inner model alone cannot run.
    sharded = apply_fsdp2(fsdp_tiny_model(0), mixed_precision=None)
    try:
        packed_spin_loss(sharded.model, batches[rank], impl="torch")
        out["outside_root"] = "accepted"
    except ValueError as exc:
        out["outside_root"] = str(exc)
    return out


def _direct_refused(rank: int) -> dict:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from spin_kernels import linear_spin_loss

    mesh = init_device_mesh("cpu", (WORLD,))
    other = DeviceMesh("cpu", list(reversed(range(WORLD))))
    hidden, targets, cu, ref, _ = _rank_rows(rank, torch.float64)
    w = torch.randn(V, H, dtype=torch.float64)
    cases = {
        "hidden_shard": dict(hidden=distribute_tensor(hidden[:8].clone(), mesh, [Shard(0)]), weight=w,
                             targets=targets[:8], cu=torch.tensor([0, 4, 8], dtype=torch.int32), ref=ref[:2]),
        "targets_dtensor": dict(hidden=hidden, weight=distribute_tensor(w, mesh, [Shard(0)]),
                                targets=distribute_tensor(targets, mesh, [Replicate()]), cu=cu, ref=ref),
        "weight_partial": dict(hidden=hidden, weight=DTensor.from_local(w, mesh, [Partial()]), targets=targets,
                               cu=cu, ref=ref),
        "meshes_differ": dict(hidden=hidden, weight=distribute_tensor(w, mesh, [Shard(0)]), targets=targets, cu=cu,
                              ref=ref, bias=distribute_tensor(torch.zeros(V, dtype=torch.float64), other, [Shard(0)])),
    }
    out = {}
    for name, c in cases.items():
        try:
            linear_spin_loss(c["hidden"], c["weight"], c["targets"], c["cu"], c["ref"], bias=c.get("bias"),
                             impl="torch")
            out[name] = "accepted"
        except TypeError as exc:
            out[name] = str(exc)
    return out


# -- TRL -----------------------------------------------------------------------------------------
def _trl_args(out: str, per_device: int, **extra):
    from trl_setup import dpo_config

    # SGD: Adam's normalisation turns rounding-level differences of near-zero gradients into whole
    # steps (tests/test_trl_trainer.py); the clipping (norms ~80 > 1) is active.
    return dpo_config(out, per_device_train_batch_size=per_device, max_steps=2, optim="sgd", learning_rate=0.05,
                      lr_scheduler_type="constant", max_grad_norm=1.0, **extra)


def _trl_rows(reference: str) -> list[dict]:
    from trl_setup import spin_rows

    rows = spin_rows(8)
    if reference == "column":
        for i, r in enumerate(rows):
            r["ref_logps"] = [-300.0 - 5 * i, -250.0 + 3 * i]
    return rows


def _trl_run(layout: str, out: str, *, sharded: bool) -> dict:
    """One SPINTrainer run; on 2 ranks with the model (and live reference) sharded by fully_shard."""
    from datasets import Dataset
    from torch.distributed.fsdp import fully_shard
    from trl_setup import policy_and_reference, tokenizer

    from spin_kernels.integrations.trl import SPINTrainer, presharded
    from spin_kernels.models import prepare_model

    spec = TRL_LAYOUTS[layout]
    tok = tokenizer()
    policy, ref = policy_and_reference(tok)
    if spec["tie"]:
        policy.config.tie_word_embeddings = True
        policy.lm_head.weight = policy.model.embed_tokens.weight
    ref_model = copy.deepcopy(policy if spec["tie"] else ref) if spec["reference"] == "live" else None
    extra = {"precompute_ref_log_probs": spec["reference"] == "column",
             "gradient_checkpointing": spec.get("gradient_checkpointing", False)}

    def shard(model, own_head: bool):
        prepare_model(model)
        for layer in model.model.layers:
            fully_shard(layer)
        if own_head:
            fully_shard(model.lm_head)
        fully_shard(model)
        return model

    import spin_kernels.distributed.full_params as gathered_module
    from spin_kernels.ops.sharded import is_dtensor

    gather_full, dtensor_gathers = gathered_module.gather_full, []

    def counting_gather(x, *a, **k):  # how often a loss or reference pass met a still-sharded lm_head
        dtensor_gathers.append(is_dtensor(x))
        return gather_full(x, *a, **k)

    gathered_module.gather_full = counting_gather
    if sharded and spec["fsdp"]:
        shard(policy, not spec["tie"])
        presharded(policy)
        if ref_model is not None:
            shard(ref_model.requires_grad_(False), True)
    trainer = SPINTrainer(model=policy, ref_model=ref_model, args=_trl_args(out, 2 if sharded else 4, **extra),
                          train_dataset=Dataset.from_list(_trl_rows(spec["reference"])), processing_class=tok,
                          impl="torch")
    try:
        trainer.train()
    finally:
        gathered_module.gather_full = gather_full
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in policy.named_parameters()}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"loss": [h["loss"] for h in logs], "grad_norm": [h["grad_norm"] for h in logs],
            "margins": [h["rewards/margins"] for h in logs], "weights": full,
            "dtensor_gathers": sum(dtensor_gathers),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "wrapper": type(trainer.model_wrapped).__name__}


# -- the spawn -----------------------------------------------------------------------------------
def _worker(rank: int, port: int, tmp: str, part: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        if part == "ops":
            report = {"gathered": _gathered_ops(rank), "direct": _direct_ops(rank)}
        else:
            report = {}
            for layout in TRL_LAYOUTS:
                run = _trl_run(layout, os.path.join(tmp, f"trl-{layout}-{rank}"), sharded=True)
                if rank == 0:
                    torch.save(run.pop("weights"), os.path.join(tmp, f"weights-{layout}.pt"))
                report[f"trl-{layout}"] = {k: v for k, v in run.items() if k != "weights"}
        if rank == 0:
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report, f)
        dist.barrier()
    finally:
        shutdown()


def _spawn(tmp_path_factory, part: str) -> dict:
    tmp = str(tmp_path_factory.mktemp(f"sharded-{part}"))
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(free_port(), tmp, part), nprocs=WORLD, join=True)
    print(f"2-rank {part} scenarios took {time.perf_counter() - t0:.1f} s")
    with open(os.path.join(tmp, "report.json")) as f:
        r = json.load(f)
    r["tmp"] = tmp
    return r


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The ops scenarios (gathered, DTensors straight into the ops, the sharded model's step)."""
    return _spawn(tmp_path_factory, "ops")


@pytest.fixture(scope="module")
def trl_report(tmp_path_factory):
    pytest.importorskip("trl")
    return _spawn(tmp_path_factory, "trl")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("op", ["spin", "logprobs"])
def test_gathered_fsdp2_head_equals_unsharded(report, op, dtype):
    r = report["gathered"][f"{op}-{dtype}"]
    print(r)
    tol = TOL[getattr(torch, dtype)]
    for k in ("loss", "dh", "dw", "db", "step"):
        assert r[k] <= tol, (k, r)
    assert r["moved"] > 1e-2  # the compared step is not a no-op
    assert r["grad_placements"] == ["(Shard(dim=0),)", "(Shard(dim=0),)"]
    assert r["local_rows"] == 49  # 97 rows over 2 ranks: rank 0 holds ceil(97 / 2)
    assert r["forward_gathers"] == 2  # weight and bias, once each
    # linear_logprobs recomputes in backward: it gathers weight and bias again (the full copies
    # were not kept between forward and backward); the SPIN loss computes its gradients in the forward.
    assert r["backward_gathers"] == (2 if op == "logprobs" else 0), r


def test_gathered_tensor_parallel_layouts(report):
    r = report["gathered"]["layouts"]
    assert r["shard1"]["placement"] == "(Shard(dim=1),)" and r["replicate"]["placement"] == "(Replicate(),)"
    for layout in ("shard1", "replicate"):
        assert r[layout]["dw"] <= 1e-12 and r[layout]["db"] <= 1e-12, r


def test_gathered_refuses_what_it_cannot_handle(report):
    r = report["gathered"]["refused"]
    assert "placement Partial" in r["partial"] and "params[0]" in r["partial"], r
    assert "2-D device mesh" in r["2d"], r
    assert "ZeRO-3" in r["zero3"] and "GatheredParameters" in r["zero3"], r


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("op", ["spin", "logprobs", "tokens", "module", "scaled"])
def test_dtensor_weight_straight_into_the_ops_equals_unsharded(report, op, dtype):
    r = report["direct"][f"{op}-{dtype}"]
    print(r)
    tol = TOL[getattr(torch, dtype)]
    for k in ("loss", "dh", "dw", "db", "step"):
        assert r[k] <= tol, (k, r)
    assert r["grad_placements"] == ["(Shard(dim=0),)", "(Shard(dim=0),)"]
    assert r["forward_gathers"] == 2, r  # weight and bias, once each
    # The logprobs op saved the shards, not the gathered copies: its backward gathers again.
    assert r["backward_gathers"] == (2 if op in ("logprobs", "tokens") else 0), r


def test_packed_spin_loss_on_an_fsdp2_model_step_equals_one_process(report):
    r = report["direct"]["model"]
    print(r)
    assert r["head_gathered"] >= 1, r  # the loss met the lm_head as a DTensor and gathered it
    assert r["loss"] <= 1e-6 and r["grads"] <= 1e-5 and r["weights"] <= 1e-6, r
    assert r["moved"] > 1e-2, r
    assert "outside_root" in r and "sharded(packed_spin_loss, batch)" in r["outside_root"], r


def test_dtensor_inputs_the_ops_do_not_handle_are_refused(report):
    r = report["direct"]["refused"]
    assert "hidden is a DTensor with placement Shard(dim=0)" in r["hidden_shard"], r
    assert "targets must be a plain torch.Tensor" in r["targets_dtensor"], r
    assert "weight is a DTensor with placement Partial(sum)" in r["weight_partial"], r
    assert "bias is a DTensor on device mesh" in r["meshes_differ"] and "share one mesh" in r["meshes_differ"], r


@pytest.mark.slow  # ~90 s on the 2-core machine: 2 ranks x 2 trainers, then the one-process runs
@pytest.mark.parametrize("layout", list(TRL_LAYOUTS))
def test_trl_spin_trainer_on_fsdp2_equals_one_process(trl_report, tmp_path, layout):
    report = trl_report
    got = report[f"trl-{layout}"]
    want = _trl_run(layout, str(tmp_path), sharded=False)
    print(layout, got, {k: v for k, v in want.items() if k != "weights"})
    assert got["distributed_type"] == "DistributedType.MULTI_CPU"
    # lm_head its own FSDP unit: resharded after its (zero-row) forward, so every loss and live
    # reference pass gathers a DTensor (2 steps x (policy + reference) weight gathers); tied in the
    # root: FSDP keeps the root unsharded from its forward to its backward, nothing to gather.
    spec = TRL_LAYOUTS[layout]
    assert got["dtensor_gathers"] == (4 if spec["fsdp"] and not spec["tie"] else 0), got
    assert got["wrapper"] == ("DistributedDataParallel" if not spec["fsdp"] else "FSDPLlamaForCausalLM"), got
    assert want["dtensor_gathers"] == 0
    assert len(got["loss"]) == len(want["loss"]) == 2
    # fp32: the gradients of this setting agree to ~1e-5 relative (as TRL's own against ours)
    for k in ("loss", "grad_norm", "margins"):
        for a, b in zip(got[k], want[k]):
            assert abs(a - b) <= 5e-5 * max(abs(b), 1.0), (k, got[k], want[k])
    weights = torch.load(os.path.join(report["tmp"], f"weights-{layout}.pt"))
    start = policy_start(layout)
    moved = max(float((want["weights"][k] - start[k]).abs().max()) for k in start)
    diff = max(float((weights[k] - want["weights"][k]).abs().max()) for k in start)
    print({"moved": moved, "weights_abs": diff})
    assert moved > 1e-3 and diff <= 1e-4 * moved, (moved, diff)


def policy_start(layout: str) -> dict:
    from trl_setup import policy_and_reference, tokenizer

    policy, _ = policy_and_reference(tokenizer())
    if TRL_LAYOUTS[layout]["tie"]:
        policy.lm_head.weight = policy.model.embed_tokens.weight
    return {n: p.detach() for n, p in policy.named_parameters()}
