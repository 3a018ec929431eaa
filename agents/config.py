"""Run configuration: YAML in sections, each section a dataclass with one line of doc per field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

# The default run's config (`python runners/train.py`).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


@dataclass
class EnvConfig:
    backend: str = "dummy"  # "dummy" (closed-form stand-in) or "vlm" (the embedded MoE VLM)
    backend_options: dict = field(default_factory=dict)  # extra keyword arguments of the backend
    reward: dict = field(default_factory=dict)  # reward weights (accuracy, latency, violation, complexity, efficiency)
    # the training budgets' range: "profile" (the backend's: profile.json's, or backend_options'
    # budget_range_ms) or "machine" (the profile runner's rule over the profile rescaled by the
    # training run's start-up measurement of this machine, agents.factory.machine_budget_range)
    budget_range: str = "profile"


@dataclass
class DataConfig:
    dataset_names: list = field(default_factory=list)  # datasets to train on ([] = the backend's own)
    data_root: Optional[str] = None  # root of the official VQA files (real datasets only)
    model_path: Optional[str] = None  # VLM model dir (None = the shipped model)
    results_dir: Optional[str] = None  # dir with profile.json + importance.json (None = beside the model)


@dataclass
class PolicyConfig:
    hidden_dim: int = 256  # width of both predictors' MLPs
    sinusoidal_dim: int = 256  # size of the fixed sinusoidal budget code
    fixed_controller_ms: Optional[float] = None  # replaces the measured controller time (bit-reproducible runs)
    # how each request's stage networks run (policies/controller.py, the part of the request's time that
    # is the controller's): "eager" (torch), "compiled" (torch.compile; the first request of a process
    # compiles them, seconds) or "native" (one C call per stage, policies/native.py; CPU; built once per
    # machine with the C compiler)
    controller_runtime: str = "eager"
    # what Stage 2 reads besides p: "token" (the latency token, the design's), "token+elapsed" (and the
    # request's measured elapsed / remaining time), "elapsed" (those times, no token)
    stage2_inputs: str = "token"
    # "lookup": before GRPO, both stages imitate the profile's lookup-p95 choice; "family_lookup": each
    # question family's best fitting configuration on the val split; "family_request": each family's one
    # plan for all budgets, cut to the budget by the latency shield (agents/warm_start.py)
    warm_start: Optional[str] = None
    warm_start_samples: int = 256  # imitation requests (each runs up to the latency token, no decode)
    warm_start_steps: int = 300  # imitation minibatches of 64
    warm_start_lr: float = 1.0e-3
    warm_start_label_smoothing: float = 0.2  # keeps GRPO's groups sampling different actions
    # family_request: one request per family for each of this many equal parts of the training budget
    # range, each scored over the request budgets in its part (1: one request for every budget)
    warm_start_request_bins: int = 1
    # every episode executes the nearest plan whose p95 latency (the profile rescaled to this machine
    # at start-up, plus the controller's own time) fits the budget (envs/shield.py)
    latency_shield: bool = False
    # > 0: the shield's per-tier scale follows each executed episode's latency during the run (envs/shield.py)
    latency_shield_tracking: float = 0.0
    # the quantile of each tier's executed latencies that the tracked table estimates: at equilibrium
    # 1 - q of a tier's episodes exceed it, so a plan at the edge of a budget violates about 1 - q
    latency_shield_quantile: float = 0.95
    # None: off; a rate in (0, 1): the shield also keeps a margin per budget bin that steers each bin's
    # violation rate to it (envs/shield.py), and a served request's controller reads its budget divided by it
    latency_shield_violation_target: Optional[float] = None
    # the step of that steering (adaptive conformal inference's gamma): a violation multiplies the bin's
    # margin or price by exp(rate x (1 - target)), an episode in time by exp(-rate x target); over T of a
    # bin's episodes its violation rate is within (log of the steered range + rate) / (rate x T) of the
    # target (envs/shield.py)
    latency_shield_violation_rate: float = 0.1
    # the margin's bins: equal parts of the training budget range (evaluate.py: one per evaluated budget)
    latency_shield_budget_bins: int = 8
    # how the shield spends a bin's violation target: "margin" (one margin for every plan) or "value"
    # (the plan with the best accuracy for the request minus a steered price x P(violation); needs
    # warm_start family_request, whose family table gives each request's values; envs/shield.py)
    latency_shield_allocation: str = "margin"
    # with "value": true, the request is a ceiling (the plan runs at or below it); false, a request the
    # values know only names its family's values, and any plan may run (envs/shield.py)
    latency_shield_value_ceiling: bool = True
    # with "value", whose accuracies each request's values are: "taught" (the families the warm start
    # taught to make it), "measured" (the family mix of the training questions for which the controller
    # makes it greedily, measured when the shield is built: its confusions are in it; with the ceiling,
    # each request's ceiling is then the largest plan taught to a family that makes it; envs/shield.py)
    latency_shield_request_mix: str = "taught"
    # with "value": true, the price of a violation at a decision is the smaller of the bin's steered price
    # and the price at which the requests' best plans would meet the bin's (steered) target on average
    # by the shield's own risk estimate, so a bin whose plans rarely violate spends its target (envs/shield.py)
    latency_shield_expected_price: bool = False
    # with "value", how Stage 2 reads P(violation): "pooled" (every recent episode's latency / table ratio
    # alike, as Stage 1) or "elapsed" (as predicted by how fast this request ran before Stage 2; envs/shield.py)
    latency_shield_stage2_risk: str = "pooled"
    # with "value", whose latency ratios give a plan its P(violation): "shared" (every tier's alike) or
    # "tier" (its own tier's, once there are enough of them; envs/shield.py)
    latency_shield_risk_pool: str = "shared"
    # with "value", every budget bin's steered price of a violation before its first episode. The steering
    # moves it by exp(rate x (violation rate - target) x episodes), x1.35 over 600 episodes violating 1.5%
    # against a 1% target at rate 0.1, so in a run that long the start sets its level; with the expected
    # price on, the steered price caps it (envs/shield.py)
    latency_shield_price_start: float = 2.0
    # true: while training, the controller reads budgets and times divided by the shield's tracked scale
    # (its time_scale, as evaluate.py and answer.py set it), so it picks plans the table now lets through
    follow_shield_scale: bool = False


@dataclass
class LossConfig:
    epsilon_low: float = 0.2  # lower clip range of the ratio (1 - epsilon_low)
    epsilon_high: float = 0.2  # upper clip range of the ratio (1 + epsilon_high)
    beta: float = 0.0  # weight of the k3 KL to the policy GRPO starts from, the warm start's if any (0 = none)
    entropy_coef: float = 0.005  # weight of the entropy bonus summed over the four heads
    scale_rewards: str = "group"  # advantage scaling: "group" std, "batch" std or "none"
    num_iterations: int = 4  # optimisation epochs over each collected batch
    # constraint "violation rate <= target" by a Lagrange multiplier (agents/constraint.py); None: off
    violation_target: Optional[float] = None
    violation_lambda_lr: float = 2.0  # dual-ascent step of the multiplier per unit of rate excess
    violation_budget_bins: int = 1  # one multiplier per bin of the budget range (1: one global multiplier)
    violation_lambda_max: Optional[float] = None  # cap on every multiplier; None: no cap
    # with policy.latency_shield the insertion always runs at the shield's pin: leave its head out of
    # the ratio and the entropy bonus (agents/grpo.py); false keeps it in (the behaviour before)
    exclude_pinned_insertion: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-4  # learning rate of Stage 2 and the budget encoder
    stage1_lr_ratio: float = 1.0  # Stage-1 lr = lr * ratio (0 freezes Stage 1)
    max_grad_norm: float = 1.0  # gradient-norm clipping
    weight_decay: float = 0.0  # AdamW weight decay


@dataclass
class TrainConfig:
    batch_size: int = 8  # samples per batch (each run group_size times)
    group_size: int = 5  # GRPO group size G (rollouts per sample and budget)
    num_epochs: int = 100  # passes of steps_per_epoch batches
    steps_per_epoch: Optional[int] = None  # batches per epoch (None = train split size / batch_size)
    seed: int = 42  # seed of the policy, the env and the budget draws
    device: str = "cpu"  # device of the controller (and of the VLM backend)
    num_threads: Optional[int] = None  # torch CPU threads (None = torch's default)
    load_stage1_checkpoint: Optional[str] = None  # checkpoint whose Stage-1 weights initialise Stage 1
    use_multi_gpu: bool = False  # data-parallel training, one rank per GPU under torchrun (docs/DISTRIBUTED.md)
    collective_timeout_s: float = 600.0  # a rank waiting longer than this for the others stops the run


@dataclass
class EvalConfig:
    val_samples: int = 128  # held-out validation samples (each with one seeded budget)
    test_samples: int = 256  # held-out test samples of the final evaluation
    batch_size: int = 64  # env rows per evaluation chunk
    val_every_epochs: int = 1  # validate (and checkpoint best) every this many epochs
    sweep_budgets: int = 4  # budgets of the accuracy-vs-budget plot at each validation (0 = no plot)
    sweep_samples: int = 32  # validation samples run at every budget of that plot
    # A validated policy replaces best.pt when its validation episodes' rewards beat best.pt's, paired
    # episode for episode, by more than this many standard errors of the mean difference (0: any gain)
    best_margin_se: float = 0.0


@dataclass
class LoggingConfig:
    log_every: int = 5  # write train metrics every this many steps
    histograms: bool = True  # TensorBoard histograms of each head's actions


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build_section(cls, values: Mapping[str, Any], where: str):
    if not isinstance(values, Mapping):
        raise ValueError(f"config section {where!r} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise KeyError(f"unknown config key(s) {sorted(f'{where}.{k}' for k in unknown)}; expected one of "
                       f"{sorted(f'{where}.{k}' for k in known)}")
    return cls(**values)


# Configs and checkpoints written before policy.controller_runtime (2026-12-07) hold this boolean:
# true reads as "compiled", false as "eager".
LEGACY_COMPILE_KEY = "compile_controller"


def config_from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Build a Config; unknown sections or keys raise a KeyError naming them."""
    raw = dict(raw or {})
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = set(raw) - set(sections)
    if unknown:
        raise KeyError(f"unknown config section(s) {sorted(unknown)}; expected a subset of {sorted(sections)}")
    policy = raw.get("policy")
    if isinstance(policy, Mapping) and LEGACY_COMPILE_KEY in policy:
        raw["policy"] = policy = dict(policy)
        if "controller_runtime" in policy:
            raise KeyError(f"policy.{LEGACY_COMPILE_KEY} and policy.controller_runtime are both set; keep "
                           f"controller_runtime (compile_controller is its older boolean form)")
        legacy = policy.pop(LEGACY_COMPILE_KEY)
        if not isinstance(legacy, bool):
            raise ValueError(f"policy.{LEGACY_COMPILE_KEY}={legacy!r}: expected true or false")
        policy["controller_runtime"] = "compiled" if legacy else "eager"
    defaults = Config()
    return Config(
        **{
            name: _build_section(type(getattr(defaults, name)), raw.get(name) or {}, name)
            for name in sections
        }
    )


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections")
    return raw


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a YAML config (None = defaults) and apply dotted overrides ("optim.lr": 1e-3). A run's
    config.yaml is accepted too (its resume history is dropped: a new run starts its own)."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        raw.pop(RESUME_HISTORY, None)
    return apply_overrides(config_from_dict(raw), overrides or {})


