"""The one-command pipeline: warmup -> features -> select -> fine-tune -> evaluate -> report.

Each experiment (and seed) gets a folder ``<output_dir>/<experiment>/seed-<s>/`` holding
``warmup/``, ``features/``, ``selection/`` and ``finetune/<mode>/``. Every finished stage writes
``stage.json`` (its settings and wall time): a rerun skips stages whose ``stage.json`` matches,
refuses ones made with other settings, and ``force`` redoes everything.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prism_lightning import DEMO_DATA, __version__
from prism_lightning.eval import metrics as M
from prism_lightning.influence.projection import ProjectionArgs
from prism_lightning.select import SelectionArgs, parse_modes, run_selection
from prism_lightning.store.feature_store import StoreMismatchError, atomic_write_text, json_digest

ALL_MODES = "prism,prism_uniform,prism_no_anchor,less,ifguide,random,loss"


@dataclass
class Experiment:
    """One experiment of the pipeline.

    kind: ``repair`` (drop the most harmful ``fraction`` of a contaminated pool, compare with the
        full pool and the clean pool) or ``forward`` (keep the top ``fraction``, compare with the
        full pool; ``random`` is one of the modes).
    subtask: the skill evaluated (the contaminated skill, or the target skill).
    metric: the behaviour the verdict compares after fine-tuning, on held-out rows of ``subtask``:
        ``exact_match`` (greedy answer equals the reference; higher is better) or ``unwanted`` (share
        of held-out pairs answered the rejected way; lower is better).
    target_noise: share of target pairs whose chosen/rejected are swapped (robustness study).
    finetune: run the fine-tunes (off: ranking metrics only).
    pool_preconditioner: overrides ``pipeline.pool_preconditioner`` for this experiment.
    study: experiments sharing a study name are tabulated side by side in the report.
    """

    name: str
    kind: str
    pool: str
    target: str
    subtask: str
    clean_pool: str | None = None
    fraction: float = 0.1
    metric: str = "exact_match"
    target_noise: float = 0.0
    finetune: bool = True
    pool_preconditioner: str | None = None
    study: str | None = None


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
    """Settings of the whole pipeline (the stages take model/LoRA/optimiser/FSDP settings from ``model``).

    ``finetune_batch_size`` overrides ``data.batch_size`` for the final fine-tunes (the warmup keeps
    ``data.batch_size``). ``features_precision`` overrides ``trainer.precision`` for the feature stage
    (e.g. ``bf16-true`` on GPU while training runs ``bf16-mixed``); under ``FSDP2Strategy`` that stage
    runs DDP (the model is replicated, each rank extracts its own shards).
    """

    experiments: list[Experiment] = field(default_factory=default_experiments)
    modes: str = ALL_MODES
    seeds: list[int] = field(default_factory=lambda: [0])
    warmup_epochs: int = 3
    finetune_epochs: int = 2
    finetune_lr: float = 1e-3
    finetune_batch_size: int | None = None
    projection: ProjectionArgs = field(default_factory=lambda: ProjectionArgs(kind="sjlt", dim=2048))
    pool_preconditioner: str = "adam_no_momentum"
    eval_max_rows: int | None = None
    features_precision: str | None = None


class Stage:
    """``with Stage(folder, settings, force) as st: if st.todo: ...``: skip/refuse/redo by stage.json."""

    def __init__(self, folder: Path, settings: dict, force: bool):
        self.folder, self.settings, self.force = Path(folder), settings, force
        self.marker = self.folder / "stage.json"
        self.todo = True
        self.seconds = 0.0
        if self.marker.exists():
            done = json.loads(self.marker.read_text())
            if done["settings_digest"] == json_digest(settings) and not force:
                self.todo, self.seconds = False, done["seconds"]
            elif not force:
                raise StoreMismatchError(f"{self.folder} was made with other settings; use another output_dir "
                                         "or --force to redo it")
        if self.todo and force and self.folder.exists():
            shutil.rmtree(self.folder)

    def __enter__(self) -> Stage:
        self._start = time.time()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None and self.todo:
            self.seconds = time.time() - self._start
        if exc_type is None and self.todo and _is_rank0():
            atomic_write_text(self.marker, json.dumps({"settings": self.settings, "seconds": self.seconds,
                                                       "settings_digest": json_digest(self.settings)},
                                                      indent=2, default=str))


def noisy_targets(src: str, noise: float, seed: int, dest: Path) -> str:
    """A copy of the target pairs with a seeded ``noise`` share of chosen/rejected swapped."""
    rows = [json.loads(x) for x in Path(src).read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    for i in rng.sample(range(len(rows)), round(noise * len(rows))):
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
        rows[i]["swapped"] = True
    atomic_write_text(dest, "".join(json.dumps(r) + "\n" for r in rows))
    return str(dest)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def run_pipeline(trainer, model, datamodule, output_dir: str | None, args: PipelineArgs,
                 force: bool = False) -> dict:
    """Run every experiment x seed; write ``report.json`` and ``report.md`` under ``output_dir``."""
    from prism_lightning.report import write_report

    root = Path(output_dir or model.output_dir)
    modes = parse_modes(args.modes)
    results = []
    for exp in args.experiments:
        for seed in args.seeds:
            results.append(run_experiment(trainer, model, datamodule, root / exp.name / f"seed-{seed}",
                                          exp, seed, modes, args, force))
    report = {"package_version": __version__, "settings": _plain(args), "model": asdict(model.model_args),
              "lora": asdict(model.lora_args), "results": results}
    write_report(root, report)
    return report


def _plain(args: PipelineArgs) -> dict:
    return json.loads(json.dumps(asdict(args), default=str))


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _stage_trainer(trainer, **overrides):
    """A fresh trainer with the pipeline trainer's hardware settings (a strategy object is copied, not shared)."""
    import copy

    from lightning.pytorch.strategies import Strategy

    from prism_lightning.trainer import PrismTrainer

    kwargs = dict(trainer.stage_kwargs, logger=False, enable_checkpointing=False, enable_model_summary=False,
                  num_sanity_val_steps=0)
    kwargs |= overrides
    if isinstance(kwargs.get("strategy"), Strategy):
        kwargs["strategy"] = copy.deepcopy(kwargs["strategy"])
    return PrismTrainer(**kwargs)


