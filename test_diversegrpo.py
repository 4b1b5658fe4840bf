"""Tests for diversegrpo.py. Run: python -m pytest -q test_diversegrpo.py (CPU, no network)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
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
    "sampling.eval_samples=16",
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
    untimed = [[{k: v for k, v in record.items() if k != "iter_seconds"} for record in run] for run in runs]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 3


def test_matched_quality_table_interpolates_and_averages_seeds():
    def curve(*points):
        return [dict(reward=r, diversity=d, modes=m) for r, d, m in points]

    histories = {  # {method: [history of each seed]}
        "grpo": [curve((0.0, 2.0, 8), (1.0, 1.0, 2)), curve((0.0, 2.0, 8), (1.0, 0.0, 1))],
        "diversegrpo": [curve((0.0, 2.0, 8), (1.0, 2.0, 8)), curve((0.0, 2.0, 8), (1.0, 2.0, 8))],
    }
    rows = dg.matched_quality_table(histories, n_levels=2)
    assert [round(r["reward"], 6) for r in rows] == [0.5, 1.0]
    assert rows[0]["grpo"] == pytest.approx((1.5 + 1.0) / 2) and rows[0]["grpo_std"] == pytest.approx(0.25)
    assert rows[0]["diversegrpo_gain"] == pytest.approx(2.0 / 1.25 - 1)
    assert rows[1]["grpo_modes"] == pytest.approx(1.5) and rows[1]["diversegrpo_gain"] == pytest.approx(3.0)
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


def test_eigengap_solvers_agree():
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0], [6.0, 6.0]])
    points = centres.repeat_interleave(60, 0) + 0.1 * torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    affinity = torch.exp(-(dg.pairwise_distances(points) ** 2) / (2 * 0.5**2)).double().numpy()
    assert dg.eigengap_n_clusters(affinity, 20, "dense") == dg.eigengap_n_clusters(affinity, 20, "arpack") == 5


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


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=1.5305, shift_factor=0.0609,
    )  # fmt: skip


def _tiny_image_backbone(kind, tmp_path, *extra):
    preset = "sd3_pickscore" if kind == "sd3" else "flux_pickscore"
    cfg = dg.load_config(CONFIG, preset, TINY_IMAGE_RUN + [f"output_dir={tmp_path}", *extra])
    g = torch.Generator().manual_seed(0)
    n_parts = 4 if kind == "sd3" else 2  # SD3: prompt, pooled, negative prompt, negative pooled
    shapes = [(7, 32), (32,)] * (n_parts // 2)
    embeddings = {
        p: tuple(torch.randn(s, generator=g) for s in shapes) for p in cfg.model.prompts + cfg.model.eval_prompts
    }

    def reward(images, prompts):  # a stand-in quality: brightness of the red channel
        return images[:, 0].mean(dim=(1, 2))

    def embed(images):  # a stand-in embedder: the 4x4 thumbnail
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)

    transformer = _tiny_transformer(kind)
    backbone = dg.DiffusersBackbone(
        cfg, transformer, _tiny_vae(), embeddings, reward, embed, cfg.model.prompts, cfg.model.eval_prompts
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
    history = dg.train(cfg, backbone, "diversegrpo", log=lambda record: None)
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
    assert (tmp_path / "images" / "diversegrpo_00001.png").exists()


def test_flux_packing_round_trip():
    x = torch.randn(2, 16, 8, 6)
    packed = dg.pack_latents(x)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(dg.unpack_latents(packed, 8, 6), x)


def test_flux_schedule_matches_diffusers_shift():
    # mu = 0.63 at 512 px (1024 tokens); sigma' = e^mu / (e^mu + 1/sigma - 1) on linspace(1, 1/10, 10)
    expected = [1, 0.9441, 0.8825, 0.8142, 0.7380, 0.6525, 0.5559, 0.4459, 0.3195, 0.1726, 0]
    torch.testing.assert_close(dg.flux_sigmas(10, 1024), torch.tensor(expected), atol=2e-4, rtol=0)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_round_trip_through_diffusers_loader(kind, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    cfg, backbone = _tiny_image_backbone(kind, tmp_path, "train.lr=0.05")
    dg.train(cfg, backbone, "grpo", log=lambda record: None)
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


def test_checkpoints_are_written_and_pruned(tmp_path):
    cfg = _tiny_cfg(tmp_path, "train.iterations=3", "train.save_every=1", "train.keep_checkpoints=2")
    dg.train(cfg, dg.ToyBackbone(cfg), "grpo", log=lambda record: None)
    root = tmp_path / "checkpoints" / "grpo"
    assert sorted(os.listdir(root)) == ["000002", "000003"]
    state = torch.load(root / "000003" / "training_state.pt", weights_only=False)
    assert state["iteration"] == 3 and state["history"][-1]["iteration"] == 3
    assert any("lora_B" in k for k in state["lora"]) and not list(root.glob("*.partial"))


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
    images = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    distances = dg.pairwise_distances(embed(images), "cosine")  # (4, 4) from 4 embeddings
    model, _ = dreamsim(pretrained=True, device="cpu", cache_dir=str(tmp_path), dreamsim_type="clip_vitb32")
    with torch.no_grad():
        for i in range(4):
            own = model(images[i : i + 1].expand(4, -1, -1, -1), images)  # dreamsim's own distance to each image
            torch.testing.assert_close(distances[i], own, atol=1e-5, rtol=0)


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


def test_cli_real_preset_without_weights_fails_in_one_line(tmp_path):
    result = _run_cli("--preset", "sd3_pickscore", "--set", "model.pretrained=/nonexistent/sd3", "--set",
                      f"output_dir={tmp_path}")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not load the sd3 weights '/nonexistent/sd3'")
    assert "Traceback" not in result.stderr


# ---- robustness: bad input, non-finite values, checkpoints and resume ----


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # a lone surrogate writes a byte that is not UTF-8
    return str(path)


BAD_INPUTS = {  # name: (extra command-line arguments, a word the one-line error must contain)
    "missing config file": (["--config", "/nonexistent.yaml"], "not found"),
    "invalid yaml": (["--config", "INVALID_YAML"], "invalid YAML"),
    "unknown preset": (["--preset", "nope"], "unknown preset 'nope'"),
    "unknown top-level key": (["--set", "learning_rate=1"], "learning_rate"),
    "unknown nested key": (["--config", "NESTED_YAML"], "train.lrr"),
    "unknown section": (["--set", "optim.lr=1"], "optim.lr"),
    "wrong type": (["--set", "train.iterations=1.5"], "train.iterations"),
    "negative learning rate": (["--set", "train.lr=-0.1"], "train.lr"),
    "noise level too high": (["--set", "sampling.noise_level=2.0"], "sampling.noise_level"),
    "noise level negative": (["--set", "sampling.noise_level=-0.1"], "sampling.noise_level"),
    "K above the steps": (["--set", "diverse.K=11"], "diverse.K"),
    "group of one": (["--set", "sampling.group_size=1"], "sampling.group_size"),
    "n_clusters not below the group": (["--set", "diverse.n_clusters=24"], "diverse.n_clusters"),
    "n_clusters a word": (["--set", "diverse.n_clusters=many"], "diverse.n_clusters"),
    "unknown method": (["--set", "methods=[grpo,ppo]"], "ppo"),
    "override without =": (["--set", "train.lr"], "key=value"),
    "missing prompts file": (
        ["--preset", "sd3_pickscore", "--set", "model.prompts_file=/nope.txt"],
        "model.prompts_file",
    ),
    "empty prompts file": (["--preset", "sd3_pickscore", "--set", "model.prompts_file=EMPTY_FILE"], "no prompts"),
    "noise level zero (no SDE to train)": (["--set", "sampling.noise_level=0"], "sampling.noise_level"),
    "one evaluation sample": (["--set", "sampling.eval_samples=1"], "sampling.eval_samples"),
    "empty output_dir": (["--set", "output_dir="], "output_dir"),
    "unknown dtype": (["--preset", "sd3_pickscore", "--set", "dtype=foo"], "dtype"),
    "toy on a GPU": (["--set", "device=cuda"], "the toy runs on the CPU"),
    "dunder key": (["--set", "sampling.__class__=1"], "sampling.__class__"),
    "not-a-number learning rate": (["--set", "train.lr=nan"], "train.lr"),
    "a method twice": (["--set", "methods=[grpo,grpo]"], "twice"),
    "grpo_kl without a KL weight": (["--set", "methods=[grpo_kl]"], "train.kl_beta"),
    "resolution not a multiple of 16": (
        ["--preset", "sd3_pickscore", "--set", "model.resolution=500"],
        "model.resolution",
    ),
    "non-UTF-8 config file": (["--config", "BINARY_YAML"], "invalid YAML"),
    "unknown experiment": (["--set", "experiment=fancy"], "experiment"),
    "hpsv3 not installed": (["--preset", "sd3_hpsv3"], "hpsv3"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_2(name, tmp_path, capsys):
    args, needle = BAD_INPUTS[name]
    replacements = {
        "INVALID_YAML": _write(tmp_path, "invalid.yaml", "toy: [unclosed\n"),
        "NESTED_YAML": _write(tmp_path, "nested.yaml", "toy:\n  train:\n    lrr: 1\n"),
        "model.prompts_file=EMPTY_FILE": f"model.prompts_file={_write(tmp_path, 'empty.txt', chr(10) * 3)}",
        "BINARY_YAML": _write(tmp_path, "binary.yaml", "toy:\n  seed: \udcff\n"),
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


def test_output_dir_of_another_run_is_refused(tmp_path, capsys):
    dg.run(_tiny_cfg(tmp_path, "methods=[grpo]"))
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        dg.main(["--config", CONFIG, "--set", f"output_dir={tmp_path}", "--set", "methods=[grpo]"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "different config" in err and len(err.strip().splitlines()) == 1
    assert "train.iterations" in err and "sampling.group_size" in err  # the TINY overrides it lacks
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_checkpoints_without_resume_are_refused(tmp_path):
    cfg = _tiny_cfg(tmp_path, "methods=[grpo]", "train.save_every=1")
    dg.run(cfg)
    with pytest.raises(dg.ConfigError, match="resume=true"):
        dg.check_output_dir(cfg)
    dg.check_output_dir(_tiny_cfg(tmp_path, "methods=[grpo]", "train.save_every=1", "resume=true"))


def test_constant_rewards_give_zero_advantages_and_no_nan(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path)
    backbone = dg.ToyBackbone(cfg)
    monkeypatch.setattr(backbone, "reward", lambda samples, prompts: torch.full((len(samples),), 0.5))
    history = dg.train(cfg, backbone, "grpo", log=lambda record: None)
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
    history = dg.train(cfg, backbone, "diversegrpo", log=lambda record: None)
    assert "non-finite reward" in capsys.readouterr().err
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["train_reward"]) for r in history[1:])
    assert all(torch.isfinite(p).all() for p in backbone.model.parameters())
    assert any(n for n, p in backbone.model.named_parameters() if "lora_B" in n and p.abs().sum() > 0)


def test_non_finite_loss_skips_the_update(tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path, "train.lr=0.05", "train.eval_every=1")
    backbone = dg.ToyBackbone(cfg)
    real_loss, calls = dg.grpo_loss, []

    def loss_that_fails_in_iteration_2(*args):  # 3 trained steps per iteration
        calls.append(1)
        return real_loss(*args) * (float("nan") if 4 <= len(calls) <= 6 else 1.0)

    monkeypatch.setattr(dg, "grpo_loss", loss_that_fails_in_iteration_2)
    history = dg.train(cfg, backbone, "grpo", log=lambda record: None)
    assert [r["skipped_updates"] for r in history[1:]] == [0, 1, 0]
    assert "update skipped" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in backbone.model.parameters())


def _metrics(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in ("iter_seconds", "peak_gpu_gb")} for record in lines]


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


def test_two_processes_same_seed_same_metrics(tmp_path):
    sets = [x for s in TINY for x in ("--set", s)]
    for name in ("a", "b"):
        assert _run_cli(*sets, "--set", f"output_dir={tmp_path / name}").returncode == 0
    assert _metrics(tmp_path / "a" / "metrics.jsonl") == _metrics(tmp_path / "b" / "metrics.jsonl")


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import time

    sets = [x for s in TINY for x in ("--set", s)] + ["--set", "train.iterations=100000", "--set", "train.eval_every=1"]
    command = [sys.executable, os.path.join(HERE, "diversegrpo.py"), "--config", CONFIG, *sets]
    process = subprocess.Popen(
        command + ["--set", f"output_dir={tmp_path}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err
    checkpoints = os.listdir(tmp_path / "checkpoints" / "grpo-seed0")
    assert len(checkpoints) == 1 and int(checkpoints[0]) >= 2


# ---- review follow-ups: dtypes, caches, schedules against diffusers, the K gate, hpsv3 ----


def test_lora_weights_stay_float32_in_a_bf16_model(tmp_path):
    cfg, backbone = _tiny_image_backbone("sd3", tmp_path, "dtype=bfloat16", "train.lr=0.01")
    backbone.model.to(torch.bfloat16)
    history = dg.train(cfg, backbone, "diversegrpo", log=lambda record: None)
    lora = [p for n, p in backbone.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert math.isfinite(history[-1]["loss"]) and any(p.abs().sum() > 0 for p in lora)


def test_toy_base_cache_depends_on_seed_and_settings(tmp_path):
    a = dg.ToyBackbone(_tiny_cfg(tmp_path))
    b = dg.ToyBackbone(_tiny_cfg(tmp_path, "seed=1"))
    c = dg.ToyBackbone(_tiny_cfg(tmp_path, "toy.hidden=16"))
    assert len(list(tmp_path.glob("toy_base_*.pt"))) == 3
    assert not torch.equal(a.model.fc1.weight, b.model.fc1.weight) and c.model.fc1.weight.shape[0] == 16
    again = dg.ToyBackbone(_tiny_cfg(tmp_path))  # the cache is read back, not retrained
    assert torch.equal(a.model.fc1.weight, again.model.fc1.weight)


def test_schedules_equal_diffusers_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(dg.flow_match_sigmas(10, 3.0), scheduler.sigmas.float(), atol=1e-6, rtol=0)
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    flux.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=calculate_shift(1024, 256, 4096, 0.5, 1.15))
    torch.testing.assert_close(dg.flux_sigmas(6, 1024), flux.sigmas.float(), atol=1e-6, rtol=0)


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
        history = dg.train(cfg, dg.ToyBackbone(cfg), "reg_only", log=lambda record: None)
        assert calls == {"reference": expected_reference_calls, "loss": 3 * 3}
        assert K > 0 or all(record["reg"] == 0 for record in history[1:])


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


# ---- the analyses, each with tiny overrides ----


@pytest.mark.parametrize(
    "preset, extra, figure",
    [
        ("ablation", ["analysis.seeds=[0,1]", "methods=[grpo,grpo_kl,bonus_only,reg_only,diversegrpo]"], "toy.png"),
        ("sweep", ["analysis.betas=[0.7]", "analysis.Ks=[1]"], "sweep.png"),
        ("adaptive_k", ["analysis.seeds=[0]", "analysis.n_clusters=[auto,2]", "analysis.stability_groups=1"],
         "adaptive_k.png"),
        ("branching", ["analysis.trunks=2"], "branching.png"),
        ("bonus_cost", ["analysis.group_sizes=[8,16]", "analysis.repeats=1"], "bonus_cost.png"),
    ],
)  # fmt: skip
def test_analysis_presets_run(preset, extra, figure, tmp_path):
    overrides = TINY + ["sampling.group_size=6", f"output_dir={tmp_path}"] + extra
    cfg = dg.load_config(CONFIG, preset, overrides)
    summary = dg.run(cfg)
    assert (tmp_path / figure).stat().st_size > 5_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["experiment"] == cfg.experiment and saved["wall_seconds"] > 0
    if preset == "ablation":
        assert len(summary["final"]["reg_only"]) == 2  # two seeds
        assert summary["table"] == [] or set(summary["table"][0]) >= {"grpo_std", "diversegrpo_vendi"}  # tiny runs
    if preset == "branching":
        assert len(summary["curve"]) == cfg.sampling.num_steps + 1 and summary["curve"][-1] == 0.0
    if preset == "adaptive_k":
        assert 0.0 <= summary["stability"]["k=2"]["ari_across_seeds"] <= 1.0
    if preset == "bonus_cost":
        assert [row["group_size"] for row in summary["table"]] == [8, 16]


def test_nan_image_features_are_dropped_not_clustered(tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path)
    backbone = dg.ToyBackbone(cfg)

    def features_with_a_nan_row(samples):
        features = samples.clone()
        if len(samples) == cfg.sampling.group_size * cfg.sampling.prompts_per_iter:  # training batches only
            features[0] = float("nan")
        return features

    monkeypatch.setattr(backbone, "features", features_with_a_nan_row)
    history = dg.train(cfg, backbone, "diversegrpo", log=lambda record: None)
    assert "non-finite reward" in capsys.readouterr().err
    assert [r["dropped_rewards"] for r in history[1:]] == [2, 1]  # iterations 1-2, then 3 (eval_every 2)
    assert all(math.isfinite(r["loss"]) for r in history[1:])
