"""Proof that an export is right: per-block verification against PyTorch and chain token identity (verify),
ChatTTS's generation loop re-created in PyTorch (reference), the same chain driven from Python (ortloop), and
the quantization error report (compare). Imports the export side; nothing imports this package but the CLI
and the tests.
"""
