"""me.segment on Hugging Face models with their default config, key/value cache on (use_cache=True):
planning from a budget and a sample forward profiles the layers with the cache switched off (the
cache object grows across runs), and recomputed layers never write it. Caches are recognised by
type, whether passed by keyword or positionally (GPT-2 passes its cache positionally)."""

import copy

import pytest
import torch

import memengine as me
from memengine.plan import Segment
from memengine.segments.apply import profile_sample as profile_recorded
from memengine.segments.profile import is_key_value_cache, without_caches

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the CI installs it)")


def llama():
    config = transformers.LlamaConfig(  # use_cache stays at its default, True
        vocab_size=128,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    assert config.use_cache
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config), lambda model: model.model.layers


def gpt2():
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=4, n_head=4)
    assert config.use_cache
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config), lambda model: model.transformer.h


def step(model, tokens):
    """Loss and gradients of one training step (GPT-2's dropout draws from the reseeded RNG)."""
    model.zero_grad()
    torch.manual_seed(3)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2"])
def test_segment_from_a_budget_with_the_default_key_value_cache(make):
    model, layers_of = make()
    twin, probe = copy.deepcopy(model), copy.deepcopy(model)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    loss, grads = step(model, tokens)

    chain = profile_recorded(list(layers_of(probe)), lambda: probe(input_ids=tokens))
    keep_all = me.plan.simulate(chain, me.plan.solve(chain, method="none"))["peak_bytes"]
    budget = (keep_all + me.plan.smallest_feasible_budget(chain)) // 2
    handle = me.segment(layers_of(twin), budget=budget, sample=lambda: twin(input_ids=tokens))
    assert any(s.policy != "keep" for s in handle.plan)
    with pytest.warns(UserWarning, match="switched off for recomputed blocks"):
        segmented_loss, segmented_grads = step(twin, tokens)

    assert torch.equal(loss, segmented_loss)
    for a, b in zip(grads, segmented_grads, strict=True):
        assert torch.equal(a, b)


def test_profiling_with_a_cache_matches_profiling_without_one():
    """The recorded cache is not used while profiling: the bytes measured are those of a training
    forward without cache (a growing cache would make later runs attend over more keys)."""
    model, layers_of = llama()
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with_cache = profile_recorded(list(layers_of(model)), lambda: model(input_ids=tokens))
    without_cache = profile_recorded(list(layers_of(model)), lambda: model(input_ids=tokens, use_cache=False))
    for field in ("input_bytes", "saved_bytes", "selective_bytes", "output_bytes", "forward_flops"):
        assert getattr(with_cache, field) == getattr(without_cache, field), field


def test_caches_are_recognised_by_type_in_any_position():
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    assert is_key_value_cache(cache) and not is_key_value_cache(torch.ones(1))

    class Cache:  # the same name outside transformers is not a cache
        pass

    assert not is_key_value_cache(Cache())
    hidden = torch.ones(2)
    args, kwargs, switched = without_caches((hidden, cache), {"cache": cache, "use_cache": True, "mask": hidden})
    assert args[0] is hidden and args[1] is None
    assert kwargs == {"cache": None, "use_cache": False, "mask": hidden}
    assert switched == ["use_cache", "cache", "positional argument 1 (EncoderDecoderCache)"]


def test_nothing_changes_and_nothing_is_said_without_a_cache():
    hidden = torch.ones(2)
    args, kwargs = (hidden,), {"use_cache": False, "past_key_values": None, "mask": hidden}
    assert without_caches(args, kwargs) == (args, kwargs, [])


def test_recomputed_gpt2_layers_never_write_their_positional_cache():
    """GPT-2 passes its cache positionally. A recomputed layer that kept it would write its keys a
    second time during the backward (the cache would hold 2x the tokens for that layer)."""
    model, layers_of = gpt2()
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    me.segment(layers_of(model), plan=[Segment(0, 2, "recompute"), Segment(2, 3, "selective"), Segment(3, 4, "keep")])
    with pytest.warns(UserWarning, match=r"positional argument \d \(DynamicCache\) switched off for recomputed blocks"):
        output = model(input_ids=tokens, labels=tokens)
        output.loss.backward()
    lengths = [output.past_key_values.get_seq_length(layer) for layer in range(4)]
    assert lengths == [0, 0, 0, 32]  # recomputed layers run without cache; the kept one writes it once
