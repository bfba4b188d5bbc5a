"""Write the example scenes in examples/ (and their true captions) from the generator.

    python scripts/make_examples.py

The seed (2024) is used by nothing else, so these are held-out images for the demo model.
"""

from __future__ import annotations

from pathlib import Path

from blipserve.train.synthetic import caption, render, scenes

EXAMPLES = Path(__file__).parents[1] / "examples"
SEED = 2024
COUNT = 6


def main() -> None:
    EXAMPLES.mkdir(exist_ok=True)
    lines = []
    for i, scene in enumerate(scenes(COUNT, SEED), start=1):
        name = f"scene-{i}.png"
        render(scene).save(EXAMPLES / name, optimize=True)
        lines.append(f"{name}\t{caption(scene)}")
    (EXAMPLES / "captions.tsv").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
