"""Vision-language models (LLaVA): a token-reduced vision tower, the language model as a KV-cache decoder taking
embeddings, and generation that splices the image's visual tokens into the prompt."""
