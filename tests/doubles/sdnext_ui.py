"""``modules.ui_components.InputAccordion`` of the SD.Next double (vladmandic/sdnext ``058a7f0c``).

SD.Next keeps the class (marked ``# unused``) but ships no ``inputAccordion.js``: the checkbox is
created hidden and its ``change`` event calls a JavaScript function that does not exist, so no
header checkbox is ever drawn. ``get_block_name`` says "checkbox". A separate module because
Gradio parses each component class's source, which fails for a class defined inside a function.
"""
from __future__ import annotations

import gradio as gr


class InputAccordion(gr.Checkbox):
    global_index = 0

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id")
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordion.global_index}"
            InputAccordion.global_index += 1
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(**{**kwargs, "elem_id": self.accordion_id,
                                         "label": kwargs.get("label", "Accordion"),
                                         "elem_classes": ["input-accordion"], "open": value})

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        self.accordion.__exit__(*exc)

    def get_block_name(self):
        return "checkbox"
