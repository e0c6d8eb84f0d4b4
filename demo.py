"""Text (or a picture) to pictures: CLIP embedding -> GPT candidates -> VQGAN decoder -> CLIP re-ranking.

    python demo.py --text "a red circle in the top left"          # the shipped Shapes models, 16 -> 4
    python demo.py --prompts prompts.txt --out out/shapes.png      # one grid per line of the file
    python demo.py --image picture.png                             # variations of a picture
    python demo.py --interpolate "a red circle" "a blue square" --steps 8
    python demo.py --prior flow --text "a red circle"             # the flow-matching prior, not the GPT

Without --vqgan/--gpt/--clip it loads pretrained/shapes/{vqgan,gpt,clip}.safetensors (`make shapes`
trains and exports them), or the three files of --models DIR (e.g. pretrained/scenes). --cand-size candidates are sampled (in batches, with the GPT's KV cache; bf16
autocast on CUDA), CLIP scores each by the cosine similarity of its image embedding to the condition, and
the best --out-k are kept. --prior flow samples with the flow-matching prior (flow.safetensors beside the
GPT; --gpt PATH may also name a flow file): every candidate's grid in --flow-steps ODE steps at once.

Sampling presets (--sampling; the flags --cand-size, --top-k, --top-p, --temperature, when given, win):
  shapes   16 candidates, the full distribution (no top-k, no top-p): for the project's Shapes GPTs
  clipgen  64 candidates, top-k 500, top-p 0.95: CLIP-GEN's own settings, for a GPT imported from CLIP-GEN
By default (auto) a GPT imported from CLIP-GEN gets clipgen and any other shapes; the first line printed
says which preset and settings were used. A CLIP-GEN GPT has no trained null condition: --cfg-scale other
than 1 is refused on it. The same --seed and flags (--batch-size too: one generator draws the batches in
turn) give the same files; every prompt of --prompts is drawn with that seed, as --text would draw it.

Files written (OUT is --out, default sample.png; OUT_x means OUT's name with _x before the suffix):
  --text, --image  OUT: the kept images side by side (best first, rows of up to 8, 2 px white lines)
                   OUT_0, OUT_1, ...: each kept image, best first (sample_0.png, sample_1.png, ...)
  --prompts        for the j-th prompt (non-blank line, counted from 0): OUT_pj (the grid) and
                   OUT_pj_0, OUT_pj_1, ... (sample_p0.png, sample_p0_0.png, ..., sample_p1.png, ...)
  --interpolate    OUT: the strip of --steps images edge to edge, text A on the left;
                   OUT_0 ... OUT_<steps-1>: each step
Each kept image's CLIP similarity is printed (best first). Mistakes end in one `error: ...` line, exit 2.

The same in Python:
    from models.pipeline import TextToImage
    pipe = TextToImage.from_folder("pretrained/shapes")
    out = pipe("a red circle", n_candidates=16, keep=4, seed=0); out.images, out.scores; out.save("x.png")
    from models.pipeline import SAMPLING_PRESETS, default_sampling     # the preset the GPT calls for:
    out = pipe("a red circle", **SAMPLING_PRESETS[default_sampling(pipe.gpt.cfg)], keep=4)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

START = time.perf_counter()  # before the imports: the summary line counts them

import torch  # noqa: E402

from engine.checkpoint import CheckpointError  # noqa: E402
from engine.cli import Parser, UsageError, check_sampling_numbers, run  # noqa: E402
# Cheap once torch is in (0.03 s): open_clip is imported only by the CLIP loaders that need it.
from models.clip import looks_like_path  # noqa: E402
from models.flow import (FlowConfig, add_flow_args, add_parallel_args, apply_flow_args,  # noqa: E402
                         apply_parallel_args)
from models.pipeline import SAMPLING_PRESETS, default_sampling, numbered  # noqa: E402
from models.refine import add_args as add_refine_args, from_args as refine_from_args  # noqa: E402

HERE = Path(__file__).resolve().parent
SHIPPED = Path("pretrained/shapes")  # relative to this file's folder
KINDS = {"vqgan": "VQGAN", "gpt": "GPT", "clip": "CLIP"}
PRIOR_FILES = {"gpt": "gpt", "flow": "flow"}  # --prior -> the file of MODELS it reads (<name>.safetensors)
# the shipped folders (relative to this file's folder) and how a checkout without their files gets them
HOW_TO_GET = {SHIPPED: "run `make shapes` to train the Shapes checkpoints",
              Path("pretrained/scenes"): "run `make scenes` to train the scenes checkpoints"}
# On CPU a GPT this narrow does too little work per token to share out: 16 Shapes candidates took 0.35 s on
# 1 thread and 19 s on 2 (2 cores busy with training: OpenMP threads wait for each other at each of the
# thousands of small per-token ops). On free cores a second thread could save part of the 0.35 s at most.
SMALL_GPT_WIDTH = 512
PRESET_NAMES = tuple(SAMPLING_PRESETS)
# The flags a preset fills in when not given: {argparse dest: SAMPLING_PRESETS key}
PRESET_FLAGS = {"cand_size": "n_candidates", "top_k": "top_k", "top_p": "top_p", "temperature": "temperature"}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the prompt")
    what.add_argument("--prompts", metavar="FILE", help="a UTF-8 text file, one prompt per line: one grid each")
    what.add_argument("--image", metavar="PATH", help="variations of a picture: its CLIP image embedding is "
                                                      "the condition")
    what.add_argument("--interpolate", nargs=2, metavar=("TEXT_A", "TEXT_B"),
                      help="a strip of --steps images from TEXT_A to TEXT_B (one image each, same seed)")
    p.add_argument("--steps", type=int, default=None, help="images in the --interpolate strip (default 8)")
    p.add_argument("--interp-mode", choices=["slerp", "lerp"], default="slerp",
                   help="path between the two text embeddings: great circle, or normalised straight line")
    g = p.add_argument_group("models")
    g.add_argument("--models", default=None, metavar="DIR",
                   help=f"folder of vqgan.safetensors, gpt.safetensors and clip.safetensors (what export.py writes; "
                        f"default {SHIPPED}, the Shapes world); "
                        f"--vqgan, --gpt and --clip replace its files one by one")
    for kind, name in KINDS.items():
        extra = " or an open_clip NAME:TAG (e.g. ViT-B-32:openai)" if kind == "clip" else ""
        g.add_argument(f"--{kind}", default=None, metavar="PATH",
                       help=f"{name} checkpoint or weights file{extra} (default: MODELS/{kind}.safetensors)")
    g.add_argument("--no-ema", action="store_true", help="the GPT's raw weights, not its EMA (training checkpoints)")
    g.add_argument("--prior", choices=sorted(PRIOR_FILES), default=None,
                   help="the stage-2 prior: gpt (MODELS/gpt.safetensors, the default) or flow (MODELS/flow.safetensors, "
                        "the flow-matching prior); with --gpt PATH the file says which it is")

    g = p.add_argument_group("sampling")
    g.add_argument("--sampling", choices=["auto", *PRESET_NAMES], default="auto",
                   help="the preset the four flags below default to (see above; default auto: clipgen for a "
                        "GPT imported from CLIP-GEN, shapes for others)")
    g.add_argument("--cand-size", type=int, default=None, help="candidates sampled per prompt (preset: 16 or 64)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (preset: none "
                                                           "or 500)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens "
                                                             "whose probability reaches p (preset: none or 0.95)")
    g.add_argument("--temperature", type=float, default=None, help="(preset: 1)")
    g.add_argument("--out-k", type=int, default=4, help="kept after CLIP re-ranking (default 4)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = none; refused on "
                                                                "a GPT whose null condition was never trained)")
    g.add_argument("--seed", type=int, default=0, help="same seed (and --batch-size), same images (default 0)")
    g.add_argument("--batch-size", type=int, default=64, help="candidates sampled at once (default 64)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best there is)")
    g.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads (default: 1 for a GPT up to {SMALL_GPT_WIDTH} wide, whose per-token work is "
                        "too small to share out; torch's default for larger ones)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="CUDA: bf16 autocast (auto = bf16); CPU: bf16 stores the GPT's weights in bf16, "
                        "faster for large GPTs on CPUs with bf16 instructions (AVX512-BF16, AMX), slower elsewhere "
                        "(auto = bf16 for GPTs of 10M parameters or more where oneDNN packs bf16, else fp32, "
                        "prepacked); MPS: fp32")
    add_flow_args(p)
    add_parallel_args(p)
    g = add_refine_args(p)
    g.description = ("the kept images' latents are moved toward the prompt (or --image's picture) by CLIP's "
                     "gradient, then re-ranked; not for --interpolate")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="sample.png",
                   help="the grid (or strip) to write (default sample.png); see above for the other files")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@dataclass
class Job:
    label: str            # what the printed scores are about
    out: Path             # the grid or strip
    text: str | None = None


# ----------------------------------------------------------------------- checks before any model is loaded

def check_numbers(args) -> None:
    for flag, value, low in (("cand-size", args.cand_size, 1), ("out-k", args.out_k, 1),
                             ("batch-size", args.batch_size, 1), ("top-k", args.top_k, 1),
                             ("threads", args.threads, 1)):
        if value is not None and value < low:
            raise UsageError(f"--{flag} must be at least {low}, got {value}")
    if args.cand_size is not None and args.out_k > args.cand_size:
        raise UsageError(f"--out-k {args.out_k} keeps more than the --cand-size {args.cand_size} candidates")
    check_sampling_numbers(args)
    if args.prior is not None and args.gpt is not None:
        raise UsageError("--prior picks a file of --models; --gpt PATH names the prior itself: give one of them")
    if args.steps is not None and args.interpolate is None:
        raise UsageError("--steps goes with --interpolate")
    args.refine = refine_from_args(args)
    if args.refine.steps and args.interpolate:
        raise UsageError("--refine-steps is not for --interpolate (each step would move on its own)")
    args.steps = 8 if args.steps is None else args.steps
    if args.steps < 2:
        raise UsageError(f"--steps must be at least 2, got {args.steps}")


def capped_threads(n: int) -> int:
    """n, or this machine's cores when n asks for more (OpenMP crashes on a hundred thousand threads)."""
    cores = os.cpu_count() or 1
    if n > cores:
        print(f"warning: --threads {n} is more than this machine's {cores} cores; using {cores}", file=sys.stderr)
        return cores
    return n


