"""Causal LMs: KV-cache decoders for speculative decoding."""
