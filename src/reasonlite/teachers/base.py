"""The teacher protocol: prompts in, k sampled completions per prompt out.

A teacher is anything with a `kind`, a `model_id`, the sampling `params` that change its outputs (they are part of the
cache key) and one coroutine, `complete`. `complete` asks for specific *sample indices* of each prompt, not just "k
samples", so a resumed run can ask only for the samples the cache does not hold. Each completion is handed to
`on_sample` the moment it arrives, which is where the cache writes it: a crash loses only in-flight calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from reasonlite.data.example import Example


class TeacherError(RuntimeError):
    """The teacher cannot be used at all (unreachable, wrong key, unknown model); the message names the knob to fix."""


@dataclass(frozen=True)
class TeacherPrompt:
    """One question as the teacher sees it: full chat messages (system, few-shot turns, question)."""

    messages: list[dict]
    example: Example | None = None  # the dataset teacher answers from the example's gold fields


@dataclass
class Completion:
    """One sampled teacher answer. `error` marks a non-fatal failure (malformed response): never cached."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    cached: bool = False
    error: str | None = None


# on_sample(prompt_index, sample_index, completion)
OnSample = Callable[[int, int, Completion], None]


@runtime_checkable
class Teacher(Protocol):
    kind: str
    model_id: str
    params: dict  # sampling parameters that change the output (part of the cache key)
    calls: int  # requests / generate() calls made so far (for the build report)

    async def complete(self, prompts: list[TeacherPrompt], samples: list[list[int]],
                       on_sample: OnSample | None = None) -> list[list[Completion]]:
        """For prompt i, return one completion per sample index in samples[i] (same order)."""
        ...


@dataclass
class SampleCollector:
    """Collects per-sample results into the list-of-lists `complete` returns, forwarding each to `on_sample`."""

    samples: list[list[int]]
    on_sample: OnSample | None = None
    results: list[dict[int, Completion]] = field(init=False)

    def __post_init__(self) -> None:
        self.results = [{} for _ in self.samples]

    def __call__(self, prompt_index: int, sample_index: int, completion: Completion) -> None:
        self.results[prompt_index][sample_index] = completion
        if self.on_sample is not None:
            self.on_sample(prompt_index, sample_index, completion)

    def ordered(self) -> list[list[Completion]]:
        return [[got[s] for s in wanted] for got, wanted in zip(self.results, self.samples)]
