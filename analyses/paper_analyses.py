"""The paper's analyses of DiverseGRPO, run on the toy (or, where they make sense, on SD3 or FLUX).

Each is a preset of configs.yaml whose `experiment` names it; each writes config.json, metrics.jsonl (one line per
logged record, with its "run" and "seed"), summary.json and (all but bonus_rules) a figure to the preset's output_dir.

  ablation    every method of `methods` (GRPO, GRPO + KL, bonus only, regularizer only, DiverseGRPO) on each seed of
              analysis.seeds, compared at matched reward: mean +- std over the seeds, and each seed on its own.
  sweep       DiverseGRPO at each bonus weight of analysis.betas and each K of analysis.Ks, against plain GRPO, on
              each seed of analysis.seeds: final metrics, mean +- std over the seeds.
  adaptive_k  DiverseGRPO with the eigengap's k and with each fixed k of analysis.n_clusters, at matched reward;
              then how stable each choice's clustering is on groups of the base model.
  branching   the base model only: samples share their first s SDE steps, then branch. How diverse the branches
              still are after s shared steps, and (toy) how often two branches end in the same mode: how much of
              the mode choice the first s steps decide.
  bonus_cost  wall time of the creativity bonus as the group grows, dense against arpack eigengap (toy only).
  bonus_rules planted groups in DreamSim's cosine geometry and the toy's: how often the bonus rewards the rarest
              mode, with the median bandwidth and with the local scaling every preset uses (no training).

Run     python analyses/paper_analyses.py --config configs.yaml --preset ablation
        python analyses/paper_analyses.py --preset branching --set analysis.trunks=4
The training itself (GRPO, the bonus, the regularizer) is diversegrpo.py's; this file only arranges runs of it.
"""

import argparse
import copy
import functools
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # diversegrpo.py sits one folder up, wherever this is run from
import diversegrpo as dg  # noqa: E402

# ---- Config: the analysis lists, checked for the experiment that reads them ----


def load_config(path, preset, overrides=()):
    """diversegrpo's config, plus the checks of the analysis lists; a training preset is pointed to diversegrpo.py."""
    cfg = dg.load_config(path, preset, overrides)
    if cfg.experiment == "compare":
        raise dg.ConfigError(
            f"preset '{preset}' trains and compares methods: run "
            f"python diversegrpo.py --config {path} --preset {preset}"
        )
    validate_analysis(cfg)
    return cfg


def validate_analysis(cfg):
    """Reject an analysis list that cannot run, before any training, with one line that names the key."""
    a, steps, group = cfg.analysis, cfg.sampling.num_steps, cfg.sampling.group_size
    experiment = cfg.experiment
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30  # GB of RAM

    def number(x):
        return type(x) in (int, float)

    checks = [  # (key, what must hold, what it must be)
        (
            "analysis.betas",
            experiment != "sweep" or all(number(b) and 0 <= b < math.inf for b in a.betas),
            "finite numbers >= 0",
        ),
        (
            "analysis.Ks",
            experiment != "sweep" or all(type(k) is int and 0 <= k < steps for k in a.Ks),
            f"integers in [0, {steps - 1}], the trained steps",
        ),
        (
            "analysis.n_clusters",
            experiment != "adaptive_k" or all(k == "auto" or (type(k) is int and 1 <= k < group) for k in a.n_clusters),
            f"'auto' or integers in [1, sampling.group_size = {group})",
        ),
        (
            "analysis.group_sizes",
            experiment != "bonus_cost"
            or (
                len(a.group_sizes) >= 2
                and all(type(n) is int and 3 <= n and dg.memory_gb(n) < memory / 2 for n in a.group_sizes)
            ),
            f"two or more integers >= 3 that fit half of this machine's {memory:.0f} GB (N = 10,000 needs ~4.5 GB)",
        ),
        ("analysis.trunks", a.trunks >= 1, "at least 1"),
        ("analysis.stability_groups", a.stability_groups >= 1, "at least 1"),
        ("analysis.repeats", a.repeats >= 1, "at least 1"),
        ("analysis.sd3_step_seconds", a.sd3_step_seconds > 0, "positive"),
        ("backbone", experiment != "bonus_cost" or cfg.backbone == "toy", "toy for bonus_cost (it times toy groups)"),
    ]
    checks += [  # a value listed twice would train the same run twice and key two table columns alike
        (f"analysis.{key}", len(set(map(str, values))) == len(values), "a list without repeats")
        for key, values in [("seeds", a.seeds), ("betas", a.betas), ("Ks", a.Ks), ("n_clusters", a.n_clusters)]
    ]
    for key, ok, requirement in checks:
        if not ok:
            value = functools.reduce(getattr, key.split("."), cfg)
            raise dg.ConfigError(f"{key}: must be {requirement}, got {value!r}")


