"""GPU check: one DiverseGRPO iteration of an SD3.5-Medium-sized transformer at 512 px, with random weights.

No download: the transformer and the VAE are built from SD3.5-M's published configs with random weights, prompt
embeddings are random tensors of the real shapes, and the reward and embedder are cheap stand-ins. What it measures
is the transformer's share: seconds per iteration and peak GPU memory, with and without gradient checkpointing.

    python .ci/gpu_check.py                 # on a GPU machine; prints one JSON line per setting
    python .ci/gpu_check.py --tiny          # a CPU smoke test of this script with a tiny model
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import diversegrpo as dg  # noqa: E402

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
SD35_VAE = dict(
    latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
TINY = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
)  # fmt: skip
TINY_VAE = dict(
    latent_channels=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    scaling_factor=1.5305, shift_factor=0.0609,
)  # fmt: skip


def one_setting(tiny, checkpointing, group_size, micro_batch, iterations):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    device = "cpu" if tiny else "cuda"
    overrides = [
        f"device={device}", f"dtype={'float32' if tiny else 'bfloat16'}", "output_dir=/tmp/gpu_check",
        f"model.resolution={32 if tiny else 512}", f"model.gradient_checkpointing={str(checkpointing).lower()}",
        f"sampling.group_size={group_size}", "sampling.prompts_per_iter=1", "sampling.eval_samples=2",
        "sampling.eval_num_steps=2", f"train.iterations={iterations}", "train.eval_every=1",
        f"train.micro_batch={micro_batch}", "diverse.n_clusters=2",
    ]  # fmt: skip
    cfg = dg.load_config(os.path.join(os.path.dirname(dg.__file__), "configs.yaml"), "sd3_pickscore", overrides)
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the GPU: seconds instead of minutes on the CPU
        transformer = SD3Transformer2DModel(**(TINY if tiny else SD35_MEDIUM))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD35_VAE))
    dtype = getattr(torch, cfg.dtype)
    transformer, vae = transformer.to(dtype), vae.to(dtype)
    text, pooled = ((7, 32), (32,)) if tiny else ((333, 4096), (2048,))  # CLIP-L+G and T5 tokens, pooled CLIP
    g = torch.Generator().manual_seed(0)
    prompts = cfg.model.prompts + cfg.model.eval_prompts
    embeddings = {
        p: tuple(torch.randn(s, generator=g).to(dtype) for s in (text, pooled, text, pooled)) for p in prompts
    }

    def reward(images, prompts):
        return images.mean(dim=(1, 2, 3))

    def embed(images):
        return torch.nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)

    backbone = dg.DiffusersBackbone(
        cfg, transformer, vae, embeddings, reward, embed, cfg.model.prompts, cfg.model.eval_prompts
    )
    history = dg.train(cfg, backbone, "diversegrpo", log=lambda record: None)
    result = dict(
        transformer_params_billion=sum(p.numel() for p in transformer.parameters()) / 1e9,
        gradient_checkpointing=checkpointing,
        group_size=group_size,
        micro_batch=micro_batch,
        iter_seconds=[round(r["iter_seconds"], 2) for r in history[1:]],
        peak_gpu_gb=[round(r.get("peak_gpu_gb", 0.0), 2) for r in history[1:]],
        loss=history[-1]["loss"],
        ratio=history[-1]["ratio"],
    )
    if not tiny:
        result["device"] = torch.cuda.get_device_name()
    print(json.dumps(result), flush=True)
    del backbone, transformer, vae
    if not tiny:
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args()
    for checkpointing in (True, False):
        start = time.time()
        try:
            one_setting(args.tiny, checkpointing, args.group_size, args.micro_batch, args.iterations)
        except torch.OutOfMemoryError as e:
            print(json.dumps(dict(gradient_checkpointing=checkpointing, error=f"out of memory: {e}"[:300])), flush=True)
            torch.cuda.empty_cache()
        print(f"# setting took {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
