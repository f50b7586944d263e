"""Pure maths: preference losses, sequence and token log-probabilities, PPO/RL maths. No models, no I/O."""
