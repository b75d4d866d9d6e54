"""Shared pieces of the data-parallel tests: a small GPT, token batches whose micro-batches and ranks
have different token counts, and the single-process reference run.

The global batch of a step is `world * rows_per_rank` rows; rank r takes rows [r * rows_per_rank,
(r + 1) * rows_per_rank). A single-process Engine on the whole batch, with the same micro-batch size,
is the reference: the same per-token mean gradient, only summed in another order.
"""

import functools

import torch
import torch.nn.functional as F

import memengine as me
from memengine.models.gpt import GPT

VOCAB, LENGTH = 64, 12


def make_model(seed=0, dtype=torch.float32, width=32, layers=2, heads=2):
    torch.manual_seed(seed)
    return GPT(vocab=VOCAB, width=width, layers=layers, heads=heads, length=LENGTH).to(dtype)


def summed_loss(model, batch):
    """(sum of token losses over labelled tokens, their count): label -100 is ignored."""
    logits = model(batch["tokens"]).float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    return loss, (batch["labels"] != -100).sum()


def global_batch(step, rows, seed=1234):
    """The step's whole batch: `rows` rows, each with a different number of labelled tokens."""
    generator = torch.Generator().manual_seed(seed + step)
    tokens = torch.randint(0, VOCAB, (rows, LENGTH), generator=generator)
    labels = tokens.roll(-1, dims=1)
    keep = torch.randint(1, LENGTH + 1, (rows,), generator=generator)
    for row in range(rows):
        labels[row, keep[row] :] = -100
    return {"tokens": tokens, "labels": labels}


def rank_batch(batch, rank, world):
    rows = batch["tokens"].shape[0] // world
    return {key: value[rank * rows : (rank + 1) * rows] for key, value in batch.items()}


def optimizer(lr=1e-2, weight_decay=0.1):
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


def engine(model, micro_batch_size=2, max_norm=None, **options):
    return me.Engine(model, optimizer(), micro_batch_size=micro_batch_size, max_norm=max_norm, **options)


def single_process_run(
    steps, world, rows_per_rank, micro_batch_size=2, max_norm=None, dtype=torch.float32, **model_options
):
    """Parameters (fp32 copies, registration order) after each step of a single-process Engine on the
    concatenated batches, and each step's stats."""
    model = make_model(dtype=dtype, **model_options)
    trainer = engine(model, micro_batch_size=micro_batch_size, max_norm=max_norm)
    history, stats = [], []
    for step in range(steps):
        result = trainer.step(global_batch(step, world * rows_per_rank), summed_loss)
        history.append([p.detach().float().clone() for p in model.parameters()])
        stats.append({"loss": float(result["loss"]), "grad_norm": float(result["grad_norm"])})
    return history, stats


def max_relative_difference(params, reference):
    """max over tensors of max|a - b| / max|b|."""
    return max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        for a, b in zip(params, reference, strict=True)
    )