def with_changes(cfg, changes):
    """A copy of cfg with dotted keys replaced, e.g. {"diverse.beta": 0.7}, held to the same rules as a config."""
    cfg = copy.deepcopy(cfg)
    for key, value in changes.items():
        *path, name = key.split(".")
        setattr(functools.reduce(getattr, path, cfg), name, value)
    dg.validate(cfg)
    return cfg


def creativity_bonus(distances, diverse, n_clusters, seed=0, eigen_solver="auto"):
    """dg.creativity_bonus with the config's bandwidth and max_clusters, and the number of clusters given."""
    return dg.creativity_bonus(distances, n_clusters, diverse.bandwidth, seed, diverse.max_clusters, eigen_solver)


# ---- Training several variants from the same base ----


def train_variants(cfg, variants, log):
    """Train each (label, method, changes) variant from its seed's base model, for every seed of the analysis.

    Seeds are the outer loop, so a seed's runs all start from one cached base. Returns ({label: [history per
    seed]}, {label: final ODE samples of the first seed}).
    """
    histories, final_samples = {label: [] for label, _, _ in variants}, {}
    for seed in cfg.analysis.seeds or [cfg.seed]:
        for label, method, changes in variants:
            variant = with_changes(cfg, {"seed": seed, **changes})

            def run_log(record, label=label, seed=seed):
                log({"run": label, "seed": seed, **record})

            history, samples = dg.train_fresh(variant, method, run_log, name=f"{label}-seed{seed}")
            histories[label].append(history)
            final_samples.setdefault(label, samples)  # the first seed's
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return histories, final_samples


# ---- Ablation: the components alone and together, on several seeds ----


def ablation(cfg, log):
    """Every method from the same base on every seed, compared at matched reward: over the seeds, and per seed.

    The per-seed rows test the ablation's claim seed by seed (each component alone keeps more modes than GRPO at
    the top reward level every run reaches); a mean over seeds can hide a seed where it fails.
    """
    methods, seeds = cfg.methods, cfg.analysis.seeds or [cfg.seed]
    baseline = methods[0]
    histories, final_samples = train_variants(cfg, [(m, m, {}) for m in methods], log)
    rows = dg.matched_quality_table(histories, baseline=baseline)
    print("\nDiversity at matched reward (ODE evaluation, mean over prompts; mean +- std over seeds):")
    print(
        dg.format_table(rows, methods) if rows else "(no reward level above the base model's is reached by every run)"
    )
    per_seed = [
        dict(seed=seed, table=dg.matched_quality_table({m: [h[i]] for m, h in histories.items()}, baseline=baseline))
        for i, seed in enumerate(seeds)
    ]
    print(f"\nPer seed, at its top shared reward level: modes kept (diversity); * = more modes than {baseline}")
    print("seed  reward  " + "".join(f"{m:>18}" for m in methods))
    for entry in per_seed:
        if not entry["table"]:
            print(f"{entry['seed']:<4}  (no reward level above the base model's is reached by every method)")
            continue
        top = entry["table"][-1]
        print(
            f"{entry['seed']:<4}  {top['reward']:.3f}  "
            + "".join(f"{_mode_cell(top, m, baseline):>18}" for m in methods)
        )
    final = {m: [h[-1] for h in runs] for m, runs in histories.items()}
    if cfg.backbone == "toy":
        first = with_changes(cfg, {"seed": seeds[0]})  # the figure shows the first seed's runs, so its base
        base_samples = dg.evaluate(first, dg.build_backbone(first), return_samples=True)[1]
        ends = ", ".join(f"{m} {f[0]['reward']:.3f} / {f[0]['modes']:.1f}" for m, f in final.items())
        seed_list = ", ".join(map(str, seeds))
        title = f"seeds {seed_list}, {cfg.train.iterations} iterations; seed {seeds[0]}'s final reward / modes: {ends}"
        dg.plot_toy(os.path.join(cfg.output_dir, "toy.png"), base_samples, final_samples, histories, title)
    return dict(seeds=seeds, methods=methods, table=rows, per_seed=per_seed, final=final)


