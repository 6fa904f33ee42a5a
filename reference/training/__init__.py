"""What a training step and a run need beyond the model: optim (Muon, AdamW, clipping), schedules (learning rate,
batch size), balancing (SMEBU, sign), checkpoint and sealed_file (HDF5 checkpoints, sealed and atomic), memory (the
memory estimate checked before a run starts).

Imports: operators/, model/ and files.py; never data/, interop/, generation/ or inspection/.
"""
