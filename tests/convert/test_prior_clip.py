"""Weight bridge for the prior and CLIP: parity with diffusers/transformers, export, round trips, bad folders.

Parity figures (max abs diff, float32) are printed with ``-s`` and asserted <= 1e-4.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from unclip_jax.convert import clip as cclip
from unclip_jax.convert import io
from unclip_jax.convert import prior as cprior

pytestmark = pytest.mark.torch

PRIOR_CONFIGS = {
    "A": (dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=7), 3),
    "B": (
        dict(
            num_attention_heads=4,
            attention_head_dim=4,
            num_layers=3,
            embedding_dim=20,
            num_embeddings=10,
            time_embed_dim=24,
            embedding_proj_dim=16,
            clip_embed_dim=14,
            norm_in_type="layer",
            embedding_proj_norm_type="layer",
        ),
        2,
    ),
}
TEXT_CONFIGS = {  # (config, batch, length)
    "A": (
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=16,
            max_position_embeddings=20,
            vocab_size=100,
            eos_token_id=2,
        ),
        3,
        20,
    ),
    "B": (
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=3,
            projection_dim=24,
            max_position_embeddings=77,
            vocab_size=49408,
            eos_token_id=49407,
        ),
        2,
        12,
    ),
}
VISION_CONFIGS = {  # (config, batch)
    "A": (
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=16,
            image_size=32,
            patch_size=8,
        ),
        2,
    ),
    "B": (
        dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=4,
            projection_dim=24,
            image_size=28,
            patch_size=7,
            hidden_act="gelu",
        ),
        3,
    ),
}
FIGURES: dict[str, float] = {}


def _perturb(torch, model, scale=0.2):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    print("\nparity max abs diff (float32):", json.dumps(FIGURES, indent=1))


# ----------------------------------------------------------------------------- prior


@pytest.fixture(scope="module")
def priors(torch_threads, tmp_path_factory):
    torch = torch_threads
    from diffusers import PriorTransformer

    out = {}
    for name, (cfg, batch) in PRIOR_CONFIGS.items():
        torch.manual_seed(len(name) + ord(name))
        ref = _perturb(torch, PriorTransformer(**cfg))
        with torch.no_grad():
            ref.clip_std.copy_(1.0 + 0.1 * torch.rand_like(ref.clip_std))
        folder = tmp_path_factory.mktemp(f"prior{name}")
        ref.save_pretrained(folder)
        rng = np.random.default_rng(1)
        d, n = cfg["embedding_dim"], cfg["num_embeddings"]
        dp = cfg.get("embedding_proj_dim", d)
        lengths = rng.integers(2, n + 1, size=batch)
        lengths[0] = n
        inputs = dict(
            hidden_states=rng.normal(size=(batch, d)).astype(np.float32),
            timestep=rng.integers(0, 1000, size=batch),
            proj_embedding=rng.normal(size=(batch, dp)).astype(np.float32),
            encoder_hidden_states=rng.normal(size=(batch, n, d)).astype(np.float32),
            attention_mask=np.arange(n)[None] < lengths[:, None],
        )
        with torch.no_grad():
            want = ref(**{k: torch.tensor(v) for k, v in inputs.items()}).predicted_image_embedding.numpy()
        out[name] = (ref, folder, inputs, want)
    return out


@pytest.mark.parametrize("name", sorted(PRIOR_CONFIGS))
def test_prior_parity(priors, name, torch_threads):
    ref, folder, inputs, want = priors[name]
    module, variables = cprior.load_prior(folder)
    got = jax.jit(lambda v, kw: module.apply(v, **kw))(variables, inputs)
    FIGURES[f"prior_{name}"] = _maxdiff(got, want)
    assert FIGURES[f"prior_{name}"] <= 1e-4
    z = inputs["hidden_states"][:, : module.out_dim]
    den = module.apply(variables, z, method="denormalize")
    with torch_threads.no_grad():
        want_den = ref.post_process_latents(torch_threads.tensor(z)).numpy()
    assert _maxdiff(den, want_den) <= 1e-6


@pytest.mark.parametrize("name", sorted(PRIOR_CONFIGS))
def test_prior_export_roundtrip(priors, name, tmp_path, torch_threads):
    from diffusers import PriorTransformer

    ref, folder, inputs, want = priors[name]
    module, variables = cprior.load_prior(folder)
    cprior.save_prior(module, variables, tmp_path / "out")
    back = PriorTransformer.from_pretrained(tmp_path / "out").eval()
    with torch_threads.no_grad():
        got = back(**{k: torch_threads.tensor(v) for k, v in inputs.items()}).predicted_image_embedding.numpy()
    np.testing.assert_array_equal(got, want)
    _, again = cprior.load_prior(tmp_path / "out")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, again)


def test_prior_from_pipeline_folder(priors, tmp_path):
    _, folder, inputs, want = priors["A"]
    shutil.copytree(folder, tmp_path / "pipe" / "prior")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    module, variables = cprior.load_prior(tmp_path / "pipe")
    assert module.num_embeddings == PRIOR_CONFIGS["A"][0]["num_embeddings"]


def _edit_weights(src, dst, edit):
    from safetensors.numpy import save_file

    shutil.copytree(src, dst)
    path = io.find_weights(dst)
    state = io.read_safetensors(path)
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda s: s.pop("transformer_blocks.1.attn1.to_k.weight"),
            r"missing keys.*transformer_blocks\.1\.attn1\.to_k\.weight",
        ),
        (lambda s: s.update(extra_thing=np.zeros(3, np.float32)), r"unexpected keys.*extra_thing"),
        (
            lambda s: s.update({"proj_in.weight": np.zeros((16, 5), np.float32)}),
            r"mis-shaped keys.*proj_in\.weight: shape \(16, 5\), expected \(16, 12\)",
        ),
    ],
)
def test_prior_bad_weights(priors, tmp_path, edit, match):
    bad = _edit_weights(priors["A"][1], tmp_path / "bad", edit)
    with pytest.raises(io.ConversionError, match=match):
        cprior.load_prior(bad)


def test_prior_missing_config_field(priors, tmp_path):
    shutil.copytree(priors["A"][1], tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    del cfg["num_layers"]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(io.ConversionError, match=r"config\.json lacks required field\(s\) \['num_layers'\]"):
        cprior.load_prior(tmp_path / "bad")


# ----------------------------------------------------------------------------- CLIP towers


@pytest.fixture(scope="module")
def text_towers(torch_threads, tmp_path_factory):
    torch = torch_threads
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    out = {}
    for name, (cfg, batch, length) in TEXT_CONFIGS.items():
        torch.manual_seed(ord(name))
        ref = _perturb(torch, CLIPTextModelWithProjection(CLIPTextConfig(**cfg)), 0.05)
        folder = tmp_path_factory.mktemp(f"text{name}")
        ref.save_pretrained(folder)
        rng = np.random.default_rng(2)
        ids = rng.integers(1, min(cfg["vocab_size"], 49406), size=(batch, length)).astype(np.int64)
        lengths = rng.integers(3, length + 1, size=batch)
        for b, n in enumerate(lengths):  # SOT ... EOT then eos padding
            ids[b, 0] = min(49406, cfg["vocab_size"] - 2)
            ids[b, n - 1 :] = cfg["vocab_size"] - 1
        mask = np.arange(length)[None] < lengths[:, None]
        with torch.no_grad():
            r = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
        out[name] = (folder, ids, mask, r.text_embeds.numpy(), r.last_hidden_state.numpy())
    return out


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_encoder_parity_and_roundtrip(text_towers, name, tmp_path, torch_threads):
    from transformers import CLIPTextModelWithProjection

    folder, ids, mask, want_emb, want_hidden = text_towers[name]
    module, variables = cclip.load_text_encoder(folder)
    got = jax.jit(module.apply)(variables, ids.astype(np.int32), mask)
    FIGURES[f"text_{name}_text_embeds"] = _maxdiff(got["text_embeds"], want_emb)
    valid = mask[..., None]
    FIGURES[f"text_{name}_last_hidden_state"] = _maxdiff(got["last_hidden_state"] * valid, want_hidden * valid)
    assert FIGURES[f"text_{name}_text_embeds"] <= 1e-4 and FIGURES[f"text_{name}_last_hidden_state"] <= 1e-4

    cclip.save_text_encoder(module, variables, tmp_path / "out")
    back = CLIPTextModelWithProjection.from_pretrained(tmp_path / "out").eval()
    with torch_threads.no_grad():
        r = back(input_ids=torch_threads.tensor(ids), attention_mask=torch_threads.tensor(mask.astype(np.int64)))
    np.testing.assert_array_equal(r.text_embeds.numpy(), want_emb)
    _, again = cclip.load_text_encoder(tmp_path / "out")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, again)


@pytest.fixture(scope="module")
def vision_towers(torch_threads, tmp_path_factory):
    torch = torch_threads
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = {}
    for name, (cfg, batch) in VISION_CONFIGS.items():
        torch.manual_seed(ord(name) + 7)
        ref = _perturb(torch, CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)), 0.05)
        folder = tmp_path_factory.mktemp(f"vision{name}")
        ref.save_pretrained(folder)
        s = cfg["image_size"]
        pix = np.random.default_rng(3).normal(size=(batch, 3, s, s)).astype(np.float32)
        with torch.no_grad():
            want = ref(pixel_values=torch.tensor(pix)).image_embeds.numpy()
        out[name] = (folder, pix, want)
    return out


@pytest.mark.parametrize("name", sorted(VISION_CONFIGS))
def test_image_encoder_parity_and_roundtrip(vision_towers, name, tmp_path, torch_threads):
    from transformers import CLIPVisionModelWithProjection

    folder, pix, want = vision_towers[name]
    module, variables = cclip.load_image_encoder(folder)
    got = jax.jit(module.apply)(variables, pix.transpose(0, 2, 3, 1))
    FIGURES[f"vision_{name}_image_embeds"] = _maxdiff(got["image_embeds"], want)
    assert FIGURES[f"vision_{name}_image_embeds"] <= 1e-4

    cclip.save_image_encoder(module, variables, tmp_path / "out")
    back = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "out").eval()
    with torch_threads.no_grad():
        np.testing.assert_array_equal(back(pixel_values=torch_threads.tensor(pix)).image_embeds.numpy(), want)
    _, again = cclip.load_image_encoder(tmp_path / "out")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, again)


def test_text_encoder_bad_folders(text_towers, tmp_path):
    src = text_towers["A"][0]
    bad = _edit_weights(src, tmp_path / "del", lambda s: s.pop("text_model.final_layer_norm.weight"))
    with pytest.raises(io.ConversionError, match=r"missing keys.*text_model\.final_layer_norm\.weight"):
        cclip.load_text_encoder(bad)
    bad = _edit_weights(
        src, tmp_path / "shape", lambda s: s.update({"text_projection.weight": np.zeros((3, 32), np.float32)})
    )
    with pytest.raises(io.ConversionError, match=r"text_projection\.weight: shape \(3, 32\), expected \(16, 32\)"):
        cclip.load_text_encoder(bad)
    # Older checkpoints store the position_ids buffer: accepted when it is arange, an error otherwise.
    ok = _edit_weights(
        src, tmp_path / "pos", lambda s: s.update({"text_model.embeddings.position_ids": np.arange(20)[None]})
    )
    cclip.load_text_encoder(ok)
    bad = _edit_weights(
        src, tmp_path / "pos2", lambda s: s.update({"text_model.embeddings.position_ids": np.zeros((1, 20), np.int64)})
    )
    with pytest.raises(io.ConversionError, match="position_ids"):
        cclip.load_text_encoder(bad)
    shutil.copytree(src, tmp_path / "cfg")
    cfg = json.loads((tmp_path / "cfg" / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(io.ConversionError, match=r"\['hidden_size'\]"):
        cclip.load_text_encoder(tmp_path / "cfg")


def test_clip_model_component(torch_threads, tmp_path):
    torch = torch_threads
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(5)
    cfg = CLIPConfig(text_config=TEXT_CONFIGS["A"][0], vision_config=VISION_CONFIGS["A"][0], projection_dim=16)
    ref = _perturb(torch, CLIPModel(cfg), 0.05)
    ref.save_pretrained(tmp_path / "clip")
    module, variables = cclip.load_clip(tmp_path / "clip")
    ids = np.random.default_rng(0).integers(1, 99, size=(2, 20))
    pix = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    out = jax.jit(module.apply)(variables, ids.astype(np.int32), pix.transpose(0, 2, 3, 1))
    with torch.no_grad():
        t = ref.text_projection(ref.text_model(input_ids=torch.tensor(ids)).pooler_output).numpy()
        v = ref.visual_projection(ref.vision_model(pixel_values=torch.tensor(pix)).pooler_output).numpy()
    FIGURES["clip_model_text_embeds"] = _maxdiff(out["text_embeds"], t)
    FIGURES["clip_model_image_embeds"] = _maxdiff(out["image_embeds"], v)
    assert max(FIGURES["clip_model_text_embeds"], FIGURES["clip_model_image_embeds"]) <= 1e-4
    assert float(out["logit_scale"]) == float(ref.logit_scale.detach())
    cclip.save_clip(module, variables, tmp_path / "out")
    state = io.read_safetensors(tmp_path / "out" / io.TRANSFORMERS_WEIGHTS)
    assert state["logit_scale"].shape == ()
    back = CLIPModel.from_pretrained(tmp_path / "out")
    for k, val in ref.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), val.numpy())
