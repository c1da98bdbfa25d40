"""Data and answer checking: GSM8K program coverage, retail-math generation, answer extraction speed.

Measured side by side in one run:

* GSM8K train -> PAL programs: annotations only vs. annotations + recovered plain equations (coverage of rows with
  a verified chain), and the share of those programs that give the gold answer in the sandbox;
* retail-math generation throughput and the share of gold programs that execute to the gold answer;
* ``extract_answer`` on GSM8K gold rationales (accuracy and speed), ``answers_match`` numeric vs. symbolic (sympy).

Run: ``.venv/bin/python -m benchmarks.bench_data [--quick]``.
"""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.table import Table

from reasonlite.answers import answers_match, extract_answer
from reasonlite.data import generate_retail_math, load_gsm8k
from reasonlite.data.gsm8k import solution_to_program
from reasonlite.data.splits import default_gsm8k_dir
from reasonlite.sandbox import execute_many


def _sandbox_pass_rate(examples) -> tuple[int, float]:
    started = time.perf_counter()
    results = execute_many([e.program for e in examples])
    passed = sum(r.ok and answers_match(r.value, e.answer) for r, e in zip(results, examples, strict=True))
    return passed, time.perf_counter() - started


def run(quick: bool = False) -> dict:
    table = []
    gsm8k_dir = default_gsm8k_dir()
    if (gsm8k_dir / "train.jsonl").exists():
        started = time.perf_counter()
        examples = load_gsm8k(gsm8k_dir, split="train")
        load_s = time.perf_counter() - started
        if quick:
            examples = examples[:1000]
        rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()][: len(examples)]
        only_annotations = sum(
            solution_to_program(r["answer"], e.answer, r["question"], plain_equations=False)[1] == "ok"
            for r, e in zip(rows, examples, strict=True))
        chained = [e for e in examples if e.program]
        passed, sandbox_s = _sandbox_pass_rate(chained)
        n = len(examples)
        table += [
            {"measure": "gsm8k rows with a verified program (annotations only)", "value": only_annotations,
             "share": f"{only_annotations / n:.1%}"},
            {"measure": "gsm8k rows with a verified program (+ plain equations)", "value": len(chained),
             "share": f"{len(chained) / n:.1%}"},
            {"measure": "coverage gain (+plain / annotations only)", "value": f"{len(chained) / only_annotations:.3f}x",
             "share": ""},
            {"measure": "gsm8k programs giving the gold answer in the sandbox", "value": passed,
             "share": f"{passed / max(len(chained), 1):.1%}"},
            {"measure": "gsm8k train load + convert (7473 rows), s", "value": round(load_s, 2), "share": ""},
            {"measure": "gsm8k sandbox check, programs/s", "value": round(len(chained) / sandbox_s), "share": ""},
        ]
        rationales = examples[: 500 if quick else len(examples)]
        started = time.perf_counter()
        extracted_ok = sum(extract_answer(e.rationale) == e.answer for e in rationales)
        extract_s = time.perf_counter() - started
        table += [
            {"measure": "extract_answer on gold rationales: correct", "value": extracted_ok,
             "share": f"{extracted_ok / len(rationales):.1%}"},
            {"measure": "extract_answer, texts/s", "value": round(len(rationales) / extract_s), "share": ""},
        ]

    n_retail = 200 if quick else 2000
    started = time.perf_counter()
    retail = generate_retail_math(n_retail, seed=0)
    gen_s = time.perf_counter() - started
    passed, _ = _sandbox_pass_rate(retail)
    table += [
        {"measure": "retail-math problems generated per second", "value": round(n_retail / gen_s), "share": ""},
        {"measure": "retail-math gold programs giving the gold answer", "value": passed,
         "share": f"{passed / n_retail:.1%}"},
    ]

    pairs = [("18.0", "18"), ("$1,234.50", "1234.5"), ("0.5", "1/2"), ("17", "18")] * (50 if quick else 500)
    started = time.perf_counter()
    for a, b in pairs:
        answers_match(a, b)
    numeric_rate = len(pairs) / (time.perf_counter() - started)
    symbolic = [("2*x+1", "1+2x"), ("x^2-1", "(x-1)*(x+1)")] * (5 if quick else 25)
    started = time.perf_counter()
    for a, b in symbolic:
        answers_match(a, b)
    symbolic_rate = len(symbolic) / (time.perf_counter() - started)
    table += [
        {"measure": "answers_match numeric, pairs/s", "value": round(numeric_rate), "share": ""},
        {"measure": "answers_match symbolic (sympy), pairs/s", "value": round(symbolic_rate), "share": ""},
        {"measure": "numeric / symbolic speed ratio", "value": f"{numeric_rate / symbolic_rate:.0f}x", "share": ""},
    ]

    rich_table = Table(title="data + answers")
    for col in ("measure", "value", "share"):
        rich_table.add_column(col)
    for row in table:
        rich_table.add_row(*(str(row[c]) for c in ("measure", "value", "share")))
    Console().print(rich_table)
    return {"quick": quick, "table": table}


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
