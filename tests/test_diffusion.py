"""Noising process vs diffusers' DDPMScheduler; Min-SNR weights vs the paper's formula; EMA."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion.ddpm import add_noise, alphas_cumprod, min_snr_weights, v_target
from sdxl.configs import SDXL_SCHEDULER_CONFIG
from training.loop.ema import EMA


@pytest.fixture
def ddpm():
    return DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)


def test_schedule_and_noising_match_diffusers(ddpm):
    ac = alphas_cumprod()
    assert torch.equal(ac, ddpm.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(add_noise(x0, noise, t, ac), ddpm.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_target(x0, noise, t, ac), ddpm.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_min_snr_weights():
    ac = alphas_cumprod()
    t = torch.tensor([0, 10, 100, 400, 700, 999])
    gamma = 5.0
    # Hang et al. 2023: weight_x0 = min(SNR, gamma); eps loss = SNR * x0 loss; v loss = (SNR + 1) * x0 loss.
    snr = [ac[i].item() / (1 - ac[i].item()) for i in t]
    expected_eps = torch.tensor([min(s, gamma) / s for s in snr])
    expected_v = torch.tensor([min(s, gamma) / (s + 1) for s in snr])
    torch.testing.assert_close(min_snr_weights(t, ac, gamma, "epsilon"), expected_eps, rtol=1e-5, atol=0)
    torch.testing.assert_close(min_snr_weights(t, ac, gamma, "v_prediction"), expected_v, rtol=1e-5, atol=0)
    assert min_snr_weights(t, ac, gamma, "epsilon")[0] < 1e-2  # t=0: SNR ~ 1175, weight 5/1175
    assert min_snr_weights(t, ac, gamma, "epsilon")[-1] == 1.0  # t=999: SNR < gamma, weight 1


def test_ema():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, decay=0.9)
    for value in (1.0, 2.0):
        with torch.no_grad():
            p.fill_(value)
        ema.update()
    expected = 0.9 * (0.9 * 0 + 0.1 * 1.0) + 0.1 * 2.0
    torch.testing.assert_close(ema.shadow["p"], torch.full((3,), expected))
    with ema.applied():
        assert torch.allclose(p, torch.full((3,), expected))
    assert torch.equal(p.detach(), torch.full((3,), 2.0))
