"""DiverseGRPO in one file: GRPO fine-tuning of flow models that keeps the images of a prompt diverse.

Papers
  DiverseGRPO: Mitigating Mode Collapse in Image Generation via Diversity-Aware GRPO (arXiv 2512.21514, CVPR 2026)
  Flow-GRPO: Training Flow Matching Models via Online RL (arXiv 2505.05470), whose sampler and loss this builds on

GRPO samples a group of G images per prompt, scores them with a reward model and pushes the policy towards the
better ones. Late in training every image of a prompt looks the same (mode collapse). DiverseGRPO adds
  1. a creativity bonus: spectral clustering of the group; an image in a small cluster earns sqrt(N / n_k);
  2. a structure-aware regularizer: a squared-W2 pull towards the frozen reference on the first K (noisiest)
     denoising steps only, where an image's composition is decided, and no constraint after.

Run     python diversegrpo.py --config configs.yaml                 (a 2-D toy, CPU, about half a minute)
        python diversegrpo.py --config configs.yaml --preset sd3_pickscore
Test    python -m pytest -q test_diversegrpo.py

Conventions (used everywhere below)
  * Rectified flow: x_t = (1 - t) * x_0 + t * eps. t = sigma = 1 is pure noise, t = 0 is data; velocity v = eps - x_0.
  * Sampling runs sigma_0 = 1 -> sigma_T = 0, so dt = sigma_{i+1} - sigma_i is negative.
  * Step i counts from the noise end: step 0 is the first, noisiest step; "the first K steps" means i < K.
  * A per-sample log-prob is the MEAN over every non-batch element (C, H, W, or the toy's 2 coordinates), as in
    Flow-GRPO. That is why the PPO clip range is tiny (1e-4).
  * Shape letters: P prompts per iteration, G group size (N in the paper's bonus), B = P * G samples,
    T denoising steps, D feature size, C, H, W latent channels and size.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tqdm import tqdm

# ---- 1. Config: one dataclass tree, filled from a named preset in configs.yaml ----


@dataclass
class SamplingConfig:
    num_steps: int = 10  # T, SDE steps of a training rollout
    eval_num_steps: int = 20  # ODE steps at evaluation
    noise_level: float = 0.7  # a in the SDE's sd = a * sqrt(sigma / (1 - sigma))
    shift: float = 1.0  # timestep shift of the flow-matching schedule
    group_size: int = 24  # G, samples per prompt
    prompts_per_iter: int = 2  # P, prompts per iteration
    eval_samples: int = 256  # ODE samples per held-out prompt at evaluation


@dataclass
class TrainConfig:
    iterations: int = 400  # sample -> update rounds per method
    lr: float = 2e-3  # AdamW learning rate of the LoRA weights
    weight_decay: float = 1e-4
    clip_range: float = 1e-4  # PPO ratio clip
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip]
    max_grad_norm: float = 1.0
    kl_beta: float = 0.0  # weight of the Flow-GRPO KL, used by the methods that turn the KL on
    lora_rank: int = 8
    lora_alpha: int = 16
    eval_every: int = 20  # evaluate every this many iterations
    micro_batch: int = 0  # samples per forward in sampling, decoding and training; 0 = the whole batch
    save_every: int = 0  # write a checkpoint every this many iterations (and at the end); 0 = never
    keep_checkpoints: int = 2  # how many checkpoints of a method to keep


@dataclass
class DiverseConfig:
    beta: float = 0.1  # weight of the creativity bonus in R = Q + beta * E
    n_clusters: int | str = "auto"  # k of the spectral clustering, or "auto" (eigengap)
    sigma: float | None = 0.3  # affinity bandwidth; None = median off-diagonal distance
    K: int = 4  # the regularizer acts on steps i < K
    lambda_w: float = 10.0  # weight of the squared-W2 regularizer
    max_clusters: int = 32  # n_clusters "auto" picks k <= min(max_clusters, G - 1)


@dataclass
class ToyConfig:
    pretrain_iters: int = 3000  # rectified-flow matching steps of the base model
    pretrain_batch: int = 512
    pretrain_lr: float = 2e-3
    hidden: int = 128  # MLP width
    mode_std: float = 0.08  # std of each Gaussian mode of the data
    reward_width: float = 0.25  # width of each reward bump


@dataclass
class ModelConfig:
    pretrained: str = ""  # diffusers pipeline: hub name or local folder
    resolution: int = 512  # image height and width in pixels
    guidance_scale: float = 4.5  # CFG scale (SD3), or the guidance embedding's value (FLUX)
    gradient_checkpointing: bool = False  # trade compute for memory in the transformer's backward
    reward: str = "pickscore"  # pickscore | hpsv3
    reward_model: str = "yuvalkirstain/PickScore_v1"  # PickScore's CLIP weights
    reward_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor (tokenizer)
    dreamsim_type: str = "ensemble"  # ensemble | dino_vitb16 | open_clip_vitb32 | clip_vitb32 | ...
    dreamsim_cache: str = "~/.cache/dreamsim"  # where dreamsim keeps (or downloads) its checkpoints
    prompts: list = field(default_factory=list)  # training prompts, used when prompts_file is empty
    prompts_file: str = ""  # one training prompt per line
    eval_prompts: list = field(default_factory=list)  # held-out prompts, used when eval_prompts_file is empty
    eval_prompts_file: str = ""  # one held-out prompt per line


@dataclass
class AnalysisConfig:
    seeds: list = field(default_factory=list)  # train on each of these seeds; empty = [seed]
    betas: list = field(default_factory=lambda: [0.07, 0.7, 3.0, 5.0])  # sweep: bonus weights (the paper's)
    Ks: list = field(default_factory=lambda: [1, 2, 4, 6])  # sweep: regularized steps (the paper's)
    n_clusters: list = field(default_factory=lambda: ["auto", 2, 4, 8])  # adaptive_k: the choices compared
    stability_groups: int = 8  # adaptive_k: base-model groups per prompt for the stability measure
    trunks: int = 16  # branching: shared trajectories per prompt (each branches into group_size samples)
    group_sizes: list = field(default_factory=lambda: [24, 96, 384, 1536])  # bonus_cost: N
    repeats: int = 3  # bonus_cost: timings per N (the median is kept)
    sd3_step_seconds: float = 0.54  # bonus_cost: estimated SD3.5-M sampling step for 24 images (see README)


@dataclass
class Config:
    experiment: str = "compare"  # compare | sweep | adaptive_k | branching | bonus_cost
    backbone: str = "toy"  # toy | sd3 | flux
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype of the backbone; the SDE arithmetic is always float32
    output_dir: str = "runs/toy"
    resume: bool = False  # continue from the newest checkpoints in output_dir
    methods: list = field(default_factory=lambda: ["grpo", "diversegrpo"])
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diverse: DiverseConfig = field(default_factory=DiverseConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


# Which terms each method switches on. Their strengths come from the config, so every method shares one set of
# hyperparameters and differs only in what it adds to plain GRPO.
METHODS = {
    "grpo": dict(bonus=False, w2=False, kl=False),  # Flow-GRPO, the paper's baseline (KL 0)
    "grpo_kl": dict(bonus=False, w2=False, kl=True),  # Flow-GRPO with its KL on every trained step
    "bonus_only": dict(bonus=True, w2=False, kl=False),
    "reg_only": dict(bonus=False, w2=True, kl=False),
    "diversegrpo": dict(bonus=True, w2=True, kl=False),
}


class ConfigError(ValueError):
    """A bad config; main() prints it as one line and exits with status 2."""


def _check_type(name, value, annotation):
    """Return value converted to annotation's type, or raise ConfigError naming the key."""
    if annotation == float | None:
        return None if value is None else _check_type(name, value, float)
    if annotation == int | str:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name}: expected an integer or 'auto', got {value!r}")
        return value
    if annotation is float:
        # PyYAML reads 1e-3 (no dot) as a string, so a numeric string is accepted for a float key.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is str and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if annotation is list and not isinstance(value, list):
        raise ConfigError(f"{name}: expected a list, got {value!r}")
    return value


def _fill(node, values, prefix=""):
    """Write a nested dict of values into a dataclass tree; an unknown key or a wrong type is a ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'preset'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(node)}
    for key, value in values.items():
        name = prefix + str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{name}'")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, name + ".")
        else:
            setattr(node, key, _check_type(name, value, fields[key].type))


def _parse_override(text, cfg):
    """'train.lr=1e-3' -> {'train': {'lr': '1e-3'}}, a tree for _fill, which then types the value like its key."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f.type for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            raise ConfigError(f"unknown config key '{key}'")
        annotation = fields[part]
        if i < len(parts) - 1:
            node = getattr(node, part)
    # A plain string key takes the text as it is (so "output_dir=123" stays a path); others are parsed as YAML.
    value = raw if annotation is str else yaml.safe_load(raw)
    tree = value
    for part in reversed(parts):
        tree = {part: tree}
    return tree


