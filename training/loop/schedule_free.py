"""Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled") that switches modes exactly.

schedulefree's optimizer trains the weights y and evaluates x = interpolation of y and its state z; `eval()` and
`train()` move the parameters between the two with a floating-point lerp, which is not exactly invertible. This
subclass keeps y in the optimizer state while in eval mode and puts it back bit for bit in `train()`: validating,
sampling or saving never changes what training computes, and a checkpoint (written in eval mode, so its LoRA is
x) holds y, so a resumed run continues exactly.
"""

import torch
from schedulefree import AdamWScheduleFree as _AdamWScheduleFree


class AdamWScheduleFree(_AdamWScheduleFree):
    @torch.no_grad()
    def eval(self):
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    if "z" in self.state[p]:
                        self.state[p]["y"] = p.detach().clone()
        super().eval()

    @torch.no_grad()
    def train(self):
        super().train()
        for group in self.param_groups:
            for p in group["params"]:
                y = self.state[p].pop("y", None)
                if y is not None:
                    p.copy_(y)

    def load_state_dict(self, state_dict):
        """A checkpoint's state (saved in eval mode, the parameters already loaded with its x) -> train mode, y."""
        super().load_state_dict(state_dict)
        self.train()
