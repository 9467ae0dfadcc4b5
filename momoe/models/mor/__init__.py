"""Mixture-of-Recursions: a shared block applied up to N_r times, each token's depth chosen by a router."""
from momoe.models.mor.configuration_mor import MoRConfig
from momoe.models.mor.modeling_mor import MoRCache, MoRLM

__all__ = ["MoRCache", "MoRConfig", "MoRLM"]
