"""CLIP score: how well each generated image agrees with its prompt (Hessel et al. 2021, "CLIPScore").

    score(image, prompt) = 100 * cos(E_image, E_prompt)        (E: CLIP's projected embeddings)
    CLIP score of a set  = max(mean of the scores, 0)

which is torchmetrics' `CLIPScore` definition (Hessel et al. clip each image's cosine at 0 and scale by 2.5;
with a real CLIP model the cosines are positive, so the two differ only by that scale). We do not call
torchmetrics' CLIPScore itself: it accepts only Hub model names (or a callable), and with transformers 5
its `get_image_features` call returns an output object it cannot use. The tests check our numbers against
its functional form on the same model, images and prompts.

The model is a transformers `CLIPModel` folder (e.g. a local copy of openai/clip-vit-large-patch14); it is
loaded with `local_files_only=True`, so nothing is downloaded. Images go through the folder's own image
processor (CLIP: shortest side resized to 224 with bicubic, center crop, CLIP mean/std), or, for a folder
without preprocessor_config.json, a CLIPImageProcessor built here at the model's image size with CLIP's
mean/std. Prompts are tokenized with the folder's tokenizer and truncated to the text model's length (77).
"""

from pathlib import Path

import torch
from PIL import Image

from common.errors import EvalError


class ClipScorer:
    """A CLIP model, its tokenizer and image processor; `cosines(images, prompts)` per image."""

    def __init__(self, model, tokenizer, image_processor, device: str | torch.device = "cpu", name: str = ""):
        self.model = model.eval().to(device)
        self.tokenizer, self.image_processor, self.device, self.name = tokenizer, image_processor, device, name
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ClipScorer":
        """Load a transformers CLIP folder (no download); EvalError naming what is missing otherwise."""
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = Path(folder).expanduser().absolute()
        hint = "give a local transformers CLIP folder, e.g. `hf download openai/clip-vit-large-patch14 --local-dir DIR`"
        if not (path / "config.json").is_file():
            raise EvalError(f"--clip-model {path} is not a transformers model folder (no config.json); {hint}")
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
        except Exception as error:
            raise EvalError(f"--clip-model {path} does not load as a CLIPModel ({type(error).__name__}: "
                            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); {hint}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as error:
            raise EvalError(f"--clip-model {path} has no usable tokenizer ({type(error).__name__}); {hint}") from None
        if (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file():
            image_processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        else:
            size = int(model.config.vision_config.image_size)
            image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size,
                                                                                          "width": size})
        return cls(model, tokenizer, image_processor, device, name=str(path))

    @torch.no_grad()
    def cosines(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """cos(E_image, E_prompt) of each (image, prompt) pair: float32 (N,) on the CPU."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model(input_ids=text["input_ids"].to(self.device),
                         attention_mask=text["attention_mask"].to(self.device),
                         pixel_values=pixels.to(self.device, self.model.dtype))
        # CLIPModel.forward returns both embeddings L2-normalized, in transformers 4 and 5 alike
        return (out.image_embeds * out.text_embeds).sum(dim=-1).float().cpu()


def clip_score(cosines: torch.Tensor) -> float:
    """The CLIP score of a set from its per-image cosines: max(100 * mean cosine, 0), as torchmetrics."""
    return max(100.0 * float(cosines.double().mean()), 0.0)
