#!/usr/bin/env python3
"""torch_bench.py: the PyTorch side of `make bench-full`: one forward of the full-size Z-Image DiT
(diffusers' ZImageTransformer2DModel) at 256² and 512², cfg 1, a 32-token caption, on the CPU, in
float32 and in bfloat16. Optional; not part of `make test`. Needs torch and diffusers.

    python3 bench/torch_bench.py                       # random weights, nothing downloaded
    python3 bench/torch_bench.py --model ~/.cache/zimage-bench/model   # bench/make_model.c's model
    python3 bench/torch_bench.py --threads 16 --sizes 256,512 --dtypes fp32,bf16
    python3 bench/torch_bench.py --threads 16 --gemm   # only the Linear shapes of `make bench`
    python3 bench/torch_bench.py --threads 16 --te     # the text encoder instead (bench_full's `te`)

Random weights are drawn as bench/make_model.c draws them (Linear weights uniform with variance
1/fan_in, norm weights 1, biases 0): the timing does not depend on the values, only on the shapes.
With --model the transformer of that directory is loaded instead (its bf16 weights, widened to
float32 for the fp32 run). The first forward of each dtype is a warm-up (oneDNN builds its kernels);
the next one per size is timed.

--gemm times torch's own matrix products instead (MKL for fp32, oneDNN for bf16), the Linear
layers of `make bench`'s "gemm bf16" and "gemm fast" lines, y = x·Wᵀ with M = 288, 1056, 4128 rows:
what the vendor libraries reach on the same machine. It needs torch only.

--te times the text encoder instead, as bench_full's `te` stage runs it: transformers' Qwen3Model
with Qwen3-4B's config cut to the 35 layers Z-Image uses (hidden_states[-2]), a 32-token prompt,
random weights (or --model's text_encoder), the second call. It needs torch and transformers.
"""
import argparse
import math
import resource
import time

import torch

CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
              n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
              rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
CAPTION_TOKENS = 32


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fill_random(m):
    """m's parameters as bench/make_model.c draws them; returns m."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2:
                a = math.sqrt(3.0 / p[0].numel())
                p.uniform_(-a, a)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return m


def random_model(dtype):
    from diffusers import ZImageTransformer2DModel
    with torch.device("meta"):
        m = ZImageTransformer2DModel(**CONFIG)
    m = fill_random(m.to_empty(device="cpu").to(dtype))
    with torch.no_grad():
        for name, b in m.named_buffers():
            if b.is_floating_point():
                b.zero_()
    return m.eval()


def load_model(path, dtype):
    from diffusers import ZImageTransformer2DModel
    return ZImageTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype).eval()


def flops(px, dim=3840, layers=30, refiners=2, ffn=10240, cap=2560):
    """Analytic FLOPs of one forward (matrix products), as bench/bench_full.c counts them."""
    ni = (px // 16) ** 2
    sx, sc = math.ceil(ni / 32) * 32, math.ceil(CAPTION_TOKENS / 32) * 32
    su = sx + sc
    row = 2 * (4 * dim * dim + 3 * dim * ffn)
    blocks = refiners * (sx * row + sx * sx * 4 * dim) + refiners * (sc * row + sc * sc * 4 * dim) \
        + layers * (su * row + su * su * 4 * dim)
    return blocks + 2 * sx * 64 * dim + 2 * sc * cap * dim + 2 * ni * dim * 64


def forward(m, px, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, px // 8, px // 8, generator=g).to(dtype)
    cap = torch.randn(CAPTION_TOKENS, CONFIG["cap_feat_dim"], generator=g).to(dtype)
    t = torch.tensor([0.5], dtype=dtype)
    t0 = time.perf_counter()
    out = m([x], t, [cap], return_dict=False)[0][0]
    dt = time.perf_counter() - t0
    assert torch.isfinite(out.float()).all(), "output not finite"
    return dt


QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=35,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True)


def bench_te(model, dtypes):
    from transformers import Qwen3Config, Qwen3Model
    for name in dtypes:
        dtype = DTYPES[name]
        if model:
            m = Qwen3Model.from_pretrained(f"{model}/text_encoder", torch_dtype=dtype)
            m.layers = m.layers[:QWEN3_4B["num_hidden_layers"]]
        else:
            with torch.device("meta"):
                m = Qwen3Model(Qwen3Config(**QWEN3_4B))
            m = fill_random(m.to_empty(device="cpu").to(dtype))
            m.rotary_emb = type(m.rotary_emb)(config=m.config)   # its inverse frequencies, not left empty
        m.eval()
        ids = torch.arange(1000, 1000 + CAPTION_TOKENS).unsqueeze(0)
        with torch.inference_mode():
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                out = m(input_ids=ids).last_hidden_state
                times.append(time.perf_counter() - t0)
        assert torch.isfinite(out.float()).all(), "output not finite"
        layer_bytes = sum(p.numel() * p.element_size() for p in m.layers.parameters())
        print(f"{name} te: {times[1]:.3f} s (first call {times[0]:.3f} s); its {len(m.layers)} layers hold "
              f"{layer_bytes / 1e9:.2f} GB", flush=True)
        del m


def bench_gemm(dtypes):
    """The best of five calls of F.linear after two warm-ups, per shape (M x N x K as `make bench` names them)."""
    for name in dtypes:
        dtype = DTYPES[name]
        for M in (288, 1056, 4128):
            for K, N in ((3840, 3840), (3840, 10240), (10240, 3840)):
                x = torch.rand(M, K).sub_(0.5).to(dtype)
                w = torch.rand(N, K).sub_(0.5).mul_(2 * math.sqrt(3.0 / K)).to(dtype)
                with torch.inference_mode():
                    for _ in range(2):
                        torch.nn.functional.linear(x, w)
                    best = math.inf
                    for _ in range(5):
                        t0 = time.perf_counter()
                        torch.nn.functional.linear(x, w)
                        best = min(best, time.perf_counter() - t0)
                print(f"torch {name} {M}x{N}x{K}: {best * 1e3:8.1f} ms {2 * M * N * K / best * 1e-9:8.1f} GFLOP/s",
                      flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (bench/make_model.c layout); default: random weights")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--gemm", action="store_true", help="time torch's matrix products at make bench's shapes instead")
    ap.add_argument("--te", action="store_true", help="time the text encoder (Qwen3-4B, 35 layers) instead")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"oneDNN bf16 (AMX/AVX512-BF16) usable: {torch.backends.mkldnn.is_available()}", flush=True)
    if a.gemm:
        bench_gemm(a.dtypes.split(","))
        return
    if a.te:
        bench_te(a.model, a.dtypes.split(","))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    for name in a.dtypes.split(","):
        dtype = DTYPES[name]
        t0 = time.perf_counter()
        m = load_model(a.model, dtype) if a.model else random_model(dtype)
        print(f"{name}: model ready in {time.perf_counter() - t0:.1f} s", flush=True)
        with torch.inference_mode():
            warm = forward(m, sizes[0], dtype)
            print(f"{name}: warm-up {sizes[0]}² {warm:.2f} s", flush=True)
            for px in sizes:
                dt = forward(m, px, dtype)
                f = flops(px)
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
                print(f"{name} dit{px}: {dt:.2f} s, {f / dt * 1e-9:.0f} GFLOP/s ({f * 1e-9:.0f} GFLOP), "
                      f"peak RSS so far {rss:.1f} GB", flush=True)
        del m


if __name__ == "__main__":
    main()
