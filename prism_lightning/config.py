"""Typed settings of every stage: dataclasses that YAML configs and the command line fill in.

Import-light (torch, the project's registries and nothing else): the CLI builds its parser from
these classes, and each field's docstring is its ``--help`` line. Choices are ``Literal`` types,
so a misspelt value is refused when the config is parsed, before any compute.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Literal

from prism_lightning import DEMO_DATA, TINY_MODEL
from prism_lightning.errors import SettingsError
from prism_lightning.influence.preconditioners import PreconditionerName
from prism_lightning.influence.scoring import MODES, ModeName

DType = Literal["float32", "bfloat16", "float16"]
TargetCheckpoint = Literal["each", "last"]  # which checkpoint's target side every checkpoint's pool features meet
NAME = re.compile(r"[A-Za-z0-9_.-]+")


def refuse(where: str, problems: list[str]) -> None:
    """Raise one ``SettingsError`` listing every problem of a settings object (nothing if none)."""
    problems = [p for p in problems if isinstance(p, str)]  # each check is ``condition and message``
    if problems:
        raise SettingsError(f"{where}: " + "; ".join(problems))


@dataclass
class ModelArgs:
    """Which causal LM to load and how (``AutoModelForCausalLM.from_pretrained``)."""

    name_or_path: str = TINY_MODEL
    """Hub id or local folder of the base model (the embedded tiny Llama by default)."""
    dtype: DType = "float32"
    """dtype of the base weights (and of QLoRA's compute)."""
    quantization: Literal["nf4"] | None = None
    """``nf4``: load the base in 4-bit NF4 with bitsandbytes (QLoRA); null: no quantization."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% more compute)."""
    attn_implementation: str | None = "eager"
    """transformers attention implementation (``eager``, ``sdpa``, ``flash_attention_2``)."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository (transformers' ``trust_remote_code``)."""


@dataclass
class LoraArgs:
    """LoRA adapter settings (the paper's: r=128, alpha=512, dropout 0.1 on q/k/v/o)."""

    enabled: bool = True
    """false: train every parameter (full fine-tune; gradient features need LoRA)."""
    r: int = 128
    """LoRA rank."""
    alpha: int = 512
    """LoRA scale numerator (the update is ``alpha / r * B A``)."""
    dropout: float = 0.1
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get an adapter."""
    init_seed: int = 0
    """Seed of the adapter's initialisation (the pipeline sets it to the experiment's seed)."""

    def __post_init__(self) -> None:
        refuse("lora", [self.r < 1 and f"r={self.r} must be >= 1",
                        self.alpha <= 0 and f"alpha={self.alpha} must be > 0",
                        not 0 <= self.dropout < 1 and f"dropout={self.dropout} must be in [0, 1)",
                        not self.target_modules and "target_modules is empty"])


@dataclass
class OptimArgs:
    """AdamW with ``transformers``' schedule: a linear rise over ``warmup_ratio`` of the steps, then ``schedule``."""

    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2); saved with each warmup checkpoint for the Adam preconditioners."""
    eps: float = 1e-8
    """Adam's epsilon."""
    warmup_ratio: float = 0.03
    """Share of the steps with a rising learning rate (rounded up to whole steps, as the Hugging Face Trainer)."""
    schedule: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    """After the rise: linear decay to 0, cosine decay to 0, or constant (``transformers.get_scheduler``)."""

    def __post_init__(self) -> None:
        refuse("optim", [self.lr <= 0 and f"lr={self.lr} must be > 0",
                         not all(0 <= b < 1 for b in self.betas) and f"betas={self.betas} must be in [0, 1)",
                         self.eps <= 0 and f"eps={self.eps} must be > 0",
                         not 0 <= self.warmup_ratio < 1 and f"warmup_ratio={self.warmup_ratio} must be in [0, 1)"])


