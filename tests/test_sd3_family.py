"""SD 3.5 through the family seam (sd3/family.py): the interface, recognising models, the trainer's defaults, the
training objective's wiring against diffusers' SD3 training helpers, and generate_images.py's path
(`ImageGenerator`) against diffusers' `StableDiffusion3Pipeline` on the tiny model (CPU, fp32).

Tolerances. Objective: exact (torch.equal): the same draws from the same generator through the same float
operations. Images: our 8-bit pixels within 3/255 of the pipeline's float output (the project's bound); both sides
run the same fp32 math (our transformer equals diffusers' to ~1e-7, tests/test_sd3_mmdit.py), so what is measured is
our rounding to 8 bits, ~0.5/255. A LoRA is merged into our weights but a separate peft branch in diffusers (~1e-6
relative). The LoRA here moves pixels by far more than 3/255, so a LoRA left out, or applied twice, fails.
Batching: a batched transformer call rounds differently from single ones; 1/255 allowed (as tests/test_inference.py).
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from safetensors.torch import save_file

import families
from diffusion.flow import shift_sigmas
from lora.files import save_lora
from lora.layer import LoRAConfig, add_lora, lora_parameters
from lora.text_encoders import text_encoder_lora_parameters
from sampling.inference import ImageGenerator
from sd3 import family as sd3
from sd3 import sai
from sd3.tiny import tiny_sd3_path
from training.flags import NoiseSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on a shared CPU
SIZE = {"width": 96, "height": 64, "steps": 4, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd3_path()


def test_every_name_of_the_interface():
    missing = [name for name in families.Family.__annotations__ if not hasattr(sd3, name)]
    assert not missing
    assert families.get("sd3") is sd3 and sd3.DEFAULTS["sampler"] in sd3.SAMPLERS
    assert sd3.DEFAULTS == {"width": 1024, "height": 1024, "steps": 28, "guidance_scale": 7.0, "sampler": "flow_euler"}


def test_recognizes_folders_and_sai_files_by_their_names(tiny, tmp_path):
    assert families.name_of("tiny-sd3") == "sd3" and families.name_of(tiny) == "sd3"
    assert sd3.recognizes(tiny) and sd3.resolve("tiny-sd3") == tiny
    single = tmp_path / "sd3.5_tiny.safetensors"  # an SAI single file: only its tensor names count
    save_file({sai.PREFIXES["transformer"] + "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, single)
    assert sd3.recognizes(single) and families.name_of(single) == "sd3"
    sdxl_file = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, sdxl_file)
    assert not sd3.recognizes(sdxl_file) and families.name_of(sdxl_file) == "sdxl"
    assert "no tokenizers" in sd3.model_problem(single)  # training and sampling need the diffusers folder
    assert sd3.model_problem(tiny) is None and "does not exist" in sd3.model_problem(tmp_path / "nope")
    assert sd3.vae_problem(tiny) is None and sd3.vae_problem(tiny / "vae") is None
    (tmp_path / "vae4").mkdir()
    (tmp_path / "vae4" / "config.json").write_text(json.dumps({"latent_channels": 4}))
    assert "4 latent channels" in sd3.vae_problem(tmp_path / "vae4")


def test_flag_defaults_come_from_the_model(tiny, tmp_path):
    assert sd3.flag_defaults("tiny-sd3") == {"prediction_type": "flow", "timestep_sampling": "logit_normal",
                                             "lora_target_mode": "attention", "flow_shift": 3.0,
                                             "max_sequence_length": 32}  # 256, capped by tiny-sd3's tokenizer
    other = tmp_path / "model"
    (other / "scheduler").mkdir(parents=True)
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 2.5}))
    assert sd3.flag_defaults(other)["flow_shift"] == 2.5  # the folder's scheduler shift
    assert sd3.flag_defaults(other)["max_sequence_length"] == 256  # SD 3.5's, no tokenizer cap
    assert sd3.flag_defaults(tmp_path / "not-there")["flow_shift"] == 3.0  # validation reports the path later


def noise_settings(**kw) -> NoiseSettings:
    defaults = {"prediction_type": "flow", "timestep_sampling": "logit_normal", "flow_shift": 3.0}
    return dataclasses.replace(NoiseSettings(), **(defaults | kw))


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_objective_times_are_diffusers_densities_shifted(scheme):
    """The SD3 LoRA example draws u = compute_density_for_timestep_sampling(...) and shifts it by the scheduler's
    shift (continuously here): our objective's times for the whole 0..999 range are exactly that."""
    kw = dict(logit_mean=0.2, logit_std=1.3, mode_scale=1.1)
    objective = sd3.objective(noise_settings(timestep_sampling=scheme, **kw), "tiny-sd3")
    ours = objective.draw_times(64, torch.Generator().manual_seed(3), (64, 16, 8, 8))
    u = compute_density_for_timestep_sampling(scheme, 64, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(ours, shift_sigmas(u, 3.0))
    # --min/max_timestep squeeze the draws into [min, max + 1] / 1000 before the shift; --flow_shift replaces 3.0
    objective = sd3.objective(noise_settings(timestep_sampling=scheme, min_timestep=200, max_timestep=599,
                                             flow_shift=1.0, **kw))
    ranged = objective.draw_times(64, torch.Generator().manual_seed(3), (64, 16, 8, 8))
    assert torch.equal(ranged, 0.2 + u * (0.6 - 0.2))


def test_objective_sigmoid_target_weights_and_preconditioning():
    g = torch.Generator().manual_seed(0)
    x0, noise, prediction = (torch.randn(4, 16, 4, 4, generator=g) for _ in range(3))
    objective = sd3.objective(noise_settings(timestep_sampling="sigmoid", sigmoid_scale=1.7, flow_shift=1.0))
    t = objective.draw_times(4, torch.Generator().manual_seed(1), x0.shape)
    assert torch.equal(t, torch.sigmoid(1.7 * torch.randn(4, generator=torch.Generator().manual_seed(1))))  # kohya
    s = t.reshape(-1, 1, 1, 1)
    x_t = objective.noisy(x0, noise, t)
    assert torch.equal(x_t, (1.0 - s) * x0 + s * noise)  # the SD3 example's noisy_model_input
    assert torch.equal(objective.target(x0, noise, t), noise - x0) and objective.weights(t) is None
    assert torch.equal(objective.output(prediction, x_t, t), prediction)
    for scheme in ("sigma_sqrt", "cosmap"):
        weighted = sd3.objective(noise_settings(loss_weighting=scheme))
        assert torch.equal(weighted.weights(t), compute_loss_weighting_for_sd3(scheme, t))
    pre = sd3.objective(noise_settings(precondition_outputs=True))  # the example's --precondition_outputs
    assert torch.equal(pre.output(prediction, x_t, t), prediction * (-s) + x_t)
    assert torch.equal(pre.target(x0, noise, t), x0)


def test_predict_is_the_transformer_at_sigma_times_1000(tiny):
    transformer = sd3.load_denoiser("tiny-sd3")
    g = torch.Generator().manual_seed(0)
    x, embeds, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 9, 128, generator=g), \
        torch.randn(2, 96, generator=g)
    t = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        assert torch.equal(sd3.predict(transformer, x, t, embeds, pooled, {}), transformer(x, embeds, pooled, t * 1000))
    assert len(sd3.blocks(transformer)) == 4


