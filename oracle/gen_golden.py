# Golden-data generator for the Z-Image C implementation.
#
# Builds small random Z-Image models (same architecture, real checkpoint layout) and records
# what the PyTorch reference computes: diffusers (DiT, VAE, scheduler, pipeline) and
# transformers (Qwen3 text encoder, Qwen2 tokenizer), all in float32 on the CPU with
# bf16-valued weights, exactly as a real bf16 checkpoint would be upcast.
#
# Needs: torch, transformers, safetensors, and diffusers (source tree on PYTHONPATH is enough),
# plus the Qwen3 tokenizer files (tokenizer.json, tokenizer_config.json) in $DEPS.
# usage: DEPS=dir python3 gen_golden.py OUTDIR
#        ONLY=sampler python3 gen_golden.py OUTDIR   (just the sampler-*.safetensors files: no models, no DEPS)
#        ONLY=distill GOLDEN=test/golden python3 gen_golden.py OUTDIR   (just distill-0.safetensors, from GOLDEN's tiny model)
#        ONLY=img2img GOLDEN=test/golden python3 gen_golden.py OUTDIR   (just pipe-img2img.safetensors, likewise)
#        SHAPES=alt ...: the same from a model of other shapes (see ALT below)
#
# File naming follows the evaluation convention of the C tools: every golden file holds the
# inputs of one component and its expected outputs, under these tensor names:
#   te-N:    te.ids (int64 [L])                       -> te.embeds [L, D]   (+ te.hidden.K, debugging)
#   dit-N:   dit.x [16,1,h,w], dit.t [1], dit.cap [L,D] -> dit.out [16,1,h,w] (+ dit.block.NAME, debugging)
#   vae-dec: vae.z [1,16,h,w]                         -> vae.img [1,3,8h,8w]
#   vae-enc: vae.img_in [1,3,H,W]                     -> vae.mean, vae.logvar [1,16,H/8,W/8]
#   train-N: train.x0, train.noise [16,1,h,w], train.sigma [1], train.cap [L,D]
#                                                     -> train.loss [1], grad.<module>.lora_A / lora_B
#   pipe-N:  metadata "args" (JSON: prompt, negative, seed, steps, cfg, width, height, cfg_norm,
#            cfg_trunc, rng, loras) and tensors ids, prompt_embeds, negative_embeds (when cfg > 1),
#            latents.init, latents.step{i} (after step i), image [3,H,W] in [0,1] (before 8-bit rounding)
#   pipe-img2img: diffusers' ZImageImg2ImgPipeline on GOLDEN's tiny model, as pipe-N plus "init_image" (a file in
#            test/golden, opened with PIL's convert("RGB")) and "strength" in the args; image_latents [1,16,h,w]
#            ((posterior sample - shift) * scale) and latents.init (the noised start); latents.step{i} counts the
#            steps actually run (from 0). Its prompt_embeds / negative_embeds are pipe-2's, handed to the pipeline
#            (see img2img_golden: transformers 5.17's Qwen3 differs from te-N's by 1e-3 on the tiny encoder).
#   tokenizer-cases.json: [{text, ids (no template), chat (templated text), chat_ids}]
#   scheduler.json: [{steps, shift, sigmas, timesteps}] from FlowMatchEulerDiscreteScheduler with the pipeline's sigmas
#   rng.safetensors: DEV.SEED.SHAPE = torch.randn(SHAPE, generator=torch.Generator(DEV).manual_seed(SEED))
#   sampler-NAME.safetensors (NAME = euler, heun, dpmpp_2m): a diffusers scheduler integrating the synthetic
#            velocity field v(x, t) = (field.a * x + t * field.c) + field.d (float32, elementwise; t = the DiT time
#            input (1000 - timestep) / 1000) from x.init, for the (steps, shift) pairs of the metadata "cases":
#            case{k}.sigmas [steps+1] (the Z-Image schedule), case{k}.t [evals] (t of every model evaluation),
#            case{k}.step{i} (x after scheduler.step i, i from 0, as the pipeline's callback_on_step_end sees it)
#   distill-0: scheme 3 (DiffSynth's TrajectoryImitationLoss, float32) on tiny-zimage with lora-a-diffsynth as
#            teacher and (initial) student LoRA: inputs distill.xT [16,1,h,w] (x_T), distill.cap [L,D],
#            distill.neg [Ln,D] (the teacher's negative prompt); schedules distill.teacher_sigmas [51],
#            distill.teacher_timesteps [50] (student timesteps written in), distill.student_sigmas [9],
#            distill.student_timesteps [8], distill.weights [8], distill.idx [9] (teacher index of each student
#            step, 50 = the final latent); per student step i: distill.x.{i} (teacher latent), distill.target.{i}
#            (chord slope), distill.v.{i} (student velocity), distill.term.{i} (weighted MSE); distill.final,
#            distill.loss [1] (L1, the sum of the terms), grad.<module>.lora_A / lora_B (d L1 / d LoRA).
#            ONLY=distill GOLDEN=dir python3 gen_golden.py OUTDIR reads dir/tiny-zimage and writes just this file.
#   lora-*.safetensors: the same kind of LoRA in several key formats; dit-lora1/2 and pipe-lora name the files
#   and strengths they used in their "loras" metadata ("file:strength"); scale = alpha/rank (1 without alpha)
#   x strength
# "cfg" in the args is the classic scale (1 = off, as in DiffSynth, ComfyUI and sd.cpp);
# diffusers' guidance_scale g corresponds to cfg = g + 1.
import json, math, os, sys, shutil
import torch
from safetensors.torch import save_file

