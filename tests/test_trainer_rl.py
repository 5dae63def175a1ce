"""Post-training maths and rewards (trainer.rl): PPO, GAE and the KL reward term against
hand-computed values; the format and verifier rewards on right, wrong and adversarial replies; the
verifier worker pool with raising, hanging and lying verifiers."""

from __future__ import annotations

import math
import time

import pytest
import torch

from trainer.rl import ppo
from trainer.rl.rewards import extract_answer, is_repetitive, point_reward, split_response, verify, verify_job
from trainer.rl.workers import VerifierPool

# ----------------------------------------------------------------------------- PPO maths


def test_gae_against_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.8], [0.2, 0.4, 9.0]])  # 9.0 is padding: must not leak
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: (1 - 0.8, 0.8 - 0.6, 0.6 - 0.5) and (1 - 0.4, 0.4 - 0.2); A_t = d_t + 0.5 * A_{t+1}
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.3, 0.2], [0.5, 0.6, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.75, 0.9, 1.0], [0.7, 1.0, 0.0]]))
    adv1, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)  # Monte Carlo: R - V_t
    torch.testing.assert_close(adv1, torch.tensor([[0.5, 0.4, 0.2], [0.8, 0.6, 0.0]]))
    adv0, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.0)  # one-step TD
    torch.testing.assert_close(adv0, torch.tensor([[0.1, 0.2, 0.2], [0.2, 0.6, 0.0]]))


def test_kl_enters_as_a_per_type_reward_term():
    scores = torch.tensor([1.0, 0.5])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-3.0, -3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl_coef = torch.tensor([0.1, 0.0])  # a general prompt's coefficient, and a verifiable one's (0)
    r = ppo.token_rewards(scores, logp, ref, kl_coef, mask)
    # -0.1 * (0.5, 0, -1) + 1.0 at the last token; the verifiable rollout only its score at its end
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 1.1], [0.0, 0.5, 0.0]]))
    torch.testing.assert_close(ppo.kl_k1(logp, ref, mask), torch.tensor((0.5 + 0 - 1 + 2 + 2) / 5))


def test_policy_loss_clips_at_0_2():
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = ppo.policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped);
    # token 2: ratio 1.1 inside the range, -2.2
    torch.testing.assert_close(out.loss, torch.tensor(-2.6 / 3))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(2 / 3))
    torch.testing.assert_close(out.approx_kl, torch.tensor(-math.log(1.5 * 0.5 * 1.1) / 3))
    # the gradient flows only through the unclipped token
    logp.requires_grad_(True)
    ppo.policy_loss(logp, old, adv, mask, clip=0.2).loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.0 * 1.1 / 3]]))


def test_value_loss_clips_around_the_old_values():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 1.0]])
    loss, frac = ppo.value_loss(v, old, ret, torch.ones(1, 2, dtype=torch.bool), clip=0.2)
    # token 0: max(0, (0.7 - 1)^2) = 0.09; token 1: max(1, (0.3 - 1)^2) = 1
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.09 + 1.0) / 2))
    torch.testing.assert_close(frac, torch.tensor(0.5))


