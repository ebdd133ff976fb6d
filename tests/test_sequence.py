"""A turn's steps on tiny models: the prompt's final chunk gives the first token, so a turn
costs exactly its prefill chunks plus one decode pass per token after the first; the tokens
are those of feeding the prompt's last id as a decode step of its own (as before), and the
cache holds exactly the turn's cache_tokens afterwards."""

from __future__ import annotations

import math
from types import SimpleNamespace

import mlx.core as mx
import pytest

from agentd.engine import Engine
from agentd.protocol import Sampling
from agentd.sequence import Sequence, make_sampler
from agentd.stepper import Stepper, generate

CHUNK = 16  # small, so the tiny models' prompts span several chunks


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def engine(request, tiny_llama_dir, tiny_gemma_dir):
    eng = Engine(tiny_llama_dir if request.param == "llama" else tiny_gemma_dir)
    eng.prefill_chunk = CHUNK
    return eng


class CountingModel:
    """The engine's model, counting forward passes and the rows each carried."""

    def __init__(self, model):
        self.model, self.passes = model, []

    def __call__(self, inputs, cache=None):
        self.passes.append(inputs.shape[1])
        return self.model(inputs, cache=cache)

    def __getattr__(self, name):  # layers, args, ...: make_prompt_cache reads them
        return getattr(self.model, name)


def prompt_of(engine, n: int) -> list[int]:
    ids = engine.render("You are a support engineer.", [{"role": "user", "content": "Why does checkout fail? " * 40}])
    assert len(ids) >= n
    return ids[:n]


def two_pass_reply(engine, prompt: list[int], max_tokens: int) -> list[int]:
    """The reply as the engine made it before: every prompt id but the last prefilled, the
    last fed as the first decode step."""
    cache = engine.new_cache()
    for _ in engine.prefill_range(cache, prompt, 0, len(prompt) - 1):
        pass
    token, out = prompt[-1], []
    for _ in range(max_tokens):
        logits = engine.decode_logits([token], cache)
        token = mx.argmax(logits - mx.logsumexp(logits, keepdims=True), axis=-1).item()
        if token in engine.eos_ids:
            break
        out.append(token)
    return out


def test_both_architectures_run_the_output_head_on_the_last_row_only(engine):
    assert engine._last_row.norm is not None


@pytest.mark.parametrize("length", [5, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3])
def test_the_final_chunk_gives_the_first_token_and_the_tokens_are_as_before(engine, length):
    prompt = prompt_of(engine, length)
    counting = CountingModel(engine.model)
    engine.model = counting
    try:
        _, gen = generate(engine, engine.new_cache(), [], prompt, Sampling(max_tokens=6))
    finally:
        engine.model = counting.model
    accepted = len(gen.tokens) + (1 if gen.finish_reason == "stop" else 0)
    chunks = math.ceil(length / CHUNK)
    assert counting.passes == [CHUNK] * (chunks - 1) + [length - CHUNK * (chunks - 1)] + [1] * (accepted - 1)
    assert gen.prefilled_tokens == length and gen.reused_tokens == 0
    assert gen.tokens == two_pass_reply(engine, prompt, 6)
    assert gen.cache_tokens == prompt + gen.tokens[: accepted - 1]


def test_a_follow_up_prefills_only_its_new_ids_and_the_cache_holds_exactly_cache_tokens(engine):
    prompt = prompt_of(engine, 2 * CHUNK + 5)
    cache, first = generate(engine, engine.new_cache(), [], prompt[: CHUNK + 2], Sampling(max_tokens=4))
    cache, gen = generate(engine, cache, first.cache_tokens, prompt, Sampling(max_tokens=4))
    # A wrapped sliding window (gemma3's) cannot be trimmed back: that turn starts over.
    assert gen.reused_tokens == (0 if gen.rebuilt else len(_common(first.cache_tokens, prompt)))
    assert gen.prefilled_tokens == len(prompt) - gen.reused_tokens
    assert cache[0].offset == len(gen.cache_tokens)
    # The cache predicts the next token as one prefilled afresh from its token list does.
    fresh, _ = engine.prefill(engine.new_cache(), [], gen.cache_tokens)
    probe = gen.cache_tokens[-1]
    assert mx.allclose(engine.decode_logits([probe], cache), engine.decode_logits([probe], fresh), atol=1e-4).item()


def test_a_prompt_the_cache_holds_but_its_last_id_runs_that_id_alone(engine):
    prompt = prompt_of(engine, CHUNK + 3)
    cache, held = engine.prefill(engine.new_cache(), [], prompt[:-1])
    seq = Sequence(engine, cache, held, prompt, Sampling(max_tokens=3))
    assert (seq.reused, seq.prefill_left) == (len(prompt) - 1, 1)
    Stepper(engine).run_alone(seq)
    gen = seq.result()
    assert gen.prefilled_tokens == 1 and gen.tokens == two_pass_reply(engine, prompt, 3)