def _mode_cell(row, method, baseline):
    """'6.0 (1.685) *': modes (diversity), starred when above the baseline's modes; diversity alone off the toy."""
    if row[method] is None:
        return "n/a"
    modes, base_modes = row[method + "_modes"], row[baseline + "_modes"]
    if modes is None:
        return f"{row[method]:.3f}"
    star = " *" if method != baseline and base_modes is not None and modes > base_modes else "  "
    return f"{modes:.1f} ({row[method]:.3f}){star}"


# ---- Sweeps of beta and K ----


def sweep(cfg, log):
    """The paper's ablations of beta (bonus weight) and K (regularized steps), each against plain GRPO.

    Every variant trains on each seed of analysis.seeds. A row holds the final ODE metrics and the best reward along
    training: the mean and the population std over the seeds.
    """
    a = cfg.analysis
    variants = [("grpo", "grpo", {})]
    variants += [(f"beta={b}", "diversegrpo", {"diverse.beta": b}) for b in a.betas]
    variants += [(f"K={k}", "diversegrpo", {"diverse.K": k}) for k in a.Ks]
    histories, _ = train_variants(cfg, variants, log)
    keys, rows = ("reward", "diversity", "vendi", "modes", "best_reward"), []
    for label, runs in histories.items():
        finals = [dict(h[-1], best_reward=max(r["reward"] for r in h)) for h in runs]  # one per seed
        row = dict(run=label, seeds=len(runs))
        for key in keys:
            values = [f[key] for f in finals if f.get(key) is not None]  # no modes off the toy
            row[key], row[key + "_std"] = (float(np.mean(values)), float(np.std(values))) if values else (None, None)
        rows.append(row)
    print(f"\nSweep: final ODE metrics and the best reward along training, mean +- std over {rows[0]['seeds']} seed(s)")
    print(f"{'run':<12}" + "".join(f"{key:>16}" for key in keys))
    for r in rows:
        cells = ["" if r[k] is None else f"{r[k]:.3f}+-{r[k + '_std']:.3f}" for k in keys]
        print(f"{r['run']:<12}" + "".join(f"{cell:>16}" for cell in cells))
    groups = {"beta": ["grpo"] + [f"beta={b}" for b in a.betas], "K": ["grpo"] + [f"K={k}" for k in a.Ks]}
    plot_training_curves(os.path.join(cfg.output_dir, "sweep.png"), histories, groups)
    return dict(table=rows)


# ---- Choice of k: fixed against the eigengap, and the clustering's stability ----


