"""Where the project's own model organisms live and how `organism:NAME` references resolve.

Shipped organisms are plain HF model directories under `engramlab/organisms/weights/<name>/`
(`config.json`, `model.safetensors`, `tokenizer.json`, a model card `README.md`), so they load right after
`pip install -e .` and with any HF tool.
"""

from __future__ import annotations

from pathlib import Path

from engramlab.errors import EngramError

ORGANISM_PREFIX = "organism:"
WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_organisms() -> list[str]:
    """Names of the organisms that ship in this checkout (folders holding a `config.json`)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").is_file())


def is_organism_ref(ref: str) -> bool:
    return str(ref).startswith(ORGANISM_PREFIX)


def organism_path(ref: str) -> Path:
    """Resolve `organism:NAME` (or a bare NAME) to its shipped directory, or explain what ships. Only the names of
    shipped organisms resolve (never a path such as organism:../../x)."""
    name = str(ref).removeprefix(ORGANISM_PREFIX)
    path = WEIGHTS_DIR / name
    if name not in shipped_organisms():
        shipped = ", ".join(f"organism:{n}" for n in shipped_organisms()) or "none"
        raise EngramError(
            f"organism:{name} is not shipped in this checkout (shipped: {shipped}); "
            f"rebuild it with `engramlab organisms build --out DIR` and pass --model DIR."
        )
    return path
