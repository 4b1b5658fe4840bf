"""DiverseGRPO in one file: GRPO fine-tuning of flow models that keeps the images of a prompt diverse.

Papers
  DiverseGRPO: Mitigating Mode Collapse in Image Generation via Diversity-Aware GRPO (arXiv 2512.21514, CVPR 2026)
  Flow-GRPO: Training Flow Matching Models via Online RL (arXiv 2505.05470), whose sampler and loss this builds on

GRPO samples a group of G images per prompt, scores them with a reward model and pushes the policy towards the
better ones. Late in training every image of a prompt looks the same (mode collapse). DiverseGRPO adds
  1. a creativity bonus: spectral clustering of the group; an image in a small cluster earns sqrt(N / n_k);
  2. a structure-aware regularizer: a squared-W2 pull towards the frozen reference on the first K (noisiest)
     denoising steps only, where an image's composition is decided, and no constraint after.

Run     python diversegrpo.py --config configs.yaml                 (a 2-D toy, CPU, about 40 seconds)
        python diversegrpo.py --config configs.yaml --preset sd3_pickscore
        torchrun --nproc_per_node N diversegrpo.py --config configs.yaml --preset sd3_pickscore
Test    python -m pytest -q test_diversegrpo.py
The paper's analyses (ablation, sweeps, branching, choice of k, cost of the bonus), and a study of how the bonus
finds modes, live in analyses/.

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
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ---- 1. Config: documented dataclasses, filled from a named preset of configs.yaml (loader in section 12) ----


@dataclass
class SamplingConfig:
    num_steps: int = 10  # T, SDE steps of a training rollout (paper: 10 on SD3.5-M, 6 on FLUX)
    eval_num_steps: int = 20  # ODE steps at evaluation (paper: 40 on SD3.5-M, 28 on FLUX)
    noise_level: float = 0.7  # a in the SDE's sd = a * sqrt(sigma / (1 - sigma)) (paper: 0.7 SD3, 0.9 FLUX)
    shift: float = 1.0  # timestep shift of the flow-matching schedule (SD3: 3)
    group_size: int = 24  # G, samples per prompt (paper: 24)
    prompts_per_iter: int = 2  # P, prompts per iteration on each process
    eval_samples: int = 256  # ODE samples per held-out prompt at evaluation
    micro_batch: int = 0  # samples per no-grad forward (sampling, decoding, scoring); 0 = train.micro_batch


@dataclass
class TrainConfig:
    iterations: int = 400  # sample -> update rounds per method
    lr: float = 2e-3  # AdamW learning rate of the LoRA weights (paper: 3e-4)
    weight_decay: float = 1e-4
    clip_range: float = 1e-4  # PPO ratio clip (paper: 1e-4)
    adv_clip: float = 5.0  # advantages are clipped to [-adv_clip, adv_clip]
    max_grad_norm: float = 1.0
    kl_beta: float = 0.0  # weight of Flow-GRPO's KL, for the methods that turn the KL on
    lora_rank: int = 8  # paper: 32
    lora_alpha: int = 16  # paper: 64
    eval_every: int = 20  # evaluate every this many iterations
    micro_batch: int = 0  # samples per training forward (and sampling's, unless set there); 0 = the whole batch
    save_every: int = 0  # write a checkpoint every this many iterations (and at the end); 0 = never
    keep_checkpoints: int = 2  # how many checkpoints of a method to keep


@dataclass
class DiverseConfig:
    beta: float = 0.1  # weight of the creativity bonus in R = Q + beta * E
    n_clusters: int | str = "auto"  # k of the spectral clustering, or "auto" (eigengap)
    bandwidth: float | None = None  # a fixed affinity bandwidth (the paper's sigma); None = local scaling, every preset
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
    compile: str = ""  # torch.compile backend for each transformer block ("inductor" on a GPU); "" = eager
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
class AnalysisConfig:  # read by analyses/paper_analyses.py only
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
class LogConfig:
    tensorboard: bool = False  # also write TensorBoard events to output_dir/tensorboard (needs the tensorboard package)


@dataclass
class Config:
    experiment: str = "compare"  # compare (this file) | one of analyses/paper_analyses.py's ANALYSES (EXPERIMENTS)
    backbone: str = "toy"  # toy | sd3 | flux
    seed: int = 0  # seeds the base model, the LoRA, every sampler noise and the clustering
    device: str = "cpu"  # torch device; under torchrun, cuda means each process's own GPU
    dtype: str = "float32"  # compute dtype of the backbone; the SDE arithmetic is always float32
    output_dir: str = "runs/toy"
    resume: bool = False  # continue from the newest checkpoints in output_dir
    methods: list = field(default_factory=lambda: ["grpo", "diversegrpo"])  # the first is the table's baseline
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diverse: DiverseConfig = field(default_factory=DiverseConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    log: LogConfig = field(default_factory=LogConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


# The main command runs "compare"; the analyses (the others) run from analyses/paper_analyses.py.
EXPERIMENTS = ("compare", "ablation", "sweep", "adaptive_k", "branching", "bonus_cost", "bonus_rules")

# Which terms each method switches on. Their strengths come from the config, so every method shares one set of
# hyperparameters and differs only in what it adds to plain GRPO.
METHODS = {
    "grpo": dict(bonus=False, w2=False, kl=False),  # Flow-GRPO, the paper's baseline (KL 0)
    "grpo_kl": dict(bonus=False, w2=False, kl=True),  # Flow-GRPO with its KL on every trained step
    "bonus_only": dict(bonus=True, w2=False, kl=False),
    "reg_only": dict(bonus=False, w2=True, kl=False),
    "diversegrpo": dict(bonus=True, w2=True, kl=False),
}


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
    if noise_level == 0:  # the ODE: no noise to draw, and no density
        prev_sample = (prev_sample_mean if prev_sample is None else prev_sample).detach().float()
        return prev_sample, torch.zeros(sample.shape[0], device=sample.device), prev_sample_mean, std_dev
    if prev_sample is None:
        # Drawn on the generator's device (the CPU in this project) and moved: the same seed, the same noise anywhere.
        noise_device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=noise_device, dtype=torch.float32)
        prev_sample = prev_sample_mean + std_dev * noise.to(sample.device)
    prev_sample = prev_sample.detach().float()
    log_density = (
        -((prev_sample - prev_sample_mean) ** 2) / (2 * std_dev**2)
        - torch.log(std_dev)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_density.flatten(1).mean(1), prev_sample_mean, std_dev  # (B, ...) -> (B,)


# ---- 3. The losses: GRPO's advantages, clipped surrogate and KL; DiverseGRPO's first-K W2; one step's loss ----


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
    return (diff**2 / (2 * _per_sample(std_dev, diff) ** 2)).flatten(1).mean(1)  # (B, ...) -> (B,)


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
    return (diff**2 / 2).flatten(1).mean(1)  # (B, ...) -> (B,)


def step_loss(log_prob, old_log_prob, adv, clip_range, prev_sample_mean=None, ref_prev_sample_mean=None,
              std_dev=None, step_index=0, K=0, lambda_w=0.0, kl_beta=0.0):  # fmt: skip
    """The whole loss of one denoising step i: clipped surrogate + lambda_w * W2 (only if i < K) + kl_beta * KL.

    prev_sample_mean and ref_prev_sample_mean are the policy's and the reference's transition means (B, ...) from
    the same x; without a reference (plain GRPO) only the surrogate counts. Returns (surrogate, regularizer), scalars.
    """
    surrogate = grpo_loss(log_prob, old_log_prob, adv, clip_range)
    reg = torch.zeros((), device=log_prob.device)
    if ref_prev_sample_mean is not None and lambda_w:
        reg = reg + lambda_w * structure_aware_reg(prev_sample_mean, ref_prev_sample_mean, step_index, K).mean()
    if ref_prev_sample_mean is not None and kl_beta:
        reg = reg + kl_beta * kl_reg(prev_sample_mean, ref_prev_sample_mean, std_dev).mean()
    return surrogate, reg


# ---- 4. DiverseGRPO's creativity bonus: spectral clustering of each group (paper sec 3.2) ----


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


def creativity_bonus(distances, n_clusters="auto", bandwidth=None, seed=0, max_clusters=32, eigen_solver="auto"):
    """The distributional creativity bonus of one prompt's group (paper sec 3.2): (N, N) -> (bonus (N,), labels (N,)).

        affinity A_ij = exp(-D_ij^2 / (s_i s_j)), s_i = distance from sample i to its (N // 4)-th nearest neighbour
                        (local scaling, Zelnik-Manor & Perona 2004); with a fixed bandwidth b, exp(-D_ij^2 / (2 b^2))
        labels        = spectral clustering of A into k clusters (k fixed, or "auto": eigengap, k <= N - 1)
        bonus E_i     = sqrt(N / n_k),  n_k = size of the cluster holding sample i

    Why local scaling (the paper does not say how it sets the bandwidth): one bandwidth for the whole group, such as
    its median distance, is a between-mode distance as soon as no mode owns most of the group; every pair then looks
    alike, the eigengap finds k = 1 and the bonus is the same for everyone. Each sample's own neighbourhood sets its
    scale instead, in any geometry (DreamSim's cosine, the toy's Euclidean) and at any distance scale. The N // 4-th
    neighbour lies inside the commonest mode whenever it holds a quarter of the group, and is far enough out that a
    lone mode is rarely cut into pieces (README, "How the bonus finds modes", has the measurements).
    A lone sample earns sqrt(N); a single cluster gives 1 to everyone. Degenerate groups (identical samples, N <= k,
    a disconnected graph) fall back to fewer clusters. "auto" searches k up to min(max_clusters, N - 1); its
    eigen_solver "auto" switches from dense to arpack above N = 256.
    """
    from sklearn.cluster import SpectralClustering

    distances = distances.detach().double().cpu().numpy()
    n = distances.shape[0]
    if n < 3 or distances.max() <= 1e-6:  # too few to split unequally, or identical up to float noise: one cluster
        return torch.ones(n), torch.zeros(n, dtype=torch.long)
    if bandwidth is None:
        scale = np.sort(distances, axis=1)[:, max(n // 4, 1)]  # (N,): column 0 is each sample itself
        scale = np.maximum(scale, 1e-6 * distances.max())  # duplicates must not divide by zero
        affinity = np.exp(-(distances**2) / np.outer(scale, scale))
    else:
        affinity = np.exp(-(distances**2) / (2 * bandwidth**2))
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
        labels = SpectralClustering(n_clusters=k, affinity="precomputed", n_init=3, random_state=seed).fit_predict(
            affinity
        )
    labels = torch.as_tensor(labels, dtype=torch.long)
    cluster_sizes = torch.bincount(labels)[labels].double()  # (N,): n_k of each sample's cluster
    return torch.sqrt(n / cluster_sizes).float(), labels


# ---- 5. Rollout: sample a group with the SDE, keeping every step's latents and log-probs ----
#
# A backbone is a small object that the rollout and the loop call (the toy in section 7, SD3 and FLUX in section 8):
#   model                 the nn.Module carrying the LoRA adapters (the policy); adapters off = the reference
#   lora_targets          the names of model's layers that get a LoRA;  device: where model runs
#   prompts               the training prompts; eval_prompts the held-out ones
#   sigmas(T)             the T + 1 noise levels of a T-step schedule, 1 -> 0
#   encode(prompts)       -> a tuple of tensors with the batch first (the condition)
#   velocity(x, sigma, cond) -> v, float32, (B, ...) like x
#   noise(n, generator)   -> n initial latents x at sigma = 1
#   decode(x)             -> samples: images in [0, 1], or the toy's points
#   reward(samples, prompts) -> (B,) quality Q;  features(samples) -> (B, D), with feature_metric
#   count_modes(samples, prompt), vendi_bandwidth: optional (the toy's), used by evaluate()


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


def _select(cond, index):
    """The rows `index` of every tensor of a condition tuple."""
    return tuple(c[index] for c in cond)


@torch.no_grad()
def sample_batch(backbone, cond, noise, sigmas, noise_level, chunks, generator=None):
    """rollout() and decode() in micro-batches (chunks of row indices): latents (B, T+1, ...), log_probs, samples.

    The chunks draw their noise from one generator in turn, so another micro-batch size draws other samples.
    """
    parts = [rollout(backbone, _select(cond, c), noise[c], sigmas, noise_level, generator) for c in chunks]
    latents = torch.cat([p[0] for p in parts])  # chunks x (b, T+1, ...) -> (B, T+1, ...)
    samples = torch.cat([backbone.decode(latents[c, -1]) for c in chunks])
    return latents, torch.cat([p[1] for p in parts]), samples


def sampling_micro_batch(cfg):
    return cfg.sampling.micro_batch or cfg.train.micro_batch


def iteration_generator(*keys):
    """A CPU generator seeded from a key (seed, iteration, stream, rank): a resumed or a distributed run draws the same
    numbers without carrying a generator's state. Give every key the same length: numpy pads a shorter one with 0."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


# ---- 6. The training loop: sample -> reward -> bonus -> advantages -> per-step update -> log ----


@contextlib.contextmanager
def adapters_disabled(model):
    """The reference model: every peft LoRA layer of `model` off, then on again (diffusers has no such switch)."""
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

    Gaussian A matrices, as Flow-GRPO initialises them, and zero B matrices, so the policy starts exactly at the
    reference.
    """
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights="gaussian")
    inject_adapter_in_model(config, model)
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        # Trainable weights stay float32 even in a bf16 model (autocast handles the matmuls): in bf16, AdamW's
        # second moment times 0.999 rounds back to itself and never decays, and weight decay underflows.
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def warn(message):
    tqdm.write(f"warning: {message}", file=sys.stderr)  # above the progress bar, not through it


def first_line(error):
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= 300 else line[:297] + "..."  # long messages are cut, visibly


def rank_and_world():
    """(this process's rank, number of processes): (0, 1) unless launched by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def group_bonus(features, P, G, diverse, metric, seed):
    """The creativity bonus of each of P groups of G samples: bonus (P*G,), clusters found per group (P,).

    Rows whose features are not finite are left out of their group's clustering (their bonus stays 1).
    """
    bonus, n_found = torch.ones(P * G), []
    for p in range(P):
        rows = torch.arange(p * G, (p + 1) * G)
        rows = rows[torch.isfinite(features[rows]).all(dim=1)]  # the kept rows of group p
        distances = pairwise_distances(features[rows], metric)
        group, labels = creativity_bonus(distances, diverse.n_clusters, diverse.bandwidth, seed, diverse.max_clusters)
        bonus[rows] = group
        n_found.append(int(labels.max()) + 1 if len(labels) else 0)
    return bonus, n_found


def fill_dropped(rewards, dropped, P, G):
    """Stand a dropped (non-finite) reward at its group's mean, so it moves neither the mean nor the std much."""
    grouped = rewards.masked_fill(dropped, float("nan")).reshape(P, G)  # (B,) -> (P, G)
    group_mean = grouped.nanmean(dim=1, keepdim=True).nan_to_num(0.0)  # (P, 1); 0 if the whole group is dropped
    return torch.where(grouped.isnan(), group_mean, grouped)  # (P, G)


def policy_update(cfg, backbone, terms, cond, latents, old_log_probs, adv, sigmas, chunks):
    """Back-propagate step_loss for every trained step and micro-batch; returns the mean loss, reg, ratio, clipped.

    Each backward frees its graph, so only one forward's graph is alive at a time. Each piece is weighted by its
    share of the batch and of the trained steps. The last step is never trained: rollout() takes it with the ODE,
    which has no density. train() makes one optimizer step of it all, so that step is on-policy: ratio == 1 and the
    PPO clip never binds (exactly on the CPU; on a GPU, bf16 and other micro-batch shapes move it slightly, as the
    logged ratio and clipped show). Flow-GRPO splits a batch into several optimizer steps; the clip matters there.
    """
    T, B, K, noise_level = len(sigmas) - 1, len(adv), cfg.diverse.K, cfg.sampling.noise_level
    lambda_w = cfg.diverse.lambda_w if terms["w2"] else 0.0  # each term of the method: off, or the config's weight
    kl_beta = cfg.train.kl_beta if terms["kl"] else 0.0
    stats = dict(loss=0.0, reg=0.0, ratio=0.0, clipped=0.0)
    for i in range(T - 1):
        for c in chunks:
            x, x_next, c_cond = latents[c, i], latents[c, i + 1], _select(cond, c)
            velocity = backbone.velocity(x, sigmas[i], c_cond)
            _, log_prob, mean, std_dev = sde_step_with_logprob(
                velocity, x, sigmas[i], sigmas[i + 1], noise_level, prev_sample=x_next
            )
            ref_mean = None
            if (lambda_w and i < K) or kl_beta:
                with torch.no_grad(), adapters_disabled(backbone.model):  # the reference: the LoRA switched off
                    ref_velocity = backbone.velocity(x, sigmas[i], c_cond)
                _, _, ref_mean, _ = sde_step_with_logprob(
                    ref_velocity, x, sigmas[i], sigmas[i + 1], noise_level, prev_sample=x_next
                )
            loss, reg = step_loss(log_prob, old_log_probs[c, i], adv[c], cfg.train.clip_range, mean, ref_mean, std_dev,
                                  step_index=i, K=K, lambda_w=lambda_w, kl_beta=kl_beta)  # fmt: skip
            weight = len(c) / B / (T - 1)
            ((loss + reg) * weight).backward()
            ratio = torch.exp(log_prob - old_log_probs[c, i]).detach()
            stats["loss"] += loss.item() * weight
            stats["reg"] += reg.item() * weight
            stats["ratio"] += ratio.mean().item() * weight
            stats["clipped"] += ((ratio - 1).abs() > cfg.train.clip_range).float().mean().item() * weight
    return stats


def optimizer_step(optimizer, params, max_grad_norm):
    """Average the gradients over processes, clip, and step; returns the gradient norm, NaN if the step was skipped.

    A non-finite gradient (a NaN or inf loss makes one) skips the step: one bad batch must not write NaN into the
    weights. After the all-reduce every process sees the same norm, so they all skip together.
    """
    if dist.is_initialized():  # one all-reduce per LoRA tensor and iteration: the LoRA is small (see README)
        for p in params:
            if p.grad is None:  # this process trained no sample (all its rewards were dropped): it adds zeros
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    if math.isfinite(grad_norm):
        optimizer.step()
    return grad_norm


def new_period():
    return dict(skipped=[], dropped=0, clusters=[])


def summarize_period(period):
    """The counts since the last metrics line: skipped updates, dropped rewards, and what the clustering found."""
    counts = dict(skipped_updates=sum(period["skipped"]), dropped_rewards=period["dropped"])
    if period["clusters"]:  # with the bonus: the mean k found, and the share of groups with k = 1 (an inert bonus)
        clusters = np.array(period["clusters"])
        counts.update(clusters=float(clusters.mean()), k1_share=float((clusters <= 1).mean()))
    return counts


def average_over_processes(record):
    """The mean of every number of a metrics record over the torchrun processes (a no-op in one process)."""
    if not dist.is_initialized():
        return record
    keys = [k for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"]
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)  # on the CPU: gloo's part of the group
    dist.all_reduce(values)
    return {**record, **{k: v / dist.get_world_size() for k, v in zip(keys, values.tolist(), strict=True)}}


def bonus_was_constant(history, last=3):
    """Did the clustering find one cluster (bonus E = 1 for all) in most groups of each of the last evaluations?"""
    shares = [h.get("k1_share", 0.0) for h in history[-last:]]
    return len(shares) == last and min(shares) > 0.5


def train(cfg, backbone, method, log=print, name=None):
    """Fine-tune a fresh LoRA on `backbone` with one method of METHODS; returns its evaluation history (a list).

    One optimizer step per iteration (see policy_update). With cfg.resume it continues from the newest checkpoint of
    this run; Ctrl-C or SIGTERM writes one for the last finished iteration before it stops. `name` labels the run's
    checkpoints and images (default: the method). Under torchrun each process trains on its own prompts, and process 0
    evaluates, logs and writes checkpoints.
    """
    name, terms, train_cfg = name or method, METHODS[method], cfg.train
    P, G, T = cfg.sampling.prompts_per_iter, cfg.sampling.group_size, cfg.sampling.num_steps
    B, rank = P * G, rank_and_world()[0]
    sample_chunks = torch.arange(B).split(sampling_micro_batch(cfg) or B)  # micro-batches; clustering sees all B
    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn from the global RNG
    lora_params = add_lora(backbone.model, train_cfg.lora_rank, train_cfg.lora_alpha, backbone.lora_targets)
    optimizer = torch.optim.AdamW(lora_params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    sigmas = backbone.sigmas(T)
    history, done = start_or_resume(cfg, backbone, optimizer, name, method, log)
    period, skipped_in_a_row = new_period(), 0  # counts since the last metrics line
    bar = tqdm(range(done + 1, train_cfg.iterations + 1), desc=name, initial=done, total=train_cfg.iterations,
               disable=None if rank == 0 else True)  # fmt: skip
    STOPS_WAIT[0] = True  # from here a first Ctrl-C or SIGTERM waits for the end of its iteration (stop_if_asked)
    try:
        for iteration in bar:
            stop_if_asked()  # a Ctrl-C or SIGTERM during the last iteration stops here, where the state is whole
            start = time.time()
            # 1. Sample P prompts (each process its own) and a group of G trajectories for each, with the SDE.
            order = torch.randperm(len(backbone.prompts), generator=iteration_generator(cfg.seed, iteration, 0, 0))
            prompts = [backbone.prompts[p] for p in order[rank * P : (rank + 1) * P] for _ in range(G)]  # (B,)
            generator = iteration_generator(cfg.seed, iteration, 1, rank)
            cond = backbone.encode(prompts)
            latents, old_log_probs, samples = sample_batch(
                backbone, cond, backbone.noise(B, generator), sigmas, cfg.sampling.noise_level, sample_chunks, generator
            )
            # 2. Quality reward, plus the creativity bonus computed within each prompt's group (paper sec 3.2).
            quality = backbone.reward(samples, prompts)  # (B,)
            bonus, dropped, rewards = torch.ones(B), ~torch.isfinite(quality), quality
            if terms["bonus"]:
                features = backbone.features(samples)  # (B, D)
                dropped |= ~torch.isfinite(features).all(dim=1)
                bonus, n_found = group_bonus(features, P, G, cfg.diverse, backbone.feature_metric, cfg.seed)
                period["clusters"] += n_found
                rewards = quality + cfg.diverse.beta * bonus
            # 3. Group-normalized advantages, shared by every step of a trajectory (Flow-GRPO Eq. 4). A NaN or inf
            #    reward (or image features) is dropped: it stands at its group's mean in the group's statistics.
            if dropped.any():
                names = sorted({prompts[i] for i in dropped.nonzero().flatten().tolist()})
                message = f"dropped {int(dropped.sum())} non-finite reward(s) of {names}"
                warn(f"iteration {iteration}: {message}")
            adv = group_advantages(fill_dropped(rewards, dropped, P, G), clip=train_cfg.adv_clip)  # (P, G)
            adv = adv.reshape(B).to(latents.device)  # (P, G) -> (B,)
            # 4. One loss per trained step and micro-batch, then one optimizer step (skipped if not finite). Dropped
            #    samples are left out of the loss: even with A = 0, a NaN in their log-prob would reach the gradient.
            optimizer.zero_grad()
            chunks = torch.arange(B)[~dropped].split(train_cfg.micro_batch or B)
            stats = policy_update(cfg, backbone, terms, cond, latents, old_log_probs, adv, sigmas, chunks)
            grad_norm = optimizer_step(optimizer, lora_params, train_cfg.max_grad_norm)
            skipped = not math.isfinite(grad_norm)
            if skipped:
                warn(f"iteration {iteration}: non-finite loss or gradient, update skipped")
            period["skipped"].append(skipped)
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            period["dropped"] += int(dropped.sum())
            done = iteration
            # 5. Log; evaluate with the ODE every eval_every iterations; checkpoint every save_every.
            bar.set_postfix(reward=f"{quality.nanmean():.3f}", loss=f"{stats['loss']:.4f}")
            if iteration % train_cfg.eval_every == 0 or iteration == train_cfg.iterations:
                record = dict(iteration=iteration, method=method, train_reward=quality[~dropped].mean().item(),
                              bonus=bonus.mean().item(), grad_norm=grad_norm, **stats, **summarize_period(period),
                              iter_seconds=time.time() - start)  # fmt: skip
                record = average_over_processes(record)
                if backbone.device.type == "cuda":
                    record["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
                    torch.cuda.reset_peak_memory_stats()
                if skipped_in_a_row >= max(train_cfg.eval_every, 3):  # nothing learned for a whole evaluation period
                    path = save_checkpoint(cfg, backbone, optimizer, name, done, history)  # the weights are still good
                    first = iteration - skipped_in_a_row + 1
                    message = f"updates {first}-{iteration} all had a non-finite loss or gradient (wrote {path})"
                    raise RunError(f"{message}; try a lower train.lr in a new output_dir")
                if rank == 0:
                    record.update(evaluate(cfg, backbone, image_path=_image_path(cfg, name, iteration)))
                    history.append(record)
                    log(record)
                    if cfg.diverse.beta > 0 and bonus_was_constant(history) and not bonus_was_constant(history[:-1]):
                        message = "the bonus was constant (one cluster) in most groups of the last 3 evaluations"
                        warn(f"{message}; it changes no advantage")
                period = new_period()
            if train_cfg.save_every and (iteration % train_cfg.save_every == 0 or iteration == train_cfg.iterations):
                save_checkpoint(cfg, backbone, optimizer, name, done, history)
        stop_if_asked()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see stop_if_asked), or an exception of that kind in a test
        checkpoint_after_stop(cfg, backbone, optimizer, name, done, history)
        raise
    finally:
        STOPS_WAIT[0] = False
    return history


def checkpoint_after_stop(cfg, backbone, optimizer, name, done, history):
    """A first Ctrl-C or SIGTERM stops train() between iterations, where `done` describes the weights exactly: write a
    checkpoint. A second one stopped it wherever it was, perhaps in the middle of optimizer.step(): write none."""
    if len(STOP_SIGNALS) > 1:
        tqdm.write("stopped at once: no checkpoint written, the weights may hold half a step", file=sys.stderr)
        return
    path = save_checkpoint(cfg, backbone, optimizer, name, done, history)
    if rank_and_world()[0] == 0:
        tqdm.write(f"interrupted: wrote {path}; continue with --set resume=true", file=sys.stderr)


# ---- 7. Backbones: the toy 2-D flow model (SD3 and FLUX follow in section 8) ----


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
    for _ in tqdm(range(cfg.toy.pretrain_iters), desc="pretrain toy base", leave=False, disable=None):
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
        # Vendi's kernel width: two points closer than a reward bump count as one. (The median distance would make the
        # kernel as narrow as a collapsed group, and count its noise as distinct samples.)
        self.reward_width = self.vendi_bandwidth = cfg.toy.reward_width
        settings = json.dumps([cfg.seed, dataclasses.asdict(cfg.toy)], sort_keys=True)  # what the base depends on
        path = os.path.join(cfg.output_dir, f"toy_base_{hashlib.sha1(settings.encode()).hexdigest()[:10]}.pt")
        self.model = ToyFlow(len(TOY_PROMPTS), cfg.toy.hidden)
        try:
            self.model.load_state_dict(torch.load(path, weights_only=True))
        except Exception as e:  # missing, or truncated by a crash: (re)build it
            if os.path.exists(path):
                warn(f"unreadable toy base cache {path} ({first_line(e)}); rebuilding it")
            self.model = pretrain_toy(cfg)
            os.makedirs(cfg.output_dir, exist_ok=True)
            torch.save(self.model.state_dict(), f"{path}.{os.getpid()}.tmp")  # processes of torchrun each write
            os.replace(f"{path}.{os.getpid()}.tmp", path)
        self.model.requires_grad_(False)  # the base is frozen; train() adds the LoRA
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


# ---- 8. Backbones: SD3.5 and FLUX.1 through diffusers ----

# LoRA on both attention streams of the MMDiT blocks (paper, implementation details), named as Flow-GRPO's trainers
# name them. The "attn." prefix leaves out SD3.5-M's second self-attention (attn2, blocks 0-12), as Flow-GRPO does;
# FLUX's single-stream blocks match attn.to_q/k/v, so both of its streams are kept. peft skips names a block lacks.
LORA_TARGETS = [f"attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out")]  # fmt: skip


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
        # The base weights are frozen: only the LoRA trains, and code that forgets torch.no_grad() builds no graph
        # through them. The VAE decodes in float32, as in Flow-GRPO: the reward sees its pixels.
        self.model, self.vae = transformer.requires_grad_(False), vae.to(torch.float32).requires_grad_(False)
        self.prompt_embeddings, self.reward_fn, self.embed_fn = prompt_embeddings, reward_fn, embed_fn
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.device = torch.device(cfg.device)
        self.latent_size = cfg.model.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        if cfg.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()  # only active when grad is on: the reference pass is unaffected
        if cfg.model.compile:  # regional compile: one graph per kind of block, shared by every block of that kind
            # Each kind is traced again with and without grad, with the LoRA on and off (the reference), and for each
            # micro-batch size: more variants than dynamo's default limit of 8, past which it falls back to eager.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for block in [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]:
                block.compile(backend=cfg.model.compile, dynamic=False)

    def sigmas(self, num_steps):
        if self.kind == "flux":
            return flux_sigmas(num_steps, (self.latent_size // 2) ** 2)
        return flow_match_sigmas(num_steps, self.cfg.sampling.shift)

    def encode(self, prompts):
        """Look up the cached embeddings: a tuple of (B, ...) tensors on the device."""
        parts = zip(*(self.prompt_embeddings[p] for p in prompts), strict=True)
        return tuple(torch.stack(part).to(self.device) for part in parts)  # B x (L, D) -> (B, L, D), and so on

    def noise(self, n, generator):
        channels = self.model.config.in_channels // (4 if self.kind == "flux" else 1)  # FLUX counts packed 2x2 tokens
        return torch.randn(n, channels, self.latent_size, self.latent_size, generator=generator).to(self.device)

    def velocity(self, x, sigma, cond):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # Not cuDNN's fused attention: on an H200 its backward crashes in FLUX (illegal memory access; PyTorch issues
        # #122695, #134001). The backward runs the kernel that the forward chose, so this scope covers both.
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16")
        with autocast, sdpa_kernel(backends):
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
        raise RunError(f"could not load the {cfg.backbone} weights '{cfg.model.pretrained}': {first_line(e)}") from None
    pipe.to(cfg.device)
    embeddings = {}
    with torch.no_grad():
        for prompt in tqdm(sorted(set(prompts) | set(eval_prompts)), desc="encode prompts", leave=False, disable=None):
            # T5 at 128 tokens, as in Flow-GRPO (diffusers' default: 512). SD3 has no text mask: padding counts.
            kwargs = dict(prompt_2=None, device=cfg.device, max_sequence_length=128)
            if cfg.backbone == "flux":
                embeds, pooled, _ = pipe.encode_prompt(prompt, **kwargs)
                embeddings[prompt] = (embeds[0].cpu(), pooled[0].cpu())
            else:
                embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                    prompt, prompt_3=None, do_classifier_free_guidance=True, **kwargs
                )
                embeddings[prompt] = (embeds[0].cpu(), pooled[0].cpu(), negative[0].cpu(), negative_pooled[0].cpu())
    transformer, vae = pipe.transformer, pipe.vae
    del pipe  # the text encoders leave the GPU: every embedding is cached
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reward_fn = load_reward(cfg)
    embed_fn = load_dreamsim(cfg)
    return DiffusersBackbone(cfg, transformer, vae, embeddings, reward_fn, embed_fn, prompts, eval_prompts)


# ---- 9. Rewards and the embedder of the creativity bonus ----


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
    pixels = clip_pixels(images.to(device))
    image_embeds = F.normalize(_projected(model.get_image_features(pixel_values=pixels)), dim=-1)
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    text_embeds = F.normalize(_projected(model.get_text_features(**tokens)), dim=-1)
    return model.logit_scale.exp() * (text_embeds * image_embeds).sum(-1) / 26


def load_reward(cfg):
    """reward(images (B, 3, H, W) in [0, 1], prompts) -> (B,), run in micro-batches."""
    micro_batch = sampling_micro_batch(cfg) or 8
    if cfg.model.reward == "hpsv3":
        try:
            from hpsv3 import HPSv3RewardInferencer
        except ImportError:
            raise RunError("the hpsv3 reward needs the hpsv3 package: pip install hpsv3 (see README)") from None
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
            raise RunError(
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

    micro_batch = sampling_micro_batch(cfg) or 8
    try:
        # Built on the device, never moved: dreamsim keeps a projection outside its modules.
        cache, kind = os.path.expanduser(cfg.model.dreamsim_cache), cfg.model.dreamsim_type
        model, _ = dreamsim(pretrained=True, device=cfg.device, cache_dir=cache, dreamsim_type=kind)
    except Exception as e:  # dreamsim raises whatever its downloader raised
        raise RunError(f"could not load DreamSim '{cfg.model.dreamsim_type}': {first_line(e)}") from None

    @torch.no_grad()
    def embed(images):
        images = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
        return torch.cat([model.embed(images[i : i + micro_batch]) for i in range(0, len(images), micro_batch)])

    return embed


# ---- 10. Evaluation, the matched-quality table, and the toy's figure ----


@torch.no_grad()
def evaluate(cfg, backbone, return_samples=False, image_path=None):
    """ODE samples from fixed held-out noises: mean reward, diversity (mean pairwise distance) and Vendi score.

    The toy also counts modes; image backbones write a grid (prompts x samples) to image_path.
    """
    generator = torch.Generator().manual_seed(cfg.seed + 10_000)  # the same noises at every evaluation
    n = cfg.sampling.eval_samples
    chunks = torch.arange(n).split(sampling_micro_batch(cfg) or n)
    sigmas = backbone.sigmas(cfg.sampling.eval_num_steps)
    rewards, diversities, vendis, modes, samples = [], [], [], [], {}
    for prompt in backbone.eval_prompts:
        cond = backbone.encode([prompt] * n)
        x = sample_batch(backbone, cond, backbone.noise(n, generator), sigmas, 0.0, chunks)[2]
        features = backbone.features(x)
        if not torch.isfinite(features).all():
            message = "the weights diverged (try a lower train.lr), or the sampler overflows (a huge sampling.shift)"
            raise RunError(f"the evaluation's samples are not finite: {message}")
        rewards.append(backbone.reward(x, [prompt] * n).mean().item())
        diversities.append(diversity_score(features, backbone.feature_metric))
        vendis.append(vendi_score(features, backbone.feature_metric, getattr(backbone, "vendi_bandwidth", None)))
        if hasattr(backbone, "count_modes"):  # the toy knows its modes
            modes.append(backbone.count_modes(x, prompt))
        samples[prompt] = x.cpu()
    metrics = dict(reward=float(np.mean(rewards)), diversity=float(np.mean(diversities)), vendi=float(np.mean(vendis)))
    if modes:
        metrics["modes"] = float(np.mean(modes))
    elif image_path:
        save_image_grid(image_path, samples)
        metrics["images"] = image_path
    return (metrics, samples) if return_samples else metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(path, samples):
    """One row per prompt, one column per sample: {prompt: (n, 3, H, W) in [0, 1]} -> a PNG."""
    rows = list(samples.values())  # P x (n, 3, H, W)
    grid = torch.cat([torch.cat(list(images), dim=2) for images in rows], dim=1)  # (3, P*H, n*W)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _pyplot().imsave(path, grid.permute(1, 2, 0).numpy())  # (3, P*H, n*W) -> (P*H, n*W, 3)


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
        gains = f"   gain: {gains}" if gains else ""  # one method alone has nothing to gain over
        lines.append(f"{row['reward']:.3f}  " + "".join(cell(row, m) for m in methods) + gains)
    return "\n".join(lines)


def plot_toy(path, base_samples, final_samples, histories, title=""):
    """One row per prompt: base and each method's final ODE samples, then a training path (circle: start, star: end).

    The first row's last panel plots reward against diversity, the second's reward against the modes kept.
    """
    plt = _pyplot()
    prompts, columns = list(base_samples), ["base"] + list(final_samples)
    fig, axes = plt.subplots(len(prompts), len(columns) + 1, figsize=(3 * (len(columns) + 1), 3 * len(prompts)))
    for r, prompt in enumerate(prompts):
        for c, name in enumerate(columns):
            x = (base_samples if name == "base" else final_samples[name])[prompt].numpy()
            ax = axes[r, c]
            ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.5)
            ax.set(xlim=(-2.2, 2.2), ylim=(-2.2, 2.2), aspect="equal", xticks=[], yticks=[])
            ax.set_title(f"{name}: {prompt}", fontsize=8)
    for ax, key in zip(axes[:, -1], ["diversity", "modes"]):  # noqa: B905 (two prompts, two paths)
        for i, (method, runs) in enumerate(histories.items()):
            for seed, history in enumerate(runs):  # the first seed solid, the others faint
                reward, value = [h["reward"] for h in history], [h[key] for h in history]
                style = dict(color=f"C{i}", alpha=1.0 if seed == 0 else 0.35)
                ax.plot(reward, value, label=method if seed == 0 else None, **style)
                ax.plot(reward[0], value[0], "o", **style)
                ax.plot(reward[-1], value[-1], "*", markersize=10, **style)
        ax.set(
            xlabel="mean reward (ODE)", ylabel="diversity (mean pairwise dist.)" if key == "diversity" else "modes kept"
        )
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- 11. Checkpoints and the output folder ----


def _image_path(cfg, name, iteration):
    return os.path.join(cfg.output_dir, "images", f"{name}_{iteration:05d}.png")


def save_checkpoint(cfg, backbone, optimizer, name, iteration, history):
    """Write output_dir/checkpoints/<name>/<iteration>/, atomically, and keep the newest keep_checkpoints.

    training_state.pt holds what a resume needs (LoRA, optimizer, torch's RNG, metrics so far); the sampler's noise
    is seeded per iteration, so it needs no state. Image backbones also write the LoRA in diffusers' format, for
    pipe.load_lora_weights. The folder is written under a temporary name and renamed at the end, so a crash never
    leaves half a checkpoint behind. Only process 0 writes.
    """
    from peft import get_peft_model_state_dict

    root = os.path.join(cfg.output_dir, "checkpoints", name)
    final = os.path.join(root, f"{iteration:06d}")
    if rank_and_world()[0] != 0 or os.path.isdir(final):  # saved already: a stop right after save_every changes nothing
        return final
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a crash in the middle of a write
    os.makedirs(partial)
    if isinstance(backbone, DiffusersBackbone):
        backbone.save_lora(partial)
    state = dict(lora=get_peft_model_state_dict(backbone.model), optimizer=optimizer.state_dict(),
                 torch_rng=torch.get_rng_state(), iteration=iteration, history=history)  # fmt: skip
    torch.save(state, os.path.join(partial, "training_state.pt"))
    os.replace(partial, final)
    for old in sorted(n for n in os.listdir(root) if n.isdigit())[: -cfg.train.keep_checkpoints]:
        shutil.rmtree(os.path.join(root, old))
    return final


def load_checkpoint(cfg, name, backbone, optimizer):
    """Restore the newest readable checkpoint of run `name`; returns (history, iteration), or ([], 0) if none.

    An unreadable checkpoint (a crash, a full disk) is set aside, with a warning, for the one before it. Training then
    continues exactly where it stopped: on the CPU, a resumed run's metrics equal an uninterrupted run's.
    """
    from peft import set_peft_model_state_dict

    root = os.path.join(cfg.output_dir, "checkpoints", name)
    names = sorted(n for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []
    if not names:
        tqdm.write(f"nothing to resume for {name} in {cfg.output_dir}: starting it fresh")
        return [], 0
    for folder in reversed(names):
        path = os.path.join(root, folder, "training_state.pt")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:
            warn(f"unreadable checkpoint {path} ({first_line(e)}); set aside as .unreadable, trying the one before")
            if rank_and_world()[0] == 0:  # renamed, so that pruning never keeps it in place of a good one
                shutil.rmtree(os.path.join(root, folder + ".unreadable"), ignore_errors=True)  # an older one
                os.replace(os.path.join(root, folder), os.path.join(root, folder + ".unreadable"))
    else:
        raise RunError(f"no readable checkpoint of {name}: delete {root} to train {name} afresh")
    try:
        set_peft_model_state_dict(backbone.model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError):  # a config.json edited by hand (say, another LoRA rank)
        raise RunError(
            f"{path} has other tensor shapes than this config: resume with the config that wrote it"
        ) from None
    torch.set_rng_state(state["torch_rng"])
    tqdm.write(f"resumed {name} from {os.path.dirname(path)}")
    return state["history"], state["iteration"]


def start_or_resume(cfg, backbone, optimizer, name, method, log):
    """Resume from a checkpoint, or evaluate the fresh LoRA (iteration 0); returns (history, last done iteration)."""
    history, done = load_checkpoint(cfg, name, backbone, optimizer) if cfg.resume else ([], 0)
    if rank_and_world()[0] != 0:
        return history, done
    history = history or [
        dict(iteration=0, method=method, **evaluate(cfg, backbone, image_path=_image_path(cfg, name, 0)))
    ]
    for record in history:  # a resumed run rewrites the metrics it had, so metrics.jsonl never holds a line twice
        log(record)
    if done and history[-1]["iteration"] != done and (done % cfg.train.eval_every == 0 or done == cfg.train.iterations):
        # Interrupted during that iteration's evaluation: redo it (its noises are fixed). Its training stats are lost.
        history.append(dict(iteration=done, method=method, **evaluate(cfg, backbone)))
        log(history[-1])
    return history, done


def _flat(tree, prefix=""):
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def check_previous_run(cfg):
    """Refuse another run's config, or checkpoints without resume. log.tensorboard may change, and with resume
    iterations, eval_every and save_every (that extends a run). output_dir may be spelled another way, or moved."""
    out, path = cfg.output_dir, os.path.join(cfg.output_dir, "config.json")
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))  # the same JSON types as the file's
    try:
        previous = json.load(open(path)) if os.path.exists(path) else config
    except (OSError, ValueError) as e:
        raise ConfigError(f"output_dir {out}: unreadable config.json ({first_line(e)}); delete it") from None
    if not isinstance(previous, dict):  # valid JSON, but no config
        raise ConfigError(f"output_dir {out}: config.json holds no config; delete it")
    previous, current = _flat(previous), _flat(config)
    extendable = ["output_dir", "resume", "log.tensorboard"]  # none changes what is trained
    extendable += ["train.iterations", "train.eval_every", "train.save_every"] if cfg.resume else []
    changed = [k for k in sorted(previous.keys() | current.keys()) if previous.get(k) != current.get(k)]
    if changed := [k for k in changed if k not in extendable]:
        raise ConfigError(f"output_dir {out} holds a run with another config (differs in: {', '.join(changed)});"
                          " choose another output_dir or delete it")  # fmt: skip
    checkpoints = os.path.join(out, "checkpoints")
    saved = [int(n) for r, _, _ in os.walk(checkpoints) for n in os.listdir(r) if n.isdigit()]
    if saved and not os.path.exists(path):  # deleted by hand: nothing to check the checkpoints' config against
        raise ConfigError(f"output_dir {out} holds checkpoints but no config.json: restore it, or delete them")
    if saved and not cfg.resume:
        raise ConfigError(f"output_dir {out} holds checkpoints: continue with --set resume=true, or delete them")
    if saved and max(saved) > cfg.train.iterations:
        raise ConfigError(f"train.iterations: {cfg.train.iterations}, but output_dir {out} has {max(saved)} done")


def claim_output_dir(cfg):
    """Lock output_dir for this run, then refuse a file, another run's config, or checkpoints without resume.

    A refused start changes nothing in the folder (but for an empty .lock file). Returns the open lock file: the
    lock lasts while it stays open.
    """
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a")
    except OSError as e:
        raise ConfigError(f"output_dir {out}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"output_dir {out} is in use by another run: wait for it, or choose another") from None
    try:
        check_previous_run(cfg)
    except ConfigError:
        lock.close()  # refused: release the folder at once
        raise
    return lock


def claim_output_dir_on_process_0(cfg):
    """claim_output_dir() on process 0; under torchrun the others learn its answer, so that all start or none."""
    lock, refusal = None, [""]
    if rank_and_world()[0] == 0:
        try:
            lock = claim_output_dir(cfg)
        except ConfigError as e:
            refusal = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise ConfigError(refusal[0])
    return lock


# ---- 12. Config loading and validation, and main ----


class ConfigError(ValueError):
    """A bad config or command line; main() prints it as one line and exits with status 2."""


class RunError(RuntimeError):
    """Weights that cannot be loaded, or training that diverged; main() prints it as one line and exits with 1."""


def read_prompts(path):
    """One prompt per line; blank lines are skipped."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def load_config(path, preset="toy", overrides=()):
    """A preset of a YAML file (after the presets it names as `base`) over the dataclass defaults, then --set values.

    OmegaConf types every value by the dataclasses and names the key of a wrong one; validate() checks ranges.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if os.path.isdir(path):
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        presets = OmegaConf.to_container(OmegaConf.load(path))
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: invalid YAML ({first_line(e)})") from None
    presets = presets if isinstance(presets, dict) else {}
    chain, name = [], preset
    while name is not None:  # a preset over its base, over the base's base, ...
        if not isinstance(name, str) or name not in presets or len(chain) > len(presets):
            names = ", ".join(map(str, presets)) or "none"
            raise ConfigError(f"unknown preset '{name}' in {path}, or a cycle of bases (presets: {names})")
        if not isinstance(presets[name] or {}, dict):
            raise ConfigError(f"preset '{name}' in {path}: expected a mapping of keys, got {presets[name]!r}")
        node = dict(presets[name] or {})
        name = node.pop("base", None)
        chain.insert(0, node)
    if any("=" not in text for text in overrides):
        raise ConfigError(f"--set expects key=value, got '{next(t for t in overrides if '=' not in t)}'")
    cfg, source = OmegaConf.structured(Config), f"preset '{preset}' in {path}"
    try:  # one layer at a time, so an error without a key (`--set train=3`) can still name where it came from
        for node in chain:
            cfg = OmegaConf.merge(cfg, node)
        for text in overrides:
            source = f"--set {text}"
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([text]))
        cfg = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', None) or source}: {first_line(e)}") from None
    validate(cfg)
    return cfg


def memory_gb(n):
    """What an N x N distance matrix costs the bonus or the evaluation: about six float64 copies of it, in GB."""
    return 6 * 8 * n * n / 2**30


def validate(cfg):
    """Reject impossible values and combinations, before any work, with one line that names the key and its value."""
    sampling, model, image = cfg.sampling, cfg.model, cfg.backbone != "toy"
    for key, value in _flat(dataclasses.asdict(cfg)).items():
        if isinstance(value, float) and not math.isfinite(value):  # inf and nan pass every comparison below
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    for key in ("prompts_file", "eval_prompts_file"):
        path = getattr(model, key)
        try:
            readable = not path or bool(read_prompts(path))
        except (OSError, UnicodeDecodeError):
            readable = False
        if not readable:
            raise ConfigError(f"model.{key}: no such file, an unreadable one, or no prompts in it: {path}")
    prompts = TOY_PROMPTS if not image else read_prompts(model.prompts_file) if model.prompts_file else model.prompts
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30  # GB of RAM
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's number of processes
    cuda = torch.cuda.is_available()

    def each(keys, ok, requirement):
        return [(key, ok, requirement) for key in keys.split()]

    rules = [  # (key, what its value v must satisfy, what it must be); checked in order
        ("experiment", lambda v: v in EXPERIMENTS, ", ".join(EXPERIMENTS)),
        ("backbone", lambda v: v in ("toy", "sd3", "flux"), "toy, sd3 or flux"),
        ("dtype", lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16"),
        ("dtype", lambda v: image or v == "float32", "float32 for the toy"),
        ("device", lambda v: image or v == "cpu", "cpu for the toy"),
        ("seed", lambda v: type(v) is int and 0 <= v < 2**32, "an integer in [0, 2**32), as numpy and sklearn need"),
        ("analysis.seeds", lambda v: all(type(s) is int and 0 <= s < 2**32 for s in v), "integers in [0, 2**32)"),
        ("output_dir", lambda v: v, "a folder"),
        ("methods", lambda v: v and all(m in METHODS for m in v) and len(set(v)) == len(v),
         f"a list of {', '.join(METHODS)}, none twice"),
        ("sampling.group_size", lambda v: v >= 2, "at least 2"),
        ("sampling.num_steps", lambda v: v >= 2, "at least 2 (the last step is never trained)"),
        ("sampling.eval_samples", lambda v: v >= 2, "at least 2 (diversity needs pairs)"),
        ("sampling.group_size", lambda v: memory_gb(v) < memory / 2,
         f"smaller: its bonus needs ~{memory_gb(sampling.group_size):.0f} GB, this machine has {memory:.0f}"),
        ("sampling.eval_samples", lambda v: memory_gb(v) < memory / 2,
         f"smaller: scoring them needs ~{memory_gb(sampling.eval_samples):.0f} GB, this machine has {memory:.0f}"),
        ("model.prompts", lambda v: not image or prompts, "a list, or give model.prompts_file"),
        ("sampling.prompts_per_iter", lambda v: 1 <= v * world <= max(len(prompts), 1),
         f"at least 1, and times {world} process(es) at most the {len(prompts)} training prompts"),
        ("sampling.noise_level", lambda v: 0 < v < 2, "in (0, 2) to train (0 is the ODE)"),
        *each("train.lora_rank toy.hidden", lambda v: v <= 4096, "at most 4096"),
        ("toy.pretrain_batch", lambda v: v <= 2**20, "at most 2**20"),
        *each("train.lr sampling.shift train.clip_range train.adv_clip train.max_grad_norm train.lora_alpha "
              "toy.pretrain_lr toy.mode_std toy.reward_width", lambda v: v > 0, "positive"),
        *each("sampling.eval_num_steps train.iterations train.lora_rank train.eval_every train.keep_checkpoints "
              "diverse.max_clusters toy.pretrain_iters toy.pretrain_batch toy.hidden", lambda v: v >= 1, "at least 1"),
        *each("sampling.micro_batch train.micro_batch train.save_every train.weight_decay train.kl_beta diverse.beta "
              "diverse.lambda_w", lambda v: v >= 0, "not negative"),
        ("train.kl_beta", lambda v: "grpo_kl" not in cfg.methods or v > 0, "positive for the grpo_kl method"),
        ("diverse.n_clusters", lambda v: v == "auto" or type(v) is int and 0 < v < sampling.group_size,
         f"'auto' or an integer in [1, sampling.group_size = {sampling.group_size})"),
        ("diverse.bandwidth", lambda v: v is None or v > 0, "positive, or null for local scaling"),
        ("diverse.K", lambda v: 0 <= v < sampling.num_steps, f"in [0, {sampling.num_steps - 1}], the trained steps"),
        ("model.pretrained", lambda v: not image or v, "a hub name or a local folder"),
        ("model.resolution", lambda v: v > 0 and v % 16 == 0, "a multiple of 16"),
        ("model.reward", lambda v: v in ("pickscore", "hpsv3"), "pickscore or hpsv3"),
        ("model.reward", lambda v: not image or v != "hpsv3" or importlib.util.find_spec("hpsv3"),
         "pickscore here: hpsv3 needs the hpsv3 package (pip install hpsv3; see README)"),
        ("model.eval_prompts", lambda v: not image or v or model.eval_prompts_file, "a list (or a file)"),
        ("device", lambda v: torch.device(v).type == "cpu" or torch.device(v).type == "cuda" and cuda,
         "cpu, or cuda on a machine with a GPU"),  # last: the image presets' other checks run on any machine
    ]  # fmt: skip
    for key, ok, requirement in rules:
        value = functools.reduce(getattr, key.split("."), cfg)
        try:
            good = ok(value)
        except (TypeError, ValueError, RuntimeError):  # a value the check cannot compare or parse, such as a list
            good = False
        if not good:
            raise ConfigError(f"{key}: must be {requirement}, got {value!r}")


def build_backbone(cfg):
    return ToyBackbone(cfg) if cfg.backbone == "toy" else load_diffusers_backbone(cfg)


def train_fresh(cfg, method, log, name):
    """train() a fresh copy of the base model; returns (history, the toy's final ODE samples, or None elsewhere).

    The toy's figure needs samples, which the JSON history does not keep: re-evaluating gives the same samples as the
    last evaluation (fixed noises) and costs the toy about 0.1 s. The backbone is freed on return, before the next
    run loads its own copy.
    """
    backbone = build_backbone(cfg)
    history = train(cfg, backbone, method, log, name)
    toy = isinstance(backbone, ToyBackbone) and rank_and_world()[0] == 0
    return history, evaluate(cfg, backbone, return_samples=True)[1] if toy else None


def write_json(path, value):
    """Write a JSON file whole or not at all: a temporary file first, then renamed over `path`."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def make_log(cfg, files):
    """log(record): every number to metrics.jsonl, one short line to the terminal, and TensorBoard if asked.

    The previous run's config.json and metrics.jsonl are replaced at the first record, once training has started.
    `files` collects the open files, for the caller to close.
    """

    def log(record):
        if not files:  # training has started: now the previous run's files give way
            write_json(os.path.join(cfg.output_dir, "config.json"), dataclasses.asdict(cfg))
            with contextlib.suppress(FileNotFoundError):  # a crash must not leave the previous run's summary behind
                os.remove(os.path.join(cfg.output_dir, "summary.json"))
            files["metrics"] = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w")
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                files["tensorboard"] = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
        files["metrics"].write(json.dumps(record) + "\n")
        files["metrics"].flush()
        if "iteration" not in record:  # an analysis's table row: every value
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            return
        keys = ["reward", "diversity", "vendi", "modes", "clusters", "loss", "skipped_updates", "dropped_rewards"]
        keys = [k for k in keys if k in record and (record[k] or k not in ("skipped_updates", "dropped_rewards"))]
        shown = " ".join(f"{k}={record[k]:.4g}" for k in keys)
        run = f"{record['run']}-seed{record['seed']}" if "run" in record else record["method"]  # analyses' label
        tqdm.write(f"{run} it {record['iteration']}: {shown}"[:120])
        if "tensorboard" in files:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    files["tensorboard"].add_scalar(f"{run}/{key}", value, record["iteration"])
            if "images" in record:  # the image backbones' grid of this evaluation
                image = _pyplot().imread(record["images"])[..., :3]
                files["tensorboard"].add_image(f"{run}/samples", image, record["iteration"], dataformats="HWC")

    return log


def run(cfg):
    """Train every method of cfg.methods from the same base and seed, and compare them at matched reward.

    Writes config.json, metrics.jsonl, summary.json and, for the toy, toy.png to output_dir. Under torchrun every
    process trains; process 0 alone evaluates and writes.
    """
    start, histories, final_samples, files = time.time(), {}, {}, {}
    log, rank = make_log(cfg, files), rank_and_world()[0]
    for method in cfg.methods:
        history, final_samples[method] = train_fresh(cfg, method, log, name=f"{method}-seed{cfg.seed}")
        histories[method] = [history]
    if rank != 0:
        return None
    rows = matched_quality_table(histories, baseline=cfg.methods[0])
    print("\nDiversity at matched reward (ODE evaluation, mean over prompts):")
    print(format_table(rows, cfg.methods) if rows else "(no reward level above the base's is reached by every method)")
    final = {m: h[0][-1] for m, h in histories.items()}
    if cfg.backbone == "toy":
        ends = ", ".join(f"{m} {f['reward']:.3f} / {f['modes']:.1f} / {f['vendi']:.1f}" for m, f in final.items())
        title = f"seed {cfg.seed}, {cfg.train.iterations} iterations; final ODE reward / modes / Vendi: {ends}"
        path = os.path.join(cfg.output_dir, "toy.png")
        plot_toy(path, evaluate(cfg, build_backbone(cfg), return_samples=True)[1], final_samples, histories, title)
        if "tensorboard" in files:
            files["tensorboard"].add_image("toy", _pyplot().imread(path)[..., :3], dataformats="HWC")
    return finish(cfg, dict(seed=cfg.seed, methods=cfg.methods, table=rows, final=final), start, files)


def finish(cfg, summary, start, files):
    """Write summary.json (with the wall time since `start`), close the log's files, and say where everything went."""
    summary["wall_seconds"] = time.time() - start
    write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    for handle in files.values():
        handle.close()
    written = ", ".join(sorted(n for n in os.listdir(cfg.output_dir) if n.endswith((".json", ".jsonl", ".png"))))
    print(f"\nwrote {written} to {cfg.output_dir} ({summary['wall_seconds']:.1f} s)")
    return summary


def setup_processes(cfg):
    """Under torchrun: join the process group, one GPU per process (NCCL for CUDA tensors, gloo for CPU ones)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return
    if cfg.device.startswith("cuda") and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", 1)):
        raise ConfigError(f"device: {cfg.device} with NCCL needs a GPU per process; {torch.cuda.device_count()} found")
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this process's GPU
    # Process 0 evaluates while the others wait in the next all-reduce: allow an evaluation far longer than the default.
    backend = "cpu:gloo,cuda:nccl" if cfg.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout` and schedulers send), handled like Ctrl-C: a checkpoint, one line, exit 143."""


STOP_SIGNALS = []  # the signals that asked this process to stop; one_line_exit() installs the handler
STOPS_WAIT = [False]  # True inside train()'s loop, where a first signal waits for the end of its iteration


def _ask_to_stop(signum, frame):
    STOP_SIGNALS.append(signum)
    if len(STOP_SIGNALS) > 1 or not STOPS_WAIT[0]:  # asked twice, or outside training: stop at once
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    os.write(2, b"\nstopping after this iteration, with a checkpoint (again: stop at once, with none)\n")


def stop_if_asked():
    """Raise the stop that a signal asked for. train() calls it between iterations, so that the checkpoint it then
    writes never holds half an optimizer step. Under torchrun the processes agree first: if one was asked, all stop
    here, and none is left waiting in the next all-reduce."""
    asked = torch.tensor(STOP_SIGNALS[0] if STOP_SIGNALS else 0)
    if dist.is_initialized():
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)  # SIGTERM (15) over Ctrl-C's SIGINT (2)
    if asked := asked.item():
        raise Terminated() if asked == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def one_line_exit():
    """Turn a ConfigError, RunError, OSError, running out of memory, Ctrl-C or SIGTERM into one line and an exit status.

    While inside, Ctrl-C and SIGTERM stop at once, but in train()'s loop they wait for the end of the iteration.
    """
    handlers = {signum: signal.signal(signum, _ask_to_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except ConfigError as e:  # checked up front as a rule; this catches a config built later (an analysis's variant)
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (RunError, OSError) as e:  # OSError: a full disk, a folder that became unwritable, ...
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:  # out of memory, on the CPU or the GPU; any other error is a bug
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "allocate memory" not in str(e):
            raise
        print(f"error: out of memory ({first_line(e)}); see README, 'CUDA out of memory'", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print("error: terminated" if isinstance(e, Terminated) else "error: interrupted", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        STOP_SIGNALS.clear()


def main(argv=None):
    import yaml

    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.yaml")
    presets = "(unreadable)"
    with contextlib.suppress(Exception), open(default) as f:
        presets = ", ".join(yaml.safe_load(f))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=f"presets of {default}: {presets}")
    parser.add_argument("--config", default=default, help="YAML file of presets (default: configs.yaml beside this)")
    parser.add_argument("--preset", default="toy", help="a top-level section of the YAML file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.lr=1e-3; repeatable"
    )
    args = parser.parse_args(argv)
    lock = None
    try:
        try:
            cfg = load_config(args.config, args.preset, args.set)
            if cfg.experiment != "compare":
                sets = "".join(f" --set {text}" for text in args.set)
                command = f"python analyses/paper_analyses.py --config {args.config} --preset {args.preset}{sets}"
                raise ConfigError(f"preset '{args.preset}' is one of the paper's analyses: run {command}")
            setup_processes(cfg)
            lock = claim_output_dir_on_process_0(cfg)
        except ConfigError as e:
            print(f"error: {first_line(e)}", file=sys.stderr)  # cut if long: a value can be a huge list
            sys.exit(2)
        if cfg.backbone == "toy" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)  # the toy's tiny matmuls gain nothing from threads, and a busy machine costs 10x
        defaults, settings = _flat(dataclasses.asdict(Config())), _flat(dataclasses.asdict(cfg))
        changed = [f"  {k} = {v}" for k, v in settings.items() if defaults.get(k) != v and not k.endswith("prompts")]
        if rank_and_world()[0] == 0:  # once, not once per process
            print(f"preset {args.preset}; settings that differ from the defaults:", *changed, sep="\n")
        with one_line_exit():
            run(cfg)
            if dist.is_initialized():  # the others wait for process 0's last evaluation before they all leave the group
                dist.barrier()
    finally:  # also on an error: a caller that keeps the exception (pytest, a notebook) must not keep the folder
        if lock is not None:
            lock.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
