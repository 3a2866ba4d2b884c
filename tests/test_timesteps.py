"""Timestep sampling and loss weights of the DDPM objective (diffusion/ddpm.py), noise variants
(training/loop/noise.py), each against its formula or diffusers' implementation; the validation loss stays
unweighted at fixed timesteps."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from diffusion.ddpm import DDPMObjective, add_noise, alphas_cumprod, debiased_weights
from sdxl.configs import SDXL_SCHEDULER_CONFIG
from training.flags import NoiseSettings
from training.loop.loss import diffusion_loss, draw_times_and_noise, validation_loss, weighted
from training.loop.noise import draw_noise, multires_noise


def objective(lo=0, hi=999, sampling="uniform", mean=0.0, std=1.0, scale=1.29, weighting="none", gamma=5.0):
    return DDPMObjective(alphas_cumprod(), lo, hi, sampling, mean, std, scale, "epsilon", weighting, gamma)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["logit_normal", "mode", "mode_negative"])
def test_timestep_sampling_matches_diffusers_density(kind):
    """Same generator: our timesteps == (u * 1000).to(torch.int64) of diffusers' SD3 density, exactly (integers)."""
    scale = -0.5 if kind == "mode_negative" else 1.29
    kind = kind.replace("_negative", "")
    u = compute_density_for_timestep_sampling(kind, 4096, logit_mean=0.3, logit_std=0.8, mode_scale=scale,
                                              generator=gen(3))
    ours = objective(sampling=kind, mean=0.3, std=0.8, scale=scale).draw_times(4096, gen(3))
    assert torch.equal(ours, (u * 1000).to(torch.int64).clamp(0, 999))
    # a narrower range: t = lo + floor(u (hi - lo + 1))
    ours = objective(200, 799, kind, 0.3, 0.8, scale).draw_times(4096, gen(3))
    assert torch.equal(ours, 200 + (u * 600).to(torch.int64).clamp(0, 599))
    assert ours.min() >= 200 and ours.max() <= 799


def test_logit_normal_favours_the_middle_and_uniform_is_randint():
    t = objective(sampling="logit_normal").draw_times(20000, gen(1)).float()
    # sigmoid(N(0, 1)) has mean 1/2 and std ~0.2085: of t, ~500 and ~208.5 (+- a few sampling errors)
    assert abs(t.mean() - 499.5) < 6 and abs(t.std() - 208.5) < 5
    uniform = objective(10, 20).draw_times(64, gen(2))
    assert torch.equal(uniform, torch.randint(10, 21, (64,), generator=gen(2)))


def pyramid_noise_like(noise, g, iterations, discount):
    """kohya-ss/sd-scripts library/custom_train_functions.py, with its random.random() drawn from `g` instead."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = torch.rand((), generator=g).item() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=g)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_multires_noise_matches_kohya(iterations):
    noise = torch.randn(3, 4, 16, 24, generator=gen(5))
    ours = multires_noise(noise, iterations, 0.3, gen(6))
    ref = pyramid_noise_like(noise.clone(), gen(6), iterations, 0.3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert abs(ours.std().item() - 1.0) < 1e-5


def test_input_perturbation_changes_only_the_input():
    """x_t is made with noise + gamma * fresh noise (Ning et al. 2023); the target stays the plain noise."""
    recipe = NoiseSettings(input_perturbation=0.1)
    noise, input_noise = draw_noise((2, 4, 8, 8), recipe, gen(7))
    g = gen(7)
    plain = torch.randn((2, 4, 8, 8), generator=g)
    extra = torch.randn((2, 4, 8, 8), generator=g)
    assert torch.equal(noise, plain) and torch.equal(input_noise, plain + 0.1 * extra)

    ac, t = alphas_cumprod(), torch.tensor([100, 900])
    x0 = torch.randn(2, 4, 8, 8, generator=gen(8))
    seen = []

    def predict(x, t):
        seen.append(x)
        return 0.5 * x

    loss = diffusion_loss(predict, objective(), x0, t, noise, input_noise=input_noise)
    x_t = add_noise(x0, input_noise, t, ac)
    torch.testing.assert_close(seen[0], x_t, rtol=0, atol=0)
    torch.testing.assert_close(loss, ((0.5 * x_t - noise) ** 2).mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)


def test_each_image_draws_from_its_own_key_whatever_the_batch():
    """An image's time and noise depend on its noise key alone: a step's 4 images drawn as one micro-batch equal
    them drawn 2 by 2 (two processes, or two micro-batches), with every noise variant on."""
    recipe = NoiseSettings(timestep_sampling="mode", noise_offset=0.05, multires_noise_iterations=4,
                           input_perturbation=0.1)
    ddpm = objective(sampling="mode")
    keys = torch.tensor([[0, 7, p] for p in range(4)])
    whole = draw_times_and_noise(0, keys, (4, 4, 8, 8), ddpm, recipe)
    parts = [draw_times_and_noise(0, keys[i : i + 2], (2, 4, 8, 8), ddpm, recipe) for i in (0, 2)]
    for k in range(3):
        assert torch.equal(whole[k], torch.cat([parts[0][k], parts[1][k]]))
    other = draw_times_and_noise(1, keys, (4, 4, 8, 8), ddpm, recipe)  # another seed: other draws
    assert not torch.equal(whole[1], other[1])


def test_debiased_weights_are_one_over_sqrt_snr_and_the_same_objective_for_v():
    """Weights vs SNR from diffusers' DDPMScheduler; the weighted epsilon and v losses of one prediction agree."""
    sched = DDPMScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "_class_name": "DDPMScheduler"})
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    t = torch.tensor([0, 10, 250, 500, 999])
    ac = alphas_cumprod()
    torch.testing.assert_close(debiased_weights(t, ac, "epsilon"), 1 / snr[t].sqrt(), rtol=1e-5, atol=0)
    x0, eps = torch.randn(5, 4, 4, 4, generator=gen(9)), torch.randn(5, 4, 4, 4, generator=gen(10))
    x0_hat = x0 + 0.1 * torch.randn(5, 4, 4, 4, generator=gen(11))  # some model's estimate
    a = ac[t].reshape(-1, 1, 1, 1).double()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    v, v_hat = a.sqrt() * eps - (1 - a).sqrt() * x0, a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    eps_loss = ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3)) * debiased_weights(t, ac, "epsilon").double()
    v_loss = ((v_hat - v) ** 2).mean(dim=(1, 2, 3)) * debiased_weights(t, ac, "v_prediction").double()
    torch.testing.assert_close(v_loss, eps_loss, rtol=1e-4, atol=0)  # float32 weights: ~1e-6 apart


