from lmforge.generate.sampling import SamplingParams, generate, generate_ids, next_token

__all__ = ["SamplingParams", "generate", "generate_ids", "next_token"]
