"""Datasets: the `Example` type (and its context `Source`s), file loaders, GSM8K, and the seeded retail-math and
retail-docs generators."""

from reasonlite.data.example import Example, Source
from reasonlite.data.gsm8k import load_gsm8k
from reasonlite.data.loaders import DataError, LoadReport, load_examples, load_examples_with_report
from reasonlite.data.retail_math import TEMPLATES, generate_retail_math, retail_math_splits

__all__ = [
    "TEMPLATES",
    "DataError",
    "Example",
    "LoadReport",
    "Source",
    "generate_retail_math",
    "load_examples",
    "load_examples_with_report",
    "load_gsm8k",
    "retail_math_splits",
]
