"""The ONE ReasonLite config: every technique is a knob here, declared once with a one-line doc.

Sections follow the pipeline: data -> teacher -> traces -> budget -> student/train -> contrastive -> eval -> tune.
The tuner names knobs by dotted path (`traces.self_consistency.k`), so every field is reachable that way.
Validation errors name the dotted path and say how to fix the value.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RationaleStyle = Literal["cot", "pal", "step_by_step"]
StudentFormat = Literal["answer", "cot", "pal", "step_by_step"]
SynthesisOp = Literal["rephrase", "new_numbers", "new_story", "extra_step", "irrelevant_context"]
ContextMode = Literal["none", "gold", "retrieved", "gold_retrieved"]
RETRIEVING_MODES = ("retrieved", "gold_retrieved")  # the context modes that search context.vector_store
BUILTIN_SOURCES = ("retail_math", "retail_docs", "gsm8k")


class Section(BaseModel):
    # Unknown keys are refused on purpose: a typo in a YAML knob must not silently fall back to the default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MixSource(Section):
    source: str = Field(description="'retail_math', 'retail_docs', 'gsm8k', or a .jsonl/.csv path mixed into the training set")
    name: str | None = Field(None, description="prefix of this source's eval splits ('<name>:test'); default: the source's name")
    path: str | None = Field(None, description="GSM8K folder when source is 'gsm8k'")
    weight: float = Field(1.0, ge=0, description="training questions taken = weight * data.n_train; 0 = evaluated only (a forgetting guard)")
    n_test: int | None = Field(None, ge=1, description="questions per eval split of this source (None = data.n_test)")
    field_mapping: dict[str, str] | None = Field(None, description="our field -> source column (or '{col} {col}' template) for a file source")

    @property
    def label(self) -> str:
        return self.name or (self.source if self.source in BUILTIN_SOURCES else Path(self.source).stem)


class DataConfig(Section):
    source: str = Field("retail_math", description="'retail_math' or 'retail_docs' (built-in generators), 'gsm8k', or a .jsonl/.csv/HF-datasets path")
    path: str | None = Field(None, description="GSM8K folder or train file when source is 'gsm8k' (default ../shared/data/gsm8k)")
    n_train: int = Field(400, ge=1, description="training questions to take (generated or the first N loaded)")
    n_test: int = Field(100, ge=1, description="held-out questions with the training templates (or the first N of the test file)")
    # retail_math only; the *_templates names of the first generator are still accepted (examples/, old runs)
    n_test_heldout_families: int = Field(100, ge=0, validation_alias=AliasChoices("n_test_heldout_families", "n_test_heldout_templates"), description="retail_math: questions from story families never trained on (split test_heldout_families, alias test_heldout_templates)")
    heldout_families: list[str] | None = Field(None, validation_alias=AliasChoices("heldout_families", "heldout_templates"), description="retail_math families held out of training (None = the generator's default: food_bank, fundraiser)")
    n_test_reworded: int | None = Field(None, ge=0, description="retail_math: questions of trained structures in phrasings never trained on (split test_reworded); None = n_test")
    distractors: float = Field(0.0, ge=0, le=1, description="retail_math: probability that a question gets 1-2 irrelevant sentences (GSM-IC style); answers never change")
    vary_wording: bool = Field(False, description="retail_math: each training question draws every sentence's wording (6 wordings, never the reworded split's) and (with vary_order) the order of its order-free facts, so numbers bind to meaning, not position; eval splits unchanged")
    vary_order: bool = Field(True, description="with vary_wording: also shuffle the order-free count changes (the program follows) and state the start after them a third of the time; false varies the wording only")
    vary_vocabulary: bool = Field(False, description="retail_math: each training question draws the story words that name its variables (verb, period, damage word, container, recipients) from wider pools, none a held-out family's; eval splits unchanged")
    n_wordings: int = Field(6, ge=6, le=11, description="retail_math, with vary_wording: how many wordings each training sentence draws from (6 = sessions 9-11's, up to 11; the reworded split's wording is never one)")
    kinds: list[str] | Literal["all"] | None = Field(None, description="retail_docs question kinds drawn at all (None = the 7 classic kinds of sessions 6-7; all = every one of the 18); training takes those not held out")
    heldout_kinds: list[str] | None = Field(None, description="retail_docs question kinds held out of training (None = the generator's default: stock_value, price_match)")
    n_test_heldout_kinds: int | None = Field(None, ge=0, description="retail_docs: questions of the held-out kinds (split test_heldout_kinds); None = n_test")
    test_path: str | None = Field(None, description="explicit eval file (.jsonl/.csv); overrides the source's test split")
    field_mapping: dict[str, str] | None = Field(None, description="our field -> source column, e.g. {question: prompt, answer: label}")
    on_bad_rows: Literal["skip", "fail"] = Field("skip", description="bad input rows: skip them with a count, or fail naming file:line")
    seed: int = Field(0, description="seed for generation and shuffling")
    program_names: bool = Field(True, description="gsm8k: name each given quantity and step from the question's words (friends_april = 48); False = the v1 = 48 / 2 form (3x better on GSM8K with SmolLM2-135M: docs/benchmarks.md)")
    mix: list[MixSource] = Field([], description="more sources mixed into the training set, each with a weight; their eval splits are named '<name>:<split>'")

    @field_validator("kinds", mode="before")
    @classmethod
    def _kinds_all_or_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all":
            raise ValueError(f"'{value}' is neither all nor a list of retail_docs kinds (e.g. [case_cost, units_cost])")
        return value


class TeacherConfig(Section):
    kind: Literal["dataset", "hf", "openai"] = Field("dataset", description="'dataset' = the example's own gold rationale/program (offline), 'hf' = a local transformers model, 'openai' = any OpenAI-compatible endpoint")
    model: str | None = Field(None, description="teacher model name (openai) or alias/path (hf)")
    base_url: str | None = Field(None, description="openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: name of the environment variable holding the key")
    concurrency: int = Field(8, ge=1, le=1024, description="openai: max in-flight requests")
    timeout_s: float = Field(60.0, gt=0, description="openai: per-request timeout in seconds")
    transport: Literal["aiohttp", "httpx"] = Field(
        "aiohttp", description="openai: HTTP layer under the client; aiohttp costs less CPU per request than httpx's")
    max_retries: int = Field(5, ge=0, description="retries on 429/5xx/connection errors (exponential backoff, honours Retry-After)")
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature (0 = greedy; k>1 needs > 0 to differ)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_tokens: int = Field(384, ge=1, description="max completion tokens per teacher sample")
    stop: list[str] | None = Field(None, description="stop strings sent to the teacher")
    batch_size: int = Field(8, ge=1, description="hf: prompts generated together")
    cache_path: str | None = Field(None, description="SQLite teacher cache (default: <run dir>/../teacher_cache.sqlite, shared by runs)")

    @model_validator(mode="after")
    def _needs_model(self) -> TeacherConfig:
        if self.kind in ("hf", "openai") and not self.model:
            raise ValueError(f"teacher.model is required when teacher.kind is '{self.kind}' (e.g. model: gpt-4o-mini)")
        if self.kind == "openai" and not self.base_url:
            raise ValueError("teacher.base_url is required for teacher.kind 'openai' (e.g. https://api.openai.com/v1)")
        return self


class SelfConsistencyConfig(Section):
    k: int = Field(1, ge=1, le=64, description="teacher samples per question")
    min_agreement: float = Field(0.0, ge=0, le=1, description="drop questions whose majority answer has a smaller share of the k votes")
    selection: Literal["all_correct", "one_per_question", "shortest_correct"] = Field("all_correct", description="which verified traces to keep per question")
    pseudo_label: bool = Field(True, description="without gold answers, use the majority vote as the label")


class SynthesizeConfig(Section):
    """TinyGSM-style synthesis: an hf/openai teacher writes new problems with programs (traces/synthesize.py)."""

    enabled: bool = Field(False, description="ask the teacher for new problems with programs, written from verified seed problems, and train on the verified ones (needs an hf/openai teacher and traces.style pal)")
    per_seed: int = Field(4, ge=1, le=64, description="new problems asked for per seed problem (the ops take turns)")
    ops: list[SynthesisOp] = Field(["rephrase", "new_numbers", "new_story", "extra_step", "irrelevant_context"], description="synthesis operations: rephrase, new_numbers, new_story, extra_step, irrelevant_context")
    max_seeds: int | None = Field(100, ge=1, description="seed problems: the first N training examples whose gold program runs to the gold answer; None = all")
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="drop a new problem whose word-trigram Jaccard with its seed or an earlier kept problem is at least this")
    contamination_ngram: int = Field(13, ge=3, description="drop a new problem sharing a word n-gram of this length with any eval question")

    @field_validator("ops")
    @classmethod
    def _distinct_ops(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("traces.synthesize.ops must be a non-empty list of distinct ops, e.g. [rephrase, new_numbers]")
        return v


class AugmentConfig(Section):
    k: int = Field(0, ge=0, le=64, description="program-aided augmentation: verified variants per correct PAL trace (givens redrawn, re-executed); 0 = off")
    distractors: float = Field(0.0, ge=0, le=1, description="share of variants that get one irrelevant sentence (GSM-IC style)")
    contamination_ngram: int = Field(13, ge=4, le=50, description="a variant sharing a word n-gram of this length with any eval question is dropped")


class TracesConfig(Section):
    style: RationaleStyle = Field("pal", description="rationale style the teacher is asked for: cot, pal (solution() program) or step_by_step")
    few_shot: int = Field(2, ge=0, le=16, description="few-shot exemplars in the teacher prompt")
    few_shot_path: str | None = Field(None, description="JSONL of exemplars (question, rationale/program, answer); default built-ins")
    verify: bool = Field(True, description="execute programs / compare answers with gold and keep only correct traces")
    self_consistency: SelfConsistencyConfig = Field(default_factory=SelfConsistencyConfig, description="voting over k samples")
    counterfactual_negatives: bool = Field(True, description="make a rejected trace by perturbing a correct program when the teacher produced no wrong one")
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig, description="teacher synthesis of new problems (TinyGSM recipe)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="program-aided augmentation of verified programs (no teacher)")
    context: ContextMode = Field("none", description="sources put before each training question, in the teacher's and the student's prompt: none, gold (the example's own context), retrieved (the top context.top_k chunks of context.vector_store) or gold_retrieved (the gold sources shuffled among the retrieved chunks: hard RAFT distractors)")
    context_distractors: int = Field(0, ge=0, le=8, description="RAFT: with traces.context gold, add N documents of other training questions to each question's sources, shuffled with the gold ones, so the student learns to pick the source that answers (retrieval at serving time brings such neighbours); 0 = gold only")


class ContextConfig(Section):
    """Where 'retrieved' sources come from (traces.context, eval.context_modes): the OpenAI vector-store search API of
    any endpoint, our gateway's or OpenAI's (reasonlite/context.py)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="endpoint serving /vector_stores/{id}/search, e.g. the gateway of `slm-fusion serve` or https://api.openai.com/v1")
    vector_store: str | None = Field(None, description="vector store id (vs_...) or name (as `slm-fusion store ingest DIR --store NAME` made it); needed for 'retrieved'")
    top_k: int = Field(3, ge=1, le=50, description="chunks retrieved per question (the gateway's context.top_k for the same prompt)")
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the environment variable holding the endpoint's key ('EMPTY' is sent when unset)")
    timeout_s: float = Field(30.0, gt=0, description="per-search timeout in seconds")
    cache_path: str | None = Field(None, description="SQLite cache of search results (default: <runs_dir>/retrieval_cache.sqlite): a rerun searches only for new questions")


