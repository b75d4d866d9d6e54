"""Hugging Face models (GPT2LMHeadModel, LlamaForCausalLM; small configs, random weights, bf16) trained by a
2-rank ZeRO-1 Engine for 20 steps track a single-process Engine on the concatenated batches: the step's loss
(the global mean over both ranks' tokens) within 1e-3 relative at every step.

Rows carry different numbers of -100 labels (integrations.hf_training.make_dataset), so the ranks and their
micro-batches hold different token counts. The default loss_fn, memengine.causal_lm_loss, is used. One
multi-rank run trains both models (each rank import of transformers costs seconds)."""

import functools

import pytest
import torch
import torch.distributed as dist
from distributed.launcher import run_ranks
from integrations.hf_training import MODEL_KINDS, make_dataset, make_model

import memengine as me

WORLD, ROWS_PER_RANK, MICRO_BATCH_SIZE, STEPS = 2, 4, 2, 20
LOSS_TOLERANCE = 1e-3  # the bound; bf16 parameters round the fp32 masters differently after some steps


def global_batch(step, rows):
    """The step's whole batch: rows [step * rows, (step + 1) * rows) of the dataset, stacked."""
    dataset = make_dataset(rows=STEPS * rows)[step * rows : (step + 1) * rows]
    return {key: torch.stack([row[key] for row in dataset]) for key in ("input_ids", "labels")}


def train(kind, steps, rows, process_group=None, rank=0, world=1):
    """(each step's loss, the final parameters) of an Engine on this rank's share of each global batch."""
    # Without dropout (GPT-2's config has 0.1): its masks come from each process's own random stream, so the
    # ranks would drop other elements than the single process does and the losses would differ by noise.
    model = make_model(kind).eval()
    engine = me.Engine(
        model,
        functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        micro_batch_size=MICRO_BATCH_SIZE,
        max_norm=1.0,
        process_group=process_group,
    )
    losses = []
    for step in range(steps):
        batch = global_batch(step, world * rows)
        share = {key: value[rank * rows : (rank + 1) * rows] for key, value in batch.items()}
        losses.append(float(engine.step(share)["loss"]))  # default loss_fn: memengine.causal_lm_loss
    return losses, [p.detach().clone() for p in model.parameters()]


def _train_every_kind(rank, world):
    return {kind: train(kind, STEPS, ROWS_PER_RANK, dist.group.WORLD, rank, world) for kind in MODEL_KINDS}


@pytest.fixture(scope="module")
def data_parallel_runs():
    return run_ranks(WORLD, _train_every_kind, timeout=240)


def test_ranks_see_different_token_counts():
    # The premise of the comparison: the global token normalisation matters here.
    batch = global_batch(0, WORLD * ROWS_PER_RANK)
    counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
    assert counts[:ROWS_PER_RANK].sum() != counts[ROWS_PER_RANK:].sum()
    assert len(set(counts.tolist())) > 2


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_two_rank_zero1_tracks_single_process_loss(kind, data_parallel_runs):
    reference_losses, _ = train(kind, STEPS, WORLD * ROWS_PER_RANK)
    for rank, run in enumerate(data_parallel_runs):
        losses, _ = run[kind]
        gaps = [abs(a - b) / abs(b) for a, b in zip(losses, reference_losses, strict=True)]
        print(f"{kind} rank {rank}: max relative loss gap {max(gaps):.3g} over {STEPS} steps")
        assert max(gaps) <= LOSS_TOLERANCE, (
            f"{kind}: rank {rank}'s step losses leave the single-process run's by up to {max(gaps):.3g} relative "
            f"(step {gaps.index(max(gaps))}): {losses} vs {reference_losses}"
        )
    assert reference_losses[-1] < reference_losses[0], "the model did not learn: the comparison says little"


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_ranks_end_with_bitwise_identical_parameters(kind, data_parallel_runs):
    (_, first), (_, second) = (run[kind] for run in data_parallel_runs)
    for a, b in zip(first, second, strict=True):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b)
