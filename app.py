"""The web demo: a prompt box, a gallery of kept images with their CLIP scores, variations of an uploaded
picture, a prompt-to-prompt strip. Gradio, served by this process, on localhost by default.

    python app.py                          # http://127.0.0.1:7860, the shipped models (make web)
    python app.py --models runs/export     # your own vqgan/gpt/clip(.safetensors) folder
    python app.py --vqgan V.pt --gpt G.pt --clip ViT-B-32:openai --host 0.0.0.0 --port 8080

Requests queue (one sampling at a time: two at once on a CPU only slow each other); each set of models is
loaded once per process, on first use. A bad request (empty prompt, a picture that is not one, numbers out
of range) is shown as an error on the page and the server keeps serving. Nothing is sent anywhere: no
analytics, no share link unless --share. The generate action is also the server's API:

    from gradio_client import Client
    images = Client("http://127.0.0.1:7860/").predict(prompt="a red circle", api_name="/generate")
"""
from __future__ import annotations

import argparse
import math
import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls out

import torch  # noqa: E402

from engine.cli import Parser, UsageError, at_least, run  # noqa: E402

HERE = Path(__file__).resolve().parent
SHIPPED = {"Shapes world": HERE / "pretrained" / "shapes", "Scenes world": HERE / "pretrained" / "scenes"}
EXAMPLES = {"Shapes world": ["a large red circle in the top left", "a small blue square at the bottom",
                             "a green triangle on the right", "a purple diamond in the center"],
            "Scenes world": ["a red circle and a blue square", "two yellow triangles",
                             "a green square to the left of a red circle", "three blue circles"]}
LIMITS = {"candidates": (1, 256), "keep": (1, 64), "guidance": (0.0, 20.0), "temperature": (0.05, 5.0),
          "top_k": (0, 100_000), "top_p": (0.0, 1.0), "seed": (0, 2**31 - 1), "refine_steps": (0, 300),
          "flow_steps": (1, 128), "strip_steps": (2, 32)}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default localhost only)")
    p.add_argument("--port", type=at_least(1), default=7860)
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (off)")
    p.add_argument("--models", default=None, metavar="DIR",
                   help="a folder of vqgan/gpt/clip.safetensors (and flow.safetensors) in place of the shipped worlds")
    for kind in ("vqgan", "gpt", "clip"):
        p.add_argument(f"--{kind}", default=None, metavar="PATH",
                       help=f"{kind.upper()} checkpoint or weights (with the other two; CLIP-GEN files too)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best there is)")
    p.add_argument("--root-path", default=None, help="the URL prefix behind a reverse proxy (e.g. /clipgen)")
    return p.parse_args(argv)


def check_args(args) -> None:
    given = [k for k in ("vqgan", "gpt", "clip") if getattr(args, k)]
    if given and len(given) != 3:
        raise UsageError("--vqgan, --gpt and --clip go together: give all three (or --models DIR)")
    if given and args.models:
        raise UsageError("give --models DIR or --vqgan/--gpt/--clip, not both")


def model_choices(args) -> dict[str, dict[str, dict[str, str]]]:
    """{model name: {prior: {"vqgan": path, "gpt": path, "clip": path}}} of what this server offers."""
    if args.vqgan:
        return {"your models": {"gpt": {"vqgan": args.vqgan, "gpt": args.gpt, "clip": args.clip}}}
    folders = {"your models": Path(args.models)} if args.models else SHIPPED
    out = {}
    for name, folder in folders.items():
        files = {k: folder / f"{k}.safetensors" for k in ("vqgan", "gpt", "clip", "flow")}
        if not all(files[k].is_file() for k in ("vqgan", "clip")):
            continue
        priors = {p: {"vqgan": str(files["vqgan"]), "gpt": str(files[p]), "clip": str(files["clip"])}
                  for p in ("gpt", "flow") if files[p].is_file()}
        if priors:
            out[name] = priors
    if not out:
        where = args.models or ", ".join(str(f) for f in SHIPPED.values())
        raise UsageError(f"no models in {where} (vqgan/gpt/clip.safetensors): run `make shapes`, or pass --models DIR")
    return out


