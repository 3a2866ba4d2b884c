"""FLUX.1 through the family seam, against diffusers (tiny-flux, CPU, fp32): generated images vs `FluxPipeline`, LoRA
files vs `FluxPipeline.load_lora_weights` (ours written, and the layouts other trainers write, made by hand),
kohya's fused layers at FLUX.1's full width vs diffusers' converter, the flux_shift noise levels vs diffusers'
dynamic-shift formula, and the family's names.

Tolerances. Images: our 8-bit pixels within 3/255 of the pipeline's float output (the project's bound; measured
0.5/255, i.e. our rounding to 8 bits only: both sides run the same fp32 math, the transformer equal to ~1e-7,
tests/test_flux_transformer.py). The LoRAs used move pixels by far more (asserted), so a LoRA not applied fails.
A batch rounds differently from single calls (BLAS blocking): 1/255 allowed. Transformer outputs with a LoRA:
relative 1e-5 (we merge into the weights, diffusers runs a separate peft branch: ~1e-7 measured); the LoRA changes
the output by > 1e-2 relative (asserted). Loaded weights: exact where no arithmetic is involved (round trips),
relative 1e-6 where diffusers rescales by alpha / rank.
"""

import json
import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file, save_file

import families
from flux import family
from flux import lora as flux_lora
from flux.bfl import PREFIX, diffusers_to_bfl
from flux.configs import FLUX_DEV
from flux.loading import load_text_encoder, load_transformer
from flux.tiny import TINY_MAX_SEQUENCE_LENGTH, tiny_flux_path
from flux.transformer import image_ids, text_ids
from lora.files import LoRAWeights, kohya_dora_problem, write_lora
from lora.layer import LoRAConfig, add_lora, lora_parameters
from lora.reading import read_lora_file
from lora.text_encoders import text_encoder_lora_parameters
from sampling.inference import ImageGenerator
from training.flags import NoiseSettings

PROMPT = "a red circle on a blue square"
SIZE = {"width": 48, "height": 64, "steps": 4}


@pytest.fixture(scope="module")
def tiny():
    return tiny_flux_path()


@pytest.fixture(scope="module")
def pipe(tiny):
    pipe = FluxPipeline.from_pretrained(tiny, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diff255(image, ref) -> float:
    """Largest per-pixel difference in 1/255; `ref` a PIL image or the pipeline's float array in [0, 1]."""
    ref = np.asarray(ref).astype(np.float64) * (255 if isinstance(ref, np.ndarray) else 1)
    return float(np.abs(np.asarray(image).astype(np.float64) - ref).max())


def pipeline_images(pipe, seeds, guidance=3.5, negative=None, true_cfg=1.0):
    return pipe([PROMPT] * len(seeds), negative_prompt=negative and [negative] * len(seeds), true_cfg_scale=true_cfg,
                height=SIZE["height"], width=SIZE["width"], num_inference_steps=SIZE["steps"], guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
                max_sequence_length=TINY_MAX_SEQUENCE_LENGTH).images


def kohya_safe(model) -> dict:
    """The blocks' layers of all_plus (modulations included) but the single blocks' linear1 parts (q, k, v,
    proj_mlp), what diffusers 0.42 reads of a kohya FLUX file on tiny-flux: its converter splits linear1 with
    FLUX.1's widths written into it ([3072] * 3 + [12288]; `test_fused_layers_at_full_width_equal_diffusers_
    conversion` checks those at FLUX.1's width), and it drops the input layers (img_in, txt_in, time_in, vector_in,
    guidance_in: its converted keys lack the `transformer.` prefix, a diffusers bug; kohya and ComfyUI read them)."""
    return {n: (4, 3.0) for n in flux_lora.lora_target_names(model, "all_plus")
            if n.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and not (n.startswith("single_transformer_blocks.") and n.endswith(("to_q", "to_k", "to_v", "proj_mlp")))}


def make_lora(path, mode="all", fmt="kohya", targets=None, seed=1, text_encoder=False, dora=False, rank=4,
              alpha=3.0, model_out=False):
    """A 'trained' LoRA on tiny-flux (random down and non-zero up), written by flux.lora.save_lora;
    (path, the transformer with its LoRA layers) with `model_out`."""
    model = load_transformer("tiny-flux")
    config = LoRAConfig(rank, alpha, 0.0, mode, use_dora=dora)
    add_lora(model, targets or flux_lora.lora_targets(model, config), 0.0, dora)
    params = lora_parameters(model)
    te = None
    if text_encoder:
        te = load_text_encoder("tiny-flux")
        family.text_encoder_lora(te, rank, alpha, 0.0, "all", False)
        params += list(text_encoder_lora_parameters(te).values())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(p * (1 + 0.1 * torch.randn(p.shape, generator=g)) if p.ndim == 1 else
                    torch.randn(p.shape, generator=g) * 0.15)  # DoRA magnitudes: near the row norms
    path = flux_lora.save_lora(model, path, config, format=fmt, text_encoder=te)
    return (path, model.eval()) if model_out else path


def transformer_inputs(seed=0, b=2, h=8, w=6):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, h * w // 4, 64, generator=g),
                encoder_hidden_states=torch.randn(b, TINY_MAX_SEQUENCE_LENGTH, 48, generator=g),
                pooled_projections=torch.randn(b, 32, generator=g), timestep=torch.tensor([0.3, 0.8][:b]),
                img_ids=image_ids(h, w), txt_ids=text_ids(TINY_MAX_SEQUENCE_LENGTH), guidance=torch.full((b,), 3.5))


