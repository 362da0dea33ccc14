"""Mixed-modal data: vocabulary, tokenizers, embedded TFDS datasets, grain pipeline."""