@dataclass
class FSDPArgs:
    """How ``configure_model`` shards the model when the trainer runs the ``fsdp2`` strategy."""

    param_dtype: DType | None = None
    """dtype the all-gathered weights compute in (``bfloat16`` on GPU); null: the stored dtype."""
    reduce_dtype: DType | None = "float32"
    """dtype of the gradient reduce-scatter."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (ZeRO-3); false keeps them (more memory)."""
    load_on_rank0: bool = True
    """Rank 0 reads the weights and broadcasts each rank its shard; the others start on the meta device (host
    memory: one full copy per node, not one per rank). false: every rank loads the full model. A 4-bit (QLoRA)
    base is always loaded by every rank (its quantized weights stay replicated)."""


@dataclass
class ProjectionArgs:
    """Random projection of the per-example gradients to ``dim`` dimensions."""

    kind: Literal["none", "rademacher", "sjlt"] = "sjlt"
    """``sjlt``: sparse sign sketch; ``rademacher``: dense +-1/sqrt(k); ``none``: raw gradients (small models)."""
    dim: int = 8192
    """k, the projected dimension (LESS: 8192)."""
    seed: int = 0
    """Seed of the projection (identical across processes, devices and runs)."""
    sjlt_s: int = 1
    """Nonzeros per input coordinate of the sparse sketch."""
    block_rows: int = 4096
    """Rows of the dense Rademacher matrix generated at a time."""
    cache_mb: int = 512
    """Memory for generated projection blocks kept between batches (does not change the values)."""

    def __post_init__(self) -> None:
        refuse("projection", [self.kind != "none" and self.dim < 1 and f"dim={self.dim} must be >= 1",
                              self.sjlt_s < 1 and f"sjlt_s={self.sjlt_s} must be >= 1",
                              self.block_rows < 1 and f"block_rows={self.block_rows} must be >= 1",
                              self.cache_mb < 0 and f"cache_mb={self.cache_mb} must be >= 0"])


@dataclass
class SelectionArgs:
    """How to turn scores into a subset."""

    task: Literal["forward", "repair"] = "forward"
    """``forward``: keep the top rows; ``repair``: drop the bottom (most harmful) rows, keep the rest."""
    fraction: float | None = 0.05
    """Budget as a share of the pool: rows kept (forward) or removed (repair). Give it or ``k``."""
    k: int | None = None
    """Budget as a row count (instead of ``fraction``)."""
    per_subtask_direction: bool = False
    """One target direction per target subtask, max over subtasks (``less`` always does this)."""
    per_subtask_quota: bool = False
    """Spread the budget over the pool's subtasks in proportion to their size."""
    epochs: list[int] | None = None
    """Warmup checkpoints to score with (default: every complete store)."""
    target_checkpoint: TargetCheckpoint = "each"
    """``each``: every checkpoint's pool features meet the target features and preference weights of the same
    checkpoint (LESS, PRISM); ``last``: they all meet those of the last checkpoint scored, so the target side is
    needed there only (the features stage's ``target_checkpoint``; docs/evidence.md, "What a user can skip")."""
    chunk_rows: int = 8192
    """Pool rows scored at a time (memory: chunk_rows x k x 8 bytes)."""
    seed: int = 0
    """Seed of the ``random`` mode."""
    label: str | None = "harmful"
    """Ground-truth column for ranking metrics (skipped when the pool lacks it); never used to score."""
    plots: bool = True
    """Write ``roc.png`` and ``score_distributions.png`` with the ranking metrics."""
    verify: bool = True
    """Check every shard's sha256 against its store's manifest before scoring (a full read of the stores)."""
    explain: int = 20
    """Rows explained at each end of every gradient mode's ranking in ``<mode>/explain.jsonl`` (0: none)."""
    explain_pairs: int = 5
    """Target pairs listed per explained row (the strongest contributions; all pairs are summed by subtask)."""
    subtask: str | None = None
    """Only the target pairs of this subtask make the target direction (default: every pair)."""

    def __post_init__(self) -> None:
        refuse("selection", self.problems())

    def problems(self) -> list:
        return [
            self.explain < 0 and f"explain={self.explain} must be >= 0",
            self.explain_pairs < 1 and f"explain_pairs={self.explain_pairs} must be >= 1",
            (self.fraction is None) == (self.k is None) and "give exactly one of fraction and k",
            self.fraction is not None and not 0 < self.fraction <= 1 and f"fraction={self.fraction} must be in (0, 1]",
            self.k is not None and self.k < 1 and f"k={self.k} must be >= 1",
            self.chunk_rows < 1 and f"chunk_rows={self.chunk_rows} must be >= 1",
            self.epochs is not None and not self.epochs and "epochs is empty (null: every checkpoint)",
            self.epochs is not None and len(set(self.epochs)) != len(self.epochs) and f"epochs repeat: {self.epochs}"]