# ---------------------------------------------------------------- a run's own config.yaml
RESUME_HISTORY = "resume_changes"  # config.yaml's record of the fields a resume changed
# Fields a resumed run may change: they act from the step they are applied on and keep the run's
# meaning. Anything else (seed, data, model, policy shape, loss, batch) would make it another run.
RESUMABLE_FIELDS = (
    "train.num_epochs",
    "train.num_threads",
    "train.use_multi_gpu",  # how the run is launched (any number of ranks resumes it), not what it computes
    "optim.lr",
    "optim.max_grad_norm",
    "logging.log_every",
    "logging.histograms",
)


def read_run_config(path: str | Path) -> tuple[Config, list[dict]]:
    """A run's config.yaml: the config it runs with and its list of resume changes."""
    raw = _read_yaml(Path(path))
    history = raw.pop(RESUME_HISTORY, None) or []
    if not isinstance(history, list):
        raise ValueError(f"{path}: {RESUME_HISTORY} must be a list, got {type(history).__name__}")
    return config_from_dict(raw), history


def run_config_text(cfg: Config, history: list[dict]) -> str:
    data = cfg.to_dict()
    if history:
        data[RESUME_HISTORY] = history
    return yaml.safe_dump(data, sort_keys=False)


def changed_fields(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (old value, new value) for every field that differs."""
    a, b = old.to_dict(), new.to_dict()
    return {f"{section}.{key}": (a[section][key], b[section][key])
            for section in a for key in a[section] if a[section][key] != b[section][key]}


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of cfg with dotted overrides applied (same checks as load_config)."""
    raw = cfg.to_dict()
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        raw[section][key] = value
    return config_from_dict(raw)
