"""The training configuration of one run: the schema a job carries and `xsam train` reads.

Pydantic v2 only, no torch: the API validates job configs with this exact model without having
torch installed. Defaults are the paper's CIFAR settings (../shared/XSAM.md): SGD lr 0.05,
momentum 0.9, weight decay 1e-3, batch 125, cosine schedule over 200 epochs, ρ = 0.15,
ρ_max = 2ρ, α grid 0:0.1:2.0, k = 1, α searched on the first minibatch of every epoch.

Every validation error names its field (pydantic's ``loc``, completed by `locate_error` for
cross-field checks); `describe_errors` renders them as ``"optimizer.rho: must be >= 0 (got
-1.0)"`` lines for the CLI and the API. A file that cannot be used raises
`xsam.errors.ConfigurationError`, the one error type for a configuration that cannot run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from xsam.errors import ConfigurationError

#: Names the model registry (xsam/models.py) must provide; a test keeps the two in step.
MODEL_NAMES = ("resnet18", "resnet50", "vgg11_bn", "wrn16_8", "mlp", "cnn1d", "densenet121")
#: Names the data set registry (xsam/data.py) must provide; a test keeps the two in step.
DATASET_NAMES = ("mnist1d", "digits", "cifar10", "cifar100", "synthetic", "tiny_imagenet")
OPTIMIZER_NAMES = ("sgd", "sgd+", "sam", "xsam")
#: The α search evaluates the loss once per grid point; more than this is a mistake, not a plan.
MAX_ALPHA_PROBES = 1000
MAX_EPOCHS = 10_000
#: Largest count or size (batch size, samples, step intervals): a 32-bit integer, so no size
#: reaches torch or a database column as something it cannot hold.
MAX_COUNT = 2**31 - 1
#: Largest value of a real-valued setting (learning rate, ρ, α_max, CPUs per worker): far
#: beyond any sensible run, and small enough that the arithmetic validation does with them
#: (2·ρ, workers × CPUs, α_max / Δα) stays finite.
MAX_REAL = 1e9


def _plain_json(value: dict[str, Any]) -> dict[str, Any]:
    """Free-form options must survive a JSON round trip: no NaN/Infinity, no lone surrogates.

    (Pydantic would dump NaN as null, and a lone surrogate cannot be encoded at all.)
    """
    todo: list[tuple[str, Any]] = [("", value)]
    while todo:
        where, item = todo.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where or 'value'} must be a finite number (got {item})")
        texts = [item] if isinstance(item, str) else []
        if isinstance(item, dict):
            texts += [k for k in item if isinstance(k, str)]
            todo += [(f"{where}[{k!r}]", v) for k, v in item.items()]
        elif isinstance(item, list | tuple):
            todo += [(f"{where}[{i}]", v) for i, v in enumerate(item)]
        for text in texts:
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(
                        f"{where or 'value'}: text must not contain lone UTF-16 surrogates"
                    ) from None
    return value


#: Free-form keyword arguments: any JSON object, as long as it can be written back as JSON.
JSONObject = Annotated[dict[str, Any], AfterValidator(_plain_json)]


def _shown(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _at_least(low: float, *, strict: bool = False, cap: float) -> AfterValidator:
    """A number above `low` (or at it unless `strict`), finite, and at most `cap`: a ceiling far
    beyond any sensible run that keeps the arithmetic on it finite and storable."""

    def check(v: float) -> float:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be a finite number (got {v})")
        if v < low or (strict and v == low):
            raise ValueError(f"must be {'>' if strict else '>='} {_shown(low)} (got {v})")
        if v > cap:
            raise ValueError(f"must be <= {_shown(cap)} (got {v})")
        return v

    return AfterValidator(check)


def _within(low: float, high: float, *, open_high: bool = False, shown: str = "") -> AfterValidator:
    """A number in [`low`, `high`] (or [`low`, `high`) when `open_high`); NaN never is."""
    interval = shown or f"[{_shown(low)}, {_shown(high)}{')' if open_high else ']'}"

    def check(v: float) -> float:
        if not (low <= v and (v < high if open_high else v <= high)):  # NaN fails too
            raise ValueError(f"must be in {interval} (got {v})")
        return v

    return AfterValidator(check)


def _one_of(names: tuple[str, ...], what: str) -> AfterValidator:
    def check(v: str) -> str:
        if v not in names:
            raise ValueError(f"unknown {what} {v!r}; known: {', '.join(names)}")
        return v

    return AfterValidator(check)


def _relative_root(v: str) -> str:
    if "\\" in v:
        raise ValueError("must use '/' separators")
    path = PurePosixPath(v)
    if path.is_absolute() or v.startswith("~"):
        raise ValueError(f"must be relative to the data root, got absolute path {v!r}")
    if ".." in path.parts:
        raise ValueError(f"must not contain '..', got {v!r}")
    return v


def _alpha_setting(v: float | str) -> float | str:
    if isinstance(v, float | int) and (not math.isfinite(v) or v < 0):
        raise ValueError(f'must be "dynamic" or a number >= 0 (got {v})')
    return v


def _search_schedule(v: str | int) -> str | int:
    if isinstance(v, int) and not 1 <= v <= MAX_COUNT:
        raise ValueError(f'must be "epoch" or a step count in [1, {MAX_COUNT}] (got {v})')
    return v


# One type per constraint; each error message says what the value must be and what it was.
#: Sizes and counts: batch size, samples, step intervals.
Count = Annotated[int, _at_least(1, cap=MAX_COUNT)]
NonNegativeCount = Annotated[int, _at_least(0, cap=MAX_COUNT)]
#: Real-valued settings that must be positive (learning rate, α grid, CPUs) or may be zero.
PositiveReal = Annotated[float, _at_least(0, strict=True, cap=MAX_REAL)]
NonNegativeReal = Annotated[float, _at_least(0, cap=MAX_REAL)]
#: A share in [0, 1): momentum, label noise, the validation split.
Fraction = Annotated[float, _within(0, 1, open_high=True)]
AscentSteps = Annotated[int, _within(1, 100)]
Epochs = Annotated[int, _within(1, MAX_EPOCHS)]
Workers = Annotated[int, _within(1, 1024)]
Seed = Annotated[int, _within(0, 2**63, open_high=True, shown="[0, 2**63)")]
ModelName = Annotated[str, _one_of(MODEL_NAMES, "model")]
DatasetName = Annotated[str, _one_of(DATASET_NAMES, "data set")]
DataRoot = Annotated[str, AfterValidator(_relative_root)]
#: The whole union is checked at once, so an error names the field, not a branch of it.
AlphaSetting = Annotated[float | Literal["dynamic"], AfterValidator(_alpha_setting)]
SearchSchedule = Annotated[Literal["epoch"] | int, AfterValidator(_search_schedule)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(_Strict):
    """Which network to train. Its input shape and class count come from the data set."""

    name: ModelName = Field(description=f"one of {', '.join(MODEL_NAMES)}")
    options: JSONObject = Field(
        default_factory=dict, description="model-specific keyword arguments (e.g. width, depth)"
    )

    @model_validator(mode="after")
    def _declared_options(self) -> ModelConfig:
        from xsam.option_specs import MODEL_OPTIONS, option_problems

        problems = option_problems(MODEL_OPTIONS[self.name], self.options)
        if problems:
            raise ValueError(f"options: {'; '.join(problems)}")
        return self


class DataConfig(_Strict):
    """Which data set, where it lies (relative to the data root), and how it is batched."""

    name: DatasetName = Field(description=f"one of {', '.join(DATASET_NAMES)}")
    root: DataRoot = Field(
        default="",
        description="directory relative to the data root (no absolute paths, no '..')",
    )
    batch_size: Count = Field(default=125, description="per-step global batch size")
    augment: bool = Field(
        default=True, description="crop+flip+Cutout(p=0.5) for 32×32 images; ignored otherwise"
    )
    num_train: Count | None = Field(default=None, description="train on the first N samples only")
    label_noise: Fraction = Field(
        default=0.0,
        description="fraction of training labels swapped for another class, fixed by the seed",
    )
    options: JSONObject = Field(
        default_factory=dict, description="data-set-specific options (e.g. synthetic shape)"
    )
    val_fraction: Fraction = Field(
        default=0.0,
        description="share of the training set held out as the validation set (val/acc); "
        "0 = none. Choose hyperparameters on val/acc; test/acc is only reported",
    )
    val_seed: int = Field(
        default=0,
        description="which samples are held out (the same for every seed, rank and retry)",
    )

    @model_validator(mode="after")
    def _declared_options(self) -> DataConfig:
        from xsam.option_specs import DATASET_OPTIONS, option_problems

        problems = option_problems(DATASET_OPTIONS[self.name], self.options)
        if problems:
            raise ValueError(f"options: {'; '.join(problems)}")
        return self


class OptimizerConfig(_Strict):
    """The optimizer arm and its hyperparameters.

    ``sgd`` is the base optimizer alone (one pass per step); ``sgd+`` is XSAM with α = 0;
    ``sam`` is XSAM with α = 1 (k-step SAM when ``steps`` > 1); ``xsam`` uses ``alpha``
    ("dynamic" by default: searched every ``search_every``).
    """

    name: Literal["sgd", "sgd+", "sam", "xsam"] = "xsam"
    lr: PositiveReal = 0.05
    momentum: Fraction = 0.9
    weight_decay: NonNegativeReal = 1e-3
    nesterov: bool = False
    rho: NonNegativeReal = 0.15
    steps: AscentSteps = Field(default=1, description="ascent steps k")
    alpha: AlphaSetting = "dynamic"
    rho_max: float | None = Field(default=None, description="probing radius; default 2·rho")
    alpha_max: PositiveReal = 2.0
    alpha_delta: PositiveReal = 0.1
    search_every: SearchSchedule = Field(
        default="epoch", description='"epoch" (first minibatch of each epoch) or a step count'
    )

    @model_validator(mode="after")
    def _cross_field(self) -> OptimizerConfig:
        if self.rho_max is not None and (
            not math.isfinite(self.rho_max) or not self.rho <= self.rho_max <= MAX_REAL
        ):
            raise ValueError(
                f"rho_max: must be >= rho ({self.rho}) and <= {MAX_REAL:g} (got {self.rho_max})"
            )
        # Compare the ratio before counting: a tiny alpha_delta makes it overflow to inf.
        ratio = self.alpha_max / self.alpha_delta
        if not ratio < MAX_ALPHA_PROBES:
            raise ValueError(
                f"alpha_delta: alpha_max/alpha_delta is {ratio:g}: more than "
                f"{MAX_ALPHA_PROBES} α probes (got {self.alpha_delta})"
            )
        probes = alpha_probe_count(self.alpha_max, self.alpha_delta)
        if probes > MAX_ALPHA_PROBES:
            raise ValueError(
                f"alpha_delta: alpha_max/alpha_delta gives {probes} α probes, "
                f"at most {MAX_ALPHA_PROBES} allowed"
            )
        if isinstance(self.alpha, float | int) and self.alpha > self.alpha_max:
            raise ValueError(f"alpha: must be <= alpha_max ({self.alpha_max}) (got {self.alpha})")
        return self

    @property
    def effective_rho_max(self) -> float:
        return 2 * self.rho if self.rho_max is None else self.rho_max

    @property
    def effective_alpha(self) -> float | str:
        """α the optimizer runs with: fixed for the baselines, as configured for ``xsam``."""
        return {"sgd+": 0.0, "sam": 1.0}.get(self.name, self.alpha)


def alpha_probe_count(alpha_max: float, alpha_delta: float) -> int:
    """Grid points 0, Δα, …, α_max (inclusive, robust to float rounding).

    Raises ValueError when the ratio is not a finite number (e.g. Δα = 5e-324).
    """
    ratio = alpha_max / alpha_delta + 1e-9
    if not math.isfinite(ratio):
        raise ValueError(f"alpha_max/alpha_delta is not finite ({alpha_max}/{alpha_delta})")
    return math.floor(ratio) + 1


class ScheduleConfig(_Strict):
    """How long to train and how the learning rate moves.

    ``cosine`` anneals per epoch to 0; ``step`` multiplies by 0.1 at 50 % and 75 % of the
    epochs; ``constant`` keeps it. ``warmup_epochs`` ramps linearly from lr/warmup first.
    """

    epochs: Epochs = 200
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: NonNegativeCount = 0

    @model_validator(mode="after")
    def _warmup_fits(self) -> ScheduleConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs: must be < epochs ({self.epochs}) (got {self.warmup_epochs})"
            )
        return self


class ResourcesConfig(_Strict):
    """What one run asks of the cluster: DDP ranks, and per rank a GPU and CPUs."""

    num_workers: Workers = Field(default=1, description="DDP ranks (Ray Train workers)")
    use_gpu: bool = False
    cpus_per_worker: PositiveReal = 1.0

    @property
    def total_cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def total_gpus(self) -> int:
        return self.num_workers if self.use_gpu else 0


class TrainConfig(_Strict):
    """One training run. The service embeds this model unchanged as a job's ``config``."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    seed: Seed = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: Count = Field(default=1, description="evaluate on the test split every N epochs")
    log_every: Count = Field(
        default=10,
        description="read the train statistics back, report them and poll for stop/divergence "
        "every N steps",
    )
    sync_batchnorm: bool = Field(
        default=False,
        description="under DDP, BatchNorm normalises with the statistics of the global batch "
        "(CUDA only)",
    )
    cudnn_benchmark: bool = Field(
        default=False, description="let cuDNN pick the fastest convolution algorithms (CUDA only)"
    )
    compile_model: bool = Field(default=False, description="wrap the model in torch.compile")
    cuda_graphs: bool = Field(
        default=False,
        description="capture each non-search training step in a CUDA graph and replay it "
        "(one GPU, no DDP, not with compile_model)",
    )

    @model_validator(mode="after")
    def _cuda_graphs_supported(self) -> TrainConfig:
        if not self.cuda_graphs:
            return self
        if not self.resources.use_gpu:
            raise ValueError("cuda_graphs: needs resources.use_gpu: true (a CUDA feature)")
        if self.resources.num_workers > 1:
            raise ValueError(
                f"cuda_graphs: one GPU only (got resources.num_workers "
                f"{self.resources.num_workers}); DDP's all-reduce in every backward is not "
                "captured"
            )
        if self.compile_model:
            raise ValueError(
                "cuda_graphs: not with compile_model (torch.compile's mode='reduce-overhead' "
                "is its own CUDA-graph path); pick one"
            )
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        # Splitting unevenly would silently train on a smaller batch at the same learning rate.
        ranks, batch = self.resources.num_workers, self.data.batch_size
        if batch % ranks:
            lower, upper = batch - batch % ranks, batch + ranks - batch % ranks
            raise ValueError(
                f"data.batch_size: must be divisible by resources.num_workers ({ranks}) so "
                f"that every rank takes the same share of the global batch (got {batch}; "
                f"e.g. {lower or upper} or {upper})"
            )
        return self


