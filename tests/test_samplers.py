"""Samplers and schedules vs diffusers' schedulers (the reference), on the random tiny UNet, CPU, fp32.

Each sampler runs a full loop and is compared with the diffusers scheduler of the same kind, built
from the same config and driving the same UNet by hand (`scale_model_input`, `step`), from the same
initial noise and, for the ancestral sampler, the same seeded per-step noise.

Tolerance for final latents: max abs diff < 1e-4. The random tiny UNet gives final latents of
magnitude about 30, so this is ~3e-6 relative, a few float32 ulps of the largest entries (measured:
6e-6 to 3e-5). Both sides compute the same formulas in float32 on the same UNet; they differ only
in op order and in where the scalar arithmetic happens (we keep sigma-space scalars in float64 and
work in sigma form; diffusers' DDIM and DPM-Solver work in alpha form), i.e. rounding at the 1e-7
level per step, carried through 10-12 UNet calls. Schedules (timesteps, sigmas, initial noise
scale) are compared exactly.
"""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from diffusion.samplers import (
    SAMPLERS,
    alphas_cumprod,
    get_sampler,
    init_noise_sigma,
    karras_sigmas,
    schedule_from_config,
    sigma_table,
    sigma_to_t,
)
from sdxl.configs import SDXL_SCHEDULER_CONFIG

TOL = 1e-4
SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
KARRAS_IN_DIFFUSERS = {"euler", "dpmpp_2m"}  # EulerAncestral and DDIM have no use_karras_sigmas


@pytest.fixture(scope="module")
def unet(tiny_random_dir):
    from sdxl.loading import load_unet

    return load_unet(tiny_random_dir)


def conditioning(batch: int, seed: int = 0) -> dict:
    """Random prompt embeddings of the tiny model's shapes: context 96, pooled 32, 6 time ids."""
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn((batch, 77, 96), generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn((batch, 32), generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(batch, 6),
        },
    }


def model_fn(unet):
    def model(x, t, encoder_hidden_states, added_cond_kwargs):
        return unet(x, t, encoder_hidden_states, added_cond_kwargs)

    return model


def diffusers_loop(unet, scheduler, steps, latents, cond, generator=None):
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    kw = {"generator": generator} if generator is not None else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(latents, t)
            out = unet(inp, t, cond["encoder_hidden_states"], cond["added_cond_kwargs"])
            latents = scheduler.step(out, t, latents, **kw).prev_sample
    return latents


def config(spacing, karras=False, **extra):
    return dict(SDXL_SCHEDULER_CONFIG, timestep_spacing=spacing, use_karras_sigmas=karras, **extra)


CASES = [
    (name, karras, spacing)
    for name in SAMPLERS
    for karras in ([False, True] if name in KARRAS_IN_DIFFUSERS else [False])
    for spacing in ("leading", "trailing")
] + [("euler", False, "linspace"), ("dpmpp_2m", False, "linspace")]


