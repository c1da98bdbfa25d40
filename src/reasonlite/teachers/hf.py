"""The `hf` teacher: a local transformers model (any alias/folder `reasonlite.models.load_model` accepts).

Prompts go through the tokenizer's chat template; (prompt, sample) pairs are generated in batches of
`teacher.batch_size` with left padding. Sampling is used when k > 1 and temperature > 0 (greedy otherwise, so k > 1 at
temperature 0 repeats one answer). Each batch is seeded from its first (prompt, sample), so a run is reproducible;
completions are cached like any teacher's, so a re-run does not even load the model. Generation runs in a worker
thread so the event loop (progress bar) stays live.

A local model's reply can be started for it (an API chat model's cannot): for style `pal` the assistant turn is
prefilled with "```python\ndef solution():\n", which keeps small local teachers on the program format. The prefill
is part of the returned text (and of the cache key).
"""

from __future__ import annotations

import asyncio

from reasonlite.config import TeacherConfig
from reasonlite.teachers.base import Completion, OnSample, SampleCollector, TeacherPrompt

PREFILL = {"pal": "```python\ndef solution():\n"}


class HFTeacher:
    kind = "hf"

    def __init__(self, cfg: TeacherConfig, style: str = "pal", seed: int = 0):
        self.cfg = cfg
        self.model_id = cfg.model
        self.seed = seed
        self.prefill = PREFILL.get(style, "")
        self.params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                       "stop": cfg.stop, "seed": seed, "prefill": self.prefill}
        self.calls = 0
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        if self._model is None:  # loaded lazily: a fully cached run never loads the model
            from reasonlite.models import load_model

            self._model, self._tokenizer = load_model(self.cfg.model)

    async def complete(self, prompts: list[TeacherPrompt], samples: list[list[int]],
                       on_sample: OnSample | None = None) -> list[list[Completion]]:
        collect = SampleCollector(samples, on_sample)
        pairs = [(i, s) for i, wanted in enumerate(samples) for s in wanted]
        if pairs:
            await asyncio.to_thread(self._load)
        k_max = max((len(w) for w in samples), default=1)
        sample = self.cfg.temperature > 0 and (k_max > 1 or max((s for w in samples for s in w), default=0) > 0)
        for start in range(0, len(pairs), self.cfg.batch_size):
            batch = pairs[start:start + self.cfg.batch_size]
            texts = await asyncio.to_thread(self._generate, [prompts[i].messages for i, _ in batch],
                                            sample, seed=self.seed * 1_000_003 + batch[0][0] * 64 + batch[0][1])
            for (i, s), completion in zip(batch, texts):
                collect(i, s, completion)
        return collect.ordered()

    def _generate(self, messages: list[list[dict]], sample: bool, seed: int) -> list[Completion]:
        import torch

        tok, model = self._tokenizer, self._model
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) + self.prefill
                 for m in messages]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        kwargs = {"max_new_tokens": self.cfg.max_tokens, "pad_token_id": tok.pad_token_id, "do_sample": sample}
        if sample:
            kwargs.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p)
        if self.cfg.stop:
            kwargs.update(stop_strings=self.cfg.stop, tokenizer=tok)
        torch.manual_seed(seed)
        self.calls += 1
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, n_prompt in zip(new, prompt_lens):
            n_new = int((row != tok.pad_token_id).sum())
            text = tok.decode(row, skip_special_tokens=True)
            for s in self.cfg.stop or []:  # stop_strings keeps the stop text; OpenAI semantics drop it
                if s in text:
                    text = text[: text.index(s)]
            results.append(Completion(text=self.prefill + text, prompt_tokens=int(n_prompt), completion_tokens=n_new,
                                      finish_reason="length" if n_new >= self.cfg.max_tokens else "stop"))
        return results
