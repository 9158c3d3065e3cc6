"""``modules.ui_components.InputAccordion`` of the AUTOMATIC1111 double (v1.6.0 … v1.10.1; Forge's
``InputAccordionImpl`` behaves the same): a hidden checkbox whose value is the state of an
accordion it creates, used as a context manager; open means True.

A separate module because Gradio 4 parses each component class's source, which fails for a
class defined inside a function; importing it imports Gradio.
"""
from __future__ import annotations

import gradio as gr


class InputAccordion(gr.Checkbox):
    global_index = 0

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id") or f"input-accordion-{InputAccordion.global_index}"
        InputAccordion.global_index += 1
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        label = kwargs.get("label", "Accordion")
        self.accordion = gr.Accordion(label=label, open=value, elem_id=self.accordion_id)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        self.accordion.__exit__(*exc)