# Knobs renamed so that one knob has one name in reasonlite's YAML and the gateway's (old dotted name -> new): the
# old name is accepted for one release with a one-line warning, and hashes keep using it (`config_hash`), so the
# rename re-runs no finished stage and a tune study started before it still resumes.
RENAMED_KNOBS: dict[str, str] = {"budget.inference_cap": "budget.reasoning_budget"}
_warned_renames: set[str] = set()
log = logging.getLogger("reasonlite.config")


def current_name(dotted: str) -> str:
    """The knob's name today (`budget.inference_cap` -> `budget.reasoning_budget`, with the one-line warning)."""
    new = RENAMED_KNOBS.get(dotted)
    if new is None:
        return dotted
    if dotted not in _warned_renames:  # once per process: tune builds a config per trial
        _warned_renames.add(dotted)
        log.warning("warning: %s is deprecated, rename it %s (the old name goes in the next release)", dotted, new)
    return new


def accept_renamed(data: Any, section: str) -> Any:
    """`data` (one section's raw mapping) with each old knob name of `section` moved to its new name."""
    if not isinstance(data, dict):
        return data
    for old, new in RENAMED_KNOBS.items():
        old_section, old_field = old.rsplit(".", 1)
        new_field = new.rsplit(".", 1)[1]
        if old_section != section or old_field not in data:
            continue
        if new_field in data:
            raise ValueError(f"{old} and {new} are the same knob (old and new name): keep only {new}")
        current_name(old)
        data = {**data, new_field: data[old_field]}
        del data[old_field]
    return data


