"""What the model families share below the seam: the VAE wrapper, noise objectives, samplers."""