OUT = sys.argv[1]
DEPS = os.environ.get("DEPS", ".deps")
torch.set_grad_enabled(False)
torch.backends.cuda.matmul.allow_tf32 = False
os.makedirs(OUT, exist_ok=True)

from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, DPMSolverMultistepScheduler

ONLY = os.environ.get("ONLY")   # ONLY=sampler / distill / img2img: only that section
# SHAPES=alt: the same files from a model of other widths, head counts and depths (and another seed
# and prompts): copied over test/golden, `make test` must still pass, so nothing is sized by hand
ALT = os.environ.get("SHAPES") == "alt"
BASE_SEED = 4321 if ALT else 1234

def f32(d):
    return {k: (v.detach().to(torch.float32).contiguous() if v.is_floating_point() else v.detach().contiguous())
            for k, v in d.items()}

def save(name, tensors, **meta):
    save_file(f32(tensors), os.path.join(OUT, name), metadata={k: (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)) for k, v in meta.items()})

# ---------------------------------------------------------------- LoRA as run-time adapters
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
class LoRALinear(torch.nn.Module):
    """y = W x + b + sum_i s_i * B_i (A_i x)"""
    def __init__(self, base):
        super().__init__()
        self.base, self.A, self.B, self.s = base, torch.nn.ParameterList(), torch.nn.ParameterList(), []
    def add(self, A, B, s):
        self.A.append(torch.nn.Parameter(A)); self.B.append(torch.nn.Parameter(B)); self.s.append(s)
    def forward(self, x):
        y = self.base(x)
        for A, B, s in zip(self.A, self.B, self.s):
            y = y + s * torch.nn.functional.linear(torch.nn.functional.linear(x, A), B)
        return y

def wrap_lora(model):
    """Replaces every targeted Linear of model by a LoRALinear; returns them by module name."""
    wrapped = {}
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, torch.nn.Linear) and any(full.endswith("." + t) for t in TARGETS):
                w = LoRALinear(child); setattr(mod, cname, w); wrapped[full] = w
    return wrapped