def hash_names(picked: dict) -> dict:
    """`picked` (dotted section -> dumped value) with renamed knobs under their old names, for stable hashes."""
    out = dict(picked)
    for old, new in RENAMED_KNOBS.items():
        if new in out:
            out[old] = out.pop(new)
        section, old_field = old.rsplit(".", 1)
        new_field = new.rsplit(".", 1)[1]
        if isinstance(out.get(section), dict) and new_field in out[section]:
            inner = dict(out[section])
            inner[old_field] = inner.pop(new_field)
            out[section] = inner
    return out


class BudgetConfig(Section):
    max_trace_tokens: int | None = Field(None, ge=1, description="data side: rationale token budget (student tokenizer); None = no cap")
    data_policy: Literal["drop", "prefer_shortest", "truncate"] = Field("drop", description="what to do with traces over max_trace_tokens")
    condition_training: bool = Field(False, description="train side: state a token budget in the prompt, drawn from the trace's length bucket")
    buckets: list[int] = Field([32, 64, 128, 256, 512], description="length buckets for budget-conditioned prompts")
    compress: bool = Field(False, description="cot, with condition_training: also train on each rationale's compressed form (its equations, single-use results inlined) at that form's bucket")
    reasoning_budget: int | None = Field(None, ge=1, description="inference side: hard cap on reasoning tokens (the gateway's reasoning.reasoning_budget); None = max_new_tokens")
    forcing: bool = Field(True, description="when the cap is hit before an answer, append the answer cue and generate the answer")
    answer_tokens: int = Field(16, ge=1, description="tokens allowed for the forced answer after the cue")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return accept_renamed(data, "budget")

    @field_validator("buckets")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 for b in v) or sorted(v) != v:
            raise ValueError("budget.buckets must be a non-empty increasing list of positive token counts, e.g. [32, 64, 128]")
        return v


