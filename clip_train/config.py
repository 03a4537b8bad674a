"""Typed training config: one dataclass per component, strict YAML, dotted overrides, validation.

Precedence is defaults < YAML file < command-line ``key=value`` pairs. Unknown keys are errors that
name the key and list the valid ones; cross-field rules are checked once, in ``Config.validate``.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message says what to change."""


def option(default: Any, help: str):
    """A dataclass field with a one-line description (shown by ``clip-train --print-config``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = option("demo-tiny", "open_clip model name, a model bundled here (demo-tiny), or a model config file (.json/.yaml)")
    pretrained: str = option("", "local path to pretrained weights (.safetensors/.pt); never a hub download")
    max_logit_scale: float = option(100.0, "clamp for the learned logit scale (exp of the inverse temperature)")
    init_logit_bias: float = option(-10.0, "initial logit bias for the sigmoid loss (as SigLIP)")
    grad_checkpointing: bool = option(False, "activation (gradient) checkpointing in both towers: less memory, ~30% more compute")


@dataclass
class DataConfig:
    train: str = option("", "training shards: a directory, a brace pattern, or several joined with '::'")
    batch_size: int = option(64, "per-process batch size")
    workers: int = option(1, "data loader worker processes (0 reads in the main process)")
    shuffle_buffer: int = option(1000, "sample shuffle buffer size")
    resampled: bool = option(False, "sample shards with replacement (infinite stream) instead of epochs over the shards")
    train_weights: str = option("", "with resampled=true: one weight per '::' source of train, e.g. 1,4 (each shard "
                                    "drawn with its source's weight, as open_clip's --train-data-upsampling-factors)")
    train_num_samples: int = option(0, "samples per epoch; 0 reads it from sizes.json next to the shards")
    augment: bool = option(True, "random-resized-crop augmentation on training images")
    media_key: str = option("", "shard member extensions holding the image/audio/ECG, ';'-separated, first match "
                                "('': the modality's own: jpg;png;jpeg;webp, flac;wav;ogg, npy)")
    text_key: str = option("txt", "shard member extension read as the caption")


@dataclass
class LossConfig:
    kind: str = option("softmax", "contrastive loss: softmax (CLIP InfoNCE) or sigmoid (SigLIP)")
    tile_size: int = option(1024, "tile edge for the tiled loss; memory grows with tile_size², not batch²")
    backend: str = option("auto", "who computes the softmax/sigmoid loss tiles: auto (fused Triton kernels on CUDA "
                                  "when triton imports, else torch), torch, or triton")
    exchange: str = option("auto", "how distributed loss terms exchange feature blocks: ring (W hops, O(b·D) memory), "
                                   "allgather (one all-gather, O(B·D) memory), auto (allgather if it fits exchange_memory_mb)")
    exchange_memory_mb: float = option(1024.0, "loss.exchange=auto: largest all-gather buffers (MiB, per term and pass: "
                                               "global batch x bytes per gathered row) before falling back to the ring")


@dataclass
class OptimConfig:
    lr: float = option(5e-4, "peak learning rate")
    weight_decay: float = option(0.2, "AdamW weight decay (not applied to gains, biases or the logit scale and bias)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    eps: float = option(1e-6, "AdamW epsilon")
    warmup_steps: int = option(100, "linear warmup steps before the cosine decay")
    warmup_fraction: float = option(0.0, "warmup as a fraction of the run's steps, used instead of warmup_steps "
                                         "when > 0 (small data: a fixed step count can be most of a short run)")
    min_lr: float = option(0.0, "learning rate at the end of the cosine decay")
    grad_clip: float = option(1.0, "clip the global gradient norm to this value; 0 disables")


@dataclass
class TrainConfig:
    epochs: int = option(1, "passes over train_num_samples")
    steps: int = option(0, "stop after this many optimizer steps; 0 means epochs decide")
    seed: int = option(0, "random seed (model init, shuffling, augmentation)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    threads: int = option(0, "torch intra-op threads on CPU; 0 keeps torch's default")
    log_every: int = option(10, "write metrics every N steps")
    accum_steps: int = option(1, "GradCache: micro-batches per step; the contrastive batch is batch_size x accum_steps x world size")
    max_nonfinite: int = option(5, "stop after this many consecutive steps skipped for a non-finite loss or gradient")
    dist_timeout_s: int = option(600, "timeout of collectives: a dead rank ends the job instead of hanging it")


@dataclass
class CheckpointConfig:
    every_steps: int = option(0, "save a resumable checkpoint every N steps (0: only at the end)")
    keep: int = option(2, "how many step checkpoints to keep (0 keeps all)")


@dataclass
class ObjectiveConfig:
    terms: dict[str, float] = option({"contrastive": 1.0}, "weighted loss terms: contrastive, caption, intra_image, "
                                     "intra_text, embed_dropout, uniformity, alignment, dcl, hard_negative (0 or absent: off)")
    intra_temperature: float = option(0.1, "temperature of the intra-modal NT-Xent terms (intra_image, intra_text, embed_dropout)")
    text_word_dropout: float = option(0.1, "intra_text: word-deletion probability for the two caption views")
    embed_dropout_p: float = option(0.1, "embed_dropout: dropout rate of the two embedding views (as MERL)")
    uniformity_t: float = option(2.0, "uniformity: t in log E exp(-t |x - y|^2)")
    alignment_alpha: float = option(2.0, "alignment: the exponent alpha in E |a - b|^alpha")
    hard_negative_beta: float = option(0.5, "hard_negative: beta of exp(beta s_ij), both directions (0: plain InfoNCE)")
    hard_negative_alpha: float = option(1.0, "hard_negative: weight of the positive in the denominator (0: decoupled)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = option(0, "ZeRO stage 0-3 (1: optimizer states, 2: + gradients, 3: + parameters partitioned)")
    precision: str = option("fp32", "fp32, bf16, or fp16 (with dynamic loss scaling)")
    config_file: str = option("", "a raw ds_config JSON merged over the generated one (its keys win)")
    reduce_bucket_size: int = option(500_000_000, "ZeRO reduce bucket size (elements)")
    allgather_bucket_size: int = option(500_000_000, "ZeRO-1/2 all-gather bucket size (elements)")
    overlap_comm: bool = option(False, "overlap ZeRO gradient reduction with the backward pass")
    initial_scale_power: int = option(16, "fp16: initial loss scale is 2**this")


@dataclass
class EvalConfig:
    zeroshot: str = option("", "zero-shot classification set evaluated during and after training ('' to skip)")
    retrieval: str = option("", "retrieval set evaluated after training ('' to skip)")
    suite: str = option("", "a benchmark suite YAML (as clip-eval suite --suite) evaluated during and after "
                            "training on every rank; results in RUN/suite ('' to skip)")
    every: int = option(0, "run the zero-shot eval (and eval.suite) every N steps (0: only at the end)")
    batch_size: int = option(256, "eval batch size")


REPORT_TO = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # writer -> package it needs


@dataclass
class LogConfig:
    report_to: list[str] = option(["jsonl"], "where metrics go: jsonl (RUN/metrics.jsonl, always on), tensorboard "
                                             "(RUN/tensorboard), wandb (RUN/wandb); rank 0 writes")
    wandb_project: str = option("clip-train", "wandb project")
    wandb_name: str = option("", "wandb run name ('' : the output_dir's folder name)")
    wandb_mode: str = option("offline", "wandb mode: offline (upload later with `wandb sync RUN/wandb/offline-run-*`), "
                                        "online, or disabled")
    progress: str = option("auto", "a tqdm progress bar: auto (when stdout is a terminal and there is one rank), "
                                   "on, or off")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ds: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: str = option("runs/default", "run directory: metrics.jsonl, checkpoints/, export/")

    def validate(self) -> "Config":
        """Cross-field rules, each with a message that says what to change."""
        rules = [
            (self.loss.kind in ("softmax", "sigmoid"), f"loss.kind={self.loss.kind!r}: use softmax or sigmoid"),
            (self.loss.tile_size > 0, "loss.tile_size must be positive"),
            (self.loss.backend in ("auto", "torch", "triton"), f"loss.backend={self.loss.backend!r}: use auto, torch or triton"),
            (self.loss.exchange in ("ring", "allgather", "auto"),
             f"loss.exchange={self.loss.exchange!r}: use ring, allgather or auto"),
            (self.loss.exchange_memory_mb >= 0, "loss.exchange_memory_mb must be >= 0"),
            (self.data.batch_size >= 2, "data.batch_size must be >= 2: a contrastive batch needs negatives"),
            (self.data.workers >= 0, "data.workers must be >= 0"),
            (self.train.epochs > 0 or self.train.steps > 0, "set train.epochs > 0 or train.steps > 0"),
            (self.optim.lr > 0, "optim.lr must be positive"),
            (0 <= self.optim.min_lr <= self.optim.lr, "optim.min_lr must lie between 0 and optim.lr"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (0 <= self.optim.warmup_fraction < 1, "optim.warmup_fraction must be in [0, 1)"),
            (self.model.max_logit_scale > 1, "model.max_logit_scale must be > 1"),
            (not (self.data.resampled and self.data.train_num_samples <= 0 and self.train.steps <= 0),
             "data.resampled=true streams forever: set data.train_num_samples or train.steps"),
            (self.output_dir != "", "output_dir must not be empty"),
            (not (self.data.train_weights and not self.data.resampled),
             "data.train_weights samples shards with replacement: set data.resampled=true"),
            (self.ds.zero_stage in (0, 1, 2, 3), f"ds.zero_stage={self.ds.zero_stage}: use 0, 1, 2 or 3"),
            (self.ds.precision in ("fp32", "bf16", "fp16"), f"ds.precision={self.ds.precision!r}: use fp32, bf16 or fp16"),
            (self.train.accum_steps >= 1, "train.accum_steps must be >= 1"),
            (self.train.max_nonfinite >= 1, "train.max_nonfinite must be >= 1"),
            (any(w > 0 for w in self.objective.terms.values()),
             "objective.terms has no term with a positive weight: set e.g. objective.terms.contrastive=1"),
            (all(w >= 0 for w in self.objective.terms.values()), "objective.terms weights must be >= 0"),
            (not (self.ds.config_file and not Path(self.ds.config_file).is_file()),
             f"ds.config_file not found: {self.ds.config_file}"),
            (set(self.log.report_to) <= set(REPORT_TO),
             f"log.report_to={self.log.report_to}: use any of {', '.join(REPORT_TO)}"),
            (self.log.wandb_mode in ("offline", "online", "disabled"),
             f"log.wandb_mode={self.log.wandb_mode!r}: use offline, online or disabled"),
            (self.log.progress in ("auto", "on", "off"), f"log.progress={self.log.progress!r}: use auto, on or off"),
            (not (self.eval.every and not (self.eval.zeroshot or self.eval.suite)),
             f"eval.every={self.eval.every} evaluates eval.zeroshot and eval.suite, neither of which is set: "
             f"set eval.zeroshot to a classification set, eval.suite to a suite file, or eval.every=0"),
        ]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)
        self._check_writers_installed()
        return self

    def _check_writers_installed(self) -> None:
        """A writer asked for but not installed fails now, not at the first logged step."""
        import importlib.util

        for writer in self.log.report_to:
            package = REPORT_TO[writer]
            if package and importlib.util.find_spec(package) is None:
                raise ConfigError(f"log.report_to has {writer}, but the {package} package is not installed: "
                                  f"pip install -e '.[tracking]' (or pip install {package})")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, expected: Any, key: str) -> Any:
    """Check a YAML/CLI value against the annotated type; ints are accepted where floats are."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        choices = typing.get_args(expected)
        if value is None and type(None) in choices:
            return None
        expected = next(c for c in choices if c is not type(None))
    if origin is dict or typing.get_origin(expected) is dict:
        return _coerce_mapping(value, expected, key)
    if origin is list or typing.get_origin(expected) is list:
        return _coerce_list(value, expected, key)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if expected is str and isinstance(value, bool):  # YAML 1.1 reads a bare on/off as a boolean
        return "on" if value else "off"
    if expected in (int, float, str, bool) and not (isinstance(value, expected) and
                                                    (expected is bool or not isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r}")
    return value


def _coerce_list(value: Any, expected: Any, key: str) -> list:
    """A ``list[str]`` field such as ``log.report_to``: a YAML list, or one comma-separated string."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    (item_type,) = typing.get_args(expected)
    return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]


def _coerce_mapping(value: Any, expected: Any, key: str) -> dict:
    """A ``dict[str, float]`` field such as ``objective.terms`` (names are checked by its owner)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of name: value, got {value!r}")
    _, value_type = typing.get_args(expected)
    return {str(k): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}


def _build(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a nested dict, refusing unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + key!r}; valid keys under "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build(expected, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, expected, prefix + key)
            if isinstance(kwargs[key], dict):  # a mapping field: given entries update the defaults
                default = next(f for f in dataclasses.fields(cls) if f.name == key).default_factory()
                kwargs[key] = {**default, **kwargs[key]}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=1e-3`` -> (["optim", "lr"], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads '1e-3' as a string (no dot); accept it as the float it clearly is.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") and value.strip() else value
        except ValueError:
            pass
    return key.strip().split("."), value


def _set_nested(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def read_recipe(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML recipe as a nested dict; a top-level ``base: other.yaml`` (relative to this file) is read
    first and this file's keys are merged over it, so variants of a recipe name only what differs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a loop")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return deep_merge(read_recipe(path.parent / base, _seen + (path.resolve(),)), tree)


def deep_merge(base: dict, override: dict) -> dict:
    """``override``'s keys over ``base``'s, section by section; neither input is modified."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both_sections else value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults < YAML file (after its ``base``) < overrides, then ``validate``."""
    tree = read_recipe(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_nested(tree, key, value)
    return _build(Config, _sources_as_text(tree)).validate()


def _sources_as_text(tree: dict) -> dict:
    """``data.train`` given as a YAML list (of patterns, or of ``{path, weight}``) and ``data.train_weights``
    as a list of numbers become the ``::``- and ``,``-joined strings that the command line uses."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return tree
    data = dict(data)
    sources = data.get("train")
    if isinstance(sources, list):
        if all(isinstance(s, dict) for s in sources):
            for s in sources:
                if set(s) != {"path", "weight"}:
                    raise ConfigError(f"data.train: each source is {{path, weight}}, got {s!r}")
            data["train"] = "::".join(str(s["path"]) for s in sources)
            data["train_weights"] = ",".join(str(s["weight"]) for s in sources)
        elif all(isinstance(s, str) for s in sources):
            data["train"] = "::".join(sources)
        else:
            raise ConfigError("data.train: a list must hold either patterns or {path, weight} entries")
    if isinstance(data.get("train_weights"), list):
        data["train_weights"] = ",".join(str(w) for w in data["train_weights"])
    return {**tree, "data": data}


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, each field followed by its description."""
    lines: list[str] = []

    def emit(obj, indent: int) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            pad = "  " * indent
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, indent + 1)
            else:
                rendered = yaml.safe_dump(value, default_flow_style=True).strip()
                rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
                lines.append(f"{pad}{f.name}: {rendered}  # {f.metadata.get('help', '')}")

    emit(config, 0)
    return "\n".join(lines) + "\n"