# ---------------------------------------------------------------- scheme 3: trajectory-imitation distillation
# DiffSynth-Studio's TrajectoryImitationLoss (diffsynth/diffusion/loss.py, fed7b18f) with its scheduler
# (flow_match.py: set_timesteps_z_image, set_training_weight, training_weight, step) and
# cfg_guided_model_fn (base_pipeline.py), reproduced operation by operation with diffusers'
# ZImageTransformer2DModel as the DiT: the tiny model of GOLDEN/tiny-zimage, float32, the SFT LoRA
# lora-a-diffsynth as run-time adapters for both the teacher and the student (the student starts from it).
# DiffSynth with torch_dtype=float32: no bf16 rounding of the timesteps (training.md §6.4 describes what bf16
# would change). The DiT's time input is (1000 - T)/1000 (diffusers' convention; DiffSynth's own DiT takes
# 1000 - T). The LPIPS term has no gradient path to the LoRA (training.md §10.4) and is not computed.
# GOLDEN: the folder holding tiny-zimage and lora-a-diffsynth.safetensors (default OUT).
def ds_grid(n, shift=3, target=None):
    sigmas = torch.linspace(1.0, 0.0, n + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    if target is not None:      # the student timesteps written into the nearest teacher timesteps
        for tau in target:
            timesteps[torch.argmin((timesteps - tau).abs())] = tau
    return sigmas, timesteps

def ds_training_weight(sigmas, n):
    x = sigmas * 1000
    y = torch.exp(-2 * ((x - 1000 / 2) / 1000) ** 2)
    y = y - y.min()
    w = y * (1000 / y.sum())
    if n != 1000:
        w = w * (n / 1000)
        w = w + w[1]
    return w

def distill_golden(golden):
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import load_file
    dit = ZImageTransformer2DModel.from_pretrained(os.path.join(golden, "tiny-zimage", "transformer")).to(torch.float32).eval()
    lora_file = "lora-a-diffsynth.safetensors"
    sd = load_file(os.path.join(golden, lora_file))
    wrapped = wrap_lora(dit)
    for full, w in wrapped.items():
        w.add(sd[f"{full}.lora_A.default.weight"].float(), sd[f"{full}.lora_B.default.weight"].float(), 1.0)
    g = torch.Generator().manual_seed(BASE_SEED + 60)
    h, wd, L, Ln = 8, 6, 7, 4
    cdim = dit.config.cap_feat_dim
    xT = torch.randn(16, 1, h, wd, generator=g)
    cap = torch.randn(L, cdim, generator=g); neg = torch.randn(Ln, cdim, generator=g)
    T_STEPS, T_CFG, S_STEPS, S_CFG = 50, 2.0, 8, 1.0

    def velocity(x, T, c):                       # model_fn_z_image_turbo: the negated DiT output
        return -dit([x], ((1000 - T) / 1000).reshape(1), [c], return_dict=False)[0][0]

    def guided(x, T, cfg):                       # cfg_guided_model_fn
        pos = velocity(x, T, cap)
        if cfg == 1.0:
            return pos
        nv = velocity(x, T, neg)
        return nv + cfg * (pos - nv)

    # (a) fetch_trajectory: the teacher, no grad
    s_sig, s_t = ds_grid(S_STEPS)
    t_sig, t_t = ds_grid(T_STEPS, target=s_t)
    with torch.no_grad():
        traj = [xT.clone()]
        x = xT.clone()
        for k in range(T_STEPS):
            v = guided(x, t_t[k], T_CFG)
            kk = torch.argmin((t_t - t_t[k]).abs())                          # scheduler.step
            sig_ = 0 if kk + 1 >= len(t_t) else t_sig[kk + 1]
            x = x + v * (sig_ - t_sig[kk])
            traj.append(x.clone())
    # (b) align_trajectory: the student, with grad
    torch.set_grad_enabled(True)
    for w in wrapped.values():
        w.A[0].requires_grad_(True); w.B[0].requires_grad_(True)
    weights = ds_training_weight(s_sig, S_STEPS)
    d, loss, idx = {}, 0, []
    for i in range(S_STEPS):
        T = s_t[i]
        j = int(torch.argmin((t_t - T).abs())); idx.append(j)
        x = traj[j]
        v = guided(x, T, S_CFG)
        sig = s_sig[i]
        sig_ = 0 if i + 1 >= S_STEPS else s_sig[i + 1]
        x_ = traj[-1] if i + 1 >= S_STEPS else traj[int(torch.argmin((t_t - s_t[i + 1]).abs()))]
        den = sig_ - sig
        den = torch.sign(den) * torch.clamp(den.abs(), min=1e-6)
        target = (x_ - x) / den
        term = torch.nn.functional.mse_loss(v.float(), target.float()) * weights[torch.argmin((s_t - T).abs())]
        loss = loss + term
        d[f"distill.x.{i}"] = x; d[f"distill.target.{i}"] = target; d[f"distill.v.{i}"] = v
        d[f"distill.term.{i}"] = term.detach().reshape(1)
    loss.backward()
    torch.set_grad_enabled(False)
    idx.append(T_STEPS)
    d.update({"distill.xT": xT, "distill.cap": cap, "distill.neg": neg, "distill.final": traj[-1],
              "distill.teacher_sigmas": torch.cat([t_sig, torch.zeros(1)]), "distill.teacher_timesteps": t_t,
              "distill.student_sigmas": torch.cat([s_sig, torch.zeros(1)]), "distill.student_timesteps": s_t,
              "distill.weights": weights, "distill.idx": torch.tensor(idx, dtype=torch.int64),
              "distill.loss": loss.detach().reshape(1)})
    for full, w in wrapped.items():
        d[f"grad.{full}.lora_A"] = w.A[0].grad; d[f"grad.{full}.lora_B"] = w.B[0].grad
    save("distill-0.safetensors", d, loras=[f"{lora_file}:1"],
         args={"teacher_steps": T_STEPS, "teacher_cfg": T_CFG, "student_steps": S_STEPS, "student_cfg": S_CFG, "shift": 3})

if ONLY == "distill":
    distill_golden(os.environ.get("GOLDEN", OUT))
    sys.exit(0)

# ---------------------------------------------------------------- img2img (diffusers' ZImageImg2ImgPipeline)
# The tiny model of GOLDEN/tiny-zimage loaded from its bf16 files (upcast to float32: the same values as the
# in-memory models of pipe-N), the init image GOLDEN/img2img-init.png opened as PIL's convert("RGB") (64x48,
# a multiple of 16, so the image processor's resize is the identity). Recorded beside pipe-N's tensors:
# image_latents ((posterior sample - shift) * scale, the generator's first draw) and latents.init (the noised
# start: scheduler.scale_noise at the first kept step, the generator's second draw).
# The text features are not recomputed: they are pipe-2's ("a dog", negative ""), handed to the pipeline as
# prompt_embeds / negative_prompt_embeds. The reason: transformers 5.17's Qwen3 gives this tiny text encoder's
# features 1e-3 away from those of te-N / pipe-N (the first decoder layer already differs; embeddings agree, and
# sdpa/eager or float32 loading change nothing), and this file tests img2img, not a second text encoder.
IMG2IMG = dict(prompt="a dog", negative="", seed=11, steps=6, cfg=2.0, width=64, height=48,
               init_image="img2img-init.png", strength=0.6)

def img2img_golden(golden):
    from PIL import Image
    from transformers import AutoTokenizer, Qwen3ForCausalLM
    from diffusers import AutoencoderKL, ZImageImg2ImgPipeline, ZImageTransformer2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    def safe_open_meta(path):
        with safe_open(path, "pt") as f:
            return f.metadata()
    import diffusers.pipelines.z_image.pipeline_z_image_img2img as p2p
    model = os.path.join(golden, "tiny-zimage")
    tok = AutoTokenizer.from_pretrained(os.path.join(model, "tokenizer"))
    # loaded as float32 (not loaded as bf16 and cast): buffers computed at construction, such as the text
    # encoder's RoPE frequencies, would otherwise keep bf16 rounding
    te = Qwen3ForCausalLM.from_pretrained(os.path.join(model, "text_encoder"), dtype=torch.float32).eval().model
    dit = ZImageTransformer2DModel.from_pretrained(os.path.join(model, "transformer"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(model, "vae"), torch_dtype=torch.float32).eval()
    sch = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(model, "scheduler"))
    pipe = ZImageImg2ImgPipeline(scheduler=sch, vae=vae, text_encoder=te, tokenizer=tok, transformer=dit)
    pipe.set_progress_bar_config(disable=True)
    c = IMG2IMG
    feats = load_file(os.path.join(golden, "pipe-2.safetensors"))
    assert json.loads(safe_open_meta(os.path.join(golden, "pipe-2.safetensors"))["args"])["prompt"] == c["prompt"]
    rec, steps_lat = {}, []
    orig_retrieve, orig_prepare = p2p.retrieve_latents, pipe.prepare_latents
    def retrieve(*a, **k):
        r = orig_retrieve(*a, **k); rec["image_latents"] = (r - vae.config.shift_factor) * vae.config.scaling_factor
        return r
    def prepare(*a, **k):
        r = orig_prepare(*a, **k); rec["latents.init"] = r.clone(); return r
    p2p.retrieve_latents, pipe.prepare_latents = retrieve, prepare
    def cb(p, i, t, kw):
        steps_lat.append(kw["latents"].clone()); return {}
    image = Image.open(os.path.join(golden, c["init_image"])).convert("RGB")
    res = pipe(prompt_embeds=[feats["prompt_embeds"]], negative_prompt_embeds=[feats["negative_embeds"]],
               image=image, strength=c["strength"],
               height=c["height"], width=c["width"], num_inference_steps=c["steps"], guidance_scale=c["cfg"] - 1.0,
               generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="pt",
               callback_on_step_end=cb, max_sequence_length=512)
    p2p.retrieve_latents = orig_retrieve
    chat_text = tok.apply_chat_template([{"role": "user", "content": c["prompt"]}], tokenize=False,
                                        add_generation_prompt=True, enable_thinking=True)
    d = {"ids": torch.tensor(tok(chat_text)["input_ids"], dtype=torch.int64),
         "prompt_embeds": feats["prompt_embeds"], "negative_embeds": feats["negative_embeds"],
         "image_latents": rec["image_latents"], "latents.init": rec["latents.init"], "image": res.images[0]}
    for i, l in enumerate(steps_lat):
        d[f"latents.step{i}"] = l
    save("pipe-img2img.safetensors", d, args=dict(c, rng="cpu", loras=[], cfg_norm=0.0, cfg_trunc=1.0))

if ONLY == "img2img":
    img2img_golden(os.environ.get("GOLDEN", OUT))
    sys.exit(0)

# ---------------------------------------------------------------- samplers on a synthetic velocity field
# The Z-Image schedule (FlowMatchEulerDiscreteScheduler with the pipeline's sigmas) driven through diffusers'
# Euler, Heun and DPM-Solver++(2M) schedulers. Heun and DPM-Solver++ cannot take custom sigmas in
# set_timesteps, so their sigmas/timesteps are replaced by the Z-Image ones after set_timesteps, laid out
# exactly as their own set_timesteps lays them out. The loop is the pipeline's: t = (1000 - T) / 1000,
# v = field(x, t), x = scheduler.step(v, T, x).
def zimage_schedule(steps, shift):
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    s.set_timesteps(steps, sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=0.0)
    return s

def make_scheduler(name, steps, shift):
    base = zimage_schedule(steps, shift)
    if name == "euler":
        s = base
    elif name == "heun":
        s = FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s.set_timesteps(steps)
        ts, sg = base.timesteps, base.sigmas
        s.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
        s.sigmas = torch.cat([sg[:1], sg[1:-1].repeat_interleave(2), sg[-1:]])
    elif name == "dpmpp_2m":
        s = DPMSolverMultistepScheduler(num_train_timesteps=1000, solver_order=2, algorithm_type="dpmsolver++",
                                        solver_type="midpoint", prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=shift, final_sigmas_type="zero",
                                        lower_order_final=True)
        s.set_timesteps(steps)
        s.sigmas = base.sigmas.clone()
        s.timesteps = base.timesteps.clone()
    s.set_begin_index(0)
    return s, base.sigmas

SAMPLER_CASES = [(1, 3.0), (2, 3.0), (5, 3.0), (8, 3.0), (9, 6.0)]
g = torch.Generator().manual_seed(BASE_SEED + 50)
x_init = torch.randn(1, 16, 4, 4, generator=g)
field = {"field.a": 0.5 * torch.randn(1, 16, 4, 4, generator=g), "field.c": torch.randn(1, 16, 4, 4, generator=g),
         "field.d": torch.randn(1, 16, 4, 4, generator=g)}
for name in ["euler", "heun", "dpmpp_2m"]:
    d = {"x.init": x_init, **field}
    for k, (steps, shift) in enumerate(SAMPLER_CASES):
        sched, sigmas = make_scheduler(name, steps, shift)
        x, ts = x_init.clone(), []
        for i, T in enumerate(sched.timesteps):
            t = (1000 - T) / 1000
            v = (field["field.a"] * x + t * field["field.c"]) + field["field.d"]
            x = sched.step(v, T, x, return_dict=False)[0]
            ts.append(t); d[f"case{k}.step{i}"] = x
        d[f"case{k}.sigmas"] = sigmas; d[f"case{k}.t"] = torch.stack(ts)
    save(f"sampler-{name}.safetensors", d, cases=[{"steps": n, "shift": sh} for n, sh in SAMPLER_CASES],
         field="v(x, t) = (field.a * x + t * field.c) + field.d, float32 elementwise")
if ONLY == "sampler":
    sys.exit(0)


from transformers import Qwen3Config, Qwen3ForCausalLM, AutoTokenizer
from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel

# ---------------------------------------------------------------- models
DIT_CFG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
               n_refiner_layers=2, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
               rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
TE_CFG = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
              rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True,
              hidden_act="silu", attention_bias=False, bos_token_id=151643, eos_token_id=151645)
