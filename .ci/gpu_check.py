r"""GPU check: DiverseGRPO iterations of SD3.5-Medium- and FLUX.1-dev-sized transformers at 512 px, random weights.

No download: each transformer and VAE is built from its model's published config with random bf16 weights; the
prompt embeddings are random tensors of the real shapes (SD3: 128 T5 + 77 CLIP = 205 tokens x 4096, pooled 2048, and
the negative prompt's; FLUX: T5 at 128 tokens x 4096, as the project encodes it, pooled 768); the reward and the
DreamSim embedder are cheap stand-ins (an image mean, an 8x8 pooling), so PickScore and DreamSim are not in these
numbers. One prompt, group 24, per iteration (the presets take 2 prompts: twice the work). Each model runs its
preset's sampler: SD3 10 SDE steps, K = 4, CFG 4.5 (each forward sees 2 x micro-batch images); FLUX 6 steps, K = 2,
guidance embedding 3.5. Method diversegrpo, LoRA r = 32 on both attention streams.

Settings: ckpt, nockpt, ckpt-compile, nockpt-compile (gradient checkpointing on or off; compile: model.compile=
inductor, a regional compile of each transformer block). It prints
  * one JSON line per (model, setting): seconds and peak GPU memory of each iteration, from dg.train()'s own records
    (iter_seconds, peak_gpu_gb); the LAST iteration is the figure (the first warms up and compiles).
    setting_seconds is the whole setting: build, compile, iterations, phases.
  * phase tables: in each model's first setting (--phases all: in each), after training, each phase of one
    iteration is timed alone over the whole group, between torch.cuda.synchronize() calls, with the functions
    train() calls: sampling rollouts (dg.rollout per sampling piece), reference forward (backbone.velocity with the
    LoRA off, steps i < K), training forward+backward (dg.policy_update without the reference), VAE decode
    (backbone.decode, float32 as in training), reward + bonus (the stand-ins and dg.group_bonus, on the CPU).
    TFLOP/s: the FLOPs of one representative call (one step, one sample; FLOPs are linear in the batch) counted by
    torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; run eagerly, without checkpointing's
    recompute: useful work), times the iteration's calls, over the phase's time; and its share of --peak-tflops
    (the chip's bf16 dense peak: 790 measured for a large bf16 matmul on the lent H200; its datasheet says 990).
  * a table of all settings at the end.

Default plan on one H200, about 6.5-7 minutes with startup (estimates: SD3.5-M-sized, group 24, micro-batch 8:
22 s/iter without checkpointing, 28 s with; FLUX-sized 38 s/iter with; compile ~30 s per setting; a build 10-15 s;
the phases about one more iteration):
    sd3  ckpt   + phases  ~100 s        sd3  nockpt        ~55 s
    sd3  ckpt-compile     ~100 s        flux ckpt + phases ~135 s
All four settings of both models would take ~12 minutes. The rest, each run under 8 minutes:
    python .ci/gpu_check.py --model sd3 --settings nockpt-compile                          # ~1.5 min
    python .ci/gpu_check.py --model flux --settings nockpt,ckpt-compile,nockpt-compile     # ~5.5 min
FLUX without checkpointing may not fit (24 GB of weights and ~75-90 GB of activations, estimated): that setting's
JSON line then says "error": "out of memory ...", and the run goes on.

On the lent GPU machine (the device tool): its image has torch, peft, scikit-learn, transformers, matplotlib, pyyaml
and tqdm, but neither diffusers nor omegaconf (dg.load_config needs it). Both are pure-Python wheels: carry them.
Here, once, in the repository root (git must ignore the folder: it then travels only when `carry` names it):
    mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 \
        omegaconf==2.4.0
then run with carry [".whl"], timeout_s 600, and the command
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail;
    PYTHONUNBUFFERED=1 python3 .ci/gpu_check.py 2>&1 | tee $OUT/gpu_check.log

    python .ci/gpu_check.py --tiny      # CPU smoke test of this script (the default plan with tiny models, float32,
                                        # 32 px, group 4, 2 steps, compile backend aot_eager): ~20 s on 2 cores
"""

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import diversegrpo as dg  # noqa: E402