def validate(cfg):
    """Reject impossible values and combinations with one line that names the key."""
    s, t, d, m, a = cfg.sampling, cfg.train, cfg.diverse, cfg.model, cfg.analysis
    experiments = ("compare", "sweep", "adaptive_k", "branching", "bonus_cost")
    checks = [  # (what must hold, the error if it does not)
        (
            cfg.experiment in experiments,
            f"experiment: expected one of {', '.join(experiments)}, got '{cfg.experiment}'",
        ),
        (cfg.backbone in ("toy", "sd3", "flux"), f"backbone: expected toy, sd3 or flux, got '{cfg.backbone}'"),
        (cfg.dtype in ("float32", "bfloat16"), f"dtype: expected float32 or bfloat16, got '{cfg.dtype}'"),
        (cfg.output_dir != "", "output_dir: must not be empty"),
        (len(cfg.methods) > 0, "methods: the list is empty"),
        (
            all(x in METHODS for x in cfg.methods),
            f"methods: {cfg.methods} has an unknown method (known: {', '.join(METHODS)})",
        ),
        (len(set(cfg.methods)) == len(cfg.methods), f"methods: {cfg.methods} names a method twice"),
        ("grpo_kl" not in cfg.methods or t.kl_beta > 0, "train.kl_beta: the grpo_kl method needs a positive KL weight"),
        (
            all(type(x) is int for x in cfg.analysis.seeds),
            f"analysis.seeds: expected integers, got {cfg.analysis.seeds}",
        ),
        (s.group_size >= 2, f"sampling.group_size: must be at least 2, got {s.group_size}"),
        (
            s.num_steps >= 2,
            f"sampling.num_steps: must be at least 2 (the last step is never trained), got {s.num_steps}",
        ),
        (s.eval_num_steps >= 1, f"sampling.eval_num_steps: must be at least 1, got {s.eval_num_steps}"),
        (s.eval_samples >= 2, f"sampling.eval_samples: diversity needs at least 2, got {s.eval_samples}"),
        (s.prompts_per_iter >= 1, f"sampling.prompts_per_iter: must be at least 1, got {s.prompts_per_iter}"),
        (
            0 < s.noise_level < 2,
            f"sampling.noise_level: must be in (0, 2) to train (0 is the ODE), got {s.noise_level}",
        ),
        (s.shift > 0, f"sampling.shift: must be positive, got {s.shift}"),
        (t.lr > 0, f"train.lr: must be positive, got {t.lr}"),
        (t.iterations >= 1 and t.eval_every >= 1, "train.iterations and train.eval_every: must be at least 1"),
        (min(t.clip_range, t.adv_clip, t.max_grad_norm) > 0, "train.clip_range, adv_clip, max_grad_norm: must be > 0"),
        (
            min(t.kl_beta, d.beta, d.lambda_w) >= 0,
            "train.kl_beta, diverse.beta, diverse.lambda_w: must not be negative",
        ),
        (t.lora_rank >= 1 and t.lora_alpha > 0, "train.lora_rank and train.lora_alpha: must be positive"),
        (min(t.micro_batch, t.save_every) >= 0, "train.micro_batch and train.save_every: must not be negative"),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints: must be at least 1, got {t.keep_checkpoints}"),
        (0 <= d.K <= s.num_steps - 1, f"diverse.K: must be in [0, {s.num_steps - 1}], the trained steps, got {d.K}"),
        (
            d.n_clusters == "auto" or type(d.n_clusters) is int,
            f"diverse.n_clusters: expected an integer or 'auto', got '{d.n_clusters}'",
        ),
        (
            type(d.n_clusters) is not int or 1 <= d.n_clusters < s.group_size,
            f"diverse.n_clusters: must be at least 1 and below sampling.group_size={s.group_size}, got {d.n_clusters}",
        ),
        (d.sigma is None or d.sigma > 0, f"diverse.sigma: must be positive or null, got {d.sigma}"),
        (d.max_clusters >= 1, f"diverse.max_clusters: must be at least 1, got {d.max_clusters}"),
        (
            min(cfg.toy.hidden, cfg.toy.pretrain_iters, cfg.toy.pretrain_batch) >= 1,
            "toy.hidden, toy.pretrain_iters, toy.pretrain_batch: must be at least 1",
        ),
        (
            min(cfg.toy.reward_width, cfg.toy.mode_std, cfg.toy.pretrain_lr) > 0,
            "toy.reward_width, toy.mode_std, toy.pretrain_lr: must be positive",
        ),
        # The analysis lists are checked for the experiment that uses them.
        (
            cfg.experiment != "sweep" or all(type(b) in (int, float) and b >= 0 for b in a.betas),
            f"analysis.betas: expected numbers >= 0, got {a.betas}",
        ),
        (
            cfg.experiment != "sweep" or all(type(k) is int and 0 <= k < s.num_steps for k in a.Ks),
            f"analysis.Ks: expected integers in [0, {s.num_steps - 1}], got {a.Ks}",
        ),
        (
            cfg.experiment != "adaptive_k"
            or all(k == "auto" or (type(k) is int and 1 <= k < s.group_size) for k in a.n_clusters),
            f"analysis.n_clusters: expected auto or integers below sampling.group_size, got {a.n_clusters}",
        ),
        (
            cfg.experiment != "bonus_cost"
            or (len(a.group_sizes) >= 2 and all(type(n) is int and n >= 3 for n in a.group_sizes)),
            f"analysis.group_sizes: expected two or more integers >= 3, got {a.group_sizes}",
        ),
        (min(a.trunks, a.stability_groups, a.repeats) >= 1, "analysis.trunks, stability_groups, repeats: must be >= 1"),
        (
            all(len(set(map(str, v))) == len(v) for v in (a.seeds, a.betas, a.Ks, a.n_clusters)),
            "analysis: a seed, beta, K or n_clusters is listed twice",
        ),
        (cfg.experiment != "bonus_cost" or cfg.backbone == "toy", "experiment: bonus_cost runs on the toy backbone"),
    ]
    if cfg.backbone == "toy":
        checks += [
            (cfg.device == "cpu" and cfg.dtype == "float32", "device and dtype: the toy runs on the CPU in float32"),
            (
                s.prompts_per_iter <= len(TOY_PROMPTS),
                f"sampling.prompts_per_iter: the toy has {len(TOY_PROMPTS)} prompts",
            ),
        ]
    else:
        checks += [
            (m.pretrained != "", f"model.pretrained: a {cfg.backbone} preset needs a hub name or a local folder"),
            (m.reward in ("pickscore", "hpsv3"), f"model.reward: expected pickscore or hpsv3, got '{m.reward}'"),
            (
                m.resolution > 0 and m.resolution % 16 == 0,
                f"model.resolution: must be a multiple of 16, got {m.resolution}",
            ),
            (bool(m.prompts or m.prompts_file), "model.prompts: give a list, or model.prompts_file"),
            (
                bool(m.eval_prompts or m.eval_prompts_file),
                "model.eval_prompts: give a list, or model.eval_prompts_file",
            ),
        ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for key in ("prompts_file", "eval_prompts_file"):
        path = getattr(m, key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"model.{key}: file not found: {path}")
        if path and not read_prompts(path):
            raise ConfigError(f"model.{key}: no prompts in {path}")
    if cfg.backbone != "toy":
        n_prompts = len(read_prompts(m.prompts_file) if m.prompts_file else m.prompts)
        if s.prompts_per_iter > n_prompts:
            raise ConfigError(f"sampling.prompts_per_iter: only {n_prompts} training prompts, got {s.prompts_per_iter}")
        if m.reward == "hpsv3" and importlib.util.find_spec("hpsv3") is None:  # fail now, not after loading SD3
            raise ConfigError("model.reward: hpsv3 needs the hpsv3 package (pip install hpsv3; see README)")


def read_prompts(path):
    """One prompt per line; blank lines are skipped."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def load_config(path, preset="toy", overrides=()):
    """Read a preset (a top-level section) of a YAML file over the dataclass defaults, then apply --set overrides."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            presets = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(presets, dict) or preset not in presets:
        names = ", ".join(presets) if isinstance(presets, dict) else "none"
        raise ConfigError(f"unknown preset '{preset}' in {path} (presets: {names})")
    cfg = Config()
    _fill(cfg, presets[preset] or {})
    for text in overrides:
        _fill(cfg, _parse_override(text, cfg))
    validate(cfg)
    return cfg


# ---- 2. SDE sampling with log-probs (Flow-GRPO sec 4.1) ----


def flow_match_sigmas(num_steps, shift=1.0):
    """The sigma schedule of diffusers' FlowMatchEulerDiscreteScheduler (static shift): 1 -> 0 in num_steps steps.

    shifted(s) = shift * s / (1 + (shift - 1) * s). Returns a float32 tensor of num_steps + 1 values ending in 0;
    for shift 3 and 10 steps: 1, .960, .913, .858, .790, .707, .602, .465, .278, .0089, 0.
    """

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    # diffusers shifts twice: its smallest sigma (1/1000 of 1000 train steps) is shifted once in __init__, then the
    # linspace down to it is shifted again. That is why SD3's last nonzero sigma is .0089, not .0030.
    sigmas = shifted(torch.linspace(1.0, shifted(1.0 / 1000), num_steps, dtype=torch.float64))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()


def _per_sample(value, like):
    """A float or a (B,) tensor -> a float32 tensor that broadcasts against `like` (B, ...)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1))) if value.dim() == 1 else value


def _mean_per_sample(x):
    """(B, ...) -> (B,): the mean over every non-batch element."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def sde_step_with_logprob(velocity, sample, sigma, sigma_next, noise_level, prev_sample=None, generator=None):
    """One step of Flow-GRPO's marginal-preserving SDE, and the log-prob of its result.

        sd   = a * sqrt(s / (1 - s))          with s -> sigma_next in the denominator where s == 1
        mu   = x + [v + sd^2 / (2 s) * (x + (1 - s) v)] * dt,       dt = sigma_next - sigma < 0
        std  = sd * sqrt(-dt)
        x'   = mu + std * noise
        log p(x') = mean over elements of  -(x' - mu)^2 / (2 std^2) - log std - log sqrt(2 pi)

    With noise_level a = 0 this is the Euler ODE step x + v * dt; a deterministic step has no density, so
    log_prob is returned as zeros and must not be trained on. sigma and sigma_next are floats or (B,) tensors.
    With prev_sample given, that sample is scored instead of a new one drawn (it is treated as a constant).
    Returns (prev_sample, log_prob (B,), prev_sample_mean, std_dev); the arithmetic is float32 whatever the
    model's dtype, since bf16 overflows in the mean.
    """
    velocity, sample = velocity.float(), sample.float()
    sigma, sigma_next = _per_sample(sigma, sample), _per_sample(sigma_next, sample)
    dt = sigma_next - sigma
    # At sigma == 1 the formula divides by zero; Flow-GRPO uses the schedule's second value there instead.
    sigma_denominator = torch.where(sigma == 1, sigma_next, sigma)
    sd = noise_level * torch.sqrt(sigma / (1 - sigma_denominator))
    prev_sample_mean = sample + (velocity + sd**2 / (2 * sigma) * (sample + (1 - sigma) * velocity)) * dt
    std_dev = sd * torch.sqrt(-dt)
    if prev_sample is None and noise_level == 0:
        prev_sample = prev_sample_mean  # the ODE: no noise to draw
    elif prev_sample is None:
        # Drawn on the generator's device (the CPU in this project) and moved: the same seed, the same noise anywhere.
        noise_device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=noise_device, dtype=torch.float32)
        noise = noise.to(sample.device)
        prev_sample = prev_sample_mean + std_dev * noise
    prev_sample = prev_sample.detach().float()
    if noise_level == 0:
        return prev_sample, torch.zeros(sample.shape[0], device=sample.device), prev_sample_mean, std_dev
    log_density = (
        -((prev_sample - prev_sample_mean) ** 2) / (2 * std_dev**2)
        - torch.log(std_dev)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, _mean_per_sample(log_density), prev_sample_mean, std_dev


# ---- 3. GRPO: group advantages, clipped surrogate, and Flow-GRPO's KL ----


def group_advantages(rewards, eps=1e-4, clip=5.0):
    """A = clip((R - mean_group) / (std_group + eps), -clip, clip) for rewards (P, G) -> advantages (P, G).

    The std is the unbiased one (torch's default): it reproduces the paper's Figure 2, rewards
    [2.14, 4.14, 3.14, 4.00] -> advantages [-1.316, 0.851, -0.233, 0.699]. Flow-GRPO's code used numpy's biased
    std, and optionally one std over the whole batch instead of per group.
    """
    mean = rewards.mean(dim=1, keepdim=True)  # (P, G) -> (P, 1)
    std = rewards.std(dim=1, keepdim=True)  # (P, G) -> (P, 1), unbiased
    return ((rewards - mean) / (std + eps)).clamp(-clip, clip)


def grpo_loss(log_prob, old_log_prob, adv, clip_range):
    """PPO's clipped surrogate for one denoising step, averaged over the batch (Flow-GRPO Eq. 8).

    ratio = exp(log_prob - old_log_prob);  loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def kl_reg(prev_sample_mean, ref_prev_sample_mean, std_dev):
    """Exact KL between the policy's and the reference's Gaussian transitions, per element, -> (B,).

    KL = ||mu - mu_ref||^2 / (2 std^2) for equal covariances. Flow-GRPO's code divides by 2 sd^2 instead, without
    the -dt of std^2 = sd^2 * (-dt): its KL is ours times -dt, so a Flow-GRPO weight b corresponds to b * (-dt)
    here, which varies by step (SD3, 10 steps: -dt from .04 to .27). No gradient reaches the reference.
    """
    diff = prev_sample_mean - ref_prev_sample_mean.detach()
    std_dev = _per_sample(std_dev, diff)
    return _mean_per_sample(diff**2 / (2 * std_dev**2))


# ---- 4. DiverseGRPO: creativity bonus and structure-aware regularizer (paper sec 3.2-3.3) ----


def pairwise_distances(features, metric="euclidean"):
    """(N, D) features -> (N, N) distances. 'cosine' is 1 - cos(e_i, e_j), DreamSim's distance on its embeddings."""
    features = features.float()
    if metric == "euclidean":
        return torch.cdist(features, features)
    if metric == "cosine":
        unit = F.normalize(features, dim=-1)
        return (1 - unit @ unit.T).clamp_min(0)
    raise ValueError(f"unknown metric '{metric}' (euclidean or cosine)")


def diversity_score(features, metric="euclidean"):
    """The mean off-diagonal pairwise distance of one prompt's samples: the paper's DreamSim diversity."""
    distances = pairwise_distances(features, metric)
    n = distances.shape[0]
    return (distances.sum() / (n * (n - 1))).item()


def vendi_score(features, metric="euclidean", bandwidth=None):
    """The Vendi score: exp(entropy of the eigenvalues of K / N), an effective number of distinct samples.

    K is a similarity with K_ii = 1: cos(e_i, e_j) for metric "cosine" (DreamSim embeddings), and a Gaussian kernel
    exp(-d^2 / (2 bandwidth^2)) for "euclidean" (bandwidth: the median distance unless given). N identical samples
    score 1; N samples in m well-separated equal clusters score m.
    """
    distances = pairwise_distances(features, metric).double()
    n = distances.shape[0]
    if metric == "cosine":
        similarity = 1 - distances
    else:
        bandwidth = bandwidth or distances[~torch.eye(n, dtype=torch.bool)].median().item() or 1.0
        similarity = torch.exp(-(distances**2) / (2 * bandwidth**2))
    eigenvalues = torch.linalg.eigvalsh(similarity / n).clamp_min(0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


def eigengap_n_clusters(affinity, max_clusters, eigen_solver="dense"):
    """Choose k by the eigengap heuristic: the largest gap in the normalized affinity's top eigenvalues.

    With D the degree matrix, L = D^-1/2 A D^-1/2 has eigenvalue 1 once per connected component of a clean graph;
    k clusters show up as k eigenvalues near 1 followed by a drop. Returns k in [1, max_clusters].
    eigen_solver "dense" computes every eigenvalue (O(N^3)); "arpack" only the top max_clusters + 1.
    """
    degree = affinity.sum(axis=1)
    normalized = affinity / np.sqrt(np.outer(degree, degree))
    if eigen_solver == "arpack" and max_clusters + 1 < len(affinity):
        from scipy.sparse.linalg import eigsh

        top = eigsh(normalized, k=max_clusters + 1, which="LA", return_eigenvectors=False)
    else:
        top = np.linalg.eigvalsh(normalized)[-(max_clusters + 1) :]
    top = np.sort(top)[::-1]  # descending, top[0] == 1
    gaps = top[:-1] - top[1:]  # gaps[i]: the drop after the (i+1)-th eigenvalue
    return int(np.argmax(gaps)) + 1


def creativity_bonus(distances, n_clusters="auto", sigma=None, seed=0, max_clusters=32, eigen_solver="auto"):
    """The distributional creativity bonus of one prompt's group (paper sec 3.2): (N, N) -> (bonus (N,), labels (N,)).

        affinity A_ij = exp(-D_ij^2 / (2 sigma^2)),   sigma = median off-diagonal distance unless given
        labels        = spectral clustering of A into k clusters (k fixed, or "auto": eigengap, k <= N - 1)
        bonus E_i     = sqrt(N / n_k),  n_k = size of the cluster holding sample i

    A lone sample earns sqrt(N); a single cluster gives 1 to everyone. Degenerate groups (identical samples,
    N <= k, a disconnected graph) do not crash: they fall back to fewer clusters. "auto" searches k up to
    min(max_clusters, N - 1); its eigen_solver "auto" switches from dense to arpack above N = 256 (see bonus_cost).
    """
    from sklearn.cluster import SpectralClustering

    distances = distances.detach().double().cpu().numpy()
    n = distances.shape[0]
    if n < 3:  # too few to split into clusters of unequal size: one cluster, bonus 1 everywhere
        return torch.ones(n), torch.zeros(n, dtype=torch.long)
    off_diagonal = distances[~np.eye(n, dtype=bool)]
    sigma = float(np.median(off_diagonal)) if sigma is None else sigma
    if sigma <= 0 or off_diagonal.max() <= 1e-6:
        # Identical samples, up to float noise (which a fixed k would otherwise split into clusters): one cluster.
        return torch.ones(n), torch.zeros(n, dtype=torch.long)
    affinity = np.exp(-(distances**2) / (2 * sigma**2))
    if n_clusters == "auto":
        solver = eigen_solver if eigen_solver != "auto" else ("arpack" if n > 256 else "dense")
        k = eigengap_n_clusters(affinity, min(max_clusters, n - 1), solver)
    else:
        k = min(int(n_clusters), n - 1)  # k = N would make every sample its own cluster: a constant bonus again
    if k < 2:
        return torch.ones(n), torch.zeros(n, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on a disconnected graph; clustering it is still well defined
        # 3 k-means restarts instead of sklearn's 10: on groups this small they find the same labels, many times faster.
        clustering = SpectralClustering(n_clusters=k, affinity="precomputed", n_init=3, random_state=seed)
        labels = clustering.fit_predict(affinity)
    labels = torch.as_tensor(labels, dtype=torch.long)
    cluster_sizes = torch.bincount(labels)[labels].double()  # (N,): n_k of each sample's cluster
    return torch.sqrt(n / cluster_sizes).float(), labels


def structure_aware_reg(prev_sample_mean, ref_prev_sample_mean, step_index, K):
    """The structure-aware regularizer (paper sec 3.3) for one step, per sample -> (B,).

    For step_index < K: ||mu - mu_ref||^2 / 2 averaged per element, the squared 2-Wasserstein distance between two
    Gaussians of equal covariance, halved. From step K on: zero, leaving the late, detail-forming steps free.
    Averaging per element (like the log-prob) is this project's choice; the paper does not say. No gradient
    reaches the reference.
    """
    diff = prev_sample_mean - ref_prev_sample_mean.detach()
    if step_index >= K:
        return torch.zeros(diff.shape[0], device=diff.device)
    return _mean_per_sample(diff**2 / 2)


# ---- 5. Backbones: the toy 2-D flow model (SD3 and FLUX follow in section 6) ----
#
# A backbone is a small object the loop calls:
#   model                 the nn.Module carrying the LoRA adapters (the policy); adapters off = the reference
#   prompts               the training prompts; eval_prompts the held-out ones
#   encode(prompts)       -> a tuple of tensors with the batch first (the condition)
#   velocity(x, sigma, cond) -> v, float32, (B, ...) like x
#   noise(n, generator)   -> n initial latents x at sigma = 1
#   decode(x)             -> samples: images in [0, 1], or the toy's points
#   reward(samples, prompts) -> (B,) quality Q;  features(samples) -> (B, D), with feature_metric


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base network: switch every peft LoRA layer off, and back on afterwards. This is the reference model.

    Works for any module with peft adapters injected, diffusers transformers included (they have no such
    context manager of their own).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def add_lora(model, rank, alpha, target_modules):
    """Inject fresh LoRA adapters (peft) into `model` in place and freeze everything else; returns the LoRA params.

    peft initialises the LoRA B matrices to zero, so the policy starts exactly at the reference.
    """
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules), model)
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        # Trainable weights stay float32 even in a bf16 model (autocast handles the matmuls): in bf16, AdamW's
        # second moment times 0.999 rounds back to itself and never decays, and weight decay underflows.
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def _ring(n, radius):
    angles = torch.arange(n) * 2 * math.pi / n
    return torch.stack([radius * torch.cos(angles), radius * torch.sin(angles)], dim=1)


def _grid(n_side, spacing):
    axis = (torch.arange(n_side) - (n_side - 1) / 2) * spacing
    return torch.cartesian_prod(axis, axis)


# Each toy "prompt" is a mixture of Gaussian modes. Mode heights of the reward differ a little (1.0 down to 0.8),
# which is what draws plain GRPO onto the single best mode.
TOY_PROMPTS = ["ring of eight", "three by three grid"]
TOY_MODES = [_ring(8, 1.5), _grid(3, 1.2)]
# The grid's heights are shuffled over its positions (row-major from (-1.2, -1.2)): the best mode, 1.0, is (-1.2, 0).
TOY_HEIGHTS = [torch.linspace(1.0, 0.8, 8), torch.linspace(1.0, 0.8, 9)[torch.tensor([4, 0, 8, 2, 6, 1, 7, 3, 5])]]


class ToyFlow(nn.Module):
    """A conditional velocity field v(x, sigma, prompt) on R^2: an MLP over [x, time features, prompt embedding]."""

    def __init__(self, n_prompts, hidden=128, n_freqs=4):
        super().__init__()
        # Low frequencies only (pi/2 .. 4 pi): the field must stay smooth in sigma, or a LoRA trained at the 10 SDE
        # sigmas would bend it only there, and the ODE evaluation, which queries other sigmas, would not see it.
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freqs) * math.pi / 2)
        self.prompt_embedding = nn.Embedding(n_prompts, 32)
        self.fc1 = nn.Linear(2 + 2 * n_freqs + 32, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x, sigma, prompt_ids):
        angles = sigma.reshape(-1, 1) * self.freqs  # (B, 1) * (n_freqs,) -> (B, n_freqs)
        h = torch.cat([x, angles.sin(), angles.cos(), self.prompt_embedding(prompt_ids)], dim=-1)
        h = F.silu(self.fc1(h))
        h = F.silu(self.fc2(h))
        h = F.silu(self.fc3(h))
        return self.out(h)


