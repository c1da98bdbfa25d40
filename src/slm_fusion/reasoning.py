"""The reasoning layer: trace budget with budget forcing, program execution (PAL) and self-consistency voting,
applied to any backend through the gateway's `execute` seam, built on `reasonlite`'s primitives.

Per request (the SDK's `extra_body`), overriding the model's `reasoning:` defaults in the gateway config:
  reasoning_budget: N   reasoning is capped at N tokens; a completion that hits the cap without an answer gets its
                        reasoning closed and the answer cue appended ("The answer is" / "    return "), then at most
                        `answer_tokens` more are generated (budget forcing: always an answer, bounded cost);
  pal: true             the completion is a `solution()` program: it runs in reasonlite's sandbox and the choice's
                        content is its result; the program is returned in `choices[i].slm_fusion.program`;
  vote: true            self-consistency: `n` samples (the model's `samples` when n is 1) vote on the extracted or
                        executed answer; ONE choice comes back, with `slm_fusion.agreement` and `slm_fusion.votes`.
                        With the model's `select: verifier` (and `verifier_path`), reasonlite's trained verifier
                        scores the samples instead and the top one answers (`slm_fusion.verifier_score`).
Usage counts every generated token (all samples, the forced answers) and splits them in
`usage.completion_tokens_details` into `reasoning_tokens` and `answer_tokens`.

Budget forcing needs a raw continuation of the chat-formatted prompt (`backend.format_chat`): transformers and
llama.cpp backends have it. An OpenAI-compatible upstream does not expose its template; there the forced answer is
asked for as a continuation of the assistant message (`continue_final_message`, which vLLM understands).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from reasonlite import controller
from reasonlite.budget import stated_budget
from reasonlite.controller import Ask, Generated, Sample, Solution
from reasonlite.formats import ANSWER_CUE, build_messages
from reasonlite.infer import read_student_meta
from slm_fusion import tracing
from slm_fusion.backends.base import Backend, Generation, GenerationRequest, ReasoningOptions
from slm_fusion.config import FusionConfig, ModelBase, ReasoningDefaults
from slm_fusion.errors import InvalidRequest


@dataclass
class _Plan:
    """What one request asks of the layer, after merging request extras over the model's defaults."""

    fmt: str  # cot | pal | answer
    budget: int | None
    vote: bool
    samples: int
    temperature: float
    answer_tokens: int
    select: str = "vote"  # vote | verifier: how the one answer is picked among the samples