def test_whiten_entropy_and_empty_masks():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    s = math.sqrt(1.5)
    torch.testing.assert_close(
        ppo.masked_whiten(x, mask), torch.tensor([[-s, 0.0, s, 0.0]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(ppo.entropy(torch.zeros(2, 4)), torch.full((2,), math.log(4)))
    none = torch.zeros(1, 4, dtype=torch.bool)
    assert ppo.masked_mean(x, none) == 0
    assert ppo.policy_loss(x, x, x, none).loss == 0


# ----------------------------------------------------------------------------- rewards


def test_format_rules():
    assert split_response("3").solution == "3"
    assert split_response("<think>two cubes</think> 3").solution == "3"
    assert split_response("<think>two cubes</think> 3").thought == "two cubes"
    for bad, why in [
        ("<think>a</think><think>b</think>3", "several"), ("<think>3", "unbalanced"),
        ("3</think>", "unbalanced"),
        ("x <think>a</think>3", "before"), ("</think>a<think>3", "before"), ("<think>a</think>  ", "empty"),
    ]:  # fmt: skip
        assert why in split_response(bad).problem, bad
    assert split_response("3", require_think=True).problem == "no <think> span"
    assert extract_answer(r"so the answer is \boxed{3} or \boxed{(1, {2}, 3)}") == "(1, {2}, 3)"
    assert extract_answer(r"\boxed{3") == r"\boxed{3"


def test_verifier_rewards():
    box = "<bbox>100,100,300,300</bbox>"
    assert verify("count", "<think>cubes: red, blue.</think>2", "2").reward == 1.0
    assert verify("count", r"\boxed{2}", "2").reward == 1.0
    assert verify("count", "3", "2").reward == 0.0
    assert verify("relation", "Yes.", "yes").correct
    v = verify("ground2d", "<bbox>100,100,300,250</bbox>", box)
    assert v.correct and v.reward == pytest.approx(0.75)  # graded: the IoU
    bare = verify("ground2d", "100,100,300,250", box)  # right, but not in the <bbox> form
    assert bare.correct and not bare.format_ok and bare.reward == pytest.approx(0.25)
    assert verify("depth", "4.0", "5.0").reward == pytest.approx(0.8)
    assert not verify("depth", "4.0", "5.0").correct  # 20% off: held-out accuracy says no
    assert verify("ground3d", "(0.0, 1.0, 4.0)", "(0.0, 1.0, 4.0)").reward == 1.0
    assert point_reward("<point>150,150</point>", box) == 1.0
    assert point_reward("<point>300,400</point>", box) == pytest.approx(1 - 100 / math.hypot(200, 200))
    assert verify("point", "<point>150,150</point>", box).reward == 1.0
    assert verify("count", "<think>2", "2").reward == 0.0


@pytest.mark.parametrize(
    "reply",
    [
        "9" * 10_000, "1e999999", "-" + "9" * 400 + ".5", "nan", "NaN, inf, -inf", "(nan, nan, nan)",
        "<bbox>nan,nan,inf,inf</bbox>", "<bbox>1e308,1e308,-1e308,1e308</bbox>", "<bbox>1,2,3</bbox></bbox>",
        "<bbox><bbox>1,2,3,4", "</think></think>", "<think>" * 50, "\\boxed{" * 100, "x" * 10_000,
        "\x00\ufffd\ud7ff", "", "   ", "<point>1e999,2</point>",
    ],
)  # fmt: skip
def test_adversarial_replies_score_in_range(reply):
    for kind, truth in [("count", "2"), ("ground2d", "<bbox>1,2,30,40</bbox>"), ("depth", "4.2"),
                        ("ground3d", "(0.1, 0.9, 4.2)"), ("depth_order", "red, blue, gray"),
                        ("point", "<bbox>1,2,30,40</bbox>")]:  # fmt: skip
        v = verify(kind, reply, truth)
        assert 0.0 <= v.reward <= 1.0 and not v.correct, (kind, reply[:40], v)


def test_repetition_filter():
    assert is_repetitive("red red red red red red")
    assert is_repetitive("2, 2, 2, 2, 2, 2, 2")
    assert is_repetitive(
        "The cube is red. The cube is red. The cube is red. The cube is red. The cube is red."
    )
    assert not is_repetitive("blue, red, gray")
    assert not is_repetitive("<think>cubes: red cube, blue cube.</think>2")
    assert not is_repetitive("(0.4, 0.9, 4.2)")


# ----------------------------------------------------------------------------- verifier workers


def _faulty(job):
    """A verifier that misbehaves by job: raises, hangs, lies, or scores properly."""
    if job == "raise":
        raise ValueError("cannot parse")
    if job == "hang":
        time.sleep(60)
    if job == "nan":
        return float("nan")
    if job == "big":
        return 7.0
    if job == "text":
        return "yes"
    return verify_job(("count", job, "2", False))


def test_verifier_pool_survives_raising_hanging_and_lying_verifiers(caplog):
    jobs = ["2", "raise", "hang", "3", "nan", "big", "text", "2"]
    with VerifierPool(_faulty, workers=2, timeout_s=1.0) as pool:
        out = pool.map(jobs)
        assert [s.reward for s in out] == [1.0, 0, 0, 0, 0, 0, 0, 1.0]
        assert "ValueError: cannot parse" in out[1].reason
        assert out[2].reason.startswith("timeout")
        assert "outside [0, 1]" in out[4].reason and "outside [0, 1]" in out[5].reason
        assert "not a number" in out[6].reason
        assert out[0].info == {"correct": True, "format_ok": True, "reason": ""}
        assert pool.failures == {"ValueError": 1, "timeout": 1, "verifier returned nan, outside [0, 1]": 1,
                                 "verifier returned 7.0, outside [0, 1]": 1,
                                 "verifier returned str, not a number": 1}  # fmt: skip
        again = pool.map(["2", "2", "2"])  # the hung worker was replaced: the pool still serves
        assert [s.reward for s in again] == [1.0, 1.0, 1.0]
    assert "timeout" in caplog.text
