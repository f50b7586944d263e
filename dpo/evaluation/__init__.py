"""Evaluations of what a policy does: rewards and KL of its samples during training (win rates next)."""
