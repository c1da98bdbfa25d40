"""Streaming merge driver: one tensor at a time from lazily opened safetensors shards to output shards.

Memory stays bounded by the largest tensor: for each tensor name we load just that tensor from every input
(`safetensors.safe_open`, which maps the file and reads one tensor on request), merge it, and write it straight into
its output shard. Output shards are planned up front from the inputs' shapes, so each shard's safetensors header is
written first and tensor bytes follow as they are produced — nothing waits in a shard buffer. (safetensors'
`save_file` needs a whole shard in memory; the format itself is simple enough to stream: an 8-byte header length, a
JSON header of dtype/shape/offsets, then the raw bytes.)

`run_merge(config, out_dir) -> MergeReport` refuses inputs that cannot be merged (different architecture, shapes,
tensor sets or tokenizer vocabularies) before writing anything, naming the model, the tensor and the fix.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from slm_fusion.merging.config import MergeConfig, load_merge_config, parse_size
from slm_fusion.merging.methods import MERGE_METHODS, resolve_param

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# When a model ties its output head to its input embeddings, checkpoints omit the head: read the embedding instead.
TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the model/tensor and the fix."""


def resolve_model_ref(ref: str | Path) -> Path:
    """A model reference (HF folder, LoRA adapter folder or reasonlite alias) -> folder path."""
    path = Path(ref).expanduser()
    if path.is_dir() and ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
        return path
    try:
        from reasonlite.models import resolve_model_dir
    except ImportError:  # pragma: no cover - reasonlite ships in the same project
        resolve_model_dir = None
    if resolve_model_dir is not None:
        try:
            return Path(resolve_model_dir(str(ref)))
        except ValueError as err:
            raise MergeError(str(err)) from None
    raise MergeError(f"model '{ref}' is not a folder with config.json or adapter_config.json; pass a HF model folder")


# ---------------------------------------------------------------------------------------------------------------------
# Reading: a lazily opened (possibly sharded) checkpoint.


class Checkpoint:
    """The tensors of a HF model folder, read one at a time from its safetensors shards."""

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        config_path = self.folder / "config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.folder / f for f in weight_map.values()})
        if not files:
            raise MergeError(
                f"{self.label}: no *.safetensors in {self.folder}; re-save the model with "
                "`save_pretrained(..., safe_serialization=True)`"
            )
        self.names: list[str] = []
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    piece = handle.get_slice(name)
                    self._file_of[name] = file
                    self._meta[name] = (_DTYPES_BY_TAG[piece.get_dtype()], tuple(piece.get_shape()))
                    self.names.append(name)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def _source(self, name: str) -> str | None:
        if name in self._file_of:
            return name
        alias = TIED_ALIASES.get(name)
        if alias in self._file_of and self.tied:
            return alias
        return None

    def has(self, name: str) -> bool:
        return self._source(name) is not None

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._meta[self._source(name)]

    def get(self, name: str) -> torch.Tensor:
        source = self._source(name)
        if source is None:
            raise KeyError(f"{self.label} has no tensor '{name}'")
        # A handle per read: safe_open maps the whole file, and every page read through a long-lived map stays in
        # this process' RSS until the map goes — keeping handles open grew RSS by the inputs' full size.
        # Re-opening only re-parses the JSON header.
        with safe_open(self._file_of[source], framework="pt") as handle:
            return handle.get_tensor(source)

    def close(self) -> None:
        """Nothing stays open between reads; kept so checkpoints can be closed uniformly."""


_DTYPES_BY_TAG = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TAGS_BY_DTYPE = {v: k for k, v in _DTYPES_BY_TAG.items()}


def open_checkpoint(ref: str | Path, label: str | None = None) -> Checkpoint:
    """Open a model reference; a LoRA adapter folder opens as its base with the adapter applied tensor by tensor."""
    from slm_fusion.merging.lora import AdapterCheckpoint, split_ref

    base, target = split_ref(ref)  # mergekit's "BASE+ADAPTER" form
    folder = resolve_model_ref(target)
    if (folder / "adapter_config.json").exists() and not list(folder.glob("model*.safetensors")):
        return AdapterCheckpoint(folder, label=label, base=base)
    if base:
        raise MergeError(f"'{ref}': {target} is not a LoRA adapter folder (no adapter_config.json); use BASE+ADAPTER")
    return Checkpoint(folder, label=label)


# ---------------------------------------------------------------------------------------------------------------------
# Writing: shards planned from known shapes, headers first, bytes streamed.


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, in order: start a new shard when the next tensor would push the current one past max_shard_size."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