# ---- Model configs: the published ones, and tiny ones (as the tests') for the CPU smoke test ----

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
VAE_16 = dict(  # SD3.5's and FLUX.1's VAEs share this shape; they differ in scaling and shift
    latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
)  # fmt: skip
TINY_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)  # fmt: skip
TINY_VAE = dict(
    latent_channels=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)  # fmt: skip

# text: (tokens, width) of the prompt embeddings; pooled: the pooled embedding's size. SD3's condition also holds
# the negative prompt's pair (CFG); FLUX's does not.
MODELS = {
    "sd3": dict(preset="sd3_pickscore", transformer=SD35_MEDIUM, tiny=TINY_SD3, text=(205, 4096), pooled=2048,
                vae=dict(scaling_factor=1.5305, shift_factor=0.0609), negative=True),
    "flux": dict(preset="flux_pickscore", transformer=FLUX_DEV, tiny=TINY_FLUX, text=(128, 4096), pooled=768,
                 vae=dict(scaling_factor=0.3611, shift_factor=0.1159), negative=False),
}  # fmt: skip
SETTINGS = {  # name: (gradient checkpointing, compile)
    "ckpt": (True, False),
    "nockpt": (False, False),
    "ckpt-compile": (True, True),
    "nockpt-compile": (False, True),
}
DEFAULT_SETTINGS = {"sd3": ["ckpt", "nockpt", "ckpt-compile"], "flux": ["ckpt"]}  # fits 8 minutes (docstring)
PHASES = ["sampling rollouts", "reference forward", "training fwd+bwd", "VAE decode (fp32)", "reward + bonus"]
STAND_INS = (
    "reward and DreamSim embedder are cheap stand-ins (image mean, 8x8 pooling): not timed as PickScore/DreamSim"
)


# ---- Building a run: config, random-weight backbone ----


def make_config(args, model, checkpointing, compiled, output_dir):
    """The model's preset at group G, one prompt, a cheap evaluation and no checkpoint files."""
    sample_mb = args.sample_micro_batch or args.micro_batch or args.group_size
    overrides = [
        f"device={'cpu' if args.tiny else 'cuda'}", f"dtype={'float32' if args.tiny else 'bfloat16'}",
        f"output_dir={output_dir}", f"model.resolution={32 if args.tiny else 512}",
        f"model.gradient_checkpointing={str(checkpointing).lower()}",
        f"sampling.group_size={args.group_size}", "sampling.prompts_per_iter=1",
        f"sampling.micro_batch={args.sample_micro_batch}", f"train.micro_batch={args.micro_batch}",
        # train() evaluates before the first iteration and after each (its records come with evaluations). Eval
        # samples = one sampling piece, so a compiled model meets no new shape there; 2 ODE steps keep it short.
        f"sampling.eval_samples={min(sample_mb, args.group_size)}", "sampling.eval_num_steps=2",
        f"train.iterations={args.iterations}", "train.eval_every=1", "train.save_every=0", "diverse.n_clusters=2",
    ]  # fmt: skip
    if compiled:  # the default, "", is eager (an empty override would read as None)
        overrides.append(f"model.compile={args.compile_backend}")
    if args.tiny:  # 2 steps leave one trained step: K may be 1 at most
        overrides += ["sampling.num_steps=2", "diverse.K=1"]
    return dg.load_config(
        os.path.join(os.path.dirname(dg.__file__), "configs.yaml"), MODELS[model]["preset"], overrides
    )


def stand_in_reward(images, prompts):
    return images.mean(dim=(1, 2, 3))


def stand_in_embed(images):
    return torch.nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)


def make_backbone(cfg, model, tiny):
    """A DiffusersBackbone around a random-weight transformer and VAE, with random prompt embeddings."""
    import diffusers
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    diffusers.utils.logging.set_verbosity_error()  # not its warning on casting a model with to(): no weights to keep

    spec = MODELS[model]
    transformer_class = FluxTransformer2DModel if model == "flux" else SD3Transformer2DModel
    torch.manual_seed(0)
    with torch.device(cfg.device):  # random init directly on the GPU: seconds instead of minutes on the CPU
        transformer = transformer_class(**(spec["tiny"] if tiny else spec["transformer"]))
        vae = AutoencoderKL(**(TINY_VAE if tiny else VAE_16), **spec["vae"])
    dtype = getattr(torch, cfg.dtype)
    transformer = transformer.to(dtype)  # the float32 copy (48 GB for FLUX) is freed here
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    text, pooled = ((7, 32), 32) if tiny else (spec["text"], spec["pooled"])
    shapes = [text, (pooled,)] * (2 if spec["negative"] else 1)
    g = torch.Generator().manual_seed(0)
    embeddings = {
        p: tuple(torch.randn(s, generator=g).to(dtype) for s in shapes)
        for p in cfg.model.prompts + cfg.model.eval_prompts
    }
    return dg.DiffusersBackbone(
        cfg, transformer, vae, embeddings, stand_in_reward, stand_in_embed, cfg.model.prompts, cfg.model.eval_prompts
    )


