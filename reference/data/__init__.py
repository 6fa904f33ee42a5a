"""The data pipeline: store (token files and prepared datasets on disk), packing (the sequential loader and the
document order every loader shares), rsdb (the RSDB loader), mixture (phase mixes of sources), tokenizer (byte,
Hugging Face and trained BPE tokenizers), prepare (`trinity data prepare`), synthetic (Markov sources for tests and
demos).

Imports: files.py only; never model/ or training/ (a loader gives tokens and document ids, nothing model-shaped).
"""
