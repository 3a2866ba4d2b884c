"""Exponential moving average of the LoRA weights (the only trainable parameters).

`shadow = decay * shadow + (1 - decay) * param` after every optimizer step, in fp32. The averaged
weights are used for sample images and for the exported LoRA when `--use_ema` is on.
"""

from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        self.params = named_params
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One fused update of every tensor (SDXL "all": 1,000+ LoRA tensors; a Python loop would launch each)."""
        torch._foreach_lerp_(list(self.shadow.values()), [self.params[n].detach().float() for n in self.shadow],
                             1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(sd)
        if missing:
            raise ValueError(f"EMA state does not match the LoRA parameters: {sorted(missing)[:3]}")
        for n, t in sd.items():
            self.shadow[n].copy_(t)

    @contextmanager
    def applied(self):
        """Temporarily put the averaged weights into the model (for samples and export)."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])