class ShardWriter:
    """Writes tensors, in plan order, into safetensors shards whose headers were written before their data."""

    def __init__(self, out_dir: Path, shards: list[list[TensorSpec]]):
        self.out_dir = out_dir
        self.shards = shards
        n = len(shards)
        self.filenames = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._next = 0
        self._file = None
        self._open_shard = -1
        self.total_bytes = 0

    def _start_shard(self, index: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[index]:
            header[spec.name] = {
                "dtype": _TAGS_BY_DTYPE[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        self._file = open(self.out_dir / self.filenames[index], "wb")  # noqa: SIM115 - spans write() calls
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._open_shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, spec = self._order[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"writer expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        if shard_index != self._open_shard:
            self._close_file()
            self._start_shard(shard_index)
        if tensor.numel():
            self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.total_bytes += spec.nbytes
        self._next += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        self._close_file()
        if self._next != len(self._order):
            raise RuntimeError(f"writer finished after {self._next} of {len(self._order)} tensors")
        if len(self.filenames) > 1:
            weight_map = {spec.name: self.filenames[i] for i, spec in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(self.filenames)


# ---------------------------------------------------------------------------------------------------------------------
# Checks that refuse unmergeable inputs before anything is written.


def check_architectures(reference: Checkpoint, others: list[Checkpoint]) -> None:
    for ckpt in others:
        for key in ("architectures", "model_type"):
            ref_value, value = reference.config.get(key), ckpt.config.get(key)
            if ref_value and value and ref_value != value:
                raise MergeError(
                    f"architecture mismatch: {ckpt.label} has {key}={value} but {reference.label} has {ref_value}. "
                    "Weight merging needs models of one architecture (fine-tunes of the same base)."
                )


def check_tensors(reference: Checkpoint, others: list[Checkpoint], names: list[str]) -> None:
    for ckpt in others:
        for name in names:
            if not ckpt.has(name):
                raise MergeError(
                    f"{ckpt.label} has no tensor '{name}' (present in {reference.label}); the models differ in "
                    "architecture or layer count — merge checkpoints fine-tuned from the same base."
                )
            shape, ref_shape = ckpt.meta(name)[1], reference.meta(name)[1]
            if shape != ref_shape:
                raise MergeError(
                    f"shape mismatch for tensor '{name}': {ckpt.label} has {list(shape)}, {reference.label} has "
                    f"{list(ref_shape)}; merge checkpoints with the same config (hidden size, vocab, layers)."
                )


def _vocab(folder: Path) -> dict[str, int] | None:
    if not (folder / "tokenizer.json").exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)


def check_tokenizers(source: tuple[str, Path], others: list[tuple[str, Path]]) -> None:
    """All inputs must share the tokenizer source's vocabulary: a merged embedding row must mean one token."""
    ref_vocab = _vocab(source[1])
    if ref_vocab is None:
        return
    for label, folder in others:
        vocab = _vocab(folder)
        if vocab is None or vocab == ref_vocab:
            continue
        differing = sorted(set(vocab.items()) ^ set(ref_vocab.items()), key=lambda kv: kv[1])[:3]
        raise MergeError(
            f"tokenizer mismatch: {label} has a vocabulary of {len(vocab)} tokens that differs from the tokenizer "
            f"source {source[0]} ({len(ref_vocab)} tokens; e.g. {differing}). Merge models that share one tokenizer "
            "(fine-tunes of the same base) or set tokenizer_source to a model with the same vocabulary."
        )


# ---------------------------------------------------------------------------------------------------------------------
# The merge.


@dataclass
class MergeReport:
    """What a merge did and what it cost (bytes are the driver's own accounting of tensors it held)."""

    out_dir: str
    method: str
    inputs: list[str]
    n_tensors: int = 0
    total_bytes: int = 0  # bytes of merged weights written
    # max over tensors of bytes the driver holds at once: inputs + output (+ shard buffer, always 0 here). The merge
    # method's float32 temporaries come on top (about one to three tensors' worth; more for TIES).
    peak_tensor_bytes: int = 0
    largest_tensor_bytes: int = 0
    seconds: float = 0.0
    shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tokenizer_dir(ckpt: Checkpoint) -> Path:
    return getattr(ckpt, "tokenizer_dir", ckpt.folder)


def _num_layers(ckpt: Checkpoint) -> int | None:
    from slm_fusion.merging.methods import layer_index

    if ckpt.config.get("num_hidden_layers"):
        return int(ckpt.config["num_hidden_layers"])
    layers = [layer_index(n) for n in ckpt.names]
    layers = [i for i in layers if i is not None]
    return max(layers) + 1 if layers else None


def copy_model_files(config_source: Checkpoint, tokenizer_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json (with the output dtype), generation config and tokenizer files next to the merged weights."""
    config = dict(config_source.config)
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = config_source.folder / "generation_config.json"
    if gen.exists():
        shutil.copy2(gen, out_dir / gen.name)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out_dir / name)


def write_model_card(out_dir: Path, title: str, inputs: list[str], method: str, config_yaml: str, report: MergeReport):
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, slm-fusion]",
        "---",
        f"# {title}",
        "",
        f"Merged with SLM-Fusion using **{method}**.",
        "",
        "## Inputs",
        *[f"- `{ref}`" for ref in inputs],
        "",
        "## Configuration",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
        f"{report.n_tensors} tensors, {report.total_bytes / 1e6:.1f} MB in {len(report.shards)} shard(s), "
        + f"{report.seconds:.1f} s.",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}"),
        disable=not enabled,
        transient=True,
    )


def run_merge(config: MergeConfig | str | Path, out_dir: str | Path, *, show_progress: bool = True) -> MergeReport:
    """Merge the models in `config` into a HF folder `out_dir`, streaming one tensor at a time."""
    if not isinstance(config, MergeConfig):
        config = load_merge_config(config)
    started = time.perf_counter()
    method = MERGE_METHODS[config.merge_method]
    out_dtype = getattr(torch, config.dtype)

    models = [open_checkpoint(m.model, label=f"models[{i}] ({m.model})") for i, m in enumerate(config.models)]
    base = open_checkpoint(config.base_model, label=f"base_model ({config.base_model})") if config.base_model else None
    reference = base or models[0]
    inputs = models + ([base] if base else [])
    check_architectures(reference, [c for c in inputs if c is not reference])

    if config.tokenizer_source == "base":
        tok_source = (reference.label, _tokenizer_dir(reference))
    elif config.tokenizer_source.isdigit():
        chosen = models[int(config.tokenizer_source)]
        tok_source = (chosen.label, _tokenizer_dir(chosen))
    else:  # a folder with tokenizer files (config.json not required) or a model reference
        tok_path = Path(config.tokenizer_source).expanduser()
        tok_source = (config.tokenizer_source, tok_path if tok_path.is_dir() else resolve_model_ref(tok_path))
    check_tokenizers(tok_source, [(c.label, _tokenizer_dir(c)) for c in inputs])

    names = list(reference.names)
    check_tensors(reference, [c for c in inputs if c is not reference], names)

    specs = []
    for name in names:
        dtype, shape = reference.meta(name)
        specs.append(TensorSpec(name, out_dtype if dtype.is_floating_point else dtype, shape))
    out_dir = Path(out_dir)
    for ckpt in inputs:
        if out_dir.resolve() == ckpt.folder.resolve():
            raise MergeError(f"out_dir {out_dir} is the folder of {ckpt.label}; write the merge to a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        stale.unlink()  # a previous merge's shards would be picked up by loaders next to ours
    writer = ShardWriter(out_dir, plan_shards(specs, parse_size(config.max_shard_size)))

    report = MergeReport(
        out_dir=str(out_dir),
        method=method.name,
        inputs=[m.model for m in config.models] + ([config.base_model] if config.base_model else []),
    )
    num_layers = _num_layers(reference)
    model_params = [config.model_parameters(i) for i in range(len(models))]
    global_params = config.global_parameters()
    per_model_keys = [k for k in method.model_params if k != "weight"]

    with _progress(show_progress) as progress:
        task = progress.add_task(f"merging ({method.name})", total=len(specs), tensor="")
        for spec in specs:
            progress.update(task, tensor=spec.name)
            tensors = [m.get(spec.name) for m in models]
            base_tensor = base.get(spec.name) if base else None
            if not spec.dtype.is_floating_point:  # integer buffers (e.g. position ids) are copied, not averaged
                merged = (base_tensor if base_tensor is not None else tensors[0]).clone()
            else:
                weights = [float(resolve_param(p.get("weight", 1.0), spec.name, num_layers)) for p in model_params]
                params = {k: resolve_param(v, spec.name, num_layers) for k, v in global_params.items()}
                for key in per_model_keys:
                    params[key] = [resolve_param(p[key], spec.name, num_layers) for p in model_params]
                merged = method(
                    tensors,
                    base_tensor,
                    weights,
                    params,
                    name=spec.name,
                    generator_seed=config.seed,
                    dtype=out_dtype,
                )
            held = sum(t.nbytes for t in tensors) + (base_tensor.nbytes if base_tensor is not None else 0)
            held += merged.nbytes  # streamed straight to disk: no pending shard buffer to add
            report.peak_tensor_bytes = max(report.peak_tensor_bytes, held)
            report.largest_tensor_bytes = max(report.largest_tensor_bytes, max(t.nbytes for t in tensors))
            writer.write(spec.name, merged)
            del tensors, base_tensor, merged
            progress.advance(task)
    report.shards = writer.finish()
    for ckpt in inputs:
        ckpt.close()

    copy_model_files(reference, tok_source[1], out_dir, out_dtype)
    report.n_tensors = len(specs)
    report.total_bytes = writer.total_bytes
    report.seconds = time.perf_counter() - started
    config_yaml = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    write_model_card(out_dir, f"Merged model ({method.name})", report.inputs, method.name, config_yaml, report)
    return report
