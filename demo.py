"""Text to pictures: CLIP text embedding -> GPT tokens -> VQGAN decoder -> CLIP re-ranking.

Not implemented yet: issue 5 ("demo.py: text (and images) to pictures, fast") brings it; it needs the
GPT of issue 3. Until then `make demo` trains a short VQGAN on the Shapes world (see README).
"""
import sys

if __name__ == "__main__":
    sys.exit("demo.py is not implemented yet: issue 5 brings it (it needs the stage-2 GPT of issue 3)")