class StudentConfig(Section):
    model: str = Field("smollm2-135m-instruct", description="student alias, HF folder or GGUF file")
    format: StudentFormat = Field("pal", description="what the student learns to emit: answer, cot, pal or step_by_step")
    lora: bool = Field(True, description="LoRA (PEFT) instead of full fine-tuning")
    lora_r: int = Field(16, ge=1, le=512, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    lora_target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], description="module names LoRA adapts")


class TrainConfig(Section):
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="peak learning rate (LoRA likes ~1e-3, full FT ~5e-5)")
    max_steps: int = Field(150, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="per-device batch size")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_length: int = Field(384, ge=16, description="max tokens of prompt + completion")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="linear warmup fraction")
    seed: int = Field(0, description="seed for init, data order and dropout")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (resume continues from the last one)")
    step_by_step_alpha: float = Field(0.5, ge=0, le=1, description="step_by_step loss = alpha*label + (1-alpha)*rationale")
    epochs_cap: int = Field(20, ge=1, description="upper bound on passes over the data when max_steps would exceed it")
    packing: bool = Field(False, description="padding-free: pack each batch's examples into rows of up to max_length tokens, no cross-example attention")
    group_by_length: bool = Field(False, description="draw batches of similar length (HF LengthGroupedSampler, its batches shuffled) to cut padding; changes the data order")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads for training (None = torch's default)")


class ContrastiveConfig(Section):
    enabled: bool = Field(False, description="run a DPO stage on (chosen, rejected) rationale pairs after SFT")
    beta: float = Field(0.1, gt=0, description="DPO beta (strength of the preference)")
    nll_weight: float = Field(1.0, ge=0, description="weight of the SFT/NLL term on the chosen rationale (RPO)")
    max_steps: int = Field(30, ge=1, description="DPO optimizer steps")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="DPO learning rate")
    batch_size: int = Field(4, ge=1, description="DPO batch size (pairs)")


