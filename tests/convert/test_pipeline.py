"""A whole random diffusers UnCLIPPipeline folder: imports into ours, exports back to a folder diffusers loads,
round trip bit-exact (every tensor, every text file, and the pipeline's sampled images)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from unclip_jax.convert import decoder as cd
from unclip_jax.convert import io
from unclip_jax.convert import pipeline as cp
from unclip_jax.convert import upsampler as cu
from unclip_jax.convert.scheduler import karlo_scheduler_configs
from unclip_jax.models import decoder, upsampler

pytestmark = pytest.mark.torch


def _tokenizer_folder(path):
    """A tiny CLIP BPE vocabulary: single characters, no merges."""
    chars = list("abcdefghijklmnopqrstuvwxyz!")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return vocab


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, torch_threads):
    """A random UnCLIPPipeline (our 'test' decoder/upsampler configs) saved by diffusers."""
    torch = torch_threads
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    root = tmp_path_factory.mktemp("pipe")
    vocab = _tokenizer_folder(root / "tok")
    tok = CLIPTokenizer.from_pretrained(root / "tok", model_max_length=16)
    m, u = decoder.build("test"), upsampler.build("test")
    d = m.clip_embeddings_dim
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=d,
            max_position_embeddings=16,
            vocab_size=len(vocab),
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=0,
        )
    )
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=d, num_embeddings=16
    )
    unet = UNet2DConditionModel.from_config(cd.decoder_config(decoder.Decoder(**m.unet_kwargs())))
    proj = UnCLIPTextProjModel.from_config(cd.text_proj_config(decoder.UnCLIPTextProj(**m.text_proj_kwargs())))
    sr_first = UNet2DModel.from_config(cu.config_from_module(u))
    sr_last = UNet2DModel.from_config(cu.config_from_module(u))
    with torch.no_grad():
        for net in (text_encoder, prior, unet, proj, sr_first, sr_last):
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        prior.clip_std.abs_().add_(0.5)  # diffusers initialises it to zeros
    sched = {name: UnCLIPScheduler.from_config(cfg) for name, cfg in karlo_scheduler_configs().items()}
    pipe = UnCLIPPipeline(
        prior=prior,
        decoder=unet,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_proj=proj,
        super_res_first=sr_first,
        super_res_last=sr_last,
        **sched,
    )
    pipe.save_pretrained(root / "diffusers")
    return root / "diffusers"


def _sample(torch, folder):
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline

    cp.register_diffusers_aliases()
    pipe = UnCLIPPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red cube",
        prior_num_inference_steps=2,
        decoder_num_inference_steps=2,
        super_res_num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images


def test_pipeline_round_trip(torch_threads, pipeline_folder, tmp_path):
    bundle = cp.read_diffusers_pipeline(pipeline_folder)
    assert set(bundle.models) == set(cp.NETWORKS)
    assert bundle.models["decoder"][0] == decoder.build("test")
    assert bundle.models["super_res_first"][0] == bundle.models["super_res_last"][0] == upsampler.build("test")
    assert "tokenizer/tokenizer_config.json" in bundle.files and cp.MODEL_INDEX in bundle.files
    out = cp.write_diffusers_pipeline(bundle, tmp_path / "ours")
    # Every tensor of every component is bit-identical, every carried file identical.
    for sub in ("prior", "text_encoder", "decoder", "text_proj", "super_res_first", "super_res_last"):
        a = io.read_safetensors(io.find_weights(pipeline_folder / sub))
        b = io.read_safetensors(io.find_weights(out / sub))
        assert sorted(a) == sorted(b), sub
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{sub}/{k}"
    for rel, text in bundle.files.items():
        assert (out / rel).read_text() == text
    # Every diffusers config.json as diffusers wrote it: the same keys and values after the round trip. (The text
    # encoder's differs only in bos/pad token ids, which the tower does not hold.)
    for sub in ("prior", "decoder", "text_proj", "super_res_first", "super_res_last"):
        assert io.read_config(out / sub) == io.read_config(pipeline_folder / sub), sub
    theirs, ours = io.read_config(pipeline_folder / "text_encoder"), io.read_config(out / "text_encoder")
    assert {k: v for k, v in theirs.items() if k not in ("bos_token_id", "pad_token_id")} == ours
    # Import of our export is the same bundle.
    again = cp.read_diffusers_pipeline(out)
    for name, (module, variables) in bundle.models.items():
        module2, variables2 = again.models[name]
        assert module2 == module

        for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # diffusers loads our export and samples exactly the same images as from its own folder.
    images = _sample(torch_threads, out)
    assert images.shape == (1, 32, 32, 3) and images.std() > 0.01
    np.testing.assert_array_equal(images, _sample(torch_threads, pipeline_folder))


def test_bad_pipeline_folders(pipeline_folder, tmp_path):
    shutil.copytree(pipeline_folder, tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "text_proj")
    with pytest.raises(io.ConversionError, match=r"component folder\(s\) \['text_proj'\] missing"):
        cp.read_diffusers_pipeline(tmp_path / "p")
    (tmp_path / "q").mkdir()
    with pytest.raises(io.ConversionError, match="model_index.json: missing"):
        cp.read_diffusers_pipeline(tmp_path / "q")
    bundle = cp.read_diffusers_pipeline(pipeline_folder)
    bundle.files = {k: v for k, v in bundle.files.items() if not k.startswith("tokenizer/")}
    with pytest.raises(io.ConversionError, match="no tokenizer"):
        cp.write_diffusers_pipeline(bundle, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_cli_pipeline_import_export_round_trip(pipeline_folder, tmp_path):
    """`unclip convert import|export --component pipeline`: native folders in between, tensors bit-exact."""
    from unclip_jax.cli import main

    assert main(["convert", "import", "--component", "pipeline", str(pipeline_folder), str(tmp_path / "native")]) == 0
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == sorted([*cp.NETWORKS, cp.NATIVE_FILES])
    assert main(["convert", "export", "--component", "pipeline", str(tmp_path / "native"), str(tmp_path / "out")]) == 0
    for sub in ("prior", "text_encoder", "decoder", "text_proj", "super_res_first", "super_res_last"):
        src = io.read_safetensors(io.find_weights(pipeline_folder / sub))
        out = io.read_safetensors(io.find_weights(tmp_path / "out" / sub))
        assert sorted(src) == sorted(out), sub
        for k in src:
            np.testing.assert_array_equal(out[k], src[k])
    tok_files = sorted(
        p.relative_to(pipeline_folder) for p in (pipeline_folder / "tokenizer").rglob("*") if p.is_file()
    )
    assert tok_files
    for rel in tok_files:
        assert (tmp_path / "out" / rel).read_text() == (pipeline_folder / rel).read_text(), rel
    # A native pipeline without one of its networks is refused, naming it.
    shutil.rmtree(tmp_path / "native" / "super_res_last")
    assert main(["convert", "export", "--component", "pipeline", str(tmp_path / "native"), str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()
