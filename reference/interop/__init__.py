"""Hugging Face interop: hf (convert between our stacked-expert params and the HF layouts; load_pretrained,
read_pretrained_spans for a rank's spans, save_pretrained and the one-key-at-a-time HFCheckpointWriter /
save_pretrained_streaming it uses) and hf_files (safetensors files byte by byte: headers, exact byte-range reads, the
header-first writer).

Imports: model/ and files.py.
"""