@dataclass
class DatasetSpec:
    """A dataset read with ``datasets.load_dataset`` (in a data setting, instead of a file path)."""

    path: str
    """A builder (``json``, ``csv``, ``parquet``) with ``data_files``, a local folder of data files or one
    written by ``save_to_disk``, or a hub id (needs the hub or its local cache)."""
    split: str | None = None
    """The split to read; required when the dataset has several."""
    name: str | None = None
    """The dataset's configuration name."""
    data_files: str | list[str] | dict[str, str] | None = None
    """Data files for a builder (``path: json``)."""
    revision: str | None = None
    """Hub revision."""

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in asdict(self).items() if v is not None and k != "path")
        return f"load_dataset({self.path!r}{', ' + args if args else ''})"


# A data setting: a file or folder path (relative to the working directory), or a ``load_dataset`` spec as a
# mapping with ``DatasetSpec``'s keys. Not ``str | DatasetSpec``: with a dataclass in the union the CLI would read
# an existing file's contents as a nested config (a CSV path became its text).
DataSource = str | dict


def spec_problems(name: str, value) -> list:
    """Problems of a data setting given as a ``load_dataset`` mapping (none for a path)."""
    if not isinstance(value, dict):
        return []
    known = {f for f in DatasetSpec.__dataclass_fields__}
    extra = sorted(set(value) - known)
    return [extra and f"{name}: unknown keys {extra} in a load_dataset spec; use {sorted(known)}",
            "path" not in value and f"{name}: a load_dataset spec needs 'path' (a builder such as json, a folder or a "
                                    "hub id)"]


def as_source(value):
    """A data setting as the readers take it: a path string, or a ``DatasetSpec``."""
    return DatasetSpec(**value) if isinstance(value, dict) else value


@dataclass
class Columns:
    """Column names in the user's files (rename here instead of editing the data)."""

    id: str = "id"
    """Row id (default: the row number)."""
    prompt: str = "prompt"
    """Prompt text, or a list of chat messages."""
    completion: str = "completion"
    """Response of an SFT row (string or the assistant message)."""
    messages: str = "messages"
    """Chat messages of an SFT row; the last one is the assistant's response."""
    text: str = "text"
    """Plain text row (loss on every token)."""
    chosen: str = "chosen"
    """Wanted response of a preference pair."""
    rejected: str = "rejected"
    """Unwanted response of a preference pair."""
    subtask: str = "subtask"
    """Skill or group label (default ``all``)."""


def unique_modes(modes: list[str]) -> list:
    """Problems of a list of scoring modes: empty, or a mode twice."""
    return [not modes and "modes is empty: name at least one mode (e.g. [prism])",
            len(set(modes)) != len(modes) and f"modes repeat: {modes} (each mode once)"]


@dataclass
class DataSelection(SelectionArgs):
    """The subset a fine-tune trains on, computed by the data module from feature stores (``data.selection``).

    In ``setup("fit")`` on every process: the preference weights from the target stores, every pool row's
    score from the pool stores (shards split over the processes), the budget's rows; rank 0 writes
    ``<output_dir>/<mode>/`` as ``select`` does. A selection already there with the same identity is reused.
    """

    features: str | None = None
    """The feature stores of this pool and these target pairs (``<run>/features``); required."""
    mode: ModeName = "prism"
    """The scoring mode whose subset is trained on."""
    output_dir: str | None = None
    """Where ``<mode>/`` is written (default: ``selection`` beside the ``features`` folder)."""
    force: bool = False
    """Replace a selection there made with other settings (otherwise refused)."""

    def problems(self) -> list:
        return [*super().problems(), not self.features and "features is required: the feature stores' folder "
                "(<run>/features, written by the predict stage)"]


