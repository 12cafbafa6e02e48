"""The training configuration: one dataclass per section, one `TrainConfig` holding them all.

Every run of the training loop (pretraining, SFT, LoRA, DPO) is described by a `TrainConfig`. Recipes
(`llama3.train.recipes`) are Python functions that return one; the command line then applies overrides
written `--section.key=value` (or `--section.key value`), parsed into the field's declared type:

    llama3 pretrain --recipe debug --train.steps=50 --optim.lr=1e-3 --model.dim=128

The `model` section names a preset (`llama3.config.PRESETS`) and takes any `ModelArgs` field as an override
(`--model.n_layers=4`); those land in `model.overrides`. The resolved config is written as `config.json`
beside every checkpoint, and `TrainConfig.from_dict` reads it back strictly (unknown keys are errors).

Extension points: a new section is a dataclass added to `TrainConfig`; a new field is a typed attribute
with a default. Fields typed `X | None` accept the word `none`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ModelArgs, preset

__all__ = [
    "CheckpointSection",
    "DataSection",
    "FinetuneSection",
    "LoggingSection",
    "ModelSection",
    "OptimSection",
    "ParallelSection",
    "ScheduleSection",
    "TrainConfig",
    "TrainSection",
    "apply_overrides",
    "parse_value",
]


@dataclass
class ModelSection:
    preset: str = "debug"  # a name in llama3.config.PRESETS
    # Any ModelArgs field, e.g. {"n_layers": 4}. vocab_size is set from the tokenizer unless given here.
    overrides: dict[str, Any] = field(default_factory=dict)

    def model_args(self, vocab_size: int | None = None, max_seq_len: int | None = None) -> ModelArgs:
        """The ModelArgs of this section; `vocab_size`/`max_seq_len` fill in unless overridden explicitly."""
        fill: dict[str, Any] = {}
        if vocab_size is not None and "vocab_size" not in self.overrides:
            fill["vocab_size"] = vocab_size
        if max_seq_len is not None and "max_seq_len" not in self.overrides:
            fill["max_seq_len"] = max_seq_len
        return preset(self.preset, **{**fill, **self.overrides})


@dataclass
class DataSection:
    path: str = ""  # a folder written by `llama3 prepare` (index.json + token shards)
    batch_size: int = 8  # sequences per micro-batch per data-parallel rank
    seq_len: int = 256
    document_mask: bool = True  # attention stays within documents of a packed row (Llama 3 paper §3.2)
    seed: int = 0  # order of the training windows


@dataclass
class OptimSection:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Decoupled weight decay on 1-D params (norms) and embeddings is usually harmful; off unless asked.
    decay_norms_and_embeddings: bool = False
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"


@dataclass
class ScheduleSection:
    name: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # WSD: the last fraction of steps that decays linearly to the minimum


@dataclass
class TrainSection:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 = bf16 autocast over fp32 master weights
    device: str = "auto"  # auto = cuda if available, else cpu
    seed: int = 0  # weight initialization
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a NaN/inf loss or grad norm: skip the update, or stop
    max_skipped_steps: int = 10  # stop once this many consecutive steps were skipped
    loss_chunk_size: int = 1024  # rows of the (tokens × vocab) logits computed at a time
    val_interval: int = 100  # steps between validation passes; 0 = only at the start and end
    val_batches: int = 8
    time_budget_s: float = 0.0  # stop (and save) after this wall time; 0 = no limit
    out_dir: str = "runs/debug"


@dataclass
class CheckpointSection:
    interval: int = 500  # steps between checkpoints; 0 = only at the end
    keep: int = 3  # keep the last K complete checkpoints (the newest complete one is never deleted)
    export_hf: bool = True  # write OUT/hf (a Hugging Face folder) at the end of the run


@dataclass
class ParallelSection:
    dp_shard: int = -1  # FSDP2 shard degree; -1 = all ranks not used by other dims
    dp_replicate: int = 1  # DDP/HSDP replicas
    tp: int = 1  # tensor-parallel degree
    # torchtitan's meanings, one device or many (llama3.distributed.parallelize.apply_activation_checkpointing):
    # full = every block; selective = every N-th block (selective_ac_option=N) or op-level ("op")
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    selective_ac_option: str = "2"
    compile: bool = False  # torch.compile each transformer block


@dataclass
class LoggingSection:
    log_interval: int = 1  # steps between log lines (metrics.jsonl gets every step)
    tensorboard: bool = False  # also write TensorBoard scalars to OUT/tensorboard
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = measure a matmul at startup
    progress_bar: bool = False  # a tqdm bar instead of one line per step


@dataclass
class FinetuneSection:
    """`llama3 finetune` only (pretraining ignores it): the starting model, the data format, LoRA and DPO."""
    method: Literal["sft", "dpo"] = "sft"  # chat JSONL with cross-entropy, or preference pairs with DPO
    model_path: str = ""  # the starting weights: an HF or Meta folder, or a training checkpoint
    train_on: Literal["assistant", "all"] = "assistant"  # SFT: which messages' tokens carry loss
    pack: bool = True  # SFT: pack dialogs into rows of data.seq_len (attention kept per dialog), else pad
    overlong: Literal["truncate", "error"] = "truncate"  # SFT: a dialog longer than data.seq_len
    val_fraction: float = 0.05  # held out (seeded by data.seed) for validation
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float | None = None  # the update is scaled by alpha / rank; None = 2 × rank
    lora_dropout: float = 0.0
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"  # comma-separated projections of every block
    lora_quantize_base: bool = False  # QLoRA-style: adapted projections keep their frozen weight in int8
    dpo_beta: float = 0.1  # Llama 3 recipe
    dpo_nll_weight: float = 0.2  # NLL term on chosen responses (Llama 3 recipe); 0 = plain DPO
    dpo_mask_formatting: bool = True  # leave end-of-turn tokens out of the DPO log-probs (headers always are)


SECTIONS = ("model", "data", "optim", "schedule", "train", "checkpoint", "parallel", "logging", "finetune")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    recipe: str = ""  # the recipe this config started from (informational)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Strict inverse of `to_dict`: unknown sections or keys raise ValueError."""
        unknown = set(d) - set(SECTIONS) - {"recipe"}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
        cfg = cls(recipe=str(d.get("recipe", "")))
        for name in SECTIONS:
            values = d.get(name, {})
            section = getattr(cfg, name)
            known = {f.name for f in dataclasses.fields(section)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"unknown keys in config section {name!r}: {sorted(bad)}; known: {sorted(known)}")
            for key, value in values.items():
                setattr(section, key, value)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