VAE_CFG = dict(in_channels=3, out_channels=3,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               block_out_channels=[32, 64, 128, 128], layers_per_block=2, latent_channels=16,
               norm_num_groups=16, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
               use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True)
SCHED_CFG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
if ALT:   # 5 DiT blocks of head_dim 32; a text encoder whose head_dim (16) is not hidden/heads (8)
    DIT_CFG.update(dim=96, n_layers=3, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=48, axes_dims=[16, 8, 8])
    TE_CFG.update(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, head_dim=16)
    VAE_CFG.update(block_out_channels=[16, 32, 64, 64], layers_per_block=1, norm_num_groups=8)

def randomize(model, seed, scale_vec=0.1):
    # default inits leave adaLN, final layers and pad tokens near zero or undefined:
    # draw every parameter so that every path carries signal, then round to bf16
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            v = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        else:
            is_gain = ("norm" in n and n.endswith("weight"))
            v = torch.randn(p.shape, generator=g) * scale_vec + (1.0 if is_gain else 0.0)
        p.copy_(v.to(torch.bfloat16).to(torch.float32))

torch.manual_seed(BASE_SEED)
dit = ZImageTransformer2DModel(**DIT_CFG).eval(); randomize(dit, BASE_SEED)
with torch.no_grad():  # pad tokens: learned vectors of unit scale
    g = torch.Generator().manual_seed(BASE_SEED + 5)
    dit.x_pad_token.copy_(torch.randn(dit.x_pad_token.shape, generator=g).to(torch.bfloat16).float())
    dit.cap_pad_token.copy_(torch.randn(dit.cap_pad_token.shape, generator=g).to(torch.bfloat16).float())