class EvalConfig(Section):
    splits: list[str] = Field(["test", "test_heldout_families", "test_reworded"], description="which held-out splits of the data source to evaluate (a data.mix source's as '<name>:<split>')")
    limit: int | None = Field(None, ge=1, description="evaluate at most N questions per split")
    budgets: list[int] = Field([], description="extra inference caps to evaluate (one point per budget on the accuracy-vs-tokens plot)")
    n: int = Field(1, ge=1, le=64, description="self-consistency samples at inference (1 = greedy)")
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature when n > 1")
    early_exit: bool = Field(True, description="adaptive consistency: stop sampling once the majority cannot be overturned")
    max_new_tokens: int = Field(256, ge=1, description="generation cap when no budget is set")
    calculator: bool = Field(False, description="cot/answer students: compute every 'EXPRESSION =' the student writes and force the exact result")
    batch_size: int = Field(16, ge=1, description="questions generated together")
    compare_base: bool = Field(True, description="also evaluate the untrained base student prompted the same way")
    select: Literal["greedy", "vote", "verifier"] = Field("vote", description="which of the n samples answers: greedy (one greedy sample, n 1), vote (majority; n 1 is the greedy answer), verifier (top score of eval.verifier_path)")
    verifier_path: str | None = Field(None, description="folder written by `reasonlite verifier train` (needed when eval.select is verifier)")
    context_modes: list[ContextMode] = Field(["none"], description="sources given with each eval question, one report per mode: none, gold (the example's own context), retrieved (context.vector_store's top chunks)")

    @model_validator(mode="after")
    def _select_needs(self) -> EvalConfig:
        if self.select == "verifier" and not self.verifier_path:
            raise ValueError("eval.verifier_path is required when eval.select is 'verifier': train one with "
                             "`reasonlite verifier train CONFIG` and set eval.verifier_path to its folder")
        if self.select == "greedy" and self.n > 1:
            raise ValueError(f"eval.select 'greedy' answers with one greedy sample but eval.n is {self.n}: set "
                             "eval.n: 1, or eval.select: vote / verifier to use the n samples")
        return self


class VerifierConfig(Section):
    k: int = Field(8, ge=2, le=64, description="programs sampled from the student per training question")
    n_questions: int = Field(200, ge=1, description="training questions to sample (the first N of the train split)")
    temperature: float = Field(0.7, gt=0, le=2, description="sampling temperature of the k training samples")
    max_new_tokens: int = Field(256, ge=1, description="generation cap per sampled program")
    model: str | None = Field(None, description="scorer backbone (alias/folder); None = the student it verifies")
    steps: int = Field(200, ge=1, description="scorer optimizer steps (class-balanced batches)")
    learning_rate: float = Field(5e-4, gt=0, lt=1, description="scorer learning rate (LoRA + value head)")
    batch_size: int = Field(8, ge=2, description="scorer batch size: half correct, half incorrect samples")
    lora_r: int = Field(8, ge=1, le=512, description="scorer LoRA rank (attention projections)")
    lora_alpha: int = Field(16, ge=1, description="scorer LoRA alpha (scale = alpha / r)")
    max_length: int = Field(512, ge=16, description="max tokens of question + program fed to the scorer (left-truncated)")
    save_steps: int = Field(50, ge=1, description="scorer checkpoint every N steps (a rerun resumes from it)")
    seed: int = Field(0, description="seed for sampling, head init and batch order")


class TuneConfig(Section):
    objectives: list[Literal["accuracy", "mean_tokens", "cost_per_1k"]] = Field(["accuracy", "mean_tokens"], description="maximise accuracy, minimise tokens / cost")
    sampler: Literal["nsga2", "tpe", "random"] = Field("tpe", description="Optuna sampler")
    storage: str | None = Field(None, description="Optuna storage URL; None = SQLite in the run folder; postgresql://... for several workers")
    study_name: str = Field("reasonlite", description="Optuna study name (workers sharing a storage join it)")
    cost_per_1k_tokens: float = Field(0.0, ge=0, description="serving cost per 1k generated tokens, for the cost objective")
    pick: Literal["accuracy", "tokens", "knee"] = Field("knee", description="which Pareto point becomes best.yaml")
    seed: int | None = Field(None, description="sampler seed (with the study's trial count, so a resumed study draws new points); None = a fresh draw per process")


