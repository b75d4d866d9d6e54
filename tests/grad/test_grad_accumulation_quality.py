"""The issue-level guarantees of GradBuffer/Engine on a small bf16 GPT-style model (the full-size
measurement is benchmarks/bench_grad_accumulation.py): no accuracy lost against fp32 master
gradients, no bf16 gradient kept alive, and the peak memory that saves."""

import weakref

import torch

import memengine as me
from memengine.grad import hooks
from memengine.studies import grad_accumulation as study

CONFIG = dict(vocab=128, width=64, layers=2, heads=2, length=32)


def test_accuracy_and_peak_memory_against_pytorch():
    results, gradient_set_bytes = study.run(CONFIG, micro_batches=16, rows=2)
    errors = {name: row["relative_error"] for name, row in results.items()}
    assert errors["memengine"] <= errors["pytorch-fp32-master"], errors
    assert errors["memengine"] <= 0.7 * errors["pytorch-bf16"], errors
    peaks = {name: row.get("peak_bytes") for name, row in results.items()}
    assert peaks["memengine"] <= peaks["pytorch-fp32-master"], peaks
    assert peaks["pytorch-fp32-master-zeroed"] - peaks["memengine"] >= gradient_set_bytes, (peaks, gradient_set_bytes)


def test_no_low_precision_gradient_outlives_its_fold(monkeypatch):
    model, _ = study.make_models(CONFIG)
    data = study.make_data(CONFIG, micro_batches=3, rows=2)
    folded = []
    accumulate = hooks.ops.accumulate_

    def tracking_accumulate(dst, src, **kwargs):
        folded.append(weakref.ref(src))
        accumulate(dst, src, **kwargs)

    monkeypatch.setattr(hooks.ops, "accumulate_", tracking_accumulate)
    buffer = me.patch(model)
    buffer.start_window()
    for i, micro_batch in enumerate(data.split(2)):
        loss, _ = study.summed_loss(model, micro_batch)
        loss.backward()
        # The first micro-batch's norm and embedding gradients are folded by the hook; later ones
        # autograd adds in place into .grad, which is by then the fp32 main_grad view.
        assert folded or i > 0, "the norms and embeddings are folded by the hook"
        assert all(ref() is None for ref in folded), "a bf16 gradient survived its fold"
        assert all(p.grad is None or p.grad.data_ptr() == p.main_grad.data_ptr() for p in model.parameters())
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        folded.clear()