te = Qwen3ForCausalLM(Qwen3Config(**TE_CFG)).eval(); randomize(te, BASE_SEED + 1)
vae = AutoencoderKL(**VAE_CFG).eval(); randomize(vae, BASE_SEED + 2, scale_vec=0.05)
sched = FlowMatchEulerDiscreteScheduler(**SCHED_CFG)

MODEL = os.path.join(OUT, "tiny-zimage")
tokdir = os.path.join(MODEL, "tokenizer")
os.makedirs(tokdir, exist_ok=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(DEPS, f), tokdir)
tok = AutoTokenizer.from_pretrained(tokdir)

dit.to(torch.bfloat16).save_pretrained(os.path.join(MODEL, "transformer"), max_shard_size="300KB")
te.to(torch.bfloat16).save_pretrained(os.path.join(MODEL, "text_encoder"), max_shard_size="6MB")
vae.to(torch.bfloat16).save_pretrained(os.path.join(MODEL, "vae"))
sched.save_pretrained(os.path.join(MODEL, "scheduler"))
dit.to(torch.float32); te.to(torch.float32); vae.to(torch.float32)
json.dump({"_class_name": "ZImagePipeline", "_diffusers_version": "0.36.0.dev0",
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
           "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
          open(os.path.join(MODEL, "model_index.json"), "w"), indent=2)

te_base = te.model
pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=te_base, tokenizer=tok, transformer=dit)
pipe.set_progress_bar_config(disable=True)

