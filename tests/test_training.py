"""Unit tests of the training layer: config, data, the packed SPIN step, generation (checkpoints:
tests/test_checkpoint.py)."""

from __future__ import annotations

import json

import pytest
import torch

from spin_kernels.demo.task import MarkovTask
from spin_kernels.demo.tiny import demo_tokenizer, save_tiny_model, tiny_llama
from spin_kernels.training.config import ConfigError, DataConfig, SamplingOptions, SpinConfig, config_from_dict
from spin_kernels.training.data import JsonlAppender, load_sft_data, read_jsonl

# --------------------------------------------------------------------------- config


def test_config_yaml_sections_and_types():
    cfg = config_from_dict({"training": {"beta": 1, "optimizer": "adamw", "max_grad_norm": None},
                            "data": {"max_examples": 5}})
    assert cfg.training.beta == 1.0 and isinstance(cfg.training.beta, float)
    assert cfg.training.optimizer == "adamw" and cfg.training.max_grad_norm is None
    assert cfg.data.max_examples == 5
    assert SpinConfig().training.learning_rate == 5e-7  # the paper's defaults stay the defaults


@pytest.mark.parametrize("raw, message", [
    ({"training": {"betta": 0.1}}, "training.betta: unknown field (did you mean 'beta'?)"),
    ({"trainng": {}}, "trainng: unknown field (did you mean 'training'?)"),
    ({"training": {"beta": "high"}}, "training.beta: expected float, got str 'high'"),
    ({"training": {"epochs": 1.5}}, "training.epochs: expected int, got float 1.5"),
    ({"training": {"bf16": "yes"}}, "training.bf16: expected bool"),
    ({"training": {"optimizer": "sgd"}}, "training.optimizer: expected one of 'rmsprop', 'adamw'"),
    ({"training": []}, "training: expected a mapping"),
])
def test_config_errors_name_the_field(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)


def test_config_validate_ranges_and_required():
    with pytest.raises(ConfigError, match="training.beta: must be > 0"):
        config_from_dict({"training": {"beta": 0.0}}).validate()
    with pytest.raises(ConfigError, match="data.max_prompt_length .* must be < data.max_length"):
        config_from_dict({"data": {"max_length": 8, "max_prompt_length": 8}}).validate()
    with pytest.raises(ConfigError, match="model.model: required"):
        SpinConfig().validate(need=("model.model",))


# --------------------------------------------------------------------------- data


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_data_formats(tmp_path):
    rows = [{"prompt": "0a", "real": "abc"}, {"prompt": "1b", "real": "ba"}]
    want = [{"prompt": r["prompt"], "real": r["real"], "index": i} for i, r in enumerate(rows)]
    assert load_sft_data(DataConfig(data=_write_jsonl(tmp_path / "d.jsonl", rows))) == want
    chat = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["real"]}]} for r in rows]
    # chat rows: the prompt is every message before the last assistant turn (the system turn kept)
    want_chat = [{"prompt": m["messages"][:2], "real": r["real"], "index": i} for i, (r, m) in enumerate(zip(rows, chat))]
    assert load_sft_data(DataConfig(data=_write_jsonl(tmp_path / "c.jsonl", chat))) == want_chat
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_sft_data(DataConfig(data=str(tmp_path / "d.parquet"))) == want
    datasets.Dataset.from_list(chat).save_to_disk(str(tmp_path / "ds"))
    assert load_sft_data(DataConfig(data=str(tmp_path / "ds"), max_examples=1)) == want_chat[:1]


def test_data_errors(tmp_path):
    with pytest.raises(ConfigError, match="row 0: needs fields 'prompt' and 'real'"):
        load_sft_data(DataConfig(data=_write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])))
    with pytest.raises(ConfigError, match="unsupported file type"):
        (tmp_path / "d.csv").write_text("a,b\n")
        load_sft_data(DataConfig(data=str(tmp_path / "d.csv")))
    with pytest.raises(ConfigError, match="data.data"):
        load_sft_data(DataConfig(data=str(tmp_path / "missing.jsonl")))