def test_text_encoder_flags_and_t5_stays_in_eval_mode():
    encoder = sd3.load_text_encoder("tiny-sd3", max_sequence_length=16)
    embeds, pooled = encoder.encode(["a red apple"])
    assert embeds.shape == (1, 77 + 16, 128) and pooled.shape == (1, 96)
    encoder.train(True)  # what the loop does when a CLIP LoRA trains
    assert encoder.text_encoder.training and encoder.text_encoder_2.training and not encoder.text_encoder_3.training
    no_t5 = sd3.load_text_encoder("tiny-sd3", t5=False, max_sequence_length=16)
    embeds_no_t5, pooled_no_t5 = no_t5.encode(["a red apple"])
    assert no_t5.text_encoder_3 is None and torch.equal(pooled_no_t5, pooled)
    assert torch.equal(embeds_no_t5[:, :77], embeds[:, :77]) and not embeds_no_t5[:, 77:].any()


# ---------------------------------------------------------------------------------------------------
# generate_images.py's path against StableDiffusion3Pipeline


def make_lora(tiny, path, mode="all", seed=1, rank=4, alpha=2.0, text_encoder=True):
    """A 'trained' LoRA: random down and non-zero up weights on the transformer's `mode` layers and, with
    `text_encoder`, on both CLIPs' attention; written in diffusers format."""
    transformer = sd3.load_denoiser(tiny)
    config = LoRAConfig(rank, alpha, 0.0, mode)
    add_lora(transformer, sd3.lora_targets(transformer, config))
    encoder = sd3.load_text_encoder(tiny) if text_encoder else None
    params = lora_parameters(transformer)
    if encoder is not None:
        sd3.text_encoder_lora(encoder, rank, alpha, 0.0, "attention", False)
        params += list(text_encoder_lora_parameters(encoder).values())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return save_lora(transformer, path, config, sd3.lora_names(tiny), format="diffusers", text_encoder=encoder)