@torch.no_grad()
def ours_out(model, x):
    return model(x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], x["timestep"],
                 x["img_ids"], x["txt_ids"], guidance=x["guidance"])


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def load_in_pipe(pipe, path, name) -> list[str]:
    """pipe.load_lora_weights(path); returns the warnings diffusers and peft gave (logged or raised)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name=name)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return [m for m in records + [str(w.message) for w in caught] if "No LoRA keys associated to CLIPText" not in m]


# ---------------------------------------------------------------------------------------------------
# Images: ImageGenerator vs FluxPipeline


def test_images_equal_the_pipeline_dev_guidance_and_true_cfg(pipe):
    gen = ImageGenerator.from_pretrained("tiny-flux")
    seeds = [3, 4]
    ours = gen.generate_unique_batch([PROMPT] * 2, seeds, guidance_scale=3.5, **SIZE)
    ref = pipeline_images(pipe, seeds)
    assert max(diff255(o, r) for o, r in zip(ours, ref, strict=True)) <= 3
    low = gen.generate_unique_batch([PROMPT], [3], guidance_scale=1.0, **SIZE)[0]  # the embedded guidance matters
    assert diff255(low, ours[0]) > 10
    # true CFG against a negative prompt (two passes per step), as the pipeline's true_cfg_scale
    cfg = gen.generate_unique_batch([PROMPT], [5], ["blurry"], guidance_scale=3.5, true_cfg_scale=2.0, **SIZE)[0]
    assert diff255(cfg, pipeline_images(pipe, [5], negative="blurry", true_cfg=2.0)[0]) <= 3
    assert diff255(cfg, gen.generate_unique_batch([PROMPT], [5], guidance_scale=3.5, **SIZE)[0]) > 10


def test_batches_equal_single_images():
    gen = ImageGenerator.from_pretrained("tiny-flux")
    prompts, seeds = [PROMPT, "a green triangle", PROMPT], [7, 8, 9]
    batch = gen.generate_unique_batch(prompts, seeds, **SIZE)
    alone = [gen.generate_unique_batch([p], [s], **SIZE)[0] for p, s in zip(prompts, seeds, strict=True)]
    assert max(diff255(a, b) for a, b in zip(batch, alone, strict=True)) <= 1
    assert diff255(batch[0], batch[2]) > 10  # same prompt, other seed: other noise


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_images_with_our_lora_equal_the_pipeline(pipe, tmp_path, fmt):
    """Our LoRA file (with a CLIP-L part, as --train_text_encoder writes) through load_lora_weights == ours."""
    model = load_transformer("tiny-flux")
    targets = kohya_safe(model) if fmt == "kohya" else None  # diffusers format: every layer of all_plus
    path = make_lora(tmp_path / "lora.safetensors", "all_plus", fmt, targets, text_encoder=True)
    gen = ImageGenerator.from_pretrained("tiny-flux", loras=[(path, 1.0)])
    ours = gen.generate_unique_batch([PROMPT], [11], **SIZE)[0]
    try:
        assert not load_in_pipe(pipe, path, f"ours_{fmt}")
        assert diff255(ours, pipeline_images(pipe, [11])[0]) <= 3
    finally:
        pipe.unload_lora_weights()
    plain = ImageGenerator.from_pretrained("tiny-flux").generate_unique_batch([PROMPT], [11], **SIZE)[0]
    assert diff255(ours, plain) > 10  # the LoRA did change the image


def test_schnell_defaults(tmp_path):
    assert family.defaults("tiny-flux") == family.DEFAULTS and family.DEFAULTS["steps"] == 28
    assert family.DEFAULTS["guidance_scale"] == 3.5 and family.SCHNELL_DEFAULTS["steps"] == 4
    assert families.get("sdxl").defaults("tiny") == families.get("sdxl").DEFAULTS


# ---------------------------------------------------------------------------------------------------
# LoRA files: ours and other trainers' in diffusers


@pytest.mark.parametrize("fmt,mode,dora", [("diffusers", "attention", False), ("diffusers", "all", False),
                                           ("diffusers", "all_plus", False), ("diffusers", "attention", True),
                                           ("kohya", "kohya_safe", False)])
def test_our_lora_loads_in_diffusers(pipe, tmp_path, fmt, mode, dora):
    base = load_transformer("tiny-flux")
    targets = kohya_safe(base) if mode == "kohya_safe" else None
    path = make_lora(tmp_path / "lora.safetensors", "all_plus" if targets else mode, fmt, targets, dora=dora)
    ours = load_transformer("tiny-flux")
    flux_lora.load_lora(ours, path)
    try:
        assert not load_in_pipe(pipe, path, f"{fmt}_{mode}_{dora}")
        x = transformer_inputs()
        with torch.no_grad():
            expected = pipe.transformer(**x).sample
        assert rel(ours_out(ours, x), expected) < 1e-5
        assert rel(ours_out(base, x), expected) > 1e-2
    finally:
        pipe.unload_lora_weights()


def test_kohya_round_trip_and_layout(tmp_path):
    """kohya -> read -> kohya is exact (fused layers keep their shared down); attention mode fuses q, k, v into
    BFL's qkv / linear1 with kohya's metadata; diffusers -> kohya gives the same merged weights."""
    a = make_lora(tmp_path / "a.safetensors", "attention", "kohya")
    tensors = load_file(a)
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", "lora_unet_double_blocks_1_txt_attn_proj.alpha",
            "lora_unet_single_blocks_2_linear1.lora_down.weight"} <= set(tensors)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 64 + 256, 12)  # q, k, v: 3 x 4
    weights = families.read_lora(a, "tiny-flux")
    assert weights.names.family == "flux" and weights.target_mode == "attention"
    meta = weights.metadata
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    b = write_lora(weights, tmp_path / "b.safetensors")
    again = load_file(b)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    d = make_lora(tmp_path / "d.safetensors", "all", "diffusers", seed=2)
    k = write_lora(families.read_lora(d, "tiny-flux"), tmp_path / "k.safetensors")
    one, two = load_transformer("tiny-flux"), load_transformer("tiny-flux")
    flux_lora.load_lora(one, d)
    flux_lora.load_lora(two, k)
    for (name, p), q in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        assert rel(p, q) < 1e-6 if p.abs().sum() else torch.equal(p, q), name


def test_dora_in_kohya_format_needs_whole_fused_layers(tmp_path):
    """DoRA's norms are per output row: a fused kohya layer carries its parts' magnitudes in row order, exactly,
    when every part is adapted (mode all); attention adapts only q, k, v of linear1, which is refused (early, by
    training/config.py, through the same function)."""
    names = flux_lora.lora_names("tiny-flux")
    assert "single_blocks_0_linear1" in kohya_dora_problem(names, "attention")
    assert kohya_dora_problem(names, "all") is None and kohya_dora_problem(names, "all_plus") is None
    path, trained = make_lora(tmp_path / "dora.safetensors", "all", "kohya", dora=True, model_out=True)
    assert load_file(path)["lora_unet_single_blocks_0_linear1.dora_scale"].shape == (448, 1)
    merged = load_transformer("tiny-flux")
    flux_lora.load_lora(merged, path)
    x = transformer_inputs()
    assert rel(ours_out(merged, x), ours_out(trained, x)) < 1e-5  # the file is the trained DoRA
    assert rel(ours_out(load_transformer("tiny-flux"), x), ours_out(trained, x)) > 1e-2
    with pytest.raises(ValueError, match="adapt every part of the fused layer"):
        write_lora(families.read_lora(make_lora(tmp_path / "att.safetensors", "attention", "diffusers", dora=True),
                                      "tiny-flux"), tmp_path / "k.safetensors")


def hand_made(kind: str, g: torch.Generator) -> tuple[dict, dict]:
    """A LoRA state dict (and metadata) in another trainer's layout, on a few tiny-flux layers, rank 4."""
    def pair(out, n_in):
        return torch.randn(4, n_in, generator=g) * 0.1, torch.randn(out, 4, generator=g) * 0.1

    sd, meta = {}, {}
    if kind in ("simpletuner", "ai-toolkit"):  # diffusers/peft names; ai-toolkit: also the modulations, no alpha
        layers = {"transformer_blocks.0.attn.to_q": (64, 64), "transformer_blocks.1.attn.add_v_proj": (64, 64),
                  "transformer_blocks.0.ff.net.0.proj": (256, 64), "single_transformer_blocks.2.proj_mlp": (256, 64),
                  "single_transformer_blocks.1.attn.to_k": (64, 64)}
        if kind == "ai-toolkit":
            layers |= {"transformer_blocks.0.norm1.linear": (384, 64),
                       "single_transformer_blocks.0.norm.linear": (192, 64)}
        for name, shape in layers.items():
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = pair(*shape)
        if kind == "simpletuner":  # alpha 8 at rank 4: scale 2, in diffusers' metadata
            meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
                {"transformer.r": 4, "transformer.lora_alpha": 8,
                 "transformer.target_modules": list(layers)})}
        return sd, meta
    if kind == "mixture":  # kohya-style spelling of diffusers paths (diffusers maps only attention layers of it)
        layers = {"transformer_blocks.0.attn.to_q": (64, 64), "transformer_blocks.1.attn.add_k_proj": (64, 64),
                  "transformer_blocks.0.attn.to_out.0": (64, 64), "single_transformer_blocks.2.attn.to_v": (64, 64)}
        keys = {name: "lora_transformer_" + name.replace(".", "_") for name in layers}
    else:  # kohya's sd-scripts: BFL names, fused qkv with one full-rank down (not block-diagonal), alpha != rank;
        # ComfyUI's own layout: the same BFL paths under `diffusion_model.`, with dots
        layers = {"double_blocks.0.img_attn.qkv": (192, 64), "double_blocks.1.txt_attn.qkv": (192, 64),
                  "double_blocks.0.img_mlp.0": (256, 64), "double_blocks.1.txt_mod.lin": (384, 64),
                  "single_blocks.1.linear2": (64, 320), "single_blocks.0.modulation.lin": (192, 64)}
        keys = {name: ("lora_unet_" + name.replace(".", "_") if kind == "kohya" else "diffusion_model." + name)
                for name in layers}
    for name, shape in layers.items():
        down, up = pair(*shape)
        key = keys[name]
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    return sd, meta


