"""Real SD1.x / SDXL checkpoints for ``qsilk compare --model``, through diffusers (optional).

``diffusers`` and ``transformers`` are the project's ``models`` extra: they are imported only here,
only when a checkpoint is asked for, and a missing package is a one-line error naming the install
command. Loading:

- a single file (``.safetensors`` / ``.ckpt``): ``StableDiffusionPipeline.from_single_file`` or
  ``StableDiffusionXLPipeline.from_single_file``; ``config=`` a local diffusers-format folder
  (``model_index.json`` + component configs + tokenizer) makes it work offline — without it
  diffusers fetches the matching config from the Hugging Face hub (or its local cache);
- a diffusers folder: ``from_pretrained(folder, local_files_only=True)``.

Only the UNet, the VAE, the text encoder(s) and tokenizer(s) are used; sampling is this package's
own loop (`qsilk.demo.run`), so the stabilizer runs at the WebUIs' points. The UNet is wrapped as a
denoiser in the variance-exploding frame, k-diffusion style: ``c_in = 1/√(σ²+1)``, the timestep is
σ's position on the training schedule (interpolated in log σ), and
ε-prediction gives ``D = x − σ·ε``; v-prediction ``D = x/(σ²+1) − σ/√(σ²+1)·v``.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from ..cli import CommandError
from ..probe import find_probe_layer, probe_layer_factor
from .samplers import scaled_linear_alphas_cumprod, sigmas_from_alphas_cumprod

INSTALL_HINT = "pip install 'qsilk[models]'  (diffusers + transformers)"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise CommandError(f"--model with a checkpoint needs diffusers and transformers: {INSTALL_HINT} "
                           f"({exc.name} is missing)") from exc
    return diffusers


def detect_arch(path: Path) -> str:
    """``"sdxl"`` or ``"sd15"`` from a checkpoint's keys (or a diffusers folder's model_index.json)."""
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise CommandError(f"--model {path}: a folder must be a diffusers model (no model_index.json)")
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        return "sdxl" if "XL" in name else "sd15"
    keys = _checkpoint_keys(path)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd15"
    raise CommandError(f"--model {path}: not an SD1.x or SDXL checkpoint (no text-encoder keys found); "
                       "SD2, SD3 and Flux are not supported by the command line")


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return list(state.get("state_dict", state).keys())


def load_checkpoint(path: str | Path, *, config: str | None = None, arch: str = "auto", device: str = "cpu",
                    dtype: str | None = None) -> "DiffusersModel":
    """Load `path` (single file or diffusers folder) as a `DiffusersModel` on `device`."""
    path = Path(path)
    if not path.exists():
        raise CommandError(f"--model {path}: no such file or folder (use --model analytic for the built-in model)")
    if config is not None and not Path(config).is_dir():
        raise CommandError(f"--config {config}: not a folder (expected a diffusers model folder with model_index.json)")
    diffusers = _import_diffusers()
    arch = detect_arch(path) if arch == "auto" else arch
    torch_dtype = _DTYPES[dtype] if dtype else (torch.float16 if str(device).startswith("cuda") else torch.float32)
    cls = diffusers.StableDiffusionXLPipeline if arch == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {} if arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype; the old name works in every version we support
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            if path.is_dir():
                pipe = cls.from_pretrained(str(path), torch_dtype=torch_dtype, local_files_only=True, **extra)
            else:
                kwargs = {"config": str(config), "local_files_only": True} if config else {}
                pipe = cls.from_single_file(str(path), torch_dtype=torch_dtype, **kwargs, **extra)
    except (OSError, ValueError) as exc:
        hint = "" if config else " — offline, pass --config with a local diffusers config folder"
        raise CommandError(f"--model {path}: diffusers could not load it ({exc}){hint}") from exc
    return DiffusersModel(pipe, arch=arch, device=device, dtype=torch_dtype, name=path.stem)


class DiffusersModel:
    """A diffusers SD1.x/SDXL pipeline's parts as a VE-frame denoiser (see the module docstring)."""

    latent_channels: int
    latent_scale: int

    def __init__(self, pipe: Any, *, arch: str, device: str, dtype: torch.dtype, name: str = "checkpoint"):
        self.pipe, self.arch, self.device, self.dtype, self.name = pipe, arch, device, dtype, name
        pipe.to(device)
        self.unet, self.vae = pipe.unet, pipe.vae
        self.unet.eval()
        self.vae.eval()
        self.latent_channels = int(self.unet.config.in_channels)
        self.latent_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sched = pipe.scheduler.config
        self.prediction = "v" if sched.get("prediction_type") == "v_prediction" else "eps"
        self.alphas_cumprod = _alphas_cumprod(sched)
        self._sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self._log_sigmas = self._sigmas.log()
        self.sigma_min, self.sigma_max = float(self._sigmas[0]), float(self._sigmas[-1])
        side = int(self.unet.config.sample_size) * self.latent_scale
        self.default_size = f"{side}x{side}"
        self.default_prompts = ("a photo of a white dog on a lawn, detailed fur",)
        self.description = f"{name} ({arch}, {self.prediction}-prediction, diffusers {_version('diffusers')})"

    # -- conditioning ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative: str = "") -> tuple[dict, dict]:
        """``(cond, uncond)`` dicts of per-row tensors, from the pipeline's own `encode_prompt`."""
        negatives = [negative] * len(prompts)
        if self.arch == "sdxl":
            pe, ne, pooled, npooled = self.pipe.encode_prompt(
                prompt=list(prompts), device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=True, negative_prompt=negatives)
            return {"embeds": pe, "text_embeds": pooled}, {"embeds": ne, "text_embeds": npooled}
        pe, ne = self.pipe.encode_prompt(list(prompts), self.device, 1, True, negative_prompt=negatives)
        return {"embeds": pe}, {"embeds": ne}

    def _time_ids(self, rows: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """SDXL micro-conditioning: (original size, crop top-left, target size) = (H, W, 0, 0, H, W)."""
        h, w = latent_hw[0] * self.latent_scale, latent_hw[1] * self.latent_scale
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=self.dtype, device=self.device)
        return ids.expand(rows, 6)

    # -- denoiser -------------------------------------------------------------------------
    def sigma_to_t(self, sigma: float) -> float:
        """Fractional training timestep of σ: linear interpolation of log σ over the schedule."""
        log_s = math.log(max(sigma, 1e-12))
        ls = self._log_sigmas
        if log_s <= float(ls[0]):
            return 0.0
        if log_s >= float(ls[-1]):
            return float(len(ls) - 1)
        hi = int(torch.searchsorted(ls, torch.tensor(log_s, dtype=ls.dtype)))
        lo = hi - 1
        frac = (log_s - float(ls[lo])) / (float(ls[hi]) - float(ls[lo]))
        return lo + frac

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: float, cond: dict, t: float | None = None) -> torch.Tensor:
        """x0 prediction ``D(x, σ)`` for rows of `x` (VE frame); `t` overrides the timestep (DDIM)."""
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        timestep = float(self.sigma_to_t(sigma) if t is None else t)
        kwargs = {}
        if self.arch == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"],
                                           "time_ids": self._time_ids(x.shape[0], tuple(x.shape[2:]))}
        out = self.unet((x * c_in).to(self.device, self.dtype),
                        torch.tensor(timestep, device=self.device), encoder_hidden_states=cond["embeds"],
                        **kwargs).sample.float()
        xf = x.float()
        if self.prediction == "v":
            return xf / (sigma * sigma + 1.0) - sigma * c_in * out
        return xf - sigma * out

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] from the VAE (latent divided by its scaling factor, minus any shift)."""
        cfg = self.vae.config
        z = latent.to(self.device, self.dtype) / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    def probe_layer(self) -> tuple[str, Any, int | None] | None:
        """The UNet's default probed self-attention (spec §5) and its level factor."""
        found = find_probe_layer(self.unet)
        if found is None:
            return None
        name, module = found
        return name, module, probe_layer_factor(self.unet, name)


def _alphas_cumprod(sched: Any) -> torch.Tensor:
    """ᾱ of the checkpoint's training schedule, from its scheduler config (float64)."""
    n = int(sched.get("num_train_timesteps", 1000))
    b0, b1 = float(sched.get("beta_start", 0.00085)), float(sched.get("beta_end", 0.012))
    kind = sched.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        return scaled_linear_alphas_cumprod(n, b0, b1)
    if kind == "linear":
        return torch.cumprod(1 - torch.linspace(b0, b1, n, dtype=torch.float64), dim=0)
    raise CommandError(f"unsupported beta_schedule {kind!r} in the checkpoint's scheduler config")


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # metadata missing in odd installs; only used in a description
        return "?"