class ReasonLiteConfig(Section):
    """Everything `reasonlite run` / `tune` need. Every field has a default: an empty YAML is the offline quickstart."""

    name: str = Field("retail-pal", description="run name (folder under runs/)")
    runs_dir: str = Field("runs", description="where run folders are created")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    traces: TracesConfig = Field(default_factory=TracesConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    contrastive: ContrastiveConfig = Field(default_factory=ContrastiveConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    context: ContextConfig = Field(default_factory=ContextConfig, description="the vector store 'retrieved' sources come from")
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ReasonLiteConfig:
        if self.student.format == "pal" and self.traces.style not in ("pal",):
            raise ValueError(
                f"student.format 'pal' needs programs but traces.style is '{self.traces.style}': set traces.style: pal "
                "or pick student.format cot/answer"
            )
        if self.student.format in ("cot", "step_by_step") and self.traces.style == "pal":
            raise ValueError(
                f"student.format '{self.student.format}' needs natural-language rationales but traces.style is 'pal': "
                "set traces.style: cot (or step_by_step)"
            )
        if self.budget.compress and (self.student.format != "cot" or not self.budget.condition_training):
            raise ValueError(
                "budget.compress trains a short form of each rationale next to the full one, told apart only by the "
                "stated budget: it needs student.format: cot and budget.condition_training: true"
            )
        return self

    def stage_view(self, stage: str) -> StageView:
        """What the pipeline stage `stage` may read of this config (`StageView`)."""
        return StageView(self, stage)

    @model_validator(mode="after")
    def _context_needs(self) -> ReasonLiteConfig:
        traced = self.traces.context in RETRIEVING_MODES
        if (traced or set(RETRIEVING_MODES) & set(self.eval.context_modes)) and not self.context.vector_store:
            where = "traces.context" if traced else "eval.context_modes"
            raise ValueError(f"{where} asks for 'retrieved' sources but context.vector_store is not set: set it to "
                             "the store's id or name (`slm-fusion store ingest DIR --store NAME`), and "
                             "context.base_url to its endpoint")
        if len(set(self.eval.context_modes)) != len(self.eval.context_modes) or not self.eval.context_modes:
            raise ValueError("eval.context_modes must be a non-empty list of distinct modes, e.g. [none, gold, retrieved]")
        if self.traces.context_distractors and self.traces.context not in ("gold", "gold_retrieved"):
            raise ValueError("traces.context_distractors adds documents to each question's gold sources: set "
                             "traces.context: gold (or gold_retrieved), or traces.context_distractors: 0")
        if self.traces.context != "none":
            # the looked-up numbers live in the sources: a redrawn variant or a DPO prompt without them would be wrong
            clash = ("traces.augment.k" if self.traces.augment.k else
                     "traces.synthesize.enabled" if self.traces.synthesize.enabled else
                     "contrastive.enabled" if self.contrastive.enabled else None)
            if clash:
                raise ValueError(f"{clash} does not carry sources yet but traces.context is "
                                 f"'{self.traces.context}': turn {clash} off, or set traces.context: none")
        return self

    @model_validator(mode="after")
    def _synthesis_needs_llm_teacher(self) -> ReasonLiteConfig:
        if not self.traces.synthesize.enabled:
            return self
        if self.teacher.kind == "dataset":
            raise ValueError("traces.synthesize.enabled needs a teacher that writes new problems, but teacher.kind is "
                             "'dataset': set teacher.kind: openai or hf (with teacher.model), or traces.synthesize.enabled: false")
        if self.traces.style != "pal":
            raise ValueError(f"traces.synthesize.enabled trains on the teacher's programs, but traces.style is "
                             f"'{self.traces.style}': set traces.style: pal, or traces.synthesize.enabled: false")
        return self


# Which sections each pipeline stage depends on: a stage is reused when the hash of its sections is unchanged. The
# same declaration is what the stage may read (`StageView`), so a knob outside a stage's hash cannot change its result.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "traces": ("data", "teacher", "traces", "budget.max_trace_tokens", "budget.data_policy", "student.model",
               "context"),
    "train": ("traces", "student", "train", "contrastive", "budget.condition_training", "budget.buckets",
              "budget.compress"),
    "eval": ("eval", "budget.reasoning_budget", "budget.forcing", "budget.answer_tokens"),
}
# Where a stage writes and what its run is called: readable by every stage, in no hash (runs that differ only in
# these share their cached stages).
STAGE_PATHS = ("name", "runs_dir")


class ConfigError(ValueError):
    """A config that failed validation; the message lists each bad dotted path with the fix."""


def field_path(loc: Sequence[int | str], skip: Collection[str] = (), empty: str = "(root)") -> str:
    """The dotted field path of one pydantic error location (`train.learning_rate`, `models.0.name`): the one way
    every config and HTTP error names its field. `skip` drops wrapper parts (FastAPI's `body`)."""
    return ".".join(str(p) for p in loc if p not in skip) or empty