# ---- Phases: each timed over a whole iteration's work, FLOPs counted on one representative call ----


def synchronize(backbone):
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()


def timed(backbone, fn):
    """(fn(), its seconds), with the GPU's queue drained before and after."""
    synchronize(backbone)
    start = time.perf_counter()
    out = fn()
    synchronize(backbone)
    return out, time.perf_counter() - start


def count_flops(backbone, fn):
    """The FLOPs of fn(), run eagerly (FlopCounterMode sees no inside of a compiled graph) and without gradient
    checkpointing, whose backward recomputes the forward: the count is the useful work."""
    model, checkpointing = backbone.model, backbone.cfg.model.gradient_checkpointing
    if checkpointing:
        model.disable_gradient_checkpointing()
    try:
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        if checkpointing:
            model.enable_gradient_checkpointing()
    return counter.get_total_flops()


def measure_phases(cfg, backbone):
    """{phase: (seconds, FLOPs or None)} for one iteration's worth of each phase, as train() runs them."""
    P, G, T, K = cfg.sampling.prompts_per_iter, cfg.sampling.group_size, cfg.sampling.num_steps, cfg.diverse.K
    B, level = P * G, cfg.sampling.noise_level
    train_chunks = torch.arange(B).split(cfg.train.micro_batch or B)
    sample_chunks = torch.arange(B).split(dg.sampling_micro_batch(cfg) or B)
    prompts = [backbone.prompts[p] for p in range(P) for _ in range(G)]
    cond, sigmas, generator = backbone.encode(prompts), backbone.sigmas(T), torch.Generator().manual_seed(cfg.seed)
    noise = backbone.noise(B, generator)
    phases = {}

    @torch.no_grad()
    def rollouts(chunks):  # sample_batch() without its decode, which is timed on its own
        parts = [dg.rollout(backbone, dg._select(cond, c), noise[c], sigmas, level, generator) for c in chunks]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def velocity(steps, chunks, reference=False):  # reference: the LoRA off, as policy_update()'s W2 term runs it
        with dg.adapters_disabled(backbone.model) if reference else contextlib.nullcontext():
            for i in steps:
                for c in chunks:
                    backbone.velocity(latents[c, i], sigmas[i], dg._select(cond, c))

    (latents, old_log_probs), seconds = timed(backbone, lambda: rollouts(sample_chunks))
    # FLOPs are linear in the batch: each call is counted for one sample (cheap, and without checkpointing a whole
    # piece's training graph could outgrow the GPU), times the samples and steps of an iteration.
    one = torch.arange(1)
    phases["sampling rollouts"] = (seconds, count_flops(backbone, lambda: velocity([0], [one])) * T * B)

    seconds = timed(backbone, lambda: velocity(range(K), train_chunks, reference=True))[1]
    flops = count_flops(backbone, lambda: velocity([0], [one], reference=True)) * K * B
    phases["reference forward"] = (seconds, flops)

    adv = torch.randn(B, generator=generator).to(backbone.device)
    no_reference = dg.METHODS["grpo"]  # policy_update() without the reference forward, which is timed above

    def update(steps_sigmas, chunks):
        dg.policy_update(cfg, backbone, no_reference, cond, latents, old_log_probs, adv, steps_sigmas, chunks)

    seconds = timed(backbone, lambda: update(sigmas, train_chunks))[1]
    one_step = count_flops(backbone, lambda: update(sigmas[:3], [one]))  # sigmas[:3]: step 0 alone is trained
    phases["training fwd+bwd"] = (seconds, one_step * (T - 1) * B)
    backbone.model.zero_grad(set_to_none=True)

    def decode(chunks):
        return torch.cat([backbone.decode(latents[c, -1]) for c in chunks])

    samples, seconds = timed(backbone, lambda: decode(sample_chunks))
    phases["VAE decode (fp32)"] = (seconds, count_flops(backbone, lambda: decode([one])) * B)

    def reward_and_bonus():
        backbone.reward(samples, prompts)
        dg.group_bonus(backbone.features(samples), P, G, cfg.diverse, backbone.feature_metric, cfg.seed)

    phases["reward + bonus"] = (timed(backbone, reward_and_bonus)[1], None)  # stand-ins; the bonus runs on the CPU
    return phases


