"""Hugging Face interop: hf (convert between our stacked-expert params and the HF layouts; load_pretrained,
save_pretrained).

Imports: model/ and files.py.
"""
