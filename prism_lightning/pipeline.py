"""The one-command recipe: the stages of ``stages.STAGES`` in order, for every experiment and seed, then the report.

Each experiment (and seed) gets a folder ``<output_dir>/<experiment>/seed-<s>/`` holding
``warmup/``, ``curvature/`` (kfac/ekfac only), ``features/``, ``selection/`` and ``finetune/<run>/``
(one run per fine-tuned mode, plus ``full``, ``base`` and, for repair, the clean-pool ``oracle``). Every finished
stage writes ``stage.json`` (its settings and wall time): a rerun skips stages whose ``stage.json``
matches, refuses ones made with other settings, and ``force`` redoes everything (``context.Stage``).

Stage trainers and data modules inherit every setting of the pipeline's trainer and data module
(``StageContext.trainer_for``, ``StageContext.data_for``); a stage overrides only what it must: its epochs,
checkpointing, inference mode (features), the pool and rows it trains on, and a logger sub-run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L

from prism_lightning import __version__
from prism_lightning.config import Experiment, PipelineArgs, refuse
from prism_lightning.context import Stage, StageContext, data_settings
from prism_lightning.data.formats import load_pairs, load_sft
from prism_lightning.data.targets import noisy_targets
from prism_lightning.errors import DataFormatError
from prism_lightning.influence.preconditioners import needs_fit
from prism_lightning.progress import Progress
from prism_lightning.ranks import barrier
from prism_lightning.report import write_report
from prism_lightning.stages import pipeline_stages


def validate(args: PipelineArgs, root: Path, datamodule: L.LightningDataModule) -> dict[str, dict]:
    """Check every experiment before any compute; raise one ``SettingsError`` listing every problem.

    Each experiment's folder must lie inside ``root``; its pool, targets and clean pool must parse;
    its budget must select at least one row; its skill must be in the pool and, when it is
    fine-tuned, in the held-out rows its metric is measured on. Returns each experiment's row counts.
    """
    problems, parsed = [], {}

    def rows(source, pairs: bool):
        key = str(source)
        if key not in parsed:
            try:
                parsed[key] = (load_pairs(source, datamodule.columns_of("target")) if pairs
                               else load_sft(source, datamodule.columns_of("pool")))
            except (DataFormatError, OSError) as err:
                parsed[key] = None
                problems.append(str(err))
        return parsed[key]

    dm = datamodule
    eval_subtasks = {"exact_match": {r.subtask for r in rows(dm.eval_sft, False) or []} if dm.eval_sft else set(),
                     "unwanted": {r.subtask for r in rows(dm.eval_pairs, True) or []} if dm.eval_pairs else set()}
    for exp in args.experiments:
        where = f"experiment {exp.name!r}"
        if not (root / exp.name).resolve().is_relative_to(root.resolve()):
            problems.append(f"{where}: its folder {root / exp.name} is outside the output folder {root}")
        pool = rows(exp.pool, False)
        rows(exp.target, True)
        if exp.clean_pool:
            rows(exp.clean_pool, False)
        if pool is not None:
            if math.floor(exp.fraction * len(pool) + 1e-9) < 1:
                problems.append(f"{where}: fraction={exp.fraction} of {len(pool)} pool rows selects no row")
            if exp.subtask not in {r.subtask for r in pool}:
                problems.append(f"{where}: subtask {exp.subtask!r} is not a subtask of {exp.pool}")
        if exp.finetune and exp.subtask not in eval_subtasks[exp.metric]:
            source = "data.eval_sft" if exp.metric == "exact_match" else "data.eval_pairs"
            problems.append(f"{where}: its metric {exp.metric!r} is measured on held-out rows of subtask "
                            f"{exp.subtask!r}, and {source} has none; add them or set finetune: false")
    refuse("pipeline", problems)
    return {exp.name: {"pool": len(rows(exp.pool, False)), "pairs": len(rows(exp.target, True)),
                       "clean": len(rows(exp.clean_pool, False)) if exp.clean_pool else 0} for exp in args.experiments}


def units(exp: Experiment, args: PipelineArgs) -> int:
    """The progress bar's stages of one experiment and seed (every fine-tune is one)."""
    stages = 4 if needs_fit(exp.pool_preconditioner or args.pool_preconditioner) else 3
    if not exp.finetune:
        return stages
    runs = len(args.finetuned) + 2 + (exp.kind == "repair" and bool(exp.clean_pool))
    return stages + runs + bool(exp.reselect_every and "prism" in args.finetuned)