@pytest.mark.parametrize("name,karras,spacing", CASES)
def test_sampler_matches_diffusers(unet, name, karras, spacing):
    # DDIMScheduler steps from t to t - T // n: the next timestep for leading spacing (any n), but for
    # trailing only when n divides T (see ddim's docstring), hence 10 steps there.
    steps = 10 if (name, spacing) == ("ddim", "trailing") else 12
    cfg = config(spacing, karras)
    cond = conditioning(1)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))

    ref = diffusers_loop(unet, SCHEDULERS[name].from_config(cfg), steps, noise, cond,
                         generator=torch.Generator().manual_seed(123) if name == "euler_a" else None)

    fn, _ = get_sampler(name)
    sigmas, timesteps = schedule_from_config(cfg, steps, karras=karras, sampler=name)
    x = noise * init_noise_sigma(sigmas, name, spacing)
    ours = fn(model_fn(unet), x, sigmas, timesteps=timesteps, extra_args=cond,
              generators=[torch.Generator().manual_seed(123)])
    diff = (ours - ref).abs().max().item()
    print(f"{name} karras={karras} {spacing}: max abs diff {diff:.2e}, max abs ref {ref.abs().max():.2f}")
    assert ref.abs().max() > 0.1  # a real result, not all zeros
    assert diff < TOL


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_schedules_equal_diffusers(name, spacing):
    ac = alphas_cumprod()
    for karras in [False, True] if name in KARRAS_IN_DIFFUSERS else [False]:
        cfg = config(spacing, karras)
        scheduler = SCHEDULERS[name].from_config(cfg)
        for steps in [1, 2, 3, 7, 10, 12, 20, 25, 30, 48, 50, 61, 100]:
            if karras and steps == 1:
                continue
            scheduler.set_timesteps(steps)
            sigmas, timesteps = schedule_from_config(cfg, steps, karras=karras, sampler=name)
            assert torch.equal(timesteps, scheduler.timesteps.float()), (karras, steps)
            if name == "ddim":  # DDIM keeps no sigmas: alphas_cumprod at its timesteps, then alphas_cumprod[0].
                # Trailing n=61 gives a spurious last timestep -1 (numpy.arange length); DDIMScheduler would
                # index alphas_cumprod[-1] (t=999) there, we clamp to t=0 as the Euler schedulers' interp does.
                expected = sigma_table(ac)[torch.cat([scheduler.timesteps, torch.tensor([0])]).clamp(min=0)]
            else:
                expected = scheduler.sigmas
            assert torch.equal(sigmas, expected), (karras, steps)
            # For DDIM and DPM-Solver diffusers starts from N(0, 1) in alpha form, i.e. this in sigma form.
            start = scheduler.init_noise_sigma if name in ("euler", "euler_a") else (sigmas[0] ** 2 + 1) ** 0.5
            assert init_noise_sigma(sigmas, name, spacing) == float(start)


def test_karras_and_sigma_to_t():
    ac = alphas_cumprod()
    s = karras_sigmas(0.0292, 14.6146, 10)
    assert s[0].item() == pytest.approx(14.6146) and s[-1].item() == pytest.approx(0.0292)
    assert (s[1:] < s[:-1]).all()
    table = sigma_table(ac)
    t = torch.tensor([0.0, 1.0, 499.0, 999.0])
    assert torch.allclose(sigma_to_t(table[t.long()], ac), t.double(), atol=1e-3)


def test_ancestral_batch_equals_single_images(unet):
    """Image i of a batch uses only generator i: a batch of 2 equals two batches of 1."""
    cfg, steps = config("leading"), 8
    sigmas, timesteps = schedule_from_config(cfg, steps, sampler="euler_a")
    init = init_noise_sigma(sigmas, "euler_a", "leading")
    cond = conditioning(2)
    seeds = [11, 12]
    x = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds]) * init
    both = SAMPLERS["euler_a"](model_fn(unet), x, sigmas, timesteps=timesteps, extra_args=cond,
                               generators=[torch.Generator().manual_seed(s + 1000) for s in seeds])
    for i, s in enumerate(seeds):
        cond_i = {"encoder_hidden_states": cond["encoder_hidden_states"][i : i + 1],
                  "added_cond_kwargs": {k: v[i : i + 1] for k, v in cond["added_cond_kwargs"].items()}}
        one = SAMPLERS["euler_a"](model_fn(unet), x[i : i + 1], sigmas, timesteps=timesteps, extra_args=cond_i,
                                  generators=[torch.Generator().manual_seed(s + 1000)])
        # Batched vs single UNet calls differ by float rounding only (BLAS blocks the batch differently):
        # relative u = 6e-8 per op, adding up over the ~60 ops of the UNet's longest path (~4e-6 per call)
        # and over the 8 steps (~3e-5); bound the largest difference relative to the values' scale.
        assert (both[i : i + 1] - one).abs().max() < 1e-4 * one.abs().max()
    with pytest.raises(ValueError, match="one per image"):
        SAMPLERS["euler_a"](model_fn(unet), x, sigmas, timesteps=timesteps, extra_args=cond,
                            generators=[torch.Generator()])