def chat(p):
    return tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)

# ---------------------------------------------------------------- tokenizer
TOK_TEXTS = ["a dog", "A photo of a cat sitting on a windowsill, golden hour, 35mm film",
               "一只可爱的小猫坐在窗台上", "Hello, world! It's a test: don't, we'll, they're, I'm, you've, he'd.",
               "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\nand  double  spaces", "emoji 🐶🐱🚀 and ❤️",
               "numbers 1234567890 3.14159 1,000,000", "ÀÉÎÕÜ ñ ç ß Ω Ж ж", "code: for (int i=0;i<10;i++) { x += y[i]; }",
               "<|im_start|>user\nhi<|im_end|>", "", " ", "\n\n\n", "a" * 300, "supercalifragilisticexpialidocious",
               "東京タワーと富士山、夜景。", "한국어 문장입니다.", "مرحبا بالعالم", "e\u0301 combining accent (NFC)",
               "URL https://example.com/path?q=1&r=2#frag", "MiXeD CaSe 'S 'T 'RE 'VE 'M 'LL 'D"]
cases = []
for t in TOK_TEXTS:
    cases.append({"text": t, "ids": tok(t)["input_ids"], "chat": chat(t), "chat_ids": tok(chat(t))["input_ids"]})
json.dump(cases, open(os.path.join(OUT, "tokenizer-cases.json"), "w"), ensure_ascii=False, indent=1)

# ---------------------------------------------------------------- text encoder
PROMPTS = (["a red bicycle leaning on a brick wall", "雨の日の東京、ネオン"] if ALT else
           ["a dog", "一只在雪地里奔跑的柴犬, cinematic lighting"])
for i, p in enumerate(PROMPTS):
    ids = torch.tensor(tok(chat(p))["input_ids"], dtype=torch.int64)
    embeds = pipe._encode_prompt([p], device="cpu", max_sequence_length=512)[0]
    hs = te_base(input_ids=ids[None], output_hidden_states=True).hidden_states
    d = {"te.ids": ids, "te.embeds": embeds}
    for l, h in enumerate(hs):
        d[f"te.hidden.{l}"] = h[0]
    save(f"te-{i}.safetensors", d, prompt=p)

# ---------------------------------------------------------------- DiT single forwards
def block_hooks(model):
    rec, hs = {}, []
    for name, mod in model.named_modules():
        if name.count(".") == 1 and name.split(".")[0] in ("noise_refiner", "context_refiner", "layers"):
            hs.append(mod.register_forward_hook(lambda m, i, o, name=name: rec.__setitem__(name, o[0].clone())))
    return rec, hs

g = torch.Generator().manual_seed(BASE_SEED + 10)
dit_cases = [(8, 8, 7, 0.5), (6, 12, 35, 0.9), (4, 4, 1, 0.02), (16, 10, 64, 1.0)]
dit_inputs = []
for ci, (lh, lw, L, t) in enumerate(dit_cases):
    x = torch.randn(16, 1, lh, lw, generator=g); cap = torch.randn(L, DIT_CFG["cap_feat_dim"], generator=g)
    tt = torch.tensor([t])
    rec, hs = block_hooks(dit)
    out = dit([x], tt, [cap], return_dict=False)[0][0]
    for h in hs: h.remove()
    d = {"dit.x": x, "dit.t": tt, "dit.cap": cap, "dit.out": out}
    if ci == 0:
        d.update({f"dit.block.{k}": v for k, v in rec.items()})
    save(f"dit-{ci}.safetensors", d)
    dit_inputs.append((x, tt, cap))
