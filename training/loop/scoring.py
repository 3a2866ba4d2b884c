"""Scoring a LoRA while it trains (`--eval_interval`): KID, and the CLIP score with `--clip_model`, of images
generated for the validation prompts against the real images (evaluation/, the same numbers evaluate_images.py
reports).

The real images' Inception features are computed once, at start-up. At each evaluation `--eval_num_images`
images are generated from the validation prompts in turn, image i seeded i (20 euler steps, CFG 5, the
training resolution), so successive scores differ only by what the LoRA learned; KID's random subsets are
seeded too, so a resumed run computes the same scores as one never stopped.
"""

import torch

from evaluation import ClipScorer, load_inception, reference_features, score_images
from sampling.inference import sample_images


class TrainingScores:
    """KID (+ CLIP score) of the run's generated images against its real images."""

    def __init__(self, settings, models, device: torch.device, scores: bool = True):
        """`scores` False: this process only generates the images (a rank of a sharded base: every rank takes part
        in each forward, rank 0 scores)."""
        evaluation = settings.evaluation
        self.models, self.device, self.scores = models, device, scores
        self.size, self.seed = settings.data.image_size, settings.runtime.seed
        self.inception = load_inception(evaluation.inception_weights, device) if scores else None
        self.clip = ClipScorer.from_pretrained(evaluation.clip_model, device) if evaluation.clip_model and scores \
            else None
        self.real = reference_features(evaluation.eval_real_dir or settings.data.data_dir, self.inception,
                                       device=device) if scores else None
        prompts = evaluation.validation_prompts
        self.prompts = [prompts[i % len(prompts)] for i in range(evaluation.eval_num_images)]

    @torch.no_grad()
    def __call__(self) -> dict:
        """{"kid_mean", "kid_std", "fid", "clip_score" (with --clip_model)} of this step's LoRA."""
        m = self.models
        embeds, pooled = m.texts.get(self.prompts, m.text_encoder)
        images = sample_images(m.family, m.denoiser, m.vae, m.text_encoder, embeds.to(self.device),
                               pooled.to(self.device), list(range(len(self.prompts))), height=self.size,
                               width=self.size, scheduler_config=m.scheduler_config)
        if not self.scores:
            return {}
        scores = score_images(images, self.real, self.inception, clip=self.clip,
                              prompts=self.prompts if self.clip else None, device=self.device, seed=self.seed)
        return {k: v for k, v in scores.items() if k in ("kid_mean", "kid_std", "fid", "clip_score")}
