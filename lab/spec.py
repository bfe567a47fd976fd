"""Experiment specs: YAML -> `extends` merge -> ${ENV} -> strict schema -> resolved variants.

A spec describes one experiment: a base configuration plus named `variants` (each a partial
override of the base: the rows of an ablation table) and an optional `grid` (a cartesian
sweep over dotted paths). `expand()` turns it into fully resolved `Variant`s, each with a
stable key and a content hash of what determines its result (data, model, train, budget).

Every user mistake raises `SpecError` naming the file, the dotted field path and what is
allowed; YAML is read with `yaml.safe_load`, so a spec can never import or execute code.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lab.errors import SpecError, close_matches

if TYPE_CHECKING:
    from grafts import ModelConfig

# --------------------------------------------------------------------------- schema


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class AugmentSpec(Strict):
    """Training-time augmentation, all passed to timm (create_transform, Mixup)."""

    auto_augment: Optional[str] = Field(
        None, description="timm policy string, e.g. 'rand-m9-mstd0.5-inc1' (RandAugment)"
    )
    re_prob: float = Field(0.0, ge=0, le=1, description="random erasing probability")
    hflip: float = Field(0.5, ge=0, le=1)
    scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop scale range")
    color_jitter: Optional[float] = Field(None, ge=0)
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0 = off)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (0 = off)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class DataSpec(Strict):
    dataset: Literal["embedded", "imagefolder", "synthetic"] = "embedded"
    root: Optional[str] = Field(None, description="ImageFolder root with train/ and val/ (imagefolder only)")
    image_size: int = Field(32, ge=8, le=1024, description="input resolution fed to the model")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: Optional[int] = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="embedded/synthetic: held-out share")
    seed: int = 0
    synthetic_size: int = Field(512, ge=16, description="synthetic: number of images")
    num_classes: Optional[int] = Field(None, ge=2, description="synthetic: classes (others infer)")
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    verify_images: bool = Field(True, description="imagefolder: check every image with Pillow before training")
    skip_bad_files: bool = Field(
        False,
        description="imagefolder: train without unreadable images (counted on "
        "the run as lab.data.skipped_files) instead of stopping",
    )

    @model_validator(mode="after")
    def _root_needed(self):
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError("data.root is required when data.dataset is 'imagefolder'")
        return self


class TeacherSpec(Strict):
    """Hard distillation (DeiT/LeViT): the teacher's argmax is a second target for the distillation head."""

    variant: Optional[str] = Field(None, description="another variant of this experiment, trained first")
    checkpoint: Optional[str] = Field(None, description="path to a Lightning/torch checkpoint")
    model: Optional[dict[str, Any]] = Field(
        None, description="model section for the checkpoint (default: the variant's own zoo)"
    )
    alpha: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.variant is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of distill.variant or distill.checkpoint")
        return self


class InitSpec(Strict):
    """`model.init`: start a variant from weights instead of a random init (fine-tuning)."""

    checkpoint: Optional[str] = Field(
        None,
        description="a weights file: a lab final.pt, a Lightning .ckpt, a "
        "state dict, or a timm levit_*/resnet50 state dict saved locally",
    )
    variant: Optional[str] = Field(
        None,
        description="a finished variant: 'KEY' (this experiment, trained "
        "first) or 'EXPERIMENT/KEY' (newest finished run in the same store)",
    )
    include: Optional[list[str]] = Field(None, description="only keys starting with one of these, e.g. ['prefix.']")
    exclude: list[str] = Field(default_factory=list, description="never keys starting with one of these, e.g. ['head']")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.variant is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of model.init.checkpoint or model.init.variant")
        if self.variant is not None and not re.fullmatch(r"(?:[A-Za-z0-9_.\-]+/)?[A-Za-z0-9_.\-=]+", self.variant):
            raise ValueError("model.init.variant is 'KEY' or 'EXPERIMENT/KEY' (letters, digits, _ . - =)")
        return self


class TrainSpec(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="share of the budget spent in linear warmup")
    min_lr: float = Field(1e-5, ge=0)
    grad_clip: Optional[float] = Field(None, gt=0)
    ema: Optional[float] = Field(None, gt=0, lt=1, description="EMA decay of the weights (None = off)")
    distill: Optional[TeacherSpec] = None
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto = bf16-mixed on GPU, 32-true on CPU"
    )
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    eval_every: Optional[int] = Field(None, ge=1, description="validate every N steps (default: every epoch)")
    log_every: int = Field(10, ge=1)
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (None = torch default)")