# a batch of two differently sized items must give the same answers as two single calls
ob = dit([dit_inputs[0][0], dit_inputs[1][0]], torch.cat([dit_inputs[0][1], dit_inputs[1][1]]),
         [dit_inputs[0][2], dit_inputs[1][2]], return_dict=False)[0]
save("dit-batch.safetensors", {"dit.out.0": ob[0], "dit.out.1": ob[1]}, note="outputs of dit-0 and dit-1 run as one batch")

# ---------------------------------------------------------------- scheduler
sched_cases = []
for steps in [1, 2, 4, 8, 9, 30, 50]:
    for shift in [1.0, 3.0, 6.0]:
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
        s.set_timesteps(steps, sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=0.0)
        sched_cases.append({"steps": steps, "shift": shift, "sigmas": s.sigmas.tolist(), "timesteps": s.timesteps.tolist()})
json.dump(sched_cases, open(os.path.join(OUT, "scheduler.json"), "w"), indent=1)

# ---------------------------------------------------------------- VAE
g = torch.Generator().manual_seed(BASE_SEED + 20)
z = torch.randn(1, 16, 8, 12, generator=g)
save("vae-dec.safetensors", {"vae.z": z, "vae.img": vae.decode(z, return_dict=False)[0]})
img = torch.rand(1, 3, 48, 80, generator=g) * 2 - 1
dist = vae.encode(img).latent_dist
save("vae-enc.safetensors", {"vae.img_in": img, "vae.mean": dist.mean, "vae.logvar": dist.logvar})

# ---------------------------------------------------------------- torch-compatible noise
rng = {}
for seed in [0, 42, 1234]:
    for shape in [(16,), (1, 16, 8, 8), (1, 16, 64, 64), (3, 5)]:
        name = "x".join(map(str, shape))
        rng[f"cpu.{seed}.{name}"] = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
        if torch.cuda.is_available():
            rng[f"cuda.{seed}.{name}"] = torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda").cpu()
save_file(rng, os.path.join(OUT, "rng.safetensors"),
          metadata={"note": "torch.randn(shape, generator=torch.Generator(dev).manual_seed(seed)), float32; names dev.seed.shape"})

# ---------------------------------------------------------------- pipelines
def run_pipe(name, c):
    steps_lat = []
    def cb(p, i, t, kw):
        steps_lat.append(kw["latents"].clone()); return {}
    g_diffusers = c["cfg"] - 1.0 if c["cfg"] > 1.0 else 0.0
    res = pipe(prompt=c["prompt"], negative_prompt=c.get("negative"), height=c["height"], width=c["width"],
               num_inference_steps=c["steps"], guidance_scale=g_diffusers,
               generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="pt",
               cfg_normalization=c.get("cfg_norm", 0.0) or False, cfg_truncation=c.get("cfg_trunc", 1.0),
               callback_on_step_end=cb, max_sequence_length=512)
    d = {"ids": torch.tensor(tok(chat(c["prompt"]))["input_ids"], dtype=torch.int64),
         "prompt_embeds": pipe._encode_prompt([c["prompt"]], device="cpu")[0],
         "latents.init": torch.randn(1, 16, c["height"] // 8, c["width"] // 8, generator=torch.Generator("cpu").manual_seed(c["seed"])),
         "image": res.images[0]}
    if g_diffusers > 0:
        d["negative_embeds"] = pipe._encode_prompt([c.get("negative") or ""], device="cpu")[0]
    for i, l in enumerate(steps_lat):
        d[f"latents.step{i}"] = l
    c = dict(c, rng="cpu", loras=c.get("loras", []))
    save(name, d, args=c)

PIPES = [dict(prompt="a dog", seed=42, steps=8, cfg=1.0, width=64, height=64),
         dict(prompt="一只猫", negative="blurry, low quality", seed=7, steps=4, cfg=3.0, width=80, height=48),
         dict(prompt="a dog", negative="", seed=3, steps=3, cfg=5.0, width=32, height=64, cfg_norm=1.0, cfg_trunc=0.6)]
for i, c in enumerate(PIPES):
    run_pipe(f"pipe-{i}.safetensors", c)

# ---------------------------------------------------------------- LoRA
wrapped = wrap_lora(dit)

def make_lora(seed, rank, b_scale):
    g = torch.Generator().manual_seed(seed); out = {}
    for full, w in wrapped.items():
        A = (torch.randn(rank, w.base.in_features, generator=g) / math.sqrt(w.base.in_features)).to(torch.bfloat16).float()
        B = (torch.randn(w.base.out_features, rank, generator=g) * b_scale).to(torch.bfloat16).float()
        out[full] = (A, B)
    return out

def write_lora(path, lora, fmt, alpha=None):
    sd = {}
    for full, (A, B) in lora.items():
        if fmt == "diffsynth":   # DiffSynth-Studio's own checkpoints: bare names, peft adapter name "default"
            sd[f"{full}.lora_A.default.weight"] = A; sd[f"{full}.lora_B.default.weight"] = B
        elif fmt == "diffusers":  # diffusers / PEFT export
            sd[f"transformer.{full}.lora_A.weight"] = A; sd[f"transformer.{full}.lora_B.weight"] = B
        elif fmt == "aitoolkit":  # ai-toolkit / ComfyUI-style prefix
            sd[f"diffusion_model.{full}.lora_A.weight"] = A; sd[f"diffusion_model.{full}.lora_B.weight"] = B
        elif fmt == "kohya":      # kohya / musubi: flattened names, down/up, alpha
            k = "lora_unet_" + full.replace(".", "_")
            sd[f"{k}.lora_down.weight"] = A; sd[f"{k}.lora_up.weight"] = B
            sd[f"{k}.alpha"] = torch.tensor(float(alpha if alpha is not None else A.shape[0]))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, os.path.join(OUT, path), metadata={"format": "pt"})

