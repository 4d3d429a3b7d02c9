"""The one-command recipe: warmup -> (curvature) -> features -> select -> fine-tune -> evaluate -> report.

Each experiment (and seed) gets a folder ``<output_dir>/<experiment>/seed-<s>/`` holding
``warmup/``, ``curvature/`` (kfac/ekfac only), ``features/``, ``selection/`` and ``finetune/<run>/``
(one run per mode, plus ``full``, ``base`` and, for repair, the clean-pool ``oracle``). Every finished
stage writes ``stage.json`` (its settings and wall time): a rerun skips stages whose ``stage.json``
matches, refuses ones made with other settings, and ``force`` redoes everything (``stages.Stage``).

Stage trainers and data modules inherit every setting of the pipeline's trainer and data module
(``stages.stage_trainer``, ``stages.stage_data``); a stage overrides only what it must: its epochs,
checkpointing, inference mode (features), the pool and rows it trains on, and a logger sub-run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L

from prism_lightning import __version__
from prism_lightning.config import Experiment, PipelineArgs, SelectionArgs, refuse
from prism_lightning.data.formats import PoolIndex, load_pairs, load_sft, rows_digest
from prism_lightning.data.targets import noisy_targets
from prism_lightning.errors import DataFormatError
from prism_lightning.eval import metrics as M
from prism_lightning.influence.preconditioners import needs_fit
from prism_lightning.modules import CurvatureModule, FinetuneModule, GradientFeatureModule, WarmupModule
from prism_lightning.modules.curvature import fit_curvature
from prism_lightning.report import write_report
from prism_lightning.select import run_selection, top_explained
from prism_lightning.stages import (
    Stage,
    barrier,
    data_settings,
    feature_overrides,
    is_rank0,
    stage_data,
    stage_trainer,
)


def validate(args: PipelineArgs, root: Path, datamodule: L.LightningDataModule) -> None:
    """Check every experiment before any compute; raise one ``SettingsError`` listing every problem.

    Each experiment's folder must lie inside ``root``; its pool, targets and clean pool must parse;
    its budget must select at least one row; its skill must be in the pool and, when it is
    fine-tuned, in the held-out rows its metric is measured on.
    """
    problems, parsed = [], {}

    def rows(source, pairs: bool):
        key = str(source)
        if key not in parsed:
            try:
                parsed[key] = load_pairs(source) if pairs else load_sft(source)
            except (DataFormatError, OSError) as err:
                parsed[key] = None
                problems.append(str(err))
        return parsed[key]

    hp = datamodule.hparams
    eval_subtasks = {"exact_match": {r.subtask for r in rows(hp.eval_sft, False) or []} if hp.eval_sft else set(),
                     "unwanted": {r.subtask for r in rows(hp.eval_pairs, True) or []} if hp.eval_pairs else set()}
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


def run_pipeline(trainer: L.Trainer, model, datamodule: L.LightningDataModule, output_dir: str | None,
                 args: PipelineArgs, force: bool = False) -> dict:
    """Run every experiment x seed; write ``report.json`` and ``report.md`` under ``output_dir``."""
    root = Path(output_dir or model.output_dir)
    validate(args, root, datamodule)
    results = [run_experiment(trainer, model, datamodule, root / exp.name / f"seed-{seed}", exp, seed, args, force)
               for exp in args.experiments for seed in args.seeds]
    report = {"package_version": __version__, "settings": json.loads(json.dumps(asdict(args), default=str)),
              "model": asdict(model.model_args), "lora": asdict(model.lora_args), "results": results}
    write_report(root, report)
    return report


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def run_experiment(trainer: L.Trainer, model, datamodule: L.LightningDataModule, root: Path, exp: Experiment,
                   seed: int, args: PipelineArgs, force: bool) -> dict:
    """All stages of one experiment and seed; returns its numbers for the report."""
    modes = list(args.modes)
    lora = replace(model.lora_args, init_seed=seed)  # the seed also varies the LoRA init
    target = exp.target
    if exp.target_noise:
        target = noisy_targets(exp.target, exp.target_noise, seed, root / "targets.jsonl")
    data = {**data_settings(datamodule), "pool": exp.pool, "target": target, "seed": seed}
    times, base = {}, {"experiment": asdict(exp), "seed": seed, "model": asdict(model.model_args),
                       "lora": asdict(model.lora_args), "optim": asdict(model.optim_args), "data": data}
    version = f"{exp.name}/seed-{seed}"

    warm_settings = dict(base, epochs=args.warmup_epochs)
    with Stage(root / "warmup", warm_settings, force) as st:
        if st.todo:
            L.seed_everything(seed, verbose=False)
            module = WarmupModule(model=model.model_args, lora=lora, optim=model.optim_args, output_dir=str(root),
                                  fsdp=model.fsdp_args)
            t = stage_trainer(trainer, root / "warmup", f"{version}/warmup", max_epochs=args.warmup_epochs,
                              enable_checkpointing=True)
            last = root / "warmup" / "lightning" / "last.ckpt"  # left by a preempted warmup: resume it exactly
            t.fit(module, datamodule=stage_data(datamodule, **{**data, "train_on": "warmup"}),
                  ckpt_path=str(last) if last.exists() else None)
    times["warmup"] = st.seconds

    pre = exp.pool_preconditioner or args.pool_preconditioner
    feat_settings = dict(warm_settings, projection=asdict(args.projection), pre=pre)
    if needs_fit(pre):  # K-FAC/EK-FAC factors beside each warmup checkpoint, from the warmup rows
        with Stage(root / "curvature", warm_settings, force) as st:
            if st.todo:
                t = stage_trainer(trainer, root / "curvature", f"{version}/curvature",
                                  **feature_overrides(trainer, args.features_precision))
                fit_curvature(t, CurvatureModule(model=model.model_args, checkpoint_dir=str(root / "warmup"),
                                                 force=force), stage_data(datamodule, **data))
        times["curvature"] = st.seconds
        feat_settings["damping"] = args.damping
    features = GradientFeatureModule(model=model.model_args, checkpoint_dir=str(root / "warmup"),
                                     output_dir=str(root), projection=args.projection, pool_preconditioner=pre,
                                     damping=args.damping)
    with Stage(root / "features", feat_settings, force) as st:
        if st.todo:
            t = stage_trainer(trainer, root / "features", f"{version}/features",
                              **feature_overrides(trainer, args.features_precision))
            t.predict(features, datamodule=stage_data(datamodule, **data), return_predictions=False)
    times["features"] = st.seconds

    sel = SelectionArgs(task=exp.kind, fraction=exp.fraction, seed=seed)
    with Stage(root / "selection", dict(feat_settings, modes=modes, selection=asdict(sel)), force) as st:
        if st.todo and is_rank0():
            dm = stage_data(datamodule, **data)
            pool, targets = PoolIndex.scan(exp.pool, dm.cols, sel.label), load_pairs(target, dm.cols)
            expected = features.scoring_expectations({"pool": pool.digest, "target": rows_digest(targets)},
                                                     dm.tokenization())
            run_selection(root / "features", root / "selection", modes, sel, pool, targets, expected=expected)
        barrier()
    times["select"] = st.seconds
    out = {"experiment": exp.name, "kind": exp.kind, "seed": seed, "subtask": exp.subtask, "metric": exp.metric,
           "target_noise": exp.target_noise, "study": exp.study, "preconditioner": pre,
           "ranking": _read(root / "selection" / "ranking_metrics.json"), "seconds": times, "finetune": {},
           "explained": top_explained(root / "selection", exp.kind, "prism" if "prism" in modes else modes[0])}
    if exp.finetune:
        out["finetune"] = finetune_runs(trainer, model, datamodule, root, exp, seed, args, data, base, lora, force)
    return out


def finetune_runs(trainer: L.Trainer, model, datamodule: L.LightningDataModule, root: Path, exp: Experiment,
                  seed: int, args: PipelineArgs, data: dict, base: dict, lora, force: bool) -> dict:
    """Fine-tune on each mode's selection, the full pool and (repair) the clean pool; evaluate each and the base."""
    if args.finetune_batch_size:
        data = dict(data, batch_size=args.finetune_batch_size)
    runs = {m: dict(data, train_on="selection", selection_file=str(root / "selection" / m / "selected.jsonl"))
            for m in args.modes}
    runs["full"] = dict(data, train_on="pool")
    if exp.kind == "repair" and exp.clean_pool:
        runs["oracle"] = dict(data, pool=exp.clean_pool, train_on="pool")
    runs["base"] = dict(data, train_on="pool")  # evaluated without training: the model before any fine-tune
    optim = replace(model.optim_args, lr=args.finetune_lr)
    out = {}
    for name, run_data in runs.items():
        folder = root / "finetune" / name
        epochs = 0 if name == "base" else args.finetune_epochs
        with Stage(folder, dict(base, data=run_data, epochs=epochs, lr=args.finetune_lr), force) as st:
            if st.todo:
                L.seed_everything(seed, verbose=False)
                module = FinetuneModule(model=model.model_args, lora=lora, optim=optim, output_dir=str(root),
                                        run_name=f"finetune/{name}", fsdp=model.fsdp_args)
                dm = stage_data(datamodule, **run_data)
                # the fine-tunes are evaluated once, after training (test); no checkpoints but the final adapter
                t = stage_trainer(trainer, folder, f"{exp.name}/seed-{seed}/finetune/{name}",
                                  max_epochs=epochs, enable_checkpointing=False, limit_val_batches=0)
                if epochs:
                    t.fit(module, datamodule=dm)
                t.test(module, datamodule=dm, verbose=False)
        metrics = _read(folder / "metrics-test.json")
        out[name] = {k: metrics.get(M.metric_key(k, exp.subtask), float("nan"))
                     for k in (M.EXACT_MATCH, M.PREF_ACC, M.WANTED, M.UNWANTED)}
        out[name] |= {"exact_match_all": metrics.get(M.metric_key(M.EXACT_MATCH), float("nan")),
                      "seconds": st.seconds if epochs else float("nan")}
    return out