def clustering_stability(groups, n_clusters, diverse, metric="euclidean", seed=0, seeds=5, jitter=0.02):
    """How stable the bonus's clustering is: mean adjusted Rand index (1 = identical labels).

    across_seeds: labels from different clustering seeds on the same group; under_jitter: labels before and after
    moving every sample by Gaussian noise of `jitter` times the group's median pairwise distance. A bonus whose
    clusters move with the seed or with tiny changes of the samples rewards noise, not rarity.
    """
    from sklearn.metrics import adjusted_rand_score

    generator = torch.Generator().manual_seed(seed)
    across_seeds, under_jitter, n_found = [], [], []
    for features in groups:
        distances = dg.pairwise_distances(features, metric)
        labels = [creativity_bonus(distances, diverse, n_clusters, seed + i)[1] for i in range(seeds)]
        across_seeds += [adjusted_rand_score(labels[0], other) for other in labels[1:]]
        scale = jitter * distances[~torch.eye(len(features), dtype=torch.bool)].median()
        moved = features + scale * torch.randn(features.shape, generator=generator)
        moved_labels = creativity_bonus(dg.pairwise_distances(moved, metric), diverse, n_clusters, seed)[1]
        under_jitter.append(adjusted_rand_score(labels[0], moved_labels))
        n_found.append(len(set(labels[0].tolist())))
    return dict(
        ari_across_seeds=float(np.mean(across_seeds)),
        ari_under_jitter=float(np.mean(under_jitter)),
        clusters=float(np.mean(n_found)),
    )


def base_model_groups(cfg, backbone):
    """analysis.stability_groups groups of G SDE samples per training prompt, as the bonus sees them at the start.

    Sampled in micro-batches without autograd: on SD3 or FLUX a graph through every step would not fit.
    """
    G, sigmas = cfg.sampling.group_size, backbone.sigmas(cfg.sampling.num_steps)
    chunks = torch.arange(G).split(dg.sampling_micro_batch(cfg) or G)
    generator = torch.Generator().manual_seed(cfg.seed)
    groups = []
    with torch.no_grad():
        for prompt in backbone.prompts:
            cond = backbone.encode([prompt] * G)
            for _ in range(cfg.analysis.stability_groups):
                noise = backbone.noise(G, generator)
                samples = dg.sample_batch(backbone, cond, noise, sigmas, cfg.sampling.noise_level, chunks, generator)[2]
                groups.append(backbone.features(samples))
    return groups


def compare_n_clusters(cfg, log):
    """Fixed k against the eigengap's choice: diversity at matched reward, and how stable the clustering is."""
    a = cfg.analysis
    labels = [f"k={k}" for k in a.n_clusters]
    variants = [("grpo", "grpo", {})] + [(f"k={k}", "diversegrpo", {"diverse.n_clusters": k}) for k in a.n_clusters]
    histories, _ = train_variants(cfg, variants, log)
    rows = dg.matched_quality_table(histories, baseline="grpo")
    print("\nDiversity at matched reward by choice of k (mean +- std over seeds):")
    print(dg.format_table(rows, ["grpo"] + labels) if rows else "(no reward level is reached by every run)")
    backbone = dg.build_backbone(cfg)
    groups = base_model_groups(cfg, backbone)
    stability = {
        f"k={k}": clustering_stability(groups, k, cfg.diverse, backbone.feature_metric, cfg.seed) for k in a.n_clusters
    }
    print("\nClustering stability on base-model groups (adjusted Rand index; 1 = identical labels):")
    print("k         clusters found  ARI across seeds  ARI under 2% jitter")
    for label, s in stability.items():
        print(f"{label:<9} {s['clusters']:14.1f}  {s['ari_across_seeds']:16.3f}  {s['ari_under_jitter']:19.3f}")
    plot_training_curves(os.path.join(cfg.output_dir, "adaptive_k.png"), histories, {"k": ["grpo"] + labels})
    return dict(table=rows, stability=stability)


# ---- Branching: what the first SDE steps decide ----


