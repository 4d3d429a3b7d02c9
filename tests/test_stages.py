"""Every setting reaches its stage: stage trainers and data modules inherit the pipeline's, rows can change."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from prism_lightning import TINY_MODEL
from prism_lightning.cli import main
from prism_lightning.context import stage_data, stage_trainer
from prism_lightning.data import PrismDataModule
from prism_lightning.trainer import PrismTrainer


def test_stage_trainer_inherits_every_setting(tmp_path):
    logger = CSVLogger(str(tmp_path / "logs"), name="pipe")
    trainer = PrismTrainer(accelerator="cpu", devices=1, accumulate_grad_batches=8, gradient_clip_val=1.0,
                           logger=logger, callbacks=[LearningRateMonitor()], enable_progress_bar=False)
    stage = stage_trainer(trainer, tmp_path / "warmup", "exp/seed-0/warmup", max_epochs=3)
    assert isinstance(stage, PrismTrainer)
    assert stage.accumulate_grad_batches == 8 and stage.gradient_clip_val == 1.0
    assert stage.max_epochs == 3 and stage.default_root_dir == str(tmp_path / "warmup")
    monitors = [c for c in stage.callbacks if isinstance(c, LearningRateMonitor)]
    assert len(monitors) == 1 and monitors[0] not in trainer.callbacks  # a copy per stage
    assert trainer.init_kwargs["callbacks"] == [trainer.callbacks[0]]  # the user's, not the Trainer's defaults
    assert isinstance(stage.logger, CSVLogger) and stage.logger is not logger
    assert Path(stage.logger.log_dir) == tmp_path / "logs" / "pipe" / "exp" / "seed-0" / "warmup"
    off = stage_trainer(PrismTrainer(accelerator="cpu", logger=False), tmp_path, "x", inference_mode=False)
    assert off.logger is None and not off.predict_loop.inference_mode


@pytest.mark.slow
def test_cli_pipeline_trainer_settings_reach_the_stages(tmp_path, monkeypatch):
    """Through the real CLI: a pipeline config's accumulation, clipping, logger, callback and data.shuffle."""
    import prism_lightning.pipeline as pipeline

    seen = {}

    def record(trainer, model, datamodule, output_dir, args, force=False):
        seen["trainer"] = stage_trainer(trainer, tmp_path / "s", "exp/seed-0/warmup", max_epochs=1)
        seen["data"] = stage_data(datamodule, pool="p.jsonl", train_on="warmup")
        return {"report_md": "none", "report_html": "none"}

    monkeypatch.setattr(pipeline, "run_pipeline", record)
    main(["pipeline", "--config", "configs/tiny/pipeline.yaml", "--output_dir", str(tmp_path / "run"),
          "--trainer.accumulate_grad_batches", "4",
          "--trainer.gradient_clip_val", "0.5", "--trainer.logger", "CSVLogger",
          "--trainer.logger.save_dir", str(tmp_path / "logs"),
          "--trainer.callbacks+=LearningRateMonitor", "--data.shuffle", "false",
          "--data.group_by_length", "true", "--data.max_tokens_per_batch", "512", "--data.padding_free", "true"])
    t, dm = seen["trainer"], seen["data"]
    assert t.accumulate_grad_batches == 4 and t.gradient_clip_val == 0.5
    assert isinstance(t.logger, CSVLogger) and t.logger.version == "exp/seed-0/warmup"
    assert any(isinstance(c, LearningRateMonitor) for c in t.callbacks)
    assert dm.shuffle is False and dm.pool == "p.jsonl" and dm.max_length == 64
    assert dm.group_by_length is True and dm.max_tokens_per_batch == 512 and dm.padding_free is True


class SwapRows(Callback):
    """Records the rows of each epoch; after epoch 0 trains on the first 4 pool rows only."""

    def __init__(self):
        self.rows: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.setdefault(trainer.current_epoch, set()).update(batch["index"].tolist())

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.datamodule.set_train_rows([0, 1, 2, 3])