class Models:
    """Each (model, prior) pipeline loaded once, on first use, and kept."""

    def __init__(self, choices: dict, device: torch.device):
        self.choices, self.device = choices, device
        self.loaded: dict[tuple[str, str], object] = {}
        self.lock = threading.Lock()

    def get(self, name: str, prior: str):
        from models.clip import load_clip
        from models.convert import load_vqgan
        from models.flow import load_prior
        from models.pipeline import TextToImage

        if name not in self.choices or prior not in self.choices[name]:
            raise ValueError(f"no {prior} prior for {name}")
        with self.lock:
            if (name, prior) not in self.loaded:
                paths = self.choices[name][prior]
                self.loaded[(name, prior)] = TextToImage(load_vqgan(paths["vqgan"]), load_prior(paths["gpt"]),
                                                         load_clip(paths["clip"], device=self.device), self.device)
            return self.loaded[(name, prior)]


def counts(candidates, keep) -> tuple[int, int]:
    n, k = check("candidates", candidates, integer=True), check("keep", keep, integer=True)
    if k > n:
        raise ValueError(f"keep ({k}) cannot be more than the candidates ({n})")
    return n, k


def reporter(progress, total: int, what: str):
    """pipeline progress (units done) -> gr.Progress fraction, or None without a progress bar."""
    return None if progress is None else (lambda done: progress(min(done / total, 1.0), desc=what))


def check(name: str, value, integer: bool = False):
    """value within LIMITS[name] (and whole when integer), else ValueError naming the control."""
    low, high = LIMITS[name]
    label = name.replace("_", " ")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, not {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high or (integer and number != int(number)):
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{label} must be {kind} from {low:g} to {high:g}, not {value}")
    return int(number) if integer else number


class Demo:
    """The page's actions, as plain functions of plain values (the tests call them directly too)."""

    def __init__(self, models: Models):
        self.models = models

    def _pipe(self, model: str, prior: str, flow_steps):
        pipe = self.models.get(model, prior)
        if prior == "flow":
            pipe.gpt.steps = check("flow_steps", flow_steps, integer=True)
        # A small GPT's per-token steps are too small to share out between threads; the flow's are not.
        torch.set_num_threads(1 if prior == "gpt" and pipe.gpt.cfg.n_embd <= 512 else os.cpu_count() or 1)
        return pipe

    @staticmethod
    def _sampling(prior: str, temperature, top_k, top_p, guidance, seed) -> dict:
        kw = {"temperature": check("temperature", temperature), "cfg_scale": check("guidance", guidance),
              "seed": check("seed", seed, integer=True)}
        top_k, top_p = check("top_k", top_k, integer=True), check("top_p", top_p)
        if prior == "flow" and (top_k or top_p < 1):
            raise ValueError("top-k and top-p filter the GPT's token distribution; set them to 0 and 1 for the flow prior")
        kw["top_k"], kw["top_p"] = top_k or None, (top_p if 0 < top_p < 1 else None)
        if top_p == 0:
            raise ValueError("top p must be above 0 (1 = off)")
        return kw

    def generate(self, prompt: str, model: str, prior: str = "gpt", candidates=16, keep=4, guidance=1.0,
                 temperature=1.0, top_k=0, top_p=1.0, seed=0, refine_steps=0, flow_steps=8, progress=None):
        """The kept images, best first, as (PIL image, caption with its CLIP score)."""
        from models.pipeline import to_pil
        from models.refine import RefineConfig

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("type a prompt first, e.g. \"a red circle in the top left\"")
        n, k = counts(candidates, keep)
        kw = self._sampling(prior, temperature, top_k, top_p, guidance, seed)
        refine = RefineConfig(steps=check("refine_steps", refine_steps, integer=True))
        pipe = self._pipe(model, prior, flow_steps)
        pipe.gpt.cfg.check_guidance(kw["cfg_scale"])
        gen = pipe(prompt, n, k, refine=refine, progress=reporter(progress, n, "drawing candidates"), **kw)
        return [(img, f"CLIP {s:.3f}") for img, s in zip(to_pil(gen.images), gen.scores.tolist())]

    def variations(self, picture, model: str, prior: str = "gpt", candidates=16, keep=4, guidance=1.0, seed=0,
                   flow_steps=8, progress=None):
        from models.pipeline import to_pil

        if picture is None:
            raise ValueError("upload a picture first")
        n, k = counts(candidates, keep)
        pipe = self._pipe(model, prior, flow_steps)
        kw = {"cfg_scale": check("guidance", guidance), "seed": check("seed", seed, integer=True)}
        pipe.gpt.cfg.check_guidance(kw["cfg_scale"])
        gen = pipe.variations(picture, n, k, progress=reporter(progress, n, "drawing candidates"), **kw)
        return [(img, f"CLIP {s:.3f}") for img, s in zip(to_pil(gen.images), gen.scores.tolist())]

    def interpolate(self, prompt_a: str, prompt_b: str, model: str, prior: str = "gpt", steps=8, guidance=1.0,
                    seed=0, flow_steps=8, progress=None):
        from models.pipeline import to_pil

        for text, which in ((prompt_a, "first"), (prompt_b, "second")):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"type the {which} prompt of the strip")
        n = check("strip_steps", steps, integer=True)
        pipe = self._pipe(model, prior, flow_steps)
        kw = {"cfg_scale": check("guidance", guidance), "seed": check("seed", seed, integer=True)}
        pipe.gpt.cfg.check_guidance(kw["cfg_scale"])
        gen = pipe.interpolate(prompt_a, prompt_b, steps=n, progress=reporter(progress, n, "drawing the strip"), **kw)
        return [(img, f"{i / (n - 1):.2f}") for i, img in enumerate(to_pil(gen.images))]