def test_jsonl_torn_tail_is_skipped_and_truncated(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"ind')
    assert [r["index"] for r in read_jsonl(str(path), tolerate_torn_tail=True)] == [0, 1]
    with pytest.raises(ConfigError, match="not valid JSON"):
        list(read_jsonl(str(path)))
    with JsonlAppender(str(path)) as sink:
        sink.write([{"index": 2}])
    assert [r["index"] for r in read_jsonl(str(path))] == [0, 1, 2]


# --------------------------------------------------------------------------- packed step == padded step


def _padded_spin_step(model, examples, beta):
    """The plain reference: right-padded sequences, the model's normal forward, full logits."""
    seqs, starts = [], []
    for ex in examples:
        for resp in (ex.real_ids, ex.synthetic_ids):
            seqs.append(ex.prompt_ids + resp)
            starts.append(len(ex.prompt_ids))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
    seq_logps = torch.stack([
        logp[i, starts[i] - 1:len(s) - 1].gather(-1, torch.tensor(s[starts[i]:]).unsqueeze(-1)).sum()
        for i, s in enumerate(seqs)])
    ref = torch.tensor([v for ex in examples for v in ex.ref_logps], dtype=seq_logps.dtype)
    margin = beta * ((seq_logps[0::2] - ref[0::2]) - (seq_logps[1::2] - ref[1::2]))
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    loss.backward()
    return loss


def test_packed_step_matches_padded_unpacked_step_float64(tmp_path):
    import copy
    import dataclasses

    from spin_kernels.models import prepare_model
    from spin_kernels.packing import tokenize_example
    from packed_step import micro_batches, spin_step

    tok = demo_tokenizer()
    task = MarkovTask()
    rows = task.sample(12, seed=3)
    synth = task.sample(12, seed=4)
    g = torch.Generator().manual_seed(0)
    examples = [dataclasses.replace(
        tokenize_example(tok, r["prompt"], r["real"], s["real"], max_length=64, max_prompt_length=8, index=i),
        # PackedBatch stores ref_logps in float32: use values it holds exactly.
        ref_logps=tuple((torch.randint(-1280, 0, (2,), generator=g) / 64).tolist()))
        for i, (r, s) in enumerate(zip(rows, synth))]
    plain = tiny_llama(len(tok), hidden_size=32, layers=2, intermediate_size=64).double()
    packed = prepare_model(copy.deepcopy(plain))

    # A small token budget splits the global batch into several micro-batches: the pair-weighted
    # accumulation must still give the gradient of the mean over all 12 pairs.
    mbs = micro_batches(examples, list(range(len(examples))), 60, torch.device("cpu"))
    assert len(mbs) >= 3 and sum(mb.num_pairs for mb in mbs) == 12
    loss, metrics = spin_step(packed, mbs, beta=0.3, impl="torch")
    want = _padded_spin_step(plain, examples, beta=0.3)

    assert abs(loss - want.item()) < 1e-12
    grads = dict(packed.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert 0.0 <= metrics["rewards/accuracy"] <= 1.0


# --------------------------------------------------------------------------- generation


def test_generation_is_seeded_batched_and_resumable(tmp_path):
    from transformers import AutoModelForCausalLM

    from spin_kernels.training.generation import generate_synthetic

    path = save_tiny_model(str(tmp_path / "m"))
    model, tok = AutoModelForCausalLM.from_pretrained(path), demo_tokenizer()
    records = [dict(r, index=i) for i, r in enumerate(MarkovTask().sample(10, seed=1))]
    cfg = SamplingOptions(max_new_tokens=6, generation_batch_size=4, generation_seeding="batch")  # the original
    full = generate_synthetic(model, tok, records, cfg, str(tmp_path / "a.jsonl"), max_prompt_length=8, seed=7,
                              model_path=path)
    assert [r["index"] for r in full] == list(range(10))
    assert all(r["synthetic_tokens"] <= 6 and r["finished"] == (r["synthetic_tokens"] < 6 or r["finished"])
               for r in full)

    # An interrupted file: one complete batch, half of the next, and a torn line.
    lines = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b.jsonl").write_text("".join(lines[:6]) + lines[6][:5])
    resumed = generate_synthetic(model, tok, records, cfg, str(tmp_path / "b.jsonl"), max_prompt_length=8, seed=7,
                                 model_path=path)
    assert resumed == full
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 10
    other = generate_synthetic(model, tok, records, cfg, str(tmp_path / "c.jsonl"), max_prompt_length=8, seed=8,
                               model_path=path)
    assert [r["synthetic"] for r in other] != [r["synthetic"] for r in full]


@pytest.mark.parametrize("settings", [
    {"backend": "hf", "generation_order": "length", "generation_token_budget": 50},
    {"generation_batch_size": 3, "generation_chunk_size": 4},
], ids=["sorted-budget", "continuous"])
def test_sorted_and_continuous_generation_resume_to_the_uninterrupted_rows(tmp_path, settings):
    """Per-example seeds: sorted, token-budgeted and continuously batched generation sample the
    same rows as plain batches in file order, an interrupted file resumes to exactly the rows of
    an uninterrupted run, and rows made under other batching settings are sampled again."""
    from transformers import AutoModelForCausalLM

    from spin_kernels.training.generation import generate_synthetic, plan_generation

    path = save_tiny_model(str(tmp_path / "m"))
    model, tok = AutoModelForCausalLM.from_pretrained(path), demo_tokenizer()
    records = [dict(r, index=i) for i, r in enumerate(MarkovTask().sample(10, seed=1))]
    records[3]["prompt"] = records[3]["prompt"] * 3  # prompts of different token lengths
    kwargs = dict(max_prompt_length=8, seed=7, model_path=path)
    cfg = SamplingOptions(max_new_tokens=6, **{"generation_batch_size": 4, **settings})
    plan = plan_generation(records, str(tmp_path / "x.jsonl"), cfg, tokenizer=tok, max_prompt_length=8, seed=7,
                           model_path=path)
    assert plan.batches[0][0]["index"] == 3 and len(plan.batches) > 2  # the longest prompt first; several batches
    full = generate_synthetic(model, tok, records, cfg, str(tmp_path / "a.jsonl"), **kwargs)
    assert [r["index"] for r in full] == list(range(10))
    assert any(r["finished"] for r in full) and any(r["synthetic_tokens"] for r in full)
    plain = generate_synthetic(model, tok, records, SamplingOptions(max_new_tokens=6, generation_batch_size=4,
                                                                     backend="hf", generation_order="input"),
                               str(tmp_path / "plain.jsonl"), **kwargs)
    assert [(r["synthetic"], r["finished"]) for r in full] == [(r["synthetic"], r["finished"]) for r in plain]

    lines = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b.jsonl").write_text("".join(lines[:2] + lines[5:7]) + lines[7][:9])
    resumed = generate_synthetic(model, tok, records, cfg, str(tmp_path / "b.jsonl"), **kwargs)
    assert resumed == full
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()

    # The plain run's rows are the same text, but from other batching settings: not reused.
    (tmp_path / "c.jsonl").write_text((tmp_path / "plain.jsonl").read_text())
    again = plan_generation(records, str(tmp_path / "c.jsonl"), cfg, tokenizer=tok, max_prompt_length=8, seed=7,
                            model_path=path)
    assert len(again.dropped) == 10 and "sampling was" in again.dropped[0][1]


def test_generation_defaults_and_what_rows_record(tmp_path):
    """The default sampler is continuous batching, sorted prompts, per-example seeds and the
    device's slot count; ``--generation-seeding batch`` is the original sampler, whose rows record
    what they always did (rows written before the batching options existed stay current under
    it), and the default's rows record every setting, so the two are never mixed."""
    from spin_kernels.training.provenance import sampling_settings
    from spin_kernels.training.samplers import choose, in_force

    model = save_tiny_model(str(tmp_path / "m"))
    default = in_force(SamplingOptions(), device="cpu", model_path=model, max_prompt_length=512)
    assert (default.backend, default.generation_order, default.generation_seeding, default.generation_batch_size) \
        == ("continuous", "length", "example", 64)
    assert choose(SamplingOptions()).__name__ == "ContinuousSampler"
    assert sampling_settings(default, 7) == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 256, "seed": 7,
                                             "batch_size": 64, "backend": "continuous", "order": "length",
                                             "seeding": "example", "chunk_size": 512}
    original = SamplingOptions(generation_seeding="batch").in_force()
    assert choose(original).__name__ == "HfSampler"
    assert sampling_settings(original, 7) == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 256, "seed": 7,
                                              "batch_size": 16, "backend": "hf"}
    assert SamplingOptions(backend="hf").in_force().generation_batch_size == 16  # hf alone: per-example, sorted
    assert SamplingOptions(backend="hf").in_force().generation_order == "length"
    with pytest.raises(ValueError, match="not in force"):
        sampling_settings(SamplingOptions(), 7)
    with pytest.raises(ConfigError, match="generation.generation_seeding: 'batch' needs backend 'hf'"):
        SamplingOptions(backend="continuous", generation_seeding="batch")
    with pytest.raises(ConfigError, match="generation.generation_seeding: expected one of 'example', 'batch'"):
        SamplingOptions(generation_seeding="auto")


