"""The routing-policy interface and its registry, after sglang's ``LoadBalancingPolicy`` / ``PolicyFactory`` and
llm-d's scorers: a policy scores the candidate backends of one request (higher is better), the router takes the
best, and ties go round-robin. Policies are pure: a function of the candidates' load and prefix matches and of
their args (no I/O; the router gathers what they read).

Each policy registers its name (the config's ``router.strategy``), its args (a section of the router config named
after it, ``router.prefixAware``: the one home of its defaults) and its constructor. Adding a policy is one new module
in ``policies/`` plus its import line in ``policies/__init__.py`` (docs/architecture.md has a worked example)::

    class QueueOnlyArgs(PolicyArgs):
        scale: float = Field(default=8.0, gt=0)

    @register("queue-only", QueueOnlyArgs)
    class QueueOnly:
        name, uses_prefix = "queue-only", False

        def __init__(self, args: QueueOnlyArgs): self.args = args

        def scores(self, candidates, request):
            return {c.url: 1 - min(1.0, c.waiting / self.args.scale) for c in candidates}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fuyao.config_files import ConfigSection

from ..balancing import Candidate, Decision, RoundRobin


class PolicyArgs(ConfigSection):
    """Base of a policy's args (a section of ``router``; camelCase keys, snake_case accepted)."""


@dataclass(frozen=True)
class RoutingRequest:
    """What a policy knows of the request: its prompt's length in tokens and in KV blocks, and how many of its leading
    blocks the shared KV tier holds (``fuyao-kvcache`` with a volume: any engine with fuyao's connector loads them)."""

    prompt_tokens: int = 0
    prompt_blocks: int = 0
    block_size: int = 16
    tier_blocks: int = 0


class Policy(Protocol):
    name: str
    uses_prefix: bool
    """Whether it reads ``Candidate.prefix_blocks`` (the router then asks the KV index for the prompt's matches)."""

    def scores(self, candidates: Sequence[Candidate], request: RoutingRequest) -> Mapping[str, float]:
        """Each candidate's score by URL; the highest wins, equal ones take turns."""


P = TypeVar("P", bound=Callable[[Any], Policy])


@dataclass(frozen=True)
class Registration:
    name: str
    args: type[PolicyArgs]
    new: Callable[[Any], Policy]

    @property
    def field(self) -> str:
        """Its args' attribute in the ``router`` section (``prefix_aware``; the file writes ``prefixAware``)."""
        return self.name.replace("-", "_")


POLICIES: dict[str, Registration] = {}
"""Every registered policy by name."""


def register(name: str, args: type[PolicyArgs] = PolicyArgs) -> Callable[[P], P]:
    """Class (or factory) decorator: ``new(args)`` makes the policy from its args."""

    def add(new: P) -> P:
        if name in POLICIES:
            raise ValueError(f"routing policy {name!r} is registered twice")
        POLICIES[name] = Registration(name, args, new)
        return new

    return add


def make_policy(name: str, args: PolicyArgs | None = None) -> Policy:
    """The factory: the policy registered as ``name``, made from ``args`` (its defaults when None)."""
    registration = POLICIES.get(name)
    if registration is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}")
    return registration.new(args if args is not None else registration.args())


def decide(policy: Policy, candidates: Sequence[Candidate], request: RoutingRequest, rr: RoundRobin) -> Decision:
    """The best-scoring candidate (ties in turn), with every candidate's score for the decision log."""
    if not candidates:
        raise ValueError("no candidates")
    scores = dict(policy.scores(candidates, request))
    best = max(scores.values())
    tied = [url for url, score in scores.items() if score >= best - 1e-9]
    url = rr.pick(tied) if len(tied) > 1 else tied[0]
    matched = next((c.prefix_blocks for c in candidates if c.url == url), 0)
    return Decision(url, policy.name, scores, matched, request.tier_blocks)