def test_guidance_lives_in_the_model_function(unet):
    """CFG is done by the caller's model function; with a seeded generator euler_a still matches
    diffusers' loop doing the same guidance (noise is drawn per image, not per cond/uncond half)."""
    cfg, steps, scale = config("leading"), 8, 5.0
    cond, uncond = conditioning(1, seed=1), conditioning(1, seed=2)
    both = {"encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]]),
            "added_cond_kwargs": {k: torch.cat([uncond["added_cond_kwargs"][k], v])
                                  for k, v in cond["added_cond_kwargs"].items()}}

    def guided(x, t, **_):
        u, c = unet(torch.cat([x, x]), t, both["encoder_hidden_states"], both["added_cond_kwargs"]).chunk(2)
        return u + scale * (c - u)

    class GuidedUNet:  # the same guidance in diffusers' calling convention
        def __call__(self, x, t, *_):
            return guided(x, t)

    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    ref = diffusers_loop(GuidedUNet(), EulerAncestralDiscreteScheduler.from_config(cfg), steps, noise, cond,
                         generator=torch.Generator().manual_seed(4))
    sigmas, timesteps = schedule_from_config(cfg, steps, sampler="euler_a")
    ours = SAMPLERS["euler_a"](guided, noise * init_noise_sigma(sigmas, "euler_a", "leading"), sigmas,
                               timesteps=timesteps, generators=[torch.Generator().manual_seed(4)])
    assert (ours - ref).abs().max() < TOL


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_v_prediction(unet, name):
    cfg, steps = config("trailing", prediction_type="v_prediction"), 10
    cond = conditioning(1)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    ref = diffusers_loop(unet, SCHEDULERS[name].from_config(cfg), steps, noise, cond)
    sigmas, timesteps = schedule_from_config(cfg, steps, sampler=name)
    ours = SAMPLERS[name](model_fn(unet), noise * init_noise_sigma(sigmas, name, "trailing"), sigmas,
                          timesteps=timesteps, extra_args=cond, prediction_type="v_prediction")
    assert (ours - ref).abs().max() < TOL


def test_ddim_is_euler_on_the_same_schedule(unet):
    """In sigma form, DDIM (eta=0) and Euler are the same update; with a final sigma of 0 they agree."""
    sigmas, timesteps = schedule_from_config(config("leading"), 6, sampler="euler")
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * 14.0
    args = {"timesteps": timesteps, "extra_args": conditioning(1)}
    a, b = SAMPLERS["euler"](model_fn(unet), x, sigmas, **args), SAMPLERS["ddim"](model_fn(unet), x, sigmas, **args)
    assert (a - b).abs().max() < 1e-5


def test_callback_and_names(unet):
    seen = []
    sigmas, timesteps = schedule_from_config(config("leading"), 3, sampler="dpmpp_2m_karras")
    SAMPLERS["dpmpp_2m"](model_fn(unet), torch.randn((1, 4, 8, 8)), sigmas, timesteps=timesteps,
                         extra_args=conditioning(1), callback=lambda d: seen.append((d["i"], d["sigma"])))
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == sigmas[0].item()

    assert get_sampler("euler") == (SAMPLERS["euler"], False)
    assert get_sampler("dpmpp_2m_karras") == (SAMPLERS["dpmpp_2m"], True)
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*euler_a_karras"):
        get_sampler("heun")
    with pytest.raises(ValueError, match="unknown sampler"):
        schedule_from_config(SDXL_SCHEDULER_CONFIG, 10, sampler="lms")
    with pytest.raises(ValueError, match="timestep_spacing"):
        schedule_from_config(config("uniform"), 10)
    with pytest.raises(ValueError, match="prediction_type"):
        SAMPLERS["euler"](model_fn(unet), torch.randn((1, 4, 8, 8)), sigmas, timesteps=timesteps,
                          extra_args=conditioning(1), prediction_type="sample")
