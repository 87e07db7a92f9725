"""Training the tiny default model: corpus, byte-level BPE and the denoising training loop. Never imported by serving code."""
