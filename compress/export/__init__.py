"""Exports for serving stacks: GGUF for llama.cpp (``gguf_writer``), standard configs without remote code
(``stock``), dequantized Hugging Face folders (``hf``). Modules are imported where used (no eager imports here:
``compress.checkpoint`` imports ``stock``)."""