@pytest.mark.parametrize("kind", ["simpletuner", "ai-toolkit", "kohya", "comfyui", "mixture"])
def test_other_trainers_layouts_equal_diffusers(pipe, tmp_path, kind):
    sd, meta = hand_made(kind, torch.Generator().manual_seed(5))
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, str(path), metadata=meta)
    if kind == "comfyui":
        assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in sd
    ours = load_transformer("tiny-flux")
    flux_lora.load_lora(ours, path)
    try:
        assert not load_in_pipe(pipe, path, kind)
        x = transformer_inputs()
        with torch.no_grad():
            expected = pipe.transformer(**x).sample
        assert rel(ours_out(ours, x), expected) < 1e-5
        assert rel(ours_out(load_transformer("tiny-flux"), x), expected) > 1e-3
    finally:
        pipe.unload_lora_weights()


def test_fused_layers_at_full_width_equal_diffusers_conversion(tmp_path):
    """FLUX.1-dev's width (3072; linear1 = 3 x 3072 + 12288 rows), no model needed: a kohya file as kohya writes it
    (full-rank shared down) and one we write (block-diagonal) give per-layer updates equal to what diffusers'
    kohya converter makes of them."""
    g = torch.Generator().manual_seed(0)
    names = flux_lora.lora_names("flux-dev")
    kohya = {"lora_unet_single_blocks_0_linear1": (21504, 3072), "lora_unet_double_blocks_3_img_attn_qkv": (9216,
             3072), "lora_unet_double_blocks_3_txt_attn_qkv": (9216, 3072),
             "lora_unet_single_blocks_37_linear2": (3072, 15360)}
    sd = {}
    for key, (out, n_in) in kohya.items():
        sd |= {f"{key}.lora_down.weight": torch.randn(4, n_in, generator=g) * 0.01,
               f"{key}.lora_up.weight": torch.randn(out, 4, generator=g) * 0.01, f"{key}.alpha": torch.tensor(8.0)}
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    ours_written = write_lora(families.read_lora(tmp_path / "kohya.safetensors", "flux-dev"),
                              tmp_path / "again.safetensors")
    ours_sd = load_file(ours_written)
    assert all(torch.equal(ours_sd[k], sd[k]) for k in sd)  # exact round trip
    # ours, block-diagonal: an attention-mode LoRA on single block 0 and double block 3, rank 2 per layer
    modules = {m: (torch.randn(2, names.layers[m][1], generator=g), torch.randn(names.layers[m][0], 2, generator=g),
                   2.0) for m in names.targets["attention"] if m.startswith(("single_transformer_blocks.0.",
                                                                           "transformer_blocks.3."))}
    block = write_lora(LoRAWeights(modules, {}, names, "model"), tmp_path / "block.safetensors")
    for file in (tmp_path / "kohya.safetensors", block):
        ours, _ = read_lora_file(file, names)
        converted = _convert_kohya_flux_lora_to_diffusers(load_file(file))
        for module, (down, up, alpha) in ours.items():
            a = converted[f"transformer.{module}.lora_A.weight"]
            b = converted[f"transformer.{module}.lora_B.weight"]
            assert torch.allclose(alpha / down.shape[0] * up @ down, b @ a, rtol=1e-5, atol=1e-10), module
        others = {k.rpartition(".lora_")[0].removeprefix("transformer.") for k in converted} - set(ours)
        for module in others:  # rows a writer left zero (a part it did not adapt): we read no LoRA there
            a, b = (converted[f"transformer.{module}.lora_{x}.weight"] for x in "AB")
            assert not (b @ a).any(), module


