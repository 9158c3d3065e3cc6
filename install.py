"""AUTOMATIC1111 / Forge extension installer: QSilk needs nothing beyond what the WebUI ships
(torch, numpy, safetensors, gradio). Kept so the WebUI's installer step finds a file and so
that a future dependency is installed with `launch.run_pip` only when missing."""
