"""Datasets: the `Example` type, file loaders, GSM8K, and the seeded retail-math generator."""

from reasonlite.data.example import Example
from reasonlite.data.gsm8k import load_gsm8k
from reasonlite.data.loaders import DataError, LoadReport, load_examples, load_examples_with_report

__all__ = ["Example", "DataError", "LoadReport", "load_examples", "load_examples_with_report", "load_gsm8k"]
