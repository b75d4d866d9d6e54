"""A plain accelerate loop (accelerator.prepare, accelerator.accumulate, accelerator.backward,
accelerator.clip_grad_norm_, save_state/load_state) with memengine's two lines — patch the model,
step it through MasterOptimizer — against the same loop without memengine on the fp32-master
recipe with fp32 gradient accumulation (hf_training)."""

import pytest
import torch
import transformers
from accelerate import Accelerator
from hf_training import (
    MODEL_KINDS,
    Fp32MasterAdamW,
    accumulate_gradients_in_fp32,
    buffer_norm,
    make_dataset,
    make_model,
)

import memengine as me

STEPS, ACCUMULATION = 20, 4


def train(model, optimizer, steps=STEPS, skip_micro_batches=0, save_at=None, load_from=None, shuffle=True):
    """The loop from accelerate's gradient-accumulation guide. Returns the per-step mean loss,
    the norms clip_grad_norm_ returned, and for memengine the buffer's norm before each clip."""
    buffer = optimizer.buffer if isinstance(optimizer, me.MasterOptimizer) else None
    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, cpu=True)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    loader = torch.utils.data.DataLoader(
        make_dataset(), batch_size=2, shuffle=shuffle, generator=torch.Generator().manual_seed(0)
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if load_from is not None:
        accelerator.load_state(load_from)
    if skip_micro_batches:
        loader = accelerator.skip_first_batches(loader, skip_micro_batches)
    losses, norms, buffer_norms, micro_losses = [], [], [], []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            micro_losses.append(loss.item())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if buffer is not None:
                    buffer_norms.append(buffer_norm(buffer))
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 1.0)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            if save_at is not None and len(losses) == save_at[0]:
                accelerator.save_state(save_at[1])
            if len(losses) == steps:
                break
    return losses, norms, buffer_norms


def reference_optimizer(model):
    return Fp32MasterAdamW([{"params": list(model.parameters())}], lr=3e-3, weight_decay=0.1)


def memengine_optimizer(model):
    return me.MasterOptimizer(torch.optim.AdamW, me.patch(model), lr=3e-3, weight_decay=0.1)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_accelerate_loop_tracks_the_fp32_master_recipe(kind):
    model = accumulate_gradients_in_fp32(make_model(kind))
    expected, _, _ = train(model, reference_optimizer(model))
    model = make_model(kind)
    losses, norms, buffer_norms = train(model, memengine_optimizer(model))
    assert len(losses) == len(expected) == STEPS
    for step, (loss, want) in enumerate(zip(losses, expected, strict=True)):
        assert abs(loss - want) <= 1e-3 * abs(want), f"step {step + 1}: loss {loss} vs the plain loop's {want}"
    assert losses[-1] < losses[0] - 0.5, f"no training happened: {losses}"
    assert len(norms) == len(buffer_norms) == STEPS
    for step, (norm, in_buffer) in enumerate(zip(norms, buffer_norms, strict=True)):
        assert abs(norm - in_buffer) <= 1e-5 * in_buffer, f"step {step + 1}: clip returned {norm}, buffer {in_buffer}"
    assert max(norms) > 1.0, "clipping at 1.0 never happened: the test would not see clipping errors"


def test_save_state_at_step_10_and_load_state_reach_the_same_step_20_parameters(tmp_path):
    model = make_model("llama")
    train(model, memengine_optimizer(model), save_at=(10, tmp_path / "state"), shuffle=False)
    resumed = make_model("llama", seed=1234)  # other weights: everything must come from the saved state
    train(
        resumed,
        memengine_optimizer(resumed),
        steps=STEPS - 10,
        skip_micro_batches=10 * ACCUMULATION,
        load_from=tmp_path / "state",
        shuffle=False,
    )
    for (name, want), got in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(got, want), f"{name} differs after load_state"
