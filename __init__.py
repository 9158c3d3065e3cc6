"""ComfyUI entry point: the QSilk nodes (see README, "ComfyUI").

ComfyUI imports this folder as a package (``nodes.load_custom_node``), so the ``qsilk`` package
beside this file is imported relatively, whatever the folder is called. The WebUIs load only
``scripts/*.py`` and pip installs only ``qsilk*``: neither reads this file. Imported any other way
(no parent package) it exports no nodes.
"""
if __package__:
    from .qsilk.hosts.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