# ---------------------------------------------------------------------------------------------------
# Training pieces: the flux_shift noise levels, the names, flags


@pytest.mark.parametrize("latent", [(16, 16), (64, 64), (128, 96)])
def test_flux_shift_equals_diffusers_dynamic_shift(latent):
    """flux_shift: u = sigmoid(N(0, 1)) shifted by mu of the image's token count, as FLUX.1's sampler shifts
    (diffusers' calculate_shift + FlowMatchEulerDiscreteScheduler.time_shift, kohya's flux_shift)."""
    noise = NoiseSettings(timestep_sampling="flux_shift", flow_shift=1.0)
    objective = family.objective(noise, "tiny-flux")
    shape = (64, 16, *latent)
    t = objective.draw_times(64, torch.Generator().manual_seed(0), shape)
    u = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(0)))
    config = family.scheduler_config("tiny-flux")
    mu = calculate_shift(latent[0] // 2 * latent[1] // 2, config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    expected = FlowMatchEulerDiscreteScheduler.from_config(config).time_shift(mu, 1.0, u)
    assert torch.allclose(t, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(t, u, atol=1e-3)  # shifted: more noise for more tokens (mu > 0 from 64 tokens)
    assert family.objective(NoiseSettings(timestep_sampling="sigmoid", flow_shift=1.0), "tiny-flux").draw_times(
        64, torch.Generator().manual_seed(0), shape).allclose(u)


def test_objective_guidance_and_flags():
    dev = family.objective(NoiseSettings(timestep_sampling="flux_shift", flow_shift=1.0, guidance_scale=2.5),
                           "tiny-flux")
    assert dev.guidance == 2.5 and dev.tokens((1, 16, 128, 96)) == 64 * 48
    with pytest.raises(ValueError, match="flow_shift"):
        family.objective(NoiseSettings(timestep_sampling="flux_shift", flow_shift=3.0), "tiny-flux")
    assert family.flag_defaults("tiny-flux") == {"prediction_type": "flow", "timestep_sampling": "flux_shift",
                                                 "lora_target_mode": "attention", "flow_shift": 1.0,
                                                 "max_sequence_length": TINY_MAX_SEQUENCE_LENGTH}
    assert family.flag_defaults("/no/such/model")["max_sequence_length"] == 512


def test_names_bases_and_recognition(tiny, tmp_path):
    assert families.name_of("tiny-flux") == "flux" and families.name_of(tiny) == "flux"
    assert family.recognizes(tiny) and not family.recognizes(tmp_path)
    bfl = diffusers_to_bfl(load_transformer("tiny-flux").state_dict())
    save_file({PREFIX + k: v.contiguous() for k, v in bfl.items()}, str(tmp_path / "comfy.safetensors"))
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(tmp_path / "bfl.safetensors"))
    for name in ("comfy", "bfl"):  # recognised by their keys; the scripts need the diffusers folder for the rest
        file = tmp_path / f"{name}.safetensors"
        assert family.recognizes(file) and families.name_of(file) == "flux"
        assert "holds only the transformer" in family.model_problem(file)
        # names from a single file's shapes need 128-wide heads (tiny's are 16): else FLUX.1-dev's
        assert family.lora_names(str(file)).base == "flux-dev"
    dev, schnell = flux_lora.lora_names("flux-dev"), flux_lora.lora_names("flux-schnell")
    assert dev.metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert schnell.metadata["modelspec.architecture"] == "flux-1-schnell/lora"
    assert dev.kohya["single_transformer_blocks.37.proj_mlp"] == ("lora_unet_single_blocks_37_linear1", 9216, 12288)
    assert dev.kohya["transformer_blocks.18.attn.add_k_proj"] == ("lora_unet_double_blocks_18_txt_attn_qkv", 3072,
                                                                  3072)
    assert "norm_out.linear" not in dev.kohya and dev.layers["norm_out.linear"] == (6144, 3072)
    assert len(dev.targets["attention"]) == 19 * 8 + 38 * 3 and flux_lora.names_for(FLUX_DEV, "x") is not dev
    assert family.lora_names(str(tiny)).layers == flux_lora.lora_names("tiny-flux").layers
    assert family.blocks(load_transformer("tiny-flux"))[0].__class__.__name__ == "DoubleStreamBlock"


def test_generate_images_cli(tmp_path, capsys):
    """generate_images.py on tiny-flux: the model's defaults, --true-cfg-scale recorded; refused for SDXL."""
    from generate_images import main

    out = tmp_path / "out"
    argv = ["--pretrained-model", "tiny-flux", "--prompt", PROMPT, "--num-images", "2", "--image-size", "48x64",
            "--num-inference-steps", "2", "--output-dir", str(out), "--device", "cpu"]
    assert main([*argv, "--negative-prompt", "blurry", "--true-cfg-scale", "2.0"]) == 0
    meta = json.loads((out / "00001.json").read_text())
    assert meta["true_cfg_scale"] == 2.0 and meta["guidance_scale"] == 3.5 and meta["sampler"] == "flow_euler"
    assert (out / "00000.png").is_file() and meta["seed"] == 1
    assert main([*argv[:-4], "--output-dir", str(tmp_path / "sdxl"), "--pretrained-model", "tiny",
                 "--true-cfg-scale", "2.0"]) == 2
    assert "--true-cfg-scale 2.0: is for FLUX.1" in capsys.readouterr().err


def test_family_has_every_name_of_the_interface():
    missing = [name for name in families.Family.__annotations__ if not hasattr(family, name)]
    assert not missing and families.get("flux") is family
    assert families.get("sdxl").defaults and families.get("sdxl").predict.__code__.co_varnames[6] == "objective"
