"""Engine ergonomics (issue 13): Mapping batches (transformers.BatchEncoding), batches whose tensors
disagree on their row count, optimizer instances, the ready-made causal LM loss, loss_fn results that
break the (summed loss, token count) contract, and unpatch under a live Engine."""

import collections.abc
import copy
import functools
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from token_batches import make_batch, summed_loss

import memengine as me
from memengine.engine import split_batch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the CI installs it)")


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=30, width=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(h + torch.tanh(self.mix(h)))


def twin_models(make=TinyLM):
    torch.manual_seed(0)
    model = make()
    return model, copy.deepcopy(model)


def sgd(lr=0.1):
    return functools.partial(torch.optim.SGD, lr=lr)


def flat_main_grad(model):
    return torch.cat([p.main_grad.flatten() for p in model.parameters()])


# Mapping batches ------------------------------------------------------------------------------------


def test_a_batch_encoding_steps_exactly_like_the_same_dict():
    model, twin = twin_models()
    batch = make_batch()
    seen_types = []

    def recording_loss(model, micro_batch):
        seen_types.append(type(micro_batch))
        return summed_loss(model, micro_batch)

    stats = me.Engine(model, optimizer=sgd(), micro_batch_size=4).step(
        transformers.BatchEncoding(batch), recording_loss
    )
    twin_stats = me.Engine(twin, optimizer=sgd(), micro_batch_size=4).step(batch, summed_loss)
    assert seen_types == [transformers.BatchEncoding] * 2  # rows 4 + 2, of the batch's own type
    assert torch.equal(stats["loss"], twin_stats["loss"]) and torch.equal(stats["tokens"], twin_stats["tokens"])
    assert torch.equal(flat_main_grad(model), flat_main_grad(twin))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


class ReadOnlyBatch(collections.abc.Mapping):
    """A Mapping that is neither a dict nor a UserDict and cannot be built from a dict."""

    def __init__(self, **items):
        self._items = items

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


def test_any_mapping_splits_its_tensors_and_passes_other_values_to_every_micro_batch():
    tokens = torch.arange(10).reshape(5, 2)
    parts = split_batch(ReadOnlyBatch(tokens=tokens, past_key_values=None, num_logits_to_keep=3), 2)
    assert [type(part) for part in parts] == [dict] * 3
    assert [part["tokens"].shape[0] for part in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([part["tokens"] for part in parts]), tokens)
    assert all(part["past_key_values"] is None and part["num_logits_to_keep"] == 3 for part in parts)


@pytest.mark.parametrize("micro_batch_size", [2, 8])
def test_tensors_with_different_row_counts_are_rejected_before_any_forward_naming_the_keys(micro_batch_size):
    # 4 and 3 rows: with micro-batches of 2 both split into two parts (today's check passes) and with
    # micro-batches of 8 into one; either way rows of "labels" would silently be paired with other rows.
    model = TinyLM()
    batch = {"tokens": torch.zeros(4, 7, dtype=torch.long), "labels": torch.zeros(3, 7, dtype=torch.long)}
    calls = []

    def counting_loss(model, micro_batch):
        calls.append(1)
        return summed_loss(model, micro_batch)

    engine = me.Engine(model, optimizer=sgd(), micro_batch_size=micro_batch_size)
    with pytest.raises(ValueError, match=r"different numbers of rows.*batch\['tokens'\]: 4, batch\['labels'\]: 3"):
        engine.step(batch, counting_loss)
    assert calls == []


def test_row_counts_are_checked_inside_nested_tuples_too():
    with pytest.raises(ValueError, match=r"\[0\]: 4.*\[1\]\['mask'\]: 5"):
        split_batch((torch.zeros(4), {"mask": torch.zeros(5)}), 4)


