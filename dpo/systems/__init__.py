"""Training systems: LightningModules that hold a policy and train it (DPO; a reward model and PPO next)."""
