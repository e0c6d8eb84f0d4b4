"""Markdown table from evaluate.py --json files:  python scripts/ablation_table.py LABEL=FILE.json ..."""
import json
import sys


def main(pairs: list[str]) -> None:
    print("| model | guidance | raw: all named right | re-ranked 16→1 | colour | shape | size | position "
          "| CLIP score | CLIP FD |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pair in pairs:
        label, path = pair.split("=", 1)
        r = json.load(open(path))
        raw, best = r["raw"], r["reranked"]
        per = " | ".join(f"{raw[a]:.1%}" if a in raw else "–" for a in ("color", "shape", "size", "position"))
        fd = f"{r['clip_fd']:.4f}" if "clip_fd" in r else "–"
        print(f"| {label} | {r['cfg_scale']:g} | {raw['all']:.1%} | {best['all']:.1%} | {per} "
              f"| {r['clip_score']['raw']:.3f} | {fd} |")


if __name__ == "__main__":
    main(sys.argv[1:])