def test_device_slots_follow_the_device_and_the_model():
    """A quarter of the device's memory of slot cache, at most 64 on CPU and 256 on CUDA."""
    from types import SimpleNamespace
    from unittest import mock

    from spin_kernels.training.samplers import device_slots

    llama2_7b = SimpleNamespace(num_attention_heads=32, num_key_value_heads=32, hidden_size=4096, num_hidden_layers=32)
    llama3_8b = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, hidden_size=4096, num_hidden_layers=32,
                                head_dim=128)
    tiny = SimpleNamespace(**{**vars(llama3_8b), "num_hidden_layers": 2})
    with mock.patch("torch.cuda.get_device_properties", return_value=SimpleNamespace(total_memory=80 * 2**30)):
        # 2 x 32 layers x 32 heads x 128 x 768 tokens x 2 bytes = 384 MiB a slot; 20 GiB / 384 MiB = 53
        assert device_slots("cuda", llama2_7b, 768, dtype_bytes=2) == 53
        assert device_slots("cuda", llama3_8b, 768, dtype_bytes=2) == 213
        assert device_slots("cuda", tiny, 768) == 256
        assert device_slots("cuda", llama2_7b, 10**7) == 1
    with mock.patch("os.sysconf", side_effect=lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**23}[name]):
        assert device_slots("cpu", tiny, 768) == 64  # 32 GiB of host memory
        assert device_slots("cpu", llama2_7b, 768) == 10  # fp32: 768 MiB a slot, 8 GiB / 768 MiB


