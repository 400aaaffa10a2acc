"""Weight bridge between PyTorch-keyed safetensors folders (diffusers, transformers) and Flax params.

registry   CONVERTERS: one Converter per component (config to/from torch, rules, load, save); converter(name),
           for_component(pipeline component name).
prior, clip, decoder, upsampler
           the per-network converters; unet: what the decoder and super-resolution U-Nets share.
scheduler  UnCLIPScheduler configs <-> config.diffusion fields (Karlo's from the stage registry).
pipeline   a whole Karlo UnCLIPPipeline folder: read_diffusers_pipeline / write_diffusers_pipeline.
native     our own format (config.json + params.safetensors) for any module.
mapping    declarative Flax <-> PyTorch parameter rules; io: folders, safetensors, atomic writes.
inception  the FID Inception weights, read by unpickle (a restricted torch pickle reader).
commands   `unclip convert import|export --component NAME`.
"""
