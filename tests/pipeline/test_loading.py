"""Where the pipeline finds the non-weight settings of a model folder (no networks are built here)."""

from __future__ import annotations

import json

import numpy as np

from unclip_jax import stages
from unclip_jax.diffusion import diffusion_from_config
from unclip_jax.pipeline import loading


def test_native_pipeline_folder_settings_come_from_files(tmp_path):
    """`unclip convert import --component pipeline` keeps schedulers and tokenizer under files/: they are used."""
    files = tmp_path / "files"
    (files / "decoder_scheduler").mkdir(parents=True)
    (files / "decoder_scheduler" / "scheduler_config.json").write_text(
        json.dumps({"beta_schedule": "linear", "num_train_timesteps": 500, "variance_type": "learned_range"})
    )
    (files / "tokenizer").mkdir()
    (files / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    d = loading.find_diffusion("decoder", None, tmp_path)
    default = diffusion_from_config(stages.stage("decoder").diffusion)
    assert d.num_timesteps == 500 and default.num_timesteps == 1000
    assert not np.allclose(d.betas[:10], default.betas[:10])  # linear, not Karlo's cosine default
    assert loading.load_tokenizer(tmp_path, None).pad_token == loading.EOT  # default "!" without files/


def test_two_tower_clip_folder_is_recognised_by_its_config(tmp_path):
    folder = tmp_path / "my_openai_clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert loading._is_two_tower_clip(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    assert not loading._is_two_tower_clip(folder)
