"""A self-contained FSDP2 SPIN run on a tiny random Llama, to check a torchrun set-up.

    torchrun --nproc_per_node 2 -m spin_kernels.demo.fsdp --out runs/fsdp-demo
    torchrun --nproc_per_node 2 -m spin_kernels.demo.fsdp --out runs/fsdp-demo --resume

Each rank generates the synthetic responses of its share of prompts, scores them with the
opponent (the model before training: precomputed reference log-probs), the results are
gathered by example index, then the policy trains a few steps on packed micro-batches, saves a
checkpoint every step (the Checkpointer: torch.distributed.checkpoint, each rank its shards) and
exports a Hugging Face checkpoint at the end. On CPU it uses
gloo and float32; on GPUs nccl and bf16 mixed precision.
"""

from __future__ import annotations

import argparse
import os

import torch


def _tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ..models import prepare_model

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return prepare_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))


def main(argv: list[str] | None = None) -> int:
    from ..models import reference_logps
    from ..packing.batch import pack_batch
    from ..packing.example import SpinExample
    from ..training.checkpoint import Checkpointer, ModelState, OptimizerState
    from ..distributed import (
        apply_fsdp2,
        default_loss_fn,
        export_hf,
        gather_by_index,
        init_distributed,
        shard_indices,
        shutdown,
        train_step,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    env = init_distributed()
    try:
        gpu = env.device.type == "cuda"
        sharded = apply_fsdp2(_tiny_model().to(env.device), mixed_precision="bf16" if gpu else None,
                              activation_checkpointing=True)
        opt = torch.optim.RMSprop(sharded.parameters(), lr=1e-4)

        # Generation + reference scoring on this rank's share; padding repeats are dropped.
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 128, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(args.prompts)]
        idx, num_real = shard_indices(len(prompts), env.rank, env.world_size)
        local = []
        for j, i in enumerate(idx):
            ids = torch.tensor([prompts[i]], device=env.device)
            out = sharded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   min_new_tokens=6, do_sample=True, pad_token_id=0)
            synthetic = out[0, ids.shape[1]:].tolist()
            ex = SpinExample(prompt_ids=prompts[i], real_ids=[5 + i % 7] * 6, synthetic_ids=synthetic, index=i)
            ref = sharded.no_grad(lambda m, b: reference_logps(b, ref_model=m), pack_batch([ex]).to(env.device))
            if j < num_real:
                local.append({"index": i, "synthetic": synthetic, "ref": ref.tolist()})
        data = gather_by_index(local, expected=len(prompts))
        examples = [SpinExample(prompts[r["index"]], [5 + r["index"] % 7] * 6, r["synthetic"], r["ref"], r["index"])
                    for r in data]

        mine = [pack_batch(examples[k:k + 2]).to(env.device) for k in range(2 * env.rank, len(examples),
                                                                            2 * env.world_size)]
        ckpt = Checkpointer({"model": ModelState(sharded), "optimizer": OptimizerState(sharded, opt)}, args.out)
        first = (ckpt.load() if args.resume else 0) + 1
        loss_fn = default_loss_fn(beta=0.1)
        for step in range(first, args.steps + 1):
            res = train_step(sharded, opt, mine, loss_fn=loss_fn, max_grad_norm=1.0)
            ckpt.save(step)
            if env.is_main:
                print(f"step {step}: loss {res.loss:.4f} grad_norm {res.grad_norm:.3f} pairs {res.num_pairs} "
                      f"margin {res.metrics.get('rewards/margin', float('nan')):.4f}", flush=True)
        export_hf(os.path.join(args.out, "hf"), sharded)
        if env.is_main:
            print(f"exported {os.path.join(args.out, 'hf')}")
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