def build(args):
    """The gr.Blocks page (not launched)."""
    import gradio as gr

    choices = model_choices(args)
    from engine.distributed import checked_device
    demo_fns = Demo(Models(choices, checked_device(args.device)))
    names = list(choices)

    def ui(fn):
        """fn's errors a user can cause as a message on the page (gr.Error), not a server traceback."""
        def call(*a, progress=gr.Progress()):
            from engine.checkpoint import CheckpointError

            try:
                return fn(*a, progress=progress)
            except (ValueError, UsageError, CheckpointError, OSError) as e:
                raise gr.Error(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
        call.__name__ = fn.__name__
        return call

    def generate(prompt, model, prior, candidates, keep, guidance, temperature, top_k, top_p, seed, refine_steps,
                 flow_steps, progress=gr.Progress()):
        return ui(demo_fns.generate)(prompt, model, prior, candidates, keep, guidance, temperature, top_k, top_p,
                                     seed, refine_steps, flow_steps, progress=progress)

    def variations(picture, model, prior, candidates, keep, guidance, seed, flow_steps, progress=gr.Progress()):
        return ui(demo_fns.variations)(picture, model, prior, candidates, keep, guidance, seed, flow_steps,
                                       progress=progress)

    def interpolate(prompt_a, prompt_b, model, prior, steps, guidance, seed, flow_steps, progress=gr.Progress()):
        return ui(demo_fns.interpolate)(prompt_a, prompt_b, model, prior, steps, guidance, seed, flow_steps,
                                        progress=progress)

    def priors_of(model):
        have = list(choices.get(model, {}))
        return gr.update(choices=have, value=have[0])

    # delete_cache: the pictures it served (in Gradio's temp folder) go after an hour, checked hourly.
    with gr.Blocks(analytics_enabled=False, title="CLIP-GEN, open", delete_cache=(3600, 3600)) as page:
        gr.Markdown("# CLIP-GEN, open: text to images without captions\nA GPT (or a flow prior) draws token "
                    "grids from CLIP's embedding of your text; the VQGAN decodes them; CLIP keeps the best.")
        with gr.Row():
            model = gr.Dropdown(names, value=names[0], label="models", elem_id="model")
            prior = gr.Radio(list(choices[names[0]]), value=list(choices[names[0]])[0], label="prior", elem_id="prior")
        with gr.Tab("Text"):
            with gr.Row():
                prompt = gr.Textbox(label="prompt", placeholder="a large red circle in the top left", scale=4,
                                    elem_id="prompt")
                button = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
            gr.Examples(EXAMPLES.get(names[0], EXAMPLES["Shapes world"]), inputs=prompt)
            with gr.Row():
                candidates = gr.Slider(1, 64, value=16, step=1, label="candidates", elem_id="candidates")
                keep = gr.Slider(1, 16, value=4, step=1, label="kept", elem_id="keep")
                guidance = gr.Slider(0, 5, value=1, step=0.1, label="guidance (1 = none)", elem_id="guidance")
            with gr.Accordion("sampling", open=False):
                with gr.Row():
                    temperature = gr.Slider(0.1, 2, value=1, step=0.05, label="temperature")
                    top_k = gr.Number(0, precision=0, label="top-k (0 = off; GPT only)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p (1 = off; GPT only)")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    dice = gr.Button("random seed", elem_id="random-seed")
                    refine_steps = gr.Slider(0, 100, value=0, step=1, label="refinement steps (0 = off)")
                    flow_steps = gr.Slider(1, 32, value=8, step=1, label="flow prior: ODE steps")
            gallery = gr.Gallery(label="kept images, best first", columns=4, format="png", elem_id="gallery",
                                 buttons=["download", "fullscreen"])
        with gr.Tab("Variations"):
            picture = gr.Image(type="pil", label="a picture", elem_id="picture")
            vary = gr.Button("Variations", variant="primary", elem_id="vary")
            varied = gr.Gallery(label="images like it", columns=4, format="png", buttons=["download"])
        with gr.Tab("Interpolation"):
            with gr.Row():
                prompt_a = gr.Textbox(label="from", value="a red circle")
                prompt_b = gr.Textbox(label="to", value="a blue square")
                strip_steps = gr.Slider(2, 16, value=8, step=1, label="steps")
            strip_button = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
            strip = gr.Gallery(label="strip", columns=8, format="png", buttons=["download"])

        model.change(priors_of, model, prior, api_name=False)
        dice.click(lambda: int.from_bytes(os.urandom(4), "little") % (2**31), None, seed, api_name=False)
        button.click(generate, [prompt, model, prior, candidates, keep, guidance, temperature, top_k, top_p, seed,
                                refine_steps, flow_steps], gallery, api_name="generate", concurrency_id="sampler")
        prompt.submit(generate, [prompt, model, prior, candidates, keep, guidance, temperature, top_k, top_p, seed,
                                 refine_steps, flow_steps], gallery, api_name=False, concurrency_id="sampler")
        vary.click(variations, [picture, model, prior, candidates, keep, guidance, seed, flow_steps], varied,
                   api_name="variations", concurrency_id="sampler")
        strip_button.click(interpolate, [prompt_a, prompt_b, model, prior, strip_steps, guidance, seed, flow_steps],
                           strip, api_name="interpolate", concurrency_id="sampler")
    page.queue(default_concurrency_limit=1)
    return page


def main(args) -> None:
    check_args(args)
    page = build(args)
    print(f"serving on http://{args.host}:{args.port}{args.root_path or ''}/ (Ctrl-C stops)", flush=True)
    page.launch(server_name=args.host, server_port=args.port, share=args.share, root_path=args.root_path,
                ssr_mode=False, show_error=True, quiet=True)


if __name__ == "__main__":
    run(main, parse_args())
