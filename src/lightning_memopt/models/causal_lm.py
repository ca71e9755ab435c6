"""``CausalLM``: a LightningModule that pre-trains (or fine-tunes) a causal language model.

The optimizer is an ``OptimizerCallable`` built in ``configure_optimizers``, after any
sharding strategy has wrapped the model, so it always holds the parameters that train. (The
LightningCLI's own top-level ``optimizer:`` key builds it from the unsharded parameters at
start-up: under FSDP2 such an optimizer trains nothing, so our CLI refuses it.)

Example:
    >>> from functools import partial
    >>> from lightning.pytorch import Trainer
    >>> from lightning_memopt.data import TextDataModule
    >>> from lightning_memopt.models import CausalLM
    >>> from lightning_memopt.optim import APOLLOMini
    >>> lm = CausalLM("tiny", optimizer=partial(APOLLOMini, lr=1e-2))
    >>> trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False)
    >>> trainer.fit(lm, TextDataModule(tokenizer="byte", max_chars=50_000))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lightning_memopt.layers import last_model_loss, use_chunked_loss
from lightning_memopt.optim import APOLLOMini, apollo_param_groups, create_optimizer, get_optimizer_spec

from .llama import LLAMA_SIZES, PAPER_VOCAB_SIZE, build_llama

# Decoders whose logits are ``lm_head(last_hidden_state)`` (no extra transform, scaling or
# soft-capping): the ones CausalLM(loss_chunk_size=...) can compute chunk by chunk.
CHUNKED_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class WarmupCosineLR(LambdaLR):
    """Linear warm-up to the base LR, then cosine decay to ``min_lr_ratio`` of it: the schedule
    of the APOLLO paper's pre-training runs (10% warm-up, decay to 10%). Stepped once per
    optimizer step.

    Args:
        total_steps: optimizer steps of the whole run. ``None``: :class:`CausalLM` fills in the
            trainer's (``max_steps``, or what the epochs amount to) before the first step.
        warmup_steps: steps of linear warm-up, or a fraction (< 1) of ``total_steps``.
        min_lr_ratio: the final LR as a fraction of the base LR.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = WarmupCosineLR(opt, total_steps=100, warmup_steps=0.1)
        >>> lrs = []
        >>> for _ in range(100):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3)); opt.step(); sched.step()
        >>> lrs[0], lrs[10], lrs[-1]
        (0.0, 1.0, 0.1)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_steps: int | float = 0,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0 or (isinstance(warmup_steps, float) and warmup_steps >= 1):
            raise ValueError(
                f"WarmupCosineLR: warmup_steps={warmup_steps} must be a step count (int) or a fraction in [0, 1)."
            )
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        if total_steps is not None:
            self.set_total_steps(total_steps)
        super().__init__(optimizer, self._factor, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length (what ``total_steps=None`` leaves open).

        Example:
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            >>> WarmupCosineLR(opt, warmup_steps=0.1).set_total_steps(50)
        """
        warmup = self._warmup(total_steps)
        if total_steps <= 0 or warmup >= total_steps:
            raise ValueError(
                f"WarmupCosineLR needs 0 <= warmup_steps < total_steps, got warmup_steps={warmup}, "
                f"total_steps={total_steps}."
            )
        self.total_steps = total_steps

    def _warmup(self, total_steps: int) -> int:
        if isinstance(self.warmup_steps, float):
            return round(self.warmup_steps * total_steps)
        return self.warmup_steps

    def _factor(self, step: int) -> float:
        if self.total_steps is None:
            # Only the initial LR is computed before CausalLM fills in total_steps.
            if step:
                raise RuntimeError("WarmupCosineLR(total_steps=None) stepped before set_total_steps() was called.")
            return 0.0 if self.warmup_steps else 1.0
        warmup = self._warmup(self.total_steps)
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - 1 - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_model_name(name: str) -> None:
    """Raise a ``ValueError`` naming the field unless ``name`` is a LLaMA size or an existing folder.

    Example:
        >>> check_model_name("60m")
    """
    if name.lower() not in LLAMA_SIZES and not Path(name).expanduser().is_dir():
        raise ValueError(
            f"model.model_name={name!r} is neither a LLaMA size ({', '.join(LLAMA_SIZES)}) nor a local folder "
            "holding a Hugging Face checkpoint (config.json + weights). No model hub is reached."
        )


def _probe_groups() -> list[dict[str, Any]]:
    # One matrix for the low-rank group, one vector for the rest: enough for an optimizer's
    # constructor to check its options.
    return [
        {"params": [nn.Parameter(torch.zeros(8, 8))], "low_rank": True},
        {"params": [nn.Parameter(torch.zeros(8))], "low_rank": False},
    ]


def check_optimizer(optimizer: Any) -> None:
    """Raise a ``ValueError`` naming the field if ``optimizer`` (a registry name or an
    ``OptimizerCallable``) cannot build an optimizer: an unknown name lists the valid ones, a
    bad option value says what the optimizer refused. It is built once on two tiny tensors.

    Example:
        >>> check_optimizer("apollo")
        >>> check_optimizer("apolo")
        Traceback (most recent call last):
        ...
        ValueError: model.optimizer='apolo': unknown optimizer name 'apolo'; registered names: ...
    """
    if isinstance(optimizer, str):
        try:
            spec = get_optimizer_spec(optimizer)
        except ValueError as err:
            raise ValueError(
                f"model.optimizer={optimizer!r}: {err} Or a class: APOLLO, APOLLOMini, torch.optim.AdamW, ..."
            ) from None
        if spec.layerwise:
            raise ValueError(
                f"model.optimizer={optimizer!r} asks for layer-wise updates, which a callback drives in Lightning: "
                f"use optimizer {optimizer.removesuffix('_layerwise')!r} with "
                "--config callbacks/layerwise_updates.yaml."
            )
        build: Callable[..., Any] = lambda groups: create_optimizer(optimizer, groups)  # noqa: E731
    elif callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        build = optimizer
    else:
        return  # configure_optimizers reports the wrong type with the fix
    try:
        build(_probe_groups())
    except (ValueError, TypeError) as err:
        # The optimizer's own message names it and the bad value.
        raise ValueError(f"model.optimizer: {err}") from None


def build_causal_lm(name: str, vocab_size: int | None = None, overrides: dict[str, Any] | None = None) -> nn.Module:
    """A causal LM from a LLaMA size name (:data:`~lightning_memopt.models.LLAMA_SIZES`) or a
    local Hugging Face checkpoint folder (loaded offline with ``AutoModelForCausalLM``).

    ``overrides`` are ``LlamaConfig`` fields for a size name, or ``from_pretrained`` keyword
    arguments (config fields among them) for a folder.

    Raises:
        ValueError: for a name that is neither a known size nor an existing folder.

    Example:
        >>> build_causal_lm("tiny", vocab_size=257, overrides={"num_hidden_layers": 2}).config.num_hidden_layers
        2
    """
    overrides = dict(overrides or {})
    check_model_name(name)
    if name.lower() in LLAMA_SIZES:
        return build_llama(name, vocab_size, **overrides)
    path = Path(name).expanduser()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if getattr(config, "model_type", None) in ("bert", "roberta", "electra", "xlm-roberta") and not config.is_decoder:
        # An encoder checkpoint (e.g. MiniLM) trains as a causal LM only with a causal mask.
        overrides.setdefault("is_decoder", True)
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **overrides)


class CausalLM(LightningModule):
    """Next-token prediction on batches of ``input_ids`` (as :class:`~lightning_memopt.data.TextDataModule`
    gives), with the optimizer built from an ``OptimizerCallable``.

    Args:
        model_name: a LLaMA size (``"tiny"``, ``"60m"``, ``"130m"``, ``"350m"``, ``"1b"``,
            ``"7b"``) or a local Hugging Face checkpoint folder.
        optimizer: builds the optimizer from param groups, e.g. ``partial(APOLLOMini, lr=1e-2)``
            or, in YAML, ``{class_path: APOLLOMini, init_args: {lr: 0.01}}``. It receives
            :func:`~lightning_memopt.optim.apollo_param_groups` (the blocks' linear layers
            flagged ``low_rank``, the rest not), which any torch optimizer accepts. Or a
            registry name (``"apollo"``, ``"apollo_mini"``, ``"adamw"``, ``"adamw8bit"``:
            :func:`~lightning_memopt.optim.available_optimizers`) with the registry's defaults.
            Checked when the module is built (a bad value fails before any training starts).
        lr_scheduler: builds a scheduler from the optimizer (stepped every optimizer step),
            e.g. :class:`WarmupCosineLR`.
        vocab_size: the embedding size of a LLaMA built by size; by default the data module's
            tokenizer size, else 32000.
        model_overrides: ``LlamaConfig`` fields (``num_hidden_layers: 2``), or
            ``from_pretrained`` arguments for a checkpoint folder.
        target_modules: which modules get the low-rank update (see
            :func:`~lightning_memopt.optim.apollo_param_groups`).
        loss_chunk_size: in training, compute the LM head and the loss this many tokens at a
            time (:func:`~lightning_memopt.layers.use_chunked_loss` on the built model), so that
            the ``batch x seq x vocab`` logits never exist at once: at a 32000-token vocabulary
            they are a small model's largest activation. Validation and test run the model's
            own forward (no backward there). ``None``: the model's own loss. For LLaMA-family
            decoders (``model_type`` llama, mistral, qwen2, qwen3), whose logits are the LM head
            applied to the last hidden state; not under FSDP (the head is sharded).
        max_new_tokens: ``predict``: tokens generated per prompt.
        temperature: ``predict``: 0 for greedy decoding, else sampling at this temperature.
        top_k: ``predict``: sample among the ``top_k`` likeliest tokens (with ``temperature > 0``).
        exit_threshold: ``predict`` with early exits: a token leaves at the first exit whose top
            probability reaches it (greedy; 1.0 runs every block).

    ``predict`` generates text from the data module's prompts
    (:meth:`~lightning_memopt.data.TextDataModule.prompt_texts`): one dict per prompt with
    ``prompt``, ``text`` (the continuation), ``prompt_tokens``, ``new_tokens`` and, for a model
    with early exits, ``exits`` (the block each new token left at; the last block is
    ``num_layers - 1``) and ``mean_blocks`` (blocks run per token). The generation settings are
    not saved in checkpoints, so the command line's apply to a trained model.

    The model is built in ``configure_model`` (after the data module's tokenizer is known, and
    inside the strategy's initialisation context, so a sharding strategy can build it on the
    meta device); call ``configure_model()`` yourself to use ``lm.model`` outside a trainer.

    The loss is the model's own: ``self.model(input_ids=..., labels=...).loss``. Model surgery
    (early exits, MoE upcycling, the chunked loss: :mod:`~lightning_memopt.layers.objective`)
    makes it the training objective in training mode, and the callbacks that apply it only log
    its parts.

    Logged: ``train/loss`` (the language-model loss of the final layer, before any surgery's
    terms: comparable with a plain run), ``train/tokens_per_s`` (all devices together),
    ``val/loss``, ``val/ppl``, ``test/loss``.

    Example:
        >>> lm = CausalLM("tiny", vocab_size=257)
        >>> lm.configure_model()
        >>> lm(torch.zeros(1, 8, dtype=torch.long)).logits.shape
        torch.Size([1, 8, 257])
    """

    def __init__(
        self,
        model_name: str = "tiny",
        optimizer: OptimizerCallable | str = APOLLOMini,
        lr_scheduler: LRSchedulerCallable | None = None,
        vocab_size: int | None = None,
        model_overrides: dict[str, Any] | None = None,
        target_modules: str | list[str] | None = None,
        loss_chunk_size: int | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        exit_threshold: float = 0.9,
    ) -> None:
        super().__init__()
        check_model_name(model_name)  # fail before any data is prepared
        check_optimizer(optimizer)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens={max_new_tokens!r} must be a positive number of tokens.")
        if not temperature >= 0:
            raise ValueError(f"model.temperature={temperature!r} must be >= 0 (0: greedy decoding).")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"model.top_k={top_k!r} must be a positive integer or null.")
        if loss_chunk_size is not None and (
            isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size < 1
        ):
            raise ValueError(
                f"model.loss_chunk_size={loss_chunk_size!r} must be a positive number of tokens (e.g. 1024) or null."
            )
        # Generation settings stay out of the checkpoint: LightningCLI applies a checkpoint's
        # hyperparameters over the command line, which would then not change them for predict.
        self.save_hyperparameters(
            ignore=["optimizer", "lr_scheduler", "max_new_tokens", "temperature", "top_k", "exit_threshold"]
        )
        self.model_name = model_name
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.vocab_size = vocab_size
        self.model_overrides = model_overrides
        self.target_modules = target_modules
        self.loss_chunk_size = loss_chunk_size
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_k = top_k
        self.exit_threshold = float(exit_threshold)
        self.model: nn.Module | None = None
        self.train_tokens = 0
        self.train_seconds = 0.0
        self._batch_start: float | None = None

    # -- model -------------------------------------------------------------------------------------

    def _resolve_vocab_size(self) -> int | None:
        if self.vocab_size is not None:
            return self.vocab_size
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        num_tokens = getattr(datamodule, "num_tokens", None)
        if num_tokens is not None:
            return int(num_tokens)
        return PAPER_VOCAB_SIZE if self.model_name.lower() in LLAMA_SIZES else None

    def configure_model(self) -> None:
        """Build the network (once; later calls do nothing)."""
        if self.model is not None:
            return
        vocab_size = self._resolve_vocab_size()
        self.model = build_causal_lm(self.model_name, vocab_size, self.model_overrides)
        embeddings = self.model.get_input_embeddings().num_embeddings
        if vocab_size is not None and embeddings < vocab_size:
            raise ValueError(
                f"model {self.model_name!r} embeds {embeddings} tokens but the tokenizer has {vocab_size}: "
                f"tokenise with the model's own tokenizer (data.tokenizer={self.model_name}) or set model.vocab_size."
            )
        # Remember what was built, so load_from_checkpoint rebuilds the same shapes.
        self.hparams["vocab_size"] = embeddings
        if self.loss_chunk_size is not None:
            model_type = getattr(self.model.config, "model_type", None)
            if model_type not in CHUNKED_LOSS_MODEL_TYPES:
                raise ValueError(
                    f"model.loss_chunk_size={self.loss_chunk_size} needs a decoder whose logits are its LM head "
                    f"applied to the last hidden state (model_type {', '.join(CHUNKED_LOSS_MODEL_TYPES)}); "
                    f"{self.model_name!r} is {model_type!r}. Set model.loss_chunk_size: null."
                )
            use_chunked_loss(self.model, self.loss_chunk_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any):
        if self.model is None:
            raise RuntimeError("CausalLM.model is not built yet: call configure_model() (a Trainer does it).")
        return self.model(input_ids=input_ids, labels=labels, **kwargs)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"]
        return self(input_ids, labels=batch.get("labels", input_ids)).loss

    # -- steps -------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)  # the training objective, surgery's terms included
        model_loss = last_model_loss(self.model)  # the LM loss before them (None: no surgery)
        self.log("train/loss", loss if model_loss is None else model_loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_start is None:
            return
        seconds = time.perf_counter() - self._batch_start
        tokens = batch["input_ids"].numel() * self.trainer.world_size
        self.train_tokens += tokens
        self.train_seconds += seconds
        self.log("train/tokens_per_s", tokens / max(seconds, 1e-9), prog_bar=True, on_step=True, on_epoch=False)

    @property
    def tokens_per_second(self) -> float:
        """Training throughput so far, all devices together (forward, backward and optimizer step;
        data loading and validation excluded).

        Example:
            >>> CausalLM().tokens_per_second
            0.0
        """
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None and not self.trainer.sanity_checking:
            self.log("val/ppl", torch.exp(loss.detach().float().clamp(max=50)), sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("test/loss", loss, sync_dist=True)
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | list[dict[str, Any]]:
        """Continue the prompt of a batch of ``predict_dataloader`` (one dict: the prompt, the
        generated text and token counts, and for a model with early exits the exit of every new
        token); a batch of several unpadded rows (e.g. validation blocks) gives one dict per row."""
        input_ids = batch["input_ids"]
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        prompts = batch.get("prompt")
        rows = [self._generate(row[None], prompts if input_ids.shape[0] == 1 else None) for row in input_ids]
        return rows[0] if len(rows) == 1 else rows

    def _generate(self, input_ids: torch.Tensor, prompt: str | None) -> dict[str, Any]:
        from lightning_memopt.layers import early_exit_generate, get_early_exits

        if self.model is None:
            raise RuntimeError("CausalLM.model is not built yet: call configure_model() (a Trainer does it).")
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        if prompt is None and tokenizer is not None:
            prompt = tokenizer.decode(input_ids[0].tolist())
        result: dict[str, Any] = {"prompt": prompt}
        if get_early_exits(self.model) is not None:
            out = early_exit_generate(self.model, input_ids, self.max_new_tokens, self.exit_threshold, eos)
            sequences = out.sequences
            exits = [int(e) for e in out.exit_layers[0].tolist() if e >= 0]
            result["exits"] = exits
        else:
            sampling = self.temperature > 0
            options: dict[str, Any] = {"do_sample": sampling}
            if sampling:
                options.update(temperature=self.temperature, top_k=self.top_k or 0)
            sequences = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos if eos is not None else 0,
                **options,
            )
        new = sequences[0, input_ids.shape[1] :].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        if "exits" in result:
            exits = result["exits"][: len(new)]
            result.update(exits=exits, mean_blocks=round(sum(e + 1 for e in exits) / max(len(exits), 1), 3))
        result.update(
            text=tokenizer.decode(new) if tokenizer is not None else None,
            prompt_tokens=int(input_ids.shape[1]),
            new_tokens=len(new),
            token_ids=new,
        )
        return result

    # -- optimizer ---------------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]] | list[nn.Parameter]:
        """What ``optimizer`` is called with: low-rank and full-rank groups, or the trainable
        parameters when the model has no linear layer to make low-rank.

        Example:
            >>> lm = CausalLM("tiny", vocab_size=257); lm.configure_model()
            >>> [g["low_rank"] for g in lm.param_groups()]
            [True, False]
        """
        if self.model is None:
            raise RuntimeError("CausalLM.param_groups: the model is not built yet; call configure_model() first.")
        try:
            return apollo_param_groups(self.model, self.target_modules)
        except ValueError:
            if self.target_modules is not None:
                raise
            return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        if isinstance(self.optimizer, torch.optim.Optimizer) or not (
            callable(self.optimizer) or isinstance(self.optimizer, str)
        ):
            raise TypeError(
                f"CausalLM(optimizer=...) takes a callable that builds the optimizer from parameters "
                f"(e.g. functools.partial(APOLLOMini, lr=1e-2), or class_path/init_args in YAML), "
                f"got {type(self.optimizer).__name__}."
            )
        if isinstance(self.optimizer, str):
            optimizer = create_optimizer(self.optimizer, self.param_groups())
        else:
            optimizer = self.optimizer(self.param_groups())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