#: A check that spans fields names the one it is about at the start of its message.
_FIELD_IN_MESSAGE = re.compile(r"([a-z_]+): (.*)", re.S)


def locate_error(loc: Sequence[str | int], msg: str) -> tuple[tuple[str | int, ...], str]:
    """Where one pydantic error is and why: (``loc`` + the field it names, reason).

    A field's own check is located by pydantic (``loc`` ends with the field). A cross-field
    check runs on the model, so its ``loc`` stops at the model and its message starts with the
    field: ``"rho_max: must be >= rho …"`` at ``("optimizer",)`` is
    ``(("optimizer", "rho_max"), "must be >= rho …")``. Used by `describe_errors`, by the API's
    422 handler and by the CLI, so all three point at the same field.
    """
    reason = msg.removeprefix("Value error, ")
    named = _FIELD_IN_MESSAGE.match(reason)
    if named is None:
        return tuple(loc), reason
    field = named[1]
    where = tuple(loc) if loc and loc[-1] == field else (*loc, field)
    return where, named[2]


def describe_errors(error: ValidationError) -> list[str]:
    """One ``"field.path: reason"`` line per problem, for people rather than parsers."""
    lines = []
    for item in error.errors():
        where, reason = locate_error(item["loc"], item["msg"])
        path = ".".join(str(p) for p in where)
        lines.append(f"{path}: {reason}" if path else reason)
    return lines


def load_config(path: str | Path) -> TrainConfig:
    """Read a TrainConfig from a JSON or YAML file (chosen by extension; YAML otherwise).

    Raises `ConfigurationError` (a ValueError) with the file and every problem, field by field.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from exc
    import yaml

    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigurationError(f"{path}: not valid {kind}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{path}: expected a mapping at the top level")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigurationError(
            f"{path}: invalid config:\n  " + "\n  ".join(describe_errors(exc))
        ) from exc