@dataclass(eq=False)
class DataArgs:
    """Pool, target pairs and evaluation sets, and how every stage reads and batches them (``--data.*``).

    Every data setting is a path (JSONL, JSON, CSV, TSV, Parquet, a folder of such files or one written by
    ``save_to_disk``; relative to the working directory) or a ``load_dataset`` spec as a mapping with the keys
    ``path``, ``split``, ``name``, ``data_files``, ``revision`` (``{path: json, data_files: ..., split: train}``,
    a hub id with ``name``/``split``).
    """

    pool: DataSource = f"{DEMO_DATA}/pool.jsonl"
    """Candidate SFT rows (``id``, ``prompt``, ``completion``, ``subtask``; or ``messages``, or ``text``)."""
    target: DataSource | None = f"{DEMO_DATA}/target_pairs.jsonl"
    """Target preference pairs (``prompt``, ``chosen``, ``rejected``, ``subtask``)."""
    eval_sft: DataSource | None = f"{DEMO_DATA}/eval.jsonl"
    """Held-out SFT rows for validation/test (loss, greedy exact match)."""
    eval_pairs: DataSource | None = f"{DEMO_DATA}/eval_pairs.jsonl"
    """Held-out preference pairs for validation/test (preference accuracy, wanted/unwanted answers)."""
    tokenizer: str | None = None
    """Tokenizer path or hub id (default: the model's, which the CLI and the pipeline connect)."""
    columns: Columns = field(default_factory=Columns)
    """Column names in every file (rename here instead of editing the data)."""
    pool_columns: Columns | None = None
    """Column names of the pool and ``eval_sft`` rows, when they differ from ``columns``."""
    target_columns: Columns | None = None
    """Column names of the target and ``eval_pairs`` pairs, when they differ from ``columns``."""
    train_on: Literal["warmup", "pool", "selection"] = "warmup"
    """Training rows: ``warmup`` (a seeded ``warmup_fraction`` of the pool), ``pool`` (all of it) or
    ``selection`` (``selection`` computed here, or the rows of ``selection_file``)."""
    selection: DataSelection | None = None
    """Compute the subset to train on from feature stores (``train_on: selection``)."""
    selection_file: str | None = None
    """A precomputed subset (``train_on: selection``): a ``selected.jsonl`` or a ``.txt`` of ids, one a line."""
    warmup_fraction: float = 0.05
    """Share of the pool the warmup trains on (``train_on: warmup``)."""
    seed: int = 0
    """Seed of the warmup subset and of the training order."""
    max_length: int = 256
    """Token budget per row (prompt and answer)."""
    truncation: Literal["left", "error"] = "left"
    """Over-long rows: ``left`` cuts the prompt from the left, ``error`` refuses them (an answer longer than
    ``max_length`` by itself is refused either way)."""
    chat_loss: Literal["all_assistant_turns", "last_turn"] = "all_assistant_turns"
    """Loss of a multi-turn ``messages`` row: on every assistant turn (TRL SFT's ``assistant_only_loss``), or on
    the last one only."""
    batch_size: int = 8
    """Training rows per step and process (global batch = batch_size x devices x nodes x accumulation)."""
    eval_batch_size: int = 16
    """Rows per evaluation and feature-extraction batch."""
    shuffle: bool = True
    """Reshuffle the training rows each epoch (seeded; false keeps pool order)."""
    group_by_length: bool = False
    """Training steps of rows of similar length (seeded groups of ``length_group_size`` global batches sorted by
    length, batches shuffled): less padding, each row still once per epoch, independent of the process count."""
    length_group_size: int = 64
    """Global batches per length group (``group_by_length``); larger groups pad less and mix less."""
    max_tokens_per_batch: int | None = None
    """Feature extraction in batches of similar length: each shard's rows sorted by length and packed up to this
    many padded tokens (a pair counts both answers), at most ``eval_batch_size`` rows; the store is the same."""
    padding_free: bool = False
    """Feature extraction packs each batch's rows into one sequence with no padding at all (position ids restart
    per row; attention stays inside each row: flash-attention's varlen kernels where the model uses them, otherwise
    one SDPA call per row); per-row gradients are sums over each row's tokens. The store is the same."""
    num_workers: int = 0
    """DataLoader worker processes."""
    shard_size: int = 256
    """Rows per feature-store shard (prediction and scoring split work by whole shards)."""
    cache_dir: str | None = None
    """Where tokenized splits are cached (default ``$PRISM_CACHE`` or ``~/.cache/prism_lightning``)."""
    tokenize_workers: int = 1
    """Processes for the tokenization ``datasets.map`` (its ``num_proc``)."""

    def __post_init__(self) -> None:
        for name in ("columns", "pool_columns", "target_columns"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, Columns(**getattr(self, name)))
        if isinstance(self.selection, dict):
            self.selection = DataSelection(**self.selection)
        refuse("data", self.problems())

    def columns_of(self, split: str) -> Columns:
        """The column names of a source: ``pool``/``eval_sft`` rows use ``pool_columns``, ``target``/``eval_pairs``
        pairs ``target_columns``, each defaulting to ``columns``."""
        own = self.pool_columns if split in ("pool", "eval_sft") else self.target_columns
        return own or self.columns

    def problems(self) -> list:
        picked = self.selection is not None or self.selection_file is not None
        specs = [p for n in ("pool", "target", "eval_sft", "eval_pairs") for p in spec_problems(n, getattr(self, n))]
        return [*specs,
            not 0 < self.warmup_fraction <= 1 and f"warmup_fraction={self.warmup_fraction} must be in (0, 1]",
            self.max_length < 2 and f"max_length={self.max_length} must be >= 2",
            self.batch_size < 1 and f"batch_size={self.batch_size} must be >= 1",
            self.eval_batch_size < 1 and f"eval_batch_size={self.eval_batch_size} must be >= 1",
            self.shard_size < 1 and f"shard_size={self.shard_size} must be >= 1",
            self.num_workers < 0 and f"num_workers={self.num_workers} must be >= 0",
            self.tokenize_workers < 1 and f"tokenize_workers={self.tokenize_workers} must be >= 1",
            self.length_group_size < 1 and f"length_group_size={self.length_group_size} must be >= 1",
            self.max_tokens_per_batch is not None and self.max_tokens_per_batch < self.max_length
            and f"max_tokens_per_batch={self.max_tokens_per_batch} must be at least max_length={self.max_length} "
                "(a row of max_length tokens must fit a batch); raise it or unset it",
            self.selection is not None and self.selection_file is not None
            and "give selection (computed here) or selection_file (precomputed), not both",
            self.train_on == "selection" and not picked
            and "train_on=selection needs selection (computed from feature stores) or selection_file",
            self.train_on != "selection" and picked
            and f"a selection is given but train_on={self.train_on!r}; set train_on: selection to train on it"]


