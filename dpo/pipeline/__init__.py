"""The sample -> score -> pair pipeline that makes preference data from a model and a reward.

Each step is its own entry point with its own Hydra config (``conf/<step>.yaml``) and reads the
previous step's file, so any step can be rerun or swapped: ``dpo-sample``, ``dpo-score``,
``dpo-pair``, and ``dpo-best-of-n`` (the Best-of-N baseline from scored samples).
"""
