"""Rewards (text -> float): the registry (VADER, TF-IDF, Hugging Face classifiers) and learned reward models."""
