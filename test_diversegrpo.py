"""Tests of diversegrpo.py and analyses/, in the order of the file. Run: python -m pytest -q test_diversegrpo.py"""

import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import diversegrpo as dg

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs.yaml")
_spec = importlib.util.spec_from_file_location("paper_analyses", os.path.join(HERE, "analyses", "paper_analyses.py"))
pa = importlib.util.module_from_spec(_spec)  # analyses/paper_analyses.py, which imports diversegrpo
_spec.loader.exec_module(pa)


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
    bonus, labels = dg.creativity_bonus(dg.pairwise_distances(points), n_clusters=2, bandwidth=0.1)
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
    bonus, labels = dg.creativity_bonus(dg.pairwise_distances(points), n_clusters="auto", bandwidth=0.5)
    assert len(set(labels.tolist())) == 4
    torch.testing.assert_close(bonus, torch.full((20,), 2.0))


@pytest.mark.parametrize("preset", ["toy", "sd3_pickscore", "flux_pickscore", "sd3_hpsv3"])
def test_each_presets_bonus_rewards_the_rare_mode_of_planted_groups(preset, monkeypatch):
    """The preset's own `diverse` settings, in its geometry, at two distance scales: >= 90% of unbalanced groups."""
    import importlib.machinery
    import types

    stub = types.ModuleType("hpsv3")  # sd3_hpsv3 loads only where the hpsv3 package is installed
    stub.__spec__ = importlib.machinery.ModuleSpec("hpsv3", None)
    monkeypatch.setitem(sys.modules, "hpsv3", stub)
    cfg = dg.load_config(CONFIG, preset, ["device=cpu"])
    d, G = cfg.diverse, cfg.sampling.group_size
    geometries = ["ring", "grid"] if preset == "toy" else ["cosine"]
    scales = [0.1, 10.0] if preset == "toy" else [0.25, 1.0]
    g, ratios, wins, shared = torch.Generator().manual_seed(0), [], [], []
    for geometry in geometries:
        for scale in scales:
            for sizes in pa.PLANTED:
                assert sum(sizes) == G
                for _ in range(5):
                    features, modes = pa.planted_group(sizes, geometry, scale, g)
                    metric = "cosine" if geometry == "cosine" else "euclidean"
                    bonus, _ = dg.creativity_bonus(dg.pairwise_distances(features, metric), d.n_clusters, d.bandwidth,
                                                   0, d.max_clusters)  # fmt: skip
                    ratio, win = pa.rare_and_common(bonus, modes)
                    ratios.append(ratio)
                    wins.append(win)
                    shared += [len(set(bonus[modes == m].tolist())) == 1 for m in range(len(sizes))]
    assert np.mean(wins) >= 0.9, np.mean(wins)  # the rare mode earns more than the common one
    assert np.mean(ratios) >= 0.75, np.mean(ratios)  # about sqrt(G / n): lone samples may be pooled with another
    assert np.mean(shared) >= 0.9, np.mean(shared)  # the samples of one mode share one bonus


@pytest.mark.parametrize("geometry", ["cosine", "grid"])
def test_bonus_of_balanced_groups_and_of_one_mode_is_flat(geometry):
    """No rare mode: balanced modes are all found, and one mode is left whole (always in 512-d, in 2-D often) or cut
    into a few large pieces, never into small rewarded ones."""
    metric = "cosine" if geometry == "cosine" else "euclidean"
    g, found, whole, max_bonus = torch.Generator().manual_seed(1), [], [], []
    for _ in range(10):
        for sizes in ([12, 12], [8, 8, 8]):
            features, modes = pa.planted_group(sizes, geometry, 1.0, g)
            _, labels = dg.creativity_bonus(dg.pairwise_distances(features, metric))
            found.append(len(set(labels.tolist())) == len(sizes))
        features, _ = pa.planted_group([24], geometry, 1.0, g)
        bonus, labels = dg.creativity_bonus(dg.pairwise_distances(features, metric))
        whole.append(len(set(labels.tolist())) == 1)
        max_bonus.append(bonus.max().item())
    assert np.mean(found) >= 0.9, np.mean(found)
    assert np.mean(whole) >= (0.9 if geometry == "cosine" else 0.3) and max(max_bonus) <= 2.5, (whole, max_bonus)


def test_bonus_degrades_gracefully_as_modes_overlap():
    """Pulling the modes of [16, 4, 4] together: the rare modes are rewarded while they are apart, the common one
    never is, and once they merge the bonus stops telling them apart rather than inventing a difference."""
    g, rates, common_wins = torch.Generator().manual_seed(2), [], []
    for overlap in (1.0, 0.6, 0.3, 0.0):
        outcomes = []
        for _ in range(10):
            features, modes = pa.planted_group([16, 4, 4], "cosine", 1.0, g, overlap=overlap)
            bonus, _ = dg.creativity_bonus(dg.pairwise_distances(features, "cosine"))
            outcomes.append(pa.rare_and_common(bonus, modes)[1])
            common_wins.append((bonus[modes == 0].mean() > bonus[modes != 0].mean()).item())
        rates.append(np.mean(outcomes))
    assert rates[0] >= 0.9 and rates == sorted(rates, reverse=True), rates
    assert np.mean(common_wins) <= 0.1, common_wins


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


# ---- one step's loss, and the promise that the paper's functions copy out cleanly ----


def test_step_loss_is_the_surrogate_plus_the_gated_regularizers():
    g = torch.Generator().manual_seed(0)
    log_prob, adv = torch.randn(4, generator=g), torch.randn(4, generator=g)
    old_log_prob = log_prob + 0.3 * torch.randn(4, generator=g)
    mean = torch.randn(4, 3, 2, 2, generator=g, requires_grad=True)
    ref, std = torch.randn(4, 3, 2, 2, generator=g, requires_grad=True), torch.tensor(0.3)
    normal = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(normal(mean, std), normal(ref, std)).flatten(1).mean(1).mean()
    for step, K in ((0, 2), (1, 2), (2, 2), (7, 2)):
        loss, reg = dg.step_loss(log_prob, old_log_prob, adv, 0.1, mean, ref, std, step, K, lambda_w=10.0, kl_beta=0.5)
        ratio = torch.exp(log_prob - old_log_prob)
        surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.9, 1.1)).mean()
        w2 = ((mean - ref) ** 2).mean() / 2 if step < K else 0.0  # equal per-sample element counts: a flat mean
        torch.testing.assert_close(loss, surrogate)
        torch.testing.assert_close(reg, 10.0 * w2 + 0.5 * kl)
    loss, reg = dg.step_loss(log_prob, old_log_prob, adv, 0.1)  # plain GRPO: no reference, no regularizer
    assert reg.item() == 0.0
    _, reg = dg.step_loss(log_prob, old_log_prob, adv, 0.1, mean, ref, std, 0, 1, lambda_w=1.0, kl_beta=1.0)
    reg.backward()
    assert ref.grad is None and mean.grad is not None  # the reference is a fixed target


COPYABLE = ["flow_match_sigmas", "sde_step_with_logprob", "group_advantages", "grpo_loss", "kl_reg",
            "structure_aware_reg", "step_loss", "pairwise_distances", "creativity_bonus"]  # fmt: skip


def _module_globals_used(function):
    """The module-level names a function's code (nested functions included) refers to."""
    names, codes = set(), [function.__code__]
    while codes:
        code = codes.pop()
        names |= set(code.co_names)
        codes += [c for c in code.co_consts if hasattr(c, "co_names")]
    return sorted(n for n in names if n in vars(dg))


def test_paper_functions_copy_out_with_torch_numpy_and_sklearn():
    """Each function runs from its own source (plus at most one small helper of the file, and the paper functions it
    composes) in a namespace that holds only torch, numpy, scikit-learn and the standard library's math/warnings."""
    import inspect
    import types
    import warnings

    allowed = {"torch": torch, "np": np, "F": torch.nn.functional, "math": math, "warnings": warnings}
    g = torch.Generator().manual_seed(0)
    x, v, features = torch.randn(6, 3, 2, generator=g), torch.randn(6, 3, 2, generator=g), torch.randn(12, 2)
    features[6:] += 4.0
    calls = {  # name: arguments
        "flow_match_sigmas": (10, 3.0),
        "sde_step_with_logprob": (v, x, 0.8, 0.7, 0.7, x * 0.9),
        "group_advantages": (torch.tensor([[2.14, 4.14, 3.14, 4.00]]),),
        "grpo_loss": (torch.zeros(6), torch.full((6,), 0.1), torch.randn(6, generator=g), 0.05),
        "kl_reg": (x, v, 0.3),
        "structure_aware_reg": (x, v, 1, 2),
        "step_loss": (torch.zeros(6), torch.full((6,), 0.1), torch.ones(6), 0.05, x, v, 0.3, 0, 2, 1.0, 1.0),
        "pairwise_distances": (features, "cosine"),
        "creativity_bonus": (dg.pairwise_distances(features),),
    }  # fmt: skip
    for name in COPYABLE:
        needed, todo = set(), [name]
        while todo:  # every module-level name it needs, transitively
            current = todo.pop()
            new = [n for n in _module_globals_used(getattr(dg, current)) if n not in allowed and n not in needed]
            needed |= set(new)
            todo += new
        helpers = sorted(n for n in needed if n not in COPYABLE)
        assert len(helpers) <= 1, f"{name} needs {helpers}"
        assert all(isinstance(getattr(dg, n), types.FunctionType) for n in helpers), (name, helpers)
        namespace = dict(allowed)
        for other in sorted(needed - {name}) + [name]:
            exec(inspect.getsource(getattr(dg, other)), namespace)
        copied, original = namespace[name](*calls[name]), getattr(dg, name)(*calls[name])
        copied, original = (x if isinstance(x, tuple) else (x,) for x in (copied, original))
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(copied, original)), name  # noqa: B905


