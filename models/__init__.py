"""Model code: one file per concept (vqgan, quantizer, discriminator, losses, convert)."""
