"""An Ollama `Modelfile` for an exported GGUF student: its chat template, stop tokens and prompt format.

Ollama templates are Go templates, not Jinja, so the student's Jinja chat template is not copied: it is checked to be
ChatML (what SmolLM2 students use) by rendering probe conversations, and the ChatML Go template is written instead.
The template also asks the question the way the student was trained (`formats.build_messages`): the last user turn
gets the format's instruction (and the budget line of a budget-conditioned student), so `ollama run` with a bare
question prompts it as `reasonlite eval` does.
"""

from __future__ import annotations

from reasonlite.budget import stated_budget
from reasonlite.formats import INSTRUCTIONS, TASK_PREFIX, budget_line
from reasonlite.train.formats_data import TrainError

_PROBES = (
    [{"role": "user", "content": "Q1"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}],
)


def _chatml(messages: list[dict], default_system: str | None) -> str:
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def default_system(tokenizer) -> str | None:
    """The system prompt the chat template adds when a conversation has none; raises unless it is ChatML."""
    first = tokenizer.apply_chat_template(_PROBES[0], tokenize=False, add_generation_prompt=True)
    head = "<|im_start|>system\n"
    system = first[len(head):first.index("<|im_end|>")] if first.startswith(head) else None
    for probe in _PROBES:
        if tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True) != _chatml(probe, system):
            raise TrainError("Modelfile: the student's chat template is not ChatML, the only one translated to "
                             "Ollama's Go template syntax; write the Modelfile's TEMPLATE by hand")
    return system


def _question_wrap(meta: dict) -> tuple[str, str]:
    """(before, after) the user's question: `formats.build_messages` for the student's format and budget."""
    fmt = meta.get("format") or "cot"
    before, after = (f"{TASK_PREFIX['label']} ", "") if fmt == "step_by_step" else ("", f"\n{INSTRUCTIONS[fmt]}")
    cap = meta.get("reasoning_budget", meta.get("inference_cap"))  # `inference_cap`: exports before the rename
    budget = stated_budget(cap, bool(meta.get("budget_conditioned")), meta.get("budget_buckets"))
    if budget is not None:
        after += f"\n{budget_line(budget)}"
    return before, after


def modelfile_text(gguf_name: str, tokenizer, meta: dict) -> str:
    system = default_system(tokenizer)
    before, after = _question_wrap(meta)
    last_user = "and $last (eq $m.Role \"user\")"
    template = (
        "{{- range $i, $m := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ $m.Role }}\n"
        f"{{{{ if {last_user} }}}}{before}{{{{ end }}}}{{{{ $m.Content }}}}"
        f"{{{{ if {last_user} }}}}{after}{{{{ end }}}}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    )
    stops = dict.fromkeys(t for t in ("<|im_end|>", tokenizer.eos_token, "<|endoftext|>") if t)
    lines = [f"# ReasonLite student ({meta.get('format')} format), `ollama create NAME -f Modelfile`",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system is not None:  # Ollama adds it when a request has no system message, as the Jinja template does
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["# greedy, as reasonlite eval measures the student", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"