@pytest.mark.slow
def test_a_callback_changes_the_training_rows_between_epochs(tmp_path, small_data):
    from prism_lightning.config import LoraArgs
    from prism_lightning.modules import FinetuneModule

    dm = PrismDataModule(tokenizer=TINY_MODEL,
                         pool=str(small_data["pool"]), target=None, eval_sft=None, eval_pairs=None,
                         train_on="pool", batch_size=8, max_length=64)
    swap = SwapRows()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, reload_dataloaders_every_n_epochs=1, callbacks=[swap])
    trainer.fit(FinetuneModule(lora=LoraArgs(r=4, alpha=8, dropout=0.0), output_dir=str(tmp_path)), datamodule=dm)
    assert swap.rows[0] == set(range(len(dm.pool_rows))) and swap.rows[1] == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="outside the pool"):
        dm.set_train_rows([len(dm.pool_rows)])


@pytest.mark.slow
def test_select_help_documents_every_field_and_refuses_a_bad_choice_when_parsed(capsys):
    from dataclasses import fields

    from prism_lightning.config import SelectionArgs

    with pytest.raises(SystemExit):
        main(["select", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m prism_lightning")
    for f in fields(SelectionArgs):  # each field with its own help text, not just its type
        block = out.split(f"--selection.{f.name} ")[-1].split("\n  --")[0]  # its entry in the options list
        assert "(type:" in block and len(block.split("(type:")[0].split()) > 3, f.name
    assert "--optimizer" not in out and "--lr_scheduler" not in out
    with pytest.raises(SystemExit):
        main(["select", "--config", "configs/tiny/select.yaml", "--selection.task", "foward"])
    err = capsys.readouterr().err  # refused when parsed: no store was read
    assert 'Parser key "selection.task"' in err and "Got value: foward" in err


@pytest.mark.slow
def test_model_short_names_and_their_help(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "WarmupModule"])
    out = capsys.readouterr().out
    assert "Help for --model.help=prism_lightning.modules.WarmupModule" in out
    assert "Where reference checkpoints" in out.split("--model.output_dir")[-1]  # the field's own help line
    cli = main(["--config", "configs/tiny/warmup.yaml", "--model", "WarmupModule", "--model.output_dir", "x"],
               run=False)
    assert type(cli.model).__name__ == "WarmupModule"


@pytest.mark.slow
def test_pipeline_experiments_parse_from_yaml(tmp_path, monkeypatch):
    """An experiment list in a config reaches ``PipelineArgs`` with every field typed."""
    seen = {}
    monkeypatch.setattr("prism_lightning.pipeline.run_pipeline",
                        lambda trainer, model, dm, out, args, force=False: seen.setdefault("args", args) and
                        {"report_md": "none", "report_html": "none"})
    cfg = tmp_path / "p.yaml"
    exp = {"name": "e", "kind": "repair", "pool": "a.jsonl", "target": "t.jsonl", "subtask": "claim",
           "metric": "unwanted", "pool_preconditioner": "adam", "study": "s"}
    cfg.write_text(json.dumps({"pipeline": {"experiments": [exp], "modes": ["prism", "loss"],
                                            "finetune_modes": ["loss"], "target_checkpoint": "last"}}))
    main(["pipeline", "--config", "configs/tiny/pipeline.yaml", "--config", str(cfg), "--output_dir",
          str(tmp_path / "run")])
    got = seen["args"].experiments[0]
    assert (got.metric, got.pool_preconditioner, got.study) == ("unwanted", "adam", "s")
    assert seen["args"].modes == ["prism", "loss"] and seen["args"].finetune_batch_size == 4
    assert seen["args"].finetune_modes == ["loss"] and seen["args"].finetuned == ["loss"]
    assert seen["args"].target_checkpoint == "last"
