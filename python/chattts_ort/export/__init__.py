"""The export side (needs the `export` extra, i.e. torch): ChatTTS's GPT in export-friendly PyTorch (model),
ChatTTS asset folders (assets), where models come from (sources), the graphs of every block (blocks, fused,
sampling), the exporter, and per-block quantization. It writes export folders in the format of
`chattts_ort.format`; it never imports the runtime or the checks. Import the submodules you need:

    from chattts_ort.export.exporter import export_model
"""