# Optimizers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_optimizer_instance_steps_like_the_same_options_given_as_param_groups(dtype):
    model, twin = (module.to(dtype) for module in twin_models())
    decay = [model.mix.weight, model.head.weight]
    no_decay = [model.embed.weight, model.mix.bias, model.head.bias]
    instance = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": 0.02}], lr=0.05, weight_decay=0.1
    )
    engine = me.Engine(model, optimizer=instance, micro_batch_size=4)
    twin_of = dict(zip(model.parameters(), twin.parameters(), strict=True))
    twin_engine = me.Engine(
        twin,
        optimizer=functools.partial(torch.optim.AdamW, lr=0.05, weight_decay=0.1),
        micro_batch_size=4,
        param_groups=[
            {"params": [twin_of[p] for p in decay]},
            {"params": [twin_of[p] for p in no_decay], "weight_decay": 0.0, "lr": 0.02},
        ],
    )
    assert type(engine.optimizer.optimizer) is torch.optim.AdamW
    masters = [master for group in engine.optimizer.param_groups for master in group["params"]]
    assert all(master.dtype == torch.float32 for master in masters)  # the fp32 masters, not the model's parameters
    assert engine.optimizer.defaults == instance.defaults
    for seed in range(2):
        engine.step(make_batch(seed=seed), summed_loss)
        twin_engine.step(make_batch(seed=seed), summed_loss)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_an_optimizer_class_is_accepted():
    model, twin = twin_models()
    me.Engine(model, optimizer=torch.optim.SGD, micro_batch_size=4).step(make_batch(), summed_loss)
    me.Engine(twin, optimizer=functools.partial(torch.optim.SGD), micro_batch_size=4).step(make_batch(), summed_loss)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_an_optimizer_instance_that_cannot_be_moved_to_the_masters_is_refused():
    model = TinyLM()
    stepped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    summed_loss(model, make_batch())[0].backward()
    stepped.step()
    with pytest.raises(ValueError, match="already has state"):
        me.Engine(model, optimizer=stepped, micro_batch_size=4)

    model = TinyLM()
    scheduled = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(scheduled, step_size=1)
    with pytest.raises(ValueError, match="learning-rate scheduler.*engine.optimizer"):
        me.Engine(model, optimizer=scheduled, micro_batch_size=4)

    model = TinyLM()
    hooked = torch.optim.SGD(model.parameters(), lr=0.1)
    hooked.register_step_post_hook(lambda optimizer, args, kwargs: None)
    with pytest.raises(ValueError, match="hooks registered.*engine.optimizer"):
        me.Engine(model, optimizer=hooked, micro_batch_size=4)

    model = TinyLM()
    with pytest.raises(ValueError, match="not covered by the GradBuffer"):
        me.Engine(model, optimizer=torch.optim.SGD(TinyLM().parameters(), lr=0.1), micro_batch_size=4)

    model = TinyLM()
    with pytest.raises(ValueError, match="param_groups"):
        me.Engine(
            model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            micro_batch_size=4,
            param_groups=[{"params": list(model.parameters())}],
        )


# The ready-made causal LM loss ----------------------------------------------------------------------


def tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def lm_batch(rows=5, length=9):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(rows):  # right padding: a different number of real tokens per row
        attention_mask[row, length - row :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return transformers.BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


def test_causal_lm_loss_is_the_hugging_face_loss_summed_with_its_token_count():
    model = tiny_gpt2()
    batch = lm_batch()
    loss_sum, count = me.causal_lm_loss(model, batch)
    mean = model(**batch).loss  # Hugging Face's own shifted mean over labels != -100
    assert isinstance(count, torch.Tensor) and int(count) == int((batch["labels"][:, 1:] != -100).sum())
    assert loss_sum.requires_grad and loss_sum.dtype == torch.float32
    torch.testing.assert_close(loss_sum / count, mean)
    tensor_sum, tensor_count = me.causal_lm_loss(model, batch["input_ids"])  # a tensor batch: every token counts
    assert int(tensor_count) == batch["input_ids"][:, 1:].numel()
    torch.testing.assert_close(tensor_sum / tensor_count, model(batch["input_ids"], labels=batch["input_ids"]).loss)


def test_engine_step_without_a_loss_fn_trains_a_causal_lm_on_its_mean_token_loss():
    model, reference = twin_models(tiny_gpt2)
    batch = lm_batch()
    mean = reference(**batch).loss
    mean.backward()
    stats = me.Engine(model, optimizer=sgd(lr=0.0), micro_batch_size=2).step(batch)
    torch.testing.assert_close(stats["loss"], mean.detach())
    flat_reference = torch.cat([p.grad.flatten() for p in reference.parameters()])
    relative_error = ((flat_main_grad(model) - flat_reference).norm() / flat_reference.norm()).item()
    assert relative_error <= 1e-5, relative_error


# loss_fn results that break the contract ------------------------------------------------------------


def mean_loss(model, batch):
    loss_sum, count = summed_loss(model, batch)
    return loss_sum / count


def hugging_face_output(model, batch):
    loss_sum, count = summed_loss(model, batch)
    return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss_sum / count, logits=model(batch["tokens"]))