def same_mode_probability(samples, modes):
    """The chance that two distinct samples have the same nearest mode: sum_m c_m (c_m - 1) / (n (n - 1))."""
    counts = torch.bincount(torch.cdist(samples.float(), modes).argmin(dim=1), minlength=len(modes)).double()
    n = len(samples)
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def branching_curves(cfg, backbone, prompt, measures, generator):
    """Measures of samples that share their first s SDE steps, for s = 0..T (DiverseGRPO project page).

    Each of analysis.trunks trajectories starts from one noise and runs s steps; then group_size copies of it finish
    the remaining steps with independent noise. Even at s = 0 the branches share their starting noise, so the curve
    measures what the SDE's own noise decides, step by step. measures: {name: f(final samples) -> float}. Returns
    {name: T + 1 values, each the mean over trunks}. The last step is deterministic, so s = T - 1 and s = T share
    everything.
    """
    branches, noise_level = cfg.sampling.group_size, cfg.sampling.noise_level
    sigmas = backbone.sigmas(cfg.sampling.num_steps)
    T, chunks = len(sigmas) - 1, torch.arange(branches).split(dg.sampling_micro_batch(cfg) or branches)
    cond = backbone.encode([prompt] * branches)
    # Drawn once, so every s branches off the same trunks and the curve moves with s alone.
    trunk_seeds = torch.randint(2**31, (cfg.analysis.trunks,), generator=generator).tolist()
    curves = {name: [] for name in measures}
    for shared in range(T + 1):
        values = {name: [] for name in measures}
        for trunk_seed in trunk_seeds:
            trunk_generator = torch.Generator().manual_seed(trunk_seed)
            x = backbone.noise(1, trunk_generator)
            for i in range(shared):  # the shared stem: one sample
                velocity = backbone.velocity(x, sigmas[i], dg._select(cond, [0]))
                level = noise_level if i < T - 1 else 0.0  # the last step is deterministic, as in rollout()
                x, *_ = dg.sde_step_with_logprob(
                    velocity, x, sigmas[i], sigmas[i + 1], level, generator=trunk_generator
                )
            x = x.expand(branches, *x.shape[1:])  # (1, ...) -> (branches, ...)
            if shared < T:  # the branches: independent noise from here on
                samples = dg.sample_batch(backbone, cond, x, sigmas[shared:], noise_level, chunks, generator)[2]
            else:
                samples = backbone.decode(x[:1])
                samples = samples.expand(branches, *samples.shape[1:])
            for name, measure in measures.items():
                values[name].append(measure(samples))
        for name in measures:
            curves[name].append(float(np.mean(values[name])))
    return curves