class ReasoningLayer:
    def __init__(self, config: FusionConfig | None = None) -> None:
        self.config = config
        self._student_meta: dict[str, dict] = {}
        self._verifiers: dict[str, Any] = {}  # verifier_path -> reasonlite.verifier.Verifier, loaded once

    # -- the seam ---------------------------------------------------------------------------------------------------

    @staticmethod
    def applies(options: ReasoningOptions, model_cfg: ModelBase) -> bool:
        return options.asked() or model_cfg.reasoning.active()

    async def generate(self, backend: Backend, gen: GenerationRequest, model_cfg: ModelBase) -> list[Generation]:
        defaults = model_cfg.reasoning
        plan = self._plan(gen, defaults)
        messages = self._messages(gen, plan, defaults, model_cfg)
        floor = backend.count_tokens(ANSWER_CUE) + 1
        if plan.budget is not None and plan.budget < floor:
            raise InvalidRequest(f"reasoning_budget={plan.budget} is below {floor} tokens: the forced answer cue "
                                 f"'{ANSWER_CUE}' alone takes {floor - 1}; pass at least {floor}",
                                 param="reasoning_budget")
        tracing.annotate({"slm_fusion.reasoning.mode": plan.fmt + ("+vote" if plan.vote else ""),
                          "slm_fusion.reasoning.budget": plan.budget, "slm_fusion.reasoning.select": plan.select})
        if plan.vote:
            samples, prompt_tokens = await self._sample(backend, gen, messages, plan, plan.samples)
            if plan.select == "verifier":
                gens = [await self._verified(samples, prompt_tokens, gen, defaults.verifier_path)]
            else:
                gens = [self._voted(samples, prompt_tokens)]
        else:
            samples, prompt_tokens = await self._sample(backend, gen, messages, plan, gen.n)
            gens = [self._single(s, prompt_tokens) for s in samples]
        tracing.annotate({"slm_fusion.reasoning.forced": sum(bool(s.forced) for s in samples),
                          "slm_fusion.reasoning.samples": len(samples)})
        return gens

    # -- planning -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _plan(gen: GenerationRequest, d: ReasoningDefaults) -> _Plan:
        asked = gen.reasoning
        budget = d.reasoning_budget if asked.reasoning_budget is None else asked.reasoning_budget
        fmt = "pal" if (asked.pal if asked.pal is not None else (d.pal or d.format == "pal")) else \
            ("cot" if d.format == "pal" else d.format)
        vote = (d.vote or d.select == "verifier") if asked.vote is None else bool(asked.vote)
        samples = gen.n if gen.n > 1 else d.samples
        temperature = gen.temperature if not vote or asked.temperature_set else d.vote_temperature
        if budget is not None and budget + d.answer_tokens > gen.max_tokens:
            budget = max(1, gen.max_tokens - d.answer_tokens)  # max_tokens stays the hard ceiling per sample
        return _Plan(fmt, budget, vote, samples, temperature, d.answer_tokens, d.select)

    def _messages(self, gen: GenerationRequest, plan: _Plan, d: ReasoningDefaults,
                  model_cfg: ModelBase) -> list[dict] | None:
        if gen.messages is None or not d.student_prompt:
            return gen.messages
        # A reasonlite student answers best when asked exactly as it was trained: its own instruction (and the
        # budget line when it was trained budget-conditioned), read from the exported folder's reasonlite.json, after
        # the retrieved sources' system message when the request retrieved any (the message its training and eval
        # prompts carry: `build_messages(..., sources=)`). The client's own system messages are not part of it.
        if model_cfg.model not in self._student_meta:  # read once per model, not per request
            self._student_meta[model_cfg.model] = read_student_meta(model_cfg.model) if _is_local(model_cfg.model) else {}
        meta = self._student_meta[model_cfg.model]
        question = next((m["content"] for m in reversed(gen.messages) if m["role"] == "user"), None)
        if question is None:
            raise InvalidRequest("this model answers a question: send at least one user message", param="messages")
        fmt = meta.get("format") or plan.fmt
        budget = stated_budget(plan.budget, bool(meta.get("budget_conditioned")),
                               meta.get("budget_buckets") or meta.get("buckets"))
        return build_messages(question, fmt, budget=budget, sources=gen.sources)

    # -- sampling: reasonlite's controller, answered by the backend -------------------------------------------------

    async def _sample(self, backend: Backend, gen: GenerationRequest, messages: list[dict] | None, plan: _Plan,
                      n: int) -> tuple[list[Sample], int]:
        """n samples of the one question through `reasonlite.controller` (the code `reasonlite eval` runs): reason
        under the cap, force an answer where it is hit, execute or read the answers."""
        try:
            base = backend.format_chat(messages) if messages is not None else gen.prompt
        except NotImplementedError:
            base = None  # upstream model: chat requests, forcing as a continued assistant message
        cap = plan.budget if plan.budget is not None else gen.max_tokens
        prompt_tokens = [0]

        async def answer(ask: Ask) -> list[Generated]:
            if not ask.forced:  # every row continues the one question: one backend call with n choices
                generated = await backend.generate(GenerationRequest(
                    messages=messages if base is None else None, prompt=base, max_tokens=ask.max_tokens,
                    temperature=ask.temperature, top_p=gen.top_p, n=len(ask.rows), stop=list(gen.stop),
                    seed=gen.seed, extra=dict(gen.extra)))
                prompt_tokens[0] = generated[0].prompt_tokens if generated else 0
                return [Generated(g.text, g.completion_tokens, done=g.finish_reason != "length") for g in generated]
            return list(await asyncio.gather(*(self._force(backend, gen, messages, base, ask, prefix)
                                               for prefix in ask.prefixes)))

        steps = controller.sample(controller.Plan(fmt=plan.fmt, cap=cap, n=n, temperature=plan.temperature,
                                                  answer_tokens=plan.answer_tokens), list(range(n)),
                                  backend.count_tokens)
        samples = await controller.run_async(steps, answer)
        return samples, prompt_tokens[0]

    @staticmethod
    async def _force(backend: Backend, gen: GenerationRequest, messages: list[dict] | None, base: str | None,
                     ask: Ask, prefix: str) -> Generated:
        """The forced answer: one line after the closed reasoning and the cue."""
        common = {"max_tokens": ask.max_tokens, "temperature": ask.temperature, "top_p": gen.top_p, "n": 1,
                  "stop": ["\n"], "seed": gen.seed}
        if base is not None:
            req = GenerationRequest(prompt=base + prefix, extra=dict(gen.extra), **common)
        else:
            req = GenerationRequest(
                messages=[*(messages or []), {"role": "assistant", "content": prefix}],
                extra={**gen.extra, "continue_final_message": True, "add_generation_prompt": False}, **common)
        g = (await backend.generate(req))[0]
        return Generated(g.text, g.completion_tokens, done=g.finish_reason != "length")

    # -- results ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _content(s: Sample | Solution) -> str:
        # PAL answers with the program's result; a failed program shows what the model wrote instead.
        return s.answer if s.program is not None and s.answer is not None else s.text

    def _single(self, s: Sample | Solution, prompt_tokens: int, extra: dict | None = None) -> Generation:
        info = {"answer": s.answer, "status": s.status, "forced": s.forced, "program": s.program,
                "error": s.error, "reasoning_tokens": s.reasoning_tokens, "answer_tokens": s.answer_tokens,
                **(extra or {})}
        return Generation(text=self._content(s), finish_reason="stop", prompt_tokens=prompt_tokens,
                          completion_tokens=s.reasoning_tokens + s.answer_tokens,
                          reasoning={k: v for k, v in info.items() if v is not None}, exec_error=s.error,
                          forced_without_answer=s.forced and s.answer is None)

    async def _verified(self, samples: list[Sample], prompt_tokens: int, gen: GenerationRequest,
                        verifier_path: str) -> Generation:
        """The sample reasonlite's verifier scores highest answers (`reasonlite.controller.select_index`)."""
        from reasonlite.verifier import Verifier

        if verifier_path not in self._verifiers:  # loaded on first use, once per folder
            self._verifiers[verifier_path] = await asyncio.to_thread(Verifier.load, verifier_path)
        verifier = self._verifiers[verifier_path]
        question = next((m["content"] for m in reversed(gen.messages or []) if m["role"] == "user"), gen.prompt or "")
        scores = await asyncio.to_thread(verifier.score_samples, question, samples)
        index = controller.select_index(samples, "verifier", scores)
        g = self._voted(samples, prompt_tokens, shown_index=index)
        g.reasoning.update(select="verifier", verifier_score=round(scores[index], 4))
        return g

    def _voted(self, samples: list[Sample], prompt_tokens: int, shown_index: int | None = None) -> Generation:
        """One choice for all the samples: `reasonlite.controller.vote`, as `reasonlite eval` picks it."""
        solution = controller.vote(samples, shown_index=shown_index)
        g = self._single(solution, prompt_tokens, {"agreement": round(solution.agreement, 4),
                                                   "votes": solution.votes, "samples": solution.samples})
        g.agreement = solution.agreement
        return g


def _is_local(path: str) -> bool:
    """An exported folder or a GGUF file (`reasonlite export --gguf` writes reasonlite.json beside it)."""
    from pathlib import Path

    return Path(path).exists()


def make_reasoning_layer(config: FusionConfig) -> ReasoningLayer:
    return ReasoningLayer(config)


def usage_details(gens: list[Generation]) -> dict[str, int] | None:
    """`usage.completion_tokens_details` for a response whose choices went through the layer (None otherwise)."""
    infos = [g.reasoning for g in gens if g.reasoning is not None]
    if not infos:
        return None
    return {"reasoning_tokens": sum(i.get("reasoning_tokens", 0) for i in infos),
            "answer_tokens": sum(i.get("answer_tokens", 0) for i in infos)}