class BudgetSpec(Strict):
    """Exactly one of epochs/steps/images/train_flops/seconds; shared by every variant."""

    epochs: Optional[float] = Field(None, gt=0)
    steps: Optional[int] = Field(None, ge=1)
    images: Optional[int] = Field(None, ge=1)
    train_flops: Optional[float] = Field(None, gt=0, description="forward+backward FLOPs (3x forward MACs x 2)")
    seconds: Optional[float] = Field(None, gt=0, description="matched runtime: training seconds")
    wall_clock: bool = Field(False, description="seconds only: stop on elapsed time instead of a calibrated step count")
    calibration_steps: int = Field(20, ge=1, description="seconds only: timed steps to measure throughput (median)")

    @model_validator(mode="after")
    def _exactly_one(self):
        kinds = [k for k in ("epochs", "steps", "images", "train_flops", "seconds") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"set exactly one of epochs, steps, images, train_flops, seconds (got {kinds or 'none'})")
        if self.wall_clock and self.seconds is None:
            raise ValueError("wall_clock applies only to a 'seconds' budget")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("epochs", "steps", "images", "train_flops", "seconds") if getattr(self, k) is not None)


class BenchSpec(Strict):
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int = Field(1, ge=1, description="CPU threads (paper: 1)")
    batch: Optional[int] = Field(None, ge=1, description="default: 16 on CPU, largest power of two on GPU")
    max_batch: int = Field(2048, ge=1)
    dtype: Optional[Literal["fp32", "bf16", "fp16"]] = Field(None, description="default: fp32 on CPU, bf16 on GPU")
    warmup: float = Field(1.0, ge=0, description="seconds")
    duration: float = Field(3.0, gt=0, description="seconds per repeat")
    repeats: int = Field(3, ge=1)
    channels_last: bool = False
    compile: bool = False
    after_train: bool = Field(
        True,
        description="lab run: measure inference throughput after training, on the "
        "run's device (logged as bench/<device>_imgs_per_s)",
    )


class MatchSpec(Strict):
    """Size a variant to the throughput of another before training (runtime matching)."""

    throughput_of: str = Field(description="variant key or zoo model name")
    vary: str = Field(description="dotted int path, e.g. model.stages.0.depth")
    values: list[int] = Field(min_length=1, description="candidate values to try")
    device: Literal["cpu", "cuda"] = "cpu"


class TrackingSpec(Strict):
    uri: Optional[str] = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite under mlruns/)"
    )
    experiment: Optional[str] = Field(None, description="MLflow experiment name (default: the spec name)")
    log_checkpoint: bool = True
    keep: Literal["final", "last", "all"] = Field(
        "final",
        description="after FINISHED keep: final = the final weights once (resume checkpoints deleted; "
        "final.pt only in MLflow when log_checkpoint), last = also last.ckpt, all = everything",
    )
    inspect: bool = Field(
        True,
        description="after training: first-layer filters, attention-bias maps and mean "
        "attention distance as metrics and figures (lab.inspection)",
    )
    inspect_images: int = Field(
        64,
        ge=0,
        le=4096,
        description="validation images for the mean attention distance (0 = skip it; filters and biases need none)",
    )


class ReferenceFigures(Strict):
    """Published figures shown beside ours (params in millions, MACs in millions)."""

    params_m: Optional[float] = None
    macs_m: Optional[float] = None
    conv_macs_m: Optional[float] = None
    transformer_macs_m: Optional[float] = None
    throughput_gpu: Optional[float] = None
    throughput_cpu: Optional[float] = None
    top1: Optional[float] = None
    epochs: Optional[float] = None
    source: Optional[str] = None


SECTIONS = ("data", "model", "train", "budget", "bench", "tracking")


class RayLaunchSpec(Strict):
    address: Optional[str] = Field(None, description="Ray cluster (default: $RAY_ADDRESS, else a local instance)")
    num_cpus: Optional[float] = Field(None, gt=0, description="CPUs per variant task")