def toy_data(prompt_ids, mode_std, generator=None):
    """Draw x_0 from each prompt's mixture of equal-weight Gaussian modes: (B,) prompt ids -> (B, 2)."""
    points = torch.empty(len(prompt_ids), 2)
    for p, modes in enumerate(TOY_MODES):
        rows = (prompt_ids == p).nonzero().squeeze(1)
        which = torch.randint(len(modes), (len(rows),), generator=generator)
        points[rows] = modes[which] + mode_std * torch.randn(len(rows), 2, generator=generator)
    return points


def pretrain_toy(cfg):
    """Fit the base model by rectified-flow matching: regress v = eps - x_0 at x_t = (1 - t) x_0 + t eps."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = ToyFlow(len(TOY_PROMPTS), cfg.toy.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.toy.pretrain_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.toy.pretrain_iters)
    for _ in tqdm(range(cfg.toy.pretrain_iters), desc="pretrain toy base", leave=False):
        prompt_ids = torch.randint(len(TOY_PROMPTS), (cfg.toy.pretrain_batch,), generator=generator)
        x0 = toy_data(prompt_ids, cfg.toy.mode_std, generator)
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.rand(len(x0), 1, generator=generator)
        loss = F.mse_loss(model(x0 * (1 - t) + eps * t, t, prompt_ids), eps - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model


class ToyBackbone:
    """The 2-D toy: two prompts, each a mixture of Gaussian modes; the samples are their own features."""

    feature_metric = "euclidean"

    def __init__(self, cfg):
        self.prompts = self.eval_prompts = list(TOY_PROMPTS)
        self.reward_width = cfg.toy.reward_width
        settings = json.dumps([cfg.seed, dataclasses.asdict(cfg.toy)], sort_keys=True)  # what the base depends on
        path = os.path.join(cfg.output_dir, f"toy_base_{hashlib.sha1(settings.encode()).hexdigest()[:10]}.pt")
        self.model = ToyFlow(len(TOY_PROMPTS), cfg.toy.hidden)
        if os.path.exists(path):
            self.model.load_state_dict(torch.load(path))
        else:
            self.model = pretrain_toy(cfg)
            os.makedirs(cfg.output_dir, exist_ok=True)
            torch.save(self.model.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
        self.lora_targets = ["fc1", "fc2", "fc3", "out"]
        self.device, self.shift = torch.device("cpu"), cfg.sampling.shift

    def sigmas(self, num_steps):
        return flow_match_sigmas(num_steps, self.shift)

    def encode(self, prompts):
        return (torch.tensor([self.prompts.index(p) for p in prompts]),)

    def noise(self, n, generator):
        return torch.randn(n, 2, generator=generator)

    def velocity(self, x, sigma, cond):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])
        return self.model(x, sigma, cond[0]).float()

    def decode(self, x):
        return x

    def reward(self, samples, prompts):
        """Q(x) = sum_k h_k exp(-||x - m_k||^2 / (2 w^2)): high near every mode, highest at the best one."""
        rewards = torch.empty(len(samples))
        for i, prompt in enumerate(prompts):
            p = self.prompts.index(prompt)
            squared = ((samples[i] - TOY_MODES[p]) ** 2).sum(-1)  # (modes,)
            rewards[i] = (TOY_HEIGHTS[p] * torch.exp(-squared / (2 * self.reward_width**2))).sum()
        return rewards

    def features(self, samples):
        return samples

    def count_modes(self, samples, prompt, min_share=0.05):
        """How many of the prompt's modes hold at least min_share of the samples (nearest mode, within 0.5)."""
        modes = TOY_MODES[self.prompts.index(prompt)]
        distances = torch.cdist(samples, modes)  # (n, modes)
        nearest = distances.argmin(dim=1)[distances.min(dim=1).values < 0.5]
        return int((torch.bincount(nearest, minlength=len(modes)) >= min_share * len(samples)).sum())


