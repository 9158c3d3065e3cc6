"""QSilk outside a WebUI: models, samplers, metrics and figures for ``qsilk compare``.

- `analytic`: the built-in default model (exact denoisers of a known data set; no weights);
- `checkpoint`: SD1.x / SDXL checkpoints through diffusers (optional dependency);
- `samplers`: Euler, Euler a, DPM++ 2M, DDIM, written from the papers;
- `run`: CFG and the stabilizer at the WebUIs' hook points;
- `metrics`: weight-free image and latent metrics, and a registry for learned ones;
- `render`: PNG writing, grids with zoomed crops, heatmaps;
- `compare`: the ``compare`` subcommand.
"""
