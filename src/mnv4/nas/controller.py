"""The TuNAS controller: independent per-decision logits trained with REINFORCE (docs/nas.md).

* One categorical distribution per searchable decision, logits initialised to zero (uniform).
* Policy gradient with a moving-average baseline: ``b <- m * b + (1 - m) * R`` (m = 0.95); the
  advantage ``R - b`` uses the baseline from before this reward.
* Adam with beta1 = 0 (no momentum: the reward of an architecture sampled many steps ago says
  little about the current policy), as in TuNAS.
* Only the decisions that shape the sampled model are reinforced: a decision beyond a stage's
  sampled depth had no effect on the reward, so its gradient would be pure noise.
* The absolute reward of TuNAS: ``R = Q + beta * |T / T0 - 1|`` with ``beta < 0`` (default -0.10),
  Q the sampled model's held-out accuracy, T its cost and T0 the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import InvalidValue, check_float
from .space import Decision

__all__ = ["Controller", "absolute_reward"]


def absolute_reward(quality: float, cost: float, target: float, beta: float = -0.10) -> float:
    """TuNAS's absolute reward ``Q + beta * |T / T0 - 1|``."""
    if target <= 0:
        raise InvalidValue("target", target, "must be > 0")
    return quality + beta * abs(cost / target - 1.0)


class Controller:
    """A factorised categorical policy over ``decisions``.

    Args:
        decisions: the decisions to learn (single-choice ones are ignored).
        lr: Adam learning rate for the logits.
        baseline_momentum: momentum of the reward's moving-average baseline.
        fixed: values for decisions the controller does not learn (e.g. the coarse stage's IB
            blocks); they are copied into every sample.
    """

    def __init__(
        self,
        decisions: Sequence[Decision],
        lr: float = 0.05,
        baseline_momentum: float = 0.95,
        fixed: Mapping[str, Any] | None = None,
    ) -> None:
        self.fixed = dict(fixed or {})
        self.decisions = [d for d in decisions if len(d) > 1 and d.name not in self.fixed]
        self.constants = {d.name: d.choices[0] for d in decisions if len(d) == 1}
        self.lr = check_float("controller_lr", lr, 0.0, lo_open=True)
        self.momentum = check_float("baseline_momentum", baseline_momentum, 0.0, 1.0, hi_open=True)
        self.logits = [torch.zeros(len(d), requires_grad=True) for d in self.decisions]
        self.optimizer = torch.optim.Adam(self.logits, lr=self.lr, betas=(0.0, 0.999)) if self.logits else None
        self.baseline: float | None = None
        self.updates = 0

    # -- the policy -----------------------------------------------------------------------------
    def probs(self) -> dict[str, list[float]]:
        return {d.name: torch.softmax(lg.detach(), 0).tolist() for d, lg in zip(self.decisions, self.logits)}

    def sample(self, generator: torch.Generator) -> dict[str, Any]:
        """An architecture drawn from the policy (deterministic given ``generator``'s state)."""
        arch = dict(self.constants)
        arch.update(self.fixed)
        for d, lg in zip(self.decisions, self.logits):
            p = torch.softmax(lg.detach(), 0)
            arch[d.name] = d.choices[int(torch.multinomial(p, 1, generator=generator))]
        return arch

    def argmax(self) -> dict[str, Any]:
        """The most likely architecture (what TuNAS returns at the end of a search)."""
        arch = dict(self.constants)
        arch.update(self.fixed)
        for d, lg in zip(self.decisions, self.logits):
            arch[d.name] = d.choices[int(torch.argmax(lg.detach()))]
        return arch

    def log_prob(self, arch: Mapping[str, Any], names: Sequence[str] | None = None) -> torch.Tensor:
        """Log-probability of ``arch`` under the policy, over ``names`` (default: every decision)."""
        keep = None if names is None else set(names)
        total = torch.zeros(())
        for d, lg in zip(self.decisions, self.logits):
            if keep is None or d.name in keep:
                total = total + torch.log_softmax(lg, 0)[d.index(arch[d.name])]
        return total

    def entropy(self) -> float:
        """Sum of the per-decision entropies, in nats (0 = the policy has converged)."""
        total = 0.0
        for lg in self.logits:
            p = torch.softmax(lg.detach(), 0)
            total -= float((p * torch.log(p.clamp_min(1e-12))).sum())
        return total

    def max_entropy(self) -> float:
        return sum(math.log(len(d)) for d in self.decisions)

    # -- learning -------------------------------------------------------------------------------
    def update(self, arch: Mapping[str, Any], reward: float, active: Sequence[str] | None = None) -> float:
        """One REINFORCE step on ``arch``'s reward; returns the advantage used."""
        if not math.isfinite(reward):
            raise InvalidValue("reward", reward, "must be finite")
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        self.baseline = self.momentum * self.baseline + (1.0 - self.momentum) * reward
        self.updates += 1
        if self.optimizer is None:
            return advantage
        self.optimizer.zero_grad(set_to_none=True)
        loss = -advantage * self.log_prob(arch, active)
        if loss.requires_grad:
            loss.backward()
            self.optimizer.step()
        return advantage

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "names": [d.name for d in self.decisions],
            "logits": [lg.detach().clone() for lg in self.logits],
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "baseline": self.baseline,
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = [d.name for d in self.decisions]
        if list(state["names"]) != names:
            raise InvalidValue("controller state", "decisions", "were saved for another search space or stage")
        with torch.no_grad():
            for lg, saved in zip(self.logits, state["logits"]):
                lg.copy_(saved)
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
        self.updates = int(state["updates"])


def run_bandit(
    controller: Controller, reward_fn: Callable[[dict[str, Any]], float], steps: int, seed: int = 0
) -> list[float]:
    """Train ``controller`` on a synthetic reward for ``steps`` samples; returns the rewards (tests, docs)."""
    g = torch.Generator().manual_seed(seed)
    rewards = []
    for _ in range(steps):
        arch = controller.sample(g)
        r = reward_fn(arch)
        controller.update(arch, r)
        rewards.append(r)
    return rewards
