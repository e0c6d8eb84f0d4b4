"""Stage 2: train the GPT that writes VQGAN token grids from CLIP embeddings.

Not implemented yet: issue 3 ("Stage 2: CLIP conditioning and the conditional GPT") brings it.
"""
import sys

if __name__ == "__main__":
    sys.exit("train_gpt.py is not implemented yet: issue 3 (stage 2, the conditional GPT) brings it")
