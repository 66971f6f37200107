"""Typed run configuration: a YAML recipe plus `section.key=value` overrides.

Every section forbids unknown keys, so a typo fails at once, before Ray starts, naming the
dotted key. Method sections are defined beside their method in `vitrail/ssl/<method>.py`.
Values are typed strictly (see `strict_problems`): no `true` where a number is wanted.
"""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import Annotated, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vitrail import backbones, storage
from vitrail.errors import VitrailError
from vitrail.pipelines.decode import MAX_IMAGE_PIXELS
from vitrail.pipelines.views import Normalization
from vitrail.ssl import METHODS, MethodConfig
from vitrail.ssl.optim import OPTIMIZER_SETTINGS, LrScaling, OptimizerName, OptimizerRecipe


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on CUDA and on CPUs with AMX (1.4x per iBOT demo step on a Xeon with it),
    # fp32 on other CPUs, where bf16 runs at half speed (vitrail.precision.uses_bf16).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile of every backbone (inductor); off by default: on the demo it did not pay for
    # its compile time on a 2-core CPU (BENCHMARKS.md, "torch.compile").
    compile: bool = False
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    keep_last: int = Field(2, ge=1, description="checkpoints kept on disk")
    log_every: int = Field(10, ge=1)
    tracking: Literal["wandb", "tensorboard", "none"] = "wandb"


class DataSection(Section):
    shards: str = Field("data/train", description="shard folder holding index.json")
    eval_train_shards: Optional[str] = Field(None, description="shards whose features fill the k-NN bank")
    eval_test_shards: Optional[str] = Field(None, description="shards whose features are classified")
    channels: Literal[1, 3] = 3
    # ImageNet statistics (DINO's Normalize); a grayscale set overrides them.
    mean: list[float] = [0.485, 0.456, 0.406]
    std: list[float] = [0.229, 0.224, 0.225]
    shuffle_buffer: int = Field(2048, ge=0, description="samples in the local shuffle buffer")
    # Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS); checked from the header, before decoding.
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, description="images with more pixels are skipped and counted")
    verify: bool = Field(False, description="check each shard's sha256 against index.json when first read")

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.channels, tuple(self.mean), tuple(self.std))

    @model_validator(mode="after")
    def _stats_match_channels(self):
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"data.mean and data.std need {self.channels} values (data.channels)")
        return self


class ModelSection(Section):
    backbone: str = "vit_small"
    # Stochastic depth in the student (ignored by backbones without it, such as ResNet); unset,
    # the method's paper value (`paper_drop_path_rate`: DINO and iBOT 0.1, DINOv2 0.3, the others 0).
    drop_path_rate: Optional[float] = Field(None, ge=0.0, lt=1.0)
    kwargs: dict = Field(default_factory=dict, description="extra keyword arguments of the backbone")
    # BatchNorm statistics over the global batch of all workers, as DINO's main_dino.py (SyncBatchNorm
    # in student and teacher) and BYOL's cross-replica BN do; no effect on one worker or without BN.
    sync_batchnorm: bool = True
    # Continued pretraining (vitrail/launch/init_from.py), on a fresh run only: a resumed run keeps its checkpoint.
    init_from: Optional[str] = Field(None, description="released backbone file (DINO, iBOT, timm .safetensors/.pth), "
                                     "vitrail run dir, checkpoint or export folder the backbones start from")
    init_strict: bool = Field(True, description="false: load the keys that fit and log every skipped one")
    init_heads: bool = Field(False, description="also start the heads from init_from, a vitrail run of the same method")
    freeze_backbone_steps: int = Field(0, ge=0, description="first steps training only the heads (head warm-up)")

    @model_validator(mode="after")
    def _known_backbone_and_kwargs(self):
        if self.backbone not in backbones.names():
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {', '.join(backbones.names())}")
        accepted = backbones.arguments(self.backbone)
        for key in self.kwargs:
            if key not in accepted:
                raise ValueError(f"model.kwargs.{key} is not an argument of {self.backbone}; accepted: {', '.join(accepted)}")
        if self.init_heads and not self.init_from:
            raise ValueError("model.init_heads needs model.init_from (a vitrail run of the same method)")
        return self


