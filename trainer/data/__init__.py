"""Data for the trainer: tokenizers, conversations and their encoding, the procedural spatial
dataset (the embedded default), the JSONL manifest loader, the packer and the batch stream."""
