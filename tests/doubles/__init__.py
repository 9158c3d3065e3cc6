"""Test doubles of the WebUI hosts (no WebUI is available in CI).

Each double's docstring names the host source and commit it mirrors. They are written from the
research notes and a reading of the hosts' source; no host code is copied.
"""