def test_cancelled_during_prefill_keeps_exactly_the_chunks_that_ran(engine):
    prompt = prompt_of(engine, 3 * CHUNK)
    chunks = []
    seq = Sequence(engine, engine.new_cache(), [], prompt, Sampling(max_tokens=3),
                   on_progress=lambda done, total: chunks.append((done, total)),
                   should_stop=lambda: len(chunks) >= 2)
    stepper = Stepper(engine, interleaved_prefill=CHUNK)
    while not seq.done:
        stepper.step([seq])
    gen = seq.result()
    assert gen.finish_reason == "cancelled" and gen.tokens == []
    assert chunks[-1][1] == len(prompt) and gen.cache_tokens == prompt[: chunks[-1][0]]
    assert seq.cache[0].offset == len(gen.cache_tokens)


def _common(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_rows_that_finish_in_one_step_leave_the_batch_together_each_with_exactly_its_tokens(engine):
    """Five turns batched; two finish in one step (rows filtered out together, three left),
    two more in a later one (the batch dissolves): every cache holds exactly its tokens and
    has room for the next ones, and the turns left decoding go on from the right rows."""
    if engine.model_id.startswith("tiny-gemma") or not all(type(c).__name__ == "KVCache" for c in engine.new_cache()):
        pytest.skip("sliding-window caches decode unbatched")
    prompts = [prompt_of(engine, n) for n in (9, 12, 15, 18, 21)]
    limits = [3, 5, 5, 9, 9]
    seqs = [Sequence(engine, engine.new_cache(), [], p, Sampling(max_tokens=m)) for p, m in zip(prompts, limits)]
    for s in seqs:
        s.prefill(s.prefill_left)  # all decoding from the first step: one batch of five
    stepper, sizes = Stepper(engine), []
    while not all(s.done for s in seqs):
        stepper.step([s for s in seqs if not s.done])
        assert stepper.group is None or all(not s.done for s in stepper.group.seqs)
        sizes.append(len(stepper.group.seqs) if stepper.group else 0)
    assert [s.result().finish_reason for s in seqs] == ["length"] * 5
    assert sorted(set(sizes), reverse=True) == [5, 4, 2, 0]  # the 3-token turn leaves, then the two 5s together
    for s in seqs:
        stepper.release(s)
    assert stepper.max_batch == 5 and stepper.group is None
    for s in seqs:
        gen = s.result()
        assert all(layer.offset == len(gen.cache_tokens) < layer.keys.shape[2] for layer in s.cache)
        fresh, _ = engine.prefill(engine.new_cache(), [], gen.cache_tokens)
        probe = gen.cache_tokens[-1]
        assert mx.allclose(engine.decode_logits([probe], s.cache), engine.decode_logits([probe], fresh),
                           atol=1e-3).item()


@pytest.mark.parametrize("length, passes", [(20, [20]), (32, [32]), (33, [32, 1]), (41, [32, 9]), (64, [32, 32]),
                                            (65, [65])])
def test_a_short_rest_of_the_prompt_runs_in_chunks_the_few_row_kernels_take(engine, length, passes):
    """Where agentd's few-row attention runs (the CPU plan says so), a prompt rest of 33-64
    ids is cut into chunks of at most 32 rows; elsewhere, and for other lengths, one pass."""
    from dataclasses import replace

    from agentd import fewattn

    assert fewattn.MAX_QUERY_ROWS == 32
    prompt = prompt_of(engine, length)
    plan, chunk, counting = engine.plan, engine.prefill_chunk, CountingModel(engine.model)
    engine.model, engine.prefill_chunk = counting, 256
    try:
        for attention, expect in (("agentd", passes), ("mlx", [length])):
            engine.plan = replace(plan, attention=attention)
            counting.passes.clear()
            seq = Sequence(engine, engine.new_cache(), [], prompt, Sampling(max_tokens=1))
            Stepper(engine).run_alone(seq)
            assert counting.passes == expect
            assert seq.cache[0].offset == len(seq.result().cache_tokens) == length
    finally:
        engine.model, engine.prefill_chunk, engine.plan = counting.model, chunk, plan


def test_a_batched_step_gives_each_greedy_row_its_largest_logit_and_each_drawing_row_its_own_draw():
    """All-greedy batches skip the normalisation (an argmax of the logits); a batch with a
    row that draws normalises, and every row samples from its own log-probabilities."""
    logits = mx.array([[0.1, 3.0, -1.0, 2.9], [5.0, 4.0, 4.5, -2.0], [-3.0, -2.0, -1.0, -1.5]])
    greedy = Sampling()
    rows = [SimpleNamespace(sampling=greedy, sampler=make_sampler(greedy)) for _ in range(3)]
    assert Stepper._sample_rows(rows, logits).tolist() == [1, 0, 2]

    drawing = Sampling(temperature=1.0, seed=7)
    rows[1] = SimpleNamespace(sampling=drawing, sampler=make_sampler(drawing))
    alone = make_sampler(drawing)(logits[1:2] - mx.logsumexp(logits[1:2], axis=-1, keepdims=True)).item()
    assert Stepper._sample_rows(rows, logits).tolist() == [1, alone, 2]