# ----- overrides -----

def _field_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def parse_value(text: str, annotation: Any, where: str) -> Any:
    """Parse the command-line string `text` as a value of type `annotation` (int, float, bool, str,
    Literal[...], `X | None`, dict/Any as JSON). `where` names the option in error messages."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and text.lower() in ("none", "null"):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return parse_value(text, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: cannot parse {text!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"{where}: {text!r} is not one of {', '.join(map(str, choices))}")
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true or false, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)  # allow 1e3 for counts
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ValueError(f"{where}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {text!r}") from None
    if annotation is str:
        return text
    try:  # dict / list / Any: JSON, falling back to the plain string
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `--section.key=value` / `--section.key value` arguments to `cfg` in place and return it.

    Raises ValueError naming the option for unknown sections or keys, missing values and values that do
    not parse as the field's type."""
    model_fields = typing.get_type_hints(ModelArgs)
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --section.key=value "
                             f"(sections: {', '.join(SECTIONS)})")
        if "=" in arg:
            name, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(overrides):
                raise ValueError(f"{arg} needs a value: write {arg}=VALUE")
            name, text = arg[2:], overrides[i + 1]
            i += 1
        i += 1
        section_name, key = name.split(".", 1)
        if section_name not in SECTIONS:
            raise ValueError(f"--{name}: unknown config section {section_name!r}; known: {', '.join(SECTIONS)}")
        section = getattr(cfg, section_name)
        hints = _field_types(section)
        if section_name == "model" and key not in hints:
            if key not in model_fields or key == "extra":
                raise ValueError(f"--{name}: unknown model field {key!r}; use --model.preset=NAME or a "
                                 f"ModelArgs field ({', '.join(k for k in model_fields if k != 'extra')})")
            section.overrides[key] = parse_value(text, model_fields[key], f"--{name}")
            continue
        if key not in hints:
            raise ValueError(f"--{name}: unknown key {key!r} in section {section_name!r}; "
                             f"known: {', '.join(hints)}")
        setattr(section, key, parse_value(text, hints[key], f"--{name}"))
    return cfg
