"""Graph stages: frontend (onnx_frontend) -> axes/rules/infer (symmetry pass) -> rewrite."""
