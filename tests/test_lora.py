"""LoRA SPIN (spin_kernels/training/lora.py): adapters on a frozen base in the trainer and the loop,
the adapter-disabled reference, the merged opponent, resume (2 processes: test_training_distributed)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from spin_kernels.cli import main
from spin_kernels.demo.task import MarkovTask
from spin_kernels.demo.tiny import demo_tokenizer, save_tiny_model, tiny_llama
from spin_kernels.training.config import ConfigError, TrainingConfig

FLAGS = ["--device", "cpu", "--max-length", "40", "--max-prompt-length", "8", "--max-new-tokens", "12",
         "--learning-rate", "1e-3", "--optimizer", "adamw", "--epochs", "1", "--global-batch-pairs", "4",
         "--generation-batch-size", "4", "--lora-rank", "4", "--lora-alpha", "8"]


def _data(tmp_path, n=12):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MarkovTask().sample(n, seed=1)))
    return str(path)


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_adapters_target_the_decoder_linears_and_never_the_head():
    from spin_kernels.training.lora import add_adapters, default_targets

    model = tiny_llama(20, hidden_size=16, layers=1, intermediate_size=32)
    assert default_targets(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft = add_adapters(copy.deepcopy(model), TrainingConfig(lora_rank=2))
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable) and len(trainable) == 14
    with pytest.raises(ConfigError, match="'lm_head' is the lm_head; it stays frozen"):
        add_adapters(copy.deepcopy(model), TrainingConfig(lora_rank=2, lora_targets=["q_proj", "lm_head"]))
    with pytest.raises(ConfigError, match=r"training.lora_targets: \['qkv'\] are not linear maps"):
        add_adapters(copy.deepcopy(model), TrainingConfig(lora_rank=2, lora_targets=["qkv"]))
    # seeded: the same adapters in another process or after a restart; another seed, others
    again = add_adapters(copy.deepcopy(model), TrainingConfig(lora_rank=2))
    other = add_adapters(copy.deepcopy(model), TrainingConfig(lora_rank=2, seed=7))
    a = dict(peft.named_parameters())
    assert all(torch.equal(p, a[n]) for n, p in again.named_parameters())
    assert any(not torch.equal(p, a[n]) for n, p in other.named_parameters() if ".lora_A." in n)


def test_merge_equals_peft_merge_and_unload():
    from spin_kernels.training.lora import add_adapters, merged_state_dict

    model = add_adapters(tiny_llama(20, hidden_size=16, layers=2, intermediate_size=32).double(),
                         TrainingConfig(lora_rank=3, lora_alpha=6.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    mine = merged_state_dict(model.state_dict(), 6.0 / 3)
    theirs = model.merge_and_unload().state_dict()
    assert mine.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-12, atol=1e-12, msg=k)


def test_the_lora_reference_is_the_frozen_opponent():
    """The policy with its adapter disabled scores exactly like a frozen copy of the base (float64),
    also after the adapters were trained (B != 0)."""
    from spin_kernels.models import prepare_model, reference_logps
    from spin_kernels.packing import pack_batch, tokenize_example
    from spin_kernels.training.lora import add_adapters

    tok = demo_tokenizer()
    base = tiny_llama(len(tok), hidden_size=16, layers=2, intermediate_size=32).double()
    frozen = prepare_model(copy.deepcopy(base)).requires_grad_(False)
    policy = prepare_model(add_adapters(base, TrainingConfig(lora_rank=4)))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    rows = MarkovTask().sample(4, seed=5)
    batch = pack_batch([tokenize_example(tok, r["prompt"], r["real"], r["real"][::-1] or "a", max_length=40,
                                         max_prompt_length=8, index=i) for i, r in enumerate(rows)])
    ref = reference_logps(batch, policy=policy, impl="torch")
    want = reference_logps(batch, ref_model=frozen, impl="torch")
    assert torch.equal(ref, want)
    live = reference_logps(batch, ref_model=policy, impl="torch")  # the adapted policy itself differs
    assert not torch.allclose(live, want)


def test_lora_iterations_merge_into_full_checkpoints(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = save_tiny_model(str(tmp_path / "sft"), layers=2)
    run = tmp_path / "run"
    assert main(["iterate", "--model", model, "--data", _data(tmp_path), "--output-dir", str(run), "--iterations",
                 "2", *FLAGS]) == 0
    sft = _weights(model)
    for t in range(2):
        it = run / f"iter{t}" / "model"
        merged = AutoModelForCausalLM.from_pretrained(str(it))  # an ordinary HF checkpoint: the next opponent
        weights = _weights(it)
        changed = sorted(k for k in sft if not torch.equal(weights[k], sft[k]))
        assert changed and all(k.endswith(("_proj.weight",)) for k in changed)  # only the adapted linear maps
        assert (it / "adapter" / "adapter_config.json").exists()
        if t == 0:  # base + adapter through peft = the merged checkpoint
            base = AutoModelForCausalLM.from_pretrained(model)
            again = PeftModel.from_pretrained(base, str(it / "adapter")).merge_and_unload()
            for k, v in again.state_dict().items():
                torch.testing.assert_close(v, merged.state_dict()[k], rtol=1e-6, atol=1e-7, msg=k)
        pairs = [json.loads(line) for line in open(run / f"iter{t}" / "pairs.jsonl")]
        assert all(len(p["ref_logps"]) == 2 for p in pairs)
    first = json.loads((run / "iter0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = opponent at the start: B = 0


def test_lora_kill_and_resume_is_bit_equal(tmp_path):
    model = save_tiny_model(str(tmp_path / "sft"), layers=2)
    args = ["iterate", "--model", model, "--data", _data(tmp_path), "--iterations", "2", "--save-every", "1", *FLAGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "spin_kernels.cli", *args]
    ref = subprocess.Popen([*cmd, "--output-dir", str(tmp_path / "ref")], env=env, stderr=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, text=True)
    run = tmp_path / "run"
    proc = subprocess.Popen([*cmd, "--output-dir", str(run)], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    ckpts = run / "iter1" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (ckpts / "index.json").exists():  # a complete step checkpoint
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from torch.distributed.checkpoint import FileSystemReader

    saved = json.loads((ckpts / "index.json").read_text())["dir"]
    names = [k for k in FileSystemReader(str(ckpts / saved)).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert names and all(".lora_" in k for k in names), names  # the adapters only: the base is the starting model
    res = subprocess.run([*cmd, "--output-dir", str(run), "--resume"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    for t in range(2):
        a, b = _weights(run / f"iter{t}" / "model"), _weights(tmp_path / "ref" / f"iter{t}" / "model")
        assert all(torch.equal(a[k], b[k]) for k in b), t


def test_lora_allows_a_bf16_base_and_refuses_fp16(capsys, tmp_path):
    from spin_kernels.training.config import SpinConfig

    cfg = SpinConfig()
    cfg.model.dtype, cfg.training.lora_rank = "bfloat16", 8
    cfg.check_trainable()  # frozen bf16 base, float32 adapters
    cfg.model.dtype = "float16"
    with pytest.raises(ConfigError, match="model.dtype: float16 weights cannot be trained"):
        cfg.check_trainable()


def test_qlora_on_a_4bit_base_merges_into_the_trained_policy(tmp_path, capsys):
    """QLoRA (bitsandbytes NF4 base, CPU): the merged full-precision checkpoint is the dequantized base plus
    the trained adapters (exactly), computes what the trained policy (4-bit base + adapter) computes (up to
    bitsandbytes' own rounding on CPU), and carries no quantization config."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = save_tiny_model(str(tmp_path / "sft"), layers=2, hidden_size=128)  # bnb's 4-bit blocks need H >= 64
    run = tmp_path / "run"
    assert main(["iterate", "--model", model, "--data", _data(tmp_path), "--output-dir", str(run), "--iterations",
                 "1", "--quantize", "nf4", *FLAGS]) == 0
    out = run / "iter0" / "model"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(model, quantization_config=q, device_map="cpu")
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    weights, scale = _weights(out), 8 / 4  # --lora-alpha 8, --lora-rank 4
    for name, module in quantized.named_modules():
        w = getattr(module, "weight", None)
        if getattr(w, "quant_state", None) is None:
            continue
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        want = dequantize_4bit(w.data, w.quant_state) + scale * b @ a
        torch.testing.assert_close(weights[f"{name}.weight"], want, rtol=1e-6, atol=1e-6, msg=name)
    policy = PeftModel.from_pretrained(quantized, str(out / "adapter"))
    ids = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, policy(input_ids=ids).logits
    assert (a - b).abs().max() <= 0.05 * b.abs().max()  # bitsandbytes' CPU kernel rounds like bf16
    # refused: a 4-bit base without adapters
    assert main(["iterate", "--model", model, "--data", _data(tmp_path), "--output-dir", str(tmp_path / "r2"),
                 "--quantize", "nf4", "--device", "cpu"]) == 2
    assert "training.quantize: a 4-bit base is frozen, so it needs LoRA adapters" in capsys.readouterr().err


def test_qlora_gradients_after_generation_equal_a_dequantized_copy():
    """The loop generates (an inference forward) before it trains: the 4-bit base must still pass
    gradients (bitsandbytes' CPU repacking would cut them) and equal those of its dequantized copy."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    from spin_kernels.distributed import DistEnv
    from spin_kernels.training.config import SpinConfig
    from spin_kernels.training.lora import add_adapters
    from spin_kernels.training.loading import Loader
    from spin_kernels.training.parallel import Session

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_model(os.path.join(tmp, "sft"), layers=2, hidden_size=128)
        cfg = SpinConfig()
        cfg.model.device, cfg.training.lora_rank, cfg.training.quantize = "cpu", 4, "nf4"
        cpu = torch.device("cpu")
        policy = Loader(cfg, Session(False, cpu, DistEnv(0, 1, 0, cpu))).runner(path).model
        plain = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if getattr(p, "quant_state", None) is not None:
                plain.get_parameter(name.removeprefix("base_model.model.").replace(".base_layer.", ".")).copy_(
                    dequantize_4bit(p.data, p.quant_state))
    plain = add_adapters(plain, cfg.training)
    for (n, a), b in zip(policy.named_parameters(), plain.parameters()):
        if ".lora_B." in n:
            with torch.no_grad():
                a.normal_(generator=torch.Generator().manual_seed(1))
                b.copy_(a)
    ids = torch.randint(0, 20, (1, 16), generator=torch.Generator().manual_seed(0))
    policy.eval()
    with torch.no_grad():  # as generation does
        policy(input_ids=ids[:, :4])
    policy.train()
    for m in (policy, plain):
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in policy.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            scale = grads[n].abs().max()
            assert (p.grad - grads[n]).abs().max() <= 0.02 * scale, n

