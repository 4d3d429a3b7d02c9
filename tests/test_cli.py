"""The real CLI, in-process."""

from __future__ import annotations

import pytest

from prism_lightning.cli import main


def test_help_lists_every_command_of_the_stage_table(capsys):
    from prism_lightning.stages import STAGES

    assert main(["--help"]) is None
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict", "pipeline", *(s.command for s in STAGES.values())):
        assert sub in out
    for spec in STAGES.values():
        assert spec.name in out and spec.summary in out


@pytest.mark.slow
def test_fit_fast_dev_run(tmp_path, small_data):
    main(["fit", "--config", "configs/tiny/warmup.yaml", "--trainer.fast_dev_run", "true",
          "--model.init_args.output_dir", str(tmp_path), "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path),
          "--data.pool", str(small_data["pool"]), "--data.eval_sft", str(small_data["eval"]),
          "--data.eval_pairs", str(small_data["eval_pairs"])])


@pytest.mark.slow
def test_warmup_then_validate_and_predict(tmp_path, small_data):
    common = ["--model.init_args.output_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
              "--data.pool", str(small_data["pool"]),
              "--data.target", str(small_data["target_pairs"]), "--data.eval_sft", str(small_data["eval"]),
              "--data.eval_pairs", str(small_data["eval_pairs"]), "--trainer.logger", "false"]
    main(["fit", "--config", "configs/tiny/warmup.yaml", "--trainer.max_epochs", "1", *common])
    assert (tmp_path / "warmup" / "epoch-1" / "checkpoint.json").exists()
    main(["validate", "--config", "configs/tiny/warmup.yaml", *common,
          "--model.init_args.adapter_path", str(tmp_path / "warmup" / "epoch-1")])
    main(["predict", "--config", "configs/tiny/features.yaml", "--model.init_args.output_dir", str(tmp_path),
          "--trainer.default_root_dir", str(tmp_path),
          "--model.init_args.checkpoint_dir", str(tmp_path / "warmup"), "--data.pool", str(small_data["pool"]),
          "--data.target", str(small_data["target_pairs"])])
    assert (tmp_path / "features" / "epoch-1" / "pool" / "shard-00000.safetensors").exists()
