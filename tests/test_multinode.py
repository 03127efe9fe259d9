"""The SPIN loop as two torchrun "nodes" on one host, against one node with two processes.

Two ``torchrun`` launchers, each ``--nnodes 2 --nproc_per_node 1``, meet through a c10d rendezvous
on localhost (the way nodes of a cluster meet at the head node's address: docs/scaling.md), one
process each, gloo on CPU. The run must write the same generated responses, the same reference
log-probs and the same final weights as ``torchrun --nproc_per_node 2`` (one node, two processes):
what a rank computes depends on its rank and the world size, not on which launcher started it.
Both launchers share the output directory (on a cluster: a shared filesystem; rank 0 writes).
What this does not run: two machines, NCCL, InfiniBand, a SLURM allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from cases import free_port, tiny_model_and_data

ARGS = ["iterate", "--iterations", "1", "--global-batch-pairs", "8", "--token-budget", "120", "--device", "cpu",
        "--generation-batch-size", "5", "--max-length", "40", "--max-prompt-length", "8", "--max-new-tokens", "12",
        "--learning-rate", "1e-3", "--epochs", "1", "--save-every", "0"]
TIMEOUT = 600


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spin-multinode")
    model, data = tiny_model_and_data(tmp, rows=21, seed=3, layers=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return tmp, [*ARGS, "--model", model, "--data", data], env


def _launcher(*launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "spin_kernels.cli"]


def _one_node(args, env, out):
    cmd = [*_launcher("--nproc_per_node", "2", "--master_port", str(free_port())), *args, "--output-dir", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]


def _two_nodes(args, env, out):
    """Two launchers, as two nodes would start them (``srun`` runs the same line once per node)."""
    endpoint = f"127.0.0.1:{free_port()}"
    launch = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
              "--rdzv-id", "spin-multinode-test")
    cmd = [*_launcher(*launch), *args, "--output-dir", str(out)]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(nodes, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_two_nodes_match_one_node_with_two_processes(setup):
    tmp, args, env = setup
    one, two = tmp / "one-node", tmp / "two-nodes"
    _one_node(args, env, one)
    outputs = _two_nodes(args, env, two)
    # Exactly one launcher's process was rank 0 (it prints the summary and writes the files).
    assert sum(out.count("SPIN after iteration 0") for out, _ in outputs) == 1
    for name in ("generated.jsonl", "pairs.jsonl"):
        assert (two / "iter0" / name).read_text() == (one / "iter0" / name).read_text(), name
    m1 = [json.loads(line) for line in (one / "iter0" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (two / "iter0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in m2] == [r["loss"] for r in m1] and len(m1) == 3
    a, b = _weights(one / "iter0" / "model"), _weights(two / "iter0" / "model")
    assert a.keys() == b.keys()
    for k in a:  # the same world size and ranks: the same floats
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    start = _weights(tmp / "sft")
    assert any(not torch.equal(a[k], start[k]) for k in a), "training did not move the weights"