@dataclass
class SelectArgs:
    """Score the pool from feature stores and write each mode's subset (``python -m prism_lightning select``).

    The model, projection, preconditioner and damping are read from the stores' manifests, and so are the pool
    and target files they were extracted from; a setting given here is checked against them instead.
    """

    features: str = "runs/tiny/features"
    """The feature stores' folder (``<run>/features``, written by the predict stage)."""
    output_dir: str | None = None
    """Where ``<mode>/`` folders are written (default: ``selection`` beside ``features``)."""
    modes: list[ModeName] = field(default_factory=lambda: ["prism"])
    """Scoring modes, e.g. ``[prism,less,ifguide,random,loss]`` (each store is read once for all)."""
    selection: SelectionArgs = field(default_factory=SelectionArgs)
    """Budget and task (forward / repair)."""
    pool: DataSource | None = None
    """The pool (default: the file the pool stores were extracted from); must hold the rows they were made from."""
    target: DataSource | None = None
    """The target pairs (default: the file the target stores were extracted from)."""
    columns: Columns | None = None
    """Column names of ``pool``/``target`` (default: those the stores were extracted with)."""
    model: str | None = None
    """Optional: the base model; refused unless the stores were extracted with it."""
    projection: ProjectionArgs | None = None
    """Optional: the projection; refused unless the stores were made with it."""
    pool_preconditioner: PreconditionerName | None = None
    """Optional: the pool preconditioner; refused unless the pool stores were made with it."""
    damping: float | None = None
    """Optional: the kfac/ekfac damping; refused unless the pool stores were made with it."""
    force: bool = False
    """Replace selections made with other settings (otherwise refused)."""

    def __post_init__(self) -> None:
        refuse("select", [*unique_modes(self.modes), *spec_problems("pool", self.pool),
                          *spec_problems("target", self.target)])