def test_weighted_loss_is_the_plain_loss_times_the_weights():
    ac, t = alphas_cumprod(), torch.tensor([5, 400, 990])
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen(12)), torch.randn(3, 4, 8, 8, generator=gen(13))

    def predict(x, t):
        return 0.9 * x

    plain = diffusion_loss(predict, objective(), x0, t, noise)
    debiased = weighted(plain, objective(weighting="debiased"), t)
    snr = ac[t] / (1 - ac[t])
    torch.testing.assert_close(debiased, plain / snr.sqrt(), rtol=1e-6, atol=0)
    min_snr = weighted(plain, objective(weighting="min_snr", gamma=5.0), t)
    torch.testing.assert_close(min_snr, plain * torch.clamp(snr, max=5.0) / snr, rtol=1e-6, atol=0)


def test_validation_loss_is_unweighted_at_fixed_timesteps():
    """Any weighting gives the same validation loss: the plain MSE at linspace(min, max, 5) and fixed noise."""
    batch = {"original_size": torch.tensor([[64, 64]]), "crop_top_left": torch.tensor([[0, 0]]),
             "target_size": torch.tensor([[64, 64]]), "keys": ["a.png"]}

    class Val:
        def iter_epoch(self, epoch):
            return iter([batch])

    x0 = torch.randn(1, 4, 8, 8, generator=gen(14))
    timesteps = []

    def predict(batch, embeds, pooled):
        def call(x, t):
            timesteps.append(int(t[0]))
            return 0.9 * x
        return call

    losses = [validation_loss(lambda b: (x0, None, None), predict, objective(100, 900, weighting=w), Val(), seed=0)
              for w in ("none", "min_snr", "debiased")]
    assert losses[0] == losses[1] == losses[2] and math.isfinite(losses[0])
    assert timesteps[:5] == [100, 300, 500, 700, 900]


def test_validation_loss_is_the_same_however_the_images_are_batched():
    """Each validation image's noise comes from (seed, time, its path): one batch of 3 or batches of 2 and 1 in
    another order give the same loss (to float rounding); another seed gives another."""
    x0 = {name: torch.randn(1, 4, 8, 8, generator=gen(20 + i)) for i, name in enumerate(("a.png", "b.png", "c.png"))}

    class Val:
        def __init__(self, *batches):
            self.batches = [{"keys": list(b)} for b in batches]

        def iter_epoch(self, epoch):
            return iter(self.batches)

    def encode(batch):
        return torch.cat([x0[k] for k in batch["keys"]]), None, None

    def predict(batch, embeds, pooled):
        return lambda x, t: 0.9 * x

    def loss(val, seed=0):
        return validation_loss(encode, predict, objective(100, 900), val, seed=seed)

    one = loss(Val(("a.png", "b.png", "c.png")))
    assert abs(loss(Val(("c.png", "a.png"), ("b.png",))) - one) <= 1e-6 * one
    assert abs(loss(Val(("a.png", "b.png", "c.png")), seed=1) - one) > 1e-4 * one