class SlurmLaunchSpec(Strict):
    """sbatch settings, one job per variant (submitit); CLI --slurm-* flags override them."""

    partition: Optional[str] = None
    time: int = Field(240, ge=1, description="minutes")
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    mem_gb: Optional[float] = Field(None, gt=0)
    cpus_per_task: Optional[int] = Field(None, ge=1)
    gpus_per_node: Optional[int] = Field(None, ge=0, description="default: train.devices on GPU")
    setup: list[str] = Field(default_factory=list, description="shell lines before training (module load ...)")
    params: dict[str, str] = Field(default_factory=dict, description="any other #SBATCH key: value")
    folder: Optional[str] = Field(None, description="submitit logs (default <store>/submitit/<experiment>/%j)")
    cluster: Literal["slurm", "local"] = Field("slurm", description="local: submitit's LocalExecutor (testing)")


class LaunchSpec(Strict):
    """Where `lab run` trains the variants (experiment-wide; not part of a variant's hash)."""

    launcher: Literal["local", "ray", "slurm"] = "local"
    ray: RayLaunchSpec = Field(default_factory=RayLaunchSpec)
    slurm: SlurmLaunchSpec = Field(default_factory=SlurmLaunchSpec)


class ExperimentSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    data: DataSpec = Field(default_factory=DataSpec)
    model: dict[str, Any] = Field(default_factory=dict, description="grafts model config (see README)")
    train: TrainSpec = Field(default_factory=TrainSpec)
    budget: BudgetSpec = Field(default_factory=lambda: BudgetSpec(steps=100))
    bench: BenchSpec = Field(default_factory=BenchSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    match: Optional[MatchSpec] = None
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    baseline: Optional[str] = Field(None, description="variant key the tables compare against (default: first)")
    variants: dict[str, Optional[dict[str, Any]]] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: Optional[int | list[int]] = Field(
        None,
        description="repeats: N runs each variant with seeds train.seed, train.seed+1, ...; "
        "a list names the seeds. Each seed is its own run; tables aggregate them",
    )
    reference: dict[str, ReferenceFigures] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _seeds_valid(self):
        s = self.seeds
        if isinstance(s, int) and not isinstance(s, bool) and s < 1:
            raise ValueError(f"seeds must be >= 1 or a list of seeds (got {s})")
        if isinstance(s, list) and (not s or len(set(s)) != len(s)):
            raise ValueError(f"seeds must be a non-empty list of distinct integers (got {s})")
        return self


class Variant(BaseModel):
    """One fully resolved row of an experiment."""

    model_config = ConfigDict(extra="forbid")
    experiment: str
    key: str
    hash: str
    overrides: dict[str, Any]
    data: DataSpec
    model: dict[str, Any]
    train: TrainSpec
    budget: BudgetSpec
    bench: BenchSpec
    tracking: TrackingSpec
    match: Optional[MatchSpec] = None
    reference: Optional[ReferenceFigures] = None
    tags: dict[str, str] = Field(default_factory=dict)
    source: str = ""
    init: Optional[InitSpec] = Field(None, description="model.init: where the starting weights come from")
    changes: str = Field("", description="what this variant changes vs the experiment's baseline, in words")
    seed: int = Field(0, description="train.seed of this run (one of the variant's repeats)")
    repeated: bool = Field(False, description="the variant runs with several seeds (seeds: N)")
    config_hash: str = Field("", description="content hash without train.seed: the same for every seed of the variant")

    @property
    def uid(self) -> str:
        """Names this run among the invocation's runs: the key, plus the seed when the variant repeats."""
        return f"{self.key}-seed{self.seed}" if self.repeated else self.key

    @property
    def model_cfg(self) -> ModelConfig:
        """The model section as grafts' typed config (`model` is its validated, resolved dict form:
        what is logged, hashed and saved with the weights)."""
        import grafts

        return grafts.config_from_dict(self.model)

    @property
    def img_hw(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return self.model_cfg.img_hw

    def resolved(self) -> dict[str, Any]:
        """The variant as one plain dict (what is logged and hashed)."""
        out = {"experiment": self.experiment, "key": self.key, **{s: plain(getattr(self, s)) for s in SECTIONS}}
        if self.init is not None:
            out["model"] = {**out["model"], "init": plain(self.init)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump({**self.resolved(), "hash": self.hash, "overrides": self.overrides}, sort_keys=False)


# --------------------------------------------------------------------------- loading


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def plain(v: Any) -> Any:
    """A spec section as plain JSON-able data (a copy)."""
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else copy.deepcopy(v)


def with_model(variant: Variant, model: dict[str, Any], **update: Any) -> Variant:
    """`variant` with another resolved model (runtime matching, --smoke) and the hash of the new content.

    This hash covers data, train, budget and the model (not bench/tracking as `expand`'s does), as it
    always has for resized variants: changing it would retrain their finished runs.
    """
    resolved = {s: plain(getattr(variant, s)) for s in ("data", "train", "budget")} | {"model": model}
    return variant.model_copy(update={"model": model, "hash": content_hash(resolved), **update})


def deep_merge(base: Any, over: Any) -> Any:
    """Child wins; dicts merge recursively, everything else (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


MAX_SPEC_BYTES = 4 << 20  # a spec file larger than this is refused


def max_spec_values() -> int:
    """How many values a spec may hold once YAML aliases are expanded ($LAB_MAX_SPEC_VALUES, default 200000)."""
    return int(os.environ.get("LAB_MAX_SPEC_VALUES", "200000"))


def max_variants() -> int:
    """How many variants one spec may expand to ($LAB_MAX_VARIANTS, default 10000)."""
    return int(os.environ.get("LAB_MAX_VARIANTS", "10000"))


def _expanded_size(doc: Any, file: str, limit: int) -> int:
    """Values in `doc` counting every alias use again (what interpolation and merging would copy),
    computed without copying (memoised per node); an alias bomb or a recursive alias is a SpecError."""
    memo: dict[int, int] = {}
    stack: set[int] = set()

    def size(node: Any, where: str) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        k = id(node)
        if k in memo:
            return memo[k]
        if k in stack:
            raise SpecError("a YAML alias refers to itself (recursive structure)", file=file, path=where or None)
        stack.add(k)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        total = 1
        for key, child in items:
            total += size(child, f"{where}.{key}" if where else str(key))
            if total > limit:
                raise SpecError(
                    f"the spec expands to more than {limit} values (YAML aliases repeated inside "
                    f"each other?); raise LAB_MAX_SPEC_VALUES if this is intended",
                    file=file,
                    path=where or None,
                )
        stack.discard(k)
        memo[k] = total
        return total

    return size(doc, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError("file not found", file=str(path))
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"file is larger than {MAX_SPEC_BYTES >> 20} MB: not a spec", file=str(path))
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read the file ({e.strerror or e})", file=str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the spec as UTF-8", file=str(path)
        ) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        lines = text.splitlines()
        if mark is not None and mark.line < len(lines) and "${" in lines[mark.line]:
            problem += ' (inside {...} or [...] write "${VAR}" in quotes)'
        raise SpecError(f"YAML syntax error: {problem}", file=str(path), path=where) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise SpecError(f"a spec must be a YAML mapping, got {type(doc).__name__}", file=str(path))
    _expanded_size(doc, str(path), max_spec_values())
    return doc


def _load_raw(path: Path, stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack, path))
        raise SpecError(f"'extends' cycle: {chain}", file=str(stack[0]), path="extends")
    doc = _read_yaml(path)
    parents = doc.pop("extends", None)
    if parents is None:
        return doc
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise SpecError("must be a path or a list of paths", file=str(path), path="extends")
    merged: dict[str, Any] = {}
    for p in parents:
        parent = path.parent / p
        if not parent.is_file():
            raise SpecError(f"extended file not found: {p}", file=str(path), path="extends")
        merged = deep_merge(merged, _load_raw(parent, (*stack, path)))
    return deep_merge(merged, doc)


def _interpolate(node: Any, file: str, path: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, file, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, file, f"{path}.{i}") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match) -> str:
            val = os.environ.get(m.group(1))
            if val is None:
                if m.group(2) is not None:
                    return m.group(2)
                raise SpecError(
                    f"environment variable ${{{m.group(1)}}} is not set "
                    f"(export it, or write ${{{m.group(1)}:-default}})",
                    file=file,
                    path=path,
                )
            return val

        return _ENV.sub(sub, node)
    return node


def parse_set(assignments: list[str] | None) -> dict[str, Any]:
    """`--set a.b=value` (value parsed as YAML) -> nested override dict."""
    out: dict[str, Any] = {}
    for a in assignments or []:
        if "=" not in a:
            raise SpecError(f"--set expects dotted.path=value, got {a!r}")
        key, raw = a.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentSpec:
    """Read, merge `extends`, apply CLI overrides, interpolate ${ENV}, validate strictly."""
    file = str(path)
    raw = _load_raw(Path(path))
    if overrides:
        raw = deep_merge(raw, overrides)
    raw = _interpolate(raw, file)
    spec = _validate(ExperimentSpec, raw, file)
    spec._source = file
    return spec


# --------------------------------------------------------------------------- validation messages


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names of the pydantic model found by walking `loc` from `cls`."""
    import typing

    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            ann = current.model_fields[part].annotation
            for a in [ann, *typing.get_args(ann)]:
                if isinstance(a, type) and issubclass(a, BaseModel):
                    current = a
                    break
            else:
                return None
        else:
            return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _allowed(err: Mapping[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    t = err["type"]
    if t == "literal_error":
        return f"allowed: {ctx.get('expected')}"
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"allowed: {word} {ctx[key]}"
    return ""


def _validate(cls: type[BaseModel], raw: dict, file: str, prefix: str = "") -> Any:
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc)
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        if err["type"] == "extra_forbidden":
            fields = _fields_at(cls, loc[:-1]) or []
            msg = f"unknown key '{loc[-1]}'{close_matches(str(loc[-1]), fields)}; allowed: {', '.join(fields)}"
        else:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            msg = err["msg"].removeprefix("Value error, ")
            extra = _allowed(err)
            msg = f"{msg} (got {shown}{'; ' + extra if extra else ''})"
        more = len(e.errors()) - 1
        if more:
            msg += f" [and {more} more error{'s' if more > 1 else ''}]"
        raise SpecError(msg, file=file, path=path) from None


def _check_model(model: dict[str, Any], file: str, prefix: str) -> dict[str, Any]:
    """Validate and resolve the model section with grafts (zoo base + overrides); a `model.init`
    entry is validated by InitSpec and kept (as a plain dict) beside the grafts keys."""
    import grafts

    model = dict(model)
    init = model.pop("init", None)
    try:
        out = grafts.config_to_dict(grafts.config_from_dict(model))
        if init is not None:
            out["init"] = _validate(InitSpec, init, file, f"{prefix}.init").model_dump(mode="json")
        return out
    except grafts.GraftConfigError as e:
        raise SpecError(
            e.message if hasattr(e, "message") else str(e).split(": ", 1)[-1],
            file=file,
            path=f"{prefix}.{e.path}" if e.path else prefix,
        ) from None


# --------------------------------------------------------------------------- expansion


def _dotted_set(d: dict, dotted: str, value: Any, file: str, where: str) -> None:
    parts = dotted.split(".")
    node: Any = d
    for p in parts[:-1]:
        if isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        elif isinstance(node, dict):
            node = node.setdefault(p, {})
        else:
            raise SpecError(f"cannot set '{dotted}': '{p}' is not a mapping", file=file, path=where)
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SpecError(f"cannot set '{dotted}'", file=file, path=where)


def _check_override_keys(over: dict, file: str, where: str) -> None:
    """A variant may only override sections that exist; the schema then checks every key below."""
    allowed = set(SECTIONS) | {"match"}
    for k in over:
        if k not in allowed:
            raise SpecError(
                f"unknown key '{k}'{close_matches(k, allowed)}; a variant may override: {', '.join(sorted(allowed))}",
                file=file,
                path=f"{where}.{k}",
            )


_HASH_NEUTRAL_DATA = {"verify_images": True, "skip_bad_files": False}


def content_hash(resolved: dict[str, Any]) -> str:
    """sha256 over what determines a result: data, model, train, budget (not tracking/bench)."""
    keep = {k: resolved[k] for k in ("data", "model", "train", "budget")}
    data = dict(keep["data"]) if isinstance(keep.get("data"), dict) else keep.get("data")
    if isinstance(data, dict):  # fields added later hash like before while they keep their defaults
        for k, default in _HASH_NEUTRAL_DATA.items():
            if data.get(k, default) == default:
                data.pop(k, None)
        keep["data"] = data
    blob = json.dumps(keep, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def config_hash(resolved: dict[str, Any]) -> str:
    """content_hash with train.seed left out: one value shared by all seeds of a variant."""
    return content_hash({**resolved, "train": {k: v for k, v in resolved["train"].items() if k != "seed"}})


def seed_list(s: Optional[int | list[int]], train_seed: int) -> Optional[list[int]]:
    """The seeds a variant runs with, from `seeds:` (None: just its train.seed, not repeated)."""
    if s is None:
        return None
    if isinstance(s, int):
        return [train_seed + i for i in range(s)] if s > 1 else None
    return list(s)


def _fmt_value(v: Any) -> str:
    return str(v).replace(" ", "")


_Row = tuple[str, dict[str, Any], dict[str, Any]]  # (key, overrides, merged sections)
_Seeds = Optional[int | list[int]]


def expand(spec: ExperimentSpec) -> list[Variant]:
    """Variants (ablation rows) x grid (cartesian sweep) -> fully resolved, validated variants."""
    file = getattr(spec, "_source", spec.name)
    grid, seeds = _grid_and_seeds(spec, file)
    _check_size(spec, grid, seeds, file)
    rows = _variant_rows(spec, file)
    if grid:
        rows = _grid_rows(spec, rows, grid, file)
    keys = [k for k, *_ in rows]
    _check_row_names(spec, keys, file)
    out = [v for key, over, merged in rows for v in _resolve_row(spec, key, over, merged, seeds, file)]
    _set_changes(spec, rows, out)
    _check_variant_refs(out, file)
    return out


def _grid_and_seeds(spec: ExperimentSpec, file: str) -> tuple[dict[str, list[Any]], _Seeds]:
    """The grid without train.seed, and the seeds: `seeds:`, or the grid's train.seed values."""
    grid, seeds = dict(spec.grid), spec.seeds
    if "train.seed" in grid:  # a sweep over seeds is repeats of each variant, not new variants
        if seeds is not None:
            raise SpecError(
                "give the seeds once: either `seeds:` (or --seeds) or grid train.seed",
                file=file,
                path="grid.train.seed",
            )
        seeds = grid.pop("train.seed")
        if (
            not seeds
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
            or len(set(seeds)) != len(seeds)
        ):
            raise SpecError(f"seeds must be distinct integers (got {seeds})", file=file, path="grid.train.seed")
    return grid, seeds


def _run_count(spec: ExperimentSpec, grid: dict[str, list[Any]], seeds: _Seeds) -> int:
    """Runs the spec makes: variant rows x seeds x the size of each grid axis."""
    n = max(1, len(spec.variants)) * max(
        1, len(seeds) if isinstance(seeds, list) else (seeds if isinstance(seeds, int) else 1)
    )
    for values in grid.values():
        n *= len(values) if isinstance(values, list) and values else 1
    return n


def _check_size(spec: ExperimentSpec, grid: dict[str, list[Any]], seeds: _Seeds, file: str) -> None:
    """Refuse a spec that makes more runs than LAB_MAX_VARIANTS allows."""
    n = _run_count(spec, grid, seeds)
    if n > max_variants():
        sizes = " x ".join(str(len(v)) for v in spec.grid.values() if isinstance(v, list))
        raise SpecError(
            f"the spec makes {n} runs ({max(1, len(spec.variants))} row(s)"
            f"{' x ' + sizes if sizes else ''}), more than the limit of {max_variants()}; "
            f"shrink the grid or raise LAB_MAX_VARIANTS",
            file=file,
            path="grid" if grid else "variants",
        )


def _variant_rows(spec: ExperimentSpec, file: str) -> list[_Row]:
    """One row per entry of `variants:` (just 'base' without any), its overrides merged over the base."""
    base = spec.model_dump(mode="json", include=set(SECTIONS) | {"match"})
    rows: list[_Row] = []
    for key, over in (spec.variants or {"base": {}}).items():
        over = over or {}
        if not re.fullmatch(r"[A-Za-z0-9_.\-=]+", key):
            raise SpecError("variant keys may use letters, digits and _ . - only", file=file, path=f"variants.{key}")
        _check_override_keys(over, file, f"variants.{key}")
        rows.append((key, over, deep_merge(base, over)))
    return rows


def _check_grid_paths(grid: dict[str, list[Any]], file: str) -> None:
    for p in grid:
        if p.split(".")[0] not in set(SECTIONS):
            raise SpecError(f"grid paths start with one of {', '.join(SECTIONS)}", file=file, path=f"grid.{p}")
        if not grid[p]:
            raise SpecError("grid values must be a non-empty list", file=file, path=f"grid.{p}")


def _grid_rows(spec: ExperimentSpec, rows: list[_Row], grid: dict[str, list[Any]], file: str) -> list[_Row]:
    """Each row x every point of the grid, keyed 'ROW-name=value-...' (just 'name=value-...' without variants)."""
    _check_grid_paths(grid, file)
    paths = list(grid)
    gridded = []
    for key, over, merged in rows:
        if any(p.startswith("model.") for p in paths) and isinstance(merged.get("model"), dict):
            # grid paths may index into zoo-resolved fields (model.stages.0.depth): resolve first
            merged = dict(
                merged, model=_check_model(merged["model"], file, f"variants.{key}.model" if spec.variants else "model")
            )
        for combo in itertools.product(*(grid[p] for p in paths)):
            name, o, m = _grid_point(over, merged, dict(zip(paths, combo)), file)
            gridded.append((f"{key}-{name}" if spec.variants else name, o, m))
    return gridded


def _grid_point(
    over: dict[str, Any], merged: dict[str, Any], point: dict[str, Any], file: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A row set to one grid point: its name ('depth=2-lr=0.1'), overrides and merged sections (copies)."""
    o = copy.deepcopy(over)
    m = copy.deepcopy(merged)
    suffix = []
    for p, v in point.items():
        _dotted_set(m, p, v, file, f"grid.{p}")
        o[p] = v  # flat dotted key: describes the change, never re-applied
        suffix.append(f"{p.split('.')[-1]}={_fmt_value(v)}")
    return "-".join(suffix), o, m


def _check_row_names(spec: ExperimentSpec, keys: list[str], file: str) -> None:
    """`reference:` and `baseline:` must name rows of the experiment."""
    unknown_refs = set(spec.reference) - set(keys)
    if unknown_refs:
        r = sorted(unknown_refs)[0]
        raise SpecError(f"no variant named '{r}'{close_matches(r, keys)}", file=file, path=f"reference.{r}")
    if spec.baseline and _resolve_baseline(spec.baseline, keys) is None:
        raise SpecError(
            f"no variant named '{spec.baseline}'{close_matches(spec.baseline, keys)}", file=file, path="baseline"
        )


def _at(where: str, field: str) -> str:
    """The dotted path of `field` in a row ('variants.KEY.field', or 'field' for a spec without variants)."""
    return f"{where}.{field}".lstrip(".")


def _row_sections(merged: dict[str, Any], file: str, where: str) -> dict[str, Any]:
    """The row's data, train, budget, bench and tracking sections, validated."""
    return {
        s: _validate(cls, merged[s], file, _at(where, s))
        for s, cls in (
            ("data", DataSpec),
            ("train", TrainSpec),
            ("budget", BudgetSpec),
            ("bench", BenchSpec),
            ("tracking", TrackingSpec),
        )
    }


def _row_model(merged: dict[str, Any], file: str, where: str) -> dict[str, Any]:
    """The row's model section resolved by grafts, with a classifier's num_classes checked."""
    model = merged["model"]
    if not isinstance(model, dict):
        raise SpecError("must be a mapping", file=file, path=_at(where, "model"))
    model = _check_model(model, file, _at(where, "model"))
    nc = model.get("num_classes")
    if isinstance(nc, bool) or (nc is not None and (not isinstance(nc, int) or nc < 2)):
        raise SpecError(
            f"a classifier needs num_classes >= 2 (got {nc!r})", file=file, path=_at(where, "model.num_classes")
        )
    return model


def _split_init(model: dict[str, Any], file: str, where: str) -> tuple[dict[str, Any], Optional[InitSpec]]:
    """The model without its `init` entry, and that entry validated (None without one)."""
    if not isinstance(model.get("init"), dict):
        return model, None
    model = dict(model)
    return model, _validate(InitSpec, model.pop("init"), file, _at(where, "model.init"))


def _resolve_row(
    spec: ExperimentSpec, key: str, over: dict[str, Any], merged: dict[str, Any], seeds: _Seeds, file: str
) -> list[Variant]:
    """One row as fully resolved Variants: one per seed when it repeats, else one with its train.seed."""
    where = f"variants.{key}" if spec.variants else ""
    sections = _row_sections(merged, file, where)
    match = _validate(MatchSpec, merged["match"], file, _at(where, "match")) if merged.get("match") else None
    model = _row_model(merged, file, where)
    resolved = {s: plain(v) for s, v in sections.items()} | {"model": model}  # init hashed with the model
    model, init = _split_init(model, file, where)
    chash = config_hash(resolved)
    repeats = seed_list(seeds, sections["train"].seed)
    out = []
    for seed in repeats or [sections["train"].seed]:
        train = sections["train"].model_copy(update={"seed": seed})
        res = {**resolved, "train": plain(train)}
        out.append(
            Variant(
                experiment=spec.name,
                key=key,
                hash=content_hash(res),
                overrides=over,
                model=model,
                init=init,
                match=match,
                reference=spec.reference.get(key),
                tags=dict(spec.tags),
                source=file,
                seed=seed,
                repeated=repeats is not None,
                config_hash=chash,
                **{**sections, "train": train},
            )
        )
    return out


def _set_changes(spec: ExperimentSpec, rows: list[_Row], out: list[Variant]) -> None:
    """Each variant's `changes`: what its row changes against the baseline row, in words."""
    base_key = _resolve_baseline(spec.baseline, [k for k, *_ in rows]) if spec.baseline else out[0].key
    base_row = next(r for r in rows if r[0] == base_key)
    changes = {
        key: describe_changes(over, merged, base_row[1], base_row[2]) if key != base_key else "(baseline)"
        for key, over, merged in rows
    }
    for v in out:
        v.changes = changes[v.key]


def _check_variant_refs(out: list[Variant], file: str) -> None:
    """train.distill.variant and model.init.variant must name another variant of this experiment."""
    for v in out:
        if v.train.distill and v.train.distill.variant and v.train.distill.variant not in {x.key for x in out}:
            raise SpecError(
                f"no variant named '{v.train.distill.variant}'",
                file=file,
                path=f"variants.{v.key}.train.distill.variant",
            )
        if v.init and v.init.variant and "/" not in v.init.variant and v.init.variant not in {x.key for x in out}:
            raise SpecError(
                f"no variant named '{v.init.variant}'{close_matches(v.init.variant, [x.key for x in out])}"
                " (another experiment's: 'EXPERIMENT/KEY')",
                file=file,
                path=f"variants.{v.key}.model.init.variant".replace("variants.base.", ""),
            )
        if v.init and v.init.variant == v.key:
            raise SpecError(
                "a variant cannot start from its own weights", file=file, path=f"variants.{v.key}.model.init.variant"
            )


def _resolve_baseline(name: str, keys: list[str]) -> Optional[str]:
    """A full variant key, or a variant row's name under a grid (its first grid point)."""
    if name in keys:
        return name
    return next((k for k in keys if k.startswith(f"{name}-")), None)


def baseline_key(spec: ExperimentSpec, variants: list[Variant]) -> str:
    keys = [v.key for v in variants]
    return (_resolve_baseline(spec.baseline, keys) if spec.baseline else None) or keys[0]


def flatten_dotted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {'a.b.c': leaf}; lists and empty mappings are leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        p = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten_dotted(v, p))
        else:
            out[p] = v
    return out


def _dotted_get(d: Any, dotted: str) -> Any:
    node = d
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return "(default)"
    return node


def _word(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def describe_changes(
    over: dict[str, Any], merged: dict[str, Any], base_over: dict[str, Any], base_merged: dict[str, Any]
) -> str:
    """What a variant changes against the baseline *variant* (not the spec's base section):
    its overrides that differ from the baseline's, plus the baseline's own overrides that this
    variant does not share (shown with this variant's value), e.g. 'model.zoo=resnet2_deit6'."""
    mine, theirs = flatten_dotted(over), flatten_dotted(base_over)
    parts = [f"{k}={_word(v)}" for k, v in mine.items() if k not in theirs or theirs[k] != v]
    parts += [
        f"{k}={_word(_dotted_get(merged, k))}"
        for k in theirs
        if k not in mine and _dotted_get(merged, k) != _dotted_get(base_merged, k)
    ]
    return ", ".join(parts) if parts else "(same as baseline)"


def describe_overrides(over: dict[str, Any]) -> str:
    """'model.position=absolute, train.lr=0.001': what a variant overrides of the base, in words."""
    return ", ".join(f"{k}={_word(v)}" for k, v in flatten_dotted(over).items()) or "(baseline)"