# ---- training on the toy ----

TINY = ["train.iterations=3", "train.eval_every=2", "sampling.group_size=6", "toy.pretrain_iters=30",
        "sampling.eval_samples=16", "sampling.eval_num_steps=4", "sampling.num_steps=4", "diverse.K=2"]  # fmt: skip


def _tiny_cfg(tmp_path, *extra):
    return dg.load_config(CONFIG, "toy", TINY + [f"output_dir={tmp_path}", *extra])


def _quiet(record):
    pass


def test_toy_training_changes_only_lora_and_stays_finite(tmp_path):
    cfg = _tiny_cfg(tmp_path, "train.lr=0.05")
    backbone = dg.ToyBackbone(cfg)
    base = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    history = dg.train(cfg, backbone, "diversegrpo", log=_quiet)
    for name, value in backbone.model.state_dict().items():
        if "lora_B" in name:
            assert not torch.equal(value, torch.zeros_like(value)), name  # B starts at zero: it must have moved
        elif "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    for record in history[1:]:
        assert all(math.isfinite(record[k]) for k in ("loss", "reg", "reward", "diversity"))
        assert abs(record["ratio"] - 1) < 1e-6 and record["clipped"] == 0  # one on-policy update per iteration
        assert 1 <= record["clusters"] <= cfg.sampling.group_size - 1 and 0 <= record["k1_share"] <= 1


def test_reference_is_base_model(tmp_path):
    cfg = _tiny_cfg(tmp_path, "train.lr=0.05")
    backbone = dg.ToyBackbone(cfg)
    x, sigma, cond = torch.randn(8, 2), 0.5, backbone.encode([dg.TOY_PROMPTS[0]] * 8)
    base_velocity = backbone.velocity(x, sigma, cond)
    history = dg.train(cfg, backbone, "grpo", log=_quiet)
    assert "clusters" not in history[-1]  # no bonus, no clustering
    with dg.adapters_disabled(backbone.model):
        assert torch.equal(backbone.velocity(x, sigma, cond), base_velocity)
    assert not torch.equal(backbone.velocity(x, sigma, cond), base_velocity)


def test_same_seed_same_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = _tiny_cfg(tmp_path / name)
        runs.append(dg.train(cfg, dg.ToyBackbone(cfg), "diversegrpo", log=_quiet))
    untimed = [[{k: v for k, v in record.items() if k != "iter_seconds"} for record in run] for run in runs]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 3


def test_regularizer_only_on_the_first_k_steps_and_last_step_never_trained(tmp_path, monkeypatch):
    calls = {"reference": 0, "loss": 0}
    real_disabled, real_loss = dg.adapters_disabled, dg.grpo_loss

    def counting_disabled(model):
        calls["reference"] += 1
        return real_disabled(model)

    def counting_loss(*args):
        calls["loss"] += 1
        return real_loss(*args)

    monkeypatch.setattr(dg, "adapters_disabled", counting_disabled)
    monkeypatch.setattr(dg, "grpo_loss", counting_loss)
    for K, expected_reference_calls in ((0, 0), (2, 2 * 3)):  # 3 iterations, 4 steps, of which 3 are trained
        calls.update(reference=0, loss=0)
        cfg = _tiny_cfg(tmp_path / f"K{K}", f"diverse.K={K}")
        history = dg.train(cfg, dg.ToyBackbone(cfg), "reg_only", log=_quiet)
        assert calls == {"reference": expected_reference_calls, "loss": 3 * 3}
        assert K > 0 or all(record["reg"] == 0 for record in history[1:])


def test_constant_rewards_give_zero_advantages_and_no_nan(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path)
    backbone = dg.ToyBackbone(cfg)
    monkeypatch.setattr(backbone, "reward", lambda samples, prompts: torch.full((len(samples),), 0.5))
    history = dg.train(cfg, backbone, "grpo", log=_quiet)
    assert all(record["loss"] == 0.0 and math.isfinite(record["reward"]) for record in history[1:])
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in backbone.model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_reward_is_dropped_with_a_warning(bad_value, tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path, "train.lr=0.05")
    backbone = dg.ToyBackbone(cfg)
    real_reward = backbone.reward

    def reward_with_a_bad_sample(samples, prompts):
        rewards = real_reward(samples, prompts)
        if len(samples) == cfg.sampling.group_size * cfg.sampling.prompts_per_iter:  # training batches only
            rewards[1] = bad_value
        return rewards

    monkeypatch.setattr(backbone, "reward", reward_with_a_bad_sample)
    history = dg.train(cfg, backbone, "diversegrpo", log=_quiet)
    assert "non-finite reward" in capsys.readouterr().err
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["train_reward"]) for r in history[1:])
    assert all(torch.isfinite(p).all() for p in backbone.model.parameters())
    assert any(n for n, p in backbone.model.named_parameters() if "lora_B" in n and p.abs().sum() > 0)


def test_nan_image_features_are_dropped_not_clustered(tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path)
    backbone = dg.ToyBackbone(cfg)

    def features_with_a_nan_row(samples):
        features = samples.clone()
        if len(samples) == cfg.sampling.group_size * cfg.sampling.prompts_per_iter:  # training batches only
            features[0] = float("nan")
        return features

    monkeypatch.setattr(backbone, "features", features_with_a_nan_row)
    history = dg.train(cfg, backbone, "diversegrpo", log=_quiet)
    assert "non-finite reward" in capsys.readouterr().err
    assert [r["dropped_rewards"] for r in history[1:]] == [2, 1]  # iterations 1-2, then 3 (eval_every 2)
    assert all(math.isfinite(r["loss"]) for r in history[1:])


def test_non_finite_loss_skips_the_update(tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path, "train.lr=0.05", "train.eval_every=1")
    backbone = dg.ToyBackbone(cfg)
    real_loss, calls = dg.grpo_loss, []

    def loss_that_fails_in_iteration_2(*args):  # 3 trained steps per iteration
        calls.append(1)
        return real_loss(*args) * (float("nan") if 4 <= len(calls) <= 6 else 1.0)

    monkeypatch.setattr(dg, "grpo_loss", loss_that_fails_in_iteration_2)
    history = dg.train(cfg, backbone, "grpo", log=_quiet)
    assert [r["skipped_updates"] for r in history[1:]] == [0, 1, 0]
    assert "update skipped" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in backbone.model.parameters())


def test_every_update_skipped_stops_with_a_checkpoint(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path, "train.eval_every=2", "methods=[grpo]")
    real_loss = dg.grpo_loss
    monkeypatch.setattr(dg, "grpo_loss", lambda *args: real_loss(*args) * float("nan"))
    with pytest.raises(dg.RunError, match="train.lr") as error:
        dg.train(cfg, dg.ToyBackbone(cfg), "grpo", log=_quiet)
    assert "updates 1-3 all had a non-finite" in str(error.value)
    assert os.listdir(tmp_path / "checkpoints" / "grpo") == ["000003"]  # the weights are still the fresh ones


def test_an_inert_bonus_is_logged_and_warned_about(tmp_path, capsys):
    # A bandwidth far below every distance: the affinity is the identity, the eigengap finds k = 1, E = 1 for all.
    cfg = _tiny_cfg(tmp_path, "diverse.bandwidth=1e-9", "train.eval_every=1", "train.iterations=4")
    history = dg.train(cfg, dg.ToyBackbone(cfg), "bonus_only", log=_quiet)
    assert [r["k1_share"] for r in history[1:]] == [1.0] * 4 and history[-1]["bonus"] == 1.0
    assert capsys.readouterr().err.count("the bonus was constant") == 1  # once, not at every evaluation
    capsys.readouterr()
    cfg = _tiny_cfg(tmp_path / "ok", "train.eval_every=1", "train.iterations=4")
    dg.train(cfg, dg.ToyBackbone(cfg), "bonus_only", log=_quiet)
    assert "the bonus was constant" not in capsys.readouterr().err


# ---- evaluation, the matched-quality table, the toy's figure ----