def format_validation_error(err: ValidationError, source: str = "config", schema: type[BaseModel] | None = None,
                            listing: str = "`reasonlite config show` lists every field") -> str:
    """One line per error, `path: what is wrong (got value)`, under `invalid {source}:`. An unknown field gets the
    closest field of `schema` (default `ReasonLiteConfig`) as a suggestion, else `listing`; a message a validator
    wrote with its own dotted path (cross-field checks, located at the model) is shown as written."""
    lines = [f"invalid {source}:"]
    for e in err.errors():
        path = field_path(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            hint = _did_you_mean(e["loc"], schema)
            lines.append(f"  {path}: " + (f"unknown field; did you mean `{hint}`?" if hint else
                                         f"unknown field; check the spelling ({listing})"))
        elif msg.startswith((f"{path}:", f"{path}.")) or (not e["loc"] and ": " in msg):
            lines.append(f"  {msg}")
        elif e["type"] == "missing":
            lines.append(f"  {path}: {msg}")
        else:
            got = repr(e.get("input"))
            lines.append(f"  {path}: {msg} (got {got if len(got) <= 120 else got[:117] + '...'})")
    return "\n".join(lines)


def _did_you_mean(loc: tuple, schema: type[BaseModel] | None = None) -> str | None:
    """The field of the section at `loc[:-1]` closest to the unknown `loc[-1]` (`train.lr` -> `learning_rate`)."""
    import difflib

    model: Any = schema or ReasonLiteConfig
    for key in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(key)
        model = getattr(field, "annotation", None) if field else None
        if not isinstance(model, type) or not issubclass(model, BaseModel):
            return None
    names = list(model.model_fields)
    typo = str(loc[-1]).lower()
    initials = [n for n in names if "".join(w[0] for w in n.split("_") if w) == typo]
    close = initials or difflib.get_close_matches(typo, names, n=1, cutoff=0.6) or [
        n for n in names if len(typo) >= 3 and (n.startswith(typo) or typo in n)]
    return close[0] if close else None


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c = value` inside nested dicts (creating levels as needed)."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def get_dotted(obj: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        obj = obj[key] if isinstance(obj, dict) else getattr(obj, key)
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """`train.learning_rate=3e-4` -> ("train.learning_rate", 0.0003); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value, e.g. train.max_steps=50")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def build_config(data: dict | None = None, overrides: dict[str, Any] | None = None, source: str = "config") -> ReasonLiteConfig:
    data = json.loads(json.dumps(data or {}))  # deep copy
    for key, value in (overrides or {}).items():
        set_dotted(data, current_name(key), value)
    try:
        return ReasonLiteConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ReasonLiteConfig:
    """Read a YAML config (None = all defaults) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; see examples/ for starting points")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of sections (data:, teacher:, ...), not {type(data).__name__}")
    return build_config(data, overrides, source=str(path or "config"))


def dump_config(cfg: ReasonLiteConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Knobs added after stage folders already existed: they enter a hash only when set away from their default, so that
# upgrading reasonlite does not orphan every cached trace set and trained student (a retrain can cost GPU hours).
LATE_KNOBS: dict[str, Any] = {"data.mix": [], "data.program_names": True,
                             "traces.synthesize": SynthesizeConfig().model_dump(mode="json"),
                             "traces.augment": AugmentConfig().model_dump(mode="json"),
                             "budget.compress": False, "eval.calculator": False, "train.packing": False,
                             "train.group_by_length": False, "train.num_threads": None,
                             "eval.select": "vote", "eval.verifier_path": None,
                             "verifier": VerifierConfig().model_dump(mode="json"), "tune.seed": None,
                             "data.heldout_kinds": None, "data.n_test_heldout_kinds": None, "traces.context": "none",
                             "traces.context_distractors": 0, "context": ContextConfig().model_dump(mode="json"), "eval.context_modes": ["none"],
                             "data.vary_wording": False, "data.vary_order": True,
                             "data.vary_vocabulary": False, "data.kinds": None, "data.n_wordings": 6}


# The late knobs added after `tune.base_config_hash` (a study's identity) existed: it drops these at their defaults
# too, so a study started before them still resumes (the earlier late knobs were already part of its hash).
LATE_STUDY_KNOBS: tuple[str, ...] = ("data.heldout_kinds", "data.n_test_heldout_kinds", "traces.context", "context",
                                     "eval.context_modes", "traces.context_distractors", "data.vary_wording",
                                     "data.vary_order", "data.vary_vocabulary", "data.kinds", "data.n_wordings")


def drop_late_defaults(picked: dict, knobs: Collection[str] | None = None) -> None:
    """Remove from `picked` (dotted section -> dumped value) each late knob (of `knobs`, default all) at its
    default."""
    for knob, default in LATE_KNOBS.items():
        if knobs is not None and knob not in knobs:
            continue
        for key, value in picked.items():
            if key == knob and value == default:
                del picked[key]
                break
            inner = knob.removeprefix(key + ".") if knob.startswith(key + ".") else None
            if inner and isinstance(value, dict) and "." not in inner and value.get(inner, object()) == default:
                del value[inner]
                break


def config_hash(cfg: ReasonLiteConfig, sections: tuple[str, ...] | None = None) -> str:
    """Stable short hash of the whole config or of the given dotted sections."""
    full = cfg.model_dump(mode="json")
    picked = hash_names(dict(full) if sections is None else {s: get_dotted(full, s) for s in sections})
    drop_late_defaults(picked)
    blob = json.dumps(picked, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_sections(stage: str) -> tuple[str, ...]:
    """The dotted sections `stage` depends on: its own and those of the stages before it (`STAGE_SECTIONS`)."""
    order = list(STAGE_SECTIONS)
    if stage not in order:
        raise ValueError(f"unknown pipeline stage '{stage}': use one of {', '.join(order)}")
    return tuple(section for name in order[: order.index(stage) + 1] for section in STAGE_SECTIONS[name])


def stage_hash(cfg: ReasonLiteConfig, stage: str) -> str:
    """Hash of everything a stage depends on, including the stages before it."""
    return config_hash(cfg, stage_sections(stage))


class StageConfigError(RuntimeError):
    """A stage read a knob outside its hash: changing that knob would silently reuse a stale cached stage."""


class StageView:
    """What one pipeline stage may read of a config: the sections of its hash (`stage_sections`) and `STAGE_PATHS`.

    It reads like the config (`view.traces.self_consistency.k`; `view.data` is the `DataConfig` itself); a section
    the stage declares in part (`budget.forcing`) is a view of its own. Reading any other knob raises
    StageConfigError naming it and the fix, so nothing outside a stage's cache key can change what the stage makes.
    Build one with `cfg.stage_view(stage)`; `prefix`/`node` are the section a nested view stands for.
    """

    def __init__(self, cfg: ReasonLiteConfig, stage: str, node: BaseModel | None = None, prefix: str = ""):
        self._cfg, self._stage, self._readable = cfg, stage, stage_sections(stage)
        self._node, self._prefix = cfg if node is None else node, prefix

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):  # dunders probed by copy/pickle/inspect, and our own slots before __init__ sets them
            raise AttributeError(key)
        path = self._prefix + key
        if path in self._readable or (not self._prefix and key in STAGE_PATHS):
            return getattr(self._node, key)
        if any(section.startswith(path + ".") for section in self._readable):
            return StageView(self._cfg, self._stage, getattr(self._node, key), path + ".")
        if key not in type(self._node).model_fields:
            raise AttributeError(f"{path} is not a config field")
        raise StageConfigError(
            f"the {self._stage} stage read {path}, which is not in its hash, so a change to it would reuse a stale "
            f"cached {self._stage} stage: add '{path}' to STAGE_SECTIONS['{self._stage}'] in reasonlite/config.py "
            "(a knob already in use also to LATE_KNOBS, so existing hashes stay), or read it in a stage that has it")

    def __repr__(self) -> str:
        return f"StageView({self._stage}{': ' + self._prefix.rstrip('.') if self._prefix else ''})"

    @property
    def stage(self) -> str:
        return self._stage

    def stage_view(self, stage: str) -> StageView:
        """The view of `stage`: this one, or an earlier stage's (a view never widens to a later stage's knobs)."""
        order = list(STAGE_SECTIONS)
        if stage not in order[: order.index(self._stage) + 1]:
            raise StageConfigError(f"the {self._stage} stage cannot read as the {stage} stage (it runs later and "
                                   f"depends on more): pass the config itself, not the {self._stage} stage's view")
        return self if stage == self._stage and not self._prefix else StageView(self._cfg, stage)

    def hash(self) -> str:
        """`stage_hash` of this stage: its cached folder's name, and the owner of its checkpoints."""
        return stage_hash(self._cfg, self._stage)

    def dump(self) -> str:
        """YAML of what this stage may read (torchrun's workers load it; the model card shows it). For train and eval
        it loads back as a config (defaults elsewhere) whose view of this stage has the same hash."""
        full = self._cfg.model_dump(mode="json")
        data = {key: full[key] for key in STAGE_PATHS}
        for section in self._readable:
            set_dotted(data, section, get_dotted(full, section))
        return yaml.safe_dump(data, sort_keys=False)
