"""diffusion/flow.py against diffusers: the training helpers of training_utils.py and the SD3 LoRA example, and
FlowMatchEulerDiscreteScheduler's set_timesteps and step.

Tolerance: exact (torch.equal) wherever both sides run the same float operations in the same order (densities
from the same generator, schedules, Euler steps); the SD3 example's noising is written the same way and compared
exactly too.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from diffusion import flow

SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {  # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}  # fmt: skip


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_densities_equal_diffusers(scheme):
    kw = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ours = flow.sample_density(scheme, 64, torch.Generator().manual_seed(5), **kw)
    ref = compute_density_for_timestep_sampling(scheme, 64, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(ours, ref)
    assert ours.dtype == torch.float32 and ((ours >= 0) & (ours <= 1)).all()


def test_sigmoid_density_is_a_scaled_logit_normal():
    """kohya's sigmoid(scale * randn): the logit of the draws is normal with std = scale."""
    u = flow.sample_density("sigmoid", 20000, torch.Generator().manual_seed(0), sigmoid_scale=2.0)
    logits = torch.logit(u.double())
    assert abs(logits.mean().item()) < 0.05 and abs(logits.std().item() - 2.0) < 0.05
    with pytest.raises(ValueError, match="'beta' is not supported"):
        flow.sample_density("beta", 4)


def test_noising_target_and_preconditioning_as_the_sd3_example():
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(3, 16, 8, 8, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.1, 0.5, 0.97])
    s = sigmas.reshape(-1, 1, 1, 1)  # the example's get_sigmas(..., n_dim=4)
    x_t = flow.noisy_input(x0, noise, sigmas)
    assert torch.equal(x_t, (1.0 - s) * x0 + s * noise)
    assert torch.equal(flow.velocity_target(x0, noise), noise - x0)
    assert torch.equal(flow.precondition_outputs(pred, x_t, sigmas), pred * (-s) + x_t)
    # the exact velocity makes the preconditioned output x0
    torch.testing.assert_close(flow.precondition_outputs(noise - x0, x_t, sigmas), x0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_equal_diffusers(scheme):
    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.99]).reshape(-1, 1, 1, 1)
    assert torch.equal(flow.loss_weights(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_shifts():
    s = torch.linspace(0.01, 1, 50)
    shifted = flow.shift_sigmas(s, 3.0)
    assert (shifted >= s).all() and shifted[-1] == 1.0
    assert torch.allclose(flow.time_shift(s.double(), np.log(3.0)), flow.shift_sigmas(s.double(), 3.0))  # e^mu = shift
    assert flow.flux_mu(256) == pytest.approx(0.5) and flow.flux_mu(4096) == pytest.approx(1.15)
    assert flow.flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


def test_discrete_training_sigmas_are_the_schedulers_table():
    """The SD3 / FLUX LoRA examples: indices = (u * T).to(torch.int64), sigmas = scheduler.sigmas at those timesteps."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = flow.sample_density("logit_normal", 256, torch.Generator().manual_seed(1))
    indices = (u * 1000).to(torch.int64)
    assert torch.equal(flow.training_sigmas(u, 3.0, num_train_timesteps=1000), scheduler.sigmas[indices])
    assert torch.equal(flow.training_sigmas(u, 3.0, 1000) * 1000, scheduler.timesteps[indices])
    assert torch.equal(flow.training_sigmas(u, 3.0), flow.shift_sigmas(u, 3.0))  # continuous


def diffusers_schedule(cfg, n, mu=None, sigmas=None):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    scheduler.set_timesteps(n, sigmas=sigmas, mu=mu)
    return scheduler


@pytest.mark.parametrize("n", [1, 4, 28, 50])
def test_sd35_schedule(n):
    sigmas, timesteps = flow.flow_sigmas(SD35_SCHEDULER, n)
    ref = diffusers_schedule(SD35_SCHEDULER, n)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref.timesteps)
    assert sigmas.shape == (n + 1,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6000])
def test_flux_schedule_dynamic_shift(seq_len):
    n = 20
    mu = flow.flux_mu(seq_len)
    base = np.linspace(1.0, 1 / n, n)  # what FluxPipeline passes
    sigmas, timesteps = flow.flow_sigmas(FLUX_SCHEDULER, n, image_seq_len=seq_len, sigmas=base)
    ref = diffusers_schedule(FLUX_SCHEDULER, n, mu=mu, sigmas=base)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref.timesteps)
    sigmas, timesteps = flow.flow_sigmas(FLUX_SCHEDULER, n, image_seq_len=seq_len)  # the scheduler's own spacing
    ref = diffusers_schedule(FLUX_SCHEDULER, n, mu=mu)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref.timesteps)


def test_shift_terminal_and_errors():
    cfg = {**SD35_SCHEDULER, "shift_terminal": 0.1}
    sigmas, timesteps = flow.flow_sigmas(cfg, 10)
    ref = diffusers_schedule(cfg, 10)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref.timesteps)
    assert sigmas[-2].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported"):
        flow.flow_sigmas({**SD35_SCHEDULER, "use_karras_sigmas": True}, 10)
    with pytest.raises(ValueError, match="pass image_seq_len"):
        flow.flow_sigmas(FLUX_SCHEDULER, 10)


def velocity_model(x, t):
    """A smooth nonlinear stand-in for a transformer, depending on x and t."""
    return torch.tanh(x * 0.7) + 0.001 * t * torch.sin(x)


def test_euler_equals_scheduler_step_by_step():
    n = 8
    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    sigmas, timesteps = flow.flow_sigmas(SD35_SCHEDULER, n)
    seen = []
    ours = flow.flow_euler(velocity_model, x, sigmas, timesteps=timesteps, callback=lambda d: seen.append(d["x"]))

    scheduler = diffusers_schedule(SD35_SCHEDULER, n)
    ref = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        assert torch.equal(seen[i], ref), i  # every step, not only the end
        ref = scheduler.step(velocity_model(ref, t), t, ref).prev_sample
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="len"):
        flow.flow_euler(velocity_model, x, sigmas[:-1], timesteps=timesteps)


def test_euler_with_the_exact_velocity_reaches_x0():
    """On a straight path x_t = (1 - s) x0 + s e the velocity e - x0 is constant: Euler lands on x0 exactly."""
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    sigmas, timesteps = flow.flow_sigmas(SD35_SCHEDULER, 5)
    out = flow.flow_euler(lambda x, t: e - x0, e, sigmas, timesteps=timesteps)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