def test_matched_quality_table_interpolates_and_averages_seeds():
    def curve(*points):
        return [dict(reward=r, diversity=d, vendi=d, modes=m) for r, d, m in points]

    histories = {  # {method: [history of each seed]}
        "grpo": [curve((0.0, 2.0, 8), (1.0, 1.0, 2)), curve((0.0, 2.0, 8), (1.0, 0.0, 1))],
        "diversegrpo": [curve((0.0, 2.0, 8), (1.0, 2.0, 8)), curve((0.0, 2.0, 8), (1.0, 2.0, 8))],
    }
    rows = dg.matched_quality_table(histories, n_levels=2)
    assert [round(r["reward"], 6) for r in rows] == [0.5, 1.0]
    assert rows[0]["grpo"] == pytest.approx((1.5 + 1.0) / 2) and rows[0]["grpo_std"] == pytest.approx(0.25)
    assert rows[0]["diversegrpo_gain"] == pytest.approx(2.0 / 1.25 - 1)
    assert rows[1]["grpo_modes"] == pytest.approx(1.5) and rows[1]["diversegrpo_gain"] == pytest.approx(3.0)
    assert "gain: diversegrpo +60.0%" in dg.format_table(rows, ["grpo", "diversegrpo"])
    alone = dg.format_table(dg.matched_quality_table({"grpo": histories["grpo"]}, n_levels=2), ["grpo"])
    assert "gain" not in alone and len(alone.splitlines()) == 3  # one method: the table, and nothing to gain over
    never = {"grpo": [curve((0.0, 2.0, 8), (1.0, 1.0, 2))], "flat": [curve((0.0, 2.0, 8), (0.0, 2.0, 8))]}
    assert dg.matched_quality_table(never, n_levels=2) == []  # no level above a run that never improved
    one_short = {"grpo": [curve((0.0, 2.0, 8), (1.0, 1.0, 2))], "slow": [curve((0.0, 2.0, 8), (0.6, 2.0, 8))]}
    rows = dg.matched_quality_table(one_short, n_levels=2)  # levels 0.3 and 0.6: both runs reach both
    assert [round(r["reward"], 6) for r in rows] == [0.3, 0.6] and rows[1]["slow_gain"] == pytest.approx(2.0 / 1.4 - 1)


def test_vendi_score_counts_clusters():
    blobs = torch.cat([torch.full((5, 2), float(c)) for c in range(4)]) * 10  # 4 far-apart clusters of 5 points
    assert dg.vendi_score(blobs, bandwidth=1.0) == pytest.approx(4.0, rel=1e-6)
    assert dg.vendi_score(torch.ones(6, 2), bandwidth=1.0) == pytest.approx(1.0)
    unit = torch.eye(3)  # orthogonal embeddings: cosine similarity is the identity
    assert dg.vendi_score(unit, "cosine") == pytest.approx(3.0)


def test_non_finite_evaluation_stops_in_one_line(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path)
    backbone = dg.ToyBackbone(cfg)
    monkeypatch.setattr(backbone, "decode", lambda x: x * float("inf"))
    with pytest.raises(dg.RunError, match="not finite.*train.lr"):
        dg.evaluate(cfg, backbone)


# ---- the real command ----


def _run_cli(*args, timeout=300):
    command = [sys.executable, os.path.join(HERE, "diversegrpo.py"), "--config", CONFIG, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=HERE, timeout=timeout)


def _sets(*overrides):
    return [x for s in overrides for x in ("--set", s)]


def test_toy_command_writes_outputs(tmp_path, capsys):
    dg.main(_sets(*TINY, f"output_dir={tmp_path}", "log.tensorboard=true"))  # the real command runs in test_sigterm_...
    out = capsys.readouterr().out
    assert "Diversity at matched reward" in out and "output_dir = " in out
    assert max(len(line) for line in out.splitlines() if " it " in line) <= 120  # one short metrics line
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all("diversity" in json.loads(line) for line in lines)  # (base + 2 evals) x 2 methods
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["methods"] == ["grpo", "diversegrpo"]
    # Three iterations on a base pretrained for 30 need not improve: the table, or the line that says why there is none.
    table = summary["table"]
    assert (len(table) == 4 and f"{table[0]['reward']:.3f}" in out) if table else "(no reward level above the" in out
    assert (tmp_path / "toy.png").stat().st_size > 10_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"grpo/reward", "diversegrpo/clusters"} <= set(events.Tags()["scalars"]) and "toy" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("diversegrpo/diversity")] == [0, 2, 3]


def test_import_is_light():
    code = "import sys, diversegrpo; print(sorted(m for m in ('diffusers', 'transformers', 'peft', 'sklearn', "
    code += "'dreamsim', 'matplotlib', 'omegaconf') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        dg.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("toy", "ablation", "sd3_pickscore", "flux_pickscore", "sd3_hpsv3"))


# ---- diffusers backbones, on tiny random models (no download) ----

TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
)  # fmt: skip
TINY_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)  # fmt: skip
TINY_IMAGE_RUN = ["model.resolution=32", "sampling.group_size=4", "sampling.prompts_per_iter=1",
                  "sampling.num_steps=3", "sampling.eval_num_steps=2", "sampling.eval_samples=2",
                  "train.iterations=1", "train.eval_every=1", "train.micro_batch=2", "diverse.K=2",
                  "dtype=float32", "device=cpu"]  # fmt: skip


def _tiny_transformer(kind, seed=0):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY_SD3) if kind == "sd3" else FluxTransformer2DModel(**TINY_FLUX)


def _tiny_vae(dtype=torch.float32):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=1.5305, shift_factor=0.0609,
    ).to(dtype)  # fmt: skip


