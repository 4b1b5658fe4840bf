"""Tests for diversegrpo.py. Run: python -m pytest -q test_diversegrpo.py (CPU, no network)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import diversegrpo as dg

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs.yaml")


# ---- SDE step ----


def _random_step(batch=5, shape=(3, 4, 4), sigma=0.7, sigma_next=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g), sigma, sigma_next


def test_sde_log_prob_matches_torch_normal():
    velocity, sample, sigma, sigma_next = _random_step()
    prev, log_prob, mean, std = dg.sde_step_with_logprob(
        velocity, sample, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(1)
    )
    expected = torch.distributions.Normal(mean, std).log_prob(prev).flatten(1).mean(1)
    assert log_prob.shape == (5,)
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)


def test_sde_mean_and_std_match_method_formula():
    velocity, x, s, s_next = _random_step()
    a, dt = 0.7, s_next - s
    sd = a * math.sqrt(s / (1 - s))
    expected_mean = x + (velocity + sd**2 / (2 * s) * (x + (1 - s) * velocity)) * dt
    _, _, mean, std = dg.sde_step_with_logprob(velocity, x, s, s_next, a)
    torch.testing.assert_close(mean, expected_mean)
    assert abs(float(std) - sd * math.sqrt(-dt)) < 1e-6


def test_sde_first_step_uses_next_sigma_in_denominator():
    velocity, x, _, _ = _random_step()
    _, _, _, std = dg.sde_step_with_logprob(velocity, x, 1.0, 0.96, 0.7)
    assert abs(float(std) - 0.7 * math.sqrt(1.0 / (1 - 0.96)) * math.sqrt(0.04)) < 1e-5
    assert torch.isfinite(std).all()


def test_sde_per_sample_sigmas_equal_scalar_sigmas():
    velocity, x, _, _ = _random_step(batch=2)
    sigma, sigma_next = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.3])
    prev = torch.randn_like(x)
    _, log_prob, mean, _ = dg.sde_step_with_logprob(velocity, x, sigma, sigma_next, 0.7, prev_sample=prev)
    for i in range(2):
        _, lp_i, mean_i, _ = dg.sde_step_with_logprob(
            velocity[i : i + 1], x[i : i + 1], float(sigma[i]), float(sigma_next[i]), 0.7, prev_sample=prev[i : i + 1]
        )
        torch.testing.assert_close(log_prob[i : i + 1], lp_i)
        torch.testing.assert_close(mean[i : i + 1], mean_i)


def test_noise_level_zero_is_euler_step():
    velocity, x, s, s_next = _random_step()
    prev, _, _, _ = dg.sde_step_with_logprob(velocity, x, s, s_next, 0.0)
    torch.testing.assert_close(prev, x + velocity * (s_next - s))


def test_rescoring_stored_transition_gives_ratio_one():
    velocity, x, s, s_next = _random_step()
    prev, log_prob, _, _ = dg.sde_step_with_logprob(
        velocity, x, s, s_next, 0.7, generator=torch.Generator().manual_seed(3)
    )
    _, again, _, _ = dg.sde_step_with_logprob(velocity, x, s, s_next, 0.7, prev_sample=prev)
    assert torch.equal(torch.exp(again - log_prob), torch.ones(5))


def test_schedule_matches_sd3_values():
    expected = [1, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.0089, 0]
    torch.testing.assert_close(dg.flow_match_sigmas(10, 3.0), torch.tensor(expected), atol=6e-4, rtol=0)


def test_sde_preserves_marginals_of_gaussian_data():
    """With the exact velocity of N(m, s0^2) data, the SDE (a=0.7) and the ODE end in the same distribution.

    Tolerance: with n = 40000 samples the std error of a mean is s0 / sqrt(n) = 0.0025 and of a std about
    s0 / sqrt(2n) = 0.0018; 100 Euler steps add a discretization bias that we measured below 0.01. 0.02 covers both
    with room, while a sampler that dropped the SDE's drift correction misses the std by more than 0.1.
    """
    m, s0, n = 1.5, 0.5, 40_000

    def exact_velocity(x, t):  # v = E[eps | x_t] - E[x_0 | x_t] for x_0 ~ N(m, s0^2)
        var = (1 - t) ** 2 * s0**2 + t**2
        centred = x - (1 - t) * m
        return t / var * centred - (m + (1 - t) * s0**2 / var * centred)

    sigmas = dg.flow_match_sigmas(100)
    finals = {}
    for a in (0.0, 0.7):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, generator=g)
        for i in range(100):
            x, *_ = dg.sde_step_with_logprob(
                exact_velocity(x, float(sigmas[i])), x, sigmas[i], sigmas[i + 1], a, generator=g
            )
        finals[a] = x
    for x in finals.values():
        assert abs(x.mean().item() - m) < 0.02
        assert abs(x.std().item() - s0) < 0.02
    assert abs(finals[0.7].std().item() - finals[0.0].std().item()) < 0.02


# ---- advantages and loss ----


def test_group_advantages_reproduce_paper_figure_2():
    adv = dg.group_advantages(torch.tensor([[2.14, 4.14, 3.14, 4.00]]))
    torch.testing.assert_close(adv, torch.tensor([[-1.316, 0.851, -0.233, 0.699]]), atol=1e-3, rtol=0)


def test_group_advantages_constant_group_is_zero_and_rows_are_independent():
    adv = dg.group_advantages(torch.tensor([[3.0, 3.0, 3.0], [1.0, 2.0, 3.0]]))
    assert torch.equal(adv[0], torch.zeros(3))
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-3, rtol=0)


def test_group_advantages_clip():
    rewards = torch.tensor([[0.0] * 99 + [100.0]])
    assert dg.group_advantages(rewards, clip=5.0).max() == 5.0
    assert dg.group_advantages(rewards, clip=2.0).max() == 2.0


def test_grpo_loss_clips_the_ratio():
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2)
    # ratio e^0.5 > 1 + eps: for A > 0 the clipped term wins (max of -A r), for A < 0 the unclipped one.
    loss = dg.grpo_loss(torch.full((2,), 0.5), old, adv, clip_range=0.1)
    expected = (-1.0 * 1.1 + 1.0 * math.exp(0.5)) / 2
    assert abs(loss.item() - expected) < 1e-6


# ---- creativity bonus ----


def _two_blobs():
    return torch.tensor([[0.0, 0.0], [0.05, 0.0], [0.0, 0.05], [5.0, 5.0]])


@pytest.mark.parametrize("n_clusters", ["auto", 2])
def test_bonus_three_and_one(n_clusters):
    distances = dg.pairwise_distances(_two_blobs())
    bonus, labels = dg.creativity_bonus(distances, n_clusters=n_clusters)
    torch.testing.assert_close(bonus, torch.tensor([math.sqrt(4 / 3)] * 3 + [2.0]))
    assert labels[0] == labels[1] == labels[2] != labels[3]


def test_bonus_identical_points_gives_ones():
    bonus, labels = dg.creativity_bonus(dg.pairwise_distances(torch.ones(6, 2)), n_clusters="auto")
    assert torch.equal(bonus, torch.ones(6)) and torch.equal(labels, torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_bonus_with_n_not_above_k_does_not_crash(n):
    bonus, labels = dg.creativity_bonus(dg.pairwise_distances(torch.randn(n, 2)), n_clusters=4)
    assert bonus.shape == (n,) and torch.isfinite(bonus).all()


def test_bonus_disconnected_graph():
    points = torch.cat([torch.zeros(3, 2), torch.full((3, 2), 100.0)])  # affinity between the blobs underflows to 0
    bonus, labels = dg.creativity_bonus(dg.pairwise_distances(points), n_clusters=2, sigma=0.1)
    assert torch.isfinite(bonus).all() and len(set(labels.tolist())) == 2


def test_bonus_same_seed_same_labels():
    points = torch.randn(24, 2, generator=torch.Generator().manual_seed(0))
    distances = dg.pairwise_distances(points)
    a = dg.creativity_bonus(distances, n_clusters=5, seed=3)
    b = dg.creativity_bonus(distances, n_clusters=5, seed=3)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_bonus_eigengap_counts_blobs():
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
    points = centres.repeat_interleave(5, 0) + 0.05 * torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    bonus, labels = dg.creativity_bonus(dg.pairwise_distances(points), n_clusters="auto", sigma=0.5)
    assert len(set(labels.tolist())) == 4
    torch.testing.assert_close(bonus, torch.full((20,), 2.0))


def test_diversity_score_is_mean_off_diagonal_distance():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]])  # distances 5, 8, 5
    assert abs(dg.diversity_score(points) - 6.0) < 1e-6
    cosine = dg.pairwise_distances(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "cosine")
    torch.testing.assert_close(cosine, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


# ---- regularizers ----


def test_structure_aware_reg_below_and_after_k():
    mean, ref = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    expected = ((mean - ref) ** 2).flatten(1).mean(1) / 2
    torch.testing.assert_close(dg.structure_aware_reg(mean, ref, step_index=1, K=2), expected)
    for step in (2, 3, 9):
        assert torch.equal(dg.structure_aware_reg(mean, ref, step_index=step, K=2), torch.zeros(4))


def test_regularizers_send_no_gradient_to_reference():
    mean = torch.randn(3, 2, requires_grad=True)
    ref = torch.randn(3, 2, requires_grad=True)
    (dg.structure_aware_reg(mean, ref, 0, 1).sum() + dg.kl_reg(mean, ref, 0.3).sum()).backward()
    assert ref.grad is None and mean.grad is not None
    torch.testing.assert_close(mean.grad, (mean - ref).detach() / 2 * (1 + 1 / 0.09))


def test_kl_reg_matches_torch_kl():
    mean, ref, std = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0.2, 0.5, 1.0])
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std[:, None]), torch.distributions.Normal(ref, std[:, None])
    ).mean(1)
    torch.testing.assert_close(dg.kl_reg(mean, ref, std), expected)


# ---- config ----


def test_config_rejects_bad_input():
    with pytest.raises(dg.ConfigError, match="train.lrr"):
        dg.load_config(CONFIG, "toy", ["train.lrr=1"])
    with pytest.raises(dg.ConfigError, match="sampling.group_size"):
        dg.load_config(CONFIG, "toy", ["sampling.group_size=abc"])
    with pytest.raises(dg.ConfigError, match="diverse.K"):
        dg.load_config(CONFIG, "toy", ["diverse.K=11"])
    with pytest.raises(dg.ConfigError, match="group_size"):
        dg.load_config(CONFIG, "toy", ["sampling.group_size=1"])
    with pytest.raises(dg.ConfigError, match="n_clusters"):
        dg.load_config(CONFIG, "toy", ["diverse.n_clusters=24"])
    with pytest.raises(dg.ConfigError, match="unknown preset"):
        dg.load_config(CONFIG, "nope")


def test_config_overrides_are_typed_like_defaults():
    cfg = dg.load_config(CONFIG, "toy", ["train.lr=1e-3", "diverse.n_clusters=4", "diverse.sigma=null", "seed=7"])
    assert cfg.train.lr == 1e-3 and cfg.diverse.n_clusters == 4 and cfg.diverse.sigma is None and cfg.seed == 7


# ---- toy training ----

TINY = [
    "train.iterations=3",
    "train.eval_every=2",
    "sampling.group_size=6",
    "toy.pretrain_iters=30",
    "toy.eval_samples=16",
    "sampling.eval_num_steps=4",
    "sampling.num_steps=4",
    "diverse.K=2",
]


def _tiny_cfg(tmp_path, *extra):
    return dg.load_config(CONFIG, "toy", TINY + [f"output_dir={tmp_path}", *extra])


def test_toy_training_changes_only_lora_and_stays_finite(tmp_path):
    cfg = _tiny_cfg(tmp_path, "train.lr=0.05")
    backbone = dg.ToyBackbone(cfg)
    base = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    history = dg.train(cfg, backbone, "diversegrpo", log=lambda record: None)
    after = backbone.model.state_dict()
    for name, value in after.items():
        original = name.replace(".base_layer", "")
        if "lora_B" in name:
            assert not torch.equal(value, torch.zeros_like(value)), name  # B starts at zero: it must have moved
        elif "lora_" not in name:
            assert torch.equal(value, base[original]), name
    for record in history[1:]:
        assert all(math.isfinite(record[k]) for k in ("loss", "reg", "reward", "diversity"))
        assert abs(record["ratio"] - 1) < 1e-6  # one on-policy update per iteration


def test_reference_is_base_model(tmp_path):
    cfg = _tiny_cfg(tmp_path, "train.lr=0.05")
    backbone = dg.ToyBackbone(cfg)
    x, sigma, cond = torch.randn(8, 2), 0.5, backbone.encode([dg.TOY_PROMPTS[0]] * 8)
    base_velocity = backbone.velocity(x, sigma, cond)
    dg.train(cfg, backbone, "grpo", log=lambda record: None)
    with dg.adapters_disabled(backbone.model):
        assert torch.equal(backbone.velocity(x, sigma, cond), base_velocity)
    assert not torch.equal(backbone.velocity(x, sigma, cond), base_velocity)


def test_same_seed_same_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = _tiny_cfg(tmp_path / name)
        runs.append(dg.train(cfg, dg.ToyBackbone(cfg), "diversegrpo", log=lambda record: None))
    assert runs[0] == runs[1]


def test_matched_quality_table_interpolates():
    histories = {
        "grpo": [dict(reward=0.0, diversity=2.0, modes=8), dict(reward=1.0, diversity=1.0, modes=2)],
        "diversegrpo": [dict(reward=0.0, diversity=2.0, modes=8), dict(reward=1.0, diversity=2.0, modes=8)],
    }
    rows = dg.matched_quality_table(histories, n_levels=2)
    assert [round(r["reward"], 6) for r in rows] == [0.5, 1.0]
    assert abs(rows[0]["grpo"] - 1.5) < 1e-6 and abs(rows[0]["diversegrpo_gain"] - (2.0 / 1.5 - 1)) < 1e-6
    assert abs(rows[1]["diversegrpo_gain"] - 1.0) < 1e-6


# ---- the real command ----


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "diversegrpo.py"), "--config", CONFIG, *args],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=300,
    )


def test_cli_toy_run_writes_outputs(tmp_path):
    sets = [x for s in TINY for x in ("--set", s)]
    result = _run_cli(*sets, "--set", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Diversity at matched reward" in result.stdout
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all("diversity" in json.loads(line) for line in lines)  # (base + 2 evals) x 2 methods
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["methods"] == ["grpo", "diversegrpo"] and len(summary["table"]) == 4
    assert (tmp_path / "toy.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "override, key",
    [("train.lrr=1", "train.lrr"), ("sampling.group_size=1.5", "sampling.group_size"), ("diverse.K=99", "diverse.K")],
)
def test_cli_bad_config_exits_2_and_names_key(override, key, tmp_path):
    result = _run_cli("--set", override, "--set", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert key in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_import_is_light():
    code = "import sys, diversegrpo; print(sorted(m for m in ('diffusers', 'transformers', 'peft', 'sklearn', "
    code += "'dreamsim', 'matplotlib') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