RANK = 4
lora1 = make_lora(BASE_SEED + 30, RANK, 0.1)   # the user's LoRA
lora2 = make_lora(BASE_SEED + 31, 8, 0.05)     # a second one, like the DistillPatch
write_lora("lora-a-diffsynth.safetensors", lora1, "diffsynth")
write_lora("lora-a-diffusers.safetensors", lora1, "diffusers")
write_lora("lora-b-aitoolkit.safetensors", lora2, "aitoolkit")
l1_file, l1_scale, l1_strength = "lora-a-diffsynth.safetensors", 1.0, 1.0
l2_file, l2_strength = "lora-b-aitoolkit.safetensors", 0.5

for full, w in wrapped.items():
    w.add(*lora1[full], l1_scale * l1_strength)
x, tt, cap = dit_inputs[-1]
save("dit-lora1.safetensors", {"dit.x": x, "dit.t": tt, "dit.cap": cap, "dit.out": dit([x], tt, [cap], return_dict=False)[0][0]},
     loras=[f"{l1_file}:{l1_strength}"])
for full, w in wrapped.items():
    w.add(*lora2[full], l2_strength)
save("dit-lora2.safetensors", {"dit.x": x, "dit.t": tt, "dit.cap": cap, "dit.out": dit([x], tt, [cap], return_dict=False)[0][0]},
     loras=[f"{l1_file}:{l1_strength}", f"{l2_file}:{l2_strength}"])
run_pipe("pipe-lora.safetensors", dict(PIPES[0], loras=[f"{l1_file}:{l1_strength}", f"{l2_file}:{l2_strength}"]))

# ---------------------------------------------------------------- one training step of LoRA 1 (LoRA 2 removed)
for w in wrapped.values():
    w.A = torch.nn.ParameterList([w.A[0]]); w.B = torch.nn.ParameterList([w.B[0]]); w.s = w.s[:1]
torch.set_grad_enabled(True)
for w in wrapped.values():
    w.A[0].requires_grad_(True); w.B[0].requires_grad_(True)
g = torch.Generator().manual_seed(BASE_SEED + 40)
for ti, (lh, lw, L, sigma) in enumerate([(8, 8, 9, 0.7), (6, 4, 20, 0.25)]):
    for w in wrapped.values():
        w.A[0].grad = None; w.B[0].grad = None
    x0 = torch.randn(16, 1, lh, lw, generator=g); noise = torch.randn(16, 1, lh, lw, generator=g)
    capt = torch.randn(L, DIT_CFG["cap_feat_dim"], generator=g)
    xt = (1 - sigma) * x0 + sigma * noise
    pred = -dit([xt], torch.tensor([1 - sigma]), [capt], return_dict=False)[0][0]
    loss = torch.nn.functional.mse_loss(pred, noise - x0)
    loss.backward()
    d = {"train.x0": x0, "train.noise": noise, "train.cap": capt, "train.sigma": torch.tensor([sigma]),
         "train.loss": loss.detach().reshape(1)}
    for full, w in wrapped.items():
        d[f"grad.{full}.lora_A"] = w.A[0].grad; d[f"grad.{full}.lora_B"] = w.B[0].grad
    save(f"train-{ti}.safetensors", d, loras=[f"{l1_file}:{l1_strength}"],
         loss="mean((-dit((1-sigma)*x0 + sigma*noise, t=1-sigma, cap) - (noise - x0))^2) over all elements; "
              "gradients are d loss / d LoRA A and B of the file, at the file's scale")
print("done", sorted(os.listdir(OUT)))