def _tiny_image_backbone(kind, tmp_path, *extra, vae_dtype=torch.float32):
    preset = "sd3_pickscore" if kind == "sd3" else "flux_pickscore"
    cfg = dg.load_config(CONFIG, preset, TINY_IMAGE_RUN + [f"output_dir={tmp_path}", *extra])
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 32), (32,)] * (2 if kind == "sd3" else 1)  # SD3: prompt, pooled, negative prompt, negative pooled
    embeddings = {
        p: tuple(torch.randn(s, generator=g) for s in shapes) for p in cfg.model.prompts + cfg.model.eval_prompts
    }

    def reward(images, prompts):  # a stand-in quality: brightness of the red channel
        return images[:, 0].mean(dim=(1, 2))

    def embed(images):  # a stand-in embedder: the 4x4 thumbnail
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)

    transformer, vae = _tiny_transformer(kind), _tiny_vae(vae_dtype)
    backbone = dg.DiffusersBackbone(
        cfg, transformer, vae, embeddings, reward, embed, cfg.model.prompts, cfg.model.eval_prompts
    )
    return cfg, backbone


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_image_backbone_one_iteration(kind, tmp_path):
    cfg, backbone = _tiny_image_backbone(kind, tmp_path, "train.lr=0.01")
    base = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    x = backbone.noise(2, torch.Generator().manual_seed(5))
    cond = backbone.encode(cfg.model.prompts[:2])
    with torch.no_grad():
        base_velocity = backbone.velocity(x, 0.7, cond)
    history = dg.train(cfg, backbone, "diversegrpo", log=_quiet, name="run")
    record = history[-1]
    assert math.isfinite(record["loss"]) and math.isfinite(record["reg"])
    assert record["ratio"] == pytest.approx(1.0, abs=1e-6)  # recomputed log-probs equal the rollout's
    moved = 0
    for name, value in backbone.model.state_dict().items():
        if "lora_" in name:
            moved += "lora_B" in name and bool(value.abs().sum() > 0)
        else:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    assert moved > 0
    with torch.no_grad(), dg.adapters_disabled(backbone.model):
        assert torch.equal(backbone.velocity(x, 0.7, cond), base_velocity)
    assert (tmp_path / "images" / "run_00001.png").exists()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_image_backbones_follow_flow_grpos_recipe(kind, tmp_path):
    """LoRA on attn.* of both streams (not SD3.5's attn2), Gaussian A, a frozen base, a float32 VAE, no cuDNN SDPA."""
    _, backbone = _tiny_image_backbone(kind, tmp_path, vae_dtype=torch.bfloat16)
    model = backbone.model
    assert not any(p.requires_grad for p in model.parameters())  # frozen at load, before any LoRA
    assert all(p.dtype == torch.float32 for p in backbone.vae.parameters())
    images = backbone.decode(backbone.noise(1, torch.Generator().manual_seed(0)))
    assert images.dtype == torch.float32 and images.shape == (1, 3, 32, 32)
    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in linear if any(n.endswith(f".{target}") for target in dg.LORA_TARGETS)}
    dg.add_lora(model, 4, 8, backbone.lora_targets)
    wrapped = {name for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == expected and not any(".attn2." in n for n in wrapped)
    if kind == "sd3":
        assert any(".attn2." in n for n in linear) and len(wrapped) == 8 + 7  # the last block has no to_add_out
    else:  # both streams: the double-stream blocks and the single-stream ones
        assert any(n.startswith("single_transformer_blocks") for n in wrapped)
        assert any(n.startswith("transformer_blocks") and "add_q_proj" in n for n in wrapped)
    lora_a = torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_A" in n])
    assert abs(lora_a.std().item() - 1 / 4) < 0.05  # peft's "gaussian": N(0, 1/r), not Kaiming-uniform
    seen = []
    model.register_forward_hook(lambda *args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    with torch.no_grad():
        backbone.velocity(backbone.noise(1, torch.Generator()), 0.5, backbone.encode(backbone.prompts[:1]))
    assert seen == [False] and torch.backends.cuda.cudnn_sdp_enabled()  # off inside the forward only


def test_compiled_blocks_train_without_falling_back_to_eager(tmp_path, monkeypatch):
    """Regional compile (aot_eager here: no C++ compiler needed) through sampling, the reference and training."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)  # fall back to eager: an error
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    cfg, backbone = _tiny_image_backbone("sd3", tmp_path, "model.compile=aot_eager", "train.lr=0.01")
    x, cond = backbone.noise(2, torch.Generator().manual_seed(0)), backbone.encode(cfg.model.prompts[:2])
    with torch.no_grad():
        eager_velocity = dg.sd3_velocity(_tiny_transformer("sd3"), x, 0.5, cond, 4.5)  # the same weights, eager
    history = dg.train(cfg, backbone, "diversegrpo", log=_quiet)
    assert history[-1]["ratio"] == pytest.approx(1.0, abs=1e-6) and math.isfinite(history[-1]["loss"])
    with torch.no_grad(), dg.adapters_disabled(backbone.model):
        torch.testing.assert_close(backbone.velocity(x, 0.5, cond), eager_velocity)


def test_gpu_benchmark_script_runs_on_tiny_models(capsys):
    """.ci/gpu_check.py's CPU smoke test: both models, one setting, the phase tables and a JSON line per model."""
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(HERE, ".ci", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--tiny", "--settings", "nockpt"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out[-2000:]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and all(math.isfinite(line["iter_seconds"][-1]) for line in lines), out[-2000:]
    assert "TFLOP/s" in out and "training" in out


def test_prompts_are_encoded_at_t5_length_128(tmp_path, monkeypatch):
    import diffusers

    calls = []

    class StubPipeline:  # stands in for StableDiffusion3Pipeline.from_pretrained: records how prompts are encoded
        transformer, vae = _tiny_transformer("sd3"), _tiny_vae()

        @classmethod
        def from_pretrained(cls, name, dtype):
            return cls()

        def to(self, device):
            return self

        def encode_prompt(self, prompt, **kwargs):
            calls.append(kwargs["max_sequence_length"])
            return torch.zeros(1, 7, 32), torch.zeros(1, 7, 32), torch.zeros(1, 32), torch.zeros(1, 32)

    monkeypatch.setattr(diffusers, "StableDiffusion3Pipeline", StubPipeline)
    monkeypatch.setattr(dg, "load_reward", lambda cfg: None)
    monkeypatch.setattr(dg, "load_dreamsim", lambda cfg: None)
    cfg = dg.load_config(CONFIG, "sd3_pickscore", TINY_IMAGE_RUN + [f"output_dir={tmp_path}"])
    backbone = dg.load_diffusers_backbone(cfg)
    assert calls and set(calls) == {128} and len(backbone.prompt_embeddings) == len(calls)


def test_flux_packing_round_trip():
    x = torch.randn(2, 16, 8, 6)
    packed = dg.pack_latents(x)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(dg.unpack_latents(packed, 8, 6), x)


def test_schedules_equal_diffusers_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(dg.flow_match_sigmas(10, 3.0), scheduler.sigmas.float(), atol=1e-6, rtol=0)
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    flux.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=calculate_shift(1024, 256, 4096, 0.5, 1.15))
    torch.testing.assert_close(dg.flux_sigmas(6, 1024), flux.sigmas.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_round_trip_through_diffusers_loader(kind, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    cfg, backbone = _tiny_image_backbone(kind, tmp_path, "train.lr=0.05")
    dg.train(cfg, backbone, "grpo", log=_quiet)
    backbone.save_lora(str(tmp_path / "lora"))
    fresh = _tiny_transformer(kind)  # the same base weights (same seed), no adapter yet
    pipeline_class = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    empty = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if kind == "sd3":
        empty.update(text_encoder_3=None, tokenizer_3=None)
    pipe = pipeline_class(transformer=fresh, scheduler=FlowMatchEulerDiscreteScheduler(), **empty)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x, cond = backbone.noise(2, torch.Generator().manual_seed(1)), backbone.encode(cfg.model.prompts[:2])
    velocity = dg.flux_velocity if kind == "flux" else dg.sd3_velocity
    with torch.no_grad():
        trained = velocity(backbone.model, x, 0.5, cond, 3.0)
        loaded = velocity(fresh, x, 0.5, cond, 3.0)
        with dg.adapters_disabled(fresh):
            assert not torch.equal(velocity(fresh, x, 0.5, cond, 3.0), loaded)  # the adapter does something
    assert torch.equal(trained, loaded)


def test_lora_weights_stay_float32_in_a_bf16_model(tmp_path):
    cfg, backbone = _tiny_image_backbone("sd3", tmp_path, "dtype=bfloat16", "train.lr=0.01")
    backbone.model.to(torch.bfloat16)
    history = dg.train(cfg, backbone, "diversegrpo", log=_quiet)
    lora = [p for n, p in backbone.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert math.isfinite(history[-1]["loss"]) and any(p.abs().sum() > 0 for p in lora)


# ---- rewards and the embedder ----


def _write_random_dreamsim_cache(cache_dir):
    """The files dreamsim's clip_vitb32 loader looks for, filled with random weights of the right shapes."""
    from dreamsim.config import dreamsim_args
    from dreamsim.feature_extraction.vision_transformer import vit_base
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    vit = vit_base(patch_size=32)
    vit.pos_drop = torch.nn.LayerNorm(768)  # dreamsim's CLIP backbone keeps its pre-norm there
    state = {k: torch.randn_like(v) * 0.02 if v.ndim > 1 else v.clone() for k, v in vit.state_dict().items()}
    state["proj"] = torch.randn(768, 512) / 768**0.5
    torch.save({"state_dict": state}, os.path.join(cache_dir, "clip_vitb32_pretrain.pth.tar"))
    model = PerceptualModel(**dreamsim_args["model_config"]["clip_vitb32"], load_dir=str(cache_dir), device="cpu")
    lora = LoraConfig(r=16, lora_alpha=0.5, bias="none", target_modules=["qkv"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(os.path.join(cache_dir, "clip_vitb32_single_lora"))


def test_dreamsim_embeddings_give_dreamsims_own_distance(tmp_path):
    from dreamsim import dreamsim

    _write_random_dreamsim_cache(tmp_path)
    cfg = dg.load_config(
        CONFIG, "sd3_pickscore", ["device=cpu", f"model.dreamsim_cache={tmp_path}", "model.dreamsim_type=clip_vitb32"]
    )
    embed = dg.load_dreamsim(cfg)
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    distances = dg.pairwise_distances(embed(images), "cosine")  # (3, 3) from 3 embeddings
    model, _ = dreamsim(pretrained=True, device="cpu", cache_dir=str(tmp_path), dreamsim_type="clip_vitb32")
    with torch.no_grad():
        own = model(images[[0, 0, 1]], images[[1, 2, 2]])  # dreamsim's own distance for each pair
    torch.testing.assert_close(distances[[0, 0, 1], [1, 2, 2]], own, atol=1e-5, rtol=0)


def test_pickscore_reward_path_with_tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(characters)} | {c + "</w>": i + 256 for i, c in enumerate(characters)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}  # a character-level CLIP tokenizer, built offline
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=32)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "m")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path / "p")
    cfg = dg.load_config(
        CONFIG,
        "sd3_pickscore",
        ["device=cpu", f"model.reward_model={tmp_path / 'm'}", f"model.reward_processor={tmp_path / 'p'}"],
    )
    reward = dg.load_reward(cfg)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a dog", "a lighthouse at dusk"]
    scores = reward(images, prompts)
    # Independently: the transformers processor and the model's own logits, divided by 26.
    model, processor = CLIPModel.from_pretrained(tmp_path / "m"), CLIPProcessor.from_pretrained(tmp_path / "p")
    inputs = processor(text=prompts, images=list(images), do_rescale=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diag() / 26
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_hpsv3_reward_path_with_a_stub_package(tmp_path, monkeypatch):
    import importlib.machinery
    import types

    from PIL import Image

    seen = {}

    class StubInferencer:  # the hpsv3 API: reward(images, prompts) -> (B, 2) of (mu, sigma)
        def __init__(self, device):
            seen["device"] = device

        def reward(self, images, prompts):
            seen["types"] = {type(image) for image in images}
            return torch.tensor([[float(len(p)), 1.0] for p in prompts])

    stub = types.ModuleType("hpsv3")
    stub.__spec__ = importlib.machinery.ModuleSpec("hpsv3", None)
    stub.HPSv3RewardInferencer = StubInferencer
    monkeypatch.setitem(sys.modules, "hpsv3", stub)
    cfg = dg.load_config(CONFIG, "sd3_hpsv3", ["device=cpu", "train.micro_batch=2"])
    scores = dg.load_reward(cfg)(torch.rand(3, 3, 8, 8), ["a", "bb", "ccc"])
    assert scores.tolist() == [1.0, 2.0, 3.0] and seen["types"] == {Image.Image} and seen["device"] == "cpu"


# ---- checkpoints, resume, and the output folder ----


def _metrics(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in ("iter_seconds", "peak_gpu_gb")} for record in lines]


def _files(folder):
    """Every file under a folder (but the empty lock file) and its bytes: did a refused start change anything?"""
    return {
        p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def test_checkpoints_are_written_and_pruned(tmp_path):
    cfg = _tiny_cfg(tmp_path, "train.iterations=3", "train.save_every=1", "train.keep_checkpoints=2")
    dg.train(cfg, dg.ToyBackbone(cfg), "grpo", log=_quiet)
    root = tmp_path / "checkpoints" / "grpo"
    assert sorted(os.listdir(root)) == ["000002", "000003"]
    state = torch.load(root / "000003" / "training_state.pt", weights_only=False)
    assert state["iteration"] == 3 and state["history"][-1]["iteration"] == 3
    assert any("lora_B" in k for k in state["lora"]) and not list(root.glob("*.partial"))


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    extra = ["train.iterations=5", "train.eval_every=1", "train.save_every=2", "methods=[grpo,diversegrpo]"]
    dg.run(_tiny_cfg(tmp_path / "straight", *extra))
    real_loss, calls = dg.grpo_loss, []

    def interrupt_in_iteration_4_of_the_second_method(*args):  # 3 trained steps an iteration, 5 iterations a method
        calls.append(1)
        if len(calls) == 15 + 10:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(dg, "grpo_loss", interrupt_in_iteration_4_of_the_second_method)
    with pytest.raises(KeyboardInterrupt):
        dg.run(_tiny_cfg(tmp_path / "interrupted", *extra))
    assert sorted(os.listdir(tmp_path / "interrupted" / "checkpoints" / "diversegrpo-seed0")) == ["000002", "000003"]
    monkeypatch.setattr(dg, "grpo_loss", real_loss)
    dg.run(_tiny_cfg(tmp_path / "interrupted", *extra, "resume=true"))
    assert _metrics(tmp_path / "interrupted" / "metrics.jsonl") == _metrics(tmp_path / "straight" / "metrics.jsonl")


def test_a_process_that_trained_no_sample_still_joins_the_gradient_average():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        param = torch.nn.Parameter(torch.ones(3))  # no backward ran: its .grad is None
        grad_norm = dg.optimizer_step(torch.optim.SGD([param], lr=0.1), [param], max_grad_norm=1.0)
        assert grad_norm == 0.0 and torch.equal(param.grad, torch.zeros(3)) and torch.equal(param.data, torch.ones(3))
    finally:
        torch.distributed.destroy_process_group()


def test_out_of_memory_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    def allocate_too_much(cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 4e13 bytes")

    monkeypatch.setattr(dg, "run", allocate_too_much)
    with pytest.raises(SystemExit) as exit_info:
        dg.main(["--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and err[0].startswith("error: out of memory"), err
    monkeypatch.setattr(dg, "run", lambda cfg: 1 / 0)  # any other error is a bug: its traceback stays
    with pytest.raises(ZeroDivisionError):
        dg.main(["--set", f"output_dir={tmp_path / 'other'}"])


def test_an_output_folder_spelled_another_way_or_moved_is_the_same_run(tmp_path, monkeypatch):
    dg.main(["--set", f"output_dir={tmp_path / 'a'}", *_sets(*TINY, "methods=[grpo]", "train.save_every=3")])
    os.rename(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    overrides = [*TINY, "methods=[grpo]", "train.save_every=3", "output_dir=./b/", "resume=true"]
    dg.check_previous_run(dg.load_config(CONFIG, "toy", overrides))  # no error


@pytest.mark.parametrize(
    "damage, needle",
    [("[1, 2]", "config.json holds no config"), ("{", "unreadable config.json"), (None, "but no config.json")],
)
def test_a_damaged_config_json_beside_checkpoints_is_refused(damage, needle, tmp_path):
    dg.main(["--set", f"output_dir={tmp_path}", *_sets(*TINY, "methods=[grpo]", "train.save_every=3")])
    os.remove(tmp_path / "config.json")
    if damage is not None:
        (tmp_path / "config.json").write_text(damage)
    with pytest.raises(dg.ConfigError, match=needle):
        dg.check_previous_run(_tiny_cfg(tmp_path, "methods=[grpo]", "train.save_every=3", "resume=true"))


def test_a_checkpoint_of_other_shapes_is_one_line(tmp_path):
    cfg = _tiny_cfg(tmp_path, "train.save_every=3")
    dg.train(cfg, dg.ToyBackbone(cfg), "grpo", log=_quiet)
    wider = _tiny_cfg(tmp_path, "train.save_every=3", "resume=true", "train.lora_rank=2")  # config.json edited by hand
    with pytest.raises(dg.RunError, match="other tensor shapes"):
        dg.train(wider, dg.ToyBackbone(wider), "grpo", log=_quiet)


def test_turning_tensorboard_on_does_not_make_another_run(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    dg.check_previous_run(_tiny_cfg(tmp_path, "log.tensorboard=true"))  # no error
    with pytest.raises(dg.ConfigError, match="train.lr"):
        dg.check_previous_run(_tiny_cfg(tmp_path, "train.lr=1e-3"))


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    real_loss = dg.grpo_loss

    def signal_twice_inside_an_update(*args):  # the second signal raises here, mid-iteration
        dg._ask_to_stop(signal.SIGINT, None)
        dg._ask_to_stop(signal.SIGINT, None)
        return real_loss(*args)

    monkeypatch.setattr(dg, "grpo_loss", signal_twice_inside_an_update)
    try:
        with pytest.raises(KeyboardInterrupt):
            dg.run(_tiny_cfg(tmp_path, "methods=[grpo]"))
    finally:
        dg.STOP_SIGNALS.clear()
    assert not (tmp_path / "checkpoints").exists() and "no checkpoint written" in capsys.readouterr().err


def test_a_signal_outside_training_stops_at_once(tmp_path, monkeypatch, capsys):
    real_build = dg.build_backbone

    def ctrl_c_while_loading(cfg):  # as main()'s handler gets it, while the model loads (or the toy pretrains)
        dg._ask_to_stop(signal.SIGINT, None)
        return real_build(cfg)

    monkeypatch.setattr(dg, "build_backbone", ctrl_c_while_loading)
    with pytest.raises(SystemExit) as exit_info:
        dg.main(["--set", f"output_dir={tmp_path}", *_sets(*TINY, "train.save_every=1")])
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "error: interrupted"
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_finished_run_can_be_extended(tmp_path, capsys):
    short = ["methods=[grpo]", "train.save_every=1", "train.eval_every=1"]
    dg.run(_tiny_cfg(tmp_path / "straight", *short, "train.iterations=5"))
    dg.main(["--set", f"output_dir={tmp_path / 'extended'}", *_sets(*TINY, *short)])
    dg.main(
        ["--set", f"output_dir={tmp_path / 'extended'}", *_sets(*TINY, *short, "train.iterations=5", "resume=true")]
    )
    assert _metrics(tmp_path / "extended" / "metrics.jsonl") == _metrics(tmp_path / "straight" / "metrics.jsonl")
    with pytest.raises(SystemExit) as exit_info:  # anything but the length, evaluation and saving is still refused
        dg.main(["--set", f"output_dir={tmp_path / 'extended'}", *_sets(*TINY, *short, "train.lr=1", "resume=true")])
    assert exit_info.value.code == 2 and "train.lr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # nor fewer iterations than the checkpoints have done
        dg.main(["--set", f"output_dir={tmp_path / 'extended'}", *_sets(*TINY, *short, "resume=true")])
    assert exit_info.value.code == 2 and "train.iterations: 3, but" in capsys.readouterr().err


def test_saving_an_iteration_again_keeps_the_checkpoint_there(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path)
    backbone = dg.ToyBackbone(cfg)
    params = dg.add_lora(backbone.model, cfg.train.lora_rank, cfg.train.lora_alpha, backbone.lora_targets)
    optimizer = torch.optim.AdamW(params)
    first = dg.save_checkpoint(cfg, backbone, optimizer, "grpo", 2, history=[])
    saves = []
    monkeypatch.setattr(torch, "save", lambda *args: saves.append(args))  # a stop right after save_every
    assert dg.save_checkpoint(cfg, backbone, optimizer, "grpo", 2, history=[]) == first
    assert saves == [] and os.listdir(os.path.dirname(first)) == ["000002"]  # never removed, not even for a moment


def test_resume_with_nothing_to_resume_starts_fresh(tmp_path, capsys):
    cfg = _tiny_cfg(tmp_path, "resume=true")
    history = dg.train(cfg, dg.ToyBackbone(cfg), "grpo", log=_quiet)
    assert len(history) == 3 and "nothing to resume for grpo" in capsys.readouterr().out


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    args = ["--set", f"output_dir={tmp_path / 'run'}", *_sets(*TINY, "methods=[grpo]", "train.save_every=1")]
    dg.main(args)
    dg.run(_tiny_cfg(tmp_path / "straight", "methods=[grpo]", "train.save_every=1"))
    root = tmp_path / "run" / "checkpoints" / "grpo-seed0"
    newest = root / "000003" / "training_state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a crash halfway through a copy
    capsys.readouterr()
    dg.main([*args, "--set", "resume=true"])  # resumes from 000002 and redoes iteration 3
    assert f"unreadable checkpoint {newest}" in capsys.readouterr().err
    assert _metrics(tmp_path / "run" / "metrics.jsonl") == _metrics(tmp_path / "straight" / "metrics.jsonl")
    for folder in root.iterdir():  # now every checkpoint is unreadable: one line, exit 1, the run's files untouched
        if folder.name.isdigit():
            (folder / "training_state.pt").write_bytes(b"")
    before = _files(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        dg.main([*args, "--set", "resume=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        exit_info.value.code == 1
        and err[-1].startswith("error: no readable checkpoint")
        and f"delete {root}" in err[-1]
    )
    assert {k: v for k, v in _files(tmp_path / "run").items() if "checkpoints" not in str(k)} == {
        k: v for k, v in before.items() if "checkpoints" not in str(k)
    }


def test_a_corrupt_toy_cache_is_rebuilt(tmp_path, capsys):
    cfg = _tiny_cfg(tmp_path)
    first = dg.ToyBackbone(cfg)
    (cache,) = tmp_path.glob("toy_base_*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    again = dg.ToyBackbone(cfg)
    assert "unreadable toy base cache" in capsys.readouterr().err
    assert torch.equal(first.model.fc1.weight, again.model.fc1.weight)  # rebuilt: the same seed, the same base
    dg.ToyBackbone(cfg)
    assert "unreadable" not in capsys.readouterr().err  # and written back


def test_toy_base_cache_depends_on_seed_and_settings(tmp_path):
    a = dg.ToyBackbone(_tiny_cfg(tmp_path))
    b = dg.ToyBackbone(_tiny_cfg(tmp_path, "seed=1"))
    c = dg.ToyBackbone(_tiny_cfg(tmp_path, "toy.hidden=16"))
    assert len(list(tmp_path.glob("toy_base_*.pt"))) == 3
    assert not torch.equal(a.model.fc1.weight, b.model.fc1.weight) and c.model.fc1.weight.shape[0] == 16


def test_refused_starts_leave_an_earlier_run_as_it_was(tmp_path, capsys):
    run = tmp_path / "run"
    dg.run(_tiny_cfg(run, "methods=[grpo]", "train.save_every=3"))
    before = _files(run)
    refusals = {  # extra arguments: a word of the one-line error
        ("--set", "methods=[grpo]"): "another config",  # the TINY settings differ
        ("--set", "seed=-1"): "seed",
        tuple(_sets(*TINY, "methods=[grpo]", "train.save_every=3")): "resume=true",  # checkpoints, no resume
    }
    for extra, needle in refusals.items():
        with pytest.raises(SystemExit) as exit_info:
            dg.main(["--set", f"output_dir={run}", *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert _files(run) == before
    import fcntl

    with open(run / ".lock", "a") as lock:  # another run holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_info:
            dg.main(
                ["--set", f"output_dir={run}", *_sets(*TINY, "methods=[grpo]", "train.save_every=3", "resume=true")]
            )
    assert exit_info.value.code == 2 and "in use by another run" in capsys.readouterr().err
    assert _files(run) == before


def test_sigterm_checkpoints_and_resumes_to_the_same_metrics(tmp_path):
    import signal
    import time

    overrides = [*TINY, "methods=[grpo]", "train.iterations=40", "train.eval_every=1"]
    command = [sys.executable, os.path.join(HERE, "diversegrpo.py"), *_sets(*overrides, f"output_dir={tmp_path}")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=HERE)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in err
    (checkpoint,) = os.listdir(tmp_path / "checkpoints" / "grpo-seed0")
    assert 2 <= int(checkpoint) < 40
    dg.run(dg.load_config(CONFIG, "toy", [*overrides, f"output_dir={tmp_path}", "resume=true"]))
    dg.run(dg.load_config(CONFIG, "toy", [*overrides, f"output_dir={tmp_path / 'straight'}"]))
    assert _metrics(metrics) == _metrics(tmp_path / "straight" / "metrics.jsonl")  # also: a fresh process, same run


# ---- bad input: one line, exit status 2, nothing written ----


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # a lone surrogate writes a byte that is not UTF-8
    return str(path)


BAD_INPUTS = {  # name: (extra command-line arguments, a word the one-line error must contain)
    "missing config file": (["--config", "/nonexistent.yaml"], "not found"),
    "a folder as config": (["--config", "/tmp"], "is a directory"),
    "invalid yaml": (["--config", "INVALID_YAML"], "invalid YAML"),
    "non-UTF-8 config file": (["--config", "BINARY_YAML"], "invalid YAML"),
    "unknown preset": (["--preset", "nope"], "unknown preset 'nope'"),
    "a base that does not exist": (["--config", "BAD_BASE_YAML"], "unknown preset 'nowhere'"),
    "an analysis preset": (["--preset", "ablation"], "analyses/paper_analyses.py"),
    "unknown top-level key": (["--set", "learning_rate=1"], "learning_rate"),
    "unknown nested key": (["--config", "NESTED_YAML"], "train.lrr"),
    "unknown section": (["--set", "optim.lr=1"], "optim"),
    "dunder key": (["--set", "sampling.__class__=1"], "sampling.__class__"),
    "override without =": (["--set", "train.lr"], "key=value"),
    "wrong type": (["--set", "train.iterations=1.5"], "train.iterations"),
    "a list for a number": (["--set", "diverse.n_clusters=[2]"], "diverse.n_clusters"),
    "a number for a section": (["--set", "train=3"], "--set train=3"),
    "a number for a section in YAML": (["--config", "SECTION_YAML"], "preset 'toy'"),
    "negative seed": (["--set", "seed=-1"], "seed"),
    "seed past 2**32": (["--set", "seed=4294967296"], "seed"),
    "a huge seed": (["--set", "seed=99999999999999999999"], "seed"),
    "negative learning rate": (["--set", "train.lr=-0.1"], "train.lr"),
    "not-a-number learning rate": (["--set", "train.lr=nan"], "train.lr"),
    "noise level too high": (["--set", "sampling.noise_level=2.0"], "sampling.noise_level"),
    "noise level zero (no SDE to train)": (["--set", "sampling.noise_level=0"], "sampling.noise_level"),
    "K above the steps": (["--set", "diverse.K=11"], "diverse.K"),
    "group of one": (["--set", "sampling.group_size=1"], "sampling.group_size"),
    "a group too large to cluster": (["--set", "sampling.group_size=100000", "--set", "methods=[diversegrpo]"], "GB"),
    "too many evaluation samples": (["--set", "sampling.eval_samples=100000"], "sampling.eval_samples"),
    "one evaluation sample": (["--set", "sampling.eval_samples=1"], "sampling.eval_samples"),
    "n_clusters not below the group": (["--set", "diverse.n_clusters=24"], "diverse.n_clusters"),
    "n_clusters a word": (["--set", "diverse.n_clusters=many"], "diverse.n_clusters"),
    "unknown method": (["--set", "methods=[grpo,ppo]"], "methods"),
    "unknown experiment": (["--set", "experiment=fancy"], "experiment"),
    "a method twice": (["--set", "methods=[grpo,grpo]"], "methods"),
    "grpo_kl without a KL weight": (["--set", "methods=[grpo_kl]"], "train.kl_beta"),
    "empty output_dir": (["--set", "output_dir="], "output_dir"),
    "output_dir is a file": (["--set", "output_dir=A_FILE"], "is a file"),
    "output_dir cannot be written": (["--set", "output_dir=/proc/diversegrpo"], "cannot write"),
    "toy on a GPU": (["--set", "device=cuda"], "device"),
    "toy in bfloat16": (["--set", "dtype=bfloat16"], "dtype"),
    "a device torch does not know": (["--preset", "sd3_pickscore", "--set", "device=gpu"], "device"),
    "an infinite bonus weight": (["--set", "diverse.beta=inf"], "diverse.beta"),
    "an infinite regularizer weight": (["--set", "diverse.lambda_w=inf"], "diverse.lambda_w"),
    "an infinite guidance scale": (
        ["--preset", "sd3_pickscore", "--set", "model.guidance_scale=-inf"],
        "guidance_scale",
    ),
    "a huge LoRA rank": (["--set", "train.lora_rank=100000000"], "train.lora_rank"),
    "a huge toy network": (["--set", "toy.hidden=10000000"], "toy.hidden"),
    "an analysis set on the command line": (["--set", "experiment=ablation"], "--set experiment=ablation"),
    "unknown dtype": (["--preset", "sd3_pickscore", "--set", "dtype=foo"], "dtype"),
    "missing prompts file": (["--preset", "sd3_pickscore", "--set", "model.prompts_file=/nope.txt"], "prompts_file"),
    "empty prompts file": (["--preset", "sd3_pickscore", "--set", "model.prompts_file=EMPTY_FILE"], "no prompts"),
    "non-UTF-8 prompts file": (["--preset", "sd3_pickscore", "--set", "model.prompts_file=BINARY_YAML"], "unreadable"),
    "a method list of lists": (["--set", "methods=[[grpo]]"], "methods"),
    "a save interval below 0": (["--set", "train.save_every=-1"], "train.save_every: must be not negative, got -1"),
    "a bad analysis seed": (["--set", "analysis.seeds=[a]"], "analysis.seeds"),
    "resolution not a multiple of 16": (["--preset", "sd3_pickscore", "--set", "model.resolution=500"], "resolution"),
    "hpsv3 not installed": (["--preset", "sd3_hpsv3"], "hpsv3"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_2(name, tmp_path, capsys):
    args, needle = BAD_INPUTS[name]
    replacements = {
        "INVALID_YAML": _write(tmp_path, "invalid.yaml", "toy: [unclosed\n"),
        "NESTED_YAML": _write(tmp_path, "nested.yaml", "toy:\n  train:\n    lrr: 1\n"),
        "SECTION_YAML": _write(tmp_path, "section.yaml", "toy:\n  train: 3\n"),
        "BAD_BASE_YAML": _write(tmp_path, "base.yaml", "toy:\n  base: nowhere\n"),
        "BINARY_YAML": _write(tmp_path, "binary.yaml", "toy:\n  seed: \udcff\n"),
        "model.prompts_file=BINARY_YAML": f"model.prompts_file={_write(tmp_path, 'binary.txt', chr(0xDCFF) * 3)}",
        "model.prompts_file=EMPTY_FILE": f"model.prompts_file={_write(tmp_path, 'empty.txt', chr(10) * 3)}",
        "output_dir=A_FILE": f"output_dir={_write(tmp_path, 'a_file', 'not a folder')}",
    }
    args = [replacements.get(a, a) for a in args]
    config = [] if "--config" in args else ["--config", CONFIG]
    out = tmp_path / "out"
    sets_output = any(a.startswith("output_dir=") for a in args)
    with pytest.raises(SystemExit) as exit_info:
        dg.main(config + ([] if sets_output else ["--set", f"output_dir={out}"]) + args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert not out.exists()  # nothing written


def test_diverging_training_stops_in_one_line_with_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dg.main(["--set", f"output_dir={tmp_path}", *_sets(*TINY, "train.lr=1e6", "methods=[grpo]")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and err[-1].startswith("error: ") and "train.lr" in err[-1], err
    with open(tmp_path / ".lock") as f:  # main() let go of the folder, though pytest keeps its exception
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_full_disk_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    def full_disk(cfg):
        raise OSError(28, "No space left on device", str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(dg, "run", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        dg.main(["--set", f"output_dir={tmp_path}", *_sets(*TINY)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and err == [
        f"error: [Errno 28] No space left on device: '{tmp_path}/metrics.jsonl'"
    ]


def test_a_real_preset_without_weights_fails_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dg.main(
            [
                "--preset",
                "sd3_pickscore",
                *_sets("model.pretrained=/nonexistent/sd3", "device=cpu", f"output_dir={tmp_path}"),
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: could not load the sd3 weights '/nonexistent/sd3'")


# ---- many processes: torchrun with the gloo backend on the CPU ----


def _update_worker(rank, world, folder):
    """One process of the data-parallel update: its half of the saved batch, then the all-reduced optimizer step."""
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    batch = torch.load(os.path.join(folder, "batch.pt"), weights_only=False)  # it holds the config
    cfg, rows = batch["cfg"], torch.arange(len(batch["adv"])).chunk(world)[rank]
    backbone = dg.ToyBackbone(cfg)
    torch.manual_seed(cfg.seed)
    params = dg.add_lora(backbone.model, cfg.train.lora_rank, cfg.train.lora_alpha, backbone.lora_targets)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    cond = backbone.encode([batch["prompts"][i] for i in rows])
    latents, old_log_probs, adv = batch["latents"][rows], batch["old_log_probs"][rows], batch["adv"][rows]
    chunks = torch.arange(len(rows)).split(4)  # micro-batches too
    sigmas = backbone.sigmas(cfg.sampling.num_steps)
    dg.policy_update(cfg, backbone, dg.METHODS["diversegrpo"], cond, latents, old_log_probs, adv, sigmas, chunks)
    dg.optimizer_step(optimizer, params, cfg.train.max_grad_norm)
    if rank == 0:
        torch.save([p.detach() for p in params], os.path.join(folder, f"params_{world}.pt"))
    if world > 1:
        dist.destroy_process_group()


def test_two_processes_make_the_same_update_as_one(tmp_path):
    import torch.multiprocessing as mp

    cfg = _tiny_cfg(tmp_path, "train.lr=0.05", "sampling.prompts_per_iter=2")
    backbone, G = dg.ToyBackbone(cfg), cfg.sampling.group_size
    prompts = [p for p in dg.TOY_PROMPTS for _ in range(G)]  # one prompt per process, the same 2 in one process
    generator = torch.Generator().manual_seed(0)
    sigmas, chunks = backbone.sigmas(cfg.sampling.num_steps), [torch.arange(2 * G)]
    cond, noise = backbone.encode(prompts), backbone.noise(2 * G, generator)
    latents, old_log_probs, samples = dg.sample_batch(backbone, cond, noise, sigmas, 0.7, chunks, generator)
    adv = dg.group_advantages(backbone.reward(samples, prompts).reshape(2, G)).reshape(-1)
    batch = dict(cfg=cfg, prompts=prompts, latents=latents, old_log_probs=old_log_probs, adv=adv)
    torch.save(batch, tmp_path / "batch.pt")
    _update_worker(0, 1, str(tmp_path))
    mp.spawn(_update_worker, args=(2, str(tmp_path)), nprocs=2)
    one, two = torch.load(tmp_path / "params_1.pt"), torch.load(tmp_path / "params_2.pt")
    assert any(p.abs().sum() > 0 for p in one[1::2])  # the B matrices moved
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _agreement_worker(rank, world, folder):
    """One of two processes. Process 0 refuses the output folder, and only process 1 got a SIGTERM: both must stop."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    seen = []
    try:
        dg.claim_output_dir_on_process_0(dg.load_config(CONFIG, "toy", [*TINY, f"output_dir={folder}/out", "seed=1"]))
    except dg.ConfigError as e:
        seen.append(str(e))
    dg.STOP_SIGNALS[:] = [signal.SIGTERM] if rank == 1 else []
    try:
        dg.stop_if_asked()
    except dg.Terminated:
        seen.append("terminated")
    dg.STOP_SIGNALS.clear()
    dg.write_json(os.path.join(folder, f"seen_{rank}.json"), seen)
    dist.destroy_process_group()


def test_processes_agree_to_refuse_a_start_and_to_stop(tmp_path):
    import torch.multiprocessing as mp

    (tmp_path / "out").mkdir()  # a folder that holds another run (seed 0): process 0 refuses it
    dg.write_json(str(tmp_path / "out" / "config.json"), dataclasses.asdict(_tiny_cfg(tmp_path / "out")))
    mp.spawn(_agreement_worker, args=(2, str(tmp_path)), nprocs=2)
    seen = [json.load(open(tmp_path / f"seen_{rank}.json")) for rank in (0, 1)]
    assert seen[0] == seen[1] and "differs in: seed" in seen[0][0] and seen[0][1] == "terminated", seen


def test_torchrun_writes_one_metrics_file_and_resumes(tmp_path):
    overrides = [
        *TINY,
        "sampling.prompts_per_iter=1",
        "methods=[diversegrpo]",
        "train.save_every=2",
        "train.eval_every=1",
        "train.iterations=2",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, os.path.join(HERE, "diversegrpo.py"), *_sets(*overrides, f"output_dir={tmp_path}")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [0, 1, 2] and all(math.isfinite(r["loss"]) for r in records[1:])
    assert os.listdir(tmp_path / "checkpoints" / "diversegrpo-seed0") == ["000002"]
    # The checkpoint resumes (here in one process, extended by an iteration): the metrics so far come back unchanged.
    dg.run(dg.load_config(CONFIG, "toy", [*overrides, f"output_dir={tmp_path}", "train.iterations=3", "resume=true"]))
    assert [r["iteration"] for r in _metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert _metrics(tmp_path / "metrics.jsonl")[:3] == records


def test_bad_process_setups_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # 3 processes x 1 prompt each, but the toy has 2 prompts
    with pytest.raises(dg.ConfigError, match="sampling.prompts_per_iter"):
        _tiny_cfg(tmp_path, "sampling.prompts_per_iter=1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU for two processes
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = dg.load_config(CONFIG, "sd3_pickscore", ["device=cuda", "sampling.prompts_per_iter=1"])
    with pytest.raises(dg.ConfigError, match="GPU per process"):
        dg.setup_processes(cfg)


# ---- the paper's analyses (analyses/paper_analyses.py), each with tiny settings ----


def _run_analysis(preset, tmp_path, *extra):
    """main() in-process on a preset of configs.yaml; returns (summary.json, metrics.jsonl records)."""
    argv = ["--config", CONFIG, "--preset", preset, "--set", f"output_dir={tmp_path}"]
    for override in TINY + list(extra):
        argv += ["--set", override]
    pa.main(argv)
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["experiment"] == preset and summary["wall_seconds"] > 0
    assert records and all("run" in r and "seed" in r for r in records)
    return summary, records


def test_ablation_runs_every_method_on_every_seed(tmp_path):
    summary, records = _run_analysis("ablation", tmp_path, "analysis.seeds=[0,1]", "methods=[grpo,bonus_only,reg_only]")
    assert (tmp_path / "toy.png").stat().st_size > 5_000
    assert {(r["run"], r["seed"]) for r in records} == {
        (m, s) for m in ("grpo", "bonus_only", "reg_only") for s in (0, 1)
    }
    assert [len(summary["final"][m]) for m in ("grpo", "bonus_only", "reg_only")] == [2, 2, 2]
    assert [entry["seed"] for entry in summary["per_seed"]] == [0, 1]
    for entry in summary["per_seed"]:  # tiny runs may share no reward level; a row has every method's modes
        assert entry["table"] == [] or {"grpo_modes", "bonus_only_modes", "reg_only_modes"} <= set(entry["table"][-1])


def test_sweep_trains_grpo_then_each_beta_and_k(tmp_path):
    summary, records = _run_analysis(
        "sweep", tmp_path, "analysis.betas=[0.7]", "analysis.Ks=[1]", "analysis.seeds=[0,1]"
    )
    assert (tmp_path / "sweep.png").stat().st_size > 5_000
    rows = summary["table"]
    assert [row["run"] for row in rows] == ["grpo", "beta=0.7", "K=1"] and all(row["seeds"] == 2 for row in rows)
    for row in rows:  # each cell is the mean and std of the two seeds' final records
        finals = [[r for r in records if r["run"] == row["run"] and r["seed"] == s][-1] for s in (0, 1)]
        assert row["modes"] == pytest.approx(np.mean([f["modes"] for f in finals]))
        assert row["reward_std"] == pytest.approx(np.std([f["reward"] for f in finals]))


def test_adaptive_k_measures_stability_in_micro_batches(tmp_path):
    summary, _ = _run_analysis("adaptive_k", tmp_path, "analysis.seeds=[0]", "analysis.n_clusters=[auto,2]",
                               "analysis.stability_groups=1", "train.micro_batch=4")  # fmt: skip
    assert (tmp_path / "adaptive_k.png").stat().st_size > 5_000
    assert set(summary["stability"]) == {"k=auto", "k=2"} and summary["stability"]["k=2"]["clusters"] == 2.0
    for stability in summary["stability"].values():
        assert 0.0 <= stability["ari_across_seeds"] <= 1.0 and -1.0 <= stability["ari_under_jitter"] <= 1.0


def test_branching_gives_diversity_and_mode_decision_curves(tmp_path):
    summary, records = _run_analysis("branching", tmp_path, "analysis.trunks=2")
    assert (tmp_path / "branching.png").stat().st_size > 5_000
    T = 4
    assert len(summary["curve"]) == len(summary["p_same_mode"]) == T + 1 and len(records) == T + 1
    assert summary["curve"][-1] == 0.0 and summary["p_same_mode"][-1] == 1.0  # s = T: every branch is the trunk
    assert summary["mode_decided_share"][0] == 0.0 and summary["mode_decided_share"][-1] == pytest.approx(1.0)
    assert 0 <= summary["k_85"] <= T and summary["mode_decided_share"][summary["k_85"]] >= 0.85
    assert all(0.0 <= p <= 1.0 for p in summary["p_same_mode"])


def test_same_mode_probability_counts_pairs():
    modes = dg.TOY_MODES[0]
    samples = modes[[0, 0, 1, 2]]  # one pair of four samples shares a mode: 2 of 12 ordered pairs
    assert pa.same_mode_probability(samples, modes) == pytest.approx(2 / 12)


def test_bonus_cost_times_both_solvers(tmp_path):
    summary, _ = _run_analysis("bonus_cost", tmp_path, "analysis.group_sizes=[8,16]", "analysis.repeats=1")
    assert (tmp_path / "bonus_cost.png").stat().st_size > 5_000
    assert [row["group_size"] for row in summary["table"]] == [8, 16]
    assert all(row["dense"] > 0 and row["arpack"] > 0 for row in summary["table"])
    assert summary["toy_iteration_seconds"] > 0


def test_bonus_rules_compares_the_median_bandwidth_with_local_scaling(tmp_path):
    summary, _ = _run_analysis("bonus_rules", tmp_path)
    rows = {(r["geometry"], r["run"]): r for r in summary["table"]}
    assert len(rows) == 12 and all(r["rare_wins"] >= 0.9 for (_, rule), r in rows.items() if rule == "local scaling")
    assert all(r["rare_wins"] < 0.7 and r["k1_share"] > 0.3 for (_, rule), r in rows.items() if rule == "median")


@pytest.mark.parametrize(
    "preset, override, key",
    [
        ("toy", "train.iterations=3", "diversegrpo.py"),  # a training preset is pointed to the main command
        ("sweep", "analysis.Ks=[11]", "analysis.Ks"),
        ("sweep", "analysis.betas=[0.7,0.7]", "analysis.betas"),
        ("adaptive_k", "analysis.n_clusters=[auto,24]", "analysis.n_clusters"),
        ("bonus_cost", "analysis.group_sizes=[24]", "analysis.group_sizes"),
        ("bonus_cost", "analysis.group_sizes=[24,3000000]", "analysis.group_sizes"),  # terabytes of distances
        ("sweep", "analysis.betas=[inf]", "analysis.betas"),
        ("branching", "analysis.trunks=0", "analysis.trunks"),
        ("branching", "experiment=fancy", "experiment"),
    ],
)
def test_bad_analysis_config_is_one_line_and_exit_2(preset, override, key, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pa.main(["--config", CONFIG, "--preset", preset, "--set", override, "--set", f"output_dir={tmp_path}"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.startswith("error: ") and key in error and "\n" not in error


def test_the_experiments_diversegrpo_accepts_are_the_analyses_there_are():
    assert dg.EXPERIMENTS == ("compare", *pa.ANALYSES)


def test_a_long_bad_value_is_cut_on_its_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pa.main(["--config", CONFIG, "--preset", "sweep", "--set", f"analysis.Ks=[{'11,' * 500}11]"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.startswith("error: analysis.Ks") and error.endswith("...")


def test_a_bad_variant_found_during_an_analysis_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pa, "run_analysis", lambda cfg: pa.with_changes(cfg, {"diverse.K": 11}))  # no rule caught it
    with pytest.raises(SystemExit) as exit_info:
        pa.main(["--config", CONFIG, "--preset", "sweep", "--set", f"output_dir={tmp_path}"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.startswith("error: diverse.K") and "\n" not in error, error


def test_run_error_exits_1(tmp_path, monkeypatch, capsys):
    def no_weights(cfg):
        raise dg.RunError("could not load the weights")

    monkeypatch.setattr(pa.dg, "build_backbone", no_weights)
    with pytest.raises(SystemExit) as exit_info:
        pa.main(["--config", CONFIG, "--preset", "branching", "--set", f"output_dir={tmp_path}"])
    assert exit_info.value.code == 1 and "could not load the weights" in capsys.readouterr().err


def test_analysis_rollouts_keep_no_autograd_graph_on_sd3(tmp_path):
    cfg, backbone = _tiny_image_backbone("sd3", tmp_path, "analysis.stability_groups=1")
    groups = pa.base_model_groups(cfg, backbone)
    assert len(groups) == len(cfg.model.prompts) and all(g.grad_fn is None for g in groups)
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