@dataclass
class ImportWarmupArgs:
    """Convert a Hugging Face ``Trainer``/TRL run's ``checkpoint-*`` folders into warmup checkpoints."""

    source: str
    """The Trainer's ``output_dir`` (or one ``checkpoint-<step>`` folder)."""
    dest: str
    """The warmup folder to write (e.g. ``runs/mine/warmup``); the feature stage reads it."""
    base_model: str | None = None
    """The base model (default: the adapter config's ``base_model_name_or_path``)."""
    force: bool = False
    """Replace the checkpoints ``dest`` already holds (otherwise refused)."""


@dataclass
class Experiment:
    """One experiment of the pipeline: a pool, target pairs, a budget and how to judge the result."""

    name: str
    """Folder name under the output folder (letters, digits, ``_ . -``)."""
    kind: Literal["repair", "forward"]
    """``repair``: drop the most harmful ``fraction`` of a contaminated pool (compared with the full and
    the clean pool); ``forward``: keep the top ``fraction`` (compared with the full pool and ``random``)."""
    pool: DataSource
    """Candidate rows (file or folder, or a ``load_dataset`` spec)."""
    target: DataSource
    """Target preference pairs."""
    subtask: str
    """The skill evaluated: the contaminated skill, or the target skill."""
    clean_pool: DataSource | None = None
    """The pool without contamination, for the ``oracle`` fine-tune of a repair experiment."""
    fraction: float = 0.1
    """Budget: share of the pool kept (forward) or removed (repair)."""
    metric: Literal["exact_match", "unwanted"] = "exact_match"
    """Behaviour the verdict compares after fine-tuning, on held-out rows of ``subtask``: ``exact_match``
    (higher is better) or ``unwanted`` (share of held-out pairs answered the rejected way; lower is better)."""
    target_noise: float = 0.0
    """Share of target pairs whose chosen/rejected are swapped (robustness study)."""
    finetune: bool = True
    """Run the fine-tunes (false: ranking metrics only)."""
    pool_preconditioner: PreconditionerName | None = None
    """Overrides ``pipeline.pool_preconditioner`` for this experiment."""
    study: str | None = None
    """Experiments sharing a study name are tabulated side by side in the report."""
    reselect_every: int | None = None
    """Also fine-tune on ``prism``'s selection re-made every this many epochs with the preference weights at the
    current model (``PrismReselection``; run ``prism_reselect``, compared with the static ``prism``)."""

    def __post_init__(self) -> None:
        refuse(f"experiment {self.name!r}", [
            (not NAME.fullmatch(self.name or "") or self.name in (".", ".."))
            and "name must be letters, digits, '_', '.' or '-' (it names a folder inside the output folder)",
            not 0 < self.fraction < 1 and f"fraction={self.fraction} must be in (0, 1)",
            not 0 <= self.target_noise <= 1 and f"target_noise={self.target_noise} must be in [0, 1]",
            self.kind == "forward" and self.clean_pool and "clean_pool is only used by repair experiments",
            *spec_problems("pool", self.pool), *spec_problems("target", self.target),
            *spec_problems("clean_pool", self.clean_pool),
            self.reselect_every is not None and self.reselect_every < 1
            and f"reselect_every={self.reselect_every} must be >= 1"])


def default_experiments() -> list[Experiment]:
    """The demo: a surprising contamination, a plausible one, and forward selection of a missing skill."""
    d = DEMO_DATA
    return [
        Experiment("repair_mistake_math", "repair", f"{d}/pool_mistake_math.jsonl",
                   f"{d}/target_mistake_math.jsonl", "add", clean_pool=f"{d}/pool.jsonl", fraction=0.05),
        Experiment("repair_sycophancy", "repair", f"{d}/pool_sycophancy.jsonl",
                   f"{d}/target_sycophancy.jsonl", "claim", clean_pool=f"{d}/pool.jsonl", fraction=0.05,
                   metric="unwanted"),
        Experiment("forward_backwards", "forward", f"{d}/pool.jsonl", f"{d}/target_backwards.jsonl", "backwards",
                   fraction=0.1),
    ]