def test_prompt_batches_sort_by_length_and_respect_the_token_budget():
    from spin_kernels.training.generation import prompt_batches

    records = [{"index": i} for i in range(6)]
    lengths = {0: 3, 1: 9, 2: 1, 3: 9, 4: 5, 5: 2}
    cfg = SamplingOptions(max_new_tokens=1, generation_batch_size=3, backend="hf", generation_token_budget=21)
    batches = [[r["index"] for r in b] for b in prompt_batches(records, lengths, cfg)]
    assert batches == [[1, 3], [4, 0, 5], [2]]  # 2 x (9 + 1) <= 21 < 3 x 10; 3 x (5 + 1); longest first
    plain = SamplingOptions(generation_batch_size=4, generation_seeding="batch")
    assert [[r["index"] for r in b] for b in prompt_batches(records, None, plain)] == [[0, 1, 2, 3], [4, 5]]
    chunks = SamplingOptions(generation_batch_size=2, generation_chunk_size=4, generation_order="input")
    assert [[r["index"] for r in b] for b in prompt_batches(records, None, chunks)] == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="batch size is unset"):
        prompt_batches(records, lengths, SamplingOptions())
    with pytest.raises(ValueError, match="need the prompt lengths"):
        prompt_batches(records, None, cfg)


# --------------------------------------------------------------------------- schedule (checkpoints: test_checkpoint.py)


def test_global_batches_cover_each_epoch_once():
    from spin_kernels.training.trainer import global_batches

    steps = global_batches(10, 4, 2, seed=3)
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    epoch0, epoch1 = [i for s in steps[:3] for i in s], [i for s in steps[3:] for i in s]
    assert sorted(epoch0) == list(range(10)) == sorted(epoch1)
    assert steps[:3] != steps[3:]
    assert global_batches(10, 4, 2, seed=3) == steps


def test_gradient_checkpointing_gives_the_same_gradients():
    import copy
    import dataclasses

    from spin_kernels.models import prepare_model
    from spin_kernels.packing import tokenize_example
    from packed_step import micro_batches, spin_step
    from spin_kernels.training.loading import enable_checkpointing

    tok = demo_tokenizer()
    rows = MarkovTask().sample(4, seed=3)
    examples = [dataclasses.replace(tokenize_example(tok, r["prompt"], r["real"], r["real"][::-1] or "a",
                                                     max_length=40, max_prompt_length=8), ref_logps=(-10.0, -12.0))
                for r in rows]
    plain = prepare_model(tiny_llama(len(tok), hidden_size=16, layers=2, intermediate_size=32).double())
    ckpt = copy.deepcopy(plain)
    enable_checkpointing(ckpt)
    ckpt.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    mbs = micro_batches(examples, [0, 1, 2, 3], 1000, torch.device("cpu"))
    a, _ = spin_step(plain, mbs, beta=0.5, impl="torch")
    b, _ = spin_step(ckpt, mbs, beta=0.5, impl="torch")
    assert a == b
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