# ---- 6. Backbones: SD3.5 and FLUX.1 through diffusers ----

# LoRA on both attention streams of the MMDiT blocks (paper, implementation details). peft skips the names a block
# lacks: FLUX's single-stream blocks only have to_q, to_k and to_v.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class SetupError(RuntimeError):
    """Weights or packages that could not be loaded; main() prints it as one line and exits with status 1."""


def sd3_velocity(transformer, x, sigma, cond, guidance_scale):
    """SD3's velocity with classifier-free guidance; the unconditional and conditional halves share one forward.

    cond = (prompt_embeds (B, L, D), pooled (B, D'), negative_embeds, negative_pooled). SD3 takes t = sigma * 1000.
    """
    prompt_embeds, pooled, negative_embeds, negative_pooled = cond
    timestep = (torch.as_tensor(sigma, device=x.device, dtype=torch.float32) * 1000).expand(x.shape[0])
    out = transformer(
        hidden_states=torch.cat([x, x]).to(transformer.dtype),  # (B, C, H, W) -> (2B, C, H, W)
        timestep=torch.cat([timestep, timestep]),
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
        pooled_projections=torch.cat([negative_pooled, pooled]),
        return_dict=False,
    )[0].float()
    uncond, conditional = out.chunk(2)  # (2B, ...) -> 2 x (B, ...)
    return uncond + guidance_scale * (conditional - uncond)


