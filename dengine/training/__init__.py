"""Training the embedded models: the char-level tokenizer, real-format export and the diffusion SFT loop."""
