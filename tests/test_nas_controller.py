import random

import pytest
import torch

from mnv4.errors import MNv4Error
from mnv4.nas.controller import Controller, absolute_reward, run_bandit
from mnv4.nas.space import Decision


def _bandit(seed: int):
    rng = random.Random(seed)
    decisions = [Decision(f"d{i}", tuple(range(n))) for i, n in enumerate((3, 4, 5, 2, 6))]
    values = {d.name: [rng.random() * 0.1 for _ in d.choices] for d in decisions}
    best = {k: max(range(len(v)), key=v.__getitem__) for k, v in values.items()}
    noise = random.Random(seed + 1)

    def reward(arch):
        return sum(values[k][arch[k]] for k in values) + noise.gauss(0, 0.05)

    return decisions, best, reward


@pytest.mark.parametrize("seed", [0, 1])
def test_controller_converges_to_the_best_arm_of_a_synthetic_reward(seed):
    decisions, best, reward = _bandit(seed)
    c = Controller(decisions, lr=0.05)
    start = c.entropy()
    rewards = run_bandit(c, reward, 800, seed)
    assert c.argmax() == best
    assert c.entropy() < 0.3 * start
    assert sum(rewards[-100:]) > sum(rewards[:100])


def test_absolute_reward_penalises_both_sides_of_the_target():
    assert absolute_reward(0.5, 110.0, 100.0, -0.1) == pytest.approx(0.49)
    assert absolute_reward(0.5, 90.0, 100.0, -0.1) == pytest.approx(0.49)
    assert absolute_reward(0.5, 100.0, 100.0, -0.1) == pytest.approx(0.5)
    with pytest.raises(MNv4Error):
        absolute_reward(0.5, 1.0, 0.0)


def test_baseline_moving_average_and_adam_without_momentum():
    c = Controller([Decision("a", (0, 1))], lr=0.1, baseline_momentum=0.95)
    assert c.optimizer.param_groups[0]["betas"][0] == 0.0
    assert c.update({"a": 0}, 1.0) == 0.0  # the first reward seeds the baseline
    adv = c.update({"a": 1}, 2.0)
    assert adv == pytest.approx(1.0)
    assert c.baseline == pytest.approx(0.95 * 1.0 + 0.05 * 2.0)
    # A positive advantage makes the rewarded choice more likely.
    assert c.probs()["a"][1] > 0.5


def test_only_active_decisions_are_reinforced_and_fixed_ones_are_constant():
    ds = [Decision("a", (0, 1)), Decision("b", (0, 1, 2)), Decision("c", (4, 8)), Decision("k", (7,))]
    c = Controller(ds, lr=0.1, fixed={"c": 8})
    assert [d.name for d in c.decisions] == ["a", "b"]
    c.update({"a": 1, "b": 2, "c": 8, "k": 7}, 0.0)
    c.update({"a": 1, "b": 2, "c": 8, "k": 7}, 1.0, active=["a"])
    p = c.probs()
    assert p["a"][1] > 0.5 and p["b"] == pytest.approx([1 / 3] * 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        arch = c.sample(g)
        assert arch["c"] == 8 and arch["k"] == 7


def test_state_round_trip_reproduces_samples():
    decisions, _, reward = _bandit(2)
    c = Controller(decisions, lr=0.05)
    run_bandit(c, reward, 50)
    d = Controller(decisions, lr=0.05)
    d.load_state_dict(c.state_dict())
    assert d.baseline == c.baseline and d.updates == 50
    for ctrl in (c, d):
        ctrl.update({k.name: 0 for k in decisions}, 0.3)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [c.sample(g1) for _ in range(5)] == [d.sample(g2) for _ in range(5)]
    with pytest.raises(MNv4Error, match="another search space"):
        Controller(decisions[:2]).load_state_dict(c.state_dict())