def phase_record(seconds, flops, peak_tflops):
    record = dict(seconds=round(seconds, 3))
    if flops is not None:
        tflops = flops / 1e12 / max(seconds, 1e-9)
        record.update(tflop=flops / 1e12, tflops_per_s=tflops, peak_share=tflops / peak_tflops)
        record = {key: float(f"{value:.4g}") for key, value in record.items()}  # 4 digits are what a timing holds
    return record


# ---- One setting: build, train with dg.train(), optionally measure the phases ----


def run_setting(args, model, setting, with_phases):
    checkpointing, compiled = SETTINGS[setting]
    result = dict(model=model, setting=setting, gradient_checkpointing=checkpointing,
                  compile=args.compile_backend if compiled else "", group_size=args.group_size,
                  micro_batch=args.micro_batch, sample_micro_batch=args.sample_micro_batch)  # fmt: skip
    torch._dynamo.reset()  # each compiled setting compiles afresh, and no earlier graph counts to its recompile limit
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as output_dir:
        cfg = make_config(args, model, checkpointing, compiled, output_dir)
        backbone = make_backbone(cfg, model, args.tiny)
        if not args.tiny:  # train() reports the peak since the last reset: not the float32 copy of the build
            torch.cuda.reset_peak_memory_stats()
        params = sum(p.numel() for p in backbone.model.parameters())  # before train() adds the LoRA
        result.update(resolution=cfg.model.resolution, num_steps=cfg.sampling.num_steps, K=cfg.diverse.K,
                      transformer_params_billion=round(params / 1e9, 4))  # fmt: skip
        iterations = dg.train(cfg, backbone, "diversegrpo", log=lambda record: None)[1:]  # [0]: the fresh LoRA's eval
        result.update(
            seconds_per_iter=round(iterations[-1]["iter_seconds"], 2),
            peak_gpu_gb=None if args.tiny else round(iterations[-1]["peak_gpu_gb"], 2),
            iter_seconds=[round(r["iter_seconds"], 2) for r in iterations],
            iter_peak_gpu_gb=None if args.tiny else [round(r["peak_gpu_gb"], 2) for r in iterations],
            loss=iterations[-1]["loss"],
            ratio=iterations[-1]["ratio"],
        )
        if with_phases:
            try:  # the iterations' figures stand even if the phases do not fit
                phases = measure_phases(cfg, backbone)
                result["phases"] = {name: phase_record(s, f, args.peak_tflops) for name, (s, f) in phases.items()}
            except torch.OutOfMemoryError as e:
                result["phases_error"] = f"out of memory: {e}"[:300]
    result["setting_seconds"] = round(time.perf_counter() - start, 1)
    result["device"] = "cpu (tiny)" if args.tiny else torch.cuda.get_device_name()
    result["note"] = STAND_INS
    return result


def free_memory(tiny):
    gc.collect()  # the backbone of the finished setting, and an out-of-memory error's frames
    if not tiny:
        torch.cuda.empty_cache()


# ---- Output ----


def print_phase_table(result, peak_tflops):
    phases = result["phases"]
    total = sum(p["seconds"] for p in phases.values())
    print(f"\nphases of one iteration: {result['model']} {result['setting']} (group {result['group_size']}, "
          f"{result['resolution']} px, {result['num_steps']} steps, K = {result['K']})")  # fmt: skip
    print(f"{'phase':<20} {'seconds':>8} {'TFLOP':>9} {'TFLOP/s':>9} {f'% of {peak_tflops:g}':>9}")
    for name in PHASES:
        p = phases[name]
        if "tflop" in p:
            print(f"{name:<20} {p['seconds']:>8.2f} {p['tflop']:>9.4g} {p['tflops_per_s']:>9.4g} "
                  f"{100 * p['peak_share']:>9.3g}")  # fmt: skip
        else:
            print(f"{name:<20} {p['seconds']:>8.2f} {'-':>9} {'-':>9} {'-':>9}   (stand-ins; bonus on the CPU)")
    print(f"{'sum of phases':<20} {total:>8.2f}   (TFLOP: counted for one sample and step, times the iteration's;")
    print(f"{'':<20} {'':>8}    checkpointing's recompute not counted, so it shows as lower TFLOP/s)")
    print(f"{'iteration (train)':<20} {result['seconds_per_iter']:>8.2f}   (also: prompt lookup, optimizer step)")


