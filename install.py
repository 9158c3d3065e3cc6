"""Run by the WebUI at start-up and after an install from the Extensions tab (as ``python
install.py`` with the WebUI root on PYTHONPATH).

QSilk needs nothing beyond what the WebUI already ships (torch, numpy, Gradio, safetensors,
Pillow), so there is nothing to install. If a package is ever needed, use the WebUI's helpers so
that ``--skip-install`` and ``INDEX_URL`` are honoured::

    import launch
    if not launch.is_installed("package_import_name"):
        launch.run_pip("install package==x.y", "package for QSilk")
"""
