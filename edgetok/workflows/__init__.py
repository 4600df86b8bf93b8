"""The workflows: what evaluates (`edgetok eval`), compares (`edgetok compare`) or quantizes (`edgetok quantize`)
a model. They sit above what runs one (vit/ loading, patching, methods, token transform, FLOPs; onnx/;
plugins/; runtime/; engine/) and use it; nothing below imports them (tests/test_layout.py checks both the
layering and that edgetok has no import cycle)."""