def branching(cfg, log):
    """The project page's analysis on the base model: how much of the diversity, and of the mode choice, the first
    steps decide.

    The diversity curve mixes two things: which mode a sample lands in and where within it. On the toy the modes are
    known, so the chance that two branches land in the same mode isolates the first: K_85, the number of shared steps
    that decide 85% of the mode choice, says how many steps a regularizer must cover to protect the modes.
    """
    backbone = dg.build_backbone(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    toy = isinstance(backbone, dg.ToyBackbone)
    T = cfg.sampling.num_steps
    per_prompt = {}
    with torch.no_grad():
        for prompt in backbone.eval_prompts:
            measures = {"diversity": lambda x: dg.diversity_score(backbone.features(x), backbone.feature_metric)}
            if toy:
                modes = dg.TOY_MODES[dg.TOY_PROMPTS.index(prompt)]
                measures["same_mode"] = functools.partial(same_mode_probability, modes=modes)
            per_prompt[prompt] = branching_curves(cfg, backbone, prompt, measures, generator)
    curve = np.mean([c["diversity"] for c in per_prompt.values()], axis=0)  # (T + 1,): diversity after s shared steps
    third = round(T / 3)
    fraction = float((curve[0] - curve[third]) / max(curve[0] - curve[T], 1e-12))
    print("\nDiversity when the first s SDE steps are shared (mean over prompts):")
    print("s  " + " ".join(f"{s:6d}" for s in range(T + 1)))
    print("D  " + " ".join(f"{d:6.3f}" for d in curve))
    summary = dict(
        curve=curve.tolist(),
        per_prompt={p: c["diversity"] for p, c in per_prompt.items()},
        first_third_steps=third,
        first_third_fraction=fraction,
    )
    same = None
    if toy:
        same = np.mean([c["same_mode"] for c in per_prompt.values()], axis=0)  # (T + 1,)
        share = (same - same[0]) / max(same[T] - same[0], 1e-12)  # 0 at s = 0, 1 once everything is shared
        k85 = int(np.argmax(share >= 0.85))  # share[T] == 1, so some s qualifies
        print("P  " + " ".join(f"{p:6.3f}" for p in same) + "   P(two branches land in the same mode)")
        print("F  " + " ".join(f"{f:6.3f}" for f in share) + "   share of the mode choice decided by s steps")
        summary.update(
            p_same_mode=same.tolist(),
            p_same_mode_per_prompt={p: c["same_mode"] for p, c in per_prompt.items()},
            mode_decided_share=share.tolist(),
            k_85=k85,
        )
    print(
        f"share of the whole diversity change in the first {third} of {T} steps: {fraction:.1%} (paper, SD3.5-M: 66.6%)"
    )
    if toy:
        print(f"85% of the mode choice is decided by the first K_85 = {k85} of {T} steps (diverse.K = {cfg.diverse.K})")
    for s in range(T + 1):
        log(
            dict(
                run="branching",
                seed=cfg.seed,
                shared_steps=s,
                diversity=float(curve[s]),
                **({} if same is None else dict(p_same_mode=float(same[s]))),
            )
        )
    plot_branching(os.path.join(cfg.output_dir, "branching.png"), per_prompt, third, summary.get("k_85"))
    return summary


# ---- Cost of the bonus ----


def time_bonus(features, diverse, eigen_solver, repeats=3):
    """Median wall time of the whole bonus (distances, affinity, clustering, bonus) for one group, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        creativity_bonus(dg.pairwise_distances(features), diverse, diverse.n_clusters, 0, eigen_solver)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bonus_cost(cfg, log):
    """Wall time of the whole bonus as the group grows, with the dense and the arpack eigengap."""
    a = cfg.analysis
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = []
    # The first call imports scikit-learn: make it outside the timings, or it would count against the smallest N.
    warm_up = dg.toy_data(torch.zeros(24, dtype=torch.long), cfg.toy.mode_std)
    creativity_bonus(dg.pairwise_distances(warm_up), cfg.diverse, cfg.diverse.n_clusters)
    for n in a.group_sizes:
        features = dg.toy_data(torch.zeros(n, dtype=torch.long), cfg.toy.mode_std, generator)  # the ring's 8 modes
        row = dict(group_size=n, **{s: time_bonus(features, cfg.diverse, s, a.repeats) for s in ("dense", "arpack")})
        rows.append(row)
        log(dict(run="bonus_cost", seed=cfg.seed, **row))
    # Growth exponent p of time ~ N^p between the two largest groups, where fixed overheads matter least.
    (small, large), ratio = rows[-2:], rows[-1]["group_size"] / rows[-2]["group_size"]
    slopes = {s: float(np.log(large[s] / small[s]) / np.log(ratio)) for s in ("dense", "arpack")}
    with tempfile.TemporaryDirectory() as scratch:  # a stop during the timing leaves no checkpoint in output_dir
        timing = with_changes(cfg, {"train.iterations": 5, "train.eval_every": 5, "output_dir": scratch})
        iteration = dg.train(timing, dg.build_backbone(timing), "diversegrpo", log=lambda r: None)[-1]["iter_seconds"]
    print("\nWall time of the creativity bonus for one group (distances, affinity, eigengap, clustering, bonus):")
    print("N       dense eigengap  arpack eigengap")
    for r in rows:
        print(f"{r['group_size']:<7} {r['dense']:12.3f} s  {r['arpack']:13.3f} s")
    print(
        f"growth from N={small['group_size']} to {large['group_size']}: ~N^{slopes['dense']:.2f} (dense), "
        f"N^{slopes['arpack']:.2f} (arpack); one toy training iteration "
        f"(G={cfg.sampling.group_size}, {cfg.sampling.prompts_per_iter} prompts): {iteration:.3f} s; "
        f"one SD3.5-M sampling step of 24 images (estimated): {a.sd3_step_seconds:.2f} s"
    )
    plot_bonus_cost(os.path.join(cfg.output_dir, "bonus_cost.png"), rows)
    return dict(
        table=rows,
        growth_exponent=slopes,
        toy_iteration_seconds=iteration,
        sd3_step_seconds_estimate=a.sd3_step_seconds,
    )


# ---- How the bonus finds modes: planted groups, under the median bandwidth and under local scaling ----

PLANTED = [[12, 8, 4], [16, 4, 4], [10, 10, 2, 2], [20, 4], [18, 6], [22, 1, 1], [14, 6, 3, 1]]  # G = 24, unbalanced


def planted_group(sizes, geometry, scale, generator, overlap=1.0):
    """Features of a group whose modes hold `sizes` samples, and each sample's mode: ((N, D), (N,)).

    cosine: 512-d embeddings whose mode centres are ~0.2 apart and samples ~0.03 apart in 1 - cos (DreamSim's scale:
    the paper's diversities are 0.13-0.19), times `scale`. ring / grid: the toy's modes (std 0.08), times `scale`.
    `overlap` < 1 pulls the mode centres towards each other.
    """
    modes = torch.cat([torch.full((n,), m) for m, n in enumerate(sizes)])
    if geometry == "cosine":
        a, b = 0.5 * scale**0.5, 0.18 * scale**0.5  # 1 - cos ~ a^2 between centres, ~ b^2 within a mode
        base = torch.nn.functional.normalize(torch.randn(512, generator=generator), dim=0)
        centres = base + overlap * a * torch.randn(len(sizes), 512, generator=generator) / 512**0.5
        return centres[modes] + b * torch.randn(len(modes), 512, generator=generator) / 512**0.5, modes
    all_modes = dg.TOY_MODES[0 if geometry == "ring" else 1]
    centres = all_modes[torch.randperm(len(all_modes), generator=generator)[: len(sizes)]] * overlap
    return (centres[modes] + dg.ToyConfig.mode_std * torch.randn(len(modes), 2, generator=generator)) * scale, modes


def rare_and_common(bonus, modes):
    """(the rarest mode's mean bonus over its ideal sqrt(G / n_rare), whether it beats the commonest mode's)."""
    sizes = torch.bincount(modes)
    rare, common = bonus[modes == sizes.argmin()].mean(), bonus[modes == sizes.argmax()].mean()
    return (rare / (len(modes) / sizes.min()) ** 0.5).item(), bool(rare > common)


def bonus_rules(cfg, log, draws=10):
    """How often the bonus rewards the rarest mode of a planted group: the old median bandwidth against the rule
    every preset now uses (local scaling), in DreamSim's cosine geometry and the toy's, each at two scales."""
    rules = {"median": lambda d: d[~torch.eye(len(d), dtype=torch.bool)].median().item(), "local scaling": None}
    rows = []
    for geometry, scale in [
        ("cosine", 1.0),
        ("cosine", 0.25),
        ("ring", 1.0),
        ("ring", 10.0),
        ("grid", 1.0),
        ("grid", 0.1),
    ]:
        metric = "cosine" if geometry == "cosine" else "euclidean"
        for rule, bandwidth in rules.items():
            generator, ratios, wins, k1 = torch.Generator().manual_seed(cfg.seed), [], [], []
            for sizes in PLANTED:
                for _ in range(draws):
                    features, modes = planted_group(sizes, geometry, scale, generator)
                    distances = dg.pairwise_distances(features, metric)
                    fixed = bandwidth(distances) if bandwidth else None
                    bonus, labels = dg.creativity_bonus(
                        distances, cfg.diverse.n_clusters, fixed, cfg.seed, cfg.diverse.max_clusters
                    )
                    ratio, win = rare_and_common(bonus, modes)
                    ratios, wins, k1 = ratios + [ratio], wins + [win], k1 + [labels.max().item() == 0]
            row = dict(run=rule, seed=cfg.seed, geometry=f"{geometry} x{scale:g}", rare_wins=float(np.mean(wins)),
                       rare_bonus_of_ideal=float(np.mean(ratios)), k1_share=float(np.mean(k1)))  # fmt: skip
            log(row)
            rows.append(row)
    print(
        f"\nPlanted groups of 24 ({len(PLANTED)} size patterns x {draws} draws): how often the rarest mode's mean bonus"
    )
    print(
        "beats the commonest's, its bonus over the ideal sqrt(24 / n_rare), and the share of groups left whole (k = 1)"
    )
    print(f"{'geometry':<14}{'rule':<15}{'rare wins':>10}{'of ideal':>10}{'k = 1':>8}")
    for r in rows:
        print(
            f"{r['geometry']:<14}{r['run']:<15}{r['rare_wins']:>10.0%}{r['rare_bonus_of_ideal']:>10.2f}{r['k1_share']:>8.0%}"
        )
    return dict(table=rows)


# ---- Figures ----


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training_curves(path, histories, groups):
    """Reward and diversity against iteration (the first seed), one row per group of runs: {row title: [labels]}."""
    plt = dg._pyplot()
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


def plot_branching(path, per_prompt, third, k85=None):
    """Diversity after sharing the first s SDE steps (first third shaded) and, on the toy, P(same mode) with K_85.

    per_prompt: {prompt: {"diversity": curve, "same_mode": curve (toy only)}}; black is the mean over prompts.
    """
    plt = dg._pyplot()
    panels = [("diversity", "diversity of the branches")]
    if k85 is not None:
        panels.append(("same_mode", "P(two branches land in the same mode)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels, strict=True):
        for prompt, curves in per_prompt.items():
            ax.plot(curves[key], alpha=0.4, label=prompt)
        ax.plot(np.mean([c[key] for c in per_prompt.values()], axis=0), color="black", marker="o", label="mean")
        ax.set(xlabel="shared SDE steps s", ylabel=ylabel)
    axes[0, 0].axvspan(0, third, color="grey", alpha=0.15)
    if k85 is not None:
        axes[0, 1].axvline(k85, color="C3", linestyle="--", label=f"K_85 = {k85}: 85% of the mode choice")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_bonus_cost(path, rows):
    """Wall time of the bonus against group size, log-log, for both eigengap solvers."""
    plt = dg._pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sizes = [r["group_size"] for r in rows]
    for solver in ("dense", "arpack"):
        ax.loglog(sizes, [r[solver] for r in rows], marker="o", label=f"{solver} eigengap")
    ax.set(xlabel="group size N", ylabel="seconds per group")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


# ---- main ----

ANALYSES = {
    "ablation": ablation,
    "sweep": sweep,
    "adaptive_k": compare_n_clusters,
    "branching": branching,
    "bonus_cost": bonus_cost,
    "bonus_rules": bonus_rules,
}


def run_analysis(cfg):
    """Run cfg.experiment; writes config.json, metrics.jsonl, summary.json and its figure to output_dir.

    The logging is diversegrpo's: a previous run's files give way only at the first record.
    """
    start, files = time.time(), {}
    summary = dict(experiment=cfg.experiment, **ANALYSES[cfg.experiment](cfg, dg.make_log(cfg, files)))
    return dg.finish(cfg, summary, start, files)


def main(argv=None):
    default = os.path.join(ROOT, "configs.yaml")
    parser = argparse.ArgumentParser(description="The paper's analyses of DiverseGRPO (see the module docstring).")
    parser.add_argument(
        "--config", default=default, help="YAML file of presets (default: configs.yaml beside diversegrpo.py)"
    )
    parser.add_argument("--preset", required=True, help=f"a preset whose experiment is one of {', '.join(ANALYSES)}")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a value, e.g. analysis.trunks=4"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.preset, args.set)
        lock = dg.claim_output_dir(cfg)  # an open file: the folder is ours until it is closed
    except dg.ConfigError as e:
        print(f"error: {dg.first_line(e)}", file=sys.stderr)
        sys.exit(2)
    if cfg.backbone == "toy" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the toy's tiny matmuls gain nothing from threads, and a busy machine costs 10x
    print(f"preset {args.preset}: {cfg.experiment} on the {cfg.backbone} backbone, writing to {cfg.output_dir}")
    with lock, dg.one_line_exit():  # the same errors and exit statuses as diversegrpo.py's
        return run_analysis(cfg)


if __name__ == "__main__":
    main()
