"""Opt-in bridges to other libraries; importing a submodule is what turns one on (docs/timm.md)."""