def three_values(model, batch):
    return (*summed_loss(model, batch), "extra")


def per_token_losses(model, batch):
    logits = model(batch["tokens"]).float()
    losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="none")
    return losses, (batch["labels"] != -100).sum()


def loss_without_grad(model, batch):
    with torch.no_grad():
        return summed_loss(model, batch)


def negative_count(model, batch):
    return summed_loss(model, batch)[0], -3


@pytest.mark.parametrize(
    "loss_fn, error, message",
    [
        (mean_loss, TypeError, r"a bare tensor.*return \(summed loss, number of tokens\).*memengine\.causal_lm_loss"),
        (hugging_face_output, TypeError, r"\.loss.*is a mean.*\(summed loss, number of tokens\)"),
        (three_values, TypeError, r"a tuple of 3 values.*\(summed loss, number of tokens\)"),
        (per_token_losses, ValueError, r"a loss of shape \(42,\).*sum"),
        (loss_without_grad, RuntimeError, r"loss_fn returned a loss that does not require grad.*no_grad"),
        (negative_count, ValueError, r"token count of -3"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_a_loss_fn_result_that_breaks_the_contract_gets_an_error_saying_what_to_return(loss_fn, error, message):
    engine = me.Engine(TinyLM(), optimizer=sgd(), micro_batch_size=6)
    with pytest.raises(error, match=message):
        engine.step(make_batch(), loss_fn)


@pytest.mark.parametrize("count", [0, torch.tensor(0)], ids=["python", "tensor"])
def test_a_batch_whose_token_counts_sum_to_zero_is_an_error_not_a_skipped_step(count):
    engine = me.Engine(TinyLM(), optimizer=sgd(), micro_batch_size=2)
    with pytest.raises(ValueError, match="token counts sum to 0"):
        engine.step(make_batch(), lambda model, batch: (summed_loss(model, batch)[0], count))


# unpatch under a live Engine ------------------------------------------------------------------------


def test_unpatch_under_a_live_engine_is_refused_until_it_is_closed_or_deleted():
    model = TinyLM()
    engine = me.Engine(model, optimizer=sgd(), micro_batch_size=4)
    with pytest.raises(RuntimeError, match=r"live memengine\.Engine.*engine\.close\(\)"):
        me.unpatch(model)
    assert isinstance(model.mix, me.nn.Linear) and hasattr(model.mix.weight, "main_grad")  # nothing undone
    engine.step(make_batch(), summed_loss)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.step(make_batch(), summed_loss)
    me.unpatch(model)
    assert type(model.mix) is torch.nn.Linear

    model = TinyLM()
    engine = me.Engine(model, optimizer=sgd(), micro_batch_size=4)
    alive = weakref.ref(engine)
    del engine
    gc.collect()
    assert alive() is None
    me.unpatch(model)  # the Engine is gone: nothing to protect

    model = TinyLM()
    engine = me.Engine(model, optimizer=sgd(), micro_batch_size=4)
    me.unpatch(copy.deepcopy(model))  # a copy is not the Engine's model
    with pytest.raises(RuntimeError, match="live memengine.Engine"):
        me.unpatch(model)
    engine.close()