def check_text(text: str, what: str) -> str:
    if not text.strip():
        raise UsageError(f"{what} is empty; give a description such as \"a red circle in the top left\"")
    return text


def check_out(out: Path) -> None:
    """The output must be writable before any time goes into loading and sampling."""
    from PIL import Image

    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {out / 'sample.png'}")
    Image.init()
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(f"--out {out}: give a file name ending in .png (or another picture type: .jpg, .webp)")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: the folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: the folder {parent} is not writable")


def read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --prompts {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompt (one per line; blank lines are skipped)")
    return prompts


def read_picture(path: str):
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot read --image {path} as a picture: {reason}") from None
    return img


def checkpoint_paths(args) -> dict[str, tuple[str, bool]]:
    """{kind: (path or open_clip name, is the shipped default)}; a missing file is named with how to get it."""
    out = {}
    for kind, name in KINDS.items():
        given = getattr(args, kind)
        path = given or str(shipped(PRIOR_FILES[args.prior or "gpt"] if kind == "gpt" else kind, args.models))
        hint = f"{how_to_get(args.models)}, or pass --{kind} PATH"
        if given is None and not Path(path).is_file():
            name = "flow prior" if kind == "gpt" and args.prior == "flow" else name
            what = f"the shipped Shapes {name}" if args.models is None else f"the {name} of --models {args.models}"
            raise CheckpointError(f"{_short(path)} not found ({what}): {hint}")
        if given is not None and not Path(given).is_file() and (kind != "clip" or looks_like_path(given)):
            raise CheckpointError(f"{name} checkpoint not found: {given} (--{kind}); {hint} of an existing file")
        out[kind] = (path, given is None)
    return out


def shipped(kind: str, models: str | None = None) -> Path:
    """A stage's file in --models DIR, or in the shipped Shapes folder."""
    return (Path(models) if models is not None else HERE / SHIPPED) / f"{kind}.safetensors"


def how_to_get(models: str | None) -> str:
    folder = (HERE / SHIPPED if models is None else Path(models)).resolve()
    return next((how for shipped_dir, how in HOW_TO_GET.items() if folder == (HERE / shipped_dir).resolve()),
                "write the three files with export.py")


def _short(path: str | Path) -> str:
    """The path relative to the working folder when it lies inside it, as given otherwise."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if rel.startswith("..") else rel


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = str(message).strip().splitlines()
    return f"warning: {text[0] if text else category.__name__}\n"


# ------------------------------------------------------------------------------------------------ main

def main(args: argparse.Namespace) -> None:
    check_numbers(args)
    out = Path(args.out)
    if args.prompts:
        prompts = read_prompts(args.prompts)
        for j, text in enumerate(prompts):
            check_text(text, f"prompt {j} of {args.prompts}")
        jobs = [Job(f"prompt {j}: {_quote(t)}", numbered(out, f"p{j}"), t) for j, t in enumerate(prompts)]
    elif args.image:
        jobs = [Job(f"variations of {args.image}", out)]
    elif args.interpolate:
        a, b = (check_text(t, f"--interpolate text {k}") for k, t in zip("AB", args.interpolate))
        jobs = [Job(f"{_quote(a)} -> {_quote(b)}", out)]
    else:
        jobs = [Job(_quote(check_text(args.text, "--text")), out, args.text)]
    check_out(out)
    picture = read_picture(args.image) if args.image else None
    paths = checkpoint_paths(args)

    default_threads = torch.get_num_threads()
    t_imports = time.perf_counter()
    device = check_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # reading and casting weights gains nothing from more
    # The GPT first: its config says which sampling settings fit it and whether it can be guided, and a
    # refusal should come before the VQGAN and CLIP are loaded.
    gpt = load_stage("gpt", *paths["gpt"], device, args)
    gpt.cfg.check_guidance(args.cfg_scale)
    line = apply_flow_args(gpt, args)
    if line:
        print(line, flush=True)
    print(resolve_sampling(args, gpt.cfg), flush=True)
    pipe = load_pipeline(paths, device, args, gpt)
    apply_parallel_args(pipe, args)
    if device.type == "cpu":
        # The flow prior runs a few large batched forwards, which share out like the decoder's convolutions.
        small = pipe.gpt.cfg.n_embd <= SMALL_GPT_WIDTH and not hasattr(pipe.gpt, "n_forwards")
        threads = args.threads or (1 if small else default_threads)
        threads = capped_threads(threads)
        torch.set_num_threads(threads)
        pipe.refine_threads = args.threads or default_threads  # decoder and CLIP backward: convolutions share out
    t_loaded = time.perf_counter()

    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
              seed=args.seed, batch_size=args.batch_size)
    per_job = args.steps if args.interpolate else args.cand_size
    bar = progress_bar(per_job * len(jobs), "steps" if args.interpolate else "candidates", args.quiet)
    lines = []
    try:
        for j, job in enumerate(jobs):
            report = None if bar is None else (lambda done, base=j * per_job: bar.update(base + done - bar.n))
            if args.interpolate:
                lines += interpolation(pipe, args, job, report, kw)
            else:
                lines += candidates(pipe, args, job, picture, report, kw)
    finally:
        if bar is not None:
            bar.close()
    t_end = time.perf_counter()
    print("\n".join(lines))
    what = f"{args.steps} steps" if args.interpolate else f"{args.cand_size} candidates -> {args.out_k} kept"
    what += f", {len(jobs)} prompts" if len(jobs) > 1 else ""
    print(f"{what} in {t_end - START:.1f} s (imports {t_imports - START:.1f} s, loading {t_loaded - t_imports:.1f} s, "
          f"sampling {t_end - t_loaded:.1f} s) on {device}")


def candidates(pipe, args, job: Job, picture, report, kw) -> list[str]:
    """Sample, re-rank, write the grid and the kept images; the lines to print."""
    from models.pipeline import save_images

    if picture is not None:
        gen = pipe.variations(picture, args.cand_size, args.out_k, progress=report, refine=args.refine, **kw)
    else:
        gen = pipe(job.text, args.cand_size, args.out_k, progress=report, refine=args.refine, **kw)
    written = save_images(gen.images, job.out)
    about = "the picture" if picture is not None else "the text"
    refined = f", refined {args.refine.steps} steps" if args.refine.steps else ""
    return [f"{job.label}: the best {len(gen.images)} of {args.cand_size} candidates{refined} by CLIP similarity to "
            f"{about}",
            *(f"  {s:7.4f}  {p}" for s, p in zip(gen.scores.tolist(), written[1:])),
            f"grid: {job.out}"]


def interpolation(pipe, args, job: Job, report, kw) -> list[str]:
    """One image per step from text A to text B, written as a strip; the lines to print."""
    from models.pipeline import save_images

    ends = pipe.clip.encode_text(list(args.interpolate))  # (2, D): A and B
    gen = pipe.interpolate(ends[0], ends[1], steps=args.steps, mode=args.interp_mode, progress=report, **kw)
    written = save_images(gen.images, job.out, ncol=len(gen.images), padding=0)
    sims = (pipe.clip.encode_image(gen.images) @ ends.T).tolist()
    return [f"{job.label}, {args.interp_mode}, seed {args.seed}: CLIP similarity to A and B",
            *(f"  t={i / (args.steps - 1):.2f}  A {a:.4f}  B {b:.4f}  {p}"
              for i, ((a, b), p) in enumerate(zip(sims, written[1:]))),
            f"strip: {job.out}"]


def check_device(requested: str | None) -> torch.device:
    from engine.distributed import checked_device

    return checked_device(requested)  # one line for no device, a missing one, or one that cannot run (meta)


def resolve_sampling(args, gpt_cfg) -> str:
    """Fill in the sampling flags left unset (PRESET_FLAGS) from the preset: --sampling's, or for auto the
    one the GPT calls for (models.pipeline.default_sampling: CLIP-GEN's for a CLIP-GEN GPT). Returns the
    line that says which preset and settings are used, the flags given marked as such."""
    name = default_sampling(gpt_cfg) if args.sampling == "auto" else args.sampling
    given = {dest for dest in PRESET_FLAGS if getattr(args, dest) is not None}
    for dest, key in PRESET_FLAGS.items():
        if dest not in given:
            setattr(args, dest, SAMPLING_PRESETS[name][key])
    if not args.interpolate and args.out_k > args.cand_size:
        raise UsageError(f"--out-k {args.out_k} keeps more than the {args.cand_size} candidates of the {name} "
                         f"sampling preset; raise --cand-size")
    why = {"auto": "for a GPT imported from CLIP-GEN" if name == "clipgen" else "for the project's priors"}
    settings = {"cand_size": f"{args.cand_size} candidates", "top_k": f"top-k {args.top_k or 'none'}",
                "top_p": f"top-p {'none' if args.top_p is None else format(args.top_p, 'g')}",
                "temperature": f"temperature {args.temperature:g}"}
    if args.interpolate:
        del settings["cand_size"]  # one image per step
    if isinstance(gpt_cfg, FlowConfig):
        del settings["top_k"], settings["top_p"]  # the flow prior has no token distribution to filter
    shown = [text + (f" (--{dest.replace('_', '-')})" if dest in given else "") for dest, text in settings.items()]
    return f"sampling: {name} preset ({why.get(args.sampling, '--sampling')}): {', '.join(shown)}"


def load_stage(kind: str, path: str, default: bool, device, args):
    """One stage's model; a CheckpointError is prefixed with its flag and says how to get a good file."""
    from models.clip import load_clip
    from models.convert import load_vqgan
    from models.flow import load_prior

    loaders = {"vqgan": load_vqgan, "gpt": lambda p: load_prior(p, use_ema=not args.no_ema),
               "clip": lambda p: load_clip(p, device=device)}
    try:
        return loaders[kind](path)
    except CheckpointError as e:  # unreadable, or of another kind; say how to get a good one
        hint = f" ({how_to_get(args.models)}, or pass --{kind} PATH)" if default or "pass " not in str(e) else ""
        raise CheckpointError(f"--{kind}: {e}{hint}") from None


def load_pipeline(paths: dict, device, args, gpt):
    """The VQGAN and CLIP beside the loaded GPT; stages that do not fit together are a user error too (one
    line), not a traceback."""
    from models.pipeline import TextToImage

    vqgan, clip = (load_stage(kind, *paths[kind], device, args) for kind in ("vqgan", "clip"))
    try:
        return TextToImage(vqgan, gpt, clip, device, args.precision)
    except ValueError as e:
        raise CheckpointError(f"the checkpoints do not fit together: {e}; pass the --vqgan and --clip the GPT "
                              f"was trained with") from None


def progress_bar(total: int, unit: str, quiet: bool):
    """A tqdm bar on stderr (not when --quiet, nor when stderr is not a terminal); None when off."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                bar_format="{percentage:3.0f}%|{bar}| {n:.0f}/{total} " + unit + " [{elapsed}<{remaining}]")


def _quote(text: str, width: int = 70) -> str:
    return repr(text if len(text) <= width else text[:width - 3] + "...")


if __name__ == "__main__":
    warnings.formatwarning = one_line_warning  # e.g. CLIP's "text truncated" warning: one stderr line
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # a prompt's unicode never crashes the print
    run(main, parse_args())
    # Done and every file closed: skip the interpreter's teardown of torch and open_clip (0.5 to 0.9 s of the
    # few seconds a Shapes run takes, measured on 2 cores).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
