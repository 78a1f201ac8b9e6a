"""A nanoGPT-style training loop for a plain HF `LlamaForCausalLM`: pretraining (base) and SFT (chat).

The loop is deliberately short and visible: documents -> token ids with labels -> packed rows of `block_size`
tokens -> AdamW with linear warm-up and cosine decay (nanoGPT `train.py`) -> checkpoints. Every document starts
with `<|bos|>` and ends with `<|eos|>`; rows are cut from the concatenation of one epoch's shuffled documents
(nanoGPT packs the same way; attention crosses document boundaries, the BOS marks where a new one starts).
Labels equal the inputs for plain text and are -100 on user turns of chat examples, so SFT learns replies only.

Checkpoints (`ckpt.pt`: model, optimizer, step, epoch, row cursor, RNG state) are written atomically every
`ckpt_every` steps; `train()` resumes from one when it exists, and because each epoch's documents and row order
depend only on (seed, epoch), a resumed run reaches exactly the state of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engramlab.results import atomic_path

Example = tuple[list[int], list[int]]  # (input ids, labels) of one document, labels -100 where no loss


@dataclass
class ModelConfig:
    """Llama shape. Default: 6 layers, hidden 256, 1536 SwiGLU neurons per layer (9,216 MLP neurons in all)."""

    n_layer: int = 6
    d_model: int = 256
    d_mlp: int = 1536  # intermediate_size: neurons per layer (gate/up rows, down columns)
    n_head: int = 8  # head dim 32
    n_kv_head: int = 8
    max_len: int = 512  # max_position_embeddings

    def llama_config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.d_model,
            intermediate_size=self.d_mlp,
            num_hidden_layers=self.n_layer,
            num_attention_heads=self.n_head,
            num_key_value_heads=self.n_kv_head,
            max_position_embeddings=self.max_len,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,  # separate LM head, as in Llama-3.1-8B (paper 2 decodes through it)
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32  # rows per step
    block_size: int = 128  # tokens per row
    lr: float = 2e-3  # peak; small models tolerate a high rate (nanoGPT's baby config uses 1e-3)
    min_lr: float = 1e-4  # cosine floor (nanoGPT: lr/10)
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    ckpt_every: int = 100
    log_every: int = 25
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bf16 autocast (fp32 master weights): 2.4x faster on an AVX-512-BF16 CPU, also on GPUs


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to min_lr (nanoGPT `get_lr`)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    ratio = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def pack(examples: list[Example], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents and cut rows of `block_size`; returns ids and labels, each (R, block_size)."""
    ids = [t for e in examples for t in e[0]]
    labels = [t for e in examples for t in e[1]]
    n = len(ids) // block_size
    shape = (n, block_size)
    return torch.tensor(ids[: n * block_size]).view(shape), torch.tensor(labels[: n * block_size]).view(shape)


class EpochData:
    """Packed rows of one epoch, rebuilt from `make_examples(epoch)`; rows are shuffled with (seed, epoch)."""

    def __init__(self, make_examples: Callable[[int], list[Example]], cfg: TrainConfig):
        self.make_examples, self.cfg, self.epoch = make_examples, cfg, -1

    def rows(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if epoch != self.epoch:
            ids, labels = pack(self.make_examples(epoch), self.cfg.block_size)
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            order = torch.randperm(len(ids), generator=g)
            self.ids, self.labels, self.epoch = ids[order], labels[order], epoch
        return self.ids, self.labels


def _save_ckpt(path: Path, model, opt, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "state": state,
                "torch_rng": torch.get_rng_state(),
                "py_rng": random.getstate(),
            },
            tmp,
        )


def train(
    model: LlamaForCausalLM,
    make_examples: Callable[[int], list[Example]],
    cfg: TrainConfig,
    work_dir: str | Path,
    evaluate: Callable[[LlamaForCausalLM], dict] | None = None,
    progress_label: str = "train",
) -> dict:
    """Train `model` in place for `cfg.steps` steps, checkpointing into `work_dir`; returns the run record.

    The record (also `work_dir/log.jsonl`, one line per `log_every` steps) holds step, loss, lr, tokens seen,
    seconds and the `evaluate(model)` numbers every `eval_every` steps.
    """
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = work / "ckpt.pt", work / "log.jsonl"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    state = {"step": 0, "epoch": 0, "cursor": 0, "tokens": 0, "seconds": 0.0}
    if ckpt.is_file():  # resume
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["py_rng"])
    data = EpochData(make_examples, cfg)
    history = []
    if log_path.is_file() and state["step"]:  # keep the log up to the checkpoint; later lines are redone
        history = [r for r in map(json.loads, log_path.read_text().splitlines()) if r["step"] <= state["step"]]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    t0, seconds0, loss_acc, n_acc = time.time(), state["seconds"], 0.0, 0
    with Progress(
        TextColumn(f"[bold]{progress_label}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(progress_label, total=cfg.steps, completed=state["step"], info="")
        while state["step"] < cfg.steps:
            ids, labels = data.rows(state["epoch"])
            if state["cursor"] + cfg.batch_size > len(ids):
                state["epoch"], state["cursor"] = state["epoch"] + 1, 0
                continue
            sl = slice(state["cursor"], state["cursor"] + cfg.batch_size)
            x, y = ids[sl].to(device), labels[sl].to(device)  # (B, T)
            for group in opt.param_groups:
                group["lr"] = lr_at(state["step"], cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                loss = model(input_ids=x, labels=y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            state["step"] += 1
            state["cursor"] += cfg.batch_size
            state["tokens"] += x.numel()
            state["seconds"] = seconds0 + time.time() - t0
            loss_acc, n_acc = loss_acc + loss.item(), n_acc + 1
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
                rec = {
                    "step": state["step"],
                    "epoch": state["epoch"],
                    "loss": loss_acc / n_acc,
                    "lr": lr_at(state["step"] - 1, cfg),
                    "tokens": state["tokens"],
                    "seconds": round(state["seconds"], 1),
                }
                loss_acc, n_acc = 0.0, 0
                if evaluate is not None and (
                    state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps >= cfg.eval_every
                ):
                    model.eval()
                    rec["eval"] = evaluate(model)
                    model.train()
                history.append(rec)
                with log_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                tps = state["tokens"] / max(state["seconds"], 1e-9)
                info = f"loss {rec['loss']:.3f} · {tps:,.0f} tok/s"
                if "eval" in rec:
                    info += " · " + " ".join(f"{k} {v:.3f}" for k, v in rec["eval"].items() if isinstance(v, float))
                    bar.console.print(f"step {state['step']}: {info}")
                bar.update(task, completed=state["step"], info=info)
            if state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.steps:
                _save_ckpt(ckpt, model, opt, state)
    model.eval()
    return {"config": asdict(cfg), "state": state, "history": history}
