"""Training: synthetic data and the BLIP-2 stage-2 (Q-Former) trainer."""
