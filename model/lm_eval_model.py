"""The project's Transformer as an lm-eval model (`lm_eval.api.model.TemplateLM`), in-process.

SlmLM(model, tokenizer, device, max_length) answers lm-eval's three request kinds:
  loglikelihood          (context, continuation) -> (sum of the continuation's log-probs, was it greedy);
                         lm-eval's TemplateLM splits the pair into tokens (encode(context + continuation)
                         minus encode(context)), the split `slm serve` sees from lm-eval's local-completions
  loglikelihood_rolling  a whole text's log-likelihood, in lm-eval's disjoint windows of max_length
  generate_until         greedy continuation until a stop string or max_gen_toks (model.generate.Engine);
                         sampling requests (do_sample / temperature > 0) are refused, not approximated

Why our own class rather than lm-eval's HFLM on the exported HF directory: the eval stage already holds
this model (held-out loss, generations); HFLM would load a second copy through transformers and score
with transformers' forward, not the one serve and the training engine use.

Batching: the rows of a call are sorted by length and cut into batches of about `logits_budget` logit
values (rows x longest row x vocab); requests whose scored rows are the same token sequence (every
single-token choice of one multiple-choice question) share one row. A context longer than the model's
window keeps its end (lm-eval's rule).
Memory: one batch of logits (logits_budget floats) plus the model.
"""
from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


class SlmLM(TemplateLM):
    def __init__(self, model, tokenizer, device, max_length: int, logits_budget: int = 32_000_000,
                 eos_token_id: int | None = None):
        """model: a model.Transformer in eval mode on `device`; tokenizer: a `tokenizers.Tokenizer` (text is
        text: special tokens spelled in a prompt are not special); max_length: the context window used."""
        super().__init__()
        self.model, self.tok, self._device = model, tokenizer, torch.device(device)
        self.max_length, self.logits_budget = max_length, logits_budget
        eos = eos_token_id if eos_token_id is not None else model.config.extra.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if not isinstance(eos, int):
            raise ValueError(f"SlmLM needs the model's end-of-text token id (config extra eos_token_id: {eos!r}); "
                             f"pass eos_token_id")
        self._eot = eos

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    # ---------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows: dict[tuple[int, ...], int] = {}  # scored token row -> index
        need = []  # per request: (row index, [(position, token)])
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            row = tuple(whole[:-1])
            start = len(row) - len(continuation)
            need.append((rows.setdefault(row, len(rows)), [(start + j, t) for j, t in enumerate(continuation)]))
        by_row: dict[int, set[tuple[int, int]]] = {}
        for r, positions in need:
            by_row.setdefault(r, set()).update(positions)
        seqs = list(rows)
        scored: dict[tuple[int, int, int], tuple[float, bool]] = {}  # (row, position, token) -> (logp, is argmax)
        order = sorted(range(len(seqs)), key=lambda r: len(seqs[r]))
        with torch.no_grad():
            for chunk in batches(order, [len(s) for s in seqs], self.logits_budget // self.model.config.vocab_size):
                ids = torch.zeros(len(chunk), max(len(seqs[r]) for r in chunk), dtype=torch.long)
                for i, r in enumerate(chunk):  # right padding: causal attention never looks at it
                    ids[i, :len(seqs[r])] = torch.tensor(seqs[r])
                logits = self.model(ids.to(self.device))
                keys = [(i, r, p, t) for i, r in enumerate(chunk) for p, t in sorted(by_row[r])]
                at = torch.tensor([(i, p, t) for i, _, p, t in keys], device=logits.device)
                logp = torch.log_softmax(logits[at[:, 0], at[:, 1]].float(), dim=-1)
                values = logp.gather(1, at[:, 2:3]).squeeze(1).tolist()
                greedy = (logp.argmax(dim=-1) == at[:, 2]).tolist()
                scored.update({(r, p, t): (v, g) for (_, r, p, t), v, g in zip(keys, values, greedy)})
        out = []
        for r, positions in need:
            parts = [scored[(r, p, t)] for p, t in positions]
            out.append((sum(v for v, _ in parts), all(g for _, g in parts)))
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from model.generate import Engine, SamplingParams

        engine = Engine(self.model, self.tok, device=self.device, dtype=next(self.model.parameters()).dtype,
                        stop_token_ids=[self.eot_token_id])
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs)
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError(f"SlmLM decodes greedily only; the task asks for sampling ({kwargs})")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            done = engine.generate(ids, SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=until))
            out.append(done.text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), done.text)
        return out


def batches(order: list[int], lengths: list[int], max_tokens: int):
    """Consecutive groups of `order` whose padded size (rows x longest row) stays within max_tokens
    (a row longer than that goes alone)."""
    chunk: list[int] = []
    longest = 0
    for r in order:
        if chunk and (len(chunk) + 1) * max(longest, lengths[r]) > max_tokens:
            yield chunk
            chunk, longest = [], 0
        chunk.append(r)
        longest = max(longest, lengths[r])
    if chunk:
        yield chunk
