"""Language models: the decoder, named configs, checkpoint import, tokenizers, sharding."""