def detail(ctx: StageContext, name: str) -> str:
    """What a stage of ``ctx`` works on, for its progress line."""
    size, a = ctx.sizes, ctx.args
    warm = max(1, round(ctx.datamodule.warmup_fraction * size["pool"]))
    return {"warmup": f"{warm} rows x {a.warmup_epochs} epoch{'s' * (a.warmup_epochs != 1)}",
            "curvature": f"{warm} rows x 2 passes x {a.warmup_epochs} checkpoints",
            "features": f"{size['pool']} pool rows + {size['pairs']} pairs x {a.warmup_epochs} checkpoints",
            "select": f"{size['pool']} rows, {len(a.modes)} modes"}.get(name, "")


def run_pipeline(trainer: L.Trainer, model, datamodule: L.LightningDataModule, output_dir: str | None,
                 args: PipelineArgs, force: bool = False) -> dict:
    """Run every experiment x seed; write ``report.json``, ``report.md`` and ``report.html`` under ``output_dir``."""
    root = Path(output_dir or model.output_dir)
    sizes = validate(args, root, datamodule)
    progress = Progress(sum(units(exp, args) for exp in args.experiments) * len(args.seeds))
    results = [run_experiment(trainer, model, datamodule, root / exp.name / f"seed-{seed}", exp, seed, args, force,
                              progress, sizes[exp.name])
               for exp in args.experiments for seed in args.seeds]
    progress.close()
    report = {"package_version": __version__, "settings": json.loads(json.dumps(asdict(args), default=str)),
              "model": asdict(model.model_args), "lora": asdict(model.lora_args), "results": results}
    write_report(root, report)
    return report


def experiment_context(trainer: L.Trainer, model, datamodule: L.LightningDataModule, root: Path, exp: Experiment,
                       seed: int, args: PipelineArgs, force: bool, progress: Progress | None = None,
                       sizes: dict | None = None) -> StageContext:
    """What every stage of one experiment and seed shares: its data settings and its identity."""
    target = exp.target
    if exp.target_noise:
        target = noisy_targets(exp.target, exp.target_noise, seed, root / "targets.jsonl")
    data = {**data_settings(datamodule), "pool": exp.pool, "target": target, "seed": seed}
    base = {"experiment": asdict(exp), "seed": seed, "model": asdict(model.model_args),
            "lora": asdict(model.lora_args), "optim": asdict(model.optim_args), "data": data}
    return StageContext(trainer, model, datamodule, args, exp, seed, root, force, data, base,
                        lora=replace(model.lora_args, init_seed=seed),  # the seed also varies the LoRA init
                        progress=progress or Progress(0, enabled=False), sizes=sizes or {})


def run_experiment(trainer: L.Trainer, model, datamodule: L.LightningDataModule, root: Path, exp: Experiment,
                   seed: int, args: PipelineArgs, force: bool, progress: Progress | None = None,
                   sizes: dict | None = None) -> dict:
    """The pipeline's stages (``stages.STAGES``, in order) for one experiment and seed; its numbers for the report."""
    ctx = experiment_context(trainer, model, datamodule, root, exp, seed, args, force, progress, sizes)
    seconds, found = {}, {}
    for spec in pipeline_stages():
        if spec.needed is not None and not spec.needed(ctx):
            continue
        if spec.identity is None:  # the stage keeps a marker per run itself
            spec.run(ctx)
        else:
            ctx.identities[spec.name] = spec.identity(ctx)
            with Stage(root / spec.folder, ctx.identities[spec.name], force) as st, \
                    ctx.progress.stage(f"{ctx.version} {spec.name}", detail(ctx, spec.name), st.todo):
                if st.todo:
                    spec.run(ctx)
            seconds[spec.name] = st.seconds
        barrier()
        if spec.collect is not None:
            found |= spec.collect(ctx)
    return {"experiment": exp.name, "kind": exp.kind, "seed": seed, "subtask": exp.subtask, "metric": exp.metric,
            "target_noise": exp.target_noise, "study": exp.study, "preconditioner": ctx.preconditioner,
            "ranking": found.get("ranking", {}), "seconds": seconds, "finetune": ctx.results.get("finetune", {}),
            "explained": found.get("explained", [])}


def command(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule,
            pipeline: PipelineArgs | None = None, output_dir: str | None = None, force: bool = False) -> dict:
    """Run warmup -> (curvature) -> features -> select -> fine-tunes and their evaluation -> report.

    Args:
        pipeline: experiments, modes, seeds and stage settings (``--pipeline.help PipelineArgs`` lists them).
        output_dir: run root (default: the model's ``output_dir``).
        force: redo every stage instead of skipping completed ones.
    """
    report = run_pipeline(trainer, model, datamodule, output_dir, pipeline or PipelineArgs(), force=force)
    print(f"report: {report['report_md']} (to look at: {report['report_html']})")
    return report