def _feature_overrides(trainer, args: PipelineArgs) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy

    out = {"inference_mode": False}
    if isinstance(trainer.stage_kwargs.get("strategy"), ModelParallelStrategy):
        out["strategy"] = "ddp"
    if args.features_precision:
        out["precision"] = args.features_precision
    return out


def run_experiment(trainer, model, datamodule, root: Path, exp: Experiment, seed: int, modes: list[str],
                   args: PipelineArgs, force: bool) -> dict:
    """All stages of one experiment and seed; returns its numbers for the report."""
    import lightning as L

    from prism_lightning.data import PrismDataModule
    from prism_lightning.modules import FinetuneModule, GradientFeatureModule, WarmupModule

    lora = replace(model.lora_args, init_seed=seed)  # the seed also varies the LoRA init
    dm_args = {k: v for k, v in datamodule.hparams.items()
               if k in ("columns", "max_length", "truncation", "batch_size", "eval_batch_size", "num_workers",
                        "shard_size", "warmup_fraction", "eval_sft", "eval_pairs", "tokenizer")}
    target = exp.target
    if exp.target_noise:
        target = noisy_targets(exp.target, exp.target_noise, seed, root / "targets.jsonl")
    data = dict(dm_args, pool=exp.pool, target=target, seed=seed)
    times, base = {}, {"experiment": asdict(exp), "seed": seed, "model": asdict(model.model_args),
                       "lora": asdict(model.lora_args), "optim": asdict(model.optim_args), "data": data}

    warm_settings = dict(base, epochs=args.warmup_epochs)
    with Stage(root / "warmup", warm_settings, force) as st:
        if st.todo:
            L.seed_everything(seed, verbose=False)
            module = WarmupModule(model=model.model_args, lora=lora, optim=model.optim_args, output_dir=str(root),
                                  fsdp=model.fsdp_args)
            t = _stage_trainer(trainer, max_epochs=args.warmup_epochs, enable_checkpointing=True)
            t.fit(module, datamodule=PrismDataModule(**data, train_on="warmup"))
    times["warmup"] = st.seconds

    pre = exp.pool_preconditioner or args.pool_preconditioner
    feat_settings = dict(warm_settings, projection=asdict(args.projection), pre=pre)
    with Stage(root / "features", feat_settings, force) as st:
        if st.todo:
            module = GradientFeatureModule(model=model.model_args, checkpoint_dir=str(root / "warmup"),
                                           output_dir=str(root), projection=args.projection,
                                           pool_preconditioner=pre)
            t = _stage_trainer(trainer, **_feature_overrides(trainer, args))
            t.predict(module, datamodule=PrismDataModule(**data), return_predictions=False)
    times["features"] = st.seconds

    sel = SelectionArgs(task=exp.kind, fraction=exp.fraction, seed=seed)
    with Stage(root / "selection", dict(feat_settings, modes=modes, selection=asdict(sel)), force) as st:
        if st.todo and _is_rank0():
            dm = PrismDataModule(**data)
            dm.load()
            run_selection(root / "features", root / "selection", modes, sel, dm.pool_rows, dm.target_rows)
        _barrier()
    times["select"] = st.seconds
    out = {"experiment": exp.name, "kind": exp.kind, "seed": seed, "subtask": exp.subtask, "metric": exp.metric,
           "target_noise": exp.target_noise, "study": exp.study, "preconditioner": pre,
           "ranking": _read(root / "selection" / "ranking_metrics.json"), "seconds": times, "finetune": {}}
    if not exp.finetune:
        return out

    if args.finetune_batch_size:
        data = dict(data, batch_size=args.finetune_batch_size)
    runs = {m: dict(data, train_on="selection", selection_file=str(root / "selection" / m / "selected.jsonl"))
            for m in modes}
    runs["full"] = dict(data, train_on="pool")
    if exp.kind == "repair" and exp.clean_pool:
        runs["oracle"] = dict(data, pool=exp.clean_pool, train_on="pool")
    runs["base"] = dict(data, train_on="pool")  # evaluated without training: the model before any fine-tune
    optim = replace(model.optim_args, lr=args.finetune_lr)
    for name, run_data in runs.items():
        folder = root / "finetune" / name
        epochs = 0 if name == "base" else args.finetune_epochs
        with Stage(folder, dict(base, data=run_data, epochs=epochs, lr=args.finetune_lr), force) as st:
            if st.todo:
                L.seed_everything(seed, verbose=False)
                module = FinetuneModule(model=model.model_args, lora=lora, optim=optim, output_dir=str(root),
                                        run_name=f"finetune/{name}", fsdp=model.fsdp_args)
                dm = PrismDataModule(**run_data)
                t = _stage_trainer(trainer, max_epochs=epochs, limit_val_batches=0)
                if epochs:
                    t.fit(module, datamodule=dm)
                t.test(module, datamodule=dm, verbose=False)
        metrics = _read(folder / "metrics-test.json")
        out["finetune"][name] = {k: metrics.get(M.metric_key(k, exp.subtask), float("nan"))
                                 for k in (M.EXACT_MATCH, M.PREF_ACC, M.WANTED, M.UNWANTED)}
        out["finetune"][name] |= {"exact_match_all": metrics.get(M.metric_key(M.EXACT_MATCH), float("nan")),
                                  "seconds": st.seconds if epochs else float("nan")}
    return out