def print_summary(results, iterations):
    print(f"\nsettings (iteration {iterations} of each; {STAND_INS})")
    print(f"{'model':<6} {'setting':<16} {'s/iter':>7} {'peak GB':>8} {'setting s':>10}  note")
    for r in results:
        if "error" in r:
            print(f"{r['model']:<6} {r['setting']:<16} {'-':>7} {'-':>8} {'-':>10}  {r['error'][:60]}")
            continue
        peak = f"{r['peak_gpu_gb']:.1f}" if r["peak_gpu_gb"] is not None else "-"
        first = f"first iteration {r['iter_seconds'][0]:.1f} s" if len(r["iter_seconds"]) > 1 else ""
        print(f"{r['model']:<6} {r['setting']:<16} {r['seconds_per_iter']:>7.2f} {peak:>8} "
              f"{r['setting_seconds']:>10.0f}  {first}".rstrip())  # fmt: skip


# ---- Main ----


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["sd3", "flux", "both"], default="both")
    parser.add_argument("--settings", default="",
                        help=f"comma-separated subset of {', '.join(SETTINGS)}, or all, for each model "
                             f"(default: {DEFAULT_SETTINGS})")  # fmt: skip
    parser.add_argument("--group-size", type=int, default=None, help="G (default 24; --tiny 4)")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="training piece; 0 = the group (default 8; --tiny 2)"
    )
    parser.add_argument("--sample-micro-batch", type=int, default=0, help="sampling/decoding piece; 0 = --micro-batch")
    parser.add_argument("--iterations", type=int, default=2, help="the last one is reported")
    parser.add_argument("--phases", choices=["first", "all", "none"], default="first",
                        help="measure the phases in each model's first setting, in every setting, or not")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the chip's bf16 dense peak (H200: 790)")
    parser.add_argument(
        "--compile-backend", default=None, help="for the -compile settings (inductor; --tiny aot_eager)"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, float32, 32 px, 2 steps")
    args = parser.parse_args(argv)
    if args.group_size is None:
        args.group_size = 4 if args.tiny else 24
    if args.micro_batch is None:
        args.micro_batch = 2 if args.tiny else 8
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    names = list(SETTINGS) if args.settings == "all" else [s for s in args.settings.split(",") if s]
    if unknown := [s for s in names if s not in SETTINGS]:
        parser.error(f"unknown setting(s) {unknown}: choose from {', '.join(SETTINGS)}, or all")
    models = ["sd3", "flux"] if args.model == "both" else [args.model]
    args.plan = [(m, s) for m in models for s in (names or DEFAULT_SETTINGS[m])]
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU; run with --tiny for the CPU smoke test")
    results, failed, measured = [], False, set()
    print(f"# plan: {', '.join(f'{m} {s}' for m, s in args.plan)}; iterations: {args.iterations} each", flush=True)
    for model, setting in args.plan:
        with_phases = args.phases == "all" or (args.phases == "first" and model not in measured)
        try:
            result = run_setting(args, model, setting, with_phases)
            if "phases" in result:
                measured.add(model)
        except torch.OutOfMemoryError as e:  # a result, not a failure: this setting does not fit
            result = dict(model=model, setting=setting, error=f"out of memory: {e}"[:300])
        except Exception as e:  # report, go on with the other settings, and exit non-zero at the end
            traceback.print_exc()
            result, failed = dict(model=model, setting=setting, error=f"{type(e).__name__}: {e}"[:300]), True
        free_memory(args.tiny)
        results.append(result)
        print(json.dumps(result), flush=True)
    for result in results:
        if "phases" in result:
            print_phase_table(result, args.peak_tflops)
    print_summary(results, args.iterations)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