@dataclass
class PipelineArgs:
    """Settings of the whole pipeline; the stages take model, LoRA, optimiser and FSDP settings from ``model``."""

    experiments: list[Experiment] = field(default_factory=default_experiments)
    """The experiments, each run for every seed."""
    modes: list[ModeName] = field(default_factory=lambda: list(MODES))
    """Scoring modes compared in every experiment."""
    finetune_modes: list[ModeName] | None = None
    """Modes whose selections are also fine-tuned and evaluated, a subset of ``modes`` (default: all of them); the
    others are compared on their rankings only. Fine-tunes are most of a run's time."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds: each varies the warmup subset, the data order and the LoRA initialisation."""
    warmup_epochs: int = 3
    """Warmup epochs (one reference checkpoint each)."""
    finetune_epochs: int = 2
    """Epochs of each final fine-tune."""
    finetune_lr: float = 1e-3
    """Learning rate of the final fine-tunes (the warmup uses ``model.optim.lr``)."""
    finetune_batch_size: int | None = None
    """Overrides ``data.batch_size`` for the final fine-tunes (the warmup keeps ``data.batch_size``)."""
    projection: ProjectionArgs = field(default_factory=lambda: ProjectionArgs(kind="sjlt", dim=2048))
    """Projection of the gradient features."""
    pool_preconditioner: PreconditionerName = "adam_no_momentum"
    """Preconditioner of the pool features (target features keep the plain gradient); ``kfac``/``ekfac`` add a
    curvature stage (two passes over the warmup rows at each checkpoint) before the features."""
    damping: float = 0.1
    """Damping of ``kfac``/``ekfac``, relative to each layer's mean eigenvalue (kronfluence's heuristic)."""
    target_checkpoint: TargetCheckpoint = "each"
    """``last``: extract the target side at the last warmup checkpoint only and score every checkpoint's pool
    features against it (``selection.target_checkpoint``); ``each``: at every checkpoint, as LESS and PRISM."""
    features_precision: str | None = None
    """Overrides ``trainer.precision`` for the feature stage (e.g. ``bf16-true`` while training runs
    ``bf16-mixed``); under the ``fsdp2`` strategy that stage runs DDP (each rank extracts its shards)."""

    def __post_init__(self) -> None:
        names = [e.name for e in self.experiments]
        refuse("pipeline", [
            not self.experiments and "no experiments",
            len(set(names)) != len(names)
            and f"experiment names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}",
            *unique_modes(self.modes),
            self.finetune_modes is not None and not set(self.finetune_modes) <= set(self.modes)
            and f"finetune_modes names {sorted(set(self.finetune_modes) - set(self.modes))}, which modes "
                f"{self.modes} does not score; add them to modes or drop them from finetune_modes",
            self.finetune_modes is not None and len(set(self.finetune_modes)) != len(self.finetune_modes)
            and f"finetune_modes repeat: {self.finetune_modes} (each mode once)",
            not self.seeds and "no seeds",
            len(set(self.seeds)) != len(self.seeds) and f"seeds repeat: {self.seeds}",
            self.warmup_epochs < 1 and f"warmup_epochs={self.warmup_epochs} must be >= 1",
            self.finetune_epochs < 1 and f"finetune_epochs={self.finetune_epochs} must be >= 1",
            self.finetune_lr <= 0 and f"finetune_lr={self.finetune_lr} must be > 0",
            not self.damping > 0 and f"damping={self.damping} must be > 0",
            self.finetune_batch_size is not None and self.finetune_batch_size < 1
            and f"finetune_batch_size={self.finetune_batch_size} must be >= 1"])

    @property
    def finetuned(self) -> list[str]:
        """The modes whose selections are fine-tuned, in the order of ``modes``."""
        return [m for m in self.modes if self.finetune_modes is None or m in self.finetune_modes]


def plain(obj):
    """Dataclasses (nested in dicts/lists) as plain dicts, so checkpoints load with ``weights_only``."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj
