"""``FinetuneModule``: the final fine-tune on the selected (forward) or kept (repair) pool rows."""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L

from prism_lightning.callbacks.adapter_checkpoint import save_trainable
from prism_lightning.callbacks.reselection import PrismReselection
from prism_lightning.config import DataSelection
from prism_lightning.context import Stage, StageContext
from prism_lightning.errors import StoreCorruptError
from prism_lightning.eval import metrics as M
from prism_lightning.io import atomic_folder, file_sha256, read_json
from prism_lightning.modeling import merge_adapter
from prism_lightning.modules.sft import SFTModule
from prism_lightning.provenance import plain_json
from prism_lightning.ranks import barrier, is_rank0
from prism_lightning.select import stage_selection
from prism_lightning.sharding import gather_trainable


class FinetuneModule(SFTModule):
    """LoRA / QLoRA / full fine-tune on ``data.train_on: selection``; evaluates by greedy exact match.

    Saves the final adapter (peft ``save_pretrained``; a full fine-tune saves the whole model) to
    ``<output_dir>/<run_name>/adapter/`` and, with ``save_merged``, LoRA merged into the base under
    ``<output_dir>/<run_name>/merged/`` (Hugging Face format, loadable with ``from_pretrained``;
    merged on rank 0's CPU into the unquantized base, also after a QLoRA or FSDP run).

    Args:
        run_name: sub-folder of ``output_dir`` for the adapter, merged model and metrics.
        save_merged: also save the base with the adapter merged in.
        generate_eval: greedy generation on held-out rows and pairs (on by default here).
    """

    def __init__(self, *args, run_name: str = "finetune", save_merged: bool = False,
                 generate_eval: bool = True, **kwargs):
        super().__init__(*args, generate_eval=generate_eval, **kwargs)
        self.run_name, self.save_merged = run_name, save_merged
        self.stage_dir = run_name

    def configure_callbacks(self):
        """Lightning checkpoints (for ``--ckpt_path last``) go under ``<output_dir>/<run_name>/lightning/``,
        when the trainer checkpoints at all (the pipeline's fine-tunes do not) and the user configured no
        ``ModelCheckpoint`` of their own."""
        if not self.trainer.checkpoint_callbacks:
            return super().configure_callbacks()
        return [*super().configure_callbacks(), *self.checkpoint_callbacks()]

    def on_train_end(self) -> None:
        weights = gather_trainable(self.model)  # collective under FSDP: every rank takes part
        if not self.trainer.is_global_zero:
            return
        folder = Path(self.output_dir) / self.run_name
        with atomic_folder(folder / "adapter") as tmp:
            save_trainable(self.model, weights, tmp, self.tokenizer)
        if self.save_merged and self.lora_args.enabled:
            with atomic_folder(folder / "merged") as tmp:
                merge_adapter(self.model_args, folder / "adapter", tmp)
                self.tokenizer.save_pretrained(str(tmp))


# ----- as a pipeline stage ---------------------------------------------------------------------------------
def runs(ctx: StageContext) -> dict[str, dict]:
    """The fine-tunes of one experiment and seed (name -> data settings): one per mode of
    ``pipeline.finetune_modes`` (default: every mode), trained on the subset its
    ``data.selection`` gives (the select stage's, reused), the full pool, for repair the clean pool (``oracle``),
    and ``base`` (evaluated without training)."""
    out = {m: {"train_on": "selection", "selection": asdict(DataSelection(
        mode=m, features=str(ctx.root / "features"), output_dir=str(ctx.root / "selection"),
        **asdict(stage_selection(ctx))))} for m in ctx.args.finetuned}
    if ctx.exp.reselect_every and "prism" in out:
        out["prism_reselect"] = out["prism"]  # the same start, re-selected every reselect_every epochs
    out["full"] = {"train_on": "pool"}
    if ctx.exp.kind == "repair" and ctx.exp.clean_pool:
        out["oracle"] = {"pool": ctx.exp.clean_pool, "train_on": "pool"}
    out["base"] = {"train_on": "pool"}
    if ctx.args.finetune_batch_size:
        out = {name: dict(data, batch_size=ctx.args.finetune_batch_size) for name, data in out.items()}
    return out


TRAIN_ONLY = ("pool", "pool_columns", "train_on", "selection", "selection_file", "warmup_fraction", "batch_size",
              "shuffle")  # data settings an evaluation without training (``base``) never reads


def training(settings: dict) -> dict:
    """What a fine-tune on the pool depends on: its ``stage.json`` settings less the experiment (name, skill, metric)
    and the target pairs, which a run on the pool never reads (its evaluation covers every held-out skill); for a
    run without training (``base``), less the training rows too."""
    unread = ("target", *(TRAIN_ONLY if settings["epochs"] == 0 else ()))
    return {**{k: v for k, v in settings.items() if k != "experiment"},
            "data": {k: v for k, v in settings["data"].items() if k not in unread}}


def run_files(folder: Path) -> dict[str, str]:
    """sha256 of a fine-tune's results (``adapter/``, ``merged/``, ``metrics-*.json``; path relative to the folder ->
    digest): recorded in its ``stage.json`` when it finishes, checked whenever it is reused or copied. A logger's
    files, which it may still append to, are not results."""
    found = [*folder.glob("metrics-*.json"), *folder.glob("adapter/**/*"), *folder.glob("merged/**/*")]
    return {f.relative_to(folder).as_posix(): file_sha256(f) for f in sorted(found) if f.is_file()}


def check_run_files(folder: Path, recorded: dict | None) -> None:
    """Refuse a finished fine-tune whose files are not the ones its ``stage.json`` records (none recorded: a run
    made before the record existed, trusted by its settings alone)."""
    if recorded is None:
        return
    now = run_files(folder)
    changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
    if changed:
        raise StoreCorruptError(f"{folder}: {', '.join(changed[:5])} {'is' if len(changed) == 1 else 'are'} not the "
                                "file(s) its stage.json records (changed, added or missing since the fine-tune "
                                "finished); delete the folder to redo that fine-tune, or rerun with --force")


def selected_rows(run_data: dict) -> dict | None:
    """What a fine-tune on a finished selection trains on, whichever mode made it: the pool's sha256 and that of the
    selection's ``selected.jsonl`` (the kept rows in pool order), from its manifest, once the file is checked against
    it. ``None`` for a run on the pool or a selection not made yet."""
    sel = run_data.get("selection")
    if run_data.get("train_on") != "selection" or not sel:
        return None
    folder = Path(sel["output_dir"]) / sel["mode"]
    made = read_json(folder / "manifest.json") or {}
    digest = (made.get("files") or {}).get("selected.jsonl")
    if not digest or not made.get("pool_sha256") or not (folder / "selected.jsonl").is_file() \
            or file_sha256(folder / "selected.jsonl") != digest:
        return None  # training reads the selection itself, and refuses it with the reason
    return {"pool_sha256": made["pool_sha256"], "selected_sha256": digest}


def trained_on(settings: dict, rows: dict | None) -> dict:
    """``training(settings)``, with a selection replaced by the rows it selected (``selected_rows``): two modes
    that keep the same rows make one fine-tune."""
    out = training(settings)
    if rows is not None:
        out["data"] = {k: v for k, v in out["data"].items() if k != "selection"} | {"rows": rows}
    return out


def earlier_run(ctx: StageContext, settings: dict, rows: dict | None = None,
                before: list[str] = ()) -> tuple[Path, dict] | None:
    """A finished fine-tune of this pipeline and seed trained exactly as ``settings``, and the files it recorded:
    the clean-pool ``oracle`` of every repair experiment and the ``full`` run of a forward experiment on that pool
    are one run, ``base`` is one model, and modes whose selections keep the same rows (``rows``) train on the same
    data. Only runs of earlier experiments and the runs ``before`` this one in its own experiment: this invocation
    made or checked them (``force`` redid them), so nothing left from another invocation is taken on trust; only
    runs that recorded their files (checked again when copied)."""
    if settings["data"].get("train_on") != "pool" and rows is None:
        return None
    want, top = trained_on(plain_json(settings), rows), ctx.root.parent.parent
    names = [e.name for e in ctx.args.experiments]
    earlier = [(name, None) for name in (names[:names.index(ctx.exp.name)] if ctx.exp.name in names else [])]
    for name, runs_of in [*earlier, (ctx.exp.name, list(before))]:
        for marker in sorted((top / name / f"seed-{ctx.seed}" / "finetune").glob("*/stage.json")):
            if runs_of is not None and marker.parent.name not in runs_of:
                continue
            done = read_json(marker)
            if done and done.get("files") and trained_on(done["settings"], done.get("rows")) == want:
                return marker.parent, done["files"]
    return None


def copy_run(src: Path, dst: Path, files: dict[str, str]) -> None:
    """``src``'s results (``run_files``) into ``dst`` in one rename (``stage.json`` is ``dst``'s own), after checking
    that the copy holds exactly the files ``src`` recorded."""
    with atomic_folder(dst) as tmp:
        for name in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, tmp / name)
        check_run_files(tmp, files)


def run(ctx: StageContext) -> None:
    """Fine-tune and evaluate every run (each with its own ``stage.json``); the numbers go to ``ctx.results``. A run
    trained exactly as one of an earlier experiment (``earlier_run``) is copied from it, not trained again."""
    optim = replace(ctx.model.optim_args, lr=ctx.args.finetune_lr)
    out, finished = {}, []
    for name, run_data in runs(ctx).items():
        folder = ctx.root / "finetune" / name
        epochs = 0 if name == "base" else ctx.args.finetune_epochs
        data = dict(ctx.data, **run_data)
        every = ctx.exp.reselect_every if name == "prism_reselect" else None
        settings = dict(ctx.base, data=data, epochs=epochs, lr=ctx.args.finetune_lr,
                        **({"reselect_every": every} if every else {}))
        done = Stage(folder, settings, ctx.force)
        if not done.todo:
            check_run_files(folder, done.record.get("files"))
        # what a run still to make trains on (a re-selecting run re-selects from the stores as it trains)
        rows = selected_rows(data) if done.todo and not every else None
        same = earlier_run(ctx, settings, rows, finished) if done.todo else None
        where = same and str(same[0].relative_to(ctx.root.parent.parent))
        detail = f"the same run as {where}, copied" if same else run_detail(ctx, name, epochs)
        with done as st, ctx.progress.stage(f"{ctx.version} finetune/{name}", detail, st.todo):
            if same:
                if is_rank0():
                    copy_run(same[0], folder, same[1])
                barrier()
                st.extra["same_as"] = where
            elif st.todo:
                L.seed_everything(ctx.seed, verbose=False)
                module = FinetuneModule(model=ctx.model.model_args, lora=ctx.lora, optim=optim,
                                        output_dir=str(ctx.root), run_name=f"finetune/{name}", fsdp=ctx.model.fsdp_args)
                dm = ctx.data_for(**run_data)
                # the fine-tunes are evaluated once, after training (test); no checkpoints but the final adapter
                reselect = [PrismReselection(every)] if every else []
                trainer = ctx.trainer_for(f"finetune/{name}", folder, max_epochs=epochs, enable_checkpointing=False,
                                          limit_val_batches=0, extra_callbacks=reselect)
                if epochs:
                    trainer.fit(module, datamodule=dm)
                trainer.test(module, datamodule=dm, verbose=False)
            if st.todo and is_rank0():
                st.extra["files"] = run_files(folder)
                if rows is not None:
                    st.extra["rows"] = rows
        finished.append(name)
        metrics = read_json(folder / "metrics-test.json", {})
        out[name] = {k: metrics.get(M.metric_key(k, ctx.exp.subtask), float("nan"))
                     for k in (M.EXACT_MATCH, M.PREF_ACC, M.WANTED, M.UNWANTED)}
        out[name] |= {"exact_match_all": metrics.get(M.metric_key(M.EXACT_MATCH), float("nan")),
                      "seconds": st.seconds if epochs else float("nan")}
    ctx.results["finetune"] = out


def run_detail(ctx: StageContext, name: str, epochs: int) -> str:
    """What a fine-tune trains on, for its progress line."""
    if not epochs:
        return "evaluated without training"
    size, exp = ctx.sizes, ctx.exp
    budget = int(exp.fraction * size.get("pool", 0) + 1e-9)
    rows = {"full": size.get("pool"), "oracle": size.get("clean")}.get(
        name, budget if exp.kind == "forward" else size.get("pool", 0) - budget)
    return f"{rows} rows x {epochs} epoch{'s' * (epochs != 1)}, then evaluated"


def needed(ctx: StageContext) -> bool:
    return ctx.exp.finetune
