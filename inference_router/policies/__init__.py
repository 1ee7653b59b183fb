"""The router's routing policies (``router.strategy``), each registered with its name, args and constructor
(``base``). The imports below are the registrations: adding a policy is its module plus one line here."""

from . import base  # noqa: I001  (the registry first)
from .base import POLICIES, Policy, PolicyArgs, RoutingRequest, decide, make_policy, register
from .round_robin import RoundRobinPolicy
from .least_connections import LeastConnections
from .intelligent import IntelligentArgs, health_scores
from .prefix_aware import PrefixAwareArgs, prefill_tokens, prefix_scores

__all__ = ["POLICIES", "IntelligentArgs", "LeastConnections", "Policy", "PolicyArgs", "PrefixAwareArgs",
           "RoundRobinPolicy", "RoutingRequest", "base", "decide", "health_scores", "make_policy", "prefill_tokens",
           "prefix_scores", "register"]
