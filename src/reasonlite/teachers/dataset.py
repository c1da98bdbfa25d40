"""The `dataset` teacher: each example's own gold rationale/program (distilling step-by-step's ground-truth-rationale
mode). Offline and free, so it is the embedded default and needs no cache.

The gold is rendered in the requested style's reply format and then goes through the same parsing and verification
as any teacher's reply. With k > 1 every sample index gets the same gold text (there is only one gold trace); the
`all_correct` selection keeps one copy of identical traces. An example without the field the style needs (e.g. a
GSM8K problem whose annotations did not form a program, under style `pal`) gets an empty reply: status no_answer.
"""

from __future__ import annotations

from reasonlite.formats import render_completion
from reasonlite.teachers.base import Completion, OnSample, SampleCollector, TeacherPrompt


class DatasetTeacher:
    kind = "dataset"

    def __init__(self, style: str):
        self.style = style
        self.model_id = "gold"
        self.params = {"style": style}
        self.calls = 0

    async def complete(self, prompts: list[TeacherPrompt], samples: list[list[int]],
                       on_sample: OnSample | None = None) -> list[list[Completion]]:
        collect = SampleCollector(samples, on_sample)
        for i, (prompt, wanted) in enumerate(zip(prompts, samples)):
            ex = prompt.example
            if ex is None:
                raise ValueError("the dataset teacher needs the example behind each prompt (TeacherPrompt.example)")
            text = render_completion(self.style, answer=ex.answer, rationale=ex.rationale, program=ex.program) or ""
            for s in wanted:
                collect(i, s, Completion(text=text))
        return collect.ordered()
