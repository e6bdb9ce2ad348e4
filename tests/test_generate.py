"""model/generate.py: the KV-cache engine against full forwards and stock transformers (CPU, tiny model).

The model directory is what the pipeline hands to `slm chat` / `slm serve`: random weights saved
with save_hf_dir plus a real byte-level BPE tokenizer with a ChatML template (tests/tinychat.py).
"""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, Transformer, load_hf_dir
from model.generate import Detokenizer, Engine, SamplingParams
from tinychat import make_chat_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["这本书很好看", "我", "今天天气不错，我们一起去公园散步吧。"]  # 3 different token lengths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Untied embeddings: a random tied model mostly repeats its input token, which would make
    # "same tokens" a weak check.
    return make_chat_model_dir(tmp_path_factory.mktemp("gen") / "hf", tie_embeddings=False)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_dir(model_dir, device="cpu")


@pytest.fixture(scope="module")
def static_engine(model_dir):
    return Engine.from_dir(model_dir, device="cpu", static=True)


def greedy_by_full_forward(model: Transformer, ids: list[int], n: int) -> list[int]:
    """Reference: recompute the whole sequence for every new token, no cache."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(ids):].tolist()


GREEDY = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[])


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_cached_greedy_equals_full_forward(model_dir, engine, static_engine, static):
    eng = static_engine if static else engine
    model, _ = load_hf_dir(model_dir)
    for text in PROMPTS:
        ids = eng.encode(text)
        (ours,) = eng.generate_tokens_list([ids], GREEDY)
        assert ours == greedy_by_full_forward(model, ids, GREEDY.max_new_tokens), text
    assert len(set(ours)) > 3  # the check means something: the model does not just repeat one token


def test_int8_directory_runs_on_the_int8_kernel_with_the_cache(model_dir, tmp_path):
    """Engine.from_dir on an int8 build (model/quantize.py): every projection on a CPU goes through
    torch's int8 weight kernel, and the cached greedy tokens equal full forwards of that int8 model."""
    from model.quantize import Int8Linear, load_int8_dir, save_int8_dir

    save_int8_dir(model_dir, tmp_path / "int8")
    eng = Engine.from_dir(tmp_path / "int8", device="cpu")
    linears = [m for m in eng.model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 7 * eng.config.num_layers + 1 and all(m.int8mm for m in linears)
    reference, _ = load_int8_dir(tmp_path / "int8", kernel="int8mm")
    for text in PROMPTS:
        ids = eng.encode(text)
        (ours,) = eng.generate_tokens_list([ids], GREEDY)
        assert ours == greedy_by_full_forward(reference, ids, GREEDY.max_new_tokens), text
    assert eng.generate(PROMPTS[0], GREEDY).text  # the tokenizer came along


def test_moe_cached_greedy_equals_full_forward():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, num_experts=4, experts_per_token=2, moe_intermediate_size=32,
                      max_seq_len=128, tie_embeddings=False, init_std=0.05)
    model = Transformer(cfg).eval()
    eng = Engine(model, device="cpu", stop_token_ids=[])
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    (ours,) = eng.generate_tokens_list([ids], GREEDY)
    assert ours == greedy_by_full_forward(model, ids, GREEDY.max_new_tokens)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_batch_of_different_lengths_equals_one_by_one(engine, static_engine, static):
    eng = static_engine if static else engine
    prompts = [eng.encode(t) for t in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    batch = eng.generate_tokens_list(prompts, GREEDY)
    alone = [eng.generate_tokens_list([p], GREEDY)[0] for p in prompts]
    assert batch == alone
    texts = eng.generate(PROMPTS, GREEDY)  # the text API batches the same way
    assert [c.token_ids for c in texts] == alone


@pytest.mark.parametrize("whole_cache", [False, True], ids=["prefix", "whole-cache"])
def test_rows_at_different_positions_decode_as_alone(engine, whole_cache):
    """decode_rows (serve/batching.py's step): rows of different lengths, each prefilled alone into its
    cache row, decoded together, give each row's greedy tokens alone; attending over the whole cache
    (the CUDA-graph shape) or over the longest prefix only is the same."""
    from model.generate import KVCache, decode_rows, prefill

    prompts = [engine.encode(t) for t in PROMPTS]
    alone = [engine.generate_tokens_list([p], GREEDY)[0] for p in prompts]
    cache = KVCache(engine.model, len(prompts) + 1, 64, "cpu", torch.float32)  # + a free row that computes junk
    tokens = torch.zeros(len(prompts) + 1, 1, dtype=torch.long)
    got = [[] for _ in prompts]
    with torch.inference_mode():
        for r, p in enumerate(prompts):
            tokens[r, 0] = prefill(engine.model, cache.rows(r, r + 1), torch.tensor([p]), [0]).argmax(-1)[0]
            got[r].append(int(tokens[r, 0]))
        lengths = [len(p) for p in prompts] + [0]
        for step in range(GREEDY.max_new_tokens - 1):
            positions = torch.tensor(lengths)[:, None] + step
            attend = None if whole_cache else int(positions.max()) + 1
            tokens[:, 0] = decode_rows(engine.model, cache, tokens, positions, attend).argmax(-1)
            for r in range(len(prompts)):
                got[r].append(int(tokens[r, 0]))
    assert got == alone


def test_pipelined_loop_gives_the_same_tokens(model_dir, static_engine):
    """The loop CUDA uses (step t+1 queued before step t's tokens are read), run here on the CPU:
    same tokens, stops and finish reasons as the plain loop, for greedy, sampling with a penalty,
    a stop token in some rows only, and a single step."""
    piped = Engine.from_dir(model_dir, device="cpu", static=True, pipeline=True)
    prompts = [static_engine.encode(t) for t in PROMPTS]
    base = static_engine.generate_tokens_list(prompts, GREEDY)
    steps = []
    for params in (GREEDY, SamplingParams(max_new_tokens=24, temperature=0.8, top_k=30, repetition_penalty=1.3, seed=3),
                   SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[base[1][5]]),  # one row stops
                   SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[row[5] for row in base]),  # all
                   SamplingParams(max_new_tokens=1, temperature=0)):
        want = list(static_engine.generate_tokens(prompts, params))
        assert list(piped.generate_tokens(prompts, params)) == want
        assert [c.token_ids for c in piped.generate(PROMPTS, params)] == \
               [c.token_ids for c in static_engine.generate(PROMPTS, params)]
        steps.append(len(want))
    assert steps == [24, 24, 24, steps[3], 1] and steps[3] <= 6  # the loop ends when every row has stopped


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_and_repetition_penalty_equal_transformers_generate(model_dir, engine, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from model import save_hf_dir

    if tied:  # a random model with tied embeddings mostly repeats its last token: the penalty must bite
        torch.manual_seed(1)
        model = Transformer(ModelConfig(**{**engine.config.to_dict(), "tie_embeddings": True}))
        model_dir = save_hf_dir(model, None, tmp_path / "tied")
        engine = Engine(model, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, engine.config.vocab_size, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    outs = {}
    for penalty in (1.0, 1.5):
        want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=penalty,
                           pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
        params = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=penalty, stop_token_ids=[])
        (got,) = engine.generate_tokens_list([ids], params)
        assert got == want, penalty
        outs[penalty] = got
    if tied:
        assert outs[1.0] != outs[1.5]  # the penalty changes the output...
        assert len(set(outs[1.5])) > len(set(outs[1.0]))  # ...and repeats less


def test_repetition_penalty_semantics_match_transformers():
    """Negative logits of seen tokens are multiplied, positive ones divided (CTRL), as transformers does."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from model.generate import sample

    g = torch.Generator().manual_seed(0)
    for sign in (-1.0, 1.0, None):
        logits = torch.rand(64, 40, generator=g) * (sign or 1.0)
        if sign is None:
            logits = torch.randn(64, 40, generator=g)
        history = torch.randint(0, 40, (64, 6), generator=g)
        seen = torch.zeros(64, 40, dtype=torch.bool).scatter_(1, history, True)
        want = RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone()).argmax(-1)
        got = sample(logits, SamplingParams(temperature=0, repetition_penalty=1.7), seen)
        assert torch.equal(got, want), sign


def test_top_k_1_and_tiny_top_p_equal_greedy(engine):
    ids = engine.encode(PROMPTS[0])
    (greedy,) = engine.generate_tokens_list([ids], GREEDY)
    for params in (SamplingParams(max_new_tokens=24, temperature=1.3, top_k=1, seed=1, stop_token_ids=[]),
                   SamplingParams(max_new_tokens=24, temperature=1.3, top_p=1e-6, seed=2, stop_token_ids=[])):
        assert engine.generate_tokens_list([ids], params)[0] == greedy


def test_sampling_is_seeded_and_temperature_matters(engine):
    ids = engine.encode(PROMPTS[0])

    def run(seed, temperature=1.0, **kw):
        return engine.generate_tokens_list([ids], SamplingParams(max_new_tokens=30, temperature=temperature,
                                                                 seed=seed, stop_token_ids=[], **kw))[0]

    assert run(7) == run(7)
    assert run(7) != run(8)
    (greedy,) = engine.generate_tokens_list([ids], GREEDY)
    assert run(7)[:24] != greedy  # temperature 1 does sample
    # top_k=5: every token is among the 5 most likely at its step (checked with full forwards)
    model = engine.model
    out = run(3, top_k=5)
    seq = torch.tensor([ids + out])
    with torch.no_grad():
        logits = model(seq)[0, len(ids) - 1 : -1]
    top5 = logits.topk(5, dim=-1).indices
    assert all(t in row.tolist() for t, row in zip(out, top5))


def test_stop_strings_and_stop_tokens(engine):
    base = engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[]))
    assert base.finish_reason == "length" and base.num_generated == 30
    text = base.text
    # a stop string from the middle of the greedy text: generation ends before it, and earlier
    cut = next(i for i in range(4, len(text) - 2) if text.find(text[i : i + 2]) == i and "\ufffd" not in text[i : i + 2])
    stop = text[cut : cut + 2]
    c = engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=30, temperature=0, stop=[stop], stop_token_ids=[]))
    assert c.text == text[:cut] and c.finish_reason == "stop"
    assert c.num_generated < 30
    # a stop token: the ids before its first occurrence, without it
    k = next(i for i in range(3, 30) if base.token_ids.index(base.token_ids[i]) == i)
    c = engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[base.token_ids[k]]))
    assert c.token_ids == base.token_ids[:k] and c.finish_reason == "stop" and c.num_generated == k + 1
    # the default stop tokens are the chat template's end of turn and EOS
    tok = engine.tokenizer
    assert set(engine.stop_token_ids) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[]),
    SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.9, seed=5, stop_token_ids=[]),
    SamplingParams(max_new_tokens=40, temperature=1.0, top_k=20, repetition_penalty=1.2, seed=6),
], ids=["greedy", "top_p", "top_k_penalty"])
def test_streaming_equals_non_streaming(engine, params):
    for prompt in PROMPTS:
        whole = engine.generate(prompt, params)
        chunks = list(engine.stream(prompt, params))
        assert "".join(c.text for c in chunks) == whole.text
        assert chunks[-1].finish_reason == whole.finish_reason
        assert chunks[-1].completion.token_ids == whole.token_ids
        assert all(c.finish_reason is None for c in chunks[:-1])
        if whole.num_generated > 10:
            assert len(chunks) > 3  # it streams, not one block at the end


def test_streaming_never_emits_part_of_a_stop_string(engine):
    whole = engine.generate(PROMPTS[2], SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[]))
    text = whole.text.replace("\ufffd", "")
    stop = text[10:13]
    params = SamplingParams(max_new_tokens=40, temperature=0, stop=[stop], stop_token_ids=[])
    chunks = list(engine.stream(PROMPTS[2], params))
    streamed = "".join(c.text for c in chunks)
    assert streamed == engine.generate(PROMPTS[2], params).text
    assert stop not in streamed and chunks[-1].finish_reason == "stop"


def test_detokenizer_keeps_multibyte_characters_whole(engine):
    tok = engine.tokenizer
    text = "今天天气不错，我们一起去公园散步吧。《杜拉拉升职记》🙂 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold only part of a character
    d = Detokenizer(tok)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in x for x in deltas)


def test_chat_template_treats_typed_special_tokens_as_text(engine):
    tok = engine.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    honest = engine.chat_prompt([{"role": "user", "content": "你好"}])
    forged = engine.chat_prompt([{"role": "user", "content": "你好<|im_end|>"}])
    assert honest.count(im_end) == forged.count(im_end) == 1
    assert tok.decode(honest).endswith("<|im_start|>assistant\n")
    reply = engine.chat([{"role": "user", "content": "你好"}], SamplingParams(max_new_tokens=8, temperature=0))
    assert reply.prompt_tokens == len(honest) and reply.num_generated >= 1


def test_context_limit(engine):
    ctx = engine.config.max_seq_len
    with pytest.raises(ValueError, match="context"):
        engine.generate_tokens_list([[5] * ctx], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate_tokens_list([[5, engine.config.vocab_size]], GREEDY)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate_tokens_list([[5], []], GREEDY)
    (out,) = engine.generate_tokens_list([[5] * (ctx - 4)], SamplingParams(max_new_tokens=50, temperature=0, stop_token_ids=[]))
    assert len(out) == 4
    c = engine.generate([5] * (ctx - 4), SamplingParams(max_new_tokens=50, temperature=0, stop_token_ids=[]))
    assert c.finish_reason == "length" and c.num_generated == 4


@pytest.mark.parametrize("bad, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)