def pipeline_pixels(pipe, prompts, seeds, negative, **size) -> np.ndarray:
    """(B, H, W, 3) in 0..255 (float) from the pipeline with one CPU generator per image."""
    images = pipe(prompts, negative_prompt=negative, generator=[torch.Generator().manual_seed(s) for s in seeds],
                  height=size["height"], width=size["width"], num_inference_steps=size["steps"],
                  guidance_scale=size["guidance_scale"], max_sequence_length=32,  # tiny-sd3's T5 length
                  output_type="np").images
    return images * 255.0


def our_pixels(gen, prompts, seeds, negative, **size) -> np.ndarray:
    images = gen.generate_unique_batch(prompts, seeds, negative, **size)
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


@pytest.fixture(scope="module")
def pipe(tiny):
    return StableDiffusion3Pipeline.from_pretrained(tiny, local_files_only=True)


@pytest.mark.parametrize("with_lora", [False, True])
def test_images_match_the_pipeline(tiny, pipe, tmp_path, with_lora):
    """Two prompts at once, one with an empty negative prompt (SD3 encodes it), one with a real one; CFG 5."""
    prompts, negative, seeds = ["a red apple on a table", "a blue cube"], ["", "blurry, dark"], [7, 11]
    loras = [(make_lora(tiny, tmp_path / "lora.safetensors"), 1.0)] if with_lora else []
    gen = ImageGenerator.from_pretrained("tiny-sd3", loras=loras)
    ours = our_pixels(gen, prompts, seeds, negative, **SIZE)
    if with_lora:
        pipe.load_lora_weights(str(loras[0][0]))  # transformer and both CLIPs
    try:
        ref = pipeline_pixels(pipe, prompts, seeds, negative, **SIZE)
    finally:
        pipe.unload_lora_weights()
    diff = np.abs(ours - ref).max()
    assert ours.shape == (2, 64, 96, 3) and diff <= 3.0, diff
    if with_lora:  # the LoRA matters far more than the tolerance
        base = our_pixels(ImageGenerator.from_pretrained("tiny-sd3"), prompts, seeds, negative, **SIZE)
        assert np.abs(ours - base).max() > 30


def test_batch_size_invariance_and_seeds(tiny):
    gen = ImageGenerator.from_pretrained("tiny-sd3")
    size = {**SIZE, "steps": 3}
    batched = gen.generate("a green ring", 3, seed=5, batch_size=3, negative_prompt="blurry", **size)
    single = [gen.generate_unique_batch(["a green ring"], [5 + i], ["blurry"], **size)[0] for i in range(3)]
    a, b = (np.stack([np.asarray(im, dtype=np.int16) for im in ims]) for ims in (batched, single))
    assert np.abs(a - b).max() <= 1
    assert np.abs(a[0] - a[1]).max() > 10  # the seeds differ


def test_guidance_one_and_negative_prompts(tiny, pipe):
    """guidance <= 1 skips CFG, as the pipeline; `negative` encodes every negative prompt, the empty one too."""
    gen = ImageGenerator.from_pretrained("tiny-sd3")
    size = {**SIZE, "guidance_scale": 1.0}
    ours = our_pixels(gen, ["a red apple"], [3], [""], **size)
    assert np.abs(ours - pipeline_pixels(pipe, ["a red apple"], [3], [""], **size)).max() <= 3.0
    embeds, pooled = gen.text_encoder.encode(["x"])
    neg_embeds, neg_pooled = sd3.negative(gen.text_encoder, [""], embeds, pooled)
    with torch.no_grad():
        ref_embeds, _, ref_pooled, _ = pipe.encode_prompt("", "", "", do_classifier_free_guidance=False,
                                                          max_sequence_length=32)  # tiny-sd3's T5 length
    assert torch.equal(neg_embeds, ref_embeds) and torch.equal(neg_pooled, ref_pooled) and neg_pooled.any()