def pack_latents(x):
    """FLUX's token layout: (B, C, H, W) -> (B, H/2 * W/2, 4C), each token a 2x2 patch."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens, height, width):
    """Inverse of pack_latents: (B, H/2 * W/2, 4C) -> (B, C, H, W) for a latent of size height x width."""
    B, _, D = tokens.shape
    x = tokens.reshape(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(B, D // 4, height, width)


def flux_velocity(transformer, x, sigma, cond, guidance_scale):
    """FLUX.1-dev's velocity: packed latents, position ids, and guidance as an embedding (no CFG).

    cond = (prompt_embeds (B, L, D), pooled (B, D')). FLUX takes t = sigma (it scales by 1000 itself).
    """
    prompt_embeds, pooled = cond
    B, _, H, W = x.shape
    image_ids = torch.zeros(H // 2, W // 2, 3, device=x.device)  # (row, column) of each 2x2 token
    image_ids[..., 1] += torch.arange(H // 2, device=x.device)[:, None]
    image_ids[..., 2] += torch.arange(W // 2, device=x.device)[None, :]
    out = transformer(
        hidden_states=pack_latents(x).to(transformer.dtype),
        timestep=torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(B),
        guidance=torch.full((B,), guidance_scale, device=x.device),
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=x.device),
        img_ids=image_ids.reshape(-1, 3),  # (H/2, W/2, 3) -> (H/2 * W/2, 3)
        return_dict=False,
    )[0].float()
    return unpack_latents(out, H, W)


def flux_sigmas(num_steps, image_seq_len):
    """FLUX's resolution-dependent schedule: sigma' = e^mu / (e^mu + 1/sigma - 1) on linspace(1, 1/n, n).

    mu grows linearly with the number of image tokens, from 0.5 at 256 tokens to 1.15 at 4096 (diffusers' defaults).
    """
    mu = 0.5 + (1.15 - 0.5) * (image_seq_len - 256) / (4096 - 256)
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()


class DiffusersBackbone:
    """An SD3 or FLUX transformer with LoRA, its VAE, cached prompt embeddings, a reward and an image embedder.

    Built from pretrained weights by load_diffusers_backbone(), or from tiny random models in the tests.
    prompt_embeddings maps each prompt to a tuple of tensors without batch dim (see sd3_velocity / flux_velocity).
    reward_fn(images, prompts) -> (B,) and embed_fn(images) -> (B, D) take images (B, 3, H, W) in [0, 1].
    """

    feature_metric = "cosine"  # DreamSim's distance is 1 - cos of its embeddings
    lora_targets = LORA_TARGETS

    def __init__(self, cfg, transformer, vae, prompt_embeddings, reward_fn, embed_fn, prompts, eval_prompts):
        self.kind, self.cfg = cfg.backbone, cfg
        self.model, self.vae = transformer, vae
        self.prompt_embeddings, self.reward_fn, self.embed_fn = prompt_embeddings, reward_fn, embed_fn
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.device = torch.device(cfg.device)
        self.latent_size = cfg.model.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        if cfg.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()  # only active when grad is on: the reference pass is unaffected

    def sigmas(self, num_steps):
        if self.kind == "flux":
            return flux_sigmas(num_steps, (self.latent_size // 2) ** 2)
        return flow_match_sigmas(num_steps, self.cfg.sampling.shift)

    def encode(self, prompts):
        """Look up the cached embeddings: a tuple of (B, ...) tensors on the device."""
        parts = zip(*(self.prompt_embeddings[p] for p in prompts), strict=True)
        return tuple(torch.stack(part).to(self.device) for part in parts)  # B x (L, D) -> (B, L, D), and so on

    def noise(self, n, generator):
        shape = (
            n,
            self.model.config.in_channels // (4 if self.kind == "flux" else 1),
            self.latent_size,
            self.latent_size,
        )
        return torch.randn(shape, generator=generator).to(self.device)

    def velocity(self, x, sigma, cond):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16"):
            if self.kind == "flux":
                return flux_velocity(self.model, x, sigma, cond, self.cfg.model.guidance_scale)
            return sd3_velocity(self.model, x, sigma, cond, self.cfg.model.guidance_scale)

    @torch.no_grad()
    def decode(self, x):
        """Latents -> images (B, 3, H, W) in [0, 1], as the diffusers pipelines do: z / scale + shift, then the VAE."""
        config = self.vae.config
        z = (x / config.scaling_factor + (config.shift_factor or 0.0)).to(self.vae.dtype)
        return (self.vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def reward(self, images, prompts):
        return self.reward_fn(images, prompts).float().cpu()

    @torch.no_grad()
    def features(self, images):
        return self.embed_fn(images).float().cpu()

    def save_lora(self, folder):
        """Write the LoRA so that plain diffusers' pipe.load_lora_weights(folder) loads it."""
        from diffusers import FluxPipeline, StableDiffusion3Pipeline
        from peft import get_peft_model_state_dict

        pipeline_class = FluxPipeline if self.kind == "flux" else StableDiffusion3Pipeline
        pipeline_class.save_lora_weights(
            folder,
            transformer_lora_layers=get_peft_model_state_dict(self.model),
            # Without the config, a loader assumes lora_alpha == r and scales the adapter wrongly.
            transformer_lora_adapter_metadata=self.model.peft_config["default"].to_dict(),
        )


def load_diffusers_backbone(cfg):
    """Load the pipeline, cache every prompt's embeddings, free the text encoders, and build reward and embedder."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # keep a failed download to our one-line error
    prompts = read_prompts(cfg.model.prompts_file) if cfg.model.prompts_file else list(cfg.model.prompts)
    eval_prompts = read_prompts(cfg.model.eval_prompts_file) if cfg.model.eval_prompts_file else cfg.model.eval_prompts
    pipeline_class = diffusers.FluxPipeline if cfg.backbone == "flux" else diffusers.StableDiffusion3Pipeline
    dtype = getattr(torch, cfg.dtype)
    try:
        pipe = pipeline_class.from_pretrained(cfg.model.pretrained, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SetupError(
            f"could not load the {cfg.backbone} weights '{cfg.model.pretrained}': {first_line(e)}"
        ) from None
    pipe.to(cfg.device)
    embeddings = {}
    with torch.no_grad():
        for prompt in tqdm(sorted(set(prompts) | set(eval_prompts)), desc="encode prompts", leave=False):
            if cfg.backbone == "flux":
                embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=cfg.device)
                embeddings[prompt] = (embeds[0].cpu(), pooled[0].cpu())
            else:
                embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                    prompt, prompt_2=None, prompt_3=None, device=cfg.device, do_classifier_free_guidance=True
                )
                embeddings[prompt] = (embeds[0].cpu(), pooled[0].cpu(), negative[0].cpu(), negative_pooled[0].cpu())
    transformer, vae = pipe.transformer, pipe.vae
    del pipe  # the text encoders leave the GPU: every embedding is cached
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reward_fn = load_reward(cfg)
    embed_fn = load_dreamsim(cfg)
    return DiffusersBackbone(cfg, transformer, vae, embeddings, reward_fn, embed_fn, prompts, eval_prompts)


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


# ---- 7. Rewards and the embedder of the creativity bonus ----


def clip_pixels(images, size=224):
    """CLIP's preprocessing in torch: resize the short side to `size` (bicubic), center-crop, normalize.

    images (B, 3, H, W) in [0, 1] -> (B, 3, size, size). Matches CLIPImageProcessor without a trip through PIL.
    """
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    images = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    images = images[..., top : top + size, left : left + size]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _projected(output):
    """transformers 5 returns model outputs from get_*_features; 4.x returned the tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


def pickscore_reward(model, tokenizer, images, prompts):
    """PickScore / 26, as Flow-GRPO scales it: logit_scale * cos(text, image) of the PickScore CLIP."""
    device = next(model.parameters()).device
    image_embeds = F.normalize(
        _projected(model.get_image_features(pixel_values=clip_pixels(images.to(device)))), dim=-1
    )
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    text_embeds = F.normalize(_projected(model.get_text_features(**tokens)), dim=-1)
    return model.logit_scale.exp() * (text_embeds * image_embeds).sum(-1) / 26


def load_reward(cfg):
    """reward(images (B, 3, H, W) in [0, 1], prompts) -> (B,), run in micro-batches."""
    micro_batch = cfg.train.micro_batch or 8
    if cfg.model.reward == "hpsv3":
        try:
            from hpsv3 import HPSv3RewardInferencer
        except ImportError:
            raise SetupError("the hpsv3 reward needs the hpsv3 package: pip install hpsv3 (see README)") from None
        inferencer = HPSv3RewardInferencer(device=cfg.device)

        def score(images, prompts):
            from torchvision.transforms.functional import to_pil_image

            pil_images = [to_pil_image(image.float().cpu()) for image in images]  # the input every hpsv3 accepts
            return inferencer.reward(pil_images, prompts)[:, 0]  # HPSv3 returns (mu, sigma); the score is mu
    else:
        from transformers import AutoModel, AutoProcessor

        try:
            tokenizer = AutoProcessor.from_pretrained(cfg.model.reward_processor).tokenizer
            model = AutoModel.from_pretrained(cfg.model.reward_model).eval().to(cfg.device)
        except (OSError, ValueError) as e:
            raise SetupError(
                f"could not load the PickScore weights '{cfg.model.reward_model}': {first_line(e)}"
            ) from None

        def score(images, prompts):
            return pickscore_reward(model, tokenizer, images, prompts)

    @torch.no_grad()
    def reward(images, prompts):
        chunks = range(0, len(images), micro_batch)
        return torch.cat([score(images[i : i + micro_batch], prompts[i : i + micro_batch]).float() for i in chunks])

    return reward


def load_dreamsim(cfg):
    """embed(images (B, 3, H, W) in [0, 1]) -> DreamSim embeddings (B, D); 1 - cos of two is DreamSim's distance."""
    from dreamsim import dreamsim

    micro_batch = cfg.train.micro_batch or 8
    try:
        model, _ = dreamsim(
            pretrained=True,
            device=cfg.device,  # dreamsim keeps a projection outside its modules: build it on the device, never move it
            cache_dir=os.path.expanduser(cfg.model.dreamsim_cache),
            dreamsim_type=cfg.model.dreamsim_type,
        )
    except Exception as e:  # dreamsim raises whatever its downloader raised
        raise SetupError(f"could not load DreamSim '{cfg.model.dreamsim_type}': {first_line(e)}") from None

    @torch.no_grad()
    def embed(images):
        images = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
        return torch.cat([model.embed(images[i : i + micro_batch]) for i in range(0, len(images), micro_batch)])

    return embed


# ---- 8. Rollout: sample a group with the SDE, keeping every step's latents and log-probs ----


def rollout(backbone, cond, noise, sigmas, noise_level, generator=None):
    """Run the sampler from sigma = 1 to 0. Returns latents (B, T+1, ...) and log_probs (B, T).

    noise_level > 0 is the training SDE; noise_level = 0 is the ODE used for evaluation (log_probs are then zeros).
    The last step is always deterministic: it is never trained, and with few steps its noise would be large (FLUX's
    6-step schedule ends .27 -> 0, a std of .29 on the image the reward sees).
    """
    x = noise
    T = len(sigmas) - 1
    latents, log_probs = [x], []
    for i in range(T):
        velocity = backbone.velocity(x, sigmas[i], cond)
        level = noise_level if i < T - 1 else 0.0
        x, log_prob, _, _ = sde_step_with_logprob(velocity, x, sigmas[i], sigmas[i + 1], level, generator=generator)
        latents.append(x)
        log_probs.append(log_prob)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)  # T+1 x (B, ...) -> (B, T+1, ...); (B, T)


# ---- 9. The training loop: sample -> reward -> bonus -> advantages -> per-step update -> log ----


def _select(cond, index):
    """The rows `index` of every tensor of a condition tuple."""
    return tuple(c[index] for c in cond)


def train(cfg, backbone, method, log=print, name=None):
    """Fine-tune a fresh LoRA on `backbone` with one method of METHODS; returns its evaluation history (a list).

    Each iteration takes one optimizer step, accumulated over every trained denoising step, so the first (and only)
    update after sampling is exactly on-policy: ratio == 1 and the PPO clip never binds. Flow-GRPO splits a batch
    into several optimizer steps; the clip range matters there. With cfg.resume it continues from the newest
    checkpoint of this run; Ctrl-C writes one for the last finished iteration before it stops. `name` labels the
    run's checkpoints and images (default: the method).
    """
    name = name or method
    terms = METHODS[method]
    s, t, d = cfg.sampling, cfg.train, cfg.diverse
    P, G, T = s.prompts_per_iter, s.group_size, s.num_steps
    B = P * G
    chunks = torch.arange(B).split(t.micro_batch or B)  # micro-batches; clustering and advantages see all B
    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn from the global RNG
    lora_params = add_lora(backbone.model, t.lora_rank, t.lora_alpha, backbone.lora_targets)
    optimizer = torch.optim.AdamW(lora_params, lr=t.lr, weight_decay=t.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    sigmas = backbone.sigmas(T)
    # `done` is the last finished iteration; generator_state is the generator's state right after it.
    history, done = load_checkpoint(cfg, name, backbone, optimizer, generator) if cfg.resume else ([], 0)
    history = history or [dict(iteration=0, method=method, **evaluate(cfg, backbone))]
    for record in history:  # a resumed run rewrites the metrics it had, so metrics.jsonl never holds a line twice
        log(record)
    if done and history[-1]["iteration"] != done and (done % t.eval_every == 0 or done == t.iterations):
        # Interrupted during that iteration's evaluation: redo it (its noises are fixed). Its training stats are lost.
        history.append(dict(iteration=done, method=method, **evaluate(cfg, backbone)))
        log(history[-1])
    generator_state = generator.get_state()
    skipped_total = dropped_total = 0  # updates skipped and rewards dropped since the last metrics line
    bar = tqdm(range(done + 1, t.iterations + 1), desc=name, initial=done, total=t.iterations)
    try:
        for iteration in bar:
            start = time.time()
            if backbone.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            # 1. Sample P prompts and a group of G trajectories for each, with the SDE.
            prompt_ids = torch.randperm(len(backbone.prompts), generator=generator)[:P]
            prompts = [backbone.prompts[p] for p in prompt_ids for _ in range(G)]  # (B,) prompt p repeated G times
            cond = backbone.encode(prompts)
            noise = backbone.noise(B, generator)
            with torch.no_grad():
                parts = [
                    rollout(backbone, _select(cond, c), noise[c], sigmas, s.noise_level, generator) for c in chunks
                ]
                latents = torch.cat([p[0] for p in parts])  # (B, T+1, ...)
                old_log_probs = torch.cat([p[1] for p in parts])  # (B, T)
                samples = torch.cat([backbone.decode(latents[c, -1]) for c in chunks])

            # 2. Quality reward, plus the creativity bonus computed within each prompt's group (paper sec 3.2).
            #    A sample with a NaN or inf reward (or image features) is dropped: it is left out of the clustering,
            #    stands at its group's mean for the statistics, and gets A = 0.
            quality = backbone.reward(samples, prompts)  # (B,)
            dropped = ~torch.isfinite(quality)
            bonus = torch.ones(B)
            if terms["bonus"]:
                features = backbone.features(samples)  # (B, D)
                dropped |= ~torch.isfinite(features).all(dim=1)
                for p in range(P):
                    group = torch.arange(p * G, (p + 1) * G)[~dropped[p * G : (p + 1) * G]]  # kept rows of group p
                    distances = pairwise_distances(features[group], backbone.feature_metric)
                    bonus[group], _ = creativity_bonus(distances, d.n_clusters, d.sigma, cfg.seed, d.max_clusters)
            rewards = quality + (d.beta * bonus if terms["bonus"] else 0.0)

            # 3. Group-normalized advantages, shared by every step of a trajectory (Flow-GRPO Eq. 4).
            if dropped.any():
                names = sorted({prompts[i] for i in dropped.nonzero().flatten().tolist()})
                message = f"dropped {int(dropped.sum())} non-finite reward(s) of {names}"
                tqdm.write(f"warning: iteration {iteration}: {message}", file=sys.stderr)
                dropped_total += int(dropped.sum())
                grouped = rewards.masked_fill(dropped, float("nan")).reshape(P, G)  # (B,) -> (P, G)
                group_mean = grouped.nanmean(dim=1, keepdim=True).nan_to_num(0.0)  # (P, 1); 0 if all are dropped
                rewards = torch.where(grouped.isnan(), group_mean, grouped).reshape(B)
            adv = group_advantages(rewards.reshape(P, G), clip=t.adv_clip).reshape(B)  # (B,) -> (P, G) -> (B,)
            adv = adv.masked_fill(dropped, 0.0).to(latents.device)

            # 4. One clipped-surrogate loss per denoising step and micro-batch, back-propagated at once, so only one
            #    forward's graph is alive at a time. Each piece is weighted by its share of the batch and the steps.
            optimizer.zero_grad()
            stats = dict(loss=0.0, reg=0.0, ratio=0.0)
            for i in range(T - 1):  # the last step's std is ~0: its log-prob is meaningless, so it is never trained
                for c in chunks:
                    x, x_next, c_cond = latents[c, i], latents[c, i + 1], _select(cond, c)
                    velocity = backbone.velocity(x, sigmas[i], c_cond)
                    _, log_prob, mean, std_dev = sde_step_with_logprob(
                        velocity, x, sigmas[i], sigmas[i + 1], s.noise_level, prev_sample=x_next
                    )
                    loss = grpo_loss(log_prob, old_log_probs[c, i], adv[c], t.clip_range)
                    reg = torch.zeros((), device=x.device)
                    if (terms["w2"] and i < d.K) or terms["kl"]:
                        with torch.no_grad(), adapters_disabled(backbone.model):  # the reference = LoRA switched off
                            ref_velocity = backbone.velocity(x, sigmas[i], c_cond)
                        _, _, ref_mean, _ = sde_step_with_logprob(
                            ref_velocity, x, sigmas[i], sigmas[i + 1], s.noise_level, prev_sample=x_next
                        )
                        if terms["w2"]:
                            reg = reg + d.lambda_w * structure_aware_reg(mean, ref_mean, i, d.K).mean()
                        if terms["kl"]:
                            reg = reg + t.kl_beta * kl_reg(mean, ref_mean, std_dev).mean()
                    weight = len(c) / B / (T - 1)
                    ((loss + reg) * weight).backward()
                    stats["loss"] += loss.item() * weight
                    stats["reg"] += reg.item() * weight
                    stats["ratio"] += torch.exp(log_prob - old_log_probs[c, i]).mean().item() * weight
            grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, t.max_grad_norm)
            if torch.isfinite(grad_norm) and math.isfinite(stats["loss"] + stats["reg"]):
                optimizer.step()
            else:  # one bad batch must not write NaN into the weights: skip this update, keep training
                skipped_total += 1
                message = "non-finite loss or gradient, update skipped"
                tqdm.write(f"warning: iteration {iteration}: {message}", file=sys.stderr)
            done, generator_state = iteration, generator.get_state()

            # 5. Log; evaluate with the ODE every eval_every iterations; checkpoint every save_every.
            bar.set_postfix(reward=f"{quality.nanmean():.3f}", loss=f"{stats['loss']:.4f}")
            if iteration % t.eval_every == 0 or iteration == t.iterations:
                record = dict(
                    iteration=iteration,
                    method=method,
                    train_reward=quality[~dropped].mean().item(),
                    bonus=bonus.mean().item(),
                    grad_norm=grad_norm.item(),
                    skipped_updates=skipped_total,
                    dropped_rewards=dropped_total,
                    **stats,
                    iter_seconds=time.time() - start,
                )
                if backbone.device.type == "cuda":
                    record["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
                record.update(evaluate(cfg, backbone, image_path=_image_path(cfg, name, iteration)))
                history.append(record)
                log(record)
                skipped_total = dropped_total = 0  # the counts are since the previous metrics line
            if t.save_every and (iteration % t.save_every == 0 or iteration == t.iterations):
                save_checkpoint(cfg, backbone, optimizer, generator_state, name, done, history)
    except KeyboardInterrupt:
        # The weights and the optimizer only change in optimizer.step(), so `done` describes them exactly.
        path = save_checkpoint(cfg, backbone, optimizer, generator_state, name, done, history)
        tqdm.write(f"interrupted: wrote {path}; continue with --set resume=true", file=sys.stderr)
        raise
    return history


def _image_path(cfg, name, iteration):
    return os.path.join(cfg.output_dir, "images", f"{name}_{iteration:05d}.png")


def save_checkpoint(cfg, backbone, optimizer, generator_state, name, iteration, history):
    """Write output_dir/checkpoints/<name>/<iteration>/, atomically, and keep the newest keep_checkpoints.

    training_state.pt holds everything a resume needs (LoRA, optimizer, random states, metrics so far); image
    backbones also write the LoRA in diffusers' format, for pipe.load_lora_weights. The folder is written under a
    temporary name and renamed at the end, so a crash never leaves half a checkpoint behind.
    """
    from peft import get_peft_model_state_dict

    root = os.path.join(cfg.output_dir, "checkpoints", name)
    final = os.path.join(root, f"{iteration:06d}")
    partial = final + ".partial"
    if os.path.exists(partial):  # left by a crash in the middle of a write
        shutil.rmtree(partial)
    os.makedirs(partial)
    if isinstance(backbone, DiffusersBackbone):
        backbone.save_lora(partial)
    state = dict(
        lora=get_peft_model_state_dict(backbone.model),
        optimizer=optimizer.state_dict(),
        generator=generator_state,
        torch_rng=torch.get_rng_state(),
        iteration=iteration,
        history=history,
    )
    torch.save(state, os.path.join(partial, "training_state.pt"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    for old in sorted(n for n in os.listdir(root) if n.isdigit())[: -cfg.train.keep_checkpoints]:
        shutil.rmtree(os.path.join(root, old))
    return final


def load_checkpoint(cfg, name, backbone, optimizer, generator):
    """Restore the newest checkpoint of run `name` into the model, optimizer and generator.

    Returns (history, iteration) of the checkpoint, or ([], 0) when there is none. Training then continues exactly
    where it stopped: on the CPU, a resumed run's metrics equal an uninterrupted run's.
    """
    from peft import set_peft_model_state_dict

    root = os.path.join(cfg.output_dir, "checkpoints", name)
    names = sorted(n for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []
    if not names:
        return [], 0
    state = torch.load(os.path.join(root, names[-1], "training_state.pt"), map_location="cpu", weights_only=True)
    set_peft_model_state_dict(backbone.model, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    tqdm.write(f"resumed {name} from {os.path.join(root, names[-1])}")
    return state["history"], state["iteration"]


# ---- 10. Evaluation, the matched-quality table, and plots ----


@torch.no_grad()
def evaluate(cfg, backbone, return_samples=False, image_path=None):
    """ODE samples from fixed held-out noises: mean reward, diversity (mean pairwise distance) and Vendi score.

    The toy also counts modes; image backbones write a grid (prompts x samples) to image_path.
    """
    generator = torch.Generator().manual_seed(cfg.seed + 10_000)  # the same noises at every evaluation
    n, micro_batch = cfg.sampling.eval_samples, cfg.train.micro_batch or cfg.sampling.eval_samples
    sigmas = backbone.sigmas(cfg.sampling.eval_num_steps)
    rewards, diversities, vendis, modes, samples = [], [], [], [], {}
    for prompt in backbone.eval_prompts:
        cond, noise = backbone.encode([prompt] * n), backbone.noise(n, generator)
        x = []
        for c in torch.arange(n).split(micro_batch):
            latents, _ = rollout(backbone, _select(cond, c), noise[c], sigmas, noise_level=0.0)
            x.append(backbone.decode(latents[:, -1]))
        x = torch.cat(x)
        rewards.append(backbone.reward(x, [prompt] * n).mean().item())
        features = backbone.features(x)
        diversities.append(diversity_score(features, backbone.feature_metric))
        vendis.append(vendi_score(features, backbone.feature_metric, cfg.diverse.sigma))
        if isinstance(backbone, ToyBackbone):
            modes.append(backbone.count_modes(x, prompt))
        samples[prompt] = x.cpu()
    metrics = dict(reward=float(np.mean(rewards)), diversity=float(np.mean(diversities)), vendi=float(np.mean(vendis)))
    if modes:
        metrics["modes"] = float(np.mean(modes))
    elif image_path:
        save_image_grid(image_path, samples)
    return (metrics, samples) if return_samples else metrics


def save_image_grid(path, samples):
    """One row per prompt, one column per sample: {prompt: (n, 3, H, W) in [0, 1]} -> a PNG."""
    plt = _pyplot()
    rows = list(samples.values())  # P x (n, 3, H, W)
    grid = torch.cat([torch.cat(list(images), dim=2) for images in rows], dim=1)  # (3, P*H, n*W)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    plt.imsave(path, grid.permute(1, 2, 0).numpy())  # (3, P*H, n*W) -> (P*H, n*W, 3)


def diversity_at_reward(history, level):
    """Diversity (and Vendi, modes) where a training curve first reaches a reward level, interpolated linearly."""
    for before, after in zip(history[:-1], history[1:]):  # noqa: B905 (equal lengths by construction)
        if before["reward"] < level <= after["reward"]:
            w = (level - before["reward"]) / (after["reward"] - before["reward"])
            keys = [k for k in ("diversity", "vendi", "modes") if k in after]
            return {key: before[key] + w * (after[key] - before[key]) for key in keys}
    return None


def matched_quality_table(histories, baseline="grpo", n_levels=4):
    """Each method's diversity at the same reward levels (the paper's 'matched quality' comparison).

    histories: {method: [history of each seed]}. The levels are spread over the upper part of the range that every
    run reaches: from half-way between the base model's reward and the lowest of the runs' best rewards, up to that
    best reward. A row is flat: {"reward", m, m_std, m_vendi, m_modes, m_gain} for each method m, the means (and
    population std) over seeds; a cell is None if a run never reaches the level. [] when no level is shared.
    """
    runs = [h for per_seed in histories.values() for h in per_seed]
    start = max(h[0]["reward"] for h in runs)
    top = min(max(r["reward"] for r in h) for h in runs)
    if top <= start:  # some run never rose above another's starting reward: no level is shared
        return []
    levels = [start + (top - start) * f for f in np.linspace(0.5, 1.0, n_levels)] if n_levels > 1 else [top]
    rows = []
    for level in levels:
        row = dict(reward=level)
        for method, per_seed in histories.items():
            # level - 1e-9: the run whose best reward defines `top` must count as reaching it
            cells = [diversity_at_reward(h, level - 1e-9) for h in per_seed]
            found = None if None in cells else cells
            for key in ("diversity", "vendi", "modes"):
                values = [f[key] for f in found] if found and key in found[0] else None
                name = method if key == "diversity" else f"{method}_{key}"
                row[name] = float(np.mean(values)) if values else None
                if key == "diversity":
                    row[method + "_std"] = float(np.std(values)) if values else None
        for method in histories:
            if method != baseline and baseline in histories and row[method] is not None and row[baseline]:
                row[method + "_gain"] = row[method] / row[baseline] - 1
        rows.append(row)
    return rows


def format_table(rows, methods):
    """The matched-quality table as text: per reward level, each method's diversity +- std / Vendi (modes)."""

    def cell(row, method):
        if row[method] is None:
            return f"{'n/a':>34}"
        text = f"{row[method]:.3f}" + (f"+-{row[method + '_std']:.3f}" if row[method + "_std"] else "")
        text += f" / {row[method + '_vendi']:.1f}"
        modes = row[method + "_modes"]
        return f"{text + ('' if modes is None else f' ({modes:.1f})'):>34}"

    lines = ["reward  " + "".join(f"{m + ' div / vendi (modes)':>34}" for m in methods)]
    for row in rows:
        gains = ", ".join(f"{m} {row[m + '_gain']:+.1%}" if m + "_gain" in row else f"{m} n/a" for m in methods[1:])
        lines.append(f"{row['reward']:.3f}  " + "".join(cell(row, m) for m in methods) + f"   gain: {gains}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_toy(path, base_samples, final_samples, histories):
    """One row per prompt (base, then each method's final ODE samples), and the reward-vs-diversity curves."""
    plt = _pyplot()
    prompts = list(base_samples)
    columns = ["base"] + list(final_samples)
    fig, axes = plt.subplots(len(prompts), len(columns) + 1, figsize=(3 * (len(columns) + 1), 3 * len(prompts)))
    for r, prompt in enumerate(prompts):
        for c, name in enumerate(columns):
            x = (base_samples if name == "base" else final_samples[name])[prompt].numpy()
            ax = axes[r, c]
            ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.5)
            ax.set_xlim(-2.2, 2.2)
            ax.set_ylim(-2.2, 2.2)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {prompt}", fontsize=8)
        axes[r, -1].axis("off")
    ax = fig.add_subplot(len(prompts), len(columns) + 1, len(columns) + 1)
    for i, (method, runs) in enumerate(histories.items()):
        for seed, history in enumerate(runs):  # the first seed solid, the others faint
            first = seed == 0
            ax.plot([h["reward"] for h in history], [h["diversity"] for h in history], marker="." if first else None,
                    color=f"C{i}", alpha=1.0 if first else 0.35, label=method if first else None)  # fmt: skip
    ax.set_xlabel("mean reward (ODE)")
    ax.set_ylabel("diversity (mean pairwise dist.)")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_training_curves(path, histories, groups):
    """Reward and diversity against iteration (first seed), one row per group of runs: {row title: [labels]}."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for row, (title, labels) in enumerate(groups.items()):
        for label in labels:
            history = histories[label][0]
            iterations = [h["iteration"] for h in history]
            axes[row, 0].plot(iterations, [h["reward"] for h in history], label=label)
            axes[row, 1].plot(iterations, [h["diversity"] for h in history], label=label)
        axes[row, 0].set_ylabel(f"reward ({title} sweep)")
        axes[row, 1].set_ylabel("diversity (mean pairwise dist.)")
        axes[row, 1].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    _save(plt, fig, path)


def plot_branching(path, mean_curve, per_prompt, third):
    """Diversity after sharing the first s SDE steps, with the first third of the steps shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for prompt, curve in per_prompt.items():
        ax.plot(curve, alpha=0.4, label=prompt)
    ax.plot(mean_curve, color="black", marker="o", label="mean")
    ax.axvspan(0, third, color="grey", alpha=0.15)
    ax.set_xlabel("shared SDE steps s")
    ax.set_ylabel("diversity of the branches")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_bonus_cost(path, rows):
    """Wall time of the bonus against group size, log-log, for both eigengap solvers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sizes = [r["group_size"] for r in rows]
    for solver in ("dense", "arpack"):
        ax.loglog(sizes, [r[solver] for r in rows], marker="o", label=f"{solver} eigengap")
    ax.set_xlabel("group size N")
    ax.set_ylabel("seconds per group")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


# ---- 11. The paper's analyses: ablation, sweeps, branching, choice of k, cost of the bonus ----


def with_changes(cfg, changes):
    """A copy of cfg with dotted keys replaced, e.g. {"diverse.beta": 0.7}."""
    cfg = copy.deepcopy(cfg)
    for key, value in changes.items():
        *path, name = key.split(".")
        setattr(functools.reduce(getattr, path, cfg), name, value)
    validate(cfg)  # a sweep value is held to the same rules as a config value
    return cfg


def train_variants(cfg, variants, log):
    """Train each (label, method, changes) variant from its seed's base model, for every seed of the analysis.

    Returns ({label: [history per seed]}, {label: final ODE samples of the first seed}).
    """
    histories, final_samples = {label: [] for label, _, _ in variants}, {}
    for seed in cfg.analysis.seeds or [cfg.seed]:
        for label, method, changes in variants:
            variant = with_changes(cfg, {"seed": seed, **changes})
            backbone = build_backbone(variant)  # a fresh copy of the seed's base model

            def run_log(record, label=label, seed=seed):
                log({"run": label, "seed": seed, **record})

            histories[label].append(train(variant, backbone, method, run_log, name=f"{label}-seed{seed}"))
            if isinstance(backbone, ToyBackbone) and label not in final_samples:
                # The plots need samples, which train()'s JSON history does not keep. Re-evaluating gives the same
                # samples as its last evaluation (fixed noises) and costs the toy about 0.1 s.
                final_samples[label] = evaluate(variant, backbone, return_samples=True)[1]
            del backbone  # free the GPU before the next variant loads its own copy of the models
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return histories, final_samples


def branching_diversity(backbone, prompt, sigmas, noise_level, trunks, branches, generator):
    """Diversity when samples share their first s SDE steps, for s = 0..T (DiverseGRPO project page).

    Each of `trunks` trajectories starts from one noise and runs s steps; then `branches` copies of it finish the
    remaining steps with independent noise. Even at s = 0 the branches share their starting noise, so the curve
    measures what the SDE's own noise decides, step by step. Returns T + 1 values: the mean, over trunks, of the
    final samples' mean pairwise distance. The last step is deterministic, so s = T - 1 and s = T share everything.
    """
    T = len(sigmas) - 1
    cond = backbone.encode([prompt] * branches)
    trunk_seeds = torch.randint(2**31, (trunks,), generator=generator).tolist()  # the same trunks for every s
    curve = []
    for shared in range(T + 1):
        scores = []
        for trunk_seed in trunk_seeds:
            trunk_generator = torch.Generator().manual_seed(trunk_seed)
            x = backbone.noise(1, trunk_generator)
            for i in range(shared):  # the shared stem: one sample
                velocity = backbone.velocity(x, sigmas[i], _select(cond, [0]))
                level = noise_level if i < T - 1 else 0.0  # the last step is deterministic, as in rollout()
                x, *_ = sde_step_with_logprob(velocity, x, sigmas[i], sigmas[i + 1], level, generator=trunk_generator)
            x = x.expand(branches, *x.shape[1:])  # (1, ...) -> (branches, ...)
            for i in range(shared, T):  # the branches: independent noise from here on
                velocity = backbone.velocity(x, sigmas[i], cond)
                level = noise_level if i < T - 1 else 0.0
                x, *_ = sde_step_with_logprob(velocity, x, sigmas[i], sigmas[i + 1], level, generator=generator)
            scores.append(diversity_score(backbone.features(backbone.decode(x)), backbone.feature_metric))
        curve.append(float(np.mean(scores)))
    return curve


def clustering_stability(groups, n_clusters, sigma, metric="euclidean", max_clusters=32, seed=0, seeds=5, jitter=0.02):
    """How stable the bonus's clustering is: mean adjusted Rand index (1 = identical labels).

    across_seeds: labels from different clustering seeds on the same group; under_jitter: labels before and after
    moving every sample by Gaussian noise of `jitter` times the group's median pairwise distance.
    """
    from sklearn.metrics import adjusted_rand_score

    generator = torch.Generator().manual_seed(seed)
    across_seeds, under_jitter, n_found = [], [], []
    for features in groups:
        distances = pairwise_distances(features, metric)
        labels = [creativity_bonus(distances, n_clusters, sigma, seed + i, max_clusters)[1] for i in range(seeds)]
        across_seeds += [adjusted_rand_score(labels[0], other) for other in labels[1:]]
        scale = jitter * distances[~torch.eye(len(features), dtype=torch.bool)].median()
        moved = features + scale * torch.randn(features.shape, generator=generator)
        moved_labels = creativity_bonus(pairwise_distances(moved, metric), n_clusters, sigma, seed, max_clusters)[1]
        under_jitter.append(adjusted_rand_score(labels[0], moved_labels))
        n_found.append(len(set(labels[0].tolist())))
    return dict(ari_across_seeds=float(np.mean(across_seeds)), ari_under_jitter=float(np.mean(under_jitter)),
                clusters=float(np.mean(n_found)))  # fmt: skip


def time_bonus(features, n_clusters, sigma, eigen_solver, max_clusters=32, repeats=3):
    """Median wall time of the whole bonus (distances, affinity, clustering, bonus) for one group, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        creativity_bonus(pairwise_distances(features), n_clusters, sigma, 0, max_clusters, eigen_solver)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def compare_methods(cfg, log):
    """Train cfg.methods from the same base, on every seed, and compare them at matched reward (and the ablation)."""
    histories, final_samples = train_variants(cfg, [(m, m, {}) for m in cfg.methods], log)
    rows = matched_quality_table(histories, baseline=cfg.methods[0])
    print("\nDiversity at matched reward (ODE evaluation, mean over prompts; mean +- std over seeds):")
    print(format_table(rows, cfg.methods))
    if all(row[cfg.methods[0]] is None for row in rows):
        print("(no reward level above the base model's is reached by every run: train longer to compare)")
    if cfg.backbone == "toy":
        base_samples = evaluate(cfg, build_backbone(cfg), return_samples=True)[1]  # the cached base, seed cfg.seed
        plot_toy(os.path.join(cfg.output_dir, "toy.png"), base_samples, final_samples, histories)
    final = {m: [h[-1] for h in hs] for m, hs in histories.items()}
    return dict(experiment="compare", seeds=cfg.analysis.seeds or [cfg.seed], methods=cfg.methods, table=rows,
                final=final)  # fmt: skip


def sweep(cfg, log):
    """The paper's ablations of beta (bonus weight) and K (regularized steps), each against plain GRPO."""
    a = cfg.analysis
    variants = [("grpo", "grpo", {})]
    variants += [(f"beta={b}", "diversegrpo", {"diverse.beta": b}) for b in a.betas]
    variants += [(f"K={k}", "diversegrpo", {"diverse.K": k}) for k in a.Ks]
    histories, _ = train_variants(cfg, variants, log)
    rows = []
    for label, runs in histories.items():
        last = runs[0][-1]
        rows.append(dict(run=label, reward=last["reward"], diversity=last["diversity"], vendi=last["vendi"],
                         modes=last.get("modes"), best_reward=max(r["reward"] for r in runs[0])))  # fmt: skip
    print("\nSweep: final ODE metrics (and the best reward along training)")
    print("run          reward  diversity   vendi  modes  best reward")
    for r in rows:
        modes = "" if r["modes"] is None else f"{r['modes']:5.1f}"
        metrics = f"{r['reward']:6.3f}  {r['diversity']:9.3f}  {r['vendi']:6.2f}  {modes:>5}  {r['best_reward']:11.3f}"
        print(f"{r['run']:<12} {metrics}")
    groups = {"beta": ["grpo"] + [f"beta={b}" for b in a.betas], "K": ["grpo"] + [f"K={k}" for k in a.Ks]}
    plot_training_curves(os.path.join(cfg.output_dir, "sweep.png"), histories, groups)
    return dict(experiment="sweep", table=rows)


def compare_n_clusters(cfg, log):
    """Fixed k against the eigengap's choice: diversity at matched reward, and how stable the clustering is."""
    a = cfg.analysis
    labels = [f"k={k}" for k in a.n_clusters]
    variants = [("grpo", "grpo", {})] + [(f"k={k}", "diversegrpo", {"diverse.n_clusters": k}) for k in a.n_clusters]
    histories, _ = train_variants(cfg, variants, log)
    rows = matched_quality_table(histories, baseline="grpo")
    print("\nDiversity at matched reward by choice of k (mean +- std over seeds):")
    print(format_table(rows, ["grpo"] + labels))
    # Stability, on groups of G SDE samples of the base model: the groups the bonus sees early in training.
    backbone = build_backbone(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    sigmas, G = backbone.sigmas(cfg.sampling.num_steps), cfg.sampling.group_size
    groups = []
    for prompt in backbone.prompts:
        cond = backbone.encode([prompt] * G)
        for _ in range(a.stability_groups):
            latents, _ = rollout(
                backbone, cond, backbone.noise(G, generator), sigmas, cfg.sampling.noise_level, generator
            )
            groups.append(backbone.features(backbone.decode(latents[:, -1])))
    stability = {
        f"k={k}": clustering_stability(groups, k, cfg.diverse.sigma, backbone.feature_metric, cfg.diverse.max_clusters,
                                       cfg.seed)
        for k in a.n_clusters
    }  # fmt: skip
    print("\nClustering stability on base-model groups (adjusted Rand index; 1 = identical labels):")
    print("k         clusters found  ARI across seeds  ARI under 2% jitter")
    for label, s in stability.items():
        print(f"{label:<9} {s['clusters']:14.1f}  {s['ari_across_seeds']:16.3f}  {s['ari_under_jitter']:19.3f}")
    plot_training_curves(os.path.join(cfg.output_dir, "adaptive_k.png"), histories, {"k": ["grpo"] + labels})
    return dict(experiment="adaptive_k", table=rows, stability=stability)


def branching(cfg):
    """The project page's analysis on the base model: how much diversity the first steps decide."""
    backbone = build_backbone(cfg)
    sigmas = backbone.sigmas(cfg.sampling.num_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        curves = {
            prompt: branching_diversity(backbone, prompt, sigmas, cfg.sampling.noise_level, cfg.analysis.trunks,
                                        cfg.sampling.group_size, generator)
            for prompt in backbone.eval_prompts
        }  # fmt: skip
    T = cfg.sampling.num_steps
    mean_curve = np.mean(list(curves.values()), axis=0)  # (T + 1,): diversity after sharing s steps
    third = round(T / 3)
    fraction = float((mean_curve[0] - mean_curve[third]) / max(mean_curve[0] - mean_curve[T], 1e-12))
    print("\nDiversity when the first s SDE steps are shared (mean over prompts):")
    print("s  " + " ".join(f"{s:6d}" for s in range(T + 1)))
    print("D  " + " ".join(f"{d:6.3f}" for d in mean_curve))
    print(
        f"share of the whole diversity change in the first {third} of {T} steps: {fraction:.1%} (paper, SD3.5-M: 66.6%)"
    )
    plot_branching(os.path.join(cfg.output_dir, "branching.png"), mean_curve, curves, third)
    return dict(experiment="branching", curve=mean_curve.tolist(), per_prompt=curves, first_third_steps=third,
                first_third_fraction=fraction)  # fmt: skip


def bonus_cost(cfg, log):
    """Wall time of the whole bonus as the group grows, with the dense and the arpack eigengap."""
    a = cfg.analysis
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for n in a.group_sizes:
        features = toy_data(torch.zeros(n, dtype=torch.long), cfg.toy.mode_std, generator)  # the ring's 8 modes
        row = dict(group_size=n)
        d = cfg.diverse
        for solver in ("dense", "arpack"):
            row[solver] = time_bonus(features, d.n_clusters, d.sigma, solver, d.max_clusters, a.repeats)
        rows.append(row)
        log(row)
    # Growth exponent p of time ~ N^p between the two largest groups, where fixed overheads matter least.
    (small, large), ratio = rows[-2:], rows[-1]["group_size"] / rows[-2]["group_size"]
    slopes = {s: float(np.log(large[s] / small[s]) / np.log(ratio)) for s in ("dense", "arpack")}
    iteration = train(with_changes(cfg, {"train.iterations": 5, "train.eval_every": 5}), build_backbone(cfg),
                      "diversegrpo", log=lambda r: None)[-1]["iter_seconds"]  # fmt: skip
    print("\nWall time of the creativity bonus for one group (distances, affinity, eigengap, clustering, bonus):")
    print("N       dense eigengap  arpack eigengap")
    for r in rows:
        print(f"{r['group_size']:<7} {r['dense']:12.3f} s  {r['arpack']:13.3f} s")
    print(f"growth from N={small['group_size']} to {large['group_size']}: ~N^{slopes['dense']:.2f} (dense), "
          f"N^{slopes['arpack']:.2f} (arpack); one toy training iteration "
          f"(G={cfg.sampling.group_size}, {cfg.sampling.prompts_per_iter} prompts): {iteration:.3f} s; "
          f"one SD3.5-M sampling step of 24 images (estimated): {a.sd3_step_seconds:.2f} s")  # fmt: skip
    plot_bonus_cost(os.path.join(cfg.output_dir, "bonus_cost.png"), rows)
    return dict(experiment="bonus_cost", table=rows, growth_exponent=slopes, toy_iteration_seconds=iteration,
                sd3_step_seconds_estimate=a.sd3_step_seconds)  # fmt: skip


# ---- 12. main ----


def build_backbone(cfg):
    return ToyBackbone(cfg) if cfg.backbone == "toy" else load_diffusers_backbone(cfg)


def check_output_dir(cfg):
    """Refuse to overwrite another run: a different config in output_dir, or checkpoints while resume is off."""
    path = os.path.join(cfg.output_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))  # the same JSON types as the file's

    def flat(tree, prefix=""):  # {"train": {"lr": 1}} -> {"train.lr": 1}
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    previous, current = flat(previous), flat(current)
    previous.pop("resume", None)
    current.pop("resume")
    if previous != current:
        changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
        raise ConfigError(
            f"output_dir {cfg.output_dir} holds a run with a different config (differs in: {', '.join(changed)}); "
            "choose another output_dir or delete it"
        )
    checkpoints = os.path.join(cfg.output_dir, "checkpoints")
    if not cfg.resume and any(any(n.isdigit() for n in os.listdir(r)) for r, _, _ in os.walk(checkpoints)):
        raise ConfigError(
            f"output_dir {cfg.output_dir} holds checkpoints: continue with --set resume=true, or delete them"
        )


def run(cfg):
    """Run the config's experiment; every experiment writes metrics.jsonl, summary.json and a figure to output_dir."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    open(metrics_path, "w").close()  # train() logs every record again on resume

    def log(record):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    start = time.time()
    if cfg.experiment == "compare":
        summary = compare_methods(cfg, log)
    elif cfg.experiment == "sweep":
        summary = sweep(cfg, log)
    elif cfg.experiment == "adaptive_k":
        summary = compare_n_clusters(cfg, log)
    elif cfg.experiment == "branching":
        summary = branching(cfg)
    else:
        summary = bonus_cost(cfg, log)
    summary["wall_seconds"] = time.time() - start
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote metrics.jsonl, summary.json and figures to {cfg.output_dir} ({summary['wall_seconds']:.1f} s)")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description="DiverseGRPO: diversity-aware GRPO for flow models.")
    parser.add_argument("--config", required=True, help="YAML file of presets, e.g. configs.yaml")
    parser.add_argument("--preset", default="toy", help="top-level section of the YAML file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, dotted keys allowed (train.lr=1e-3); repeatable",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.preset, args.set)
        check_output_dir(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(yaml.safe_dump({args.preset: dataclasses.asdict(cfg)}, sort_keys=False))
    try:
        run(cfg)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