class OptimSection(Section):
    """How long and on what batch a run trains, and the optimizer. Every optimizer key left unset
    takes the method's paper value (`paper_optimizer` of its config, vitrail/ssl/<method>.py);
    naming another optimizer than the paper's carries none of them over, so they must all be set."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1, description="images per worker per step")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many steps (schedules still span all epochs)")
    name: Optional[OptimizerName] = Field(None, description="adamw, sgd or lars")
    lr: Optional[float] = Field(None, gt=0, description="peak learning rate at the reference batch of lr_scaling")
    lr_scaling: Optional[LrScaling] = Field(None, description="linear_256: lr x global batch / 256; sqrt_1024: "
                                            "lr x sqrt(global batch / 1024); none: lr as is")
    warmup_epochs: Optional[float] = Field(None, ge=0)
    lr_schedule: Optional[Literal["cosine", "steps"]] = Field(None, description="after the warm-up: cosine to "
                                                              "min_lr, or x lr_gamma at each of lr_milestones")
    min_lr: Optional[float] = Field(None, ge=0)
    lr_milestones: Optional[tuple[float, ...]] = Field(None, description="epochs (lr_schedule: steps)")
    lr_gamma: Optional[float] = Field(None, gt=0)
    weight_decay: Optional[float] = Field(None, ge=0)
    weight_decay_end: Optional[float] = Field(None, ge=0)
    clip_grad: Optional[float] = Field(None, ge=0, description="max gradient norm (the method's rule); 0 disables")
    momentum: Optional[float] = Field(None, ge=0, lt=1, description="sgd and lars")
    nesterov: Optional[bool] = Field(None, description="sgd")
    trust_coefficient: Optional[float] = Field(None, gt=0, description="lars")

    @model_validator(mode="after")
    def _complete_recipe(self):
        if self.name is None:
            return self  # only a Config fills the recipe in (from its method)
        required = ["lr", "lr_scaling", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad",
                    *OPTIMIZER_SETTINGS[self.name]]
        missing = [key for key in required if getattr(self, key) is None]
        if missing:
            raise ValueError(f"optim.name={self.name} is not the method's paper optimizer, whose settings do not "
                             f"carry over: set {', '.join('optim.' + key for key in missing)}")
        foreign = [key for keys in OPTIMIZER_SETTINGS.values() for key in keys
                   if key not in OPTIMIZER_SETTINGS[self.name] and getattr(self, key) is not None]
        if foreign:
            raise ValueError(f"{', '.join('optim.' + key for key in foreign)}: not a setting of optim.name={self.name}")
        if self.lr_milestones and self.lr_schedule != "steps":
            raise ValueError("optim.lr_milestones need optim.lr_schedule: steps")
        return self

    def recipe(self) -> OptimizerRecipe:
        fields = {key: value for key, value in self.model_dump(exclude={"epochs", "batch_size", "max_steps"}).items()
                  if value is not None}
        return OptimizerRecipe(**fields)


class RaySection(Section):
    workers: int = Field(1, ge=0, description="training workers; 0 runs the loop in the driver process")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    torch_threads: Optional[int] = Field(None, ge=1, description="intra-op threads per worker (default: cpus_per_worker)")
    address: Optional[str] = Field(None, description="existing cluster (ray://host:10001 or auto); default starts one on 127.0.0.1")
    # A run that starts its own cluster binds everything to 127.0.0.1; on a cluster, the workers'
    # torch.distributed store binds the node address Ray was started with (`ray start --node-ip-address`).
    interface: Optional[str] = Field(None, description="network interface (e.g. eth1) of the workers' gloo / NCCL "
                                     "sockets on a cluster (ray.address set); default: the libraries' choice")
    object_store_mb: Optional[int] = Field(None, ge=64)
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the latest checkpoint")


class EvalSection(Section):
    """Monitoring on rank 0 while pretraining (vitrail/eval/online.py)."""

    knn_every: int = Field(0, ge=0, description="steps between online k-NN evaluations (and one at the end); 0 disables")
    # Decoded once and held as uint8 eval crops: samples x channels x crop^2 bytes of memory. One
    # evaluation forwards 4,000 images, about the cost of 6 demo training steps (batch 64, 2 global
    # + 4 local crops, student and teacher): 6% of training at knn_every = 100 (benchmarks/online_knn.py).
    knn_train_samples: int = Field(3000, ge=1, description="first samples of data.eval_train_shards in the k-NN bank")
    knn_test_samples: int = Field(1000, ge=1, description="first samples of data.eval_test_shards classified")
    # DINO's weighted k-NN (Sec. 4.1): k = 20, T = 0.07.
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    images: bool = Field(True, description="log view grids at the first logged step and attention maps")
    attention_every: int = Field(0, ge=0, description="steps between attention maps; 0: at each k-NN evaluation")
    attention_images: int = Field(4, ge=1, description="fixed eval images whose attention maps are drawn")

    @model_validator(mode="after")
    def _k_fits_the_bank(self):
        if self.k > self.knn_train_samples:
            raise ValueError(f"eval.k ({self.k}) exceeds eval.knn_train_samples ({self.knn_train_samples})")
        return self


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    method: MethodConfig
    optim: OptimSection = Field(default_factory=OptimSection)
    ray: RaySection = Field(default_factory=RaySection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="before")
    @classmethod
    def _paper_defaults(cls, tree):
        """Unset optim.* keys (the optimizer being the paper's) and model.drop_path_rate take the
        method's paper values, so config.yaml records every value the run used."""
        method = tree.get("method") if isinstance(tree, dict) else None
        if not isinstance(method, dict) or method.get("name") not in METHODS:
            return tree  # pydantic names what is wrong
        paper = METHODS[method["name"]][0]
        tree = dict(tree)
        if isinstance(tree.setdefault("optim", {}), dict):
            optim = tree["optim"] = dict(tree["optim"])
            if optim.setdefault("name", paper.paper_optimizer.name) == paper.paper_optimizer.name:
                for key, value in paper.paper_optimizer.settings().items():
                    optim.setdefault(key, value)
        if isinstance(tree.setdefault("model", {}), dict):
            tree["model"] = {"drop_path_rate": paper.paper_drop_path_rate, **tree["model"]}
        return tree

    @model_validator(mode="after")
    def _online_knn_has_shards(self):
        if self.eval.knn_every and not (self.data.eval_train_shards and self.data.eval_test_shards):
            raise ValueError("eval.knn_every needs data.eval_train_shards and data.eval_test_shards")
        return self

    def make_paths_absolute(self) -> None:
        """The local run dir, shard and init_from paths made absolute from this process's working
        directory (Ray workers and Ray Jobs run elsewhere); URLs stay as they are. A URL of an
        unknown scheme fails here."""
        self.run.dir = storage.absolute(self.run.dir)
        if self.model.init_from:
            self.model.init_from = storage.absolute(self.model.init_from)
        for field in ("shards", "eval_train_shards", "eval_test_shards"):
            if getattr(self.data, field):
                setattr(self.data, field, storage.absolute(getattr(self.data, field)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise VitrailError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise VitrailError(f"override {item!r} is not of the form section.key=value")
        parsed.append((key.strip(), yaml.safe_load(raw)))
    return parsed


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        parts = [str(part) for part in problem["loc"] if not str(part).startswith("function-after")]
        # The method union puts the chosen method's name in the path ('method', 'dino', 'bogus').
        if len(parts) > 1 and parts[0] == "method" and parts[1] in METHODS:
            del parts[1]
        key = ".".join(parts)
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
        else:
            lines.append(f"{key or 'config'}: {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(lines)


def strict_problems(model: type[BaseModel], tree, prefix: str = "") -> list[str]:
    """What pydantic's lax mode would coerce but a recipe must not hold: `true` for an int or a float
    (it trains with batch 1), `1` or "yes" for a bool, a string for an int, nan or inf anywhere.
    Floats take ints and numeric strings, as PyYAML reads `1e-3` as the string "1e-3"."""
    if not isinstance(tree, dict):
        return []  # pydantic names the section that is not a mapping
    problems = []
    for name, value in tree.items():
        field = model.model_fields.get(name)
        if field is None:
            continue  # pydantic names the unknown key
        annotation = field.annotation
        if field.discriminator and isinstance(value, dict):
            tagged = [option for option in get_args(annotation)
                      if value.get(field.discriminator) in get_args(option.model_fields[field.discriminator].annotation)]
            annotation = tagged[0] if tagged else None
        problems += _value_problems(annotation, value, f"{prefix}{name}")
    return problems


def _value_problems(annotation, value, key: str) -> list[str]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _value_problems(args[0], value, key)
    if origin in (Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        if value is None and len(options) < len(args):
            return []
        return _value_problems(options[0], value, key) if len(options) == 1 else []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return strict_problems(annotation, value, f"{key}.")
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        element_types = args if origin is tuple and Ellipsis not in args else args[:1] * len(value)
        return [problem for position, (element_type, element) in enumerate(zip(element_types, value))
                for problem in _value_problems(element_type, element, f"{key}[{position}]")]
    expected = None
    if annotation is bool and not isinstance(value, bool):
        expected = "true or false"
    elif origin is Literal and isinstance(value, bool) and not any(arg is value for arg in args):
        expected = f"one of {', '.join(map(repr, args))}"  # True == 1 would pass Literal[1, 3]
    elif annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        expected = "an integer"
    elif annotation is float:
        if isinstance(value, bool):
            expected = "a number"
        elif not math.isfinite(_as_float(value)):
            expected = "a finite number"
    return [f"{key}: expected {expected} (got {value!r})"] if expected else []


def _as_float(value) -> float:
    """`value` as a float where it reads as one, else 0.0 (pydantic then names what it is)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def from_dict(tree: dict, source: str = "config") -> Config:
    problems = strict_problems(Config, tree)
    if problems:
        raise VitrailError(f"{source}: {'; '.join(problems)}")
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise VitrailError(f"{source}: {_describe(error)}") from None


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe, apply `section.key=value` overrides, validate everything."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise VitrailError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise VitrailError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise VitrailError(f"config file {path} must hold a mapping of sections")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return from_dict(tree, str(path))
